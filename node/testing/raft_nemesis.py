"""A seeded nemesis for the simulator: every fault at once, and a replay CLI.

``python -m node.testing.raft_nemesis --seed 7 --nodes 5 --steps 400`` runs one seeded nemesis
(partitions of every shape, crashes and restarts, lossy network, snapshots, membership
changes, leader transfers, client proposals, learners losing their disk or restarting from an
older backup of it) with the simulator's invariant checks after
every step, then heals and checks convergence. The same seed replays the same run.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys

from node.raft.errors import RaftError
from node.raft.storage import MemoryStorage
from node.testing.raft_simulation import InvariantViolation, NetConfig, RaftSimulation


def _learners_safe_to_wipe(sim: RaftSimulation, lead: str) -> list[str]:
    """Running learners of the leader's configuration, with no membership change pending (a
    learner promoted before the leader noticed its lost disk would be a voter counted for
    entries it lacks, which is outside Raft's assumptions), on in-memory storage."""
    r = sim.node(lead).raft
    if r.pending_conf_index > r.log.applied:
        return []
    return [
        i
        for i in sorted(r.learners)
        if sim.nodes.get(i) is not None and isinstance(sim.storages.get(i), MemoryStorage)
    ]


def _lose_a_learners_disk(
    sim: RaftSimulation, lead: str, rng: random.Random, backups: dict[str, MemoryStorage]
) -> str | None:
    """Wipe a learner's disk, or put back an older copy of it; returns what was done."""
    victims = _learners_safe_to_wipe(sim, lead)
    if not victims:
        return None
    victim = rng.choice(victims)
    backup = backups.pop(victim, None)
    if backup is not None and rng.randrange(2) == 0:
        sim.replace_storage(victim, backup)
        return "learner_backup_restored"
    sim.replace_storage(victim)
    return "learner_disk_wiped"


def nemesis(sim: RaftSimulation, steps: int) -> dict[str, int]:
    """Inflict ``steps`` rounds of random faults and traffic; returns what was done."""
    rng = sim.rng
    done: dict[str, int] = {}

    def did(what: str) -> None:
        done[what] = done.get(what, 0) + 1

    spare = [f"x{i}" for i in range(1, 3)]
    backups: dict[str, MemoryStorage] = {}
    for _ in range(steps):
        r = rng.randrange(100)
        lead = sim.leader()
        if r < 35:
            if sim.propose() is not None:
                did("propose")
        elif r < 40:
            sim.heal()
            did("heal")
        elif r < 43:
            ids = list(sim.ids)
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            sim.partition(ids[:cut], ids[cut:])
            did("partition")
        elif r < 45 and len(sim.ids) >= 3:
            ids = list(sim.ids)
            rng.shuffle(ids)
            half = (len(ids) - 1) // 2
            sim.bridge(ids[1 : 1 + half], ids[1 + half :], ids[0])
            did("bridge")
        elif r < 48:
            a, b = rng.sample(sim.ids, 2)
            sim.block(a, b)
            did("asymmetric")
        elif r < 52:
            up = sim.alive()
            if len(up) > 1:
                sim.crash(rng.choice(up))
                did("crash")
        elif r < 60:
            down = [i for i in sim.ids if sim.nodes[i] is None]
            if down:
                sim.restart(rng.choice(down))
                did("restart")
        elif r < 63 and lead is not None:
            node = sim.node(lead)
            st = node.status()
            try:
                if spare and rng.randrange(2) == 0:
                    new = spare.pop(0)
                    sim.add_node(new)
                    node.add_learner(new)
                    did("add_learner")
                elif st.learners and rng.randrange(2) == 0:
                    # Not a learner whose disk was lost and that the leader has not yet
                    # noticed (see _learners_safe_to_wipe).
                    prs = node.raft.prs
                    ok = [
                        i
                        for i in st.learners
                        if i not in prs or prs[i].match <= sim.storages[i].last_index()
                    ]
                    if ok:
                        node.add_voter(rng.choice(ok))
                        did("promote")
                elif len(st.voters) > 3:
                    node.remove_node(rng.choice(st.voters))
                    did("remove")
            except RaftError:
                pass
        elif r < 65 and lead is not None:
            voters = [v for v in sim.node(lead).status().voters if v != lead]
            if voters:
                sim.node(lead).transfer_leader(rng.choice(voters))
                did("transfer")
        elif r < 67 and lead is not None:
            what = _lose_a_learners_disk(sim, lead, rng, backups)
            if what is not None:
                did(what)
        elif r < 69 and lead is not None:
            learners = _learners_safe_to_wipe(sim, lead)
            if learners:
                nid = rng.choice(learners)
                backups[nid] = copy.deepcopy(sim.storages[nid])  # type: ignore[arg-type]
                did("learner_backup_taken")
        sim.run(rng.choice((1, 1, 1, 2, 5)))
    for nid in sim.ids:
        if sim.nodes[nid] is None:
            sim.restart(nid)
    sim.heal()
    sim.net = NetConfig()
    sim.wait_leader(500)
    sim.propose()
    sim.converge(800)
    done["fingerprint"] = int(sim.fingerprint()[:12], 16)
    return done


def run(
    seed: int,
    nodes: int = 5,
    steps: int = 300,
    *,
    learners: int = 0,
    delegate_learners: bool = False,
) -> dict[str, int]:
    """One nemesis run on a fresh simulated group of ``nodes`` voters and ``learners``
    learners (lossy network, snapshots on; ``delegate_learners``: learners replicate from
    delegate voters, ``node.raft.delegation``). The seed also picks whether pre-vote and
    check-quorum are on (both on for half the seeds)."""
    net = NetConfig(drop_pm=50, dup_pm=30, max_delay=3, jitter_pm=30)
    variant = seed % 4
    sim = RaftSimulation(
        nodes,
        seed,
        net=net,
        snapshot_threshold=24,
        pre_vote=variant in (0, 1),
        check_quorum=variant in (0, 2),
        learners=learners,
        delegate_learners=delegate_learners,
    )
    return nemesis(sim, steps)


def main(argv: list[str] | None = None) -> int:
    """CLI: run (or replay) nemesis seeds."""
    ap = argparse.ArgumentParser(description="seeded nemesis run of the Raft simulator")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=1, help="seeds from --seed on")
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--learners", type=int, default=0)
    ap.add_argument("--delegate", action="store_true", help="delegated learner replication")
    args = ap.parse_args(argv)
    for seed in range(args.seed, args.seed + args.count):
        try:
            done = run(
                seed,
                args.nodes,
                args.steps,
                learners=args.learners,
                delegate_learners=args.delegate,
            )
        except InvariantViolation as exc:
            print(f"seed {seed}: FAILED: {exc}")
            print(
                f"replay: python -m node.testing.raft_nemesis --seed {seed} --nodes {args.nodes} "
                f"--steps {args.steps} --learners {args.learners}"
                + (" --delegate" if args.delegate else "")
            )
            return 1
        print(f"seed {seed}: ok {sorted(done.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
