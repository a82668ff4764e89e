"""Curve orders (``Order.steps``): encoding and signing compatibility, admission with today's
limits and reasons, clearing against a unit-level reference and the brute-force welfare
optimum, individual rationality, budget balance with grid fees, replay from a snapshot, and
gossip validation."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market import (
    CloseGate,
    CommandDecodeError,
    GateClosed,
    Order,
    RejectReason,
    SettleSlot,
    Side,
    SlotSettled,
    State,
    Trade,
    apply,
    clear,
    decode_command,
    encode_command,
)
from market.accounting import MARKET, MONEY, NETWORK, money_for
from market.models import MAX_CURVE_STEPS, ChangeRules, record_hash
from market.signing import Signer
from market.snapshot import dump_state, load_state, state_digest
from market.state import config_at
from tests.market.world import GRID, World

# --- encoding: orders without steps sign and encode exactly as before ---------------------------

# Produced by the code before curve orders existed (seed bytes(range(32)), the order below).
OLD_DID = "did:key:z6MkehRgf7yJbgaGfYsdoAsKdBPE3dj2CYhowQdcjqSJgvVd"
OLD_SIGNING_BYTES = (
    b'microgrid/order/v1\n{"grid":"g1","household":"' + OLD_DID.encode() + b'","id":"o-1",'
    b'"nonce":7,"price":23,"quantity_wh":1500,"side":"sell","slot":12,"type":"order"}'
)
OLD_SIGNATURE = (
    "55043f354fc45c0a34c4cce44d808bb8e6f4e2dab58ae2d58247a80c1d1e0600"
    "0e9d2ac4861a926b555c597292465e0c7b06e23ca5f13fa5722273c3b8424606"
)
OLD_COMMAND = (
    b'{"grid":"g1","household":"' + OLD_DID.encode() + b'","id":"o-1","nonce":7,"price":23,'
    b'"quantity_wh":1500,"side":"sell","signature":"' + OLD_SIGNATURE.encode() + b'",'
    b'"slot":12,"type":"order"}'
)
OLD_RECORD_HASH = "8cbb212deaa5e174a057a51341155eb5525e2bdd9d9e1800e869005edf81bab3"
OLD_TRADE_BYTES = (
    b'microgrid/trade/v1\n{"buy_id":"b","buyer":"B","price":20,"quantity_wh":10,'
    b'"sell_id":"s","sell_price":20,"seller":"S","slot":3}'
)

SEED_SIGNER = Signer.from_seed(bytes(range(32)))


def test_an_order_without_steps_signs_and_encodes_the_bytes_it_did_before() -> None:
    order = Order(grid="g1", nonce=7, id="o-1", household=SEED_SIGNER.did, side=Side.SELL,
                  slot=12, quantity_wh=1500, price=23).signed_by(SEED_SIGNER)  # fmt: skip
    assert SEED_SIGNER.did == OLD_DID
    assert order.signing_bytes() == OLD_SIGNING_BYTES
    assert order.signature == OLD_SIGNATURE
    assert encode_command(order) == OLD_COMMAND
    assert record_hash(order).hex() == OLD_RECORD_HASH
    assert decode_command(OLD_COMMAND) == order and order.steps == ()
    assert order.curve == ((1500, 23),)
    trade = Trade("b", "s", 10, 20, 20, 3, "B", "S")
    assert trade.encode() == OLD_TRADE_BYTES and trade.trade_id == "3:b:s"
    assert "part" not in trade.to_json()


def test_a_curve_order_signs_its_steps() -> None:
    order = Order(grid="g1", nonce=7, id="o-1", household=SEED_SIGNER.did, side=Side.BUY,
                  slot=12, quantity_wh=300, price=30,
                  steps=((100, 30), (200, 20))).signed_by(SEED_SIGNER)  # fmt: skip
    assert b'"steps":[[100,30],[200,20]]' in order.signing_bytes()
    data = encode_command(order)
    assert decode_command(data) == order and order.verify(SEED_SIGNER.did)
    # the steps are covered by the signature: changing one breaks it
    forged = decode_command(data.replace(b"[200,20]", b"[200,19]"))
    assert not forged.verify(SEED_SIGNER.did)
    assert Trade("b", "s", 1, 2, 2, 3, part=2).trade_id == "3:b:s/2"


def _fields(**kw: object) -> dict[str, object]:
    base: dict[str, object] = dict(type="order", grid="g", nonce=1, id="o", household="h",
                                   side="buy", slot=1, quantity_wh=300, price=30,
                                   steps=[[100, 30], [200, 20]])  # fmt: skip
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"steps": [[100, 30], [200, 30]]}, "step prices must strictly decrease"),
        ({"side": "sell"}, "a sell curve's step prices must strictly increase"),
        ({"quantity_wh": 301}, "quantity_wh 301 is not the total 300 of the steps"),
        ({"price": 29}, "price 29 is not the first step's price 30"),
        ({"steps": [[300, 30]], "quantity_wh": 300}, "a curve has 2 to 16 steps, not 1"),
        ({"steps": [[1, 40 - i] for i in range(MAX_CURVE_STEPS + 1)], "quantity_wh": 17,
          "price": 40}, "steps: Tuple should have at most 16 items"),
        ({"steps": [[100, 30], [200, 2_000_000]]}, "steps.1.1: Input should be less than"),
        ({"steps": [[100, 30], [-1, 20]], "quantity_wh": 99}, "steps.1.0: Input should be"),
        ({"steps": [[100, 30], [200, True]]}, "steps.1.1: Input should be a valid integer"),
        ({"steps": [[100, 30, 1], [200, 20]]}, "steps.0: Tuple should have at most 2 items"),
    ],
)  # fmt: skip
def test_a_malformed_curve_is_refused_where_it_is_decoded(change: dict, says: str) -> None:
    data = json.dumps(_fields(**change)).encode()
    with pytest.raises(CommandDecodeError, match="malformed command") as caught:
        decode_command(data)
    assert says in str(caught.value)


# --- admission: the limits and reasons of a plain order -----------------------------------------


def world(**kw: object) -> World:
    w = World(**kw)  # type: ignore[arg-type]
    for name in ("alice", "bob", "carol", "dave"):
        w.register(name)
    return w


def curve(w: World, name: str, side: str, steps: list[tuple[int, int]], slot: int = 1,
          oid: str = "") -> Order:  # fmt: skip
    """A signed curve order (a plain one for a single step)."""
    s = w.homes[name]
    fields: dict[str, object] = {}
    if len(steps) > 1:
        fields["steps"] = tuple(steps)
    return Order(grid=GRID, id=oid or f"{name}-{slot}-{side}-{w.nonces.get(s.did, 0) + 1}",
                 household=s.did, side=side, slot=slot, quantity_wh=sum(q for q, _ in steps),
                 price=steps[0][1], nonce=w.nonce(s.did), **fields).signed_by(s)  # fmt: skip


def test_curve_orders_are_admitted_with_todays_limits_and_reasons() -> None:
    w = world()
    w.ok(curve(w, "alice", "buy", [(100, 30), (200, 20), (50, 8)]))
    w.ok(curve(w, "bob", "sell", [(100, 8), (200, 31), (50, 32)]))
    cases = [
        (curve(w, "carol", "buy", [(100, 33), (100, 20)]), RejectReason.PRICE_OUT_OF_BAND,
         "price 33 outside [8, 32] in slot 1"),
        (curve(w, "carol", "buy", [(100, 30), (100, 7)]), RejectReason.PRICE_OUT_OF_BAND,
         "step 1 price 7 outside [8, 32]"),
        (curve(w, "carol", "sell", [(100, 9), (100, 33)]), RejectReason.PRICE_OUT_OF_BAND,
         "step 1 price 33 outside"),
        (curve(w, "carol", "buy", [(100, 30), (0, 20)]), RejectReason.INVALID_QUANTITY,
         "step 1 quantity 0 Wh outside 1..1000000"),
        (curve(w, "carol", "buy", [(600_000, 30), (400_001, 20)]),
         RejectReason.INVALID_QUANTITY, "quantity 1000001 Wh outside 1..1000000"),
        (curve(w, "carol", "sell", [(10_000, 9), (2_601, 10)]), RejectReason.OVER_SELL_LIMIT,
         "offers of 12601 Wh in slot 1 exceed the 12600 Wh"),
        (curve(w, "alice", "sell", [(10, 9), (10, 10)]), RejectReason.CONFLICTING_SIDE,
         "household already has a buy order in slot 1"),
    ]  # fmt: skip
    for order, reason, says in cases:
        rejected = w.rejected(order)
        assert rejected.reason == reason and says in rejected.detail, (rejected, says)
    # the sell limit counts a curve's total with the household's other offers
    w.ok(curve(w, "carol", "sell", [(10_000, 9), (2_600, 10)]))
    rejected = w.rejected(curve(w, "carol", "sell", [(1, 9)]))
    assert rejected.reason == RejectReason.OVER_SELL_LIMIT
    book = w.state.books[1]
    assert [o.quantity_wh for o in book.values()] == [350, 350, 12_600]


def test_orders_are_accepted_for_every_slot_up_to_the_horizon() -> None:
    w = world()
    w.close(1)  # the horizon counts from the last closed gate
    horizon = w.config.slot_horizon
    for slot in (2, 3, 50, 1 + horizon):
        w.ok(curve(w, "alice", "buy", [(100, 30), (100, 20)], slot=slot))
        w.ok(w.order("bob", "sell", 150, 10, slot=slot))
    too_far = w.rejected(curve(w, "alice", "buy", [(100, 30), (100, 20)], slot=2 + horizon))
    assert too_far.reason == RejectReason.SLOT_TOO_FAR
    events = w.close(2)
    (gate,) = [e for e in events if isinstance(e, GateClosed)]
    assert gate.clearing.volume_wh == 150 and sorted(w.state.books) == [3, 50, 1 + horizon]


def test_a_rules_change_withdraws_a_curve_whose_any_step_leaves_the_band() -> None:
    w = world()
    inside = curve(w, "alice", "buy", [(100, 30), (100, 20)])
    low_tail = curve(w, "bob", "buy", [(100, 25), (100, 9)])  # its last step falls below
    high_tail = curve(w, "carol", "sell", [(100, 12), (100, 31)])  # its last step rises above
    plain = w.order("dave", "sell", 100, 10)
    for order in (inside, low_tail, high_tail, plain):
        w.ok(order)
    (accepted,) = w.ok(w.govern(ChangeRules, 1, feed_in_tariff=10, retail_price=30))
    assert accepted.withdrawn == (low_tail, high_tail)  # type: ignore[attr-defined]
    assert list(w.state.books[1]) == [inside.id, plain.id]
    assert config_at(w.state, 1).tariffs_at(1).feed_in == 10
    # a curve is refused on entry as its step would be withdrawn
    refused = w.rejected(curve(w, "bob", "buy", [(100, 25), (100, 9)], oid="again"))
    assert refused.reason == RejectReason.PRICE_OUT_OF_BAND


# --- clearing: a unit-level reference, the welfare optimum, IR, budget balance ------------------


def book_order(i: int, side: str, steps: list[tuple[int, int]]) -> Order:
    fields: dict[str, object] = {"steps": tuple(steps)} if len(steps) > 1 else {}
    return Order(grid="g", nonce=i, id=f"o{i}", household=f"h{i}", side=side, slot=1,
                 quantity_wh=sum(q for q, _ in steps), price=steps[0][1], **fields)  # fmt: skip


@st.composite
def small_books(draw: st.DrawFn, max_steps: int = 9) -> list[Order]:
    """Books of plain and curve orders with tiny quantities, at most ``max_steps`` steps in
    all (so every allocation can be enumerated)."""
    orders: list[Order] = []
    used = 0
    for i in range(draw(st.integers(0, 6))):
        side = draw(st.sampled_from(["buy", "sell"]))
        n = draw(st.integers(1, min(3, max_steps - used))) if used < max_steps else 0
        if n == 0:
            break
        prices = sorted(draw(st.sets(st.integers(1, 9), min_size=n, max_size=n)))
        if side == "buy":
            prices.reverse()
        top = 3 if n == 1 else 2
        steps = [(draw(st.integers(1, top)), p) for p in prices]
        orders.append(book_order(i, side, steps))
        used += n
    return orders


def units(orders: list[Order], side: str) -> list[tuple[int, str]]:
    """Every Wh of one side as (step price, order id), in the auction's priority order: price
    (descending for bids), then position in the book; steps of an order in step order."""
    steps = [(p, pos, o.id, q) for pos, o in enumerate(orders) if o.side == side
             for q, p in o.curve]  # fmt: skip
    steps.sort(key=(lambda s: (-s[0], s[1])) if side == "buy" else (lambda s: (s[0], s[1])))
    return [(p, oid) for p, _, oid, q in steps for _ in range(q)]


def reference(orders: list[Order], mechanism: str, k: Fraction) -> list[tuple]:
    """The trades clearing must give, computed one Wh at a time: (buy id, sell id, Wh, price,
    sell price, part), merged per order pair and prices at the first Wh's place. Each matched
    Wh is also checked to be individually rational for its two steps."""
    bids, asks = units(orders, "buy"), units(orders, "sell")
    volume = 0
    while volume < min(len(bids), len(asks)) and bids[volume][0] >= asks[volume][0]:
        volume += 1
    if volume == 0:
        return []

    def split(a: int, b: int) -> int:
        return a + k.numerator * (b - a) // k.denominator

    b, a = bids[volume - 1][0], asks[volume - 1][0]
    pairs = list(zip(bids[:volume], asks[:volume], strict=True))
    if mechanism == "uniform":
        priced = [(bu, au, split(a, b), split(a, b)) for bu, au in pairs]
    elif mechanism == "pay_as_bid":
        priced = [(bu, au, split(au[0], bu[0]), split(au[0], bu[0])) for bu, au in pairs]
    else:
        nb = bids[volume][0] if volume < len(bids) else None
        na = asks[volume][0] if volume < len(asks) else None
        p0 = None if nb is None or na is None else na + (nb - na) // 2
        if p0 is not None and a <= p0 <= b:
            priced = [(bu, au, p0, p0) for bu, au in pairs]
        else:  # the marginal orders leave the book with every step
            out_b, out_a = bids[volume - 1][1], asks[volume - 1][1]
            kb = [u for u in bids[: volume - 1] if u[1] != out_b]
            ka = [u for u in asks[: volume - 1] if u[1] != out_a]
            priced = [(bu, au, b, a) for bu, au in zip(kb, ka, strict=False)]
    merged: dict[tuple, list] = {}
    parts: dict[tuple, int] = {}
    for (bp, bid), (ap, aid), price, sell_price in priced:
        assert price <= bp and sell_price >= ap and sell_price <= price  # IR, no deficit
        key = (bid, aid, price, sell_price)
        if key not in merged:
            merged[key] = [bid, aid, 0, price, sell_price, parts.get((bid, aid), 0)]
            parts[(bid, aid)] = parts.get((bid, aid), 0) + 1
        merged[key][2] += 1
    return [tuple(m) for m in merged.values()]


def optimum(orders: list[Order]) -> tuple[int, int]:
    """The largest welfare any allocation reaches (sum of filled bid steps' prices minus
    filled ask steps' prices, in Wh x price) and the largest volume reaching it, by
    enumerating every fill of every step."""

    def best(side: str, better: object) -> dict[int, int]:
        steps = [s for o in orders if o.side == side for s in o.curve]
        out: dict[int, int] = {}
        for fill in itertools.product(*(range(q + 1) for q, _ in steps)):
            v, money = sum(fill), sum(x * p for x, (_, p) in zip(fill, steps, strict=True))
            if v not in out or better(money, out[v]):  # type: ignore[operator]
                out[v] = money
        return out

    value = best("buy", lambda x, y: x > y)
    cost = best("sell", lambda x, y: x < y)
    welfare = {v: value[v] - cost[v] for v in value if v in cost}
    top = max(welfare.values())
    return top, max(v for v, w in welfare.items() if w == top)


def as_rows(trades: list[Trade]) -> list[tuple]:
    return [(t.buy_id, t.sell_id, t.quantity_wh, t.price, t.sell_price, t.part) for t in trades]


KS = st.sampled_from([Fraction(0), Fraction(1, 2), Fraction(1, 3), Fraction(1)])


@settings(max_examples=150, deadline=None)
@given(small_books(), st.sampled_from(["uniform", "pay_as_bid"]), KS)
def test_clearing_reaches_the_brute_force_welfare_optimum(
    orders: list[Order], mechanism: str, k: Fraction
) -> None:
    c = clear(orders, mechanism, k)
    assert as_rows(c.trades) == reference(orders, mechanism, k)
    welfare, volume = optimum(orders)
    assert c.volume_wh == volume == sum(t.quantity_wh for t in c.trades)
    filled = units(orders, "buy")[:volume], units(orders, "sell")[:volume]
    assert sum(p for p, _ in filled[0]) - sum(p for p, _ in filled[1]) == welfare
    assert c.bid_volume_wh == sum(o.quantity_wh for o in orders if o.side == "buy")
    check_trades(orders, c.trades, uniform=mechanism == "uniform")


@settings(max_examples=150, deadline=None)
@given(small_books(max_steps=12))
def test_mcafee_on_curves_is_rational_in_surplus_and_never_trades_more(
    orders: list[Order],
) -> None:
    c = clear(orders, "mcafee")
    assert as_rows(c.trades) == reference(orders, "mcafee", Fraction(1, 2))
    assert c.volume_wh <= clear(orders, "uniform").volume_wh
    check_trades(orders, c.trades, uniform=True)
    bids = units(orders, "buy")
    uniform_volume = clear(orders, "uniform").volume_wh
    if c.volume_wh < uniform_volume and c.trades:  # a reduction: the marginal orders are out
        marginal = {bids[uniform_volume - 1][1], units(orders, "sell")[uniform_volume - 1][1]}
        assert not marginal & {i for t in c.trades for i in (t.buy_id, t.sell_id)}


def check_trades(orders: list[Order], trades: list[Trade], *, uniform: bool) -> None:
    """Every order fills a prefix of its steps and a buyer (seller) never pays more (gets
    less) than its filled steps are worth; with one price for all (``uniform``: uniform and
    McAfee) every trade is priced at most (least) the lowest (highest) step price it filled;
    the buyer pays at least what the seller gets; trade ids are unique. (Pay-as-bid's per-step
    rationality is checked Wh by Wh in :func:`reference`.)"""
    by_id = {o.id: o for o in orders}
    filled: dict[str, int] = {}
    for t in trades:
        for oid in (t.buy_id, t.sell_id):
            filled[oid] = filled.get(oid, 0) + t.quantity_wh
        assert t.price >= t.sell_price
    for oid, wh in filled.items():
        order = by_id[oid]
        assert wh <= order.quantity_wh
        left, worst, worth = wh, None, 0
        for q, p in order.curve:  # the prefix of steps the fills cover
            if left <= 0:
                break
            take = min(q, left)
            worth += take * p
            worst, left = p, left - take
        mine = [t for t in trades if oid in (t.buy_id, t.sell_id)]
        if order.side == "buy":
            assert not uniform or all(t.price <= worst for t in mine)  # type: ignore[operator]
            assert sum(t.quantity_wh * t.price for t in mine) <= worth
        else:
            assert not uniform or all(t.sell_price >= worst for t in mine)  # type: ignore[operator]
            assert sum(t.quantity_wh * t.sell_price for t in mine) >= worth
    ids = [Trade(*t[:5], slot=1, part=t.part).trade_id for t in trades]
    assert len(set(ids)) == len(ids)


def test_two_steps_against_one_order_make_one_trade_or_numbered_parts() -> None:
    buy = book_order(0, "buy", [(100, 30), (100, 20)])
    sell = book_order(1, "sell", [(50, 10), (150, 14)])
    uniform = clear([buy, sell], "uniform")
    assert as_rows(uniform.trades) == [("o0", "o1", 200, 17, 17, 0)]
    pab = clear([buy, sell], "pay_as_bid")  # (30,10) 50 Wh, (30,14) 50 Wh, (20,14) 100 Wh
    assert as_rows(pab.trades) == [
        ("o0", "o1", 50, 20, 20, 0), ("o0", "o1", 50, 22, 22, 1), ("o0", "o1", 100, 17, 17, 2),
    ]  # fmt: skip
    assert [t._replace(slot=4).trade_id for t in pab.trades] == [
        "4:o0:o1", "4:o0:o1/1", "4:o0:o1/2"
    ]  # fmt: skip
    # equal prices merge wherever they fall: (30,10) and (20,20) both give 20 at k = 1/2
    a = book_order(2, "buy", [(1, 30), (1, 20)])
    b = book_order(3, "sell", [(1, 10), (1, 20)])
    assert as_rows(clear([a, b], "pay_as_bid").trades) == [("o2", "o3", 2, 20, 20, 0)]


def test_mcafee_excludes_the_whole_marginal_curve_order() -> None:
    # the marginal bid Wh is step 2 of o0: o0 leaves with both steps, o2 trades with o3
    orders = [book_order(0, "buy", [(1, 9), (1, 6)]), book_order(1, "sell", [(1, 2)]),
              book_order(2, "buy", [(1, 8)]), book_order(3, "sell", [(2, 4)])]  # fmt: skip
    c = clear(orders, "mcafee")
    assert as_rows(c.trades) == [("o2", "o1", 1, 6, 4, 0)]
    # excluding only the marginal step would have let o0 set the price it pays itself
    assert c.volume_wh == 1 and clear(orders, "uniform").volume_wh == 3


# --- the engine: budget balance with grid fees, replay from a snapshot --------------------------

NAMES = ("alice", "bob", "carol", "dave")


@st.composite
def engine_books(draw: st.DrawFn) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """Per household: a side and a curve (one to four steps) in the band [8, 32]; offers stay
    within the sell floor (1,260 Wh) whatever a household delivered."""
    out = []
    for name in NAMES:
        if not draw(st.booleans()):
            continue
        side = draw(st.sampled_from(["buy", "sell"]))
        n = draw(st.integers(1, 4))
        prices = sorted(draw(st.sets(st.integers(8, 32), min_size=n, max_size=n)))
        if side == "buy":
            prices.reverse()
        out.append((name, side, [(draw(st.integers(1, 300)), p) for p in prices]))
    return out


def fee_world(mechanism: str, local_fee: int, grid_fee: int) -> World:
    w = World(mechanism=mechanism)
    w.config = replace(w.config, local_fee=local_fee, grid_fee=grid_fee)
    w.state = State.initial(w.config)
    for name in NAMES:
        w.register(name)
    return w


def slot_commands(w: World, books: list, slot: int, meters: dict[str, list[int]]) -> list:
    """A slot's orders, gate, readings (every household's counters move a little) and
    settlement."""
    out: list = [curve(w, name, side, steps, slot=slot) for name, side, steps in books]
    out.append(CloseGate(slot=slot))
    for i, name in enumerate(NAMES):
        meters[name][0] += 37 * (i + 1) * slot % 500
        meters[name][1] += 53 * (i + 2) * slot % 700
        out.append(w.reading(name, slot, *meters[name]))
    out.append(SettleSlot(slot=slot))
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.lists(engine_books(), min_size=3, max_size=3),
    st.sampled_from(["uniform", "pay_as_bid", "mcafee"]),
    st.integers(0, 7),
    st.integers(0, 9),
)
def test_settled_curve_trades_balance_and_the_network_gets_exactly_the_fees(
    books: list, mechanism: str, local_fee: int, grid_fee: int
) -> None:
    w = fee_world(mechanism, local_fee, grid_fee)
    meters = {name: [0, 0] for name in NAMES}
    commands = [c for slot, b in enumerate(books, 1) for c in slot_commands(w, b, slot, meters)]
    state = w.state.copy()  # the four households registered
    fees = 0
    for cmd in commands:
        state, events = apply(state, cmd)
        assert not any(type(e).__name__ == "Rejected" for e in events), events
        for ev in events:
            if isinstance(ev, SlotSettled):
                for t in ev.trades:  # IR per order: never beyond the first step's price
                    assert t.sell_price <= t.price
                for s in ev.settlements:
                    fees += money_for(s.bought_wh, local_fee)
                    fees += money_for(max(-s.imbalance_wh, 0) + s.gap_import_wh, grid_fee)
                for tx in ev.transactions:
                    assert tx.is_balanced()
                assert len({t.trade_id for t in ev.trades}) == len(ev.trades)
        assert state.balances.get((MARKET, MONEY), 0) >= 0  # the market never pays in
    assert state.height == 3
    assert state.balances.get((NETWORK, MONEY), 0) == fees
    assert sum(v for (_, asset), v in state.balances.items() if asset == MONEY) == 0


@settings(max_examples=15, deadline=None)
@given(st.lists(engine_books(), min_size=4, max_size=4), st.integers(1, 40),
       st.sampled_from(["uniform", "pay_as_bid", "mcafee"]))  # fmt: skip
def test_replicas_agree_and_one_restored_from_a_snapshot_mid_way_continues_the_same(
    books: list, cut: int, mechanism: str
) -> None:
    w = fee_world(mechanism, 2, 3)
    meters = {name: [0, 0] for name in NAMES}
    commands = [c for slot, b in enumerate(books, 1) for c in slot_commands(w, b, slot, meters)]
    # orders for later slots rest in the books while earlier slots settle
    commands[1:1] = [curve(w, "alice", "buy", [(300, 30), (200, 20)], slot=5),
                     curve(w, "bob", "sell", [(100, 9), (400, 15)], slot=5)]  # fmt: skip
    cut = min(cut, len(commands) - 1)

    def run(state: State, cmds: list) -> tuple[State, list[str]]:
        hashes = []
        for cmd in cmds:
            state, events = apply(state, cmd)
            hashes += [e.block.hash for e in events if isinstance(e, SlotSettled)]
        return state, hashes

    a, blocks_a = run(w.state.copy(), commands)
    b, first = run(w.state.copy(), commands[:cut])
    snap = dump_state(b)
    restored = load_state(snap)
    assert dump_state(restored) == snap
    b, rest = run(restored, commands[cut:])
    assert first + rest == blocks_a and state_digest(a) == state_digest(b)
    assert a.head_hash == b.head_hash and len(blocks_a) == 4
    assert list(a.books[5]) == list(b.books[5]) and any(o.steps for o in a.books[5].values())


def test_a_snapshot_of_books_without_curves_has_no_steps_and_parts_are_checked() -> None:
    w = world(mechanism="pay_as_bid")
    w.ok(w.order("alice", "buy", 100, 30, slot=2))
    plain = dump_state(w.state)
    assert b'"steps"' not in plain and load_state(plain).books == w.state.books
    w.ok(curve(w, "bob", "sell", [(50, 10), (150, 14)]))
    w.ok(curve(w, "carol", "buy", [(100, 30), (100, 20)], oid="c"))
    w.close(1)
    trades = w.state.cleared[1]
    assert [t.part for t in trades if t.buy_id == "c"] == [0, 1, 2]
    snap = dump_state(w.state)
    assert load_state(snap).cleared == w.state.cleared
    doc = json.loads(snap.split(b"\n", 1)[1])
    for bad, says in ((0, "part: expected an integer in 1..32"), (True, "part: expected")):
        doc["cleared"]["1"][1]["part"] = bad
        altered = snap.split(b"\n", 1)[0] + b"\n" + json.dumps(doc).encode()
        with pytest.raises(ValueError, match=says):
            load_state(altered)


# --- gossip validation --------------------------------------------------------------------------


def test_the_gossip_validator_accepts_a_curve_and_refuses_a_malformed_one() -> None:
    from node.net.validator import GossipValidator
    from node.net.wire import TopicKind, encode_batch, encode_uvarint
    from node.setup.keyfile import NodeIdentity

    a = NodeIdentity.from_seed(b"a" * 32)
    v = GossipValidator("g", {str(a.peer_id): a.did}, clock=lambda: 0.0)
    peer = str(a.peer_id)

    def order(nonce: int, **kw: object) -> Order:
        fields: dict[str, object] = dict(grid="g", nonce=nonce, id=f"o{nonce}",
                                         household=a.did, side=Side.BUY, slot=5,
                                         quantity_wh=300, price=30,
                                         steps=((100, 30), (200, 20)))  # fmt: skip
        fields.update(kw)
        return Order(**fields).signed_by(a.signer)  # type: ignore[arg-type]

    assert v.validate(TopicKind.ORDERS, peer, peer, encode_batch([order(1)])).ok
    good = encode_command(order(2))
    for bad in (
        good.replace(b"[200,20]", b"[200,30]"),  # prices not decreasing
        good.replace(b'"quantity_wh":300', b'"quantity_wh":299'),  # not the total
        encode_command(order(3, steps=(), quantity_wh=300)).replace(
            b'"slot":5,', b'"slot":5,"steps":[],'
        ),  # a plain order spelled with empty steps: not canonical
    ):
        data = b"\x01\x00\x01" + encode_uvarint(len(bad)) + bad
        verdict = v.validate(TopicKind.ORDERS, peer, peer, data)
        assert not verdict.ok and verdict.reason == "malformed", verdict
    # a curve signed for other steps does not verify
    forged = good.replace(b"[200,20]", b"[200,19]")
    data = b"\x01\x00\x01" + encode_uvarint(len(forged)) + forged
    assert v.validate(TopicKind.ORDERS, peer, peer, data).reason == "bad_signature"
