"""The replicated state machine's shell: committed log entries in, engine + ledger out.

Every node feeds each committed Raft entry, in index order, to :meth:`Replica.apply_entry`. The
entry's payload is a batch of commands (``market.encode_batch``); the contract engine applies
them and the ledger store records what they produced together with the entry's index, in one
database transaction. So after a crash the ledger's ``applied_index`` says exactly which
entries are in it: on restart the engine state is rebuilt from the newest engine snapshot and
the entries after it are re-applied to the engine only (they are already in the ledger), then
new entries go to both. Nothing is lost and nothing is recorded twice. An entry that writes no
ledger row (a batch of orders or readings) commits nothing: its index is committed with the next
entry that writes rows, or before a log compaction, or at close; after a crash such entries are
applied again and write nothing again (:meth:`node.ledger.LedgerStore.record_entry`).

A batch whose framing is valid is applied command by command: a malformed command becomes a
``Rejected(malformed)`` naming its index, and the others still apply, identically on every node.
If applying or recording an entry fails for any other reason (a bug, a value no store can hold,
a database error), the replica stops with an :class:`EntryError` naming the entry; the node
exits with :data:`ENTRY_ERROR_EXIT_STATUS` (:func:`exit_status`).

On a restart the replica also checks that the ledger was made under the history it replayed:
the engine head must be the ledger's block at its height, and the ledger's ``governance`` rows
(not hashed into blocks) must be the records the engine accepted, in order and at their log
indexes (:class:`GovernanceHistoryMismatch`). An installed snapshot is checked the same way
against the rows the ledger already has.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Sequence

from market import (
    Command,
    CommandDecodeError,
    Event,
    MarketConfig,
    Rejected,
    RejectReason,
    State,
    apply,
)
from market.events import GovernanceAccepted
from market.models import GovernanceRecord, SignedRecord, decode_batch_lenient
from market.snapshot import dump_state, load_state
from node.ledger import LedgerStore
from node.ledger.gaps import head_hash_at
from node.ledger.governance import (
    HistoryDifference,
    RecordSide,
    engine_governance_rows,
    first_difference,
    ledger_governance_rows,
)
from node.ledger.snapshot_record import record_snapshot

ENTRY_ERROR_EXIT_STATUS = 3
"""Exit status of a node stopped by an :class:`EntryError` (1: other fatal errors, 2: usage)."""


RESYNC_ADVICE = (
    "stop using this ledger: move it aside (for SQLite, the file together with its -wal and "
    "-shm files; keep them for inspection) and restart the node, which rebuilds its ledger from "
    "its Raft log and fetches the blocks it lacks from its peers; if the Raft log itself came "
    "from elsewhere, move the whole data directory aside instead"
)
"""What an operator does about a ledger made under another history (the node refuses it)."""


class ReplicaError(RuntimeError):
    """The log and the ledger disagree in a way that must stop the node (a gap, a fork)."""


class GovernanceHistoryMismatch(ReplicaError):
    """The ledger's governance rows are not the records the engine accepted from the Raft log
    and snapshot: the ledger was made under another governance history (copied from another
    grid with the same genesis, restored from elsewhere, or edited), so the node refuses it.

    ``position`` is the first differing record's place among the accepted records (1-based,
    log order), ``reason`` what differs, ``ledger`` and ``log`` that record on each side (log
    index, kind, household, first slot; None: that side has no record there), ``ledger_url``
    the ledger's database."""

    def __init__(self, ledger_url: str, difference: HistoryDifference) -> None:
        self.ledger_url = ledger_url
        self.position = difference.position
        self.reason = difference.reason
        self.ledger: RecordSide | None = difference.ledger
        self.log: RecordSide | None = difference.log
        mine = "none" if self.ledger is None else self.ledger.describe()
        theirs = "none" if self.log is None else self.log.describe()
        super().__init__(
            f"the ledger {ledger_url} was made under a different governance history than this "
            f"node's Raft log and snapshot: at governance record {self.position} "
            f"{self.reason} (ledger: {mine}; log: {theirs}); {RESYNC_ADVICE}"
        )


class EntryError(ReplicaError):
    """A committed log entry could not be applied or recorded: the node must stop.

    ``index`` is the entry's log index, ``commands`` names its commands (``kind by author``, in
    order), ``cause`` is the exception. The engine state may be half-updated, so the replica
    refuses every later entry with the same error; a restart replays the log."""

    def __init__(self, index: int, commands: Sequence[str], cause: BaseException) -> None:
        more = len(commands) - 5
        shown = ", ".join(commands[:5]) + (f", +{more} more" if more > 0 else "")
        super().__init__(
            f"committed log entry {index} ({shown or 'no commands'}) cannot be applied: "
            f"{type(cause).__name__}: {cause}"
        )
        self.index = index
        self.commands = tuple(commands)
        self.cause = cause


