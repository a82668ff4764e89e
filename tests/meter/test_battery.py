"""The simulated battery over real Modbus TCP on loopback: SunSpec models 124 and 802.

Read by our :class:`~meter.battery.BatteryClient` and by pysunspec2; setpoints written over
Modbus are obeyed within the battery's limits (charge/discharge power, floor, ceiling,
reserve); its flow moves the household's trading-meter counters; garbage registers and bad
writes are refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import replace

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from meter.battery import BatteryClient
from meter.events import ImplausibleValue, MeterExceptionResponse
from meter.reader import MeterConfig, MeterReader
from meter.sim import MeterSimulator
from meter.sim.battery import BatteryConfig, SimulatedBattery, battery_layout
from meter.sim.household import HouseholdConfig
from meter.transport import ModbusLink, TcpEndpoint

HOST = "127.0.0.1"
START = dt.datetime(2025, 6, 21, 12, 0)
HOUSE = 1
"""The household with the battery: no PV, so everything it charges comes from the grid."""
OTHER = 2


def households() -> list[HouseholdConfig]:
    base = HouseholdConfig(index=0, device_id=HOUSE, serial=10_000_011, pv_kwp=0.0,
                           annual_kwh=4000, battery_kwh=10.0, battery_kw=4.0,
                           battery_initial_permille=500)  # fmt: skip
    other = HouseholdConfig(index=1, device_id=OTHER, serial=10_000_012, pv_kwp=6.0)
    return [base, other]


@pytest.fixture
def sim() -> Iterator[MeterSimulator]:
    simulator = MeterSimulator(households(), seed=3, speed=0, host=HOST, port=0, start=START)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


def client(sim: MeterSimulator) -> BatteryClient:
    return BatteryClient("battery", TcpEndpoint(HOST, sim.ports[0]), sim.battery_device(HOUSE),
                         clock=lambda: sim.sim_time)  # fmt: skip


def step_and_sum(sim: MeterSimulator, seconds: int) -> tuple[float, float]:
    """Advance step by step; (Σ household load − PV, Σ battery) in Wh over the interval."""
    base = battery = 0.0
    for _ in range(int(seconds // sim.step_s)):
        sim.advance(sim.step_s)
        s = sim.state(HOUSE)
        base += (s.load_w - s.pv_w) * sim.step_s / 3600
        battery += s.battery_w * sim.step_s / 3600
    return base, battery


async def test_the_battery_reads_as_the_simulator_holds_it(sim: MeterSimulator) -> None:
    c = client(sim)
    with trio.fail_after(10):
        status = await c.read()
    b = sim.battery(HOUSE)
    assert status.capacity_wh == 10_000
    assert status.soc_permille == b.soc_permille == 500
    assert (status.soc_min_permille, status.soc_max_permille) == (100, 950)
    assert (status.max_charge_w, status.max_discharge_w) == (4000, 4000)
    assert status.serial.startswith("BAT") and not status.remote
    c.close()


def test_pysunspec2_finds_the_storage_and_battery_models(sim: MeterSimulator) -> None:
    client_mod = pytest.importorskip("sunspec2.modbus.client")
    device = client_mod.SunSpecModbusClientDeviceTCP(
        slave_id=sim.battery_device(HOUSE), ipaddr=HOST, ipport=sim.ports[0], timeout=5
    )
    try:
        device.scan()
        storage, battery = device.models[124][0], device.models[802][0]
        assert storage.ChaState.cvalue == pytest.approx(50.0)
        assert storage.WChaMax.cvalue == 4000
        assert battery.WHRtg.cvalue == 10_000
        assert battery.SoCMax.cvalue == pytest.approx(95.0)
        assert battery.SoCMin.cvalue == pytest.approx(10.0)
    finally:
        device.close()


async def test_a_setpoint_is_obeyed_and_moves_the_trading_meter(sim: MeterSimulator) -> None:
    """Forced charging at 2 kW for 15 minutes: the battery draws 2 kW, stores 90 % of it, and
    the household's import counter (read over Modbus) rises by its load plus that energy."""
    c = client(sim)
    reader = MeterReader([MeterConfig("main", "sdm630", TcpEndpoint(HOST, sim.ports[0]), HOUSE)],
                         clock=lambda: sim.sim_time)  # fmt: skip
    with trio.fail_after(20):
        await c.read()
        before = (await reader.poll("main")).sample
        soc0 = sim.battery(HOUSE).soc_wh
        await c.set_power(2000, revert_s=3600)
        base, battery = step_and_sum(sim, 900)
        after = (await reader.poll("main")).sample
        status = await c.read()
    assert before is not None and after is not None
    assert sim.battery(HOUSE).power_w == pytest.approx(2000, abs=1)
    assert battery == pytest.approx(500, abs=1)  # 2 kW x 0.25 h
    assert sim.battery(HOUSE).soc_wh - soc0 == pytest.approx(450, abs=1)
    moved = (after.import_wh - before.import_wh) - (after.export_wh - before.export_wh)
    assert moved == pytest.approx(base + battery, abs=2)
    assert moved > base + 450
    assert status.remote and status.power_w == 2000
    # and back: forced discharge at 1 kW covers the load, the meter moves less than the load
    with trio.fail_after(20):
        await c.set_power(-1000, revert_s=3600)
        before = (await reader.poll("main")).sample
        base, battery = step_and_sum(sim, 900)
        after = (await reader.poll("main")).sample
    assert before is not None and after is not None
    assert battery == pytest.approx(-250, abs=1)
    moved = (after.import_wh - before.import_wh) - (after.export_wh - before.export_wh)
    assert moved == pytest.approx(base + battery, abs=2)
    reader.close()
    c.close()


