"""Leader transfer (Raft thesis §3.10): TIMEOUT_NOW to a caught-up target."""

from __future__ import annotations

from node.raft import MessageType, ProposalDropped
from node.testing.raft_simulation import RaftSimulation
from tests.raft.helpers import for_seeds


def test_transfer_to_caught_up_target(seed_count: int) -> None:
    """The target starts an election at once (no pre-vote, lease overridden) and wins."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3 + 2 * (seed % 2), seed)
        old = sim.wait_leader()
        sim.propose()
        sim.converge()
        target = sim.rng.choice([i for i in sim.ids if i != old])
        term = sim.node(old).raft.term
        via = sim.rng.choice([old, target])  # followers forward the request
        sim.node(via).transfer_leader(target)
        assert sim.run_until(lambda: sim.leader() == target, 5)
        assert sim.node(target).raft.term == term + 1
        assert sim.sent[MessageType.TIMEOUT_NOW] == 1
        sim.propose()
        sim.converge()

    for_seeds(seed_count, scenario)


def test_transfer_to_slow_target(seed_count: int) -> None:
    """A lagging target is first caught up, then told to time out; proposals are refused
    meanwhile."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed)
        old = sim.wait_leader()
        target = sim.rng.choice([i for i in sim.ids if i != old])
        sim.isolate(target)
        for _ in range(20):
            sim.propose()
        sim.run(2)
        sim.heal()
        sim.node(old).transfer_leader(target)
        try:
            sim.node(old).propose(b"during transfer")
        except ProposalDropped:
            pass
        else:
            raise AssertionError("proposal accepted during transfer")
        assert sim.run_until(lambda: sim.leader() == target, 20)
        sim.propose()
        sim.converge()

    for_seeds(seed_count, scenario)


def test_transfer_to_dead_target_aborts(seed_count: int) -> None:
    """With the target down the transfer times out after an election timeout; the old
    leader keeps leading and accepts proposals again."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed)
        old = sim.wait_leader()
        sim.converge()
        target = sim.rng.choice([i for i in sim.ids if i != old])
        sim.crash(target)
        sim.node(old).transfer_leader(target)
        assert sim.node(old).status().lead_transferee == target
        assert sim.propose() is None
        sim.run(10)
        assert sim.leader() == old and sim.node(old).status().lead_transferee is None
        assert sim.propose() is not None
        sim.restart(target)
        sim.converge()

    for_seeds(seed_count, scenario)
