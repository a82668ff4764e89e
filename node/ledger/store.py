"""Persisting the contract engine's events: one database transaction per batch of events.

A node applies a committed log entry to the engine and hands the resulting events, with the
entry's log index, to :meth:`LedgerStore.record`: blocks, their transactions and postings,
balances, orders, trades, readings, settlements, true-ups, the feeder check, the accepted
governance records and the applied index land together or not at all, so a restart neither loses
nor re-applies an entry and nothing half-written reaches the ledger. The replica calls
:meth:`LedgerStore.record_entry`: an entry whose events write no row (a batch of orders or
readings) commits nothing, and its index goes with the next transaction (an fsync saved each).

Opening a SQLite ledger checks the file (docs/ledger.md, "Damage inside the file"): a torn file
is refused at once (:func:`sqlite_file_fault`); after an unclean stop (no clean-shutdown marker,
or a file changed since the marker was written) ``PRAGMA quick_check`` reads every page; the
newest rows of every table and the hash links of the newest blocks are read at every open. A
damaged file raises :class:`LedgerCorruptError` with one line: what, which file, how to resync.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, event, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DatabaseError, OperationalError, SQLAlchemyError

from market.events import (
    Event,
    GateClosed,
    GovernanceAccepted,
    HouseholdRegistered,
    SlotSettled,
)
from market.feeder import FeederCheck
from market.models import AddMember, ChangeRole, ReplaceMeter, RotateKey, Trade
from market.schedule import Schedule
from market.settlement import HouseholdSettlement
from market.state import MarketConfig
from node.ledger import schema as t
from node.ledger.governance import governance_row
from node.ledger.rows import (
    BalanceOverflowError,
    apply_balance_deltas,
    insert_rows,
    insert_transactions,
    read_meta,
    steps_column,
)

SCHEDULE_KEY = "schedule"
"""Meta entry holding the grid's wall-clock schedule (the genesis timings) as JSON."""


def schedule_json(schedule: Schedule) -> str:
    """The ``schedule`` meta value: the genesis names of the three timings, canonical JSON."""
    return json.dumps(
        {
            "slot_seconds": schedule.slot_seconds,
            "gate_closure_lead_seconds": schedule.gate_lead_seconds,
            "settle_delay_seconds": schedule.settle_delay_seconds,
        },
        sort_keys=True,
    )


class LedgerStoreError(RuntimeError):
    """The ledger database cannot be used as asked (wrong grid, failed write, ...)."""


LEDGER_RESYNC_ADVICE = (
    "move the ledger aside (for SQLite, the file with its -wal and -shm files; keep them for "
    "inspection) and restart the node: it rebuilds the ledger from its Raft log and fetches the "
    "blocks it lacks from its peers"
)
"""What an operator does about a ledger the node refuses to open."""


class LedgerCorruptError(LedgerStoreError):
    """The ledger file is damaged (torn, or a page inside it fails SQLite's checks or our tail
    check): the node must not use it. ``path`` is the file, ``detail`` what was found."""

    def __init__(self, path: Path | str, detail: str) -> None:
        what = detail if detail.startswith(str(path)) else f"{path}: {detail}"
        super().__init__(f"refusing the ledger: {what}; {LEDGER_RESYNC_ADVICE}")
        self.path = str(path)
        self.detail = detail


CLEAN_MARKER_SUFFIX = ".clean"
"""``<ledger file>.clean``: written by a clean close (with the file's size and mtime), removed
at open; its absence at open means the last stop was not clean."""
CLEAN_MARKER_MAX_BYTES = 4096
TAIL_ROWS = 256
"""Newest rows of each table read at every open."""
TAIL_BLOCKS = 64
"""Newest blocks whose hash links are checked at every open."""


@dataclass(frozen=True, slots=True)
class OpenCheck:
    """What :class:`LedgerStore` checked when it opened a SQLite file."""

    clean: bool
    """The last close was clean (its marker matched the file)."""
    reason: str
    """Why the full check ran or did not (``clean shutdown``, ``no clean-shutdown marker``,
    ``changed since its clean shutdown``, ``new ledger``)."""
    quick_check_seconds: float | None
    """Time of ``PRAGMA quick_check`` (None: not run)."""
    tail_seconds: float
    """Time of the tail check (run at every open)."""


