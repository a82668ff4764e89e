"""Fuzz the network's binary decoders: gossip batches, varints, Raft frames and their stream.

- ``node.net.wire.decode_batch`` raises only :class:`WireError`; a batch that decodes
  re-encodes to exactly its input bytes (one accepted encoding per batch).
- ``node.net.wire.read_uvarint`` raises only :class:`WireError`; what it reads is the minimal
  encoding of the value.
- ``node.raft.codec.decode_message`` / ``decode_conf_change`` raise only
  :class:`node.raft.errors.DecodeError`; a message that decodes re-encodes byte for byte.
- The Raft stream framing (libp2p ``read_varint_prefixed_bytes_limited`` with
  ``MAX_RAFT_FRAME``, as ``node/net/raft_transport.py`` reads it) over arbitrary stream bytes
  raises only libp2p's typed framing errors and never returns more than the frame limit.
"""

from __future__ import annotations

from functools import cache

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from market.models import CancelOrder, ChangeRules, MeterReading, Order, RemoveMember, SignedRecord
from node.net.wire import (
    MAX_RAFT_FRAME,
    TopicKind,
    WireError,
    decode_batch,
    encode_batch,
    encode_uvarint,
    frame,
    read_uvarint,
)
from node.raft.codec import (
    decode_conf_change,
    decode_message,
    encode_conf_change,
    encode_message,
)
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
from node.tools import market_sim
from tests.fuzz.strategies import expect_only, fuzz_settings, mutated, raw_bytes

# --- gossip batches -----------------------------------------------------------------------------


@cache
def topic_records() -> dict[TopicKind, tuple[SignedRecord, ...]]:
    """Real signed records of a simulated grid, by the topic they travel on."""
    sim = market_sim.build(3, 11)
    commands = list(market_sim.commands(sim, 3, first_slot=40))
    orders = [c for c in commands if isinstance(c, Order)]
    home = sim.households[1].signer
    cancel = CancelOrder(
        grid=sim.config.grid, household=home.did, order_id=orders[0].id, nonce=77
    ).signed_by(home)
    operator = sim.operator
    rules = ChangeRules(
        grid=sim.config.grid, operator=operator.did, nonce=4 * 50, from_slot=50, retail_price=31
    ).signed_by(operator)
    removal = RemoveMember(
        grid=sim.config.grid, operator=operator.did, nonce=4 * 50 + 1, from_slot=50,
        household=home.did,
    ).signed_by(operator)  # fmt: skip
    return {
        TopicKind.ORDERS: (*orders, cancel),
        TopicKind.READINGS: tuple(c for c in commands if isinstance(c, MeterReading)),
        TopicKind.GOVERNANCE: (rules, removal),
    }


@st.composite
def gossip_inputs(draw: st.DrawFn) -> tuple[TopicKind, bytes]:
    """A topic and bytes: raw, or a real batch (possibly for the other topic), mutated."""
    kind = draw(st.sampled_from(list(TopicKind)))
    source = draw(st.sampled_from(list(TopicKind)))
    records = draw(st.lists(st.sampled_from(topic_records()[source]), min_size=1, max_size=5))
    valid = encode_batch(records, batch_seq=draw(st.integers(0, 2**64 - 1)))
    data = draw(st.one_of(raw_bytes(), st.just(valid), mutated(valid)))
    return kind, data


@fuzz_settings()
@given(gossip_inputs())
def test_gossip_batch_decoding_raises_only_wire_error(case: tuple[TopicKind, bytes]) -> None:
    kind, data = case
    records = expect_only(lambda d: decode_batch(d, kind), data, WireError)
    if records is not None:
        seq, _ = read_uvarint(data, 1)
        assert encode_batch(records, batch_seq=seq) == data


@fuzz_settings()
@given(st.binary(max_size=16), st.integers(0, 17))
def test_read_uvarint_raises_only_wire_error_and_reads_minimal_varints(data: bytes, pos: int
                                                                       ) -> None:  # fmt: skip
    result = expect_only(lambda d: read_uvarint(d, pos), data, WireError)
    if result is not None:
        value, end = result
        assert pos < end <= len(data)
        assert encode_uvarint(value) == data[pos:end]


def test_read_uvarint_refuses_values_of_more_than_64_bits() -> None:
    with pytest.raises(WireError):
        read_uvarint(b"\xff" * 9 + b"\x7f", 0)
    with pytest.raises(WireError):
        read_uvarint(b"\x80" * 9 + b"\x02", 0)  # 2**64
    assert read_uvarint(encode_uvarint(2**64 - 1), 0) == (2**64 - 1, 10)


# --- Raft messages --------------------------------------------------------------------------------

A = "did:key:z6MkhEYwD486jgnXacBzfSduAzxA5BauXU7ANMvUdZbjvaF4"
B = "did:key:z6Mkh8VpzM1QKubmcyd8fhgpa3iNZBegmJggbdXVuW64TLE1"
C = "node-c"


