"""Delegated learner replication: which voter serves a learner its committed entries.

With many learners, the leader sending every entry to every follower costs it ``entries x
(N - 1)`` bytes a round: quadratic in the grid's size. With ``Config.delegate_learners`` the
leader replicates to the voters only; each learner is served the *committed* entries by one
voter other than the leader, its delegate, chosen by rendezvous hashing so that every node
that knows the same voters and leader picks the same one, and a leader change or a
membership change moves only the learners it must. The leader still sends every learner its
(small) heartbeats, learns how far each one has committed from the answers, and serves a
learner itself while that learner falls behind (its delegate is down, partitioned, lagging
or has compacted the entries the learner needs): see :class:`LagWatch`.

A learner takes a delegate's entries only up to the delegate's commit index: committed
entries are the same on every honest node (Raft's log matching and leader completeness), so
which voter sent them does not matter. A learner trusts its delegate as it trusts the leader:
voters are chosen by the grid's governance; a learner never takes entries from a learner.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable


def _weight(learner: str, voter: str) -> bytes:
    return hashlib.blake2b(f"{learner}\x00{voter}".encode(), digest_size=8).digest()


def delegate_of(learner: str, voters: Iterable[str], leader: str) -> str:
    """The voter that serves ``learner`` its committed entries under ``leader``: the voter
    other than the leader of highest rendezvous weight, or the leader when it is the only
    voter (no one else to delegate to)."""
    candidates = [v for v in voters if v != leader]
    if not candidates:
        return leader
    return max(sorted(candidates), key=lambda v: _weight(learner, v))


def delegated_learners(self_id: str, learners: Iterable[str], voters: Iterable[str],
                       leader: str) -> tuple[str, ...]:  # fmt: skip
    """The learners ``self_id`` serves under ``leader`` (sorted)."""
    vs = tuple(voters)
    return tuple(sorted(lrn for lrn in learners if delegate_of(lrn, vs, leader) == self_id))


class LagWatch:
    """The leader's view of whether delegated learners keep up.

    Once per heartbeat round the leader records its commit index; a delegated learner whose
    acknowledged commit index is still below the commit index of ``patience`` rounds ago is
    behind, and the leader serves it directly until it has caught up again *and* its delegate
    is active."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self._commits: deque[int] = deque(maxlen=patience + 1)
        self.direct: set[str] = set()
        """Learners the leader serves itself now."""

    def round(self, committed: int) -> int:
        """Record this round's commit index; returns the index every delegated learner
        should have reached by now (0 until ``patience`` rounds are recorded)."""
        self._commits.append(committed)
        if len(self._commits) <= self.patience:
            return 0
        return self._commits[0]

    def reset(self) -> None:
        """Forget everything (a new term, a new role)."""
        self._commits.clear()
        self.direct.clear()
