"""NAT traversal: circuit relay v2 through the operator node, DCUtR hole punching.

Households behind NAT (no inbound port) cannot dial each other. The grid operator runs a node
with a public address (``microgrid operator run``) that is a circuit-relay-v2 *hop*: each
household keeps a connection to it and a *reservation* there, and a household that cannot reach
another directly opens a circuit through it (``<relay>/p2p-circuit/p2p/<peer>``). The relayed
connection is a normal libp2p connection inside a relay stream: Noise authenticates the two
households end to end (the relay sees ciphertext only), yamux multiplexes gossip, Raft and
block sync over it, and our connection gate admits only members. py-libp2p's DCUtR then tries to
upgrade a relayed connection to a direct one by TCP simultaneous open (hole punching); when that
fails, the grid keeps working over the relay. docs/network.md ("Connectivity") has the model
and what py-libp2p 0.8.1 does and does not do.

Several relays: every infrastructure peer the genesis names is one. A household reserves at
each, and a circuit to a member goes through any relay it is connected to
(:meth:`RelayClient.route`): the healthy ones first (reserved there, last circuit through it
did not fail on the relay's side), among them the one that last carried a circuit with that
member, then genesis order; then the rest. Each gets its own timeout, the next is tried when
one fails. A relay is never asked for a circuit to itself. Only when no relay is connected
are all of them tried, each connected first. An open connection is never moved: a relay coming
back is used for the next circuit that needs one (no flapping).

Who may use the relay: the operator node admits members only (its connection gate; a
reservation or a circuit to a non-member is refused here as well). Who is a relay: an
*infrastructure peer*, a peer id named in the operator-signed genesis' bootstrap list that is
not a household (:func:`infrastructure_peers`). A household accepts relayed connections
(the STOP protocol) from any such relay, and from no one else.

py-libp2p 0.8.1 specifics (read its ``libp2p/relay/circuit_v2``):

- The swarm never dials ``/p2p-circuit`` addresses itself (``Swarm.dial_peer`` drops them), and
  ``CircuitV2Transport`` is not registered with the swarm: :meth:`RelayClient.dial` speaks HOP
  CONNECT on a stream to the relay and upgrades that stream with ``upgrade_outbound_connection``
  (Noise + yamux, registered in the swarm like any connection).
- The hop keeps its circuits in ``_active_relays`` keyed by *one* peer id: a household with two
  circuits overwrites the first entry, and when either circuit ends its cleanup closes streams
  of the *other* circuit. :class:`_HopProtocol` stores nothing there and tears down each circuit
  on its own (both streams reset when one direction ends).
- ``RelayLimits(data=0)`` does not mean unlimited: a circuit with a reservation is cut at its
  first byte. We use no duration limit (``duration=0`` is unlimited) and a data limit no grid
  reaches.
- The hop connects a circuit only to a destination holding a reservation *at that hop*
  (``NO_RESERVATION`` otherwise): hence a reservation at every relay.
- The STOP side tags an accepted relayed connection ``/p2p/<own id>/p2p-circuit/...`` (its own
  id where the relay's belongs): :class:`_StopProtocol` tags it with the relay that carried it
  and the peer Noise authenticated, so per-relay counts and ``via`` in ``/status`` are true.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from node.setup.genesis import Genesis
from node.setup.keyfile import did_from_peer_id, peer_id_from_did

log = logging.getLogger("microgrid.net.relay")

RELAY_DATA_LIMIT = 1 << 60
"""Bytes per circuit (py-libp2p: 0 cuts a circuit at its first byte, see the module doc)."""
RESERVATION_TTL = 3600
"""Seconds a reservation lasts at the hop; clients renew at half of it."""
RENEW_FRACTION = 0.5
MAX_VIA = 4096
"""Members whose preferred relay a client remembers (the oldest is forgotten first)."""
REQUEST_TIMEOUT = 10.0
"""Longest one reservation or CONNECT exchange with the relay may take."""
HOLE_PUNCH_DIAL_TIMEOUT = 3
"""Seconds DCUtR gives one direct dial (py-libp2p's default: 10). Its auto-drive loop tries the
relayed peers one after another and first dials each at its known addresses (a home's private
LAN address, learned from the member address exchange or identify), which a NAT silently drops:
each such dial used the whole timeout, delaying every peer queued behind it by as much (3 homes
behind NAT: every pair direct ~20 s after the relay with 10 s, 6-8 s with 3 s;
tests/net/test_nat_grid.py).
A hole-punch dial (TCP simultaneous open) completes within a round trip or one SYN retransmit."""


class RelayError(Exception):
    """A reservation or a circuit through a relay failed; says which relay, peer and why."""

    def __init__(self, relay: str, message: str, status: int | None = None) -> None:
        super().__init__(f"relay {relay}: {message}")
        self.relay = relay
        self.status = status


def relay_limits(max_households: int = 256) -> RelayLimits:
    """The hop's limits: a reservation per household, circuits to every other household (both
    directions, with room for a redial while an old circuit closes), no duration limit."""
    return RelayLimits(
        duration=0,
        data=RELAY_DATA_LIMIT,
        max_circuit_conns=2 * max_households,
        max_reservations=max_households,
        reservation_ttl=RESERVATION_TTL,
    )


def infrastructure_peers(genesis: Genesis) -> dict[str, str]:
    """Peer id -> DID of every genesis bootstrap peer that is not a household: the operator's
    nodes (relay, bootstrap, ledger follower). The operator's signature over the genesis is what
    admits them; they do not trade, vote or gossip."""
    members = {str(peer_id_from_did(did)) for did in genesis.member_dids}
    out: dict[str, str] = {}
    for addr in genesis.bootstrap:
        with contextlib.suppress(Exception):
            peer = info_from_p2p_addr(multiaddr.Multiaddr(addr)).peer_id
            if str(peer) not in members:
                out[str(peer)] = did_from_peer_id(peer)
    return out


def relay_addresses(genesis: Genesis) -> list[str]:
    """The genesis bootstrap addresses of infrastructure peers: the relays households use."""
    infra = infrastructure_peers(genesis)
    out = []
    for addr in genesis.bootstrap:
        with contextlib.suppress(Exception):
            if str(info_from_p2p_addr(multiaddr.Multiaddr(addr)).peer_id) in infra:
                out.append(addr)
    return out


def circuit_address(relay_addr: str, peer: ID | str) -> str:
    """``<relay addr with /p2p/relay>/p2p-circuit/p2p/<peer>``."""
    return f"{relay_addr}/p2p-circuit/p2p/{peer}"


def is_circuit(addr: str) -> bool:
    """True for a ``/p2p-circuit`` multiaddr."""
    return "/p2p-circuit" in addr


def split_circuit(addr: str) -> tuple[PeerInfo, ID]:
    """(relay peer info, destination) of a circuit address; ``ValueError`` if it is not one."""
    head, sep, tail = addr.partition("/p2p-circuit")
    if not sep or not tail.startswith("/p2p/"):
        raise ValueError(f"not a circuit address: {addr!r}")
    relay = info_from_p2p_addr(multiaddr.Multiaddr(head))
    return relay, ID.from_base58(tail[len("/p2p/") :])


def is_relayed(conn: Any) -> bool:
    """True if a swarm connection runs through a relay (its transport addresses say
    ``/p2p-circuit``; py-libp2p tags both ends of a circuit so)."""
    with contextlib.suppress(Exception):
        addrs = conn.get_transport_addresses() or []
        if any("/p2p-circuit" in str(a) for a in addrs):
            return True
    with contextlib.suppress(Exception):
        raw = conn.muxed_conn.secured_conn.get_transport_addresses() or []
        return any("/p2p-circuit" in str(a) for a in raw)
    return False


def relay_of(conn: Any) -> str | None:
    """The relay peer id a relayed swarm connection runs through (the ``/p2p/`` before
    ``/p2p-circuit`` in its transport address), None for a direct one or if unknown."""
    with contextlib.suppress(Exception):
        for addr in conn.get_transport_addresses() or []:
            head, sep, _ = str(addr).partition("/p2p-circuit")
            if sep and "/p2p/" in head:
                return head.rsplit("/p2p/", 1)[1].split("/", 1)[0] or None
    return None


TARGET_SIDE_STATUS = frozenset({int(StatusCode.NO_RESERVATION), int(StatusCode.CONNECTION_FAILED)})
"""Hop answers that blame the destination (no reservation at this relay, did not answer STOP),
not the relay: they do not make a relay unhealthy in :func:`relay_order`."""


def relay_order(states: Mapping[str, RelayState], *, now: float, via: str | None = None
                ) -> list[str]:  # fmt: skip
    """The relays of ``states`` (peer id -> state, in genesis order) in the order a circuit
    tries them: healthy ones first (a live reservation there, and its last circuit did not fail
    on the relay's side), among them ``via`` (the relay of the last circuit with this member)
    first, then the others in order; then the unhealthy ones, ``via`` first, then in order."""
    keys = list(states)

    def rank(key: str) -> tuple[bool, bool, int]:
        s = states[key]
        healthy = s.reserved_until > now and s.failed_seq <= s.ok_seq
        return (not healthy, key != via, keys.index(key))

    return sorted(keys, key=rank)


class _NoActiveRelays(dict[Any, Any]):
    """Replaces ``CircuitV2Protocol._active_relays``: stores nothing (see the module doc)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        return None


class _HopProtocol(CircuitV2Protocol):
    """py-libp2p's circuit relay v2 with a membership check and per-circuit teardown."""

    def __init__(self, host: Any, limits: RelayLimits, allowed: Callable[[ID], bool]) -> None:
        super().__init__(host, limits=limits, allow_hop=True)
        self._active_relays = _NoActiveRelays()
        self.allowed = allowed
        self.refused: dict[str, int] = {}
        self.circuits = 0
        """Circuits open now."""
        self.circuits_total = 0

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    async def _handle_reserve(self, stream: Any, msg: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if not self.allowed(peer):
            self._refuse("reserve_not_member")
            await self._send_status(stream, StatusCode.PERMISSION_DENIED, "not a member")
            return
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: Any, msg: Any) -> None:
        source = stream.muxed_conn.peer_id
        try:
            target = ID(msg.peer.id)
        except Exception:
            target = None
        if target is None or not self.allowed(source) or not self.allowed(target):
            self._refuse("connect_not_member")
            await self._send_status(stream, StatusCode.PERMISSION_DENIED, "not a member")
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        self.circuits += 1
        self.circuits_total += 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self.circuits -= 1

    async def _relay_data(self, src_stream: Any, dst_stream: Any, peer_id: ID,
                          deadline: float | None = None,
                          circuit_data_limit: list[int] | None = None) -> None:  # fmt: skip
        try:
            await super()._relay_data(src_stream, dst_stream, peer_id, deadline,
                                      circuit_data_limit)  # fmt: skip
        finally:
            # one direction ended: end the circuit (the other direction's read then fails)
            for stream in (src_stream, dst_stream):
                with trio.move_on_after(1.0), contextlib.suppress(Exception):
                    await stream.reset()


class _StopProtocol(CircuitV2Protocol):
    """py-libp2p's STOP side (accepting a relayed connection) that tags the connection with
    the relay that carried it and tells :class:`RelayClient` (see the module doc)."""

    def __init__(self, host: Any, on_accepted: Callable[[ID, ID], None]) -> None:
        super().__init__(host, allow_hop=False)
        self.on_accepted = on_accepted

    async def handle_incoming_connection(self, stream: Any, remote_peer_id: bytes) -> None:
        """Upgrade the STOP stream into a connection (Noise + yamux: ``remote_peer_id``, the
        relay's word, is only a claim; the handshake says who is at the other end)."""
        relay = stream.muxed_conn.peer_id
        try:
            claimed = ID(remote_peer_id)
            placeholder = multiaddr.Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{claimed}")
            raw = RawConnection(stream=stream, initiator=False,
                                connection_type=ConnectionType.RELAYED,
                                addresses=[placeholder])  # fmt: skip
            muxed = await self.host.upgrade_inbound_connection(raw, placeholder)
            peer = muxed.peer_id
            addr = multiaddr.Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{peer}")
            for conn in self.host.get_network().get_connections(peer):
                if getattr(conn, "muxed_conn", None) is muxed:
                    conn.set_transport_info([addr], ConnectionType.RELAYED)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await stream.close()
            raise ConnectionError(f"relayed connection through {relay} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
        self.on_accepted(relay, peer)


class RelayService:
    """The operator node's circuit relay v2 hop (members only)."""

    def __init__(self, host: Any, allowed: Callable[[ID], bool],
                 limits: RelayLimits | None = None) -> None:  # fmt: skip
        self.protocol = _HopProtocol(host, limits or relay_limits(), allowed)

    @property
    def reservations(self) -> int:
        """Reservations held now."""
        manager = self.protocol.resource_manager
        with contextlib.suppress(Exception):
            manager._clean_expired()
        return len(getattr(manager, "_reservations", {}))

    def status(self) -> dict[str, Any]:
        """Reservations and circuits for ``/status``."""
        p = self.protocol
        return {"hop": True, "reservations": self.reservations, "circuits": p.circuits,
                "circuits_total": p.circuits_total, "refused": dict(p.refused)}  # fmt: skip

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve HOP (reservations, circuits) until cancelled."""
        async with background_trio_service(self.protocol):
            task_status.started()
            await trio.sleep_forever()


@dataclass
class RelayState:
    """What a household knows about one relay."""

    addr: str
    info: PeerInfo
    reserved_until: float = 0.0
    """Wall-clock expiry of our reservation there (0: none)."""
    last_error: str | None = None
    reservations: int = 0
    circuits: dict[str, int] = field(default_factory=dict)
    """Outbound circuit dials through it: ok / failed (whoever was to blame)."""
    inbound: int = 0
    """Relayed connections it handed us (STOP accepted)."""
    ok_seq: int = 0
    failed_seq: int = 0
    """When (a :class:`RelayClient` event number) a circuit through it last worked (either
    direction) / last failed on the relay's side: its health in :func:`relay_order`."""


class RelayClient:
    """A household's side: reservations at the relays, circuits through them, DCUtR.

    ``trusted(peer)`` says whether a peer may hand us a relayed connection (STOP): the relays
    the genesis names (any of them). The connection gate still decides whether the household
    at the other end is admitted. :meth:`dial_peer` picks the relay (:meth:`route`).
    """

    def __init__(self, host: Any, relays: Iterable[str], trusted: Callable[[ID], bool], *,
                 hole_punch: bool = True, clock: Callable[[], float] | None = None
                 ) -> None:  # fmt: skip
        import time

        self.host = host
        self.relays: dict[str, RelayState] = {}
        for addr in relays:
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            except Exception as exc:
                log.error("bad relay address %r: %s", addr, exc)
                continue
            self.relays[str(info.peer_id)] = RelayState(addr, info)
        self.trusted = trusted
        self.clock = clock or time.time
        # STOP handling (accepting a relayed connection) is py-libp2p's; we guard who may call
        self._stop = _StopProtocol(host, self._accepted)
        self._seq = 0
        self._via: dict[str, str] = {}
        """Member peer id -> the relay of the last circuit that worked with it (either way)."""
        self.hole_punch = hole_punch
        self.dcutr: DCUtRProtocol | None = None
        if hole_punch:
            self.dcutr = DCUtRProtocol(host, dial_timeout=HOLE_PUNCH_DIAL_TIMEOUT)
        self.refused_stop = 0

    def reserved(self) -> list[str]:
        """Relay peer ids at which we hold a live reservation."""
        now = self.clock()
        return [p for p, s in self.relays.items() if s.reserved_until > now]

    def _relayed(self) -> list[tuple[str, str]]:
        """(peer id, relay peer id) of every relayed connection open now, either direction."""
        out: list[tuple[str, str]] = []
        with contextlib.suppress(Exception):
            for peer, conns in list(self.host.get_network().get_connections_map().items()):
                for conn in conns:
                    relay = relay_of(conn) if is_relayed(conn) else None
                    if relay is not None:
                        out.append((str(peer), relay))
        return out

    def open_circuits(self) -> dict[str, str]:
        """Peer id -> relay peer id of each relayed connection open now (either direction; a
        peer with several: the first listed)."""
        out: dict[str, str] = {}
        for peer, relay in self._relayed():
            out.setdefault(peer, relay)
        return out

    def status(self) -> dict[str, Any]:
        """Relays, reservations and circuits for ``/status``: per relay whether we are
        connected and hold a reservation, reservations made, outbound circuit dials through it
        (``ok``/``failed``), relayed connections it handed us (``inbound``), circuits open
        through it now (``open``) and whether its last circuit worked; ``via``: the relay of
        each member connected only through a relay (by DID)."""
        now = self.clock()
        relayed = self._relayed()
        network = self.host.get_network()
        via: dict[str, str] = {}
        for peer, relay in self.open_circuits().items():
            with contextlib.suppress(Exception):
                conns = network.get_connections(ID.from_base58(peer))
                if conns and all(is_relayed(c) for c in conns):
                    via[did_from_peer_id(ID.from_base58(peer))] = relay

        def last(s: RelayState) -> str | None:
            if not s.ok_seq and not s.failed_seq:
                return None
            return "failed" if s.failed_seq > s.ok_seq else "ok"

        return {
            "hole_punch": self.hole_punch,
            "relays": [{"peer": p, "addr": s.addr, "connected": self._connected(s.info.peer_id),
                        "reserved": s.reserved_until > now, "reservations": s.reservations,
                        "error": s.last_error, "circuits": dict(s.circuits),
                        "inbound": s.inbound, "open": sum(1 for _, r in relayed if r == p),
                        "last_circuit": last(s)}
                       for p, s in self.relays.items()],
            "via": via,
            "stop_refused": self.refused_stop,
        }  # fmt: skip

    def route(self, target: ID | str) -> list[str]:
        """The relays (peer ids) a circuit to ``target`` tries, in order: those we are
        connected to, ordered by :func:`relay_order`; if none is connected, every relay in
        genesis order (each is connected first). Never ``target`` itself nor this node."""
        key = str(target)
        own = str(self.host.get_id())
        others = {p: s for p, s in self.relays.items() if p not in (key, own)}
        up = {p: s for p, s in others.items() if self._connected(s.info.peer_id)}
        if not up:
            return list(others)
        return relay_order(up, now=self.clock(), via=self._via.get(key))

    def _note(self, relay: str, peer: str, *, ok: bool) -> None:
        """A circuit with ``peer`` through ``relay`` worked (``ok``) or failed on the relay's
        side: the relay's health and the member's preferred relay."""
        state = self.relays.get(relay)
        if state is None:
            return
        self._seq += 1
        if ok:
            state.ok_seq = self._seq
            self._via.pop(peer, None)
            self._via[peer] = relay
            while len(self._via) > MAX_VIA:
                self._via.pop(next(iter(self._via)))
        else:
            state.failed_seq = self._seq

    def _accepted(self, relay: ID, peer: ID) -> None:
        state = self.relays.get(str(relay))
        if state is not None:
            state.inbound += 1
        self._note(str(relay), str(peer), ok=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept relayed connections from trusted relays, keep a reservation at each relay
        while connected to it, and (with ``hole_punch``) run DCUtR."""
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(self._stop))
            await self._stop.event_started.wait()
            self.host.set_stream_handler(STOP_PROTOCOL_ID, self._guarded_stop)
            if self.dcutr is not None:
                await stack.enter_async_context(background_trio_service(self.dcutr))
            async with trio.open_nursery() as nursery:
                for state in self.relays.values():
                    nursery.start_soon(self._reservation_loop, state)
                task_status.started()
                await trio.sleep_forever()

    async def _guarded_stop(self, stream: Any) -> None:
        """STOP from a trusted relay (any infrastructure peer): accept the relayed
        connection; from anyone else: reset."""
        peer = stream.muxed_conn.peer_id
        if not self.trusted(peer):
            self.refused_stop += 1
            log.warning("refusing a relayed connection offered by %s (not a grid relay)", peer)
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        await self._stop._handle_stop_stream(stream)

    def _connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().get_connections(peer))

    async def _reservation_loop(self, state: RelayState) -> None:
        """Reserve while connected to the relay (the NetNode's reconnect loop keeps that
        connection); renew at half the TTL, at once after a reconnect."""
        peer = state.info.peer_id
        while True:
            if not self._connected(peer):
                state.reserved_until = 0.0
                await trio.sleep(0.5)
                continue
            try:
                expires = await self.reserve(state)
            except RelayError as exc:
                state.last_error = str(exc)
                log.warning("relay reservation failed: %s", exc)
                await trio.sleep(2.0)
                continue
            state.last_error = None
            renew_at = self.clock() + max(5.0, (expires - self.clock()) * RENEW_FRACTION)
            while self.clock() < renew_at and self._connected(peer):
                await trio.sleep(min(1.0, max(0.05, renew_at - self.clock())))

    async def reserve(self, state: RelayState) -> float:
        """One RESERVE exchange; returns the reservation's expiry (wall clock)."""
        relay = str(state.info.peer_id)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                stream = await self.host.new_stream(state.info.peer_id, [HOP_PROTOCOL_ID])
                try:
                    await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                    resp = await read_delimited_msg(stream, HopMessage)
                finally:
                    with contextlib.suppress(Exception):
                        await stream.close()
        except trio.TooSlowError:
            raise RelayError(relay, "reservation timed out") from None
        except Exception as exc:
            raise RelayError(relay, f"reservation failed: {type(exc).__name__}: {exc}") from exc
        status = resp.status if resp.HasField("status") else int(StatusCode.OK)
        if resp.type != HopMessage.STATUS or status != StatusCode.OK:
            raise RelayError(relay, f"reservation refused (status {status})", status)
        expires = float(resp.reservation.expire) if resp.HasField("reservation") else 0.0
        if expires <= self.clock():
            expires = self.clock() + 60.0  # no or a stale expiry: renew again soon
        state.reserved_until = expires
        state.reservations += 1
        log.info("relay reservation held", extra={"event": "relay_reserved", "relay": relay,
                                                  "expires": int(expires)})  # fmt: skip
        return expires

    async def dial_peer(self, target: ID, timeout: float = REQUEST_TIMEOUT) -> Any:
        """Open a relayed connection to ``target`` through the relays of :meth:`route`, one
        after another until one carries it, each given ``timeout`` seconds; returns the swarm
        connection. Raises :class:`RelayError` naming every relay tried and why it failed."""
        order = self.route(target)
        if not order:
            raise RelayError("-", f"no relay to reach {target} through (only itself)")
        errors: list[str] = []
        for relay in order:
            try:
                return await self.dial(circuit_address(self.relays[relay].addr, target), timeout)
            except RelayError as exc:
                errors.append(str(exc))
        raise RelayError(",".join(order), f"no relay carried a circuit to {target}: "
                         + "; ".join(errors))  # fmt: skip

    async def dial_circuit(self, addr: str, timeout: float = REQUEST_TIMEOUT) -> Any:
        """Open the circuit ``addr`` (``<relay>/p2p-circuit/p2p/<peer>``): through any of our
        relays (:meth:`dial_peer`) if it names one of them, else through its relay only.
        Raises :class:`RelayError` (``ValueError`` if ``addr`` is not a circuit address)."""
        relay_info, target = split_circuit(addr)
        if str(relay_info.peer_id) in self.relays:
            return await self.dial_peer(target, timeout)
        return await self.dial(addr, timeout)

    async def dial(self, addr: str, timeout: float = REQUEST_TIMEOUT) -> Any:
        """Open a relayed connection to the circuit address ``addr``
        (``<relay>/p2p-circuit/p2p/<peer>``) through that relay only; returns the swarm
        connection. Connects to the relay first if needed. Raises :class:`RelayError`; the
        relay's health (:func:`relay_order`) suffers unless the hop blamed the destination
        (:data:`TARGET_SIDE_STATUS`) or the end-to-end handshake failed after the hop's OK."""
        relay_info, target = split_circuit(addr)
        relay = str(relay_info.peer_id)
        if relay_info.peer_id == target:
            raise RelayError(relay, "a circuit to the relay itself")
        state = self.relays.get(relay)
        relay_blamed = True
        try:
            with trio.fail_after(timeout):
                if not self._connected(relay_info.peer_id):
                    await self.host.connect(relay_info)
                stream = await self.host.new_stream(relay_info.peer_id, [HOP_PROTOCOL_ID])
                try:
                    msg = HopMessage(type=HopMessage.CONNECT,
                                     peer=CircuitPeerId(id=target.to_bytes()))  # fmt: skip
                    await write_delimited_msg(stream, msg)
                    resp = await read_delimited_msg(stream, HopMessage)
                    status = resp.status if resp.HasField("status") else int(StatusCode.OK)
                    if resp.type != HopMessage.STATUS or status != StatusCode.OK:
                        relay_blamed = int(status) not in TARGET_SIDE_STATUS
                        raise RelayError(relay, f"circuit to {target} refused (status "
                                                f"{status})", status)  # fmt: skip
                    relay_blamed = False  # the hop connected us: the rest is end to end
                    raw = RawConnection(stream=stream, initiator=True,
                                        connection_type=ConnectionType.RELAYED,
                                        addresses=[multiaddr.Multiaddr(addr)])  # fmt: skip
                    conn = await self.host.upgrade_outbound_connection(raw, target)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await stream.reset()
                    raise
        except RelayError:
            self._count(state, "failed", relay, str(target), relay_blamed)
            raise
        except trio.TooSlowError:
            self._count(state, "failed", relay, str(target), relay_blamed)
            raise RelayError(relay, f"circuit to {target} timed out") from None
        except Exception as exc:
            self._count(state, "failed", relay, str(target), relay_blamed)
            raise RelayError(relay, f"circuit to {target} failed: {type(exc).__name__}: {exc}"
                             ) from exc  # fmt: skip
        self._count(state, "ok", relay, str(target), False)
        with contextlib.suppress(Exception):
            conn.set_transport_info([multiaddr.Multiaddr(addr)], ConnectionType.RELAYED)
        return conn

    def _count(self, state: RelayState | None, result: str, relay: str, target: str,
               relay_blamed: bool) -> None:  # fmt: skip
        if state is not None:
            state.circuits[result] = state.circuits.get(result, 0) + 1
        if result == "ok":
            self._note(relay, target, ok=True)
        elif relay_blamed:
            self._note(relay, target, ok=False)


def connection_kinds(host: Any, peers: Mapping[str, str]) -> dict[str, str]:
    """DID -> ``direct`` / ``relayed`` for each of ``peers`` (peer id -> DID) connected now."""
    out: dict[str, str] = {}
    network = host.get_network()
    for key, did in peers.items():
        with contextlib.suppress(Exception):
            conns = network.get_connections(ID.from_base58(key))
            if conns:
                out[did] = "direct" if any(not is_relayed(c) for c in conns) else "relayed"
    return out


def hop_protocol_id() -> str:
    """The circuit relay v2 hop protocol id (for tests and docs)."""
    return str(HOP_PROTOCOL_ID)


def infrastructure_learners(genesis: Genesis) -> tuple[str, ...]:
    """The infrastructure peers' DIDs, sorted: Raft learners in every node's initial
    configuration (the operator node follows the log; the engine never knows them, so the
    membership controller leaves them alone)."""
    return tuple(sorted(infrastructure_peers(genesis).values()))
