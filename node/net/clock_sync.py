"""Members' clocks compared over the libp2p stream protocol ``/microgrid/time/1`` (NTP-style).

One exchange per stream, both frames varint-length-prefixed (:func:`node.net.wire.frame`), fixed
sizes, every integer big-endian:

- request (9 bytes): ``0x01`` (version), an 8-byte nonce;
- response (25 bytes): ``0x01``, the request's nonce, ``t1`` and ``t2`` as signed 64-bit
  nanoseconds since the Unix epoch by the server's wall clock: when the request was read and
  when the response is written.

The asker notes ``t0`` (its wall clock just before writing the request) and ``t3`` (just after
reading the response) and hands the four times to its clock estimator
(:class:`node.daemon.clock.ClockEstimator`, which checks them: a lying peer can only move its own
sample, and the median over every member's clock keeps a minority of liars out). Opening the
stream (protocol negotiation) happens before ``t0``, so it does not count in the round trip.

Hostile input. A frame longer than ``MAX_FRAME`` bytes, a bad varint, a payload of the wrong
size or version, a request not sent within ``READ_TIMEOUT`` seconds: the stream is closed and
the server raises :class:`~node.net.validator.PeerFault` (``time``, ``malformed`` /
``oversized`` / ``timeout``), which the host's stream guard counts against the peer and
penalises. Each peer has a token bucket (``rate`` per second, ``burst``): a request beyond it
is not answered and raises ``rate_limited`` (lightly penalised: a flood ends in a ban). Only
members are answered. Nothing a peer sends can raise out of the handler other than a
:class:`PeerFault` (contained to its stream by the host's guard).

:class:`TimeSampler` asks each connected member once on connecting and then every ``interval``
seconds (jittered by ``jitter``), never more often than ``min_interval`` (2 s; a server's default
budget is 1 request per second per peer, burst 5). With more than ``peers_per_interval`` (8)
members connected the interval stretches in proportion, up to 5 times: a node makes about 8
requests per ``interval`` whatever the grid's size (issue 19).
"""

from __future__ import annotations

import contextlib
import logging
import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import MessageTooLarge
from libp2p.peer.id import ID
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from market.did import IdentityError
from node.net.validator import PeerFault, TokenBucket
from node.net.wire import frame
from node.setup.keyfile import did_from_peer_id

log = logging.getLogger("microgrid.net.time")

TIME_PROTOCOL = "/microgrid/time/1"
TIME_PROTOCOL_ID = TProtocol(TIME_PROTOCOL)
VERSION = 1
REQUEST = struct.Struct(">B8s")
RESPONSE = struct.Struct(">B8sqq")
MAX_FRAME = 64
"""Longest frame read (requests are 9 bytes, responses 25)."""
READ_TIMEOUT = 5.0
QUERY_TIMEOUT = 5.0
MAX_BUCKETS = 1024
NS = 1_000_000_000
INT64 = (-(1 << 63), (1 << 63) - 1)


class TimeWireError(ValueError):
    """Bytes that are not a time request or response; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TimeQueryError(Exception):
    """A peer did not answer a time request usefully; ``reason`` is short and stable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _ns(t: float) -> int:
    value = round(t * NS)
    if not INT64[0] <= value <= INT64[1]:
        raise ValueError(f"time {t} does not fit 64-bit nanoseconds")
    return value


def encode_request(nonce: bytes) -> bytes:
    """A request's payload (``nonce``: 8 bytes)."""
    if len(nonce) != 8:
        raise ValueError("the nonce is 8 bytes")
    return REQUEST.pack(VERSION, nonce)


def decode_request(data: bytes) -> bytes:
    """The nonce of a request payload; raises :class:`TimeWireError`."""
    if len(data) != REQUEST.size:
        raise TimeWireError("malformed", f"request of {len(data)} bytes, not {REQUEST.size}")
    version, nonce = REQUEST.unpack(data)
    if version != VERSION:
        raise TimeWireError("malformed", f"unknown version {version}")
    return bytes(nonce)


def encode_response(nonce: bytes, t1: float, t2: float) -> bytes:
    """A response's payload: ``t1``/``t2`` in wall-clock seconds."""
    return RESPONSE.pack(VERSION, nonce, _ns(t1), _ns(t2))


