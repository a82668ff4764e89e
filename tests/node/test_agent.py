"""The household agent: forecasts from metered slots, orders inside the band."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from market import Side
from node.agent.strategy import Forecaster, Strategy, plan_order
from tests.market.world import World

CONFIG = World().config  # feed-in 8, retail 32


def test_forecast_learns_per_time_of_day_and_falls_back_to_persistence() -> None:
    f = Forecaster(slots_per_day=4)
    assert f.predict(0) is None
    f.observe(1, 100)
    assert f.predict(2) == 100  # unseen time of day: the most recent slot
    f.observe(2, -50)
    f.observe(5, 300)  # slot 5 is the same time of day as slot 1
    assert f.predict(9) == 200  # (100 + 300) / 2 with weight 1/2
    assert f.predict(6) == -50


def test_surplus_is_offered_with_a_safety_margin_and_deficit_is_bid() -> None:
    s = Strategy()
    sell = plan_order(7, 1000, s, CONFIG)
    assert sell is not None and (sell.side, sell.quantity_wh) == (Side.SELL, 800)
    buy = plan_order(7, -600, s, CONFIG)
    assert buy is not None and (buy.side, buy.quantity_wh) == (Side.BUY, 600)
    assert sell.price == 8 + 6 and buy.price == 32 - 6
    assert plan_order(7, 5, s, CONFIG) is None
    assert plan_order(7, None, s, CONFIG) is None


@given(
    st.integers(-(10**7), 10**7),
    st.one_of(st.none(), st.integers(-100, 100)),
    st.one_of(st.none(), st.integers(-100, 100)),
    st.fractions(min_value=0, max_value=1),
)
def test_plans_are_always_valid_orders(net: int, floor, cap, safety: Fraction) -> None:
    plan = plan_order(3, net, Strategy(floor, cap, safety), CONFIG)
    if plan is None:
        return
    assert CONFIG.feed_in_tariff <= plan.price <= CONFIG.retail_price
    assert 0 < plan.quantity_wh <= CONFIG.max_order_wh
    if plan.side == Side.SELL:
        assert plan.quantity_wh <= net  # never offers more than the forecast surplus


def test_a_bid_never_costs_more_than_the_grid_once_fees_are_counted() -> None:
    """Retail 30, a grid-import fee of 4 and a local-trade fee of 12: a kWh bought locally at
    p costs p + 12, from the grid 34, so the bid stops at 22 (below the default cap, 25)."""
    from market.settlement import Tariffs

    config = World().config
    strategy = Strategy()
    assert strategy.limits(config, Tariffs(10, 30))[1] == 25
    assert strategy.limits(config, Tariffs(10, 30, local_fee=12, grid_fee=4))[1] == 22
    assert strategy.limits(config, Tariffs(10, 30, local_fee=2, grid_fee=4))[1] == 25
    assert strategy.limits(config, Tariffs(10, 30, local_fee=40))[1] == 10  # the band's floor
