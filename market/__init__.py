"""The contract engine: pure, deterministic market rules every node computes identically.

No I/O, no clock, no randomness, no floats. Feed committed commands to :func:`apply`; clear a
book directly with :func:`clear`.
"""

from market.accounting import Block, Posting, Transaction
from market.auction import MECHANISMS, Clearing, ClearingError, clear
from market.errors import RejectReason
from market.events import (
    Event,
    FeederReadingAccepted,
    GateClosed,
    HouseholdRegistered,
    OrderAccepted,
    OrderCancelled,
    ReadingAccepted,
    Rejected,
    SlotSettled,
)
from market.feeder import FeederCheck, FeederStatus, feeder_check
from market.models import (
    CancelOrder,
    CloseGate,
    Command,
    CommandDecodeError,
    FeederReading,
    MemberRegistration,
    MemberRole,
    MeterReading,
    Order,
    SettleSlot,
    Side,
    Trade,
    decode_batch,
    decode_batch_lenient,
    decode_command,
    encode_batch,
    encode_command,
)
from market.state import MarketConfig, Reputation, State, apply

__all__ = [
    "MECHANISMS",
    "Block",
    "CancelOrder",
    "Clearing",
    "ClearingError",
    "CloseGate",
    "Command",
    "CommandDecodeError",
    "Event",
    "FeederCheck",
    "FeederReading",
    "FeederReadingAccepted",
    "FeederStatus",
    "GateClosed",
    "HouseholdRegistered",
    "MarketConfig",
    "MemberRegistration",
    "MemberRole",
    "MeterReading",
    "Order",
    "OrderAccepted",
    "OrderCancelled",
    "Posting",
    "ReadingAccepted",
    "RejectReason",
    "Rejected",
    "Reputation",
    "SettleSlot",
    "Side",
    "SlotSettled",
    "State",
    "Trade",
    "Transaction",
    "apply",
    "clear",
    "decode_batch",
    "decode_batch_lenient",
    "decode_command",
    "encode_batch",
    "encode_command",
    "feeder_check",
]
