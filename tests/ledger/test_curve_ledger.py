"""Curve orders in the ledger: the ``orders.steps`` and ``trades.part`` columns, verify, block
sync and snapshot installs carry them; ledgers, chunks and snapshots of books without curve
orders stay byte-identical to what the code before curve orders wrote; older ledgers open."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from market import CloseGate, MemberRegistration, MemberRole, Order, SettleSlot, State, apply
from market.snapshot import dump_state
from node.daemon.replica import Replica
from node.ledger import LedgerStore, verify_ledger
from node.ledger import chunk_export as chunk_export_module
from node.ledger.chunk import BlockSyncError, decode_chunk, encode_chunk
from node.ledger.chunk_export import export_blocks
from node.ledger.chunk_import import import_blocks
from node.ledger.gaps import missing_ranges
from node.ledger.rows import steps_column, steps_from_column
from node.ledger.snapshot_record import record_snapshot
from node.tools import market_sim
from tests.market.world import GRID, World, signer
from tests.node.test_replica import as_log

NAMES = ("alice", "bob", "carol", "dave")
SLOTS = 5
"""Slots 1..5 settle; slot 6's gate closes last, so a snapshot holds a cleared curve book."""


def curve(w: World, name: str, side: str, steps: list[tuple[int, int]], slot: int) -> Order:
    s = w.homes[name]
    extra: dict[str, Any] = {"steps": tuple(steps)} if len(steps) > 1 else {}
    return Order(grid=GRID, id=f"{name}-{slot}", household=s.did, side=side, slot=slot,
                 quantity_wh=sum(q for q, _ in steps), price=steps[0][1],
                 nonce=w.nonce(s.did), **extra).signed_by(s)  # fmt: skip


def curve_commands() -> tuple[World, list[Any]]:
    """Four households trading curves and plain orders under pay-as-bid with grid fees."""
    w = World(mechanism="pay_as_bid")
    w.config = replace(w.config, local_fee=2, grid_fee=3)
    w.state = State.initial(w.config)
    out: list[Any] = []
    for name in NAMES:
        w.homes[name] = home = signer(name)
        out.append(
            MemberRegistration(grid=GRID, operator=w.operator.did, household=home.did,
                               meter_serial=f"M-{name}", role=MemberRole.VOTER if name == "alice"
                               else MemberRole.LEARNER,
                               nonce=w.nonce(w.operator.did)).signed_by(w.operator)
        )  # fmt: skip
    meters = {name: [0, 0] for name in NAMES}
    for slot in range(1, SLOTS + 2):
        out += [
            curve(w, "alice", "sell", [(100, 9), (200, 14), (100, 25)], slot),
            curve(w, "bob", "buy", [(150, 30), (150, 20), (100, 12 + slot)], slot),
            curve(w, "carol", "buy", [(120, 28)], slot),
            curve(w, "dave", "sell", [(80, 10 + slot)], slot),
            CloseGate(slot=slot),
        ]
        if slot > SLOTS:
            break
        for i, name in enumerate(NAMES):
            meters[name][0] += 40 * (i + 1)
            meters[name][1] += 60 * (4 - i)
            out.append(w.reading(name, slot, *meters[name]))
        out.append(SettleSlot(slot=slot))
    return w, out


@dataclass
class Grid:
    path: Path
    state: State
    entries: list[tuple[int, bytes]]
    snapshots: dict[int, tuple[int, bytes]]
    """Engine snapshot (log index, bytes) after the entry that reached each height."""
    final: tuple[int, bytes]
    """The snapshot after the last entry (slot 6's gate closed, not settled)."""

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Grid:
    w, commands = curve_commands()
    state = State.initial(w.config)
    for cmd in commands:  # the engine accepts every command
        state, events = apply(state, cmd)
        assert not any(type(e).__name__ == "Rejected" for e in events), (cmd, events)
    entries = as_log(commands, 5)
    path = tmp_path_factory.mktemp("curves") / "full.db"
    store = LedgerStore(f"sqlite:///{path}")
    replica = Replica(w.config, store)
    snapshots: dict[int, tuple[int, bytes]] = {}
    for index, data in entries:
        replica.apply_entry(index, data)
        snapshots.setdefault(replica.state.height, replica.snapshot())
    final = replica.snapshot()
    store.close()
    assert replica.state.head_hash == state.head_hash
    assert replica.state.closed_books[SLOTS + 1]  # a cleared curve book in the snapshot
    return Grid(path, replica.state, entries, snapshots, final)


