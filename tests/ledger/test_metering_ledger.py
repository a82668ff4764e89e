"""True-ups in the ledger (docs/ledger.md, "Unmeasured slots"): the store records each one in
``true_ups`` with its block, ``ledger verify`` ties the rows to their transactions and checks
that every household's settled energy equals its meter's movement, block sync and the archive
carry the rows, and the grid flows the node API and the dashboard show include them.

Real engine, real SQLite (and PostgreSQL with MICROGRID_TEST_PG); the grid is the market
simulation with some readings withheld.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from dashboard import data, views
from dashboard.archive import archive
from market import MeterReading, Rejected, SettleSlot, SlotSettled, State, apply
from market.accounting import ENERGY, Block, Posting, Transaction, household_account, roots
from market.accounting import state_hash as block_state_hash
from market.models import Trade
from market.settlement import Tariffs
from market.state import offer_share_permille, reading_leaf
from node.cli import main as cli_main
from node.ledger import LedgerStore, verify_ledger
from node.ledger import schema as t
from node.ledger.chunk import HEADER_FIELDS, BlockSyncError, decode_chunk, encode_chunk
from node.ledger.chunk_export import export_blocks
from node.ledger.chunk_import import import_blocks
from node.ledger.gaps import missing_ranges
from node.ledger.queries import load_settlement_sums
from node.ledger.snapshot_record import record_snapshot
from node.ledger.store import make_engine
from node.tools import market_sim
from tests.conftest import needs_pg

HOUSEHOLDS, SLOTS, SEED, FIRST_SLOT = 4, 16, 5, 36
"""Slots 36..51 (09:00 to 12:45: PV exports, trades), blocks 1..16 (block = slot − 35)."""
WITHHELD = frozenset({(3, 38), (1, 40), (1, 41), (2, 44), (0, 46), (0, 47), (0, 48)})
"""(household index, slot) readings never sent: true-ups in slots 39, 42, 45 and 49."""
TRUE_UP_SLOTS = {39: 3, 42: 1, 45: 2, 49: 0}
"""Slot of each true-up: the household index whose reading trued up its gap."""

V1_BLOCK_KEYS = {*HEADER_FIELDS, "transactions", "readings", "settlements"}
"""Every key of a chunk's block before true-ups (a grid without a feeder meter): what a node of
the previous version sends, and all its strict decoder accepts."""


@dataclass
class Run:
    """A simulated grid recorded into a ledger, with what the engine said."""

    url: str
    path: Path
    state: State
    dids: list[str]
    """Household DIDs by simulation index."""
    settled: list[SlotSettled] = field(default_factory=list)
    readings: dict[str, list[MeterReading]] = field(default_factory=dict)
    """The readings the engine accepted, per household, in slot order."""


def run(
    path: Path,
    withheld: frozenset[tuple[int, int]] = WITHHELD,
    restart: tuple[int, int] | None = None,
) -> Run:
    """The market simulation through the engine into a ledger at ``path``, without the
    ``withheld`` readings (the meters count on: the next reading sent trues them up);
    ``restart`` = (household index, slot): every meter starts at 50 kWh on both registers, and
    that meter's restart from zero at the start of the slot."""
    sim = market_sim.build(HOUSEHOLDS, SEED)
    index_of = {h.signer.did: h.index for h in sim.households}
    url = f"sqlite:///{path}"
    state = State.initial(sim.config)
    out = Run(url, path, state, [h.signer.did for h in sim.households])
    out.readings = {did: [] for did in out.dids}
    if restart is not None:
        for home in sim.households:
            home.import_wh = home.export_wh = 50_000
    with LedgerStore(url) as store:
        store.init_genesis(sim.config)
        commands = market_sim.commands(sim, SLOTS, first_slot=FIRST_SLOT)
        for index, command in enumerate(commands, start=1):
            if (
                isinstance(command, MeterReading)
                and (index_of[command.household], command.slot) in withheld
            ):
                continue
            if restart is not None and command == SettleSlot(slot=restart[1] - 1):
                home = sim.households[restart[0]]  # the generator has not made slot's readings
                home.import_wh = home.export_wh = 0
            out.state, events = apply(out.state, command)
            for ev in events:
                assert not isinstance(ev, Rejected), ev
                if isinstance(ev, SlotSettled):
                    out.settled.append(ev)
            if isinstance(command, MeterReading):
                out.readings[command.household].append(command)
            store.record(events, applied_index=index)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The withheld run and the same grid with every reading sent (module-wide: read only)."""
    tmp = tmp_path_factory.mktemp("metering")
    return {"withheld": run(tmp / "withheld.db"), "honest": run(tmp / "honest.db", frozenset())}


@pytest.fixture
def withheld(tmp_path: Path) -> Run:
    """A fresh withheld run a test may tamper with."""
    return run(tmp_path / "ledger.db")


def rows(url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(url.split(":///", 1)[1]) as conn:
        return conn.execute(sql, params).fetchall()


def execute(path: Path, sql: str, *params: object) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute(sql, params).rowcount >= 1, f"changed nothing: {sql}"


# --- the store ---------------------------------------------------------------------------------


def test_true_ups_rows_are_the_engines_true_ups(runs: dict[str, Run]) -> None:
    r = runs["withheld"]
    expected = sorted(
        (ev.slot, ev.block.height, s.household, s.gap_slots, s.gap_import_wh, s.gap_export_wh)
        for ev in r.settled
        for s in ev.settlements
        if s.gap_slots
    )
    stored = rows(
        r.url,
        "SELECT slot, block_height, household, slots, import_wh, export_wh FROM true_ups "
        "ORDER BY slot, household",
    )
    assert stored == expected
    assert {slot: r.dids.index(did) for slot, _, did, *_ in stored} == TRUE_UP_SLOTS
    # each covers the slots back to the household's previous reading: 38 -> 37, 40-41 -> 39 ...
    assert [n for *_, n, _, _ in stored] == [2, 3, 2, 4]
    assert any(imp for *_, imp, _ in stored) and any(exp for *_, exp in stored)
    assert rows(runs["honest"].url, "SELECT COUNT(*) FROM true_ups") == [(0,)]


def test_a_ledger_from_before_the_table_gets_it_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    r = run(path, frozenset())
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE true_ups")
    assert verify_ledger(r.url).ok  # an older node's ledger, read-only: no table, no true-ups
    LedgerStore(r.url).close()
    assert rows(r.url, "SELECT COUNT(*) FROM true_ups") == [(0,)]


# --- verify: rows against transactions, conservation --------------------------------------------


def test_verify_checks_conservation_per_household(runs: dict[str, Run]) -> None:
    r = runs["withheld"]
    report = verify_ledger(r.url)
    assert report.ok, report.error
    assert (report.conservation, report.rules) == ("ok", 2)
    assert "4 households" in (report.conservation_note or "")
    by_did = {h.household: h for h in report.households}
    assert sorted(by_did) == sorted(r.dids)
    for did, accepted in r.readings.items():
        h = by_did[did]
        first, last = accepted[0], accepted[-1]
        assert (h.first_reading_slot, h.last_reading_slot) == (first.slot, last.slot)
        assert h.import_moved_wh == last.import_wh - first.import_wh
        assert h.export_moved_wh == last.export_wh - first.export_wh
        assert h.energy_settled_wh == r.state.balances[(household_account(did), ENERGY)]
        assert h.energy_settled_wh == h.moved_net_wh and h.conserved
        settlements = [s for ev in r.settled for s in ev.settlements if s.household == did]
        assert h.measured_slots == sum(s.measured for s in settlements)
        assert h.unmeasured_slots == SLOTS - h.measured_slots
        gaps = [s for s in settlements if s.gap_slots]
        assert (h.true_ups, h.true_up_slots) == (len(gaps), sum(s.gap_slots for s in gaps))
        assert h.true_up_import_wh == sum(s.gap_import_wh for s in gaps)
        assert h.true_up_export_wh == sum(s.gap_export_wh for s in gaps)
    assert sum(h.true_ups for h in report.households) == len(TRUE_UP_SLOTS)


def test_a_meter_restart_is_counted_from_zero(tmp_path: Path) -> None:
    """Household 0's registers restart at slot 46: the engine trues it up from zero, and verify
    counts the restarted meter the same way."""
    r = run(tmp_path / "restart.db", frozenset(), restart=(0, 46))
    did = r.dids[0]
    before, after = (next(x for x in r.readings[did] if x.slot == s) for s in (45, 46))
    assert after.import_wh < before.import_wh and after.export_wh < before.export_wh
    assert rows(r.url, "SELECT slot, household, slots FROM true_ups") == [(46, did, 1)]
    report = verify_ledger(r.url)
    assert report.ok and report.conservation == "ok", report.error
    h = next(h for h in report.households if h.household == did)
    first, last = r.readings[did][0], r.readings[did][-1]
    assert h.import_moved_wh == (before.import_wh - first.import_wh) + last.import_wh
    assert h.energy_settled_wh == h.moved_net_wh


def test_verify_skips_conservation_of_a_rules_1_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r1.db'}"
    market_sim.run(households=3, slots=6, seed=2, db=url, rules=1)
    report = verify_ledger(url)
    assert report.ok and report.rules == 1 and report.households == ()
    assert report.conservation == "skipped" and "rules 1" in (report.conservation_note or "")


def test_cli_verbose_prints_each_households_figures(
    runs: dict[str, Run], capsys: pytest.CaptureFixture[str]
) -> None:
    r = runs["withheld"]
    assert cli_main(["ledger", "verify", "--db", r.url, "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "ledger OK: 16 blocks" in out and "conservation 4 households" in out
    for h in verify_ledger(r.url).households:
        block = out.split(f"household {h.household}: ok\n", 1)[1].split("household ", 1)[0]
        assert f"readings  slots {h.first_reading_slot}..{h.last_reading_slot}" in block
        assert f"import moved {h.import_moved_wh} Wh, export moved {h.export_moved_wh} Wh" in block
        assert f"settled   energy {h.energy_settled_wh:+} Wh" in block
        assert f"{h.measured_slots} measured, {h.unmeasured_slots} unmeasured" in block
        assert (
            f"true-ups  {h.true_ups} over {h.true_up_slots} slots: import "
            f"{h.true_up_import_wh} Wh, export {h.true_up_export_wh} Wh"
        ) in block
    assert cli_main(["ledger", "verify", "--db", r.url]) == 0
    assert "household " not in capsys.readouterr().out  # figures only with --verbose


def test_a_deleted_true_up_row_fails_verify(withheld: Run) -> None:
    did = withheld.dids[TRUE_UP_SLOTS[45]]
    execute(withheld.path, "DELETE FROM true_ups WHERE slot = 45")
    report = verify_ledger(withheld.url)
    assert not report.ok
    assert report.error is not None and "block 10 (slot 45)" in report.error
    assert f"true_up transaction of {did}" in report.error and "no true_ups row" in report.error


@pytest.mark.parametrize(
    ("column", "says"),
    [("import_wh", "its true_up transaction moves"), ("slots", "money at the grid's tariffs")],
)
def test_an_altered_true_up_row_fails_verify(withheld: Run, column: str, says: str) -> None:
    did = withheld.dids[TRUE_UP_SLOTS[49]]
    execute(withheld.path, f"UPDATE true_ups SET {column} = {column} + 7 WHERE slot = 49")
    report = verify_ledger(withheld.url)
    assert not report.ok and report.error is not None
    assert "block 14 (slot 49)" in report.error and did in report.error and says in report.error


def test_a_stray_true_up_row_fails_verify(withheld: Run) -> None:
    execute(
        withheld.path,
        "INSERT INTO true_ups (slot, household, block_height, slots, import_wh, export_wh) "
        "VALUES (40, ?, 5, 2, 10, 0)",
        withheld.dids[0],
    )
    report = verify_ledger(withheld.url)
    assert not report.ok and "has no true_up transaction" in (report.error or "")


TRADE_FIELDS = (
    "buy_id",
    "sell_id",
    "quantity_wh",
    "price",
    "sell_price",
    "slot",
    "buyer",
    "seller",
)


def rehash(url: str) -> None:
    """Recompute every transaction id, root, state hash, block hash and the balances table from
    the rows, as a forger who rewrites a whole ledger would: only semantic checks remain."""
    engine = create_engine(url)
    with engine.begin() as conn:
        prev = conn.execute(select(t.meta.c.value).where(t.meta.c.key == "genesis_hash")).scalar()
        balances: dict[tuple[str, str], int] = {}
        for b in conn.execute(select(t.blocks).order_by(t.blocks.c.height)).all():
            txs = []
            for tx in conn.execute(
                select(t.transactions)
                .where(t.transactions.c.block_height == b.height)
                .order_by(t.transactions.c.position)
            ).all():
                p = t.postings.c
                postings = tuple(
                    Posting(r.account, r.asset, r.amount)
                    for r in conn.execute(
                        select(t.postings).where(p.transaction_id == tx.id).order_by(p.position)
                    )
                )
                new = Transaction(tx.kind, tx.slot, tx.ref, postings)
                conn.execute(
                    t.transactions.update()
                    .where(t.transactions.c.id == tx.id)
                    .values(txid=new.txid)
                )
                for q in postings:
                    balances[(q.account, q.asset)] = balances.get((q.account, q.asset), 0) + (
                        q.amount
                    )
                txs.append(new)
            trades = [
                Trade(*(getattr(r, k) for k in TRADE_FIELDS))
                for r in conn.execute(
                    select(t.trades).where(t.trades.c.slot == b.slot).order_by(t.trades.c.position)
                )
            ]
            readings = [
                MeterReading.model_validate(
                    {k: v for k, v in r._mapping.items() if k != "position"}
                )
                for r in conn.execute(
                    select(t.readings)
                    .where(t.readings.c.slot == b.slot)
                    .order_by(t.readings.c.position)
                )
            ]
            tx_root, trade_root, reading_root = roots(
                txs, (tr.encode() for tr in trades), (reading_leaf(r) for r in readings)
            )
            sh = block_state_hash(b.height, balances)
            block = Block(
                b.height, b.slot, prev, tx_root, trade_root, reading_root, sh, len(txs), None
            )
            conn.execute(
                t.blocks.update()
                .where(t.blocks.c.height == b.height)
                .values(
                    prev_hash=prev,
                    tx_root=tx_root,
                    state_hash=sh,
                    tx_count=len(txs),
                    hash=block.hash,
                )
            )
            prev = block.hash
        conn.execute(t.balances.delete())
        conn.execute(
            t.balances.insert(),
            [{"account": a, "asset": s, "amount": v} for (a, s), v in sorted(balances.items())],
        )
    engine.dispose()


def test_a_rehashed_ledger_that_moved_energy_fails_conservation(withheld: Run) -> None:
    """A trade's energy raised by 100 Wh on both legs, and every hash rewritten to match: the
    chain verifies, but the buyer settled 100 Wh more than its meter moved."""
    (tx_id, buyer, seller) = rows(
        withheld.url,
        "SELECT t.id, tr.buyer, tr.seller FROM transactions t JOIN trades tr "
        "ON t.ref = tr.slot || ':' || tr.buy_id || ':' || tr.sell_id "
        "WHERE t.kind = 'trade' ORDER BY t.id LIMIT 1",
    )[0]
    execute(
        withheld.path,
        "UPDATE postings SET amount = amount + (CASE WHEN amount > 0 THEN 100 ELSE -100 END) "
        "WHERE transaction_id = ? AND asset = 'energy'",
        tx_id,
    )
    rehash(withheld.url)
    report = verify_ledger(withheld.url)
    assert not report.ok and report.conservation == "failed"
    assert report.blocks == SLOTS  # every block verified: the hashes were rewritten
    first = min(buyer, seller)
    h = next(h for h in report.households if h.household == first)
    assert h.energy_settled_wh == h.moved_net_wh + (100 if first == buyer else -100)
    assert report.error == (
        f"conservation: household {first} settled {h.energy_settled_wh:+} Wh of energy, but its "
        f"counters moved {h.moved_net_wh:+} Wh (import {h.import_moved_wh} Wh − export "
        f"{h.export_moved_wh} Wh) between its readings of slots {h.first_reading_slot} and "
        f"{h.last_reading_slot}"
    )
    assert [x.household for x in report.households if not x.conserved] == sorted((buyer, seller))


def test_altered_settlements_fail_conservation(withheld: Run) -> None:
    """Settlements are not hashed; conservation ties their metered flows to the readings."""
    did = withheld.dids[2]
    execute(
        withheld.path,
        "UPDATE settlements SET import_wh = import_wh + 5 WHERE slot = 50 AND household = ?",
        did,
    )
    report = verify_ledger(withheld.url)
    assert not report.ok and report.conservation == "failed"
    assert report.error is not None and did in report.error
    assert "import counter moved" in report.error


# --- block sync ---------------------------------------------------------------------------------


def gapped_copy(r: Run, path: Path) -> LedgerStore:
    """A ledger that installed the engine's final state as a snapshot: blocks 1..16 missing."""
    store = LedgerStore(f"sqlite:///{path}")
    store.init_genesis(r.state.config)
    record_snapshot(store, r.state, applied_index=10_000)
    assert missing_ranges(store) == [(1, SLOTS)]
    return store


