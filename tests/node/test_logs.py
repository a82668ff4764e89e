"""node/daemon/logs.py: JSON lines and key=value text, one handler, libp2p records included.

``configure`` replaces the root logger's handlers. pytest swaps its own capture handlers on the
root logger per test phase, so the state is saved and restored within the test call itself
(:func:`configured`), not across a fixture's setup and teardown phases.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from node.daemon import logs


@contextmanager
def configured(level: str, fmt: str) -> Iterator[io.StringIO]:
    """``logs.configure(level, fmt)`` writing into a StringIO; every logger restored after."""
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    known = logging.root.manager.loggerDict
    loggers = {name: (lg.level, lg.propagate) for name, lg in known.items()
               if isinstance(lg, logging.Logger)}  # fmt: skip
    try:
        logs.configure(level, fmt)
        assert len(root.handlers) == 1
        stream = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        for name, lg in list(logging.root.manager.loggerDict.items()):
            if isinstance(lg, logging.Logger):
                level, lg.propagate = loggers.get(name, (logging.NOTSET, True))
                lg.setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_format_is_one_object_per_line_with_extra_fields() -> None:
    """configure("INFO", "json"): each record is one JSON line with ts/level/logger/msg/extras."""
    before = dt.datetime.now(dt.UTC)
    with configured("INFO", "json") as stream:
        log = logging.getLogger("microgrid.test")
        log.info("slot %d settled", 7, extra={"event": "settled", "slot": 7, "hash": "ab"})
        log.debug("not at INFO")
        log.warning("two\nlines", extra={"path": logs})  # not JSON-serialisable: str()
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    after = dt.datetime.now(dt.UTC)
    out = lines(stream)
    assert len(out) == 3
    first, second, third = (json.loads(line) for line in out)
    assert first == {
        "ts": first["ts"], "level": "INFO", "logger": "microgrid.test", "msg": "slot 7 settled",
        "event": "settled", "slot": 7, "hash": "ab",
    }  # fmt: skip
    ts = dt.datetime.fromisoformat(first["ts"])
    assert ts.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=1) <= ts <= after
    assert second["level"] == "WARNING" and second["msg"] == "two\nlines"
    assert second["path"] == str(logs)
    assert third["level"] == "ERROR" and "RuntimeError: boom" in third["exc"]


def test_text_format_appends_sorted_key_values() -> None:
    """Text lines are ``time LEVEL logger: message`` followed by the extras as key=value."""
    with configured("INFO", "text") as stream:
        log = logging.getLogger("microgrid.node")
        log.info("published order", extra={"slot": 12, "event": "published", "kind": "order"})
        log.info("plain")
    first, second = lines(stream)
    assert first.endswith(
        " INFO microgrid.node: published order event=published kind=order slot=12"
    )
    stamp = dt.datetime.fromisoformat(first.split(" INFO ")[0])
    assert stamp.tzinfo == dt.UTC  # UTC, as in the JSON lines
    assert abs((dt.datetime.now(dt.UTC) - stamp).total_seconds()) < 60
    assert second.endswith(" INFO microgrid.node: plain")
    assert "=" not in second


def test_libp2p_records_reach_the_handler() -> None:
    """libp2p's loggers propagate to our handler; its dial-failure noise is silenced at INFO."""
    libp2p_logger = logging.getLogger("libp2p")
    propagate = libp2p_logger.propagate
    libp2p_logger.propagate = False  # as libp2p sets it on import (pitfall 5)
    try:
        with configured("INFO", "json") as stream:
            assert libp2p_logger.propagate
            logging.getLogger("libp2p.pubsub.gossipsub").warning("mesh degraded")
            logging.getLogger("libp2p.pubsub.gossipsub").info("below libp2p's WARNING level")
            logging.getLogger("libp2p.transport.tcp.tcp").error("dial failed")
    finally:
        libp2p_logger.propagate = propagate
    records = [json.loads(line) for line in lines(stream)]
    assert [(r["logger"], r["msg"]) for r in records] == [
        ("libp2p.pubsub.gossipsub", "mesh degraded")
    ]
    with configured("DEBUG", "json") as stream:
        logging.getLogger("libp2p.transport.tcp.tcp").error("dial failed")
        logging.getLogger("microgrid.node").debug("details")
    assert [json.loads(line)["msg"] for line in lines(stream)] == ["dial failed", "details"]


def test_libp2p_stream_churn_is_shown_at_info_and_its_other_errors_stay_errors() -> None:
    """A stream libp2p could not open, or a connection closed under its reader, becomes an INFO
    record of its logger (callers retry): shown where libp2p logs INFO, not at libp2p's default
    WARNING; another libp2p error keeps ERROR either way."""
    churn = [
        ("libp2p.host.basic_host", "Failed to open stream to peer 12D3Koo:\n  Error: reset"),
        ("libp2p.protocol_muxer.multiselect_client", "MultiselectClient handshake: read failed"),
        ("libp2p.stream_muxer.yamux.yamux",
         "Error in handle_incoming for peer 12D3Koo: ClosedResourceError: "),
        ("libp2p.network.swarm", "[ADDCONN_FAIL] add_conn failed for peer X: Cancelled(source=)"),
    ]  # fmt: skip
    kept = [
        ("libp2p.stream_muxer.yamux.yamux", "Error in handle_incoming for peer X: ValueError: bad"),
        ("libp2p.host.basic_host", "something else went wrong"),
    ]
    with configured("INFO", "json") as stream:
        logging.getLogger("libp2p").setLevel(logging.INFO)
        for name, message in churn + kept:
            logging.getLogger(name).error(message)
    records = [json.loads(line) for line in lines(stream)]
    assert [(r["logger"], r["level"]) for r in records] == [
        *((name, "INFO") for name, _ in churn),
        *((name, "ERROR") for name, _ in kept),
    ]
    with configured("INFO", "json") as stream:  # libp2p at its default, WARNING
        for name, message in churn + kept:
            logging.getLogger(name).error(message)
    assert [json.loads(line)["msg"] for line in lines(stream)] == [m for _, m in kept]


def test_configure_twice_keeps_one_handler() -> None:
    """Reconfiguring replaces the handler instead of adding a second one (no doubled lines)."""
    with configured("INFO", "json"):
        logs.configure("WARNING", "text")
        root = logging.getLogger()
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, logs.TextFormatter)
        assert root.level == logging.WARNING


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_state_is_restored_after_configure(fmt: str) -> None:
    """The helper puts the root logger back, so other tests see their own handlers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with configured("DEBUG", fmt):
        assert root.handlers != handlers
    assert root.handlers == handlers and root.level == level
