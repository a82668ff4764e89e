"""A simulated home battery behind a SunSpec storage inverter (models 1, 124 and 802).

The battery sits behind the household's trading meter: its AC power (positive = charging) adds
to the household's grid power, so whatever it charges or discharges moves the trading meter's
counters, and settlement follows the trading meter only.

Physics (per fixed simulation step, power constant within the step):

- **Limits.** Charge power is at most ``min(max_charge_w, WChaMax)``, discharge power at most
  ``max_discharge_w``. The stored energy stays within ``[floor, soc_max]`` where ``soc_max`` is
  the battery management's ceiling (``soc_max_permille`` of the capacity) and ``floor`` the
  larger of its own minimum (``soc_min_permille``) and the reserve written to ``MinRsvPct``.
  A battery below its floor may charge but not discharge; above its ceiling it may discharge
  but not charge.
- **Efficiency.** The round-trip efficiency (integer permille) is charged on the way in: a Wh
  taken from the AC side stores ``efficiency_permille / 1000`` Wh, a stored Wh discharged gives
  one Wh on the AC side.
- **Control** (SunSpec model 124, the semantics Fronius and SMA document): without remote
  control (``StorCtl_Mod`` = 0) the battery runs for self-consumption (charges from the
  household's surplus, covers its deficit). ``StorCtl_Mod`` bit 0 makes ``InWRte`` (percent of
  ``WChaMax``) an upper bound on the charge power, bit 1 makes ``-OutWRte`` (percent of
  ``WDisChaRteMax``) a lower bound; a negative ``InWRte`` with bit 0 and 1 set therefore forces a
  discharge, a negative ``OutWRte`` a charge (``InWRte = P, OutWRte = -P``: exactly ``P``). A
  window whose lower bound lies above its upper bound holds (0 W). ``ChaGriSet`` = 0 (PV) lets
  the battery charge from the household's own surplus only, 1 (GRID) from the grid too.
  ``InOutWRte_RvrtTms`` > 0: that many (simulated) seconds after the last control write the
  battery reverts to self-consumption (``StorCtl_Mod`` back to 0), as inverters do when the
  energy manager that wrote the setpoint goes silent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from meter.codec import encode

SUNSPEC_BASE = 40000
COMMON_LENGTH = 66
STORAGE_MODEL = 124
STORAGE_LENGTH = 24
BATTERY_MODEL = 802
BATTERY_LENGTH = 62
NOMINAL_DC_V = 400
"""The simulated battery bank's DC voltage (for the amp-hour rating and current)."""

# model 124 point offsets from the model's ID register
WCHAMAX, WCHAGRA, WDISCHAGRA, STORCTL_MOD, VACHAMAX, MINRSVPCT, CHASTATE, STORAVAL = range(2, 10)
INBATV, CHAST, OUTWRTE, INWRTE, WINTMS, RVRTTMS, RMPTMS, CHAGRISET = range(10, 18)
WCHAMAX_SF, WCHADISCHAGRA_SF, VACHAMAX_SF, MINRSVPCT_SF, CHASTATE_SF = range(18, 23)
STORAVAL_SF, INBATV_SF, INOUTWRTE_SF = range(23, 26)
CONTROL_POINTS: dict[int, tuple[str, bool]] = {
    WCHAMAX: ("wcha_max", False), STORCTL_MOD: ("storctl_mod", False),
    MINRSVPCT: ("min_rsv_pct", False), OUTWRTE: ("out_wrte", True), INWRTE: ("in_wrte", True),
    WINTMS: ("win_tms", False), RVRTTMS: ("rvrt_tms", False), RMPTMS: ("rmp_tms", False),
    CHAGRISET: ("cha_gri_set", False),
}  # fmt: skip
"""Points a client may write: offset -> (control field, signed). WChaGra, WDisChaGra and
VAChaMax are not implemented."""
WRITABLE_124 = frozenset(CONTROL_POINTS)

# model 802 point offsets
AHRTG, WHRTG, WCHARTEMAX, WDISCHARTEMAX, DISCHARTE, SOCMAX, SOCMIN = range(2, 9)
SOCRSVMAX, SOCRSVMIN, SOC, DOD, SOH, NCYC = 9, 10, 11, 12, 13, 14
B_CHAST, LOCREMCTL, HB, CTRLHB, ALMRST, TYP, STATE, STATEVND = 16, 17, 18, 19, 20, 21, 22, 23
WARRDT = 24
B_V, B_A, B_W, SETOP, SETINVSTATE = 34, 44, 47, 50, 51
AHRTG_SF, WHRTG_SF, WCHADISCHAMAX_SF, DISCHARTE_SF, SOC_SF = 52, 53, 54, 55, 56
DOD_SF, SOH_SF, V_SF, CELLV_SF, A_SF, AMAX_SF, W_SF = 57, 58, 59, 60, 61, 62, 63

