"""Wire formats of the network layer: gossip batches, topic names, Raft frames.

A gossip message carries a *batch* of signed records, so a household can send its orders of a
round in one message (gossip costs CPU per message, not per record, and gossipsub's queues count
messages). Layout, version 1::

    0x01  varint(batch_seq)  varint(count)  count x (varint(len) record)

``record`` is :func:`market.models.encode_command` of one signed record, byte for byte (decoding
re-encodes and compares, so each record has exactly one accepted encoding and the content hash
of a message identifies its records). Each topic carries its own record kinds only
(:data:`TOPIC_RECORDS`): a record on another topic is ``wrong_topic``. ``batch_seq`` is the
publisher's own counter: it lets a publisher re-send a record in a new message; replay
protection is by the records' nonces. Every varint must be minimal; trailing bytes are an
error.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from enum import StrEnum

from market.models import (
    GOVERNANCE_RECORDS,
    MAX_COMMAND_BYTES,
    CancelOrder,
    CommandDecodeError,
    FeederReading,
    MeterReading,
    Order,
    SignedRecord,
    decode_command,
    encode_command,
)

BATCH_VERSION = 1
MAX_RECORDS_PER_BATCH = 64
MAX_GOSSIP_BYTES = 64 * 1024
"""Upper bound on one gossip message (a batch); larger ones are rejected unread."""
RAFT_PROTOCOL = "/microgrid/raft/1"
"""Raft frames: each the encoded message as it is (every release speaks it)."""
RAFT_PROTOCOL_PACKED = "/microgrid/raft/2"
"""Raft frames of :func:`pack_raft_frame`: a flag byte, then the message, deflated when that
makes it smaller (preferred; a node falls back to ``/microgrid/raft/1`` for an older peer)."""
MAX_RAFT_FRAME = 4 * 1024 * 1024
"""Upper bound on one Raft frame on the stream (a snapshot chunk or a batch of entries), and on
a packed frame's message once inflated."""
PACK_MIN_BYTES = 256
"""Messages shorter than this are sent as they are: heartbeats, votes and responses (about 120
bytes, which deflate hardly shrinks). A message with one entry of one signed record is about
470 bytes and deflates to about 70 %; five records to about 45 %."""
_PACKED_RAW, _PACKED_DEFLATE = 0, 1


class TopicKind(StrEnum):
    """The gossip topics of a grid."""

    ORDERS = "orders"
    READINGS = "readings"
    GOVERNANCE = "governance"
    """The operator's signed governance records (members and rules), relayed by members."""


TOPIC_RECORDS: dict[TopicKind, tuple[type[SignedRecord], ...]] = {
    TopicKind.ORDERS: (Order, CancelOrder),
    TopicKind.READINGS: (MeterReading, FeederReading),
    TopicKind.GOVERNANCE: GOVERNANCE_RECORDS,
}
"""The record kinds each topic carries (disjoint: a record has exactly one topic)."""


def topic_name(grid: str, kind: TopicKind) -> str:
    """The gossipsub topic of ``kind`` in ``grid``: ``/microgrid/<grid>/<kind>/1``."""
    return f"/microgrid/{grid}/{kind.value}/1"


