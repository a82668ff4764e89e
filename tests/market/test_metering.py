"""Metering integrity: every Wh a meter counted is settled exactly once, and silence never pays.

Properties over random grids, trades and patterns of withheld, late, duplicated and rejected
readings (docs/ledger.md, "Unmeasured slots"):

- conservation: each household's settled energy equals its counters' movement between its first
  and last accepted readings, exactly; money sums to zero;
- withholding never pays: the same run with every reading sent leaves each household at least
  as well off as any run in which it withheld, delayed or spoilt readings;
- a grid created before the rule (``rules = 1``) keeps settling as it did.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from market import Event, MeterReading, Rejected, RejectReason, SlotSettled, State, apply
from market.accounting import ENERGY, GRID, MONEY, household_account
from market.settlement import UNMEASURED_SLOT_FEE
from market.snapshot import dump_state, load_state
from market.state import sell_limit_wh
from tests.market.world import World

HOUSE_NAMES = ("ann", "bob", "cat", "dan", "eve")


@dataclass(frozen=True)
class Plan:
    """A random grid's run: per household and slot, the meter's movement, an order and what
    happens to the slot's reading."""

    homes: tuple[str, ...]
    slots: int
    moves: dict[tuple[str, int], tuple[int, int]]
    """(home, slot) -> (import Wh, export Wh) the meter counted during the slot."""
    orders: dict[tuple[str, int], tuple[str, int, int]]
    """(home, slot) -> (side, quantity Wh, price)."""
    fate: dict[tuple[str, int], str]
    """(home, slot) -> sent | withheld | late | duplicated | spoilt."""


FATES = ("sent", "withheld", "late", "duplicated", "spoilt", "restart")
"""What happens to a slot's reading. ``restart``: the meter's registers restart from zero during
the slot (a reset), and its reading is sent."""


def make_plan(rng: random.Random, homes: int, slots: int, honest: bool = False) -> Plan:
    """A random run; ``honest`` sends every reading."""
    names = HOUSE_NAMES[:homes]
    moves, orders, fate = {}, {}, {}
    for h in names:
        for s in range(1, slots + 1):
            moves[h, s] = (rng.randrange(0, 1500), rng.randrange(0, 1500))
            if rng.random() < 0.7:
                side = rng.choice(("buy", "sell"))
                orders[h, s] = (side, rng.randrange(1, 1200), rng.randrange(8, 33))
            fate[h, s] = "sent" if honest else rng.choice(FATES)
    return Plan(names, slots, moves, orders, fate)


def with_fates(plan: Plan, fate: dict[tuple[str, int], str]) -> Plan:
    return Plan(plan.homes, plan.slots, plan.moves, plan.orders, fate)


@dataclass
class Outcome:
    world: World
    settled: list[SlotSettled]
    accepted: dict[str, list[MeterReading]]
    rejected: list[Rejected]
    log: list[object]
    """Every command applied, in order (the replicated log)."""


def run(plan: Plan, rules: int = 2, max_silent_slots: int = 10_000) -> Outcome:
    """Drive the engine through ``plan``: orders, gate, readings, settlement for each slot."""
    w = World(rules=rules, max_silent_slots=max_silent_slots)
    out = Outcome(w, [], {h: [] for h in plan.homes}, [], [])
    apply_one = w.apply

    def logged(command: object) -> list[Event]:
        out.log.append(command)
        return apply_one(command)

    w.apply = logged  # type: ignore[method-assign]
    for h in plan.homes:
        w.register(h)
    counters = {h: [1000, 1000] for h in plan.homes}  # the meters' registers
    late: list[MeterReading] = []

    def send(reading: MeterReading, home: str) -> None:
        for e in w.apply(reading):
            if isinstance(e, Rejected):
                out.rejected.append(e)
            else:
                out.accepted[home].append(reading)

    for s in range(1, plan.slots + 1):
        for h in plan.homes:
            if (h, s) in plan.orders:
                side, qty, price = plan.orders[h, s]
                for e in w.apply(w.order(h, side, qty, price, slot=s)):
                    assert not isinstance(e, Rejected), e
        w.close(s)
        for reading, home in late:  # a delayed reading arrives after its slot settled
            send(reading, home)
        late = []
        for h in plan.homes:
            imp, exp = plan.moves[h, s]
            fate = plan.fate[h, s]
            if fate == "restart":
                counters[h] = [0, 0]
            counters[h][0] += imp
            counters[h][1] += exp
            reading = w.reading(h, s, counters[h][0], counters[h][1])
            if fate in ("sent", "duplicated", "restart"):
                send(reading, h)
            if fate == "duplicated":
                send(w.reading(h, s, counters[h][0], counters[h][1]), h)
            elif fate == "spoilt":  # a counter that went backwards: rejected, never settled
                send(w.reading(h, s, max(counters[h][0] - 5000, 0), counters[h][1]), h)
            elif fate == "late":
                late.append((reading, h))
        out.settled += [e for e in w.settle(s) if isinstance(e, SlotSettled)]
    return out


