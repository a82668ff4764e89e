"""Shared test configuration.

Long soak and nemesis runs take a bounded, seeded number of iterations by default (what CI
runs). ``pytest --soak`` runs them longer; ``--seed-count N`` sets the number of seeds.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run soak/nemesis tests at full length")
    parser.addoption("--seed-count", type=int, default=None, help="seeds per seeded scenario")


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    """True when the run asked for full-length soak/nemesis tests."""
    return bool(request.config.getoption("--soak"))


@pytest.fixture
def seed_count(request: pytest.FixtureRequest) -> int:
    """How many seeds a seeded scenario should try: bounded in CI, larger with --soak."""
    n = request.config.getoption("--seed-count")
    if n is not None:
        return int(n)
    return 200 if request.config.getoption("--soak") else 20
