"""Wall-clock schedule of a microgrid's slots: when gates close and when slots settle.

The contract engine never reads a clock; the Raft leader does and passes the time in here, then
turns due deadlines into ``CloseGate``/``SettleSlot`` commands. The dashboard uses the same type
to place slots on a time axis. Times are Unix seconds (or timezone-aware datetimes, for the
``*_datetime`` helpers); slot ``s`` delivers during ``[s * slot_seconds, (s + 1) * slot_seconds)``.
Nothing here reads a clock: every function is pure in its arguments. The replicated state
machine (:mod:`market.state`) never uses this module: slots reach it as integers inside
``CloseGate``/``SettleSlot`` commands, so the float wall time a caller passes here can never
make two replicas differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
"""Unix time 0; slot 0 starts here."""

DAY_SECONDS = 86_400


@dataclass(frozen=True, slots=True)
class Schedule:
    """Slot length, gate-closure lead time and reading deadline, from the genesis.

    All three are integer seconds (``bool`` is refused, as is a non-positive slot length or a
    negative lead or delay).
    """

    slot_seconds: int = 900
    gate_lead_seconds: int = 300
    """A slot's gate closes this long before its delivery starts."""
    settle_delay_seconds: int = 120
    """Readings are due this long after a slot ends; then it settles."""

    def __post_init__(self) -> None:
        for value in (self.slot_seconds, self.gate_lead_seconds, self.settle_delay_seconds):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"invalid schedule {self}: timings are integer seconds")
        if self.slot_seconds <= 0 or self.gate_lead_seconds < 0 or self.settle_delay_seconds < 0:
            raise ValueError(f"invalid schedule {self}")

    def slot_at(self, t: float) -> int:
        """The slot delivering at time ``t``."""
        return math.floor(t / self.slot_seconds)

    def start(self, slot: int) -> int:
        """When ``slot``'s delivery starts."""
        return slot * self.slot_seconds

    def end(self, slot: int) -> int:
        """When ``slot``'s delivery ends (its meter reading is taken then)."""
        return (slot + 1) * self.slot_seconds

    def gate_time(self, slot: int) -> int:
        """When ``slot``'s gate closes."""
        return self.start(slot) - self.gate_lead_seconds

    def settle_time(self, slot: int) -> int:
        """When ``slot`` settles (its reading deadline)."""
        return self.end(slot) + self.settle_delay_seconds

    def open_slot(self, t: float) -> int:
        """The earliest slot whose gate is still open at ``t``: where new orders go."""
        return math.floor((t + self.gate_lead_seconds) / self.slot_seconds) + 1

    def last_due_gate(self, t: float) -> int:
        """The latest slot whose gate time has passed at ``t``."""
        return self.open_slot(t) - 1

    # --- calendar helpers (the dashboard's time axis) ----------------------------------------

    def slots_in(self, seconds: int) -> int:
        """How many whole slots ``seconds`` of wall time hold (at least 1)."""
        return max(1, seconds // self.slot_seconds)

    @property
    def slots_per_day(self) -> int:
        """Slots in one day of wall time (at least 1)."""
        return self.slots_in(DAY_SECONDS)

    def start_datetime(self, slot: int) -> datetime:
        """When ``slot``'s delivery starts, as a UTC datetime (``OverflowError`` beyond the
        calendar ``datetime`` can hold)."""
        return EPOCH + timedelta(seconds=self.start(slot))

    def end_datetime(self, slot: int) -> datetime:
        """When ``slot``'s delivery ends, as a UTC datetime."""
        return EPOCH + timedelta(seconds=self.end(slot))

    def slot_of(self, when: datetime) -> int:
        """The slot delivering at ``when`` (timezone-aware; exact, in integer arithmetic)."""
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(f"{when!r} has no timezone: slots are defined in Unix time")
        return (when - EPOCH) // timedelta(seconds=self.slot_seconds)
