"""Meter reader benchmark (issue 3): reads per second, round trip and CPU cost per poll.

The simulator runs in its own process (so its CPU is not charged to the reader) as a real
Modbus TCP server on 127.0.0.1 with SDM630 households, clock frozen. Measured in this process:

1. One meter polled back to back by :class:`meter.reader.MeterReader` (each poll = 2 Modbus
   requests: the FC04 block 0x00..0x4B and the serial at 0xFC00, decoded and checked), against
   the peer reference: the bare pymodbus sync client doing the same two reads with no decoding
   or checks, in the same run. The ratio is the reader's overhead.
2. 50 meters polled in parallel (``poll_all``: one connection per meter, worker threads).
3. CPU per poll: process CPU time (all threads) divided by polls, for 1 and for 50 meters.

Every measurement is bounded in time (``--seconds`` each, default 3). Exits 0 unless it fails
to run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any

import trio

from meter.reader import MeterConfig, MeterReader
from meter.transport import TcpEndpoint

HOST = "127.0.0.1"


def _serve(households: int, queue: Any, stop: Any) -> None:
    from meter.sim import MeterSimulator
    from meter.sim.household import make_households

    sim = MeterSimulator(make_households(households, 1, ["sdm630"]), seed=1, speed=0, host=HOST)
    sim.advance(3600)
    with sim:
        queue.put(sim.ports[0])
        stop.wait(600)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_pymodbus(port: int, seconds: float) -> tuple[int, list[float], float]:
    """Peer reference: bare pymodbus sync client, the same two requests per poll."""
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient(HOST, port=port, timeout=2, retries=0)
    client.connect()
    rtts: list[float] = []
    cpu0 = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a = client.read_input_registers(0, count=76, device_id=1)
        b = client.read_holding_registers(0xFC00, count=2, device_id=1)
        rtts.append(time.perf_counter() - t0)
        assert not a.isError() and not b.isError()
    cpu = time.process_time() - cpu0
    client.close()
    return len(rtts), rtts, cpu


async def bench_reader(port: int, meters: int, seconds: float) -> dict[str, float]:
    """Poll ``meters`` meters (in parallel when > 1) for ``seconds``."""
    reader = MeterReader(
        [MeterConfig(f"m{d}", "sdm630", TcpEndpoint(HOST, port), d) for d in range(1, meters + 1)],
        timeout_s=2.0, retries=1,
    )
    try:
        await reader.poll_all()  # connect, warm up
        rounds: list[float] = []
        latencies: list[float] = []
        polls = failures = 0
        cpu0, t_end = time.process_time(), time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            if meters == 1:
                results = {"m1": await reader.poll("m1")}
            else:
                results = await reader.poll_all()
            rounds.append(time.perf_counter() - t0)
            for r in results.values():
                polls += 1
                if r.sample is None:
                    failures += 1
                else:
                    latencies.append(r.sample.latency_s)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    finally:
        reader.close()
    return {"polls": polls, "failures": failures, "wall": wall, "cpu": cpu,
            "round_med": statistics.median(rounds), "round_p95": _pct(rounds, 0.95),
            "lat_med": statistics.median(latencies), "lat_p95": _pct(latencies, 0.95)}


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--meters", type=int, default=50, help="meters in the parallel run")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(args.meters, queue, stop), daemon=True)
    server.start()
    try:
        port = queue.get(timeout=60)
        print(f"simulator: {args.meters} SDM630 households on {HOST}:{port} (separate process)")

        n, rtts, peer_cpu = bench_pymodbus(port, args.seconds)
        peer_rate = n / args.seconds
        print("\npeer: bare pymodbus sync client, 2 requests per poll, 1 meter")
        print(f"  {peer_rate:8.0f} polls/s ({2 * peer_rate:.0f} requests/s), round trip "
              f"median {statistics.median(rtts) * 1e3:.3f} ms, "
              f"p95 {_pct(rtts, 0.95) * 1e3:.3f} ms")
        print(f"  CPU per poll {peer_cpu / n * 1e6:.0f} us")

        one = trio.run(bench_reader, port, 1, args.seconds)
        rate1 = one["polls"] / one["wall"]
        print("\nMeterReader, 1 meter, polls back to back (2 requests + decode + checks each)")
        print(f"  {rate1:8.0f} polls/s ({2 * rate1:.0f} requests/s), poll round trip median "
              f"{one['lat_med'] * 1e3:.3f} ms, p95 {one['lat_p95'] * 1e3:.3f} ms, "
              f"failures {one['failures']:.0f}")
        print(f"  CPU per poll {one['cpu'] / one['polls'] * 1e6:.0f} us "
              f"(process CPU, all threads; {one['cpu'] / one['polls'] / (peer_cpu / n):.2f}x "
              f"bare pymodbus)")
        print(f"  ratio to bare pymodbus: {peer_rate / rate1:.2f}x the time per poll")

        many = trio.run(bench_reader, port, args.meters, args.seconds)
        rate_n = many["polls"] / many["wall"]
        print(f"\nMeterReader, {args.meters} meters polled in parallel (poll_all)")
        print(f"  {rate_n:8.0f} polls/s in total ({2 * rate_n:.0f} requests/s), one round of "
              f"{args.meters} meters median {many['round_med'] * 1e3:.1f} ms, p95 "
              f"{many['round_p95'] * 1e3:.1f} ms")
        print(f"  per-meter round trip median {many['lat_med'] * 1e3:.2f} ms, p95 "
              f"{many['lat_p95'] * 1e3:.2f} ms, failures {many['failures']:.0f}")
        print(f"  CPU per poll {many['cpu'] / many['polls'] * 1e6:.0f} us; "
              f"parallel speed-up over 1 meter: {rate_n / rate1:.2f}x")
        print(f"\nAt one poll per meter every second, {args.meters} meters need "
              f"{args.meters * many['cpu'] / many['polls'] * 100:.1f} % of one core.")
    finally:
        stop.set()
        server.join(10)
        if server.is_alive():
            server.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