def decode_response(data: bytes, nonce: bytes) -> tuple[float, float]:
    """``(t1, t2)`` in seconds from a response payload to the request with ``nonce``; raises
    :class:`TimeWireError` (``malformed``, ``wrong_nonce``)."""
    if len(data) != RESPONSE.size:
        raise TimeWireError("malformed", f"response of {len(data)} bytes, not {RESPONSE.size}")
    version, echoed, t1, t2 = RESPONSE.unpack(data)
    if version != VERSION:
        raise TimeWireError("malformed", f"unknown version {version}")
    if echoed != nonce:
        raise TimeWireError("wrong_nonce", "the response answers another request")
    return t1 / NS, t2 / NS


def _peer_did(stream: Any) -> str:
    try:
        return did_from_peer_id(stream.muxed_conn.peer_id)
    except (IdentityError, AttributeError):
        return ""


class TimeServer:
    """Answers members' time requests with this node's wall clock."""

    def __init__(
        self,
        wall_clock: Callable[[], float],
        allowed: Callable[[str], bool],
        *,
        rate: float = 1.0,
        burst: float = 5.0,
        monotonic: Callable[[], float] = trio.current_time,
    ) -> None:
        self.wall_clock = wall_clock
        self.allowed = allowed
        self.rate = rate
        self.burst = burst
        self.monotonic = monotonic
        self.buckets: dict[str, TokenBucket] = {}
        self.served = 0
        self.refused: dict[str, int] = {}

    def register(self, host: Any) -> None:
        """Install the stream handler on a libp2p host."""
        host.set_stream_handler(TIME_PROTOCOL_ID, self.handle)

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def _bucket(self, did: str) -> TokenBucket:
        bucket = self.buckets.get(did)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:  # members only, so this is a bound, not a need
                self.buckets.pop(next(iter(self.buckets)))
            bucket = self.buckets[did] = TokenBucket(self.rate, self.burst)
        return bucket

    async def handle(self, stream: Any) -> None:
        """One request, one response, then close. A protocol fault raises
        :class:`~node.net.validator.PeerFault` after the stream is closed (the host's stream
        guard counts and penalises it); nothing else escapes."""
        fault: PeerFault | None = None
        try:
            fault = await self._serve(stream)
        except Exception as exc:  # the asker went away, or a bug: this stream only
            self._refuse("closed")
            log.debug("time request failed: %r", exc)
        finally:
            with trio.move_on_after(1.0), contextlib.suppress(Exception):
                await stream.close()
        if fault is not None:
            raise fault

    async def _serve(self, stream: Any) -> PeerFault | None:
        did = _peer_did(stream)
        if not did or not self.allowed(did):
            self._refuse("not_member")
            return None
        if not self._bucket(did).take(self.monotonic()):
            self._refuse("rate_limited")
            return PeerFault("time", "rate_limited", "time requests beyond the peer's budget")
        data = None
        with trio.move_on_after(READ_TIMEOUT):
            try:
                data = await read_varint_prefixed_bytes_limited(stream, MAX_FRAME)
            except MessageTooLarge as exc:
                self._refuse("oversized")
                return PeerFault("time", "oversized", str(exc))
            except ParseError as exc:
                self._refuse("malformed")
                return PeerFault("time", "malformed", f"bad varint: {exc}")
        t1 = self.wall_clock()
        if data is None:
            self._refuse("timeout")
            return PeerFault("time", "timeout", f"no request within {READ_TIMEOUT:.0f} s")
        try:
            nonce = decode_request(bytes(data))
        except TimeWireError as exc:
            self._refuse(exc.reason)
            return PeerFault("time", exc.reason, exc.detail)
        with trio.move_on_after(READ_TIMEOUT):
            await stream.write(frame(encode_response(nonce, t1, self.wall_clock())))
            self.served += 1
        return None


