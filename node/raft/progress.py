"""The leader's view of each follower's replication (etcd-raft's ``tracker.Progress``)."""

from __future__ import annotations

import enum
from collections import deque


class ProgressState(enum.StrEnum):
    """Probe: one append at a time until a match is found. Replicate: pipelined appends.
    Snapshot: waiting for a snapshot to be installed."""

    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """Bounded window of in-flight appends (by last index sent)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._q: deque[int] = deque()

    def add(self, last: int) -> None:
        """Record an append whose last entry is ``last``."""
        self._q.append(last)

    def free_le(self, to: int) -> None:
        """Acknowledge everything up to ``to``."""
        while self._q and self._q[0] <= to:
            self._q.popleft()

    def reset(self) -> None:
        """Forget everything in flight."""
        self._q.clear()

    def full(self) -> bool:
        """True when no more appends may be sent."""
        return len(self._q) >= self.size

    def count(self) -> int:
        """Number of appends in flight."""
        return len(self._q)


class Progress:
    """Match/next indexes and flow control for one peer."""

    def __init__(self, next_index: int, max_inflight: int, is_learner: bool = False) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        self.recent_active = False
        self.probe_sent = False
        self.is_learner = is_learner
        self.inflights = Inflights(max_inflight)

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        """Back to probing (after a rejection or a finished snapshot)."""
        if self.state == ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        """A match was found: pipeline appends."""
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        """The follower needs a snapshot at ``snapshot_index``."""
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def reset_after_loss(self, match: int, next_index: int) -> None:
        """The follower holds less than it acknowledged (its disk was wiped or rolled back):
        forget what it acknowledged beyond ``match`` (an index it provably holds, e.g. its
        commit index) and probe it again from ``next_index``. Lowering ``match`` is always
        safe: the commit index never goes down, and the peer counts only for what it holds."""
        self._reset_state(ProgressState.PROBE)
        self.match = min(self.match, match)
        self.next = max(next_index, self.match + 1)

    def maybe_update(self, n: int) -> bool:
        """An append up to ``n`` was acknowledged; False if the ack is stale."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.probe_sent = False
        self.next = max(self.next, n + 1)
        return updated

    def optimistic_update(self, n: int) -> None:
        """Entries up to ``n`` were sent in Replicate state."""
        self.next = n + 1

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """An append at ``rejected`` was refused; back up using the hint. False if stale."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        """True when no append should be sent right now."""
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True
