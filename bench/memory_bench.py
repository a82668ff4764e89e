"""Memory benchmark: where a node's resident memory goes (issue 19, "RSS per node").

Figures only; it never fails on size. Three parts:

1. Imports (``--repeat`` runs per step, the median). For each step of ``STEPS`` (the node's
   dependencies and our own packages, in the order ``microgrid node run`` first imports them)
   a fresh interpreter imports that step and every step before it and reads its VmRSS from
   /proc/self/status: "increment" is what the step adds on top of the steps before it (what
   the node pays for it), "alone" what it costs imported on its own into a bare interpreter
   (shared dependencies counted again). ``--modules`` lists the top-level packages each step
   brings in.
2. Packages (``--packages N``, 0 to skip): one fresh interpreter imports the node's modules
   with an import hook that reads RSS before and after each module's body runs, and prints the
   ``N`` top-level packages that own the most of it (a module's own growth, its imports left
   out; rough: a page is counted where it is first touched).
3. A running node (``--slots N [M ...]``, 0 to skip): a demo grid of ``--households``
   households (``node/tools/demo.py``, as ``bench/node_bench.py``; meter simulator, real
   libp2p, Raft, SQLite) runs until every node has seen ``N`` (then ``M``, ...) more slots
   settled, and prints each node's RSS (VmRSS), its peak (VmHWM) and its RSS by kind of
   mapping (/proc/PID/smaps).

The import parts run with ``PYTHONDONTWRITEBYTECODE=1`` (as CI and the demo's nodes in a
source tree): our own modules are compiled from source each time, site-packages use their
``.pyc`` files.

``--progress`` also prints each checkpoint as it is reached (with a timestamp), so a long run
(1,000 slots at 3 s is 50 minutes) leaves its figures even if it is stopped early.

``python -m bench.memory_bench [--repeat 3] [--packages 25] [--slots 2 20] [--households 3]
[--slot-seconds 5] [--modules] [--progress]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STEPS: list[tuple[str, list[str]]] = [
    # (label, modules the step adds), in the order `microgrid node run` first imports them:
    # node/cli/run.py (market, node.setup.config -> meter.transport -> pymodbus), then
    # node/daemon/household_node.py's imports, then what the running node imports later.
    ("python", []),
    ("pydantic", ["pydantic"]),
    ("cryptography (ed25519)", ["cryptography.hazmat.primitives.asymmetric.ed25519"]),
    ("market", ["market", "market.accounting", "market.state", "market.snapshot"]),
    ("pymodbus.client", ["pymodbus.client"]),
    ("node.cli.run, node.setup", ["node.cli.run", "node.setup.config"]),
    ("trio", ["trio"]),
    ("sqlalchemy", ["sqlalchemy"]),
    ("prometheus_client", ["prometheus_client"]),
    ("meter.reader", ["meter.metrics", "meter.reader"]),
    ("h11", ["h11"]),
    ("multiaddr", ["multiaddr"]),
    ("libp2p (package)", ["libp2p"]),
    ("libp2p pubsub, ping, yamux", ["libp2p.pubsub.gossipsub", "libp2p.host.ping"]),
    ("node.ledger, node.raft", ["node.ledger", "node.ledger.queries", "node.raft.storage_sql"]),
    ("node.net", ["node.net.host", "node.net.block_sync"]),
    ("node.daemon", ["node.daemon.household_node", "node.daemon.logs"]),
    ("sqlite dialect (at start)", ["sqlalchemy.dialects.sqlite"]),
]

NODE_MODULES = [m for _label, mods in STEPS for m in mods]

DEV_ONLY = ("rich", "click", "pygments")
"""Installed in the development venv by import-linter, pytest and Dash's Flask, not by a node's
own dependencies; with them present httpx (a dependency of libp2p's AutoTLS) imports its
command-line interface."""

PROBE = """
import os, sys, importlib
for name in filter(None, os.environ.get("MEMORY_BENCH_BLOCK", "").split(",")):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
base = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module(name)
rss = hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        rss = int(line.split()[1])
    elif line.startswith("VmHWM:"):
        hwm = int(line.split()[1])
tops = sorted({m.split(".")[0] for m in set(sys.modules) - base} - set(sys.stdlib_module_names))
print(rss, hwm, " ".join(tops))
"""

PACKAGES = """
import collections, importlib, importlib.abc, sys

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4

stack, own = [[0]], collections.Counter()

class Timed(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner
    def __getattr__(self, name):
        return getattr(self.inner, name)
    def create_module(self, spec):
        return self.inner.create_module(spec)
    def exec_module(self, module):
        stack.append([0])
        before = rss_kb()
        try:
            self.inner.exec_module(module)
        finally:
            grew = rss_kb() - before
            own[module.__name__.split(".")[0]] += grew - stack.pop()[0]
            stack[-1][0] += grew

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = Timed(spec.loader)
                return spec
        return None

sys.meta_path.insert(0, Finder())
for name in sys.argv[1:]:
    importlib.import_module(name)
print(rss_kb())
for name, kb in own.most_common():
    print(name, kb)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def probe(modules: list[str], block: Sequence[str] = ()) -> tuple[float, set[str]]:
    """VmRSS (MB) of a fresh interpreter after importing ``modules``; the non-stdlib top-level
    packages it loaded."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, check=True,
        env={**_env(), "MEMORY_BENCH_BLOCK": ",".join(block)},
    )  # fmt: skip
    rss_kb, _hwm, *tops = out.stdout.split()
    return int(rss_kb) / 1024, set(tops)


def imports(repeat: int, show_modules: bool) -> None:
    """Print the RSS after each cumulative step, its increment, and the step alone."""
    print(f"RSS after importing, a fresh interpreter per step (median of {repeat} runs, MB;")
    print("'alone' is over a bare interpreter)")
    print(f"{'step':<30} {'cumulative':>10} {'increment':>9} {'alone':>7}")
    so_far: list[str] = []
    prev = base = 0.0
    seen: set[str] = set()
    for label, modules in STEPS:
        so_far += modules
        runs = [probe(so_far) for _ in range(repeat)]
        cum = statistics.median(r[0] for r in runs)
        alone = statistics.median(probe(modules)[0] for _ in range(repeat)) if modules else cum
        if not modules:
            base = prev = cum
        print(f"{label:<30} {cum:>10.1f} {cum - prev:>9.1f} {alone - base:>7.1f}")
        if show_modules:
            new = sorted(runs[0][1] - seen)
            seen |= runs[0][1]
            if new:
                print(f"{'':<30}   + {' '.join(new)}")
        prev = cum
    without = statistics.median(probe(so_far, DEV_ONLY)[0] for _ in range(repeat))
    print(f"{'all, without ' + '/'.join(DEV_ONLY):<30} {without:>10.1f} {without - prev:>9.1f}")


def packages(top: int) -> None:
    """Print the top-level packages whose module bodies grew the RSS most, in one import of
    the node's modules."""
    out = subprocess.run(
        [sys.executable, "-c", PACKAGES, *NODE_MODULES], capture_output=True, text=True,
        check=True, env=_env(),
    )  # fmt: skip
    total, *rows = out.stdout.splitlines()
    print(f"\nRSS by the package whose module bodies grew it (MB; total {int(total) / 1024:.1f})")
    pairs = [(name, int(kb) / 1024) for name, kb in (row.split() for row in rows)]
    for name, mb in pairs[:top]:
        print(f"  {name:<24} {mb:5.1f}")
    rest = sum(mb for _name, mb in pairs[top:])
    print(f"  {f'{len(pairs) - top} others':<24} {rest:5.1f}")


async def running(args: argparse.Namespace) -> dict[str, Any]:
    """Run a small demo grid until every node has ``args.slots`` slots settled; per-node RSS."""
    import trio

    from node.tools.demo import Demo, DemoSettings

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.directory or Path(tmp) / "demo"
        demo = Demo(
            DemoSettings(households=args.households, slot_seconds=args.slot_seconds,
                         dashboard=False, directory=directory),
            out=lambda line: None,
        )  # fmt: skip
        try:
            async with demo.running(quiesce_timeout=2 * args.slot_seconds):
                n = len(demo.households)
                out["checkpoints"] = []
                with trio.move_on_after(240 + 3 * max(args.slots) * args.slot_seconds) as scope:
                    # settled_through is a slot number (from the genesis time): wait for one
                    await demo.wait_until(lambda d: len(d) == n and all(
                        doc["raft"]["leader"] and _settled(doc) >= 0 for doc in d.values()),
                        timeout=240)  # fmt: skip
                    docs = await demo.statuses()
                    start = min(_settled(doc) for doc in docs.values())
                    pids = {h.name: h.process.pid for h in demo.households if h.process}
                    for slots in sorted(set(args.slots)):
                        await demo.wait_until(lambda d, k=slots: len(d) == n and all(
                            _settled(doc) >= start + k for doc in d.values()),
                            timeout=240 + 3 * slots * args.slot_seconds)  # fmt: skip
                        out["checkpoints"].append((slots, {
                            name: (*_status_kb(pid), smaps(pid)) for name, pid in pids.items()
                        }))  # fmt: skip
                        if args.progress:
                            print_checkpoint(*out["checkpoints"][-1],
                                             stamp=time.strftime(" (%H:%M:%S)"))  # fmt: skip
                if scope.cancelled_caught:
                    out["error"] = f"the grid did not settle {max(args.slots)} slots in time"
        finally:
            demo.close()
    return out


def _settled(doc: dict[str, Any]) -> int:
    """The last slot a node's status document reports settled (-1 if none)."""
    settled = (doc.get("ledger") or {}).get("settled_through")
    return settled if isinstance(settled, int) else -1


def smaps(pid: int) -> dict[str, float]:
    """A process's RSS (MB) by kind of mapping: the brk heap, other anonymous memory (malloc's
    thread arenas, large allocations, thread stacks), extension modules' and libraries' files,
    other files."""
    out: dict[str, float] = collections.Counter()
    kind = "anon"
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            path = head[5] if len(head) > 5 else ""
            if path == "[heap]":
                kind = "heap"
            elif not path or path.startswith("["):
                kind = "anon"
            elif ".so" in path:
                kind = "libraries"
            else:
                kind = "files"
        elif head and head[0] == "Rss:":
            out[kind] += int(head[1]) / 1024
    return out


def _status_kb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB, or (nan, nan) once it has gone."""
    values = {"VmRSS:": float("nan"), "VmHWM:": float("nan")}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in values:
                values[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return values["VmRSS:"], values["VmHWM:"]


def print_checkpoint(
    slots: int, nodes: dict[str, tuple[float, float, dict[str, float]]], stamp: str = ""
) -> None:
    """Print one checkpoint of :func:`running`: each node's RSS, peak and mappings, the median."""
    print(f"  after {slots} settled slots{stamp}:")
    for name, (rss, hwm, maps) in sorted(nodes.items()):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(maps.items()))
        print(f"    {name:<6} RSS {rss:6.1f}  peak {hwm:6.1f}  ({parts})")
    rss_all = [v[0] for v in nodes.values()]
    print(f"    median RSS {statistics.median(rss_all):.1f}, max {max(rss_all):.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_bench", description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="runs per import step (median)")
    parser.add_argument("--modules", action="store_true", help="list new top-level packages")
    parser.add_argument("--packages", type=int, default=25, help="packages to list; 0: skip")
    parser.add_argument(
        "--slots",
        type=int,
        nargs="+",
        default=[2],
        help="report RSS after each of these numbers of settled slots; 0: skip",
    )
    parser.add_argument("--households", type=int, default=3)
    parser.add_argument("--slot-seconds", type=int, default=5)
    parser.add_argument("--directory", type=Path, help="keep the demo's files (node.log) here")
    parser.add_argument("--no-imports", action="store_true", help="only the running node")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="also print each checkpoint as it is reached (a long run's figures survive a kill)",
    )
    args = parser.parse_args(argv)
    if not args.no_imports:
        imports(args.repeat, args.modules)
        if args.packages > 0:
            packages(args.packages)
    if max(args.slots) > 0:
        import trio

        r = trio.run(running, args)
        print(
            f"\nrunning demo: {args.households} households, {args.slot_seconds} s slots "
            f"(MB; anon: Python objects, malloc arenas, stacks; libraries: .so files)"
        )
        if "error" in r:
            print(f"  {r['error']}")
        for slots, nodes in r.get("checkpoints", []):
            print_checkpoint(slots, nodes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
