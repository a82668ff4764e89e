"""The household's Trader: signed readings at slot ends, forecast from metered slots, orders."""

from __future__ import annotations

from fractions import Fraction

import pytest

from market import MarketConfig, MeterReading, Order, Side, encode_command
from market.schedule import Schedule
from market.signing import Signer
from meter.sample import MeterSample
from node.agent.strategy import Strategy
from node.agent.trader import (
    NONCE_CANCEL,
    NONCE_MANUAL,
    NONCE_ORDER,
    NONCE_READING,
    NONCES_PER_SLOT,
    MeterMismatch,
    Trader,
)

HOUSE = Signer.from_seed(b"h" * 32)
OTHER = Signer.from_seed(b"x" * 32)
OPERATOR = Signer.from_seed(b"o" * 32)
CONFIG = MarketConfig(grid="g", operator=OPERATOR.did, feed_in_tariff=8, retail_price=30)
SCHEDULE = Schedule(slot_seconds=900, gate_lead_seconds=300, settle_delay_seconds=120)
SERIAL = "SN-1234"
SLOT = 20_000  # any slot number; nothing here reads a clock


def make_trader(strategy: Strategy | None = None, signer: Signer = HOUSE) -> Trader:
    return Trader(signer, CONFIG, SCHEDULE, SERIAL, strategy or Strategy())


def sample(import_wh: int, export_wh: int, *, epoch: int = 0, serial: str = SERIAL,
           power_w: float = 0.0) -> MeterSample:  # fmt: skip
    return MeterSample(
        meter="main", serial=serial, time=0.0, import_wh=import_wh, export_wh=export_wh,
        power_w=power_w, voltage_v=230.0, frequency_hz=50.0, epoch=epoch,
    )  # fmt: skip


def test_reading_carries_the_counters_and_is_signed_by_the_household() -> None:
    """A slot's reading holds the sample's counters, nonce slot*4+1, and a valid signature."""
    trader = make_trader()
    reading = trader.slot_ended(SLOT, sample(123_456, 7_890))
    assert isinstance(reading, MeterReading)
    assert (reading.grid, reading.household, reading.meter_serial, reading.slot) == (
        "g", HOUSE.did, SERIAL, SLOT
    )
    assert (reading.import_wh, reading.export_wh) == (123_456, 7_890)
    assert reading.nonce == SLOT * 4 + 1 == SLOT * NONCES_PER_SLOT + NONCE_READING
    assert reading.verify(HOUSE.did)
    assert not reading.verify(OTHER.did)
    # the signature covers the counters
    assert not reading.model_copy(update={"import_wh": 123_457}).verify(HOUSE.did)


def test_wrong_meter_serial_is_refused() -> None:
    """A sample from another meter raises MeterMismatch naming both serials, learns nothing."""
    trader = make_trader()
    trader.slot_ended(SLOT, sample(1_000, 0))
    with pytest.raises(MeterMismatch, match=r"'SN-9'.*'SN-1234'"):
        trader.slot_ended(SLOT + 1, sample(1_500, 0, serial="SN-9"))
    with pytest.raises(MeterMismatch):
        trader.check_meter(sample(0, 0, serial="SN-9"))
    trader.check_meter(sample(0, 0))  # the registered meter passes
    assert SLOT + 1 not in trader.boundary
    assert trader.forecaster.last is None


def test_forecast_learns_net_export_from_consecutive_slot_ends() -> None:
    """Net export of a slot = export delta - import delta between consecutive slot-end samples."""
    trader = make_trader()
    trader.slot_ended(SLOT, sample(10_000, 5_000))
    assert trader.forecaster.last is None  # one boundary is not yet a metered slot
    trader.slot_ended(SLOT + 1, sample(10_100, 7_000))
    assert trader.forecaster.last == (7_000 - 5_000) - (10_100 - 10_000)
    assert trader.forecaster.predict(SLOT + 1) == 1_900


def test_forecast_does_not_subtract_across_an_epoch_change_or_a_gap() -> None:
    """A new counter epoch (meter replaced or restarted) or a missed slot end teaches nothing."""
    trader = make_trader()
    trader.slot_ended(SLOT, sample(900_000, 800_000, epoch=0))
    trader.slot_ended(SLOT + 1, sample(50, 10, epoch=1))  # counters restarted near zero
    assert trader.forecaster.last is None
    assert trader.order_for(SLOT + 2) is None
    trader.slot_ended(SLOT + 3, sample(150, 10, epoch=1))  # slot SLOT+2's end was missed
    assert trader.forecaster.last is None
    trader.slot_ended(SLOT + 4, sample(450, 10, epoch=1))
    assert trader.forecaster.last == -300  # only the consecutive pair on one epoch counts


