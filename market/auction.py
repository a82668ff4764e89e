"""Double auction for one delivery slot (a call market cleared at gate closure).

Orders are matched greedily: bids from the highest price down, asks from the lowest up, while
the best remaining bid is at least the best remaining ask. Orders fill partially. That volume is
the largest at which every traded watt-hour has a buyer valuing it at least as much as its
seller, so it maximises welfare (the sum of bid minus ask over traded energy).

Tie-break, a total order so that every node matches identically: bids by price descending,
asks by price ascending, equal prices by position in the input sequence (time priority). The
engine passes a slot's orders in replicated-log order, so this is the design's
(price, log position, id) order; ids are unique within a book, positions never tie. For
``uniform`` and ``pay_as_bid``, volume and the uniform price do not depend on input order at
all; only which equal-priced orders fill first does. McAfee excludes the marginal *order*, so
there time priority among equal prices can change the volume as well.

**Curve orders** (:attr:`market.models.Order.steps`): each step is a row of the book with its
own quantity and price and the order's time priority (its position in the input; the steps of
one order stay in their order, their prices being strictly monotone). The greedy match over
rows is then the classic supply/demand crossing of all steps, so it still maximises welfare:
a buyer's curve is its marginal values, a seller's its marginal costs. Every matched watt-hour
fills a buy step priced at least the trade's buy price and a sell step priced at most the
sell price (individually rational per step). Trades reference the orders' ids; matches between
the same two orders at the same prices are merged into one trade (:class:`~market.models.Trade`:
one trade per order pair under ``uniform`` and ``mcafee``; ``part`` tells a pair's trades at
different prices apart, which only ``pay_as_bid`` gives). A book without curve orders clears
exactly as before: the same rows, the same trades, in the same order.

Mechanisms:

- ``uniform``: every trade at one price. The marginal pair is the lowest-priced bid and the
  highest-priced ask (rows: steps) that trade at all; ``price = ask + floor(k * (bid - ask))``.
- ``pay_as_bid`` (discriminatory): each matched pair of rows trades at
  ``ask + floor(k * (bid - ask))`` of its own two limit prices (a curve's step prices).
- ``mcafee``: McAfee's trade reduction, at order granularity. Let ``b``/``a`` be the marginal
  trading bid/ask prices (rows: steps) and ``b'``/``a'`` the prices of the next unit of
  demand/supply that does not trade. If both exist and ``p0 = a' + floor((b' - a') / 2)`` lies
  in ``[a, b]``, every match trades at ``p0``. Otherwise the marginal bid and ask *orders* are
  excluded (every step of a curve order whose step is marginal), the rest re-match, buyers pay
  ``b`` and sellers receive ``a``; the market keeps ``(b - a)`` per Wh. Truthful for
  single-unit traders, never trades more than ``uniform``, budget-balanced or in surplus.
  Excluding the whole order rather than the marginal step keeps what makes the reduction work:
  the trader who sets ``b`` (``a``) never trades at it, so no buyer (seller) can lower (raise)
  its own price by adding a step that becomes marginal; every re-matched step is priced at
  least ``b`` (bids) or at most ``a`` (asks), so the mechanism stays individually rational and
  in surplus.

The engine enforces the price band (feed-in tariff to retail price) on entry, for every step;
clearing itself reads only ``id``, ``side``, ``quantity_wh``, ``price`` and ``steps`` of each
order.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from itertools import accumulate, repeat
from operator import attrgetter, itemgetter, sub
from typing import Any, Literal

from market.models import Side, Trade

Mechanism = Literal["uniform", "pay_as_bid", "mcafee"]
MECHANISMS: tuple[str, ...] = ("uniform", "pay_as_bid", "mcafee")

_row = attrgetter("price", "quantity_wh", "id", "side", "steps")
_plain_row = attrgetter("price", "quantity_wh", "id", "side")
_first, _second, _third, _fifth = itemgetter(0), itemgetter(1), itemgetter(2), itemgetter(4)
_BUY, _SELL = Side.BUY, Side.SELL
_new_trade = partial(tuple.__new__, Trade)  # C-level construction from a complete row


class ClearingError(ValueError):
    """Clearing was asked for something it cannot do (unknown mechanism, k outside [0, 1])."""


@dataclass(frozen=True, slots=True)
class Clearing:
    """The outcome of clearing one book."""

    mechanism: str
    trades: list[Trade] = field(default_factory=list)
    price: int | None = None
    """The uniform price, or None when nothing trades or the mechanism has no single price."""
    volume_wh: int = 0
    bid_volume_wh: int = 0
    ask_volume_wh: int = 0

    @property
    def unmatched_bid_wh(self) -> int:
        """Demand left over after clearing."""
        return self.bid_volume_wh - self.volume_wh

    @property
    def unmatched_ask_wh(self) -> int:
        """Supply left over after clearing."""
        return self.ask_volume_wh - self.volume_wh


Row = tuple[int, int, str, Any, Any]
"""A row of one side of the book: ``(price, quantity_wh, order id, side, steps)``; a curve
order is one row per step (its ``steps`` then ``()``)."""


def _sorted_sides(orders: Iterable[Any]) -> tuple[_Side, _Side, bool]:
    """Both sides of the book, sorted, and whether any order is a curve."""
    # One pass over the order objects: on large books every attribute pass costs about as much
    # as the sort itself (the objects are scattered in memory), so read all five at once.
    rows = _rows(orders)
    curves = any(map(_fifth, rows))
    if curves:
        rows = list(_step_rows(rows))
    buy, sell = _BUY, _SELL
    bids = [r for r in rows if r[3] == buy]
    asks = [r for r in rows if r[3] == sell]
    if len(bids) + len(asks) != len(rows):
        bad = next(r for r in rows if r[3] not in (buy, sell))
        raise ClearingError(f"order {bad[2]!r} has unknown side {bad[3]!r}")
    # list.sort is stable, and reverse=True keeps equal keys in input order too.
    bids.sort(key=_first, reverse=True)
    asks.sort(key=_first)
    return _Side(bids), _Side(asks), curves


def _rows(orders: Iterable[Any]) -> list[Row]:
    """The orders' rows; an object without ``steps`` (a test's minimal order) is a plain one."""
    orders = orders if isinstance(orders, (list, tuple)) else list(orders)
    try:
        return list(map(_row, orders))
    except AttributeError:
        return [(*_plain_row(o), getattr(o, "steps", ())) for o in orders]


def _step_rows(rows: list[Row]) -> Iterable[Row]:
    """Each curve order's row replaced by one row per step, in step order (a row's place in
    the list is its time priority, so the steps keep the order's)."""
    for row in rows:
        steps = row[4]
        if not steps:
            yield row
            continue
        _, _, oid, side, _ = row
        for quantity, price in steps:
            yield (price, quantity, oid, side, ())