def test_block_sync_carries_true_ups_and_the_copy_verifies(runs: dict[str, Run], tmp_path: Path):
    r = runs["withheld"]
    target = gapped_copy(r, tmp_path / "copy.db")
    try:
        pending = verify_ledger(target.url)
        assert not pending.ok and pending.conservation == "skipped"
        assert pending.conservation_note == "skipped: blocks 1..16 missing (block sync pending)"
        with LedgerStore(r.url) as source:
            data_ = export_blocks(source, 1, SLOTS)
        chunk = decode_chunk(data_)
        carried = {b.slot: [tu.household for tu in b.true_ups] for b in chunk.blocks if b.true_ups}
        assert carried == {slot: [r.dids[i]] for slot, i in TRUE_UP_SLOTS.items()}
        assert data_.count(b'"true_ups":') == len(TRUE_UP_SLOTS)
        assert import_blocks(target, data_) == []
    finally:
        target.close()
    query = "SELECT slot, household, block_height, slots, import_wh, export_wh FROM true_ups"
    assert sorted(rows(target.url, query)) == sorted(rows(r.url, query))
    copy, original = verify_ledger(target.url), verify_ledger(r.url)
    assert copy.ok and copy.conservation == "ok", copy.error
    assert copy.households == original.households and copy.head_hash == original.head_hash


