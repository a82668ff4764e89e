"""The dashboard in Debian's headless Chromium against a ledger from a real simulation.

One dashboard (with a loopback status API) and one browser page serve the whole module; the
tests run in order: every view shows data, CSV export, a new slot appears without reload and
the zoom is kept, selecting a slot updates the order book, API states, and finally the alerts
the data calls for (which leave the ledger tampered with). Screenshots of every view go to
artifacts/screenshots/.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from dashboard.views import Context
from tests.dashboard.conftest import (
    ConsoleLog,
    RunningDashboard,
    feeder_check_rows,
    graph_eval,
    graph_js,
    needs_browser,
    new_feeder,
    new_feeder_grid,
    screenshot,
    wait_text,
)
from tests.dashboard.status_server import StatusServer, status_doc

pytestmark = [needs_browser, pytest.mark.slow]

SLOTS = 96
FIRST = 1_960_032
"""The first slot: 15-minute slots numbered like a running grid's (Unix time / 900)."""
LEADER = "did:key:z6MkLeaderOfTheGrid0000000000000000000000000000"
VIEWS = ("alerts", "market", "book", "households", "community", "ledger", "network")


def label(slot: int) -> str:
    """The UTC start of a 15-minute slot, computed with datetime (not the dashboard's code)."""
    return datetime.fromtimestamp(slot * 900, UTC).strftime("%Y-%m-%d %H:%M")


