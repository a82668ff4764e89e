"""Figure 8 of the Raft paper: a leader must not commit entries of earlier terms by
counting replicas; only an entry of its own term commits (and with it, its prefix)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from node.raft import Config, Entry, HardState, MemoryStorage, Message, MessageType, RaftNode
from node.testing.raft_simulation import NetConfig, RaftSimulation
from tests.raft.helpers import for_seeds


def test_leader_does_not_commit_old_term_entry_by_counting() -> None:
    """A term-4 leader holding an uncommitted term-2 entry that a majority has replicated
    does not commit it until its own term-4 entry is replicated on a majority."""
    st = MemoryStorage()
    st.append([Entry(1, 1, b"a"), Entry(2, 2, b"b")])
    st.set_hard_state(HardState(term=3, vote="", commit=1))
    n = RaftNode(Config(id="s1", voters=("s1", "s2", "s3", "s4", "s5"), pre_vote=False, seed=1), st)
    n.campaign()
    for p in ("s2", "s3"):
        n.step(Message(MessageType.VOTE_RESP, to="s1", frm=p, term=4))
    assert n.role == "leader" and n.status().term == 4
    noop_index = n.status().last_index
    assert noop_index == 3
    # s2 and s3 acknowledge index 2 (the term-2 entry): s1+s2+s3 is a majority of 5...
    for p in ("s2", "s3"):
        n.step(Message(MessageType.APP_RESP, to="s1", frm=p, term=4, index=2))
    assert n.status().commit == 1, "committed an old-term entry by counting replicas"
    # ...only the current-term entry commits, and index 2 with it.
    for p in ("s2", "s3"):
        n.step(Message(MessageType.APP_RESP, to="s1", frm=p, term=4, index=3))
    assert n.status().commit == 3


def _figure8(sim: RaftSimulation, iterations: int, unreliable: bool) -> None:
    up_min = 3
    for _ in range(iterations):
        lead = sim.leader()
        if lead is not None and sim.rng.randrange(3):
            sim.propose(via=lead)
        if unreliable and sim.rng.randrange(10) == 0:
            a, b = sim.rng.sample(sim.ids, 2)
            sim.block(a, b)
        if unreliable and sim.rng.randrange(10) == 0:
            sim.heal()
        sim.run(sim.rng.choice((1, 1, 2, 5, 13)))
        lead = sim.leader()
        if lead is not None and sim.rng.randrange(2) == 0:
            sim.crash(lead)
        if len(sim.alive()) < up_min:
            down = [i for i in sim.ids if sim.nodes[i] is None]
            sim.restart(sim.rng.choice(down))
    for nid in sim.ids:
        if sim.nodes[nid] is None:
            sim.restart(nid)
    sim.heal()
    sim.net = NetConfig()
    sim.propose(via=sim.wait_leader(300))
    sim.converge(600)


@pytest.mark.soak
def test_figure8(seed_count: int, soak: bool) -> None:
    """Many leader crashes with partially replicated entries: never two different
    committed entries at one index, every acknowledged entry survives."""
    iterations = 400 if soak else 150

    def scenario(seed: int) -> None:
        sim = RaftSimulation(
            5, seed, pre_vote=seed % 2 == 0, net=NetConfig(max_delay=3), max_size_per_msg=1
        )
        sim.wait_leader()
        _figure8(sim, iterations, unreliable=False)

    for_seeds(seed_count, scenario)


@pytest.mark.soak
def test_figure8_unreliable(seed_count: int, soak: bool) -> None:
    """Figure 8 with loss, duplication, long reordering delays and random link cuts."""
    iterations = 400 if soak else 150

    def scenario(seed: int) -> None:
        net = NetConfig(drop_pm=100, dup_pm=50, max_delay=8, jitter_pm=50)
        sim = RaftSimulation(5, seed, net=net, max_size_per_msg=1)
        sim.wait_leader(400)
        _figure8(sim, iterations, unreliable=True)

    for_seeds(seed_count, scenario)


def test_figure8_scripted(seed_count: int) -> None:
    """The paper's Figure 8, step by step (a)-(e): S1 re-elected in a later term replicates
    its old-term entry to a majority but must not commit it, because S5 (holding a
    newer-term entry at that index) can still win and overwrite it."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed, max_size_per_msg=1)
        s1 = sim.wait_leader()
        sim.converge()
        s2, s3, s4, s5 = [i for i in sim.ids if i != s1]
        cand = {"id": s1}
        app_from: dict[str, int | None] = {"frm": None, "max_term": None}

        def intercept(m: Message) -> Message | None:
            if m.type in (MessageType.VOTE, MessageType.PRE_VOTE) and m.frm != cand["id"]:
                return None
            if m.type == MessageType.APP and m.frm == app_from["frm"]:
                limit = app_from["max_term"]
                if limit is None:
                    return None
                return replace(m, entries=tuple(e for e in m.entries if e.term <= limit))
            return m

        sim.intercept = intercept
        # (a) S1 leads term T and gets entry X onto S2 only.
        sim.partition([s1, s2], [s3, s4, s5])
        x = sim.propose(via=s1)
        sim.run(2)
        idx = sim.node(s1).status().last_index
        t_x = sim.node(s1).raft.log.term(idx)
        assert sim.storages[s2].last_index() == idx and x is not None
        # (b) S1 crashes; S5 wins term T+1 with S3, S4 and appends its no-op at idx, alone.
        sim.crash(s1)
        cand["id"] = s5
        app_from["frm"] = s5
        sim.partition([s5, s3, s4], [s2])
        assert sim.run_until(lambda: sim.leader() == s5, 300)
        sim.run(1)
        assert sim.storages[s5].term(idx) > t_x
        sim.crash(s5)
        # (c) S1 restarts, wins term T+2 with S2, S3 and replicates X to S3, but its own
        # no-op never gets out: X sits on a majority, yet must not be committed.
        sim.restart(s1)
        cand["id"] = s1
        app_from["frm"] = s1
        app_from["max_term"] = t_x
        sim.partition([s1, s2, s3], [s4], [s5])
        assert sim.run_until(lambda: sim.leader() == s1, 300)
        assert sim.run_until(lambda: sim.storages[s3].last_index() >= idx, 50)
        sim.run(5)
        assert sim.node(s1).status().commit < idx, "old-term entry committed by counting"
        sim.crash(s1)
        # (d) S5 restarts and wins with S2, S3, S4: its newer-term entry replaces X.
        sim.restart(s5)
        cand["id"] = s5
        app_from["frm"] = None
        sim.partition([s5, s2, s3, s4], [s1])
        assert sim.run_until(lambda: sim.leader() == s5, 300)
        sim.propose()
        sim.converge(300, nodes=[s2, s3, s4, s5])
        # (e) everyone back: one history.
        sim.intercept = None
        sim.restart(s1)
        sim.heal()
        sim.converge(300)
        assert x not in sim.applied_commands(s1)

    for_seeds(seed_count, scenario)