def describe_entry(data: bytes) -> list[str]:
    """``kind by author`` of each command in an entry's payload (``malformed`` for a command
    that does not decode); never raises."""
    if not data:
        return []
    try:
        items = decode_batch_lenient(data)
    except CommandDecodeError:
        return ["malformed batch"]
    except Exception:  # describing must never mask the error being reported
        return ["undecodable batch"]
    out = []
    for item in items:
        if isinstance(item, CommandDecodeError):
            out.append(f"malformed {item.kind or 'command'}")
        elif isinstance(item, SignedRecord):
            out.append(f"{item.KIND} by {item.author}")
        else:
            out.append(f"{item.type} {getattr(item, 'slot', '')}".strip())
    return out


def check_governance_history(
    store: LedgerStore,
    records: Sequence[GovernanceRecord],
    known: dict[int, tuple[int, int]],
    *,
    snapshot_index: int,
    prefix: bool = False,
) -> None:
    """Raise :class:`GovernanceHistoryMismatch` unless ``store``'s ``governance`` rows are the
    engine's ``records`` (log order; :func:`node.ledger.governance.first_difference`).

    ``known`` maps a record's position (1-based) to the log index and withdrawn count the
    engine saw it committed with; the other records come from the engine's snapshot at
    ``snapshot_index`` (their log index is at most that). With ``prefix`` the ledger may lack
    the last records (it is behind a snapshot about to be installed)."""
    with store.engine.connect() as conn:
        ledger = ledger_governance_rows(conn)
    engine = engine_governance_rows(records, known)
    difference = first_difference(ledger, engine, snapshot_index=snapshot_index, prefix=prefix)
    if difference is not None:
        raise GovernanceHistoryMismatch(store.url, difference)


def exit_status(exc: BaseException) -> int:
    """The node's exit status for a fatal error (looks inside exception groups):
    :data:`ENTRY_ERROR_EXIT_STATUS` for an :class:`EntryError`, 1 otherwise."""
    if isinstance(exc, BaseExceptionGroup):
        matched, _ = exc.split(EntryError)
        return ENTRY_ERROR_EXIT_STATUS if matched is not None else 1
    return ENTRY_ERROR_EXIT_STATUS if isinstance(exc, EntryError) else 1