# scale factors the simulator serves
SF_PCT = -1  # ChaState, MinRsvPct, SoC, SoCMin/Max: 0.1 % = 1 permille
SF_RATE = -2  # InWRte/OutWRte: 0.01 %
SF_WH = 1  # WHRtg: 10 Wh

CHA_ST = {"off": 1, "empty": 2, "discharging": 3, "charging": 4, "full": 5, "holding": 6}
NOT_IMPLEMENTED_U16 = 0xFFFF
NOT_IMPLEMENTED_I16 = 0x8000


@dataclass(frozen=True)
class BatteryConfig:
    """A simulated battery's nameplate and management limits (integers)."""

    capacity_wh: int
    max_charge_w: int
    max_discharge_w: int
    soc_min_permille: int = 100
    soc_max_permille: int = 950
    efficiency_permille: int = 900
    """Round trip, charged on the way in."""
    initial_soc_permille: int = 500
    serial: int = 70_000_001

    def __post_init__(self) -> None:
        checks = [
            (0 < self.capacity_wh <= 655_350, "capacity_wh in 1..655350"),
            (0 <= self.max_charge_w <= 32_767, "max_charge_w in 0..32767"),
            (0 <= self.max_discharge_w <= 32_767, "max_discharge_w in 0..32767"),
            (0 <= self.soc_min_permille < self.soc_max_permille <= 1000,
             "0 <= soc_min_permille < soc_max_permille <= 1000"),
            (0 < self.efficiency_permille <= 1000, "efficiency_permille in 1..1000"),
            (0 <= self.initial_soc_permille <= 1000, "initial_soc_permille in 0..1000"),
        ]  # fmt: skip
        for ok, what in checks:
            if not ok:
                raise ValueError(f"battery: {what}")

    @property
    def soc_min_wh(self) -> float:
        """The battery management's floor (Wh)."""
        return self.capacity_wh * self.soc_min_permille / 1000

    @property
    def soc_max_wh(self) -> float:
        """The battery management's ceiling (Wh)."""
        return self.capacity_wh * self.soc_max_permille / 1000


@dataclass
class BatteryControl:
    """Model 124's writable points as raw register values (what a client wrote)."""

    wcha_max: int
    storctl_mod: int = 0
    min_rsv_pct: int = 0
    """Permille (scale factor -1 on a percentage)."""
    out_wrte: int = 0
    in_wrte: int = 0
    """Hundredths of a percent, signed (int16)."""
    win_tms: int = 0
    rvrt_tms: int = 0
    rmp_tms: int = 0
    cha_gri_set: int = 0
    written_at: float = 0.0
    """Simulated time of the last control write."""


