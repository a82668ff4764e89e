"""The simulator's feeder meter, read over real Modbus TCP: its counters move by the
households' net flow plus the configured line losses, stepped with the same simulated clock."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from meter.reader import MeterConfig, MeterReader, PollResult
from meter.sample import MeterSample
from meter.sim import MeterSimulator
from meter.transport import TcpEndpoint
from tests.meter.conftest import HOST, START, configs_for, expected_counter_wh

FEEDER = "feeder"


def _reader(sim: MeterSimulator) -> MeterReader:
    assert sim.feeder_device is not None
    configs = [*configs_for(sim), MeterConfig(FEEDER, "sdm630", TcpEndpoint(HOST, sim.ports[0]),
                                              sim.feeder_device)]
    return MeterReader(configs, timeout_s=0.5, retries=1, backoff_s=0.02,
                       clock=lambda: sim.sim_time)


async def _read_all(reader: MeterReader) -> dict[str, MeterSample]:
    with trio.fail_after(10):
        results = await reader.poll_all()
    samples = {}
    for name, result in results.items():
        assert result.sample is not None, (name, result.error)
        samples[name] = result.sample
    return samples


async def _poll_bounded(reader: MeterReader) -> PollResult:
    with trio.fail_after(10):
        return await reader.poll(FEEDER)


def _movement(before: dict[str, MeterSample], after: dict[str, MeterSample]
              ) -> tuple[int, int, int]:  # fmt: skip
    """(feeder net import, households' net import, energy the households moved) in Wh."""
    def delta(name: str) -> tuple[int, int]:
        return (after[name].import_wh - before[name].import_wh,
                after[name].export_wh - before[name].export_wh)

    fi, fe = delta(FEEDER)
    households = [delta(n) for n in before if n != FEEDER]
    return (fi - fe, sum(i - e for i, e in households), sum(i + e for i, e in households))


def _truth_movement(sim: MeterSimulator, before: dict[int, tuple[float, float]]
                    ) -> tuple[float, float, dict[int, tuple[float, float]]]:  # fmt: skip
    """(households' true net import, true energy moved) since ``before``, and the new truth."""
    now = {d: (s.import_wh, s.export_wh) for d, s in sim.states().items()}
    net = sum((now[d][0] - before[d][0]) - (now[d][1] - before[d][1]) for d in now)
    moved = sum((now[d][0] - before[d][0]) + (now[d][1] - before[d][1]) for d in now)
    return net, moved, now


@pytest.mark.parametrize("loss", [0.02, 0.0, 0.05])
def test_feeder_counters_equal_households_net_plus_loss_over_modbus(loss: float) -> None:
    kwargs = {} if loss == 0.02 else {"feeder_loss": loss}  # 2 % is the default
    sim = MeterSimulator(8, seed=7, speed=0, host=HOST, port=0, start=START, feeder=True,
                         **kwargs)  # type: ignore[arg-type]
    sim.advance(1800)
    with sim:
        reader = _reader(sim)
        try:
            before = trio.run(_read_all, reader)
            truth = {d: (s.import_wh, s.export_wh) for d, s in sim.states().items()}
            assert before[FEEDER].serial == str(sim.feeder_state().serial)
            checked = 0
            for seconds in (900, 900, 3600, 455):  # slots, an hour, a partial interval
                sim.advance(seconds)
                after = trio.run(_read_all, reader)
                feeder_net, households_net, moved = _movement(before, after)
                true_net, true_moved, truth = _truth_movement(sim, truth)
                assert moved > 0
                # the feeder's counters as read over Modbus (float32 kWh, rounded to whole Wh
                # by the reader): within 2 Wh of the households' true net flow plus the loss
                assert abs(feeder_net - (true_net + loss * true_moved)) <= 2, (
                    seconds, feeder_net, true_net, true_moved)
                # the same from the households' counters as read over Modbus: each of the 16
                # counters' movements is exact to its register and 1 Wh rounding
                assert abs(feeder_net - (households_net + loss * moved)) <= 2 + 16, (
                    seconds, feeder_net, households_net, moved)
                if loss == 0.0:
                    assert abs(feeder_net - true_net) <= 2
                before = after
                checked += 1
            assert checked == 4
            # the truth the simulator keeps is what the reader decoded
            f = sim.feeder_state()
            device = sim.feeder_device or 0
            assert after[FEEDER].import_wh == expected_counter_wh(sim, device, f.import_wh)
            assert after[FEEDER].export_wh == expected_counter_wh(sim, device, f.export_wh)
        finally:
            reader.close()


def test_feeder_moves_at_step_boundaries_with_the_households() -> None:
    """Frozen between steps like the households (the demo's SimClock freezes the clock at slot
    boundaries): the truth values agree exactly, not just within rounding."""
    sim = MeterSimulator(5, seed=3, speed=0, start=START, feeder=True, feeder_loss=0.0)
    f0, h0 = sim.feeder_state(), sim.states()
    sim.advance(2.0)  # less than one 5 s step: nothing moves
    assert sim.feeder_state() == f0 and sim.states() == h0
    sim.advance(3.0 + 7200)
    f1, h1 = sim.feeder_state(), sim.states()
    net = sum((h1[d].import_wh - h0[d].import_wh) - (h1[d].export_wh - h0[d].export_wh)
              for d in h0)
    assert (f1.import_wh - f0.import_wh) - (f1.export_wh - f0.export_wh) == pytest.approx(
        net, abs=1e-6)
    assert f1.time_s == h1[1].time_s == sim.sim_time
    assert f1.power_w == pytest.approx(sum(s.power_w for s in h1.values()))
    assert sim.feeder_device not in sim.states()  # households only


def test_feeder_is_off_unless_asked_and_validated() -> None:
    sim = MeterSimulator(3, seed=1, speed=0, host=HOST, port=0, start=START)
    assert sim.feeder is None and sim.feeder_device is None
    with pytest.raises(ValueError, match="no feeder"):
        sim.feeder_state()
    with pytest.raises(ValueError, match="feeder device id"):
        MeterSimulator(3, seed=1, speed=0, feeder=True, feeder_device=2)
    with pytest.raises(ValueError, match="loss"):
        MeterSimulator(3, seed=1, speed=0, feeder=True, feeder_loss=1.5)
    with sim:
        reader = MeterReader([MeterConfig(FEEDER, "sdm630", TcpEndpoint(HOST, sim.ports[0]), 100)],
                             timeout_s=0.3, retries=0)
        try:
            result = trio.run(_poll_bounded, reader)
        finally:
            reader.close()
        assert result.sample is None  # no device 100 without feeder=True


def test_feeder_faults_and_other_device_id() -> None:
    sim = MeterSimulator(3, seed=1, speed=0, host=HOST, port=0, start=START, feeder=True,
                         feeder_device=42)
    sim.advance(900)
    with sim:
        reader = MeterReader([MeterConfig(FEEDER, "sdm630", TcpEndpoint(HOST, sim.ports[0]), 42)],
                             timeout_s=0.3, retries=0, clock=lambda: sim.sim_time)
        try:
            ok = trio.run(_poll_bounded, reader)
            assert ok.sample is not None and ok.sample.serial == str(sim.feeder_state().serial)
            sim.set_fault(42, "exception", 4)
            bad = trio.run(_poll_bounded, reader)
            assert bad.sample is None and "exception 4" in str(bad.error)
            sim.clear_faults(42)
            assert trio.run(_poll_bounded, reader).sample is not None
        finally:
            reader.close()
    # the one-shot counter faults act on the feeder's counters, and only on the feeder's
    households = sim.states()
    before = sim.feeder_state()
    sim.set_fault(42, "counter_jump", 5_000)
    assert sim.feeder_state().import_wh == before.import_wh + 5_000
    sim.set_fault(42, "counter_reset")
    assert (sim.feeder_state().import_wh, sim.feeder_state().export_wh) == (0.0, 0.0)
    sim.set_fault(42, "serial_change")
    assert sim.feeder_state().serial == before.serial + 1
    assert sim.states() == households


def test_meter_sim_cli_serves_a_feeder() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "meter-sim", "--households", "3", "--port", "0",
         "--speed", "0", "--feeder", "--feeder-device", "77", "--feeder-loss", "0.03",
         "--status-every", "0", "--duration", "20"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        lines = [proc.stdout.readline() for _ in range(5)]
        assert any("device 77: feeder sdm630" in line and "loss 0.03" in line
                   for line in lines), lines
        proc.stdin.write("state 77\nquit\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=20)
        assert "MeterState(device_id=77" in out
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
