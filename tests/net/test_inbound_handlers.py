"""An inbound connection's handler ends, and frees its inbound slot, when the connection
closes (node/net/host.py ``release_inbound_handlers``): py-libp2p kept each one until the swarm
stopped, so a node leaked a slot per inbound connection it ever accepted and, after 250,
refused every new one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import multiaddr
import pytest

from node.net.host import NetNode
from tests.net.test_hostile import honest_gossip_flows, meshed, running, three, until


def _dialled_by_us(conn: Any) -> bool:
    """Whether this end dialled a swarm connection (yamux knows who initiated)."""
    return bool(conn.muxed_conn.is_initiator_value)


async def second_connection(dialer: NetNode, peer: NetNode) -> None:
    """A new direct connection from ``dialer`` to ``peer`` beside the one they have."""
    network = dialer.host.get_network()
    before = len(network.get_connections(peer.peer_id))
    addr = next(str(a) for a in peer.host.get_addrs() if "/tcp/" in str(a))
    transport = multiaddr.Multiaddr(addr.split("/p2p/")[0])
    await network.dial_addr(transport, peer.peer_id)
    await until(lambda: len(network.get_connections(peer.peer_id)) == before + 1, 10)
    await until(lambda: len(peer.host.get_network().get_connections(dialer.peer_id)) == 2, 10)


def inbound(node: NetNode, peer: NetNode) -> list[Any]:
    return [c for c in node.host.get_network().get_connections(peer.peer_id)
            if _dialled_by_us(c) is False]  # fmt: skip


def slots_held(node: NetNode) -> int:
    return int(node.host.get_network()._inbound_limiter.borrowed_tokens)


def newest(conns: list[Any]) -> Any:
    return max(conns, key=lambda c: c._created_at)


@pytest.mark.parametrize("closer", ["dialer", "listener"])
async def test_closed_inbound_connections_give_back_their_slots(
    tmp_path: Path, closer: str
) -> None:
    """h dials v again four times and one end closes that connection each time: v's inbound
    slots in use go back to one per live inbound connection (they grew by one each time)."""
    grid, a, v, h = three(tmp_path)
    async with running([a, v, h]):
        await meshed(a, v, h)
        held = slots_held(v)
        assert held == sum(len(inbound(v, p)) for p in (a, h))
        for _ in range(4):
            await second_connection(h, v)
            theirs = newest(inbound(v, h))
            ours = newest(list(h.host.get_network().get_connections(v.peer_id)))
            await (ours if closer == "dialer" else theirs).close()
            await until(lambda c=theirs: c not in inbound(v, h), 10)
            await until(lambda: slots_held(v) == held, 10)
        await honest_gossip_flows(grid, v, h, 1)
