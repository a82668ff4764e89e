"""Both ends dial at once: the duplicate direct connection is closed, the same one at both
ends, and the peers keep gossiping (node/net/host.py ``duplicate_connections``, issue 19)."""

from __future__ import annotations

from pathlib import Path

import multiaddr
import pytest
import trio

from node.net import host as host_module
from node.net.host import NetNode, _dialled_by_us
from tests.net.test_hostile import honest_gossip_flows, meshed, running, three, until


async def second_connection(dialer: NetNode, peer: NetNode) -> None:
    """A new direct connection from ``dialer`` to ``peer`` beside the one they have."""
    network = dialer.host.get_network()
    before = len(network.get_connections(peer.peer_id))
    addr = next(str(a) for a in peer.host.get_addrs() if "/tcp/" in str(a))
    transport = multiaddr.Multiaddr(addr.split("/p2p/")[0])
    await network.dial_addr(transport, peer.peer_id)
    await until(lambda: len(network.get_connections(peer.peer_id)) == before + 1, 10)
    await until(lambda: len(peer.host.get_network().get_connections(dialer.peer_id)) == 2, 10)


def smaller_first(x: NetNode, y: NetNode) -> tuple[NetNode, NetNode]:
    return (x, y) if x.peer_id.to_bytes() < y.peer_id.to_bytes() else (y, x)


async def test_a_simultaneous_dial_leaves_the_smaller_ids_connection_at_both_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_module, "DUPLICATE_RACE_SECONDS", 120.0)
    monkeypatch.setattr(host_module, "DUPLICATE_MIN_AGE_SECONDS", 0.5)
    grid, a, v, h = three(tmp_path, liveness_interval=0.5, liveness_timeout=0.5)
    small, large = smaller_first(v, h)
    async with running([a, v, h]):
        await meshed(a, v, h)
        [existing] = small.host.get_network().get_connections(large.peer_id)
        # the second connection is dialled by whichever end did not dial the first
        dialer = large if _dialled_by_us(existing) else small
        await second_connection(dialer, large if dialer is small else small)
        closed = small.metrics.stream_errors.labels("duplicate_closed")
        closed_large = large.metrics.stream_errors.labels("duplicate_closed")

        def one_each() -> bool:
            ours = small.host.get_network().get_connections(large.peer_id)
            theirs = large.host.get_network().get_connections(small.peer_id)
            return len(ours) == 1 and len(theirs) == 1

        await until(one_each, 10)
        [kept_small] = small.host.get_network().get_connections(large.peer_id)
        [kept_large] = large.host.get_network().get_connections(small.peer_id)
        assert _dialled_by_us(kept_small) is True  # the smaller id dialled the one kept
        assert _dialled_by_us(kept_large) is False
        assert closed._value.get() + closed_large._value.get() >= 1
        # the connection kept carries their gossip both ways (pubsub moved over to it)
        await meshed(a, v, h)
        await honest_gossip_flows(grid, v, h, 1)
        assert small.duplicate_connections() == [] and large.duplicate_connections() == []


async def test_connections_opened_far_apart_are_left_to_liveness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The older connection may be a dead one not yet noticed (the peer restarted and dialled
    again): two connections not opened in one race are not touched here."""
    monkeypatch.setattr(host_module, "DUPLICATE_RACE_SECONDS", 0.0)
    monkeypatch.setattr(host_module, "DUPLICATE_MIN_AGE_SECONDS", 0.0)
    grid, a, v, h = three(tmp_path, liveness_interval=0.5, liveness_timeout=0.5)
    small, large = smaller_first(v, h)
    async with running([a, v, h]):
        await meshed(a, v, h)
        [existing] = small.host.get_network().get_connections(large.peer_id)
        dialer = large if _dialled_by_us(existing) else small
        await second_connection(dialer, large if dialer is small else small)
        assert small.duplicate_connections() == [] and large.duplicate_connections() == []
        await trio.sleep(2.0)  # four housekeeping rounds
        await honest_gossip_flows(grid, v, h, 1)
        assert len(small.host.get_network().get_connections(large.peer_id)) == 2
        assert len(large.host.get_network().get_connections(small.peer_id)) == 2