async def query_time(
    host: Any, peer: ID, wall_clock: Callable[[], float], timeout: float = QUERY_TIMEOUT
) -> tuple[float, float, float, float]:
    """Ask ``peer`` for its time: ``(t0, t1, t2, t3)`` in wall-clock seconds (``t0``/``t3``
    ours). Raises :class:`TimeQueryError` (``no_stream``, ``timeout``, ``malformed``,
    ``wrong_nonce``, ``closed``) instead of a libp2p error. The times are not checked here."""
    stream = None
    nonce = random.randbytes(8)
    try:
        with trio.fail_after(timeout):
            try:
                stream = await host.new_stream(peer, [TIME_PROTOCOL_ID])
            except Exception as exc:
                raise TimeQueryError("no_stream", str(exc)) from None
            t0 = wall_clock()
            try:
                await stream.write(frame(encode_request(nonce)))
                data = await read_varint_prefixed_bytes_limited(stream, MAX_FRAME)
            except (ParseError, MessageTooLarge) as exc:
                raise TimeQueryError("malformed", f"bad response frame: {exc}") from None
            except Exception as exc:
                raise TimeQueryError("closed", f"{type(exc).__name__}: {exc}") from None
            t3 = wall_clock()
    except trio.TooSlowError:
        raise TimeQueryError("timeout", f"no answer within {timeout:.0f} s") from None
    finally:
        if stream is not None:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1.0),
                contextlib.suppress(Exception),
            ):
                await stream.close()
    try:
        t1, t2 = decode_response(bytes(data), nonce)
    except TimeWireError as exc:
        raise TimeQueryError(exc.reason, exc.detail) from None
    return t0, t1, t2, t3


def connected_member_peers(net: Any) -> list[tuple[ID, str]]:
    """``(peer id, DID)`` of each member a :class:`~node.net.host.NetNode` is connected to."""
    members = net.member_peers
    return [(p, members[str(p)]) for p in net.connected_peers() if str(p) in members]


SampleHandler = Callable[[str, float, float, float, float, float], None]
"""``on_sample(peer DID, t0, t1, t2, t3, monotonic time at t3)``."""


@dataclass
class TimeSampler:
    """Samples every connected member's clock at a low rate (see the module docstring)."""

    host: Callable[[], Any]
    """The libp2p host (None while the network is not up)."""
    peers: Callable[[], Iterable[tuple[ID, str]]]
    """The connected members: ``(peer id, DID)``."""
    wall_clock: Callable[[], float]
    on_sample: SampleHandler
    interval: float = 30.0
    jitter: float = 0.2
    """Each wait is ``interval`` times a uniform factor in ``1 ± jitter``."""
    min_interval: float = 2.0
    """Never ask one peer more often than this (a flapping connection, a short ``interval``):
    well within a server's default budget (1 per second, burst 5)."""
    check_every: float = 1.0
    timeout: float = QUERY_TIMEOUT
    peers_per_interval: int = 8
    """With more connected members than this, each is asked proportionally less often (at most
    ``max_stretch`` times ``interval`` apart): a node asks about this many peers per
    ``interval`` whatever the grid's size (each request opens a stream, ~5 ms of CPU on both
    sides), and the median of a few dozen peers' clocks is as good as that of all."""
    max_stretch: float = 5.0
    """Keeps each peer's samples well inside the clock watch's 300 s window (30 s x 5)."""

    def __post_init__(self) -> None:
        self.due: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.samples = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: ask each connected member when it is due."""
        task_status.started()
        while True:
            now = trio.current_time()
            connected = {did: peer for peer, did in self.peers()}
            for did in list(self.due):
                if did not in connected:  # asked again as soon as it is back (bounded)
                    del self.due[did]
            todo = []
            stretch = min(self.max_stretch, max(1.0, len(connected) / self.peers_per_interval))
            for did, peer in connected.items():
                due = self.due.get(did)
                if due is None:
                    due = self.due[did] = max(now, self.last.get(did, -1e18) + self.min_interval)
                if due <= now:
                    todo.append((did, peer))
                    wait = (
                        self.interval * stretch * random.uniform(1 - self.jitter, 1 + self.jitter)
                    )
                    self.due[did] = now + max(self.min_interval, wait)
            if todo and self.host() is not None:
                async with trio.open_nursery() as nursery:
                    for did, peer in todo:
                        nursery.start_soon(self.sample, did, peer)
            await trio.sleep(self.check_every)

    async def sample(self, did: str, peer: ID) -> bool:
        """Ask one peer and hand the times on; False (logged at debug) if it did not answer."""
        self.last[did] = trio.current_time()
        try:
            t0, t1, t2, t3 = await query_time(self.host(), peer, self.wall_clock, self.timeout)
        except TimeQueryError as exc:
            self.failures[exc.reason] = self.failures.get(exc.reason, 0) + 1
            log.debug("time request to %s failed: %s", did, exc)
            return False
        self.samples += 1
        self.on_sample(did, t0, t1, t2, t3, trio.current_time())
        return True