class WireError(ValueError):
    """Bytes that are not a well-formed message; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode_uvarint(n: int) -> bytes:
    """Unsigned LEB128 varint."""
    if n < 0:
        raise ValueError(f"cannot encode negative varint {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a minimal varint at ``pos``; returns (value, new position)."""
    value = 0
    shift = 0
    start = pos
    while True:
        if pos >= len(data):
            raise WireError("malformed", "truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and pos - start > 1:
                raise WireError("malformed", "non-minimal varint")
            if value >= 1 << 64:
                raise WireError("malformed", "varint longer than 64 bits")
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("malformed", "varint longer than 64 bits")


def encode_batch(records: Sequence[SignedRecord], batch_seq: int = 0) -> bytes:
    """Encode signed records as one gossip message."""
    if not 1 <= len(records) <= MAX_RECORDS_PER_BATCH:
        raise ValueError(f"a batch holds 1..{MAX_RECORDS_PER_BATCH} records, got {len(records)}")
    out = bytearray([BATCH_VERSION])
    out += encode_uvarint(batch_seq)
    out += encode_uvarint(len(records))
    for record in records:
        raw = encode_command(record)  # type: ignore[arg-type]
        out += encode_uvarint(len(raw))
        out += raw
    if len(out) > MAX_GOSSIP_BYTES:
        raise ValueError(f"batch of {len(out)} bytes exceeds {MAX_GOSSIP_BYTES}")
    return bytes(out)


def decode_batch(data: bytes, kind: TopicKind) -> list[SignedRecord]:
    """Strictly decode a gossip batch for topic ``kind``; raises :class:`WireError`.

    Reasons: ``oversized`` (message or record over its limit), ``malformed`` (framing, schema,
    non-canonical record bytes), ``wrong_topic`` (a record kind that does not belong here).
    """
    if len(data) > MAX_GOSSIP_BYTES:
        raise WireError("oversized", f"message of {len(data)} bytes exceeds {MAX_GOSSIP_BYTES}")
    if not data or data[0] != BATCH_VERSION:
        raise WireError("malformed", "unknown batch version")
    _seq, pos = read_uvarint(data, 1)
    count, pos = read_uvarint(data, pos)
    if not 1 <= count <= MAX_RECORDS_PER_BATCH:
        raise WireError("malformed", f"batch count {count} outside 1..{MAX_RECORDS_PER_BATCH}")
    allowed = TOPIC_RECORDS[kind]
    records: list[SignedRecord] = []
    for i in range(count):
        length, pos = read_uvarint(data, pos)
        if length > MAX_COMMAND_BYTES:
            raise WireError("oversized", f"record {i} of {length} bytes")
        if pos + length > len(data):
            raise WireError("malformed", f"record {i} truncated")
        raw = data[pos : pos + length]
        pos += length
        try:
            command = decode_command(raw)
        except CommandDecodeError as exc:
            raise WireError("malformed", f"record {i}: {exc}") from None
        if not isinstance(command, allowed):
            raise WireError("wrong_topic", f"record {i} is a {command.type} on {kind.value}")
        if encode_command(command) != raw:
            raise WireError("malformed", f"record {i} is not canonically encoded")
        records.append(command)
    if pos != len(data):
        raise WireError("malformed", f"{len(data) - pos} trailing bytes")
    return records


def frame(payload: bytes) -> bytes:
    """A varint-length-prefixed frame (the Raft stream's framing)."""
    return encode_uvarint(len(payload)) + payload


def pack_raft_frame(message: bytes) -> bytes:
    """The body of a ``/microgrid/raft/2`` frame for an encoded Raft message: flag 1 and the
    message deflated (zlib, level 1: a delegate deflates the same entries for each of its
    learners) when it is at least :data:`PACK_MIN_BYTES` long and that is smaller; else flag 0
    and the message."""
    if len(message) >= PACK_MIN_BYTES:
        packed = zlib.compress(message, 1)
        if len(packed) < len(message):
            return bytes((_PACKED_DEFLATE,)) + packed
    return bytes((_PACKED_RAW,)) + message


def unpack_raft_frame(body: bytes) -> bytes:
    """The encoded Raft message in a ``/microgrid/raft/2`` frame body. Raises
    :class:`WireError` for an empty body, an unknown flag, a broken or trailing deflate stream,
    or a message that would inflate past :data:`MAX_RAFT_FRAME` (never inflated further)."""
    if not body:
        raise WireError("malformed", "empty raft frame")
    flag, payload = body[0], body[1:]
    if flag == _PACKED_RAW:
        return payload
    if flag != _PACKED_DEFLATE:
        raise WireError("malformed", f"unknown raft frame flag {flag}")
    inflater = zlib.decompressobj()
    try:
        message = inflater.decompress(payload, MAX_RAFT_FRAME)
    except zlib.error as exc:
        raise WireError("malformed", f"bad deflate stream: {exc}") from None
    if inflater.unconsumed_tail:
        raise WireError("oversized", f"raft frame inflates past {MAX_RAFT_FRAME} bytes")
    if not inflater.eof or inflater.unused_data:
        raise WireError("malformed", "deflate stream cut short or followed by other bytes")
    return message
