"""Log compaction and InstallSnapshot (Raft paper §7)."""

from __future__ import annotations

from node.raft import Message, MessageType
from node.testing.raft_simulation import NetConfig, RaftSimulation
from tests.raft.helpers import for_seeds

THRESHOLD = 16


def _log_len(sim: RaftSimulation, nid: str) -> int:
    st = sim.storages[nid]
    return st.last_index() - st.first_index() + 1


def test_snapshot_catch_up_of_slow_follower_with_bounded_log(seed_count: int) -> None:
    """A follower cut off while the others commit (and compact) far past it is brought
    back by a snapshot; no node's log ever grows much beyond the threshold."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3 + 2 * (seed % 2), seed, snapshot_threshold=THRESHOLD)
        lead = sim.wait_leader()
        slow = sim.rng.choice([i for i in sim.ids if i != lead])
        sim.isolate(slow)
        longest = 0
        for _ in range(120):
            sim.propose()
            sim.run(1)
            longest = max(longest, *(_log_len(sim, i) for i in sim.ids if i != slow))
        assert longest <= THRESHOLD + 8, longest
        assert sim.storages[lead].first_index() > sim.storages[slow].last_index() + 1
        snaps = sim.sent[MessageType.SNAP]
        sim.heal()
        sim.converge(300)
        assert sim.sent[MessageType.SNAP] > snaps
        assert sim.storages[slow].snapshot().metadata.index > 0
        assert sim.apps[slow].digest == sim.apps[lead].digest

    for_seeds(seed_count, scenario)


def test_snapshot_lost_in_transit_is_resent(seed_count: int) -> None:
    """Snapshots dropped by the network are retried until the follower installs one."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(3, seed, snapshot_threshold=THRESHOLD)
        lead = sim.wait_leader()
        slow = next(i for i in sim.ids if i != lead)
        sim.isolate(slow)
        for _ in range(60):
            sim.propose()
            sim.run(1)
        sim.heal()
        dropped = {"n": 0}

        def lose_snapshots(m: Message) -> Message | None:
            if m.type == MessageType.SNAP and dropped["n"] < 2:
                dropped["n"] += 1
                return None
            return m

        sim.intercept = lose_snapshots
        sim.converge(400)
        assert dropped["n"] == 2

    for_seeds(seed_count, scenario)


def test_snapshots_under_unreliable_network_and_restarts(seed_count: int) -> None:
    """Compaction, snapshot installs, crashes and restarts over a lossy network."""

    def scenario(seed: int) -> None:
        sim = RaftSimulation(5, seed, snapshot_threshold=THRESHOLD, net=NetConfig.unreliable())
        for i in range(100):
            if sim.rng.randrange(2) == 0:
                sim.propose()
            if i % 25 == 10:
                victim = sim.rng.choice(sim.ids)
                sim.crash(victim)
                sim.run(sim.rng.randint(1, 30))
                sim.restart(victim)
            sim.run(1)
        sim.net = NetConfig()
        sim.wait_leader(300)
        sim.propose()
        sim.converge(400)

    for_seeds(seed_count, scenario)