def energy_balance(w: World, home: str) -> int:
    """Energy the household's account received (import) minus what it gave (export), in Wh."""
    return w.state.balances.get((household_account(w.homes[home].did), ENERGY), 0)


def money(w: World, home: str) -> int:
    return w.state.balances.get((household_account(w.homes[home].did), MONEY), 0)


def trades(out: Outcome) -> list[tuple[str, str, int, int, int, int]]:
    return [
        (t.buyer, t.seller, t.slot, t.quantity_wh, t.price, t.sell_price)
        for e in out.settled
        for t in e.trades
    ]


def counted(readings: list[MeterReading]) -> int:
    """Import minus export the meter counted between its first and last accepted readings; a
    restart (both counters below the previous reading's) counts from zero, and what the meter
    counted between the previous reading and the restart is unknown (estimated as zero)."""
    moved = 0
    for prev, cur in itertools.pairwise(readings):
        if cur.import_wh < prev.import_wh and cur.export_wh < prev.export_wh:
            moved += cur.import_wh - cur.export_wh
        else:
            moved += (cur.import_wh - prev.import_wh) - (cur.export_wh - prev.export_wh)
    return moved


def check_conservation(out: Outcome) -> None:
    w = out.world
    for h, readings in out.accepted.items():
        moved = counted(sorted(readings, key=lambda r: r.slot))
        assert energy_balance(w, h) == moved, (h, [(r.slot, r.import_wh) for r in readings])
    assert sum(v for (_, asset), v in w.state.balances.items() if asset == MONEY) == 0
    assert sum(v for (_, asset), v in w.state.balances.items() if asset == ENERGY) == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(2, 12), st.randoms(use_true_random=False))
def test_settled_energy_equals_counter_movement_for_any_pattern_of_readings(
    homes: int, slots: int, rng: random.Random
) -> None:
    out = run(make_plan(rng, homes, slots))
    check_conservation(out)
    assert {e.reason for e in out.rejected} <= {
        RejectReason.SLOT_SETTLED,  # late
        RejectReason.DUPLICATE_READING,
        RejectReason.COUNTER_REGRESSION,  # spoilt
        RejectReason.REPLAYED_NONCE,
    }


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(2, 12), st.randoms(use_true_random=False))
def test_withholding_or_delaying_a_reading_never_pays(
    homes: int, slots: int, rng: random.Random
) -> None:
    honest = make_plan(rng, homes, slots, honest=True)
    sender = run(honest)
    cheat = rng.choice(honest.homes)
    fate = dict(honest.fate)
    # The first reading is the meter's baseline in both runs, and the last one is sent: the
    # gap closes within the run. (Before a household's first reading nothing is measured.)
    # (a restart is the meter's doing, not the household's: test_a_meter_restart_... below)
    for s in range(2, slots):
        fate[cheat, s] = rng.choice([f for f in FATES if f != "restart"])
    cheater = run(with_fates(honest, fate))
    # the same trades were made (readings do not move the clearing; ids carry nonces) ...
    assert trades(sender) == trades(cheater)
    # ... the same energy settled, and the cheat never ends with more money
    assert energy_balance(sender.world, cheat) == energy_balance(cheater.world, cheat)
    assert money(cheater.world, cheat) <= money(sender.world, cheat)
    check_conservation(cheater)


def test_a_withheld_reading_is_trued_up_at_grid_prices_by_the_next_one() -> None:
    w = World()
    w.register("a")
    w.register("b")
    w.close(1)
    w.ok(w.reading("a", 1, 0, 0))
    w.settle(1)
    for s in (2, 3, 4):  # a withholds two readings; each slot settles unmeasured
        w.ok(w.order("b", "sell", 1000, 20, slot=s + 1))
        w.ok(w.order("a", "buy", 1000, 20, slot=s + 1))
        w.close(s)
        if s == 4:
            w.ok(w.reading("a", 4, 3000, 100))  # 3 kWh imported, 0.1 kWh exported since slot 1
        (ev,) = [e for e in w.settle(s) if isinstance(e, SlotSettled)]
    mine = {x.household: x for x in ev.settlements}[w.homes["a"].did]
    assert (mine.measured, mine.gap_slots, mine.gap_import_wh, mine.gap_export_wh) == (
        False,
        3,
        3000,
        100,
    )
    (true_up,) = [t for t in ev.transactions if t.kind == "true_up"]
    account = household_account(w.homes["a"].did)
    legs: dict[tuple[str, str], int] = {}
    for p in true_up.postings:
        legs[p.account, p.asset] = legs.get((p.account, p.asset), 0) + p.amount
    assert legs[account, ENERGY] == 3000 - 100 and legs[GRID, ENERGY] == -2900
    # 3 kWh at 32 - 0.1 kWh at 8 = 95.2, plus 1 per unmeasured slot: 98.2, rounded against
    # the household: 99
    assert UNMEASURED_SLOT_FEE == 1
    assert legs[account, MONEY] == -99
    assert legs[GRID, MONEY] == 99


