"""End to end: a demo microgrid of household processes, meters to ledgers.

Every household is its own ``microgrid node run`` process (real libp2p on 127.0.0.1, real
Modbus TCP to the meter simulator, SQLite ledgers). The claims checked against what the
processes wrote, not against what they report about themselves:

- households trade with each other; every ledger verifies and all head hashes are equal;
- money and energy are conserved (every asset's balances sum to zero, trades balance);
- each settled slot's metered energy is what the simulator's meters counted in that slot;
- a killed leader is replaced, rounds go on, and the restarted node catches up to the same
  head; a killed and restarted learner catches up too.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from sqlalchemy import create_engine, func, select

from market.accounting import ENERGY, household_account
from node.ledger import schema as t
from node.tools.demo import Demo, DemoHousehold, DemoSettings, fetch

pytestmark = pytest.mark.slow

SLOT_SECONDS = 8
STARTUP_TIMEOUT = 90
"""Five processes importing libp2p on two cores, then mesh formation and a first election."""


@asynccontextmanager
async def running_demo(tmp_path: Path, households: int = 5, *, run: int | None = None,
                       **settings: Any) -> AsyncIterator[Demo]:  # fmt: skip
    """A started demo; stopped (and its simulator closed) on the way out. ``run``: start only
    the first ``run`` households' nodes (the adversary tests hold the others' keys)."""
    lines: list[str] = []
    demo = Demo(
        DemoSettings(households=households, slot_seconds=SLOT_SECONDS, dashboard=False,
                     directory=tmp_path / "demo", **settings),
        out=lines.append,
    )  # fmt: skip
    try:
        async with demo.running(run, quiesce_timeout=3 * SLOT_SECONDS):
            yield demo
    finally:
        demo.close()


def rows(url: str, table: Any) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(table)))
    finally:
        engine.dispose()


def truth(demo: Demo) -> dict[tuple[int, str], tuple[float, float]]:
    """(slot, household DID) -> the simulator's (import, export) counters at the slot's end."""
    did_of = {h.device_id: h.did for h in demo.households}
    out = {}
    for line in demo.truth_path.read_text().splitlines():
        r = json.loads(line)
        out[(r["slot"], did_of[r["device_id"]])] = (r["import_wh"], r["export_wh"])
    return out


def check_conservation(url: str) -> None:
    """Double entry: every asset's balances sum to zero; sold equals bought in every slot."""
    sums: dict[str, int] = defaultdict(int)
    for r in rows(url, t.balances):
        sums[r.asset] += r.amount
    assert sums and all(v == 0 for v in sums.values()), dict(sums)
    sold: dict[int, int] = defaultdict(int)
    bought: dict[int, int] = defaultdict(int)
    for s in rows(url, t.settlements):
        sold[s.slot] += s.sold_wh
        bought[s.slot] += s.bought_wh
    assert sold == bought
    traded: dict[int, int] = defaultdict(int)
    for tr in rows(url, t.trades):
        traded[tr.slot] += tr.quantity_wh
    settled_slots = {b.slot for b in rows(url, t.blocks)}
    assert {s: v for s, v in traded.items() if s in settled_slots and v} == {
        s: v for s, v in sold.items() if v
    }


def check_energy_against_meters(demo: Demo, url: str) -> int:
    """Each reading is the simulator's counter at its slot's end, and each measured settlement
    is the counters' difference across the slot; returns how many settlements were checked."""
    counters = truth(demo)
    resolution = 2  # Wh: float32 kWh registers near 5 MWh round to ~0.5 Wh, twice per delta
    for r in rows(url, t.readings):
        imp, exp = counters[(r.slot, r.household)]
        assert abs(r.import_wh - imp) <= 1 and abs(r.export_wh - exp) <= 1, (r, imp, exp)
    checked = 0
    for s in rows(url, t.settlements):
        if not s.measured:
            continue
        (i1, e1) = counters[(s.slot, s.household)]
        (i0, e0) = counters[(s.slot - 1, s.household)]
        assert abs(s.import_wh - (i1 - i0)) <= resolution, (s, i1 - i0)
        assert abs(s.export_wh - (e1 - e0)) <= resolution, (s, e1 - e0)
        checked += 1
    return checked