def block_keys(data_: bytes) -> dict[int, set[str]]:
    return {b["slot"]: set(b) for b in json.loads(data_.split(b"\n", 1)[1])["blocks"]}


def test_chunks_of_blocks_without_true_ups_are_byte_identical_to_before(
    runs: dict[str, Run],
) -> None:
    """A block without a true-up encodes exactly as before the table existed (no key at all),
    so nodes of both versions exchange such chunks; the two runs agree byte for byte on the
    blocks before the first withheld reading (slots 36, 37)."""
    with LedgerStore(runs["honest"].url) as honest, LedgerStore(runs["withheld"].url) as held:
        everything = export_blocks(honest, 1, SLOTS)
        with_true_ups = export_blocks(held, 1, SLOTS)
        assert export_blocks(held, 1, 2) == export_blocks(honest, 1, 2)
        before_first_true_up = export_blocks(held, 1, 3)
    assert b"true_ups" not in everything and b"true_ups" not in before_first_true_up
    assert all(keys == V1_BLOCK_KEYS for keys in block_keys(everything).values())
    assert all(keys == V1_BLOCK_KEYS for keys in block_keys(before_first_true_up).values())
    for slot, keys in block_keys(with_true_ups).items():
        assert keys == V1_BLOCK_KEYS | ({"true_ups"} if slot in TRUE_UP_SLOTS else set())
    # the chunk's canonical form is the decoder's: a block without a true-up has no key at all
    assert encode_chunk(decode_chunk(with_true_ups)) == with_true_ups
    assert encode_chunk(decode_chunk(everything)) == everything