class _Side:
    """One sorted side of the book: its rows, prices and cumulative volume (for unit look-ups)."""

    __slots__ = ("cumulative", "prices", "rows")

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.prices: list[int] = list(map(_first, rows))
        self.cumulative: list[int] = list(accumulate(map(_second, rows)))
        if rows and min(map(_second, rows)) <= 0:
            bad = next(r for r in rows if r[1] <= 0)
            raise ClearingError(f"order {bad[2]!r} has non-positive quantity {bad[1]}")

    def head(self, n: int) -> _Side:
        """The first ``n`` rows of this side, sharing this side's columns."""
        side = _Side.__new__(_Side)
        side.rows = self.rows[:n]
        side.prices = self.prices[:n]
        side.cumulative = self.cumulative[:n]
        return side

    def ids(self, n: int) -> list[str]:
        """Order ids of the first ``n`` rows (only the traded prefix is ever needed)."""
        return list(map(_third, self.rows[:n]))

    def price_of_unit(self, v: int) -> int:
        """Limit price of the row (order or step) that holds the v-th Wh (1-based) of this
        side."""
        return self.prices[bisect_left(self.cumulative, v)]

    @property
    def volume(self) -> int:
        """Total Wh on this side."""
        return self.cumulative[-1] if self.cumulative else 0


