"""Block sync on real SQLite files: a ledger with a snapshot gap is filled from a full one."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from market import decode_batch, encode_batch
from market.encoding import canonical_bytes
from node.daemon.replica import Replica, ReplicaError
from node.ledger import LedgerStore, chunk_export, verify_ledger
from node.ledger.chunk import MAX_CHUNK_BLOCKS, MAX_CHUNK_BYTES, BlockSyncError, decode_chunk
from node.ledger.chunk_export import export_blocks
from node.ledger.chunk_import import import_blocks
from node.ledger.gaps import missing_ranges
from node.tools import market_sim
from tests.node.test_replica import log_entries

TABLES = (
    "meta", "blocks", "transactions", "postings", "balances", "clearings", "orders", "trades",
    "readings", "settlements", "true_ups", "households",
)  # fmt: skip


@dataclass
class Grid:
    """A full ledger of a log, and engine snapshots taken along it."""

    tmp: Path
    config: Any
    entries: list[tuple[int, bytes]]
    url: str
    heights: dict[int, int] = field(default_factory=dict)
    """Engine height after each entry."""
    ahead: dict[int, bool] = field(default_factory=dict)
    """After each entry: a gate closed whose slot has not settled yet."""
    snapshots: dict[int, bytes] = field(default_factory=dict)

    def index_at(self, height: int, *, mid_slot: bool = True) -> int:
        """The first entry after which the engine is at ``height`` (and a gate is ahead)."""
        return next(
            i
            for i in sorted(self.heights)
            if self.heights[i] == height and (self.ahead[i] or not mid_slot)
        )

    def gapped(self, name: str, plan: list[tuple[int, int]]) -> str:
        """A ledger that applied the log, but jumped by snapshot over each ``(k, index)``:
        it applied entries up to k, then installed the snapshot at index."""
        url = f"sqlite:///{self.tmp / name}"
        store = LedgerStore(url)
        replica = Replica(self.config, store)
        position = 0
        for k, index in plan:
            for i, data in self.entries[position:k]:
                replica.apply_entry(i, data)
            replica.install_snapshot(index, self.snapshots[index])
            position = index
        for i, data in self.entries[position:]:
            replica.apply_entry(i, data)
        store.close()
        return url


def build_grid(tmp: Path, households: int, slots: int, seed: int, snap_heights: list[int]) -> Grid:
    config, entries = log_entries(households, slots, seed)
    grid = Grid(tmp, config, entries, f"sqlite:///{tmp / 'full.db'}")
    store = LedgerStore(grid.url)
    replica = Replica(config, store)
    for index, data in entries:
        replica.apply_entry(index, data)
        st = replica.state
        grid.heights[index] = st.height
        grid.ahead[index] = (st.closed_through or 0) > (st.settled_through or 0)
        if st.height in snap_heights:
            grid.snapshots[index] = replica.snapshot()[1]
    store.close()
    return grid


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Grid:
    """120 slots of 3 households; snapshots around heights 8, 70, 90 and 110."""
    return build_grid(tmp_path_factory.mktemp("grid"), 3, 120, 5, [8, 70, 71, 90, 110])


def dump(url: str, *, with_ids: bool) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows; without ids, postings name their transaction by (height, position)."""
    path = url.split(":///", 1)[1]
    with sqlite3.connect(path) as conn:
        out = {}
        for table in TABLES:
            if with_ids:
                out[table] = conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            elif table == "transactions":
                out[table] = sorted(
                    conn.execute(
                        "SELECT block_height, position, txid, kind, slot, ref FROM transactions"
                    )
                )
            elif table == "postings":
                out[table] = sorted(
                    conn.execute(
                        "SELECT t.block_height, t.position, p.position, p.account, p.asset, "
                        "p.amount FROM postings p JOIN transactions t ON p.transaction_id = t.id"
                    )
                )
            else:
                out[table] = sorted(conn.execute(f"SELECT * FROM {table}"))
    return out


