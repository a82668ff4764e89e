"""Leader election (Raft paper §5.2, pre-vote and check-quorum from §9.6 of the thesis)."""

from __future__ import annotations

import pytest

from node.raft import MessageType
from node.testing.raft_simulation import NetConfig, RaftSimulation
from tests.raft.helpers import for_seeds


def test_initial_election(seed_count: int) -> None:
    """A fresh group of 3, 5 or 7 elects exactly one leader, all agree on it and its term."""

    def scenario(seed: int) -> None:
        n = (3, 5, 7)[seed % 3]
        sim = RaftSimulation(n, seed)
        lead = sim.wait_leader(100)
        term = sim.node(lead).raft.term
        assert all(sim.node(i).raft.term == term for i in sim.ids)
        assert sum(1 for i in sim.ids if sim.node(i).role == "leader") == 1
        sim.run(30)
        assert sim.leader() == lead and sim.node(lead).raft.term == term  # stable

    for_seeds(seed_count, scenario)


def test_reelection_after_leader_loss(seed_count: int) -> None:
    """A lost leader is replaced; when it returns it follows the new leader."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3 + 2 * (seed % 2), seed)
        old = sim.wait_leader()
        if seed % 2:
            sim.crash(old)
        else:
            sim.isolate(old)
        new = sim.run_until(lambda: sim.leader() not in (None, old), 100)
        assert new, "no new leader"
        new_lead = sim.leader()
        assert new_lead is not None
        sim.heal()
        if sim.nodes[old] is None:
            sim.restart(old)
        sim.run(40)
        assert sim.node(old).role == "follower"
        assert sim.node(old).leader == sim.leader()

    for_seeds(seed_count, scenario)


def test_no_leader_with_majority_down(seed_count: int) -> None:
    """With a majority of voters down nobody leads, and pre-vote keeps terms from growing."""

    def scenario(seed: int) -> None:
        n = (3, 5, 7)[seed % 3]
        sim = RaftSimulation(n, seed)
        sim.wait_leader()
        for nid in sim.ids[: n // 2 + 1]:
            sim.crash(nid)
        sim.run(30)
        terms = {i: sim.node(i).raft.term for i in sim.alive()}
        sim.run(150)
        assert sim.leader() is None
        assert {i: sim.node(i).raft.term for i in sim.alive()} == terms

    for_seeds(seed_count, scenario)


def test_many_elections_under_random_disconnects(seed_count: int) -> None:
    """Disconnect random minorities over and over: a connected majority always re-elects."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed)
        sim.wait_leader()
        for _ in range(6):
            down = sim.rng.sample(sim.ids, sim.rng.randint(0, 2))
            sim.heal()
            for d in down:
                sim.isolate(d)
            sim.run(5)
            up = [i for i in sim.ids if i not in down]

            def majority_led(up: list[str] = up) -> bool:
                lead = sim.leader()
                return lead in up and all(sim.node(u).leader == lead for u in up)

            assert sim.run_until(majority_led, 150), f"no leader among {up}"
            sim.propose()
        sim.heal()
        sim.converge(300)

    for_seeds(seed_count, scenario)


def test_election_message_budget(seed_count: int) -> None:
    """On a quiet network an election costs a bounded number of messages."""
    rounds = []

    def scenario(seed: int) -> None:
        n = 3 + 2 * (seed % 3)
        sim = RaftSimulation(n, seed)
        sim.wait_leader()
        votes = sum(
            sim.sent[t]
            for t in (
                MessageType.PRE_VOTE,
                MessageType.PRE_VOTE_RESP,
                MessageType.VOTE,
                MessageType.VOTE_RESP,
            )
        )
        # One clean round (pre-vote + vote, requests + responses) is 4 (n - 1) messages;
        # a few more when candidates' randomized timeouts collide (split pre-vote rounds).
        assert votes <= 5 * 4 * (n - 1), votes
        rounds.append(votes / (4 * (n - 1)))

    for_seeds(seed_count, scenario)
    if len(rounds) >= 10:
        assert sum(rounds) / len(rounds) <= 1.8, rounds  # mostly a single round


