"""Battery-aware order prices (node/agent/battery.py, node/agent/strategy.py; issue 18).

A battery's discharge offer undercuts the neighbours' PV offers when that still pays and never
goes below its cost floor; its charge bid beats the feed-in tariff and stays under the retail
cap; nothing is offered or bid when it cannot pay. The engine-level tests sign the orders with
real :class:`Trader` s, feed them to the contract engine (``market.apply``) and show the
battery's planned discharge is matched ahead of PV offers at the price it would otherwise have
tied with.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market import CloseGate, MarketConfig, MemberRegistration, MemberRole, Order, Side, State
from market import apply as engine_apply
from market.events import GateClosed, Rejected
from market.schedule import Schedule
from market.settlement import Tariffs
from market.signing import Signer
from meter.battery import BatteryStatus
from node.agent.battery import (
    BatteryAgent,
    BatteryOrder,
    battery_bid_price,
    battery_offer_price,
)
from node.agent.strategy import Forecaster, Strategy, plan_battery_order
from node.agent.trader import Trader

BAND = Tariffs(8, 32)
CONFIG = MarketConfig(grid="g", operator="o", feed_in_tariff=8, retail_price=32)
COMPETING = Strategy().limits(CONFIG, BAND)[0]  # 14
MECHANISMS = ("uniform", "pay_as_bid", "mcafee")


def test_the_default_pv_offer_is_what_the_battery_competes_with() -> None:
    assert COMPETING == 8 + (32 - 8) // 4


@pytest.mark.parametrize("mechanism", ["uniform", "pay_as_bid"])
def test_a_profitable_discharge_undercuts_the_pv_offers(mechanism: str) -> None:
    assert battery_offer_price(9, 20, BAND, mechanism, COMPETING) == COMPETING - 1
    # a floor above the PV price: offered at the floor (it sells after the PV surplus)
    assert battery_offer_price(17, 20, BAND, mechanism, COMPETING) == 17
    # never above what a Wh is expected to earn
    assert battery_offer_price(9, 11, BAND, mechanism, COMPETING) == 11


def test_under_mcafee_the_discharge_asks_its_floor() -> None:
    assert battery_offer_price(9, 20, BAND, "mcafee", COMPETING) == 9
    assert battery_offer_price(17, 20, BAND, "mcafee", COMPETING) == 17


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_no_discharge_offer_when_it_cannot_pay(mechanism: str) -> None:
    assert battery_offer_price(21, 20, BAND, mechanism, COMPETING) is None
    assert battery_offer_price(33, 40, BAND, mechanism, COMPETING) is None  # above retail


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_charge_bid_beats_the_feed_in_tariff_under_the_retail_cap(mechanism: str) -> None:
    fees = Tariffs(8, 32, local_fee=3, grid_fee=1)
    for band in (BAND, fees):
        for cap in (9, 14, 20, 31, 60):
            price = battery_bid_price(cap, band, mechanism, COMPETING)
            assert price is not None
            assert band.feed_in < price <= min(cap, band.retail + band.grid_fee - band.local_fee)
    assert battery_bid_price(60, fees, "mcafee", COMPETING) == 32 + 1 - 3  # truthful: the cap
    assert battery_bid_price(20, BAND, "uniform", COMPETING) == COMPETING  # crosses the PV asks
    assert battery_bid_price(20, BAND, "pay_as_bid", COMPETING) == COMPETING


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_no_charge_bid_when_no_seller_would_take_it(mechanism: str) -> None:
    assert battery_bid_price(7, BAND, mechanism, COMPETING) is None
    # fees leave nothing under the feed-in tariff: local energy never pays
    assert battery_bid_price(40, Tariffs(8, 10, local_fee=5), mechanism, COMPETING) is None


@settings(max_examples=300, deadline=None)
@given(
    feed_in=st.integers(0, 40),
    width=st.integers(0, 60),
    floor=st.integers(0, 120),
    expected=st.integers(0, 120),
    competing=st.integers(0, 120),
    mechanism=st.sampled_from(MECHANISMS),
)
def test_offer_prices_stay_inside_the_band_and_above_the_floor(
    feed_in: int, width: int, floor: int, expected: int, competing: int, mechanism: str
) -> None:
    band = Tariffs(feed_in, feed_in + width)
    price = battery_offer_price(floor, expected, band, mechanism, competing)
    if price is None:
        assert floor > min(expected, band.retail)
        return
    assert max(floor, band.feed_in) <= price <= band.retail
    if mechanism == "mcafee":
        assert price == max(floor, band.feed_in)  # truthful
    elif floor < competing - 1 <= min(expected, band.retail):
        assert price == max(competing - 1, band.feed_in)  # undercuts the PV offers by one


def status(soc_permille: int) -> BatteryStatus:
    return BatteryStatus("b", "BAT1", 10_000, soc_permille, 100, 950, 4000, 4000, 0, False, 0.0)


def agent_with_history() -> BatteryAgent:
    agent = BatteryAgent(slot_seconds=900, efficiency_permille=900, horizon_slots=8)
    for slot in range(10):  # neighbours have been paying 14 (the PV offers' price)
        agent.observe_clearing(slot, 14, 500, BAND)
    return agent


def test_the_agent_prices_a_peak_discharge_and_a_cheap_charge() -> None:
    agent = agent_with_history()
    dear = Tariffs(8, 60)

    def band(slot: int) -> Tariffs:
        return BAND if slot < 14 else dear

    charge = agent.decide(status(200), delivering=11, order_slot=12, forecast=lambda s: -300,
                          band=band)  # fmt: skip
    assert charge.battery_wh is not None and charge.battery_wh > 0
    order = agent.order_energy(12)
    assert order.battery_wh == charge.battery_wh and order.offer_floor is None
    assert order.bid_cap is not None
    bid = battery_bid_price(order.bid_cap, BAND, "uniform", COMPETING)
    assert bid is not None and BAND.feed_in < bid <= BAND.retail
    # the slot's clearing says what the charge cost; the next boundary books it
    agent.observe_clearing(12, 14, 1000, BAND)
    agent.decide(status(250), 12, 13, lambda s: -300, band)
    agent.decide(status(340), 13, 14, lambda s: -300, band)
    assert agent.stored_cost > 0
    cost = agent.cost_floor()
    assert 0 < cost < 14 * 1000 // 900 + 2  # it paid ~14 + 0 fee for ~0.9 stored Wh per Wh
    later = agent.decide(status(900), 14, 15, lambda s: -300, band)
    assert later.battery_wh is not None and later.battery_wh < 0  # sell into the peak
    offer = agent.order_energy(15)
    assert offer.offer_floor is not None and offer.expected_sell is not None
    assert offer.offer_floor >= max(dear.feed_in, agent.cost_floor())
    assert offer.offer_floor <= offer.expected_sell


def test_a_discharge_that_cannot_cover_its_cost_is_kept() -> None:
    """Energy that cost more than neighbours are expected to pay is not exported: the agent
    commits the best plan that only covers the household's own deficit."""
    agent = agent_with_history()
    soc = status(900)
    agent.status = soc
    agent.stored_cost = 40 * soc.soc_wh  # it cost 40 per stored kWh
    peak = Tariffs(8, 34)
    decision = agent.decide(soc, 20, 21, lambda s: -300, lambda s: peak)
    assert decision.battery_wh is not None and decision.battery_wh >= -300
    order = agent.order_energy(21)
    assert order.offer_floor is None
    # the same battery with free energy does export into the neighbours' demand
    cheap = agent_with_history()
    decision = cheap.decide(soc, 20, 21, lambda s: -300, lambda s: peak)
    assert decision.battery_wh is not None and decision.battery_wh < -300
    assert cheap.order_energy(21).offer_floor is not None