def test_order_sells_only_the_safety_share_of_a_surplus() -> None:
    """A forecast surplus is offered at safety x surplus at the sell limit, once per slot."""
    strategy = Strategy(safety=Fraction(1, 2))
    trader = make_trader(strategy)
    trader.slot_ended(SLOT, sample(10_000, 5_000))
    trader.slot_ended(SLOT + 1, sample(10_000, 6_001))  # net export 1001 Wh
    order = trader.order_for(SLOT + 3)
    assert isinstance(order, Order)
    sell_limit, _ = strategy.limits(CONFIG)
    assert (order.side, order.quantity_wh, order.price) == (Side.SELL, 1_001 // 2, sell_limit)
    assert (order.slot, order.household, order.grid) == (SLOT + 3, HOUSE.did, "g")
    assert order.nonce == (SLOT + 3) * NONCES_PER_SLOT + NONCE_ORDER
    assert order.id == f"{SLOT + 3}-{HOUSE.did[-8:]}"
    assert order.verify(HOUSE.did)
    assert trader.order_for(SLOT + 3) is None  # at most one agent order per slot
    assert trader.order_for(SLOT + 4) is not None  # the next slot gets its own


def test_an_offer_is_cut_to_what_the_delivery_record_allows_and_a_bid_is_not() -> None:
    """The engine caps a household's offers per slot by its delivery record; the agent offers
    at most that (an order beyond it would be refused whole)."""
    trader = make_trader(Strategy(safety=Fraction(1, 1)))
    trader.slot_ended(SLOT, sample(10_000, 5_000))
    trader.slot_ended(SLOT + 1, sample(10_000, 7_000))  # net export 2000 Wh
    order = trader.order_for(SLOT + 3, max_offer_wh=1_260)
    assert order is not None and (order.side, order.quantity_wh) == (Side.SELL, 1_260)
    assert trader.order_for(SLOT + 4, max_offer_wh=5) is None  # below the minimum: no order
    buyer = make_trader()
    buyer.slot_ended(SLOT, sample(10_000, 0))
    buyer.slot_ended(SLOT + 1, sample(10_750, 0))
    order = buyer.order_for(SLOT + 2, max_offer_wh=100)
    assert order is not None and (order.side, order.quantity_wh) == (Side.BUY, 750)


def test_order_bids_for_the_whole_deficit() -> None:
    """A forecast deficit is bid in full at the buy limit."""
    strategy = Strategy(buy_cap=27)
    trader = make_trader(strategy)
    trader.slot_ended(SLOT, sample(10_000, 0))
    trader.slot_ended(SLOT + 1, sample(10_750, 0))
    order = trader.order_for(SLOT + 2)
    assert order is not None
    assert (order.side, order.quantity_wh, order.price) == (Side.BUY, 750, 27)


def test_no_order_without_forecast_or_below_the_minimum() -> None:
    """Without any metered slot, or with a forecast below min_order_wh, no order is made."""
    trader = make_trader(Strategy(min_order_wh=10))
    assert trader.order_for(SLOT) is None
    trader.slot_ended(SLOT, sample(10_000, 0))
    trader.slot_ended(SLOT + 1, sample(10_009, 0))  # 9 Wh deficit
    assert trader.order_for(SLOT + 2) is None
    assert SLOT + 2 not in trader.ordered  # nothing placed: a later forecast may still order


def test_instantaneous_power_seeds_the_forecast_once() -> None:
    """Before a slot was metered, power x slot length seeds the forecast; later samples don't."""
    trader = Trader(HOUSE, CONFIG, SCHEDULE, SERIAL, meter_time_scale=2.0)
    trader.observe_power(SLOT, sample(0, 0, power_w=-1_000.0))  # exporting 1 kW
    # 1 kW for 900 s of slot at 2 simulated seconds per real second
    assert trader.forecaster.last == 1_000 * 900 * 2 // 3_600
    trader.observe_power(SLOT, sample(0, 0, power_w=3_000.0))
    assert trader.forecaster.last == 500


def test_restarted_trader_signs_byte_identical_records() -> None:
    """A fresh Trader fed the same samples re-signs the same reading and order, byte for byte."""
    samples = [sample(10_000, 5_000), sample(10_100, 7_000), sample(10_300, 7_100)]

    def run() -> list[bytes]:
        trader = make_trader()
        out = [encode_command(trader.slot_ended(SLOT + i, s)) for i, s in enumerate(samples)]
        order = trader.order_for(SLOT + 4)
        assert order is not None
        out.append(encode_command(order))
        out.append(encode_command(trader.sign_order(SLOT + 4, Side.BUY, 300, 20)))
        return out

    first, second = run(), run()
    assert first == second
    assert len(set(first)) == len(first)


def test_manual_orders_get_their_own_nonce_and_id() -> None:
    """A manual order for a slot has nonce slot*4+3 and id suffix -3, distinct from the agent's."""
    trader = make_trader()
    trader.slot_ended(SLOT, sample(10_000, 0))
    trader.slot_ended(SLOT + 1, sample(10_500, 0))
    agent = trader.order_for(SLOT + 2)
    manual = trader.sign_order(SLOT + 2, Side.SELL, 200, 15)
    reading = trader.slot_ended(SLOT + 2, sample(10_600, 0))
    assert agent is not None
    assert manual.nonce == (SLOT + 2) * NONCES_PER_SLOT + NONCE_MANUAL
    assert manual.id == f"{agent.id}-{NONCE_MANUAL}"
    assert len({agent.nonce, manual.nonce, reading.nonce,
                (SLOT + 2) * NONCES_PER_SLOT + NONCE_CANCEL}) == 4  # fmt: skip
    assert (manual.side, manual.quantity_wh, manual.price) == (Side.SELL, 200, 15)
    assert manual.verify(HOUSE.did)
    # nonces of consecutive slots never collide: kinds stay below NONCES_PER_SLOT
    assert manual.nonce < trader.order_for(SLOT + 3).nonce  # type: ignore[union-attr]
