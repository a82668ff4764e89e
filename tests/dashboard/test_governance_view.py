"""The governance view: the membership history, the member list and the rules periods with the
blocks settled under each, read from a ledger the real engine and store wrote
(tests/ledger/governance_grid.py), rendered by the app's own callbacks, exported as CSV, on an
archive of it, and on ledgers that are empty, older or hostile."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dashboard import data, views
from dashboard.app import create_app
from dashboard.archive import archive
from dashboard.views import Context
from market.config import MarketConfig
from market.schedule import Schedule
from market.state import State, config_at
from node.daemon.replica import Replica
from node.ledger import LedgerStore
from tests.conftest import needs_pg
from tests.dashboard.conftest import (
    ConsoleLog,
    RunningDashboard,
    callback_payload,
    needs_browser,
    new_feeder,
    screenshot,
    wait_text,
)
from tests.ledger.governance_grid import RECORD_TYPES, SLOTS, governance_log
from tests.market.world import signer

PROD = Schedule(900)
"""The governance grid's ledger records no schedule: the dashboard's genesis default."""

FROM_SLOTS = [3, 3, 4, 5, 6, 6, 8, 7, 9]
"""``from_slot`` of each record of the grid, in log order."""

STATUSES = [
    "active", None, "active", "rotated", "active", "suspended", "active", None, "removed",
]  # fmt: skip
"""The household's status after each record (None: a rules change)."""


def label(slot: int) -> str:
    """The UTC start of a 15-minute slot, computed with datetime (not the dashboard's code)."""
    return datetime.fromtimestamp(slot * 900, UTC).strftime("%Y-%m-%d %H:%M")


def did(name: str) -> str:
    return signer(name).did


@dataclass
class GovLedger:
    path: Path
    state: State

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> GovLedger:
    """The governance grid's ledger, written by the replica and store as a node does."""
    _world, config, entries = governance_log()
    path = tmp_path_factory.mktemp("governance") / "ledger.db"
    store = LedgerStore(f"sqlite:///{path}")
    replica = Replica(config, store)
    for index, entry in entries:
        replica.apply_entry(index, entry)
    store.close()
    return GovLedger(path, replica.state)


@pytest.fixture
def copy(ledger: GovLedger, tmp_path: Path) -> Path:
    """A copy of the ledger to tamper with."""
    target = tmp_path / "copy.db"
    shutil.copy(ledger.path, target)
    return target


@pytest.fixture
def ctx(ledger: GovLedger) -> Iterator[Context]:
    ctx = Context.open(ledger.url, verify_enabled=False)
    try:
        yield ctx
    finally:
        ctx.close()


def execute(path: Path, sql: str, *params: object) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(sql, params)


def overview(url: str, as_of: int | None = None) -> data.GovernanceOverview:
    engine = data.open_engine(url)
    try:
        return data.governance_overview(engine, schedule=PROD, as_of=as_of)
    finally:
        engine.dispose()


def call(ctx: Context, output: str, values: dict[str, Any]) -> Any:
    """Run the app's callback for ``output`` through Flask (the guard included), as the
    browser's renderer posts it; the response's value of ``output``."""
    app = create_app(ctx)
    client = app.server.test_client()
    deps = client.get("/_dash-dependencies").get_json()
    (dep,) = [d for d in deps if d["output"] == output]
    response = client.post("/_dash-update-component", json=callback_payload(dep, values))
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    component, prop = output.split(".")
    return response.get_json()["response"][component][prop]


def rendered(ctx: Context) -> str:
    """The governance section as the page receives it (JSON of the components)."""
    head = views.head_view(ctx)
    return json.dumps(call(ctx, "governance.children", {"head.data": head}), ensure_ascii=False)


def csv_rows(ctx: Context) -> list[dict[str, str]]:
    body = call(ctx, "dl-governance.data", {"csv-governance.n_clicks": 1})
    assert body["filename"] == "microgrid-governance.csv"
    return list(csv.DictReader(io.StringIO(body["content"])))


# --- the history, the members and the rules ------------------------------------------------------