def _crossing_volume(bids: _Side, asks: _Side) -> int:
    """The largest volume V with demand price >= supply price at the V-th Wh (0 if none)."""
    hi = min(bids.volume, asks.volume)
    if hi == 0 or bids.price_of_unit(1) < asks.price_of_unit(1):
        return 0
    lo = 1  # invariant: unit lo crosses; the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bids.price_of_unit(mid) >= asks.price_of_unit(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _match(bids: _Side, asks: _Side) -> tuple[list[int], list[int], list[int]]:
    """Match the first V Wh of both sides, V the crossing volume.

    Each match is a maximal run of watt-hours held by the same bid and the same ask row: runs end
    at every row boundary of either side, i.e. at the merged cumulative volumes. Returns columns
    (bid index, ask index, Wh) per match, built with C-level builtins only, because this is the
    hot path for large books.
    """
    volume = _crossing_volume(bids, asks)
    if volume == 0:
        return [], [], []
    bid_ends = bids.cumulative[: bisect_left(bids.cumulative, volume)]
    ask_ends = asks.cumulative[: bisect_left(asks.cumulative, volume)]
    # Merging two sorted runs is linear in timsort; dict.fromkeys drops shared boundaries.
    ends = list(dict.fromkeys(sorted(bid_ends + ask_ends)))
    ends.append(volume)
    starts = [0, *ends[:-1]]
    quantities = list(map(sub, ends, starts))
    # A run moves on to the next bid (ask) exactly when it starts at a bid (ask) boundary.
    bid_index = list(accumulate(map(set(bid_ends).__contains__, starts)))
    ask_index = list(accumulate(map(set(ask_ends).__contains__, starts)))
    return bid_index, ask_index, quantities


def _trades(
    bids: _Side,
    asks: _Side,
    bid_index: list[int],
    ask_index: list[int],
    quantities: list[int],
    prices: Iterable[int],
    sell_prices: Iterable[int],
) -> list[Trade]:
    if not quantities:
        return []
    rows = zip(
        map(bids.ids(bid_index[-1] + 1).__getitem__, bid_index),
        map(asks.ids(ask_index[-1] + 1).__getitem__, ask_index),
        quantities,
        prices,
        sell_prices,
        repeat(0),
        repeat(""),
        repeat(""),
        repeat(0),
    )
    return list(map(_new_trade, rows))


def _merged(trades: list[Trade]) -> list[Trade]:
    """One trade per (buy order, sell order, price, sell price), at the place of its first
    match, its quantity the sum of theirs; a pair's trades at other prices get ``part`` 1, 2,
    ... in that order (only books with curve orders can have such matches)."""
    out: list[Trade] = []
    where: dict[tuple[str, str, int, int], int] = {}
    parts: dict[tuple[str, str], int] = {}
    for t in trades:
        key = (t.buy_id, t.sell_id, t.price, t.sell_price)
        i = where.get(key)
        if i is not None:
            out[i] = out[i]._replace(quantity_wh=out[i].quantity_wh + t.quantity_wh)
            continue
        pair = key[:2]
        part = parts.get(pair, 0)
        parts[pair] = part + 1
        where[key] = len(out)
        out.append(t._replace(part=part) if part else t)
    return out


def _split_price(ask_price: int, bid_price: int, k: Fraction) -> int:
    return ask_price + (k.numerator * (bid_price - ask_price)) // k.denominator


