"""Log replication and commitment (Raft paper §5.3, §5.4)."""

from __future__ import annotations

from node.raft import MessageType, NotLeader
from node.testing.raft_simulation import NetConfig, RaftSimulation
from tests.raft.helpers import for_seeds


def _applied_once(sim: RaftSimulation, nid: str) -> list[bytes]:
    cmds = sim.applied_commands(nid)
    assert len(cmds) == len(set(cmds)), "a command was applied twice"
    return cmds


def test_basic_agreement(seed_count: int) -> None:
    """Commands proposed at the leader are applied by every node in the same order."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3 + 2 * (seed % 3), seed)
        sim.wait_leader()
        sent = []
        for _ in range(30):
            cmd = sim.propose()
            assert cmd is not None
            sent.append(cmd)
            sim.run(sim.rng.randint(0, 2))
        sim.converge()
        for nid in sim.ids:
            assert _applied_once(sim, nid) == sent

    for_seeds(seed_count, scenario)


def test_agreement_with_follower_cut_off_and_catch_up(seed_count: int) -> None:
    """A disconnected follower misses nothing: it catches up after reconnecting."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3 + 2 * (seed % 2), seed)
        lead = sim.wait_leader()
        f = sim.rng.choice([i for i in sim.ids if i != lead])
        sim.propose()
        sim.run(2)
        sim.isolate(f)
        for _ in range(20):
            sim.propose()
            sim.run(1)
        assert sim.apps[f].applied < sim.node(lead).raft.log.committed
        sim.heal()
        sim.converge()
        assert _applied_once(sim, f) == _applied_once(sim, lead)

    for_seeds(seed_count, scenario)


def test_no_agreement_without_majority(seed_count: int) -> None:
    """With a majority of followers gone, a leader's new entries are never committed."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed, check_quorum=False)
        lead = sim.wait_leader()
        sim.converge()
        commit = sim.node(lead).raft.log.committed
        followers = [i for i in sim.ids if i != lead]
        for f in followers[:3]:
            sim.isolate(f)
        for _ in range(5):
            sim.propose(via=lead)
            sim.run(3)
        assert sim.node(lead).raft.log.committed == commit
        assert not sim.acked
        sim.heal()
        sim.converge(400)

    for_seeds(seed_count, scenario)


def test_partitioned_leader_suffix_truncated_on_rejoin(seed_count: int) -> None:
    """An old leader's uncommitted entries are replaced by the new leader's on rejoin."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3 + 2 * (seed % 2), seed)
        old = sim.wait_leader()
        sim.converge()
        sim.isolate(old)
        stale = [sim.propose(via=old) for _ in range(5)]
        assert all(stale)
        assert sim.run_until(lambda: sim.leader() not in (None, old), 100)
        fresh = [sim.propose() for _ in range(5)]
        sim.run(5)
        sim.heal()
        sim.converge()
        for nid in sim.ids:
            applied = _applied_once(sim, nid)
            assert not set(stale) & set(applied)
            assert set(c for c in fresh if c) <= set(applied)

    for_seeds(seed_count, scenario)


def test_fast_backup_over_long_divergent_logs(seed_count: int) -> None:
    """Followers with long conflicting suffixes are repaired in a few round trips, not one
    per entry (the etcd/6.824 'backup' test with term-based rejection hints)."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed, max_inflight=1024)
        lead = sim.wait_leader()
        sim.propose()
        sim.converge()
        others = [i for i in sim.ids if i != lead]
        # leader + one follower in the minority pile up entries that will never commit
        sim.partition([lead, others[0]], others[1:])
        for _ in range(60):
            sim.propose(via=lead)
        sim.run(2)
        assert sim.run_until(lambda: sim.leader() in others[1:], 100)
        lead2 = sim.leader()
        assert lead2 is not None
        # the majority commits its own long history, in several terms
        for _ in range(3):
            for _ in range(20):
                sim.propose()
            sim.run(3)
            sim.crash(lead2)
            sim.restart(lead2)
            sim.partition([lead, others[0]], others[1:])
            assert sim.run_until(lambda: sim.leader() in others[1:], 200)
            lead2 = sim.leader()
        sim.converge(300, nodes=others[1:])
        rejects_before = sim.sent[MessageType.APP_RESP]
        apps_before = sim.sent[MessageType.APP]
        sim.heal()
        sim.converge(300)
        apps = sim.sent[MessageType.APP] - apps_before
        resps = sim.sent[MessageType.APP_RESP] - rejects_before
        # 60 divergent entries; one probe per term plus pipelined appends.
        assert apps < 60 and resps < 60, (apps, resps)

    for_seeds(seed_count, scenario)


def test_concurrent_proposals_each_appear_once(seed_count: int) -> None:
    """Clients proposing through random nodes (following NotLeader hints) under leader
    changes: every acknowledged command is applied exactly once, in one order everywhere."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed, net=NetConfig(max_delay=1))
        sim.wait_leader()
        for round_ in range(40):
            for c in range(3):
                via = sim.rng.choice(sim.alive())
                data = b"client%d-%d" % (c, round_)
                try:
                    sim.node(via).propose(data)
                    sim.proposed[data] = via
                except NotLeader as exc:
                    if exc.leader is not None and sim.nodes.get(exc.leader) is not None:
                        sim.propose(via=exc.leader, data=data)
            sim.run(1)
            if round_ == 20:
                lead = sim.leader()
                if lead:
                    sim.crash(lead)
                    sim.run(1)
                    sim.restart(lead)
        sim.converge()
        orders = {tuple(_applied_once(sim, nid)) for nid in sim.ids}
        assert len(orders) == 1
        applied = next(iter(orders))
        assert set(sim.acked) <= set(applied)

    for_seeds(seed_count, scenario)


def test_unreliable_network_agreement(seed_count: int, soak: bool) -> None:
    """Agreement despite 10% loss, duplicates, reordering and timer jitter."""
    rounds = 400 if soak else 150

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed, net=NetConfig.unreliable())
        sim.wait_leader(300)
        for _ in range(rounds):
            if sim.rng.randrange(3) == 0:
                sim.propose()
            sim.run(1)
        sim.net = NetConfig()
        sim.converge(500)
        assert len({tuple(_applied_once(sim, nid)) for nid in sim.ids}) == 1

    for_seeds(seed_count, scenario)


def test_proposal_on_follower_carries_leader_hint(seed_count: int) -> None:
    """A follower refuses proposals with NotLeader naming the leader it knows."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed)
        lead = sim.wait_leader()
        for nid in sim.ids:
            if nid == lead:
                continue
            try:
                sim.node(nid).propose(b"x")
            except NotLeader as exc:
                assert exc.leader == lead
            else:
                raise AssertionError("follower accepted a proposal")

    for_seeds(seed_count, scenario)
