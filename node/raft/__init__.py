"""A Raft core in the etcd-raft style: pure state machine, simulator, durable storage.

The core (everything here except ``storage_sql``) does no I/O and reads no clock: it is
driven by ``tick``/``step``/``propose`` and hands out work in ``Ready`` objects.
See docs/raft.md.
"""

from node.raft.codec import (
    decode_conf_change,
    decode_message,
    encode_conf_change,
    encode_message,
)
from node.raft.config import Config
from node.raft.errors import (
    CompactedError,
    ConfChangeRejected,
    ConfigError,
    DecodeError,
    NotLeader,
    ProposalDropped,
    RaftError,
    SnapshotOutOfDate,
    StorageCorruption,
    StorageError,
    UnavailableError,
)
from node.raft.node import RaftNode
from node.raft.storage import MemoryStorage, Storage
from node.raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    RaftRole,
    Ready,
    Snapshot,
    SnapshotMetadata,
    SoftState,
    Status,
)

__all__ = [
    "CompactedError",
    "ConfChange",
    "ConfChangeRejected",
    "ConfChangeType",
    "ConfState",
    "Config",
    "ConfigError",
    "DecodeError",
    "Entry",
    "EntryType",
    "HardState",
    "MemoryStorage",
    "Message",
    "MessageType",
    "NotLeader",
    "ProposalDropped",
    "RaftError",
    "RaftNode",
    "RaftRole",
    "Ready",
    "Snapshot",
    "SnapshotMetadata",
    "SnapshotOutOfDate",
    "SoftState",
    "Status",
    "Storage",
    "StorageCorruption",
    "StorageError",
    "UnavailableError",
    "decode_conf_change",
    "decode_message",
    "encode_conf_change",
    "encode_message",
]