def slot_at(plotly_date: str) -> int:
    """The 15-minute slot whose delivery contains a Plotly date-axis value."""
    return int(datetime.fromisoformat(plotly_date).replace(tzinfo=UTC).timestamp() // 900)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("dashboard")
    feeder = new_feeder(tmp, SLOTS, first_slot=FIRST)
    head = feeder.store.head()
    assert head is not None
    status = StatusServer(status_doc(LEADER, head.height, head.hash))
    ctx = Context.open(feeder.store.url, status.url, verify_interval=0.3, api_timeout=0.5)
    dash = RunningDashboard(ctx)
    try:
        yield SimpleNamespace(feeder=feeder, status=status, dash=dash, tmp=tmp)
    finally:
        dash.stop()
        status.stop()
        feeder.close()


@pytest.fixture(scope="module")
def browser_page(chromium: Any, world: SimpleNamespace) -> Iterator[tuple[Any, ConsoleLog]]:
    page = chromium.new_page()
    log = ConsoleLog(page)
    page.goto(world.dash.url)
    try:
        yield page, log
    finally:
        page.close()


def test_every_view_shows_data(browser_page: tuple[Any, ConsoleLog]) -> None:
    page, log = browser_page
    wait_text(page, "#head-badge", f"height {SLOTS}")
    # market: one point per slot, tariff lines at 32 and 8
    page.wait_for_function(graph_js("market-graph", f"g.data[0].x.length === {SLOTS}"))
    # plotted against the slots' UTC start, the slot number in customdata
    assert graph_eval(page, "market-graph", "g.data[0].x[0]") == label(FIRST)
    assert graph_eval(page, "market-graph", "g.data[0].customdata[0]") == FIRST
    assert graph_eval(page, "market-graph", "g._fullLayout.xaxis3.type") == "date"
    page.wait_for_selector("#market-graph .xaxislayer-above text")
    ticks = page.eval_on_selector_all(
        "#market-graph .xaxislayer-above text", "es => es.map(e => e.textContent)"
    )
    assert ticks and any(label(FIRST)[:4] in t for t in ticks), ticks  # the year shows
    assert not any(t.rstrip().endswith(("M", "k", "G")) for t in ticks), ticks  # no SI suffix
    wait_text(page, "#head-badge", f"settled through slot {FIRST + SLOTS - 1} ")
    wait_text(page, "#head-badge", f"({label(FIRST + SLOTS - 1)} UTC)")
    assert graph_eval(page, "market-graph", "g.data[1].y[0]") == 32
    assert graph_eval(page, "market-graph", "g.data[2].y[0]") == 8
    assert graph_eval(page, "market-graph", "g.data[3].y.some(v => v > 0)")  # local volume
    # order book of the newest traded slot: both curves and a clearing point
    wait_text(page, "#book-summary", "cleared")
    page.wait_for_function(graph_js("book-graph", "g.data.length >= 3 && g.data[0].x.length > 0"))
    # households: a row per household, a bar per slot for the chosen one
    page.wait_for_function(
        "() => document.querySelectorAll('#household-summary tbody tr').length === 6"
    )
    page.wait_for_function(graph_js("household-graph", f"g.data[0].x.length === {SLOTS}"))
    assert graph_eval(page, "household-graph", "g.data[0].x[0]") == label(FIRST)
    # community figures
    wait_text(page, "#kpi-self-sufficiency", "%")
    wait_text(page, "#kpi-self-consumption", "%")
    page.wait_for_function(graph_js("community-graph", "g.data[0].x.length > 0"))
    # ledger: height, head hash, verification, latest blocks and transactions
    wait_text(page, "#kpi-height", str(SLOTS))
    wait_text(page, "#kpi-verify", "OK")
    assert len(page.inner_text("#head-hash").strip()) == 64
    assert page.locator("#blocks-table tbody tr").count() == 10
    newest = page.locator("#blocks-table tbody tr").first.locator("td")
    assert newest.nth(1).inner_text() == str(FIRST + SLOTS - 1)
    assert newest.nth(2).inner_text() == label(FIRST + SLOTS - 1)
    assert page.locator("#tx-table tbody tr").count() == 15
    # consensus & network from the loopback status API
    wait_text(page, "#kpi-leader", "…")
    wait_text(page, "#kpi-members", "5 up / 1 down")
    wait_text(page, "#kpi-term", "7")
    page.wait_for_function(graph_js("invalid-graph", "g.data[0].y.length === 3"))
    page.wait_for_function(graph_js("lag-graph", "g.data[0].x.length >= 1"))
    wait_text(page, "#api-badge", "API ok")
    # no alerts on a healthy grid
    page.wait_for_selector("#no-alerts")
    for view in VIEWS:
        screenshot(page, f"#section-{view}", view)
    path = screenshot(page, "body", "page")
    assert path.stat().st_size > 10_000
    assert log.errors == []


def test_csv_export_of_shown_data(
    browser_page: tuple[Any, ConsoleLog], world: SimpleNamespace
) -> None:
    page, log = browser_page
    with page.expect_download() as info:
        page.click("#csv-market")
    target = world.tmp / "market.csv"
    info.value.save_as(target)
    rows = list(csv.DictReader(io.StringIO(Path(target).read_text())))
    assert len(rows) == SLOTS
    assert [(int(r["slot"]), r["time"]) for r in rows[:2]] == [
        (FIRST, label(FIRST)),
        (FIRST + 1, label(FIRST + 1)),
    ]
    assert {"slot", "price", "local_wh", "grid_import_wh", "unmatched_bid_wh"} <= set(rows[0])
    with page.expect_download() as info:
        page.click("#csv-households")
    body = Path(info.value.path()).read_text()
    assert body.startswith("household,slot,time,measured,metered_import_wh")
    assert log.errors == []


def test_new_slot_appears_without_reload_and_zoom_is_kept(
    browser_page: tuple[Any, ConsoleLog], world: SimpleNamespace
) -> None:
    page, log = browser_page
    # zoom like a user: box-drag across the price subplot
    drag = page.locator("#market-graph .draglayer .xy .nsewdrag")
    drag.scroll_into_view_if_needed()
    box = drag.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.3, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, y + 2, steps=8)
    page.mouse.move(box["x"] + box["width"] * 0.6, y + 4, steps=8)
    page.mouse.up()
    page.wait_for_function(graph_js("market-graph", "g.layout.xaxis.autorange === false"))
    zoomed = graph_eval(page, "market-graph", "g.layout.xaxis.range")
    last = world.feeder.advance(2)
    wait_text(page, "#head-badge", f"height {SLOTS + 2}")
    new_x = f"g.data[0].x.includes('{label(last)}')"
    page.wait_for_function(graph_js("market-graph", new_x))
    page.wait_for_function(graph_js("household-graph", new_x))
    wait_text(page, "#kpi-height", str(SLOTS + 2))
    assert graph_eval(page, "market-graph", "g.layout.xaxis.range") == zoomed
    page.evaluate("() => window.__noReload = 1")
    assert page.evaluate("() => window.__noReload") == 1
    assert log.errors == []


def test_selecting_a_slot_updates_the_order_book(browser_page: tuple[Any, ConsoleLog]) -> None:
    page, log = browser_page
    page.fill("#slot-input", str(FIRST + 50))
    page.press("#slot-input", "Enter")
    wait_text(page, "#book-summary", f"Slot {FIRST + 50}:")
    title = f"Order book of slot {FIRST + 50} ({label(FIRST + 50)} UTC)"
    page.wait_for_function(graph_js("book-graph", f"g.layout.title.text === '{title}'"))
    asks = graph_eval(page, "book-graph", "g.data[0].x.length")
    bids = graph_eval(page, "book-graph", "g.data[1].x.length")
    assert asks > 0 and bids > 0
    screenshot(page, "#section-book", "book-slot-50")
    page.fill("#slot-input", str(FIRST + 20))
    page.press("#slot-input", "Enter")
    wait_text(page, "#book-summary", f"Slot {FIRST + 20}:")
    page.wait_for_function(
        graph_js("book-graph", f"g.layout.title.text.includes('slot {FIRST + 20} ')")
    )
    assert log.errors == []


