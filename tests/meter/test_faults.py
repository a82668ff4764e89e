"""One test per fault: it is detected, reported (typed error, event, counter) and no bad
reading reaches the node. The simulator injects the faults at run time."""

from __future__ import annotations

import datetime as dt

import trio

from meter.events import (
    CounterBackwards,
    CounterJump,
    ImplausibleValue,
    MeterExceptionResponse,
    MeterTimeout,
    MeterUnreachable,
)
from meter.reader import MeterConfig, MeterReader, PollResult
from meter.sim import HouseholdConfig, MeterSimulator
from meter.transport import TcpEndpoint
from tests.meter.conftest import HOST, START, expected_counter_wh

SDM, SUNSPEC_INT, SUNSPEC_FLOAT = 1, 4, 8  # device ids in the seeded fixture


def kinds(result: PollResult) -> list[str]:
    """Event kinds of one poll."""
    return [e.kind for e in result.events]


async def poll(reader: MeterReader, device_id: int) -> PollResult:
    """One bounded poll."""
    with trio.fail_after(10):
        return await reader.poll(f"hh{device_id}")


async def test_fixture_layout(sim: MeterSimulator) -> None:
    assert sim.config(SDM).profile == "sdm630"
    assert (sim.config(SUNSPEC_INT).profile, sim.config(SUNSPEC_INT).sunspec_model) == (
        "sunspec", 203)
    assert (sim.config(SUNSPEC_FLOAT).profile, sim.config(SUNSPEC_FLOAT).sunspec_model) == (
        "sunspec", 213)


async def test_no_answer_then_back(sim: MeterSimulator, reader: MeterReader) -> None:
    """A meter that stops answering: timeouts, retries with back-off, offline, then online."""
    good = await poll(reader, SDM)
    assert good.ok
    sim.set_fault(SDM, "no_answer")
    bad = await poll(reader, SDM)
    assert bad.sample is None and isinstance(bad.error, MeterTimeout)
    assert "offline" in kinds(bad) and "rejected" in kinds(bad)
    stats = reader.stats[f"hh{SDM}"]
    assert stats.errors["timeout"] == 1 and stats.retries >= 1 and stats.online is False
    again = await poll(reader, SDM)  # still down: no second offline event
    assert again.sample is None and "offline" not in kinds(again)
    sim.clear_faults(SDM)
    sim.advance(60)
    back = await poll(reader, SDM)
    assert back.ok and "online" in kinds(back)
    assert back.sample is not None and back.sample.epoch == 0
    assert stats.last_sample is back.sample


async def test_slow_answer_within_timeout_is_reported(sim: MeterSimulator) -> None:
    reader = MeterReader([MeterConfig("slow", "sdm630", TcpEndpoint(HOST, sim.ports[0]), SDM)],
                         timeout_s=1.0, slow_s=0.1, clock=lambda: sim.sim_time)
    try:
        sim.set_fault(SDM, "slow", 0.2)
        with trio.fail_after(10):
            result = await reader.poll("slow")
        assert result.ok and "slow_response" in kinds(result)
        assert result.sample is not None and result.sample.latency_s >= 0.2
    finally:
        reader.close()


async def test_slow_answer_beyond_timeout(sim: MeterSimulator, reader: MeterReader) -> None:
    sim.set_fault(SDM, "slow", 0.6)  # reader timeout is 0.3 s
    result = await poll(reader, SDM)
    assert result.sample is None and isinstance(result.error, MeterTimeout)
    assert reader.stats[f"hh{SDM}"].attempts == 2  # one retry
    sim.clear_faults(SDM)
    await trio.sleep(0.7)  # let the server finish the slow requests
    assert (await poll(reader, SDM)).ok


async def test_exception_response(sim: MeterSimulator, reader: MeterReader) -> None:
    sim.set_fault(SDM, "exception", 4)
    result = await poll(reader, SDM)
    assert isinstance(result.error, MeterExceptionResponse) and result.sample is None
    assert result.error.context["code"] == 4
    assert reader.stats[f"hh{SDM}"].attempts == 1  # device failure: not retried
    assert reader.stats[f"hh{SDM}"].errors["exception_response"] == 1
    sim.set_fault(SDM, "exception", 6)  # busy: retried
    result = await poll(reader, SDM)
    assert result.error is not None and result.error.context["code"] == 6
    assert reader.stats[f"hh{SDM}"].attempts == 3
    assert "offline" not in kinds(result)  # it answers, just not with data


async def test_nan_power_rejected_on_every_meter_type(
    sim: MeterSimulator, reader: MeterReader
) -> None:
    for device_id in (SDM, SUNSPEC_INT, SUNSPEC_FLOAT):
        assert (await poll(reader, device_id)).ok
        sim.set_fault(device_id, "nan")
        result = await poll(reader, device_id)
        assert result.sample is None, device_id
        assert isinstance(result.error, ImplausibleValue)
        assert result.error.context["field"] == "power"
        assert reader.stats[f"hh{device_id}"].errors["implausible"] == 1


async def test_infinite_and_impossible_values_rejected(
    sim: MeterSimulator, reader: MeterReader
) -> None:
    for value in (float("inf"), float("-inf"), 1e9):
        sim.set_fault(SDM, "nan", value)
        result = await poll(reader, SDM)
        assert result.sample is None and isinstance(result.error, ImplausibleValue), value
    assert reader.stats[f"hh{SDM}"].samples == 0


