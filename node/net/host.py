"""The libp2p host of a household node: TCP + Noise + yamux, gossipsub topics, Raft streams.

:class:`NetNode` owns one py-libp2p 0.8.1 host and everything around it. Read
docs/libp2p.md first; each workaround below names the pitfall or bug it avoids:

- Only Noise (no plaintext/secio/TLS fallback) and only yamux are offered.
- ``ConnectionConfig(max_connections_per_peer=1)``: the default of 3 adds 250 ms to each dial
  (pitfall 1). That limit spares a connection younger than its 20 s grace period, and each end
  picks its own victim, so two members dialling each other at once kept both connections for
  good: :meth:`NetNode._close_duplicate` closes the same one at both ends.
- An accepted connection's handler task held its inbound slot until the swarm stopped (250
  slots: a long-lived node would refuse inbound connections): :func:`release_inbound_handlers`.
- Our own reconnect loop over the static dial list (genesis bootstrap + config peers; only
  those that are current members are dialled) with exponential back-off and jitter;
  libp2p's ``bootstrap=`` gives up after 3 failures and its negative dial cache blocks a peer
  for 60 s, so we lift that block (``swarm.unblock_peer``) before each of our dials (pitfall 3).
- gossipsub spam protection is off: its fixed 10 msg/s per (peer, topic) silently drops
  *forwarded* messages too (pitfall 2). Our validator rate-limits per origin instead, counts
  it, and penalises. The subscription channel (32, drops silently when full) is raised, and
  our own publish waits (bounded) for room in every peer's outbound RPC queue (32, drops
  silently when full).
- Message ids are a content hash (origin, topics, data), not ``from + seqno`` (pitfall 6), and
  the seqno counter starts at ``time.time_ns()`` rather than ``int(time.time())``: gossipsub's
  equivocation check drops a *different* message that reuses a (from, seqno) pair, which
  a node restarted within seconds of publishing faster than 1 msg/s would otherwise do.
- yamux sends a WINDOW_UPDATE after every read (py-libp2p bug, ~60 frames per gossip
  message): :func:`patch_yamux_window_updates` restores go-yamux's batched release.
- Our own messages are flood-published to every subscribed peer: gossipsub here has no
  floodPublish and sends nothing while our mesh is empty (PRUNE back-off after a reconnect).
- Shutdown: all peers are disconnected before the pubsub context is left (pitfall 4).
- No peer's bytes can raise into the node. py-libp2p runs every inbound stream handler in the
  swarm service's connection nursery, and an exception escaping one fails the host:
  :func:`install_stream_guard` wraps the swarm's common handler, so an exception resets that
  stream only and is counted per protocol, reason and peer (``microgrid_net_stream_faults``),
  and penalised (repeat offenders are banned). Pubsub's read loop, which lets
  ``google.protobuf.message.DecodeError`` escape (twelve bytes killed a node), is replaced per
  node by :meth:`NetNode._read_pubsub_stream` (faults typed, per-forwarder message and byte
  budgets applied before a task is spawned per message, foreign subscriptions ignored, PRUNE
  peer exchange stripped, control handling bounded). ``push_msg`` is guarded: non-member
  origins are refused before libp2p's signature check, which raises on a garbage ``msg.key``
  inside a pubsub task. The blacklist teardown, which raises ``KeyError`` when the peer
  disconnects during its stream reset (our ban closes the connection at once), is replaced.
  Each has a canary in tests/net/test_libp2p_canaries.py.
- Pubsub sessions follow connections (pitfall 8): libp2p keeps one session per peer id and a
  reconnect racing the old connection's ``disconnected`` event keeps a dead stream registered,
  after which the peer's subscriptions are lost for good (it never gets our messages again).
  :meth:`NetNode._handle_dead_pubsub_peer` and :meth:`NetNode._register_pubsub_peer` end a
  session when its own stream or connection dies and before a new one registers; the blacklist
  teardown ends the whole session (router and mesh included), so a readmitted peer is GRAFTed
  again. Connections are closed one by one, not with ``Swarm.close_peer``, which orphans a
  connection opened while it runs (pitfall 9).
- Logging: the ``libp2p`` logger is made to propagate and given a level (pitfall 5).
- Metrics bind 127.0.0.1 (pitfall 7).

The member list starts as the genesis' and follows the replicated governance log at runtime:
:meth:`NetNode.update_members` (called by the daemon after each applied batch) updates the
connection gate, the gossip validator, the per-peer budgets, the metric labels and the Raft
transport's check (:meth:`NetNode.is_member`, also what the block server should be given), and
disconnects peers that left the list. A household admitted later dials the bootstrap peers
itself; they accept it once they applied its admission.

Member addresses (``/microgrid/addrs/1.0.0``): the static dial list names the genesis bootstrap
and the config's peers only, so without more a household admitted at runtime would be reachable
only by those it dialled (a Raft leader elsewhere could not replicate to it; two households
admitted at runtime would never meet). Each connected pair of members swaps address books (each
member's own listen addresses, and what it knows of every other member's, at most
``max_peer_addrs`` each) when a connection opens, when something new was learned (at most every
``addr_push_min`` seconds) and every ``addr_exchange_interval`` seconds; every node keeps a
reconnect loop for each current member it has an address for. What a peer says is validated
(:func:`dialable_address`: TCP over an IP or DNS name only, loopback only when we listen on
loopback, never an unspecified, multicast or link-local address), bounded (64 KiB per book,
``max_peer_addrs`` per member, a per-peer exchange budget) and only about current members; a
member's report of its own addresses wins over hearsay, and hearsay that fails to dial yields its
place. A member removed from the list loses its entries and its learned loop ends (it is never
redialled).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
import math
import random
import re
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from google.protobuf.message import DecodeError
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import ParseError
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import PING_LENGTH, perform_ping_roundtrip
from libp2p.io.exceptions import IncompleteReadError, IOException, MessageTooLarge
from libp2p.io.utils import read_exactly
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.exceptions import RawConnError
from libp2p.peer import peerstore as peerstore_module
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub import gossipsub as gossipsub_module
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.utils import maybe_consume_signed_record
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedConnError, MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from market.did import IdentityError
from market.models import FeederReading, GovernanceRecord, MeterReading, Order, SignedRecord
from node.net import source_lines
from node.net.faults import (
    NO_FAULTS,
    FaultRules,
    FaultsFile,
    LiveClockOffset,
    faults_file_from_env,
)
from node.net.faults import POLL_SECONDS as FAULTS_POLL_SECONDS
from node.net.metrics import NetMetrics
from node.net.raft_transport import Decoder, Encoder, RaftTransport
from node.net.rejection_log import RejectionLog
from node.net.relay import (
    RelayClient,
    RelayError,
    RelayService,
    circuit_address,
    connection_kinds,
    infrastructure_peers,
    is_circuit,
    is_relayed,
    relay_addresses,
    split_circuit,
)
from node.net.validator import (
    GossipValidator,
    PeerFault,
    PenaltyBox,
    SeqnoContent,
    SlotPolicy,
    TokenBucket,
    Verdict,
)
from node.net.wire import TopicKind, WireError, decode_batch, encode_batch, topic_name
from node.setup.genesis import Genesis
from node.setup.keyfile import NodeIdentity, did_from_peer_id, peer_id_from_did

if TYPE_CHECKING:
    from pathlib import Path

    from node.setup.config import NodeConfig

log = logging.getLogger("microgrid.net")
REJECTION_DETAIL_CHARS = 200
"""A rejection's detail is cut to this length in the log (it may quote a peer's bytes)."""

LIBP2P_SUBSCRIPTION_CHANNEL_SIZE = pubsub_module.SUBSCRIPTION_CHANNEL_SIZE
"""libp2p's own value, recorded before NetNode widens it (a canary test checks it)."""
LIBP2P_LOGGER_PROPAGATED_AT_IMPORT = logging.getLogger("libp2p").propagate
LIBP2P_YAMUX_WINDOW_UPDATE = YamuxStream._auto_tune_and_send_window_update
"""libp2p's own window-update method, kept for the canary test."""
LIBP2P_READ_PUBSUB_STREAM = Pubsub.continuously_read_stream
"""libp2p's pubsub read loop, replaced per node by :meth:`NetNode._read_pubsub_stream`."""
LIBP2P_TEARDOWN_IF_CONNECTED = Pubsub._teardown_if_connected
"""libp2p's blacklist teardown, replaced per node (KeyError race): kept for the canary test."""
LIBP2P_HANDLE_DEAD_PEER = Pubsub._handle_dead_peer
"""libp2p's pubsub peer removal, replaced per node by :meth:`NetNode._handle_dead_pubsub_peer`
(a reconnect racing the disconnect leaves a dead session registered): kept for a canary test."""
LIBP2P_HANDLE_NEW_PEER = Pubsub._handle_new_peer
"""libp2p's pubsub peer registration (skips a peer already in ``peers``, live or not), wrapped
per node by :meth:`NetNode._register_pubsub_peer`: kept for a canary test."""

OUTBOUND_HIGH_WATER = 24
"""Our publish waits while a peer's outbound RPC queue (libp2p: 32, drops when full) is this
full."""
SUBSCRIPTION_QUEUE = 1024
"""Replaces libp2p's SUBSCRIPTION_CHANNEL_SIZE of 32, which drops silently when full."""

PUBSUB_PROTOCOLS = frozenset(
    {"/meshsub/1.0.0", "/meshsub/1.1.0", "/meshsub/1.2.0", "/meshsub/2.0.0", "/floodsub/1.0.0"}
)
"""Protocol ids that reach pubsub's stream handler (label ``gossip``)."""
CONNECTION_LOSS: tuple[type[BaseException], ...] = (
    IOException,  # StreamError (EOF, reset, closed), IncompleteReadError, ...
    RawConnError,
    MuxedStreamError,
    MuxedConnError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    EOFError,
)
"""Exceptions that mean the stream or connection went away (not a protocol fault), except the
``MessageTooLarge`` subclass, which is checked first."""
FAULT_WEIGHTS: dict[str, float] = {
    "unexpected": 2.0,
    "control_error": 2.0,
    "budget_msgs": 0.2,
    "budget_bytes": 0.2,
    "rate_limited": 1.0,
}
"""Penalty points per stream fault reason (default :data:`DEFAULT_FAULT_WEIGHT`): garbage is a
deliberate act or a broken peer; an exception we cannot attribute to the bytes weighs less."""
PING_IDLE_FACTOR = 3
"""A ping stream with no ping for this many liveness intervals is ended by its server."""
MAX_PING_STREAMS = 3
"""Ping streams served at once per peer; more are reset at once."""
LOOP_LAG_TOLERANCE = 1.0
"""A failed liveness ping whose deadline fired more than this late is not counted as a miss."""
"""Ping streams served at once per peer; more are reset at once."""
"""A ping stream with no ping for this many liveness intervals is ended by its server."""
HOUSEKEEPING_MAX_SECONDS = 5.0
"""Longest sleep of the housekeeping loop (a new ban is seen within this; bans last 30 s)."""
RECONNECT_CHECK_SECONDS = 2.0
"""While connected, the reconnect loop waits for the swarm's disconnect notice, re-checking the
connection at least this often (it polled every 0.25 s before: issue 19)."""
DUPLICATE_SETTLE_SECONDS = 2.0
"""When a second connection with a peer appears (both ends dialled at once), both are left this
long to finish their handshakes before the duplicate is closed (:meth:`_close_duplicate`)."""
DUPLICATE_ROUNDS = 3
"""Looks of :meth:`_close_duplicate` at one peer's connections; in the last, extra dials of the
peer that it did not close itself are closed here."""
UNWANTED_CHECK_SECONDS = 30.0
"""A reconnect loop of a member this node does not dial (a large grid) looks again this often,
besides whenever the member list or the core changes."""
DEFAULT_FAULT_WEIGHT = 10.0
CONTROL_DEADLINE = 10.0
"""Longest gossipsub may take over one RPC's control messages (it awaits queue sends)."""
DEAD_STREAM_STATES = frozenset({"CLOSE_WRITE", "CLOSE_BOTH", "RESET", "ERROR"})
"""``NetStream`` states in which a pubsub stream can no longer carry its direction's RPCs."""

ADDRS_PROTOCOL = "/microgrid/addrs/1.0.0"
"""Member-address exchange: the opener writes its address book, the other side answers with
its own (each one varint-prefixed JSON ``{"v": 1, "addrs": {peer id: [multiaddr, ...]}}``)."""
ADDRS_MAX_BYTES = 64 * 1024
"""Largest address book read from a peer (a grid of hundreds of members fits)."""
ADDRS_MAX_ENTRIES = 1024
"""Most peers one address book may list (more: the book is malformed)."""
ADDRS_LOOKED_AT = 16
"""Addresses looked at per listed peer (the first ``max_peer_addrs`` valid ones are kept)."""
ADDRS_TIMEOUT = 5.0
"""Deadline of one address exchange."""
ADDR_MAX_CHARS = 200
_DNS_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")  # fmt: skip


def dialable_address(
    addr: str, *, peer: str, loopback: bool, observed_ip: str | None = None
) -> str | None:
    """``addr`` (a peer's claim of where ``peer`` listens) normalised to
    ``/ip4|ip6/<ip>/tcp/<port>`` or ``/dns|dns4|dns6/<name>/tcp/<port>``, or None if we would
    not dial it: anything but TCP over an IP or DNS name (circuits, QUIC, websockets), a
    ``/p2p/`` naming another peer, port 0, an unspecified, multicast, link-local or broadcast
    IP, a loopback address or ``localhost`` unless ``loopback``. ``observed_ip`` (the remote IP
    of the peer's own connection, for its report of itself) replaces an unspecified IP (a node
    listening on 0.0.0.0 reports that)."""
    if not isinstance(addr, str) or len(addr) > ADDR_MAX_CHARS:
        return None
    parts = addr.split("/")
    if len(parts) == 7 and parts[5] == "p2p" and parts[6] == peer:
        parts = parts[:5]
    if len(parts) != 5 or parts[0] or parts[3] != "tcp":
        return None
    proto, host, port = parts[1], parts[2], parts[4]
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        return None
    if proto in ("dns", "dns4", "dns6"):
        if not _DNS_NAME.fullmatch(host):
            return None
        if host.lower().rstrip(".") == "localhost" or host.lower().endswith(".localhost"):
            return f"/{proto}/{host}/tcp/{int(port)}" if loopback else None
        return f"/{proto}/{host}/tcp/{int(port)}"
    if proto not in ("ip4", "ip6"):
        return None
    try:
        ip = (ipaddress.IPv4Address(host) if proto == "ip4"
              else ipaddress.IPv6Address(host))  # fmt: skip
    except ValueError:
        return None
    if ip.is_unspecified and observed_ip is not None:
        try:
            ip = ipaddress.ip_address(observed_ip)
        except ValueError:
            return None
        proto = "ip4" if ip.version == 4 else "ip6"
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return None
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    if ip.is_loopback and not loopback:
        return None
    return f"/{proto}/{ip.compressed}/tcp/{int(port)}"


GossipHandler = Callable[[TopicKind, tuple[SignedRecord, ...], str], None]
"""Called with (topic kind, records, origin DID) for every delivered, validated batch."""


