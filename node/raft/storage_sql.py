"""``SQLStorage``: durable Raft storage on SQLAlchemy (SQLite by default, PostgreSQL too).

The only module of ``node.raft`` that does I/O. Entries, hard state and the latest
snapshot live in three tables; every row carries a checksum. Reads are served from an
in-memory mirror (a ``MemoryStorage``) loaded and verified at open, the way etcd pairs its
WAL with a MemoryStorage. Writes go to the database first, in one transaction per Ready
(``save_ready`` or ``with storage.batch(): ...``), then to the mirror.

On SQLite the database runs in WAL mode with ``synchronous=FULL``: a transaction is on disk
when ``commit`` returns, so a Ready's messages may be sent right after ``save_ready``.

Recovery at open: a corrupt *last* entry row (a torn tail: the write never completed, so it
was never acknowledged) is discarded, provided it lies beyond the persisted commit index;
any other corruption (a bad checksum earlier in the log, a gap, a bad hard state or
snapshot row, a torn entry at or below the commit index) raises ``StorageCorruption`` and
the node must not start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)

from node.raft.errors import SnapshotOutOfDate, StorageCorruption, StorageError
from node.raft.storage import MemoryStorage
from node.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Ready,
    Snapshot,
    SnapshotMetadata,
)

SCHEMA_VERSION = "1"

metadata = MetaData()

raft_meta = Table(
    "raft_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

raft_entries = Table(
    "raft_entries",
    metadata,
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("term", BigInteger, nullable=False),
    Column("type", SmallInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("checksum", String(16), nullable=False),
)

raft_hard_state = Table(
    "raft_hard_state",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("term", BigInteger, nullable=False),
    Column("vote", String(255), nullable=False),
    Column("commit_index", BigInteger, nullable=False),
    Column("checksum", String(16), nullable=False),
)

raft_snapshot = Table(
    "raft_snapshot",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("idx", BigInteger, nullable=False),
    Column("term", BigInteger, nullable=False),
    Column("voters", Text, nullable=False),
    Column("learners", Text, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("checksum", String(16), nullable=False),
)


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()


def entry_checksum(index: int, term: int, type_: int, data: bytes) -> str:
    """Checksum of one entry row."""
    return _digest(index.to_bytes(8, "big"), term.to_bytes(8, "big"), bytes([type_]), data)


def hard_state_checksum(hs: HardState) -> str:
    """Checksum of the hard state row."""
    return _digest(hs.term.to_bytes(8, "big"), hs.vote.encode(), hs.commit.to_bytes(8, "big"))


def _ids_text(ids: tuple[str, ...]) -> str:
    return "\n".join(sorted(ids))


def _text_ids(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split("\n") if t)


def snapshot_checksum(index: int, term: int, voters: str, learners: str, data: bytes) -> str:
    """Checksum of the snapshot row."""
    return _digest(
        index.to_bytes(8, "big"), term.to_bytes(8, "big"), voters.encode(), learners.encode(), data
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA cache_size=-1024")  # 1 MiB, not 2: reads come from the in-memory mirror
    cur.close()


class SQLStorage:
    """Durable ``Storage``. ``url`` is a SQLAlchemy URL, e.g. ``sqlite:///node1-raft.db``."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        if engine is None:
            engine = create_engine(url, future=True)
        self.engine = engine
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        self._mem = MemoryStorage()
        self._conn: Connection | None = None
        self._lazy_commit = False
        """The mirror's hard state differs from the stored one only in a higher commit index,
        not written yet (:meth:`save_ready`)."""
        self.torn_tail_discarded: int | None = None
        """Index of a torn last entry discarded at open, for metrics (None if none)."""
        try:
            metadata.create_all(engine)
            with engine.begin() as conn:
                self._check_schema(conn)
                self._load(conn)
        except StorageCorruption:
            raise
        except Exception as exc:
            raise StorageError(f"cannot open raft storage: {exc}") from exc

    def close(self) -> None:
        """Write a commit index held back by :meth:`save_ready`, release the connections."""
        try:
            if self._lazy_commit:
                self.set_hard_state(self._mem.hard_state)
        finally:
            self.engine.dispose()

    # -- open and verify -------------------------------------------------------------------
    def _check_schema(self, conn: Connection) -> None:
        row = conn.execute(
            select(raft_meta.c.value).where(raft_meta.c.key == "schema_version")
        ).first()
        if row is None:
            conn.execute(insert(raft_meta).values(key="schema_version", value=SCHEMA_VERSION))
        elif row[0] != SCHEMA_VERSION:
            raise StorageError(f"raft storage schema {row[0]}, expected {SCHEMA_VERSION}")

    def _load(self, conn: Connection) -> None:
        hs = HardState()
        row = conn.execute(select(raft_hard_state)).first()
        if row is not None:
            hs = HardState(int(row.term), str(row.vote), int(row.commit_index))
            if hard_state_checksum(hs) != row.checksum:
                raise StorageCorruption("hard state row fails its checksum")
        snap = Snapshot()
        srow = conn.execute(select(raft_snapshot)).first()
        if srow is not None:
            data = bytes(srow.data)
            if (
                snapshot_checksum(int(srow.idx), int(srow.term), srow.voters, srow.learners, data)
                != srow.checksum
            ):
                raise StorageCorruption("snapshot row fails its checksum")
            meta = SnapshotMetadata(
                int(srow.idx),
                int(srow.term),
                ConfState(_text_ids(srow.voters), _text_ids(srow.learners)),
            )
            snap = Snapshot(meta, data)
        rows = conn.execute(select(raft_entries).order_by(raft_entries.c.idx)).all()
        entries: list[Entry] = []
        expected = snap.metadata.index + 1
        for pos, r in enumerate(rows):
            idx, term, type_, data = int(r.idx), int(r.term), int(r.type), bytes(r.data)
            if idx <= snap.metadata.index:
                continue  # left over from a compaction that raced a crash: harmless
            last = pos == len(rows) - 1
            ok = entry_checksum(idx, term, type_, data) == r.checksum and type_ in (0, 1)
            if not ok:
                if last and idx > hs.commit:
                    conn.execute(delete(raft_entries).where(raft_entries.c.idx == idx))
                    self.torn_tail_discarded = idx
                    break
                raise StorageCorruption(
                    f"raft entry {idx} fails its checksum "
                    f"({'at or below commit ' + str(hs.commit) if last else 'not the last entry'})"
                )
            if idx != expected:
                raise StorageCorruption(f"raft log has a gap: expected entry {expected}, got {idx}")
            entries.append(Entry(idx, term, data, EntryType(type_)))
            expected += 1
        last_index = entries[-1].index if entries else snap.metadata.index
        if hs.commit > last_index:
            raise StorageCorruption(
                f"hard state commit {hs.commit} beyond the last stored entry {last_index}"
            )
        if not snap.is_empty():
            self._mem.apply_snapshot(snap)
        self._mem.append(entries)
        self._mem.set_hard_state(hs)

    # -- transactions ----------------------------------------------------------------------
    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group several writes into one transaction (nested calls join it)."""
        if self._conn is not None:
            yield
            return
        cp = self._mem.checkpoint()
        try:
            with self.engine.begin() as conn:
                self._conn = conn
                yield
        except BaseException:
            self._mem.rollback(cp)  # the transaction rolled back: so does the mirror
            raise
        finally:
            self._conn = None

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        if self._conn is not None:
            yield self._conn
        else:
            with self.engine.begin() as conn:
                yield conn

    def save_ready(self, rd: Ready) -> None:
        """Persist a Ready's snapshot, entries and hard state in one transaction.

        A Ready whose only change is a higher commit index writes nothing (etcd's
        ``MustSync``): the commit index need not be durable (after a restart the node learns
        it again from the leader, and a sole voter commits its log with its first entry of the
        new term), and writing it alone cost an fsync per commit, one at every settlement on
        every node. It is written with the next transaction that persists anything, and at
        :meth:`close`; reads see it at once."""
        hs = rd.hard_state
        stored = self._mem.hard_state
        if (
            rd.snapshot is None
            and not rd.entries
            and hs is not None
            and (hs.term, hs.vote) == (stored.term, stored.vote)
            and hs.commit >= stored.commit
        ):
            self._mem.set_hard_state(hs)
            self._lazy_commit = True
            return
        with self.batch():
            if rd.snapshot is not None:
                self.apply_snapshot(rd.snapshot)
            if rd.entries:
                self.append(rd.entries)
            if hs is not None:
                self.set_hard_state(hs)
            elif self._lazy_commit:
                self.set_hard_state(self._mem.hard_state)
        self._lazy_commit = False

    # -- Storage reads (from the verified mirror) ------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState | None]:
        """See ``Storage.initial_state``."""
        return self._mem.initial_state()

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """See ``Storage.entries``."""
        return self._mem.entries(lo, hi, max_size)

    def term(self, index: int) -> int:
        """See ``Storage.term``."""
        return self._mem.term(index)

    def first_index(self) -> int:
        """See ``Storage.first_index``."""
        return self._mem.first_index()

    def last_index(self) -> int:
        """See ``Storage.last_index``."""
        return self._mem.last_index()

    def snapshot(self) -> Snapshot:
        """See ``Storage.snapshot``."""
        return self._mem.snapshot()

    @property
    def hard_state(self) -> HardState:
        """The persisted hard state."""
        return self._mem.hard_state

    # -- Storage writes --------------------------------------------------------------------
    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Persist entries, replacing any conflicting suffix."""
        if not entries:
            return
        first = self._mem.first_index()
        ents = [e for e in entries if e.index >= first]
        if not ents:
            return
        if ents[0].index > self._mem.last_index() + 1:
            raise StorageError(f"append at {ents[0].index} leaves a gap after {self.last_index()}")
        with self._tx() as conn:
            conn.execute(delete(raft_entries).where(raft_entries.c.idx >= ents[0].index))
            conn.execute(
                insert(raft_entries),
                [
                    {
                        "idx": e.index,
                        "term": e.term,
                        "type": int(e.type),
                        "data": e.data,
                        "checksum": entry_checksum(e.index, e.term, int(e.type), e.data),
                    }
                    for e in ents
                ],
            )
        self._mem.append(ents)

    def set_hard_state(self, hs: HardState) -> None:
        """Persist the hard state."""
        values = {
            "term": hs.term,
            "vote": hs.vote,
            "commit_index": hs.commit,
            "checksum": hard_state_checksum(hs),
        }
        with self._tx() as conn:
            res = conn.execute(update(raft_hard_state).where(raft_hard_state.c.id == 1), values)
            if res.rowcount == 0:
                conn.execute(insert(raft_hard_state).values(id=1, **values))
        self._mem.set_hard_state(hs)

    def _write_snapshot(self, conn: Connection, snap: Snapshot) -> None:
        m = snap.metadata
        voters, learners = _ids_text(m.conf_state.voters), _ids_text(m.conf_state.learners)
        values = {
            "idx": m.index,
            "term": m.term,
            "voters": voters,
            "learners": learners,
            "data": snap.data,
            "checksum": snapshot_checksum(m.index, m.term, voters, learners, snap.data),
        }
        res = conn.execute(update(raft_snapshot).where(raft_snapshot.c.id == 1), values)
        if res.rowcount == 0:
            conn.execute(insert(raft_snapshot).values(id=1, **values))

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the log with a snapshot received from the leader."""
        if snap.metadata.index <= self._mem.snapshot().metadata.index:
            raise SnapshotOutOfDate(f"snapshot {snap.metadata.index} is not newer")
        with self._tx() as conn:
            self._write_snapshot(conn, snap)
            conn.execute(delete(raft_entries))
        self._mem.apply_snapshot(snap)

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record the application's snapshot at ``index`` (see ``MemoryStorage``)."""
        if index <= self._mem.snapshot().metadata.index:
            raise SnapshotOutOfDate(f"snapshot {index} is not newer")
        meta = SnapshotMetadata(index, self._mem.term(index), conf_state)
        snap = Snapshot(meta, data)
        with self._tx() as conn:
            self._write_snapshot(conn, snap)
        return self._mem.create_snapshot(index, conf_state, data)

    def compact(self, index: int) -> None:
        """Drop entries up to and including ``index``."""
        if index > self._mem.snapshot().metadata.index:
            raise StorageError(f"compact {index} beyond the snapshot: create it first")
        with self._tx() as conn:
            conn.execute(delete(raft_entries).where(raft_entries.c.idx <= index))
        self._mem.compact(index)

    def persist_compaction(self, snap: Snapshot) -> None:
        """Durable half of a compaction: write ``snap`` and drop the entries it covers, in one
        transaction. Reads and writes only the database, never the in-memory mirror the Raft
        core reads, so it may run in a worker thread while the core's owner waits;
        :meth:`adopt_compaction` then updates the mirror. Entries at or below a stored snapshot
        are skipped at open, so a crash between the two halves loses nothing."""
        with self.engine.begin() as conn:  # its own transaction: never joins another thread's
            self._write_snapshot(conn, snap)
            conn.execute(delete(raft_entries).where(raft_entries.c.idx <= snap.metadata.index))

    def adopt_compaction(self, snap: Snapshot) -> None:
        """In-memory half of a compaction persisted by :meth:`persist_compaction`: the mirror
        takes the snapshot and drops the entries it covers (the core's thread)."""
        m = snap.metadata
        self._mem.create_snapshot(m.index, m.conf_state, snap.data)
        self._mem.compact(m.index)
