"""Unit tests of the Raft stream transport and metrics against a fake libp2p host."""

from __future__ import annotations

import hashlib
import os
import urllib.request
import zlib
from typing import Any

import pytest
import trio

from node.net.metrics import NetMetrics
from node.net.raft_transport import RaftTransport, RaftTransportError
from node.net.validator import PeerFault
from node.net.wire import (
    MAX_RAFT_FRAME,
    PACK_MIN_BYTES,
    WireError,
    encode_uvarint,
    frame,
    pack_raft_frame,
    unpack_raft_frame,
)
from node.raft import Entry, Message, MessageType, decode_message, encode_message
from node.setup.keyfile import NodeIdentity

A = NodeIdentity.from_seed(b"a" * 32)
B = NodeIdentity.from_seed(b"b" * 32)
C = NodeIdentity.from_seed(b"c" * 32)


class FakeStream:
    """An in-memory stream: what one side writes, the other reads."""

    def __init__(self, peer: Any, send: Any, recv: Any, protocol: Any = None) -> None:
        self.muxed_conn = type("Conn", (), {"peer_id": peer})()
        self._send, self._recv = send, recv
        self._buf = b""
        self.was_reset = False
        self.protocol = protocol
        self.written = 0

    def get_protocol(self) -> Any:
        return self.protocol

    async def write(self, data: bytes) -> None:
        self.written += len(data)
        await self._send.send(data)

    async def read(self, n: int = -1) -> bytes:
        if not self._buf:
            try:
                self._buf = await self._recv.receive()
            except trio.EndOfChannel:
                return b""
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    async def reset(self) -> None:
        self.was_reset = True
        await self._send.aclose()

    async def close(self) -> None:
        await self._send.aclose()


class FakeHost:
    """Connects a writer's new_stream to the remote's registered handler."""

    def __init__(self, me: NodeIdentity, block: bool = False, connected: bool = True) -> None:
        self.me = me
        self.block = block
        self.connected = connected
        self.streams_opened = 0
        self.remote: FakeHost | None = None
        self.handlers: dict[Any, Any] = {}
        self.nursery: trio.Nursery | None = None

    def set_stream_handler(self, proto: Any, handler: Any) -> None:
        self.handlers[proto] = handler

    def get_network(self) -> FakeHost:
        return self

    def get_connections(self, peer: Any) -> list[object]:
        return [object()] if self.connected else []

    async def new_stream(self, peer: Any, protos: list[Any]) -> FakeStream:
        self.streams_opened += 1
        if self.block:
            await trio.sleep_forever()
        assert self.remote is not None and self.nursery is not None
        # multistream-select: the first protocol offered that the remote serves
        proto = next(p for p in protos if p in self.remote.handlers)
        send, recv = trio.open_memory_channel[bytes](100)
        inbound = FakeStream(self.me.peer_id, None, recv, proto)
        self.nursery.start_soon(self.remote.handlers[proto], inbound)
        return FakeStream(peer, send, None, proto)


def hb(frm: str, to: str, term: int = 1) -> Message:
    return Message(type=MessageType.HEARTBEAT, to=to, frm=frm, term=term)


async def test_round_trip_and_sender_check() -> None:
    got: list[Message] = []
    ha, hb_ = FakeHost(A), FakeHost(B)
    ha.remote, hb_.remote = hb_, ha
    ta = RaftTransport(ha, A.did, encode_message, decode_message, lambda m: None)
    tb = RaftTransport(hb_, B.did, encode_message, decode_message, got.append)
    async with trio.open_nursery() as nursery:
        ha.nursery = hb_.nursery = nursery
        await nursery.start(ta.run)
        await nursery.start(tb.run)
        for term in range(1, 4):
            assert ta.send(hb(A.did, B.did, term))
        with trio.fail_after(5):
            while len(got) < 3:
                await trio.sleep(0.01)
        assert [m.term for m in got] == [1, 2, 3] and all(m.frm == A.did for m in got)
        with pytest.raises(RaftTransportError):
            ta.send(hb(C.did, B.did))  # not from this node
        # a frame claiming frm=C over A's authenticated stream is refused
        send, recv = trio.open_memory_channel[bytes](10)
        stream = FakeStream(A.peer_id, trio.open_memory_channel[bytes](10)[0], recv)
        forged = encode_message(hb(C.did, B.did, 9))
        await send.send(encode_uvarint(len(forged)) + forged)
        with trio.fail_after(5), pytest.raises(PeerFault) as fault:
            await tb._handle_stream(stream)  # reported to the host's stream guard
        assert fault.value.protocol == "raft" and fault.value.reason == "sender_mismatch"
        assert tb.rejected == {"sender_mismatch": 1} and stream.was_reset
        assert len(got) == 3
        nursery.cancel_scope.cancel()


