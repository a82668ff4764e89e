"""Censorship detection (issue 16).

The pure :class:`~node.daemon.censorship.CensorshipWatch` and
:class:`~node.daemon.censorship.DistrustPolicy`, scripted slot by slot; then a grid of three
household nodes in one trio loop (real libp2p on 127.0.0.1, the meter simulator over Modbus TCP,
SQLite stores, the HTTP API) whose leader is patched to drop one household's records: the alert
shows on that household's node and on the others' ``/status``, the voters distrust the leader,
leadership moves, and the household's records are committed again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import trio

from market import CloseGate, SettleSlot
from market.models import CancelOrder, MemberRole, MeterReading, Order, Side
from market.schedule import Schedule
from market.signing import Signer
from market.state import MarketConfig
from meter.reader import MeterConfig, MeterReader
from meter.sim.household import make_households
from meter.sim.server import MeterSimulator
from meter.transport import TcpEndpoint
from node.daemon.censorship import (
    CensorshipWatch,
    Deadline,
    DistrustPolicy,
    Sighting,
    proposal_grace,
    sighting,
)
from node.daemon.household_node import HouseholdNode
from node.setup.config import MeterSetting, NodeConfig
from node.setup.genesis import create_genesis
from node.setup.keyfile import create_key_file
from node.tools.ports import free_ports
from tests.node.test_household import call, metric, scrape

A, B, C, OP = "did:test:a", "did:test:b", "did:test:c", "did:test:operator"
LEADER = "did:test:b"


class Script:
    """Drives a watch the way a node does: at each slot boundary ``end_slot``; during the slot
    every household's order for the next slot and reading of the last one are seen, the leader
    commits those of the households it serves, then closes the next gate and settles the last
    slot (its system commands come after the records, as the proposer batches them)."""

    def __init__(self, watch: CensorshipWatch, households: tuple[str, ...] = (A, B, C)) -> None:
        self.watch = watch
        self.households = households
        self.watch.leader_changed(LEADER)

    @staticmethod
    def order(h: str, slot: int, seen: int | None = None, timely: bool = True) -> Sighting:
        return Sighting(("order", h, 4 * slot), h, "order", slot - 1 if seen is None else seen,
                        Deadline("gate", slot), timely)  # fmt: skip

    @staticmethod
    def reading(h: str, slot: int, timely: bool = True) -> Sighting:
        return Sighting(("reading", h, 4 * slot + 1), h, "reading", slot + 1,
                        Deadline("settle", slot), timely)  # fmt: skip

    def slot(self, k: int, drop: set[str] = frozenset(), drop_classes: set[str] = frozenset(),
             late: set[str] = frozenset()):  # fmt: skip
        """Run slot ``k``; returns the report of its boundary. ``drop``: households whose
        records the leader drops (``drop_classes`` of them only, when given); ``late``:
        households whose order it proposes only after the gate closed."""
        report = self.watch.end_slot(k)
        sightings = [s for h in self.households
                     for s in (self.order(h, k + 1), self.reading(h, k - 1))]  # fmt: skip
        for s in sightings:
            self.watch.seen(s)
        for s in sightings:
            dropped = s.household in drop and (not drop_classes or s.cls in drop_classes)
            if not dropped and not (s.household in late and s.cls == "order"):
                self.watch.committed(s.key)
        self.watch.on_command(CloseGate(slot=k + 1))
        self.watch.on_command(SettleSlot(slot=k - 1))
        for s in sightings:
            if s.household in late and s.cls == "order":
                self.watch.committed(s.key)  # the engine refuses it: gate_closed
        return report


def test_a_household_whose_records_are_dropped_is_suspected_while_others_are_served() -> None:
    """From slot 10 on the leader drops A's records: A is suspected at the boundary N = 3
    slots after its first dropped record was seen, on its own node too, once per episode; the
    leader is named."""
    watch = CensorshipWatch(A)
    script = Script(watch)
    for k in range(5, 10):
        assert not script.slot(k).suspected
    reports = {k: script.slot(k, drop={A}) for k in range(10, 16)}
    assert not any(reports[k].suspected for k in (10, 11, 12))
    first = reports[13]
    assert [s.household for s in first.suspected] == [A] and first.new_alerts == (A,)
    (a,) = first.suspected
    assert a.oldest_age_slots == 3 and a.since_slot == 13 and set(a.classes) == {"order", "reading"}
    assert first.suspected_leader == LEADER and first.own_suspected
    assert first.own_uncommitted == a.uncommitted > 0
    later = reports[15]
    assert later.suspected[0].since_slot == 13 and later.new_alerts == ()  # one episode
    assert later.counters["alerts"] == 1 and later.counters["missed"] > 0
    doc = later.to_json()
    assert doc["suspected_leader"] == LEADER and doc["own"]["suspected"] is True
    assert doc["suspected"][0]["household"] == A
    # on another household's node: the same alert, not its own
    other = CensorshipWatch(B)
    script = Script(other)
    for k in range(10, 14):
        report = script.slot(k, drop={A})
    assert [s.household for s in report.suspected] == [A] and not report.own_suspected


def test_the_memory_of_committed_records_lasts_retain_slots_however_long_the_grid_runs() -> None:
    """Committed record keys are remembered only for ``retain_slots`` boundaries (a late copy
    is refused as expired by its deadline by then), so the watch's memory levels off: 3
    households, 2 records each per slot, 16 slots retained, after 500 slots."""
    watch = CensorshipWatch(A, retain_slots=16)
    script = Script(watch)
    for k in range(10, 510):
        report = script.slot(k)
        assert not report.suspected, k
    assert len(watch._committed) <= 2 * 3 * 17
    # a copy of a record committed long ago is not tracked again: its deadline has passed
    assert not watch.seen(script.order(B, 12))
    assert watch.report.tracked == 0


def test_a_stalled_grid_or_a_partitioned_node_accuses_no_one() -> None:
    """Nothing commits for anyone (no leader progress, or this node cut off): records age, but
    no one is suspected, since no other household is being served either; they age out."""
    watch = CensorshipWatch(A, retain_slots=8)
    script = Script(watch)
    script.slot(9)  # everyone served once
    for k in range(10, 30):
        report = watch.end_slot(k)
        for h in (A, B, C):
            watch.seen(script.order(h, k + 1))
        assert not report.suspected, k
    assert report.counters["aged_out"] > 0
    assert report.tracked <= 3 * 9  # bounded by retain_slots


def test_a_leader_cannot_censor_by_committing_after_the_deadline() -> None:
    """A's orders are committed, but only after their gate closed (the engine refuses them):
    they were missed, and stay missed; A is suspected."""
    watch = CensorshipWatch(B)
    script = Script(watch)
    for k in range(10, 15):
        report = script.slot(k, late={A})
    assert [s.household for s in report.suspected] == [A]
    assert report.suspected[0].classes == ("order",)
    assert report.counters["committed_late"] > 0


def test_a_record_seen_too_late_to_be_proposed_expires_without_an_alert() -> None:
    """A household whose orders reach this node only after the gate's deadline minus the
    grace (too late for any leader) is not suspected: they expire when the gate is applied."""
    watch = CensorshipWatch(B)
    script = Script(watch)
    for k in range(10, 18):
        report = watch.end_slot(k)
        for h in (A, B, C):
            s = script.order(h, k + 1, timely=h != A)
            watch.seen(s)
            if h != A:
                watch.committed(s.key)
        watch.on_command(CloseGate(slot=k + 1))
        assert not report.suspected
    assert watch.counters["expired_late"] == 8 and watch.counters["missed"] == 0
    # a copy gossiped after its gate was applied is not tracked at all
    assert not watch.seen(script.order(A, 12, seen=17))


def test_sightings_know_deadlines_and_the_grace() -> None:
    """Orders are due at their gate, readings at settlement, cancellations have no deadline;
    a record is timely until its deadline minus the grace."""
    schedule = Schedule(slot_seconds=10, gate_lead_seconds=2, settle_delay_seconds=2)
    assert proposal_grace(schedule) == 1.0
    assert proposal_grace(Schedule()) == 2.0  # at most 2 s
    order = Order(grid="g", nonce=20, id="o1", household=A, side=Side.BUY, slot=5,
                  quantity_wh=100, price=10)  # fmt: skip
    gate = schedule.gate_time(5)
    s = sighting(order, gate - 1.0, schedule)
    assert s.key == ("order", A, 20) and s.household == A and s.cls == "order"
    assert s.deadline == Deadline("gate", 5) and s.timely and s.slot == schedule.slot_at(gate - 1)
    assert not sighting(order, gate - 0.9, schedule).timely
    reading = MeterReading(grid="g", nonce=21, household=A, meter_serial="M", slot=5,
                           import_wh=1, export_wh=0)  # fmt: skip
    r = sighting(reading, schedule.end(5) + 0.5, schedule)
    assert r.deadline == Deadline("settle", 5) and r.cls == "reading" and r.timely
    cancel = CancelOrder(grid="g", nonce=22, household=A, order_id="o1")
    assert sighting(cancel, 1e9, schedule).deadline is None
    assert sighting(cancel, 1e9, schedule).timely


def test_one_missed_record_is_cleared_by_the_next_one_committed() -> None:
    """One of A's readings misses settlement (a glitch); the next ones commit: no alert."""
    watch = CensorshipWatch(B)
    script = Script(watch)
    script.slot(10, drop={A}, drop_classes={"reading"})
    for k in range(11, 18):
        report = script.slot(k)
        assert not report.suspected
    assert report.counters["missed"] == 1


