"""The page of a grid with 10-second slots (``microgrid demo``) whose slot length the dashboard
learns from the node's ``/status`` (started with the default 900 s): UTC labels with seconds,
in charts, tables, the header and the order book, and a click on a bar still opens its slot."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dashboard.views import Context
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