def reencode(data_: bytes, change: Any) -> bytes:
    doc = json.loads(data_.split(b"\n", 1)[1])
    change(doc)
    return encode_chunk(doc)


def _block(doc: dict[str, Any], slot: int) -> dict[str, Any]:
    return next(b for b in doc["blocks"] if b["slot"] == slot)


def _more_import(doc: dict[str, Any]) -> None:
    _block(doc, 42)["true_ups"][0]["import_wh"] += 50


def _more_slots(doc: dict[str, Any]) -> None:
    _block(doc, 42)["true_ups"][0]["slots"] += 1


def _dropped(doc: dict[str, Any]) -> None:
    del _block(doc, 42)["true_ups"]


def _invented(doc: dict[str, Any]) -> None:
    blk = _block(doc, 40)
    blk["true_ups"] = [
        {"household": blk["settlements"][0]["household"], "slots": 2, "import_wh": 0,
         "export_wh": 0}
    ]  # fmt: skip


def _empty(doc: dict[str, Any]) -> None:
    _block(doc, 40)["true_ups"] = []


@pytest.mark.parametrize(
    ("change", "reason", "says"),
    [
        (_more_import, "bad_block", "its true_up transaction moves"),
        (_more_slots, "bad_block", "money at the grid's tariffs"),
        (_dropped, "bad_block", "no true_ups row"),
        (_invented, "bad_block", "has no true_up transaction"),
        (_empty, "malformed", "must be left out, not empty"),
    ],
)
def test_a_chunk_with_wrong_true_ups_is_refused(
    runs: dict[str, Run], tmp_path: Path, change: Any, reason: str, says: str
) -> None:
    r = runs["withheld"]
    with LedgerStore(r.url) as source:
        data_ = reencode(export_blocks(source, 1, SLOTS), change)
    target = gapped_copy(r, tmp_path / "copy.db")
    try:
        with pytest.raises(BlockSyncError) as err:
            import_blocks(target, data_)
        assert err.value.reason == reason and says in str(err.value)
        assert missing_ranges(target) == [(1, SLOTS)]  # nothing landed
    finally:
        target.close()
    assert rows(target.url, "SELECT COUNT(*) FROM true_ups") == [(0,)]


