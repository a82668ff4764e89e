"""The household agent: turns what the meter measured into an order for an upcoming slot.

Pure and integer-only. :class:`Forecaster` is the previous agent's forecast, kept as the
benchmark's baseline (``bench/forecast_bench.py``): an exponentially weighted average of the
household's net export per slot-of-day (yesterday's 12:15 predicts today's 12:15), falling back
to the most recent slot when a slot-of-day has not been seen yet. The node's agent now
forecasts with :class:`node.agent.forecast.LearningForecaster`. The strategy then offers only a
safe share of a forecast surplus (a household must never promise more than it can deliver: a
shortfall is bought back at the retail price) and bids for the forecast deficit, at limit prices
inside the band. With a battery, :func:`plan_battery_order` prices the battery's part apart
(``node/agent/battery.py``, "Prices of the battery's part").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from market import MarketConfig, Side
from market.settlement import Tariffs
from node.agent.battery import BatteryOrder, battery_bid_price, battery_offer_price


@dataclass(frozen=True, slots=True)
class Strategy:
    """A household's trading preferences (from its config)."""

    sell_floor: int | None = None
    """Least it accepts per kWh; default a quarter of the way up from the feed-in tariff."""
    buy_cap: int | None = None
    """Most it pays per kWh; default a quarter of the way down from the retail price."""
    safety: Fraction = Fraction(4, 5)
    """Share of the forecast surplus offered."""
    min_order_wh: int = 10
    max_order_wh: int = 50_000

    def limits(self, config: MarketConfig, band: Tariffs | None = None) -> tuple[int, int]:
        """(sell limit, buy limit) clamped into the price band: ``band`` (the slot's tariffs,
        ``config_at(state, slot).tariffs_at(slot)``: the rules in force there), or the flat
        genesis tariffs of ``config``. With grid fees the buy limit also stays at or below
        the retail price plus the grid-import fee minus the local-trade fee, so energy bought
        locally never costs more, fees included, than the same energy from the grid."""
        if band is None:
            band = config.tariffs
        lo, hi = band.feed_in, band.retail
        quarter = (hi - lo) // 4
        sell = self.sell_floor if self.sell_floor is not None else lo + quarter
        buy = self.buy_cap if self.buy_cap is not None else hi - quarter
        buy = min(buy, hi + band.grid_fee - band.local_fee)
        return min(max(sell, lo), hi), min(max(buy, lo), hi)


@dataclass(frozen=True, slots=True)
class OrderPlan:
    """What to offer in a slot (the node signs it into an Order)."""

    slot: int
    side: Side
    quantity_wh: int
    price: int
    steps: tuple[tuple[int, int], ...] = ()
    """A curve (2 or more ``(quantity_wh, price)`` steps: a battery's part priced apart from
    the household's own), or () for a plain order."""


@dataclass
class Forecaster:
    """Net export per slot, learned per slot-of-day."""

    slots_per_day: int
    weight: Fraction = Fraction(1, 2)
    """Weight of the newest observation in the average."""
    by_time_of_day: dict[int, Fraction] = field(default_factory=dict)
    last: int | None = None

    def observe(self, slot: int, net_export_wh: int) -> None:
        """Learn the net export the meter measured in ``slot``."""
        key = slot % self.slots_per_day
        old = self.by_time_of_day.get(key)
        value = Fraction(net_export_wh)
        self.by_time_of_day[key] = value if old is None else old + self.weight * (value - old)
        self.last = net_export_wh

    def predict(self, slot: int) -> int | None:
        """Forecast net export of ``slot`` in Wh (None before any observation)."""
        known = self.by_time_of_day.get(slot % self.slots_per_day)
        if known is not None:
            return int(known)
        return self.last

    def issue(self, slot: int) -> int | None:
        """:meth:`predict` (the learning forecaster's API, node/agent/forecast.py)."""
        return self.predict(slot)