def rows(path: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, params).fetchall()


ORDER_ROWS = "SELECT slot, order_id, position, quantity_wh, price, steps FROM orders " \
             "ORDER BY slot, position"  # fmt: skip
TRADE_ROWS = "SELECT slot, position, buy_id, sell_id, quantity_wh, price, part FROM trades " \
             "ORDER BY slot, position"  # fmt: skip


def test_the_ledger_stores_steps_and_parts_and_verifies(grid: Grid) -> None:
    report = verify_ledger(grid.url)
    assert report.ok, report.error
    assert report.height == SLOTS and report.head_hash == grid.state.head_hash
    orders = rows(grid.path, ORDER_ROWS)
    assert len(orders) == 4 * (SLOTS + 1)
    alice = next(r for r in orders if r[1] == "alice-1")
    assert alice[3:] == (400, 9, "[[100,9],[200,14],[100,25]]")
    assert next(r for r in orders if r[1] == "carol-1")[5] is None  # a plain order: NULL
    for r in orders:  # every stored curve decodes to the order's steps
        steps = steps_from_column(r[5])
        assert steps is None or (sum(q for q, _ in steps) == r[3] and steps[0][1] == r[4])
    trades = rows(grid.path, TRADE_ROWS)
    parts = [t for t in trades if t[6] is not None]
    assert parts and all(t[6] >= 1 for t in parts)  # pay-as-bid: a pair at several prices
    assert len({(t[0], t[2], t[3], t[6]) for t in trades}) == len(trades)
    refs = [r[0] for r in rows(grid.path, "SELECT ref FROM transactions WHERE kind = 'trade'")]
    assert len(refs) == len(set(refs)) == sum(1 for t in trades if t[0] <= SLOTS)
    assert any(ref.endswith("/1") for ref in refs)
    fees = rows(grid.path, "SELECT amount FROM balances WHERE account = 'network'")
    assert fees and fees[0][0] > 0


def test_steps_column_round_trip() -> None:
    assert steps_column(()) is None and steps_column(None) is None
    assert steps_column(((1, 2), (3, 4))) == "[[1,2],[3,4]]"
    assert steps_from_column("[[1,2],[3,4]]") == [[1, 2], [3, 4]]
    for bad in ("[]", "[[1,2,3]]", "[[1,true]]", "[[1.5,2]]", "{}", "nope"):
        with pytest.raises(ValueError):
            steps_from_column(bad)