def test_a_discharge_and_own_surplus_make_a_sell_curve() -> None:
    battery = BatteryOrder(5, -1000, offer_floor=9, expected_sell=20)
    plan = plan_battery_order(5, 500, battery, Strategy(), CONFIG)
    assert plan is not None and plan.side == Side.SELL
    # the stored energy in full, one unit under the PV price; the own surplus at 4/5
    assert plan.steps == ((1000, COMPETING - 1), (400, COMPETING))
    assert (plan.quantity_wh, plan.price) == (1400, COMPETING - 1)
    # the engine's offer limit cuts the dearest step first
    cut = plan_battery_order(5, 500, battery, Strategy(), CONFIG, max_offer_wh=1100)
    assert cut is not None and cut.steps == ((1000, COMPETING - 1), (100, COMPETING))
    # a discharge into a deficit: only the export is offered, a plain order
    plan = plan_battery_order(5, -300, battery, Strategy(), CONFIG)
    assert plan is not None and (plan.side, plan.quantity_wh, plan.price, plan.steps) == (
        Side.SELL, 700, COMPETING - 1, ())  # fmt: skip


def test_a_charge_and_own_deficit_make_a_buy_curve() -> None:
    battery = BatteryOrder(5, 1000, bid_cap=25)
    plan = plan_battery_order(5, -300, battery, Strategy(), CONFIG)
    assert plan is not None and plan.side == Side.BUY
    buy_limit = Strategy().limits(CONFIG)[1]
    assert plan.steps == ((300, buy_limit), (1000, COMPETING))  # the deficit first
    # charging from the own surplus only: no bid beyond it
    plan = plan_battery_order(5, 1500, BatteryOrder(5, 1000), Strategy(), CONFIG)
    assert plan is not None and (plan.side, plan.quantity_wh) == (Side.SELL, 400)


