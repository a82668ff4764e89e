"""The community statements section (issue 18): every household's row is its statement as
``microgrid statement`` computes and prints it, the totals are the sums, the CSV carries the
same, and a period without data or bad dates are a message, never a traceback.

The ledger is the governance grid's (tests/ledger/governance_grid.py: trades, grid imports and
exports, a rules change with grid fees from slot 3, time-of-use tariffs from slot 7, a key
rotation, a suspension whose gap is trued up), written by the replica and store as a node
does, with the grid's schedule (15-minute slots) recorded in meta."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from dashboard import statements, views
from dashboard.app import create_app
from dashboard.views import Context
from market.schedule import Schedule
from node.cli import main
from node.cli.statement import MONEY_FIELDS, money
from node.daemon.replica import Replica
from node.ledger import LedgerStore
from node.ledger.statement import household_statement
from node.ledger.store import make_engine
from tests.dashboard.conftest import (
    ConsoleLog,
    RunningDashboard,
    callback_payload,
    needs_browser,
    screenshot,
    wait_text,
)
from tests.dashboard.status_server import StatusServer, status_doc
from tests.ledger.governance_grid import governance_log
from tests.market.world import signer

DAY = "1970-01-01"
"""The governance grid's slots 1..10 are on its first day (15-minute slots)."""
NAMES = ("voter", "alice", "bob", "carol", "alice-2")
STATEMENT_OUTPUT = "..statement-summary.children...statement-table.children.."


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The governance grid's ledger, with its schedule in meta as a node records it."""
    _world, config, entries = governance_log()
    path = tmp_path_factory.mktemp("statements") / "ledger.db"
    store = LedgerStore(f"sqlite:///{path}")
    replica = Replica(config, store)
    for index, entry in entries:
        replica.apply_entry(index, entry)
    store.record_schedule(Schedule())
    store.close()
    return f"sqlite:///{path}"


@pytest.fixture
def ctx(url: str) -> Iterator[Context]:
    ctx = Context.open(url, verify_enabled=False)
    try:
        yield ctx
    finally:
        ctx.close()


def call(ctx: Context, output: str, values: dict[str, Any]) -> tuple[int, Any]:
    """Run the app's callback for ``output`` through Flask (the guard included) as the browser
    posts it: the status and the response's JSON (or text)."""
    app = create_app(ctx)
    client = app.server.test_client()
    deps = client.get("/_dash-dependencies").get_json()
    (dep,) = [d for d in deps if d["output"] == output]
    response = client.post("/_dash-update-component", json=callback_payload(dep, values))
    body = response.get_data(as_text=True)
    assert "Traceback" not in body
    return response.status_code, response.get_json() if response.is_json else body


def rendered(ctx: Context, first: Any, last: Any) -> str:
    """The section (summary and table) as the page receives it."""
    head = views.head_view(ctx)
    status, body = call(
        ctx,
        STATEMENT_OUTPUT,
        {"head.data": head, "statement-from.value": first, "statement-to.value": last},
    )
    assert status == 200, body
    return json.dumps(body["response"], ensure_ascii=False)


def csv_rows(ctx: Context, first: Any, last: Any) -> list[dict[str, str]]:
    status, body = call(
        ctx,
        "dl-statements.data",
        {"csv-statements.n_clicks": 1, "statement-from.value": first, "statement-to.value": last},
    )
    assert status == 200, body
    data = body["response"]["dl-statements"]["data"]
    assert data["filename"] == "microgrid-statements.csv"
    return list(csv.DictReader(io.StringIO(data["content"])))


# --- every row is the household's statement ------------------------------------------------------