def clean_marker_path(path: Path) -> Path:
    """The clean-shutdown marker of the ledger file ``path``."""
    return path.with_name(path.name + CLEAN_MARKER_SUFFIX)


def _file_stamp(path: Path) -> dict[str, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _wal_has_frames(path: Path) -> bool:
    wal = path.with_name(path.name + "-wal")
    try:
        return wal.stat().st_size > 0
    except FileNotFoundError:
        return False


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def consume_clean_marker(path: Path) -> tuple[bool, str]:
    """Whether the ledger file's last close was clean, and why; removes the marker (durably), so
    a crash from now on leaves none. Clean means: the marker exists, is ours (bounded, valid
    JSON) and records the file's current size and mtime, and no write-ahead log holds frames."""
    marker = clean_marker_path(path)
    try:
        with marker.open("rb") as f:
            raw = f.read(CLEAN_MARKER_MAX_BYTES + 1)
    except FileNotFoundError:
        return False, "no clean-shutdown marker"
    except OSError as exc:
        raw, reason = b"", f"unreadable clean-shutdown marker ({exc.strerror})"
    else:
        reason = ""
    try:
        marker.unlink()
        _fsync_dir(marker.parent)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise LedgerStoreError(
            f"cannot remove the clean-shutdown marker {marker}: {exc.strerror}"
        ) from exc
    if reason:
        return False, reason
    try:
        doc = json.loads(raw) if len(raw) <= CLEAN_MARKER_MAX_BYTES else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        return False, "malformed clean-shutdown marker"
    stamp = _file_stamp(path)
    if stamp is None or any(doc.get(k) != v for k, v in stamp.items()):
        return False, "changed since its clean shutdown"
    if _wal_has_frames(path):
        return False, "write-ahead log not checkpointed"
    return True, "clean shutdown"


def write_clean_marker(path: Path) -> bool:
    """Record a clean close of the ledger file ``path`` (its size and mtime), atomically and
    durably; not when a write-ahead log still holds frames (another connection is open).
    True if written."""
    stamp = _file_stamp(path)
    if stamp is None or stamp["size"] == 0 or _wal_has_frames(path):
        return False
    marker = clean_marker_path(path)
    tmp = marker.with_name(marker.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(json.dumps({"v": 1, **stamp}, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
        _fsync_dir(marker.parent)
    except OSError:
        return False
    return True


def _quick_check(conn: Connection) -> str | None:
    """``PRAGMA quick_check``'s first finding, or None if the file passed."""
    rows = conn.exec_driver_sql("PRAGMA quick_check(5)").fetchall()
    found = [str(r[0]) for r in rows if str(r[0]) != "ok"]
    return "; ".join(found)[:300] if found else None


def _tail_fault(conn: Connection) -> str | None:
    """Read the newest rows of every ledger table and check the newest blocks' hash links
    (heights present on both sides of a link only: block sync may leave gaps)."""
    for table in t.metadata.sorted_tables:
        try:
            conn.exec_driver_sql(
                f'SELECT * FROM "{table.name}" ORDER BY rowid DESC LIMIT {TAIL_ROWS}'
            ).fetchall()
        except OperationalError as exc:
            if "no such" in str(exc.orig):  # a table without rowid or not there
                continue
            raise
    b = t.blocks.c
    rows = conn.execute(
        select(b.height, b.hash, b.prev_hash).order_by(b.height.desc()).limit(TAIL_BLOCKS)
    ).all()
    for newer, older in itertools.pairwise(rows):
        if newer.height == older.height + 1 and newer.prev_hash != older.hash:
            return (
                f"block {newer.height} links to {str(newer.prev_hash)[:16]}…, but block "
                f"{older.height} is {str(older.hash)[:16]}…"
            )
    return None


def sqlite_file_fault(path: Path) -> str | None:
    """Why the SQLite database file at ``path`` cannot be whole, or None: a main file whose size
    is not a whole number of its pages lost the end of its last page (a torn write or a
    truncated copy; SQLite would read the missing bytes as zeros and serve rows that were never
    written). Reads only the header's page size and the file size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return f"{path} is not a SQLite database (no SQLite header)"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65_536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1) or size % page_size:
        return (
            f"{path} is torn: {size} bytes is not a whole number of its {page_size}-byte pages "
            "(its last page was cut short)"
        )
    return None


SQLITE_CACHE_KIB = 1024
"""Page cache of each SQLite connection of a node's ledger, KiB (SQLite's default: 2000)."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    # 1 MiB of page cache per connection, not SQLite's 2 MiB: the node reads recent rows, the
    # OS's file cache holds the rest, and each pooled connection fills its own (issue 19: RSS)
    cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cursor.close()


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL (None: not a SQLite file URL)."""
    if not url.startswith("sqlite") or ":///" not in url:
        return None
    path = url.split(":///", 1)[1].split("?", 1)[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """A SQLAlchemy engine for ``url``; SQLite files get WAL and synchronous=FULL."""
    if url.startswith("sqlite") and read_only and "mode=ro" not in url:
        path = url.split(":///", 1)[1] if ":///" in url else ""
        url = f"sqlite:///file:{path}?mode=ro&uri=true" if path else url
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


@dataclass(frozen=True, slots=True)
class Head:
    """The newest block."""

    height: int
    hash: str


class LedgerStore:
    """Read/write access to one node's ledger database.

    A SQLite file is checked at open (see the module docstring); ``full_check`` forces
    (True) or skips (False) ``PRAGMA quick_check`` whatever the clean-shutdown marker says.
    Raises :class:`LedgerCorruptError` for a damaged file; :attr:`open_check` tells what ran
    and how long it took."""

    def __init__(self, url: str, *, full_check: bool | None = None) -> None:
        self.url = url
        self.path = path = sqlite_path(url)
        self.open_check: OpenCheck | None = None
        fault = None if path is None else sqlite_file_fault(path)
        if fault is not None:
            raise LedgerCorruptError(path or url, fault)
        stamp = None if path is None else _file_stamp(path)
        existing = stamp is not None and stamp["size"] > 0
        clean, reason = (
            consume_clean_marker(path) if path is not None and existing else (False, "new ledger")
        )
        self.engine = make_engine(url)
        quick: float | None = None
        try:
            if path is not None and existing and (full_check or (full_check is None and not clean)):
                started = time.perf_counter()
                try:
                    with self.engine.connect() as conn:
                        found = _quick_check(conn)
                except DatabaseError as exc:  # SQLite may raise instead of reporting
                    found = str(exc.orig)
                quick = time.perf_counter() - started
                if found is not None:
                    raise LedgerCorruptError(
                        path, f"damaged inside ({reason}; quick_check: {found})"
                    )
            t.ensure_schema(self.engine)  # an older node's ledger gets the new tables, columns
            started = time.perf_counter()
            if path is not None:
                try:
                    with self.engine.connect() as conn:
                        found = _tail_fault(conn)
                except DatabaseError as exc:
                    found = f"tail check: {exc.orig}"
                if found is not None:
                    raise LedgerCorruptError(path, f"damaged inside: {found}")
            tail = time.perf_counter() - started
        except DatabaseError as exc:
            self.engine.dispose()
            raise LedgerCorruptError(
                path or url, f"the database cannot be read ({exc.orig})"
            ) from exc
        except BaseException:
            self.engine.dispose()
            raise
        if path is not None:
            self.open_check = OpenCheck(clean, reason, quick, tail)
        self.write_lock = threading.RLock()
        """Held by every write transaction of this process (the replica's, block sync's), so
        two worker threads never race for SQLite's write lock mid-transaction."""
        self._unsynced_index: int | None = None
        """The log index of the last applied entry that wrote no ledger row, not committed yet
        (:meth:`record_entry`); None: nothing waits."""

    def close(self) -> None:
        """Commit a waiting applied index (:meth:`sync_applied_index`), release the database
        connections; for a SQLite file, then write its clean-shutdown marker (unless a
        write-ahead log still holds frames: another connection is open)."""
        try:
            self.sync_applied_index()
        finally:
            self.engine.dispose()
            if self.path is not None:
                write_clean_marker(self.path)

    def __enter__(self) -> LedgerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- genesis / meta ---------------------------------------------------------------------

    def init_genesis(self, config: MarketConfig) -> None:
        """Bind this database to a microgrid; refuses a database of another grid or rules."""
        genesis = config.genesis_hash()
        with self.engine.begin() as conn:
            stored = read_meta(conn)
            if not stored:
                conn.execute(
                    insert(t.meta),
                    [
                        {"key": "schema_version", "value": str(t.SCHEMA_VERSION)},
                        {"key": "grid", "value": config.grid},
                        {"key": "genesis_hash", "value": genesis},
                        {"key": "config", "value": json.dumps(config.to_json(), sort_keys=True)},
                        {"key": "applied_index", "value": "0"},
                    ],
                )
            elif stored.get("genesis_hash") != genesis:
                raise LedgerStoreError(
                    f"{self.url} holds grid {stored.get('grid')!r} with genesis "
                    f"{stored.get('genesis_hash', '')[:16]}…, not {config.grid!r} {genesis[:16]}…"
                )

    def record_schedule(self, schedule: Schedule) -> None:
        """Write the grid's schedule (genesis slot length, gate-closure lead, settle delay) to
        meta ``schedule`` if it is absent; refuses a ledger that records another schedule.

        Call it after :meth:`init_genesis` (an empty meta table is how that one recognises a new
        ledger). Readers such as the dashboard take the wall-clock slot length from here."""
        value = schedule_json(schedule)
        try:
            with self.write_lock, self.engine.begin() as conn:
                stored = conn.execute(
                    select(t.meta.c.value).where(t.meta.c.key == SCHEDULE_KEY)
                ).scalar()
                if stored is None:
                    conn.execute(insert(t.meta).values(key=SCHEDULE_KEY, value=value))
                    return
        except SQLAlchemyError as exc:
            raise LedgerStoreError(f"writing to {self.url} failed: {exc}") from exc
        if _schedule_doc(stored) != json.loads(value):
            raise LedgerStoreError(
                f"{self.url} records the schedule {stored}, not {value}: "
                "a ledger belongs to one grid"
            )

    def meta(self) -> dict[str, str]:
        """All meta entries."""
        with self.engine.connect() as conn:
            return read_meta(conn)

    def set_meta(self, key: str, value: str) -> None:
        """Insert or replace one meta entry."""
        with self.write_lock, self.engine.begin() as conn:
            conn.execute(t.meta.delete().where(t.meta.c.key == key))
            conn.execute(insert(t.meta).values(key=key, value=value))

    def applied_index(self) -> int:
        """The last log index whose events were recorded (0 if none): the committed
        ``applied_index``, or a later one of entries that wrote no ledger row and wait in this
        process (:meth:`record_entry`)."""
        durable = int(self.meta().get("applied_index", "0"))
        waiting = self._unsynced_index
        return waiting if waiting is not None and waiting > durable else durable

    def sync_applied_index(self) -> None:
        """Commit the applied index waiting in memory (:meth:`record_entry`), if any and if it
        is beyond the committed one: before a Raft log compaction drops the entries it stands
        for, and at close. Raises :class:`LedgerStoreError` if the database fails."""
        with self.write_lock:
            waiting = self._unsynced_index
            if waiting is None:
                return
            try:
                with self.engine.begin() as conn:
                    durable = conn.execute(
                        select(t.meta.c.value).where(t.meta.c.key == "applied_index")
                    ).scalar()
                    if durable is None or int(durable) < waiting:
                        conn.execute(
                            update(t.meta)
                            .where(t.meta.c.key == "applied_index")
                            .values(value=str(waiting))
                        )
            except SQLAlchemyError as exc:
                raise LedgerStoreError(f"writing to {self.url} failed: {exc}") from exc
            self._unsynced_index = None

    def head(self) -> Head | None:
        """The newest block, or None for an empty ledger."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(t.blocks.c.height, t.blocks.c.hash).order_by(t.blocks.c.height.desc())
            ).first()
        return Head(row.height, row.hash) if row else None

    # --- writing ------------------------------------------------------------------------------

    def record_entry(self, events: Sequence[Event], applied_index: int) -> bool:
        """Persist the events of the committed log entry ``applied_index`` as :meth:`record`
        does, except for an entry whose events write no ledger row (only records accepted or
        rejected, a Raft no-op or membership change: :func:`writes_rows`): that one commits
        nothing. Its index waits in memory (:meth:`applied_index` counts it) and is written by
        the next transaction that writes rows, in that transaction, or by
        :meth:`sync_applied_index` (compaction, close). True if a transaction committed.

        So each entry that changes the ledger is still committed durably with its index, and
        the durable ``applied_index`` may only lag behind entries that left every table as it
        was: a restart after a crash applies them again, and they write nothing again. What
        it saves: about half a node's ledger commits (each an fsync with ``synchronous=FULL``),
        those of the batches of orders and readings (docs/performance.md, "Settlement latency
        (deadline -> settled)")."""
        if not writes_rows(events):
            with self.write_lock:
                self._unsynced_index = applied_index
            return False
        self.record(events, applied_index=applied_index)
        return True

    def record(
        self,
        events: Iterable[Event],
        applied_index: int | None = None,
        meta: dict[str, str] | None = None,
    ) -> None:
        """Persist ``events``, the applied log index and ``meta`` in one database transaction.

        Raises :class:`LedgerStoreError` (and writes nothing) if the database fails or a value
        does not fit a 64-bit column (a running balance, or anything that slipped past the
        models' bounds): never ``OverflowError`` from the driver."""
        try:
            with self.write_lock, self.engine.begin() as conn:
                for ev in events:
                    if isinstance(ev, SlotSettled):
                        _write_settlement(conn, ev)
                    elif isinstance(ev, GateClosed):
                        write_gate(conn, ev)
                    elif isinstance(ev, HouseholdRegistered):
                        _write_member(conn, ev)
                    elif isinstance(ev, GovernanceAccepted):
                        write_governance(conn, ev, applied_index)
                if applied_index is not None:
                    conn.execute(
                        update(t.meta)
                        .where(t.meta.c.key == "applied_index")
                        .values(value=str(applied_index))
                    )
                for key, value in (meta or {}).items():
                    conn.execute(t.meta.delete().where(t.meta.c.key == key))
                    conn.execute(insert(t.meta).values(key=key, value=value))
        except SQLAlchemyError as exc:
            raise LedgerStoreError(f"writing to {self.url} failed: {exc}") from exc
        except OverflowError as exc:
            # sqlite3 raises it while binding an int beyond 64 bits; SQLAlchemy does not wrap it.
            raise LedgerStoreError(
                f"writing to {self.url} failed: unstorable value: {type(exc).__name__}: {exc}"
            ) from exc
        waiting = self._unsynced_index  # set only by record_entry, on the thread that calls this
        if applied_index is not None and waiting is not None and waiting <= applied_index:
            self._unsynced_index = None  # committed with this transaction's index


ROW_EVENTS = (SlotSettled, GateClosed, HouseholdRegistered, GovernanceAccepted)
"""The events :meth:`LedgerStore.record` writes rows for (every other event writes none)."""


def writes_rows(events: Iterable[Event]) -> bool:
    """Whether :meth:`LedgerStore.record` writes any row for ``events`` (besides the applied
    index)."""
    return any(isinstance(ev, ROW_EVENTS) for ev in events)


def write_locked(store: LedgerStore) -> AbstractContextManager[Any]:
    """The store's process-wide write lock (a no-op context for a store without one): held by
    every write transaction of this process."""
    lock = getattr(store, "write_lock", None)
    return lock if lock is not None else nullcontext()


def _schedule_doc(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return None


def _write_member(conn: Connection, ev: HouseholdRegistered) -> None:
    reg = ev.registration
    exists = conn.execute(
        select(t.households.c.did).where(t.households.c.did == reg.household)
    ).first()
    if exists:
        conn.execute(
            update(t.households)
            .where(t.households.c.did == reg.household)
            .values(meter_serial=reg.meter_serial, role=str(reg.role))
        )
    else:
        conn.execute(
            insert(t.households).values(
                did=reg.household,
                meter_serial=reg.meter_serial,
                role=str(reg.role),
                sold_wh=0,
                delivered_wh=0,
                bought_wh=0,
                consumed_wh=0,
                slots=0,
                missed_readings=0,
                reputation_permille=1000,
            )
        )


def write_governance(conn: Connection, ev: GovernanceAccepted, log_index: int | None) -> None:
    """Insert the ``governance`` row of an accepted record (the next position, in log order)
    and bring ``households`` up to the member change: an added household or a rotated key's new
    DID gets its row (so its reputation is recorded), a meter swap or a role change updates the
    row. ``households`` shows each DID's latest scheduled meter and role, also before the slot
    the change is in force from."""
    g = t.governance.c
    last = conn.execute(select(g.position).order_by(g.position.desc()).limit(1)).scalar()
    position = (last or 0) + 1
    record = ev.record
    conn.execute(
        insert(t.governance).values(governance_row(position, record, log_index, len(ev.withdrawn)))
    )
    h = t.households.c
    if isinstance(record, AddMember):
        _upsert_household(conn, record.household, record.meter_serial, str(record.role))
    elif isinstance(record, RotateKey):
        old = conn.execute(select(h.meter_serial, h.role).where(h.did == record.household)).first()
        if old is not None:
            _upsert_household(conn, record.new_household, old.meter_serial, old.role)
    elif isinstance(record, ReplaceMeter):
        conn.execute(
            update(t.households)
            .where(h.did == record.household)
            .values(meter_serial=record.meter_serial)
        )
    elif isinstance(record, ChangeRole):
        conn.execute(
            update(t.households).where(h.did == record.household).values(role=str(record.role))
        )


def _upsert_household(conn: Connection, did: str, meter_serial: str, role: str) -> None:
    h = t.households.c
    if conn.execute(select(h.did).where(h.did == did)).first():
        conn.execute(
            update(t.households).where(h.did == did).values(meter_serial=meter_serial, role=role)
        )
        return
    conn.execute(
        insert(t.households).values(
            did=did, meter_serial=meter_serial, role=role, sold_wh=0, delivered_wh=0,
            bought_wh=0, consumed_wh=0, slots=0, missed_readings=0, reputation_permille=1000,
        )
    )  # fmt: skip


def write_gate(conn: Connection, ev: GateClosed, *, with_trades: bool = True) -> None:
    """Insert a gate closure's rows: the clearing, the book in log order (a curve order's
    ``steps`` as canonical JSON) and (unless ``with_trades`` is false: a snapshot wrote them
    already) the trades."""
    c = ev.clearing
    conn.execute(
        insert(t.clearings).values(
            slot=ev.slot,
            mechanism=c.mechanism,
            price=c.price,
            volume_wh=c.volume_wh,
            bid_volume_wh=c.bid_volume_wh,
            ask_volume_wh=c.ask_volume_wh,
            order_count=len(ev.orders),
            participants=len({o.household for o in ev.orders}),
        )
    )
    if ev.orders:
        conn.execute(
            insert(t.orders),
            [
                {
                    "slot": o.slot,
                    "order_id": o.id,
                    "position": i,
                    "household": o.household,
                    "side": str(o.side),
                    "quantity_wh": o.quantity_wh,
                    "price": o.price,
                    "nonce": o.nonce,
                    "signature": o.signature,
                    "steps": steps_column(o.steps),
                }
                for i, o in enumerate(ev.orders)
            ],
        )
    if with_trades:
        write_trades(conn, ev.trades)


def write_trades(conn: Connection, trades: Iterable[Trade]) -> None:
    """Insert one slot's trades (enriched, in clearing order) with their positions (``part``
    NULL for 0)."""
    rows = [{"position": i, **tr._asdict(), "part": tr.part or None} for i, tr in enumerate(trades)]
    if rows:
        conn.execute(insert(t.trades), rows)


def _write_settlement(conn: Connection, ev: SlotSettled) -> None:
    b = ev.block
    header = b.to_json()
    header.pop("feeder", None)  # not a column: recomputed from the feeder_checks row
    # ``rules`` (only when set) is a column: NULL while the genesis rules hold
    conn.execute(insert(t.blocks).values(hash=b.hash, **header))
    if ev.feeder is not None:
        conn.execute(insert(t.feeder_checks).values(feeder_check_row(ev.feeder, b.height)))
    deltas: dict[tuple[str, str], int] = {}
    insert_transactions(conn, b.height, [
        ((tx.txid, tx.kind, tx.slot, tx.ref), [(p.account, p.asset, p.amount) for p in tx.postings])
        for tx in ev.transactions], deltas)  # fmt: skip
    try:
        apply_balance_deltas(conn, deltas)
    except BalanceOverflowError as exc:
        raise LedgerStoreError(str(exc)) from None
    if ev.readings:
        conn.execute(
            insert(t.readings),
            [{"position": i, **r.model_dump(exclude={"type"})} for i, r in enumerate(ev.readings)],
        )
    if ev.settlements:
        conn.execute(
            insert(t.settlements),
            [
                {
                    "slot": ev.slot,
                    "household": s.household,
                    "measured": s.measured,
                    "import_wh": s.import_wh,
                    "export_wh": s.export_wh,
                    "sold_wh": s.sold_wh,
                    "bought_wh": s.bought_wh,
                    "imbalance_wh": s.imbalance_wh,
                    "delivered_wh": s.delivered_wh,
                    "consumed_wh": s.consumed_wh,
                }
                for s in ev.settlements
            ],
        )
    insert_rows(conn, t.true_ups, true_up_rows(ev.slot, b.height, ev.settlements))
    if ev.reputation:  # one executemany
        fields = ("sold_wh", "delivered_wh", "bought_wh", "consumed_wh", "slots",
                  "missed_readings", "reputation_permille")  # fmt: skip
        conn.execute(
            update(t.households)
            .where(t.households.c.did == bindparam("r_did"))
            .values({f: bindparam(f"r_{f}") for f in fields}),
            [{"r_did": did, "r_sold_wh": rep.sold_wh, "r_delivered_wh": rep.delivered_wh,
              "r_bought_wh": rep.bought_wh, "r_consumed_wh": rep.consumed_wh,
              "r_slots": rep.slots, "r_missed_readings": rep.missed_readings,
              "r_reputation_permille": rep.score_permille}
             for did, rep in ev.reputation],
        )  # fmt: skip


def true_up_rows(
    slot: int, block_height: int, settlements: Iterable[HouseholdSettlement]
) -> list[dict[str, Any]]:
    """The ``true_ups`` rows of a block: one per household whose reading in ``slot`` closed a
    gap (``gap_slots`` > 0), in household order (as the engine settles them)."""
    return [
        {
            "slot": slot,
            "household": s.household,
            "block_height": block_height,
            "slots": s.gap_slots,
            "import_wh": s.gap_import_wh,
            "export_wh": s.gap_export_wh,
        }
        for s in settlements
        if s.gap_slots > 0
    ]


def feeder_check_row(check: FeederCheck, block_height: int) -> dict[str, Any]:
    """The ``feeder_checks`` row of a block's feeder check."""
    return {"slot": check.slot, "block_height": block_height, **check.to_json()}