def check_settled_energy_follows_the_meters(demo: Demo, url: str) -> dict[str, int]:
    """Every household's settled energy equals what its meter counted between its first and
    last readings in the ledger, exactly, whatever readings are missing (node stopped, ...);
    and those readings are the simulator's counters. Returns the unmeasured slots trued up per
    household."""
    counters = truth(demo)
    readings: dict[str, list[Any]] = defaultdict(list)
    for r in sorted(rows(url, t.readings), key=lambda r: r.slot):
        readings[r.household].append(r)
        imp, exp = counters[(r.slot, r.household)]
        assert abs(r.import_wh - imp) <= 1 and abs(r.export_wh - exp) <= 1, (r, imp, exp)
    energy = {r.account: r.amount for r in rows(url, t.balances) if r.asset == ENERGY}
    unmeasured: dict[str, int] = defaultdict(int)
    for s in rows(url, t.settlements):
        unmeasured[s.household] += not s.measured
    for h in demo.households:
        mine = readings[h.did]
        first, last = mine[0], mine[-1]
        counted = (last.import_wh - first.import_wh) - (last.export_wh - first.export_wh)
        assert energy.get(household_account(h.did), 0) == counted, (h.name, counted)
    return dict(unmeasured)


def check_spread_publications(demo: Demo) -> None:
    """Each household gossiped its readings and orders at its own offset after the slot end
    (node/daemon/spread.py), read from the ``published`` events in its log: never before its
    time, at most a loaded machine's delay after it."""
    sch = demo.schedule
    late = 1.5  # five node processes and the test on two cores
    for h, times in zip(demo.households, demo.publications(0), strict=True):
        events = [json.loads(line) for line in (h.directory / "node.log").read_text().splitlines()
                  if '"event": "published"' in line]  # fmt: skip
        offsets: dict[str, list[float]] = {"reading": [], "order": []}
        for e in events:
            at = dt.datetime.fromisoformat(e["ts"]).timestamp()
            offsets[e["kind"]].append(at - sch.start(sch.slot_at(at)))
        offsets["order"] = offsets["order"][1:]  # the first: placed at start-up, not at a slot end
        assert len(offsets["reading"]) >= 3 and len(offsets["order"]) >= 3, (h.name, offsets)
        expect = {"reading": times.reading_at - sch.end(0), "order": times.order_at - sch.end(0)}
        assert expect["order"] > expect["reading"] + 2  # the order waits for the settlement
        for kind, seen in offsets.items():
            assert all(expect[kind] - 0.05 <= x <= expect[kind] + late for x in seen), (
                h.name, kind, expect[kind], seen)  # fmt: skip


async def check_record_gossip(demo: Demo) -> None:
    """The voters receive everyone's records on gossip; the learners none: they publish their
    own and get the rest in the committed log (docs/network.md, "Who gossips records"). That
    every household's readings reach the ledgers is checked by the caller."""
    for h in demo.households:
        doc = await fetch(h.api + "/status")
        assert doc is not None, h.name
        voter = doc["raft"]["role"] != "learner"
        heard = sum(v for k, v in doc["counters"].items() if k.startswith("gossip_"))
        assert doc["connectivity"]["record_gossip"] is voter, (h.name, doc["raft"]["role"])
        assert (heard > 0) is voter, (h.name, doc["raft"]["role"], doc["counters"])


def check_all_ledgers(demo: Demo) -> None:
    verdict = demo.verdict()
    assert verdict.ok, verdict.message
    for h in demo.households:
        check_conservation(h.ledger_url)


def height_of(docs: dict[str, dict[str, Any]], name: str) -> int:
    return int(docs[name]["ledger"]["height"])