@cache
def raft_messages() -> tuple[Message, ...]:
    """One valid message of every type: appends with batches and conf changes, a snapshot."""
    cc = encode_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, C, b"ctx"))
    entries = (
        Entry(11, 3, b""),
        Entry(12, 3, b"microgrid/batch/v1\n[]"),
        Entry(13, 4, cc, EntryType.CONF_CHANGE),
    )
    conf = ConfState(tuple(sorted((A, B))), (C,))
    snap = Snapshot(SnapshotMetadata(40, 4, conf), b"microgrid/snapshot/v1\n{}")
    out = [Message(MessageType.APP, to=B, frm=A, term=4, log_term=3, index=10, entries=entries,
                   commit=9)]  # fmt: skip
    out.append(Message(MessageType.SNAP, to=B, frm=A, term=4, snapshot=snap))
    for t in MessageType:
        if t not in (MessageType.APP, MessageType.SNAP):
            out.append(
                Message(
                    t,
                    to=A,
                    frm=B,
                    term=2**64 - 1,
                    log_term=7,
                    index=2**63 + 5,
                    commit=1,
                    reject=True,
                    reject_hint=3,
                    context=b"transfer",
                )
            )
    return tuple(out)


def test_raft_seed_messages_round_trip() -> None:
    for message in raft_messages():
        assert decode_message(encode_message(message)) == message


@st.composite
def raft_inputs(draw: st.DrawFn) -> bytes:
    """Raw bytes, or a valid message's encoding, mutated."""
    valid = encode_message(draw(st.sampled_from(raft_messages())))
    return draw(st.one_of(raw_bytes(), st.just(valid), mutated(valid, max_ops=3)))


@fuzz_settings()
@given(raft_inputs())
def test_raft_message_decoding_raises_only_decode_error(data: bytes) -> None:
    message = expect_only(decode_message, data, DecodeError)
    if message is not None:
        assert encode_message(message) == data


@fuzz_settings()
@given(st.one_of(
    raw_bytes(64),
    st.builds(ConfChange, st.sampled_from(list(ConfChangeType)), st.text(min_size=1, max_size=20),
              st.binary(max_size=20)).map(encode_conf_change).flatmap(
        lambda b: st.one_of(st.just(b), mutated(b))),
))  # fmt: skip
def test_conf_change_decoding_raises_only_decode_error(data: bytes) -> None:
    cc = expect_only(decode_conf_change, data, DecodeError)
    if cc is not None:
        assert encode_conf_change(cc) == data


# --- the Raft stream's framing ---------------------------------------------------------------


class _Stream:
    """A stream that returns its bytes in chunks of at most ``chunk`` bytes, then EOF."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data = data
        self.chunk = chunk

    async def read(self, n: int | None = None) -> bytes:
        size = min(self.chunk, len(self.data) if n is None else n)
        out, self.data = self.data[:size], self.data[size:]
        return out


HOSTILE_PREFIXES = (
    b"\xff" * 10, b"\xff" * 9 + b"\x7f", b"\x80" * 9 + b"\x02",
    encode_uvarint(MAX_RAFT_FRAME + 1), encode_uvarint(MAX_RAFT_FRAME) + b"\x01",
    encode_uvarint(2**64 - 1),
)  # fmt: skip
"""Length prefixes over 64 bits, over the frame limit, or announcing bytes that never come."""
FRAMING_ERRORS = (ParseError, MessageTooLarge, IncompleteReadError)


async def _read_frames(stream: _Stream) -> list[bytes]:
    """What the Raft stream handler does: read frames until one fails, decode each."""
    frames = []
    while stream.data:
        try:
            data = await read_varint_prefixed_bytes_limited(stream, MAX_RAFT_FRAME)
        except FRAMING_ERRORS:
            break
        assert len(data) <= MAX_RAFT_FRAME
        frames.append(data)
    return frames


@st.composite
def stream_inputs(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """Stream bytes: valid frames of valid messages, then mutated; and the frames' payloads."""
    payloads = [encode_message(m) for m in draw(st.lists(st.sampled_from(raft_messages()),
                                                          max_size=4))]  # fmt: skip
    valid = b"".join(frame(p) for p in payloads)
    hostile = st.sampled_from(HOSTILE_PREFIXES)
    data = draw(st.one_of(st.just(valid), raw_bytes(), mutated(valid),
                          hostile.map(lambda h: valid + h)))  # fmt: skip
    return data, payloads if data == valid else []


@fuzz_settings()
@given(stream_inputs(), st.integers(1, 64))
def test_raft_stream_framing_raises_only_typed_errors(case: tuple[bytes, list[bytes]],
                                                       chunk: int) -> None:  # fmt: skip
    data, payloads = case
    frames = trio.run(_read_frames, _Stream(data, chunk))
    for payload in frames:
        message = expect_only(decode_message, payload, DecodeError)
        if message is not None:
            assert encode_message(message) == payload
    if payloads:
        assert frames == payloads
