"""Fault injection flags for one simulated meter.

Persistent faults (``no_answer``, ``slow_s``, ``exception_code``, ``bad_power``) last until
cleared; ``counter_reset``, ``counter_jump`` and ``serial_change`` are one-shot actions applied
to the household's meter (see :meth:`meter.sim.server.MeterSimulator.set_fault`).
"""

from __future__ import annotations

from dataclasses import dataclass

FAULT_KINDS = ("no_answer", "slow", "exception", "nan", "counter_reset", "counter_jump",
               "serial_change")


@dataclass
class Faults:
    """Active persistent faults of one meter."""

    no_answer: bool = False
    slow_s: float = 0.0
    exception_code: int = 0
    bad_power: float | None = None

    @property
    def active(self) -> bool:
        """True when any fault is switched on."""
        return (self.no_answer or self.slow_s > 0 or self.exception_code > 0
                or self.bad_power is not None)


def parse_fault(text: str) -> tuple[int, str, float]:
    """Parse ``DEVICE:KIND[=VALUE]`` (e.g. ``3:slow=2.5``, ``1:exception=4``, ``2:nan``,
    ``2:nan=inf``, ``2:nan=1e9``)."""
    try:
        device, rest = text.split(":", 1)
        kind, _, value = rest.partition("=")
        if kind not in FAULT_KINDS:
            raise ValueError
        return int(device), kind, float(value) if value else 0.0
    except ValueError:
        raise ValueError(f"bad fault {text!r}: expected DEVICE:KIND[=VALUE], KIND one of "
                         f"{', '.join(FAULT_KINDS)}") from None
