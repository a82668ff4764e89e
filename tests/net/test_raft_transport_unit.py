"""Unit tests of the Raft stream transport and metrics against a fake libp2p host."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
import trio

from node.net.metrics import NetMetrics
from node.net.raft_transport import RaftTransport, RaftTransportError
from node.net.validator import PeerFault
from node.net.wire import encode_uvarint
from node.raft import Message, MessageType, decode_message, encode_message
from node.setup.keyfile import NodeIdentity

A = NodeIdentity.from_seed(b"a" * 32)
B = NodeIdentity.from_seed(b"b" * 32)
C = NodeIdentity.from_seed(b"c" * 32)


class FakeStream:
    """An in-memory stream: what one side writes, the other reads."""

    def __init__(self, peer: Any, send: Any, recv: Any) -> None:
        self.muxed_conn = type("Conn", (), {"peer_id": peer})()
        self._send, self._recv = send, recv
        self._buf = b""
        self.was_reset = False

    async def write(self, data: bytes) -> None:
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
        self.handler: Any = None
        self.nursery: trio.Nursery | None = None

    def set_stream_handler(self, proto: Any, handler: Any) -> None:
        self.handler = handler

    def get_network(self) -> FakeHost:
        return self

    def get_connections(self, peer: Any) -> list[object]:
        return [object()] if self.connected else []

    async def new_stream(self, peer: Any, protos: list[Any]) -> FakeStream:
        self.streams_opened += 1
        if self.block:
            await trio.sleep_forever()
        assert self.remote is not None and self.nursery is not None
        send, recv = trio.open_memory_channel[bytes](100)
        self.nursery.start_soon(self.remote.handler, FakeStream(self.me.peer_id, None, recv))
        return FakeStream(peer, send, None)


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