def fill(source: str, target: str, chunks: list[bytes] | None = None) -> list[list[tuple]]:
    """Export from ``source`` what ``target`` misses and import it, until nothing is missing."""
    steps = []
    src, dst = LedgerStore(source), LedgerStore(target)
    try:
        while gaps := missing_ranges(dst):
            data = export_blocks(src, *gaps[0])
            if chunks is not None:
                chunks.append(data)
            steps.append(import_blocks(dst, data))
            assert len(steps) < 100
    finally:
        src.close()
        dst.close()
    return steps


def assert_same_ledger(full: str, other: str) -> None:
    a, b = dump(full, with_ids=False), dump(other, with_ids=False)
    for table in TABLES:
        if table == "meta":  # the gapped node's applied index is its own; gaps are gone
            assert dict(a[table]) == dict(b[table]), table
            continue
        assert a[table] == b[table], table
    ra, rb = verify_ledger(full), verify_ledger(other)
    assert ra.ok and rb.ok, (ra.error, rb.error)
    assert (rb.height, rb.head_hash, rb.transactions) == (ra.height, ra.head_hash, ra.transactions)


def one_gap(grid: Grid, name: str = "gapped.db", k_height: int = 8, height: int = 110) -> str:
    return grid.gapped(name, [(grid.index_at(k_height), grid.index_at(height))])


# --- filling ----------------------------------------------------------------------------------


def test_chunks_fill_the_gap_and_both_ledgers_are_equal(grid: Grid) -> None:
    url = one_gap(grid)
    store = LedgerStore(url)
    gaps = missing_ranges(store)
    store.close()
    assert len(gaps) == 1 and gaps[0][1] == 110 and gaps[0][0] <= 9
    a, b = gaps[0]
    chunks: list[bytes] = []
    steps = fill(grid.url, url, chunks)
    assert steps == [[(a + 50, b)], [(a + 100, b)], []]  # 50 blocks a chunk, then the rest
    assert [len(decode_chunk(c).blocks) for c in chunks] == [50, 50, b - a - 99]
    assert all(len(c) <= MAX_CHUNK_BYTES for c in chunks)
    assert_same_ledger(grid.url, url)


def test_verify_reports_a_pending_gap_clearly_and_passes_once_filled(grid: Grid) -> None:
    url = one_gap(grid, "pending.db")
    store = LedgerStore(url)
    ((a, b),) = missing_ranges(store)
    meta = store.meta()
    store.close()
    report = verify_ledger(url)
    assert not report.ok
    assert report.error == f"blocks {a}..{b} missing: block sync pending"
    assert report.missing == ((a, b),)
    assert report.height == a - 1 and report.blocks == a - 1  # the part before the gap verified
    assert meta["block_sync_needed"] == f"{a}..{b}"
    full = LedgerStore(grid.url)
    with full.engine.connect() as conn:
        head_b = conn.exec_driver_sql(f"SELECT hash FROM blocks WHERE height={b}").scalar()
    full.close()
    assert meta["block_sync_head"] == head_b  # the snapshot's head hash
    fill(grid.url, url)
    report = verify_ledger(url)
    assert report.ok and report.missing == ()
    store = LedgerStore(url)
    assert not {"block_sync_needed", "block_sync_head", "block_sync_gates"} & set(store.meta())
    store.close()


def test_two_gaps_from_two_snapshots_are_both_filled(grid: Grid) -> None:
    plan = [(grid.index_at(8), grid.index_at(70)), (grid.index_at(90), grid.index_at(110))]
    url = grid.gapped("two.db", plan)
    store = LedgerStore(url)
    gaps = missing_ranges(store)
    meta = store.meta()
    store.close()
    assert len(gaps) == 2 and gaps[0][1] == 70 and gaps[1] == (91, 110)
    assert len(meta["block_sync_head"].split(",")) == 2
    report = verify_ledger(url)
    assert not report.ok and "block sync pending" in report.error
    assert f"{gaps[0][0]}..70, 91..110" in report.error
    steps = fill(grid.url, url)
    assert steps[-2] == [(91, 110)] and steps[-1] == []
    assert_same_ledger(grid.url, url)


