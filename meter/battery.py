"""Home batteries over Modbus: a SunSpec storage inverter (models 124 and 802), read and set.

:class:`BatteryClient` finds the SunSpec chain (the "SunS" marker at 40000, 0 or 50000), reads
the battery's rating and state from the battery model 802 and its control points from the
storage model 124, validates every value, and writes a charge/discharge setpoint into model 124
(docs/meters.md, "Batteries"). Blocking Modbus calls run in a worker thread
(``trio.to_thread.run_sync``), like :class:`~meter.reader.MeterReader`'s.

Nothing a device sends reaches the caller unchecked: a point the planner needs that is "not
implemented", a scale factor outside -10..10, a capacity, power or percentage outside its
bounds, model 124's ``ChaState`` disagreeing with model 802's ``SoC``, or a state of charge
that moved further than the battery's power allows since the last accepted read all raise a
typed :class:`~meter.events.MeterError` naming the point (``ImplausibleValue``), and the last
good :class:`BatteryStatus` is kept, not replaced.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import trio

from meter import sunspec
from meter.codec import decode
from meter.events import ImplausibleValue, MeterError, SunSpecNotFound
from meter.transport import Endpoint, ModbusLink

STORAGE_MODEL = 124
BATTERY_MODEL = 802
STORAGE_POINTS = 26
"""Model 124 registers read (ID, L and 24 points)."""
BATTERY_POINTS = 64
"""Model 802 registers read (ID, L and 62 points)."""
SOC_TOLERANCE_PERMILLE = 20
"""How far model 124's ``ChaState`` may differ from model 802's ``SoC``."""

# model 124 offsets from its ID register (meter/sim/battery.py serves the same map)
WCHAMAX, STORCTL_MOD, MINRSVPCT, CHASTATE = 2, 5, 7, 8
OUTWRTE, INWRTE, RVRTTMS, CHAGRISET = 12, 13, 15, 17
WCHAMAX_SF, MINRSVPCT_SF, CHASTATE_SF, INOUTWRTE_SF = 18, 21, 22, 25
# model 802 offsets
WHRTG, WCHARTEMAX, WDISCHARTEMAX, SOCMAX, SOCMIN, SOC, B_W = 3, 4, 5, 7, 8, 11, 47
WHRTG_SF, WCHADISCHAMAX_SF, SOC_SF, W_SF = 53, 54, 56, 63


@dataclass(frozen=True)
class BatteryStatus:
    """One validated read of a battery (integers; energy in Wh, power in W)."""

    name: str
    serial: str
    capacity_wh: int
    soc_permille: int
    soc_min_permille: int
    """The higher of the battery's own minimum (802 ``SoCMin``) and the reserve (124
    ``MinRsvPct``): discharging stops here."""
    soc_max_permille: int
    max_charge_w: int
    """The lower of the nameplate (802 ``WChaRteMax``) and the setting (124 ``WChaMax``)."""
    max_discharge_w: int
    power_w: int | None
    """DC power of the battery bank (802 ``W``, positive = charging), if implemented."""
    remote: bool
    """A remote setpoint is in force (124 ``StorCtl_Mod`` has bit 0 or 1 set)."""
    time: float
    """Wall-clock time of the read."""

    @property
    def soc_wh(self) -> int:
        """Stored energy, rounded down."""
        return self.capacity_wh * self.soc_permille // 1000

    @property
    def soc_min_wh(self) -> int:
        """The floor in Wh, rounded up."""
        return -(-self.capacity_wh * self.soc_min_permille // 1000)

    @property
    def soc_max_wh(self) -> int:
        """The ceiling in Wh, rounded down."""
        return self.capacity_wh * self.soc_max_permille // 1000

    def as_dict(self) -> dict[str, object]:
        """The status document's view."""
        return {"serial": self.serial, "capacity_wh": self.capacity_wh,
                "soc_permille": self.soc_permille, "soc_wh": self.soc_wh,
                "soc_min_permille": self.soc_min_permille,
                "soc_max_permille": self.soc_max_permille, "max_charge_w": self.max_charge_w,
                "max_discharge_w": self.max_discharge_w, "power_w": self.power_w,
                "remote": self.remote}  # fmt: skip


@dataclass(frozen=True)
class _Layout:
    serial_address: int
    storage: int
    battery: int


