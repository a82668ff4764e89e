"""The simulator's Modbus servers: pymodbus TCP (and RTU) servers in a background thread.

:class:`MeterSimulator` owns the households, the simulated clock and the fault switches, and
runs real pymodbus servers (one device id per household on one port, or one port per
household, and optionally an RTU server on a serial device) on an asyncio loop in its own
thread. Register values are served through pymodbus's ``SimDevice(action=...)`` hook from
images rebuilt after every simulation step, so a request always sees one consistent step.

Time: with ``speed > 0`` simulated time follows the wall clock times ``speed``; with
``speed = 0`` it moves only through :meth:`MeterSimulator.advance` (tests). Either way the
state at simulated time T depends only on the seed and T: same seed, same run.

Batteries: a household with a battery has it behind its trading meter, served as a SunSpec
storage inverter (common model 1, storage model 124, battery model 802;
:mod:`meter.sim.battery`) at device id ``battery_device_offset + household device id`` (or, with
``port_per_household``, on its own port after the meters'); its control points are writable.

Feeder: with ``feeder=True`` a feeder meter (the operator's meter at the transformer,
:mod:`meter.sim.feeder`) is served at ``feeder_device`` (default 100) next to the households;
its counters integrate the households' net flow plus ``feeder_loss`` of the energy they move,
stepped in the same loop as the households.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from meter.profile import Profile, load_profile
from meter.sim.battery import (
    SimulatedBattery,
    WriteRefused,
    battery_image,
    battery_layout,
)
from meter.sim.faults import Faults, parse_fault
from meter.sim.feeder import (
    DEFAULT_FEEDER_DEVICE,
    DEFAULT_FEEDER_LOSS,
    Feeder,
    FeederConfig,
    feeder_serial,
)
from meter.sim.household import HouseholdConfig, MeterState, SimulatedHousehold, make_households
from meter.sim.registers import Image, fixed_image, sunspec_image
from meter.sim.solar import Clouds

DEFAULT_START = dt.datetime(2025, 6, 21, 6, 0)
TABLES = {3: "holding", 4: "input", 6: "holding", 16: "holding"}  # 6, 16: read-back after a write
WRITES = (6, 16)  # write single / multiple holding registers
DEFAULT_BATTERY_DEVICE_OFFSET = 100
"""A household's battery inverter answers at its meter's device id plus this."""


class MeterSimulator:
    """Simulated households behind real Modbus servers; usable as a context manager."""

    def __init__(
        self,
        households: int | Sequence[HouseholdConfig] = 4,
        *,
        seed: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        port_per_household: bool = False,
        serial_device: str | None = None,
        serial_baudrate: int = 9600,
        tcp: bool = True,
        speed: float = 60.0,
        start: dt.datetime = DEFAULT_START,
        latitude: float = 52.5,
        step_s: float = 5.0,
        faults: Sequence[str] = (),
        feeder: bool = False,
        feeder_device: int = DEFAULT_FEEDER_DEVICE,
        feeder_loss: float = DEFAULT_FEEDER_LOSS,
        feeder_profile: str = "sdm630",
        battery_device_offset: int = DEFAULT_BATTERY_DEVICE_OFFSET,
    ) -> None:
        configs = (make_households(households, seed) if isinstance(households, int)
                   else list(households))
        self.seed = seed
        self.host = host
        self.port = port
        self.port_per_household = port_per_household
        self.serial_device = serial_device
        self.serial_baudrate = serial_baudrate
        self.tcp = tcp
        self.speed = speed
        self.start_time = start
        self.step_s = step_s
        clouds = Clouds(seed)
        self.households = {
            c.device_id: SimulatedHousehold(c, seed, start, latitude, clouds) for c in configs
        }
        self.profiles: dict[int, Profile] = {
            c.device_id: load_profile(c.profile) for c in configs
        }
        self.feeder: Feeder | None = None
        if feeder:
            if not 1 <= feeder_device <= 247 or feeder_device in self.households:
                raise ValueError(f"feeder device id {feeder_device} must be in 1..247 and not a "
                                 "household's")
            self.feeder = Feeder(FeederConfig(device_id=feeder_device, profile=feeder_profile,
                                              serial=feeder_serial(seed), loss=feeder_loss))
            self.profiles[feeder_device] = load_profile(feeder_profile)
        self.batteries: dict[int, int] = {}
        """Battery inverter device id -> its household's device id."""
        for d, h in self.households.items():
            if h.battery is None:
                continue
            unit = d + battery_device_offset
            if not 1 <= unit <= 247 or unit in self.households or unit == self.feeder_device:
                raise ValueError(f"battery of household {d} would answer at device id {unit}: "
                                 "outside 1..247 or taken (change battery_device_offset)")
            self.batteries[unit] = d
        self.faults: dict[int, Faults] = {d: Faults() for d in self._devices()}
        self._images: dict[int, dict[str, Image]] = {}
        self._lock = threading.RLock()
        self._sim_time = 0.0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.ports: list[int] = []
        """Bound ports: one, or with ``port_per_household`` one per meter (households, then
        the feeder)."""
        self.battery_ports: dict[int, int] = {}
        """With ``port_per_household``: each battery inverter's port, by its device id."""
        self._rebind: list[int] = []
        self.requests = 0
        for device_id in self._devices():
            self._rebuild(device_id)
        for text in faults:
            device_id, kind, value = parse_fault(text)
            self.set_fault(device_id, kind, value)

    # ----- state -----------------------------------------------------------------------

    @property
    def sim_time(self) -> float:
        """Simulated seconds since the start."""
        return self._sim_time

    @property
    def device_ids(self) -> list[int]:
        """Device ids of the households, in order."""
        return list(self.households)

    def now(self) -> dt.datetime:
        """The simulated wall-clock time."""
        return self.start_time + dt.timedelta(seconds=self._sim_time)

    @property
    def feeder_device(self) -> int | None:
        """The feeder meter's device id (None without a feeder)."""
        return None if self.feeder is None else self.feeder.config.device_id

    def _meters(self) -> dict[int, SimulatedHousehold | Feeder]:
        """Every served meter by device id: the households, then the feeder (if any)."""
        meters: dict[int, SimulatedHousehold | Feeder] = dict(self.households)
        if self.feeder is not None:
            meters[self.feeder.config.device_id] = self.feeder
        return meters

    def _devices(self) -> list[int]:
        """Every served device id: the meters, then the battery inverters."""
        return [*self._meters(), *self.batteries]

    def battery_device(self, household: int) -> int:
        """The device id of household ``household``'s battery inverter (KeyError: none)."""
        for unit, d in self.batteries.items():
            if d == household:
                return unit
        raise KeyError(household)

    def battery(self, household: int) -> SimulatedBattery:
        """Household ``household``'s simulated battery (KeyError without one); read it under
        :meth:`locked` while the simulator runs."""
        battery = self.households[household].battery
        if battery is None:
            raise KeyError(household)
        return battery

    def locked(self) -> threading.RLock:
        """The lock every step and Modbus request holds (``with sim.locked(): ...``)."""
        return self._lock

    def _meter(self, device_id: int) -> SimulatedHousehold | Feeder:
        """One served meter by device id (KeyError if there is none)."""
        h = self.households.get(device_id)
        if h is not None:
            return h
        if self.feeder is not None and device_id == self.feeder.config.device_id:
            return self.feeder
        raise KeyError(device_id)

    def state(self, device_id: int) -> MeterState:
        """The truth about one meter (a household's or the feeder's) right now."""
        with self._lock:
            return self._meter(device_id).state

    def feeder_state(self) -> MeterState:
        """The truth about the feeder meter right now (ValueError without a feeder)."""
        with self._lock:
            if self.feeder is None:
                raise ValueError("the simulator has no feeder meter (feeder=False)")
            return self.feeder.state

    def states(self) -> dict[int, MeterState]:
        """The truth about every meter right now."""
        with self._lock:
            return {d: h.state for d, h in self.households.items()}

    def config(self, device_id: int) -> HouseholdConfig | FeederConfig:
        """A household's (or the feeder's) static configuration."""
        return self._meter(device_id).config

    def _rebuild(self, device_id: int) -> None:
        household = self.batteries.get(device_id)
        if household is not None:
            battery = self.households[household].battery
            assert battery is not None
            start, regs = battery_image(battery,
                                        bad_soc=self.faults[device_id].bad_power is not None)
            self._images[device_id] = {"holding": Image(start, regs)}
            return
        h, profile = self._meter(device_id), self.profiles[device_id]
        bad = self.faults[device_id].bad_power
        if profile.is_sunspec:
            self._images[device_id] = sunspec_image(profile, h.config.sunspec_model, h.state, bad,
                                                    h.config.sunspec_base)
        else:
            self._images[device_id] = fixed_image(profile, h.state, bad)

    def advance(self, seconds: float) -> None:
        """Advance simulated time by ``seconds`` (whole steps; the rest carries over)."""
        self.advance_to(self._sim_time + seconds)

    def advance_to(self, target_s: float) -> None:
        """Advance every household in fixed steps up to simulated time ``target_s``."""
        with self._lock:
            while self._sim_time + self.step_s <= target_s + 1e-9:
                for h in self.households.values():
                    h.step(self.step_s)
                if self.feeder is not None:
                    self.feeder.step(self.step_s,
                                     (h.state.power_w for h in self.households.values()))
                self._sim_time += self.step_s
            for device_id in self._devices():
                self._rebuild(device_id)

    # ----- faults ----------------------------------------------------------------------

    def set_fault(self, device_id: int, kind: str, value: float = 0.0) -> None:
        """Switch a fault on (persistent ones) or apply it (one-shot ones); any thread.

        Kinds: ``no_answer``, ``slow`` (value: seconds), ``exception`` (value: Modbus
        exception code, default 4), ``nan`` (power reads NaN, or ``value`` if given: inf or
        an impossible number; integer registers get a wild value instead), and the one-shot
        ``counter_reset``, ``counter_jump`` (value: Wh added, default 1 MWh) and
        ``serial_change`` (meter replaced: new serial, fresh counters).
        """
        with self._lock:
            f = self.faults[device_id]
            if device_id in self.batteries and kind in ("counter_reset", "counter_jump",
                                                        "serial_change"):
                raise ValueError(f"a battery inverter has no {kind} fault")
            h = None if device_id in self.batteries else self._meter(device_id)
            if kind == "no_answer":
                f.no_answer = True
            elif kind == "slow":
                f.slow_s = value or 2.0
            elif kind == "exception":
                f.exception_code = int(value or 4)
            elif kind == "nan":
                f.bad_power = value or math.nan
            elif kind == "counter_reset" and h is not None:
                h.reset_counters()
            elif kind == "counter_jump" and h is not None:
                h.jump_counters(value or 1_000_000.0)
            elif kind == "serial_change" and h is not None:
                h.change_serial()
            else:
                raise ValueError(f"unknown fault {kind!r}")
            self._rebuild(device_id)

    def clear_faults(self, device_id: int | None = None) -> None:
        """Switch off persistent faults of one meter (or of all)."""
        with self._lock:
            for d in [device_id] if device_id is not None else list(self.faults):
                self.faults[d] = Faults()
                self._rebuild(d)

    # ----- Modbus ----------------------------------------------------------------------

    async def _action(self, device_id: int, function_code: int, start_address: int,
                      address: int, count: int, registers: list[int],
                      set_values: Any) -> ExcCodes | None:
        self.requests += 1
        f = self.faults[device_id]
        if f.slow_s:
            await asyncio.sleep(f.slow_s)
        if f.no_answer:
            raise NoSuchIdException("simulated: no answer")  # server drops the request
        if f.exception_code:
            return ExcCodes(f.exception_code)
        if set_values is not None:
            if device_id not in self.batteries or function_code not in WRITES:
                return ExcCodes.ILLEGAL_FUNCTION  # simulated meters are read-only
            return self._write_battery(device_id, address, [int(v) for v in set_values])
        image = self._images[device_id].get(TABLES.get(function_code, ""))
        if image is None:
            return ExcCodes.ILLEGAL_ADDRESS
        off = address - image.start
        if off < 0 or off + count > len(image.registers):
            return ExcCodes.ILLEGAL_ADDRESS
        registers[address - start_address : address - start_address + count] = (
            image.registers[off : off + count]
        )
        return None

    def _write_battery(self, device_id: int, address: int, values: list[int]) -> ExcCodes | None:
        """A client writes the battery inverter's model 124 control points."""
        _, storage, _ = battery_layout()
        offset = address - storage
        with self._lock:
            battery = self.households[self.batteries[device_id]].battery
            assert battery is not None
            if offset < 2 or offset + len(values) > 2 + 24:
                return ExcCodes.ILLEGAL_ADDRESS  # only model 124's points are writable
            try:
                battery.write(offset, values, self._sim_time)
            except WriteRefused as exc:
                return ExcCodes(exc.code)
            self._rebuild(device_id)
        return None

    def _device(self, device_id: int, served_id: int) -> SimDevice:
        images = self._images[device_id]
        blocks: list[list[SimData]] = []
        for table in ("holding", "input"):
            image = images.get(table)
            if image is None:
                blocks.append([SimData(0, count=1, values=0, datatype=DataType.REGISTERS)])
            else:
                blocks.append([SimData(image.start, count=len(image.registers), values=0,
                                       datatype=DataType.REGISTERS)])
        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        return SimDevice(
            id=served_id,
            simdata=(list(bits), list(bits), blocks[0], blocks[1]),
            action=functools.partial(self._action, device_id),
        )

    async def _ticker(self) -> None:
        assert self._stop is not None
        started = time.monotonic()
        base = self._sim_time
        while not self._stop.is_set():
            target = base + (time.monotonic() - started) * self.speed
            await asyncio.get_running_loop().run_in_executor(None, self.advance_to, target)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.1)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        servers: list[Any] = []
        try:
            if self.tcp and self.port_per_household:
                for i, device_id in enumerate(self._devices()):
                    port = (self._rebind[i] if self._rebind else self.port + i if self.port
                            else 0)
                    servers.append(ModbusTcpServer(
                        [self._device(device_id, 0)], address=(self.host, port),
                        ignore_missing_devices=True))
            elif self.tcp:
                port = self._rebind[0] if self._rebind else self.port
                servers.append(ModbusTcpServer(
                    [self._device(d, d) for d in self._devices()],
                    address=(self.host, port), ignore_missing_devices=True))
            for server in servers:
                await server.serve_forever(background=True)
                if server.transport is None:
                    raise OSError(f"cannot listen on {self.host}:{self.port}")
                self.ports.append(server.transport.sockets[0].getsockname()[1])
            if self.tcp and self.port_per_household:  # the meters' ports stay ``ports``
                n = len(self._meters())
                self.battery_ports = dict(zip(self.batteries, self.ports[n:], strict=True))
                self.ports = self.ports[:n]
            if self.serial_device:
                serial = ModbusSerialServer(
                    [self._device(d, d) for d in self._devices()], port=self.serial_device,
                    baudrate=self.serial_baudrate, ignore_missing_devices=True,
                    reconnect_delay=0.5)
                await serial.serve_forever(background=True)
                servers.append(serial)
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            for server in servers:
                await server.shutdown()
            return
        self._ready.set()
        ticker = asyncio.create_task(self._ticker()) if self.speed > 0 else None
        await self._stop.wait()
        if ticker is not None:
            await ticker
        for server in servers:
            await server.shutdown()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    def start(self) -> MeterSimulator:
        """Start the servers in a background thread; returns once they listen."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._ready.clear()
        self.ports, self.battery_ports = [], {}
        self._thread = threading.Thread(target=self._run, name="meter-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("simulator did not start within 10 s")
        if self._error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"simulator failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        """Stop the servers and the clock (the state is kept; :meth:`start` serves again)."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._thread = None
        # a restart comes back on the same ports
        self._rebind = [*self.ports, *self.battery_ports.values()]

    def __enter__(self) -> MeterSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