def test_a_second_snapshot_before_the_first_gap_fills_extends_it(grid: Grid) -> None:
    """No block was written between the two snapshots: one gap, up to the second one."""
    i70, i71 = grid.index_at(70), grid.index_at(71)
    url = grid.gapped("merged.db", [(grid.index_at(8), i70), (i70, i71)])
    store = LedgerStore(url)
    gaps = missing_ranges(store)
    store.close()
    assert len(gaps) == 1 and gaps[0][1] == 71
    fill(grid.url, url)
    assert_same_ledger(grid.url, url)


def test_a_snapshot_taken_on_a_slot_boundary_fills_too(grid: Grid) -> None:
    """No gate was ahead of settlement at the snapshot: nothing follows the gap."""
    index = grid.index_at(90, mid_slot=False)
    assert not grid.ahead[index]
    url = grid.gapped("boundary.db", [(grid.index_at(8), index)])
    fill(grid.url, url)
    assert_same_ledger(grid.url, url)


def test_a_ledger_can_serve_blocks_it_synced_and_not_those_it_lacks(grid: Grid) -> None:
    url = one_gap(grid, "relay.db")
    store = LedgerStore(url)
    ((a, b),) = missing_ranges(store)
    with pytest.raises(BlockSyncError) as err:
        export_blocks(store, a + 3, b)
    assert err.value.reason == "not_available" and "own gap" in str(err.value)
    with pytest.raises(BlockSyncError) as err:
        export_blocks(store, 500, 600)
    assert err.value.reason == "not_available"
    before = export_blocks(store, 1, a + 10)  # stops before its own gap
    assert [blk.height for blk in decode_chunk(before).blocks] == list(range(1, a))
    store.close()
    fill(grid.url, url)
    # Now a third node, gapped the same way, syncs from the relay instead of the full ledger.
    third = one_gap(grid, "third.db")
    fill(url, third)
    assert_same_ledger(grid.url, third)


