"""Structured logging for the node: plain text for people, JSON lines for log collectors.

``configure("INFO", "json")`` makes every record one JSON object with ``ts`` (ISO 8601 UTC),
``level``, ``logger``, ``msg`` and any ``extra={...}`` fields the call added, so journald or a
collector can filter on them (``event``, ``slot``, ``height``...).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any, ClassVar

from node.net.host import configure_logging

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, sort_keys=True)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` (UTC time; the extra fields appended)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """ISO 8601 in UTC with milliseconds, as in the JSON lines."""
        return _timestamp(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = {k: v for k, v in vars(record).items()
                 if k not in _STANDARD and not k.startswith("_")}  # fmt: skip
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in sorted(extra.items()))
        return text


class TransientNetworkErrors(logging.Filter):
    """libp2p logs at ERROR every stream it could not open or negotiate and every connection
    that went away under its reader: at a grid's start, or when a duplicate connection is
    closed (docs/network.md, "One connection per member"), a node of 50 wrote about ten such
    lines a second, none of them for the operator to act on. Each caller retries (pubsub,
    identify, our Raft and address streams, which count their failures in the metrics), so
    these records become INFO records of their logger: shown only where libp2p's INFO is
    (``configure`` sets libp2p to WARNING, so by default they are not); every other libp2p
    error keeps its level."""

    RULES: ClassVar[dict[str, tuple[tuple[str, tuple[str, ...]], ...]]] = {
        "libp2p.host.basic_host": (("Failed to open stream to peer", ()),),
        "libp2p.protocol_muxer.multiselect_client": (("MultiselectClient handshake:", ()),),
        "libp2p.stream_muxer.yamux.yamux": (
            ("Error in handle_incoming for peer", ("ConnectionClosedError", "ClosedResourceError")),
        ),
        "libp2p.network.swarm": (
            ("fail to upgrade mux for peer", ()),
            ("[ADDCONN_FAIL]", ("Cancelled",)),
        ),
    }
    """Logger name: (message prefix, words one of which the message must hold (none: any))."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote a matching ERROR record to INFO (dropped if its logger does not log INFO)."""
        if record.levelno < logging.ERROR:
            return True
        message = record.getMessage()
        for prefix, words in self.RULES.get(record.name, ()):
            if message.startswith(prefix) and (not words or any(w in message for w in words)):
                record.levelno, record.levelname = logging.INFO, "INFO"
                return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


TRANSIENT_NETWORK_ERRORS = TransientNetworkErrors()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Set levels (ours and libp2p's) and install one handler with the chosen format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    configure_logging(level)
    # libp2p logs every failed TCP dial at ERROR; peers that are still starting or restarting
    # are expected, and our reconnect loop counts dial failures (metrics) and logs them at DEBUG.
    logging.getLogger("libp2p.transport.tcp.tcp").setLevel(
        logging.DEBUG if level == "DEBUG" else logging.CRITICAL
    )
    for name in TransientNetworkErrors.RULES:
        logging.getLogger(name).addFilter(TRANSIENT_NETWORK_ERRORS)  # once: same object