async def test_limits_hold_whatever_the_setpoint(sim: MeterSimulator) -> None:
    """Asked for more than its power, it runs at its power; charged for hours it stops at its
    ceiling, discharged for hours at its floor, and at a written reserve above that floor."""
    c = client(sim)
    b = sim.battery(HOUSE)
    with trio.fail_after(20):
        await c.read()
        await c.set_power(50_000, revert_s=0)  # clamped to 4 kW by the client
        sim.advance(60)
        assert b.power_w == pytest.approx(4000, abs=1)
        for _ in range(12):
            sim.advance(900)
            assert b.soc_wh <= b.config.soc_max_wh + 1e-6
        assert b.soc_wh == pytest.approx(b.config.soc_max_wh)
        assert b.power_w == 0
        await c.read()
        await c.set_power(-4000, revert_s=0)
        for _ in range(16):
            sim.advance(900)
            assert b.soc_wh >= b.config.soc_min_wh - 1e-6
        assert b.soc_wh == pytest.approx(b.config.soc_min_wh)
        # a reserve of 30 % written over Modbus: charge above it, then discharge stops there
        link = ModbusLink(TcpEndpoint(HOST, sim.ports[0]))
        _, storage, _ = battery_layout()
        await trio.to_thread.run_sync(link.write, "battery", storage + 7, [300],
                                      sim.battery_device(HOUSE))  # fmt: skip
        await c.read()
        await c.set_power(4000, revert_s=0)
        sim.advance(3600)
        status = await c.read()
        assert status.soc_min_permille == 300
        await c.set_power(-4000, revert_s=0)
        sim.advance(4 * 3600)
        assert b.soc_wh == pytest.approx(3000)
        link.close()
    c.close()


async def test_a_silent_energy_manager_hands_control_back(sim: MeterSimulator) -> None:
    """InOutWRte_RvrtTms: 10 minutes after the last write the battery reverts to its own
    self-consumption control (no PV here: it covers the load, discharging)."""
    c = client(sim)
    b = sim.battery(HOUSE)
    with trio.fail_after(20):
        await c.read()
        await c.set_power(3000, revert_s=600)
        sim.advance(300)
        assert b.power_w == pytest.approx(3000, abs=1) and b.remote
        sim.advance(600)
        assert not b.remote and b.control.storctl_mod == 0
        assert b.power_w < 0  # self-consumption: covering the household's deficit
        assert not (await c.read()).remote
    c.close()


async def test_garbage_registers_are_refused(sim: MeterSimulator) -> None:
    """A state of charge of 6553 % is refused with a typed error naming the point, and the
    last good read is kept; bad writes get Modbus exceptions; meters stay read-only."""
    c = client(sim)
    unit = sim.battery_device(HOUSE)
    with trio.fail_after(20):
        good = await c.read()
        sim.set_fault(unit, "nan")
        with pytest.raises(ImplausibleValue, match="SoC"):
            await c.read()
        assert c.last == good and c.errors == 1
        sim.clear_faults(unit)
        assert (await c.read()).soc_permille == good.soc_permille
        link = ModbusLink(TcpEndpoint(HOST, sim.ports[0]))
        _, storage, _ = battery_layout()
        for offset, value in ((13, 20_000), (5, 4), (17, 7), (2, 9000)):  # InWRte 200 %, ...
            with pytest.raises(MeterExceptionResponse) as exc:
                await trio.to_thread.run_sync(link.write, "b", storage + offset, [value], unit)
            assert exc.value.context["code"] == 3
        with pytest.raises(MeterExceptionResponse) as exc:  # ChaState is read-only
            await trio.to_thread.run_sync(link.write, "b", storage + 8, [1000], unit)
        assert exc.value.context["code"] == 2
        with pytest.raises(MeterExceptionResponse) as exc:  # a meter is read-only
            await trio.to_thread.run_sync(link.write, "m", 0xFC00, [1], HOUSE)
        assert exc.value.context["code"] == 1
        link.close()
    assert sim.battery(HOUSE).writes == 0
    c.close()