# -- the engine ------------------------------------------------------------------------------

SLOT = 2_000_000


def engine_grid(mechanism: str) -> tuple[State, list[Trader]]:
    operator = Signer.from_seed(b"battery-pricing-operator".ljust(32, b"."))
    config = MarketConfig(grid="battery-pricing", operator=operator.did, feed_in_tariff=8,
                          retail_price=32, mechanism=mechanism)  # fmt: skip
    schedule = Schedule(config.slot_seconds, 300, 120)
    state = State.initial(config)
    traders = []
    for i, name in enumerate(("pv-a", "pv-b", "battery", "buyer-1", "buyer-2", "buyer-3")):
        signer = Signer.from_seed(f"battery-pricing-{name}".encode().ljust(32, b"."))
        trader = Trader(signer, config, schedule, f"BP{i:04d}")
        trader.forecaster = Forecaster(slots_per_day=96)  # type: ignore[assignment]
        traders.append(trader)
        state = apply_ok(state, MemberRegistration(
            grid=config.grid, operator=operator.did, household=signer.did,
            meter_serial=trader.meter_serial, role=MemberRole.VOTER, nonce=i + 1,
        ).signed_by(operator))  # fmt: skip
    return state, traders


def apply_ok(state: State, command: object) -> State:
    state, events = engine_apply(state, command)
    assert not [e for e in events if isinstance(e, Rejected)], events
    return state


def clear_slot(mechanism: str, battery: BatteryOrder | int) -> tuple[GateClosed, list[Order]]:
    """Two PV households (forecast 1250 Wh: offers of 1000 Wh at the default price) order
    first, then the battery household (no PV, 200 Wh load, discharging 1200 Wh), then three
    buyers of 800 Wh: supply 3000 Wh (2800 with the plain order), demand 2400 Wh (McAfee's
    trade reduction, without unmatched units, drops the marginal bid and ask orders)."""
    state, traders = engine_grid(mechanism)
    forecasts = (1250, 1250, -200, -800, -800, -800)
    orders = []
    for trader, forecast in zip(traders, forecasts, strict=True):
        trader.forecaster.observe(SLOT, forecast)
        order = trader.order_for(SLOT, battery_wh=battery if trader is traders[2] else 0)
        assert order is not None
        orders.append(order)
        state = apply_ok(state, order)
    state, events = engine_apply(state, CloseGate(slot=SLOT))
    closed = [e for e in events if isinstance(e, GateClosed)]
    assert len(closed) == 1
    return closed[0], orders


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_planned_discharge_is_matched_ahead_of_equal_price_pv_offers(mechanism: str) -> None:
    battery = BatteryOrder(SLOT, -1200, offer_floor=9, expected_sell=20)
    closed, orders = clear_slot(mechanism, battery)
    pv_a, pv_b, stored = orders[:3]
    assert stored.side == Side.SELL and stored.quantity_wh == 1000
    assert pv_a.price == pv_b.price == COMPETING
    sold = {o.id: 0 for o in orders}
    for t in closed.trades:
        sold[t.sell_id] += t.quantity_wh
    assert sold[stored.id] == 1000  # the battery's whole discharge sold
    assert sold[pv_a.id] + sold[pv_b.id] == closed.clearing.volume_wh - 1000
    assert all(t.sell_price >= 9 for t in closed.trades if t.sell_id == stored.id)
    # the plain order (the energy alone, priced like PV) ties and loses on time priority
    closed, orders = clear_slot(mechanism, -1200)
    stored = orders[2]
    assert stored.price == COMPETING and stored.quantity_wh == 800  # 4/5 of the forecast
    assert sum(t.quantity_wh for t in closed.trades if t.sell_id == stored.id) < 800