def test_dropping_only_one_class_of_a_households_records_is_detected() -> None:
    """The leader commits A's readings but drops its orders: A is suspected for its orders."""
    watch = CensorshipWatch(C)
    script = Script(watch)
    for k in range(10, 14):
        report = script.slot(k, drop={A}, drop_classes={"order"})
    assert [(s.household, s.classes) for s in report.suspected] == [(A, ("order",))]


def test_a_new_leader_starts_with_a_clean_record() -> None:
    """After a leader change the missed records are forgiven and ages restart: the alert clears
    (reported once), and comes back only if the new leader drops A's records for N slots."""
    watch = CensorshipWatch(A)
    script = Script(watch)
    for k in range(10, 14):
        report = script.slot(k, drop={A})
    assert report.own_suspected
    watch.leader_changed("did:test:new-leader")
    report = script.slot(14)
    assert not report.suspected and report.cleared == (A,)
    assert report.counters["forgiven"] > 0 and report.leader_since == 13
    for k in range(15, 18):
        assert not script.slot(k).suspected
    for k in range(18, 22):
        report = script.slot(k, drop={A})
    assert report.own_suspected and report.suspected_leader == "did:test:new-leader"


def test_memory_is_bounded_per_household_and_in_all() -> None:
    """A flood of one household's records keeps at most ``max_per_household`` of them (oldest
    dropped, counted); all households together at most ``max_records``; committed keys at
    most ``max_committed``."""
    watch = CensorshipWatch(B, max_per_household=10, max_records=25, max_committed=5)
    watch.end_slot(1)
    for n in range(100):
        watch.seen(Sighting(("order", A, n), A, "order", 1, None, True))
    assert sum(t.household == A for t in watch.pending.values()) == 10
    assert min(k[2] for k in watch.pending) == 90  # the newest kept
    for h in ("b", "c", "d"):
        for n in range(10):
            watch.seen(Sighting(("order", h, n), h, "order", 1, None, True))
    assert len(watch.pending) + len(watch.missed) == 25
    assert watch.counters["dropped"] == 90 + 15
    for n in range(20):
        watch.committed(("order", "x", n))
    assert len(watch._committed) == 5


