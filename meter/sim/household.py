"""One simulated household: PV, load, optional battery, and the meter's counters.

Everything is a deterministic function of the seed and the simulated time: the simulation
advances in fixed steps (``step_s``), power is constant within a step, and the import/export
counters integrate exactly that power, so counters and power readings agree. Power is positive
for import from the grid (the project's sign convention).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import random
from dataclasses import dataclass, field, replace

from meter.sim.battery import BatteryConfig, SimulatedBattery
from meter.sim.load import h25_power_w
from meter.sim.solar import Clouds, pv_power_w


@dataclass(frozen=True)
class HouseholdConfig:
    """Static description of a simulated household and its meter."""

    index: int
    device_id: int
    profile: str = "sdm630"
    sunspec_model: int = 203
    sunspec_base: int = 40000
    serial: int = 10_000_001
    pv_kwp: float = 0.0
    annual_kwh: float = 3500.0
    battery_kwh: float = 0.0
    battery_kw: float = 0.0
    battery_soc_min_permille: int = 100
    battery_soc_max_permille: int = 950
    battery_efficiency_permille: int = 900
    battery_initial_permille: int = 500
    shift_s: float = 0.0
    initial_import_wh: float = 1_000_000.0
    initial_export_wh: float = 100_000.0

    def battery_config(self) -> BatteryConfig | None:
        """The battery's integer limits (None without a battery)."""
        if self.battery_kwh <= 0:
            return None
        watts = round(self.battery_kw * 1000)
        return BatteryConfig(
            capacity_wh=round(self.battery_kwh * 1000), max_charge_w=watts,
            max_discharge_w=watts, soc_min_permille=self.battery_soc_min_permille,
            soc_max_permille=self.battery_soc_max_permille,
            efficiency_permille=self.battery_efficiency_permille,
            initial_soc_permille=self.battery_initial_permille,
            serial=70_000_000 + self.serial % 10_000_000,
        )  # fmt: skip


@dataclass(frozen=True)
class MeterState:
    """What the simulated meter knows at one instant (the truth tests compare against)."""

    device_id: int
    serial: int
    time_s: float
    power_w: float
    pv_w: float
    load_w: float
    battery_w: float
    soc_wh: float
    import_wh: float
    export_wh: float
    voltage_v: float
    voltage_l2_v: float
    voltage_l3_v: float
    frequency_hz: float

    def field_value(self, name: str) -> float | int:
        """The value of a profile field name in canonical units (W, V, A, Hz, Wh)."""
        phases = {"power_l1": self.power_w / 3, "power_l2": self.power_w / 3,
                  "power_l3": self.power_w / 3}
        volts = {"voltage": self.voltage_v, "voltage_l2": self.voltage_l2_v,
                 "voltage_l3": self.voltage_l3_v}
        if name in phases:
            return phases[name]
        if name in volts:
            return volts[name]
        if name.startswith("current_l"):
            v = volts["voltage" if name == "current_l1" else f"voltage_l{name[-1]}"]
            return self.power_w / 3 / v if v else 0.0
        simple: dict[str, float | int] = {
            "power": self.power_w, "frequency": self.frequency_hz,
            "import_energy": self.import_wh, "export_energy": self.export_wh,
            "serial": self.serial, "model_id": 1651,
        }
        return simple.get(name, 0.0)


class SimulatedMeter:
    """What every simulated meter (a household's, the feeder's) has: its :class:`MeterState`,
    counters that integrate its grid power, and the counter faults the simulator injects."""

    state: MeterState

    def counters_after(self, power_w: float, dt_s: float) -> tuple[float, float]:
        """The import and export counters (Wh) after ``dt_s`` seconds at ``power_w``
        (positive = import)."""
        s = self.state
        return (s.import_wh + max(power_w, 0.0) * dt_s / 3600,
                s.export_wh + max(-power_w, 0.0) * dt_s / 3600)  # fmt: skip

    def reset_counters(self) -> None:
        """Fault: the meter's counters restart from zero (as after a meter reset)."""
        self.state = replace(self.state, import_wh=0.0, export_wh=0.0)

    def jump_counters(self, wh: float) -> None:
        """Fault: the import counter jumps by ``wh`` (a corrupted or tampered register)."""
        self.state = replace(self.state, import_wh=self.state.import_wh + wh)

    def change_serial(self) -> None:
        """Fault: the meter is replaced by one with another serial and fresh counters."""
        self.state = replace(self.state, serial=self.state.serial + 1, import_wh=12_000.0,
                             export_wh=3_000.0)


