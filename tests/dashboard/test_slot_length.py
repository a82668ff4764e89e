"""The page of a grid with 10-second slots (``microgrid demo``): the dashboard takes the slot
length from the ledger's ``schedule`` meta (issue 13: no ``--slot-seconds`` needed), or, for a
ledger of an older node without one, from the node's ``/status``, else the genesis default with
a notice. UTC labels with seconds, in charts, tables, the header and the order book, and a click
on a bar still opens its slot."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dashboard import views
from dashboard.data import slot_label
from dashboard.views import Context
from market.schedule import Schedule
from tests.dashboard.conftest import (
    ConsoleLog,
    RunningDashboard,
    graph_eval,
    graph_js,
    needs_browser,
    new_feeder,
    wait_text,
)
from tests.dashboard.status_server import StatusServer, status_doc

FIRST = 179_618_304
"""2026-12-02 03:44 UTC in 10-second slots."""
SLOTS = 40


def label(slot: int) -> str:
    """The UTC start of a 10-second slot, computed with datetime."""
    return datetime.fromtimestamp(slot * 10, UTC).strftime("%Y-%m-%d %H:%M:%S")


@needs_browser
def test_ten_second_slots_from_the_status_api(chromium: Any, tmp_path: Path) -> None:
    feeder = new_feeder(tmp_path, SLOTS, households=3, seed=4, first_slot=FIRST)
    status = StatusServer({**status_doc("did:key:zLeader", SLOTS, None), "slot_seconds": 10})
    dash = RunningDashboard(Context.open(feeder.store.url, status.url, api_timeout=0.5))
    page = chromium.new_page()
    try:
        log = ConsoleLog(page)
        page.goto(dash.url)
        last = FIRST + SLOTS - 1
        page.wait_for_function(graph_js("market-graph", f"g.data[0].x[0] === '{label(FIRST)}'"))
        assert graph_eval(page, "market-graph", "g.data[0].x.length") == SLOTS
        assert graph_eval(page, "market-graph", "g.layout.xaxis.hoverformat").endswith(":%S")
        page.wait_for_function(graph_js("household-graph", f"g.data[0].x[0] === '{label(FIRST)}'"))
        wait_text(page, "#head-badge", f"settled through slot {last} ({label(last)} UTC)")
        wait_text(page, "#blocks-table", label(last))
        # a click on a bar still opens that slot's order book
        page.locator("#market-graph").scroll_into_view_if_needed()
        bars = page.locator("#market-graph .barlayer .trace").last.locator(".point path")
        box = bars.nth(10).bounding_box()
        assert box is not None and box["height"] > 0
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        wait_text(page, "#book-summary", f"Slot {FIRST + 10}:")
        page.wait_for_function(
            graph_js("book-graph", f"g.layout.title.text.includes('({label(FIRST + 10)} UTC)')")
        )
        assert page.input_value("#slot-input") == str(FIRST + 10)
        assert log.errors == []
    finally:
        page.close()
        dash.stop()
        status.stop()
        feeder.close()


DEMO_SCHEDULE = Schedule(slot_seconds=10, gate_lead_seconds=3, settle_delay_seconds=2)
"""``microgrid demo``'s genesis timings, as its nodes record them in their ledgers."""


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def recent_first_slot() -> int:
    """The first of SLOTS 10-second slots ending now: a ledger of a demo running today."""
    return int(time.time()) // 10 - SLOTS


def test_the_ledgers_schedule_gives_the_slot_length_without_a_flag(tmp_path: Path) -> None:
    """Issue 13: a demo ledger (10 s slots, recorded in meta ``schedule``) opened without
    ``--slot-seconds`` is plotted at today's date, not in the year 12216."""
    first = recent_first_slot()
    feeder = new_feeder(tmp_path, SLOTS, households=3, seed=4, first_slot=first,
                        schedule=DEMO_SCHEDULE)  # fmt: skip
    feeder.close()
    # the node's /status disagreeing does not move what the ledger says
    status = StatusServer({**status_doc("did:key:zL", SLOTS, None), "slot_seconds": 900})
    ctx = Context.open(feeder.store.url, status.url, verify_enabled=False, api_timeout=0.5)
    try:
        assert (ctx.schedule, ctx.slot_source) == (Schedule(10), views.SLOT_LEDGER)
        assert ctx.slot_notice() is None
        views.poll_api(ctx)
        assert ctx.schedule == Schedule(10)
        head = views.head_view(ctx)
        assert head["slot_seconds"] == 10
        points = views.market_view(ctx, "7d").points
        assert [p["time"] for p in points] == [label(s) for s in range(first, first + SLOTS)]
        assert points[-1]["time"].startswith(today())
        assert slot_label(ctx.schedule, head["settled_through"]).startswith(today())
    finally:
        ctx.close()
        status.stop()
    # --slot-seconds still overrides the ledger
    override = Context.open(feeder.store.url, slot_seconds=900, verify_enabled=False)
    try:
        assert (override.schedule, override.slot_source) == (Schedule(900), views.SLOT_OVERRIDE)
        views.head_view(override)
        assert override.schedule == Schedule(900)
    finally:
        override.close()


