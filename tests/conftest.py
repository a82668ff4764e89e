"""Shared test configuration.

Long soak and nemesis runs take a bounded, seeded number of iterations by default (what CI
runs). ``pytest --soak`` runs them longer; ``--seed-count N`` sets the number of seeds.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

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


PG_ADMIN_URL = os.environ.get("MICROGRID_TEST_PG", "")
"""Admin URL of the test PostgreSQL server (`make test` starts it with .ci/postgres.sh)."""

needs_pg = pytest.mark.skipif(
    not PG_ADMIN_URL and not os.environ.get("CI"),
    reason="no PostgreSQL: set MICROGRID_TEST_PG (make test does it via .ci/postgres.sh)",
)
"""Skip without a server, except in CI, where a missing server must fail loudly."""


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text

    assert PG_ADMIN_URL, "CI must provide MICROGRID_TEST_PG"
    name = f"mg_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