def test_a_grid_created_before_the_rule_keeps_its_settlement() -> None:
    """rules 1 (a genesis without the field) leaves a gap's movement unsettled, as it did."""
    rng = random.Random(5)
    honest = make_plan(rng, 3, 8, honest=True)
    fate = {**honest.fate, **{("ann", s): "withheld" for s in range(2, 8, 2)}}
    old = run(with_fates(honest, fate), rules=1)
    assert all(s.gap_slots == 0 for e in old.settled for s in e.settlements)
    assert not any(t.kind == "true_up" for e in old.settled for t in e.transactions)
    new = run(with_fates(honest, fate), rules=2)
    check_conservation(new)
    assert energy_balance(old.world, "ann") != energy_balance(new.world, "ann")


def test_a_silent_meter_stops_trading_until_it_reports_again() -> None:
    w = World(max_silent_slots=2)
    w.register("a")
    w.register("b")
    w.close(1)
    w.ok(w.reading("a", 1, 0, 0))
    w.settle(1)
    for s in (2, 3):
        w.close(s)
        w.settle(s)
    assert w.state.reputation[w.homes["a"].did].silent_slots == 2
    refused = w.rejected(w.order("a", "sell", 500, 10, slot=5))
    assert refused.reason == RejectReason.METER_SILENT
    assert "2 settled slots" in refused.detail
    w.close(4)
    w.ok(w.reading("a", 4, 100, 900))  # the meter reports again: trading resumes at once
    assert w.state.reputation[w.homes["a"].did].silent_slots == 0
    w.ok(w.order("a", "sell", 500, 10, slot=5))
    (ev,) = [e for e in w.settle(4) if isinstance(e, SlotSettled)]
    mine = {x.household: x for x in ev.settlements}[w.homes["a"].did]
    assert (mine.gap_slots, mine.gap_import_wh, mine.gap_export_wh) == (3, 100, 900)


def test_the_silent_count_survives_a_snapshot() -> None:
    w = World(max_silent_slots=3)
    w.register("a")
    for s in (1, 2):
        w.close(s)
        w.settle(s)
    restored = load_state(dump_state(w.state))
    assert restored.reputation[w.homes["a"].did].silent_slots == 2
    assert dump_state(restored) == dump_state(w.state)


def test_withholding_cannot_gain_the_rounding_of_per_slot_settlement() -> None:
    """16 Wh per slot at 32 per kWh is 0.512 minor units: sent slot by slot, each rounds up to 1
    (3 in all); withheld over 3 slots the exact 1.536 would round to 2. The fee per unmeasured
    slot closes that gap."""
    moves = {("ann", s): (16, 0) for s in range(1, 5)} | {("bob", s): (0, 0) for s in range(1, 5)}
    sent = Plan(("ann", "bob"), 4, moves, {}, {k: "sent" for k in moves})
    withheld = with_fates(sent, {**sent.fate, ("ann", 2): "withheld", ("ann", 3): "withheld"})
    honest, cheat = run(sent), run(withheld)
    assert money(honest.world, "ann") == -3
    assert money(cheat.world, "ann") == -5  # 1.536 + 3 x 1 fee = 4.536, rounded against ann
    assert energy_balance(honest.world, "ann") == energy_balance(cheat.world, "ann") == 48


def test_a_meter_restart_rebases_the_household_instead_of_leaving_it_unmeasured() -> None:
    """Registers back to zero (the simulator's counter_reset fault): the first reading after it
    is accepted as a restart and trued up from zero; the slots after it are measured again."""
    w = World()
    w.register("a")
    for s, (imp, exp) in enumerate([(50_000, 7_000), (50_400, 7_000)], start=1):
        w.close(s)
        w.ok(w.reading("a", s, imp, exp))
        w.settle(s)
    w.close(3)
    w.ok(w.reading("a", 3, 300, 20))  # reset during slot 3: counted 300/20 since
    (ev,) = [e for e in w.settle(3) if isinstance(e, SlotSettled)]
    (mine,) = ev.settlements
    assert (mine.measured, mine.gap_slots, mine.gap_import_wh, mine.gap_export_wh) == (
        False, 1, 300, 20,
    )  # fmt: skip
    w.close(4)
    w.ok(w.reading("a", 4, 700, 20))
    (ev,) = [e for e in w.settle(4) if isinstance(e, SlotSettled)]
    (mine,) = ev.settlements
    assert (mine.measured, mine.import_wh, mine.gap_slots) == (True, 400, 0)
    assert energy_balance(w, "a") == 400 + (300 - 20) + 400