class PublishError(Exception):
    """Our own batch failed validation (so it was not published); carries the verdict."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(f"refusing to publish: {verdict.reason}: {verdict.detail}")
        self.verdict = verdict


async def _batched_window_update(self: Any, *, bytes_read: int = 0) -> None:
    """go-yamux's receive-window release: one WINDOW_UPDATE per half window consumed.

    py-libp2p 0.8.1 bug: ``YamuxStream._auto_tune_and_send_window_update`` sends a
    WINDOW_UPDATE frame after *every* read that consumed bytes (its "partial slack" and
    "release on read" branches defeat its own hysteresis), and pubsub reads its varint length
    prefixes one byte per read: ~60 extra Noise-encrypted frames and socket writes per gossip
    message, about half a receiving node's CPU per message. We credit consumed bytes in bulk
    once they reach half the receive window (256 KiB), as go-yamux does; the sender always
    has at least half a window of credit, so it never stalls on it.
    """
    total = 0
    async with self.window_lock:
        if bytes_read > 0:
            self._pending_recv_release += bytes_read
        if self._pending_recv_release >= max(1, self.target_recv_window // 2):
            total = self._pending_recv_release
            self.recv_window += total
            self._pending_recv_release = 0
    if total > 0:
        await self.send_window_update(total, skip_lock=True)


def protocol_label(protocol: str | None) -> str:
    """A bounded metric label for a stream protocol id."""
    if protocol is None:
        return "negotiation"
    if protocol in PUBSUB_PROTOCOLS:
        return "gossip"
    if protocol.startswith("/microgrid/"):
        return protocol.split("/")[2] or "other"
    if protocol.startswith("/ipfs/id/"):
        return "identify"
    if protocol.startswith("/ipfs/ping/"):
        return "ping"
    return "other"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def fault_reason(exc: BaseException) -> str:
    """Why a stream handler failed: a protocol fault's reason, ``closed`` (the stream or
    connection went away: nobody's fault) or ``unexpected``."""
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, PeerFault):
            return leaf.reason
        if isinstance(leaf, DecodeError):
            return "malformed_protobuf"
        if isinstance(leaf, ParseError):
            return "bad_varint"
        if isinstance(leaf, MessageTooLarge):
            return "oversized"
    if all(isinstance(leaf, CONNECTION_LOSS) for leaf in leaves):
        return "closed"
    return "unexpected"


StreamFaultHandler = Callable[[ID, str, str, BaseException], None]
"""``on_fault(peer, protocol label, reason, exception)``."""


class InboundConnectionClosed(Exception):
    """Ends py-libp2p's handler of an inbound connection once that connection has closed
    (:func:`release_inbound_handlers`)."""


def release_inbound_handlers(host: Any) -> None:
    """End each accepted connection's handler task when its connection closes (idempotent).

    py-libp2p 0.8.1's swarm keeps the task that accepted an inbound TCP connection waiting for
    the *swarm's* end (an "intentional barrier": trio closes the socket when the handler
    returns), long after the connection closed. Each such task holds one of the swarm's 250
    inbound slots (``max_connections - min_connections``) and its socket objects, so a node
    leaked one of each per inbound connection it ever accepted: a leader of 50 households held
    63 handler tasks for 49 connections after its start-up, and a node accepting reconnections
    for months (peers restarting, home addresses changing) would reach the
    cap and then refuse every inbound connection, silently (a debug line).

    Two wrappers: the listener's handler marks the TCP stream it accepted (its ``close``, which
    every layer's close ends in, sets an event); the upgrade, for a marked stream only, runs as
    before, then waits for that event and raises :class:`InboundConnectionClosed`, which
    libp2p's handler catches (a debug line) before its ``finally`` frees the slot. Upgrades of
    other connections (a relayed circuit, a hole punch's TCP connection) return as before."""
    swarm = host.get_network()
    upgrade = swarm.upgrade_inbound_raw_conn
    if getattr(upgrade, "microgrid_release", False):
        return
    handle = swarm._do_handle_inbound_connection

    async def handle_marked(read_write_closer: Any, *args: Any) -> None:
        close = getattr(read_write_closer, "close", None)
        if close is not None:
            closed = trio.Event()

            async def close_and_signal() -> None:
                try:
                    await close()
                finally:
                    closed.set()

            read_write_closer.close = close_and_signal
            read_write_closer.microgrid_closed = closed
        await handle(read_write_closer, *args)

    async def upgrade_then_wait_for_close(raw_conn: Any, maddr: Any) -> Any:
        muxed = await upgrade(raw_conn, maddr)
        closed = getattr(getattr(raw_conn, "stream", None), "microgrid_closed", None)
        if closed is None:
            return muxed  # not accepted by the listener: its caller goes on with it
        await closed.wait()  # (a connection that closed during the upgrade has set it)
        raise InboundConnectionClosed(f"inbound connection from {maddr} closed")

    upgrade_then_wait_for_close.microgrid_release = True  # type: ignore[attr-defined]
    swarm.upgrade_inbound_raw_conn = upgrade_then_wait_for_close
    swarm._do_handle_inbound_connection = handle_marked


def install_stream_guard(host: Any, on_fault: StreamFaultHandler) -> None:
    """Contain every inbound stream handler of ``host`` (idempotent).

    py-libp2p 0.8.1 runs each inbound stream's handler (after protocol negotiation) in the
    connection's nursery inside the swarm service: an exception escaping *any* protocol handler
    (pubsub's ``stream_handler`` lets ``google.protobuf.message.DecodeError`` through; its
    negotiation raises ``StreamFailure``) fails the swarm service and with it the whole host.
    The guard wraps the swarm's common handler: an exception resets that stream only and is
    reported to ``on_fault`` with the remote peer, the protocol and :func:`fault_reason`.
    """
    network = host.get_network()
    inner = network.common_stream_handler
    if getattr(inner, "microgrid_guard", False):
        return

    async def guarded(net_stream: Any) -> None:
        try:
            await inner(net_stream)
        except Exception as exc:
            with trio.move_on_after(1.0), contextlib.suppress(Exception):
                await net_stream.reset()
            faults = [leaf for leaf in _leaves(exc) if isinstance(leaf, PeerFault)]
            protocol = (
                faults[0].protocol if faults
                else protocol_label(getattr(net_stream, "get_protocol", lambda: None)())
            )  # fmt: skip
            peer = getattr(getattr(net_stream, "muxed_conn", None), "peer_id", None)
            if peer is None:
                log.warning("%s stream failed (no peer): %r", protocol, exc)
                return
            on_fault(peer, protocol, fault_reason(exc), exc)

    guarded.microgrid_guard = True  # type: ignore[attr-defined]
    network.set_stream_handler(guarded)


async def _no_auto_connect() -> None:
    """Replaces libp2p's AutoConnector cycle (our reconnect loop does the dialling)."""


def guard_listen_addrs(host: Any) -> None:
    """``host.get_addrs`` reads each TCP listener's ``getsockname``; while the host shuts down a
    closed listener raises ``OSError`` (EBADF) there, and libp2p calls it from pubsub tasks (the
    signed peer record attached to a GRAFT), so the error stopped pubsub and failed the node's
    exit. The guard answers the last addresses read instead."""
    original = host.get_addrs
    last: list[Any] = []

    def get_addrs() -> list[Any]:
        with contextlib.suppress(OSError):
            last[:] = original()
        return list(last)

    host.get_addrs = get_addrs


SPR_CACHE_SECONDS = 2.0
"""How long a host's signed peer record, as attached to every pubsub RPC, is reused before
libp2p is asked again (which reads every listener's address and compares address sets)."""
_SPR_CACHE: weakref.WeakKeyDictionary[Any, tuple[float, bytes]] = weakref.WeakKeyDictionary()
_LIBP2P_ENV_TO_SEND = peerstore_module.env_to_send_in_RPC


def _cached_env_to_send(host: Any) -> tuple[bytes, bool]:
    """libp2p's ``env_to_send_in_RPC``, reused for :data:`SPR_CACHE_SECONDS` per host.

    py-libp2p 0.8.1 rebuilds the record's address set from ``host.get_addrs()`` and marshals the
    envelope for *every* RPC it sends (each forwarded message, each GRAFT): about 5 % of a
    learner's CPU in a 30-household grid. A changed address reaches the record within the
    cache's lifetime (our own address exchange carries addresses to members at once)."""
    now = time.monotonic()
    hit = _SPR_CACHE.get(host)
    if hit is not None and hit[0] > now:
        return hit[1], False
    envelope, created = _LIBP2P_ENV_TO_SEND(host)
    _SPR_CACHE[host] = (now + SPR_CACHE_SECONDS, envelope)
    return envelope, created


PENDING_PER_PEER = 32
"""Messages gossipsub queues for a connected peer whose subscriptions it has not seen (py-libp2p
0.8.1: 100). A peer that never subscribes, the operator node, gets every message queued until
it expires, and each queued message rebuilds the peer's queue: 32 covers the moment between a
connection and its subscriptions at the rate of a 50-household slot boundary."""
PENDING_TTL_SECONDS = 5.0
"""How long such a queued message waits for the subscription (py-libp2p 0.8.1: 30 s)."""
OWN_IDS_KEPT = 256
"""Message ids of our own recent publications, for the topic validator to recognise them
(:meth:`NetNode.publish_raw`): it runs inside the publish call, so only the newest few matter.
256 is many publications more than any slot's; was up to 4,096, cleared at once when full, so
the set grew for about 1,500 slots of a long run before its first reset (issue 19)."""
RECENT_DELIVERIES_KEPT = 64
"""Timestamps py-libp2p 0.8.1's gossipsub keeps per topic in ``recent_message_deliveries``, one
per message it forwards; only its adaptive-gossip health score trims them, which we disable, so
the lists grew by one float per message for the node's lifetime (issue 19). Nothing else reads
them."""


GOSSIP_LAZY = 6
"""Fewest peers outside the mesh a heartbeat sends IHAVE to (gossipsub's D_lazy)."""
GOSSIP_FACTOR_INV = 4
"""Past that, one in this many of them (gossipsub's gossip factor, 0.25)."""


class PendingQueues(dict[Any, list[Any]]):
    """gossipsub's per-peer queues of messages for a connected peer "whose subscriptions it has
    not seen", made only for a peer whose hello this node has not read yet.

    py-libp2p 0.8.1 queues every message it publishes or forwards for every connected peer not
    subscribed to the message's topic, to cover the moment between a connection and the
    peer's subscriptions, and prunes that peer's queue on each (one pass over up to
    :data:`PENDING_PER_PEER` entries). A peer whose hello has been read (the first RPC on each
    of its live pubsub streams lists its subscriptions) and that is not subscribed to the topic
    is not about to be: the learners, which take no part in the records' gossip
    (docs/network.md), and the operator node. A voter paid for each of its N - V learners on
    every record: 2-3.5 % of its CPU at 50 households, quadratic in N. For such a peer
    ``queues[peer]`` is a fresh list that is not kept (the append is lost; the prune finds no
    queue). A peer that subscribes later gets the message cache's recent messages for the
    topic (py-libp2p replays them on every new subscription). A queue made before the hello
    stays until gossipsub flushes it or it expires, as before.

    gossipsub also queues for a peer it knows *is* subscribed but cannot send to yet (our
    outbound pubsub session with it is not registered: a new connection, or a session moving
    to another connection); that queue is what delivers the message once the session is
    registered, so a peer counts as ``settled`` (droppable) only while its session is
    registered too. (Without that condition an order was lost in a grid whose learners drop
    and make connections: the topology test failed under CI's load.)"""

    def __init__(self, settled: Callable[[Any], bool]) -> None:
        super().__init__()
        self.settled = settled

    def __missing__(self, peer: Any) -> list[Any]:
        if self.settled(peer):
            return []
        queue: list[Any] = []
        self[peer] = queue
        return queue


class _PendingQueueNoise(logging.Filter):
    """Drops gossipsub's WARNING per message queued for a peer that does not subscribe (the
    operator node never does: every household logged one line per gossip message once its
    queue was full). The queue stays bounded (:data:`PENDING_PER_PEER`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("pending message queue for peer")


_PENDING_FILTER = _PendingQueueNoise()


def patch_peer_record_cache() -> None:
    """Install :func:`_cached_env_to_send` where pubsub and gossipsub call it (idempotent)."""
    pubsub_module.env_to_send_in_RPC = _cached_env_to_send
    gossipsub_module.env_to_send_in_RPC = _cached_env_to_send


def patch_yamux_window_updates() -> None:
    """Install :func:`_batched_window_update` on py-libp2p's YamuxStream (idempotent)."""
    YamuxStream._auto_tune_and_send_window_update = _batched_window_update  # type: ignore[method-assign]


def configure_logging(level: str = "INFO", libp2p_level: str = "WARNING") -> None:
    """Make libp2p's logs visible and set levels (libp2p sets propagate=False: pitfall 5)."""
    lp = logging.getLogger("libp2p")
    lp.propagate = True
    lp.setLevel(libp2p_level)
    for name, child in list(logging.root.manager.loggerDict.items()):
        # some libp2p modules set their own level (auto_connector logs INFO every 30 s)
        if name.startswith("libp2p.") and isinstance(child, logging.Logger):
            child.setLevel(logging.NOTSET)
    logging.getLogger("microgrid").setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@dataclass