# --- grid flows, the dashboard, the archive -----------------------------------------------------


def test_grid_flows_include_true_ups(runs: dict[str, Run]) -> None:
    r = runs["withheld"]
    engine = create_engine(r.url)
    with engine.connect() as conn:
        sums = load_settlement_sums(conn, None)
    engine.dispose()
    for ev in r.settled:
        s = sums[ev.slot]
        imbalance_in = sum(-x.imbalance_wh for x in ev.settlements if x.imbalance_wh < 0)
        imbalance_out = sum(x.imbalance_wh for x in ev.settlements if x.imbalance_wh > 0)
        gap_in = sum(x.gap_import_wh for x in ev.settlements)
        gap_out = sum(x.gap_export_wh for x in ev.settlements)
        assert (s["grid_import_wh"], s["grid_export_wh"]) == (
            imbalance_in + gap_in,
            imbalance_out + gap_out,
        )
        assert (s["true_up_import_wh"], s["true_up_export_wh"]) == (gap_in, gap_out)
        assert s["true_ups"] == (1 if ev.slot in TRUE_UP_SLOTS else 0)
        # what the grid delivered: the grid account's energy postings of the slot
        grid_out = sum(
            p.amount for tx in ev.transactions for p in tx.postings
            if p.account == "grid" and p.asset == ENERGY and p.amount < 0
        )  # fmt: skip
        assert s["grid_import_wh"] == -grid_out


