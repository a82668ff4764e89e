"""Network benchmark: N household processes on 127.0.0.1 over real libp2p (TCP+Noise+yamux).

For each N (default 5, 10, 20) it prints:

- startup (all processes ready) and mesh formation time (every node has min(N-1, D_low) mesh
  peers on both topics);
- publish-to-delivery latency of one publisher's messages, paced one per 0.05 x N s: per
  message the time until *every* member delivered it (median, p99), and per delivery (median);
- messages/s one publisher sustains with validation on (unpaced loop of batches; delivered
  fraction and the receivers' rate until the last delivery), also with 10-record batches;
- resident memory per node (median, max; target < 100 MB), CPU seconds per node and CPU
  milliseconds per gossip message per receiving node (independent of machine load).

Then, in-process: Ed25519 verifications/s of the raw library (``cryptography``), of
``market.did.verify_signature``, of ``Order.verify`` (canonical encoding + verify) and of
the whole gossip validator per record, each as a ratio to the raw library.

Everything is bounded (``trio.fail_after`` per grid size). ``python -m bench.net_bench
--sizes 5 10 20`` (``--quick`` for 5 only with fewer messages).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from node.testing.harness import NodeProc, make_grid, wait_mesh


def pct(values: list[float], q: float) -> float:
    """Nearest-rank quantile ``q`` in [0, 1] (NaN if empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def run_size(n: int, latency_msgs: int, flood_msgs: int, deadline: float) -> dict[str, Any]:
    """Start ``n`` processes, measure, stop them; returns the figures."""
    out: dict[str, Any] = {"n": n}
    with tempfile.TemporaryDirectory() as tmp:
        specs, _, genesis = make_grid(Path(tmp), n)
        procs = [
            NodeProc(s, genesis, extra_args=["--rate", "100000", "--no-slot-policy"])
            for s in specs
        ]
        async with trio.open_nursery() as nursery:
            try:
                with trio.move_on_after(deadline) as scope:
                    await _measure(n, procs, nursery, out, latency_msgs, flood_msgs)
                if scope.cancelled_caught:
                    out["timeout"] = f"deadline {deadline:.0f} s hit; figures partial"
                    with trio.move_on_after(20):
                        stats = [await p.stats() for p in procs]
                        out.setdefault("rss_median_mb", statistics.median(
                            s["rss_kb"] / 1024 for s in stats))  # fmt: skip
                        out.setdefault("rss_max_mb", max(s["rss_kb"] / 1024 for s in stats))
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(30):
                        async with trio.open_nursery() as stopper:
                            for p in procs:
                                stopper.start_soon(p.stop, 10.0)
                nursery.cancel_scope.cancel()
    return out


async def _measure(
    n: int, procs: list[NodeProc], nursery: trio.Nursery, out: dict[str, Any],
    latency_msgs: int, flood_msgs: int,
) -> None:  # fmt: skip
    t0 = time.monotonic()
    for p in procs:
        await p.start(nursery)
    for p in procs:
        await p.ready(timeout=180)
    out["startup_s"] = time.monotonic() - t0
    out["mesh_s"] = await wait_mesh(procs, min(n - 1, 3), timeout=120)
    await trio.sleep(1.0)  # let heartbeats settle
    pub, receivers = procs[0], procs[1:]
    cpu0 = [(await p.stats())["cpu_s"] for p in procs]

    # latency: paced at 0.05 * N s (every node handles every message, all N share the cores:
    # keep the box unsaturated so the figure is latency, not queueing)
    marks = [len(p.events) for p in procs]
    await pub.send(cmd="flood", count=latency_msgs, per_batch=1, nonce=1, interval=0.05 * n,
                   each=True, tag="lat")  # fmt: skip
    await pub.wait_for(lambda e: e.get("tag") == "lat", timeout=120, start=marks[0])
    sent = {e["nonce"]: e["t"] for e in pub.events[marks[0]:] if e.get("ev") == "pub"}
    await _wait_delivered(receivers, marks[1:], set(sent), timeout=30)
    per_delivery: list[float] = []
    to_all: dict[int, float] = {}
    for p, mark in zip(receivers, marks[1:], strict=True):
        for e in p.events[mark:]:
            if e.get("ev") == "gossip" and e["nonces"][0] in sent:
                lat = e["t"] - sent[e["nonces"][0]]
                per_delivery.append(lat)
                to_all[e["nonces"][0]] = max(to_all.get(e["nonces"][0], 0.0), lat)
    all_lat = list(to_all.values())
    out["lat_all_median_ms"] = 1000 * statistics.median(all_lat)
    out["lat_all_p99_ms"] = 1000 * pct(all_lat, 0.99)
    out["lat_one_median_ms"] = 1000 * statistics.median(per_delivery)

    # throughput: unpaced, 1 and 10 records per message
    nonce = 10_000
    for per in (1, 10):
        marks = [len(p.events) for p in procs]
        await pub.send(cmd="flood", count=flood_msgs, per_batch=per, nonce=nonce, tag=f"fl{per}")
        done = await pub.wait_for(lambda e, t=f"fl{per}": e.get("tag") == t, 120, start=marks[0])
        want = {nonce + i * per for i in range(flood_msgs)}
        nonce += flood_msgs * per + 1
        got = await _wait_delivered(receivers, marks[1:], want, timeout=30, settle=2.0)
        last = max((t for _, t in got), default=done["end"])
        delivered = len(got) / (len(want) * len(receivers))
        out[f"pub_rate_{per}"] = flood_msgs / max(1e-9, done["end"] - done["start"])
        out[f"sustained_{per}"] = flood_msgs * delivered / max(1e-9, last - done["start"])
        out[f"delivered_{per}"] = delivered
    stats = [await p.stats() for p in procs]
    rss = [s["rss_kb"] / 1024 for s in stats]
    out["rss_median_mb"], out["rss_max_mb"] = statistics.median(rss), max(rss)
    cpu = [s["cpu_s"] - c for s, c in zip(stats, cpu0, strict=True)]
    out["cpu_median_s"], out["cpu_pub_s"] = statistics.median(cpu[1:]), cpu[0]
    # load-independent: CPU one receiving node spends per gossip message (all phases)
    out["cpu_ms_per_msg"] = 1000 * out["cpu_median_s"] / (latency_msgs + 2 * flood_msgs)
    out["rejected"] = sum(sum(s["rejected"].values()) for s in stats)


async def _wait_delivered(
    receivers: list[NodeProc], marks: list[int], want: set[int], timeout: float,
    settle: float = 0.0,
) -> list[tuple[int, float]]:  # fmt: skip
    """Wait until every receiver delivered every first-nonce in ``want`` (or time out)."""
    got: list[tuple[int, float]] = []
    with trio.move_on_after(timeout):
        while True:
            got = []
            complete = True
            for p, mark in zip(receivers, marks, strict=True):
                seen = {
                    e["nonces"][0]: e["t"] for e in p.events[mark:]
                    if e.get("ev") == "gossip" and e["nonces"][0] in want
                }  # fmt: skip
                got.extend(seen.items())
                complete &= len(seen) == len(want)
            if complete:
                break
            await trio.sleep(0.1)
    if settle and len(got) < len(want) * len(receivers):
        await trio.sleep(settle)
    return got


def verify_rates(seconds: float = 1.0) -> dict[str, float]:
    """Signature verifications per second: raw library vs our paths."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from market.did import verify_signature
    from market.models import Order, Side
    from node.net.validator import GossipValidator
    from node.net.wire import TopicKind, encode_batch
    from node.setup.keyfile import NodeIdentity

    ident = NodeIdentity.from_seed(b"v" * 32)
    order = Order(grid="g", nonce=1, id="o", household=ident.did, side=Side.BUY, slot=5,
                  quantity_wh=100, price=10).signed_by(ident.signer)  # fmt: skip
    payload = order.signing_bytes()
    sig = bytes.fromhex(order.signature)
    key = Ed25519PrivateKey.from_private_bytes(b"v" * 32).public_key()

    def rate(fn: Callable[[], object], per_call: int = 1) -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(50):
                fn()
            n += 50
        return n * per_call / (time.perf_counter() - start)

    batch_orders = [
        Order(grid="g", nonce=i, id=f"o{i}", household=ident.did, side=Side.BUY, slot=5,
              quantity_wh=100, price=10).signed_by(ident.signer)
        for i in range(10)
    ]
    batches = iter(range(10**9))

    def validate_batch() -> None:
        v = GossipValidator("g", {str(ident.peer_id): ident.did})
        v.rate_per_origin = v.burst_per_origin = 1e12
        data = encode_batch(batch_orders, next(batches))
        assert v.validate(TopicKind.ORDERS, str(ident.peer_id), str(ident.peer_id), data).ok

    return {
        "raw": rate(lambda: key.verify(sig, payload)),
        "verify_signature": rate(lambda: verify_signature(ident.did, payload, order.signature)),
        "order_verify": rate(lambda: order.verify(ident.did)),
        "validator_per_record": rate(validate_batch, per_call=10),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(prog="python -m bench.net_bench")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--latency-msgs", type=int, default=30)
    parser.add_argument("--flood-msgs", type=int, default=100)
    parser.add_argument("--budget", type=float, default=750.0, help="total seconds (bounded)")
    parser.add_argument("--quick", action="store_true", help="5 nodes, fewer messages")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.latency_msgs, args.flood_msgs = [5], 20, 60
    rows = []
    budget_end = time.monotonic() + args.budget
    for n in args.sizes:
        deadline = min(120.0 + 15.0 * n, budget_end - time.monotonic() - 45.0)
        if deadline < 30:
            print(f"-- {n} nodes: skipped, time budget of {args.budget:.0f} s used up")
            continue
        print(f"-- {n} nodes ...", flush=True)
        row = trio.run(run_size, n, args.latency_msgs, args.flood_msgs, deadline)
        rows.append(row)
        print("   " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items()), flush=True)  # fmt: skip
    print()
    print("nodes | start s | mesh s | lat to all med/p99 ms | lat 1 med ms | pub msg/s "
          "| sustained msg/s (1 rec) | deliv | sustained rec/s (10 rec) | deliv | RSS med/max MB "
          "| CPU/node s | CPU ms/msg/node")  # fmt: skip
    for r in rows:
        f = {k: (v if isinstance(v, float | int) else math.nan) for k, v in r.items()}

        def g(key: str, f: dict[str, float] = f) -> float:
            return f.get(key, math.nan)

        print(
            f"{r['n']:5d} | {g('startup_s'):7.1f} | {g('mesh_s'):6.2f} | "
            f"{g('lat_all_median_ms'):7.1f} / {g('lat_all_p99_ms'):7.1f} | "
            f"{g('lat_one_median_ms'):12.1f} | {g('pub_rate_1'):9.0f} | "
            f"{g('sustained_1'):23.0f} | {g('delivered_1'):5.0%} | "
            f"{10 * g('sustained_10'):24.0f} | {g('delivered_10'):5.0%} | "
            f"{g('rss_median_mb'):5.0f} / {g('rss_max_mb'):4.0f} | {g('cpu_median_s'):10.1f} | "
            f"{g('cpu_ms_per_msg'):.1f}"
            + (f"  ({r['timeout']})" if "timeout" in r else "")
        )
    print(f"(load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    rates = verify_rates()
    raw = rates["raw"]
    print()
    print("Ed25519 verifications/s (in-process, one core):")
    for name, value in rates.items():
        print(f"  {name:22s} {value:10.0f}/s  = {value / raw:5.2f} x raw library")


if __name__ == "__main__":
    main()
