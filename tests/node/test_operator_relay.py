"""The operator node's relay, in process over 127.0.0.1: households that have no address of
each other (only the operator's, from the genesis bootstrap) reserve a slot at the operator's
circuit relay v2 hop, connect through it (``/p2p-circuit``) and gossip; Raft frames cross the
circuit; a non-member is refused a reservation; with DCUtR on, a relayed connection between
two households that can reach each other is upgraded to a direct one."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from market import MarketConfig
from market.models import MemberRole, Order, Side
from market.signing import Signer
from node.net.host import PENDING_PER_PEER, NetNode, NetSettings
from node.net.relay import (
    RelayClient,
    RelayError,
    connection_kinds,
    infrastructure_learners,
    infrastructure_peers,
    is_relayed,
    relay_addresses,
)
from node.net.wire import TopicKind
from node.raft import Message, MessageType, decode_message, encode_message
from node.setup.genesis import Genesis, create_genesis
from node.setup.keyfile import NodeIdentity
from node.testing.harness import free_ports, named_seed

pytestmark = pytest.mark.slow


def open_slot() -> int:
    """A slot whose gate is still open now (2 slots of 900 s ahead): computed when a record is
    made, not at import, since a long suite runs this module's tests many minutes after
    collecting it (a slot fixed at import had its gate closed by then)."""
    return math.floor(time.time() / 900) + 2


def ident(name: str) -> NodeIdentity:
    return NodeIdentity.from_seed(named_seed(f"relay-test/{name}"))


def make_genesis(port: int, households: list[NodeIdentity], op_node: NodeIdentity) -> Genesis:
    """Households as members; only the operator node (a non-member) in the bootstrap list."""
    operator = Signer.from_seed(named_seed("relay-test/operator-key"))
    market = MarketConfig(grid="relay-grid", operator=operator.did, feed_in_tariff=8,
                          retail_price=30)  # fmt: skip
    return create_genesis(
        operator, market,
        [(h.did, f"meter-{i}", MemberRole.VOTER) for i, h in enumerate(households)],
        gate_closure_lead_seconds=0,
        bootstrap=[f"/ip4/127.0.0.1/tcp/{port}/p2p/{op_node.peer_id}"],
    )  # fmt: skip


def order(identity: NodeIdentity, genesis: Genesis, nonce: int) -> Order:
    return Order(grid=genesis.grid, nonce=nonce, id=f"o{nonce}", household=identity.did,
                 side=Side.SELL, slot=open_slot(), quantity_wh=100, price=10,
                 ).signed_by(identity.signer)  # fmt: skip


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@asynccontextmanager
async def relay_grid(tmp_path: Path, *, hole_punch: bool) -> AsyncIterator[dict[str, Any]]:
    op_port, p0, p1 = free_ports(3)
    op, h0, h1 = ident("operator-node"), ident("h0"), ident("h1")
    genesis = make_genesis(op_port, [h0, h1], op)
    delivered: dict[str, list[Any]] = {"h0": [], "h1": []}
    raft: dict[str, list[Any]] = {"h0": [], "h1": [], "op": []}
    codec = (encode_message, decode_message)
    operator = NetNode(op, genesis, NetSettings(
        listen=f"/ip4/127.0.0.1/tcp/{op_port}", relay_hop=True, subscribe=False),
        raft_codec=codec, on_raft=raft["op"].append)  # fmt: skip
    nodes = {"op": operator}
    for name, identity, port in (("h0", h0, p0), ("h1", h1, p1)):
        settings = NetSettings(listen=f"/ip4/127.0.0.1/tcp/{port}", peers=list(genesis.bootstrap),
                               relays=relay_addresses(genesis), hole_punch=hole_punch,
                               relay_wait=1.0)  # fmt: skip

        def on_gossip(kind: TopicKind, records: Any, origin: str, name: str = name) -> None:
            delivered[name].extend(records)

        nodes[name] = NetNode(identity, genesis, settings, on_gossip=on_gossip,
                              slot_policy=lambda r: None, raft_codec=codec,
                              on_raft=raft[name].append)  # fmt: skip
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in nodes.values():
                await nursery.start(node.run)
            try:
                yield {"genesis": genesis, "nodes": nodes, "delivered": delivered,
                       "raft": raft, "ids": {"op": op, "h0": h0, "h1": h1}}  # fmt: skip
            finally:
                for node in nodes.values():
                    node.stop()


def test_infrastructure_from_genesis() -> None:
    op, h0, h1 = ident("operator-node"), ident("h0"), ident("h1")
    genesis = make_genesis(4001, [h0, h1], op)
    assert infrastructure_peers(genesis) == {str(op.peer_id): op.did}
    assert infrastructure_learners(genesis) == (op.did,)
    assert relay_addresses(genesis) == list(genesis.bootstrap)


async def test_households_connect_and_gossip_through_the_relay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with relay_grid(tmp_path, hole_punch=False) as g:
        nodes, ids = g["nodes"], g["ids"]
        h0, h1, op = nodes["h0"], nodes["h1"], nodes["op"]
        started = trio.current_time()
        await wait_for(lambda: ids["h1"].peer_id in h0.connected_peers(), 30,
                       "h0 <-> h1 through the relay")  # fmt: skip
        print(f"relayed connection after {trio.current_time() - started:.2f} s")
        conns = h0.host.get_network().get_connections(ids["h1"].peer_id)
        assert conns and all(is_relayed(c) for c in conns)
        assert connection_kinds(h0.host, h0.member_peers) == {ids["h1"].did: "relayed"}
        assert op.relay_service is not None and op.relay_service.reservations == 2
        assert h0.relay_client is not None and h0.relay_client.reserved()
        # gossip both ways over the circuit (the operator is in no mesh: it subscribes nothing)
        await wait_for(lambda: str(ids["h1"].peer_id) in h0.mesh_peers()
                       or bool(h0.pubsub.peer_topics.get(h0.topics[TopicKind.ORDERS])),
                       15, "h1's subscriptions at h0")  # fmt: skip
        await h0.publish(TopicKind.ORDERS, [order(ids["h0"], g["genesis"], 1)])
        await h1.publish(TopicKind.ORDERS, [order(ids["h1"], g["genesis"], 1)])
        await wait_for(lambda: len(g["delivered"]["h1"]) >= 2 and len(g["delivered"]["h0"]) >= 2,
                       15, "orders delivered both ways")  # fmt: skip
        assert str(op.peer_id) not in h0.mesh_peers()
        # the operator never subscribes: once its hello is read, gossipsub queues nothing for
        # it (it queued every message, up to the bound, re-pruning the queue on each), and no
        # line is logged per message
        await wait_for(lambda: h0._pubsub_settled(op.peer_id), 10, "the operator's hello")
        caplog.clear()
        for nonce in range(2, 2 + 2 * PENDING_PER_PEER):
            await h0.publish(TopicKind.ORDERS, [order(ids["h0"], g["genesis"], nonce)])
        assert op.peer_id not in h0.gossipsub._pending_messages
        assert not [r for r in caplog.records if "pending message queue" in r.getMessage()]
        # Raft frames over the circuit, and between a household and the operator (learner)
        msg = Message(type=MessageType.HEARTBEAT, to=ids["h1"].did, frm=ids["h0"].did, term=1)
        h0.raft.send(msg)
        op_msg = Message(type=MessageType.HEARTBEAT, to=ids["op"].did, frm=ids["h0"].did, term=1)
        h0.raft.send(op_msg)
        await wait_for(lambda: g["raft"]["h1"] and g["raft"]["op"], 10, "raft frames")
        assert g["raft"]["h1"][0].frm == ids["h0"].did
        doc = h0.connectivity()
        assert doc["client"]["relays"][0]["reserved"] is True


async def test_non_member_cannot_reserve(tmp_path: Path) -> None:
    async with relay_grid(tmp_path, hole_punch=False) as g:
        op = g["nodes"]["op"]
        service = op.relay_service
        assert service is not None
        # the households' own reservations first (made after their connection: under CI's load
        # they were not there yet when the count below was read)
        await wait_for(lambda: service.reservations == 2, 20, "the households' reservations")
        outsider = ident("outsider")
        port = free_ports(1)[0]
        import multiaddr
        from libp2p import new_host

        host = new_host(key_pair=outsider.key_pair)
        async with host.run(listen_addrs=[multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]):
            client = RelayClient(host, relay_addresses(g["genesis"]), lambda p: True,
                                 hole_punch=False)  # fmt: skip
            state = next(iter(client.relays.values()))
            await host.connect(state.info)  # the gate closes it at once
            with pytest.raises(RelayError):
                await client.reserve(state)
            await wait_for(lambda: op.refused.get("non_member", 0) >= 1, 5, "gate refusal")
            assert service.reservations == 2  # the households' only


async def test_hole_punch_upgrades_to_direct_when_reachable(tmp_path: Path) -> None:
    """On loopback each household can reach the other's listen address: DCUtR's first step
    (a unilateral direct dial to the addresses identify reported) replaces the circuit."""
    async with relay_grid(tmp_path, hole_punch=True) as g:
        nodes, ids = g["nodes"], g["ids"]
        h0 = nodes["h0"]
        await wait_for(lambda: ids["h1"].peer_id in h0.connected_peers(), 30, "h0 <-> h1")
        await wait_for(
            lambda: connection_kinds(h0.host, h0.member_peers).get(ids["h1"].did) == "direct",
            30, "a direct connection (DCUtR)")  # fmt: skip