async def test_slow_peer_queue_drops_instead_of_blocking() -> None:
    host = FakeHost(A, block=True)  # new_stream never completes: a hung peer
    t = RaftTransport(host, A.did, encode_message, decode_message, lambda m: None, queue_size=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(t.run)
        with trio.fail_after(1):  # never blocks the caller
            results = [t.send(hb(A.did, B.did, i)) for i in range(20)]
        assert results.count(False) >= 15 and t.dropped["queue_full"] >= 15
        nursery.cancel_scope.cancel()


def test_metrics_served_on_loopback_only() -> None:
    m = NetMetrics(["peer-a"])
    m.gossip_invalid.labels("bad_signature").inc()
    m.gossip_invalid_by_peer.labels(m.peer_label("stranger")).inc()
    port = m.serve(0)
    try:
        assert m._server.server_address[0] == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b'microgrid_gossip_invalid_total{reason="bad_signature"} 1.0' in body
        assert b'microgrid_gossip_invalid_by_peer_total{peer="other"} 1.0' in body
    finally:
        m.close()


async def test_no_stream_is_opened_to_a_peer_without_a_connection() -> None:
    """The transport never dials: with no connection to the peer its frames are dropped
    (``not_connected``) and no stream is asked for (libp2p would dial identify's addresses)."""
    host = FakeHost(A, connected=False)
    t = RaftTransport(host, A.did, encode_message, decode_message, lambda m: None)
    t.retry_delay = 0.05
    async with trio.open_nursery() as nursery:
        await nursery.start(t.run)
        assert t.send(hb(A.did, B.did))
        with trio.fail_after(5):
            while not t.dropped.get("not_connected"):
                await trio.sleep(0.01)
        assert host.streams_opened == 0
        nursery.cancel_scope.cancel()


def append(frm: str, to: str, entries: int) -> Message:
    """An APP of ``entries`` entries whose data looks like a batch of signed records (a DID,
    field names and a hex signature each): long, and about as compressible as the real log."""
    def data(i: int) -> bytes:
        signature = hashlib.sha512(b"%d" % i).hexdigest().encode()
        return (b'microgrid/batch/v1\n[{"grid":"demo","household":"did:key:z6Mk%d","nonce":%d,'
                b'"signature":"%s","slot":1000,"type":"order"}]' % (i % 50, i, signature))

    batch = [Entry(index=i, term=1, data=data(i)) for i in range(1, entries + 1)]
    return Message(type=MessageType.APP, to=to, frm=frm, term=1, entries=tuple(batch))


Exchange = tuple[RaftTransport, RaftTransport, list[Message], list[Message]]


async def _exchange(packed_a: bool, packed_b: bool) -> Exchange:
    """A sends B a long APP and a heartbeat, B sends A a long APP; both transports and what
    each received."""
    got_a: list[Message] = []
    got_b: list[Message] = []
    ha, hb_ = FakeHost(A), FakeHost(B)
    ha.remote, hb_.remote = hb_, ha
    ta = RaftTransport(ha, A.did, encode_message, decode_message, got_a.append, packed=packed_a)
    tb = RaftTransport(hb_, B.did, encode_message, decode_message, got_b.append, packed=packed_b)
    async with trio.open_nursery() as nursery:
        ha.nursery = hb_.nursery = nursery
        await nursery.start(ta.run)
        await nursery.start(tb.run)
        assert ta.send(append(A.did, B.did, 40)) and ta.send(hb(A.did, B.did, 2))
        assert tb.send(append(B.did, A.did, 40))
        with trio.fail_after(5):
            while len(got_b) < 2 or len(got_a) < 1:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return ta, tb, got_a, got_b


async def test_long_messages_travel_deflated_between_packing_nodes() -> None:
    ta, tb, got_a, got_b = await _exchange(True, True)
    assert got_b == [append(A.did, B.did, 40), hb(A.did, B.did, 2)]  # intact, in order
    assert got_a == [append(B.did, A.did, 40)]
    # the APP went deflated (the heartbeat, under PACK_MIN_BYTES, as it was plus a flag byte)
    assert ta.bytes_sent < 0.6 * ta.bytes_unpacked, (ta.bytes_sent, ta.bytes_unpacked)
    body = ta.metrics.render()
    assert f"microgrid_raft_bytes_sent_total {float(ta.bytes_sent)}".encode() in body
    assert f"microgrid_raft_bytes_unpacked_total {float(ta.bytes_unpacked)}".encode() in body
    assert tb.bytes_sent < 0.6 * tb.bytes_unpacked


async def test_a_node_of_an_older_release_is_sent_plain_frames_both_ways() -> None:
    """B speaks only /microgrid/raft/1 (a release before packing): A falls back to it."""
    for packed_a, packed_b in ((True, False), (False, True)):
        ta, tb, got_a, got_b = await _exchange(packed_a, packed_b)
        assert got_b == [append(A.did, B.did, 40), hb(A.did, B.did, 2)]
        assert got_a == [append(B.did, A.did, 40)]
        assert ta.bytes_sent == ta.bytes_unpacked and tb.bytes_sent == tb.bytes_unpacked


async def test_a_packed_frame_that_inflates_too_far_is_a_fault_of_its_sender() -> None:
    """A deflate bomb (5 MiB of zeros in about 5 kB) is refused once MAX_RAFT_FRAME bytes are
    out, never inflated further; the stream is reset and the fault raised for the host's
    stream guard (counted and penalised there)."""
    tb = RaftTransport(FakeHost(B), B.did, encode_message, decode_message, lambda m: None)
    bomb = b"\x01" + zlib.compress(b"\0" * (MAX_RAFT_FRAME + (1 << 20)), 9)
    assert len(bomb) < 8000
    cases = [("oversized", bomb), ("malformed", b"\x01not deflate"), ("malformed", b"\x07abc")]
    for reason, body in cases:
        send, recv = trio.open_memory_channel[bytes](10)
        stream = FakeStream(A.peer_id, trio.open_memory_channel[bytes](10)[0], recv)
        await send.send(frame(body))
        with trio.fail_after(5), pytest.raises(PeerFault) as fault:
            await tb._handle_packed_stream(stream)
        assert fault.value.reason == reason and stream.was_reset
    assert tb.rejected == {"malformed": 3}


def test_packing_deflates_only_what_it_shrinks_and_unpacking_checks_every_byte() -> None:
    short = encode_message(hb(A.did, B.did))
    assert len(short) < PACK_MIN_BYTES and pack_raft_frame(short) == b"\x00" + short
    noise = os.urandom(4096)  # long but incompressible: sent as it is
    assert pack_raft_frame(noise) == b"\x00" + noise
    long = encode_message(append(A.did, B.did, 40))
    packed = pack_raft_frame(long)
    assert packed[0] == 1 and len(packed) < len(long) / 2
    assert unpack_raft_frame(packed) == long and unpack_raft_frame(b"\x00" + noise) == noise
    full = b"\x01" + zlib.compress(b"\0" * MAX_RAFT_FRAME)  # exactly the limit: accepted
    assert len(unpack_raft_frame(full)) == MAX_RAFT_FRAME
    for bad in (b"", packed + b"x", packed[:-5], b"\x02" + long):
        with pytest.raises(WireError) as err:
            unpack_raft_frame(bad)
        assert err.value.reason == "malformed", bad[:8]