def test_history_rows_in_log_order(ledger: GovLedger) -> None:
    o = overview(ledger.url)
    assert o.problems == [] and not o.empty
    assert [e.kind for e in o.entries] == RECORD_TYPES
    assert [e.position for e in o.entries] == list(range(1, len(RECORD_TYPES) + 1))
    assert [e.from_slot for e in o.entries] == FROM_SLOTS
    assert [e.time for e in o.entries] == [label(s) for s in FROM_SLOTS]
    assert [e.status for e in o.entries] == STATUSES
    assert [e.withdrawn for e in o.entries] == [0, 1, 0, 0, 0, 0, 0, 0, 0]
    added, rules, swap, rotation, role, suspend, reinstate, tou, removal = o.entries
    assert (added.household, added.role, added.meter_serial) == (did("carol"), "learner", "M-carol")
    assert rules.household is None and "pay_as_bid" in rules.detail
    assert (swap.household, swap.meter_serial, swap.role) == (did("bob"), "M-bob-2", "learner")
    assert rotation.household == did("alice") and rotation.new_household == did("alice-2")
    assert "countersigned" in rotation.detail
    assert (role.household, role.role, role.meter_serial) == (did("bob"), "voter", "M-bob-2")
    assert suspend.household == reinstate.household == did("carol")
    assert tou.detail == "time of use 00:00 8/30 · 02:00 6/35"
    # a genesis voter no record changed before: its role and meter from its households row
    assert (removal.household, removal.role, removal.meter_serial) == (
        did("voter"),
        "voter",
        "M-voter",
    )
    assert all(e.record_hash and len(e.record_hash) == 64 for e in o.entries)


def test_member_list_as_of_the_first_open_slot(ledger: GovLedger) -> None:
    o = overview(ledger.url)
    assert o.as_of == SLOTS + 1  # every gate through slot 10 closed
    members = {m.household: (m.status, m.role, m.meter_serial, m.since) for m in o.members}
    assert members == {
        did("carol"): ("active", "learner", "M-carol", 8),
        did("alice-2"): ("active", "learner", "M-alice", 5),
        did("bob"): ("active", "voter", "M-bob-2", 6),
        did("voter"): ("removed", "voter", "M-voter", 9),
        did("alice"): ("rotated", "learner", "M-alice", 5),
    }
    assert [m.status for m in o.members] == ["active"] * 3 + ["removed", "rotated"]
    assert all(m.scheduled == "" for m in o.members)


def test_member_list_shows_what_is_scheduled(ledger: GovLedger) -> None:
    at4 = {m.household: m for m in overview(ledger.url, as_of=4).members}
    assert (at4[did("carol")].status, at4[did("carol")].since) == ("active", 3)
    assert at4[did("carol")].scheduled == "suspended from slot 6; active from slot 8"
    assert (at4[did("alice-2")].status, at4[did("alice-2")].since) == ("pending", None)
    assert at4[did("alice-2")].scheduled == "active from slot 5"
    assert (at4[did("alice")].since, at4[did("alice")].since_time) == (0, "genesis")
    assert at4[did("alice")].scheduled == "rotated from slot 5"
    assert (at4[did("bob")].meter_serial, at4[did("bob")].since) == ("M-bob-2", 4)
    assert at4[did("voter")].scheduled == "removed from slot 9"
    # before the swap: bob's genesis meter, which the ledger knows from his readings only
    bob = {m.household: m for m in overview(ledger.url, as_of=2).members}[did("bob")]
    assert (bob.status, bob.role, bob.meter_serial, bob.since) == ("active", "learner", "M-bob", 0)
    assert bob.scheduled == "meter M-bob-2 from slot 4; role voter from slot 6"
    carol = {m.household: m for m in overview(ledger.url, as_of=2).members}[did("carol")]
    assert carol.status == "pending" and carol.since is None
    assert carol.scheduled == "active from slot 3; suspended from slot 6; active from slot 8"


def test_rules_periods_with_the_blocks_settled_under_each(ledger: GovLedger) -> None:
    o = overview(ledger.url)
    assert [p.from_slot for p in o.rules] == [0, 3, 7]
    assert [p.time for p in o.rules] == ["genesis", label(3), label(7)]
    assert [p.blocks for p in o.rules] == [2, 4, 4]
    assert [(p.first_height, p.last_height) for p in o.rules] == [(1, 2), (3, 6), (7, 10)]
    assert [(p.first_slot, p.last_slot) for p in o.rules] == [(1, 2), (3, 6), (7, 10)]
    assert [p.other_blocks for p in o.rules] == [0, 0, 0]
    assert [p.records for p in o.rules] == [(), (2,), (8,)]
    assert o.rules[0].rules_hash is None  # the genesis rules: blocks.rules is NULL
    for period in o.rules:
        config: MarketConfig = config_at(ledger.state, max(period.from_slot, 1))
        assert (period.feed_in_tariff, period.retail_price, period.mechanism) == (
            config.feed_in_tariff,
            config.retail_price,
            config.mechanism,
        )
        assert period.k == f"{config.k.numerator}/{config.k.denominator}"
        assert period.local_fee == getattr(config, "local_fee", 0)
        assert period.grid_fee == getattr(config, "grid_fee", 0)
        if period.from_slot:
            assert period.rules_hash == config.rules_hash()
    assert {"retail_price", "mechanism"} <= set(o.rules[1].changed)
    assert o.rules[2].changed == ("time_of_use",)
    assert o.rules[2].time_of_use == "00:00 8/30 · 02:00 6/35"


