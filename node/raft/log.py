"""The Raft log: the persisted part (a ``Storage``) plus the not-yet-persisted tail.

Mirrors etcd-raft's ``raftLog``/``unstable``: new entries and a received snapshot live in
``Unstable`` until the caller has persisted them (``Ready`` then ``advance``).
"""

from __future__ import annotations

from node.raft.errors import CompactedError, RaftError, UnavailableError
from node.raft.storage import Storage, limit_size
from node.raft.types import Entry, Snapshot


class Unstable:
    """Entries (and possibly a snapshot) not yet handed to durable storage."""

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        """First index if a snapshot is pending."""
        return self.snapshot.metadata.index + 1 if self.snapshot is not None else None

    def maybe_last_index(self) -> int | None:
        """Last index held here, if any."""
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.metadata.index
        return None

    def maybe_term(self, i: int) -> int | None:
        """Term of index ``i`` if it is known here."""
        if i < self.offset:
            if self.snapshot is not None and self.snapshot.metadata.index == i:
                return self.snapshot.metadata.term
            return None
        last = self.maybe_last_index()
        if last is None or i > last:
            return None
        return self.entries[i - self.offset].term

    def stable_to(self, i: int, t: int) -> None:
        """Entries up to ``i`` (of term ``t``) have been persisted."""
        gt = self.maybe_term(i)
        if gt is None or gt != t or i < self.offset:
            return
        del self.entries[: i + 1 - self.offset]
        self.offset = i + 1

    def stable_snap_to(self, i: int) -> None:
        """The pending snapshot at ``i`` has been persisted."""
        if self.snapshot is not None and self.snapshot.metadata.index == i:
            self.snapshot = None

    def restore(self, snap: Snapshot) -> None:
        """Replace everything with a snapshot."""
        self.offset = snap.metadata.index + 1
        self.entries = []
        self.snapshot = snap

    def truncate_and_append(self, ents: list[Entry]) -> None:
        """Append ``ents``, dropping any conflicting suffix."""
        after = ents[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(ents)
        elif after <= self.offset:
            self.offset = after
            self.entries = list(ents)
        else:
            del self.entries[after - self.offset :]
            self.entries.extend(ents)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries ``[lo, hi)`` (all must be here)."""
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    """The log as the core sees it: storage + unstable, with commit and applied indexes."""

    def __init__(self, storage: Storage, max_size: int | None = None) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        self.committed = first - 1
        self.applied = first - 1
        self.max_size = max_size

    # -- indexes and terms -----------------------------------------------------------------
    def first_index(self) -> int:
        """First index held as an entry."""
        i = self.unstable.maybe_first_index()
        return i if i is not None else self.storage.first_index()

    def last_index(self) -> int:
        """Index of the last entry."""
        i = self.unstable.maybe_last_index()
        return i if i is not None else self.storage.last_index()

    def term(self, i: int) -> int:
        """Term at ``i``; raises ``CompactedError``/``UnavailableError`` when not held."""
        dummy = self.first_index() - 1
        if i < dummy:
            raise CompactedError(f"index {i} compacted")
        if i > self.last_index():
            raise UnavailableError(f"index {i} beyond last {self.last_index()}")
        t = self.unstable.maybe_term(i)
        if t is not None:
            return t
        return self.storage.term(i)

    def zero_term_on_missing(self, i: int) -> int:
        """Term at ``i``, or 0 when compacted or unavailable."""
        try:
            return self.term(i)
        except (CompactedError, UnavailableError):
            return 0

    def last_term(self) -> int:
        """Term of the last entry."""
        return self.term(self.last_index())

    def match_term(self, i: int, t: int) -> bool:
        """True when the entry at ``i`` has term ``t``."""
        try:
            return self.term(i) == t
        except (CompactedError, UnavailableError):
            return False

    def is_up_to_date(self, lasti: int, term: int) -> bool:
        """A candidate's log (last index/term) is at least as up to date as ours (§5.4.1)."""
        lt = self.last_term()
        return term > lt or (term == lt and lasti >= self.last_index())

    # -- reading entries -------------------------------------------------------------------
    def slice(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)``, size-limited; raises ``CompactedError`` if ``lo`` is gone."""
        if lo > hi:
            raise RaftError(f"invalid slice {lo} > {hi}")
        fi = self.first_index()
        if lo < fi:
            raise CompactedError(f"index {lo} compacted (first {fi})")
        if hi > self.last_index() + 1:
            raise UnavailableError(f"slice [{lo},{hi}) out of bound {self.last_index()}")
        if lo == hi:
            return []
        ents: list[Entry] = []
        uoff = self.unstable.offset
        if lo < uoff:
            ents = self.storage.entries(lo, min(hi, uoff), max_size)
            if len(ents) < min(hi, uoff) - lo:
                return ents  # size limit hit
        if hi > uoff:
            ents = ents + self.unstable.slice(max(lo, uoff), hi)
        return limit_size(ents, max_size)

    def entries_from(self, i: int, max_size: int | None = None) -> list[Entry]:
        """Entries from ``i`` to the end (size-limited)."""
        if i > self.last_index():
            return []
        return self.slice(i, self.last_index() + 1, max_size)

    def unstable_entries(self) -> list[Entry]:
        """Entries not yet persisted."""
        return list(self.unstable.entries)

    def next_committed_entries(self) -> list[Entry]:
        """Committed entries not yet applied."""
        off = max(self.applied + 1, self.first_index())
        if self.committed + 1 > off:
            return self.slice(off, self.committed + 1, self.max_size)
        return []

    def has_next_committed_entries(self) -> bool:
        """Any committed entries not yet applied?"""
        return self.committed + 1 > max(self.applied + 1, self.first_index())

    def snapshot(self) -> Snapshot:
        """The newest snapshot: pending, else the storage's."""
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    # -- changing the log ------------------------------------------------------------------
    def append(self, ents: list[Entry]) -> int:
        """Append entries (truncating a conflicting suffix); returns the new last index."""
        if not ents:
            return self.last_index()
        after = ents[0].index - 1
        if after < self.committed:
            raise RaftError(f"append after {after} is below committed {self.committed}")
        self.unstable.truncate_and_append(ents)
        return self.last_index()

    def find_conflict(self, ents: tuple[Entry, ...] | list[Entry]) -> int:
        """First index of ``ents`` whose term differs from ours, or that we lack; 0 if none."""
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest index <= ``index`` whose term is <= ``term``, with that term (fast back-up)."""
        while index > 0:
            try:
                t = self.term(index)
            except (CompactedError, UnavailableError):
                return index, 0
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    def maybe_append(
        self, index: int, log_term: int, committed: int, ents: tuple[Entry, ...]
    ) -> int | None:
        """Follower side of AppendEntries: returns the last new index, or None on mismatch."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(ents)
        ci = self.find_conflict(ents)
        if ci != 0:
            if ci <= self.committed:
                raise RaftError(f"entry {ci} conflicts with committed entry {self.committed}")
            self.append(list(ents[ci - (index + 1) :]))
        self.commit_to(min(committed, last_new))
        return last_new

    def commit_to(self, tocommit: int) -> None:
        """Raise the commit index (never lowers it)."""
        if self.committed < tocommit:
            if self.last_index() < tocommit:
                raise RaftError(f"commit {tocommit} beyond last index {self.last_index()}")
            self.committed = tocommit

    def maybe_commit(self, max_index: int, term: int) -> bool:
        """Commit ``max_index`` if its entry is of ``term`` (the leader's current term)."""
        if max_index > self.committed and self.zero_term_on_missing(max_index) == term:
            self.commit_to(max_index)
            return True
        return False

    def applied_to(self, i: int) -> None:
        """The application has applied everything up to ``i``."""
        if i == 0:
            return
        if self.committed < i or i < self.applied:
            raise RaftError(f"applied {i} out of range [{self.applied}, {self.committed}]")
        self.applied = i

    def restore(self, snap: Snapshot) -> None:
        """Reset the log to a snapshot received from the leader."""
        self.committed = snap.metadata.index
        self.unstable.restore(snap)
