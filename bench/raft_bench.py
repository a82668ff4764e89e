"""Raft benchmark (issue 4): committed entries/s and commit latency, with pysyncobj as peer.

What it measures, all in one run:

1. Our Raft core (``node.raft``) as an in-process cluster of 3 and 5 nodes, messages
   delivered in memory, with ``MemoryStorage`` and with ``SQLStorage`` (SQLite files, WAL,
   synchronous=FULL, one transaction per Ready, so a commit waits for fsyncs on a majority),
   batch sizes 1 and 64. Closed loop: the client proposes a batch at the leader and waits
   until the leader has applied it; commit latency is that wait.
2. The same workload on pysyncobj (PyPI ``pysyncobj``), a threaded Raft library, with 3
   and 5 nodes on loopback TCP (127.0.0.1 only) in this process: a ``@replicated`` method
   called ``batch`` times, waiting for the last callback. pysyncobj keeps its log in memory
   (its optional file journal is not fsynced, so there is no durable peer to compare the
   SQLite figures with). Ratios are ours / pysyncobj, same nodes and batch size.

The in-process cluster has no network or thread hand-off costs that pysyncobj pays, so the
ratio bounds what the core costs, not what a deployed node will reach. Every measurement is
bounded by a count and a time budget (``--seconds``, default 2 s). Exits 0 unless a cluster
fails to elect a leader.

Run from the repository root: ``python -m bench.raft_bench`` or ``python bench/raft_bench.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.raft import Config, MemoryStorage, RaftNode, Storage
from node.raft.storage_sql import SQLStorage
from node.tools.ports import free_ports

PAYLOAD = b"x" * 32


@dataclass
class Result:
    """One measurement."""

    name: str
    nodes: int
    batch: int
    entries: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        """Committed entries per second."""
        return self.entries / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """A printable row."""
        lat = sorted(self.latencies)
        p50 = lat[len(lat) // 2] * 1e3 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else float("nan")
        mean = statistics.fmean(lat) * 1e3 if lat else float("nan")
        return (
            f"{self.name:<22} n={self.nodes} batch={self.batch:<3} {self.rate:>10.0f} entries/s"
            f"   latency ms: mean {mean:7.3f}  p50 {p50:7.3f}  p99 {p99:7.3f}"
            f"   ({self.entries} entries)"
        )


class InProcessCluster:
    """Our RaftNodes wired together in memory; persists every Ready before sending."""

    def __init__(self, n: int, make_storage: Callable[[str], Storage]) -> None:
        self.ids = [f"n{i}" for i in range(1, n + 1)]
        self.storages = {i: make_storage(i) for i in self.ids}
        self.nodes = {
            i: RaftNode(Config(id=i, voters=tuple(self.ids), seed=1), self.storages[i])
            for i in self.ids
        }
        self.queue: deque = deque()
        self.applied = dict.fromkeys(self.ids, 0)

    def pump(self) -> None:
        """Run until no node has work and no message is in flight."""
        while True:
            busy = False
            for nid, node in self.nodes.items():
                if not node.has_ready():
                    continue
                busy = True
                rd = node.ready()
                st = self.storages[nid]
                save = getattr(st, "save_ready", None)
                if save is not None:
                    save(rd)
                else:
                    if rd.snapshot is not None:
                        st.apply_snapshot(rd.snapshot)
                    st.append(rd.entries)
                    if rd.hard_state is not None:
                        st.set_hard_state(rd.hard_state)
                self.queue.extend(rd.messages)
                if rd.committed_entries:
                    self.applied[nid] = rd.committed_entries[-1].index
                node.advance(rd)
            while self.queue:
                busy = True
                m = self.queue.popleft()
                self.nodes[m.to].step(m)
            if not busy:
                return

    def elect(self) -> str:
        """Make n1 the leader."""
        self.nodes["n1"].campaign()
        self.pump()
        if self.nodes["n1"].role != "leader":
            raise RuntimeError("no leader")
        return "n1"


def bench_ours(
    name: str, n: int, batch: int, make_storage: Callable[[str], Storage], seconds: float
) -> Result:
    """Closed-loop proposals of ``batch`` entries on an in-process cluster."""
    c = InProcessCluster(n, make_storage)
    lead = c.elect()
    node = c.nodes[lead]
    lat: list[float] = []
    entries = 0
    max_batches = 20000 // batch + 50
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and len(lat) < max_batches:
        t0 = time.perf_counter()
        idx = node.propose_batch([PAYLOAD] * batch)
        c.pump()
        if c.applied[lead] < idx:
            raise RuntimeError("batch not committed")
        lat.append(time.perf_counter() - t0)
        entries += batch
    return Result(name, n, batch, entries, time.perf_counter() - start, lat)


class _BatchWaiter:
    """Counts pysyncobj callbacks down to zero (they run on pysyncobj's thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.left = 0

    def reset(self, n: int) -> None:
        self.left = n
        self.done.clear()

    def callback(self, _result: object, _error: object) -> None:
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.done.set()


def bench_pysyncobj(n: int, batch: int, seconds: float) -> Result | str:
    """The same workload on pysyncobj over loopback TCP; returns a reason if unavailable."""
    try:
        from pysyncobj import SyncObj, SyncObjConf, replicated
    except ImportError:
        return "pysyncobj not installed (pip install pysyncobj)"

    class Log(SyncObj):  # type: ignore[misc]
        def __init__(self, addr: str, partners: list[str]) -> None:
            conf = SyncObjConf(
                raftMinTimeout=0.1,
                raftMaxTimeout=0.3,
                appendEntriesPeriod=0.005,
                dynamicMembershipChange=False,
                autoTickPeriod=0.001,  # its default 50 ms tick would dominate latency
            )
            super().__init__(addr, partners, conf)
            self.count = 0

        @replicated
        def add(self, data: bytes) -> int:
            self.count += 1
            return self.count

    addrs = [f"127.0.0.1:{p}" for p in free_ports(n)]
    objs = [Log(a, [b for b in addrs if b != a]) for a in addrs]
    try:
        deadline = time.monotonic() + 15
        leader = None
        while time.monotonic() < deadline and leader is None:
            time.sleep(0.05)
            lead = objs[0]._getLeader()
            if lead is not None and all(o._getLeader() == lead for o in objs):
                leader = next((o for o in objs if o.selfNode.address == str(lead.address)), None)
        if leader is None:
            return "pysyncobj elected no leader within 15 s"
        lat: list[float] = []
        entries = 0
        max_batches = 20000 // batch + 50
        start = time.perf_counter()
        waiter = _BatchWaiter()
        while time.perf_counter() - start < seconds and len(lat) < max_batches:
            waiter.reset(batch)
            t0 = time.perf_counter()
            for _ in range(batch):
                leader.add(PAYLOAD, callback=waiter.callback)
            if not waiter.done.wait(10):
                return "pysyncobj stalled"
            lat.append(time.perf_counter() - t0)
            entries += batch
        return Result("pysyncobj (memory)", n, batch, entries, time.perf_counter() - start, lat)
    finally:
        for o in objs:
            o.destroy()
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and print figures and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time budget per measurement")
    ap.add_argument("--nodes", type=int, nargs="*", default=[3, 5])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    args = ap.parse_args(argv)
    print("Raft benchmark: closed loop, one batch in flight; commit = applied at the leader")
    ours: dict[tuple[str, int, int], Result] = {}
    with tempfile.TemporaryDirectory(prefix="raft-bench-") as tmp:
        for n in args.nodes:
            for batch in args.batches:
                r = bench_ours(
                    "ours MemoryStorage", n, batch, lambda _i: MemoryStorage(), args.seconds
                )
                ours[("mem", n, batch)] = r
                print(r.line(), flush=True)
                d = Path(tmp) / f"n{n}b{batch}"
                d.mkdir()
                r = bench_ours(
                    "ours SQLite (FULL)",
                    n,
                    batch,
                    lambda i, d=d: SQLStorage(f"sqlite:///{d / i}.db"),
                    args.seconds,
                )
                ours[("sql", n, batch)] = r
                print(r.line(), flush=True)
    print("\nReference: pysyncobj on 127.0.0.1 loopback TCP, same workload")
    for n in args.nodes:
        for batch in args.batches:
            ref = bench_pysyncobj(n, batch, args.seconds)
            if isinstance(ref, str):
                print(f"pysyncobj n={n} batch={batch}: skipped: {ref}")
                continue
            print(ref.line(), flush=True)
            for kind, label in (("mem", "MemoryStorage"), ("sql", "SQLite")):
                mine = ours.get((kind, n, batch))
                if mine is not None and ref.rate > 0:
                    print(
                        f"    ratio ours {label} / pysyncobj: {mine.rate / ref.rate:6.2f}x "
                        f"throughput, {statistics.fmean(mine.latencies) * 1e3:.3f} ms vs "
                        f"{statistics.fmean(ref.latencies) * 1e3:.3f} ms mean latency"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