def test_the_page_and_the_csv_show_them(ctx: Context, ledger: GovLedger) -> None:
    page = rendered(ctx)
    assert "governance-history" in page and "governance-empty" not in page
    for name in ("carol", "bob", "alice", "voter"):
        assert f'"title": "{did(name)}"' in page  # the full DID on hover
        assert data.short_did(did(name)) in page
    for text in ("rotated", "suspended", "removed", "M-bob-2", label(3), "heights 3–6",
                 "heights 7–10", "00:00 8/30 · 02:00 6/35", "pay_as_bid", "genesis"):  # fmt: skip
        assert text in page, text
    assert "governance_unreadable" not in page
    rows = csv_rows(ctx)
    assert [r["kind"] for r in rows] == RECORD_TYPES
    assert [int(r["from_slot"]) for r in rows] == FROM_SLOTS
    assert [r["status"] or None for r in rows] == STATUSES
    assert [r["time"] for r in rows] == [label(s) for s in FROM_SLOTS]
    assert rows[0]["household"] == did("carol")  # full DIDs in the CSV
    assert rows[3]["new_household"] == did("alice-2")
    assert rows[1]["withdrawn"] == "1" and rows[1]["household"] == ""


def test_the_archive_shows_the_same(ledger: GovLedger, tmp_path: Path) -> None:
    target = f"sqlite:///{tmp_path / 'archive.db'}"
    archive(ledger.url, target)
    assert overview(target) == overview(ledger.url)


@needs_pg
def test_a_postgresql_archive_shows_the_same(ledger: GovLedger, pg_url: str) -> None:
    archive(ledger.url, pg_url)
    assert overview(pg_url) == overview(ledger.url)


# --- empty, older and hostile ledgers ------------------------------------------------------------


def test_no_governance_changes_since_genesis(tmp_path: Path) -> None:
    feeder = new_feeder(tmp_path, 6, households=3, seed=4)
    feeder.close()
    o = overview(feeder.store.url)
    assert o.empty and o.entries == [] and o.problems == []
    assert [(m.status, m.since, m.since_time) for m in o.members] == [
        (("active", 0, "genesis"))
    ] * 3
    assert [(p.from_slot, p.blocks, p.first_height, p.last_height) for p in o.rules] == [
        (0, 6, 1, 6)
    ]
    ctx = Context.open(feeder.store.url, verify_enabled=False)
    try:
        page = rendered(ctx)
        assert "No governance changes since genesis" in page and "governance-empty" in page
        assert "governance-members" in page and "governance-rules" in page
        assert csv_rows(ctx) == []
    finally:
        ctx.close()


def test_an_older_ledger_without_the_table_or_the_rules_column(copy: Path) -> None:
    execute(copy, "DROP TABLE governance")
    execute(copy, "ALTER TABLE blocks DROP COLUMN rules")
    o = overview(f"sqlite:///{copy}")
    assert o.empty and o.problems == []
    assert [(p.from_slot, p.blocks) for p in o.rules] == [(0, SLOTS)]
    # its households rows hold the latest roles and meters; nobody is removed without records
    assert {m.status for m in o.members} == {"active"}


def test_unreadable_rows_are_shown_not_raised(copy: Path) -> None:
    execute(copy, "UPDATE governance SET record = '{not json' WHERE position = 3")
    execute(
        copy,
        "UPDATE governance SET record = ? WHERE position = 6",
        json.dumps({"type": "close_gate", "slot": 1}),
    )
    execute(copy, "UPDATE governance SET record = ? WHERE position = 7", "x" * 100_000)
    execute(copy, "UPDATE governance SET from_slot = 'soon', household = 7 WHERE position = 7")
    execute(copy, "UPDATE governance SET withdrawn = 'many' WHERE position = 1")
    o = overview(f"sqlite:///{copy}")
    statuses = [e.status for e in o.entries]
    assert statuses == [
        "active", None, "unreadable", "rotated", "active", "unreadable", "unreadable", None,
        "removed",
    ]  # fmt: skip
    swap, suspend, reinstate = o.entries[2], o.entries[5], o.entries[6]
    assert swap.kind == "replace_meter" and "malformed" in (swap.problem or "")
    assert "close_gate" in (suspend.problem or "")
    assert "exceeds" in (reinstate.problem or "") and reinstate.from_slot is None
    assert reinstate.time == "—"
    assert o.entries[0].withdrawn is None
    assert [p.split(" is unreadable")[0] for p in o.problems] == [
        f"Governance record {n}" for n in (3, 6, 7)
    ]
    # the readable rest is folded: bob's role change still applies, on his unswapped meter
    assert o.entries[4].role == "voter"
    assert [p.from_slot for p in o.rules] == [0, 3, 7]
    ctx = Context.open(f"sqlite:///{copy}", verify_enabled=False)
    try:
        page = rendered(ctx)
        assert page.count("governance_unreadable") == 3
        assert page.count('"className": "unreadable"') == 3
        assert len(csv_rows(ctx)) == len(RECORD_TYPES)
    finally:
        ctx.close()


