"""A node that comes back with an empty or older log is caught up by the current leader.

Issue 16: a learner whose data directory was deleted stayed at index 0 while the same leader
remained, because the leader kept the progress (``match``) the follower had acknowledged
before it lost its disk. The follower's answers now reveal that it is behind what the
leader recorded (a heartbeat whose commit index it cannot vouch for, an append rejected below
``match``), and the leader probes it again from what it really holds.

Every scenario asserts the leader (id and term) does not change while the node catches up
within a bounded number of ticks; the simulator checks the safety invariants after every step.
"""

from __future__ import annotations

import copy

from node.raft.config import Config
from node.raft.progress import ProgressState
from node.raft.raft import Raft
from node.raft.storage import MemoryStorage
from node.raft.types import Entry, Message, MessageType
from node.testing.raft_simulation import NetConfig, RaftSimulation
from tests.raft.helpers import for_seeds, seeds

CATCH_UP_TICKS = 30
"""Bound on a reliable network: a few heartbeats (heartbeat_tick=1, election_tick=10)."""


def _caught_up(sim: RaftSimulation, lead: str, nid: str) -> bool:
    r = sim.node(lead).raft
    return (
        sim.nodes[nid] is not None
        and sim.storages[nid].last_index() == r.log.last_index()
        and sim.apps[nid].applied == r.log.committed
    )


def _catch_up_under_same_leader(
    sim: RaftSimulation, lead: str, nid: str, max_ticks: int = CATCH_UP_TICKS
) -> None:
    term = sim.node(lead).raft.term
    assert sim.run_until(lambda: _caught_up(sim, lead, nid), max_ticks), (
        f"{nid} not caught up within {max_ticks} ticks: applied {sim.apps[nid].applied}, "
        f"leader commit {sim.node(lead).raft.log.committed}, "
        f"progress {sim.node(lead).status().progress.get(nid)}"
    )
    assert sim.leader() == lead and sim.node(lead).raft.term == term


def _group(seed: int, **kw: object) -> tuple[RaftSimulation, str]:
    sim = RaftSimulation(3, seed, learners=1, **kw)  # type: ignore[arg-type]
    lead = sim.wait_leader()
    for _ in range(20):
        sim.propose()
        sim.run(1)
    sim.converge()
    return sim, lead


def test_a_learner_restarted_with_an_empty_log_is_caught_up_by_the_same_leader(
    seed_count: int,
) -> None:
    """Issue 16 with an idle leader: the learner's disk is wiped, it restarts with the same id
    and an empty log, and the same leader brings it back to the whole log within a few
    heartbeats (before the fix it stayed at index 0 until a leader change)."""

    def scenario(seed: int) -> None:
        sim, lead = _group(seed)
        learner = sim.learner_ids[0]
        sim.replace_storage(learner)
        assert sim.storages[learner].last_index() == 0
        _catch_up_under_same_leader(sim, lead, learner)
        # and it goes on replicating new entries
        for _ in range(5):
            sim.propose()
        _catch_up_under_same_leader(sim, lead, learner)
        sim.check_acked()

    for_seeds(seed_count, scenario)


def test_a_learner_restarted_with_an_empty_log_during_proposals_is_caught_up(
    seed_count: int,
) -> None:
    """The same while the leader keeps appending (the learner's progress is pipelining when
    it loses its disk, so the leader learns of it from rejected appends too)."""

    def scenario(seed: int) -> None:
        sim, lead = _group(seed)
        learner = sim.learner_ids[0]
        for _ in range(3):
            sim.propose()
        sim.replace_storage(learner)
        term = sim.node(lead).raft.term
        for _ in range(10):
            sim.propose()
            sim.run(1)
        _catch_up_under_same_leader(sim, lead, learner)
        assert sim.node(lead).raft.term == term

    for_seeds(seed_count, scenario)


def test_a_learner_restarted_with_an_empty_log_is_caught_up_by_snapshot_after_compaction(
    seed_count: int,
) -> None:
    """When the leader compacted its log, the wiped learner gets a snapshot (then entries)."""

    def scenario(seed: int) -> None:
        sim, lead = _group(seed, snapshot_threshold=5)
        assert sim.storages[lead].first_index() > 1  # the leader compacted
        learner = sim.learner_ids[0]
        sim.replace_storage(learner)
        _catch_up_under_same_leader(sim, lead, learner)
        assert not sim.storages[learner].snapshot().is_empty()

    for_seeds(seed_count, scenario)


def test_a_learner_restarted_with_an_empty_log_on_an_unreliable_network_is_caught_up(
    seed_count: int,
) -> None:
    """Loss, duplicates and reordering: still caught up by the same leader, within a larger
    bound, and the invariants hold throughout."""

    same_leader = 0

    def scenario(seed: int) -> None:
        nonlocal same_leader
        sim, lead = _group(seed, snapshot_threshold=8 if seed % 2 else None)
        term = sim.node(lead).raft.term
        sim.net = NetConfig.unreliable()
        learner = sim.learner_ids[0]
        sim.replace_storage(learner)
        for _ in range(5):
            sim.propose(via=lead)
            sim.run(2)

        def settled() -> bool:
            return sim.leader() != lead or _caught_up(sim, lead, learner)

        assert sim.run_until(settled, 150), (
            f"{learner} not caught up: {sim.node(lead).status().progress.get(learner)}"
        )
        if sim.leader() == lead and sim.node(lead).raft.term == term:
            same_leader += 1  # else the lossy network changed the leader: another claim

    for_seeds(seed_count, scenario)
    assert same_leader * 2 >= len(seeds(seed_count))


