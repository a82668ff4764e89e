"""Why the engine rejects a command: one typed reason per rule."""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """Every reason a command can be rejected for. Stable strings: they appear in metrics."""

    WRONG_GRID = "wrong_grid"
    UNKNOWN_HOUSEHOLD = "unknown_household"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED_NONCE = "replayed_nonce"
    INVALID_QUANTITY = "invalid_quantity"
    PRICE_OUT_OF_BAND = "price_out_of_band"
    GATE_CLOSED = "gate_closed"
    SLOT_TOO_FAR = "slot_too_far"
    DUPLICATE_ORDER = "duplicate_order"
    CONFLICTING_SIDE = "conflicting_side"
    UNKNOWN_ORDER = "unknown_order"
    NOT_OWNER = "not_owner"
    UNKNOWN_METER = "unknown_meter"
    SLOT_NOT_CLOSED = "slot_not_closed"
    SLOT_SETTLED = "slot_settled"
    DUPLICATE_READING = "duplicate_reading"
    INVALID_COUNTER = "invalid_counter"
    COUNTER_REGRESSION = "counter_regression"
    IMPLAUSIBLE_READING = "implausible_reading"
    """A counter rose faster than the household's registered ``max_power_w`` allows."""
    METER_SILENT = "meter_silent"
    """The household's meter has not reported for ``max_silent_slots`` settled slots."""
    OVER_SELL_LIMIT = "over_sell_limit"
    """The household's offers in a slot exceed what its delivery record allows."""
    NOT_ACTIVE = "not_active"
    """The household is suspended, removed, rotated away or not admitted yet in that slot."""
    EFFECTIVE_SLOT_CLOSED = "effective_slot_closed"
    """A governance record would take effect in a slot whose gate has already closed."""
    INVALID_CHANGE = "invalid_change"
    """A governance record that does not fit the household's standing or the rules in force."""
    NO_VOTERS_LEFT = "no_voters_left"
    """A governance record would leave the grid without a Raft voter in some slot."""
    NOT_OPERATOR = "not_operator"
    INVALID_HOUSEHOLD_ID = "invalid_household_id"
    OUT_OF_SEQUENCE = "out_of_sequence"
    MALFORMED = "malformed"


class Rejection(Exception):
    """Raised inside the engine's validators; :func:`market.state.apply` turns it into an event."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
