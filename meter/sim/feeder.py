"""The simulated feeder meter: the operator's meter at the transformer of the microgrid.

Its counters integrate the simulated households' net flow plus line losses, step by step with
the households (same fixed step, same simulated clock), so over any interval between two step
boundaries ``Δimport − Δexport`` of the feeder equals the households' ``Σ(Δimport − Δexport)``
plus ``loss`` times the energy the households moved (``Σ(Δimport + Δexport)``). Import is energy
from the upstream grid into the feeder (positive power), export energy sent back upstream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from meter.sim.household import MeterState, SimulatedMeter

DEFAULT_FEEDER_DEVICE = 100
DEFAULT_FEEDER_LOSS = 0.02
"""Line losses as a share of the energy the households move (import + export)."""


@dataclass(frozen=True)
class FeederConfig:
    """Static description of the simulated feeder meter (shaped like a household's config, so
    the simulator serves it the same way)."""

    device_id: int = DEFAULT_FEEDER_DEVICE
    profile: str = "sdm630"
    serial: int = 90_000_001
    loss: float = DEFAULT_FEEDER_LOSS
    sunspec_model: int = 203
    sunspec_base: int = 40000
    initial_import_wh: float = 2_000_000.0
    initial_export_wh: float = 500_000.0


@dataclass(eq=False)
class Feeder(SimulatedMeter):
    """The feeder meter's state; :meth:`step` integrates one step of the households' flows
    (counter faults: :class:`~meter.sim.household.SimulatedMeter`)."""

    config: FeederConfig
    state: MeterState = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        if not 0 <= c.loss < 1:
            raise ValueError(f"feeder loss {c.loss} must be in [0, 1)")
        self.state = MeterState(
            device_id=c.device_id, serial=c.serial, time_s=0.0, power_w=0.0, pv_w=0.0,
            load_w=0.0, battery_w=0.0, soc_wh=0.0, import_wh=c.initial_import_wh,
            export_wh=c.initial_export_wh, voltage_v=400.0 / 3 ** 0.5,
            voltage_l2_v=400.0 / 3 ** 0.5, voltage_l3_v=400.0 / 3 ** 0.5, frequency_hz=50.0,
        )

    def step(self, dt_s: float, household_powers: Iterable[float]) -> None:
        """Advance by ``dt_s`` seconds; ``household_powers`` are the households' grid powers
        (W, positive = import) held during this step."""
        powers = list(household_powers)
        net = sum(powers)
        moved = sum(abs(p) for p in powers)
        power = net + self.config.loss * moved
        s = self.state
        imp, exp = self.counters_after(power, dt_s)
        self.state = replace(s, time_s=s.time_s + dt_s, power_w=power, load_w=max(power, 0.0),
                             import_wh=imp, export_wh=exp)


def feeder_serial(seed: int) -> int:
    """The simulated feeder meter's serial for ``seed``: outside the households' range
    (10 000 000 .. 89 999 999), so it never equals a household meter's serial."""
    return 90_000_000 + seed % 9_000_000
