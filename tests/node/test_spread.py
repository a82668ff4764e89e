"""When households publish after a slot ends (node/daemon/spread.py): spread, in bounds, stable."""

from __future__ import annotations

import statistics

from hypothesis import given
from hypothesis import strategies as st

from market.schedule import Schedule
from market.signing import Signer
from node.daemon.spread import (
    ORDER_MIN_LEAD_SECONDS,
    order_slot_at,
    publication_times,
    spread_fraction,
)

SCHEDULES = (Schedule(30, 6, 9), Schedule(10, 2, 3), Schedule(900, 300, 120))


def test_fractions_are_stable_and_spread_over_households() -> None:
    dids = [Signer.from_seed(bytes([i]) * 32).did for i in range(200)]
    fractions = [spread_fraction(d) for d in dids]
    assert fractions == [spread_fraction(d) for d in dids]
    assert all(0 <= f < 1 for f in fractions)
    # uniform enough that no tenth of the window holds more than twice its share
    deciles = [sum(1 for f in fractions if k / 10 <= f < (k + 1) / 10) for k in range(10)]
    assert max(deciles) <= 40 and min(deciles) >= 5
    assert 0.4 < statistics.mean(fractions) < 0.6


@given(
    slot=st.integers(2, 3600),
    lead_share=st.floats(0, 0.9),
    delay_share=st.floats(0, 0.9),
    read_delay=st.floats(0, 2),
    fraction=st.floats(0, 1, exclude_max=True),
)
def test_reading_comes_first_within_a_quarter_of_the_settle_delay_order_before_its_gate(
    slot: int, lead_share: float, delay_share: float, read_delay: float, fraction: float
) -> None:
    sch = Schedule(slot, int(slot * lead_share), int(slot * delay_share))
    end = sch.end(100)
    p = publication_times(sch, end, read_delay, fraction)
    first = end + read_delay
    assert first <= p.reading_at <= first + sch.settle_delay_seconds / 4
    assert p.order_slot == sch.open_slot(first)
    assert p.order_at >= first
    if p.order_at > first:  # spread: after the readings and the settlement, before the gate
        assert p.order_at >= end + 1.25 * sch.settle_delay_seconds
        assert p.order_at < sch.gate_time(p.order_slot)
        assert p.order_at - end <= 1.25 * sch.settle_delay_seconds + slot / 4


def test_the_bench_and_production_schedules() -> None:
    """30 s slots (the node bench): readings over 2.25 s, orders from 11.25 s over 6.375 s, as
    long again before the gate; 15-minute slots: readings over 30 s, orders 2.5-6.25 minutes
    after the slot end."""
    bench, _, production = SCHEDULES
    end = bench.end(7)
    early, late = (publication_times(bench, end, 0.5, f) for f in (0.0, 0.999999))
    assert (early.reading_at - end, early.order_at - end) == (0.5, 11.25)
    assert round(late.reading_at - end, 3) == 2.75 and round(late.order_at - end, 3) == 17.625
    assert round(bench.gate_time(late.order_slot) - late.order_at, 3) == 6.375
    end = production.end(7)
    late = publication_times(production, end, 0.5, 0.999999)
    assert round(late.reading_at - end, 3) == 30.5
    assert 150 <= late.order_at - end <= 375


def test_not_spread_publishes_both_right_after_the_read() -> None:
    for sch in SCHEDULES:
        end = sch.end(3)
        p = publication_times(sch, end, 0.5, 0.7, spread=False)
        assert p.reading_at == p.order_at == end + 0.5


@given(slot=st.integers(2, 3600), lead_share=st.floats(0, 0.9), t=st.floats(0, 10**6))
def test_an_order_outside_the_spread_goes_where_its_gate_is_still_far_enough(
    slot: int, lead_share: float, t: float
) -> None:
    """At start-up the agent orders for the open slot unless its gate closes within
    ORDER_MIN_LEAD_SECONDS (a quarter slot for short slots): then for the next one."""
    sch = Schedule(slot, int(slot * lead_share), 1)
    chosen = order_slot_at(sch, t)
    lead = min(ORDER_MIN_LEAD_SECONDS, slot / 4)
    assert chosen in (sch.open_slot(t), sch.open_slot(t) + 1)
    assert sch.gate_time(chosen) - t >= lead
    if chosen != sch.open_slot(t):
        assert sch.gate_time(sch.open_slot(t)) - t < lead


def test_an_order_placed_just_before_a_gate_goes_to_the_next_slot() -> None:
    """The demo's 8 s slots (gate 1 s before the start): started 0.4 s before slot 11's gate,
    the first order is for slot 12; started 2.5 s before it, for slot 11."""
    sch = Schedule(8, 1, 3)
    gate = sch.gate_time(11)
    assert sch.open_slot(gate - 0.4) == 11 and order_slot_at(sch, gate - 0.4) == 12
    assert order_slot_at(sch, gate - 2.5) == 11