class WriteRefused(ValueError):
    """A Modbus write the battery refuses; ``code`` is the Modbus exception code to answer."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class SimulatedBattery:
    """One battery: its state of charge, its control registers and its last AC power."""

    config: BatteryConfig
    soc_wh: float = field(init=False)
    power_w: float = 0.0
    """AC power of the last step, positive = charging."""
    control: BatteryControl = field(init=False)
    time_s: float = 0.0
    writes: int = 0

    def __post_init__(self) -> None:
        c = self.config
        self.soc_wh = c.capacity_wh * c.initial_soc_permille / 1000
        self.control = BatteryControl(wcha_max=c.max_charge_w, min_rsv_pct=c.soc_min_permille)

    @property
    def floor_wh(self) -> float:
        """The lowest stored energy a discharge may reach: the management's floor or the
        written reserve, whichever is higher."""
        c = self.config
        return max(c.soc_min_wh, c.capacity_wh * min(1000, self.control.min_rsv_pct) / 1000)

    @property
    def soc_permille(self) -> int:
        """State of charge in permille of the capacity (rounded down)."""
        return int(self.soc_wh * 1000 // self.config.capacity_wh)

    @property
    def remote(self) -> bool:
        """True while a remote setpoint is in force (not reverted)."""
        ctl = self.control
        if not ctl.storctl_mod & 3:
            return False
        return not (ctl.rvrt_tms and self.time_s - ctl.written_at > ctl.rvrt_tms)

    def window(self) -> tuple[float, float]:
        """(lower, upper) bound on the AC power the control registers allow."""
        ctl, c = self.control, self.config
        if not self.remote:
            return -math.inf, math.inf
        upper = ctl.in_wrte / 10_000 * ctl.wcha_max if ctl.storctl_mod & 1 else math.inf
        lower = -ctl.out_wrte / 10_000 * c.max_discharge_w if ctl.storctl_mod & 2 else -math.inf
        return lower, upper

    def step(self, net_w: float, dt_s: float) -> float:
        """Advance ``dt_s`` seconds with the household's load minus PV at ``net_w`` (W,
        positive = deficit); returns the battery's AC power (positive = charging)."""
        c, ctl = self.config, self.control
        if ctl.storctl_mod & 3 and not self.remote:
            ctl.storctl_mod = 0  # reverted: the writer went silent
        lower, upper = self.window()
        power = -net_w  # self-consumption
        power = 0.0 if lower > upper else min(max(power, lower), upper)
        if ctl.cha_gri_set == 0:
            power = min(power, max(0.0, -net_w))  # charge from own surplus only
        eff = c.efficiency_permille / 1000
        if power > 0:
            room = max(0.0, c.soc_max_wh - self.soc_wh)
            power = max(0.0, min(power, c.max_charge_w, ctl.wcha_max, room * 3600 / dt_s / eff))
            if power > 0:
                self.soc_wh = min(c.soc_max_wh, self.soc_wh + power * dt_s / 3600 * eff)
        elif power < 0:
            avail = max(0.0, self.soc_wh - self.floor_wh)
            power = -min(-power, c.max_discharge_w, avail * 3600 / dt_s)
            if power < 0:
                self.soc_wh = max(self.floor_wh, self.soc_wh + power * dt_s / 3600)
            else:
                power = 0.0
        self.power_w = power
        self.time_s += dt_s
        return power

    # ----- Modbus -------------------------------------------------------------------------

    def write(self, offset: int, values: list[int], time_s: float) -> None:
        """A client writes ``values`` from model 124 point ``offset`` on (raw registers);
        :class:`WriteRefused` for a read-only or unknown point or a value out of range."""
        ctl = self.control
        new = {off: v & 0xFFFF for off, v in zip(range(offset, offset + len(values)), values,
                                                  strict=True)}  # fmt: skip
        for off, raw in new.items():
            if off not in WRITABLE_124:
                raise WriteRefused(f"model 124 point at offset {off} is not writable", 2)
            signed = raw - 0x10000 if raw >= 0x8000 else raw
            if off == WCHAMAX and not 0 <= raw <= self.config.max_charge_w:
                raise WriteRefused(f"WChaMax {raw} W outside 0..{self.config.max_charge_w}", 3)
            if off == STORCTL_MOD and raw & ~3:
                raise WriteRefused(f"StorCtl_Mod {raw:#x}: only bits 0 and 1 exist", 3)
            if off == MINRSVPCT and raw > 1000:
                raise WriteRefused(f"MinRsvPct {raw / 10}% above 100%", 3)
            if off in (INWRTE, OUTWRTE) and not -10_000 <= signed <= 10_000:
                raise WriteRefused(f"rate {signed / 100}% outside -100..100%", 3)
            if off == CHAGRISET and raw not in (0, 1):
                raise WriteRefused(f"ChaGriSet {raw} is not 0 (PV) or 1 (GRID)", 3)
        for off, raw in new.items():
            name, is_signed = CONTROL_POINTS[off]
            setattr(ctl, name, raw - 0x10000 if is_signed and raw >= 0x8000 else raw)
        ctl.written_at = time_s
        self.time_s = max(self.time_s, time_s)
        self.writes += 1

    def charge_status(self) -> int:
        """Model 124/802 ``ChaSt``."""
        if self.power_w > 0:
            return CHA_ST["charging"]
        if self.power_w < 0:
            return CHA_ST["discharging"]
        if self.soc_wh >= self.config.soc_max_wh - 1e-9:
            return CHA_ST["full"]
        if self.soc_wh <= self.floor_wh + 1e-9:
            return CHA_ST["empty"]
        return CHA_ST["holding"] if self.remote else CHA_ST["off"]


def _u16(value: float) -> int:
    return max(0, min(0xFFFE, round(value)))


def _i16(value: float) -> int:
    return encode(max(-0x7FFF, min(0x7FFF, round(value))), "int16")[0]


def battery_layout(base: int = SUNSPEC_BASE) -> tuple[int, int, int]:
    """(common model address, model 124 address, model 802 address) for ``base``."""
    common = base + 2
    storage = common + 2 + COMMON_LENGTH
    return common, storage, storage + 2 + STORAGE_LENGTH


