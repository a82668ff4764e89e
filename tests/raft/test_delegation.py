"""Delegated learner replication (``Config.delegate_learners``): the leader sends entries to
the voters only, learners get the committed entries from a delegate voter, and a learner
whose delegate fails is served by the leader; every safety invariant of the simulator holds."""

from __future__ import annotations

from collections import Counter

from node.raft.delegation import LagWatch, delegate_of, delegated_learners
from node.raft.types import Message, MessageType
from node.testing.raft_nemesis import run as nemesis_run
from node.testing.raft_simulation import NetConfig, RaftSimulation
from tests.raft.helpers import for_seeds


def _entry_bytes_by_sender(sim: RaftSimulation) -> Counter[tuple[str, str]]:
    """Count entry bytes per (sender, receiver) from now on."""
    sent: Counter[tuple[str, str]] = Counter()

    def count(m: Message) -> Message:
        if m.entries:
            sent[(m.frm, m.to)] += sum(len(e.data) + 16 for e in m.entries)
        return m

    sim.intercept = count
    return sent


def test_the_delegate_is_a_voter_other_than_the_leader_and_stable() -> None:
    """Every learner gets a delegate among the voters other than the leader (the leader only
    when it is the sole voter); adding a voter moves only the learners it wins."""
    voters = ("v1", "v2", "v3")
    learners = [f"l{i}" for i in range(60)]
    for lead in voters:
        picks = {lrn: delegate_of(lrn, voters, lead) for lrn in learners}
        assert set(picks.values()) == set(voters) - {lead}  # both others used
        assert all(delegate_of(lrn, reversed(voters), lead) == picks[lrn] for lrn in learners)
        served = [delegated_learners(v, learners, voters, lead) for v in voters]
        assert sorted(sum(served, ())) == sorted(learners)  # each learner exactly once
    assert delegate_of("l1", ("v1",), "v1") == "v1"
    before = {lrn: delegate_of(lrn, voters, "v1") for lrn in learners}
    after = {lrn: delegate_of(lrn, (*voters, "v4"), "v1") for lrn in learners}
    moved = [lrn for lrn in learners if before[lrn] != after[lrn]]
    assert moved and all(after[lrn] == "v4" for lrn in moved)


def test_lag_watch_names_the_commit_index_of_patience_rounds_ago() -> None:
    """Nothing is due before ``patience`` rounds are recorded; then the oldest one is."""
    w = LagWatch(2)
    assert [w.round(c) for c in (5, 6, 7, 9)] == [0, 0, 5, 6]
    w.reset()
    assert w.round(10) == 0


def test_the_leader_sends_entries_only_to_voters_and_every_learner_applies_them(
    seed_count: int,
) -> None:
    """With 3 voters and 12 learners, the leader's entry bytes go to the two other voters
    only, each learner receives the entries once (from its delegate), every node applies the
    whole log, and the leader's entry bytes are about 2/14 of what it sends without delegation."""

    def leader_bytes(delegate: bool, seed: int) -> tuple[int, Counter[tuple[str, str]], str]:
        sim = RaftSimulation(3, seed, learners=12, delegate_learners=delegate)
        lead = sim.wait_leader()
        sim.converge()
        sent = _entry_bytes_by_sender(sim)
        for _ in range(20):
            sim.propose(via=lead, data=b"x" * 200)
            sim.run(1)
        sim.converge()
        assert sim.leader() == lead
        for lrn in sim.learner_ids:
            assert sim.apps[lrn].applied == sim.node(lead).raft.log.committed
        return sum(b for (f, _), b in sent.items() if f == lead), sent, lead

    def scenario(seed: int) -> None:
        plain, _, _ = leader_bytes(False, seed)
        delegated, sent, lead = leader_bytes(True, seed)
        receivers = {to for (f, to) in sent if f == lead}
        voters = {"n1", "n2", "n3"} - {lead}
        assert receivers == voters, receivers
        for lrn in [f"n{i}" for i in range(4, 16)]:
            senders = {f for (f, to) in sent if to == lrn}
            assert senders == {delegate_of(lrn, ("n1", "n2", "n3"), lead)}
        assert delegated * 5 < plain, (delegated, plain)

    for_seeds(min(seed_count, 5), scenario)


