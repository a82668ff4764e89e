"""What a household signs: meter readings at slot ends and orders for upcoming slots.

Sans-I/O: the node calls :meth:`Trader.slot_ended` with the meter sample taken just after a
slot's end and :meth:`Trader.order_for` when a slot's gate is open; both return signed records
(or None) and never touch the network or a clock.

Nonces are derived from the slot, ``slot * 4 + kind``, so they increase with time, need no
state on disk, and a restarted node re-signs *the same* record for a slot (Ed25519 signatures
are deterministic): it can never sign two different orders or readings for one slot that both
count. Order ids are ``<slot>-<last 8 characters of the DID>``.

Manual records (the strategy API, docs/strategy-api.md) need more than one nonce per slot: an
order replaced twice is three orders and two cancels. The first manual order of a slot keeps
``slot * 4 + 3`` (id suffix ``-3``); every further manual record (a replacement, a cancel) takes
the next nonce of kind 2 or 3 from a *pool* walked upwards (:func:`next_pool_nonce`) by a counter
the node persists before it signs (node/daemon/events_stream.py), so no nonce is ever signed
twice, across restarts too. Kinds 0 (the agent's order) and 1 (readings) are never in the pool.
Every manual nonce stays below :func:`manual_nonce_ceiling`, so no manual record can push the
household's anti-replay window past a reading it has still to sign.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from market import CancelOrder, MarketConfig, MeterReading, Order, Side
from market.models import CurveStep
from market.schedule import Schedule
from market.settlement import Tariffs
from market.signing import Signer
from meter.sample import MeterSample
from node.agent.battery import BatteryOrder
from node.agent.forecast import LearningForecaster
from node.agent.strategy import Strategy, plan_battery_order, plan_order

NONCE_ORDER = 0
NONCE_READING = 1
NONCE_CANCEL = 2
NONCE_MANUAL = 3
NONCES_PER_SLOT = 4
POOL_KINDS = (NONCE_CANCEL, NONCE_MANUAL)
"""Nonce kinds the manual-record pool draws from (never the agent's order or a reading)."""
WINDOW_MARGIN_SLOTS = 2
"""Slots of nonces kept free between the highest manual nonce and the anti-replay window's
edge seen from the oldest reading the household may still sign."""


def manual_nonce_ceiling(current_slot: int, nonce_window: int) -> int:
    """The highest nonce a manual record may carry while ``current_slot`` is being delivered.

    The engine and gossip refuse a nonce ``<= highest - nonce_window``; the lowest nonce this
    household may still have to sign is the reading of the slot that just ended,
    ``(current_slot - 1) * 4 + 1``. A manual nonce at most ``that + nonce_window - margin``
    keeps that reading (and every later record) inside the window."""
    lowest = (current_slot - 1) * NONCES_PER_SLOT + NONCE_READING
    return lowest + nonce_window - 1 - WINDOW_MARGIN_SLOTS * NONCES_PER_SLOT


def max_manual_slot(current_slot: int, nonce_window: int) -> int:
    """The farthest slot whose own manual nonce ``slot * 4 + 3`` is under the ceiling."""
    return (manual_nonce_ceiling(current_slot, nonce_window) - NONCE_MANUAL) // NONCES_PER_SLOT


def next_pool_nonce(start: int, taken: frozenset[int] | set[int]) -> int:
    """The first nonce ``>= start`` of a pool kind (2 or 3) whose slot's first manual order did
    not take it (``taken``: slots whose ``slot * 4 + 3`` a first manual order used)."""
    nonce = max(0, start)
    while True:
        slot, kind = divmod(nonce, NONCES_PER_SLOT)
        if kind in POOL_KINDS and not (kind == NONCE_MANUAL and slot in taken):
            return nonce
        nonce += 1


class MeterMismatch(ValueError):
    """The meter's serial is not the one registered for this household (in the genesis, or by
    the operator's latest meter swap in force for the slot)."""


@dataclass
class Trader:
    """One household's readings, forecast and orders."""

    signer: Signer
    config: MarketConfig
    schedule: Schedule
    meter_serial: str
    """The registered meter's serial (the node updates it from the engine's terms: a meter swap
    changes it from a slot on; "" while the household is not admitted yet)."""
    strategy: Strategy = field(default_factory=Strategy)
    meter_time_scale: float = 1.0
    """Simulated seconds per real second of the meter (1.0 for a real meter)."""
    location: tuple[float, float] | None = None
    """(latitude, longitude) for the forecast's clear-sky PV term (``[agent]``; None: off)."""
    forecaster: LearningForecaster = field(init=False)
    """The forecast (node/agent/forecast.py); the node may replace it with a restored one."""
    boundary: dict[int, MeterSample] = field(default_factory=dict)
    """The sample taken at the end of each recent slot (the counters its reading carries)."""
    ordered: set[int] = field(default_factory=set)
    """Slots this household has already placed its agent's order in."""
    manual_slots: set[int] = field(default_factory=set)
    """Slots a manual order (through the API) was signed for since this node started."""

    def __post_init__(self) -> None:
        lat, lon = self.location if self.location is not None else (None, None)
        self.forecaster = LearningForecaster(self.schedule.slot_seconds, lat, lon)

    @property
    def did(self) -> str:
        """The household's DID."""
        return self.signer.did

    def check_meter(self, sample: MeterSample, meter_serial: str | None = None) -> None:
        """Raise :class:`MeterMismatch` unless ``sample`` comes from the registered meter
        (``meter_serial``: the one in force for the slot; default :attr:`meter_serial`)."""
        serial = self.meter_serial if meter_serial is None else meter_serial
        if sample.serial != serial:
            raise MeterMismatch(
                f"meter {sample.meter!r} reports serial {sample.serial!r}, but the grid "
                f"registers {serial!r} for {self.did}"
            )

    def observe_power(self, slot: int, sample: MeterSample) -> None:
        """Seed the forecast from the instantaneous power (before a whole slot was metered)."""
        if self.forecaster.last is not None:
            return
        seconds = self.schedule.slot_seconds * self.meter_time_scale
        self.forecaster.observe(slot, -round(sample.power_w * seconds / 3600))

    def slot_ended(
        self,
        slot: int,
        sample: MeterSample,
        meter_serial: str | None = None,
        battery_wh: int = 0,
    ) -> MeterReading:
        """The signed reading of ``slot`` from the sample taken at its end; learns the slot's
        net export for the forecast when the previous slot's end was sampled on the same
        counter epoch. ``meter_serial``: the meter registered for ``slot`` (the household's
        term there; default :attr:`meter_serial`); a sample of another meter raises
        :class:`MeterMismatch`. ``battery_wh``: what a planned battery behind the meter took
        (negative: gave) in the slot; the forecast learns the net export without it."""
        serial = self.meter_serial if meter_serial is None else meter_serial
        self.check_meter(sample, serial)
        self.boundary[slot] = sample
        previous = self.boundary.get(slot - 1)
        if previous is not None and previous.epoch == sample.epoch:
            net = (sample.export_wh - previous.export_wh) - (sample.import_wh - previous.import_wh)
            self.forecaster.observe(slot, net + battery_wh)
        for old in [s for s in self.boundary if s < slot - 1]:
            del self.boundary[old]
        return MeterReading(
            grid=self.config.grid,
            nonce=self.nonce(slot, NONCE_READING),
            household=self.did,
            meter_serial=serial,
            slot=slot,
            import_wh=sample.import_wh,
            export_wh=sample.export_wh,
        ).signed_by(self.signer)

    def order_for(
        self,
        slot: int,
        max_offer_wh: int | None = None,
        band: Tariffs | None = None,
        battery_wh: int | BatteryOrder = 0,
    ) -> Order | None:
        """The agent's order for ``slot`` (once per slot), or None when nothing is worth
        trading or no forecast exists yet; an offer is cut to ``max_offer_wh`` (what the
        engine lets this household offer per slot, from its delivery record), and priced inside
        ``band`` (the slot's tariffs under the rules in force there; default the genesis
        rules' flat tariffs). ``battery_wh``: the battery planner's energy for the slot
        (positive: charging, bought on top of the forecast deficit or taken off the surplus;
        negative: discharging, offered), ``node/agent/battery.py``; a
        :class:`~node.agent.battery.BatteryOrder` (``BatteryAgent.order_energy``) also carries
        what the battery's part may be priced at, and the order prices it apart
        (:func:`~node.agent.strategy.plan_battery_order`: a curve when the prices differ)."""
        if slot in self.ordered:
            return None
        forecast = self.forecaster.issue(slot)  # remembered: its error is measured later
        if isinstance(battery_wh, BatteryOrder):
            plan = plan_battery_order(slot, forecast, battery_wh, self.strategy, self.config,
                                      max_offer_wh, band)  # fmt: skip
        else:
            plan = plan_order(
                slot,
                None if forecast is None else forecast - battery_wh,
                self.strategy,
                self.config,
                max_offer_wh,
                band,
            )
        if plan is None:
            return None
        self.ordered.add(slot)
        for old in [s for s in self.ordered if s < slot - 8]:
            self.ordered.discard(old)
        return self.sign_order(slot, plan.side, plan.quantity_wh, plan.price, NONCE_ORDER,
                               plan.steps)  # fmt: skip

    @staticmethod
    def nonce(slot: int, kind: int) -> int:
        """The nonce of this household's record of ``kind`` (NONCE_*) for ``slot``."""
        return slot * NONCES_PER_SLOT + kind

    def sign_manual(
        self,
        slot: int,
        side: Side,
        quantity_wh: int,
        price: int,
        nonce: int,
        steps: tuple[CurveStep, ...] = (),
    ) -> Order:
        """A manual order (the strategy API) with an explicit ``nonce``: the slot's own manual
        nonce (id suffix ``-3``, as :meth:`sign_order`) or a pool nonce (id suffix
        ``-n<nonce>``, unique as the nonce is). ``steps``: a curve (2-16 steps)."""
        suffix = NONCE_MANUAL if nonce == self.nonce(slot, NONCE_MANUAL) else f"n{nonce}"
        return Order(
            grid=self.config.grid,
            nonce=nonce,
            id=f"{slot}-{self.did[-8:]}-{suffix}",
            household=self.did,
            side=side,
            slot=slot,
            quantity_wh=quantity_wh,
            price=price,
            steps=steps,
        ).signed_by(self.signer)

    def sign_cancel(self, order_id: str, nonce: int) -> CancelOrder:
        """A signed withdrawal of this household's order ``order_id`` (a pool nonce)."""
        return CancelOrder(
            grid=self.config.grid, nonce=nonce, household=self.did, order_id=order_id
        ).signed_by(self.signer)

    def is_manual_id(self, order_id: str, slot: int) -> bool:
        """Whether ``order_id`` names a manual order of this household in ``slot``."""
        return order_id.startswith(f"{slot}-{self.did[-8:]}-")

    def sign_order(
        self,
        slot: int,
        side: Side,
        quantity_wh: int,
        price: int,
        kind: int = NONCE_MANUAL,
        steps: tuple[tuple[int, int], ...] = (),
    ) -> Order:
        """A signed order of this household (the agent's, or one placed through the API);
        ``steps``: a curve (2-16 steps; ``quantity_wh`` their total, ``price`` the first's)."""
        return Order(
            grid=self.config.grid,
            nonce=self.nonce(slot, kind),
            id=f"{slot}-{self.did[-8:]}" + ("" if kind == NONCE_ORDER else f"-{kind}"),
            household=self.did,
            side=side,
            slot=slot,
            quantity_wh=quantity_wh,
            price=price,
            steps=steps,
        ).signed_by(self.signer)