def test_dashboard_shows_unmeasured_slots_and_true_ups(runs: dict[str, Run]) -> None:
    r = runs["withheld"]
    report = verify_ledger(r.url)
    figures = {h.household: h for h in report.households}
    ctx = views.Context.open(r.url, verify_enabled=False)
    try:
        views.head_view(ctx)
        summary = {row["household"]: row for row in data.household_summary(ctx.engine)}
        for did, h in figures.items():
            row = summary[did]
            assert row["unmeasured_slots"] == h.unmeasured_slots
            assert (row["true_ups"], row["true_up_slots"]) == (h.true_ups, h.true_up_slots)
            assert (row["true_up_import_wh"], row["true_up_export_wh"]) == (
                h.true_up_import_wh,
                h.true_up_export_wh,
            )
            # the delivery record that caps offers, replayed from the ledger = the engine's
            rep = r.state.reputation[did]
            assert row["recent_delivery_permille"] == rep.recent_score_permille
            assert row["offer_share_permille"] == offer_share_permille(
                r.state.config, rep.recent_score_permille
            )
        assert any(rep.recent_score_permille < 1000 for rep in r.state.reputation.values())
        did = r.dids[TRUE_UP_SLOTS[49]]
        view = views.households_view(ctx, did, "all")
        by_slot = {s["slot"]: s for s in view.slots}
        assert by_slot[49]["true_up_slots"] == 4 and not by_slot[49]["measured"]
        assert by_slot[49]["true_up_import_wh"] == figures[did].true_up_import_wh
        assert by_slot[50]["true_up_slots"] == 0
        names = [trace["name"] for trace in view.figure["data"]]
        assert "trued-up import" in names and "trued-up export" in names
        csv = data.rows_to_csv([{"household": did, **s} for s in view.slots])
        assert "true_up_slots,true_up_import_wh,true_up_export_wh" in csv.splitlines()[0]
        market = {p["slot"]: p for p in views.market_view(ctx, "all").points}
        assert market[49]["true_up_import_wh"] == figures[did].true_up_import_wh
        # the community's import and export include the true-ups: every Wh the meters moved
        f = data.community_figures(ctx.slots.window(None), lambda _slot: Tariffs(8, 32))
        assert f.import_wh == sum(h.import_moved_wh for h in figures.values())
        assert f.export_wh == sum(h.export_moved_wh for h in figures.values())
    finally:
        ctx.close()


