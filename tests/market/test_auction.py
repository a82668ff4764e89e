"""Double auction: economic properties, checked on random books and by brute force."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market import MECHANISMS, ClearingError, clear
from market.accounting import money_for
from tests.market.books import Bid, book

mechanisms = st.sampled_from(MECHANISMS)
ks = st.fractions(min_value=0, max_value=1, max_denominator=16)


def fills(trades: list, attr: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trades:
        key = getattr(t, attr)
        out[key] = out.get(key, 0) + t.quantity_wh
    return out


def test_empty_book_clears_to_nothing() -> None:
    for m in MECHANISMS:
        c = clear([], m)
        assert c.trades == [] and c.price is None and c.volume_wh == 0


def test_non_crossing_book_clears_to_nothing() -> None:
    orders = [Bid("b", "buy", 100, 10), Bid("s", "sell", 100, 11)]
    for m in MECHANISMS:
        c = clear(orders, m)
        assert c.trades == [] and c.price is None
        assert c.unmatched_bid_wh == 100 and c.unmatched_ask_wh == 100


def test_one_sided_book_clears_to_nothing() -> None:
    assert clear([Bid("b", "buy", 100, 30)]).trades == []
    assert clear([Bid("s", "sell", 100, 10)]).trades == []


def test_uniform_midpoint_of_marginal_pair_with_partial_fill() -> None:
    orders = [
        Bid("b1", "buy", 100, 30),
        Bid("b2", "buy", 50, 20),
        Bid("s1", "sell", 80, 10),
        Bid("s2", "sell", 100, 25),
    ]
    c = clear(orders, "uniform")
    # b1 takes all of s1 and 20 Wh of s2; b2 (20) is below s2 (25) and does not trade.
    assert [(t.buy_id, t.sell_id, t.quantity_wh) for t in c.trades] == [
        ("b1", "s1", 80),
        ("b1", "s2", 20),
    ]
    assert c.price == 25 + (30 - 25) // 2 == 27
    assert c.volume_wh == 100 and c.unmatched_bid_wh == 50 and c.unmatched_ask_wh == 80


def test_k_pricing_endpoints() -> None:
    orders = [Bid("b", "buy", 10, 30), Bid("s", "sell", 10, 10)]
    assert clear(orders, "uniform", k=Fraction(0)).price == 10
    assert clear(orders, "uniform", k=Fraction(1)).price == 30
    assert clear(orders, "uniform", k=Fraction(1, 3)).price == 10 + 20 // 3


def test_equal_prices_fill_in_time_priority() -> None:
    orders = [
        Bid("late", "sell", 50, 10),
        Bid("b", "buy", 60, 20),
        Bid("later", "sell", 50, 10),
    ]
    c = clear(orders)
    assert [(t.sell_id, t.quantity_wh) for t in c.trades] == [("late", 50), ("later", 10)]


def test_mcafee_trade_reduction_excludes_marginal_pair() -> None:
    # Classic single-unit example: bids 10, 8, 6; asks 2, 4, 9. Efficient: two pairs.
    # Next pair (6, 9): p0 = 9 + floor((6 - 9) / 2) = 7, within [a=4, b=8] -> both trade at 7.
    orders = [Bid(f"b{p}", "buy", 1, p) for p in (10, 8, 6)]
    orders += [Bid(f"s{p}", "sell", 1, p) for p in (2, 4, 9)]
    c = clear(orders, "mcafee")
    assert c.volume_wh == 2 and c.price == 7
    # Make the next pair's midpoint fall outside [4, 8]: bids 10, 8, 1; asks 2, 4, 30.
    orders = [Bid(f"b{p}", "buy", 1, p) for p in (10, 8, 1)]
    orders += [Bid(f"s{p}", "sell", 1, p) for p in (2, 4, 30)]
    c = clear(orders, "mcafee")
    assert c.volume_wh == 1
    (t,) = c.trades
    assert (t.buy_id, t.sell_id, t.price, t.sell_price) == ("b10", "s2", 8, 4)


def test_bad_arguments_raise_typed_errors() -> None:
    with pytest.raises(ClearingError, match="mechanism"):
        clear([], "dutch")
    with pytest.raises(ClearingError, match="k must"):
        clear([], "uniform", k=Fraction(3, 2))
    with pytest.raises(ClearingError, match="float"):
        clear([], "uniform", k=0.5)  # type: ignore[arg-type]
    with pytest.raises(ClearingError, match="side"):
        clear([Bid("x", "hold", 1, 1)])
    with pytest.raises(ClearingError, match="non-positive"):
        clear([Bid("x", "buy", 0, 1), Bid("y", "sell", 1, 1)])


@settings(max_examples=300, deadline=None)
@given(book(), mechanisms, ks)
def test_individual_rationality_and_fill_limits(
    orders: list[Bid], mechanism: str, k: Fraction
) -> None:
    """No buyer pays above its limit, no seller receives below it, nobody overfills."""
    c = clear(orders, mechanism, k)
    by_id = {o.id: o for o in orders}
    for t in c.trades:
        assert t.quantity_wh > 0
        assert by_id[t.buy_id].side == "buy" and by_id[t.sell_id].side == "sell"
        assert t.price <= by_id[t.buy_id].price
        assert t.sell_price >= by_id[t.sell_id].price
        assert t.sell_price <= t.price
    for oid, filled in {**fills(c.trades, "buy_id"), **fills(c.trades, "sell_id")}.items():
        assert filled <= by_id[oid].quantity_wh
    assert c.volume_wh == sum(t.quantity_wh for t in c.trades)
    assert c.bid_volume_wh == sum(o.quantity_wh for o in orders if o.side == "buy")
    assert c.ask_volume_wh == sum(o.quantity_wh for o in orders if o.side == "sell")


@settings(max_examples=300, deadline=None)
@given(book(), mechanisms, ks)
def test_budget_balance(orders: list[Bid], mechanism: str, k: Fraction) -> None:
    """Buyers pay exactly what sellers receive, except McAfee's surplus, which is never negative."""
    c = clear(orders, mechanism, k)
    paid = sum(money_for(t.quantity_wh, t.price) for t in c.trades)
    received = sum(money_for(t.quantity_wh, t.sell_price) for t in c.trades)
    if mechanism == "mcafee":
        assert paid >= received
    else:
        assert paid == received


