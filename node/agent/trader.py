"""What a household signs: meter readings at slot ends and orders for upcoming slots.

Sans-I/O: the node calls :meth:`Trader.slot_ended` with the meter sample taken just after a
slot's end and :meth:`Trader.order_for` when a slot's gate is open; both return signed records
(or None) and never touch the network or a clock.

Nonces are derived from the slot, ``slot * 4 + kind``, so they increase with time, need no
state on disk, and a restarted node re-signs *the same* record for a slot (Ed25519 signatures
are deterministic): it can never sign two different orders or readings for one slot that both
count. Order ids are ``<slot>-<last 8 characters of the DID>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from market import MarketConfig, MeterReading, Order, Side
from market.schedule import Schedule
from market.settlement import Tariffs
from market.signing import Signer
from meter.sample import MeterSample
from node.agent.strategy import Forecaster, Strategy, plan_order

NONCE_ORDER = 0
NONCE_READING = 1
NONCE_CANCEL = 2
NONCE_MANUAL = 3
NONCES_PER_SLOT = 4


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
    forecaster: Forecaster = field(init=False)
    boundary: dict[int, MeterSample] = field(default_factory=dict)
    """The sample taken at the end of each recent slot (the counters its reading carries)."""
    ordered: set[int] = field(default_factory=set)
    """Slots this household has already placed its agent's order in."""
    manual_slots: set[int] = field(default_factory=set)
    """Slots a manual order (through the API) was signed for since this node started."""

    def __post_init__(self) -> None:
        self.forecaster = Forecaster(slots_per_day=max(1, 86_400 // self.schedule.slot_seconds))

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
        self, slot: int, sample: MeterSample, meter_serial: str | None = None
    ) -> MeterReading:
        """The signed reading of ``slot`` from the sample taken at its end; learns the slot's
        net export for the forecast when the previous slot's end was sampled on the same
        counter epoch. ``meter_serial``: the meter registered for ``slot`` (the household's
        term there; default :attr:`meter_serial`); a sample of another meter raises
        :class:`MeterMismatch`."""
        serial = self.meter_serial if meter_serial is None else meter_serial
        self.check_meter(sample, serial)
        self.boundary[slot] = sample
        previous = self.boundary.get(slot - 1)
        if previous is not None and previous.epoch == sample.epoch:
            net = (sample.export_wh - previous.export_wh) - (sample.import_wh - previous.import_wh)
            self.forecaster.observe(slot, net)
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
        self, slot: int, max_offer_wh: int | None = None, band: Tariffs | None = None
    ) -> Order | None:
        """The agent's order for ``slot`` (once per slot), or None when nothing is worth
        trading or no forecast exists yet; an offer is cut to ``max_offer_wh`` (what the
        engine lets this household offer per slot, from its delivery record), and priced inside
        ``band`` (the slot's tariffs under the rules in force there; default the genesis
        rules' flat tariffs)."""
        if slot in self.ordered:
            return None
        plan = plan_order(
            slot, self.forecaster.predict(slot), self.strategy, self.config, max_offer_wh, band
        )
        if plan is None:
            return None
        self.ordered.add(slot)
        for old in [s for s in self.ordered if s < slot - 8]:
            self.ordered.discard(old)
        return self.sign_order(slot, plan.side, plan.quantity_wh, plan.price, NONCE_ORDER)

    @staticmethod
    def nonce(slot: int, kind: int) -> int:
        """The nonce of this household's record of ``kind`` (NONCE_*) for ``slot``."""
        return slot * NONCES_PER_SLOT + kind

    def sign_order(
        self, slot: int, side: Side, quantity_wh: int, price: int, kind: int = NONCE_MANUAL
    ) -> Order:
        """A signed order of this household (the agent's, or one placed through the API)."""
        return Order(
            grid=self.config.grid,
            nonce=self.nonce(slot, kind),
            id=f"{slot}-{self.did[-8:]}" + ("" if kind == NONCE_ORDER else f"-{kind}"),
            household=self.did,
            side=side,
            slot=slot,
            quantity_wh=quantity_wh,
            price=price,
        ).signed_by(self.signer)
