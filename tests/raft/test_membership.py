"""Single-server membership changes (Raft thesis §4.1), one at a time."""

from __future__ import annotations

from node.raft import ConfChangeRejected
from node.testing.raft_simulation import NetConfig, RaftSimulation
from tests.raft.helpers import for_seeds


def _voters_everywhere(sim: RaftSimulation, nodes: list[str]) -> set[tuple[str, ...]]:
    return {sim.node(n).status().voters for n in nodes}


def test_add_then_remove_voter(seed_count: int) -> None:
    """Grow 3 -> 4 voters with a brand-new node, then remove a follower: every member
    ends with the same configuration and keeps committing."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed)
        lead = sim.wait_leader()
        sim.propose()
        sim.converge()
        sim.add_node("n4")
        sim.node(lead).add_voter("n4")
        sim.converge()
        assert _voters_everywhere(sim, sim.ids) == {("n1", "n2", "n3", "n4")}
        lead = sim.wait_leader()
        gone = sim.rng.choice([i for i in sim.ids if i != lead])
        sim.node(lead).remove_node(gone)
        members = [i for i in sim.ids if i != gone]
        sim.propose()
        sim.converge(nodes=members)
        assert len(_voters_everywhere(sim, members)) == 1
        assert gone not in sim.node(lead).status().voters
        sim.crash(gone)  # the removed node is gone; the rest still commits
        for _ in range(5):
            sim.propose()
        sim.converge(nodes=members)

    for_seeds(seed_count, scenario)


def test_no_second_change_while_one_is_pending(seed_count: int) -> None:
    """A leader refuses a membership change until the previous one has been applied."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed)
        lead = sim.wait_leader()
        sim.converge()
        sim.add_node("n4")
        sim.add_node("n5")
        node = sim.node(lead)
        node.add_learner("n4")
        try:
            node.add_learner("n5")
        except ConfChangeRejected:
            pass
        else:
            raise AssertionError("second pending change accepted")
        sim.converge()
        sim.node(sim.wait_leader()).add_learner("n5")
        sim.converge()
        assert sim.node(lead).status().learners == ("n4", "n5")

    for_seeds(seed_count, scenario)


def test_new_leader_waits_for_its_first_entry_before_changes(seed_count: int) -> None:
    """A freshly elected leader accepts no membership change until an entry of its own
    term is applied (the fix for the single-server-change bug in Raft's leader changes)."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, net=NetConfig(min_delay=1, max_delay=1))
        sim.run_until(lambda: sim.leader() is not None, 200)
        lead = sim.leader()
        assert lead is not None
        sim.add_node("n4")
        try:
            sim.node(lead).add_learner("n4")
        except ConfChangeRejected:
            pass
        else:
            raise AssertionError("change accepted before the leader's no-op was applied")
        sim.converge()
        sim.node(lead).add_learner("n4")

    for_seeds(seed_count, scenario)


def test_remove_leader(seed_count: int) -> None:
    """The leader removes itself: it steps down once the change is applied, the others
    elect a leader among themselves and keep committing; the old leader is left out."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3 + 2 * (seed % 2), seed)
        old = sim.wait_leader()
        sim.propose()
        sim.converge()
        sim.node(old).remove_node(old)
        assert sim.run_until(lambda: sim.node(old).role != "leader", 50)
        rest = [i for i in sim.ids if i != old]
        assert sim.run_until(lambda: sim.leader() in rest, 200)
        sim.propose()
        sim.converge(nodes=rest)
        for nid in rest:
            assert old not in sim.node(nid).status().voters
        term = sim.node(sim.leader() or rest[0]).raft.term
        sim.run(100)  # the removed node does not disturb the group
        assert sim.node(sim.leader() or rest[0]).raft.term == term

    for_seeds(seed_count, scenario)


def test_remove_partitioned_node(seed_count: int) -> None:
    """A node cut off from the group is removed; when the partition heals it neither
    disrupts the group (pre-vote, check-quorum) nor receives new entries."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed)
        lead = sim.wait_leader()
        sim.converge()
        gone = sim.rng.choice([i for i in sim.ids if i != lead])
        sim.isolate(gone)
        sim.node(lead).remove_node(gone)
        rest = [i for i in sim.ids if i != gone]
        sim.propose()
        sim.converge(nodes=rest)
        sim.run(60)  # the partitioned node times out and pre-votes in vain
        lead = sim.wait_leader()
        term = sim.node(lead).raft.term
        sim.heal()
        for _ in range(5):
            sim.propose()
            sim.run(20)
        assert sim.leader() == lead and sim.node(lead).raft.term == term
        assert sim.node(gone).status().commit < sim.node(lead).status().commit
        sim.converge(nodes=rest)

    for_seeds(seed_count, scenario)


def test_membership_changes_under_faults(seed_count: int) -> None:
    """Random add/remove/promote under crashes and an unreliable network stay safe and
    all members converge on one configuration."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, net=NetConfig(drop_pm=50, max_delay=2, jitter_pm=30))
        sim.add_node("n4")
        sim.add_node("n5")
        changes = 0
        for _ in range(40):
            lead = sim.leader()
            if lead is not None and sim.rng.randrange(3) == 0:
                node = sim.node(lead)
                st = node.status()
                target = sim.rng.choice(["n1", "n2", "n3", "n4", "n5"])
                try:
                    if target in st.voters and len(st.voters) > 3 and target != lead:
                        node.remove_node(target)
                    elif target in st.learners:
                        node.add_voter(target)
                    elif target not in st.voters:
                        node.add_learner(target)
                    changes += 1
                except ConfChangeRejected:
                    pass
            if sim.rng.randrange(4) == 0:
                sim.propose()
            if sim.rng.randrange(15) == 0:
                victim = sim.rng.choice(sim.alive())
                sim.crash(victim)
                sim.run(3)
                sim.restart(victim)
            sim.run(3)
        sim.net = NetConfig()
        lead = sim.wait_leader(300)
        sim.propose()
        sim.converge(400)  # every current member, as the leader's configuration says
        st = sim.node(sim.wait_leader()).status()
        members = sorted(set(st.voters) | set(st.learners))
        confs = {(sim.node(m).status().voters, sim.node(m).status().learners) for m in members}
        assert len(confs) == 1
        assert changes > 0

    for_seeds(seed_count, scenario)
