"""The replicated state machine's shell: committed log entries in, engine + ledger out.

Every node feeds each committed Raft entry, in index order, to :meth:`Replica.apply_entry`. The
entry's payload is a batch of commands (``market.encode_batch``); the contract engine applies
them and the ledger store records what they produced together with the entry's index, in one
database transaction. So after a crash the ledger's ``applied_index`` says exactly which
entries are in it: on restart the engine state is rebuilt from the newest engine snapshot and
the entries after it are re-applied to the engine only (they are already in the ledger), then
new entries go to both. Nothing is lost and nothing is recorded twice.
"""

from __future__ import annotations

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
    decode_batch,
)
from market.snapshot import dump_state, load_state
from node.ledger import LedgerStore
from node.ledger.sync import head_hash_at, record_snapshot


class ReplicaError(RuntimeError):
    """The log and the ledger disagree in a way that must stop the node (a gap, a fork)."""


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
        for index, data in entries:
            if index > ledger_index:
                break
            replica._apply(index, data)
        if replica.applied_index != ledger_index:
            raise ReplicaError(
                f"ledger is at log index {ledger_index} but the log ends at "
                f"{replica.applied_index}: committed entries are missing"
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
                f"ledger head {expected[:16]}… at height {height}: the ledger has forked"
            )
        return replica

    def apply_entry(self, index: int, data: bytes) -> list[Event]:
        """Apply committed entry ``index`` (idempotent for entries already applied)."""
        if index <= self.applied_index:
            return []
        events = self._apply(index, data)
        if self.store is not None:
            self.store.record(events, applied_index=index)
        if self.listener is not None and events:
            self.listener(index, events)
        return events

    def install_snapshot(self, index: int, data: bytes) -> None:
        """Jump to a snapshot received from the leader (this node fell behind a compacted log).

        The engine continues from the snapshot at once. The ledger cannot be rebuilt from an
        engine snapshot: blocks between the ledger's head and the snapshot's height must be
        fetched from a peer's ledger and checked against the snapshot's head hash (block sync,
        :mod:`node.ledger.sync`). In one transaction the ledger records the gap (merged with an
        earlier one it touches, never dropping one: ``meta.block_sync_needed`` names the missing
        heights, ``block_sync_head`` the hash each gap must chain into), the applied index, the
        snapshot's members and reputation, and the gate closures (clearing, book, trades) of
        slots closed but not yet settled;
        ``ledger verify`` reports the gap until it is filled.
        """
        if index <= self.applied_index:
            return
        state = load_state(data)
        if self.store is not None:
            record_snapshot(self.store, state, index)
        self.state = state
        self.applied_index = index

    def snapshot(self) -> tuple[int, bytes]:
        """``(applied index, engine snapshot bytes)`` for Raft log compaction."""
        return self.applied_index, dump_state(self.state)

    def _apply(self, index: int, data: bytes) -> list[Event]:
        if index != self.applied_index + 1:
            raise ReplicaError(f"entry {index} applied after {self.applied_index}: a gap")
        events: list[Event] = []
        if data:  # empty entries are Raft's own (leader no-ops, configuration changes)
            try:
                commands = decode_batch(data)
            except CommandDecodeError as exc:
                # Every node decodes the same bytes the same way, so this is deterministic.
                commands = []
                events.append(Rejected(RejectReason.MALFORMED, str(exc), "batch", None))
            for command in commands:
                self.state, produced = apply(self.state, command)
                events.extend(produced)
                if self.observer is not None:
                    self.observer(command)
        self.applied_index = index
        return events
