"""Node benchmark: whole demo microgrids of N household processes on this machine.

For each N (default 5, 10, 20) it runs ``microgrid demo``'s machinery (meter simulator, one
``microgrid node run`` process per household: real libp2p, Modbus, SQLite, Raft with 3 voters)
for a number of rounds and prints:

- gate closure to the slot's clearing applied on *all* nodes (median, p99; target: p99 under
  1 s for 10 households on 2 cores), from each node's own record of when it applied the
  clearing (``/status`` ``slot_times``, same wall clock for all processes);
- slot end to the settled block on all nodes (median, p99), and the same measured from the
  reading deadline (slot end + settle delay, when the leader may first propose the
  settlement): the part that is our overhead rather than the market's rule;
- CPU seconds per node per round, split into the background rate (CPU/s in the quiet part of
  each slot: heartbeats, meter polls, libp2p housekeeping) and the work of one round (orders,
  readings, clearing, settlement), and the share of one core a node would use with 15-minute
  slots (work / 900 s + background rate), also scaled by a Raspberry Pi factor;
- resident memory per node (median, max) and gossip messages per round.

CPU comes from /proc (utime + stime, 10 ms ticks), sampled every 0.1 s. Every run is bounded
(``trio.fail_after``). ``python -m bench.node_bench --sizes 5 10 20 --rounds 6``.

``--baseline REV`` first runs the same sizes with the code of git revision ``REV`` (exported
into a temporary directory and run from there, its node processes too) and then prints the
ratio of this version's figures to that one's, measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from node.tools.demo import Demo, DemoSettings, fetch

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
PRODUCTION_SLOT_S = 900
PI_FACTOR = 4.0
"""A Raspberry Pi 4 core runs this Python code roughly this many times slower than one core of
the 2-core x86 bench machine (single-thread CPython benchmarks; an estimate, not measured)."""


def pct(values: list[float], q: float) -> float:
    """Nearest-rank quantile ``q`` in [0, 1] (NaN if empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, or None once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float | None:
    """Resident set size in MB."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * PAGE_KB / 1024


class CpuSampler:
    """Samples every node's CPU time every 0.5 s: ``series[name] = [(t, cpu_s), ...]``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.series: dict[str, list[tuple[float, float]]] = {n: [] for n in pids}

    async def run(self) -> None:
        while True:
            now = time.time()
            for name, pid in self.pids.items():
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    self.series[name].append((now, cpu))
            await trio.sleep(0.5)

    def between(self, name: str, t0: float, t1: float) -> tuple[float, float] | None:
        """(CPU seconds, wall seconds) between the samples nearest inside [t0, t1]."""
        inside = [(t, c) for t, c in self.series[name] if t0 <= t <= t1]
        if len(inside) < 2:
            return None
        (ta, ca), (tb, cb) = inside[0], inside[-1]
        return cb - ca, tb - ta


STATUS_POLL_S = 2.0
"""How often the bench asks every node for ``/status`` while it waits: the latencies come from
the nodes' own ``slot_times``, so polling faster only loads the nodes it measures (at 50 nodes
every 0.25 s, the polls were about 7 % of a learner's CPU and a share of a core in the bench)."""

RAFT_TIMING = {
    "demo": {},  # DemoSettings' defaults: tick 0.1 s, heartbeat 2 ticks, election 15 ticks
    "production": {"raft_tick_seconds": 0.25, "raft_election_ticks": 20,
                   "raft_heartbeat_ticks": 4},  # node/setup/config.py's defaults
}  # fmt: skip


def start_interval(n: int) -> float:
    """Seconds between node starts: 0 up to 20 households (as the earlier figures were
    measured), then spread over about 10 s (see ``DemoSettings.start_interval``)."""
    return 0.0 if n <= 20 else 10.0 / n


async def run_size(
    n: int, rounds: int, slot_seconds: int, deadline: float, raft: str = "demo", voters: int = 3
) -> dict[str, Any]:
    """Run one demo microgrid of ``n`` households and measure it."""
    out: dict[str, Any] = {"n": n, "slot_s": slot_seconds, "raft": raft, "voters": voters}
    with tempfile.TemporaryDirectory() as tmp:
        demo = Demo(
            DemoSettings(households=n, slot_seconds=slot_seconds, dashboard=False, voters=voters,
                         start_interval=start_interval(n),
                         directory=Path(tmp) / "demo", **RAFT_TIMING[raft]),
            out=lambda line: None,
        )  # fmt: skip
        try:
            async with demo.running(quiesce_timeout=2 * slot_seconds) as nursery:
                assert demo.started_at is not None
                with trio.move_on_after(deadline) as scope:
                    await _measure(demo, nursery, rounds, out, demo.started_at)
                if scope.cancelled_caught:
                    raise trio.TooSlowError(reached(await demo.statuses(), n, demo.schedule))
            verdict = demo.verdict()
            out["verdict"] = ("PASS " if verdict.ok else "FAIL ") + verdict.message
        finally:
            demo.close()
    return out


def reached(docs: dict[str, dict[str, Any]], n: int, schedule: Any) -> str:
    """Where a grid that ran out of time got to: nodes answering, ledger heights and settled
    slots (min/median/max), leaders and terms seen, and per slot the gate closure to clearing
    on every node for the slots every node cleared."""
    if not docs:
        return f"0/{n} nodes answering"

    def spread(values: list[int]) -> str:
        v = sorted(values)
        return f"{v[0]}/{v[len(v) // 2]}/{v[-1]}"

    heights = [d["ledger"]["height"] for d in docs.values()]
    settled = [d["ledger"]["settled_through"] or 0 for d in docs.values()]
    leaders = {str(d["raft"]["leader"])[-8:] for d in docs.values()}
    terms = {d["raft"]["term"] for d in docs.values()}
    cleared: dict[int, list[float]] = {}
    for d in docs.values():
        for row in d.get("slot_times", []):
            if "cleared_at" in row:
                cleared.setdefault(row["slot"], []).append(row["cleared_at"])
    gates = [f"{max(t) - schedule.gate_time(s):.1f}" for s, t in sorted(cleared.items())
             if len(t) == n]  # fmt: skip
    return (
        f"{len(docs)}/{n} nodes answering; heights {spread(heights)}; settled_through "
        f"{spread([x - max(settled) for x in settled])} (relative to the newest); leaders "
        f"{sorted(leaders)}; terms {sorted(terms)}; slots cleared on all: {len(gates)}, gate "
        f"-> last node s: {', '.join(gates[-8:])}"
    )


async def _measure(
    demo: Demo, nursery: trio.Nursery, rounds: int, out: dict[str, Any], t0: float
) -> None:
    schedule = demo.schedule
    n = len(demo.households)
    # the first round that settles with everyone up: warm-up (startup, mesh, first election)
    await demo.wait_until(lambda d: len(d) == n and all(doc["ledger"]["height"] >= 1
                                                        for doc in d.values()),
                          timeout=240, interval=STATUS_POLL_S)  # fmt: skip
    out["startup_s"] = time.monotonic() - t0
    pids = {h.name: h.process.pid for h in demo.households if h.process is not None}
    sampler = CpuSampler(pids)
    nursery.start_soon(sampler.run)
    docs = await demo.statuses()
    window_start = time.time()
    # the first slot whose gate closes after every node is up: a slow start-up (50 processes
    # on 2 cores take 50-120 s) can end after the next slot's gate, and that slot's clearing
    # reached the late starters only as they caught up, which is start-up, not a round
    first = max(d["ledger"]["settled_through"] or 0 for d in docs.values()) + 1
    while schedule.gate_time(first) < window_start + 1.0:
        first += 1
    counters0 = {name: dict(d.get("counters", {})) for name, d in docs.items()}
    docs0 = docs
    last = first + rounds - 1
    await demo.wait_until(
        lambda d: len(d) == n and all((doc["ledger"]["settled_through"] or 0) >= last
                                      for doc in d.values()),
        timeout=(rounds + 4) * schedule.slot_seconds + 30,
        interval=STATUS_POLL_S,
    )  # fmt: skip
    window_end = time.time()
    docs = await demo.statuses()

    times: dict[int, dict[str, list[float]]] = {}
    for d in docs.values():
        for row in d["slot_times"]:
            for what in ("cleared_at", "settled_at"):
                if what in row:
                    times.setdefault(row["slot"], {}).setdefault(what, []).append(row[what])
    gate_lat, settle_lat, settle_over = [], [], []
    per_slot = []
    for slot in range(first, last + 1):
        t = times.get(slot, {})
        row = f"slot {slot}:"
        if len(t.get("cleared_at", [])) == n:
            cleared = sorted(c - schedule.gate_time(slot) for c in t["cleared_at"])
            gate_lat.append(cleared[-1])
            row += (
                f" cleared first/median/last {cleared[0]:.3f}/{cleared[n // 2]:.3f}/"
                f"{cleared[-1]:.3f} s after the gate;"
            )
        if len(t.get("settled_at", [])) == n:
            settled = sorted(c - schedule.settle_time(slot) for c in t["settled_at"])
            settle_lat.append(settled[-1] + schedule.settle_delay_seconds)
            settle_over.append(settled[-1])
            row += (
                f" settled {settled[0]:.3f}/{settled[n // 2]:.3f}/{settled[-1]:.3f} s after"
                " the deadline"
            )
        per_slot.append(row)
    out["per_slot"] = per_slot
    out["rounds"] = rounds
    out["gate_median_ms"] = 1000 * statistics.median(gate_lat) if gate_lat else math.nan
    out["gate_p99_ms"] = 1000 * pct(gate_lat, 0.99)
    out["settle_median_ms"] = 1000 * statistics.median(settle_lat) if settle_lat else math.nan
    out["settle_p99_ms"] = 1000 * pct(settle_lat, 0.99)
    out["settle_over_median_ms"] = (
        1000 * statistics.median(settle_over) if settle_over else math.nan
    )
    out["settle_over_p99_ms"] = 1000 * pct(settle_over, 0.99)

    # CPU: total over the window, and the background rate in each slot's quiet part (after the
    # settlement, before the next gate closure)
    totals, rates = [], []
    for name in pids:
        total = sampler.between(name, window_start, window_end)
        if total is None:
            continue
        totals.append(total[0])
        quiet_cpu = quiet_wall = 0.0
        for slot in range(first, last):
            # after the settlement and the last household's order (node/daemon/spread.py),
            # before the next gate closure
            orders = [p.order_at for p in demo.publications(slot)]
            q0 = max([schedule.settle_time(slot), *orders]) + 0.8
            q1 = schedule.gate_time(slot + 2) - 0.3
            part = sampler.between(name, q0, q1) if q1 - q0 > 1 else None
            if part is not None:
                quiet_cpu += part[0]
                quiet_wall += part[1]
        if quiet_wall > 0:
            rates.append(quiet_cpu / quiet_wall)
    wall = window_end - window_start
    cpu_round = statistics.median(totals) / rounds
    rate = statistics.median(rates) if rates else math.nan
    work = max(0.0, cpu_round - rate * wall / rounds)
    out["cpu_round_s"] = cpu_round
    out["cpu_background_pct"] = 100 * rate
    out["cpu_work_round_s"] = work
    share = work / PRODUCTION_SLOT_S + rate
    out["core_share_15min_pct"] = 100 * share
    out["pi_core_share_15min_pct"] = 100 * share * PI_FACTOR
    by_node = {name: rss_mb(p) for name, p in pids.items()}
    rss = [r for r in by_node.values() if r is not None]
    out["rss_median_mb"], out["rss_max_mb"] = statistics.median(rss), max(rss)
    # the voters hold a connection to every member, a learner to 10-15: their RSS differs
    learners = {name for name, d in docs.items() if d["raft"]["role"] == "learner"}
    for key, want in (("rss_voter_max_mb", False), ("rss_learner_max_mb", True)):
        of_role = [r for name, r in by_node.items() if r is not None and (name in learners) is want]
        out[key] = max(of_role) if of_role else math.nan
    published = 0
    for name, d in docs.items():
        c0, c1 = counters0.get(name, {}), d.get("counters", {})
        published += sum(c1.get(k, 0) - c0.get(k, 0) for k in c1 if k.startswith("published_"))
    # the window can outlast `rounds` slots (it ends when the last one settled everywhere)
    out["gossip_msgs_per_round"] = published / (wall / schedule.slot_seconds)
    # the leader: its CPU per round and the Raft bytes it sent per round (issue 19: leader cost
    # against N)
    leaders = [name for name, d in docs.items() if d["raft"]["role"] == "leader"]
    if (
        leaders
        and leaders[0] in pids
        and docs0.get(leaders[0], {}).get("raft", {}).get("role") == "leader"
    ):
        name = leaders[0]
        total = sampler.between(name, window_start, window_end)
        out["leader_cpu_round_s"] = total[0] / rounds if total else math.nan
        sent0 = (docs0.get(name, {}).get("raft_transport") or {}).get("bytes_sent")
        sent1 = (docs[name].get("raft_transport") or {}).get("bytes_sent")
        out["leader_kb_round"] = (
            (sent1 - sent0) / 1000 / (wall / schedule.slot_seconds)
            if isinstance(sent0, int) and isinstance(sent1, int)
            else math.nan
        )
    # the other voters: with delegated learner replication (docs/raft.md) they serve the
    # learners their committed entries, so the busiest of them is the second cost to watch
    voter_cpu, voter_kb = [], []
    for name, d in docs.items():
        if d["raft"]["role"] != "follower" or name not in pids:
            continue
        total = sampler.between(name, window_start, window_end)
        if total is not None:
            voter_cpu.append(total[0] / rounds)
        sent0 = (docs0.get(name, {}).get("raft_transport") or {}).get("bytes_sent")
        sent1 = (d.get("raft_transport") or {}).get("bytes_sent")
        if isinstance(sent0, int) and isinstance(sent1, int):
            voter_kb.append((sent1 - sent0) / 1000 / (wall / schedule.slot_seconds))
    out["voter_cpu_round_s"] = max(voter_cpu) if voter_cpu else math.nan
    out["voter_kb_round"] = max(voter_kb) if voter_kb else math.nan
    out.update(await measure_restart(demo, docs))


async def measure_restart(demo: Demo, docs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Stop the last household's node (SIGTERM) and start it again, timing from the spawn:
    its API answers (``listen_s``), it is connected to every member it dials (``connected_s``:
    all of them up to ``NetSettings.full_mesh_members``, else the voters and its neighbours),
    and it has applied the log up to the commit index the leader had at the restart
    (``applied_s``). Start-up target (issue 19): all three within 3 s."""
    h = demo.households[-1]
    await demo.terminate(h)
    target = max(d["raft"]["commit_index"] for d in docs.values())
    t0 = time.monotonic()
    await demo.start_node(h)
    marks: dict[str, float] = {}
    with trio.move_on_after(60):
        while len(marks) < 3:
            doc = await fetch(h.api + "/status", timeout=1.0)
            now = time.monotonic() - t0
            if doc is not None:
                marks.setdefault("listen_s", now)
                members = doc.get("members", {})
                if members.get("down", 1) == 0:
                    marks.setdefault("connected_s", now)
                if doc["raft"]["applied_index"] >= target:
                    marks.setdefault("applied_s", now)
            await trio.sleep(0.05)
    return {k: marks.get(k, math.nan) for k in ("listen_s", "connected_s", "applied_s")}


def describe(exc: BaseException) -> str:
    """One line for a failed run, the innermost errors of an exception group named."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{exc.__class__.__name__}: {exc}"


def report(results: list[dict[str, Any]]) -> None:
    """Print one table and the ratios to the targets."""
    print()
    print(f"{'N':>3} {'raft':>5} {'start s':>7} {'gate->all ms':>17} {'end->settled ms':>17} "
          f"{'deadline->settled':>18} {'CPU/round s':>11} {'bg %':>5} {'work s':>6} "
          f"{'15-min %':>8} {'Pi %':>5} {'RSS MB':>11} {'msgs':>5} {'restart s':>15} "
          f"{'leader CPU s':>12} {'leader kB':>9} {'voter CPU s':>11} {'voter kB':>8}")  # fmt: skip
    for r in results:
        if "error" in r:
            print(f"{r['n']:>3} {r.get('raft', '')[:5]:>5} error: {r['error']}")
            continue
        print(
            f"{r['n']:>3} {r['raft'][:5]:>5} {r['startup_s']:>7.1f} "
            f"{r['gate_median_ms']:>7.0f} /{r['gate_p99_ms']:>6.0f} p99 "
            f"{r['settle_median_ms']:>7.0f} /{r['settle_p99_ms']:>6.0f} p99 "
            f"{r['settle_over_median_ms']:>8.0f} /{r['settle_over_p99_ms']:>5.0f} p99 "
            f"{r['cpu_round_s']:>11.3f} {r['cpu_background_pct']:>5.1f} "
            f"{r['cpu_work_round_s']:>6.3f} {r['core_share_15min_pct']:>8.2f} "
            f"{r['pi_core_share_15min_pct']:>5.1f} "
            f"{r['rss_median_mb']:>5.0f}/{r['rss_max_mb']:>4.0f} "
            f"{r['gossip_msgs_per_round']:>5.0f} "
            f"{r['listen_s']:>4.1f}/{r['connected_s']:>4.1f}/{r['applied_s']:>4.1f} "
            f"{r.get('leader_cpu_round_s', math.nan):>12.3f} "
            f"{r.get('leader_kb_round', math.nan):>9.1f} "
            f"{r.get('voter_cpu_round_s', math.nan):>11.3f} "
            f"{r.get('voter_kb_round', math.nan):>8.1f}"
        )
    print()
    for r in results:
        if "error" in r:
            continue
        print(f"N={r['n']} ({r['raft']} Raft timing): gate->all p99 / 1 s target = "
              f"{r['gate_p99_ms'] / 1000:.2f}; "
              f"Pi core share at 15-min slots {r['pi_core_share_15min_pct']:.1f} % "
              f"(x{PI_FACTOR:g} estimate); gossip msgs per round / N = "
              f"{r['gossip_msgs_per_round'] / r['n']:.1f}; RSS max voters "
              f"{r.get('rss_voter_max_mb', math.nan):.1f} / learners "
              f"{r.get('rss_learner_max_mb', math.nan):.1f} MiB (target 100); "
              f"{r['verdict']}")  # fmt: skip
    print("columns: gate->all = gate closure to clearing applied on every node; end->settled ="
          " slot end to block on every node (includes the settle delay); deadline->settled ="
          " from the reading deadline; bg = background CPU of one core; work = CPU of one "
          "round's orders, readings, clearing and settlement; 15-min % = share of one core "
          "at 15-minute slots (work/900 s + bg); restart = one learner restarted after the "
          "rounds: API answering / connected to every member it dials / log applied to the "
          "leader's commit at the restart, seconds after the spawn (target: all within 3 s); "
          "leader CPU s / kB = the Raft leader's CPU seconds and Raft bytes sent per round (nan: "
          "the leader changed); voter CPU s / kB = the same for the busiest other voter (with "
          "delegated learner replication it sends learners their committed entries)")  # fmt: skip


RATIO_KEYS = (
    ("startup_s", "start-up"),
    ("gate_p99_ms", "gate->all p99"),
    ("settle_over_p99_ms", "deadline->settled p99"),
    ("cpu_round_s", "CPU/round"),
    ("cpu_background_pct", "background"),
    ("rss_median_mb", "RSS median"),
    ("rss_max_mb", "RSS max"),
    ("leader_cpu_round_s", "leader CPU"),
    ("leader_kb_round", "leader kB"),
    ("voter_kb_round", "voter kB"),
    ("connected_s", "restart connected"),
)
"""Figures compared with ``--baseline`` (this version / the baseline's)."""

_RESULT_LINE = re.compile(r"^  (\{'n': .*\})$")


def parse_results(output: str) -> list[dict[str, Any]]:
    """The per-size result dictionaries a bench run printed (``nan``/``inf`` become None)."""
    found = []
    for line in output.splitlines():
        m = _RESULT_LINE.match(line)
        if m:
            text = re.sub(r"\b(nan|inf)\b", "None", m.group(1))
            found.append(ast.literal_eval(text))
    return found


def run_baseline(rev: str, argv: list[str]) -> list[dict[str, Any]]:
    """Run this bench with ``argv`` on the code of git revision ``rev`` (exported into a
    temporary directory; its node processes run from there too) and return its results."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="node-bench-baseline-") as tmp:
        archive = subprocess.run(["git", "-C", str(repo), "archive", rev], check=True,
                                 capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": tmp}
        print(f"baseline {rev}: running the same sizes with its code…", flush=True)
        proc = subprocess.run([sys.executable, "-m", "bench.node_bench", *argv], cwd=tmp,
                              env=env, capture_output=True, text=True)  # fmt: skip
    for line in proc.stdout.splitlines():
        print(f"  [{rev}] {line}")
    return parse_results(proc.stdout)


def report_ratios(rev: str, base: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    """Print this run's figures over the baseline's, per size and Raft timing."""
    print()
    print(f"ratios to {rev} (this version / {rev}, measured in this run; lower is better):")
    old = {(r["n"], r["raft"]): r for r in base if "error" not in r}
    for r in results:
        b = old.get((r["n"], r.get("raft")))
        if b is None or "error" in r:
            print(f"  N={r['n']} {r.get('raft')}: no comparable baseline figures")
            continue
        parts = []
        for key, label in RATIO_KEYS:
            new, prev = r.get(key), b.get(key)
            if isinstance(new, int | float) and isinstance(prev, int | float) and prev > 0:
                parts.append(f"{label} {new:.3g}/{prev:.3g} = x{new / prev:.2f}")
            else:
                shown = f"{new:.3g}" if isinstance(new, int | float) else "-"
                parts.append(f"{label} {shown}/{prev if prev is not None else '-'}")
        print(f"  N={r['n']} {r['raft']}: " + "; ".join(parts))


async def amain(args: argparse.Namespace) -> int:
    results = []
    runs = [(n, "demo") for n in args.sizes] + [(n, "production") for n in args.production]
    for n, raft in runs:
        print(f"running {n} households, {args.rounds} rounds of {args.slot_seconds} s, "
              f"{raft} Raft timing…", flush=True)  # fmt: skip
        deadline = 240 + (args.rounds + 6) * args.slot_seconds
        try:
            results.append(
                await run_size(n, args.rounds, args.slot_seconds, deadline, raft, args.voters)
            )
        except (trio.TooSlowError, RuntimeError, OSError, ExceptionGroup) as exc:
            results.append({"n": n, "raft": raft, "error": describe(exc)})
        for row in results[-1].pop("per_slot", []):
            print(f"  {row}")
        print(f"  {results[-1]}", flush=True)
    report(results)
    if args.baseline_results is not None:
        report_ratios(args.baseline, args.baseline_results, results)
    return 0 if all("error" not in r for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(prog="python -m bench.node_bench")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[5, 10, 20],
        help="sizes to run with the demo's fast Raft timing",
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--slot-seconds", type=int, default=10)
    parser.add_argument("--voters", type=int, default=3)
    parser.add_argument("--production", type=int, nargs="*", default=[10],
                        help="sizes to run again with the production Raft timing (tick 0.25 s,"
                             " heartbeat 1 s) instead of the demo's fast one")  # fmt: skip
    parser.add_argument("--baseline", metavar="REV",
                        help="first run the same sizes with git revision REV's code, then "
                             "print this version's figures over that one's")  # fmt: skip
    args = parser.parse_args(argv)
    args.baseline_results = None
    if args.baseline:
        raw, rest = list(sys.argv[1:] if argv is None else argv), []
        while raw:
            token = raw.pop(0)
            if token == "--baseline":
                raw.pop(0)
            elif not token.startswith("--baseline="):
                rest.append(token)
        args.baseline_results = run_baseline(args.baseline, rest)
    return trio.run(amain, args)


if __name__ == "__main__":
    sys.exit(main())