def test_a_snapshot_install_forgets_what_was_uncommitted() -> None:
    """Commands inside an installed snapshot are never seen one by one: the uncommitted records
    are forgotten (counted as unknown), and records for closed gates are not tracked after."""
    watch = CensorshipWatch(B)
    script = Script(watch)
    for k in range(10, 13):
        script.slot(k, drop={A})
    tracked = len(watch.pending) + len(watch.missed)
    watch.snapshot_installed(closed_through=20, settled_through=18)
    assert not watch.pending and not watch.missed
    assert watch.counters["unknown"] == tracked
    assert not watch.seen(script.order(A, 20, seen=19))
    assert not watch.end_slot(21).suspected


def test_distrust_policy_needs_persistence_a_voter_and_respects_the_bound() -> None:
    """The same leader suspected at M = 2 more boundaries after the first; never when leading,
    never by a learner, never itself; then at most once per K = 8 slots."""
    p = DistrustPolicy()

    def decide(slot: int, leader: str | None, leading: bool = False, voter: bool = True):
        return p.decide(slot, leader, me=A, leading=leading, voter=voter)

    assert decide(10, LEADER) is None and decide(11, LEADER) is None
    assert decide(12, LEADER, voter=False) is None
    assert decide(12, LEADER, leading=True) is None
    assert decide(12, LEADER) == LEADER and p.count == 1 and p.last_slot == 12
    assert decide(13, LEADER) is None  # the bound: once per 8 slots
    assert decide(14, C) is None and decide(16, C) is None  # persistent, but too soon
    assert decide(20, C) == C and p.count == 2
    assert decide(21, None) is None and decide(22, C) is None  # the streak restarts
    assert decide(30, A) is None  # never itself
    q = DistrustPolicy()
    assert q.decide(1, LEADER, me=A, leading=False, voter=True) is None
    assert q.decide(2, C, me=A, leading=False, voter=True) is None  # another leader: restart
    assert q.decide(3, C, me=A, leading=False, voter=True) is None
    assert q.decide(4, C, me=A, leading=False, voter=True) == C


