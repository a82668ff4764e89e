"""The ledger store on a real SQLite file, and `ledger verify` catching tampering."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from market import SlotSettled, State, apply
from node.ledger import LedgerStore, LedgerStoreError, verify_ledger
from node.tools import market_sim


@pytest.fixture
def ledger(tmp_path: Path) -> tuple[str, Path, State]:
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    state = market_sim.run(households=5, slots=40, seed=7, db=url)
    return url, path, state


def tamper(path: Path, sql: str, *params: object) -> None:
    with sqlite3.connect(path) as conn:
        cur = conn.execute(sql, params)
        assert cur.rowcount >= 1, f"tamper statement changed nothing: {sql}"


def test_untouched_ledger_verifies_with_engine_head(ledger) -> None:
    url, _, state = ledger
    report = verify_ledger(url)
    assert report.ok, report.error
    assert report.height == state.height == 40
    assert report.head_hash == state.head_hash
    assert report.transactions > 40


def test_store_is_sqlite_wal_with_full_sync(ledger) -> None:
    _, path, _ = ledger
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store = LedgerStore(f"sqlite:///{path}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()


def test_tampered_posting_is_caught(ledger) -> None:
    url, path, _ = ledger
    tamper(
        path,
        "UPDATE postings SET amount = amount + 1 WHERE id = "
        "(SELECT id FROM postings WHERE asset = 'money' ORDER BY id LIMIT 1 OFFSET 3)",
    )
    report = verify_ledger(url)
    assert not report.ok
    assert "does not match its id" in report.error


def test_balanced_but_rewritten_transaction_is_caught(ledger) -> None:
    """Moving money between two postings keeps the sum at zero; the txid still changes."""
    url, path, _ = ledger
    with sqlite3.connect(path) as conn:
        (tx_id,) = conn.execute(
            "SELECT transaction_id FROM postings WHERE asset='money' GROUP BY transaction_id "
            "HAVING COUNT(*) >= 2 LIMIT 1"
        ).fetchone()
        a, b = conn.execute(
            "SELECT id FROM postings WHERE transaction_id=? AND asset='money' ORDER BY position",
            (tx_id,),
        ).fetchall()[:2]
        conn.execute("UPDATE postings SET amount = amount - 5 WHERE id=?", a)
        conn.execute("UPDATE postings SET amount = amount + 5 WHERE id=?", b)
    report = verify_ledger(url)
    assert not report.ok and "does not match its id" in report.error


def test_tampered_block_header_is_caught(ledger) -> None:
    url, path, _ = ledger
    tamper(path, "UPDATE blocks SET tx_count = tx_count + 1 WHERE height = 10")
    report = verify_ledger(url)
    assert not report.ok and "block 10" in report.error


def test_rehashed_block_breaks_the_chain(ledger) -> None:
    url, path, _ = ledger
    tamper(path, "UPDATE blocks SET hash = ? WHERE height = 20", "ab" * 32)
    report = verify_ledger(url)
    assert not report.ok
    assert "block 20" in report.error  # its own header no longer hashes to the stored hash


def test_deleted_block_is_caught(ledger) -> None:
    url, path, _ = ledger
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute(
            "DELETE FROM postings WHERE transaction_id IN "
            "(SELECT id FROM transactions WHERE block_height = 15)"
        )
        conn.execute("DELETE FROM transactions WHERE block_height = 15")
        conn.execute("DELETE FROM blocks WHERE height = 15")
    report = verify_ledger(url)
    assert not report.ok and "jump from 14 to 16" in report.error


def test_broken_prev_hash_link_is_caught(ledger) -> None:
    url, path, _ = ledger
    tamper(path, "UPDATE blocks SET prev_hash = ? WHERE height = 5", "00" * 32)
    report = verify_ledger(url)
    assert not report.ok and "broken chain" in report.error and "block 5" in report.error


def test_tampered_trade_is_caught(ledger) -> None:
    url, path, _ = ledger
    tamper(path, "UPDATE trades SET quantity_wh = quantity_wh + 1 WHERE rowid = 1")
    report = verify_ledger(url)
    assert not report.ok and "trade root" in report.error


def test_tampered_reading_signature_is_caught(ledger) -> None:
    url, path, _ = ledger
    tamper(path, "UPDATE readings SET export_wh = export_wh + 100 WHERE rowid = 50")
    report = verify_ledger(url)
    assert not report.ok and "invalid signature" in report.error


def test_balances_table_must_match_postings(ledger) -> None:
    url, path, _ = ledger
    tamper(path, "UPDATE balances SET amount = amount + 1 WHERE rowid = 1")
    report = verify_ledger(url)
    assert not report.ok and "balances table" in report.error


def test_missing_database_is_reported_not_raised(tmp_path: Path) -> None:
    report = verify_ledger(f"sqlite:///{tmp_path / 'nope.db'}")
    assert not report.ok and "cannot read" in report.error


def test_a_failed_write_leaves_nothing_half_written(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    sim = market_sim.build(3, seed=3)
    store = LedgerStore(url)
    store.init_genesis(sim.config)
    state = State.initial(sim.config)
    settled_events = None
    for i, cmd in enumerate(market_sim.commands(sim, 3), start=1):
        state, events = apply(state, cmd)
        store.record(events, applied_index=i)
        if any(isinstance(e, SlotSettled) for e in events):
            settled_events = events
    before = verify_ledger(url)
    applied = store.applied_index()
    with pytest.raises(LedgerStoreError):
        store.record(settled_events, applied_index=applied + 1)  # the same block again
    after = verify_ledger(url)
    assert after.ok and (after.height, after.head_hash) == (before.height, before.head_hash)
    assert store.applied_index() == applied
    store.close()


def test_store_refuses_another_grids_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    LedgerStore(url).init_genesis(market_sim.build(3, seed=1).config)
    with pytest.raises(LedgerStoreError, match="genesis"):
        LedgerStore(url).init_genesis(market_sim.build(3, seed=2).config)


def test_cli_verify_prints_height_and_head_and_fails_loudly(ledger) -> None:
    url, path, state = ledger
    cmd = [sys.executable, "-m", "node.cli", "ledger", "verify", "--db", url]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert f"height {state.height}" in ok.stdout and state.head_hash in ok.stdout
    tamper(path, "UPDATE blocks SET state_hash = ? WHERE height = 3", "11" * 32)
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "FAILED" in bad.stderr and "block 3" in bad.stderr
