"""A small signed microgrid for engine tests: an operator, households, and record builders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from market import (
    CancelOrder,
    CloseGate,
    Event,
    FeederReading,
    MarketConfig,
    MemberRegistration,
    MemberRole,
    MeterReading,
    Order,
    Rejected,
    SettleSlot,
    State,
    apply,
)
from market.encoding import sha256
from market.models import GovernanceRecord
from market.signing import Signer
from market.state import DEFAULT_MAX_SILENT_SLOTS, RULES

GRID = "test-grid"


def signer(name: str) -> Signer:
    return Signer.from_seed(sha256(name.encode()))


@dataclass
class World:
    """Builds correctly signed records with fresh nonces; tests then break them on purpose."""

    operator: Signer = field(default_factory=lambda: signer("operator"))
    homes: dict[str, Signer] = field(default_factory=dict)
    nonces: dict[str, int] = field(default_factory=dict)
    mechanism: str = "uniform"
    feeder_serial: str = ""
    """A feeder meter's serial: "" is a grid without one."""
    feeder_loss_permille: int = 50
    feeder_tolerance_wh: int = 100
    feeder_max_power_w: int = 1_000_000
    rules: int = RULES
    max_silent_slots: int = DEFAULT_MAX_SILENT_SLOTS

    def __post_init__(self) -> None:
        feeder = (
            {
                "feeder_serial": self.feeder_serial,
                "feeder_loss_permille": self.feeder_loss_permille,
                "feeder_tolerance_wh": self.feeder_tolerance_wh,
                "feeder_max_power_w": self.feeder_max_power_w,
            }
            if self.feeder_serial
            else {}
        )
        self.config = MarketConfig(
            grid=GRID,
            operator=self.operator.did,
            feed_in_tariff=8,
            retail_price=32,
            mechanism=self.mechanism,
            rules=self.rules,
            max_silent_slots=self.max_silent_slots,
            **feeder,  # type: ignore[arg-type]
        )
        self.state = State.initial(self.config)

    def nonce(self, did: str) -> int:
        self.nonces[did] = self.nonces.get(did, 0) + 1
        return self.nonces[did]

    def register(
        self, name: str, serial: str | None = None, role: MemberRole = MemberRole.LEARNER
    ) -> Signer:
        s = self.homes.get(name) or signer(name)
        self.homes[name] = s
        reg = MemberRegistration(
            grid=GRID,
            operator=self.operator.did,
            household=s.did,
            meter_serial=serial or f"M-{name}",
            role=role,
            nonce=self.nonce(self.operator.did),
        ).signed_by(self.operator)
        self.ok(reg)
        return s

    def order(
        self, name: str, side: str, qty: int, price: int, slot: int = 1, oid: str = ""
    ) -> Order:
        s = self.homes[name]
        return Order(
            grid=GRID,
            id=oid or f"{name}-{slot}-{side}-{self.nonces.get(s.did, 0) + 1}",
            household=s.did,
            side=side,
            slot=slot,
            quantity_wh=qty,
            price=price,
            nonce=self.nonce(s.did),
        ).signed_by(s)

    def reading(
        self, name: str, slot: int, imp: int, exp: int, serial: str | None = None
    ) -> MeterReading:
        s = self.homes[name]
        return MeterReading(
            grid=GRID,
            household=s.did,
            meter_serial=serial or f"M-{name}",
            slot=slot,
            import_wh=imp,
            export_wh=exp,
            nonce=self.nonce(s.did),
        ).signed_by(s)

    def feeder(
        self,
        slot: int,
        imp: int,
        exp: int,
        *,
        serial: str | None = None,
        nonce: int | None = None,
        signer: Signer | None = None,
    ) -> FeederReading:
        """The operator's feeder reading of ``slot`` (nonce ``slot * 4 + 2``, as nodes sign)."""
        by = signer or self.operator
        return FeederReading(
            grid=GRID,
            operator=by.did,
            meter_serial=serial or self.feeder_serial or "FEEDER",
            slot=slot,
            import_wh=imp,
            export_wh=exp,
            nonce=slot * 4 + 2 if nonce is None else nonce,
        ).signed_by(by)

    def govern(self, kind: type[GovernanceRecord], from_slot: int, **fields: object) -> Any:
        """An operator-signed governance record of ``kind`` in force from ``from_slot``; a
        ``household`` given by name is replaced by its DID."""
        name = fields.get("household")
        if isinstance(name, str) and name in self.homes:
            fields["household"] = self.homes[name].did
        return kind(
            grid=GRID,
            operator=self.operator.did,
            from_slot=from_slot,
            nonce=self.nonce(self.operator.did),
            **fields,
        ).signed_by(self.operator)

    def cancel(self, name: str, order_id: str) -> CancelOrder:
        s = self.homes[name]
        return CancelOrder(
            grid=GRID, household=s.did, order_id=order_id, nonce=self.nonce(s.did)
        ).signed_by(s)

    def apply(self, command: object) -> list[Event]:
        self.state, events = apply(self.state, command)  # type: ignore[arg-type]
        return events

    def ok(self, command: object) -> list[Event]:
        events = self.apply(command)
        assert not any(isinstance(e, Rejected) for e in events), events
        return events

    def rejected(self, command: object) -> Rejected:
        before = self.state.copy()
        events = self.apply(command)
        assert len(events) == 1 and isinstance(events[0], Rejected), events
        assert _comparable(self.state) == _comparable(before), "a rejected command changed state"
        return events[0]

    def close(self, slot: int) -> list[Event]:
        return self.ok(CloseGate(slot=slot))

    def settle(self, slot: int) -> list[Event]:
        return self.ok(SettleSlot(slot=slot))


def _comparable(state: State) -> tuple:
    return (
        state.members,
        {k: (v.highest, sorted(v.recent)) for k, v in state.nonces.items()},
        {s: list(b.items()) for s, b in state.books.items()},
        state.cleared,
        state.pending_readings,
        state.baselines,
        state.pending_feeder,
        state.feeder_baseline,
        state.closed_through,
        state.settled_through,
        state.balances,
        {k: (v.sold_wh, v.delivered_wh, v.slots) for k, v in state.reputation.items()},
        state.height,
        state.head_hash,
        list(state.governance.records),
    )
