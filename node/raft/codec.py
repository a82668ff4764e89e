"""Canonical, versioned, compact byte encodings of ``Message`` and ``ConfChange``.

Layout (version 1): a version byte, then fields in a fixed order. Integers are unsigned
LEB128 varints in their shortest form; strings and bytes are a varint length then the
bytes (UTF-8 for strings); booleans are one byte 0/1; sequences are a varint count then
the items. Voter/learner lists are sorted and unique. Decoding is strict: any deviation
(unknown version or type, non-minimal varint, bad UTF-8, trailing bytes, out-of-range
values, non-consecutive append entries) raises ``DecodeError``, so every valid message has
exactly one encoding.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TypeVar

from node.raft.errors import DecodeError
from node.raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

MESSAGE_VERSION = 1
CONF_CHANGE_VERSION = 1
MAX_ID_LEN = 255
MAX_U64 = (1 << 64) - 1
MAX_MESSAGE_BYTES = 64 << 20
"""Largest message accepted by ``decode_message`` (64 MiB)."""


def _varint(out: bytearray, n: int) -> None:
    if n < 0 or n > MAX_U64:
        raise ValueError(f"integer out of range for encoding: {n}")
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _bytes(out: bytearray, b: bytes) -> None:
    _varint(out, len(b))
    out += b


def _str(out: bytearray, s: str) -> None:
    raw = s.encode("utf-8")
    if len(raw) > MAX_ID_LEN:
        raise ValueError(f"id longer than {MAX_ID_LEN} bytes")
    _bytes(out, raw)


def _ids(out: bytearray, ids: tuple[str, ...]) -> None:
    ordered = sorted(set(ids))
    _varint(out, len(ordered))
    for i in ordered:
        _str(out, i)


class _Reader:
    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes, got {type(data).__name__}")
        self.buf = bytes(data)
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise DecodeError("truncated input")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        n = 0
        shift = 0
        start = self.pos
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                raise DecodeError("varint too long")
        if n > MAX_U64:
            raise DecodeError("varint out of range")
        if self.pos - start > 1 and self.buf[self.pos - 1] == 0:
            raise DecodeError("non-minimal varint")
        return n

    def raw(self, limit: int | None = None) -> bytes:
        n = self.varint()
        if limit is not None and n > limit:
            raise DecodeError(f"field of {n} bytes exceeds limit {limit}")
        if self.pos + n > len(self.buf):
            raise DecodeError("truncated input")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def string(self) -> str:
        raw = self.raw(MAX_ID_LEN)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid UTF-8 in id") from exc

    def boolean(self) -> bool:
        b = self.byte()
        if b > 1:
            raise DecodeError(f"invalid boolean byte {b}")
        return b == 1

    def ids(self) -> tuple[str, ...]:
        n = self.varint()
        if n > len(self.buf):
            raise DecodeError("id count exceeds input size")
        out = tuple(self.string() for _ in range(n))
        if list(out) != sorted(set(out)):
            raise DecodeError("id list not sorted and unique")
        return out

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise DecodeError(f"{len(self.buf) - self.pos} trailing bytes")


_E = TypeVar("_E", bound=IntEnum)


def _enum(cls: type[_E], value: int, what: str) -> _E:
    try:
        return cls(value)
    except ValueError as exc:
        raise DecodeError(f"unknown {what} {value}") from exc


def encode_message(m: Message) -> bytes:
    """The canonical version-1 encoding of ``m``."""
    out = bytearray([MESSAGE_VERSION])
    _varint(out, int(m.type))
    _str(out, m.to)
    _str(out, m.frm)
    _varint(out, m.term)
    _varint(out, m.log_term)
    _varint(out, m.index)
    _varint(out, m.commit)
    out.append(1 if m.reject else 0)
    _varint(out, m.reject_hint)
    if len(m.context) > MAX_ID_LEN:
        raise ValueError(f"context longer than {MAX_ID_LEN} bytes")
    _bytes(out, m.context)
    _varint(out, len(m.entries))
    for e in m.entries:
        _varint(out, e.index)
        _varint(out, e.term)
        _varint(out, int(e.type))
        _bytes(out, e.data)
    if m.snapshot is None:
        out.append(0)
    else:
        out.append(1)
        meta = m.snapshot.metadata
        _varint(out, meta.index)
        _varint(out, meta.term)
        _ids(out, meta.conf_state.voters)
        _ids(out, meta.conf_state.learners)
        _bytes(out, m.snapshot.data)
    return bytes(out)


def decode_message(data: bytes) -> Message:
    """Decode a message; raises ``DecodeError`` on anything but a canonical encoding."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    r = _Reader(data)
    version = r.byte()
    if version != MESSAGE_VERSION:
        raise DecodeError(f"unsupported message version {version}")
    mtype = _enum(MessageType, r.varint(), "message type")
    to = r.string()
    frm = r.string()
    term = r.varint()
    log_term = r.varint()
    index = r.varint()
    commit = r.varint()
    reject = r.boolean()
    reject_hint = r.varint()
    context = r.raw(MAX_ID_LEN)
    n = r.varint()
    if n > len(data):
        raise DecodeError("entry count exceeds input size")
    entries = []
    for i in range(n):
        e_index = r.varint()
        e_term = r.varint()
        e_type = _enum(EntryType, r.varint(), "entry type")
        e_data = r.raw()
        if e_index != index + 1 + i:
            raise DecodeError("entries are not consecutive after the message index")
        if e_term > term or e_term == 0:
            raise DecodeError("entry term out of range")
        entries.append(Entry(e_index, e_term, e_data, e_type))
    snapshot = None
    if r.boolean():
        s_index = r.varint()
        s_term = r.varint()
        voters = r.ids()
        learners = r.ids()
        if set(voters) & set(learners):
            raise DecodeError("a node is both voter and learner in the snapshot")
        s_data = r.raw()
        meta = SnapshotMetadata(s_index, s_term, ConfState(voters, learners))
        snapshot = Snapshot(meta, s_data)
    r.end()
    if entries and mtype not in (MessageType.APP, MessageType.SYNC):
        raise DecodeError(f"{mtype.name} message cannot carry entries")
    if (snapshot is None) != (mtype != MessageType.SNAP):
        raise DecodeError("exactly SNAP messages carry a snapshot")
    if not to or not frm:
        raise DecodeError("empty sender or recipient")
    return Message(
        type=mtype,
        to=to,
        frm=frm,
        term=term,
        log_term=log_term,
        index=index,
        entries=tuple(entries),
        commit=commit,
        reject=reject,
        reject_hint=reject_hint,
        snapshot=snapshot,
        context=context,
    )


def encode_conf_change(cc: ConfChange) -> bytes:
    """The canonical version-1 encoding of a membership change (a CONF_CHANGE entry's data)."""
    out = bytearray([CONF_CHANGE_VERSION])
    _varint(out, int(cc.type))
    _str(out, cc.node_id)
    _bytes(out, cc.context)
    return bytes(out)


def decode_conf_change(data: bytes) -> ConfChange:
    """Decode a membership change; raises ``DecodeError`` on malformed input."""
    r = _Reader(data)
    version = r.byte()
    if version != CONF_CHANGE_VERSION:
        raise DecodeError(f"unsupported conf change version {version}")
    cc_type = _enum(ConfChangeType, r.varint(), "conf change type")
    node_id = r.string()
    context = r.raw()
    r.end()
    if not node_id:
        raise DecodeError("empty node id")
    return ConfChange(cc_type, node_id, context)
