"""The command line: ``microgrid meter test`` against the simulator, ``microgrid meter-sim``
as a real process with run-time fault switching on its standard input."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

import pytest

from meter import cli
from meter.events import ImplausibleValue
from meter.reader import MeterConfig, MeterReader
from meter.sim import MeterSimulator
from meter.transport import TcpEndpoint
from tests.meter.conftest import HOST, expected_counter_wh


def run_cli(argv: list[str]) -> int:
    """Parse ``argv`` with only the meter commands registered and run it."""
    parser = argparse.ArgumentParser(prog="microgrid")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_microgrid_cli_has_meter_commands() -> None:
    from node.cli import COMMAND_MODULES

    assert "meter.cli" in COMMAND_MODULES


def test_meter_test_prints_decoded_fields(sim: MeterSimulator,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    port = str(sim.ports[0])
    assert run_cli(["meter", "test", "--profile", "sdm630", "--host", HOST, "--port", port,
                    "--device-id", "1"]) == 0
    out = capsys.readouterr().out
    truth = sim.state(1)
    assert f"serial     {truth.serial}" in out
    assert f"import     {expected_counter_wh(sim, 1, truth.import_wh)} Wh" in out
    assert "positive = import" in out
    assert run_cli(["meter", "test", "--profile", "sunspec", "--host", HOST, "--port", port,
                    "--device-id", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["serial"] == f"SIM{sim.state(4).serial}"
    assert data["import_wh"] == expected_counter_wh(sim, 4, sim.state(4).import_wh)


def test_meter_test_reports_failure(sim: MeterSimulator,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    sim.set_fault(1, "exception", 2)
    assert run_cli(["meter", "test", "--profile", "sdm630", "--host", HOST, "--port",
                    str(sim.ports[0]), "--timeout", "0.5"]) == 1
    assert "exception 2 (illegal data address)" in capsys.readouterr().out
    assert run_cli(["meter", "test", "--profile", "nosuchmeter", "--host", HOST]) == 2


def test_meter_sim_process_with_runtime_faults() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from node.cli import main; raise SystemExit(main())",
         "meter-sim", "--households", "4", "--port", "0", "--speed", "0", "--seed", "5",
         "--status-every", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        first = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", first)
        assert match, first
        port = int(match.group(1))
        reader = MeterReader([MeterConfig("hh1", "sdm630", TcpEndpoint(HOST, port), 1)],
                             timeout_s=1.0)
        try:
            import trio

            assert trio.run(reader.poll, "hh1").ok
            proc.stdin.write("fault 1 nan\n")
            proc.stdin.flush()
            deadline = time.monotonic() + 10
            while "fault nan on device 1" not in proc.stdout.readline():
                assert time.monotonic() < deadline
            result = trio.run(reader.poll, "hh1")
            assert result.sample is None and isinstance(result.error, ImplausibleValue)
        finally:
            reader.close()
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
