"""The contract engine end to end: orders, gate closure, readings, settlement, blocks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from market import GateClosed, RejectReason, SlotSettled
from market.accounting import ENERGY, GRID, MONEY, household_account, money_for
from market.errors import Rejection
from market.state import NONCE_TRIM_STEP, NonceWindow
from tests.market.world import World


def trading_world() -> World:
    w = World()
    for name in ("alice", "bob", "carol"):
        w.register(name)
    return w


def settled(events: list) -> SlotSettled:
    (ev,) = [e for e in events if isinstance(e, SlotSettled)]
    return ev


def test_a_slot_clears_and_settles_metered_energy() -> None:
    w = trading_world()
    # Slot 0 establishes every meter's counter baseline.
    w.close(0)
    for name in ("alice", "bob", "carol"):
        w.ok(w.reading(name, 0, 1000, 1000))
    w.settle(0)

    w.ok(w.order("alice", "sell", 1000, 10))
    w.ok(w.order("bob", "buy", 600, 30))
    w.ok(w.order("carol", "buy", 600, 20))
    (gate,) = [e for e in w.close(1) if isinstance(e, GateClosed)]
    assert gate.clearing.price == 10 + (20 - 10) // 2 == 15
    assert [(t.buyer, t.seller, t.quantity_wh) for t in gate.trades] == [
        (w.homes["bob"].did, w.homes["alice"].did, 600),
        (w.homes["carol"].did, w.homes["alice"].did, 400),
    ]
    # Alice delivers only 700 of the 1000 Wh she sold; bob draws 650, carol 400.
    w.ok(w.reading("alice", 1, 1000, 1700))
    w.ok(w.reading("bob", 1, 1650, 1000))
    w.ok(w.reading("carol", 1, 1400, 1000))
    ev = settled(w.settle(1))
    by = {s.household: s for s in ev.settlements}
    alice, bob, carol = (by[w.homes[n].did] for n in ("alice", "bob", "carol"))
    assert (alice.sold_wh, alice.delivered_wh, alice.imbalance_wh) == (1000, 700, -300)
    assert (bob.bought_wh, bob.consumed_wh, bob.imbalance_wh) == (600, 600, -50)
    assert (carol.bought_wh, carol.consumed_wh, carol.imbalance_wh) == (400, 400, 0)

    bal = w.state.balances
    acct = {n: household_account(w.homes[n].did) for n in ("alice", "bob", "carol")}
    # Alice: paid for 1000 Wh at 15, buys her 300 Wh shortfall from the grid at retail 32.
    assert bal[(acct["alice"], MONEY)] == money_for(1000, 15) - money_for(300, 32)
    assert bal[(acct["bob"], MONEY)] == -money_for(600, 15) - money_for(50, 32)
    assert bal[(acct["carol"], MONEY)] == -money_for(400, 15)
    # Energy positions follow the meters: alice net exported 700, bob imported 650, carol 400.
    assert bal[(acct["alice"], ENERGY)] == -700
    assert bal[(acct["bob"], ENERGY)] == 650
    assert bal[(acct["carol"], ENERGY)] == 400
    assert bal[(GRID, ENERGY)] == -350
    for asset in (MONEY, ENERGY):
        assert sum(v for (_, a), v in bal.items() if a == asset) == 0
    assert all(tx.is_balanced() for tx in ev.transactions)
    assert w.state.reputation[w.homes["alice"].did].score_permille == 700
    assert ev.block.height == 2 and ev.block.prev_hash != ev.block.hash


def test_missing_reading_settles_as_zero_delivery() -> None:
    w = trading_world()
    w.close(0)
    for name in ("alice", "bob"):
        w.ok(w.reading(name, 0, 0, 0))
    w.settle(0)
    w.ok(w.order("alice", "sell", 500, 10))
    w.ok(w.order("bob", "buy", 500, 20))
    w.close(1)
    w.ok(w.reading("bob", 1, 500, 0))
    ev = settled(w.settle(1))
    alice = next(s for s in ev.settlements if s.household == w.homes["alice"].did)
    assert not alice.measured and alice.delivered_wh == 0 and alice.imbalance_wh == -500
    rep = w.state.reputation[w.homes["alice"].did]
    assert rep.missed_readings == 1
    assert rep.score_permille == 0  # sold 500 Wh, delivered none


def test_rejections_each_have_a_typed_reason() -> None:
    w = trading_world()
    stranger_world = World()
    stranger_world.register("mallory")
    mallory_order = stranger_world.order("mallory", "sell", 100, 10)

    good = w.order("alice", "sell", 100, 10)
    forged = good.model_copy(update={"quantity_wh": 10_000})
    assert w.rejected(forged).reason == RejectReason.BAD_SIGNATURE
    assert w.rejected(mallory_order).reason == RejectReason.UNKNOWN_HOUSEHOLD
    w.ok(good)
    assert w.rejected(good).reason == RejectReason.REPLAYED_NONCE
    with pytest.raises(ValidationError, match="quantity_wh"):  # refused by the model's bounds
        w.order("alice", "sell", -5, 10)
    assert w.rejected(w.order("alice", "sell", 0, 10)).reason == RejectReason.INVALID_QUANTITY
    assert w.rejected(w.order("alice", "sell", 100, 7)).reason == RejectReason.PRICE_OUT_OF_BAND
    assert w.rejected(w.order("alice", "sell", 100, 33)).reason == RejectReason.PRICE_OUT_OF_BAND
    assert w.rejected(w.order("alice", "buy", 100, 20)).reason == RejectReason.CONFLICTING_SIDE
    dup = w.order("bob", "buy", 100, 20, oid=good.id)
    assert w.rejected(dup).reason == RejectReason.DUPLICATE_ORDER
    other_grid = good.model_copy(update={"grid": "elsewhere", "nonce": 99})
    assert w.rejected(other_grid).reason == RejectReason.WRONG_GRID

    w.close(1)
    assert w.rejected(w.order("bob", "buy", 100, 20, slot=1)).reason == RejectReason.GATE_CLOSED
    assert w.rejected(w.order("bob", "buy", 100, 20, slot=500)).reason == RejectReason.SLOT_TOO_FAR
    assert w.rejected(w.cancel("alice", good.id)).reason == RejectReason.UNKNOWN_ORDER

    w.ok(w.reading("alice", 1, 10, 20))
    assert w.rejected(w.reading("alice", 1, 10, 30)).reason == RejectReason.DUPLICATE_READING
    assert w.rejected(w.reading("bob", 2, 0, 0)).reason == RejectReason.SLOT_NOT_CLOSED
    assert (
        w.rejected(w.reading("bob", 1, 0, 0, serial="OTHER")).reason == RejectReason.UNKNOWN_METER
    )
    with pytest.raises(ValidationError, match="import_wh"):
        w.reading("bob", 1, -1, 0)
    w.settle(1)
    assert w.rejected(w.reading("bob", 1, 0, 0)).reason == RejectReason.SLOT_SETTLED
    w.close(2)
    assert w.rejected(w.reading("alice", 2, 9, 20)).reason == RejectReason.COUNTER_REGRESSION
    assert w.rejected(w.reading("alice", 2, 10, 19)).reason == RejectReason.COUNTER_REGRESSION


def test_system_commands_out_of_sequence_are_rejected() -> None:
    from market import CloseGate, SettleSlot

    w = trading_world()
    assert w.rejected(SettleSlot(slot=0)).reason == RejectReason.SLOT_NOT_CLOSED
    w.close(5)
    assert w.rejected(CloseGate(slot=5)).reason == RejectReason.OUT_OF_SEQUENCE
    assert w.rejected(CloseGate(slot=7)).reason == RejectReason.OUT_OF_SEQUENCE
    assert w.rejected(SettleSlot(slot=6)).reason == RejectReason.OUT_OF_SEQUENCE
    w.settle(5)
    assert w.rejected(SettleSlot(slot=5)).reason == RejectReason.SLOT_SETTLED
    assert w.rejected(SettleSlot(slot=6)).reason == RejectReason.SLOT_NOT_CLOSED


def test_membership_is_signed_by_the_operator() -> None:
    from market import MemberRegistration, MemberRole

    w = trading_world()
    impostor = w.homes["alice"]
    reg = MemberRegistration(
        grid=w.config.grid,
        operator=impostor.did,
        household=impostor.did,
        meter_serial="X",
        role=MemberRole.VOTER,
        nonce=1,
    ).signed_by(impostor)
    assert w.rejected(reg).reason == RejectReason.NOT_OPERATOR
    bad_did = MemberRegistration(
        grid=w.config.grid,
        operator=w.operator.did,
        household="did:key:zNOTAKEY",
        meter_serial="X",
        role=MemberRole.VOTER,
        nonce=w.nonce(w.operator.did),
    ).signed_by(w.operator)
    assert w.rejected(bad_did).reason == RejectReason.INVALID_HOUSEHOLD_ID
    forged = reg.model_copy(update={"operator": w.operator.did})
    assert w.rejected(forged).reason == RejectReason.BAD_SIGNATURE


def test_cancel_removes_only_own_open_orders() -> None:
    w = trading_world()
    o = w.order("alice", "sell", 100, 10)
    w.ok(o)
    assert w.rejected(w.cancel("bob", o.id)).reason == RejectReason.UNKNOWN_ORDER
    w.ok(w.cancel("alice", o.id))
    assert w.state.books[1] == {}
    (gate,) = [e for e in w.close(1) if isinstance(e, GateClosed)]
    assert gate.trades == ()


def test_meter_replacement_starts_a_new_baseline() -> None:
    w = trading_world()
    w.close(0)
    w.ok(w.reading("alice", 0, 5000, 9000))
    w.settle(0)
    w.register("alice", serial="NEW-METER")  # operator re-registers with the new meter
    w.close(1)
    # The new meter starts near zero: not a regression, because it is another meter.
    w.ok(w.reading("alice", 1, 3, 1, serial="NEW-METER"))
    ev = settled(w.settle(1))
    alice = next(s for s in ev.settlements if s.household == w.homes["alice"].did)
    assert not alice.measured  # first reading of the new meter is its baseline


def test_nonce_window_accepts_out_of_order_but_not_ancient_nonces() -> None:
    w = trading_world()
    s = w.homes["alice"]
    from market import Order

    def order(nonce: int) -> Order:
        return Order(
            grid=w.config.grid,
            id=f"n{nonce}",
            household=s.did,
            side="sell",
            slot=1,
            quantity_wh=1,
            price=10,
            nonce=nonce,
        ).signed_by(s)

    w.ok(order(5000))
    w.ok(order(4990))  # late but inside the window
    assert w.rejected(order(4990 - 2000)).reason == RejectReason.REPLAYED_NONCE
    with pytest.raises(ValidationError, match="nonce"):  # negative: refused by the model
        order(-1)


def _reference_fresh(used: set[int], highest: int, nonce: int, window: int) -> bool:
    """The anti-replay rule with every nonce ever used kept: what trimming must not change."""
    return nonce >= 0 and nonce > highest - window and nonce not in used


@settings(max_examples=200, deadline=None)
@given(
    window=st.integers(1, 300),
    steps=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 400)), max_size=300),
)
def test_nonce_window_trims_without_changing_a_verdict(
    window: int, steps: list[tuple[int, int]]
) -> None:
    """Issue 19: ``NonceWindow`` forgets the nonces its floor refuses anyway. Against a
    reference that keeps every nonce, each verdict is the same, and the set never holds a nonce
    more than ``window + NONCE_TRIM_STEP`` below the highest. Each step moves the highest nonce
    up by ``rise`` and tries ``highest - back`` (late, replayed or below the window)."""
    kept = NonceWindow()
    used: set[int] = set()
    highest = -1
    for rise, back in steps:
        for nonce in (highest + rise, highest + rise - back):
            fresh = _reference_fresh(used, highest, nonce, window)
            try:
                kept.check(nonce, window)
                verdict = True
            except Rejection:
                verdict = False
            assert verdict == fresh, (nonce, highest)
            if fresh:
                kept.consume(nonce, window)
                used.add(nonce)
                highest = max(highest, nonce)
            assert kept.highest == highest
            assert all(n > highest - window - NONCE_TRIM_STEP for n in kept.recent)


def test_nonce_window_set_is_a_function_of_the_nonces_used() -> None:
    """Trimming is decided by the nonces alone, so two replicas, or one restored from a
    snapshot half-way, hold the same set, and a household's set stays within its window over
    a long run (it grew to ``2 * nonce_window`` before: 2,048 nonces, about 1,000 slots)."""
    window = 1024
    a, b = NonceWindow(), NonceWindow()
    for slot in range(3000):
        for nonce in (4 * slot, 4 * slot + 2):
            a.consume(nonce, window)
            b.consume(nonce, window)
        if slot == 1700:  # a restart from a snapshot: the same highest and set
            b = NonceWindow(b.highest, set(b.recent))
        assert a.recent == b.recent
        assert len(a.recent) <= (window + NONCE_TRIM_STEP) // 2 + 1
