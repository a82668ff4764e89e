"""The storage interface the core reads from, and ``MemoryStorage``, its in-memory version.

Like etcd-raft's ``Storage``: the core only reads; the caller writes what a ``Ready`` hands
out (``apply_snapshot``, ``append``, ``set_hard_state``) and compacts with
``create_snapshot`` + ``compact`` when the application has a snapshot of its own state.
The log is kept as ``[dummy, e(first), ..., e(last)]`` where the dummy entry carries the
index and term of the latest snapshot.
"""

from __future__ import annotations

from typing import Protocol

from node.raft.errors import CompactedError, SnapshotOutOfDate, UnavailableError
from node.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata


class Storage(Protocol):
    """What the core needs to read; implemented by ``MemoryStorage`` and ``SQLStorage``."""

    def initial_state(self) -> tuple[HardState, ConfState | None]:
        """The persisted hard state, and the membership of the latest snapshot (None if none)."""
        ...

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)``; at least one if any, at most ``max_size`` bytes of data."""
        ...

    def term(self, index: int) -> int:
        """The term of the entry at ``index`` (the snapshot's index is allowed)."""
        ...

    def first_index(self) -> int:
        """The first index available as an entry (snapshot index + 1)."""
        ...

    def last_index(self) -> int:
        """The index of the last entry (the snapshot's index if the log is empty)."""
        ...

    def snapshot(self) -> Snapshot:
        """The latest snapshot."""
        ...

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Persist entries, truncating any conflicting suffix first."""
        ...

    def set_hard_state(self, hs: HardState) -> None:
        """Persist the hard state."""
        ...

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the whole log with a snapshot received from the leader."""
        ...


def limit_size(entries: list[Entry], max_size: int | None) -> list[Entry]:
    """Keep a prefix of ``entries`` whose data totals at most ``max_size`` (at least one)."""
    if max_size is None or not entries:
        return entries
    total = 0
    for i, e in enumerate(entries):
        total += len(e.data) + 16
        if total > max_size and i > 0:
            return entries[:i]
    return entries


class MemoryStorage:
    """An in-memory ``Storage``: for tests, the simulator, and benchmarks."""

    def __init__(self) -> None:
        self._hard_state = HardState()
        self._snapshot = Snapshot()
        self._ents: list[Entry] = [Entry(0, 0)]

    # -- reads ---------------------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState | None]:
        """See ``Storage.initial_state``."""
        conf = None if self._snapshot.is_empty() else self._snapshot.metadata.conf_state
        return self._hard_state, conf

    @property
    def hard_state(self) -> HardState:
        """The persisted hard state."""
        return self._hard_state

    def first_index(self) -> int:
        """See ``Storage.first_index``."""
        return self._ents[0].index + 1

    def last_index(self) -> int:
        """See ``Storage.last_index``."""
        return self._ents[0].index + len(self._ents) - 1

    def term(self, index: int) -> int:
        """See ``Storage.term``."""
        offset = self._ents[0].index
        if index < offset:
            raise CompactedError(f"index {index} compacted (first {offset + 1})")
        if index - offset >= len(self._ents):
            raise UnavailableError(f"index {index} beyond last {self.last_index()}")
        return self._ents[index - offset].term

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """See ``Storage.entries``."""
        offset = self._ents[0].index
        if lo <= offset:
            raise CompactedError(f"index {lo} compacted (first {offset + 1})")
        if hi > self.last_index() + 1:
            raise UnavailableError(f"entries up to {hi - 1} beyond last {self.last_index()}")
        return limit_size(self._ents[lo - offset : hi - offset], max_size)

    def snapshot(self) -> Snapshot:
        """See ``Storage.snapshot``."""
        return self._snapshot

    def checkpoint(self) -> tuple[HardState, Snapshot, list[Entry]]:
        """Capture the whole state (cheap: the entry list is copied shallowly)."""
        return self._hard_state, self._snapshot, list(self._ents)

    def rollback(self, cp: tuple[HardState, Snapshot, list[Entry]]) -> None:
        """Return to a state captured by ``checkpoint``."""
        self._hard_state, self._snapshot, self._ents = cp[0], cp[1], list(cp[2])

    # -- writes --------------------------------------------------------------------------
    def set_hard_state(self, hs: HardState) -> None:
        """See ``Storage.set_hard_state``."""
        self._hard_state = hs

    def apply_snapshot(self, snap: Snapshot) -> None:
        """See ``Storage.apply_snapshot``."""
        if snap.metadata.index <= self._snapshot.metadata.index:
            raise SnapshotOutOfDate(
                f"snapshot {snap.metadata.index} not newer than {self._snapshot.metadata.index}"
            )
        self._snapshot = snap
        self._ents = [Entry(snap.metadata.index, snap.metadata.term)]

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record the application's snapshot at ``index`` (must be applied, <= last index)."""
        if index <= self._snapshot.metadata.index:
            raise SnapshotOutOfDate(f"snapshot {index} not newer than current")
        if index > self.last_index():
            raise UnavailableError(f"snapshot {index} beyond last {self.last_index()}")
        meta = SnapshotMetadata(index=index, term=self.term(index), conf_state=conf_state)
        self._snapshot = Snapshot(metadata=meta, data=data)
        return self._snapshot

    def compact(self, index: int) -> None:
        """Drop entries up to and including ``index`` (must not exceed the snapshot's index...

        ...in normal use; the core only needs entries after the latest snapshot).
        """
        offset = self._ents[0].index
        if index <= offset:
            raise CompactedError(f"index {index} already compacted")
        if index > self.last_index():
            raise UnavailableError(f"compact {index} beyond last {self.last_index()}")
        i = index - offset
        self._ents = [Entry(index, self._ents[i].term), *self._ents[i + 1 :]]

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """See ``Storage.append``."""
        if not entries:
            return
        first = self.first_index()
        last = entries[0].index + len(entries) - 1
        if last < first:
            return  # all compacted already
        if first > entries[0].index:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._ents[0].index
        if offset > len(self._ents):
            raise UnavailableError(
                f"missing log entry [last: {self.last_index()}, append at: {entries[0].index}]"
            )
        del self._ents[offset:]
        self._ents.extend(entries)
