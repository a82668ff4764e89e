"""SQLStorage: durability, one transaction per Ready, checksums, torn-tail recovery."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from node.raft import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    Ready,
    Snapshot,
    SnapshotMetadata,
    StorageCorruption,
)
from node.raft.storage_sql import SQLStorage
from node.testing.raft_simulation import RaftSimulation
from tests.raft.helpers import for_seeds


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _ready(entries: list[Entry], hs: HardState | None) -> Ready:
    return Ready(None, hs, tuple(entries), None, (), ())


def _fill(st: SQLStorage, n: int, commit: int) -> None:
    st.save_ready(_ready([Entry(i, 1 + i // 4, b"e%d" % i) for i in range(1, n + 1)], None))
    st.save_ready(_ready([], HardState(term=9, vote="n2", commit=commit)))


def test_roundtrip_and_reopen(tmp_path: Path) -> None:
    """What was saved comes back identical after reopening the file."""
    url = _url(tmp_path / "r.db")
    st = SQLStorage(url)
    _fill(st, 10, commit=6)
    st.save_ready(_ready([Entry(8, 7, b"x"), Entry(9, 7, b"y")], None))  # truncates 8..10
    st.create_snapshot(5, ConfState(("n1", "n2", "n3"), ("n4",)), b"app-state")
    st.compact(5)
    st.close()
    st2 = SQLStorage(url)
    assert st2.initial_state() == (
        HardState(9, "n2", 6),
        ConfState(("n1", "n2", "n3"), ("n4",)),
    )
    assert (st2.first_index(), st2.last_index()) == (6, 9)
    assert [e.data for e in st2.entries(6, 10)] == [b"e6", b"e7", b"x", b"y"]
    assert st2.term(5) == st.term(5) and st2.snapshot().data == b"app-state"


def test_matches_memory_storage_behaviour(tmp_path: Path) -> None:
    """SQLStorage and MemoryStorage agree on the same sequence of writes."""
    sql, mem = SQLStorage(_url(tmp_path / "m.db")), MemoryStorage()
    for st in (sql, mem):
        st.append([Entry(i, 1, b"%d" % i) for i in range(1, 6)])
        st.append([Entry(4, 2, b"z", EntryType.CONF_CHANGE)])
        st.set_hard_state(HardState(2, "a", 3))
    assert sql.entries(1, 5) == mem.entries(1, 5)
    assert sql.initial_state() == mem.initial_state()


def test_sqlite_runs_wal_with_synchronous_full(tmp_path: Path) -> None:
    """The durability settings the design demands are in force on every connection."""
    st = SQLStorage(_url(tmp_path / "p.db"))
    with st.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def _corrupt(path: Path, idx: int) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE raft_entries SET data = x'00' WHERE idx = ?", (idx,))


def test_torn_last_entry_beyond_commit_is_discarded(tmp_path: Path) -> None:
    """A half-written last record (never acknowledged) is dropped at open."""
    path = tmp_path / "t.db"
    _fill(SQLStorage(_url(path)), 10, commit=6)
    _corrupt(path, 10)
    st = SQLStorage(_url(path))
    assert st.last_index() == 9 and st.torn_tail_discarded == 10
    assert SQLStorage(_url(path)).last_index() == 9  # and the discard was persisted


def test_corruption_before_the_tail_stops_the_node(tmp_path: Path) -> None:
    """A bad checksum on any earlier entry raises StorageCorruption: nothing acknowledged
    is silently dropped."""
    path = tmp_path / "c.db"
    _fill(SQLStorage(_url(path)), 10, commit=6)
    _corrupt(path, 4)
    with pytest.raises(StorageCorruption, match="entry 4"):
        SQLStorage(_url(path))


def test_torn_last_entry_at_or_below_commit_stops_the_node(tmp_path: Path) -> None:
    """A corrupt last entry that the hard state says is committed is not a torn write."""
    path = tmp_path / "k.db"
    _fill(SQLStorage(_url(path)), 6, commit=6)
    _corrupt(path, 6)
    with pytest.raises(StorageCorruption):
        SQLStorage(_url(path))


def test_gap_and_bad_hard_state_are_corruption(tmp_path: Path) -> None:
    """A missing entry in the middle, or a tampered hard state, stop the node."""
    path = tmp_path / "g.db"
    _fill(SQLStorage(_url(path)), 10, commit=6)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM raft_entries WHERE idx = 3")
    with pytest.raises(StorageCorruption, match="gap"):
        SQLStorage(_url(path))
    path2 = tmp_path / "h.db"
    _fill(SQLStorage(_url(path2)), 10, commit=6)
    with sqlite3.connect(path2) as db:
        db.execute("UPDATE raft_hard_state SET vote = 'n3'")
    with pytest.raises(StorageCorruption, match="hard state"):
        SQLStorage(_url(path2))


def test_one_transaction_per_ready(tmp_path: Path) -> None:
    """A Ready whose write fails leaves nothing of it behind (entries and hard state)."""
    st = SQLStorage(_url(tmp_path / "x.db"))
    _fill(st, 3, commit=2)
    bad = _ready([Entry(4, 5, b"ok"), Entry(5, 5, None)], HardState(10, "n1", 3))  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the transaction
        st.save_ready(bad)
    assert st.last_index() == 3 and st.initial_state()[0] == HardState(9, "n2", 2)
    st2 = SQLStorage(_url(tmp_path / "x.db"))
    assert st2.last_index() == 3 and st2.initial_state()[0] == HardState(9, "n2", 2)


def _stored_commit(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT commit_index FROM raft_hard_state").fetchone()[0])


def test_a_ready_that_only_moves_the_commit_index_writes_nothing(tmp_path: Path) -> None:
    """etcd's MustSync: a higher commit index alone is not written (no fsync per commit);
    reads see it at once, and it is written with the next Ready that persists anything
    (entries, term, vote, snapshot) or at close. A restart before that resumes from the last
    written commit index, which the leader then raises again."""
    path = tmp_path / "m.db"
    st = SQLStorage(_url(path))
    _fill(st, 5, commit=2)
    st.save_ready(_ready([], HardState(9, "n2", 4)))
    assert st.initial_state()[0].commit == 4 and _stored_commit(path) == 2
    assert SQLStorage(_url(path)).initial_state()[0].commit == 2  # a crash now: back to 2
    st.save_ready(_ready([Entry(6, 9, b"e6")], None))  # entries: the held commit goes too
    assert _stored_commit(path) == 4
    st.save_ready(_ready([], HardState(9, "n2", 5)))
    assert _stored_commit(path) == 4
    st.close()
    assert _stored_commit(path) == 5
    st.save_ready(_ready([], HardState(10, "", 5)))  # a new term is written at once
    assert SQLStorage(_url(path)).initial_state()[0] == HardState(10, "", 5)


def test_simulated_cluster_on_sqlite_survives_restarts(tmp_path: Path, seed_count: int) -> None:
    """A 3-node group on SQLite files, crashed and reopened from disk, stays safe."""

    def scenario(seed: int) -> None:
        d = tmp_path / f"s{seed}"
        d.mkdir()

        def factory(nid: str) -> SQLStorage:
            return SQLStorage(_url(d / f"{nid}.db"))

        sim = RaftSimulation(3, seed, storage_factory=factory, snapshot_threshold=10)
        sim.wait_leader()
        for i in range(25):
            sim.propose()
            sim.run(1)
            if i % 8 == 7:
                victim = sim.rng.choice(sim.ids)
                sim.crash(victim)
                sim.storages[victim] = factory(victim)  # reopen from the file
                sim.restart(victim)
        sim.converge()

    for_seeds(max(2, seed_count // 10), scenario)


def test_crash_between_snapshot_and_compaction(tmp_path: Path) -> None:
    """A snapshot row written without the compaction that should follow (a crash between
    the two) reopens as if compacted: entries up to the snapshot are ignored."""
    url = _url(tmp_path / "s.db")
    st = SQLStorage(url)
    _fill(st, 10, commit=8)
    st.create_snapshot(6, ConfState(("n1",)), b"s")  # no compact(): simulated crash
    st.close()
    st2 = SQLStorage(url)
    assert (st2.first_index(), st2.last_index()) == (7, 10)
    assert st2.snapshot().metadata.index == 6 and st2.term(6) == st.term(6)


def _state(st: MemoryStorage | SQLStorage) -> tuple[object, ...]:
    first, last = st.first_index(), st.last_index()
    ents = st.entries(first, last + 1) if last >= first else []
    return (st.initial_state(), st.snapshot(), first, last, tuple(ents))


def test_random_operations_match_memory_storage_across_reopens(
    tmp_path: Path, seed_count: int
) -> None:
    """Seeded random writes (appends with truncation, hard states, snapshots, compaction,
    snapshot installs) on SQLStorage, reopened from disk at random points, always match
    the same writes on MemoryStorage."""
    def scenario(seed: int) -> None:
        rng = random.Random(seed)
        url = _url(tmp_path / f"rand{seed}.db")
        sql, mem = SQLStorage(url), MemoryStorage()
        term = 1
        for _ in range(40):
            op = rng.randrange(10)
            if op < 5:
                lo = max(mem.first_index(), mem.last_index() + 1 - rng.randint(0, 3))
                term += rng.randrange(2)
                ents = [Entry(lo + k, term, b"%d" % rng.randrange(99)) for k in range(5)]
                for st in (sql, mem):
                    st.append(ents)
            elif op < 7:
                hs = HardState(term, rng.choice(["", "n1", "n2"]), mem.first_index() - 1)
                for st in (sql, mem):
                    st.set_hard_state(hs)
            elif op < 8 and mem.last_index() > mem.snapshot().metadata.index:
                idx = rng.randint(mem.snapshot().metadata.index + 1, mem.last_index())
                for st in (sql, mem):
                    st.create_snapshot(idx, ConfState(("n1", "n2")), b"s%d" % idx)
                    st.compact(idx)
            elif op < 9:
                idx = mem.last_index() + rng.randint(1, 5)
                term += 1
                snap = Snapshot(SnapshotMetadata(idx, term, ConfState(("n1",), ("n9",))), b"x")
                for st in (sql, mem):
                    st.apply_snapshot(snap)
            else:
                sql.close()
                sql = SQLStorage(url)
            assert _state(sql) == _state(mem)
        sql.close()

    for_seeds(max(2, seed_count // 4), scenario)
