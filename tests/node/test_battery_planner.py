"""The battery planner (node/agent/battery.py): limits always hold, it charges on cheap and
discharges on dear, and the agent's per-slot bookkeeping feeds the trader's orders."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market import MarketConfig, Side
from market.schedule import Schedule
from market.settlement import Tariffs
from market.signing import Signer
from meter.battery import BatteryStatus
from node.agent.battery import (
    BatteryAgent,
    BatteryState,
    SlotOutlook,
    expected_local_price,
    plan_battery,
    slot_prices,
)
from node.agent.trader import Trader
from node.setup.config import ConfigError, load_config

BAND = Tariffs(8, 30)


@st.composite
def batteries(draw: st.DrawFn) -> BatteryState:
    lo = draw(st.integers(0, 5000))
    hi = draw(st.integers(lo + 1, lo + 20_000))
    soc = draw(st.integers(0, hi + 3000))
    return BatteryState(soc, lo, hi, draw(st.integers(0, 6000)), draw(st.integers(0, 6000)),
                        draw(st.integers(300, 1000)))  # fmt: skip


@st.composite
def outlooks(draw: st.DrawFn) -> list[SlotOutlook]:
    n = draw(st.integers(1, 10))
    out = []
    for i in range(n):
        buy = draw(st.integers(0, 80))
        out.append(SlotOutlook(100 + i, draw(st.integers(-8000, 8000)), buy,
                               draw(st.integers(0, buy))))  # fmt: skip
    return out


def idle_value(outlook: list[SlotOutlook], soc: int, terminal: int) -> int:
    return sum(o.net_export_wh * (o.sell_price if o.net_export_wh >= 0 else o.buy_price)
               for o in outlook) + soc * terminal  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(battery=batteries(), outlook=outlooks(), levels=st.integers(1, 30))
def test_a_plan_never_exceeds_the_limits(battery: BatteryState, outlook: list[SlotOutlook],
                                         levels: int) -> None:  # fmt: skip
    """Random batteries (also outside their bounds), forecasts and prices: every step within
    the charge/discharge limits, the state of charge within [floor, ceiling] (or moving only
    towards them), steps consistent with the efficiency, and never worse than doing nothing."""
    plan = plan_battery(battery, outlook, levels=levels)
    assert [s.slot for s in plan.steps] == [o.slot for o in outlook]
    lo = min(battery.soc_wh, battery.soc_min_wh)
    hi = max(battery.soc_wh, battery.soc_max_wh)
    soc = battery.soc_wh
    for step, o in zip(plan.steps, outlook, strict=True):
        assert -battery.max_discharge_wh <= step.battery_wh <= battery.max_charge_wh
        assert lo <= step.soc_wh <= hi
        if soc >= battery.soc_min_wh:
            assert step.soc_wh >= battery.soc_min_wh
        if soc <= battery.soc_max_wh:
            assert step.soc_wh <= battery.soc_max_wh
        d = step.soc_wh - soc
        if d > 0:
            assert step.battery_wh == battery.charge_input_wh(d)
            assert step.soc_wh <= battery.soc_max_wh
        else:
            assert step.battery_wh == d
            if d < 0:
                assert step.soc_wh >= battery.soc_min_wh
        assert step.net_export_wh == o.net_export_wh - step.battery_wh
        soc = step.soc_wh
    assert plan.value >= idle_value(outlook, battery.soc_wh, min(o.sell_price for o in outlook))


def test_it_charges_on_cheap_and_discharges_on_dear() -> None:
    """Cheap local surplus for four slots, then neighbours pay 40: it fills up while cheap (as
    fast as it can) and empties into the dear slots."""
    battery = BatteryState(soc_wh=1000, soc_min_wh=1000, soc_max_wh=9000, max_charge_wh=1000,
                           max_discharge_wh=1000, efficiency_permille=900)  # fmt: skip
    cheap = [SlotOutlook(s, -200, 12, 12) for s in range(4)]
    dear = [SlotOutlook(s, -200, 40, 40) for s in range(4, 12)]
    plan = plan_battery(battery, cheap + dear)
    charged = [s.battery_wh for s in plan.steps[:4]]
    assert all(b > 800 for b in charged), charged  # buying to charge
    assert all(s.net_export_wh < -800 for s in plan.steps[:4])
    discharged = [s.battery_wh for s in plan.steps[4:]]
    assert sum(discharged) < -3000 and all(b <= 0 for b in discharged)
    assert any(s.net_export_wh > 0 for s in plan.steps[4:])  # offering to the neighbours
    assert plan.steps[-1].soc_wh == 1000


def test_flat_prices_do_not_cycle_the_battery() -> None:
    """With the same price everywhere the round-trip loss makes any cycle a loss: it idles."""
    battery = BatteryState(5000, 1000, 9000, 1000, 1000, 900)
    plan = plan_battery(battery, [SlotOutlook(s, -300 + 100 * s, 20, 20) for s in range(8)])
    assert all(s.battery_wh == 0 for s in plan.steps)


def test_a_full_battery_sells_when_neighbours_pay_more_than_the_feed_in() -> None:
    battery = BatteryState(9000, 1000, 9000, 1000, 1000, 900)
    outlook = [SlotOutlook(s, 0, *slot_prices(BAND, 19)) for s in range(4)]
    plan = plan_battery(battery, outlook, terminal_price=BAND.feed_in)
    assert all(s.battery_wh == -1000 and s.net_export_wh == 1000 for s in plan.steps)


def test_prices_follow_the_band_and_the_fees() -> None:
    assert slot_prices(BAND, None) == (30, 8)
    assert slot_prices(Tariffs(8, 30, local_fee=2, grid_fee=5), None) == (35, 8)
    assert slot_prices(Tariffs(8, 30, local_fee=2, grid_fee=5), 19) == (21, 19)
    assert slot_prices(BAND, 5) == (5, 5)  # sell never above buy
    recent = [(19, BAND), (13, BAND), (25, BAND)]
    assert expected_local_price(recent, BAND) == 19
    peak = Tariffs(8, 60)  # the same position in a dearer band (a rules change ahead)
    assert expected_local_price(recent, peak) == 8 + (52 * 11) // 22
    assert expected_local_price([], BAND) is None


def status(soc_permille: int) -> BatteryStatus:
    return BatteryStatus("b", "BAT1", 10_000, soc_permille, 100, 950, 4000, 4000, 0, False, 0.0)


def test_the_agent_commits_what_it_ordered_and_sets_it_when_the_slot_comes() -> None:
    """At a boundary it plans from the order slot on and commits the first step; when that slot
    starts delivering, the setpoint is that energy (cut to what the battery can do then)."""
    agent = BatteryAgent(slot_seconds=900, efficiency_permille=900, horizon_slots=8)
    for slot in range(10):
        agent.observe_clearing(slot, 19, 500, BAND)
    dear = Tariffs(8, 60)

    def band(slot: int) -> Tariffs:
        return BAND if slot < 14 else dear

    first = agent.decide(status(200), delivering=11, order_slot=12, forecast=lambda s: -300,
                         band=band)  # fmt: skip
    assert first.setpoint_wh is None  # nothing committed for slot 11: self-consumption
    assert first.battery_wh is not None and first.battery_wh > 0  # charge before the peak
    assert agent.order_energy(12).battery_wh == first.battery_wh
    second = agent.decide(status(250), 12, 13, lambda s: -300, band)
    assert second.setpoint_wh == first.battery_wh
    assert agent.setpoint_w(second.setpoint_wh) == second.setpoint_wh * 4
    later = agent.decide(status(900), 14, 15, lambda s: -300, band)
    assert later.battery_wh is not None and later.battery_wh < 0  # sell into the peak
    assert agent.battery_energy(11) == -(-500 * 1000 // 900)  # 20 % -> 25 % of 10 kWh
    assert agent.battery_energy(12) is None  # slot 13 was not read


def test_the_order_covers_the_forecast_minus_the_battery() -> None:
    operator = Signer.from_seed(b"o" * 32)
    market = MarketConfig(grid="g", operator=operator.did, feed_in_tariff=8, retail_price=30)
    trader = Trader(Signer.from_seed(b"h" * 32), market, Schedule(900, 300, 120), "s")
    trader.forecaster.observe(5, -300)
    bid = trader.order_for(7, band=BAND, battery_wh=1000)
    assert bid is not None and bid.side == Side.BUY and bid.quantity_wh == 1300
    trader.forecaster.observe(6, 200)
    offer = trader.order_for(8, band=BAND, battery_wh=-1000)
    assert offer is not None and offer.side == Side.SELL
    assert offer.quantity_wh == int((200 + 1000) * Fraction(4, 5))


def test_battery_config_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "microgrid.toml"
    good = ('[[batteries]]\nname = "battery"\nendpoint = "tcp://127.0.0.1:5020"\n'
            "device_id = 101\nefficiency_permille = 920\nhorizon_slots = 8\n"
            "slot_seconds = 900\n")  # fmt: skip
    path.write_text(good)
    (b,) = load_config(path, {}).batteries
    assert (b.device_id, b.efficiency_permille, b.horizon_slots, b.slot_seconds) == (
        101,
        920,
        8,
        900.0,
    )
    for bad in ("efficiency_permille = 0", "efficiency_permille = 1001", "horizon_slots = 1000",
                'levels = "many"', "device_id = 300", "colour = 1", "slot_seconds = 0",
                "max_power_w = -1"):  # fmt: skip
        path.write_text('[[batteries]]\nname = "b"\nendpoint = "tcp://127.0.0.1:5020"\n'
                        + bad + "\n")  # fmt: skip
        with pytest.raises(ConfigError, match="batteries"):
            load_config(path, {})
    path.write_text(good + good.replace('"battery"', '"second"'))
    with pytest.raises(ConfigError, match="at most one"):
        load_config(path, {})
