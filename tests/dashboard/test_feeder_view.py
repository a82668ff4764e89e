"""The feeder check on the dashboard: ``feeder_mismatch`` alerts naming the slot and the
difference, the "feeder check incomplete" summary, the feeder-vs-households figure, and ledgers
without a feeder (no rows, or no ``feeder_checks`` table at all: older nodes and archives).

Ledgers come from the real engine and store: a grid with a feeder meter whose operator signs a
feeder reading per slot (:func:`tests.dashboard.conftest.new_feeder_grid`, the engine computes
the checks and the store writes their rows), or, for the statuses a simulation does not easily
produce (``households_unmeasured``) and for cache corner cases, rows written next to the real
blocks of a plain grid (:func:`tests.dashboard.conftest.write_feeder_checks`). The app is the
real one, called through Flask's test client with the payloads Dash's renderer sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dash import Dash
from sqlalchemy import create_engine, text

from dashboard import data, views
from dashboard.app import create_app
from market.schedule import Schedule
from node.ledger import queries
from node.ledger.verify import verify_ledger
from tests.dashboard.conftest import (
    STATUS_VIEWS,
    callback_payload,
    feeder_check_rows,
    new_feeder,
    new_feeder_grid,
    write_feeder_checks,
)
from tests.dashboard.feeder import Feeder

FIRST = 1_960_032
"""15-minute slots numbered like a running grid's (2025-11-25 00:00 UTC)."""
SLOTS = 24
MISMATCH = FIRST + 10
NO_READING = FIRST + 5
UNMEASURED = FIRST + 6


def label(slot: int) -> str:
    """The UTC start of a 15-minute slot, computed with datetime (not the dashboard's code)."""
    return datetime.fromtimestamp(slot * 900, UTC).strftime("%Y-%m-%d %H:%M")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Feeder]:
    # a current node's ledger: it records its (15-minute) schedule, so the page has no notice
    feeder = new_feeder(
        tmp_path, SLOTS, households=4, seed=3, first_slot=FIRST, schedule=Schedule()
    )
    try:
        yield feeder
    finally:
        feeder.close()


def open_ctx(url: str, **kwargs: Any) -> views.Context:
    """A context whose slot cache has read the ledger (as the first head poll does)."""
    ctx = views.Context.open(url, verify_enabled=False, **kwargs)
    views.head_view(ctx)
    return ctx


def call(app: Dash, output: str, values: dict[str, Any]) -> dict[str, Any]:
    """Call one of the app's callbacks as Dash's renderer does; its response by component."""
    client = app.server.test_client()
    deps = {d["output"]: d for d in client.get("/_dash-dependencies").get_json()}
    body = callback_payload(deps[output], values)
    response = client.post("/_dash-update-component", json=body)
    assert response.status_code == 200, response.data[:300]
    return json.loads(response.data)["response"]


def page(ctx: views.Context) -> dict[str, Any]:
    """The alerts and the feeder figure as the real app serves them after a head poll."""
    app = create_app(ctx)
    head = call(app, "head.data", {"tick.n_intervals": 1})["head"]["data"]
    alerts = call(app, STATUS_VIEWS, {"head.data": head, "api.data": {"configured": False}})
    feeder = call(
        app,
        "..feeder-graph.figure...feeder-block.style..",
        {"head.data": head, "window.value": "7d"},
    )
    return {
        "alerts": alerts["alerts"]["children"],
        "figure": feeder["feeder-graph"]["figure"],
        "style": feeder["feeder-block"]["style"],
    }


def texts(children: list[dict[str, Any]]) -> list[tuple[str | None, str]]:
    """(data-code or id, text) of each alert-section child."""
    return [
        (c["props"].get("data-code") or c["props"].get("id"), c["props"]["children"])
        for c in children
    ]


