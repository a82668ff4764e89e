"""The wire encoding of Message and ConfChange: canonical, versioned, strict."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.raft import (
    ConfChange,
    ConfChangeType,
    ConfState,
    DecodeError,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
    decode_conf_change,
    decode_message,
    encode_conf_change,
    encode_message,
)

ids = st.text(min_size=1, max_size=12)
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
small = st.integers(min_value=0, max_value=1 << 40)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    mtype = draw(st.sampled_from(list(MessageType)))
    term = draw(st.integers(min_value=1, max_value=1 << 40))
    index = draw(small)
    entries: tuple[Entry, ...] = ()
    snapshot = None
    if mtype in (MessageType.APP, MessageType.SYNC):
        n = draw(st.integers(min_value=0, max_value=5))
        entries = tuple(
            Entry(
                index + 1 + i,
                draw(st.integers(min_value=1, max_value=term)),
                draw(st.binary(max_size=40)),
                draw(st.sampled_from(list(EntryType))),
            )
            for i in range(n)
        )
    if mtype == MessageType.SNAP:
        voters = tuple(sorted(draw(st.sets(ids, max_size=5))))
        learners = tuple(sorted(draw(st.sets(ids, max_size=3)) - set(voters)))
        snapshot = Snapshot(
            SnapshotMetadata(draw(small), draw(small), ConfState(voters, learners)),
            draw(st.binary(max_size=100)),
        )
    return Message(
        type=mtype,
        to=draw(ids),
        frm=draw(ids),
        term=term,
        log_term=draw(u64),
        index=index,
        entries=entries,
        commit=draw(u64),
        reject=draw(st.booleans()),
        reject_hint=draw(u64),
        snapshot=snapshot,
        context=draw(st.sampled_from([b"", b"transfer"])),
    )


@given(messages())
def test_message_roundtrip_is_exact_and_canonical(m: Message) -> None:
    """decode(encode(m)) == m, and re-encoding yields the same bytes."""
    b = encode_message(m)
    m2 = decode_message(b)
    assert m2 == m
    assert encode_message(m2) == b


@given(messages(), st.data())
def test_truncated_or_extended_input_is_rejected(m: Message, data: st.DataObject) -> None:
    """Any strict prefix, and any trailing garbage, raises DecodeError (never another error)."""
    b = encode_message(m)
    cut = data.draw(st.integers(min_value=0, max_value=len(b) - 1))
    with pytest.raises(DecodeError):
        decode_message(b[:cut])
    with pytest.raises(DecodeError):
        decode_message(b + b"\x00")


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_error(b: bytes) -> None:
    """Garbage never crashes the decoder with anything but DecodeError."""
    try:
        m = decode_message(b)
    except DecodeError:
        return
    assert encode_message(m) == b  # if it decodes, it was canonical


def test_specific_malformations() -> None:
    """Version, type, varint minimality, booleans and message shape are all checked."""
    good = encode_message(Message(MessageType.HEARTBEAT, to="b", frm="a", term=3, commit=2))
    assert decode_message(good).commit == 2
    with pytest.raises(DecodeError, match="version"):
        decode_message(b"\x02" + good[1:])
    with pytest.raises(DecodeError, match="message type"):
        decode_message(good[:1] + b"\x63" + good[2:])
    with pytest.raises(DecodeError, match="non-minimal"):
        decode_message(good[:1] + b"\x87\x00" + good[2:])
    with pytest.raises(DecodeError, match="expected bytes"):
        decode_message("text")  # type: ignore[arg-type]
    snap_without = encode_message(Message(MessageType.SNAP, to="b", frm="a", term=1))
    with pytest.raises(DecodeError, match="snapshot"):
        decode_message(snap_without)
    gap = Message(MessageType.APP, to="b", frm="a", term=2, index=5, entries=(Entry(7, 1, b"x"),))
    with pytest.raises(DecodeError, match="consecutive"):
        decode_message(encode_message(gap))


def test_encoding_is_compact() -> None:
    """A heartbeat is a handful of bytes."""
    hb = Message(MessageType.HEARTBEAT, to="n2", frm="n1", term=7, commit=1234)
    assert len(encode_message(hb)) <= 20


@given(st.sampled_from(list(ConfChangeType)), ids, st.binary(max_size=20))
def test_conf_change_roundtrip(t: ConfChangeType, nid: str, ctx: bytes) -> None:
    """Membership changes round-trip and reject garbage with DecodeError."""
    cc = ConfChange(t, nid, ctx)
    b = encode_conf_change(cc)
    assert decode_conf_change(b) == cc
    with pytest.raises(DecodeError):
        decode_conf_change(b + b"x")