@dataclass(eq=False)
class SimulatedHousehold(SimulatedMeter):
    """A household's simulation state; :meth:`step` advances it by one fixed step."""

    config: HouseholdConfig
    seed: int
    start: dt.datetime
    latitude: float
    clouds: Clouds
    state: MeterState = field(init=False)
    battery: SimulatedBattery | None = field(init=False, default=None)
    """The household's battery behind its trading meter (None without one)."""

    def __post_init__(self) -> None:
        c = self.config
        battery = c.battery_config()
        self.battery = None if battery is None else SimulatedBattery(battery)
        self.state = MeterState(
            device_id=c.device_id, serial=c.serial, time_s=0.0, power_w=0.0, pv_w=0.0,
            load_w=0.0, battery_w=0.0,
            soc_wh=0.0 if self.battery is None else self.battery.soc_wh,
            import_wh=c.initial_import_wh, export_wh=c.initial_export_wh,
            voltage_v=230.0, voltage_l2_v=230.0, voltage_l3_v=230.0, frequency_hz=50.0,
        )

    @functools.lru_cache(maxsize=512)  # noqa: B019 - bounded cache of seeded noise
    def _noise(self, slot: int) -> tuple[float, float]:
        rng = random.Random(f"load:{self.seed}:{self.config.index}:{slot}")
        return rng.lognormvariate(0.0, 0.35), rng.random()

    def _clock(self, t: float) -> tuple[int, int, int, float]:
        """(month, weekday, day of year, second of day) at simulated time ``t``."""
        start_sod = self.start.hour * 3600 + self.start.minute * 60 + self.start.second
        day, sod = divmod(start_sod + t, 86400.0)
        return (*_calendar(self.start.date(), int(day)), sod)

    def load_w(self, t: float) -> float:
        """SimulatedHousehold consumption at simulated time ``t`` (W)."""
        shifted = t + self.config.shift_s
        month, weekday, doy, sod = self._clock(shifted)
        base = h25_power_w(month, weekday, doy, sod, self.config.annual_kwh)
        factor, spike = self._noise(int(shifted // 900))
        extra = 1800.0 if 17 * 3600 <= sod < 20 * 3600 and spike < 0.25 else 0.0  # cooking
        return base * factor + extra

    def pv_w(self, t: float) -> float:
        """PV production at simulated time ``t`` (W)."""
        if self.config.pv_kwp <= 0:
            return 0.0
        _, _, doy, sod = self._clock(t)
        return pv_power_w(self.config.pv_kwp, self.latitude, doy, sod / 3600,
                          self.clouds.factor(t))

    def step(self, dt_s: float) -> None:
        """Advance by ``dt_s`` seconds with power held constant over the step."""
        s, c = self.state, self.config
        t = s.time_s
        load, pv = self.load_w(t), self.pv_w(t)
        net = load - pv
        battery, soc = 0.0, s.soc_wh
        if self.battery is not None:  # its flow goes through the trading meter
            battery = self.battery.step(net, dt_s)
            soc = self.battery.soc_wh
        grid = net + battery
        imp, exp = self.counters_after(grid, dt_s)
        u = _uniforms(self.seed, c.index, int(t // dt_s))
        v = 230.0 + 3.0 * math.sin(t / 7200.0) - grid / 3000.0 + u[0] - 0.5
        self.state = MeterState(
            s.device_id, s.serial, t + dt_s, grid, pv, load, battery, soc, imp, exp,
            round(v, 2), round(v + 2 * u[1] - 1, 2), round(v + 2 * u[2] - 1, 2),
            round(49.96 + 0.08 * u[3], 3),
        )


@functools.cache
def _calendar(start: dt.date, day: int) -> tuple[int, int, int]:
    d = start + dt.timedelta(days=day)
    return d.month, d.weekday(), d.timetuple().tm_yday


def _mix(x: int) -> int:
    """splitmix64: a cheap, well-mixed deterministic hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _uniforms(seed: int, index: int, step: int) -> tuple[float, float, float, float]:
    """Four deterministic uniforms in [0, 1) for one household step."""
    h = _mix((seed * 1_000_003 + index) * 2_147_483_647 + step)
    return tuple(((h >> (16 * k)) & 0xFFFF) / 65536.0 for k in range(4))  # type: ignore[return-value]


def make_households(n: int, seed: int, profiles: list[str] | None = None) -> list[HouseholdConfig]:
    """``n`` seeded household configs; profiles cycle through ``profiles`` if given, else
    every fourth household has a SunSpec meter (models 203 and 213 alternating), the rest an
    SDM630. About a third have no PV, so surplus and deficit households coexist at midday."""
    if not 1 <= n <= 247:
        raise ValueError("1..247 households (Modbus device ids)")
    configs = []
    for i in range(n):
        rng = random.Random(f"household:{seed}:{i}")
        profile = profiles[i % len(profiles)] if profiles else "sunspec" if i % 4 == 3 else "sdm630"
        pv = 0.0 if rng.random() < 0.35 else round(rng.uniform(3.0, 12.0), 1)
        battery = round(rng.uniform(5.0, 12.0), 1) if pv and rng.random() < 0.35 else 0.0
        configs.append(HouseholdConfig(
            index=i,
            device_id=i + 1,
            profile=profile,
            sunspec_model=203 if (i // 4) % 2 == 0 else 213,
            serial=10_000_000 + (seed * 7919 + i * 104_729) % 80_000_000,
            pv_kwp=pv,
            annual_kwh=round(rng.uniform(1500.0, 6500.0)),
            battery_kwh=battery,
            battery_kw=round(battery / 2.5, 1),
            shift_s=rng.uniform(-2400.0, 2400.0),
            initial_import_wh=float(rng.randrange(500_000, 8_000_000)),
            initial_export_wh=float(rng.randrange(0, 4_000_000)) if pv else 0.0,
        ))
    return configs
