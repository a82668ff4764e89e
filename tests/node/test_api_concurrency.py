"""Issue 13: "a node API that never blocks consensus". A real HouseholdNode (libp2p host, Raft
driver, replica, SQLite ledger and Raft log, HTTP API on 127.0.0.1) applies a stream of large
batches of orders and readings from the market simulation while client threads hammer every
route over TCP. Every answer must be a 2xx (or the 409 a second manual order for a slot earns),
internally consistent, consistent with the client's earlier answers, and with the ledger and the
Raft log read directly afterwards.

Its oracle for ``/status``: the Raft log is replayed through a fresh replica after the run, which
gives the engine's height, head and gate/settlement marks after every log index, so an answer
whose ``applied_index`` and ``ledger`` do not belong together (read while the apply worker was
half-way) is caught.
"""

from __future__ import annotations

import http.client
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trio

from market import MeterReading, Order, Side
from market.models import Command
from meter.sim.server import MeterSimulator
from node.daemon.household_node import HouseholdNode
from node.daemon.replica import Replica
from node.ledger import schema as t
from node.raft import EntryType
from node.raft.storage_sql import SQLStorage
from node.tools import market_sim
from tests.node.test_household import TOKEN, make_grid, run_until_stopped, sim  # noqa: F401

pytestmark = pytest.mark.slow

SPEED = 3.0
"""Wall-clock seconds per real second: a 4 s slot passes in 1.3 s, so gates close and slots
settle (blocks, balances) several times while the clients run."""
SLOTS = 10
"""Slots the simulated households trade in (from the first open one)."""
EXTRA_ORDERS = 30
"""Orders per household and slot beyond the simulation's own one: large books to clear."""
BATCH = 48
"""Records per proposed entry."""
HAMMER_SECONDS = 8.0
"""Long enough for several gates to close even when the apply worker is slowed by a busy
machine (5 s once recorded 370 orders instead of the 500 the load check below expects)."""
GET_CLIENTS = 8
POST_CLIENTS = 3
MAX_REQUESTS = 600
"""Per client: the run is bounded in time and in count."""
ROUTES = ("/status", "/orders", "/orders?household=me", "/trades", "/trades?household=me",
          "/balances", "/balances?household=me", "/slots")  # fmt: skip


@dataclass
class Seen:
    """What one client saw, kept compact for the checks after the run."""

    codes: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    status: list[dict[str, Any]] = field(default_factory=list)
    closed_orders: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    trades: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    slots: dict[int, dict[str, Any]] = field(default_factory=dict)
    balances: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    posted: list[tuple[int, int]] = field(default_factory=list)


def get_client(port: int, routes: tuple[str, ...], deadline: float, first: int,
               requests: int = MAX_REQUESTS) -> Seen:  # fmt: skip
    """One keep-alive connection cycling through ``routes`` until ``deadline`` (at most
    ``requests``); checks each answer on its own and against this client's earlier ones."""
    seen = Seen()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    last: dict[str, Any] = {}
    try:
        for n in range(requests):
            if time.monotonic() >= deadline:
                break
            path = routes[(first + n) % len(routes)]
            conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            seen.codes[path.partition("?")[0]].append(resp.status)
            if resp.status != 200:
                seen.problems.append(f"{path}: {resp.status} {body}")
                continue
            check_answer(path, body, last, seen)
    finally:
        conn.close()
    return seen