def test_clicking_a_slot_opens_its_order_book(browser_page: tuple[Any, ConsoleLog]) -> None:
    page, log = browser_page
    lo, hi = graph_eval(page, "market-graph", "g.layout.xaxis.range")  # the user's zoom
    slot = (slot_at(lo) + slot_at(hi)) // 2
    assert FIRST < slot < FIRST + SLOTS
    page.locator("#market-graph").scroll_into_view_if_needed()
    bars = page.locator("#market-graph .barlayer .trace").last.locator(".point path")
    bar = bars.nth(slot - FIRST)
    box = bar.bounding_box()
    assert box is not None and box["height"] > 0
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    wait_text(page, "#book-summary", f"Slot {slot}:")
    assert page.input_value("#slot-input") == str(slot)
    assert log.errors == []


def test_choosing_a_household(browser_page: tuple[Any, ConsoleLog]) -> None:
    page, log = browser_page
    first = graph_eval(page, "household-graph", "g.layout.title.text")
    page.click("#household")
    page.locator(".dash-dropdown-option").nth(3).click()
    page.wait_for_function(
        graph_js("household-graph", "g.layout.title.text !== " + repr(first).replace("'", '"'))
    )
    assert log.errors == []


def test_api_states_no_leader_then_unreachable(
    browser_page: tuple[Any, ConsoleLog], world: SimpleNamespace
) -> None:
    page, log = browser_page
    world.status.doc = status_doc(None, SLOTS + 2, None)
    page.wait_for_selector(".alert[data-code=no_leader]")
    wait_text(page, "#kpi-leader", "NONE")
    screenshot(page, "#section-network", "network-no-leader")
    world.status.stop()
    wait_text(page, "#api-badge", "unreachable")
    wait_text(page, "#network-state", "unreachable")
    page.wait_for_selector(".alert[data-code=api_unreachable]")
    # the ledger views carry on
    wait_text(page, "#kpi-height", str(SLOTS + 2))
    screenshot(page, "#section-network", "network-unreachable")
    assert log.errors == []


def test_alerts_follow_the_data(
    browser_page: tuple[Any, ConsoleLog], world: SimpleNamespace
) -> None:
    page, log = browser_page
    slot = world.feeder.advance_uncleared()
    page.wait_for_selector(".alert[data-code=slot_not_cleared]")
    wait_text(page, ".alert[data-code=slot_not_cleared]", f"Slot {slot} ({label(slot)} UTC)")
    engine = create_engine(world.feeder.store.url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE postings SET amount = amount + 1 WHERE id = (SELECT min(id) FROM postings)"
            )
        )
    engine.dispose()
    world.feeder.close_gates_only(6)
    page.wait_for_selector(".alert[data-code=settlement_overdue]")
    page.wait_for_selector(".alert[data-code=ledger_invalid]", timeout=30_000)
    wait_text(page, "#verify-badge", "FAILS")
    wait_text(page, "#kpi-verify", "FAILED")
    screenshot(page, "#section-alerts", "alerts")
    screenshot(page, "#section-ledger", "ledger-invalid")
    assert log.errors == []


def test_feeder_mismatch_is_rendered(chromium: Any, tmp_path: Path) -> None:
    """A grid with a feeder meter (checks computed by the engine): its mismatch alert, the
    "incomplete" summary and the feeder figure (own small ledger and dashboard, so the module's
    tampered ledger does not matter)."""
    bad = FIRST + 12
    grid = new_feeder_grid(
        tmp_path, 16, households=4, seed=3, first_slot=FIRST, tamper={bad: -2500}
    )
    ctx = Context.open(grid.store.url, verify_interval=0.3)
    check = feeder_check_rows(grid.store.url)[bad]
    assert check["status"] == "mismatch"
    dash = RunningDashboard(ctx)
    page = chromium.new_page()
    try:
        log = ConsoleLog(page)
        page.goto(dash.url)
        alert = ".alert[data-code=feeder_mismatch]"
        page.wait_for_selector(alert)
        wait_text(page, alert, f"Slot {bad} ({label(bad)} UTC) does not add up at the feeder")
        wait_text(page, alert, f"difference {check['difference_wh']} Wh")
        wait_text(
            page, "#feeder-summary", "feeder check incomplete: 1 (1 without a feeder reading)"
        )
        wait_text(page, "#kpi-verify", "OK")
        page.wait_for_selector("#feeder-block", state="visible")
        page.wait_for_function(graph_js("feeder-graph", "g.data[0].x.length === 16"))
        assert graph_eval(page, "feeder-graph", "g.data[2].x") == [label(bad)]
        assert page.locator(".alert[data-code=ledger_invalid]").count() == 0
        screenshot(page, "#section-community", "community-feeder")
        screenshot(page, "#section-alerts", "alerts-feeder")
        assert log.errors == []
    finally:
        page.close()
        dash.stop()
        grid.close()
