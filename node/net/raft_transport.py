"""Raft messages over the libp2p stream protocols ``/microgrid/raft/2`` and ``/microgrid/raft/1``.

One persistent outbound stream per peer carries varint-length-prefixed frames, each the
canonical encoding of one Raft ``Message`` (the encoder/decoder pair is injected: normally
``node.raft.encode_message`` / ``decode_message``). On ``/microgrid/raft/2`` (offered first) a
frame is a flag byte and the message, deflated when it is long and that makes it smaller
(:func:`~node.net.wire.pack_raft_frame`): a batch of entries is about half its size or less,
which matters most for the voters that replicate every entry to their delegated learners. A
peer of an older release answers only ``/microgrid/raft/1``, where a frame is the message as
it is; both are served. Sending never blocks the caller: each peer
has a bounded queue, and a frame that does not fit is dropped and counted (Raft tolerates loss
and retransmits). A writer task per peer drains its queue; on a stream error it drops the
frame, counts the error and reopens the stream after a short back-off.

Inbound, a frame is accepted only if the authenticated remote peer *is* ``message.frm`` (Raft
node ids are household DIDs, and the DID and the peer id are the same Ed25519 key) and
``message.to`` is this node; otherwise the frame is counted and the stream reset. A frame that
breaks the protocol (bad varint, oversized, cut short or not completed within
``write_timeout``, undecodable, forged sender) also raises :class:`~node.net.validator.PeerFault`
from the handler, for the host's stream guard to count against the peer and penalise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from market.did import IdentityError
from node.net.metrics import NetMetrics
from node.net.validator import PeerFault
from node.net.wire import (
    MAX_RAFT_FRAME,
    RAFT_PROTOCOL,
    RAFT_PROTOCOL_PACKED,
    WireError,
    encode_uvarint,
    frame,
    pack_raft_frame,
    read_uvarint,
    unpack_raft_frame,
)
from node.setup.keyfile import did_from_peer_id, peer_id_from_did

log = logging.getLogger("microgrid.net.raft")

RAFT_PROTOCOL_ID = TProtocol(RAFT_PROTOCOL)
RAFT_PROTOCOL_PACKED_ID = TProtocol(RAFT_PROTOCOL_PACKED)


class RaftMessage(Protocol):
    """What the transport needs of a Raft message: sender and recipient node ids (DIDs)."""

    @property
    def to(self) -> str: ...

    @property
    def frm(self) -> str: ...


Encoder = Callable[[Any], bytes]
Decoder = Callable[[bytes], Any]


class RaftTransportError(Exception):
    """A Raft message cannot be sent (unknown or malformed recipient)."""


@dataclass
class _Peer:
    peer_id: ID
    send: trio.MemorySendChannel[bytes]
    recv: trio.MemoryReceiveChannel[bytes]


class RaftTransport:
    """Sends and receives Raft messages for the local node ``local_did`` over ``host``.

    ``on_message(msg)`` is called (synchronously, from the stream handler task) for every
    accepted inbound message; it must not block (hand the message to the Raft driver's own
    queue). Start with :meth:`run` in a nursery (``await nursery.start(transport.run)``).
    """

    def __init__(
        self,
        host: Any,
        local_did: str,
        encode: Encoder,
        decode: Decoder,
        on_message: Callable[[Any], None],
        *,
        metrics: NetMetrics | None = None,
        queue_size: int = 256,
        write_timeout: float = 5.0,
        open_timeout: float = 5.0,
        retry_delay: float = 0.2,
        allowed: Callable[[str], bool] | None = None,
        packed: bool = True,
    ) -> None:
        self.host = host
        self.local_did = local_did
        self.encode = encode
        self.decode = decode
        self.on_message = on_message
        self.metrics = metrics or NetMetrics()
        self.queue_size = queue_size
        self.write_timeout = write_timeout
        self.open_timeout = open_timeout
        self.retry_delay = retry_delay
        self.allowed = allowed
        self.protocols = (
            (RAFT_PROTOCOL_PACKED_ID, RAFT_PROTOCOL_ID) if packed else (RAFT_PROTOCOL_ID,)
        )
        """Served, and offered in this order when opening a stream (``packed`` False: only
        ``/microgrid/raft/1``, as a release before packed frames)."""
        self._peers: dict[str, _Peer] = {}
        self._nursery: trio.Nursery | None = None
        self.sent = 0
        self.bytes_sent = 0
        """Bytes written to the streams (frames as sent: packed where the peer takes it)."""
        self.bytes_unpacked = 0
        """The same frames' bytes had they been sent unpacked (``bytes_sent`` / this: what
        packing saves)."""
        self.received = 0
        self.dropped: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.drop_inbound: Callable[[ID], bool] | None = None
        self.drop_outbound: Callable[[ID], bool] | None = None
        """Test-only fault injection (node/net/faults.py; set by the host): called with the
        remote peer for each accepted inbound frame / each frame queued to it; True drops it
        (counted as ``fault_injected``), as a lossy link would."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register the stream handler and run the per-peer writers until cancelled."""
        self.host.set_stream_handler(RAFT_PROTOCOL_ID, self._handle_stream)
        if RAFT_PROTOCOL_PACKED_ID in self.protocols:
            self.host.set_stream_handler(RAFT_PROTOCOL_PACKED_ID, self._handle_packed_stream)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for peer in self._peers.values():
                peer.send.close()
            self._peers.clear()

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.metrics.raft_dropped.labels(reason).inc()

    def send(self, msg: Any) -> bool:
        """Queue ``msg`` for ``msg.to``; never blocks. False if it was dropped."""
        if msg.frm != self.local_did:
            raise RaftTransportError(f"message from {msg.frm} is not from this node")
        if msg.to == self.local_did:
            raise RaftTransportError("a node does not send Raft messages to itself")
        peer = self._peers.get(msg.to)
        if peer is None:
            if self._nursery is None:
                self._drop("not_running")
                return False
            try:
                peer_id = peer_id_from_did(msg.to)
            except IdentityError as exc:
                raise RaftTransportError(f"cannot address {msg.to!r}: {exc}") from None
            send, recv = trio.open_memory_channel[bytes](self.queue_size)
            peer = self._peers[msg.to] = _Peer(peer_id, send, recv)
            self._nursery.start_soon(self._writer, msg.to, peer)
        if self.drop_outbound is not None and self.drop_outbound(peer.peer_id):
            self._drop("fault_injected")
            return False
        data = self.encode(msg)
        if len(encode_uvarint(len(data))) + len(data) > MAX_RAFT_FRAME:
            self._drop("too_large")
            return False
        try:
            peer.send.send_nowait(data)
        except trio.WouldBlock:
            self._drop("queue_full")
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._drop("not_running")
            return False
        return True

    async def _writer(self, did: str, peer: _Peer) -> None:
        stream = None
        packed = False
        try:
            async for data in peer.recv:
                if stream is None:
                    # only over a connection the node's reconnect loops made: new_stream would
                    # otherwise dial the peer itself, at whatever addresses identify stored (a
                    # home's private or 0.0.0.0 listen address: our own machine), bypassing
                    # the relays, the topology and the back-off
                    if not self.host.get_network().get_connections(peer.peer_id):
                        self._drop("not_connected")
                        await self._backoff(peer)
                        continue
                    try:
                        with trio.fail_after(self.open_timeout):
                            stream = await self.host.new_stream(peer.peer_id,
                                                                list(self.protocols))  # fmt: skip
                    except Exception as exc:
                        self._stream_error("open", did, exc)
                        self._drop("no_stream")
                        await self._backoff(peer)
                        continue
                    packed = stream.get_protocol() == RAFT_PROTOCOL_PACKED_ID
                try:
                    wire = frame(pack_raft_frame(data) if packed else data)
                    with trio.fail_after(self.write_timeout):
                        await stream.write(wire)
                    self.sent += 1
                    self.bytes_sent += len(wire)
                    unpacked = len(encode_uvarint(len(data))) + len(data)
                    self.bytes_unpacked += unpacked
                    self.metrics.raft_sent.inc()
                    self.metrics.raft_bytes_sent.inc(len(wire))
                    self.metrics.raft_bytes_unpacked.inc(unpacked)
                except Exception as exc:
                    self._stream_error("write", did, exc)
                    self._drop("write_failed")
                    await _reset(stream)
                    stream = None
                    await self._backoff(peer)
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await _reset(stream)

    async def _backoff(self, peer: _Peer) -> None:
        """Wait before reopening, dropping what queued meanwhile (it is stale for Raft)."""
        await trio.sleep(self.retry_delay)
        while True:
            try:
                peer.recv.receive_nowait()
            except trio.WouldBlock:
                return
            self._drop("stale")

    def _stream_error(self, kind: str, did: str, exc: BaseException) -> None:
        self.metrics.stream_errors.labels(f"raft_{kind}").inc()
        log.info("raft stream %s error with %s: %s", kind, did[:24], exc)

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.metrics.raft_dropped.labels(reason).inc()

    async def _handle_packed_stream(self, stream: Any) -> None:
        """Inbound ``/microgrid/raft/2`` stream: as :meth:`_handle_stream`, each frame
        unpacked first (a frame that does not unpack is a protocol violation)."""
        await self._handle_stream(stream, packed=True)

    async def _handle_stream(self, stream: Any, packed: bool = False) -> None:
        """Inbound stream: read frames until EOF; check each sender; hand over.

        A peer's protocol violation (bad varint, oversized or incomplete frame, undecodable
        message, forged sender) resets the stream and raises :class:`PeerFault`, which the
        host's stream guard (``node.net.host.install_stream_guard``) counts and penalises; the
        stream or connection going away is only counted here.
        """
        remote: ID = stream.muxed_conn.peer_id
        try:
            remote_did = did_from_peer_id(remote)
        except IdentityError:
            self._reject("bad_peer")
            await _reset(stream)
            return
        if self.allowed is not None and not self.allowed(remote_did):
            self._reject("not_member")
            await _reset(stream)
            return
        while True:
            try:
                data = await self._read_frame(stream)
            except PeerFault:
                self._reject("malformed")
                await _reset(stream)
                raise
            except Exception as exc:
                # EOF/reset when the peer goes away: expected, but counted
                self._stream_error("read", remote_did, exc)
                await _reset(stream)
                return
            if data is None:
                await _reset(stream)
                return
            if packed:
                try:
                    data = unpack_raft_frame(data)
                except WireError as exc:
                    self._reject("malformed")
                    await _reset(stream)
                    raise PeerFault("raft", exc.reason, exc.detail) from None
            try:
                msg = self.decode(data)
            except Exception as exc:
                self._reject("malformed")
                await _reset(stream)
                raise PeerFault("raft", "malformed", f"{type(exc).__name__}: {exc}") from None
            if msg.frm != remote_did or msg.to != self.local_did:
                self._reject("sender_mismatch")
                await _reset(stream)
                raise PeerFault(
                    "raft", "sender_mismatch",
                    f"frame claims frm={msg.frm[:24]} to={msg.to[:24]}, came from "
                    f"{remote_did[:24]}",
                )  # fmt: skip
            if self.drop_inbound is not None and self.drop_inbound(remote):
                self._reject("fault_injected")
                continue
            self.received += 1
            self.metrics.raft_received.inc()
            self.on_message(msg)

    async def _read_frame(self, stream: Any) -> bytes | None:
        """One varint-prefixed frame; None at a clean EOF between frames.

        No deadline on the wait for a frame's first byte (the stream lives as long as the
        connection; this task is cancelled with the host); the rest of an announced frame must
        arrive within ``write_timeout``. Raises :class:`PeerFault` for a bad varint, a frame
        over ``MAX_RAFT_FRAME`` or one cut short.
        """
        first = await stream.read(1)
        if not first:
            return None
        prefix = bytearray(first)
        try:
            with trio.fail_after(self.write_timeout):
                while prefix[-1] & 0x80:
                    if len(prefix) >= 10:
                        raise PeerFault("raft", "bad_varint", "length prefix over 10 bytes")
                    more = await stream.read(1)
                    if not more:
                        raise PeerFault("raft", "truncated", "EOF inside a length prefix")
                    prefix += more
                length, _ = read_uvarint(bytes(prefix), 0)
                if length > MAX_RAFT_FRAME:
                    raise PeerFault("raft", "oversized", f"frame of {length} bytes announced")
                body = bytearray()
                while len(body) < length:
                    chunk = await stream.read(length - len(body))
                    if not chunk:
                        raise PeerFault("raft", "truncated", f"EOF after {len(body)}/{length}")
                    body += chunk
        except trio.TooSlowError:
            raise PeerFault("raft", "truncated", "frame not completed in time") from None
        except WireError as exc:
            raise PeerFault("raft", "bad_varint", exc.detail) from None
        return bytes(body)


async def _reset(stream: Any) -> None:
    with trio.move_on_after(1.0):
        with contextlib.suppress(Exception):
            await stream.reset()
