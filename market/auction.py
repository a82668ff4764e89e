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

Mechanisms:

- ``uniform``: every trade at one price. The marginal pair is the lowest-priced bid and the
  highest-priced ask that trade at all; ``price = ask + floor(k * (bid - ask))``.
- ``pay_as_bid`` (discriminatory): each matched pair trades at ``ask + floor(k * (bid - ask))``
  of its own two limit prices.
- ``mcafee``: McAfee's trade reduction, at order granularity. Let ``b``/``a`` be the marginal
  trading bid/ask prices and ``b'``/``a'`` the prices of the next unit of demand/supply that does
  not trade. If both exist and ``p0 = a' + floor((b' - a') / 2)`` lies in ``[a, b]``, every match
  trades at ``p0``. Otherwise the marginal bid and ask orders are excluded, the rest re-match,
  buyers pay ``b`` and sellers receive ``a``; the market keeps ``(b - a)`` per Wh. Truthful for
  single-unit traders, never trades more than ``uniform``, budget-balanced or in surplus.

The engine enforces the price band (feed-in tariff to retail price) on entry; clearing itself
reads only ``id``, ``side``, ``quantity_wh`` and ``price`` of each order.
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

_row = attrgetter("price", "quantity_wh", "id", "side")
_first, _second, _third = itemgetter(0), itemgetter(1), itemgetter(2)
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


def _sorted_sides(orders: Iterable[Any]) -> tuple[_Side, _Side]:
    # One pass over the order objects: on large books every attribute pass costs about as much
    # as the sort itself (the objects are scattered in memory), so read all four at once.
    rows: list[tuple[int, int, str, Any]] = list(map(_row, orders))
    buy, sell = _BUY, _SELL
    bids = [r for r in rows if r[3] == buy]
    asks = [r for r in rows if r[3] == sell]
    if len(bids) + len(asks) != len(rows):
        bad = next(r for r in rows if r[3] not in (buy, sell))
        raise ClearingError(f"order {bad[2]!r} has unknown side {bad[3]!r}")
    # list.sort is stable, and reverse=True keeps equal keys in input order too.
    bids.sort(key=_first, reverse=True)
    asks.sort(key=_first)
    return _Side(bids), _Side(asks)


class _Side:
    """One sorted side of the book: its rows, prices and cumulative volume (for unit look-ups)."""

    __slots__ = ("cumulative", "prices", "rows")

    def __init__(self, rows: list[tuple[int, int, str, Any]]) -> None:
        self.rows = rows
        self.prices: list[int] = list(map(_first, rows))
        self.cumulative: list[int] = list(accumulate(map(_second, rows)))
        if rows and min(map(_second, rows)) <= 0:
            bad = next(r for r in rows if r[1] <= 0)
            raise ClearingError(f"order {bad[2]!r} has non-positive quantity {bad[1]}")

    def head(self, n: int) -> _Side:
        """The first ``n`` orders of this side, sharing this side's columns."""
        side = _Side.__new__(_Side)
        side.rows = self.rows[:n]
        side.prices = self.prices[:n]
        side.cumulative = self.cumulative[:n]
        return side

    def ids(self, n: int) -> list[str]:
        """Ids of the first ``n`` orders (only the traded prefix is ever needed)."""
        return list(map(_third, self.rows[:n]))

    def price_of_unit(self, v: int) -> int:
        """Limit price of the order that holds the v-th Wh (1-based) of this side."""
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

    Each match is a maximal run of watt-hours held by the same bid and the same ask: runs end at
    every order boundary of either side, i.e. at the merged cumulative volumes. Returns columns
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
    )
    return list(map(_new_trade, rows))


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
    bids, asks = _sorted_sides(orders)
    return _clear_sorted(bids, asks, mechanism, k)


def _clear_sorted(bids: _Side, asks: _Side, mechanism: str, k: Fraction) -> Clearing:
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

    return _mcafee(bids, asks, bid_index, ask_index, quantities)


def _mcafee(
    bids: _Side, asks: _Side, bid_index: list[int], ask_index: list[int], quantities: list[int]
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
    bid_index, ask_index, quantities = _match(kept_bids, kept_asks)
    trades = _trades(kept_bids, kept_asks, bid_index, ask_index, quantities, repeat(b), repeat(a))
    price = b if trades and a == b else None
    return Clearing("mcafee", trades, price, sum(quantities), bids.volume, asks.volume)
