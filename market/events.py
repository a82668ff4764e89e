"""What applying a command produced. Events are outputs only: the engine never reads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from market.accounting import Block, Transaction
from market.auction import Clearing
from market.errors import RejectReason
from market.feeder import FeederCheck
from market.models import (
    CancelOrder,
    FeederReading,
    GovernanceRecord,
    MemberRegistration,
    MeterReading,
    Order,
    Trade,
)
from market.settlement import HouseholdSettlement

if TYPE_CHECKING:
    from market.state import Reputation


@dataclass(frozen=True, slots=True)
class Rejected:
    """A command was rejected and changed nothing."""

    reason: RejectReason
    detail: str
    command_type: str
    author: str | None


@dataclass(frozen=True, slots=True)
class HouseholdRegistered:
    """A household joined, or its meter or role changed."""

    registration: MemberRegistration


@dataclass(frozen=True, slots=True)
class GovernanceAccepted:
    """An operator's governance record was committed; it is in force from its ``from_slot``.

    ``withdrawn`` are the resting orders it took out of the books: those of a household that is
    no longer active in their slot, or priced outside their slot's new price band."""

    record: GovernanceRecord
    withdrawn: tuple[Order, ...] = ()


@dataclass(frozen=True, slots=True)
class OrderAccepted:
    """An order rests in its slot's book."""

    order: Order


@dataclass(frozen=True, slots=True)
class OrderCancelled:
    """An order left the book before gate closure."""

    cancel: CancelOrder
    order: Order


@dataclass(frozen=True, slots=True)
class GateClosed:
    """A slot's book was cleared. ``trades`` carry slot, buyer and seller."""

    slot: int
    clearing: Clearing
    orders: tuple[Order, ...]
    trades: tuple[Trade, ...]


@dataclass(frozen=True, slots=True)
class ReadingAccepted:
    """A signed meter reading waits for its slot's settlement."""

    reading: MeterReading


@dataclass(frozen=True, slots=True)
class FeederReadingAccepted:
    """A signed feeder reading (the operator's meter at the transformer) waits for its slot's
    settlement."""

    reading: FeederReading


@dataclass(frozen=True, slots=True)
class SlotSettled:
    """A slot was settled into a new block."""

    slot: int
    block: Block
    transactions: tuple[Transaction, ...]
    settlements: tuple[HouseholdSettlement, ...]
    readings: tuple[MeterReading, ...]
    trades: tuple[Trade, ...]
    reputation: tuple[tuple[str, Reputation], ...]
    """Snapshot of every member's reputation after this slot, by DID."""
    feeder: FeederCheck | None = None
    """The slot's feeder check (None in a grid without a feeder meter)."""


Event = (
    Rejected
    | HouseholdRegistered
    | GovernanceAccepted
    | OrderAccepted
    | OrderCancelled
    | GateClosed
    | ReadingAccepted
    | FeederReadingAccepted
    | SlotSettled
)