class BatteryClient:
    """Reads and sets one SunSpec battery inverter; see the module docstring.

    ``max_power_w`` and ``max_capacity_wh`` bound what a device may report (a larger value is
    refused, not believed). ``clock`` is the battery's time base for the state-of-charge
    plausibility check (simulated seconds against an accelerated simulator)."""

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        device_id: int = 1,
        *,
        timeout_s: float = 1.0,
        max_power_w: int = 50_000,
        max_capacity_wh: int = 1_000_000,
        base_addresses: tuple[int, ...] = (40000, 0, 50000),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.device_id = device_id
        self.max_power_w = max_power_w
        self.max_capacity_wh = max_capacity_wh
        self.base_addresses = base_addresses
        self.clock = clock
        self.wall_clock = wall_clock
        self.link = ModbusLink(endpoint, timeout_s)
        self._layout: _Layout | None = None
        self._rate_sf: int | None = None
        self._wcha_max = 0
        """``WChaMax`` as last read: ``InWRte`` is a percentage of it."""
        self.last: BatteryStatus | None = None
        """The last accepted read."""
        self._last_at: float | None = None
        self._doubted: BatteryStatus | None = None
        """A read refused for a state-of-charge jump: a second read agreeing with it is
        accepted (the battery really is there: replaced, or recalibrated)."""
        self.last_error: MeterError | None = None
        self.errors = 0
        self.writes = 0

    # ----- blocking part (worker thread) ----------------------------------------------------

    def _scan(self) -> _Layout:
        base, models = sunspec.scan_models(self.link, self.name, self.device_id,
                                           self.base_addresses)  # fmt: skip
        found = {m.model_id: m for m in models}
        common, storage, battery = found.get(1), found.get(STORAGE_MODEL), found.get(BATTERY_MODEL)
        if common is None or storage is None or battery is None:
            raise SunSpecNotFound(
                self.name,
                f"a battery inverter needs models 1, 124 and 802 "
                f"after SunS at {base}; found {sorted(found)}",
                base=base,
            )
        if storage.length < STORAGE_POINTS - 2 or battery.length < BATTERY_POINTS - 2:
            raise SunSpecNotFound(
                self.name,
                f"models 124/802 too short ({storage.length}, {battery.length} registers)",
                base=base,
            )
        return _Layout(common.address + 50, storage.address, battery.address)

    def _read_blocking(self) -> tuple[str, list[int], list[int]]:
        if self._layout is None:
            self._layout = self._scan()
        lay = self._layout
        serial = self.link.read(self.name, "holding", lay.serial_address, 16, self.device_id)
        storage = self.link.read(self.name, "holding", lay.storage, STORAGE_POINTS,
                                 self.device_id)  # fmt: skip
        battery = self.link.read(self.name, "holding", lay.battery, BATTERY_POINTS,
                                 self.device_id)  # fmt: skip
        if storage[0] != STORAGE_MODEL or battery[0] != BATTERY_MODEL:
            self._layout = None  # the chain moved (firmware update?): scan again next time
            raise SunSpecNotFound(self.name, "models 124/802 are no longer where the scan "
                                  "found them")  # fmt: skip
        return str(decode(serial, "string")), storage, battery

    # ----- decoding and checks ----------------------------------------------------------------

    def _bad(self, point: str, message: str, **context: object) -> ImplausibleValue:
        return ImplausibleValue(self.name, f"{point}: {message}", field=point, **context)

    def _sf(self, regs: list[int], offset: int, point: str, required: bool = True) -> int | None:
        value = decode([regs[offset]], "sunssf", sunspec=True)
        if value is None:
            if required:
                raise self._bad(point, "scale factor not implemented")
            return None
        assert isinstance(value, int)
        if not -10 <= value <= 10:
            raise self._bad(point, f"scale factor {value} outside -10..10", raw=value)
        return value

    def _scaled(self, regs: list[int], offset: int, type_name: str, sf: int | None,
                point: str, required: bool = True) -> Fraction | None:  # fmt: skip
        value = decode([regs[offset]], type_name, sunspec=True)
        if value is None or sf is None:
            if required:
                raise self._bad(point, "not implemented")
            return None
        assert isinstance(value, int)
        return Fraction(value) * Fraction(10) ** sf

    def _within(self, value: Fraction, low: int, high: int, point: str) -> int:
        """``value`` rounded down, if it lies in ``low..high``."""
        return math.floor(self._check(value, low, high, point))

    def _check(self, value: Fraction, low: int, high: int, point: str) -> Fraction:
        if not low <= value <= high:
            raise self._bad(point, f"{float(value):g} outside {low}..{high}", value=float(value))
        return value

    def decode_status(self, serial: str, storage: list[int], battery: list[int],
                      wall: float) -> BatteryStatus:  # fmt: skip
        """Validate raw model 124 and 802 registers into a :class:`BatteryStatus` (pure but
        for remembering the rate scale factor for writes); raises :class:`ImplausibleValue`."""
        s, b = storage, battery
        wh_sf = self._sf(b, WHRTG_SF, "WHRtg_SF")
        capacity = self._within(self._scaled(b, WHRTG, "uint16", wh_sf, "WHRtg") or Fraction(0),
                                1, self.max_capacity_wh, "WHRtg")  # fmt: skip
        pct_sf = self._sf(b, SOC_SF, "SoC_SF")
        soc_pct = self._scaled(b, SOC, "uint16", pct_sf, "SoC")
        assert soc_pct is not None
        soc = self._within(soc_pct * 10, 0, 1000, "SoC")
        lo_pct = self._scaled(b, SOCMIN, "uint16", pct_sf, "SoCMin", required=False)
        hi_pct = self._scaled(b, SOCMAX, "uint16", pct_sf, "SoCMax", required=False)
        lo = 0 if lo_pct is None else math.ceil(self._check(lo_pct * 10, 0, 1000, "SoCMin"))
        hi = 1000 if hi_pct is None else self._within(hi_pct * 10, 0, 1000, "SoCMax")
        rsv_pct = self._scaled(
            s,
            MINRSVPCT,
            "uint16",
            self._sf(s, MINRSVPCT_SF, "MinRsvPct_SF", False),
            "MinRsvPct",
            False,
        )
        if rsv_pct is not None:
            lo = max(lo, math.ceil(self._check(rsv_pct * 10, 0, 1000, "MinRsvPct")))
        if not lo < hi:
            raise self._bad("SoCMin", f"floor {lo} permille not below ceiling {hi} permille")
        cha = self._scaled(s, CHASTATE, "uint16", self._sf(s, CHASTATE_SF, "ChaState_SF", False),
                           "ChaState", False)  # fmt: skip
        if cha is not None and abs(cha * 10 - soc_pct * 10) > SOC_TOLERANCE_PERMILLE:
            raise self._bad("ChaState", f"{float(cha):g} % disagrees with SoC "
                            f"{float(soc_pct):g} %", value=float(cha))  # fmt: skip
        w_sf = self._sf(b, WCHADISCHAMAX_SF, "WChaDisChaMax_SF")
        cha_max = self._within(self._scaled(b, WCHARTEMAX, "uint16", w_sf, "WChaRteMax")
                               or Fraction(0), 0, self.max_power_w, "WChaRteMax")  # fmt: skip
        dis_max = self._within(self._scaled(b, WDISCHARTEMAX, "uint16", w_sf, "WDisChaRteMax")
                               or Fraction(0), 0, self.max_power_w, "WDisChaRteMax")  # fmt: skip
        setting = self._scaled(s, WCHAMAX, "uint16", self._sf(s, WCHAMAX_SF, "WChaMax_SF"),
                               "WChaMax")  # fmt: skip
        assert setting is not None
        self._wcha_max = self._within(setting, 0, self.max_power_w, "WChaMax")
        cha_max = min(cha_max, self._wcha_max)
        mod = decode([s[STORCTL_MOD]], "uint16")
        assert isinstance(mod, int)
        self._rate_sf = self._sf(s, INOUTWRTE_SF, "InOutWRte_SF")
        power = self._scaled(b, B_W, "int16", self._sf(b, W_SF, "W_SF", False), "W", False)
        power_w = None
        if power is not None:
            power_w = self._within(power, -self.max_power_w, self.max_power_w, "W")
        return BatteryStatus(self.name, serial, capacity, soc, lo, hi, cha_max, dis_max, power_w,
                             mod != 0xFFFF and bool(mod & 3), wall)  # fmt: skip

    def _plausible(self, status: BatteryStatus, now: float) -> None:
        """Refuse a state of charge that moved further than the battery's power allows since
        the last accepted read (plus 2 % of the capacity), unless a second read agrees."""
        last, at = self.last, self._last_at
        if last is None or at is None or last.capacity_wh != status.capacity_wh:
            return
        rate = max(last.max_charge_w, last.max_discharge_w, status.max_charge_w,
                   status.max_discharge_w)  # fmt: skip
        slack = rate * max(0.0, now - at) / 3600 * 1.1 + status.capacity_wh / 50 + 10
        if abs(status.soc_wh - last.soc_wh) <= slack:
            self._doubted = None
            return
        doubted, self._doubted = self._doubted, status
        if doubted is not None and abs(doubted.soc_wh - status.soc_wh) <= status.capacity_wh / 50:
            self._doubted = None
            return
        raise self._bad("SoC", f"moved {status.soc_wh - last.soc_wh:+d} Wh since the last read, "
                        f"more than {slack:.0f} Wh the battery's power allows",
                        value=status.soc_permille)  # fmt: skip

    # ----- trio-facing ------------------------------------------------------------------------

    async def read(self) -> BatteryStatus:
        """Read and validate the battery; a :class:`MeterError` (typed, with context) if the
        device fails to answer or sends anything implausible. Never returns an unchecked
        value; the last good status stays in :attr:`last`."""
        try:
            serial, storage, battery = await trio.to_thread.run_sync(self._read_blocking)
            status = self.decode_status(serial, storage, battery, self.wall_clock())
            now = self.clock()
            self._plausible(status, now)
        except MeterError as exc:
            self.errors += 1
            self.last_error = exc
            raise
        self.last, self._last_at, self.last_error = status, now, None
        return status

    def setpoint_registers(self, power_w: int, revert_s: int, grid_charging: bool
                           ) -> list[int]:  # fmt: skip
        """Model 124 ``OutWRte, InWRte, InOutWRte_WinTms, InOutWRte_RvrtTms,
        InOutWRte_RmpTms, ChaGriSet`` for a forced AC power of ``power_w`` (positive =
        charge; clamped to the limits last read): ``InWRte`` rounded up and ``-OutWRte`` down
        (in percent of ``WChaMax`` and of 802's ``WDisChaRteMax``), so the window they bound
        always contains ``power_w``."""
        last, sf = self.last, self._rate_sf
        if last is None or sf is None:
            raise ValueError("read the battery before setting it")
        power_w = max(-last.max_discharge_w, min(last.max_charge_w, power_w))
        unit = 100 * 10 ** (-sf) if sf <= 0 else Fraction(100, 10**sf)

        def share(w: int, of: int, up: bool) -> int:
            if of <= 0:
                return 0
            x = Fraction(w) * unit / of
            return max(-0x7FFF, min(0x7FFF, math.ceil(x) if up else math.floor(x)))

        in_rte = share(power_w, self._wcha_max, True)
        out_rte = -share(power_w, last.max_discharge_w, False)
        return [out_rte & 0xFFFF, in_rte & 0xFFFF, 0, max(0, min(0xFFFF, revert_s)), 0,
                1 if grid_charging else 0]  # fmt: skip

    async def set_power(self, power_w: int, *, revert_s: int, grid_charging: bool = True) -> None:
        """Force the battery's AC power to ``power_w`` (positive = charge; clamped to its
        limits) until the next call, or for ``revert_s`` seconds (then it falls back to
        self-consumption). Needs a successful :meth:`read` first."""
        layout = self._layout
        if layout is None:
            raise ValueError("read the battery before setting it")
        values = self.setpoint_registers(power_w, revert_s, grid_charging)

        def write() -> None:
            self.link.write(self.name, layout.storage + OUTWRTE, values, self.device_id)
            self.link.write(self.name, layout.storage + STORCTL_MOD, [3], self.device_id)

        await trio.to_thread.run_sync(write)
        self.writes += 1

    async def release(self) -> None:
        """Hand the battery back to its own self-consumption control (``StorCtl_Mod`` = 0)."""
        layout = self._layout
        if layout is None:
            return
        await trio.to_thread.run_sync(
            self.link.write, self.name, layout.storage + STORCTL_MOD, [0], self.device_id
        )
        self.writes += 1

    def close(self) -> None:
        """Close the connection."""
        self.link.close()