def test_every_row_is_the_households_statement(ctx: Context, url: str) -> None:
    view = views.statements_view(ctx, DAY, DAY)
    assert view.message is None and view.period is not None
    assert {r["household"] for r in view.rows} == {signer(n).did for n in NAMES}
    assert view.settled_slots == 10 and (view.first_settled, view.last_settled) == (1, 10)
    assert view.rules_changed_at == (3, 7)
    engine = make_engine(url, read_only=True)
    try:
        for row in view.rows:
            s = household_statement(engine, row["household"], view.period.first_slot,
                                    view.period.last_slot)  # fmt: skip
            expected = {
                "measured_slots": s.measured_slots,
                "unmeasured_slots": s.unmeasured_slots,
                **s.totals,
                "money_change": s.money_change,
                "net_bill": s.net_bill,
                "savings": s.savings,
            }
            assert {k: row[k] for k in expected} == expected, row["household"]
            assert row["grid_only_bill"] == s.grid_only_bill
    finally:
        engine.dispose()
    assert view.totals == {name: sum(r[name] for r in view.rows) for name in statements.FIGURES}
    t = view.totals
    # the ledger exercises what the statement prices: trades, the grid both ways, both fees,
    # a true-up and a key rotation's carried balance
    assert t["local_bought_wh"] == t["local_sold_wh"] > 0
    assert t["grid_import_wh"] > 0 and t["grid_export_wh"] > 0
    assert t["local_fees"] > 0 and t["grid_fees"] > 0
    assert t["true_ups"] > 0 and t["true_up_money"] != 0
    assert any(r["other_money"] for r in view.rows)
    assert any(r["savings"] for r in view.rows)