def test_a_counter_fault_is_not_a_restart() -> None:
    """One counter below the settled reading, or counters higher than the meter could have
    counted from zero since, are faults: refused, never settled."""
    w = World()
    w.register("a")
    w.close(1)
    w.ok(w.reading("a", 1, 50_000, 7_000))
    w.settle(1)
    w.close(2)
    assert w.rejected(w.reading("a", 2, 100, 7_500)).reason == RejectReason.COUNTER_REGRESSION
    assert w.rejected(w.reading("a", 2, 40_000, 6_000)).reason == (
        RejectReason.COUNTER_REGRESSION  # both below, but 40 kWh in one slot at 50 kW: no
    )
    w.ok(w.reading("a", 2, 100, 50))  # a restart
    assert w.rejected(w.reading("a", 3, 90, 50)).reason == RejectReason.SLOT_NOT_CLOSED
    w.close(3)
    # the pending restart is the baseline now: below it is a regression, the old epoch is gone
    assert w.rejected(w.reading("a", 3, 90, 60)).reason == RejectReason.COUNTER_REGRESSION
    w.ok(w.reading("a", 3, 150, 60))


def test_a_grid_under_the_first_rules_refuses_a_restart() -> None:
    w = World(rules=1)
    w.register("a")
    w.close(1)
    w.ok(w.reading("a", 1, 50_000, 7_000))
    w.settle(1)
    w.close(2)
    assert w.rejected(w.reading("a", 2, 100, 50)).reason == RejectReason.COUNTER_REGRESSION


def test_what_a_household_may_offer_follows_what_it_delivered() -> None:
    """A newcomer may offer what its meter can export in a slot; a seller that does not deliver
    sees that shrink with its recent record, down to the floor; delivering restores it."""
    w = World()
    a = w.register("a")
    w.register("b")
    capacity = 50_000 * 900 // 3600 + 100  # 50 kW for 15 minutes, plus the reading slack
    assert sell_limit_wh(w.state, a.did) == capacity
    refused = w.rejected(w.order("a", "sell", capacity + 1, 10, slot=1))
    assert refused.reason == RejectReason.OVER_SELL_LIMIT and f"{capacity} Wh" in refused.detail
    w.ok(w.order("a", "sell", capacity - 1000, 10, slot=1))
    assert w.rejected(w.order("a", "sell", 1001, 10, slot=1)).reason == (
        RejectReason.OVER_SELL_LIMIT  # the slot's offers together
    )
    exported = 0
    limits = []
    for s in range(1, 12):
        if s > 1:  # 1 kWh: under the floor, so always accepted
            w.ok(w.order("a", "sell", 1000, 10, slot=s))
        w.ok(w.order("b", "buy", 1000, 20, slot=s))
        w.close(s)
        exported += 1000 if s >= 6 else 0  # a sells but exports nothing, then delivers
        w.ok(w.reading("a", s, 0, exported))
        w.ok(w.reading("b", s, 1000 * s, 0))
        w.settle(s)
        limits.append(sell_limit_wh(w.state, a.did))
    floor = capacity * w.config.sell_floor_permille // 1000
    # slot 1 was its first reading (nothing measured), slots 2-5 delivered nothing: the floor
    assert limits[:5] == [floor] * 5
    assert floor < limits[5] < limits[6] < limits[-1] < capacity  # it delivers: recovering
    rep = w.state.reputation[a.did]
    assert rep.recent_score_permille * capacity // 1000 == limits[-1]
    restored = load_state(dump_state(w.state))
    assert restored.reputation[a.did] == rep


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 4), st.integers(3, 10), st.randoms(use_true_random=False))
def test_the_metering_rules_replay_identically_and_through_a_snapshot(
    homes: int, slots: int, rng: random.Random
) -> None:
    """True-ups, restarts, silence and sell limits are deterministic: the same commands give
    byte-identical blocks, also when a replica continues from an engine snapshot mid-run."""
    plan = make_plan(rng, homes, slots)
    first, second = run(plan), run(plan)
    assert [e.block.hash for e in first.settled] == [e.block.hash for e in second.settled]
    assert dump_state(first.world.state) == dump_state(second.world.state)
    # a replica that installs a snapshot taken halfway continues to the same state
    cut = rng.randrange(len(first.log))
    state = State.initial(first.world.config)
    for command in first.log[:cut]:
        state, _ = apply(state, command)  # type: ignore[arg-type]
    state = load_state(dump_state(state))
    for command in first.log[cut:]:
        state, _ = apply(state, command)  # type: ignore[arg-type]
    assert dump_state(state) == dump_state(first.world.state)
