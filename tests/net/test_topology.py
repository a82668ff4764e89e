"""A large grid is not a full mesh (``NetSettings.full_mesh_members``, issue 19).

Past ``full_mesh_members`` members a learner dials only the core (the Raft voters, named by the
daemon through ``NetNode.set_core_members``) and ``neighbours`` other members picked by
rendezvous hashing; a voter still dials every member. The pure choice is checked on nodes that
are not started; the real-host test runs NetNodes (py-libp2p) in process on 127.0.0.1 with a
small threshold, so eight nodes already form a bounded graph.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from node.net.faults import FaultRules
from node.net.host import (
    DUPLICATE_ROUNDS,
    DUPLICATE_SETTLE_SECONDS,
    NetNode,
    NetSettings,
    TopicKind,
)
from node.raft import Message, MessageType
from node.setup.genesis import load_genesis
from node.setup.keyfile import NodeIdentity
from node.testing.harness import NodeSpec, make_grid
from tests.net.test_membership_gate import Grid, connected, in_mesh, order, running, until


def idle_nodes(tmp_path: Path, members: int, **kw: object) -> list[NetNode]:
    """``members`` NetNodes of one genesis, not started (their choice of peers is pure)."""
    specs, _, path = make_grid(tmp_path, members)
    genesis = load_genesis(path)
    return [NetNode(NodeIdentity.from_seed(s.seed), genesis, NetSettings(listen=s.listen, **kw),
                    slot_policy=lambda r: None) for s in specs]  # fmt: skip


def key(node: NetNode) -> str:
    return str(node.peer_id)


def test_a_small_grid_is_a_full_mesh_and_a_large_one_is_bounded(tmp_path: Path) -> None:
    """Up to the threshold every member is dialled; past it a learner dials the core and its
    ``neighbours``, a voter everyone; the pair's score is the same from both ends, the
    choices spread (nobody is everybody's neighbour), and a new member moves few of them."""
    everyone = idle_nodes(tmp_path, 31, full_mesh_members=30, neighbours=4)
    nodes, newcomer = everyone[:30], everyone[30]
    dids = [n.identity.did for n in nodes]
    core = dids[:3]
    for n in nodes:
        n.update_members(dids)
        n.set_core_members(core)
    assert all(n.wants(key(m)) for n in nodes for m in nodes)  # 30 members: a full mesh

    small = NetSettings(full_mesh_members=20, neighbours=4)
    for n in nodes:
        n.settings = small
        n._wanted = n._choose_wanted()
    voters, learners = nodes[:3], nodes[3:]
    assert all(v.wants(key(m)) for v in voters for m in nodes)
    chosen: Counter[str] = Counter()
    for n in learners:
        wanted = {key(m) for m in nodes if m is not n and n.wants(key(m))}
        assert {key(v) for v in voters} <= wanted
        others = wanted - {key(v) for v in voters}
        assert len(others) == 4 and key(n) not in wanted
        chosen.update(others)
    # each learner dials 4 others: 27 x 4 choices over 27 learners; none is picked by most
    assert sum(chosen.values()) == 27 * 4 and max(chosen.values()) <= 12
    assert len(chosen) >= 20

    before = {key(n): {key(m) for m in nodes if n.wants(key(m))} for n in learners}
    for n in nodes:
        n.update_members([*dids, newcomer.identity.did])
    moved = sum(len(before[key(n)] - {key(m) for m in nodes if n.wants(key(m))})
                for n in learners)  # fmt: skip
    assert moved <= 6  # the newcomer takes the place of a few choices, not a reshuffle

    for n in learners[:2]:  # a core change: the new voter is wanted by every learner
        n.set_core_members([*core, learners[-1].identity.did])
        assert n.wants(key(learners[-1]))
    n = learners[0]
    n.set_core_members([n.identity.did, *core])  # promoted: it dials everyone
    assert all(n.wants(key(m)) for m in nodes)


def test_dialled_by_is_wants_seen_from_the_other_end(tmp_path: Path) -> None:
    """``m.dialled_by(n)`` (does ``n`` dial ``m``?) is exactly ``n.wants(m)``, in a full mesh
    and a bounded one: a restarted node waits for a peer's dial only when one is coming."""
    nodes = idle_nodes(tmp_path, 24, full_mesh_members=30, neighbours=4)
    dids = [n.identity.did for n in nodes]
    for n in nodes:
        n.update_members(dids)
        n.set_core_members(dids[:3])
    pairs = [(n, m) for n in nodes for m in nodes if n is not m]
    assert all(m.dialled_by(key(n)) for n, m in pairs)  # a full mesh
    for n in nodes:
        n.settings = NetSettings(full_mesh_members=20, neighbours=4)
        n._wanted = n._choose_wanted()
    assert all(m.dialled_by(key(n)) == n.wants(key(m)) for n, m in pairs)
    assert sum(not m.dialled_by(key(n)) for n, m in pairs) > len(pairs) // 2  # bounded


async def test_a_bounded_grid_connects_learners_to_the_core_and_gossips_everywhere(
    tmp_path: Path,
) -> None:
    """Nine members, two voters, a threshold of four and two neighbours: eight of them dial
    every other statically (as the demo's genesis bootstrap does), yet a learner keeps
    connections only to the voters, the neighbours it picked and those that picked it; a
    learner's gossip reaches every member. The ninth, started later, knows the address of one
    learner it would not pick: that is its way in, and it then connects to the voters (their
    addresses come from the exchange)."""
    specs, _, path = make_grid(tmp_path, 9)
    grid = Grid(load_genesis(path))
    settings = {"full_mesh_members": 4, "neighbours": 2, "reconnect_max": 1.0,
                "learn_addrs": True, "degree": 2, "degree_low": 1, "degree_high": 6,
                "large_degree_high": 3}  # fmt: skip
    members, late = specs[:8], specs[8]
    nodes = [grid.node(s, [p for p in members if p is not s], **settings) for s in members]
    core = [s.did for s in members[:2]]
    for n in nodes:
        n.set_core_members(core)
    voters, learners = nodes[:2], nodes[2:]
    async with running(grid.nodes):
        await until(lambda: all(connected(v, m) for v in voters for m in nodes if m is not v), 30)
        await trio.sleep(11.0)  # past the 5-10 s after which an unwanted loop may dial

        def expected(a: NetNode, b: NetNode) -> bool:
            return a.wants(key(b)) or b.wants(key(a))

        for a in learners:
            for b in nodes:
                if b is not a:
                    assert connected(a, b) == expected(a, b), (a.identity.did, b.identity.did)
        assert any(not connected(a, b) for a in learners for b in learners if a is not b)
        # past the full mesh the gossip mesh is bounded too: a voter is connected to all seven
        # others, yet no mesh holds more than large_degree_high peers once a heartbeat pruned
        # it (a GRAFT may add one for up to a heartbeat, 1 s)
        assert all(n.gossipsub.degree_high == 3 for n in nodes)
        await until(lambda: all(len(n.mesh_peers(TopicKind.ORDERS)) <= 3 for n in nodes), 5)

        origin = learners[-1]
        await origin.publish(TopicKind.ORDERS, [order(origin.identity, grid.genesis, 1)])
        await until(lambda: all(1 in grid.got(n, origin) for n in nodes if n is not origin), 15)

        probe = idle_node(grid, late, **settings)
        probe.set_core_members(core)
        way_in = next(i for i, n in enumerate(nodes) if n in learners and not probe.wants(key(n)))
        newcomer = grid.node(late, [members[way_in]], **settings)
        newcomer.set_core_members(core)
        async with running([newcomer]):
            await until(lambda: all(connected(newcomer, v) for v in voters), 30)


def idle_node(grid: Grid, spec: NodeSpec, **settings: Any) -> NetNode:
    """A NetNode of ``spec`` that is not started (to ask what it would pick)."""
    settings = NetSettings(listen=spec.listen, **settings)
    return NetNode(NodeIdentity.from_seed(spec.seed), grid.genesis, settings,
                   slot_policy=lambda r: None)  # fmt: skip


async def test_a_member_every_peer_pruned_still_gets_the_gossip(tmp_path: Path) -> None:
    """``a`` is connected only to ``b``, and a prune stands between them both ways (each has
    the other in back-off, neither in its mesh), as when every peer pruned a learner of a
    bounded grid. ``c``'s order reaches ``b``, which forwards it along its mesh (``c`` only),
    so ``a`` gets it from ``b``'s IHAVE gossip and its own IWANT: within a few heartbeats, not
    after the 60 s back-off (py-libp2p left peers in back-off out of its gossip)."""
    specs, _, path = make_grid(tmp_path, 3)
    grid = Grid(load_genesis(path))
    a_spec, b_spec, c_spec = specs
    a = grid.node(a_spec, [b_spec])
    b = grid.node(b_spec, [a_spec, c_spec])
    c = grid.node(c_spec, [b_spec])
    a.set_fault_rules(FaultRules.make([c.identity.did]))
    c.set_fault_rules(FaultRules.make([a.identity.did]))
    topic = a.topics[TopicKind.ORDERS]
    async with running([a, b, c]):
        await until(lambda: connected(a, b) and connected(b, c), 20)
        await until(lambda: in_mesh(b, c) and in_mesh(c, b), 10)
        for one, other in ((a, b), (b, a)):
            one.gossipsub.mesh[topic].discard(other.peer_id)
            one.gossipsub._add_back_off(other.peer_id, topic, False)
        await trio.sleep(2.0)  # heartbeats: no GRAFT between them while the back-off holds
        assert not in_mesh(a, b) and not in_mesh(b, a) and not connected(a, c)
        await c.publish(TopicKind.ORDERS, [order(c.identity, grid.genesis, 1)])
        await until(lambda: 1 in grid.got(b, c), 10)
        await until(lambda: 1 in grid.got(a, c), 10)


def record_dials(node: NetNode, *, failed_only: bool = False) -> list[float]:
    """A list that gets the trio time of each dial of ``node`` as it ends (only the failed
    ones with ``failed_only``)."""
    times: list[float] = []
    record = node._dialled

    def dialled(key: str, addr: str, *, ok: bool) -> None:
        if not (ok and failed_only):
            times.append(trio.current_time())
        record(key, addr, ok=ok)

    node._dialled = dialled  # type: ignore[method-assign]
    return times


async def test_a_member_that_restarts_is_redialled_every_half_second(tmp_path: Path) -> None:
    """A stable connection closes (the peer stops for an upgrade): for ``redial_fast_for``
    seconds the loop redials at most ``2 x reconnect_min`` after each failure instead of
    backing off exponentially (0.25, 0.5, 1, 2, 4, 8 s), so a peer that listens again a few
    seconds later is connected within about a second, on a Raspberry Pi whose restart takes
    longer too. (A failed dial itself takes about 0.7 s in py-libp2p, which retries inside.)"""
    specs, _, path = make_grid(tmp_path, 2)
    grid = Grid(load_genesis(path))
    a_spec, b_spec = specs
    a = grid.node(a_spec, [b_spec], stable_after=0.5, reconnect_min=0.1)
    b = grid.node(b_spec, [])  # only ``a`` dials: its loop is what is measured
    failures = record_dials(a, failed_only=True)
    async with running([a]):
        async with running([b]):
            await until(lambda: connected(a, b), 15)
            await trio.sleep(1.0)  # stable
        await until(lambda: not connected(a, b), 10)
        t_down = trio.current_time()
        await trio.sleep(8.0)
        gaps = [y - x for x, y in zip([t_down, *failures], failures, strict=False)]
        again = grid.node(b_spec, [])
        async with running([again]):
            t0 = trio.current_time()
            await until(lambda: connected(a, again), 10)
            took = trio.current_time() - t0
    assert len(failures) >= 7 and max(gaps) < 1.5, gaps  # the back-off alone: gaps of 2-4 s
    assert took < 1.5, took


async def test_a_member_that_dialled_us_and_restarts_dials_first_and_leaves_one_connection(
    tmp_path: Path,
) -> None:
    """Two members that dial each other: the larger id dials first (the smaller waits at its
    start). When the larger restarts, the smaller, which it reached before, does not dial it
    in the fast window after that stable connection closed (its dial could cross the
    restarted node's and leave two connections for good): the restarted node's dial connects
    them within a second of its start, and one connection remains at each end."""
    specs, _, path = make_grid(tmp_path, 2)
    grid = Grid(load_genesis(path))
    ids = [NodeIdentity.from_seed(s.seed).peer_id.to_bytes() for s in specs]
    small_spec, large_spec = specs if ids[0] < ids[1] else specs[::-1]
    timing: dict[str, Any] = {"stable_after": 0.5, "reconnect_min": 0.1}
    small = grid.node(small_spec, [large_spec], **timing)
    large = grid.node(large_spec, [small_spec], **timing)
    attempts = record_dials(small)
    async with running([small]):
        async with running([large]):
            await until(lambda: connected(small, large), 15)
            await trio.sleep(1.0)  # stable
        assert attempts == []  # the larger id dialled
        await until(lambda: not connected(small, large), 10)
        await trio.sleep(2.0)  # down: the back-off alone would have dialled it 4 times
        again = grid.node(large_spec, [small_spec], **timing)
        async with running([again]):
            t0 = trio.current_time()
            await until(lambda: connected(small, again), 10)
            took = trio.current_time() - t0
            await trio.sleep(1.0)  # a crossing dial would have landed by now
            net = small.host.get_network()
            assert len(net.get_connections(again.peer_id)) == 1
            assert len(again.host.get_network().get_connections(small.peer_id)) == 1
    assert attempts == [], attempts
    assert took < 1.5, took


@pytest.mark.parametrize(
    ("first", "second"),
    [("smaller", "crossing"), ("larger", "crossing"), ("smaller", "again"), ("larger", "again"),
     ("smaller", "orphaned"), ("larger", "orphaned")],
)  # fmt: skip
async def test_two_connections_with_one_member_end_as_the_same_one_at_both_ends(
    tmp_path: Path, first: str, second: str
) -> None:
    """A member holds two connections with another: both dialled at once (``crossing``: the
    second is the other end's), or one dialled twice (``again``). libp2p's per-peer limit
    spares young connections and never looks at them again. Here, of crossing dials both ends
    close the one the smaller id dialled; of two dials by one end, that end closes the newer.
    ``orphaned``: the dialler lost track of its second dial (gave up on it while the other end
    accepted it, as seen at 50 households), so only the other end holds two: it closes the
    newer in its last look. One connection remains, the same one at both ends, and gossip and
    Raft go on over it."""
    specs, _, path = make_grid(tmp_path, 2)
    grid = Grid(load_genesis(path))
    ids = [NodeIdentity.from_seed(s.seed).peer_id.to_bytes() for s in specs]
    small_spec, large_spec = specs if ids[0] < ids[1] else specs[::-1]
    small, large = grid.node(small_spec, []), grid.node(large_spec, [])
    spec_of = {id(small): small_spec, id(large): large_spec}
    dialer, other = (small, large) if first == "smaller" else (large, small)
    second_dialer, target = (other, dialer) if second == "crossing" else (dialer, other)
    pairs = 1 if second == "orphaned" else 2  # connections the dialler holds after its 2nd dial
    async with running(grid.nodes):
        await dialer.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(spec_of[id(other)].addr)))
        await until(lambda: connected(other, dialer), 10)
        [first_conn] = dialer.host.get_network().get_connections(other.peer_id)
        conn = await second_dialer.host.get_network().dial_addr(
            multiaddr.Multiaddr(spec_of[id(target)].listen), target.peer_id
        )
        if second == "orphaned":  # out of the dialler's map, still open (libp2p's state then)
            dialer.host.get_network().connections[other.peer_id].remove(conn)
        assert len(dialer.host.get_network().get_connections(other.peer_id)) == pairs
        await until(lambda: len(other.host.get_network().get_connections(dialer.peer_id)) == 2, 5)

        def one_each() -> bool:
            return all(len(n.host.get_network().get_connections(p.peer_id)) == 1
                       for n, p in ((small, large), (large, small)))  # fmt: skip

        await until(one_each, DUPLICATE_ROUNDS * DUPLICATE_SETTLE_SECONDS + 8)
        [at_small] = small.host.get_network().get_connections(large.peer_id)
        [at_large] = large.host.get_network().get_connections(small.peer_id)
        assert at_small.muxed_conn.is_initiator != at_large.muxed_conn.is_initiator  # the same
        if second == "crossing":
            assert at_large.muxed_conn.is_initiator  # the larger id's dial
            # each end closed it, or found it closed by the other
            assert 1 <= small.duplicates_closed + large.duplicates_closed <= 2
        else:
            assert dialer.host.get_network().get_connections(other.peer_id) == [first_conn]
            closer = (dialer, other) if second == "again" else (other, dialer)
            assert (closer[0].duplicates_closed, closer[1].duplicates_closed) == (1, 0)
        await trio.sleep(1.0)  # nothing else is closed afterwards
        assert one_each()
        # gossip both ways over the kept connection (pubsub sessions re-registered on it)
        await until(lambda: in_mesh(small, large) and in_mesh(large, small), 20)
        await small.publish(TopicKind.ORDERS, [order(small.identity, grid.genesis, 1)])
        await large.publish(TopicKind.ORDERS, [order(large.identity, grid.genesis, 2)])
        await until(lambda: 1 in grid.got(large, small) and 2 in grid.got(small, large), 10)
        # and Raft (its writers reopen a stream that ran over the closed connection)
        for node, to in ((small, large), (large, small)):
            i = grid.nodes.index(to)
            frm = spec_of[id(node)].did
            assert node.raft is not None

            def heard(i: int = i, frm: str = frm) -> bool:
                return any(m.term == 3 and m.frm == frm for m in grid.raft.get(i, []))

            with trio.fail_after(10):
                while not heard():
                    node.raft.send(Message(type=MessageType.HEARTBEAT,
                                           to=spec_of[id(to)].did, frm=frm, term=3))  # fmt: skip
                    await trio.sleep(0.2)