def battery_image(battery: SimulatedBattery, base: int = SUNSPEC_BASE,
                  bad_soc: bool = False) -> tuple[int, list[int]]:  # fmt: skip
    """The battery inverter's holding registers from ``base``: "SunS", common model 1,
    storage model 124, battery model 802, end marker. ``bad_soc`` serves a state of charge of
    6553.4 % (fault injection: a garbage register the reader must refuse)."""
    c, ctl = battery.config, battery.control
    common, storage, bat = battery_layout(base)
    end = bat + 2 + BATTERY_LENGTH
    regs = [0] * (end + 2 - base)

    def put(address: int, words: list[int]) -> None:
        regs[address - base : address - base + len(words)] = words

    put(base, [0x5375, 0x6E53])
    put(common, [1, COMMON_LENGTH])
    put(common + 2, encode("Microgrid", "string", length=16))
    put(common + 18, encode("SimBattery 124/802", "string", length=16))
    put(common + 34, encode("", "string", length=8))
    put(common + 42, encode("1.0", "string", length=8))
    put(common + 50, encode(f"BAT{c.serial}", "string", length=16))
    put(common + 66, [1, 0x8000])
    soc = NOT_IMPLEMENTED_U16 - 1 if bad_soc else _u16(battery.soc_wh * 1000 / c.capacity_wh)
    cha_st = battery.charge_status()
    m = [0] * (2 + STORAGE_LENGTH)
    m[0], m[1] = STORAGE_MODEL, STORAGE_LENGTH
    m[WCHAMAX] = ctl.wcha_max
    m[WCHAGRA] = m[WDISCHAGRA] = m[VACHAMAX] = NOT_IMPLEMENTED_U16
    m[STORCTL_MOD] = ctl.storctl_mod
    m[MINRSVPCT] = ctl.min_rsv_pct
    m[CHASTATE] = soc
    m[STORAVAL] = _u16(max(0.0, battery.soc_wh - battery.floor_wh) / NOMINAL_DC_V)
    m[INBATV] = NOMINAL_DC_V * 10
    m[CHAST] = cha_st
    m[OUTWRTE] = encode(ctl.out_wrte, "int16")[0]
    m[INWRTE] = encode(ctl.in_wrte, "int16")[0]
    m[WINTMS], m[RVRTTMS], m[RMPTMS] = ctl.win_tms, ctl.rvrt_tms, ctl.rmp_tms
    m[CHAGRISET] = ctl.cha_gri_set
    sfs = {
        WCHAMAX_SF: 0,
        WCHADISCHAGRA_SF: 0,
        VACHAMAX_SF: 0,
        MINRSVPCT_SF: SF_PCT,
        CHASTATE_SF: SF_PCT,
        STORAVAL_SF: 0,
        INBATV_SF: -1,
        INOUTWRTE_SF: SF_RATE,
    }
    for off, sf in sfs.items():
        m[off] = encode(sf, "sunssf")[0]
    put(storage, m)
    b = [NOT_IMPLEMENTED_U16] * (2 + BATTERY_LENGTH)
    b[0], b[1] = BATTERY_MODEL, BATTERY_LENGTH
    b[AHRTG] = _u16(c.capacity_wh / NOMINAL_DC_V * 10)
    b[WHRTG] = _u16(c.capacity_wh / 10)
    b[WCHARTEMAX], b[WDISCHARTEMAX] = c.max_charge_w, c.max_discharge_w
    b[SOCMAX], b[SOCMIN] = c.soc_max_permille, c.soc_min_permille
    b[SOCRSVMIN] = ctl.min_rsv_pct
    b[SOC] = soc
    b[SOH] = 1000
    b[NCYC], b[NCYC + 1] = 0, 0
    b[B_CHAST] = cha_st
    b[LOCREMCTL] = 0 if battery.remote else 1
    b[HB] = int(battery.time_s) & 0xFFFF
    b[CTRLHB] = b[ALMRST] = 0
    b[TYP], b[STATE] = 4, 3  # lithium-ion, connected
    b[WARRDT], b[WARRDT + 1] = 0, 0
    b[WARRDT + 2 : WARRDT + 10] = [0] * 8  # Evt1, Evt2, EvtVnd1, EvtVnd2
    b[B_V] = NOMINAL_DC_V * 10
    b[B_A] = _i16(battery.power_w / NOMINAL_DC_V * 10)
    b[B_W] = _i16(battery.power_w)
    b[B_W + 1] = NOT_IMPLEMENTED_U16  # ReqInvState
    b[B_W + 2] = NOT_IMPLEMENTED_I16  # ReqW
    b[SETOP], b[SETINVSTATE] = 1, 3
    sfs = {
        AHRTG_SF: -1,
        WHRTG_SF: SF_WH,
        WCHADISCHAMAX_SF: 0,
        DISCHARTE_SF: 0,
        SOC_SF: SF_PCT,
        DOD_SF: 0,
        SOH_SF: SF_PCT,
        V_SF: -1,
        CELLV_SF: -3,
        A_SF: -1,
        AMAX_SF: 0,
        W_SF: 0,
    }
    for off, sf in sfs.items():
        b[off] = encode(sf, "sunssf")[0]
    put(bat, b)
    put(end, [0xFFFF, 0])
    return base, regs
