"""Structured logging for the node: plain text for people, JSON lines for log collectors.

``configure("INFO", "json")`` makes every record one JSON object with ``ts`` (ISO 8601 UTC),
``level``, ``logger``, ``msg`` and any ``extra={...}`` fields the call added, so journald or a
collector can filter on them (``event``, ``slot``, ``height``...).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

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