# -- a grid whose leader censors one household -------------------------------------------------

SLOT_SECONDS = 3


@pytest.fixture
def meters() -> Iterator[MeterSimulator]:
    sim = MeterSimulator(make_households(3, seed=3), seed=3, speed=0, host="127.0.0.1", port=0,
                         start=dt.datetime(2025, 6, 21, 12, 0))  # fmt: skip
    sim.advance(60)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


async def _grid(tmp_path: Path, sim: MeterSimulator) -> list[HouseholdNode]:
    """Three voters on one meter simulator, dialling each other on 127.0.0.1."""
    endpoint = TcpEndpoint("127.0.0.1", sim.ports[0])
    configs = [sim.config(d) for d in sim.device_ids]
    reader = MeterReader([MeterConfig(f"m{c.device_id}", c.profile, endpoint, c.device_id)
                          for c in configs])  # fmt: skip
    try:
        with trio.fail_after(20):
            polled = await reader.poll_all()
    finally:
        reader.close()
    operator = Signer.from_seed(b"operator".ljust(32, b"."))
    ports = free_ports(9)
    identities = [create_key_file(tmp_path / f"h{i}.key") for i in range(3)]
    serials = []
    for c in configs:
        sample = polled[f"m{c.device_id}"].sample
        assert sample is not None
        serials.append(sample.serial)
    market = MarketConfig(grid="censored", operator=operator.did, feed_in_tariff=8,
                          retail_price=30, k=Fraction(1, 2))  # fmt: skip
    members = [(ident.did, serial, MemberRole.VOTER)
               for ident, serial in zip(identities, serials, strict=True)]  # fmt: skip
    genesis = create_genesis(
        operator, market, members,
        slot_seconds=SLOT_SECONDS, gate_closure_lead_seconds=1, settle_delay_seconds=1,
        bootstrap=[f"/ip4/127.0.0.1/tcp/{ports[2 * i]}/p2p/{ident.peer_id}"
                   for i, ident in enumerate(identities)],
    )  # fmt: skip
    nodes = []
    for i, (ident, c) in enumerate(zip(identities, configs, strict=True)):
        config = NodeConfig(
            key_path=tmp_path / f"h{i}.key", genesis_path=tmp_path / "genesis.json",
            data_dir=tmp_path / f"h{i}", listen=f"/ip4/127.0.0.1/tcp/{ports[2 * i]}",
            metrics_port=ports[6 + i], api_port=ports[2 * i + 1], api_token="token-0123456789",
            meter_poll_seconds=1.0, meter_time_scale=900 / SLOT_SECONDS, read_delay_seconds=0.2,
            raft_tick_seconds=0.05, raft_election_ticks=10, raft_heartbeat_ticks=2,
            meters=(MeterSetting("main", c.profile, endpoint, c.device_id),),
        )  # fmt: skip
        nodes.append(HouseholdNode(config, ident, genesis))
    return nodes


async def _statuses(nodes: list[HouseholdNode]) -> list[dict[str, Any]]:
    out = []
    for node in nodes:
        code, doc = await call(node, "GET", "/status")
        assert code == 200
        out.append(doc)
    return out


def _committed_slots(node: HouseholdNode, did: str) -> set[int]:
    """Slots whose reading of ``did`` the engine of ``node`` accepted (its published snapshot:
    the readings of slots not settled yet, and the last settled one)."""
    state = node.engine_snapshot().shadow
    slots = {slot for slot, readings in state.pending_readings.items() if did in readings}
    base = state.baselines.get(did)
    return slots | ({base.slot} if base is not None else set())