def check_answer(path: str, body: Any, last: dict[str, Any], seen: Seen) -> None:
    """Internal consistency of one answer, and monotonicity against the client's last one."""
    route = path.partition("?")[0]

    def monotonic(key: str, value: Any) -> None:
        before = last.get(key)
        if value is not None and before is not None and value < before:
            seen.problems.append(f"{path}: {key} went back from {before} to {value}")
        if value is not None:
            last[key] = value

    if route == "/status":
        raft, ledger = body["raft"], body["ledger"]
        if not raft["applied_index"] <= raft["commit_index"] <= raft["last_index"]:
            seen.problems.append(f"/status: applied/commit/last out of order: {raft}")
        for key, value in (("applied", raft["applied_index"]), ("commit", raft["commit_index"]),
                           ("height", ledger["height"]), ("closed", ledger["closed_through"]),
                           ("settled", ledger["settled_through"])):  # fmt: skip
            monotonic(key, value)
        seen.status.append({"applied": raft["applied_index"], **ledger})
    elif route == "/orders":
        slot = body["slot"]
        if any(o["slot"] != slot for o in body["orders"]):
            seen.problems.append(f"{path}: rows of another slot than {slot}")
        if slot is not None and "household" not in path:
            seen.closed_orders[slot] = body["orders"]  # a closed slot's book never changes
    elif route == "/trades":
        for row in body["trades"]:
            seen.trades[(row["slot"], row["position"])] = row
    elif route == "/balances":
        if "household" not in path:
            sums: defaultdict[str, int] = defaultdict(int)
            for row in body["balances"]:
                sums[row["asset"]] += row["amount"]
            if any(sums.values()):
                seen.problems.append(f"/balances: not double-entry, sums {dict(sums)}")
            seen.balances = body["balances"]
    elif route == "/slots":
        monotonic("blocks", body["blocks"])
        for row in body["slots"]:
            if row["settled"]:
                seen.slots[row["slot"]] = row  # a settled slot's row never changes