def test_an_unreadable_rules_change_leaves_its_blocks_under_other_rules(copy: Path) -> None:
    execute(copy, "UPDATE governance SET record = 'null' WHERE position = 8")
    o = overview(f"sqlite:///{copy}")
    assert [p.from_slot for p in o.rules] == [0, 3]
    assert o.rules[1].blocks == 4 and o.rules[1].other_blocks == 4  # slots 7-10: other rules
    assert o.entries[7].status == "unreadable" and len(o.problems) == 1


def test_unreadable_market_rules(copy: Path) -> None:
    execute(copy, "UPDATE meta SET value = '{\"grid\": 1}' WHERE key = 'config'")
    o = overview(f"sqlite:///{copy}")
    assert o.rules == [] and len(o.entries) == len(RECORD_TYPES)
    assert len(o.problems) == 1 and o.problems[0].startswith("The rules history cannot")


# --- in the browser ------------------------------------------------------------------------------


@needs_browser
@pytest.mark.slow
def test_the_governance_section_renders_in_chromium(chromium: Any, ledger: GovLedger) -> None:
    ctx = Context.open(ledger.url, verify_interval=0.3)
    dash = RunningDashboard(ctx)
    page = chromium.new_page()
    try:
        log = ConsoleLog(page)
        page.goto(dash.url)
        page.wait_for_function(
            "n => document.querySelectorAll('#governance-history tbody tr').length === n",
            arg=len(RECORD_TYPES),
        )
        wait_text(page, "#governance-history", "rotated")
        wait_text(page, "#governance-members", "removed")
        wait_text(page, "#governance-rules", "heights 7–10")
        cell = page.locator("#governance-history tbody tr").first.locator("td").nth(4)
        assert cell.get_attribute("title") == did("carol")
        assert cell.inner_text() == data.short_did(did("carol"))
        screenshot(page, "#section-governance", "governance")
        assert log.errors == []
    finally:
        page.close()
        dash.stop()


def test_community_costs_follow_the_rules_of_each_slot_and_the_fees(
    ledger: GovLedger, ctx: Context
) -> None:
    """The community's actual cost is what the ledger settled (to the rounding of each
    transaction), though the rules changed twice and grid fees apply from slot 3."""
    from sqlalchemy import func, select

    from market.settlement import UNMEASURED_SLOT_FEE, Tariffs
    from node.ledger import schema as t

    views.head_view(ctx)
    tariffs_at = data.tariffs_in_force(ctx.engine, ctx.info())
    for slot in range(1, SLOTS + 1):
        expected = config_at(ledger.state, slot).tariffs_at(slot)
        assert tariffs_at(slot) == expected, slot
    assert tariffs_at(2).grid_fee == 0 < tariffs_at(3).grid_fee
    figures = data.community_figures(ctx.slots.window(None), tariffs_at)
    with ctx.engine.connect() as conn:
        paid = -conn.execute(
            select(func.sum(t.balances.c.amount)).where(
                t.balances.c.account.like("household:%"), t.balances.c.asset == "money"
            )
        ).scalar()
        n_tx = conn.execute(select(func.count()).select_from(t.transactions)).scalar()
        fee_slots = conn.execute(select(func.sum(t.true_ups.c.slots))).scalar() or 0
    assert figures.slots == SLOTS
    # each transaction rounds by at most half a minor unit; true-ups also pay their
    # unmeasured-slot fee, which the dashboard's figures leave out
    assert abs(figures.actual_cost_cents - paid) <= n_tx // 2 + fee_slots * UNMEASURED_SLOT_FEE
    info = ctx.info()
    flat = data.community_figures(
        ctx.slots.window(None), lambda _slot: Tariffs(info.feed_in_tariff, info.retail_price)
    )
    assert abs(flat.actual_cost_cents - paid) > abs(figures.actual_cost_cents - paid)
