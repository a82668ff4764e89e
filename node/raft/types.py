"""Plain, immutable data types of the Raft core: entries, state, snapshots, messages, Ready."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

NONE = ""
"""The empty node id: "no vote", "no leader"."""


class EntryType(enum.IntEnum):
    """What an entry's ``data`` holds."""

    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. ``data`` is opaque to Raft for NORMAL entries (empty = leader no-op)."""

    index: int
    term: int
    data: bytes = b""
    type: EntryType = EntryType.NORMAL


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message is sent: current term, vote, commit index."""

    term: int = 0
    vote: str = NONE
    commit: int = 0

    def is_empty(self) -> bool:
        """True for the state of a node that has never persisted anything."""
        return self.term == 0 and self.vote == NONE and self.commit == 0


class RaftRole(enum.StrEnum):
    """A node's role as reported by ``status()`` and ``SoftState``."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"
    LEARNER = "learner"


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth telling the application about; never persisted."""

    role: RaftRole
    leader: str
    term: int


@dataclass(frozen=True, slots=True)
class ConfState:
    """The cluster membership: voters decide, learners only replicate."""

    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SnapshotMetadata:
    """Where a snapshot sits in the log and the membership at that point."""

    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Application state up to and including ``metadata.index``; ``data`` is opaque."""

    metadata: SnapshotMetadata = field(default_factory=SnapshotMetadata)
    data: bytes = b""

    def is_empty(self) -> bool:
        """True for the placeholder snapshot at index 0."""
        return self.metadata.index == 0


class ConfChangeType(enum.IntEnum):
    """Single-server membership changes."""

    ADD_VOTER = 0
    REMOVE_NODE = 1
    ADD_LEARNER = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    """One membership change, carried in a CONF_CHANGE entry (see ``codec``).

    ADD_VOTER on a learner promotes it; ADD_LEARNER on a voter demotes it.
    """

    type: ConfChangeType
    node_id: str
    context: bytes = b""


class MessageType(enum.IntEnum):
    """Wire message types. Values are part of the encoding: never renumber."""

    APP = 1
    APP_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    PRE_VOTE = 5
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAP = 9
    TIMEOUT_NOW = 10
    TRANSFER_LEADER = 11
    SYNC = 12
    """A delegate voter's committed entries for a learner (``Config.delegate_learners``)."""
    SYNC_RESP = 13


@dataclass(frozen=True, slots=True)
class Message:
    """A Raft message between two nodes, delivered in-process as is or via ``codec``.

    ``index``/``log_term`` name the entry preceding ``entries`` (APP), the candidate's last
    entry (VOTE/PRE_VOTE), or the acknowledged/rejected index (APP_RESP). ``reject_hint``
    with ``log_term`` carries the follower's fast back-up hint on a rejected APP.
    ``context`` marks a leader-transfer election (``b"transfer"``).
    """

    type: MessageType
    to: str
    frm: str
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the caller must do, in order: persist, send, apply; then ``advance``.

    1. ``storage.apply_snapshot(snapshot)`` if ``snapshot`` is not None,
       ``storage.append(entries)``, ``storage.set_hard_state(hard_state)`` if not None;
    2. send ``messages``;
    3. apply ``committed_entries`` in order (and install ``snapshot`` into the application).
    """

    soft_state: SoftState | None
    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None
    messages: tuple[Message, ...]
    committed_entries: tuple[Entry, ...]

    def contains_updates(self) -> bool:
        """True when the caller has anything to do."""
        return bool(
            self.soft_state is not None
            or self.hard_state is not None
            or self.entries
            or self.snapshot is not None
            or self.messages
            or self.committed_entries
        )


@dataclass(frozen=True, slots=True)
class Status:
    """A read-only view of a node, for tests, metrics and the CLI."""

    id: str
    role: str
    term: int
    leader: str | None
    commit: int
    applied: int
    vote: str
    last_index: int
    first_index: int
    voters: tuple[str, ...]
    learners: tuple[str, ...]
    progress: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    """Leader only: peer -> (match, next, state)."""
    lead_transferee: str | None = None
    direct_learners: tuple[str, ...] = ()
    """Leader with ``delegate_learners``: the learners it serves itself because they fell
    behind their delegate (``node.raft.delegation``)."""
    serving: tuple[str, ...] = ()
    """Follower voter with ``delegate_learners``: the learners it serves committed entries."""