def test_a_learner_rolled_back_to_an_older_copy_of_its_storage_is_caught_up(
    seed_count: int,
) -> None:
    """Restoring an old backup of the learner's own disk (a prefix of the log it had
    acknowledged, possibly with its old snapshot) brings it back behind the leader's record;
    the same leader catches it up."""

    def scenario(seed: int) -> None:
        sim, lead = _group(seed, snapshot_threshold=6 if seed % 2 else None)
        learner = sim.learner_ids[0]
        backup = copy.deepcopy(sim.storages[learner])
        assert isinstance(backup, MemoryStorage)
        for _ in range(15):
            sim.propose()
            sim.run(1)
        sim.converge()
        assert sim.storages[learner].last_index() > backup.last_index()
        sim.replace_storage(learner, backup)
        _catch_up_under_same_leader(sim, lead, learner)

    for_seeds(seed_count, scenario)


def test_a_learner_rolled_back_to_overwritten_entries_never_applies_them(
    seed_count: int,
) -> None:
    """The learner's backup holds entries of a deposed leader that were never committed and
    were since overwritten (and their indexes committed with other entries). A heartbeat's
    commit index must not make it apply them: the heartbeat names the term of the entry at
    that index and the learner commits only if its own entry matches; otherwise it is probed
    and its log repaired. The simulator fails the run if two nodes apply different entries
    at an index."""

    def scenario(seed: int) -> None:
        sim, old = _group(seed)
        learner = sim.learner_ids[0]
        others = [v for v in sim.voter_ids if v != old]
        sim.partition([old, learner], others)
        for _ in range(4):
            sim.propose(via=old)  # reaches the learner, never commits
        sim.run(2)
        assert sim.storages[learner].last_index() > sim.node(old).raft.log.committed
        backup = copy.deepcopy(sim.storages[learner])
        assert sim.run_until(lambda: sim.leader() in others, 300)
        new = sim.wait_leader(300)
        for _ in range(8):
            sim.propose(via=new)
            sim.run(1)
        sim.heal()
        new = sim.wait_leader(300)
        sim.converge()
        sim.replace_storage(learner, backup)
        _catch_up_under_same_leader(sim, new, learner)

    for_seeds(seed_count, scenario)


def test_a_voter_that_lost_its_log_is_not_counted_for_entries_it_lacks(seed_count: int) -> None:
    """Outside Raft's assumptions (a voter must keep its disk), but nothing crashes: once the
    wiped voter answers, the leader's record of it never exceeds what it holds, so it does
    not count toward committing entries it lacks; the same leader catches it up."""

    def scenario(seed: int) -> None:
        sim, lead = _group(seed)
        voter = next(v for v in sim.voter_ids if v != lead)
        sim.replace_storage(voter)
        answered = False

        def watch(m: Message) -> Message:
            nonlocal answered
            if m.frm == voter and m.to == lead:
                answered = True
            return m

        sim.intercept = watch
        term = sim.node(lead).raft.term
        for _ in range(CATCH_UP_TICKS):
            sim.step()
            if answered and sim.leader() == lead:
                pr = sim.node(lead).raft.prs[voter]
                assert pr.match <= sim.node(voter).raft.log.last_index()
        sim.intercept = None
        _catch_up_under_same_leader(sim, lead, voter)
        assert sim.node(lead).raft.term == term

    for_seeds(seed_count, scenario)


def test_a_stale_rejection_only_costs_a_resend() -> None:
    """A delayed rejection below ``match`` from a follower that did not lose anything lowers
    the leader's record of it (never the commit index); the next append restores it."""
    sim, lead = _group(0)
    learner = sim.learner_ids[0]
    r = sim.node(lead).raft
    commit = r.log.committed
    match = r.prs[learner].match
    sim.node(lead).step(
        Message(
            MessageType.APP_RESP,
            to=lead,
            frm=learner,
            term=r.term,
            index=match,
            reject=True,
            reject_hint=3,
            commit=2,
        )
    )
    pr = r.prs[learner]
    assert pr.state == ProgressState.PROBE and pr.match == 2 and pr.next == 4
    assert r.log.committed == commit
    sim.run(5)
    assert r.prs[learner].match == match and r.log.committed == commit


def _follower(entries: list[tuple[int, int]]) -> Raft:
    storage = MemoryStorage()
    storage.append([Entry(i, t, b"x") for i, t in entries])
    return Raft(Config(id="n4", voters=("n1", "n2", "n3"), learners=("n4",), seed=1), storage)


def test_a_heartbeat_commits_only_an_entry_the_follower_holds() -> None:
    """The follower side, by hand: a heartbeat's commit index is taken only if the follower
    holds the leader's entry there (index and term); an empty log, a shorter log or another
    term's entry is answered with a rejection naming what the follower holds."""
    hb = Message(MessageType.HEARTBEAT, to="n4", frm="n1", term=3, commit=3, log_term=2)
    f = _follower([(1, 1), (2, 2), (3, 2)])
    f.step(hb)
    assert f.log.committed == 3 and not f.msgs[-1].reject
    # (the follower's log, its hint and that entry's term: the leader backs up by term)
    cases = [([], 0, 0), ([(1, 1)], 1, 1), ([(1, 1), (2, 2), (3, 1)], 3, 1)]
    for entries, hint, hint_term in cases:
        f = _follower(entries)
        f.step(hb)
        resp = f.msgs[-1]
        assert f.log.committed == 0
        assert resp.type == MessageType.HEARTBEAT_RESP and resp.reject
        assert (resp.reject_hint, resp.log_term, resp.commit) == (hint, hint_term, 0)
