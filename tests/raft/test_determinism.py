"""Same seed, same run: across processes and string-hash seeds; failures name their seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.testing.raft_nemesis import run
from node.testing.raft_simulation import InvariantViolation, RaftSimulation
from tests.raft.helpers import for_seeds

ROOT = Path(__file__).resolve().parents[2]


def test_same_seed_same_run_in_process() -> None:
    """Two runs of one seed produce the same fingerprint; another seed does not."""
    assert run(11, steps=80) == run(11, steps=80)
    assert run(11, steps=80)["fingerprint"] != run(12, steps=80)["fingerprint"]


def test_same_seed_same_run_across_hash_seeds() -> None:
    """The replay CLI gives identical output under different PYTHONHASHSEEDs, so no
    behaviour depends on set or dict-of-str iteration order."""
    outs = []
    for hs in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hs, PYTHONPATH=str(ROOT))
        res = subprocess.run(
            [sys.executable, "-m", "node.testing.raft_nemesis", "--seed", "3", "--steps", "80"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=120,
            check=True,
        )
        outs.append(res.stdout)
    assert outs[0] == outs[1] and "fingerprint" in outs[0]


def test_failure_reports_seed_and_replay_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A violated invariant names the seed, and the runner says how to replay it."""
    monkeypatch.delenv("RAFT_SEED", raising=False)

    def broken(seed: int) -> None:
        sim = RaftSimulation(3, seed)
        sim.wait_leader()
        lead = sim.leader()
        assert lead is not None
        sim.leaders[sim.node(lead).raft.term + 0] = "someone-else"
        sim.check_invariants()

    with pytest.raises(AssertionError) as exc:
        for_seeds(3, broken, base=40)
    assert "seed 40" in str(exc.value) and "RAFT_SEED=40" in str(exc.value)
    assert isinstance(exc.value.__cause__, InvariantViolation)
    assert "seed=40" in str(exc.value.__cause__)
