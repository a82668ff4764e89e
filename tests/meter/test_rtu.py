"""Modbus RTU over a serial line: the simulator serves one end of a socat pty pair, our
reader, mbpoll and pysunspec2 read the other end (several meters on one bus)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from meter.reader import MeterConfig, MeterReader
from meter.sim import MeterSimulator
from meter.transport import SerialEndpoint
from tests.meter.conftest import START, expected_counter_wh, f32

SOCAT = shutil.which("socat")
pytestmark = pytest.mark.skipif(
    SOCAT is None, reason="socat not installed: no serial pty pair for the RTU tests "
    "(apt-get install socat; .ci/run installs it)")
BAUD = 38400


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked pseudo-terminals, like a null-modem cable."""
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    assert SOCAT is not None
    proc = subprocess.Popen(
        [SOCAT, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while not (a.exists() and b.exists()):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("socat did not create the pty pair")
            time.sleep(0.02)
        yield str(a), str(b)
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
def rtu_sim(pty_pair: tuple[str, str]) -> Iterator[tuple[MeterSimulator, str]]:
    """Four households on one RTU bus (device ids 1-4; 4 is a SunSpec meter)."""
    sim = MeterSimulator(4, seed=11, speed=0, tcp=False, serial_device=pty_pair[0],
                         serial_baudrate=BAUD, start=START)
    sim.advance(1800)
    with sim:
        time.sleep(0.2)
        yield sim, pty_pair[1]


async def test_reader_over_rtu(rtu_sim: tuple[MeterSimulator, str]) -> None:
    sim, device = rtu_sim
    endpoint = SerialEndpoint(device, baudrate=BAUD)
    reader = MeterReader(
        [MeterConfig(f"hh{d}", sim.config(d).profile, endpoint, d) for d in sim.device_ids],
        timeout_s=1.0, clock=lambda: sim.sim_time)
    try:
        with trio.fail_after(30):
            results = await reader.poll_all()
            sim.advance(300)
            later = await reader.poll_all()
    finally:
        reader.close()
    for name, result in results.items():
        d = int(name[2:])
        assert result.sample is not None, result.error
        assert later[name].sample is not None, later[name].error
        truth = sim.state(d)
        assert later[name].sample.import_wh == expected_counter_wh(sim, d, truth.import_wh)
        assert later[name].sample.export_wh == expected_counter_wh(sim, d, truth.export_wh)


def test_mbpoll_over_rtu(rtu_sim: tuple[MeterSimulator, str]) -> None:
    mbpoll = shutil.which("mbpoll")
    if mbpoll is None:
        pytest.skip("mbpoll not installed (apt-get install mbpoll)")
    sim, device = rtu_sim
    out = subprocess.run(
        [mbpoll, "-m", "rtu", "-b", str(BAUD), "-P", "none", "-a", "2", "-0", "-1", "-B",
         "-o", "2", "-t", "3:float", "-r", str(0x48), "-c", "2", device],
        capture_output=True, text=True, timeout=15, check=True).stdout
    truth = sim.state(2)
    assert f"[{0x48}]: \t{f32(truth.import_wh / 1000):g}" in out
    assert f"[{0x4A}]: \t{f32(truth.export_wh / 1000):g}" in out


def test_pysunspec2_over_rtu(rtu_sim: tuple[MeterSimulator, str]) -> None:
    client = pytest.importorskip("sunspec2.modbus.client")
    sim, device_path = rtu_sim
    device = client.SunSpecModbusClientDeviceRTU(slave_id=4, name=device_path, baudrate=BAUD,
                                                 parity="N", timeout=2)
    try:
        device.scan()
        model = sim.config(4).sunspec_model
        meter = device.models[model][0]
        assert meter.TotWhImp.cvalue == expected_counter_wh(sim, 4, sim.state(4).import_wh)
    finally:
        device.close()


def test_meter_test_cli_over_rtu(rtu_sim: tuple[MeterSimulator, str],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tests.meter.test_cli import run_cli

    sim, device = rtu_sim
    assert run_cli(["meter", "test", "--profile", "sdm630", "--serial", device, "--baud",
                    str(BAUD), "--device-id", "2"]) == 0
    out = capsys.readouterr().out
    assert f"serial     {sim.state(2).serial}" in out
