"""The same ledger store and verifier on a real PostgreSQL server.

`make test` starts the local Debian PostgreSQL (.ci/postgres.sh) and passes its URL in
MICROGRID_TEST_PG; without it these tests are skipped with that reason (never in CI).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, text

from node.ledger import verify_ledger
from node.tools import market_sim
from tests.conftest import needs_pg

pytestmark = needs_pg


def test_postgres_ledger_is_identical_to_sqlite_and_verifies(pg_url: str, tmp_path: Path) -> None:
    pg_state = market_sim.run(households=5, slots=30, seed=11, db=pg_url)
    lite_url = f"sqlite:///{tmp_path / 'l.db'}"
    lite_state = market_sim.run(households=5, slots=30, seed=11, db=lite_url)
    assert pg_state.head_hash == lite_state.head_hash
    report = verify_ledger(pg_url)
    assert report.ok, report.error
    assert (report.height, report.head_hash) == (30, pg_state.head_hash)


def test_postgres_tampering_is_caught(pg_url: str) -> None:
    market_sim.run(households=4, slots=12, seed=5, db=pg_url)
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE postings SET amount = amount + 1 WHERE id = (SELECT min(id) FROM postings)"
            )
        )
    engine.dispose()
    report = verify_ledger(pg_url)
    assert not report.ok and "does not match its id" in report.error
