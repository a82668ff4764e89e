"""``Config``: a node's identity, bootstrap membership and timing, validated."""

from __future__ import annotations

from dataclasses import dataclass

from node.raft.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Config:
    """How a Raft node behaves.

    ``voters``/``learners`` are the bootstrap (genesis) membership of the group: every node,
    including one joining later, is given the same genesis membership and learns later
    changes from the log or from a snapshot. Times are in ticks. All randomness comes from
    ``random.Random`` seeded with (``seed``, ``id``).
    """

    id: str
    voters: tuple[str, ...]
    learners: tuple[str, ...] = ()
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    seed: int = 0
    max_size_per_msg: int = 1 << 20
    """Byte budget of entry data per append message (at least one entry is always sent)."""
    max_inflight: int = 256
    """Append messages in flight per follower while replicating."""
    max_committed_size_per_ready: int | None = None
    """Byte budget of committed entries handed out per Ready (None: unlimited)."""
    learner_heartbeat_rounds: int = 1
    """A learner that is caught up (replicating, every entry acknowledged) gets a heartbeat
    only every this many heartbeat rounds; one that is behind, probing or being sent a
    snapshot gets every round's. Learners never campaign and learn each commit from the append
    the leader broadcasts when its commit index advances, so their heartbeats only refresh the
    leader's view of them: with many learners this is most of an idle leader's messages."""
    delegate_learners: bool = False
    """The leader replicates to the voters only; each learner gets the committed entries from
    one other voter, its delegate (``node.raft.delegation``), so the leader's bytes per entry
    stop growing with the number of learners. The leader still heartbeats every learner and
    serves one itself while it falls behind."""
    delegate_patience: int = 3
    """Heartbeat rounds a delegated learner may stay behind the commit index before the
    leader serves it directly."""

    def __post_init__(self) -> None:
        if not self.id:
            raise ConfigError("id must be a non-empty string")
        if self.heartbeat_tick <= 0:
            raise ConfigError("heartbeat_tick must be > 0")
        if self.election_tick <= self.heartbeat_tick:
            raise ConfigError("election_tick must be greater than heartbeat_tick")
        if set(self.voters) & set(self.learners):
            raise ConfigError("a node cannot be both voter and learner")
        if len(set(self.voters)) != len(self.voters) or len(set(self.learners)) != len(
            self.learners
        ):
            raise ConfigError("duplicate ids in voters or learners")
        if self.learner_heartbeat_rounds <= 0:
            raise ConfigError("learner_heartbeat_rounds must be > 0")
        if self.delegate_patience <= 0:
            raise ConfigError("delegate_patience must be > 0")
        if self.max_inflight <= 0:
            raise ConfigError("max_inflight must be > 0")
