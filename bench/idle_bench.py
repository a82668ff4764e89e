"""Idle benchmark: what a node costs when nothing happens (issue 19, "a quiet node").

Starts a small demo grid (``node/tools/demo.py``'s machinery, as ``bench/node_bench.py`` does:
meter simulator, one ``microgrid node run`` process per household, real libp2p, Modbus, SQLite,
Raft) once with the demo's Raft timing and once with the production timing, lets it settle
(every node connected to all others and sees the leader, then ``--settle`` s), then samples
every node's CPU time from /proc (utime + stime) over a window of ``--seconds`` and reports
each node's share of one core in the *quiet* part of the window: away from the slot's own
work (the meter reading and order just after each slot end, the gate closure, the settlement;
each excluded from 0.5 s before to ``--margin`` s after). The meters are polled every 5 s
(``meter_poll_seconds``' production default), whatever the slot length.

Where the time goes: with ``py-spy`` on the PATH or under ``/tmp/pyspy`` (``pip install
--target /tmp/pyspy py-spy``; never into the project venv) it records one voter and one learner
for the window and prints their top functions (own samples and with callees); without it, the
nodes run with ``MICROGRID_PROFILE`` (docs/node.md) and the cProfile dumps they write on exit
are summarised instead (main thread only; the whole run, startup included).

It prints figures and never fails on time. ``python -m bench.idle_bench [--seconds 60]
[--households 3] [--slot-seconds 30] [--timing demo production]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench.node_bench import RAFT_TIMING, CpuSampler, rss_mb, start_interval
from node.tools.demo import Demo, DemoSettings

PRODUCTION_POLL_S = 5.0
"""node/setup/config.py's ``meter_poll_seconds`` default (the demo polls every slot/2 s)."""
START_TIMEOUT = 600
"""Seconds for every node to connect and see a leader (50 processes on 2 cores: about 2 min)."""


def find_py_spy() -> list[str] | None:
    """The command that runs py-spy, or None if it is not installed."""
    exe = shutil.which("py-spy")
    if exe:
        return [exe]
    target = Path("/tmp/pyspy")
    if (target / "bin" / "py-spy").exists():
        return [str(target / "bin" / "py-spy")]
    return None


def quiet_intervals(demo: Demo, t0: float, t1: float, margin: float) -> list[tuple[float, float]]:
    """The parts of [t0, t1] away from every slot end, gate closure and settlement, and from
    every household's reading and order publication (node/daemon/spread.py)."""
    schedule = demo.schedule
    busy: list[tuple[float, float]] = []
    for slot in range(schedule.slot_at(t0) - 3, schedule.slot_at(t1) + 3):
        whens = [schedule.end(slot), schedule.gate_time(slot), schedule.settle_time(slot)]
        for p in demo.publications(slot):
            whens += [p.reading_at, p.order_at]
        for when in whens:
            busy.append((when - 0.5, when + margin))
    busy.sort()
    out, at = [], t0
    for b0, b1 in busy:
        if b0 > at:
            out.append((at, min(b0, t1)))
        at = max(at, b1)
        if at >= t1:
            break
    if at < t1:
        out.append((at, t1))
    return [(a, b) for a, b in out if b - a >= 1.0]


Top = list[tuple[str, int]]


def parse_py_spy_raw(path: Path, top: int) -> tuple[int, Top, Top]:
    """From py-spy's ``--format raw`` (collapsed stacks): samples, top own, top inclusive."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    # leave out the frames under every sample (the interpreter's and trio's entry points)
    shown = [(f, n) for f, n in incl.most_common() if n < 0.9 * total][:top]
    return total, own.most_common(top), shown


def report_cprofile(path: Path, top: int) -> None:
    """Print a cProfile dump's top functions by own and by cumulative time."""
    stats = pstats.Stats(str(path), stream=sys.stdout)
    stats.strip_dirs()
    print(f"  cProfile {path.name}: top {top} by own time")
    stats.sort_stats("tottime").print_stats(top)
    print(f"  cProfile {path.name}: top {top} by cumulative time")
    stats.sort_stats("cumulative").print_stats(top)