def plan_order(
    slot: int,
    forecast_net_wh: int | None,
    strategy: Strategy,
    config: MarketConfig,
    max_offer_wh: int | None = None,
    band: Tariffs | None = None,
) -> OrderPlan | None:
    """The order for ``slot``, or None when the forecast is unknown or too small to trade.

    ``max_offer_wh`` is what the engine lets this household offer in one slot (its delivery
    record, :func:`market.state.sell_limit_wh`): an offer is cut to it rather than refused.
    ``band`` is the slot's price band under the rules in force there (default: the genesis
    rules' flat tariffs); the price is always inside it."""
    if forecast_net_wh is None:
        return None
    sell_limit, buy_limit = strategy.limits(config, band)
    if forecast_net_wh > 0:
        qty = int(forecast_net_wh * strategy.safety)
        side, price = Side.SELL, sell_limit
    else:
        qty = -forecast_net_wh
        side, price = Side.BUY, buy_limit
    qty = min(qty, strategy.max_order_wh, config.max_order_wh)
    if side == Side.SELL and max_offer_wh is not None:
        qty = min(qty, max_offer_wh)
    if qty < strategy.min_order_wh:
        return None
    return OrderPlan(slot, side, qty, price)


def plan_battery_order(
    slot: int,
    forecast_net_wh: int | None,
    battery: BatteryOrder,
    strategy: Strategy,
    config: MarketConfig,
    max_offer_wh: int | None = None,
    band: Tariffs | None = None,
    mechanism: str | None = None,
) -> OrderPlan | None:
    """The order for ``slot`` of a household whose battery moves ``battery.battery_wh`` there
    (None when the forecast is unknown or the order too small).

    The household's own part (its forecast surplus or deficit) is priced as :func:`plan_order`
    prices it, the battery's part apart: a discharge beyond the own deficit is offered in full
    (the setpoint is forced, so it is not forecast: no safety share) at
    :func:`~node.agent.battery.battery_offer_price`, a charge beyond the own surplus is bid for
    at :func:`~node.agent.battery.battery_bid_price`, both for ``mechanism`` (default the
    genesis rules') against the price the default agent offers PV surplus at. When the two
    parts' prices differ the order is a curve (a sell curve's cheapest step first, a buy
    curve's dearest), so the battery's energy clears on its own price. Without a battery part
    (or without a price for it) this is :func:`plan_order` of the net."""
    if forecast_net_wh is None:
        return None
    band = config.tariffs if band is None else band
    mechanism = config.mechanism if mechanism is None else mechanism
    b = battery.battery_wh
    net = forecast_net_wh - b
    sell_limit, buy_limit = strategy.limits(config, band)
    competing, _ = Strategy().limits(config, band)
    cap = min(strategy.max_order_wh, config.max_order_wh)
    rows: list[tuple[int, int]]
    if net > 0 and b < 0 and battery.offer_floor is not None:
        stored = min(-b, net)
        price = battery_offer_price(battery.offer_floor, battery.expected_sell or band.feed_in,
                                    band, mechanism, competing)  # fmt: skip
        if price is None:
            return plan_order(slot, net, strategy, config, max_offer_wh, band)
        own = int((net - stored) * strategy.safety)
        rows = sorted([(price, stored), (sell_limit, own)])  # cheapest first
        side = Side.SELL
        if max_offer_wh is not None:
            cap = min(cap, max_offer_wh)
    elif net < 0 and b > 0 and battery.bid_cap is not None:
        charge = min(b, -net)
        price = battery_bid_price(battery.bid_cap, band, mechanism, competing)
        if price is None:
            return plan_order(slot, net, strategy, config, max_offer_wh, band)
        rows = sorted([(price, charge), (buy_limit, -net - charge)], reverse=True)
        side = Side.BUY
    else:
        return plan_order(slot, net, strategy, config, max_offer_wh, band)
    steps: list[tuple[int, int]] = []
    left = cap
    for price, qty in rows:  # merged by price, cut to the caps from the last step
        qty = min(qty, left)
        if qty <= 0:
            continue
        left -= qty
        if steps and steps[-1][1] == price:
            steps[-1] = (steps[-1][0] + qty, price)
        else:
            steps.append((qty, price))
    total = sum(q for q, _ in steps)
    if total < strategy.min_order_wh:
        return None
    return OrderPlan(slot, side, total, steps[0][1], tuple(steps) if len(steps) > 1 else ())