def test_a_learner_whose_delegate_is_down_is_served_by_the_leader(seed_count: int) -> None:
    """Crash one non-leader voter: its learners fall behind, the leader serves them directly
    within the patience and they apply everything; once the voter is back and caught up the
    leader hands them back (serves no learner itself)."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, learners=8, delegate_learners=True)
        lead = sim.wait_leader()
        sim.converge()
        down = next(v for v in sim.voter_ids if v != lead)
        orphans = delegated_learners(down, sim.learner_ids, sim.voter_ids, lead)
        assert orphans
        sim.crash(down)
        for _ in range(10):
            sim.propose(via=lead)
            sim.run(1)
        sim.converge(nodes=[lead, *sim.learner_ids])
        assert set(orphans) <= set(sim.node(lead).status().direct_learners)
        sim.restart(down)
        sim.propose(via=lead)
        sim.converge()
        assert sim.run_until(lambda: not sim.node(lead).status().direct_learners, 100)
        assert sim.node(down).status().serving == orphans

    for_seeds(min(seed_count, 10), scenario)


def test_a_learner_behind_the_compacted_log_catches_up_by_the_leaders_snapshot(
    seed_count: int,
) -> None:
    """A learner cut off while the log is compacted past it: its delegate cannot serve it,
    the leader sends it a snapshot, and it applies everything after."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, learners=4, delegate_learners=True, snapshot_threshold=10)
        lead = sim.wait_leader()
        sim.converge()
        lrn = sim.learner_ids[0]
        sim.isolate(lrn)
        for _ in range(40):
            sim.propose(via=lead)
            sim.run(1)
        sim.heal()
        sim.converge(500)
        assert sim.storages[lrn].snapshot().metadata.index > 0

    for_seeds(min(seed_count, 10), scenario)


def test_delegation_keeps_every_invariant_under_the_nemesis(seed_count: int) -> None:
    """Partitions, crashes, loss, duplicates, snapshots, membership changes (learners added,
    promoted, voters removed), transfers and learners losing their disk, with delegation on:
    the simulator's invariants hold at every step and every member converges."""

    def scenario(seed: int) -> None:
        nemesis_run(seed, nodes=(3, 5)[seed % 2], steps=200, learners=4, delegate_learners=True)

    for_seeds(seed_count, scenario, base=5000)


def test_delegated_learners_converge_on_an_unreliable_network(seed_count: int) -> None:
    """Loss, duplicates and reordering: learners still apply the whole log."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(
            3, seed, learners=6, delegate_learners=True, net=NetConfig.unreliable()
        )
        sim.wait_leader()
        for _ in range(30):
            sim.propose()
            sim.run(2)
        sim.net = NetConfig()
        sim.converge(600)

    for_seeds(min(seed_count, 10), scenario)


def test_only_a_learner_takes_a_sync_and_only_from_a_voter() -> None:
    """A SYNC to a voter, or from a learner, changes nothing."""
    sim = RaftSimulation(3, 1, learners=2, delegate_learners=True)
    lead = sim.wait_leader()
    sim.converge()
    voter = next(v for v in sim.voter_ids if v != lead)
    lrn, other = sim.learner_ids
    for frm, to in ((lead, voter), (other, lrn)):
        node = sim.node(to)
        last = node.raft.log.last_index()
        node.step(
            Message(
                MessageType.SYNC,
                to=to,
                frm=frm,
                term=node.raft.term,
                index=last,
                log_term=node.raft.log.last_term(),
                commit=last + 1,
            )
        )
        assert node.raft.log.last_index() == last
        assert not node.raft.msgs