def archive_case(source: Run, target: str) -> None:
    result = archive(source.url, target)
    assert result.verified and result.height == SLOTS
    engine = create_engine(target)
    with engine.connect() as conn:
        copied = sorted(tuple(r) for r in conn.execute(select(t.true_ups)))
    engine.dispose()
    assert copied == sorted(rows(source.url, "SELECT * FROM true_ups"))
    report = verify_ledger(target)
    assert report.ok and report.conservation == "ok", report.error
    assert report.households == verify_ledger(source.url).households


def test_the_archive_copies_true_ups_sqlite(runs: dict[str, Run], tmp_path: Path) -> None:
    archive_case(runs["withheld"], f"sqlite:///{tmp_path / 'archive.db'}")


@needs_pg
def test_the_archive_copies_true_ups_postgres(runs: dict[str, Run], pg_url: str) -> None:
    archive_case(runs["withheld"], pg_url)
    ctx = views.Context.open(pg_url, verify_enabled=False)
    try:
        lite = views.Context.open(runs["withheld"].url, verify_enabled=False)
        try:
            assert data.household_summary(ctx.engine) == data.household_summary(lite.engine)
            with ctx.engine.connect() as a, lite.engine.connect() as b:
                assert load_settlement_sums(a, None) == load_settlement_sums(b, None)
        finally:
            lite.close()
    finally:
        ctx.close()


def test_the_dashboards_household_records_follow_the_ledger_incrementally(tmp_path: Path) -> None:
    """The dashboard replays the settlements once and then only new slots: after every block
    its figures equal a replay from scratch (and, at the end, the engine's)."""
    sim = market_sim.build(HOUSEHOLDS, SEED)
    index_of = {h.signer.did: h.index for h in sim.households}
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    state = State.initial(sim.config)
    with LedgerStore(url) as store:
        store.init_genesis(sim.config)
        engine = make_engine(url, read_only=True)
        records = data.HouseholdRecords(engine)
        checked = 0
        commands = market_sim.commands(sim, SLOTS, first_slot=FIRST_SLOT)
        for index, command in enumerate(commands, start=1):
            if (
                isinstance(command, MeterReading)
                and (index_of[command.household], command.slot) in WITHHELD
            ):
                continue
            state, events = apply(state, command)
            store.record(events, applied_index=index)
            if any(isinstance(e, SlotSettled) for e in events):
                assert records.update() == data.HouseholdRecords(engine).update()
                checked += 1
        figures = records.update()
        engine.dispose()
    assert checked == SLOTS
    assert sum(figures.unmeasured.values()) > HOUSEHOLDS  # first slots, and the withheld ones
    for did, rep in state.reputation.items():
        assert figures.delivery[did]["recent_delivery_permille"] == rep.recent_score_permille