async def test_counter_reset_rejected_then_rebaselined(
    sim: MeterSimulator, reader: MeterReader
) -> None:
    first = await poll(reader, SDM)
    assert first.sample is not None
    sim.set_fault(SDM, "counter_reset")
    for _ in range(2):
        sim.advance(60)
        result = await poll(reader, SDM)
        assert result.sample is None and isinstance(result.error, CounterBackwards)
        assert result.error.context["previous_wh"] == first.sample.import_wh
    sim.advance(60)
    result = await poll(reader, SDM)  # third consistent poll after the reset: new baseline
    assert result.sample is not None and result.sample.epoch == 1
    assert "counter_rebaselined" in kinds(result)
    assert result.sample.import_wh < first.sample.import_wh
    assert reader.stats[f"hh{SDM}"].errors["counter_backwards"] == 2


async def test_transient_counter_glitch_never_rebaselines(
    sim: MeterSimulator, reader: MeterReader
) -> None:
    """A jump that disappears again is rejected and the old baseline stays."""
    first = await poll(reader, SDM)
    assert first.sample is not None
    sim.set_fault(SDM, "counter_jump", 5_000_000)
    sim.advance(10)
    jumped = await poll(reader, SDM)
    assert jumped.sample is None and isinstance(jumped.error, CounterJump), jumped.error
    assert jumped.error.context["allowed_wh"] < 1000
    sim.set_fault(SDM, "counter_jump", -5_000_000)
    sim.advance(10)
    ok = await poll(reader, SDM)
    assert ok.sample is not None and ok.sample.epoch == 0
    assert ok.sample.import_wh >= first.sample.import_wh


async def test_serial_change_starts_new_baseline(
    sim: MeterSimulator, reader: MeterReader
) -> None:
    for device_id in (SDM, SUNSPEC_INT):
        before = await poll(reader, device_id)
        assert before.sample is not None
        sim.set_fault(device_id, "serial_change")
        sim.advance(5)
        after = await poll(reader, device_id)
        assert after.sample is not None, after.error
        assert after.sample.serial != before.sample.serial and after.sample.epoch == 1
        event = next(e for e in after.events if e.kind == "serial_changed")
        assert event.context["old_serial"] == before.sample.serial
        assert event.context["new_serial"] == after.sample.serial
        truth = sim.state(device_id)
        assert after.sample.import_wh == expected_counter_wh(sim, device_id, truth.import_wh)


async def test_meter_disappears_and_comes_back(sim: MeterSimulator,
                                               reader: MeterReader) -> None:
    assert (await poll(reader, SDM)).ok
    sim.stop()  # the whole gateway goes away: connection refused
    gone = await poll(reader, SDM)
    assert isinstance(gone.error, MeterUnreachable | MeterTimeout) and "offline" in kinds(gone)
    sim.start()
    sim.advance(30)
    back = await poll(reader, SDM)
    assert back.ok and "online" in kinds(back)


async def test_float32_resolution_at_high_totals() -> None:
    """At 150 MWh a float32 kWh register moves in steps of 16 Wh: reported once, carried in
    the sample, and the step-wise counter is never mistaken for a jump."""
    config = HouseholdConfig(index=0, device_id=1, pv_kwp=0.0, annual_kwh=4000,
                             initial_import_wh=150_000_000.0, initial_export_wh=10.0)
    sim = MeterSimulator([config], seed=3, speed=0, host=HOST, start=START)
    with sim:
        reader = MeterReader([MeterConfig("big", "sdm630", TcpEndpoint(HOST, sim.ports[0]), 1)],
                             timeout_s=0.5, clock=lambda: sim.sim_time)
        try:
            samples, events = [], []
            for _ in range(20):
                sim.advance(5)
                with trio.fail_after(5):
                    result = await reader.poll("big")
                assert result.sample is not None, result.error
                samples.append(result.sample)
                events += [e for e in result.events if e.kind == "low_resolution"]
        finally:
            reader.close()
    assert samples[-1].import_resolution_wh == 16
    assert len(events) == 1 and events[0].context["resolution_wh"] == 16
    assert all(s.import_wh % 16 == 0 for s in samples)
    assert samples[-1].import_wh > samples[0].import_wh  # it still moves, in 16 Wh steps
    assert abs(samples[-1].import_wh - sim.state(1).import_wh) <= 8
    assert dt.timedelta(seconds=sim.sim_time) == dt.timedelta(seconds=100)


async def test_faults_are_counted_in_metrics(sim: MeterSimulator, reader: MeterReader) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from meter.metrics import MeterCollector

    registry = CollectorRegistry()
    registry.register(MeterCollector(reader))
    assert (await poll(reader, SDM)).ok
    sim.set_fault(SDM, "nan")
    await poll(reader, SDM)
    sim.set_fault(SDM, "no_answer")
    await poll(reader, SDM)
    text = generate_latest(registry).decode()
    assert f'microgrid_meter_polls_total{{meter="hh{SDM}"}} 3.0' in text
    assert f'microgrid_meter_samples_total{{meter="hh{SDM}"}} 1.0' in text
    assert f'microgrid_meter_errors_total{{kind="implausible",meter="hh{SDM}"}} 1.0' in text
    assert f'microgrid_meter_errors_total{{kind="timeout",meter="hh{SDM}"}} 1.0' in text
    assert f'microgrid_meter_events_total{{kind="offline",meter="hh{SDM}"}} 1.0' in text
    assert f'microgrid_meter_online{{meter="hh{SDM}"}} 0.0' in text
