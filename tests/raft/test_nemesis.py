"""Everything at once: the seeded nemesis of ``node.testing.raft_nemesis`` over many seeds."""

from __future__ import annotations

import pytest

from node.testing.raft_nemesis import run
from tests.raft.helpers import for_seeds


@pytest.mark.soak
def test_nemesis(seed_count: int, soak: bool) -> None:
    """Partitions of every shape, crashes, loss, snapshots, membership changes and
    transfers together: invariants hold at every step and the group converges after.
    Replay a seed with ``python -m node.testing.raft_nemesis --seed N``."""
    steps = 500 if soak else 250

    def scenario(seed: int) -> None:
        run(seed, nodes=(3, 5, 7)[seed % 3], steps=steps)

    for_seeds(seed_count, scenario, base=1000)