class NetSettings:
    """Tunables of the network layer (defaults suit a feeder of tens of households)."""

    listen: str = "/ip4/127.0.0.1/tcp/0"
    peers: Sequence[str] = ()
    """Static dial list: multiaddrs with /p2p/<id> (genesis bootstrap + config)."""
    mdns: bool = False
    degree: int = 4
    degree_low: int = 3
    degree_high: int = 8
    heartbeat_interval: int = 1
    rate_per_origin: float = 20.0
    burst_per_origin: float = 100.0
    ban_threshold: float = 50.0
    ban_seconds: float = 30.0
    reconnect_min: float = 0.25
    reconnect_max: float = 8.0
    dial_timeout: float = 5.0
    stable_after: float = 5.0
    """A connection that lasted this long resets the reconnect back-off."""
    redial_fast_for: float = 10.0
    """After a stable connection closes, redial at most every ``2 x reconnect_min`` for this
    long (then back off as usual): a member that restarted (an upgrade, a reboot) is usually
    listening again within seconds, and the back-off would otherwise keep us from it for up
    to its next step (4-8 s)."""
    raft_queue: int = 256
    raft_packed: bool = True
    """Offer and serve ``/microgrid/raft/2`` (deflated frames) before ``/microgrid/raft/1``;
    False: only ``/microgrid/raft/1``, as releases before it did (mixed-grid tests)."""
    publish_wait: float = 2.0
    """Longest our publish waits for room in the peers' outbound queues."""
    peer_msgs_per_second: float = 200.0
    peer_msgs_burst: float = 1000.0
    """Inbound gossip messages one *forwarding* peer may send (token bucket); what exceeds it
    is dropped before signature checks and validation, counted, and lightly penalised. An
    honest forwarder relays at most what its origins' rate limits let through, so the budget is
    never below members x ``rate_per_origin`` (burst: members x ``burst_per_origin``)."""
    peer_bytes_per_second: float = 4 * 1024 * 1024
    peer_bytes_burst: float = 16 * 1024 * 1024
    """Inbound pubsub RPC bytes per forwarding peer: the gossip of an RPC over it is dropped."""
    member_grace: float = 60.0
    """Seconds after a member left the list during which gossip about it (relayed by a member
    that has not applied the removal yet) is refused without penalising anyone."""
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    relays: Sequence[str] = ()
    """Circuit relay v2 hops (multiaddrs with /p2p/): the genesis' infrastructure peers
    (node/net/relay.py). With any, this node reserves a slot at each and dials a member it
    cannot reach directly (or has no address for) through them."""
    relay_hop: bool = False
    """Be a circuit relay v2 hop for the members (the operator node)."""
    hole_punch: bool = True
    """With relays: run DCUtR to upgrade relayed connections to direct ones."""
    relay_wait: float = 3.0
    """Through a relay, the member with the larger peer id waits this long (+-25 %) before
    each dial, so the smaller one's circuit usually comes first (one connection per peer)."""
    liveness_interval: float = 30.0
    """Seconds between liveness pings of each connected peer; a connection whose peer does
    not answer ``liveness_failures`` pings in a row (``liveness_timeout`` each) is closed, so
    the reconnect loop dials again (through the relay if need be). A home whose address
    changed leaves a dead TCP connection that would otherwise black-hole gossip until TCP gives
    up (~15 min). The pings go over one long-lived stream per peer (a new stream costs a
    multistream negotiation, ~5 ms of CPU on each side) and are also the RTT samples
    (``microgrid_peer_rtt_seconds``)."""
    liveness_failures: int = 2
    liveness_timeout: float = 5.0
    """Deadline of one liveness ping (a peer busy on a loaded machine is not dead)."""
    learn_addrs: bool = True
    """Swap member addresses with connected members (``/microgrid/addrs/1.0.0``) and keep a
    reconnect loop for every current member with a known address (see the module docstring);
    off, only the static dial list is dialled."""
    max_peer_addrs: int = 4
    """Addresses kept per member: its own report, and as many more from hearsay."""
    addr_exchange_interval: float = 300.0
    """Seconds between address exchanges with every connected member (besides those on each new
    connection and after learning something new): only a backstop, since each exchange opens a
    stream to every member."""
    addr_push_min: float = 2.0
    """Least seconds between two rounds of exchanges with every connected member."""
    allow_loopback_addrs: bool | None = None
    """Accept loopback addresses from peers (None: only when our own listen address is
    loopback, as on a test grid on one machine)."""
    full_mesh_members: int = 24
    """Up to this many members every member dials every other (a full mesh). Past it a learner
    dials only the core (the Raft voters, :meth:`NetNode.set_core_members`) and ``neighbours``
    other members picked by rendezvous hashing, while a voter still dials every member: the
    leader replicates to every member and a voter links every learner's gossip to the rest, so
    the graph stays connected with a diameter of two. Connections a member opens to us are
    always accepted. A full mesh of 50 members is 1,225 connections, each with its keep-alive,
    liveness pings and gossip control traffic; bounded, about 5 x 45 + 45 x 6."""
    neighbours: int = 6
    """Members besides the core that a learner of a large grid dials (see above)."""
    large_degree_high: int = 5
    """In a grid past ``full_mesh_members``, gossipsub's ``degree_high`` (most mesh peers
    before pruning) is at most this: every mesh peer sends each record once more, and with
    the voters connected to everyone a learner's mesh otherwise drifts up to ``degree_high``
    (8), i.e. up to 8 copies of each of the grid's records in and out per learner."""
    subscribe: bool = True
    """Subscribe to the grid's gossip topics (the operator node does not: it is not a member,
    so members would refuse what it forwarded; it follows the ledger through Raft)."""
    faults_file: Path | None = None
    """TESTS AND DRILLS ONLY: a JSON file of fault rules (partitions, one-way message loss)
    this node follows while it runs (node/net/faults.py; ``MICROGRID_FAULTS_FILE``). None: no
    fault injection at all."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: NodeConfig, identity: NodeIdentity, genesis: Genesis
                    ) -> NetSettings:  # fmt: skip
        """A node's settings: its config's addresses, dialling the genesis bootstrap and the
        config's extra peers (its own address left out)."""
        own = str(identity.peer_id)
        return cls(
            listen=config.listen,
            peers=[a for a in (*genesis.bootstrap, *config.peers) if own not in a],
            mdns=config.mdns,
            metrics_port=config.metrics_port or None,
            metrics_host=config.metrics_host,
            relays=[a for a in relay_addresses(genesis) if own not in a],
            hole_punch=config.hole_punch,
            liveness_interval=config.liveness_seconds,
            faults_file=faults_file_from_env(),  # test-only (node/net/faults.py)
        )


def default_slot_policy(genesis: Genesis, clock: Callable[[], float] = time.time) -> SlotPolicy:
    """Orders only before their slot's gate closes and at most the market's slot horizon past
    the last closed gate (as the engine accepts them); readings only once their slot has ended;
    governance records only before the gate of their ``from_slot`` closes (the engine refuses
    them after: ``effective_slot_closed``).
    """

    schedule = genesis.schedule
    horizon = genesis.market.slot_horizon

    def policy(record: SignedRecord) -> str | None:
        now = clock()
        if isinstance(record, Order) and now >= schedule.gate_time(record.slot):
            return "slot_closed"
        if isinstance(record, Order) and record.slot > schedule.last_due_gate(now) + horizon:
            # also keeps a far-future nonce from pushing the author's window past its readings
            return "slot_too_far"
        if isinstance(record, MeterReading | FeederReading) and now < schedule.end(record.slot):
            return "slot_not_open"
        if isinstance(record, GovernanceRecord) and now >= schedule.gate_time(record.from_slot):
            return "slot_closed"
        return None

    return policy


def _dialled_by_us(conn: Any) -> bool | None:
    """Did this node dial swarm connection ``conn`` (None if its muxer does not say)?"""
    with contextlib.suppress(Exception):
        initiator = conn.muxed_conn.is_initiator
        if isinstance(initiator, bool):
            return initiator
    return None


def _oldest_first(conns: list[Any]) -> list[Any]:
    """Swarm connections by the time this end added them, oldest first."""
    return sorted(conns, key=lambda c: getattr(c, "_created_at", 0.0))


class _Gate:
    """Network notifee: refuses connections from non-members and banned peers (the node's
    *current* member list: :meth:`NetNode.update_members`)."""

    def __init__(self, node: NetNode) -> None:
        self.node = node

    async def connected(self, network: Any, conn: Any) -> None:
        self.node._on_connected(conn.muxed_conn.peer_id)

    async def disconnected(self, network: Any, conn: Any) -> None:
        self.node._on_disconnected(conn.muxed_conn.peer_id)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, maddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, maddr: Any) -> None:
        return None


async def _read_book(stream: Any) -> bytes:
    """One address book frame (``/microgrid/addrs/1.0.0``); a bad frame is a :class:`PeerFault`."""
    try:
        return await read_varint_prefixed_bytes_limited(stream, ADDRS_MAX_BYTES)
    except MessageTooLarge as exc:
        raise PeerFault("addrs", "oversized", str(exc)) from None
    except ParseError as exc:
        raise PeerFault("addrs", "bad_varint", str(exc)) from None


