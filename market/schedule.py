"""Wall-clock schedule of a microgrid's slots: when gates close and when slots settle.

The contract engine never reads a clock; the Raft leader does, through this module, and turns
due deadlines into ``CloseGate``/``SettleSlot`` commands. Times are Unix seconds; slot ``s``
delivers during ``[s * slot_seconds, (s + 1) * slot_seconds)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Schedule:
    """Slot length, gate-closure lead time and reading deadline, from the genesis."""

    slot_seconds: int = 900
    gate_lead_seconds: int = 300
    """A slot's gate closes this long before its delivery starts."""
    settle_delay_seconds: int = 120
    """Readings are due this long after a slot ends; then it settles."""

    def __post_init__(self) -> None:
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