def test_an_older_ledger_falls_back_to_the_api_then_the_default(tmp_path: Path) -> None:
    """A ledger without meta ``schedule``: the node's ``/status`` when ``--api`` is given, else
    the genesis default 900 s with a notice; once the node records the schedule, it wins."""
    first = recent_first_slot()
    feeder = new_feeder(tmp_path, SLOTS, households=3, seed=4, first_slot=first)
    plain = Context.open(feeder.store.url, verify_enabled=False)
    status = StatusServer({**status_doc("did:key:zL", SLOTS, None), "slot_seconds": 10})
    api = Context.open(feeder.store.url, status.url, verify_enabled=False, api_timeout=0.5)
    try:
        assert (plain.schedule, plain.slot_source) == (Schedule(900), views.SLOT_DEFAULT)
        notice = plain.slot_notice()
        assert notice is not None and "900 s slots" in notice and "--slot-seconds" in notice
        views.poll_api(api)
        assert (api.schedule, api.slot_source) == (Schedule(10), views.SLOT_API)
        assert api.slot_notice() is None
        # the node restarts and records its schedule: the ledger now says 10 s
        feeder.store.record_schedule(DEMO_SCHEDULE)
        assert views.head_view(plain)["slot_seconds"] == 10
        assert (plain.slot_source, plain.slot_notice()) == (views.SLOT_LEDGER, None)
        assert views.market_view(plain, "7d").points[-1]["time"] == label(first + SLOTS - 1)
    finally:
        plain.close()
        api.close()
        status.stop()
        feeder.close()


def dashboard_start(url: str) -> tuple[str, str]:
    """Start ``microgrid dashboard --db url`` with no other flag: its first line, and what it
    wrote on stderr until it was stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "dashboard", "--db", url, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    return line, err


def test_cli_takes_the_slot_length_from_the_ledger(tmp_path: Path) -> None:
    feeder = new_feeder(tmp_path, 3, households=3, seed=4, first_slot=recent_first_slot(),
                        schedule=DEMO_SCHEDULE)  # fmt: skip
    feeder.close()
    line, err = dashboard_start(feeder.store.url)
    assert line.rstrip().endswith(", 10 s slots from the ledger's schedule)"), line
    assert "notice:" not in err


def test_cli_says_when_it_assumes_the_default(tmp_path: Path) -> None:
    feeder = new_feeder(tmp_path, 3, households=3, seed=4)
    feeder.close()
    line, err = dashboard_start(feeder.store.url)
    assert line.rstrip().endswith(", 900 s slots the genesis default)"), line
    assert "notice: The ledger does not record its grid's slot length" in err


@needs_browser
def test_the_page_shows_todays_date_without_a_flag(chromium: Any, tmp_path: Path) -> None:
    """Issue 13 in the browser: a demo ledger, no ``--slot-seconds`` and no API: today's date
    in the charts and the header, and no notice; an older ledger shows the notice."""
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    first = recent_first_slot()
    feeder = new_feeder(tmp_path / "new", SLOTS, households=3, seed=4, first_slot=first,
                        schedule=DEMO_SCHEDULE)  # fmt: skip
    old = new_feeder(tmp_path / "old", 3, households=3, seed=4)
    dash = RunningDashboard(Context.open(feeder.store.url))
    old_dash = RunningDashboard(Context.open(old.store.url))
    page = chromium.new_page()
    try:
        log = ConsoleLog(page)
        page.goto(dash.url)
        day = today()
        page.wait_for_function(graph_js("market-graph", f"g.data[0].x[0] === '{label(first)}'"))
        assert graph_eval(page, "market-graph", "g.data[0].x.length") == SLOTS
        assert graph_eval(page, "market-graph", "g.data[0].x.at(-1)").startswith(day)
        last = first + SLOTS - 1
        wait_text(page, "#head-badge", f"settled through slot {last} ({label(last)} UTC)")
        wait_text(page, "#head-badge", day)
        wait_text(page, "#blocks-table", day)
        page.wait_for_selector("#no-alerts")
        assert page.locator("#slot-notice").count() == 0
        assert "12216" not in page.inner_text("body")
        assert log.errors == []
        page.goto(old_dash.url)
        wait_text(page, "#slot-notice", "assuming the genesis default of 900 s slots")
        assert log.errors == []
    finally:
        page.close()
        dash.stop()
        old_dash.stop()
        feeder.close()
        old.close()