class NetNode:
    """One household's network presence. Run with ``await nursery.start(node.run)``."""

    def __init__(
        self,
        identity: NodeIdentity,
        genesis: Genesis,
        settings: NetSettings | None = None,
        *,
        on_gossip: GossipHandler | None = None,
        slot_policy: SlotPolicy | None = None,
        raft_codec: tuple[Encoder, Decoder] | None = None,
        on_raft: Callable[[Any], None] | None = None,
        stream_handlers: Sequence[tuple[str, Callable[[Any], Any]]] = (),
        clock_offset: LiveClockOffset | None = None,
    ) -> None:
        self.clock_offset = clock_offset if clock_offset is not None else LiveClockOffset()
        """Test-only: the live wall-clock offset the faults file sets (node/net/faults.py)."""
        if (
            not genesis.is_member(identity.did)
            and identity.did not in infrastructure_peers(genesis).values()
        ):
            # a household admitted after genesis: it dials the bootstrap/config peers, which
            # accept it once they applied its AddMember; it publishes once update_members
            # lists it
            log.warning("this node %s is not a genesis member of grid %s; waiting for admission",
                        identity.did, genesis.grid)  # fmt: skip
        self.identity = identity
        self.genesis = genesis
        self.settings = settings or NetSettings()
        self.on_gossip = on_gossip
        self.member_peers: dict[str, str] = {
            str(peer_id_from_did(did)): did for did in genesis.member_dids
        }
        self.infra_peers: dict[str, str] = infrastructure_peers(genesis)
        """Peer id -> DID of the operator's nodes the genesis names (bootstrap peers that are
        not households): admitted by the gate and on Raft, never gossip members."""
        self.relay_client: RelayClient | None = None
        self.relay_service: RelayService | None = None
        self._nursery: trio.Nursery | None = None
        self._subscriptions: dict[TopicKind, trio.CancelScope] = {}
        """The record topics this node is subscribed to, each with its delivery task's scope."""
        self._dial_loops: set[str] = set()
        self._deduping: set[ID] = set()
        """Peers a :meth:`_close_duplicate` task is looking at."""
        self.duplicates_closed = 0
        self._sender_records: dict[ID, bytes] = {}
        """Peer -> the signed peer record it last sent in a pubsub RPC, once verified (one
        entry per peer with a live pubsub stream)."""
        self._ping_failures: dict[ID, int] = {}
        self._ping_streams: dict[ID, Any] = {}
        """Peer -> our long-lived ping stream to it (one per connected peer at most)."""
        self._ping_served: dict[ID, int] = {}
        self._heard: dict[ID, float] = {}
        self._ping_late: dict[ID, float] = {}
        """Peer -> how late the deadline of the last timed-out ping to it fired (seconds)."""
        """Peer -> when (trio time) it last pinged us or sent a pubsub RPC (connected peers)."""
        """Peer -> ping streams from it being answered (at most ``MAX_PING_STREAMS``)."""
        """Peer -> liveness pings missed in a row."""
        """Peer ids with a reconnect loop (static address or circuit)."""
        self.metrics = NetMetrics(self.member_peers)
        self.penalties = PenaltyBox(
            threshold=self.settings.ban_threshold, ban_seconds=self.settings.ban_seconds
        )
        self.validator = GossipValidator(
            genesis.grid,
            self.member_peers,
            nonce_window=genesis.market.nonce_window,
            operator=genesis.market.operator,
            slot_policy=slot_policy if slot_policy is not None else default_slot_policy(genesis),
            rate_per_origin=self.settings.rate_per_origin,
            burst_per_origin=self.settings.burst_per_origin,
            penalties=self.penalties,
            on_reject=self._on_reject,
            on_ban=self._on_ban,
            local_peer=str(identity.peer_id),
            member_grace=self.settings.member_grace,
        )
        self.rejection_log = RejectionLog()
        self.faults: Counter[tuple[str, str, str]] = Counter()
        """(peer, protocol, reason) -> inbound streams reset for a protocol fault."""
        self.dropped: Counter[tuple[str, str]] = Counter()
        """(forwarding peer, reason) -> inbound gossip dropped by the per-peer budgets."""
        self.fault_rules: FaultRules = NO_FAULTS
        """Test-only injected faults (``settings.faults_file``; node/net/faults.py)."""
        self.fault_drops: Counter[str] = Counter()
        """What the injected faults dropped: ``gossip_in``, ``gossip_out``, ``raft_in``,
        ``raft_out``, ``stream_in`` (a request stream reset), ``connection`` (refused/closed)."""
        self._fault_rng = random.Random()
        self._peer_budgets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self._pubsub_inbound: dict[ID, set[Any]] = {}
        """Peer -> the inbound pubsub streams our read loops serve (a peer announces its
        subscriptions first thing on each); a stream is listed exactly as long as its loop."""
        self._pubsub_hello: set[Any] = set()
        """The inbound pubsub streams whose first RPC (the peer's hello) has been read."""
        self._pubsub_locks: dict[ID, trio.Lock] = {}
        """Peer -> lock serialising its pubsub registration (present while one runs)."""
        self.topics = {kind: topic_name(genesis.grid, kind) for kind in TopicKind}
        self._kind_of = {name: kind for kind, name in self.topics.items()}
        self.host: Any = None
        self.pubsub: Any = None
        self.raft: RaftTransport | None = None
        self._raft_codec = raft_codec
        self._on_raft = on_raft
        self._stream_handlers = tuple(stream_handlers)
        """Further stream protocols ``(protocol id, async handler(stream))`` (block sync)."""
        self._actions_send, self._actions_recv = trio.open_memory_channel[tuple[str, ID]](1024)
        self._members_changed = trio.Event()
        """Set (and replaced) whenever :meth:`update_members` or :meth:`set_core_members`
        changes the list or the core: the reconnect loops of non-member or unwanted peers wait
        on it."""
        self._core: frozenset[str] | None = None
        """Peer ids of the core (the Raft voters); None until the daemon names it."""
        self._wanted: frozenset[str] | None = None
        """The members this node dials (None: all of them): see ``full_mesh_members``."""
        self._disconnect_waiters: dict[ID, trio.Event] = {}
        """Peer -> event set when a connection of it closes (the reconnect loop waits on it)."""
        self._own_ids: dict[bytes, None] = {}
        """Our recent publications' message ids, oldest first (:data:`OWN_IDS_KEPT`)."""
        self._batch_seq = 0
        self._stop = trio.Event()
        self._dialing = 0
        """Dials of the reconnect loops in flight: :meth:`_serve` lets them finish on stop."""
        self.started = trio.Event()
        self.delivered = 0
        self.delivered_records = 0
        self.refused: dict[str, int] = {}
        self.listen_addrs: list[str] = []
        self._self_addrs: dict[str, list[str]] = {}
        """Peer id -> the addresses it reported of itself (normalised, at most
        ``max_peer_addrs``; replaced by its next report)."""
        self._heard_addrs: dict[str, list[str]] = {}
        """Peer id -> addresses other members reported of it (at most ``max_peer_addrs``; one
        that failed to dial moves last and yields its place to new hearsay)."""
        self._failed_addrs: set[tuple[str, str]] = set()
        """(peer id, address) whose last dial failed."""
        self._static_addrs: dict[str, str] = {}
        """Peer id -> the static dial list's address of it (no /p2p/), shared with members."""
        for addr in self.settings.peers:
            with contextlib.suppress(Exception):
                if not is_circuit(addr):
                    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
                    if info.addrs:
                        self._static_addrs[str(info.peer_id)] = str(info.addrs[0])
        self._addr_budgets: dict[str, TokenBucket] = {}
        """Peer id -> how many address exchanges it may open (10 at once, 1 a second)."""
        self._addr_push = trio.Event()
        """Set when a round of address exchanges with every connected member is due."""
        self.addr_exchanges: Counter[str] = Counter()
        """Address exchanges by outcome: ``ok``, ``failed``, ``served``, ``learned``."""

    # -- identity helpers -------------------------------------------------------------

    @property
    def peer_id(self) -> ID:
        """This node's libp2p peer id."""
        return self.identity.peer_id

    # -- members ------------------------------------------------------------------------

    def is_member(self, did: str) -> bool:
        """True if ``did`` is on the current member list (the genesis', then what
        :meth:`update_members` set). Pass this to the block server and other stream handlers
        that admit members only: it follows every update."""
        return did in self.validator.member_dids

    def is_allowed_peer(self, did: str) -> bool:
        """A member or one of the operator's infrastructure nodes (Raft, block sync)."""
        return did in self.validator.member_dids or did in self.infra_peers.values()

    def connectivity(self) -> dict[str, Any]:
        """How this node reaches its peers: relays and reservations, circuits dialled,
        and per connected member whether the connection is direct or relayed."""
        doc: dict[str, Any] = {
            "connections": {} if self.host is None else connection_kinds(self.host,
                                                                         self.member_peers),
            "infrastructure": sorted(self.infra_peers),
        }  # fmt: skip
        doc["addresses"] = {
            self.member_peers.get(k, k): self.known_addrs(k)
            for k in sorted(set(self._self_addrs) | set(self._heard_addrs))
        }
        if self.relay_client is not None:
            doc["client"] = self.relay_client.status()
        if self.relay_service is not None:
            doc["relay"] = self.relay_service.status()
        return doc

    @property
    def member_dids(self) -> frozenset[str]:
        """The DIDs on the current member list."""
        return frozenset(self.validator.member_dids)

    def update_members(self, dids: Iterable[str]) -> None:
        """Make ``dids`` the member list (every household allowed on the network now).

        Synchronous and cheap when nothing changed (call it after each applied batch). A
        change updates the connection gate, the gossip validator (origin, forwarder and author
        checks), the per-peer budgets (they scale with the member count), the metric labels
        and the Raft transport's check. A peer that left the list is blacklisted in pubsub at
        once (nothing more it sends is processed) and disconnected (within the action loop's
        next turn), refused from then on and no longer dialled; a newly listed peer is
        accepted when it dials (its earlier refusal's blacklist is lifted unless it is banned)
        and dialled once the static list or an address exchange gave its address (a round of
        exchanges starts at once). A removed peer's learned addresses are forgotten. Malformed
        DIDs are logged and left out. Usable before :meth:`run` (it then only sets the list).
        """
        new: dict[str, str] = {}
        for did in dids:
            try:
                new[str(peer_id_from_did(did))] = did
            except Exception as exc:  # IdentityError, or a DID that is not even text
                log.warning("ignoring malformed member DID %r: %s", did, exc)
        if new == self.member_peers:
            return
        removed = [p for p in self.member_peers if p not in new]
        added = [p for p in new if p not in self.member_peers]
        self.member_peers = new
        self._wanted = self._choose_wanted()
        self._fit_mesh()
        self.validator.set_members(new)
        self.metrics.set_members(new)
        self.metrics.members.set(len(new))
        for peer in removed:
            self._peer_budgets.pop(peer, None)
            self._forget_addrs(peer)
        rate, burst = self._budget_rates()
        for msgs, _bytes in self._peer_budgets.values():
            msgs.rate, msgs.burst = rate, burst
            msgs.tokens = min(msgs.tokens, burst)
        running = self.pubsub is not None and self.pubsub.manager.is_running
        for key in removed:
            log.info("peer %s left the member list: disconnecting it", key)
            if running:
                peer = ID.from_base58(key)
                self.pubsub.add_to_blacklist(peer)  # ends its session, drops what it sends
                self._queue_action("close", peer)
        for key in added:
            log.info("peer %s joined the member list", key)
            if running and not self.penalties.is_banned(key):
                # refused (and blacklisted) while it was not a member: readmit its gossip
                self.pubsub.remove_from_blacklist(ID.from_base58(key))
        self._start_circuit_loops()
        for key in added:
            self._ensure_dial_loop(key)
        if added:
            self._addr_push.set()  # learn the newcomers' addresses from those who know them
        self._members_changed.set()
        self._members_changed = trio.Event()

    def set_core_members(self, dids: Iterable[str]) -> None:
        """Name the core members (the Raft voters, by DID): in a grid of more than
        ``full_mesh_members`` a learner dials only them and ``neighbours`` others (see
        :class:`NetSettings`); a voter dials everyone. Malformed DIDs are logged and left out."""
        keys: set[str] = set()
        for did in dids:
            try:
                keys.add(str(peer_id_from_did(did)))
            except Exception as exc:  # IdentityError, or a DID that is not even text
                log.warning("ignoring malformed core DID %r: %s", did, exc)
        core = frozenset(keys)
        if core == self._core:
            return
        self._core = core
        wanted = self._choose_wanted()
        if wanted == self._wanted:
            return
        self._wanted = wanted
        for key in self.member_peers:
            self._ensure_dial_loop(key)
        self._members_changed.set()  # waiting reconnect loops look again
        self._members_changed = trio.Event()

    def _fit_mesh(self) -> None:
        """Bound gossipsub's mesh for the topology: ``large_degree_high`` past the full mesh."""
        gossipsub = getattr(self, "gossipsub", None)
        if gossipsub is None:
            return
        s = self.settings
        large = len(self.member_peers) > s.full_mesh_members  # voters too: they dial everyone
        high = min(s.degree_high, s.large_degree_high) if large else s.degree_high
        gossipsub.degree_high = max(high, s.degree)

    def wants(self, key: str) -> bool:
        """This node keeps a connection to peer ``key`` (it dials it): every member in a full
        mesh; else the core, this node's ``neighbours``, and the infrastructure peers."""
        return self._wanted is None or key in self._wanted or key in self.infra_peers

    def dialled_by(self, key: str) -> bool:
        """Does peer ``key`` keep a connection to us (dial us), by the same rule as
        :meth:`wants` seen from its end: in a full mesh, if either of us is a core member, or
        if we are among its ``neighbours``."""
        me = str(self.peer_id)
        core = self._core
        if core is None or key in core or me in core or key in self.infra_peers:
            return True
        if len(self.member_peers) <= self.settings.full_mesh_members:
            return True
        others = [k for k in self.member_peers if k != key and k not in core]
        others.sort(key=lambda k: hashlib.sha256("|".join(sorted((key, k))).encode()).digest())
        return me in others[: max(0, self.settings.neighbours)]

    def _linked(self) -> bool:
        """A member this node wants (:meth:`wants`) is connected."""
        return any(str(p) in self.member_peers and self.wants(str(p))
                   for p in self.connected_peers())  # fmt: skip

    def _choose_wanted(self) -> frozenset[str] | None:
        """The members to dial (None: every one); see :class:`NetSettings` ``full_mesh_members``.
        Rendezvous hashing of the pair (the same score from both ends) spreads the choices
        evenly and moves few of them when a member joins or leaves."""
        me = str(self.peer_id)
        core = self._core
        if core is None or me in core or len(self.member_peers) <= self.settings.full_mesh_members:
            return None
        others = [k for k in self.member_peers if k != me and k not in core]
        others.sort(key=lambda k: hashlib.sha256("|".join(sorted((me, k))).encode()).digest())
        return frozenset({*core, *others[: max(0, self.settings.neighbours)]} - {me})

    def connected_peers(self) -> list[ID]:
        """Peers with an open connection."""
        if self.host is None:
            return []
        return [p for p, conns in self.host.get_network().get_connections_map().items() if conns]

    def mesh_peers(self, kind: TopicKind = TopicKind.ORDERS) -> list[str]:
        """Peers in this node's gossipsub mesh for ``kind``."""
        if self.pubsub is None:
            return []
        return [str(p) for p in self.pubsub.router.mesh.get(self.topics[kind], ())]

    # -- lifecycle ----------------------------------------------------------------------

    def _build(self) -> None:
        patch_yamux_window_updates()
        patch_peer_record_cache()
        logging.getLogger("libp2p.pubsub.gossipsub").addFilter(_PENDING_FILTER)  # idempotent
        kp = self.identity.key_pair
        self.host = new_host(
            key_pair=kp,
            sec_opt={
                NOISE_PROTOCOL_ID: NoiseTransport(
                    kp, noise_privkey=create_x25519_key_pair().private_key
                )
            },
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=[multiaddr.Multiaddr(self.settings.listen)],
            enable_mDNS=self.settings.mdns,
            connection_config=ConnectionConfig(max_connections_per_peer=1),
        )
        # py-libp2p's AutoConnector dials every peer in the peerstore (members, but also
        # addresses learned from a refused outsider's identify) until ~200 connections, on its
        # own schedule and without our back-off or ban list: the static-member reconnect loop
        # owns dialling, so its cycle is a no-op here.
        auto = getattr(self.host.get_network(), "auto_connector", None)
        if auto is not None:
            auto.maybe_connect = _no_auto_connect
        s = self.settings
        self.gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V11],
            degree=s.degree,
            degree_low=s.degree_low,
            degree_high=s.degree_high,
            heartbeat_interval=s.heartbeat_interval,
            heartbeat_initial_delay=0.1,
            # "adaptive gossip" widens the mesh (degree_high up to +4) when its health score
            # drops, which on a loaded machine means more copies of every record exactly when
            # CPU is short; our degrees are fixed (NetSettings, _fit_mesh)
            adaptive_gossip_enabled=False,
            max_pending_messages_per_peer=PENDING_PER_PEER,
            pending_messages_ttl=PENDING_TTL_SECONDS,
            # pitfall 2: fixed 10 msg/s per (peer, topic), applied to forwarding, silent
            spam_protection_enabled=False,
        )
        self._flood_own_publications()
        self._back_off_pruned_peers()
        self._gossip_past_back_off()
        self._bound_gossipsub_state()
        self._fit_mesh()
        self.pubsub = Pubsub(
            self.host,
            self.gossipsub,
            strict_signing=True,
            msg_id_constructor=_content_msg_id,
        )
        # pitfall 6 / equivocation: Pubsub starts its seqno at int(time.time()) and gossipsub
        # drops a message reusing a (from, seqno) it saw with other content, so a node that
        # restarts within seconds after publishing > 1 msg/s would lose messages. Nanoseconds
        # since the epoch fit the 8-byte seqno and never repeat across restarts.
        self.pubsub.counter = time.time_ns()
        for kind, name in self.topics.items():
            self.pubsub.set_topic_validator(name, self._make_validator(kind), False)
        self.host.get_network().register_notifee(_Gate(self))
        self._harden_pubsub()
        install_stream_guard(self.host, self._on_stream_fault)
        release_inbound_handlers(self.host)
        guard_listen_addrs(self.host)

    def _flood_own_publications(self) -> None:
        """Send our own messages to every peer subscribed to the topic (go's floodPublish).

        py-libp2p 0.8.1 gossipsub has no flood-publish, and when we are subscribed to a topic
        whose mesh is empty it sends our message to *nobody* (silently): that happens after a
        reconnect while the peers' PRUNE back-off (60 s) keeps them out of our mesh, e.g. a
        restarted or readmitted household. Forwarded messages still follow the mesh.
        """
        gossipsub = self.gossipsub
        original = gossipsub._get_peers_to_send
        me = self.peer_id

        def peers_to_send(
            topic_ids: Any, msg_forwarder: ID, origin: ID, msg_id: bytes | None = None
        ) -> Any:
            peers = set(original(topic_ids, msg_forwarder=msg_forwarder, origin=origin,
                                 msg_id=msg_id))  # fmt: skip
            if msg_forwarder == me and origin == me and self.pubsub is not None:
                for topic in topic_ids:
                    peers.update(self.pubsub.peer_topics.get(topic, ()))
                peers.discard(me)
            if self.fault_rules is not NO_FAULTS:  # test-only injected loss (node/net/faults.py)
                peers = {p for p in peers if not self._fault_drop_out(p, "gossip_out")}
            return peers

        gossipsub._get_peers_to_send = peers_to_send

    def _back_off_pruned_peers(self) -> None:
        """Keep a peer our heartbeat pruned out of our mesh for the PRUNE's back-off, as go's
        gossipsub does (``addBackoff`` when it prunes).

        py-libp2p 0.8.1 adds the back-off only on the side that *receives* a PRUNE, so the
        pruning side may GRAFT the same peer again a heartbeat later; the peer then sees a GRAFT
        within 10 s of the PRUNE it got, calls it a GRAFT flood, lowers our score and prunes us
        back. Wherever meshes get pruned (a grid past the full mesh, where the voters are
        connected to everyone) that churn ended with nodes whose meshes were empty.
        """
        gossipsub = self.gossipsub
        original = gossipsub.mesh_heartbeat

        def mesh_heartbeat() -> Any:
            to_graft, to_prune = original()
            for peer, topics in to_prune.items():
                for topic in topics:
                    gossipsub._add_back_off(peer, topic, False)
            return to_graft, to_prune

        gossipsub.mesh_heartbeat = mesh_heartbeat

    def _gossip_past_back_off(self) -> None:
        """Send IHAVE gossip to subscribed peers outside the mesh whether or not a PRUNE's
        back-off stands between us, as go's gossipsub does (the back-off is about GRAFT).

        py-libp2p 0.8.1 picks a heartbeat's IHAVE targets with the same back-off filter as its
        GRAFT candidates. With the back-off kept on both sides of a prune
        (:meth:`_back_off_pruned_peers`), a member that every peer had pruned (its mesh empty,
        its GRAFTs refused) got neither forwarded messages nor IHAVE for the 60 s back-off: in
        the bounded-grid test an order did not reach one learner within 15 s (about one CI run
        in three failed on it). Targets as py-libp2p's without adaptive gossip: at least
        :data:`GOSSIP_LAZY`, else a quarter, of the topic's subscribed gossipsub peers outside
        the mesh (or fanout), at random.
        """
        gossipsub = self.gossipsub

        def gossip_heartbeat() -> collections.defaultdict[ID, dict[str, list[bytes]]]:
            targets: collections.defaultdict[ID, dict[str, list[bytes]]] = (
                collections.defaultdict(dict)
            )
            pubsub = self.pubsub
            if pubsub is None:
                return targets
            fanout = [(t, p) for t, p in gossipsub.fanout.items() if t not in gossipsub.mesh]
            for topic, current in [*gossipsub.mesh.items(), *fanout]:
                subscribed = pubsub.peer_topics.get(topic)
                if not subscribed:
                    continue
                msg_ids = gossipsub.mcache.window(topic)
                if not msg_ids:
                    continue
                # a peer with a gossipsub session (the only protocol we run)
                pool = [p for p in subscribed if p not in current and p in gossipsub.peer_protocol]
                count = max(GOSSIP_LAZY, (len(subscribed) - len(current)) // GOSSIP_FACTOR_INV)
                for peer in gossipsub.select_from_minus(count, pool, ()):
                    targets[peer][topic] = list(msg_ids)
            return targets

        gossipsub.gossip_heartbeat = gossip_heartbeat  # type: ignore[method-assign]

    def _bound_gossipsub_state(self) -> None:
        """Bound what py-libp2p 0.8.1's gossipsub grows or repeats for as long as it runs
        (issue 19): its equivocation check keeps up to 1,000 whole messages (their protobuf
        memory is outside Python's allocator), replaced by :class:`SeqnoContent` (digests, the
        same verdicts); its per-topic delivery timestamps, trimmed only by adaptive gossip
        (disabled), become lists of at most :data:`RECENT_DELIVERIES_KEPT`; its queues for
        peers not subscribed to a message's topic are made only before their hello
        (:class:`PendingQueues`)."""
        gossipsub = self.gossipsub
        seen = SeqnoContent()

        def check_equivocation(msg: rpc_pb2.Message) -> bool:
            if seen.check(msg.from_id, msg.seqno, msg.topicIDs, msg.data):
                return True
            if gossipsub.scorer is not None:  # as gossipsub's own check
                gossipsub.scorer.penalize_equivocation(ID(msg.from_id), 100.0)
            return False

        gossipsub._check_equivocation = check_equivocation
        gossipsub.recent_message_deliveries = collections.defaultdict(
            functools.partial(collections.deque, maxlen=RECENT_DELIVERIES_KEPT)
        )
        gossipsub._pending_messages = PendingQueues(self._pubsub_settled)

    def _greeted(self, peer_id: ID) -> bool:
        """Whether the peer's hello was read on each of its live inbound pubsub streams (so
        its subscriptions are known)."""
        streams = self._pubsub_inbound.get(peer_id)
        return bool(streams) and streams <= self._pubsub_hello

    def _pubsub_settled(self, peer_id: ID) -> bool:
        """Whether gossipsub can send to the peer now (our session with it is registered) and
        knows its subscriptions (:class:`PendingQueues`)."""
        return peer_id in self.gossipsub.peer_protocol and self._greeted(peer_id)

    async def run(
        self, *, task_status: trio.TaskStatus[NetNode] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the host and every background task; returns after :meth:`stop` or cancel."""
        self._build()
        # pitfall 2: the subscription channel holds 32 and drops silently; widen it before
        # subscribing (module constant read by Pubsub.subscribe).
        pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = max(
            pubsub_module.SUBSCRIPTION_CHANNEL_SIZE, SUBSCRIPTION_QUEUE
        )
        listen = [multiaddr.Multiaddr(self.settings.listen)]
        if self.settings.metrics_port is not None:
            port = self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
            self.settings.extra["metrics_port"] = port
        try:
            async with (
                self.host.run(listen_addrs=listen),
                background_trio_service(self.pubsub),
                background_trio_service(self.gossipsub),
            ):
                try:
                    await self._serve(task_status)
                finally:
                    # pitfall 4: close every connection before leaving the pubsub context,
                    # or in-flight RPCs hit a closed nursery. Listeners close first: a peer
                    # redialling us in that window would otherwise be accepted into a swarm
                    # whose nursery is already closing ("[ADDCONN_FAIL] ... Nursery is
                    # closed to new arrivals"), because libp2p's own close drops
                    # connections before listeners.
                    with trio.CancelScope(shield=True), trio.move_on_after(3):
                        await self._close_listeners()
                        await self._disconnect_all()
        finally:
            self.metrics.close()

    async def _serve(self, task_status: trio.TaskStatus[NetNode]) -> None:
        with trio.fail_after(10):
            await self.pubsub.wait_until_ready()
        addrs = [str(a) for a in self.host.get_addrs()]
        self.listen_addrs = [a if "/p2p/" in a else f"{a}/p2p/{self.peer_id}" for a in addrs]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._actions_loop)
            nursery.start_soon(self._housekeeping_loop)
            self._nursery = nursery
            if self.settings.subscribe:
                with trio.fail_after(10):
                    await self.subscribe_records(True)
            if self.settings.relay_hop:
                self.relay_service = RelayService(self.host, lambda p: str(p) in self.member_peers)
                await nursery.start(self.relay_service.run)
            if self.settings.relays:
                self.relay_client = RelayClient(
                    self.host,
                    self.settings.relays,
                    lambda p: str(p) in self.infra_peers,
                    hole_punch=self.settings.hole_punch,
                )
                await nursery.start(self.relay_client.run)
            for addr in self.settings.peers:
                self._start_dial_loop(addr)
            self._start_circuit_loops()
            if self.settings.learn_addrs:
                self.host.set_stream_handler(TProtocol(ADDRS_PROTOCOL), self._serve_addrs)
                nursery.start_soon(self._addr_loop)
            self.host.set_stream_handler(PING_PROTOCOL_ID, self._serve_ping)
            if self._raft_codec is not None:
                self.raft = RaftTransport(
                    self.host,
                    self.identity.did,
                    *self._raft_codec,
                    on_message=self._on_raft or (lambda m: None),
                    metrics=self.metrics,
                    queue_size=self.settings.raft_queue,
                    allowed=self.is_allowed_peer,
                    packed=self.settings.raft_packed,
                )
                if self.settings.faults_file is not None:  # test-only (node/net/faults.py)
                    self.raft.drop_inbound = lambda p: self._fault_drop_in(p, "raft_in")
                    self.raft.drop_outbound = lambda p: self._fault_drop_out(p, "raft_out")
                await nursery.start(self.raft.run)
            for protocol, handler in self._stream_handlers:
                if self.settings.faults_file is not None:  # test-only (node/net/faults.py)
                    handler = self._fault_guarded(handler)
                self.host.set_stream_handler(TProtocol(protocol), handler)
            if self.settings.faults_file is not None:
                nursery.start_soon(self._faults_loop, FaultsFile(self.settings.faults_file))
            self.started.set()
            task_status.started(self)
            await self._stop.wait()
            # No new dial starts once stopping; one in flight is let finish (bounded), since
            # cancelling it leaves libp2p's half-added connection to fail in the swarm's own
            # nursery as it closes ("[ADDCONN_FAIL] ... Cancelled"); run() then closes it.
            with trio.move_on_after(self.settings.dial_timeout):
                while self._dialing:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Ask :meth:`run` to shut down cleanly."""
        self._stop.set()

    async def _close_listeners(self) -> None:
        network = self.host.get_network()
        for addr, listener in list(network.listeners.items()):
            try:
                await listener.close()  # idempotent: the swarm closes it again on exit
            except Exception as exc:
                log.debug("closing listener %s at shutdown: %s", addr, exc)

    async def _disconnect_all(self) -> None:
        network = self.host.get_network()
        for peer in list(network.get_connections_map()):
            await self._close_peer(peer)

    async def _close_peer(self, peer: ID) -> None:
        """Close every connection to ``peer``, including one that arrives meanwhile.

        Not ``Swarm.close_peer``: it closes the connections it found and then drops the
        peer's *whole* entry from the connection map, so a connection the peer opened while
        the first ones were closing (a banned peer redials at once) is orphaned: alive, its
        streams served, yet invisible to ``get_connections`` and never closed (the ban's own
        close finds nothing). ``SwarmConn.close`` removes each connection itself.
        """
        network = self.host.get_network()
        for _ in range(4):
            conns = list(network.get_connections(peer))
            if not conns:
                return
            for conn in conns:
                try:
                    await conn.close()
                except Exception as exc:
                    log.debug("closing a connection to %s: %s", peer, exc)

    # -- connections --------------------------------------------------------------------

    def _on_connected(self, peer: ID) -> None:
        key = str(peer)
        reason = None
        if key not in self.member_peers and key not in self.infra_peers:
            reason = "non_member"
        elif self.penalties.is_banned(key):
            reason = "banned"
        elif self.fault_rules.partitioned(key):  # test-only (node/net/faults.py): no blacklist
            reason = "partitioned"
            self.fault_drops["connection"] += 1
        if reason is not None:
            self.refused[reason] = self.refused.get(reason, 0) + 1
            self.metrics.peers_refused.labels(reason).inc()
            log.info("refusing %s peer %s", reason, peer)
            if reason == "non_member" and self.pubsub is not None:
                self.pubsub.add_to_blacklist(peer)  # drops its gossip at once
            self._queue_action("close", peer)
            return
        network = self.host.get_network()
        # not with a relay: our reservation rides on the connection that made it
        if (self._nursery is not None and peer not in self._deduping
                and key not in self.infra_peers
                and len(network.get_connections(peer)) > 1):  # fmt: skip
            self._deduping.add(peer)
            self._nursery.start_soon(self._close_duplicate, peer)
        if self.settings.learn_addrs and self._nursery is not None:
            self._nursery.start_soon(self._exchange_after_connect, peer)

    async def _close_duplicate(self, peer: ID) -> None:
        """Leave one direct connection with ``peer``, the same one at both ends, after
        :data:`DUPLICATE_SETTLE_SECONDS`, looking again while more than one remains.

        Two connections arise when both ends dialled at once (the start-up wait of
        :meth:`_keep_connected` only makes that rare) or when one end dialled twice. Both ends
        apply one rule, so they never close different connections and leave none (libp2p's own
        trimming, by age and stream count, may): of connections dialled by each end, the one
        the peer with the smaller id dialled is closed at both ends; of several dialled by the
        same end, that end closes all but the oldest, and the other end waits for it, and only
        in its last look (:data:`DUPLICATE_ROUNDS`) closes them itself: the dialler may have
        given up on a dial we accepted, and then holds one connection where we hold two.
        Streams on a closed connection end: the pubsub session is registered
        again on the kept one (:meth:`_handle_dead_pubsub_peer`) and the Raft writer reopens
        its stream. Relayed connections, and connections with a relay (which carry our
        reservation), are left alone."""
        try:
            for attempt in range(DUPLICATE_ROUNDS):
                await trio.sleep(DUPLICATE_SETTLE_SECONDS)
                conns = list(self.host.get_network().get_connections(peer))
                if len(conns) < 2 or any(is_relayed(c) for c in conns):
                    return
                ours = [_dialled_by_us(c) for c in conns]
                if None in ours:
                    return
                keep_ours = self.peer_id.to_bytes() > peer.to_bytes()
                kept = [c for c, mine in zip(conns, ours, strict=True) if mine == keep_ours]
                extra = [c for c in conns if kept and c not in kept]
                mine = [c for c, m in zip(conns, ours, strict=True) if m and c not in extra]
                extra += _oldest_first(mine)[1:]
                if not extra and attempt == DUPLICATE_ROUNDS - 1:
                    # the peer's own dials, which it did not close: it lost track of one (at 50
                    # households a dial it gave up on while we accepted it), so we do
                    theirs = [c for c, m in zip(conns, ours, strict=True) if not m]
                    extra = _oldest_first(theirs)[1:]
                if not extra:
                    continue  # the peer closes its own extra dials
                log.info("closing %d duplicate connection(s) with %s", len(extra), peer)
                self.duplicates_closed += len(extra)
                self.metrics.dials.labels("duplicate_closed").inc(len(extra))
                for conn in extra:
                    with trio.move_on_after(3):
                        await conn.close()
        except Exception as exc:
            log.debug("closing a duplicate connection with %s: %s", peer, exc)
        finally:
            self._deduping.discard(peer)

    def _on_disconnected(self, peer: ID) -> None:
        log.debug("disconnected from %s", peer)
        waiter = self._disconnect_waiters.pop(peer, None)
        if waiter is not None:
            waiter.set()
        if self.pubsub is not None:
            # libp2p's own handler skips the peer if another connection exists by then (a
            # redial): end the session now if it ran over this connection (see the method)
            self._handle_dead_pubsub_peer(peer)

    def _queue_action(self, action: str, peer: ID) -> None:
        try:
            self._actions_send.send_nowait((action, peer))
        except trio.WouldBlock:
            log.warning("action queue full; dropping %s of %s", action, peer)

    # -- test-only fault injection (node/net/faults.py) ---------------------------------

    def set_fault_rules(self, rules: FaultRules) -> None:
        """Follow ``rules`` from now on (tests and drills only): connections to partitioned
        peers are closed (and refused, and not dialled, until the rules change)."""
        self.fault_rules = NO_FAULTS if rules.empty else rules
        for peer in self.connected_peers():
            if rules.partitioned(str(peer)):
                log.info("closing the connection of partitioned peer %s (injected fault)", peer)
                self.fault_drops["connection"] += 1
                self._queue_action("close", peer)

    async def _faults_loop(self, faults: FaultsFile) -> None:
        """Re-read the faults file whenever it changes (at most every 0.2 s)."""
        log.warning("fault injection is on (tests and drills only): following %s", faults.path)
        while True:
            rules = faults.poll()
            if rules is not None and rules != self.fault_rules:
                log.warning("fault rules now: %s", rules.to_json())
                self.set_fault_rules(rules)
                self.clock_offset.follow(rules.clock_offset)  # the wall clock jumps (test-only)
            await trio.sleep(FAULTS_POLL_SECONDS)

    def _fault_drop_in(self, peer: Any, what: str) -> bool:
        """An injected fault drops this message from ``peer`` (counted)."""
        if self.fault_rules.drop_inbound(str(peer), self._fault_rng):
            self.fault_drops[what] += 1
            return True
        return False

    def _fault_drop_out(self, peer: Any, what: str) -> bool:
        """An injected fault drops this message to ``peer`` (counted)."""
        if self.fault_rules.drop_outbound(str(peer), self._fault_rng):
            self.fault_drops[what] += 1
            return True
        return False

    def _fault_guarded(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``handler`` for inbound request streams, under the injected faults: a request from
        a peer whose messages are dropped is lost as a whole (read, unanswered, reset)."""

        async def guarded(stream: Any) -> None:
            peer = getattr(getattr(stream, "muxed_conn", None), "peer_id", None)
            if peer is not None and self._fault_drop_in(peer, "stream_in"):
                # read (and lose) the request first: a reset before it arrived would fail the
                # asker's write rather than its wait for an answer
                with trio.move_on_after(1.0), contextlib.suppress(Exception):
                    await stream.read(65536)
                await self._reset_stream(stream)
                return
            await handler(stream)

        return guarded

    def _on_ban(self, peer: str) -> None:
        self.metrics.peers_banned.inc()
        log.warning("banning peer %s for %.0f s (invalid gossip)", peer, self.penalties.ban_seconds)
        try:
            peer_id = ID.from_base58(peer)
        except Exception:
            return
        if self.pubsub is not None:
            self.pubsub.add_to_blacklist(peer_id)
        self._queue_action("close", peer_id)

    def _on_reject(self, verdict: Verdict, forwarder: str) -> None:
        """Count a rejected gossip message and log it (rate-limited, per reason and forwarder:
        :mod:`node.net.rejection_log`): at WARNING when someone is penalised for it, else at
        INFO (nobody provably at fault)."""
        reason, culprit = verdict.reason, verdict.culprit
        forwarder_label = self.metrics.peer_label(forwarder)
        self.metrics.gossip_invalid.labels(reason).inc()
        self.metrics.gossip_invalid_by_peer.labels(forwarder_label).inc()
        if culprit:
            label = self.metrics.peer_label(culprit)
            self.metrics.gossip_penalised_by_peer.labels(label, reason).inc()
        left_out = self.rejection_log.admit(reason, forwarder_label)
        if left_out is None:
            return
        log.log(
            logging.WARNING if culprit else logging.INFO,
            "gossip rejected: %s: %s (from %s%s)%s",
            reason, verdict.detail[:REJECTION_DETAIL_CHARS], forwarder,
            f", penalising {culprit}" if culprit else "",
            f"; {left_out} more like it not logged" if left_out else "",
            extra={"event": "gossip_rejected", "reason": reason, "forwarder": forwarder,
                   "culprit": culprit or None, "left_out": left_out},
        )  # fmt: skip

    async def _actions_loop(self) -> None:
        async for action, peer in self._actions_recv:
            if action == "close":
                with trio.move_on_after(3):
                    await self._close_peer(peer)

    async def _housekeeping_loop(self) -> None:
        """Lift expired bans (when the earliest one ends), ping every peer (liveness and RTT:
        one ping 1 s after the start, then every ``liveness_interval``), and then release the
        source files read for tracebacks (:mod:`node.net.source_lines`). It sleeps until one
        of them is due, at most ``HOUSEKEEPING_MAX_SECONDS`` (a ban made meanwhile is seen
        then: bans last far longer). The peers gauge is counted when scraped
        (:meth:`_peer_count`)."""
        next_live = trio.current_time() + 1.0
        self.metrics.peers.set_function(self._peer_count)
        while True:
            wait = min(HOUSEKEEPING_MAX_SECONDS, next_live - trio.current_time())
            bans = list(self.penalties.banned_until.values())
            if bans:
                wait = min(wait, min(bans) - self.penalties.clock())
            await trio.sleep(max(0.01, wait))
            for peer in self.penalties.expired():
                with contextlib.suppress(Exception):
                    self.pubsub.remove_from_blacklist(ID.from_base58(peer))
            if trio.current_time() >= next_live:
                next_live = trio.current_time() + self.settings.liveness_interval
                await self._check_liveness()
                source_lines.release()

    async def _check_liveness(self) -> None:
        """Ping every connected peer at once; close the connections of a peer that missed
        ``liveness_failures`` pings in a row (see :class:`NetSettings`). A ping that failed
        while the peer was heard from meanwhile (it pinged us, or sent gossip) is not a miss:
        the connection carries bytes, the peer or this machine is only slow (a loaded machine
        answering late must not tear down its connections, which costs everyone a new
        handshake and makes the load worse)."""
        peers = self.connected_peers()
        since = trio.current_time()

        async def check(peer: ID) -> None:
            timeout = self.settings.liveness_timeout
            if await self._sample_rtt(peer, timeout):
                self._ping_failures.pop(peer, None)
                return
            heard = self._heard.get(peer, -math.inf) >= since - self.settings.liveness_interval
            if heard and len(self.host.get_network().get_connections(peer)) > 1:
                # heard over which one? libp2p opens streams (this ping, Raft) on the "best"
                # connection (direct first), which may be dead while a newer one carries the
                # peer's bytes (its public address changed and it came back through the relay)
                heard = False
            # the ping's deadline fired late: this node's own loop was starved meanwhile (a
            # loaded machine), so the miss says nothing about the peer
            starved = self._ping_late.pop(peer, 0.0) > LOOP_LAG_TOLERANCE
            if heard or starved:
                self.metrics.stream_errors.labels("ping_late").inc()
                return
            n = self._ping_failures[peer] = self._ping_failures.get(peer, 0) + 1
            if n >= self.settings.liveness_failures:
                del self._ping_failures[peer]
                self.metrics.stream_errors.labels("liveness_closed").inc()
                log.warning("peer %s missed %d pings: closing its connection", peer, n)
                self._queue_action("close", peer)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(check, peer)
        for peer in [p for p in self._ping_failures if p not in peers]:
            del self._ping_failures[peer]
        for peer in [p for p in self._ping_streams if p not in peers]:
            await self._drop_ping_stream(peer)
        for peer in [p for p in self._heard if p not in peers]:
            del self._heard[peer]

    def _peer_count(self) -> int:
        """Connected peers, for the gauge; called from the metrics server's thread, so it only
        copies the swarm's map (one step under the GIL) and reads no trio state."""
        if self.host is None:
            return 0
        return sum(1 for conns in list(self.host.get_network().get_connections_map().values())
                   if conns)  # fmt: skip

    async def _sample_rtt(self, peer: ID, timeout: float = 2.0) -> bool:
        """One libp2p ping (``timeout`` deadline in all), its RTT observed; False if it
        failed. It reuses the peer's ping stream; if that one fails (the peer restarted, or
        runs libp2p's own handler, which ends a stream idle for 10 s) it tries once more on a
        new stream before reporting a miss. When the deadline ends it, how late the deadline
        fired (this node's loop was busy) is kept for :meth:`_check_liveness`."""
        deadline = trio.current_time() + timeout
        with trio.move_on_after(timeout) as scope:
            for _ in range(2):
                reused = peer in self._ping_streams
                try:
                    stream = self._ping_streams.get(peer)
                    if stream is None:
                        stream = await self.host.new_stream(peer, [PING_PROTOCOL_ID])
                        self._ping_streams[peer] = stream
                    start = time.perf_counter()
                    await perform_ping_roundtrip(stream)
                    self.metrics.rtt.observe(time.perf_counter() - start)
                    return True
                except Exception as exc:
                    await self._drop_ping_stream(peer)
                    log.debug("ping %s failed: %s", peer, exc)
                    if not reused:
                        break
        if scope.cancelled_caught:
            self._ping_late[peer] = trio.current_time() - deadline
        await self._drop_ping_stream(peer)
        self.metrics.stream_errors.labels("ping").inc()
        return False

    async def _drop_ping_stream(self, peer: ID) -> None:
        stream = self._ping_streams.pop(peer, None)
        if stream is not None:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.reset()

    async def _serve_ping(self, stream: Any) -> None:
        """Answers pings (``/ipfs/ping/1.0.0``, 32 bytes echoed) on a stream for as long as
        the peer keeps pinging it at least every ``PING_IDLE_FACTOR`` liveness intervals
        (libp2p's own handler ends a stream idle for 10 s, so every ping needed a new one)."""
        idle = PING_IDLE_FACTOR * self.settings.liveness_interval
        peer = stream.muxed_conn.peer_id
        if self._ping_served.get(peer, 0) >= MAX_PING_STREAMS:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.reset()  # a peer needs one; a few allow for a restart's overlap
            return
        self._ping_served[peer] = self._ping_served.get(peer, 0) + 1
        try:
            while True:
                with trio.fail_after(idle):
                    payload = await read_exactly(stream, PING_LENGTH)
                self._heard[peer] = trio.current_time()
                await stream.write(payload)
        except (trio.TooSlowError, *CONNECTION_LOSS):
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.reset()
        finally:
            left = self._ping_served.pop(peer, 1) - 1
            if left:
                self._ping_served[peer] = left

    async def _wait_disconnected(self, peer: ID, timeout: float) -> None:
        """Until a connection of ``peer`` closes, or ``timeout`` seconds: the caller re-checks
        the swarm's map, which drops a closed connection at least 0.1 s before the swarm's
        ``disconnected`` notice wakes us (pitfall 8), so a missed notice costs one bound."""
        waiter = self._disconnect_waiters.get(peer)
        if waiter is None:
            waiter = self._disconnect_waiters[peer] = trio.Event()
        with trio.move_on_after(max(0.0, timeout)):
            await waiter.wait()

    def _start_dial_loop(self, addr: str) -> None:
        """A reconnect loop for ``addr`` unless its peer has one (or is this node)."""
        try:
            peer = (split_circuit(addr)[1] if is_circuit(addr)
                    else info_from_p2p_addr(multiaddr.Multiaddr(addr)).peer_id)  # fmt: skip
        except Exception as exc:
            log.error("bad peer address %r: %s", addr, exc)
            return
        key = str(peer)
        if key in self._dial_loops or peer == self.peer_id or self._nursery is None:
            return
        self._dial_loops.add(key)
        self._nursery.start_soon(self._reconnect_loop, addr)

    def _start_circuit_loops(self) -> None:
        """With relays: a loop dialling through them each member no static address names (one
        loop per member; the address names the first relay, but :meth:`_dial` goes through
        whichever relay works, ``RelayClient.route``)."""
        if self.relay_client is None or not self.settings.relays:
            return
        relay = self.settings.relays[0]
        for key in list(self.member_peers):
            if key not in self._dial_loops and key not in self.infra_peers:
                self._start_dial_loop(circuit_address(relay, key))

    async def _dial(self, info: Any, addr: str) -> None:
        """Connect to ``info``'s peer: for a circuit address through any of our relays that
        carries it (its own relay only if that is not one of ours); otherwise directly and, if
        that fails and relays are configured, through the relays (``RelayClient.dial_peer``:
        the one that worked last first, each with its own timeout)."""
        timeout = self.settings.dial_timeout
        if is_circuit(addr):
            if self.relay_client is None:
                raise RelayError(addr, "no relay client (no relays configured)")
            await self.relay_client.dial_circuit(addr, timeout)
            return
        # identify fills the peerstore with the peer's *listen* addresses (0.0.0.0, a home's
        # private address) and the swarm dials one address per transport: keep only ours
        with contextlib.suppress(Exception):
            self.host.get_peerstore().clear_addrs(info.peer_id)
        try:
            with trio.fail_after(timeout):
                await self.host.connect(info)
            return
        except Exception as exc:
            if self.relay_client is None or str(info.peer_id) in self.infra_peers:
                raise
            direct_error = exc
        try:
            await self.relay_client.dial_peer(info.peer_id, timeout)
            return
        except RelayError as exc:
            log.debug("circuit to %s failed: %s", info.peer_id, exc)
        raise direct_error

    async def _reconnect_loop(self, addr: str | None, learned: str | None = None) -> None:
        """Keep a connection to one peer, with exponential back-off and jitter, while it is on
        the member list. A static peer (``addr``) is waited for while it is not a member; a
        circuit address (``<relay>/p2p-circuit/p2p/<peer>``) is dialled through a relay (see
        :meth:`_dial`). A direct dial tries the static address and the learned ones in turn. A
        ``learned`` loop (a peer id whose addresses only an exchange gave) ends once the peer
        leaves the list."""
        circuit = addr is not None and is_circuit(addr)
        try:
            if addr is None:
                info = PeerInfo(ID.from_base58(learned or ""), [])
            else:
                info = (PeerInfo(split_circuit(addr)[1], []) if circuit
                        else info_from_p2p_addr(multiaddr.Multiaddr(addr)))  # fmt: skip
        except Exception as exc:
            log.error("bad peer address %r: %s", addr or learned, exc)
            return
        if info.peer_id == self.peer_id:
            return
        try:
            await self._keep_connected(info, addr, circuit)
        finally:
            if addr is None:
                self._dial_loops.discard(str(info.peer_id))

    async def _keep_connected(self, info: PeerInfo, addr: str | None, circuit: bool) -> None:
        """The body of :meth:`_reconnect_loop` (returns when a learned peer left the list)."""
        static = str(info.addrs[0]) if info.addrs else None
        attempt = 0
        network = self.host.get_network()
        delay = self.settings.reconnect_min
        key = str(info.peer_id)
        # Of two members that dial each other, the one with the smaller id waits a little
        # first, so two nodes starting together rarely dial each other simultaneously (max
        # one connection per peer).
        # (1-3 s: fifty nodes starting at once on one machine took longer than 0.3-0.6 s to
        # answer, and each simultaneous pair costs two handshakes.) Only if that peer dials
        # us too: one that does not keep a connection to us (a large grid's learner that did
        # not pick us) would leave us waiting for nothing.
        if info.peer_id.to_bytes() > self.peer_id.to_bytes():
            # its dial wins the wait, or ours goes ahead afterwards (the core members may be
            # named while we wait: asked again each time)
            with trio.move_on_after(random.uniform(1.0, 3.0)):
                while not network.get_connections(info.peer_id) and self.dialled_by(key):
                    await trio.sleep(0.1)
        fast_until = 0.0
        seen_since: float | None = None  # when the connection the peer dialled was first seen
        reaches_us = False  # the peer has dialled us: no NAT in its way to this node
        while True:
            if network.get_connections(info.peer_id):
                if seen_since is None:
                    seen_since, reaches_us = trio.current_time(), True
                await self._wait_disconnected(info.peer_id, RECONNECT_CHECK_SECONDS)
                continue
            if seen_since is not None:
                # a stable connection the peer dialled closed: as after one of ours (below),
                # the peer is probably restarting, so redial fast instead of where the
                # back-off was
                if trio.current_time() - seen_since > self.settings.stable_after:
                    delay = self.settings.reconnect_min
                    fast_until = trio.current_time() + self.settings.redial_fast_for
                seen_since = None
            if self.penalties.is_banned(key) or self.fault_rules.partitioned(key):
                await trio.sleep(0.25)  # (partitioned: test-only, node/net/faults.py)
                continue
            if key not in self.member_peers and key not in self.infra_peers:
                if addr is None:
                    log.debug("learned peer %s left the member list: no more dialling", key)
                    return
                # not (or no longer) a member: our gate would refuse the connection anyway
                with trio.move_on_after(RECONNECT_CHECK_SECONDS):
                    await self._members_changed.wait()
                continue
            if not self.wants(key):
                # a large grid: another member links us to this one (set_core_members). Unless
                # no member we want is connected yet: after the loops of those had their turn,
                # this one may be our way in (a bootstrap peer we would not pick).
                if not self._linked():
                    await trio.sleep(random.uniform(5.0, 10.0))
                if self._linked() or self._stop.is_set():
                    with trio.move_on_after(UNWANTED_CHECK_SECONDS):
                        await self._members_changed.wait()
                    continue
            if (
                trio.current_time() < fast_until
                and reaches_us
                and not circuit
                and info.peer_id.to_bytes() > self.peer_id.to_bytes()
                and self.dialled_by(key)
            ):
                # the start's rule in the fast window: the peer, which reached us before,
                # redials us fast too and its dial goes first, so a restart does not end with
                # both ends dialled (two connections, kept for good)
                await trio.sleep(2 * self.settings.reconnect_min * random.uniform(0.8, 1.2))
                continue
            if self._stop.is_set():
                return  # stopping: dial no more (see _serve)
            target = addr or ""
            if not circuit:
                candidates = self._dial_candidates(key, static)
                if not candidates:  # hearsay that failed was dropped: wait for an exchange
                    await trio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(self.settings.reconnect_max, delay * 2)
                    continue
                target = candidates[attempt % len(candidates)]
                attempt += 1
                info = PeerInfo(info.peer_id, [multiaddr.Multiaddr(target)])
            if circuit and info.peer_id.to_bytes() > self.peer_id.to_bytes():
                # the other end dials first; we dial only if no connection came meanwhile
                wait = self.settings.relay_wait * random.uniform(0.75, 1.25)
                await self._wait_disconnected(info.peer_id, wait)
                if network.get_connections(info.peer_id) or self._stop.is_set():
                    continue
            # pitfall 3: a failed dial puts the peer in a private 60 s negative cache
            network.unblock_peer(info.peer_id)
            try:
                self._dialing += 1
                try:
                    # one dial_timeout per relay a circuit may try (+ the direct dial)
                    rounds = max(1, (0 if circuit else 1) + len(self.settings.relays))
                    with trio.fail_after(self.settings.dial_timeout * rounds):
                        await self._dial(info, target)
                finally:
                    self._dialing -= 1
                self._dialled(key, target, ok=True)
                self.metrics.dials.labels("ok").inc()
                log.info("connected to %s", info.peer_id)
                # the back-off resets only once the connection has proved stable, so a peer
                # that accepts and then drops us (e.g. it banned us) is not redialled hot
                connected_at = trio.current_time()
                while network.get_connections(info.peer_id):
                    stable_at = connected_at + self.settings.stable_after
                    now = trio.current_time()
                    # until it proved stable, then a bounded wait for the disconnect
                    bound = stable_at - now + 0.01 if now <= stable_at else RECONNECT_CHECK_SECONDS
                    await self._wait_disconnected(info.peer_id, bound)
                    if trio.current_time() - connected_at > self.settings.stable_after:
                        delay = self.settings.reconnect_min
                if trio.current_time() - connected_at > self.settings.stable_after:
                    fast_until = trio.current_time() + self.settings.redial_fast_for
                    continue
            except Exception as exc:
                self._dialled(key, target, ok=False)
                self.metrics.dials.labels("failed").inc()
                log.debug("dial %s at %s failed: %s", info.peer_id, target, exc)
            if trio.current_time() < fast_until:
                delay = min(delay, 2 * self.settings.reconnect_min)
            await trio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(self.settings.reconnect_max, delay * 2)

    # -- member addresses ---------------------------------------------------------------

    def known_addrs(self, key: str) -> list[str]:
        """Where peer ``key`` may be dialled (no /p2p/), best first: the static dial list's
        address, what it reported of itself, hearsay (deduplicated; hearsay whose last dial
        failed comes last)."""
        out: list[str] = []
        static = self._static_addrs.get(key)
        heard = self._heard_addrs.get(key, [])
        for a in [*([static] if static else []), *self._self_addrs.get(key, []), *heard]:
            if a not in out:
                out.append(a)
        return out

    def _dial_candidates(self, key: str, static: str | None) -> list[str]:
        """The addresses a reconnect loop tries in turn (``static``: its own, first)."""
        out = [static] if static else []
        return out + [a for a in self.known_addrs(key) if a not in out]

    def _dialled(self, key: str, addr: str, *, ok: bool) -> None:
        """Note a dial's outcome: a hearsay address that worked moves first, one that failed
        last (where new hearsay may take its place)."""
        heard = self._heard_addrs.get(key)
        if not heard or addr not in heard:
            return  # only hearsay is ranked (so the failure set stays within its bounds)
        heard.remove(addr)
        if ok:
            self._failed_addrs.discard((key, addr))
            heard.insert(0, addr)
        else:
            self._failed_addrs.add((key, addr))
            heard.append(addr)

    def _forget_addrs(self, key: str) -> None:
        """Drop what we learned of a peer that left the member list (never shared again)."""
        self._self_addrs.pop(key, None)
        self._heard_addrs.pop(key, None)
        self._addr_budgets.pop(key, None)
        self._failed_addrs = {fa for fa in self._failed_addrs if fa[0] != key}

    def _ensure_dial_loop(self, key: str) -> None:
        """Start a learned reconnect loop for member ``key`` if we know an address of it and no
        loop (static, circuit or learned) keeps it yet."""
        if (
            not self.settings.learn_addrs
            or self._nursery is None
            or key in self._dial_loops
            or key == str(self.peer_id)
            or key not in self.member_peers
            or not self.known_addrs(key)
        ):
            return
        self._dial_loops.add(key)
        log.info("dialling member %s at learned addresses %s", key, self.known_addrs(key))
        self._nursery.start_soon(self._reconnect_loop, None, key)

    def _loopback_ok(self) -> bool:
        allow = self.settings.allow_loopback_addrs
        if allow is not None:
            return allow
        return "/ip4/127." in self.settings.listen or "/ip6/::1/" in self.settings.listen

    def address_book(self) -> dict[str, list[str]]:
        """What we tell a member: our own listen addresses and each current member's (and
        infrastructure peer's) known addresses, at most ``max_peer_addrs`` each."""
        cap = max(1, self.settings.max_peer_addrs)
        me = str(self.peer_id)
        own = [a.split("/p2p/", 1)[0] for a in self.listen_addrs if "/p2p-circuit" not in a]
        book = {me: own[:cap]} if own else {}
        for key in sorted({*self.member_peers, *self.infra_peers}):
            addrs = self.known_addrs(key)[:cap] if key != me else []
            if addrs:
                book[key] = addrs
        return book

    def _encode_book(self) -> bytes:
        """Our address book as the exchange's JSON (trimmed to ``ADDRS_MAX_BYTES``)."""
        book = self.address_book()
        while True:
            data = json.dumps({"v": 1, "addrs": book}, separators=(",", ":")).encode()
            if len(data) <= ADDRS_MAX_BYTES or not book:
                return data
            book.pop(next(reversed(book)))

    def _learn_addrs(self, source: ID, data: bytes, observed_ip: str | None) -> bool:
        """Merge a peer's address book; True if it taught us an address we did not have.

        Only entries about current members and infrastructure peers count (others are
        skipped), each address must pass :func:`dialable_address`, and at most
        ``max_peer_addrs`` are kept per peer: the source's report of itself replaces its
        previous one, hearsay fills free places (or that of hearsay whose last dial failed).
        Raises :class:`PeerFault` (``addrs``, ``malformed``) for a book that is not one."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PeerFault("addrs", "malformed", f"not JSON: {exc}") from None
        entries = doc.get("addrs") if isinstance(doc, dict) else None
        if not isinstance(entries, dict) or len(entries) > ADDRS_MAX_ENTRIES:
            raise PeerFault("addrs", "malformed", "expected {'addrs': {peer: [address, ...]}}")
        src, me = str(source), str(self.peer_id)
        cap, loopback = max(1, self.settings.max_peer_addrs), self._loopback_ok()
        new = False
        for key, addrs in entries.items():
            if not isinstance(addrs, list):
                raise PeerFault("addrs", "malformed", "an entry is not a list")
            if key == me or (key not in self.member_peers and key not in self.infra_peers):
                continue
            valid: list[str] = []
            for a in addrs[:ADDRS_LOOKED_AT]:
                n = dialable_address(a, peer=key, loopback=loopback,
                                     observed_ip=observed_ip if key == src else None)  # fmt: skip
                if n is not None and n not in valid:
                    valid.append(n)
                if len(valid) >= cap:
                    break
            if not valid:
                continue
            known = set(self.known_addrs(key))
            if key == src:
                self._self_addrs[key] = valid
            else:
                heard = self._heard_addrs.setdefault(key, [])
                for a in valid:
                    if a in heard or a in self._self_addrs.get(key, ()):
                        continue
                    if len(heard) < cap:
                        heard.append(a)
                    elif (key, heard[-1]) in self._failed_addrs:
                        self._failed_addrs.discard((key, heard[-1]))
                        heard[-1] = a
            if set(self.known_addrs(key)) - known:
                new = True
                self._ensure_dial_loop(key)
        return new

    def _observed_ip(self, peer: ID, stream: Any) -> str | None:
        """The remote IP of ``peer``'s direct connection (None if relayed or unknown)."""
        with contextlib.suppress(Exception):
            conns = self.host.get_network().get_connections(peer)
            if conns and all(is_relayed(c) for c in conns):
                return None
            remote = stream.get_remote_address()
            if remote:
                return str(remote[0])
        return None

    async def exchange_addrs(self, peer: ID) -> bool:
        """Swap address books with connected ``peer`` (bounded in time); True if it taught us
        something new. Failures are counted, a malformed answer is a fault of the peer."""
        if self.host is None or not self.host.get_network().get_connections(peer):
            return False
        try:
            with trio.fail_after(ADDRS_TIMEOUT):
                stream = await self.host.new_stream(peer, [TProtocol(ADDRS_PROTOCOL)])
                try:
                    await stream.write(encode_varint_prefixed(self._encode_book()))
                    data = await _read_book(stream)
                    observed = self._observed_ip(peer, stream)
                finally:
                    with trio.move_on_after(1.0), contextlib.suppress(Exception):
                        await stream.close()
            learned = self._learn_addrs(peer, data, observed)
        except PeerFault as exc:
            self.addr_exchanges["failed"] += 1
            self._on_stream_fault(peer, "addrs", exc.reason, exc)
            return False
        except Exception as exc:
            self.addr_exchanges["failed"] += 1
            log.debug("address exchange with %s failed: %r", peer, exc)
            return False
        self.addr_exchanges["ok"] += 1
        if learned:
            self.addr_exchanges["learned"] += 1
            self._addr_push.set()
        return learned

    async def _exchange_after_connect(self, peer: ID) -> None:
        """A new connection's exchange (after its streams are ready; retried once)."""
        for pause in (0.2, 1.0):
            await trio.sleep(pause)
            if self._stop.is_set() or not self.host.get_network().get_connections(peer):
                return
            failed = self.addr_exchanges["failed"]
            await self.exchange_addrs(peer)
            if self.addr_exchanges["failed"] == failed:
                return

    async def _serve_addrs(self, stream: Any) -> None:
        """``/microgrid/addrs/1.0.0`` handler: read the opener's book, answer with ours. Only
        members and infrastructure peers, within their budget (a fault otherwise)."""
        peer: ID = stream.muxed_conn.peer_id
        key = str(peer)
        if key not in self.member_peers and key not in self.infra_peers:
            await self._reset_stream(stream)
            return
        budget = self._addr_budgets.get(key)
        if budget is None:
            budget = self._addr_budgets[key] = TokenBucket(1.0, 10.0)
        if not budget.take(trio.current_time()):
            await self._reset_stream(stream)
            raise PeerFault("addrs", "rate_limited", "too many address exchanges")
        learned = False
        with trio.move_on_after(ADDRS_TIMEOUT) as scope:
            data = await _read_book(stream)
            learned = self._learn_addrs(peer, data, self._observed_ip(peer, stream))
            await stream.write(encode_varint_prefixed(self._encode_book()))
            await stream.close()
        if scope.cancelled_caught:
            await self._reset_stream(stream)
            return
        self.addr_exchanges["served"] += 1
        if learned:
            self.addr_exchanges["learned"] += 1
            self._addr_push.set()

    async def _addr_loop(self) -> None:
        """Rounds of exchanges with every connected member: when something new was learned
        or the member list grew (at most every ``addr_push_min`` s), and every
        ``addr_exchange_interval`` s."""
        s = self.settings
        next_round = trio.current_time() + s.addr_exchange_interval
        while True:
            with trio.move_on_at(next_round):
                await self._addr_push.wait()
            self._addr_push = trio.Event()
            if trio.current_time() >= next_round:
                next_round = trio.current_time() + s.addr_exchange_interval
            peers = [p for p in self.connected_peers()
                     if str(p) in self.member_peers or str(p) in self.infra_peers]  # fmt: skip
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(self.exchange_addrs, peer)
            await trio.sleep(s.addr_push_min)

    # -- hostile input ------------------------------------------------------------------

    def _harden_pubsub(self) -> None:
        """Replace the pubsub pieces a peer's bytes can break (see the module docstring)."""
        ps = self.pubsub
        self._libp2p_push_msg = ps.push_msg
        self._libp2p_handle_new_peer = ps._handle_new_peer
        ps.continuously_read_stream = self._read_pubsub_stream
        ps.push_msg = self._guarded_push_msg
        ps._teardown_if_connected = self._teardown_if_connected
        ps._handle_new_peer = self._register_pubsub_peer
        ps._handle_dead_peer = self._handle_dead_pubsub_peer

    def _penalise(self, peer: str, weight: float) -> None:
        if peer == str(self.peer_id) or weight <= 0:
            return
        if self.penalties.add(peer, weight):
            self._on_ban(peer)

    def _on_stream_fault(self, peer: ID, protocol: str, reason: str, exc: BaseException) -> None:
        """An inbound stream of ``peer`` failed: count it; a protocol fault is penalised."""
        key = str(peer)
        if reason == "closed":
            self.metrics.stream_errors.labels(f"{protocol}_closed").inc()
            log.debug("%s stream from %s ended: %r", protocol, key, exc)
            return
        self.faults[(key, protocol, reason)] += 1
        self.metrics.stream_faults.labels(protocol, reason).inc()
        self.metrics.stream_faults_by_peer.labels(self.metrics.peer_label(key), protocol).inc()
        log.warning(
            "reset %s stream from %s: %s (%s: %s)", protocol, key, reason,
            type(exc).__name__, exc, exc_info=reason == "unexpected",
        )  # fmt: skip
        if protocol == "gossip":
            # the pubsub session with this peer may be out of step: start a fresh connection
            self._queue_action("close", peer)
        self._penalise(key, FAULT_WEIGHTS.get(reason, DEFAULT_FAULT_WEIGHT))

    def _budget_rates(self) -> tuple[float, float]:
        """(rate, burst) of a forwarding peer's message budget for the current member count:
        never below what an honest relay may forward, every origin at its own limit."""
        s, members = self.settings, len(self.member_peers)
        return (max(s.peer_msgs_per_second, members * s.rate_per_origin),
                max(s.peer_msgs_burst, members * s.burst_per_origin))  # fmt: skip

    def _budgets(self, peer: str) -> tuple[TokenBucket, TokenBucket]:
        budgets = self._peer_budgets.get(peer)
        if budgets is None:
            s = self.settings
            budgets = self._peer_budgets[peer] = (
                TokenBucket(*self._budget_rates()),
                TokenBucket(s.peer_bytes_per_second, s.peer_bytes_burst),
            )
        return budgets

    def _drop_gossip(self, peer: str, reason: str, count: int) -> None:
        self.dropped[(peer, reason)] += count
        self.metrics.gossip_dropped.labels(reason).inc(count)
        self.metrics.gossip_dropped_by_peer.labels(self.metrics.peer_label(peer)).inc(count)
        self._penalise(peer, min(DEFAULT_FAULT_WEIGHT, FAULT_WEIGHTS[reason] * count))

    async def _read_pubsub_stream(self, stream: Any) -> None:
        """Replaces ``Pubsub.continuously_read_stream`` (py-libp2p 0.8.1) for this node.

        The same steps as libp2p's loop (frame, parse, sender record, publish, subscriptions,
        control), except: a frame that is not an RPC, a bad varint or an oversized frame raise
        :class:`PeerFault` (libp2p lets ``DecodeError`` escape and kill the host); published
        messages over the forwarding peer's budgets are dropped and counted *before* a task is
        spawned per message; subscriptions to topics other than ours are ignored (peer state
        stays bounded); peer exchange in PRUNE is stripped (we dial only members, with our own
        back-off) and control handling has a deadline; a control message that makes the
        router raise is a fault. libp2p's optional metrics events are not emitted (off here).
        """
        ps = self.pubsub
        peer_id: ID = stream.muxed_conn.peer_id
        key = str(peer_id)
        # while this stream is live it holds the peer's subscriptions (its hello comes first)
        self._pubsub_inbound.setdefault(peer_id, set()).add(stream)
        try:
            while ps.manager.is_running:
                try:
                    incoming = await read_varint_prefixed_bytes_limited(
                        stream, ps.max_inbound_rpc_size
                    )
                except MessageTooLarge as exc:
                    raise PeerFault("gossip", "oversized", str(exc)) from None
                except ParseError as exc:
                    raise PeerFault("gossip", "bad_varint", str(exc)) from None
                self._heard[peer_id] = trio.current_time()
                rpc = rpc_pb2.RPC()
                try:
                    rpc.ParseFromString(incoming)
                except DecodeError as exc:
                    raise PeerFault(
                        "gossip", "malformed_protobuf", f"{len(incoming)} bytes: {exc}"
                    ) from None
                # libp2p attaches the sender's signed peer record to every RPC; it is verified
                # (Ed25519) and stored only when it differs from the one this peer last sent
                if (
                    rpc.HasField("senderRecord")
                    and self._sender_records.get(peer_id) != rpc.senderRecord
                ):
                    if not maybe_consume_signed_record(rpc, ps.host, peer_id):
                        continue  # as libp2p: an invalid sender record drops the whole RPC
                    self._sender_records[peer_id] = rpc.senderRecord
                if rpc.publish:
                    self._accept_publish(peer_id, rpc, len(incoming))
                if rpc.subscriptions and len(rpc.subscriptions) <= ps.max_subscriptions_per_rpc:
                    for sub in rpc.subscriptions:
                        if sub.topicid in self._kind_of:
                            ps.handle_subscription(peer_id, sub)
                self._pubsub_hello.add(stream)  # its subscriptions are known from here on
                if rpc.HasField("control"):
                    for prune in rpc.control.prune:
                        del prune.peers[:]
                    try:
                        with trio.fail_after(CONTROL_DEADLINE):
                            await ps.router.handle_rpc(rpc, peer_id)
                    except trio.TooSlowError:
                        raise PeerFault("gossip", "control_error", "timed out") from None
                    except CONNECTION_LOSS:
                        raise
                    except Exception as exc:
                        raise PeerFault(
                            "gossip", "control_error", f"{type(exc).__name__}: {exc}"
                        ) from exc
        except (IncompleteReadError, *CONNECTION_LOSS) as exc:
            # the stream or connection ended (as libp2p: not a fault)
            log.debug("pubsub stream from %s ended: %r", key, exc)
        finally:
            self._pubsub_hello.discard(stream)
            streams = self._pubsub_inbound.get(peer_id, set())
            streams.discard(stream)
            if not streams:
                self._pubsub_inbound.pop(peer_id, None)
                self._sender_records.pop(peer_id, None)

    def _accept_publish(self, peer_id: ID, rpc: Any, size: int) -> None:
        """Hand each subscribed message of ``rpc`` to pubsub, within the peer's budgets."""
        ps = self.pubsub
        wanted = [m for m in rpc.publish if ps._is_subscribed_to_msg(m)]
        if not wanted:
            return
        key = str(peer_id)
        msgs, nbytes = self._budgets(key)
        now = trio.current_time()
        if not nbytes.take(now, size):
            self._drop_gossip(key, "budget_bytes", len(wanted))
            return
        over = 0
        for msg in wanted:
            if not msgs.take(now):
                over += 1
                continue
            # a copy of a message already validated (one arrives from each mesh peer) ends
            # here, as it would in push_msg, without a task spawned for it
            if ps._is_msg_seen(msg):
                continue
            ps.manager.run_task(ps.push_msg, peer_id, msg)
        if over:
            self._drop_gossip(key, "budget_msgs", over)

    async def _guarded_push_msg(self, msg_forwarder: ID, msg: Any) -> None:
        """Pubsub's ``push_msg`` for messages from peers, made safe for any content.

        A message whose origin is not a member is rejected by our validator *before* libp2p's
        signature check: that check deserialises ``msg.key`` when the origin id does not embed
        its key, and raises on garbage (in a pubsub task: the exception would stop pubsub).
        Anything else that escapes libp2p's processing is a fault of the forwarder.
        """
        if msg_forwarder == self.peer_id:
            await self._libp2p_push_msg(msg_forwarder, msg)  # our own: errors reach publish()
            return
        if self.fault_rules is not NO_FAULTS and self._fault_drop_in(msg_forwarder, "gossip_in"):
            return  # test-only injected loss (node/net/faults.py): as if it never arrived
        origin = str(ID(msg.from_id))
        if origin not in self.member_peers:
            if not self.pubsub.is_peer_blacklisted(msg_forwarder):
                kind = next((self._kind_of[t] for t in msg.topicIDs if t in self._kind_of),
                            TopicKind.ORDERS)  # fmt: skip
                self.validator.validate(kind, origin, str(msg_forwarder), msg.data)
            return
        try:
            await self._libp2p_push_msg(msg_forwarder, msg)
        except Exception as exc:
            self._on_stream_fault(msg_forwarder, "gossip", fault_reason(exc), exc)

    async def _teardown_if_connected(self, peer_id: ID) -> None:
        """Replaces ``Pubsub._teardown_if_connected`` (run when a peer is blacklisted).

        libp2p's version resets the peer's stream and *then* deletes ``peers[peer_id]``; if
        the peer disconnects meanwhile (we close a banned peer's connection at once) its
        dead-peer handler has deleted the entry already and the ``KeyError`` stops pubsub.
        It also only deletes that entry: the outbound queue and its sender task stay, and the
        router keeps the peer in its mesh (the later dead-peer handler returns early, the
        peer being gone from ``peers``), so after the ban the readmitted peer is never
        GRAFTed again (we think it is in our mesh, it knows it is not). Here the whole session
        ends first, with no await in between, and the stream is reset afterwards.
        """
        ps = self.pubsub
        stream = self._drop_pubsub_session(peer_id)
        ps._forget_all_subscriptions(peer_id)
        if stream is not None:
            with trio.move_on_after(1.0), contextlib.suppress(Exception):
                await stream.reset()

    # -- pubsub sessions ----------------------------------------------------------------

    def _stream_is_live(self, peer_id: ID, stream: Any) -> bool:
        """True if ``stream`` is open and runs over a live, registered connection to the peer."""
        state = getattr(getattr(stream, "_state", None), "name", "")
        if state in DEAD_STREAM_STATES:
            return False
        with contextlib.suppress(Exception):
            if stream.is_closed():
                return False
        muxed = getattr(stream, "muxed_conn", None)
        if muxed is None or getattr(muxed, "is_closed", False):
            return False
        network = self.host.get_network()
        return any(
            getattr(conn, "muxed_conn", None) is muxed for conn in network.get_connections(peer_id)
        )

    def _drop_pubsub_session(self, peer_id: ID) -> Any:
        """End our outbound pubsub session with ``peer_id`` (the stream registered in
        ``peers``, its queue and sender task, the router's per-peer state and mesh places);
        returns the stream, which the caller resets (None if there was none). Synchronous, so
        no registration can interleave. The peer's subscriptions are not touched."""
        ps = self.pubsub
        stream = ps.peers.pop(peer_id, None)
        queue = ps.peer_queues.pop(peer_id, None)
        if queue is not None:
            queue.close()  # its sender task exits
        ps.router.remove_peer(peer_id)
        return stream

    def _handle_dead_pubsub_peer(self, peer_id: ID) -> None:
        """Replaces ``Pubsub._handle_dead_peer``: end a pubsub session whose stream died.

        py-libp2p 0.8.1 keeps one session per peer *id* (``peers``: our outbound stream, which
        carried our hello; ``peer_topics``: what the peer announced on its inbound stream).
        Its dead-peer handling runs on the ``disconnected`` event, which the swarm sends at
        least 0.1 s after the connection is gone, and skips the peer if it has another
        connection by then; ``_handle_new_peer`` skips a peer already in ``peers``. So a peer
        that reconnects within that window (our reconnect loop redials at once) keeps a dead
        stream registered: nothing is sent on the new connection, the first write fails, and
        the failure handler then forgets the subscriptions the peer announced on its *new*
        stream, which it never sends again: we never send it our messages nor GRAFT it (the
        cause of tests/net/test_cluster.py's flaky readmission, docs/libp2p.md pitfall 8).

        Here, called for any stream failure or disconnect of the peer: if the registered
        stream is still live on a live connection, an older stream or connection ended and
        nothing happens; otherwise the session ends (:meth:`_drop_pubsub_session`), the
        peer's subscriptions are forgotten only if no live inbound stream of the peer holds
        them, and, if the peer is still connected and not blacklisted, a new session is
        registered on its live connection (a fresh stream and our hello).
        """
        ps = self.pubsub
        stream = ps.peers.get(peer_id)
        if stream is not None and self._stream_is_live(peer_id, stream):
            return
        ps._clear_pending_announce_retries_for_peer(peer_id)
        inbound = self._pubsub_inbound.get(peer_id, ())
        if not any(self._stream_is_live(peer_id, s) for s in inbound):
            ps._forget_all_subscriptions(peer_id)
        stream = self._drop_pubsub_session(peer_id)
        if stream is not None and ps.manager.is_running:
            ps.manager.run_task(self._reset_stream, stream)
        if ps._peer_is_connected(peer_id) and not ps.is_peer_blacklisted(peer_id):
            log.debug("pubsub session with %s ended; registering it on its live connection",
                      peer_id)  # fmt: skip
            ps._schedule_peer_stream_retry(peer_id)

    async def _register_pubsub_peer(self, peer_id: ID) -> None:
        """Wraps ``Pubsub._handle_new_peer`` (open our stream, send our hello, add the peer to
        the router): one registration at a time per peer, and a registered session whose
        stream is no longer live is ended first (libp2p skips any peer already in ``peers``,
        so a reconnect that beats the old connection's ``disconnected`` event would otherwise
        keep the dead stream: :meth:`_handle_dead_pubsub_peer`)."""
        lock = self._pubsub_locks.get(peer_id)
        if lock is None:
            lock = self._pubsub_locks[peer_id] = trio.Lock()
        try:
            async with lock:
                stream = self.pubsub.peers.get(peer_id)
                if stream is not None and not self._stream_is_live(peer_id, stream):
                    log.debug("replacing the dead pubsub session with %s", peer_id)
                    self._handle_dead_pubsub_peer(peer_id)
                    # (a registration it schedules waits for this one and then finds it)
                await self._libp2p_handle_new_peer(peer_id)
        finally:
            if not lock.locked() and self._pubsub_locks.get(peer_id) is lock:
                del self._pubsub_locks[peer_id]

    @staticmethod
    async def _reset_stream(stream: Any) -> None:
        """Reset a stream we no longer use (bounded; it may be gone already)."""
        with trio.move_on_after(1.0), contextlib.suppress(Exception):
            await stream.reset()

    # -- gossip -------------------------------------------------------------------------

    def _make_validator(self, kind: TopicKind) -> Callable[[ID, Any], bool]:
        def validate(forwarder: ID, msg: Any) -> bool:
            if forwarder == self.peer_id:
                # our own publication: validated (and counted) in publish()
                return _content_msg_id(msg) in self._own_ids
            origin = ID(msg.from_id)
            seqno = int.from_bytes(msg.seqno[:8] or b"\x00", "big")
            return self.validator.validate(
                kind, str(origin), str(forwarder), msg.data, seqno=seqno
            ).ok

        return validate

    async def publish(self, kind: TopicKind, records: Sequence[SignedRecord]) -> Verdict:
        """Validate our own batch like any peer would, then gossip it; raises PublishError.

        A batch holds up to 64 records: batch a round's orders, one message per round.
        """
        if self.pubsub is None:
            raise RuntimeError("node is not running")
        self._batch_seq += 1
        data = encode_batch(records, self._batch_seq)
        me = str(self.peer_id)
        verdict = self.validator.validate(kind, me, me, data)
        if not verdict.ok:
            raise PublishError(verdict)
        await self.publish_raw(kind, data)
        return verdict

    async def publish_raw(self, kind: TopicKind, data: bytes) -> None:
        """Publish bytes without our own validation (tests use it to play a bad peer)."""
        topic = self.topics[kind]
        msg_key = _content_msg_id_parts(self.peer_id.to_bytes(), [topic], data)
        self._own_ids[msg_key] = None
        while len(self._own_ids) > OWN_IDS_KEPT:
            del self._own_ids[next(iter(self._own_ids))]
        await self._await_outbound_room()
        await self.pubsub.publish(topic, data)
        self.metrics.gossip_out.labels(kind.value).inc()
        await trio.sleep(0)  # pitfall 2: publish() never yields; let the writers run

    async def _await_outbound_room(self) -> None:
        """Back-pressure for our own publications (pitfall 2).

        libp2p's per-peer outbound RPC queue (``RpcQueue``, 32 entries) silently drops what
        does not fit, and ``publish()`` neither blocks nor reports it: a loop publishing faster
        than the slowest peer's writer loses messages. Wait (bounded) until every queue has
        room; after ``publish_wait`` publish anyway and count it.
        """
        queues = getattr(self.pubsub, "peer_queues", None)
        if not queues:
            return
        deadline = trio.current_time() + self.settings.publish_wait
        while any(len(q) >= OUTBOUND_HIGH_WATER for q in list(queues.values())):
            if trio.current_time() >= deadline:
                self.metrics.stream_errors.labels("gossip_outbound_full").inc()
                return
            await trio.sleep(0.002)

    @property
    def subscribed(self) -> bool:
        """Whether this node takes part in the gossip of the grid's records (receives and
        forwards them on every record topic) rather than only publishing its own."""
        return len(self._subscriptions) == len(self.topics)

    async def subscribe_records(self, on: bool) -> bool:
        """Join (``on``) or leave the gossip of the grid's record topics while running;
        returns whether anything changed. Publishing needs neither: a node that is not
        subscribed sends its own records to every subscribed peer it is connected to (flood
        publish), and receives and forwards nobody's. Raft voters subscribe (any of them may
        lead and must hear every record), learners need not (they get the records in the
        committed log; docs/network.md, "Who gossips records")."""
        if self.pubsub is None or self._nursery is None:
            raise RuntimeError("node is not running")
        changed = False
        if on:  # topic by topic: a call cut short is completed by the next one
            for kind, name in self.topics.items():
                if kind in self._subscriptions:
                    continue
                sub = await self.pubsub.subscribe(name)
                scope = trio.CancelScope()
                self._subscriptions[kind] = scope
                self._nursery.start_soon(self._deliver_loop, kind, sub, scope)
                changed = True
        else:
            for kind, scope in list(self._subscriptions.items()):
                scope.cancel()
                del self._subscriptions[kind]
                changed = True
                with contextlib.suppress(Exception):  # leaving is best effort (peers' view)
                    await self.pubsub.unsubscribe(self.topics[kind])
        if changed:
            log.info("gossip of the grid's records %s", "joined" if on else "left",
                     extra={"event": "gossip_subscription", "subscribed": on})  # fmt: skip
        return changed

    async def _deliver_loop(self, kind: TopicKind, sub: Any, scope: trio.CancelScope) -> None:
        with scope:
            await self._deliver(kind, sub)

    async def _deliver(self, kind: TopicKind, sub: Any) -> None:
        while True:
            msg = await sub.get()
            try:
                origin = did_from_peer_id(ID(msg.from_id))
                records = tuple(decode_batch(msg.data, kind))
            except (WireError, IdentityError) as exc:  # validated already: cannot happen
                log.error("undecodable delivered message: %s", exc)
                continue
            self.delivered += 1
            self.delivered_records += len(records)
            self.metrics.gossip_in.labels(kind.value).inc()
            self.metrics.gossip_records_in.labels(kind.value).inc(len(records))
            if self.on_gossip is not None:
                try:
                    self.on_gossip(kind, records, origin)
                except Exception:
                    log.exception("gossip handler failed")


def _content_msg_id_parts(from_id: bytes, topics: Sequence[str], data: bytes) -> bytes:
    h = hashlib.sha256(from_id)
    for topic in topics:
        h.update(b"\x00" + topic.encode())
    h.update(b"\x01" + data)
    return h.digest()


def _content_msg_id(msg: Any) -> bytes:
    """Message id = SHA-256 over (origin, topics, data): pitfall 6."""
    return _content_msg_id_parts(msg.from_id, list(msg.topicIDs), msg.data)
