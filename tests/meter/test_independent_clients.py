"""Clients nobody here wrote read the simulator: mbpoll (SDM630 registers over Modbus TCP)
and pysunspec2 (scanning the SunSpec devices). Their values must match the simulator's state,
which also shows the simulator's register maps follow the vendors' documents and not just our
own reader."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from meter.sim import MeterSimulator
from tests.meter.conftest import f32

MBPOLL = shutil.which("mbpoll")
needs_mbpoll = pytest.mark.skipif(MBPOLL is None, reason="mbpoll not installed "
                                  "(apt-get install mbpoll; .ci/run installs it)")


def mbpoll(port: int, device_id: int, table: str, ref: int, count: int) -> dict[int, float]:
    """Read once with mbpoll over TCP (0-based references, big-endian words)."""
    assert MBPOLL is not None
    out = subprocess.run(
        [MBPOLL, "-m", "tcp", "-p", str(port), "-a", str(device_id), "-0", "-1", "-B",
         "-o", "2", "-t", table, "-r", str(ref), "-c", str(count), "127.0.0.1"],
        capture_output=True, text=True, timeout=15, check=True,
    ).stdout
    return {int(a): float(v) for a, v in re.findall(r"^\[(\d+)\]:\s+(\S+)", out, re.M)}


def close(a: float, b: float) -> bool:
    """mbpoll prints 6 significant digits."""
    return abs(a - b) <= max(1e-5 * abs(b), 1e-6)


@needs_mbpoll
def test_mbpoll_reads_sdm630_registers(sim: MeterSimulator) -> None:
    port = sim.ports[0]
    for device_id in (1, 2, 3):
        assert sim.config(device_id).profile == "sdm630"
        truth = sim.state(device_id)
        floats = mbpoll(port, device_id, "3:float", 0, 38)  # 0x00..0x4B
        assert close(floats[0x00], f32(truth.voltage_v))
        assert close(floats[0x02], f32(truth.voltage_l2_v))
        assert close(floats[0x34], f32(truth.power_w))
        assert close(floats[0x46], f32(truth.frequency_hz))
        assert close(floats[0x48], f32(truth.import_wh / 1000))
        assert close(floats[0x4A], f32(truth.export_wh / 1000))
        serial = mbpoll(port, device_id, "4:int", 0xFC00, 1)
        assert int(serial[0xFC00]) == truth.serial


def test_pysunspec2_scans_sunspec_devices(sim: MeterSimulator) -> None:
    client = pytest.importorskip("sunspec2.modbus.client")
    for device_id in (4, 8):
        config = sim.config(device_id)
        assert config.profile == "sunspec"
        device = client.SunSpecModbusClientDeviceTCP(
            slave_id=device_id, ipaddr="127.0.0.1", ipport=sim.ports[0], timeout=2)
        try:
            device.scan()
            truth = sim.state(device_id)
            assert device.base_addr == 40000
            common = device.models[1][0]
            assert common.SN.cvalue == f"SIM{truth.serial}"
            meter = device.models[config.sunspec_model][0]
            if config.sunspec_model < 211:  # integer + scale factors
                assert meter.W.cvalue == round(truth.power_w)
                assert meter.TotWhImp.cvalue == round(truth.import_wh)
                assert meter.TotWhExp.cvalue == round(truth.export_wh)
                assert meter.PhVphA.cvalue == pytest.approx(truth.voltage_v, abs=0.05)
                assert meter.Hz.cvalue == pytest.approx(truth.frequency_hz, abs=0.005)
            else:
                assert meter.W.cvalue == f32(truth.power_w)
                assert meter.TotWhImp.cvalue == f32(truth.import_wh)
                assert meter.TotWhExp.cvalue == f32(truth.export_wh)
                assert meter.PhVphA.cvalue == f32(truth.voltage_v)
                assert meter.Hz.cvalue == f32(truth.frequency_hz)
        finally:
            device.close()


async def test_sunspec_found_by_scanning_every_base_address() -> None:
    """SunSpec devices at 40000, 0 and 50000, integer and float models: our reader scans for
    the marker (no fixed addresses) and so does pysunspec2; both agree with the simulator."""
    import trio

    from meter.reader import MeterConfig, MeterReader
    from meter.sim import HouseholdConfig
    from meter.transport import TcpEndpoint
    from tests.meter.conftest import HOST, START, expected_counter_wh

    layouts = [(40000, 201), (0, 212), (50000, 204), (50000, 214)]
    configs = [HouseholdConfig(index=i, device_id=i + 1, profile="sunspec", sunspec_model=m,
                               sunspec_base=b, pv_kwp=5.0 * (i % 2))
               for i, (b, m) in enumerate(layouts)]
    sim = MeterSimulator(configs, seed=3, speed=0, host=HOST, start=START)
    sim.advance(900)
    with sim:
        reader = MeterReader([MeterConfig(f"hh{c.device_id}", "sunspec",
                                          TcpEndpoint(HOST, sim.ports[0]), c.device_id)
                              for c in configs], timeout_s=0.5, clock=lambda: sim.sim_time)
        try:
            with trio.fail_after(10):
                results = await reader.poll_all()
        finally:
            reader.close()
        client = pytest.importorskip("sunspec2.modbus.client")
        for c in configs:
            sample = results[f"hh{c.device_id}"].sample
            assert sample is not None, results[f"hh{c.device_id}"].error
            truth = sim.state(c.device_id)
            assert sample.import_wh == expected_counter_wh(sim, c.device_id, truth.import_wh)
            assert reader.profile_of(f"hh{c.device_id}").model.endswith(str(c.sunspec_model))
            device = client.SunSpecModbusClientDeviceTCP(
                slave_id=c.device_id, ipaddr=HOST, ipport=sim.ports[0], timeout=2)
            try:
                await trio.to_thread.run_sync(device.scan)
                assert device.base_addr == c.sunspec_base
                assert c.sunspec_model in device.models
            finally:
                device.close()
