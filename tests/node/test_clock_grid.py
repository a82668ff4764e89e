"""Clock discipline on a grid (issue 16): three voter household nodes in one trio loop (real
libp2p on 127.0.0.1, the meter simulator over Modbus TCP, SQLite stores, the HTTP API).

One follower runs 120 s behind (the test-only ``clock_offset_seconds``): it finds itself skewed
and says so in ``/status`` and the metrics, and the others refuse its orders (their slots' gates
closed long ago by the grid's clocks). Then the leader's clock jumps 120 s ahead: it notices at
once (its samples are carried forward by its own clock's step), closes no gate early (every
``CloseGate`` applied on the honest follower is at or after the gate time by the honest clock),
alerts, and hands leadership to the honest follower; the grid keeps settling.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from market.models import Order, Side
from meter.sim.server import MeterSimulator
from node.agent.trader import NONCE_MANUAL, NONCES_PER_SLOT
from node.daemon.household_node import HouseholdNode
from node.net.wire import TopicKind
from tests.node.test_censorship import _grid, _statuses, meters
from tests.node.test_household import metric, scrape

__all__ = ["meters"]  # the fixture, re-used

SKEW = 120.0
MAX_SKEW = 0.5


async def _clock_grid(tmp_path: Path, sim: MeterSimulator) -> tuple[list[HouseholdNode],
                                                                   dict[int, float]]:  # fmt: skip
    """The censorship test's three voters, re-built with clock settings: node 2 behind by
    ``SKEW`` (config), nodes 0 and 1 with a shift the test can change."""
    base = await _grid(tmp_path, sim)
    shifts = {0: 0.0, 1: 0.0}
    nodes = []
    for i, node in enumerate(base):
        config = node.config.__class__(**{
            **node.config.__dict__, "clock_max_skew_seconds": MAX_SKEW,
            "clock_sample_seconds": 2.0, "clock_offset_seconds": -SKEW if i == 2 else 0.0,
        })  # fmt: skip
        node.store.close()
        node.raft_storage.close()
        node.reader.close()
        clock = (lambda i=i: time.time() + shifts[i]) if i in shifts else time.time
        nodes.append(HouseholdNode(config, node.identity, node.genesis, wall_clock=clock))
    return nodes, shifts


def _leader(docs: list[dict[str, Any]]) -> str | None:
    leaders = {d["raft"]["leader"] for d in docs}
    return leaders.pop() if len(leaders) == 1 else None


@pytest.mark.slow
async def test_a_skewed_leader_closes_no_gate_early_and_hands_over(
    tmp_path: Path, meters: MeterSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    nodes, shifts = await _clock_grid(tmp_path, meters)
    caplog.set_level(logging.INFO, logger="node.daemon.consensus")
    cleared: dict[int, float] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            try:
                await _scenario(nodes, shifts, cleared)
            finally:
                for node in nodes:
                    node.stop()
    events = {getattr(r, "event", "") for r in caplog.records}
    assert {"clock_skewed", "clock_transfer", "peer_clock_off"} <= events, events


async def _scenario(nodes: list[HouseholdNode], shifts: dict[int, float],
                    cleared: dict[int, float]) -> None:  # fmt: skip
    behind = nodes[2]
    started = trio.current_time()

    def record_clearings(honest: HouseholdNode) -> None:
        for slot, times in list(honest.slot_times.items()):
            if "cleared_at" in times:
                cleared.setdefault(slot, times["cleared_at"])

    # the grid runs (a leader with an honest clock, a settled slot), and the follower behind
    # knows it is skewed
    while True:
        docs = await _statuses(nodes)
        leader = _leader(docs)
        if (leader in (nodes[0].identity.did, nodes[1].identity.did)
                and docs[0]["ledger"]["settled_through"] is not None
                and docs[2]["clock"]["skewed"]):  # fmt: skip
            break
        assert trio.current_time() - started < 30, docs
        await trio.sleep(0.2)
    b = docs[2]["clock"]
    assert b["offset"] == pytest.approx(-SKEW, abs=0.5) and b["peers_sampled"] == 2
    assert docs[0]["clock"]["skewed"] is False and docs[1]["clock"]["skewed"] is False
    assert docs[0]["clock"]["disagreeing"] == [behind.identity.did]
    text = await trio.to_thread.run_sync(scrape, behind.config.metrics_port)
    assert metric(text, "microgrid_clock_skewed") == 1
    assert metric(text, "microgrid_clock_offset_seconds") == pytest.approx(-SKEW, abs=0.5)
    # the follower behind: its readings are for slots long gone by the grid's clocks (the
    # engine refuses them: settled, or older than the first gate the grid closed), and an order
    # for its open slot, whose gate closed long ago by the others' clocks, is refused by their
    # gossip validation
    while not behind.counters["own_rejected"]:
        assert trio.current_time() - started < 40, behind.all_counters()
        await trio.sleep(0.2)
    counters = behind.all_counters()
    late = ("engine_rejected_slot_settled", "engine_rejected_slot_not_closed")
    assert sum(counters.get(k, 0) for k in late) >= 1, counters
    slot = behind.schedule.open_slot(behind.wall_clock())
    order = Order(grid=behind.genesis.grid, nonce=slot * NONCES_PER_SLOT + NONCE_MANUAL,
                  id="late", household=behind.identity.did, side=Side.SELL, slot=slot,
                  quantity_wh=100, price=10).signed_by(behind.identity.signer)  # fmt: skip
    await behind.net.publish(TopicKind.ORDERS, [order])  # its own clock says the gate is open
    while not all(n.net.validator.rejected.get("slot_closed") for n in nodes[:2]):
        assert trio.current_time() - started < 40, [dict(n.net.validator.rejected)
                                                     for n in nodes[:2]]  # fmt: skip
        await trio.sleep(0.1)
    # the leader's clock jumps two minutes ahead
    old = next(i for i in (0, 1) if nodes[i].identity.did == leader)
    honest = nodes[1 - old]
    record_clearings(honest)
    shifts[old] = SKEW
    jumped = trio.current_time()
    while True:
        record_clearings(honest)
        docs = await _statuses(nodes)
        if _leader(docs) == honest.identity.did and docs[old]["clock"]["skewed"]:
            break
        assert trio.current_time() - jumped < 15, [d["raft"] for d in docs]
        await trio.sleep(0.1)
    moved = trio.current_time()
    assert docs[old]["clock"]["transfers"] >= 1
    assert docs[old]["clock"]["offset"] == pytest.approx(SKEW, abs=0.5)
    # the honest node sees the jump at its next sample of the old leader (every ~2 s)
    expected = sorted([nodes[old].identity.did, behind.identity.did])
    while sorted((await _statuses([honest]))[0]["clock"]["disagreeing"]) != expected:
        record_clearings(honest)
        assert trio.current_time() - moved < 8, "the honest node did not see the jump"
        await trio.sleep(0.2)
    print(f"leader handed over {moved - jumped:.1f} s after its clock jumped")
    # the grid keeps closing and settling slots under the new leader
    settled = docs[1 - old]["ledger"]["settled_through"]
    while (await _statuses([honest]))[0]["ledger"]["settled_through"] < settled + 2:
        record_clearings(honest)
        assert trio.current_time() - moved < 15, "no settlement after the handover"
        await trio.sleep(0.2)
    record_clearings(honest)
    # no gate was closed early by the honest clock, before or after the jump
    schedule = honest.schedule
    assert cleared
    early = {slot: schedule.gate_time(slot) - at for slot, at in cleared.items()
             if at < schedule.gate_time(slot)}  # fmt: skip
    assert not early, early
    assert all(d["clock"]["early_gate_closures"] == 0 for d in docs), [d["clock"] for d in docs]
    text = await trio.to_thread.run_sync(scrape, nodes[old].config.metrics_port)
    assert metric(text, "microgrid_clock_skewed") == 1
    assert metric(text, "microgrid_clock_transfers_total") >= 1
