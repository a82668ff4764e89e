"""LedgerStore.record refuses values no 64-bit column holds, with LedgerStoreError (issue 12);
record_schedule writes the grid's schedule once and refuses another (issue 13); an entry that
writes no row commits nothing, its index waits for the next commit (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from market import GateClosed, Order, Rejected, RejectReason
from market.bounds import STORE_INT
from market.schedule import Schedule
from market.state import clear_book
from node.ledger import LedgerStore
from node.ledger import schema as t
from node.ledger.store import LedgerStoreError, schedule_json, writes_rows
from tests.market.world import World


def gate_with_nonce(nonce: int) -> GateClosed:
    w = World()
    w.register("alice")
    order = w.order("alice", "sell", 100, 10, slot=3)
    # model_construct skips validation: a value that slipped past the models' bounds
    forged = Order.model_construct(**{**dict(order), "nonce": nonce})
    clearing, trades = clear_book(w.config, 3, (forged,))
    return GateClosed(3, clearing, (forged,), trades)


def test_an_unstorable_value_is_a_ledger_store_error_and_writes_nothing(tmp_path: Path) -> None:
    store = LedgerStore(f"sqlite:///{tmp_path / 'l.db'}")
    store.init_genesis(World().config)
    with pytest.raises(LedgerStoreError, match="unstorable value: OverflowError"):
        store.record([gate_with_nonce(2**63 + 5)], applied_index=1)
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t.clearings)).scalar_one() == 0
    assert store.applied_index() == 0
    store.record([gate_with_nonce(STORE_INT)], applied_index=1)  # the largest storable value
    with store.engine.connect() as conn:
        assert conn.execute(select(t.orders.c.nonce)).scalar_one() == STORE_INT
    assert store.applied_index() == 1
    store.close()


def test_record_schedule_inserts_once_and_refuses_another_grids(tmp_path: Path) -> None:
    """Issue 13: meta ``schedule`` holds the genesis timings; recording the same schedule again
    is a no-op, a different one is refused (a ledger belongs to one grid)."""
    store = LedgerStore(f"sqlite:///{tmp_path / 'l.db'}")
    store.init_genesis(World().config)
    schedule = Schedule(slot_seconds=10, gate_lead_seconds=3, settle_delay_seconds=2)
    store.record_schedule(schedule)
    meta = store.meta()
    assert json.loads(meta["schedule"]) == {
        "slot_seconds": 10,
        "gate_closure_lead_seconds": 3,
        "settle_delay_seconds": 2,
    }
    assert meta["schedule"] == schedule_json(schedule)
    store.record_schedule(Schedule(10, 3, 2))  # idempotent
    assert store.meta() == meta
    for other in (Schedule(900, 3, 2), Schedule(10, 300, 2), Schedule(10, 3, 120)):
        with pytest.raises(LedgerStoreError, match="a ledger belongs to one grid"):
            store.record_schedule(other)
    assert store.meta() == meta
    # an equivalent JSON spelling of the same schedule is the same schedule
    store.set_meta("schedule", json.dumps(json.loads(meta["schedule"]), indent=1))
    store.record_schedule(schedule)
    store.close()


def test_a_new_ledger_with_a_schedule_still_binds_to_its_grid(tmp_path: Path) -> None:
    """record_schedule after init_genesis (as the node does) leaves the grid binding intact,
    and a reopened store accepts the same grid and schedule again."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    config = World().config
    with LedgerStore(url) as store:
        store.init_genesis(config)
        store.record_schedule(Schedule())
    with LedgerStore(url) as store:
        store.init_genesis(config)
        store.record_schedule(Schedule())
        assert store.meta()["genesis_hash"] == config.genesis_hash()
        assert json.loads(store.meta()["schedule"])["slot_seconds"] == 900


def test_an_entry_without_rows_commits_nothing_until_one_with_rows(tmp_path: Path) -> None:
    """Issue 19: an applied entry whose events write no ledger row (a batch of orders or
    readings, a Raft no-op) costs no transaction, hence no fsync; its index is committed with
    the next entry that writes rows, by sync_applied_index, or at close."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    store = LedgerStore(url)
    store.init_genesis(World().config)
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    rejected = Rejected(RejectReason.MALFORMED, "not a command", "order", None)
    assert store.record_entry([], 1) is False  # a Raft no-op
    assert store.record_entry([rejected], 2) is False
    assert not writes_rows([rejected]) and writes_rows([gate_with_nonce(5)])
    assert commits == [] and store.meta()["applied_index"] == "0"
    assert store.applied_index() == 2  # this process counts them
    assert store.record_entry([gate_with_nonce(5)], 3) is True
    assert commits == [1] and store.meta()["applied_index"] == "3"
    assert store.record_entry([], 4) is False
    store.sync_applied_index()
    store.sync_applied_index()  # nothing waits any more: no transaction
    assert commits == [1, 1] and store.meta()["applied_index"] == "4"
    assert store.record_entry([rejected], 5) is False
    store.close()  # commits the waiting index
    reopened = LedgerStore(url)
    assert reopened.applied_index() == 5 and reopened.open_check and reopened.open_check.clean
    reopened.close()


def test_a_waiting_index_never_moves_the_committed_one_back(tmp_path: Path) -> None:
    """A snapshot recorded meanwhile (block sync) may have committed a later applied index: the
    waiting one is then older and is not written."""
    store = LedgerStore(f"sqlite:///{tmp_path / 'l.db'}")
    store.init_genesis(World().config)
    store.record_entry([], 7)
    store.record([], applied_index=20)  # as record_snapshot does for an installed snapshot
    assert store.applied_index() == 20
    store.record_entry([], 8)  # (not in log order: only to hold an older index back)
    store.sync_applied_index()
    assert store.meta()["applied_index"] == "20" and store.applied_index() == 20
    store.close()
