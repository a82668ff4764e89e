"""A grid of real household processes with member keys in the attacker's hands.

The grid is the demo layout (node/tools/demo.py): the meter simulator over Modbus TCP, a signed
genesis, one ``microgrid node run`` process per honest household (three voters, the rest
learners), real libp2p on 127.0.0.1 and a SQLite ledger each. The last households' keys are not
run as nodes: the test holds them as :class:`~tests.adversary.member.HostileMember` hosts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from node.ledger.verify import verify_ledger
from node.setup.genesis import load_genesis
from node.setup.keyfile import load_key_file
from node.tools.demo import Demo, DemoHousehold, fetch
from tests.adversary.member import HostileMember
from tests.node.test_demo import SLOT_SECONDS, running_demo

STARTUP_TIMEOUT = 120


@dataclass
class Grid:
    """The running grid: the demo, its honest households and the attacker's member key."""

    demo: Demo
    honest: list[DemoHousehold]
    attackers: list[DemoHousehold]
    """Member households whose keys the test holds instead of running their nodes."""
    nursery: trio.Nursery

    def hostile_member(self, peers: list[DemoHousehold] | None = None, key: int = 0
                       ) -> HostileMember:  # fmt: skip
        """A new host holding attacker key ``key``, dialling ``peers`` (default: all honest)."""
        h = self.attackers[key]
        identity = load_key_file(h.directory / "node.key")
        genesis = load_genesis(self.demo.directory / "genesis.json")
        dial = peers if peers is not None else self.honest
        addrs = [f"/ip4/127.0.0.1/tcp/{p.listen_port}/p2p/{p.peer_id}" for p in dial]
        return HostileMember(identity, genesis, addrs)

    async def statuses(self) -> dict[str, dict[str, Any]]:
        """``/status`` of every honest node that answers."""
        return await self.demo.statuses()

    def all_alive(self) -> list[str]:
        """Names of honest nodes whose process has exited (empty when all run)."""
        return [h.name for h in self.honest if not h.alive]

    async def height(self) -> int:
        """The lowest ledger height among the honest nodes (0 if one does not answer)."""
        docs = await self.statuses()
        if len(docs) < len(self.honest):
            return 0
        return min(d["ledger"]["height"] for d in docs.values())

    async def wait_settled(self, more: int, timeout: float = 8 * SLOT_SECONDS) -> int:
        """Until every honest node has settled ``more`` further slots; returns the height."""
        start = await self.height()
        with trio.fail_after(timeout):
            while (h := await self.height()) < start + more:
                assert not self.all_alive(), f"node processes exited: {self.all_alive()}"
                await trio.sleep(0.5)
        return h


@asynccontextmanager
async def hostile_grid(tmp_path: Path, honest: int = 4, attackers: int = 1,
                       feeder: bool = False) -> AsyncIterator[Grid]:  # fmt: skip
    """Start the honest households' nodes and wait for their first settled slot; the last
    ``attackers`` member keys are the test's. ``feeder``: the grid has a feeder meter, read and
    signed by h1 with the operator's key (``microgrid demo --feeder``)."""
    async with (
        running_demo(tmp_path, honest + attackers, run=honest, voters=3, feeder=feeder) as demo,
        trio.open_nursery() as nursery,
    ):
        grid = Grid(demo, demo.households[:honest], demo.households[honest:], nursery)
        with trio.fail_after(STARTUP_TIMEOUT):
            while await grid.height() < 1:
                assert not grid.all_alive(), f"exited at start: {grid.all_alive()}"
                await trio.sleep(0.5)
        try:
            yield grid
        finally:
            nursery.cancel_scope.cancel()  # the attackers' hosts, before the nodes stop


def check_ledgers(grid: Grid) -> tuple[int, str]:
    """Every honest ledger verifies and all heads are equal; returns (height, head)."""
    reports = {h.name: verify_ledger(h.ledger_url) for h in grid.honest}
    bad = {n: r.error for n, r in reports.items() if not r.ok}
    assert not bad, f"ledgers failing verification: {bad}"
    heads = {(r.height, r.head_hash) for r in reports.values()}
    assert len(heads) == 1, f"ledgers differ: {heads}"
    ((height, head),) = heads
    assert height > 0
    return height, head


async def api_json(h: DemoHousehold, path: str) -> Any:
    """GET a node API path (None when it does not answer)."""
    return await fetch(h.api + path)