def post_client(port: int, slots: list[int], deadline: float) -> Seen:
    """Places manual orders, several clients racing for the same slots: one per slot wins."""
    seen = Seen()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        for n, slot in enumerate(slots * 3):
            if time.monotonic() >= deadline or n >= MAX_REQUESTS:
                break
            order = {"side": "buy" if n % 2 else "sell", "quantity_wh": 100 + n, "price": 20,
                     "slot": slot}  # fmt: skip
            conn.request("POST", "/orders", body=json.dumps(order),
                         headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
            resp = conn.getresponse()
            body = json.loads(resp.read())
            seen.codes["POST /orders"].append(resp.status)
            seen.posted.append((slot, resp.status))
            if resp.status not in (200, 409):
                seen.problems.append(f"POST /orders slot {slot}: {resp.status} {body}")
    finally:
        conn.close()
    return seen


def presign(msim: market_sim.MarketSimulation, first: int) -> tuple[list[Order], dict[int, list]]:
    """Every order of ``SLOTS`` slots (the simulation's own plus ``EXTRA_ORDERS`` each), in
    slot order, and each slot's readings."""
    orders: list[Order] = []
    readings: dict[int, list[Command]] = {}
    cfg = msim.config
    for slot in range(first, first + SLOTS):
        trading, settling = market_sim.slot_commands(msim, slot)
        # half the households sell, half buy, whatever the hour (the engine takes one side per
        # household and slot): the simulation's own orders on the other side are left out
        sides = {h.signer.did: Side.SELL if h.index % 2 else Side.BUY for h in msim.households}
        orders += [c for c in trading if isinstance(c, Order) and c.side is sides[c.household]]
        for home in msim.households:
            side = sides[home.signer.did]
            for k in range(EXTRA_ORDERS):
                orders.append(Order(
                    grid=cfg.grid, id=f"{slot}-{home.index}-x{k}", household=home.signer.did,
                    side=side, slot=slot, quantity_wh=50 + 7 * k,
                    price=(24 if side is Side.BUY else 8) + k % 9,  # the books cross
                    nonce=home.next_nonce(),
                ).signed_by(home.signer))  # fmt: skip
        readings[slot] = [c for c in settling if isinstance(c, MeterReading)]
    return orders, readings


async def feed(node: HouseholdNode, orders: list[Order], readings: dict[int, list],
               wall: Callable[[], float], until: float) -> None:  # fmt: skip
    """Gossip's stand-in: keep the leader's proposer full (a batch per proposal), orders
    before their gate, each slot's readings once it ended."""
    schedule = node.schedule
    queue = list(orders)
    while trio.current_time() < until and (queue or readings):
        now = wall()
        while queue and len(node.proposer.pending) < 2 * node.proposer.max_batch:
            order = queue.pop(0)
            if now < schedule.gate_time(order.slot) - 0.5:
                node.proposer.offer(order)
        for slot in [s for s in readings if schedule.end(s) + 0.2 <= now]:
            for reading in readings.pop(slot):
                node.proposer.offer(reading)
        await trio.sleep(0.02)


def ledger_rows(node: HouseholdNode, query: Any) -> tuple[int, list[dict[str, Any]]]:
    """The ledger's applied index and ``query``'s rows, read directly in one transaction."""
    with node.store.engine.connect() as conn, conn.begin():
        rows = [dict(r._mapping) for r in conn.execute(query)]
        applied = conn.execute(sa.select(t.meta.c.value).where(
            t.meta.c.key == "applied_index")).scalar_one_or_none()  # fmt: skip
    return int(applied or 0), rows


def replay_log(node: HouseholdNode, wanted: set[int]) -> dict[int, dict[str, Any]]:
    """The engine's ledger summary after each log index in ``wanted``, by replaying the node's
    Raft log through a fresh replica (no ledger store)."""
    storage = SQLStorage(node.config.raft_url)
    try:
        assert storage.snapshot().metadata.index == 0  # never compacted: every entry is there
        replica = Replica(node.genesis.market, genesis=list(node.genesis.members))
        out = {}
        if 0 in wanted:
            out[0] = summary(replica)
        last = max(wanted)
        for entry in storage.entries(1, last + 1):
            replica.apply_entry(entry.index, entry.data if entry.type == EntryType.NORMAL else b"")
            if entry.index in wanted:
                out[entry.index] = summary(replica)
        return out
    finally:
        storage.close()


def summary(replica: Replica) -> dict[str, Any]:
    """The status document's ``ledger`` section for ``replica``'s engine."""
    s = replica.state
    return {"height": s.height, "head_hash": s.head_hash, "closed_through": s.closed_through,
            "settled_through": s.settled_through}  # fmt: skip


async def test_concurrent_clients_get_consistent_answers_while_entries_apply_at_full_speed(
    tmp_path: Path,
    sim: MeterSimulator,  # noqa: F811
) -> None:
    msim = market_sim.build(households=6, seed=13, grid="api-grid")
    learners = tuple((h.signer.did, h.meter_serial) for h in msim.households)
    grid = await make_grid(tmp_path, sim, operator=msim.operator, market=msim.config,
                           learners=learners)  # fmt: skip
    base, t0 = time.time(), time.monotonic()

    def wall() -> float:
        return base + (time.monotonic() - t0) * SPEED

    config = replace(grid.config, raft_snapshot_entries=0)  # keep the whole log for the oracle
    node = HouseholdNode(config, grid.identity, grid.genesis, wall_clock=wall)
    # many small entries, proposed as fast as they apply: the apply worker is always busy
    node.proposer.max_batch = BATCH
    node.driver.propose_every = 0.01
    results: list[Seen] = []
    final: dict[str, Any] = {}

    async def body(node: HouseholdNode) -> None:
        assert node.api_port is not None
        port = node.api_port
        with trio.fail_after(15):
            while node.driver.view.raft.role != "leader":
                await trio.sleep(0.05)
        first = node.schedule.open_slot(wall()) + 1  # its gate is a slot away
        orders, readings = await trio.to_thread.run_sync(presign, msim, first)
        deadline = time.monotonic() + HAMMER_SECONDS
        open_slot = node.schedule.open_slot(wall())
        manual = list(range(open_slot + 1, open_slot + 16))
        limiter = trio.CapacityLimiter(GET_CLIENTS + POST_CLIENTS)

        async def run(fn: Callable[..., Seen], *args: Any) -> None:
            results.append(await trio.to_thread.run_sync(fn, *args, limiter=limiter))

        with trio.fail_after(HAMMER_SECONDS + 20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed, node, orders, readings, wall,
                                   trio.current_time() + HAMMER_SECONDS)  # fmt: skip
                for i in range(GET_CLIENTS):
                    nursery.start_soon(run, get_client, port, ROUTES, deadline, i)
                for _ in range(POST_CLIENTS):
                    nursery.start_soon(run, post_client, port, manual, deadline)
        # still running and answering; the final answers agree with the ledger read directly
        with trio.fail_after(10):
            while True:
                # the store's applied index counts the entries that wrote no row, whose index
                # the ledger commits with the next one that does (LedgerStore.record_entry)
                index_before = await trio.to_thread.run_sync(node.store.applied_index)
                before, rows = await trio.to_thread.run_sync(
                    ledger_rows, node, sa.select(t.balances).order_by(t.balances.c.account,
                                                                      t.balances.c.asset))
                got = await trio.to_thread.run_sync(get_client, port, ("/balances", "/status"),
                                                    time.monotonic() + 5, 0, 2)  # fmt: skip
                after, _ = await trio.to_thread.run_sync(ledger_rows, node, sa.select(t.meta))
                index_after = await trio.to_thread.run_sync(node.store.applied_index)
                if before == after and index_before == index_after:
                    break  # nothing applied meanwhile: the answers must match the rows
                await trio.sleep(0.05)
        final.update(balances=rows, applied=after, store_applied=index_after, seen=got)
        _, final["trades"] = await trio.to_thread.run_sync(ledger_rows, node, sa.select(t.trades))
        _, final["orders"] = await trio.to_thread.run_sync(ledger_rows, node, sa.select(t.orders))
        final["counters"] = node.all_counters()
        final["rejections"] = dict(node.api.rejections)

    with trio.fail_after(HAMMER_SECONDS + 60):
        await run_until_stopped(node, body)

    seen_final: Seen = final["seen"]
    assert not seen_final.problems, seen_final.problems
    assert len(seen_final.status) == 1
    # /status agrees with the ledger: its applied index is the store's, of which the committed
    # copy may only lag behind entries that wrote no row
    assert seen_final.status[0]["applied"] == final["store_applied"]
    assert final["applied"] <= final["store_applied"]
    assert seen_final.balances == final["balances"] and final["balances"]
    problems = [p for s in results for p in s.problems]
    assert not problems, problems[:10]
    codes: defaultdict[str, list[int]] = defaultdict(list)
    for s in [*results, seen_final]:
        for route, got in s.codes.items():
            codes[route] += got
    assert set(codes) == {*{r.partition("?")[0] for r in ROUTES}, "POST /orders"}
    assert all(len(c) >= 10 for c in codes.values()), {r: len(c) for r, c in codes.items()}
    assert not [c for c in codes.values() for code in c if code >= 500]
    assert "handler_error" not in final["rejections"], final["rejections"]
    assert "connection_error" not in final["rejections"], final["rejections"]
    # one manual order per slot was accepted, however many clients raced for it
    won = [slot for s in results for slot, code in s.posted if code == 200]
    assert won and len(won) == len(set(won)), won
    statuses = [doc for s in results for doc in s.status]
    # every /status answer's ledger is the engine's exactly at its applied index
    wanted = {doc["applied"] for doc in statuses}
    truth = await trio.to_thread.run_sync(replay_log, node, wanted)
    torn = [(doc, truth[doc["applied"]]) for doc in statuses
            if {k: v for k, v in doc.items() if k != "applied"} != truth[doc["applied"]]]
    assert not torn, torn[:3]
    # what the API answered of immutable rows is what the ledger holds
    by_slot: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in final["orders"]:
        by_slot[row["slot"]].append(row)
    trades = {(r["slot"], r["position"]): r for r in final["trades"]}
    for s in results:
        for slot, rows in s.closed_orders.items():
            assert rows == sorted(by_slot[slot], key=lambda r: r["position"]), slot
        for key, row in s.trades.items():
            assert trades[key] == row, key
    settled: dict[int, dict[str, Any]] = {}
    for s in results:
        for slot, row in s.slots.items():
            assert settled.setdefault(slot, row) == row, (slot, row, settled[slot])
    assert settled, "no settled slot was ever answered"
    # the load really ran: big books cleared into trades, slots settled into blocks
    assert len(statuses) >= 20
    assert max(doc["height"] for doc in statuses) >= 2, statuses[-1]
    assert len(final["trades"]) > 50 and len(final["orders"]) > 500
