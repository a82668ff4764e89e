"""Typed errors of the Raft core, its codec and its storages."""

from __future__ import annotations


class RaftError(Exception):
    """Base class of every error raised by ``node.raft``."""


class NotLeader(RaftError):
    """A proposal reached a node that is not the leader; ``leader`` is the hint (or None)."""

    def __init__(self, leader: str | None, term: int = 0) -> None:
        super().__init__(f"not the leader; leader is {leader or 'unknown'} (term {term})")
        self.leader = leader
        self.term = term


class ProposalDropped(RaftError):
    """The leader refused a proposal (leadership transfer in progress, pending conf change...)."""


class ConfChangeRejected(ProposalDropped):
    """A membership change was refused (one is pending, or it would be invalid)."""


class CompactedError(RaftError):
    """The requested index lies before the storage's first index (compacted away)."""


class UnavailableError(RaftError):
    """The requested index lies after the storage's last index."""


class SnapshotOutOfDate(RaftError):
    """A snapshot older than the one already held was offered."""


class StorageError(RaftError):
    """Durable storage failed or holds data that cannot be trusted."""


class StorageCorruption(StorageError):
    """Durable storage holds a corrupt record that is not a torn tail; the node must stop."""


class DecodeError(RaftError):
    """Bytes handed to a decoder are not a valid, canonical encoding."""


class ConfigError(RaftError):
    """An invalid ``Config``."""