def test_the_engines_feeder_checks_on_the_dashboard(tmp_path: Path) -> None:
    """A grid with a feeder meter, checks computed by the engine: the slot whose feeder reading
    was 1,800 Wh short is a mismatch alert, the others are ok (the first slot has no baseline,
    and a slot without a feeder reading is "incomplete")."""
    skipped = FIRST + 15
    grid = new_feeder_grid(
        tmp_path, SLOTS, households=4, seed=3, first_slot=FIRST,
        tamper={MISMATCH: -1800}, skip={skipped},
    )  # fmt: skip
    grid.close()
    assert verify_ledger(grid.store.url).ok
    ctx = open_ctx(grid.store.url)
    try:
        checks = feeder_check_rows(grid.store.url)
        assert len(checks) == SLOTS
        bad = checks[MISMATCH]
        assert bad["status"] == "mismatch" and bad["difference_wh"] < -1700
        assert {s for s, c in checks.items() if c["status"] == "mismatch"} == {MISMATCH}
        incomplete = {s for s, c in checks.items() if c["status"] == "no_feeder_reading"}
        assert FIRST in incomplete and skipped in incomplete
        (alert,) = [a for a in views.alerts_view(ctx) if a["code"] == "feeder_mismatch"]
        assert f"Slot {MISMATCH} ({label(MISMATCH)} UTC)" in alert["message"]
        assert f"difference {bad['difference_wh']} Wh" in alert["message"]
        summary = views.feeder_summary_view(ctx)
        assert summary is not None
        assert (summary.slots, summary.mismatch) == (SLOTS, 1)
        assert summary.ok == SLOTS - 1 - len(incomplete)
        assert summary.no_feeder_reading == len(incomplete)
        feeder_view = views.feeder_view(ctx, "7d")
        fig, points = feeder_view.figure, feeder_view.points
        assert fig is not None and fig["data"][2]["x"] == [label(MISMATCH)]
        by_slot = {p["slot"]: p for p in points}
        assert (
            by_slot[MISMATCH]["feeder_net_wh"] - by_slot[MISMATCH]["households_net_wh"]
            == (bad["difference_wh"])
        )
        shown = page(ctx)
        codes = texts(shown["alerts"])
        assert ("feeder_mismatch", alert["message"]) in codes
        assert f"feeder check incomplete: {len(incomplete)} (" in dict(codes)["feeder-summary"]
        assert shown["style"] == {"display": "block"}
    finally:
        ctx.close()


def test_the_engines_ok_checks_give_no_alert(tmp_path: Path) -> None:
    grid = new_feeder_grid(tmp_path, 12, households=4, seed=4, first_slot=FIRST)
    grid.close()
    ctx = open_ctx(grid.store.url)
    try:
        assert not [a for a in views.alerts_view(ctx) if a["code"].startswith("feeder")]
        summary = views.feeder_summary_view(ctx)
        assert summary is not None
        assert (summary.ok, summary.mismatch, summary.no_feeder_reading) == (11, 0, 1)
        codes = texts(page(ctx)["alerts"])
        assert codes[0] == ("no-alerts", "No alerts.")
        assert "11 ok · 0 mismatch" in dict(codes)["feeder-summary"]
    finally:
        ctx.close()


def test_a_mismatch_is_an_alert_naming_its_slot_and_difference(ledger: Feeder) -> None:
    """Rows of every status, written next to a plain grid's blocks."""
    rows = write_feeder_checks(
        ledger.store.url,
        {
            MISMATCH: ("mismatch", -1500),
            NO_READING: ("no_feeder_reading", 0),
            UNMEASURED: ("households_unmeasured", 0),
        },
    )
    assert len(rows) == SLOTS
    ctx = open_ctx(ledger.store.url)
    try:
        alerts = [a for a in views.alerts_view(ctx) if a["code"] == "feeder_mismatch"]
        assert len(alerts) == 1
        message = alerts[0]["message"]
        assert f"Slot {MISMATCH} ({label(MISMATCH)} UTC)" in message
        assert "difference -1500 Wh" in message
        r = rows[MISMATCH]
        assert f"feeder net import {r['feeder_net_wh']} Wh" in message
        assert f"households' meters {r['households_net_wh']} Wh" in message
        assert alerts[0]["level"] == "danger"
        # incomplete checks are counted, not alerted
        summary = views.feeder_summary_view(ctx)
        assert summary == data.FeederSummary(
            slots=SLOTS, ok=SLOTS - 3, mismatch=1, no_feeder_reading=1, households_unmeasured=1
        )
        assert summary.incomplete == 2
        # the figure: feeder net per slot next to the households' net, the mismatch marked
        feeder_view = views.feeder_view(ctx, "7d")
        fig, points = feeder_view.figure, feeder_view.points
        assert fig is not None
        assert [p["slot"] for p in points] == list(range(FIRST, FIRST + SLOTS))
        feeder, households, marks = fig["data"]
        assert feeder["x"][0] == label(FIRST)
        i = MISMATCH - FIRST
        assert feeder["y"][i] - households["y"][i] == -1500
        assert feeder["y"][NO_READING - FIRST] is None  # no reading: a gap
        assert households["y"][NO_READING - FIRST] is not None
        assert marks["x"] == [label(MISMATCH)]
        assert marks["customdata"] == [[MISMATCH, -1500, 1]]
        # the real app renders the same
        shown = page(ctx)
        codes = texts(shown["alerts"])
        assert ("feeder_mismatch", message) in codes
        summary_text = dict(codes)["feeder-summary"]
        assert f"{SLOTS - 3} ok · 1 mismatch" in summary_text
        assert "feeder check incomplete: 2 (1 without a feeder reading, " in summary_text
        assert "1 with unmeasured households)" in summary_text
        assert shown["style"] == {"display": "block"}
        assert shown["figure"]["data"][2]["x"] == [label(MISMATCH)]
    finally:
        ctx.close()