async def test_households_trade_and_every_ledger_agrees_with_the_meters(tmp_path: Path) -> None:
    """Five household processes settle several rounds: trades between households, identical
    verified ledgers, conserved money and energy, settlements equal to the meters' counts."""
    async with running_demo(tmp_path) as demo:
        await demo.wait_rounds(5, timeout=STARTUP_TIMEOUT + 8 * SLOT_SECONDS)
        await check_record_gossip(demo)
        status = await microgrid_status(demo.households[-1])
        assert status.returncode == 0, status.stderr
        text = status.stdout.decode()
        assert "raft      learner term" in text and "peers     4/4 connected" in text, text
        assert "reading   slot" in text, text
        assert re.search(r"account   money [+-]\d+\.\d\d, energy [+-][\d,]+ Wh", text), text
        # that line's source: only this household's account, which five settled rounds of
        # metered energy have moved (the full /balances has the grid's and market's too)
        me = demo.households[-1]
        mine = await fetch(me.api + "/balances?household=me")
        everyone = await fetch(me.api + "/balances", token=demo.token)
        assert mine is not None and everyone is not None
        assert await fetch(me.api + "/balances") is None  # other households' rows: token only
        assert mine["balances"] and {r["account"] for r in mine["balances"]} == {
            household_account(me.did)
        }, mine
        assert {r["account"] for r in everyone["balances"]} > {household_account(me.did)}
    # SIGTERM is a clean shutdown: every node exits 0
    assert [h.process.returncode for h in demo.households if h.process] == [0] * 5
    stopped = await microgrid_status(demo.households[-1])
    assert stopped.returncode == 1 and b"cannot reach the node" in stopped.stderr
    check_all_ledgers(demo)
    url = demo.households[0].ledger_url
    trades = rows(url, t.trades)
    assert any(tr.buyer != tr.seller for tr in trades), "no trade between households"
    assert len({tr.seller for tr in trades} | {tr.buyer for tr in trades}) >= 2
    measured = check_energy_against_meters(demo, url)
    assert measured >= 3 * len(demo.households), measured
    check_spread_publications(demo)
    engine = create_engine(url)
    with engine.connect() as conn:
        readers = conn.execute(select(func.count(func.distinct(t.readings.c.household))))
        assert readers.scalar_one() == len(demo.households)
    engine.dispose()


