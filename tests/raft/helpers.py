"""Seeded scenario runner: every failure names its seed; ``RAFT_SEED=N`` replays one seed."""

from __future__ import annotations

import os
from collections.abc import Callable

from node.testing.raft_simulation import RaftSimulation


def seeds(count: int, base: int = 0) -> list[int]:
    """The seeds to run: ``RAFT_SEED`` alone if set, else ``count`` seeds from ``base``."""
    env = os.environ.get("RAFT_SEED")
    if env:
        return [int(env)]
    return list(range(base, base + count))


def for_seeds(count: int, scenario: Callable[[int], object], base: int = 0) -> None:
    """Run ``scenario(seed)`` for each seed; a failure reports how to replay it."""
    for seed in seeds(count, base):
        try:
            scenario(seed)
        except Exception as exc:
            name = getattr(scenario, "__name__", "scenario")
            raise AssertionError(
                f"{name} failed for seed {seed}: {exc}\n"
                f"replay with: RAFT_SEED={seed} pytest tests/raft -k <this test>"
            ) from exc


def scaled(count: int, soak: bool, default: int, full: int) -> int:
    """Iterations for a long scenario: bounded by default, ``full`` with --soak."""
    return full if soak else default


def voters_alive(sim: RaftSimulation) -> list[str]:
    """Running voters of the genesis configuration."""
    return [i for i in sim.voter_ids if sim.nodes.get(i) is not None]