def test_ok_checks_give_no_alert(ledger: Feeder) -> None:
    write_feeder_checks(ledger.store.url)
    ctx = open_ctx(ledger.store.url)
    try:
        assert not [a for a in views.alerts_view(ctx) if a["code"].startswith("feeder")]
        summary = views.feeder_summary_view(ctx)
        assert summary is not None and (summary.ok, summary.mismatch) == (SLOTS, 0)
        fig = views.feeder_view(ctx, "7d").figure
        assert fig is not None and fig["data"][2]["x"] == []
        shown = page(ctx)
        codes = texts(shown["alerts"])
        assert codes[0] == ("no-alerts", "No alerts.")
        assert "feeder check incomplete: 0" in dict(codes)["feeder-summary"]
    finally:
        ctx.close()


def test_only_mismatches_within_the_alert_window_alert(ledger: Feeder) -> None:
    write_feeder_checks(ledger.store.url, {MISMATCH: ("mismatch", 900)})
    ctx = open_ctx(ledger.store.url, alert_window_slots=5)  # newest 5 slots: not MISMATCH
    try:
        assert not [a for a in views.alerts_view(ctx) if a["code"] == "feeder_mismatch"]
        ctx.alert_window_slots = SLOTS
        (alert,) = [a for a in views.alerts_view(ctx) if a["code"] == "feeder_mismatch"]
        assert "difference +900 Wh" in alert["message"]
    finally:
        ctx.close()


def test_new_checks_reach_the_cache_with_their_blocks(
    ledger: Feeder, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_feeder_checks(ledger.store.url)
    ctx = open_ctx(ledger.store.url)
    try:
        assert not [a for a in views.alerts_view(ctx) if a["code"] == "feeder_mismatch"]
        assert ctx.slots.feeder_table
        # the table, once seen, is not looked up again on each refresh
        monkeypatch.setattr(data, "has_feeder_table", lambda _conn: pytest.fail("asked again"))
        last = ledger.advance(2)
        # the store writes a block's check with the block; here, before the next head poll
        write_feeder_checks(ledger.store.url, {last: ("mismatch", 4000)}, after=last - 2)
        views.head_view(ctx)
        (alert,) = [a for a in views.alerts_view(ctx) if a["code"] == "feeder_mismatch"]
        assert f"Slot {last} ({label(last)} UTC)" in alert["message"]
        assert "difference +4000 Wh" in alert["message"]
        assert ctx.slots.rows[last - 1].feeder_status == "ok"
    finally:
        ctx.close()


@pytest.mark.parametrize("ledger_kind", ["no rows", "no table"])
def test_a_grid_without_a_feeder_shows_nothing_new(ledger: Feeder, ledger_kind: str) -> None:
    if ledger_kind == "no table":  # a ledger of an older node, or an archive made before it
        engine = create_engine(ledger.store.url)
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE feeder_checks"))
        engine.dispose()
    ctx = open_ctx(ledger.store.url)
    try:
        with ctx.engine.connect() as conn:
            assert queries.has_feeder_table(conn) == (ledger_kind == "no rows")
        assert ctx.slots.feeder_table == (ledger_kind == "no rows")
        assert not any(r.feeder_status for r in ctx.slots.window(None))
        assert not [a for a in views.alerts_view(ctx) if a["code"].startswith("feeder")]
        assert views.feeder_summary_view(ctx) is None
        assert views.feeder_view(ctx, "all") == views.FeederView(figure=None, points=[])
        shown = page(ctx)
        assert texts(shown["alerts"]) == [("no-alerts", "No alerts.")]
        assert shown["style"] == {"display": "none"}
        # the other views are untouched
        assert len(views.market_view(ctx, "7d").points) == SLOTS
    finally:
        ctx.close()


def test_feeder_points_are_bucketed_over_long_windows() -> None:
    schedule = Schedule(900)
    rows = [
        queries.SlotRow(
            slot=s,
            settled=True,
            import_wh=500,
            export_wh=200,
            feeder_status="mismatch" if s == 1000 else "ok",
            feeder_net_wh=300 + (700 if s == 1000 else 10),
            feeder_households_net_wh=300,
            feeder_difference_wh=700 if s == 1000 else 10,
            feeder_allowed_loss_wh=135,
        )
        for s in range(2000)
    ]
    rows[5].feeder_status = "no_feeder_reading"
    rows[5].feeder_net_wh = rows[5].feeder_households_net_wh = rows[5].feeder_difference_wh = None
    chart = views._feeder_points(rows, schedule)
    points = chart.points
    assert chart.bucket_size == 4 and len(points) == 500  # hourly sums of four 15-minute slots
    assert points[1]["feeder_net_wh"] == 3 * 310 and points[1]["households_net_wh"] == 3 * 300
    (bad,) = [p for p in points if p["mismatches"]]
    assert bad["slot"] == 1000 and bad["difference_wh"] == 700 + 3 * 10
    assert bad["time"] == label(1000)