@pytest.mark.slow
async def test_a_leader_censoring_one_household_is_detected_and_replaced(
    tmp_path: Path, meters: MeterSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Three voters; once the grid settles, the leader's proposer is patched to drop every record
    of one follower household (the victim). Within N = 3 slots the victim's node and the third
    node report the victim in ``/status`` ``censorship`` (the victim's as its own) and log the
    alert; M = 2 slots later both distrust the leader, a majority: leadership moves to one of
    them, the old leader follows, and the victim's records are committed again (its readings
    reach the engine, the alert clears). Bounded: the whole test within 60 s."""
    nodes = await _grid(tmp_path, meters)
    caplog.set_level(logging.INFO, logger="node.daemon.consensus")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            try:
                await _censor_and_recover(nodes)
            finally:
                for node in nodes:
                    node.stop()
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "censorship_suspected"]
    assert warnings, "no alert was logged"
    assert any("this household's records" in r.getMessage() for r in warnings)
    assert any(getattr(r, "event", "") == "distrust" for r in caplog.records)


async def _censor_and_recover(nodes: list[HouseholdNode]) -> None:
    by_did = {n.identity.did: n for n in nodes}
    # a leader, and a settled slot: the grid runs
    while True:
        docs = await _statuses(nodes)
        leaders = {d["raft"]["leader"] for d in docs}
        settled = [d["ledger"]["settled_through"] for d in docs]
        if len(leaders) == 1 and None not in leaders and None not in settled:
            break
        await trio.sleep(0.2)
    (old,) = leaders
    # an honest grid raises no alert
    assert all(d["censorship"]["suspected"] == [] for d in docs), docs
    assert all(d["censorship"]["distrust"]["count"] == 0 for d in docs)
    leader = by_did[old]
    victim_node, third = [n for n in nodes if n.identity.did != old]
    victim = victim_node.identity.did
    real_next_batch = leader.proposer.next_batch

    def censoring(now: float, view: Any, term: int | None = None) -> list[Any]:
        return [c for c in real_next_batch(now, view, term)
                if getattr(c, "household", None) != victim]  # fmt: skip

    leader.proposer.next_batch = censoring  # type: ignore[method-assign]
    censored_at = trio.current_time()
    # the alert: on the victim's node (its own records) and on the third node
    while True:
        v, t = await _statuses([victim_node, third])
        if v["censorship"]["own"]["suspected"] and any(
            s["household"] == victim for s in t["censorship"]["suspected"]
        ):
            break
        assert trio.current_time() - censored_at < 8 * SLOT_SECONDS, "no alert"
        await trio.sleep(0.2)
    alert_at = trio.current_time()
    assert v["censorship"]["suspected_leader"] == old == t["censorship"]["suspected_leader"]
    assert not t["censorship"]["own"]["suspected"]
    # leadership moves away from the censoring leader, to one of the distrusting voters
    while True:
        docs = await _statuses(nodes)
        now_leaders = {d["raft"]["leader"] for d in docs}
        if len(now_leaders) == 1 and old not in now_leaders and None not in now_leaders:
            break
        assert trio.current_time() - censored_at < 12 * SLOT_SECONDS, "leadership stayed"
        await trio.sleep(0.2)
    moved_at = trio.current_time()
    print(f"alert after {alert_at - censored_at:.1f} s, leader moved after "
          f"{moved_at - censored_at:.1f} s (slots of {SLOT_SECONDS} s)")  # fmt: skip
    (new,) = now_leaders
    assert new in (victim, third.identity.did)
    distrusting = [d for d in docs if d["node"] != old]
    assert all(d["censorship"]["distrust"]["count"] == 1 for d in distrusting), distrusting
    # the victim's records are committed again: a reading of a slot after the move
    after = victim_node.schedule.slot_at(victim_node.wall_clock())
    while not any(s >= after for s in _committed_slots(third, victim)):
        assert trio.current_time() - moved_at < 4 * SLOT_SECONDS, "victim still censored"
        await trio.sleep(0.2)
    # and the alert clears on the victim's node
    while (await _statuses([victim_node]))[0]["censorship"]["own"]["suspected"]:
        assert trio.current_time() - moved_at < 4 * SLOT_SECONDS, "alert did not clear"
        await trio.sleep(0.2)
    text = await trio.to_thread.run_sync(scrape, victim_node.config.metrics_port)
    assert metric(text, "microgrid_censorship_alerts_total") >= 1
    assert metric(text, "microgrid_censorship_distrusts_total") == 1
    assert metric(text, "microgrid_censorship_own_suspected") == 0
