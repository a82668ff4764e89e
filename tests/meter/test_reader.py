"""The reader against the simulator as a real Modbus TCP server on loopback."""

from __future__ import annotations

import math

import pytest
import trio

from meter.reader import MeterConfig, MeterReader
from meter.sim import MeterSimulator
from meter.transport import TcpEndpoint
from tests.meter.conftest import HOST, expected_counter_wh, f32


async def test_every_household_decodes_to_simulator_state(
    sim: MeterSimulator, reader: MeterReader
) -> None:
    with trio.fail_after(10):
        results = await reader.poll_all()
    for name, result in results.items():
        device_id = int(name[2:])
        truth = sim.state(device_id)
        assert result.error is None, result.error
        s = result.sample
        assert s is not None
        assert isinstance(s.import_wh, int) and isinstance(s.export_wh, int)
        assert s.import_wh == expected_counter_wh(sim, device_id, truth.import_wh)
        assert s.export_wh == expected_counter_wh(sim, device_id, truth.export_wh)
        assert s.serial.endswith(str(truth.serial))
        if sim.config(device_id).profile == "sunspec" and sim.config(device_id).sunspec_model < 211:
            assert s.power_w == pytest.approx(truth.power_w, abs=0.5)  # int16, SF 0
            assert s.voltage_v == pytest.approx(truth.voltage_v, abs=0.05)  # SF -1
            assert s.frequency_hz == pytest.approx(truth.frequency_hz, abs=0.005)  # SF -2
        else:
            assert s.power_w == f32(truth.power_w)
            assert s.voltage_v == f32(truth.voltage_v)
            assert s.frequency_hz == f32(truth.frequency_hz)
        assert s.epoch == 0


async def test_surplus_and_deficit_households_at_midday_and_evening(
    sim: MeterSimulator, reader: MeterReader
) -> None:
    for hour in (13, 19):
        sim.advance_to((hour - 12.5) * 3600)
        with trio.fail_after(10):
            results = await reader.poll_all()
        powers = [r.sample.power_w for r in results.values() if r.sample]
        assert len(powers) == 8
        assert any(p < 0 for p in powers), f"no exporting household at {hour}:00: {powers}"
        assert any(p > 0 for p in powers), f"no importing household at {hour}:00: {powers}"


async def test_counters_integrate_power(sim: MeterSimulator, reader: MeterReader) -> None:
    """Over 10 simulated minutes, counter deltas equal the energy of the power readings."""
    energy = {d: 0.0 for d in sim.device_ids}
    with trio.fail_after(20):
        first = await reader.poll_all()
        for _ in range(120):  # 120 x 5 s steps; power is constant within a step
            sim.advance(5)
            for d in sim.device_ids:
                energy[d] += sim.state(d).power_w * 5 / 3600
        last = await reader.poll_all()
    for name in first:
        d = int(name[2:])
        a, b = first[name].sample, last[name].sample
        assert a is not None and b is not None
        net = (b.import_wh - a.import_wh) - (b.export_wh - a.export_wh)
        slack = 2 * (b.import_resolution_wh + b.export_resolution_wh) + 2
        assert abs(net - energy[d]) <= slack, (name, net, energy[d])


async def test_reads_are_grouped_into_few_requests(sim: MeterSimulator) -> None:
    """SDM630: one FC04 block (0x00..0x4B) and the serial (FC03 0xFC00): two requests.
    SunSpec after the scan: one request (serial and meter model are within 125 registers? no:
    common SN at 40052 and the meter model 40070..40124 fit one block of <= 125)."""
    reader = MeterReader([MeterConfig("a", "sdm630", TcpEndpoint(HOST, sim.ports[0]), 1),
                          MeterConfig("b", "sunspec", TcpEndpoint(HOST, sim.ports[0]), 4)],
                         clock=lambda: sim.sim_time)
    try:
        with trio.fail_after(10):
            await reader.poll("a")
            before = sim.requests
            await reader.poll("a")
            assert sim.requests - before == 2
            await reader.poll("b")  # scan + read
            before = sim.requests
            await reader.poll("b")
            assert sim.requests - before == 1
    finally:
        reader.close()


async def test_port_per_household() -> None:
    sim = MeterSimulator(3, seed=2, speed=0, port_per_household=True,
                         host=HOST, port=0)
    sim.advance(3600 * 6)
    with sim:
        assert len(set(sim.ports)) == 3
        configs = [MeterConfig(f"hh{d}", sim.config(d).profile,
                               TcpEndpoint(HOST, sim.ports[i]), 1)
                   for i, d in enumerate(sim.device_ids)]
        reader = MeterReader(configs, timeout_s=0.3, clock=lambda: sim.sim_time)
        try:
            with trio.fail_after(10):
                results = await reader.poll_all()
        finally:
            reader.close()
    for d in sim.device_ids:
        sample = results[f"hh{d}"].sample
        assert sample is not None
        assert sample.import_wh == expected_counter_wh(sim, d, sim.state(d).import_wh)


async def test_simulated_time_runs_faster_than_real_time() -> None:
    sim = MeterSimulator(1, seed=1, speed=600, host=HOST, port=0)
    with sim:
        await trio.sleep(0.5)
        assert sim.sim_time >= 60  # >= 1 simulated minute in half a second (load-tolerant)
    assert math.isfinite(sim.state(1).import_wh)


async def test_trio_loop_never_blocks_on_a_slow_meter(sim: MeterSimulator,
                                                      reader: MeterReader) -> None:
    """While a meter takes 0.25 s to answer, a trio task still runs every few ms."""
    sim.set_fault(1, "slow", 0.25)
    gaps: list[float] = []

    async def heartbeat(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        last = trio.current_time()
        task_status.started()
        while True:
            await trio.sleep(0.005)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(heartbeat)
            results = await reader.poll_all()
            nursery.cancel_scope.cancel()
    assert results["hh1"].ok and all(r.ok for r in results.values())
    assert max(gaps) < 0.2, max(gaps)  # blocked, it would be >= 0.25 s
    assert sum(gaps) >= 0.25


async def test_run_loop_streams_results(sim: MeterSimulator, reader: MeterReader) -> None:
    send, receive = trio.open_memory_channel[object](100)
    seen: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run, 0.05, send)
            async for result in receive:
                seen.append(result.meter)  # type: ignore[attr-defined]
                if len(seen) == 16:
                    nursery.cancel_scope.cancel()
    assert sorted(set(seen)) == sorted(reader.names)


async def test_shared_gateway_connection(sim: MeterSimulator) -> None:
    """Meters behind a gateway that allows one connection: one shared link, still correct."""
    from tests.meter.conftest import configs_for

    reader = MeterReader(configs_for(sim), timeout_s=0.5, share_tcp_connections=True,
                         clock=lambda: sim.sim_time)
    try:
        assert len(reader._links) == 1
        with trio.fail_after(10):
            results = await reader.poll_all()
    finally:
        reader.close()
    for name, result in results.items():
        d = int(name[2:])
        assert result.sample is not None, result.error
        assert result.sample.import_wh == expected_counter_wh(sim, d, sim.state(d).import_wh)


async def test_poll_all_can_leave_meters_out(sim: MeterSimulator, reader: MeterReader) -> None:
    """A node polls its own meters without the feeder meter it also reads (and in order)."""
    names = list((await reader.poll_all()).keys())
    assert len(names) >= 2
    chosen = names[1:]
    results = await reader.poll_all(chosen)
    assert list(results) == chosen
    assert all(r.ok for r in results.values())
    assert await reader.poll_all([]) == {}
