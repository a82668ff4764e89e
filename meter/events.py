"""Typed meter errors and events, each carrying the meter and enough context to act on.

Errors (subclasses of :class:`MeterError`) say why one poll produced no sample; events say what
the reader noticed about a meter over time. Both are reported, counted and never raised out of
the reader's polling loop. ``kind`` is a stable short name for metrics labels and logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class MeterError(Exception):
    """A poll of one meter failed; no sample was produced."""

    kind = "error"

    def __init__(self, meter: str, message: str, **context: Any) -> None:
        super().__init__(f"{meter}: {message}")
        self.meter = meter
        self.message = message
        self.context = context


class MeterTimeout(MeterError):
    """The meter did not answer within the timeout, after every retry."""

    kind = "timeout"


class MeterUnreachable(MeterError):
    """No connection to the meter or its gateway (refused, port gone, serial device missing)."""

    kind = "unreachable"


class MeterExceptionResponse(MeterError):
    """The meter answered with a Modbus exception code."""

    kind = "exception_response"


class MeterProtocolError(MeterError):
    """A malformed or mismatched response (wrong length, transaction or device id)."""

    kind = "protocol"


class ImplausibleValue(MeterError):
    """A decoded value is NaN, infinite, "not implemented" or outside the profile's limits."""

    kind = "implausible"


class CounterBackwards(MeterError):
    """An energy counter is lower than in the last accepted sample."""

    kind = "counter_backwards"


class CounterJump(MeterError):
    """A counter rose by more than the rated power allows in the elapsed time."""

    kind = "counter_jump"


class SunSpecNotFound(MeterError):
    """No SunSpec marker or no supported meter model at any candidate base address."""

    kind = "sunspec_not_found"


@dataclass(frozen=True)
class MeterEvent:
    """Something the reader noticed about a meter (not necessarily a failure)."""

    meter: str
    kind: str
    message: str
    time: float
    context: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.meter}: {self.kind}: {self.message}"


EVENT_KINDS = (
    "offline",  # first failed poll after a good one
    "online",  # first good poll after failures
    "serial_changed",  # meter replaced: new counter baseline (epoch)
    "counter_rebaselined",  # counters consistently restarted/jumped: new baseline (epoch)
    "low_resolution",  # a float32 counter's step exceeds the configured resolution
    "slow_response",  # a poll took longer than the slow threshold
    "rejected",  # a poll's values were rejected (the error is in the context)
)