def test_verify_catches_an_altered_part(grid: Grid, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    shutil.copy(grid.path, copy)
    with sqlite3.connect(copy) as conn:
        assert conn.execute("UPDATE trades SET part = NULL WHERE part = 1").rowcount >= 1
    report = verify_ledger(f"sqlite:///{copy}")
    assert not report.ok and "trade root mismatch" in (report.error or "")


# --- block sync and snapshot installs ------------------------------------------------------------


def synced(grid: Grid, tmp: Path, k_height: int) -> tuple[str, list[bytes]]:
    """A ledger that applied the log to height ``k_height``, installed the final snapshot and
    filled the gap by block sync from the full ledger; the chunks."""
    url = f"sqlite:///{tmp / f'synced-{k_height}.db'}"
    store = LedgerStore(url)
    replica = Replica(grid.state.config, store)
    if k_height:
        stop = grid.snapshots[k_height + 1][0]
        for index, data in grid.entries:
            if index >= stop:
                break
            replica.apply_entry(index, data)
    replica.install_snapshot(*grid.final)
    assert missing_ranges(store) == [(k_height + 1, SLOTS)]
    chunks = []
    source = LedgerStore(grid.url)
    try:
        while gaps := missing_ranges(store):
            chunks.append(export_blocks(source, *gaps[0]))
            import_blocks(store, chunks[-1])
            assert len(chunks) < 10
    finally:
        source.close()
        store.close()
    return url, chunks


@pytest.mark.parametrize(("k_height", "max_blocks"), [(0, 50), (0, 2), (2, 50)])
def test_a_snapshot_and_block_sync_reproduce_the_curve_rows(
    grid: Grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k_height: int, max_blocks: int
) -> None:
    monkeypatch.setattr(chunk_export_module, "MAX_CHUNK_BLOCKS", max_blocks)
    url, chunks = synced(grid, tmp_path, k_height)
    path = Path(url.split(":///", 1)[1])
    for sql in (ORDER_ROWS, TRADE_ROWS, "SELECT height, hash FROM blocks ORDER BY height",
                "SELECT txid, ref FROM transactions ORDER BY block_height, position"):  # fmt: skip
        assert rows(path, sql) == rows(grid.path, sql), sql
    report = verify_ledger(url)
    assert report.ok, report.error
    decoded = [decode_chunk(c) for c in chunks]
    gates = [g for c in decoded for g in c.gates]
    assert any(o.steps for g in gates for o in g.orders)
    assert any(o.steps is None for g in gates for o in g.orders)
    assert any(t.part for g in gates for t in g.trades)
    # the chunk names a plain order's steps and a first trade's part by leaving them out
    assert all(b'"steps":null' not in c and b'"part":null' not in c for c in chunks)


def test_block_sync_refuses_altered_steps_or_parts(grid: Grid, tmp_path: Path) -> None:
    store = LedgerStore(f"sqlite:///{tmp_path / 'target.db'}")
    try:
        store.init_genesis(grid.state.config)
        record_snapshot(store, grid.state, applied_index=10_000)
        with LedgerStore(grid.url) as source:
            data = export_blocks(source, 1, SLOTS)
        doc = json.loads(data.split(b"\n", 1)[1])

        def with_change(change: Callable[[dict[str, Any]], None]) -> bytes:
            altered = json.loads(json.dumps(doc))
            change(altered)
            return encode_chunk(altered)

        def first_curve(d: dict[str, Any]) -> dict[str, Any]:
            return next(o for o in d["gates"][0]["orders"] if "steps" in o)

        def first_part(d: dict[str, Any]) -> dict[str, Any]:
            return next(t for g in d["gates"] for t in g["trades"] if "part" in t)

        def steps(d: dict[str, Any]) -> None:
            first_curve(d)["steps"][1][1] += 1

        def dropped_steps(d: dict[str, Any]) -> None:
            del first_curve(d)["steps"]

        def dropped_part(d: dict[str, Any]) -> None:
            del first_part(d)["part"]

        def null_steps(d: dict[str, Any]) -> None:
            first_curve(d)["steps"] = None

        def empty_steps(d: dict[str, Any]) -> None:
            first_curve(d)["steps"] = []

        def null_part(d: dict[str, Any]) -> None:
            first_part(d)["part"] = None

        def bad_curve(d: dict[str, Any]) -> None:
            first = first_curve(d)["steps"]
            first[1][1], first[2][1] = first[2][1], first[1][1]

        for change, reason, says in (
            (steps, "bad_block", "bad signature"),
            (dropped_steps, "bad_block", "bad signature"),
            (dropped_part, "bad_block", "is not what its orders clear to"),
            (null_steps, "malformed", "steps: must be left out, not null or empty"),
            (empty_steps, "malformed", "steps: must be left out, not null or empty"),
            (null_part, "malformed", "part: must be left out, not null"),
            (bad_curve, "malformed", "step prices must strictly increase"),
        ):
            with pytest.raises(BlockSyncError) as caught:
                import_blocks(store, with_change(change))
            assert caught.value.reason == reason and says in str(caught.value), (
                change.__name__,
                caught.value,
            )
        assert missing_ranges(store) == [(1, SLOTS)]  # nothing changed
        assert import_blocks(store, data) == []
    finally:
        store.close()
    report = verify_ledger(store.url)
    assert report.ok, report.error


# --- books without curve orders: byte-identical to before; older ledgers -------------------------

# market_sim.run(households=4, slots=6, seed, mechanism): head hash, SHA-256 of the chunk of
# blocks 1..6 and of the final engine snapshot, produced by the code before curve orders.
BEFORE_CURVES = {
    ("uniform", 11): (
        "e7967d35a7be83431d93c232120d450c4441604d0a63cf3a2727437198ab7653",
        "6441e316745a57d66a9c2c8eed24957e45ff57d30234a67f2dc2653bd803ea1e",
        "4edd2f80f2cc0a0cfbab137205ba057f9dee33b20c0824b902e5da3a0631a959",
    ),
    ("pay_as_bid", 12): (
        "0d8ca2b1ed97958a38a0911ddb1351744576b3bb5da8051254891ec676164221",
        "302ca0f841d27adb83bdfa475a811161e69e92e718dcbca7d9304cc8921010dc",
        "cf92bb155b9f711dc63d9ba67aa53a59e1529d5dc0870476424591715794bb42",
    ),
    ("mcafee", 13): (
        "1ecf8909e7a6c9e12115e8a27f450b1ee246b26a6ea427bb233a172acfaf935d",
        "aea44c35dec596139020e38018284ec1aba857d691b9c1fae5f203f562625bed",
        "1e02228a88ef8ffd3366618c28f29f382133519e6829004a3d1e9853cc8788af",
    ),
}


@pytest.mark.parametrize(("mechanism", "seed"), list(BEFORE_CURVES))
def test_plain_books_give_the_ledger_chunk_and_snapshot_they_gave_before(
    tmp_path: Path, mechanism: str, seed: int
) -> None:
    path = tmp_path / "plain.db"
    url = f"sqlite:///{path}"
    state = market_sim.run(households=4, slots=6, seed=seed, mechanism=mechanism, db=url)
    with LedgerStore(url) as store:
        chunk = export_blocks(store, 1, 6)
    got = (state.head_hash, hashlib.sha256(chunk).hexdigest(),
           hashlib.sha256(dump_state(state)).hexdigest())  # fmt: skip
    assert got == BEFORE_CURVES[(mechanism, seed)]
    assert rows(path, "SELECT COUNT(*) FROM orders WHERE steps IS NOT NULL") == [(0,)]
    assert rows(path, "SELECT COUNT(*) FROM trades WHERE part IS NOT NULL") == [(0,)]


def test_a_ledger_of_a_node_before_curves_opens_verifies_and_syncs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    state = market_sim.run(households=3, slots=6, seed=11, db=url)
    with LedgerStore(url) as store:
        before = export_blocks(store, 1, 6)
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE orders DROP COLUMN steps")
        conn.execute("ALTER TABLE trades DROP COLUMN part")
    report = verify_ledger(url)  # read-only: neither column
    assert report.ok and report.head_hash == state.head_hash, report.error
    with LedgerStore(url) as store:  # a node opening it adds them
        assert export_blocks(store, 1, 6) == before
    for table, column in (("orders", "steps"), ("trades", "part")):
        assert column in {r[1] for r in rows(path, f"PRAGMA table_info({table})")}
        assert rows(path, f"SELECT COUNT(*) FROM {table} WHERE {column} IS NOT NULL") == [(0,)]
    # the chunk of the older ledger imports into a node that installed the final snapshot
    target = LedgerStore(f"sqlite:///{tmp_path / 'target.db'}")
    try:
        target.init_genesis(state.config)
        record_snapshot(target, state, applied_index=10_000)
        assert import_blocks(target, before) == []
    finally:
        target.close()
    assert verify_ledger(target.url).ok