def raw_registers(battery: SimulatedBattery) -> tuple[list[int], list[int]]:
    from meter.sim.battery import battery_image

    base, regs = battery_image(battery)
    _, storage, bat = battery_layout(base)
    return regs[storage - base : storage - base + 26], regs[bat - base : bat - base + 64]


@pytest.mark.parametrize(("model", "offset", "raw", "point"), [
    ("802", 3, 0, "WHRtg"),  # no capacity
    ("802", 3, 0xFFFF, "WHRtg"),  # not implemented
    ("802", 53, 0x7FFF, "WHRtg_SF"),  # scale factor out of range
    ("802", 11, 1001, "SoC"),  # 100.1 %
    ("802", 8, 960, "SoCMin"),  # floor above the ceiling
    ("802", 4, 60_000, "WChaRteMax"),  # beyond max_power_w
    ("124", 8, 900, "ChaState"),  # disagrees with 802's SoC
    ("124", 2, 0xFFFF, "WChaMax"),
])  # fmt: skip
def test_each_garbage_point_is_named(model: str, offset: int, raw: int, point: str) -> None:
    battery = SimulatedBattery(BatteryConfig(10_000, 4000, 4000))
    storage, bat = raw_registers(battery)
    (storage if model == "124" else bat)[offset] = raw
    c = BatteryClient("b", TcpEndpoint(HOST, 1), max_power_w=50_000)
    with pytest.raises(ImplausibleValue) as exc:
        c.decode_status("BAT1", storage, bat, 0.0)
    assert exc.value.context["field"] == point


def test_a_state_of_charge_jump_needs_a_second_read() -> None:
    """40 % more charge one second later is refused; the same value read again is believed."""
    now = [0.0]
    battery = SimulatedBattery(BatteryConfig(10_000, 4000, 4000))
    c = BatteryClient("b", TcpEndpoint(HOST, 1), clock=lambda: now[0])
    first = c.decode_status("BAT1", *raw_registers(battery), 0.0)
    c._plausible(first, now[0])
    c.last, c._last_at = first, now[0]
    battery.soc_wh = 9000
    now[0] = 1.0
    jumped = c.decode_status("BAT1", *raw_registers(battery), 1.0)
    with pytest.raises(ImplausibleValue, match="moved"):
        c._plausible(jumped, now[0])
    c._plausible(jumped, now[0])  # a second read agreeing with it


@settings(max_examples=200, deadline=None)
@given(
    config=st.builds(
        BatteryConfig,
        capacity_wh=st.integers(1000, 30_000),
        max_charge_w=st.integers(0, 10_000),
        max_discharge_w=st.integers(0, 10_000),
        soc_min_permille=st.integers(0, 400),
        soc_max_permille=st.integers(600, 1000),
        efficiency_permille=st.integers(500, 1000),
        initial_soc_permille=st.integers(0, 1000),
    ),
    steps=st.lists(
        st.tuples(
            st.integers(-15_000, 15_000),
            st.integers(-20_000, 20_000),
            st.integers(-20_000, 20_000),
            st.sampled_from([0, 1, 2, 3]),
            st.integers(0, 1),
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_the_simulated_battery_never_exceeds_its_limits(
    config: BatteryConfig, steps: list[tuple[int, int, int, int, int]]
) -> None:
    """Any household net, any setpoint window, grid charging or not: power within the rates,
    stored energy within [floor, ceiling] (or moving towards them), and the stored energy
    changes by exactly the AC energy times the efficiency (charge) or the AC energy."""
    b = SimulatedBattery(config)
    lo, hi = config.soc_min_wh, config.soc_max_wh
    for net, in_pct, out_pct, mod, grid in steps:
        b.write(12, [out_pct // 2 & 0xFFFF, in_pct // 2 & 0xFFFF], b.time_s)
        b.write(5, [mod], b.time_s)
        b.write(17, [grid], b.time_s)
        before = b.soc_wh
        power = b.step(net, 60.0)
        assert -config.max_discharge_w - 1e-9 <= power <= config.max_charge_w + 1e-9
        if grid == 0:
            assert power <= max(0.0, -net) + 1e-9
        assert min(before, lo) - 1e-6 <= b.soc_wh <= max(before, hi) + 1e-6
        if before >= lo:
            assert b.soc_wh >= lo - 1e-6
        if before <= hi:
            assert b.soc_wh <= hi + 1e-6
        if power > 0:
            assert b.soc_wh - before == pytest.approx(
                power / 60 * config.efficiency_permille / 1000, abs=1e-6
            )
        elif power < 0:
            assert b.soc_wh - before == pytest.approx(power / 60, abs=1e-6)
        else:
            assert b.soc_wh == before


def test_households_without_a_battery_serve_none() -> None:
    configs = [replace(c, battery_kwh=0.0) for c in households()]
    sim = MeterSimulator(configs, seed=3, speed=0)
    assert sim.batteries == {}
    with pytest.raises(KeyError):
        sim.battery_device(HOUSE)