@settings(max_examples=300, deadline=None)
@given(book(), ks)
def test_uniform_price_rule(orders: list[Bid], k: Fraction) -> None:
    """price = marginal ask + floor(k * (marginal bid - marginal ask)), one price for all."""
    c = clear(orders, "uniform", k)
    if not c.trades:
        assert c.price is None
        return
    by_id = {o.id: o for o in orders}
    bid_m = min(by_id[t.buy_id].price for t in c.trades)
    ask_m = max(by_id[t.sell_id].price for t in c.trades)
    assert c.price == ask_m + (k.numerator * (bid_m - ask_m)) // k.denominator
    assert all(t.price == t.sell_price == c.price for t in c.trades)


def brute_force(orders: list[Bid]) -> tuple[int, int]:
    """(max welfare, largest volume among welfare maximisers) over every feasible fill."""
    bids = [o for o in orders if o.side == "buy"]
    asks = [o for o in orders if o.side == "sell"]
    best = (0, 0)
    for bf in itertools.product(*(range(o.quantity_wh + 1) for o in bids)):
        demand = sum(bf)
        value = sum(q * o.price for q, o in zip(bf, bids, strict=True))
        for af in itertools.product(*(range(o.quantity_wh + 1) for o in asks)):
            if sum(af) != demand:
                continue
            welfare = value - sum(q * o.price for q, o in zip(af, asks, strict=True))
            best = max(best, (welfare, demand))
    return best


@settings(max_examples=150, deadline=None)
@given(book(max_orders=6, max_qty=3, price_lo=1, price_hi=6))
def test_uniform_volume_is_welfare_maximising(orders: list[Bid]) -> None:
    c = clear(orders, "uniform")
    by_id = {o.id: o for o in orders}
    welfare = sum(
        t.quantity_wh * (by_id[t.buy_id].price - by_id[t.sell_id].price) for t in c.trades
    )
    assert (welfare, c.volume_wh) == brute_force(orders)


@settings(max_examples=300, deadline=None)
@given(book(), ks)
def test_mcafee_never_trades_more_than_uniform(orders: list[Bid], k: Fraction) -> None:
    assert clear(orders, "mcafee").volume_wh <= clear(orders, "uniform", k).volume_wh


@settings(max_examples=200, deadline=None)
@given(book(), st.sampled_from(["uniform", "pay_as_bid"]), st.randoms(use_true_random=False))
def test_volume_and_uniform_price_do_not_depend_on_input_order(
    orders: list[Bid], mechanism: str, rnd: random.Random
) -> None:
    """Time priority decides only which equal-priced orders fill first. (McAfee excludes the
    marginal *order*, so there the tie-break can change the volume too.)"""
    shuffled = list(orders)
    rnd.shuffle(shuffled)
    a, b = clear(orders, mechanism), clear(shuffled, mechanism)
    assert a.volume_wh == b.volume_wh
    assert a.price == b.price


@settings(max_examples=100, deadline=None)
@given(book(), mechanisms)
def test_same_input_same_trades(orders: list[Bid], mechanism: str) -> None:
    assert clear(orders, mechanism) == clear(list(orders), mechanism)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(1, 20)), min_size=0, max_size=8),
    st.lists(st.tuples(st.integers(1, 3), st.integers(1, 20)), min_size=0, max_size=8),
)
def test_mcafee_is_truthful_for_single_unit_traders_budget(
    bids: list[tuple[int, int]], asks: list[tuple[int, int]]
) -> None:
    """Single-unit books: McAfee trades K or K-1 of the K efficient pairs."""
    orders = [Bid(f"b{i}", "buy", 1, p) for i, (_, p) in enumerate(bids)]
    orders += [Bid(f"s{i}", "sell", 1, p) for i, (_, p) in enumerate(asks)]
    efficient = clear(orders, "uniform").volume_wh
    reduced = clear(orders, "mcafee").volume_wh
    assert reduced in (efficient, max(efficient - 1, 0))