def test_the_command_line_prints_the_same(
    ctx: Context, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    view = views.statements_view(ctx, DAY, DAY)
    page = rendered(ctx, DAY, DAY)
    for row in view.rows:
        assert main(["statement", "--db", url, "--household", row["household"],
                     "--from", DAY, "--to", DAY]) == 0  # fmt: skip
        printed = {
            line.strip()[:9].strip(): line
            for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith(("net bill", "grid only", "savings"))
        }
        bill = row["net_bill"]
        assert printed["net bill"].split()[-2:] == [
            money(abs(bill)),
            "paid" if bill >= 0 else "received",
        ]
        assert printed["grid only"].split()[-2] == money(abs(row["grid_only_bill"]))
        assert printed["savings"].split()[-1] == money(row["savings"])
        # the page shows the same money
        for name in ("net_bill", "grid_only_bill", "savings", "local_fees", "grid_fees"):
            assert f'"{money(row[name])}"' in page
    assert "statement-rows" in page and "community total" in page
    assert "rules changed from slot 3, 7" in page


def test_default_period_is_the_ledger_when_shorter_than_30_days(ctx: Context) -> None:
    default = views.statements_view(ctx, None, "")
    explicit = views.statements_view(ctx, DAY, DAY)
    assert default.period is not None and default.period.default
    assert (default.period.first_day.isoformat(), default.period.last_day.isoformat()) == (DAY, DAY)
    assert default.rows == explicit.rows and default.totals == explicit.totals
    # only one date given: the other defaults (30 days back, not before the ledger)
    assert views.statements_view(ctx, "", DAY).rows == explicit.rows
    wider = views.statements_view(ctx, "1969-12-01", "")
    assert wider.period is not None and wider.period.last_day.isoformat() == DAY
    assert wider.rows == explicit.rows
    assert "the default period: the newest 30 days" in rendered(ctx, None, None)


def test_csv_has_every_household_and_the_totals(ctx: Context) -> None:
    view = views.statements_view(ctx, DAY, DAY)
    rows = csv_rows(ctx, DAY, DAY)
    assert [r["household"] for r in rows] == [*(r["household"] for r in view.rows), "TOTAL"]
    by_did = {r["household"]: r for r in view.rows}
    for row in rows:
        assert (row["from"], row["to"], row["settled_slots"]) == (DAY, DAY, "10")
        figures = view.totals if row["household"] == "TOTAL" else by_did[row["household"]]
        for name in statements.FIGURES:
            expected = money(figures[name]) if name in MONEY_FIELDS else str(figures[name])
            assert row[name] == expected, (row["household"], name)
    total = rows[-1]
    for name in ("net_bill", "savings", "grid_import_wh", "local_fees"):
        assert sum(Decimal(r[name]) for r in rows[:-1]) == Decimal(total[name])


# --- no data, bad input ---------------------------------------------------------------------------


def test_a_period_without_settled_slots(ctx: Context) -> None:
    view = views.statements_view(ctx, "2000-01-01", "2000-01-31")
    assert view.rows == [] and view.totals is None
    assert view.message == (
        "No settled slot in 2000-01-01 .. 2000-01-31 (UTC): the ledger holds 1970-01-01 .. "
        "1970-01-01."
    )
    page = rendered(ctx, "2000-01-01", "2000-01-31")
    assert "statement-message" in page and "No settled slot in 2000-01-01" in page
    assert csv_rows(ctx, "2000-01-01", "2000-01-31") == []


@pytest.mark.parametrize(
    ("first", "last", "message"),
    [
        ("2026-13-01", DAY, "from: '2026-13-01' is not an ISO date (YYYY-MM-DD)"),
        ("yesterday", DAY, "from: 'yesterday' is not an ISO date (YYYY-MM-DD)"),
        (DAY, "1970-01-32", "to: '1970-01-32' is not an ISO date (YYYY-MM-DD)"),
        ("1970-01-02", DAY, "from 1970-01-02 is after to 1970-01-01"),
        (DAY, "9999-12-31", "to 9999-12-31: beyond the calendar"),
        ("<script>", None, "from: '<script>' is not an ISO date (YYYY-MM-DD)"),
    ],
)
def test_bad_dates_are_a_message(ctx: Context, first: str, last: str | None, message: str) -> None:
    view = views.statements_view(ctx, first, last)
    assert view.message == message and view.rows == []
    page = rendered(ctx, first, last)
    assert "statement-message" in page and json.dumps(message)[1:-1] in page
    assert csv_rows(ctx, first, last) == []


def test_hostile_date_values_are_400(ctx: Context) -> None:
    head = views.head_view(ctx)
    for value in ("x" * (statements.MAX_DATE_CHARS + 1), 19700101, ["1970-01-01"], {"a": 1}):
        status, body = call(
            ctx,
            STATEMENT_OUTPUT,
            {"head.data": head, "statement-from.value": value, "statement-to.value": DAY},
        )
        assert status == 400 and "from" in body["error"], (value, body)


def test_a_ledger_with_nothing_settled(tmp_path: Path) -> None:
    _world, config, _entries = governance_log()
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with LedgerStore(url) as store:
        store.init_genesis(config)
    ctx = Context.open(url, verify_enabled=False)
    try:
        view = views.statements_view(ctx)
        assert view.message == "No settled slot in the ledger yet: no statement to show."
        assert "No settled slot in the ledger yet" in rendered(ctx, None, None)
        assert views.statements_view(ctx, DAY, DAY).message == (
            f"No settled slot in {DAY} .. {DAY} (UTC): the ledger has none yet."
        )
    finally:
        ctx.close()


def test_an_unreadable_ledger_is_a_message(tmp_path: Path) -> None:
    ctx = Context.open(f"sqlite:///{tmp_path / 'missing.db'}", verify_enabled=False)
    try:
        view = statements.community_statements(ctx.engine, ctx.schedule, DAY, DAY)
        assert view.message is not None and view.message.startswith("Cannot read the ledger")
        assert view.rows == [] and view.csv_rows() == []
    finally:
        ctx.close()


# --- in Chromium ----------------------------------------------------------------------------------


@needs_browser
@pytest.mark.slow
def test_the_sections_render_in_chromium(chromium: Any, url: str) -> None:
    """The statements table with its totals row, a bad date's message, and a skewed node's
    clock row and alert, in the page as a user sees them."""
    skewed = StatusServer(
        {
            **status_doc(signer("bob").did, 10, None),
            "node": signer("bob").did,
            "clock": {"offset": 9.5, "error": 0.01, "peers_sampled": 2, "skewed": True,
                      "max_skew": 5.0, "peers": [], "disagreeing": []},
        }
    )  # fmt: skip
    ctx = Context.open(url, skewed.url, verify_interval=0.3)
    dash = RunningDashboard(ctx)
    page = chromium.new_page()
    try:
        log = ConsoleLog(page)
        page.goto(dash.url)
        page.wait_for_function(
            "n => document.querySelectorAll('#statement-rows tbody tr').length === n",
            arg=len(NAMES) + 1,
        )
        wait_text(page, "#statement-rows tbody tr:last-child", "community total")
        wait_text(page, "#statement-summary", "rules changed from slot 3, 7")
        view = views.statements_view(ctx, DAY, DAY)
        assert view.totals is not None
        wait_text(page, "#statement-rows tbody tr:last-child", money(view.totals["savings"]))
        wait_text(page, "#clock-rows", "SKEWED")
        page.wait_for_selector('[data-code="clock_skewed"]')
        wait_text(page, "#forecast-rows", "no data")
        screenshot(page, "#section-statements", "statements")
        screenshot(page, "#section-nodes", "forecasts-clocks")
        page.fill("#statement-from", "1970-02-30")
        page.press("#statement-from", "Enter")
        wait_text(page, "#statement-message", "'1970-02-30' is not an ISO date")
        assert log.errors == []
    finally:
        page.close()
        dash.stop()
        skewed.stop()
