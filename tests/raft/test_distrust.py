"""Distrust (issue 16): a follower that caught its leader misbehaving stops honouring that leader's
lease and refuses it votes, for a bounded number of ticks. Pre-vote keeps a distrusting minority
harmless; a distrusting majority elects another leader."""

from __future__ import annotations

from node.raft import MessageType
from node.testing.raft_simulation import NetConfig, RaftSimulation
from tests.raft.helpers import for_seeds

LONG = 200
"""Ticks of distrust far beyond an election timeout (10..20 ticks)."""


def _followers(sim: RaftSimulation, leader: str) -> list[str]:
    return [i for i in sim.ids if i != leader]


def test_a_minority_distrusting_the_leader_does_not_disrupt_it(seed_count: int) -> None:
    """One of 3 (two of 5) voters distrust the leader for many election timeouts: they campaign
    (pre-vote), but the others still honour the leader's lease and ignore the pre-votes, so no
    term moves, the leader stays and the log keeps committing, on the distrusting nodes too."""

    def scenario(seed: int) -> None:
        n = 3 + 2 * (seed % 2)
        sim = RaftSimulation(n, seed)
        leader = sim.wait_leader()
        sim.converge()
        term = sim.node(leader).raft.term
        minority = sim.rng.sample(_followers(sim, leader), (n - 1) // 2)
        for nid in minority:
            assert sim.node(nid).distrust(leader, LONG)
        pre_votes = sim.sent[MessageType.PRE_VOTE]
        for _ in range(8):
            sim.run(10)
            assert sim.propose() is not None
        sim.converge(nodes=sim.ids)
        assert sim.sent[MessageType.PRE_VOTE] > pre_votes  # they did campaign
        assert sim.leader() == leader
        assert all(sim.node(i).raft.term == term for i in sim.ids)

    for_seeds(seed_count, scenario)


def test_a_majority_distrusting_the_leader_elects_another(seed_count: int) -> None:
    """A majority of voters distrusting the leader elect one of themselves within a few election
    timeouts; the old leader follows, and the group commits again (also on a lossy network)."""

    def scenario(seed: int) -> None:
        n = 3 + 2 * (seed % 2)
        net = NetConfig.unreliable() if seed % 4 >= 2 else None
        sim = RaftSimulation(n, seed, net=net)
        old = sim.wait_leader()
        sim.converge()
        majority = sim.rng.sample(_followers(sim, old), n // 2 + 1)
        for nid in majority:
            assert sim.node(nid).distrust(old, LONG)
        assert sim.run_until(lambda: sim.leader() not in (None, old), 80), "leadership stayed"
        new = sim.leader()
        assert new in majority
        sim.wait_leader()
        assert sim.node(old).role == "follower" and sim.node(old).leader == new
        sim.propose()
        sim.converge()

    for_seeds(seed_count, scenario)


def test_a_distrusted_node_is_not_voted_for_while_distrusted(seed_count: int) -> None:
    """Every follower of 5 distrusts the leader; the new leader is then lost. The distrusted node
    campaigns (its lease over the others is gone) but gets no vote, not even when leadership is
    transferred to it (TIMEOUT_NOW overrides leases, not distrust): one of the others leads."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed)
        old = sim.wait_leader()
        sim.converge()
        for nid in _followers(sim, old):
            sim.node(nid).distrust(old, LONG)
        assert sim.run_until(lambda: sim.leader() not in (None, old), 80)
        new = sim.leader()
        assert new is not None
        sim.converge()
        sim.node(new).transfer_leader(old)  # forced election: still refused
        sim.run(30)
        assert sim.leader() not in (None, old)
        current = sim.leader()
        assert current is not None
        sim.crash(current)
        third = sim.run_until(lambda: sim.leader() not in (None, old, current), 100)
        assert third, "no leader among the trusted nodes"
        assert all(sim.node(i).raft.vote != old for i in sim.alive() if i != old), (
            "a vote went to the distrusted node"
        )

    for_seeds(seed_count, scenario)


def test_distrust_expires(seed_count: int) -> None:
    """After its ticks run out a distrusting follower honours the leader's lease again (no more
    pre-votes) and the formerly distrusted node may be elected again (leadership transferred
    back to it)."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed)
        old = sim.wait_leader()
        sim.converge()
        ticks = 40
        for nid in _followers(sim, old):
            sim.node(nid).distrust(old, ticks)
        assert sim.run_until(lambda: sim.leader() not in (None, old), 35)
        new = sim.leader()
        sim.run(ticks)  # every distrust has run out
        assert all(sim.node(i).distrusted() == {} for i in sim.ids)
        sim.run(5)
        pre_votes = sim.sent[MessageType.PRE_VOTE]
        sim.run(60)
        assert sim.sent[MessageType.PRE_VOTE] == pre_votes  # leases honoured: no campaigning
        assert sim.leader() == new
        sim.converge()
        assert new is not None
        sim.node(new).transfer_leader(old)
        assert sim.run_until(lambda: sim.leader() == old, 30), "the old leader is still refused"
        sim.propose()
        sim.converge()

    for_seeds(seed_count, scenario)


def test_a_leader_never_distrusts_and_no_node_distrusts_itself() -> None:
    """``distrust`` is refused on the leader (it cannot distrust its own lease), for the node's
    own id, an empty id and a non-positive duration; a repeated distrust keeps the longer time."""
    sim = RaftSimulation(3, 1)
    leader = sim.wait_leader()
    follower = _followers(sim, leader)[0]
    assert not sim.node(leader).distrust(follower, 50)
    assert sim.node(leader).distrusted() == {}
    node = sim.node(follower)
    assert not node.distrust(follower, 50)
    assert not node.distrust("", 50)
    assert not node.distrust(leader, 0)
    assert node.distrust(leader, 50) and node.distrust(leader, 10)
    assert node.distrusted() == {leader: 50}
    node.tick()
    assert node.distrusted() == {leader: 49}