def clear(
    orders: Iterable[Any],
    mechanism: Mechanism | str = "uniform",
    k: Fraction | int = Fraction(1, 2),
) -> Clearing:
    """Clear one slot's book. An empty or non-crossing book clears to no trades.

    ``orders`` is taken in time priority (the engine passes replicated-log order). ``k`` (a
    :class:`fractions.Fraction` in [0, 1]) sets where between the marginal ask (k=0) and the
    marginal bid (k=1) the price lies for ``uniform`` and ``pay_as_bid``.
    """
    if mechanism not in MECHANISMS:
        raise ClearingError(f"unknown mechanism {mechanism!r}; expected one of {MECHANISMS}")
    if isinstance(k, float):
        raise ClearingError("k must be a Fraction or int, not a float")
    k = Fraction(k)
    if not 0 <= k <= 1:
        raise ClearingError(f"k must lie in [0, 1], got {k}")
    bids, asks, curves = _sorted_sides(orders)
    clearing = _clear_sorted(bids, asks, mechanism, k, curves)
    if curves and clearing.trades:
        trades = _merged(clearing.trades)
        return Clearing(
            clearing.mechanism, trades, clearing.price, clearing.volume_wh,
            clearing.bid_volume_wh, clearing.ask_volume_wh,
        )  # fmt: skip
    return clearing


def _clear_sorted(
    bids: _Side, asks: _Side, mechanism: str, k: Fraction, curves: bool = False
) -> Clearing:
    bid_index, ask_index, quantities = _match(bids, asks)
    if not quantities:
        return Clearing(mechanism, [], None, 0, bids.volume, asks.volume)
    volume = sum(quantities)
    last_bid, last_ask = bid_index[-1], ask_index[-1]

    if mechanism == "uniform":
        p = _split_price(asks.prices[last_ask], bids.prices[last_bid], k)
        trades = _trades(bids, asks, bid_index, ask_index, quantities, repeat(p), repeat(p))
        return Clearing(mechanism, trades, p, volume, bids.volume, asks.volume)

    if mechanism == "pay_as_bid":
        num, den = k.numerator, k.denominator
        pair_prices = [
            a + (num * (b - a)) // den
            for b, a in zip(
                map(bids.prices.__getitem__, bid_index),
                map(asks.prices.__getitem__, ask_index),
                strict=True,
            )
        ]
        trades = _trades(bids, asks, bid_index, ask_index, quantities, pair_prices, pair_prices)
        return Clearing(mechanism, trades, None, volume, bids.volume, asks.volume)

    return _mcafee(bids, asks, bid_index, ask_index, quantities, curves)


def _mcafee(
    bids: _Side,
    asks: _Side,
    bid_index: list[int],
    ask_index: list[int],
    quantities: list[int],
    curves: bool = False,
) -> Clearing:
    volume = sum(quantities)
    last_bid, last_ask = bid_index[-1], ask_index[-1]
    b, a = bids.prices[last_bid], asks.prices[last_ask]
    # Prices of the next unit of demand / supply that does not trade (the marginal order's
    # own price when it is only partly filled).
    next_bid = bids.price_of_unit(volume + 1) if volume < bids.volume else None
    next_ask = asks.price_of_unit(volume + 1) if volume < asks.volume else None
    if next_bid is not None and next_ask is not None:
        p0 = next_ask + (next_bid - next_ask) // 2
        if a <= p0 <= b:
            trades = _trades(bids, asks, bid_index, ask_index, quantities, repeat(p0), repeat(p0))
            return Clearing("mcafee", trades, p0, volume, bids.volume, asks.volume)
    # Trade reduction: drop the marginal bid and ask orders, re-match the rest.
    kept_bids, kept_asks = bids.head(last_bid), asks.head(last_ask)
    if curves:  # every step of the marginal orders goes, also their earlier (better) steps
        kept_bids = _without(kept_bids, bids.rows[last_bid][2])
        kept_asks = _without(kept_asks, asks.rows[last_ask][2])
    bid_index, ask_index, quantities = _match(kept_bids, kept_asks)
    trades = _trades(kept_bids, kept_asks, bid_index, ask_index, quantities, repeat(b), repeat(a))
    price = b if trades and a == b else None
    return Clearing("mcafee", trades, price, sum(quantities), bids.volume, asks.volume)


def _without(side: _Side, order_id: str) -> _Side:
    """``side`` without the rows (steps) of order ``order_id``."""
    rows = [r for r in side.rows if r[2] != order_id]
    return side if len(rows) == len(side.rows) else _Side(rows)