def test_idle_heartbeat_message_budget(seed_count: int) -> None:
    """An idle leader sends one heartbeat per peer per heartbeat interval, nothing else."""

    def scenario(seed: int) -> None:
        n = 3 + 2 * (seed % 3)
        hb = 1 + seed % 3
        sim = RaftSimulation(n, seed, heartbeat_tick=hb)
        sim.wait_leader()
        sim.converge()
        sim.run(5)
        before = sum(sim.sent.values())
        ticks = 60
        sim.run(ticks)
        total = sum(sim.sent.values()) - before
        beats = (n - 1) * (ticks // hb)
        assert beats <= total // 2 <= beats + (n - 1), (total, beats)
        assert total <= 2 * (n - 1) * (ticks // hb + 1)

    for_seeds(seed_count, scenario)


def test_leader_isolated_in_minority_steps_down(seed_count: int) -> None:
    """Check-quorum: a leader cut off from a majority steps down within an election
    timeout or two, and the majority elects a new leader meanwhile."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed)
        old = sim.wait_leader()
        others = [i for i in sim.ids if i != old]
        buddy = others[0] if seed % 2 else None
        sim.partition([old, *([buddy] if buddy else [])], others[1:] if buddy else others)
        assert sim.run_until(lambda: sim.node(old).role != "leader", 2 * 10 + 1)
        assert sim.propose(via=old) is None
        assert sim.run_until(lambda: sim.leader() not in (None, old), 100)

    for_seeds(seed_count, scenario)


def test_bridge_partition_terms_stay_bounded(seed_count: int) -> None:
    """Pre-vote + check-quorum: with a bridge node linking two halves that cannot talk,
    the group keeps or quickly settles on one leader and terms stay bounded."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed)
        sim.wait_leader()
        ids = list(sim.ids)
        sim.rng.shuffle(ids)
        middle, left, right = ids[0], ids[1:3], ids[3:5]
        sim.bridge(left, right, middle)
        start = max(sim.node(i).raft.term for i in sim.ids)
        sim.run(300)
        end = max(sim.node(i).raft.term for i in sim.ids)
        assert end - start <= 4, (start, end)
        sim.heal()
        sim.converge(300)

    for_seeds(seed_count, scenario)


def test_disruptive_rejoin_without_prevote_vs_with(seed_count: int) -> None:
    """A node that was partitioned does not bump the group's term on rejoin with pre-vote."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed)
        lead = sim.wait_leader()
        loner = next(i for i in sim.ids if i != lead)
        sim.isolate(loner)
        sim.run(100)
        term = sim.node(lead).raft.term
        sim.heal()
        sim.run(50)
        assert sim.leader() == lead and sim.node(lead).raft.term == term

    for_seeds(seed_count, scenario)


def test_leader_election_on_unreliable_network(seed_count: int) -> None:
    """Elections succeed despite loss, duplication, reordering and timer jitter."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed, net=NetConfig.unreliable())
        sim.wait_leader(300)

    for_seeds(seed_count, scenario)


@pytest.mark.parametrize("pre_vote,check_quorum", [(False, False), (True, False), (False, True)])
def test_elections_without_optional_features(
    seed_count: int, pre_vote: bool, check_quorum: bool
) -> None:
    """Plain Raft (and each optional feature alone) still elects and stays safe."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed, pre_vote=pre_vote, check_quorum=check_quorum)
        old = sim.wait_leader()
        sim.crash(old)
        sim.wait_leader()
        sim.restart(old)
        sim.propose()
        sim.converge()

    for_seeds(max(1, seed_count // 4), scenario)


def test_asymmetric_partition_follower_cannot_hear_leader(seed_count: int) -> None:
    """A follower that cannot hear the leader (but can be heard) times out and pre-votes
    with a log as good as anyone's; the others, still in their leader lease, ignore it:
    leader and term stay put."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed)
        lead = sim.wait_leader()
        sim.converge()
        deaf = sim.rng.choice([i for i in sim.ids if i != lead])
        term = sim.node(lead).raft.term
        sim.block(lead, deaf)
        sim.run(100)
        assert sim.leader() == lead and sim.node(lead).raft.term == term
        assert sim.node(deaf).raft.term == term
        sim.heal()
        sim.converge()

    for_seeds(seed_count, scenario)


def test_asymmetric_partition_leader_cannot_hear_anyone(seed_count: int) -> None:
    """A leader whose incoming links are all cut still reaches its followers, but gets no
    acknowledgements: check-quorum makes it step down, and a new leader takes over."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed)
        old = sim.wait_leader()
        for o in sim.ids:
            if o != old:
                sim.block(o, old)
        assert sim.run_until(lambda: sim.node(old).role != "leader", 25)
        assert sim.run_until(lambda: sim.leader() not in (None, old), 200)
        sim.propose()
        sim.heal()
        sim.converge()

    for_seeds(seed_count, scenario)