async def run_timing(args: argparse.Namespace, raft: str, py_spy: list[str] | None,
                     tmp: Path) -> dict[str, Any]:  # fmt: skip
    """Run one grid with ``raft`` timing and measure its quiet CPU."""
    out: dict[str, Any] = {"raft": raft}
    prof_dir = tmp / f"prof-{raft}"
    prof_dir.mkdir()
    os.environ["MICROGRID_METER_POLL_SECONDS"] = str(PRODUCTION_POLL_S)
    if py_spy is None:
        os.environ["MICROGRID_PROFILE"] = str(prof_dir / "node-{pid}.prof")
    demo = Demo(
        DemoSettings(households=args.households, slot_seconds=args.slot_seconds,
                     dashboard=False, voters=args.voters,
                     start_interval=start_interval(args.households),
                     directory=tmp / f"demo-{raft}", **RAFT_TIMING[raft]),
        out=lambda line: None,
    )  # fmt: skip
    spies: list[tuple[str, trio.Process, Path]] = []
    try:
        async with demo.running(quiesce_timeout=2 * args.slot_seconds) as nursery:
            n = len(demo.households)
            # (a large grid's learner does not dial every member: "indirect" ones count)
            with trio.move_on_after(START_TIMEOUT) as scope:
                await demo.wait_until(lambda d: len(d) == n and all(
                    doc["raft"]["leader"]
                    and all(p["up"] or p.get("indirect") for p in doc["peers"])
                    for doc in d.values()), timeout=START_TIMEOUT)  # fmt: skip
            if scope.cancelled_caught:
                out["error"] = f"no leader seen by every connected node within {START_TIMEOUT} s"
                return out
            await trio.sleep(args.settle)
            docs = await demo.statuses()
            leader = demo.leader_name(docs)
            pids = {h.name: h.process.pid for h in demo.households if h.process is not None}
            roles = {name: ("leader" if name == leader else docs.get(name, {}).get(
                "membership", "?")) for name in pids}  # fmt: skip
            out["roles"] = roles
            if py_spy is not None:
                # the leader and one node of each other role (a voter, a learner)
                picks = [leader]
                for name, role in roles.items():
                    if role not in {roles[p] for p in picks}:
                        picks.append(name)
                for name in picks:
                    raw = (args.profiles or tmp) / f"spy-{raft}-{name}.txt"
                    proc = await trio.lowlevel.open_process(
                        [*py_spy, "record", "--pid", str(pids[name]), "--format", "raw",
                         "--rate", "200", "--gil", "--duration", str(int(args.seconds)),
                         "--nonblocking", "--output", str(raw)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    spies.append((name, proc, raw))
            sampler = CpuSampler(pids)
            nursery.start_soon(sampler.run)
            t0 = time.time()
            await trio.sleep(args.seconds)
            t1 = time.time()
            windows = quiet_intervals(demo, t0, t1, args.margin)
            quiet_s = sum(b - a for a, b in windows)
            per_node = {}
            for name in pids:
                cpu = wall = 0.0
                for a, b in windows:
                    part = sampler.between(name, a, b)
                    if part is not None:
                        cpu += part[0]
                        wall += part[1]
                whole = sampler.between(name, t0, t1)
                per_node[name] = {
                    "quiet_pct": 100 * cpu / wall if wall else float("nan"),
                    "all_pct": 100 * whole[0] / whole[1] if whole else float("nan"),
                    "rss_mb": rss_mb(pids[name]),
                }
            out["per_node"] = per_node
            out["quiet_s"], out["window_s"] = quiet_s, t1 - t0
            for _name, proc, _raw in spies:
                with trio.move_on_after(15):
                    await proc.wait()
    finally:
        for _name, proc, _raw in spies:
            if proc.returncode is None:
                proc.kill()
        demo.close()
        os.environ.pop("MICROGRID_PROFILE", None)
    out["spy"] = [(name, raw) for name, _p, raw in spies if raw.exists()]
    out["prof"] = sorted(prof_dir.glob("*.prof"))
    return out


def report(r: dict[str, Any], top: int) -> None:
    """Print one timing's figures and where the time went."""
    print(f"\n== {r['raft']} Raft timing ==")
    if "error" in r:
        print(f"  error: {r['error']}")
        return
    print(f"  window {r['window_s']:.0f} s, quiet part {r['quiet_s']:.0f} s")
    for name, p in r["per_node"].items():
        role = r["roles"].get(name, "?")
        print(f"  {name:>4} {role:>7}: quiet {p['quiet_pct']:5.2f} % of one core, whole "
              f"window {p['all_pct']:5.2f} %, RSS {p['rss_mb'] or 0:.0f} MB")  # fmt: skip
    quiet = [p["quiet_pct"] for p in r["per_node"].values()]
    print(f"  median quiet share {statistics.median(quiet):.2f} % (max {max(quiet):.2f} %)")
    for role in sorted(set(r["roles"].values())):
        mine = [p["quiet_pct"] for n, p in r["per_node"].items() if r["roles"].get(n) == role]
        rss = [p["rss_mb"] or 0 for n, p in r["per_node"].items() if r["roles"].get(n) == role]
        print(f"  {role}: {len(mine)} nodes, quiet share median {statistics.median(mine):.2f} %"
              f" (max {max(mine):.2f} %), RSS median {statistics.median(rss):.1f} MB"
              f" (max {max(rss):.1f})")
    for name, raw in r["spy"]:
        total, own, incl = parse_py_spy_raw(raw, top)
        busy = 100 * total / 200 / r["window_s"]
        print(f"  py-spy {name} ({r['roles'].get(name)}): {total} samples holding the GIL at"
              f" 200 Hz over {r['window_s']:.0f} s = ~{busy:.2f} % (whole window)")  # fmt: skip
        print("   own samples:")
        for frame, n in own:
            print(f"    {n:6d} {frame}")
        print("   inclusive:")
        for frame, n in incl:
            print(f"    {n:6d} {frame}")
    for path in r["prof"][:2]:
        report_cprofile(path, top)


async def amain(args: argparse.Namespace) -> int:
    py_spy = None if args.no_py_spy else find_py_spy()
    print("profiler:", "py-spy " + py_spy[0] if py_spy else "cProfile (MICROGRID_PROFILE)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for raft in args.timing:
            print(f"running {args.households} households, {args.slot_seconds} s slots, {raft} "
                  f"Raft timing, {args.seconds:.0f} s window…", flush=True)  # fmt: skip
            try:
                r = await run_timing(args, raft, py_spy, Path(tmp))
            except (trio.TooSlowError, RuntimeError, OSError) as exc:
                r = {"raft": raft, "error": f"{exc.__class__.__name__}: {exc}"}
            report(r, args.top)
            results.append(r)
    print("\nsummary (median quiet share of one core per node):")
    for r in results:
        if "per_node" in r:
            quiet = [p["quiet_pct"] for p in r["per_node"].values()]
            print(f"  {r['raft']:>10}: {statistics.median(quiet):.2f} %")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(prog="python -m bench.idle_bench")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window")
    parser.add_argument("--households", type=int, default=3)
    parser.add_argument("--voters", type=int, default=3, help="Raft voters; the rest learn")
    parser.add_argument("--slot-seconds", type=int, default=30,
                        help="slot length (longer: more quiet time per window)")  # fmt: skip
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to wait after the first block before measuring")  # fmt: skip
    parser.add_argument("--margin", type=float, default=2.0,
                        help="seconds after each slot event left out of the quiet part",
                        )  # fmt: skip
    parser.add_argument("--timing", nargs="+", choices=sorted(RAFT_TIMING),
                        default=["demo", "production"])  # fmt: skip
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--profiles", type=Path, default=None,
                        help="keep py-spy's collapsed stacks (one file per profiled node) here")
    parser.add_argument("--no-py-spy", action="store_true",
                        help="profile with cProfile (MICROGRID_PROFILE) even with py-spy",
                        )  # fmt: skip
    args = parser.parse_args(argv)
    if args.profiles is not None:
        args.profiles.mkdir(parents=True, exist_ok=True)
    return trio.run(amain, args)


if __name__ == "__main__":
    sys.exit(main())
