"""Issue 19 (no growth over a long run), the strategy API's part: a household node forgets the
cancels it signed once they reached the log or their slot closed (one in-process node, a real
meter simulator, 4-second slots; about 20 s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from meter.sim.server import MeterSimulator
from node.daemon.household_node import HouseholdNode
from tests.node.test_household import TOKEN, call, make_grid, run_until_stopped, sim, status_when

pytestmark = pytest.mark.slow
_ = sim  # the fixture


async def test_signed_cancels_are_forgotten_once_committed_or_closed(
    tmp_path: Path, sim: MeterSimulator
) -> None:
    """Each manual cancel left an entry (an empty list once committed) in ``cancels`` for the
    node's lifetime; now the map holds only cancels of orders still withdrawn in open slots."""
    grid = await make_grid(tmp_path, sim)
    node = HouseholdNode(grid.config, grid.identity, grid.genesis)

    async def body(node: HouseholdNode) -> None:
        doc = await status_when(node, lambda d: d["raft"]["role"] == "leader", 15)
        slot = doc["open_slot"] + 3  # its gate is far enough away for two place/cancel rounds
        cancelled: list[str] = []
        for i in range(2):
            order: dict[str, Any] = {"side": "buy", "slot": slot, "quantity_wh": 100 + i,
                                     "price": 20}  # fmt: skip
            code, placed = await call(node, "POST", "/orders", order, token=TOKEN)
            assert code == 200, placed
            code, answer = await call(node, "DELETE", f"/orders?slot={slot}", token=TOKEN)
            assert code == 200 and answer["cancelled"] == placed["queued"], answer
            cancelled.append(placed["queued"])
        assert set(node.strategy.nonces.withdrawn) == set(cancelled)
        await status_when(node, lambda d: (d["ledger"]["closed_through"] or -1) >= slot, 40)
        with trio.fail_after(10):  # the next applied batch prunes
            while node.strategy.cancels:
                await trio.sleep(0.2)
        assert not node.strategy.nonces.withdrawn

    await run_until_stopped(node, body)
