"""LedgerStore.record refuses values no 64-bit column holds, with LedgerStoreError (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from market import GateClosed, Order
from market.bounds import STORE_INT
from market.state import clear_book
from node.ledger import LedgerStore
from node.ledger import schema as t
from node.ledger.store import LedgerStoreError
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