async def microgrid_status(h: DemoHousehold) -> Any:
    """``microgrid status --config`` of one household, as a user runs it."""
    return await trio.run_process(
        [sys.executable, "-m", "node.cli", "status", "--config", str(h.config_path)],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip


def by_name(demo: Demo, name: str) -> DemoHousehold:
    return next(h for h in demo.households if h.name == name)


async def test_killed_leader_is_replaced_and_killed_nodes_catch_up(tmp_path: Path) -> None:
    """SIGKILL the leader: another voter leads, rounds continue, and the restarted node reaches
    the same head hash; then the same for a learner."""
    async with running_demo(tmp_path) as demo:
        await demo.wait_rounds(2, timeout=STARTUP_TIMEOUT + 4 * SLOT_SECONDS)
        docs = await demo.statuses()
        leader = by_name(demo, demo.leader_name(docs))
        assert leader.index < demo.settings.voters
        before = max(height_of(docs, n) for n in docs)
        demo.kill(leader)

        def new_leader(d: dict[str, dict[str, Any]]) -> bool:
            live = [doc for name, doc in d.items() if name != leader.name]
            return bool(live) and all(
                doc["raft"]["leader"] not in (None, leader.did) for doc in live
            )

        await demo.wait_until(new_leader, timeout=10 * SLOT_SECONDS)
        await demo.wait_until(
            lambda d: min(height_of(d, n) for n in d if n != leader.name) >= before + 2,
            timeout=8 * SLOT_SECONDS,
        )
        await demo.start_node(leader)
        await demo.wait_until(lambda d: _caught_up(d, len(demo.households)),
                              timeout=STARTUP_TIMEOUT)  # fmt: skip

        learner = demo.households[demo.settings.voters]  # voters come first
        docs = await demo.statuses()
        assert docs[learner.name]["raft"]["role"] == "learner"
        before = height_of(docs, learner.name)
        demo.kill(learner)
        await demo.wait_until(lambda d: min(height_of(d, n) for n in d) >= before + 1,
                              timeout=6 * SLOT_SECONDS)  # fmt: skip
        await demo.start_node(learner)
        await demo.wait_until(
            lambda d: _caught_up(d, len(demo.households))
            and height_of(d, learner.name) >= before + 2,
            timeout=STARTUP_TIMEOUT,
        )
        assert leader.starts == 2 and learner.starts == 2
    check_all_ledgers(demo)
    check_energy_against_meters(demo, demo.households[0].ledger_url)
    # the killed nodes missed readings: the next one trued their meters' movement up
    for h in demo.households:
        unmeasured = check_settled_energy_follows_the_meters(demo, h.ledger_url)
        assert unmeasured[learner.did] >= 2, unmeasured  # its first slot, and the ones it missed
        true_ups = {x.ref for x in rows(h.ledger_url, t.transactions) if x.kind == "true_up"}
        assert {leader.did, learner.did} <= true_ups, true_ups


def _caught_up(docs: dict[str, dict[str, Any]], count: int) -> bool:
    """Every node answers and all have the same height and head hash."""
    heads = {(d["ledger"]["height"], d["ledger"]["head_hash"]) for d in docs.values()}
    return len(docs) == count and len(heads) == 1


async def test_learner_behind_a_compacted_log_installs_a_snapshot_and_syncs_its_blocks(
    tmp_path: Path,
) -> None:
    """A learner that was down while the leader compacted its log past the learner's position
    catches up through a Raft snapshot, then fetches the blocks it missed from its peers:
    its ledger ends complete, verifying, with the same head as everyone's."""
    async with running_demo(tmp_path, raft_snapshot_entries=6) as demo:
        await demo.wait_rounds(2, timeout=STARTUP_TIMEOUT + 4 * SLOT_SECONDS)
        learner = demo.households[-1]
        docs = await demo.statuses()
        before = height_of(docs, learner.name)
        demo.kill(learner)

        def compacted_twice(d: dict[str, dict[str, Any]]) -> bool:
            """Every live node compacted its log twice since the kill: past the learner."""
            return all(doc["driver"]["snapshots"] >= start[n] + 2
                       for n, doc in d.items() if n != learner.name)  # fmt: skip

        start = {n: doc["driver"]["snapshots"] for n, doc in docs.items()}
        await demo.wait_until(
            lambda d: compacted_twice(d) and min(height_of(d, n) for n in d) >= before + 3,
            timeout=12 * SLOT_SECONDS,
        )
        await demo.start_node(learner)
        await demo.wait_until(
            lambda d: _caught_up(d, len(demo.households))
            and not d[learner.name]["block_sync"]["missing"],
            timeout=STARTUP_TIMEOUT,
        )
    check_all_ledgers(demo)
    # not only the blocks: every gate closure the learner skipped (clearing, book, trades) is
    # in its ledger too, from the chunks or the snapshot's closed books
    ref = demo.households[0].ledger_url
    closed = min(max(r.slot for r in rows(u, t.clearings)) for u in (ref, learner.ledger_url))
    for table in (t.clearings, t.orders, t.trades):
        theirs, its = (sorted(tuple(r) for r in rows(u, table) if r.slot <= closed)
                       for u in (ref, learner.ledger_url))  # fmt: skip
        assert its == theirs, table.name
    events = [json.loads(line) for line in (learner.directory / "node.log").read_text()
              .splitlines() if line.startswith("{")]  # fmt: skip
    assert any(e.get("event") == "blocks_synced" for e in events), "no block sync happened"