class Replica:
    """Applies committed entries exactly once to the engine and the ledger store."""

    def __init__(
        self,
        config: MarketConfig,
        store: LedgerStore | None = None,
        observer: Callable[[Command], None] | None = None,
        genesis: Sequence[Command] = (),
    ) -> None:
        self.config = config
        self.store = store
        self.observer = observer
        """Called with every command as it is applied (the leader's proposer listens)."""
        self.listener: Callable[[int, list[Event]], None] | None = None
        """Called with ``(index, events)`` once an entry's events are in the ledger (the node
        logs clearings and settlements and times them). Not called while recovering."""
        self.state = State.initial(config)
        self.applied_index = 0
        self.failed: EntryError | None = None
        """Set once an entry failed: the replica then refuses to go on."""
        # The genesis membership is the engine's starting point, not part of the Raft log: it
        # is applied before log index 1 and recorded once, when the ledger is new.
        genesis_events: list[Event] = []
        for command in genesis:
            self.state, produced = apply(self.state, command)
            rejected = [e for e in produced if isinstance(e, Rejected)]
            if rejected:
                raise ReplicaError(f"genesis command rejected: {rejected[0]}")
            genesis_events.extend(produced)
        if store is not None:
            store.init_genesis(config)
            if store.meta().get("genesis_applied") != "1":
                store.record(genesis_events, applied_index=0, meta={"genesis_applied": "1"})

    @classmethod
    def recover(
        cls,
        config: MarketConfig,
        store: LedgerStore,
        snapshot: tuple[int, bytes] | None,
        entries: Iterable[tuple[int, bytes]],
        genesis: Sequence[Command] = (),
    ) -> Replica:
        """Rebuild after a restart.

        ``snapshot`` is the newest engine snapshot ``(index, bytes)`` (None: start from
        genesis); ``entries`` yields the committed log entries after it in order. Those up to
        the ledger's ``applied_index`` are replayed into the engine without writing; the caller
        then continues with :meth:`apply_entry` from ``applied_index + 1``.
        """
        replica = cls(config, store, genesis=genesis)
        ledger_index = store.applied_index()
        if snapshot is not None:
            index, data = snapshot
            if index > ledger_index:
                raise ReplicaError(
                    f"engine snapshot at index {index} is ahead of the ledger at {ledger_index}"
                )
            replica.state = load_state(data)
            replica.applied_index = index
        snapshot_index = replica.applied_index
        # positions (1-based) of the records the replayed entries committed -> (index, withdrawn)
        known: dict[int, tuple[int, int]] = {}
        accepted = len(replica.state.governance.records)
        for index, data in entries:
            if index > ledger_index:
                break
            for event in replica._apply(index, data):
                if isinstance(event, GovernanceAccepted):
                    accepted += 1
                    known[accepted] = (index, len(event.withdrawn))
        if replica.applied_index != ledger_index:
            raise ReplicaError(
                f"ledger is at log index {ledger_index} but the log ends at "
                f"{replica.applied_index}: committed entries are missing"
            )
        check_governance_history(
            store, replica.state.governance.records, known, snapshot_index=snapshot_index
        )
        height = replica.state.height
        # the ledger's block at the engine's height (or, if it still lies in a block-sync gap
        # left by an installed snapshot, the snapshot's head that gap must chain into)
        expected = head_hash_at(store, height) if height else None
        if height and expected is None:
            raise ReplicaError(f"the ledger has no block {height}, where the engine stands")
        if expected is not None and expected != replica.state.head_hash:
            raise ReplicaError(
                f"replayed engine head {replica.state.head_hash[:16]}… differs from the "
                f"ledger head {expected[:16]}… at height {height}: the ledger has forked; "
                f"{RESYNC_ADVICE}"
            )
        return replica

    def apply_entry(self, index: int, data: bytes) -> list[Event]:
        """Apply committed entry ``index`` (idempotent for entries already applied)."""
        if self.failed is not None:
            raise self.failed
        if index <= self.applied_index:
            return []
        events = self._apply(index, data)
        if self.store is not None:
            try:
                # an entry that writes no ledger row commits nothing: its index goes with the
                # next one that does (LedgerStore.record_entry)
                self.store.record_entry(events, index)
            except Exception as exc:
                raise self._fail(index, data, exc) from exc
        if self.listener is not None and events:
            self.listener(index, events)
        return events

    def install_snapshot(self, index: int, data: bytes) -> None:
        """Jump to a snapshot received from the leader (this node fell behind a compacted log).

        The engine continues from the snapshot at once. The ledger cannot be rebuilt from an
        engine snapshot: blocks between the ledger's head and the snapshot's height must be
        fetched from a peer's ledger and checked against the snapshot's head hash (block sync,
        :mod:`node.ledger.snapshot_record`). In one transaction the ledger records the gap
        (merged with an earlier one it touches, never dropping one: ``meta.block_sync_needed``
        names the missing heights, ``block_sync_head`` the hash each gap must chain into), the
        applied index, the snapshot's members and reputation, and the gate closures (clearing,
        book, trades) of slots closed but not yet settled; ``ledger verify`` reports the gap
        until it is filled. First the governance rows the ledger has must be the snapshot's
        first records, at log indexes up to ``index`` (:class:`GovernanceHistoryMismatch`).
        """
        if index <= self.applied_index:
            return
        state = load_state(data)
        if self.store is not None:
            # the ledger's governance rows must be the snapshot's first records
            records = state.governance.records
            check_governance_history(self.store, records, {}, snapshot_index=index, prefix=True)
            record_snapshot(self.store, state, index)
        self.state = state
        self.applied_index = index

    def snapshot(self) -> tuple[int, bytes]:
        """``(applied index, engine snapshot bytes)`` for Raft log compaction. First the
        ledger commits the applied index of entries that wrote no row (:meth:`LedgerStore.
        sync_applied_index`): the compaction drops them from the log, so a restart could not
        apply them again, and the ledger must never stand behind the engine snapshot."""
        if self.store is not None:
            self.store.sync_applied_index()
        return self.applied_index, dump_state(self.state)

    def _fail(self, index: int, data: bytes, cause: BaseException) -> EntryError:
        self.failed = EntryError(index, describe_entry(data), cause)
        return self.failed

    def _apply(self, index: int, data: bytes) -> list[Event]:
        if index != self.applied_index + 1:
            raise ReplicaError(f"entry {index} applied after {self.applied_index}: a gap")
        # The cyclic garbage collector is paused while a batch applies (the pure engine leaves
        # process-wide settings alone; this shell owns them). Clearing a slot allocates many
        # acyclic tuples, and collections triggered by them only cost time: clearing a
        # 100k-order book took 384-401 ms best of 9 with the collector on against 232-248 ms
        # with it paused (uniform, pay_as_bid, mcafee; timed in one process). Re-enabled only if
        # it was on, so a caller that turned it off keeps it off.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            events = self._apply_commands(data)
        except Exception as exc:
            raise self._fail(index, data, exc) from exc
        finally:
            if gc_was_enabled:
                gc.enable()
        self.applied_index = index
        return events

    def _apply_commands(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if not data:  # empty entries are Raft's own (leader no-ops, configuration changes)
            return events
        # Every node decodes the same bytes the same way, so each rejection is deterministic.
        try:
            items = decode_batch_lenient(data)
        except CommandDecodeError as exc:  # bad framing: the whole entry is one rejection
            return [Rejected(RejectReason.MALFORMED, str(exc), "batch", None)]
        for item in items:
            if isinstance(item, CommandDecodeError):
                kind = item.kind or "command"
                events.append(Rejected(RejectReason.MALFORMED, str(item), kind, None))
                continue
            self.state, produced = apply(self.state, item)
            events.extend(produced)
            if self.observer is not None:
                self.observer(item)
        return events
