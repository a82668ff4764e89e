"""SQLStorage unchanged on a real PostgreSQL server.

Like tests/ledger/test_postgres.py: `make test` provides the server URL in
MICROGRID_TEST_PG (.ci/postgres.sh); without it these tests are skipped (never in CI).
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, text

from node.raft import ConfState, Entry, HardState, Ready, StorageCorruption
from node.raft.storage_sql import SQLStorage
from node.testing.raft_simulation import RaftSimulation
from tests.conftest import PG_ADMIN_URL, needs_pg

pytestmark = needs_pg


def test_postgres_roundtrip_and_corruption(pg_url: str) -> None:
    """Save, reopen, compact; then a corrupt middle entry stops the node on PostgreSQL too."""
    st = SQLStorage(pg_url)
    ents = tuple(Entry(i, 1, b"e%d" % i) for i in range(1, 11))
    st.save_ready(Ready(None, HardState(3, "n1", 8), ents, None, (), ()))
    st.create_snapshot(4, ConfState(("n1", "n2", "n3")), b"state")
    st.compact(4)
    st.close()
    st2 = SQLStorage(pg_url)
    assert st2.initial_state() == (HardState(3, "n1", 8), ConfState(("n1", "n2", "n3")))
    assert [e.data for e in st2.entries(5, 11)] == [b"e%d" % i for i in range(5, 11)]
    with st2.engine.begin() as conn:
        conn.execute(text("UPDATE raft_entries SET data = '\\x00'::bytea WHERE idx = 6"))
    st2.close()
    with pytest.raises(StorageCorruption):
        SQLStorage(pg_url)


def test_postgres_backed_group(pg_url: str) -> None:
    """A 3-node simulated group, each node's log in its own PostgreSQL database, commits
    and survives a restart of every node."""
    base = pg_url.rsplit("/", 1)[0]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    names = [f"mg_raft_{uuid.uuid4().hex[:10]}" for _ in range(3)]
    with admin.connect() as conn:
        for n in names:
            conn.execute(text(f'CREATE DATABASE "{n}"'))
    try:
        urls = dict(zip(("n1", "n2", "n3"), (f"{base}/{n}" for n in names), strict=True))
        sim = RaftSimulation(3, 5, storage_factory=lambda nid: SQLStorage(urls[nid]))
        sim.wait_leader()
        for _ in range(10):
            sim.propose()
            sim.run(1)
        sim.converge()
        for nid in sim.ids:
            sim.storages[nid].close()  # type: ignore[attr-defined]
            sim.crash(nid)
            sim.storages[nid] = SQLStorage(urls[nid])
            sim.restart(nid)
        sim.wait_leader()
        sim.propose()
        sim.converge()
        for nid in sim.ids:
            sim.storages[nid].close()  # type: ignore[attr-defined]
    finally:
        with admin.connect() as conn:
            for n in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)'))
        admin.dispose()