def test_export_respects_the_byte_limit(grid: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    url = one_gap(grid, "small.db")
    store, full = LedgerStore(url), LedgerStore(grid.url)
    limit = len(export_blocks(full, *missing_ranges(store)[0])) // 4
    store.close()
    monkeypatch.setattr(chunk_export, "MAX_CHUNK_BYTES", limit)
    chunks: list[bytes] = []
    fill(grid.url, url, chunks)
    assert len(chunks) > 6
    assert all(len(c) <= limit for c in chunks)
    assert all(1 <= len(decode_chunk(c).blocks) < MAX_CHUNK_BLOCKS for c in chunks)
    assert_same_ledger(grid.url, url)
    one = len(export_blocks(full, 1, 1))
    monkeypatch.setattr(chunk_export, "MAX_CHUNK_BYTES", one // 2)
    full = LedgerStore(grid.url)
    with pytest.raises(BlockSyncError) as err:
        export_blocks(full, 1, 1)
    full.close()
    assert err.value.reason == "too_large"


# --- refusing -----------------------------------------------------------------------------------


def reencode(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(data.split(b"\n", 1)[1])
    change(doc)
    return canonical_bytes("blocksync", doc)


def first_with(items: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return next(x for x in items if x[key])


def _posting(doc: dict[str, Any]) -> None:
    tx = first_with(doc["blocks"][3]["transactions"], "postings")
    tx["postings"][0][2] += 1


def _balanced_posting(doc: dict[str, Any]) -> None:
    tx = next(t for t in doc["blocks"][3]["transactions"] if len(t["postings"]) >= 2)
    tx["postings"][0][2] -= 5
    tx["postings"][1][2] += 5


def _reading(doc: dict[str, Any]) -> None:
    first_with(doc["blocks"], "readings")["readings"][0]["export_wh"] += 100


def _swap(doc: dict[str, Any]) -> None:
    doc["blocks"][1], doc["blocks"][2] = doc["blocks"][2], doc["blocks"][1]


def _swap_content(doc: dict[str, Any]) -> None:
    """Keep the heights in order but exchange two blocks' contents."""
    one, two = doc["blocks"][1], doc["blocks"][2]
    one["height"], two["height"] = two["height"], one["height"]
    doc["blocks"][1], doc["blocks"][2] = two, one


def _genesis(doc: dict[str, Any]) -> None:
    doc["genesis_hash"] = "ab" * 32


def _link(doc: dict[str, Any]) -> None:
    doc["link"] = doc["link"][:-1]


def _order_signature(doc: dict[str, Any]) -> None:
    gate = first_with(doc["gates"], "orders")
    gate["orders"][0]["quantity_wh"] += 1


def _dropped_order(doc: dict[str, Any]) -> None:
    gate = next(g for g in doc["gates"] if g["trades"] and len(g["orders"]) > 1)
    gate["orders"].pop()
    gate["order_count"] -= 1


def _clearing_price(doc: dict[str, Any]) -> None:
    gate = next(g for g in doc["gates"] if g["price"] is not None)
    gate["price"] += 1


def _settlement_field(doc: dict[str, Any]) -> None:
    doc["blocks"][0]["settlements"][0]["bonus"] = 1


def _missing_gate(doc: dict[str, Any]) -> None:
    doc["gates"].pop(5)


def _state_hash(doc: dict[str, Any]) -> None:
    """A consistent, rehashed chain whose balances are wrong is still refused (by the link)."""
    doc["blocks"][-1]["state_hash"] = "11" * 32


TAMPERS = {
    "posting_amount": (_posting, "bad_block", "does not match its id"),
    "balanced_rewrite": (_balanced_posting, "bad_block", "does not match its id"),
    "reading_counter": (_reading, "bad_block", "invalid signature"),
    "swapped_order": (_swap, "bad_chain", "height"),
    "swapped_content": (_swap_content, "bad_block", "hash"),
    "wrong_genesis": (_genesis, "wrong_grid", "genesis"),
    "short_link": (_link, "not_anchored", "whole missing range"),
    "order_signature": (_order_signature, "bad_block", "bad signature"),
    "dropped_order": (_dropped_order, "bad_block", "clear"),
    "clearing_price": (_clearing_price, "bad_block", "clear"),
    "unknown_field": (_settlement_field, "malformed", "settlements[0].bonus: unknown field"),
    "missing_gate": (_missing_gate, "incomplete", "gate closure"),
    "state_hash": (_state_hash, "bad_block", "hash"),
}


@pytest.fixture(scope="module")
def gapped_pristine(grid: Grid) -> tuple[str, bytes]:
    url = one_gap(grid, "pristine.db")
    store, full = LedgerStore(url), LedgerStore(grid.url)
    chunk = export_blocks(full, *missing_ranges(store)[0])
    store.close()
    full.close()
    return url, chunk


def refused(url: str, data: bytes) -> BlockSyncError:
    before = dump(url, with_ids=True)
    store = LedgerStore(url)
    with pytest.raises(BlockSyncError) as err:
        import_blocks(store, data)
    store.close()
    assert dump(url, with_ids=True) == before, "a refused chunk changed the ledger"
    return err.value


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_a_tampered_chunk_is_refused_and_changes_nothing(gapped_pristine, name: str) -> None:
    url, chunk = gapped_pristine
    change, reason, words = TAMPERS[name]
    err = refused(url, reencode(chunk, change))
    assert err.reason == reason, err
    assert words in str(err)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("float", lambda c: c.replace(b'"tx_count":', b'"tx_count":1.0,"x":', 1)),
        ("spacing", lambda c: c.replace(b'":', b'": ', 1)),
        ("bool_for_int", lambda c: reencode(c, lambda d: d["blocks"][0].update(tx_count=True))),
        ("str_for_int", lambda c: reencode(c, lambda d: d["blocks"][0].update(slot="7"))),
        ("missing", lambda c: reencode(c, lambda d: d["blocks"][0].pop("hash"))),
        ("no_blocks", lambda c: reencode(c, lambda d: d.update(blocks=[]))),
        ("prefix", lambda c: b"microgrid/batch/v1\n" + c.split(b"\n", 1)[1]),
        ("truncated", lambda c: c[:-10]),
        ("huge_int", lambda c: reencode(c, lambda d: d["blocks"][0].update(tx_count=2**64))),
        ("not_bytes", lambda c: c.decode()),
    ],
)
def test_a_malformed_chunk_is_refused_and_changes_nothing(gapped_pristine, name, data) -> None:
    url, chunk = gapped_pristine
    err = refused(url, data(chunk))
    assert err.reason == "malformed", err


def test_a_chunk_not_starting_at_the_gap_is_refused(grid: Grid, gapped_pristine) -> None:
    url, _ = gapped_pristine
    store, full = LedgerStore(url), LedgerStore(grid.url)
    a, b = missing_ranges(store)[0]
    late = export_blocks(full, a + 1, b)
    early = export_blocks(full, a - 1, b)
    store.close()
    full.close()
    for data in (late, early):
        err = refused(url, data)
        assert err.reason == "not_requested" and f"first missing block is {a}" in str(err)


def test_a_chunk_reaching_past_the_gap_is_refused(grid: Grid) -> None:
    url = grid.gapped("short_gap.db", [(grid.index_at(90), grid.index_at(110))])
    full = LedgerStore(grid.url)
    beyond = export_blocks(full, 91, 115)
    full.close()
    err = refused(url, beyond)
    assert err.reason == "not_requested" and "past the gap 91..110" in str(err)


def test_a_chunk_from_another_grid_is_refused(tmp_path: Path, gapped_pristine) -> None:
    url, _ = gapped_pristine
    other = f"sqlite:///{tmp_path / 'other.db'}"
    market_sim.run(households=3, slots=12, seed=99, db=other)
    store = LedgerStore(other)
    data = export_blocks(store, 1, 12)
    store.close()
    assert refused(url, data).reason == "wrong_grid"


def forked(grid: Grid, tmp: Path, height: int) -> str:
    """The same grid's log with one reading left out of the settlement of block ``height``."""
    entries = list(grid.entries)
    settle = next(i for i in sorted(grid.heights) if grid.heights[i] == height) - 1
    k = next(
        j
        for j in range(settle, 0, -1)
        if b'"type":"reading"' in entries[j][1] and len(decode_batch(entries[j][1])) > 1
    )
    commands = decode_batch(entries[k][1])
    drop = next(i for i, c in enumerate(commands) if getattr(c, "type", "") == "reading")
    entries[k] = (entries[k][0], encode_batch(commands[:drop] + commands[drop + 1 :]))
    url = f"sqlite:///{tmp / 'fork.db'}"
    store = LedgerStore(url)
    replica = Replica(grid.config, store)
    for index, data in entries:
        replica.apply_entry(index, data)
    store.close()
    return url


def test_a_chunk_from_a_forked_ledger_is_refused_even_before_the_gap_closes(
    grid: Grid, gapped_pristine, tmp_path: Path
) -> None:
    """The fork differs only from block 30 on, well inside the first chunk's link: the chunk's
    first blocks are the grid's, yet nothing lands, because it does not chain to the anchor."""
    url, _ = gapped_pristine
    fork = forked(grid, tmp_path, 30)
    assert verify_ledger(fork).ok
    src, dst = LedgerStore(fork), LedgerStore(url)
    a, b = missing_ranges(dst)[0]
    data = export_blocks(src, a, b)
    src.close()
    dst.close()
    assert decode_chunk(data).blocks[-1].height < b  # not the closing chunk
    err = refused(url, data)
    assert err.reason == "bad_chain" and "forked or forged" in str(err), err


def test_an_empty_ledger_gap_at_height_one_fills(grid: Grid) -> None:
    """A node that installed a snapshot before writing any block."""
    url = grid.gapped("from_one.db", [(0, grid.index_at(70))])
    store = LedgerStore(url)
    assert missing_ranges(store) == [(1, 70)]
    store.close()
    fill(grid.url, url)
    assert_same_ledger(grid.url, url)


def gate_only(grid: Grid, name: str) -> str:
    """A ledger that skipped, by snapshot, only a gate closure whose slot had not settled."""
    index = grid.index_at(90)  # a gate is ahead here
    k = max(i for i in grid.heights if grid.heights[i] == 90 and not grid.ahead[i] and i < index)
    return grid.gapped(name, [(k, index)])


def test_a_snapshot_without_missing_blocks_keeps_the_ledger_whole(grid: Grid) -> None:
    """Only a gate closure was skipped: no gap; its clearing, book and trades come with the
    snapshot, so the ledger equals the full one and can serve every block."""
    url = gate_only(grid, "gate_only.db")
    store = LedgerStore(url)
    assert missing_ranges(store) == []
    store.close()
    assert_same_ledger(grid.url, url)
    third = one_gap(grid, "from_gate_only.db", height=110)
    fill(url, third)
    assert_same_ledger(grid.url, third)


def test_a_snapshot_from_before_closed_books_still_brings_the_trades(grid: Grid) -> None:
    """An older snapshot has no ``closed_books``: the skipped gate's trades are still written
    (its block verifies), its orders and clearing rows are not."""
    index = grid.index_at(90)
    original = grid.snapshots[index]
    body = json.loads(original.split(b"\n", 1)[1])
    (skipped,) = [int(s) for s, book in body.pop("closed_books").items() if book]
    grid.snapshots[index] = canonical_bytes("snapshot", body)
    try:
        url = gate_only(grid, "old_snapshot.db")
    finally:
        grid.snapshots[index] = original
    report = verify_ledger(url)
    assert report.ok, report.error
    assert report.head_hash == verify_ledger(grid.url).head_hash
    full, old = dump(grid.url, with_ids=False), dump(url, with_ids=False)
    assert full["trades"] == old["trades"]
    assert old["clearings"] == [r for r in full["clearings"] if r[0] != skipped]
    assert old["orders"] == [r for r in full["orders"] if r[0] != skipped]
    assert len(old["orders"]) < len(full["orders"])


def test_a_gap_recorded_without_anchors_anchors_on_the_block_after_it(grid: Grid) -> None:
    """Ledgers from before ``block_sync_head``: only ``block_sync_needed`` names the gap."""
    url = one_gap(grid, "legacy.db", height=90)
    with sqlite3.connect(url.split(":///", 1)[1]) as conn:
        conn.execute("DELETE FROM meta WHERE key IN ('block_sync_head', 'block_sync_gates')")
    fill(grid.url, url)
    report = verify_ledger(url)
    assert report.ok, report.error
    assert report.head_hash == verify_ledger(grid.url).head_hash


def test_a_restart_right_after_a_snapshot_recovers_against_the_snapshot_head(
    tmp_path: Path, grid: Grid
) -> None:
    """A node that installed a snapshot and stopped before writing any block after the gap
    restarts: the engine head is checked against the snapshot head the gap chains into (not
    the ledger's top block, below the gap); a wrong snapshot head is still a fork."""
    index = grid.index_at(70)
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    store = LedgerStore(url)
    replica = Replica(grid.config, store)
    for i, data in grid.entries[: grid.index_at(8)]:
        replica.apply_entry(i, data)
    replica.install_snapshot(index, grid.snapshots[index])
    head = replica.state.head_hash
    assert missing_ranges(store)[-1][1] == replica.state.height
    snapshot = (index, grid.snapshots[index])
    again = Replica.recover(grid.config, store, snapshot, [])
    assert again.state.head_hash == head and again.applied_index == index
    store.set_meta("block_sync_head", "0" * 64)
    with pytest.raises(ReplicaError, match="forked"):
        Replica.recover(grid.config, store, snapshot, [])
    store.close()
