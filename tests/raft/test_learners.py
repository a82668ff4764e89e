"""Non-voting learners: replicate, never vote-count or campaign, can be promoted."""

from __future__ import annotations

from node.raft import ConfChangeRejected
from node.raft.types import Message, MessageType
from node.testing.raft_simulation import RaftSimulation
from tests.raft.helpers import for_seeds


def test_learners_replicate_and_never_campaign(seed_count: int) -> None:
    """Learners apply the log and report role "learner"; with all voters gone they never
    start an election."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, learners=2)
        sim.wait_leader()
        for _ in range(10):
            sim.propose()
        sim.converge()
        learners = sim.learner_ids
        for lid in learners:
            assert sim.node(lid).status().role == "learner"
        terms = {lid: sim.node(lid).raft.term for lid in learners}
        for v in sim.voter_ids:
            sim.crash(v)
        sim.run(200)
        for lid in learners:
            assert sim.node(lid).status().role == "learner"
            assert sim.node(lid).raft.term == terms[lid]

    for_seeds(seed_count, scenario)


def test_learners_never_count_toward_quorum(seed_count: int) -> None:
    """With 3 voters and 4 learners, losing 2 voters stops commits, whatever the learners
    acknowledge."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, learners=4, check_quorum=False)
        lead = sim.wait_leader()
        sim.converge()
        commit = sim.node(lead).raft.log.committed
        for v in sim.voter_ids:
            if v != lead:
                sim.isolate(v)
        for _ in range(5):
            sim.propose(via=lead)
            sim.run(2)
        assert sim.node(lead).raft.log.committed == commit
        for lid in sim.learner_ids:  # the learners did get the entries
            assert sim.storages[lid].last_index() > commit
        sim.heal()
        sim.converge(300)

    for_seeds(seed_count, scenario)


def test_learner_join_by_snapshot_and_promotion(seed_count: int) -> None:
    """A brand-new node joins as a learner (catching up by snapshot after compaction), is
    promoted to voter, then counts toward quorum and can lead."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, snapshot_threshold=12)
        sim.wait_leader()
        for _ in range(40):
            sim.propose()
            sim.run(1)
        sim.add_node("n9")
        sim.run(30)
        assert sim.node("n9").status().commit == 0  # not a member: nobody talks to it
        lead = sim.wait_leader()
        sim.node(lead).add_learner("n9")
        sim.converge(300)
        assert sim.storages["n9"].snapshot().metadata.index > 0
        assert sim.node("n9").status().role == "learner"
        assert "n9" in sim.node(lead).status().learners
        # promote
        lead = sim.wait_leader()
        sim.node(lead).add_voter("n9")
        sim.converge(300)
        for nid in sim.ids:
            assert "n9" in sim.node(nid).status().voters
        assert sim.node("n9").status().role == "follower"
        # 4 voters need 3 acks: with one old voter cut off, commits need n9
        others = [i for i in sim.voter_ids if i != lead]
        sim.isolate(others[0])
        sim.propose()
        sim.converge(300, nodes=[lead, others[1], "n9"])
        # n9 can lead
        lead = sim.wait_leader()
        sim.heal()
        sim.converge()
        if lead != "n9":
            sim.node(lead).transfer_leader("n9")
            assert sim.run_until(lambda: sim.leader() == "n9", 100)

    for_seeds(seed_count, scenario)


def test_learner_cannot_be_transfer_target_nor_demote_leader(seed_count: int) -> None:
    """Leadership is never handed to a learner; a leader cannot demote itself."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, learners=1)
        lead = sim.wait_leader()
        sim.converge()
        sim.node(lead).transfer_leader(sim.learner_ids[0])
        sim.run(30)
        assert sim.leader() == lead
        try:
            sim.node(lead).add_learner(lead)
        except ConfChangeRejected:
            pass
        else:
            raise AssertionError("leader demoted itself")

    for_seeds(seed_count, scenario)


def _heartbeats_to(sim: RaftSimulation, ticks: int) -> dict[str, int]:
    """Heartbeats the simulation's wire carried to each node over ``ticks`` ticks."""
    seen: dict[str, int] = {}

    def count(m: Message) -> Message:
        if m.type == MessageType.HEARTBEAT:
            seen[m.to] = seen.get(m.to, 0) + 1
        return m

    sim.intercept = count
    sim.run(ticks)
    sim.intercept = None
    return seen


def test_caught_up_learners_get_sparse_heartbeats(seed_count: int) -> None:
    """With ``learner_heartbeat_rounds=5`` an idle leader sends each caught-up learner a fifth
    of the heartbeats each voter gets, and the learners still apply every entry as soon as
    the voters commit it (the leader broadcasts each commit)."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, learners=6, learner_heartbeat_rounds=5)
        lead = sim.wait_leader()
        sim.converge()
        seen = _heartbeats_to(sim, 100)
        voters = [v for v in sim.voter_ids if v != lead]
        for v in voters:
            assert 90 <= seen.get(v, 0) <= 101, seen
        for lid in sim.learner_ids:
            assert 15 <= seen.get(lid, 0) <= 21, seen
        sim.propose(via=lead)
        # a commit reaches every learner within a few message delays, not a heartbeat round
        assert sim.run_until(
            lambda: all(
                sim.node(n).status().commit == sim.node(lead).status().commit
                for n in sim.learner_ids
            ),
            max_ticks=6,
        )

    for_seeds(seed_count, scenario)


def test_a_wiped_learner_is_caught_up_within_an_election_timeout(seed_count: int) -> None:
    """A learner that comes back with an empty log while the leader believes it caught up is
    found by its next (sparse) heartbeat and caught up, without a leader change."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, learners=2, learner_heartbeat_rounds=5)
        lead = sim.wait_leader()
        for _ in range(10):
            sim.propose(via=lead)
        sim.converge()
        term = sim.node(lead).raft.term
        victim = sim.learner_ids[0]
        sim.replace_storage(victim)
        target = sim.node(lead).status().commit
        assert sim.run_until(lambda: sim.node(victim).status().commit >= target, max_ticks=20)
        assert sim.node(lead).raft.term == term and sim.leader() == lead

    for_seeds(seed_count, scenario)
