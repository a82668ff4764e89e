"""A seeded nemesis for real node processes: faults as data, a runner over the demo grid, checks.

Two halves:

- **The schedule** (pure: no clock, no I/O, randomness only from ``random.Random`` seeded by
  the run's seed): :func:`make_plan` turns ``(seed, duration, grid shape)`` into a
  :class:`Plan`, a tuple of :class:`Step` s, each a gap and one or more :class:`Fault` s
  injected together. The same arguments always give the same plan (:meth:`Plan.to_json` is its
  fingerprint). Within a step, the faults hit distinct households and impair at most a minority
  of the voters (kill, pause, wipe), unless the plan was asked for an ``outage`` (a majority
  of voters killed at once, then restarted).
- **The runner** (:func:`run_plan`): a :class:`~node.tools.demo.Demo` grid (real ``microgrid
  node run`` processes, libp2p on 127.0.0.1, SQLite ledgers, the meter simulator over Modbus
  TCP), waits for the first settled slot, then plays the plan step by step: inject, hold for the
  fault's duration, heal, and wait (bounded) until the grid has recovered: every node answers,
  names the same leader, reports the same height and head, has no block-sync gap, and is at
  least as high as the highest node was when the step healed. A poller records every
  ``(height, head_hash)`` any node reported as applied and every ``(term, leader)`` seen.
  After the last step: one more settled slot on every node, then the nodes are stopped and the
  ledgers checked (:func:`check_ledgers`).

Fault kinds (:class:`Kind`):

========== ================================================================================
kill       SIGKILL a node (``leader``: whoever leads when the step starts), restart it later
kill_write SIGKILL a node just after a slot's settle time, while the ledgers write its block
pause      SIGSTOP a voter for longer than the election timeout, then SIGCONT
wipe       SIGKILL a learner, delete its data directory (ledger and Raft log), restart it
meter      the household's simulated meter stops answering (Modbus), then answers again
outage     (opt-in) SIGKILL a majority of the voters, leader included; restart them
========== ================================================================================

The checks after the run (each failure is a line of :attr:`NemesisResult.failures`):

- every ledger verifies (:func:`node.ledger.verify.verify_ledger`: the hash chain, roots,
  signatures, balances, and the metering conservation of a rules-2 grid);
- the ledgers agree block by block up to the lowest height, and their heights are equal;
- in every ledger the settled slots are contiguous and each settled once;
- every ``(height, head)`` a node reported during the run is that height's block in every
  ledger (a missing height is a *lost record*, a different hash a *divergence*);
- each node's last reported ``(height, head, settled_through)`` is its ledger's;
- money and energy are conserved (every asset's balances sum to zero; energy sold equals
  energy bought in every slot).

``python -m node.testing.nemesis --seed 7 --duration 120`` runs a plan and prints the summary
table (faults by kind, slots settled, elections, recoveries and the longest, divergences, lost
records); ``--soak`` budgets an hour. ``--duration`` is the plan's budget: steps are drawn until
their gaps, faults and a recovery allowance each fill it. A failed run prints its seed and the
command replaying it. docs/reliability.md has the figures measured and what is not covered yet.
A replay repeats the same faults on the same households in the same order with the same
durations; the wall-clock interleaving with the grid's slots is the machine's.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import shutil
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import trio
from sqlalchemy import create_engine, select

from node.ledger import schema as t
from node.ledger.verify import VerifyReport, verify_ledger
from node.tools.demo import Demo, DemoHousehold, DemoSettings

LEADER = "leader"
"""A fault target resolved when the step starts: the node most live nodes name as leader."""


class Kind(StrEnum):
    """What a fault does (module docstring)."""

    KILL = "kill"
    KILL_WRITE = "kill_write"
    PAUSE = "pause"
    WIPE = "wipe"
    METER = "meter"
    OUTAGE = "outage"


DEFAULT_KINDS: tuple[Kind, ...] = (Kind.KILL, Kind.KILL_WRITE, Kind.PAUSE, Kind.WIPE, Kind.METER)
"""Kinds a plan draws from unless told otherwise (``outage`` only when asked for)."""
IMPAIRS_VOTER = frozenset({Kind.KILL, Kind.KILL_WRITE, Kind.PAUSE, Kind.WIPE})
"""Kinds that take a node out of the Raft group while they last."""


class NemesisError(Exception):
    """A plan cannot be made from these arguments (bad grid shape, duration or kinds)."""


@dataclass(frozen=True, slots=True)
class Timing:
    """The grid's timing the plan is drawn against (defaults: the demo's fast Raft timing)."""

    slot_seconds: int = 8
    election_timeout_max_s: float = 3.0
    """Longest randomized election timeout: 2 x 15 ticks x 0.1 s (``DemoSettings``)."""
    recovery_allowance_s: float = 5.0
    """What the plan budgets for a step's recovery (measured: under 3 s on a loaded machine)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: ``kind`` on ``targets`` (household names, or :data:`LEADER`) for
    ``duration_s`` seconds. ``offset_s``: for ``kill_write``, how long after a settle time the
    kill lands."""

    kind: Kind
    targets: tuple[str, ...]
    duration_s: float
    offset_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The fault as plain data."""
        return {"kind": self.kind.value, "targets": list(self.targets),
                "duration_s": self.duration_s, "offset_s": self.offset_s}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Step:
    """Wait ``gap_s`` seconds, then inject ``faults`` together; the step heals when the longest
    has lasted its duration."""

    gap_s: float
    faults: tuple[Fault, ...]

    @property
    def length_s(self) -> float:
        """Gap plus the longest fault."""
        return self.gap_s + max(f.duration_s for f in self.faults)


@dataclass(frozen=True, slots=True)
class Plan:
    """A seeded nemesis plan: the grid's shape and the steps to play."""

    seed: int
    duration_s: float
    nodes: int
    voters: int
    snapshot_entries: int
    """The grid's Raft log compaction interval (small: a wiped learner needs a snapshot and a
    block sync; large: it replays the log from index 1)."""
    kinds: tuple[Kind, ...]
    cover: bool
    timing: Timing
    steps: tuple[Step, ...]

    @property
    def voter_names(self) -> tuple[str, ...]:
        """The genesis voters (the demo's first households)."""
        return tuple(f"h{i + 1}" for i in range(self.voters))

    @property
    def learner_names(self) -> tuple[str, ...]:
        """The genesis learners."""
        return tuple(f"h{i + 1}" for i in range(self.voters, self.nodes))

    def counts(self) -> dict[str, int]:
        """Faults by kind."""
        out: dict[str, int] = defaultdict(int)
        for step in self.steps:
            for f in step.faults:
                out[f.kind.value] += 1
        return dict(out)

    def to_json(self) -> str:
        """The whole plan as canonical JSON (equal plans give equal text)."""
        return json.dumps({
            "seed": self.seed, "duration_s": self.duration_s, "nodes": self.nodes,
            "voters": self.voters, "snapshot_entries": self.snapshot_entries,
            "kinds": [k.value for k in self.kinds], "cover": self.cover,
            "steps": [{"gap_s": s.gap_s, "faults": [f.to_json() for f in s.faults]}
                      for s in self.steps],
        }, sort_keys=True)  # fmt: skip

    def replay_command(self) -> str:
        """The command line that replays this plan."""
        kinds = ",".join(k.value for k in self.kinds)
        return (f"python -m node.testing.nemesis --seed {self.seed} --duration "
                f"{self.duration_s:g} --nodes {self.nodes} --voters {self.voters} "
                f"--kinds {kinds}" + (" --cover" if self.cover else ""))  # fmt: skip


def impaired_voters(step: Step, voters: Sequence[str]) -> int:
    """How many voters ``step`` takes out of the Raft group at once (a :data:`LEADER` target
    counts as a voter of its own)."""
    hit: set[str] = set()
    for f in step.faults:
        if f.kind in IMPAIRS_VOTER or f.kind is Kind.OUTAGE:
            hit.update(x for x in f.targets if x == LEADER or x in voters)
    return len(hit)


def _r(x: float) -> float:
    return round(x, 1)


def _fault(kind: Kind, rng: random.Random, plan_voters: Sequence[str],
           learners: Sequence[str], everyone: Sequence[str], timing: Timing,
           busy: set[str], voter_budget: int) -> Fault | None:  # fmt: skip
    """Draw one fault of ``kind`` on households not in ``busy``, impairing at most
    ``voter_budget`` voters (None when no target fits)."""
    slot = timing.slot_seconds
    free_voters = [v for v in plan_voters if v not in busy]
    free_learners = [x for x in learners if x not in busy]
    if kind is Kind.WIPE:
        # a voter that lost its disk is outside Raft's assumptions (docs/raft.md): learners only
        if not free_learners:
            return None
        return Fault(kind, (rng.choice(free_learners),), _r(rng.uniform(1.0, slot)))
    if kind is Kind.METER:
        free = [x for x in everyone if x not in busy]
        if not free:
            return None
        return Fault(kind, (rng.choice(free),), _r(rng.uniform(slot, 3 * slot)))
    if kind is Kind.OUTAGE:
        need = len(plan_voters) // 2 + 1
        if len(free_voters) < need or LEADER in busy:
            return None
        others = rng.sample([v for v in plan_voters], need - 1)
        return Fault(kind, (LEADER, *sorted(others)), _r(rng.uniform(2.0, slot)))
    if voter_budget <= 0:
        candidates = free_learners if kind in (Kind.KILL, Kind.KILL_WRITE) else []
    else:
        candidates = free_voters + (free_learners if kind is not Kind.PAUSE else [])
        if LEADER not in busy:
            candidates = [LEADER, LEADER, *candidates]  # the leader twice as often
    if not candidates:
        return None
    target = rng.choice(candidates)
    if kind is Kind.PAUSE:
        low = timing.election_timeout_max_s + 1.0
        return Fault(kind, (target,), _r(rng.uniform(low, low + slot)))
    if kind is Kind.KILL_WRITE:
        return Fault(kind, (target,), _r(rng.uniform(1.0, slot)), _r(rng.uniform(0.0, 1.0)))
    return Fault(kind, (target,), _r(rng.uniform(1.0, 1.5 * slot)))


def make_plan(
    seed: int,
    duration_s: float,
    *,
    nodes: int = 4,
    voters: int = 3,
    kinds: Iterable[Kind] = DEFAULT_KINDS,
    cover: bool = False,
    timing: Timing = Timing(),
    max_steps: int | None = None,
) -> Plan:
    """The plan for ``seed``: steps whose budgeted length (gap, longest fault, recovery
    allowance) fits in ``duration_s`` (at least one step). ``cover``: the first steps use
    every kind once, in a seeded order (CI's bounded run sees each kind). Pure: the same
    arguments give the same plan. Raises :class:`NemesisError` for a grid without a voter
    majority to keep, a wipe without learners, or an unknown kind."""
    kinds = tuple(Kind(k) for k in kinds)
    if not kinds:
        raise NemesisError("no fault kinds")
    if voters < 1 or nodes < voters:
        raise NemesisError(f"bad grid: {nodes} nodes, {voters} voters")
    if Kind.WIPE in kinds and nodes == voters:
        raise NemesisError("a wipe needs a learner (nodes > voters)")
    if duration_s <= 0:
        raise NemesisError(f"bad duration {duration_s}")
    duration_s = float(duration_s)
    rng = random.Random(f"nemesis:{seed}")
    plan_voters = [f"h{i + 1}" for i in range(voters)]
    learners = [f"h{i + 1}" for i in range(voters, nodes)]
    everyone = plan_voters + learners
    snapshot_entries = rng.choice((24, 5000))
    minority = (voters - 1) // 2
    queue = list(kinds)
    rng.shuffle(queue)
    if not cover:
        queue = []
    steps: list[Step] = []
    spent = 0.0
    misses = 0
    while max_steps is None or len(steps) < max_steps:
        covering = bool(queue)
        kind = queue.pop(0) if queue else rng.choice(kinds)
        busy: set[str] = set()
        faults: list[Fault] = []
        budget = minority
        first = _fault(kind, rng, plan_voters, learners, everyone, timing, busy, budget)
        if first is None:
            misses += 1
            if misses > 100:
                raise NemesisError(f"no fault of {[k.value for k in kinds]} fits a grid of "
                                   f"{nodes} nodes with {voters} voters without impairing "
                                   f"a majority of them")  # fmt: skip
            continue
        faults.append(first)
        # a second fault alongside, a third of the time, within the voters' bound
        if rng.randrange(3) == 0 and kind is not Kind.OUTAGE:
            busy.update(first.targets)
            budget -= impaired_voters(Step(0, tuple(faults)), plan_voters)
            extra = rng.choice([k for k in kinds if k is not Kind.OUTAGE])
            second = _fault(extra, rng, plan_voters, learners, everyone, timing, busy, budget)
            if second is not None:
                faults.append(second)
        step = Step(_r(rng.uniform(2.0, 1.5 * timing.slot_seconds)), tuple(faults))
        cost = step.length_s + timing.recovery_allowance_s
        if steps and spent + cost > duration_s and not covering:
            break
        steps.append(step)
        spent += cost
    return Plan(
        seed, duration_s, nodes, voters, snapshot_entries, kinds, cover, timing, tuple(steps)
    )


# -- the runner ---------------------------------------------------------------------------------


@dataclass
class Recovery:
    """One step's outcome: when it healed and how long the grid took to recover."""

    step: int
    kinds: tuple[str, ...]
    targets: tuple[str, ...]
    seconds: float | None
    """None: not recovered within the bound."""
    settled_during: int


@dataclass
class Observations:
    """What the poller saw while the plan ran."""

    heads: dict[int, dict[str, set[str]]] = field(default_factory=lambda: defaultdict(dict))
    """height -> head hash -> the nodes that reported it as applied."""
    leaders: set[tuple[int, str]] = field(default_factory=set)
    """(term, leader DID) pairs some node reported."""
    polls: int = 0
    max_height: int = 0

    def record(self, docs: dict[str, dict[str, Any]]) -> None:
        """Note one round of ``/status`` documents."""
        self.polls += 1
        for name, doc in docs.items():
            ledger, raft = doc.get("ledger") or {}, doc.get("raft") or {}
            height, head = ledger.get("height"), ledger.get("head_hash")
            if isinstance(height, int) and height > 0 and isinstance(head, str):
                self.heads[height].setdefault(head, set()).add(name)
                self.max_height = max(self.max_height, height)
            if raft.get("leader") and isinstance(raft.get("term"), int):
                self.leaders.add((raft["term"], raft["leader"]))


@dataclass
class NemesisResult:
    """A run's figures and the checks' failures (empty: passed)."""

    plan: Plan
    failures: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    """Faults injected, by kind (a skipped fault is not counted)."""
    skipped: list[str] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    height: int = 0
    start_height: int = 0
    elections: int = 0
    max_term: int = 0
    divergences: int = 0
    lost_records: int = 0
    observed_heads: int = 0
    wall_s: float = 0.0
    directory: Path | None = None
    events: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed."""
        return not self.failures

    @property
    def longest_recovery_s(self) -> float | None:
        """The slowest recovery (None: none measured)."""
        done = [r.seconds for r in self.recoveries if r.seconds is not None]
        return max(done) if done else None

    def table(self) -> str:
        """The summary table, the verdict, the seed and the replay command."""
        p = self.plan
        lines = [f"nemesis seed {p.seed}: {p.nodes} nodes ({p.voters} voters), "
                 f"{p.timing.slot_seconds} s slots, snapshot every {p.snapshot_entries} "
                 f"entries, {len(p.steps)} steps, {self.wall_s:.0f} s wall"]  # fmt: skip
        lines.append(f"  {'fault kind':<26} {'count':>6}")
        for kind in Kind:
            if kind.value in self.faults:
                lines.append(f"  {kind.value:<26} {self.faults[kind.value]:>6}")
        during = sum(r.settled_during for r in self.recoveries)
        recovered = [r for r in self.recoveries if r.seconds is not None]
        longest = self.longest_recovery_s
        rows = [
            ("slots settled", f"{self.height - self.start_height} (height {self.height})"),
            ("  during faults", str(during)),
            ("elections (leaders seen)", str(self.elections)),
            ("highest term", str(self.max_term)),
            ("recoveries", f"{len(recovered)}/{len(self.recoveries)}"),
            ("longest recovery", "-" if longest is None else f"{longest:.1f} s"),
            ("heads observed", str(self.observed_heads)),
            ("divergences", str(self.divergences)),
            ("lost records", str(self.lost_records)),
        ]
        lines += [f"  {k:<26} {v:>6}" for k, v in rows]
        for r in self.recoveries:
            took = "not recovered" if r.seconds is None else f"{r.seconds:.1f} s"
            lines.append(
                f"    step {r.step}: {'+'.join(r.kinds)} on {','.join(r.targets)}: "
                f"recovered in {took}, {r.settled_during} slots settled during the fault"
            )
        if self.skipped:
            lines.append(f"  skipped: {'; '.join(self.skipped)}")
        if self.ok:
            lines.append(f"PASS seed {p.seed}")
        else:
            lines.append(f"FAIL seed {p.seed}:")
            lines += [f"  - {f}" for f in self.failures]
            if self.directory is not None:
                lines.append(f"  logs and ledgers: {self.directory}")
        lines.append(f"replay: {p.replay_command()}")
        return "\n".join(lines)


RECOVERY_TIMEOUT_S = 150.0
"""How long a step may take to recover before the run is declared failed (a restarted node
imports libp2p and replays its log on a loaded two-core machine)."""
STARTUP_TIMEOUT_S = 150.0
POLL_SECONDS = 1.0


def _household(demo: Demo, name: str) -> DemoHousehold:
    return next(h for h in demo.households if h.name == name)


def _agreed(docs: dict[str, dict[str, Any]], count: int, at_least: int) -> bool:
    """Every node answers, names the same leader, reports one height and head at least
    ``at_least``, and has no block-sync gap."""
    if len(docs) != count:
        return False
    heads = {(d["ledger"]["height"], d["ledger"]["head_hash"]) for d in docs.values()}
    leaders = {d["raft"]["leader"] for d in docs.values()}
    gaps = any(d.get("block_sync", {}).get("missing") for d in docs.values())
    return (len(heads) == 1 and next(iter(heads))[0] >= at_least and len(leaders) == 1
            and None not in leaders and not gaps)  # fmt: skip


class Runner:
    """Plays one :class:`Plan` on a running :class:`Demo`."""

    def __init__(self, demo: Demo, plan: Plan, result: NemesisResult,
                 out: Any = print) -> None:  # fmt: skip
        self.demo = demo
        self.plan = plan
        self.result = result
        self.obs = Observations()
        self.out = out
        self.t0 = time.monotonic()
        self.paused: set[str] = set()
        self.last_docs: dict[str, dict[str, Any]] = {}

    def log(self, text: str) -> None:
        """Note an event (kept in the result; printed by the CLI)."""
        line = f"[{time.monotonic() - self.t0:7.1f}s] {text}"
        self.result.events.append(line)
        self.out(line)

    async def poll(self) -> None:
        """Record every node's status every :data:`POLL_SECONDS` until cancelled."""
        while True:
            docs = await self.demo.statuses()
            self.obs.record(docs)
            self.last_docs = docs
            await trio.sleep(POLL_SECONDS)

    def resolve(self, target: str, docs: dict[str, dict[str, Any]], step: int) -> str:
        """A household name for ``target`` (the current leader for :data:`LEADER`; a seeded
        choice among the voters when there is none)."""
        if target != LEADER:
            return target
        name = self.demo.leader_name(docs)
        if name in self.plan.voter_names:
            return name
        return random.Random(f"nemesis:{self.plan.seed}:{step}").choice(self.plan.voter_names)

    async def _settle_moment(self, offset: float) -> None:
        """Sleep until ``offset`` seconds after the next settle time (a ledger write)."""
        sched = self.demo.schedule
        now = time.time()
        slot = sched.slot_at(now) - 1
        while sched.settle_time(slot) + offset <= now:
            slot += 1
        await trio.sleep(sched.settle_time(slot) + offset - now)

    async def _kill(self, h: DemoHousehold) -> None:
        if h.process is not None and h.alive:
            self.demo.kill(h)
            await h.process.wait()

    async def inject(self, fault: Fault, names: list[str]) -> None:
        """Apply ``fault`` to the households ``names``, hold it for its duration, heal it."""
        demo = self.demo
        hs = [_household(demo, n) for n in names]
        what = f"{fault.kind.value} {','.join(names)} for {fault.duration_s:g}s"
        try:
            if fault.kind is Kind.KILL_WRITE:
                await self._settle_moment(fault.offset_s)
            if fault.kind in (Kind.KILL, Kind.KILL_WRITE, Kind.OUTAGE, Kind.WIPE):
                for h in hs:
                    await self._kill(h)
                if fault.kind is Kind.WIPE:
                    for h in hs:
                        shutil.rmtree(h.directory / "data", ignore_errors=True)
            elif fault.kind is Kind.PAUSE:
                for h in hs:
                    assert h.process is not None
                    h.process.send_signal(signal.SIGSTOP)
                    self.paused.add(h.name)
            elif fault.kind is Kind.METER:
                assert demo.sim is not None
                for h in hs:
                    demo.sim.set_fault(h.device_id, "no_answer")
            self.log(f"inject {what}")
            self.result.faults[fault.kind.value] = self.result.faults.get(fault.kind.value, 0) + 1
            await trio.sleep(fault.duration_s)
        finally:
            with trio.CancelScope(shield=True):
                await self.heal(fault, hs)

    async def heal(self, fault: Fault, hs: list[DemoHousehold]) -> None:
        """Undo ``fault`` on ``hs`` (restart, SIGCONT, meter answers again)."""
        if fault.kind is Kind.PAUSE:
            for h in hs:
                if h.process is not None and h.name in self.paused:
                    h.process.send_signal(signal.SIGCONT)
                    self.paused.discard(h.name)
        elif fault.kind is Kind.METER:
            assert self.demo.sim is not None
            for h in hs:
                self.demo.sim.clear_faults(h.device_id)
        else:
            for h in hs:
                if not h.alive:
                    await self.demo.start_node(h)
        self.log(f"heal {fault.kind.value} {','.join(h.name for h in hs)}")

    async def step(self, index: int, step: Step) -> bool:
        """Play one step; False when the grid did not recover."""
        await trio.sleep(step.gap_s)
        docs = await self.demo.statuses()
        start_height = max((d["ledger"]["height"] for d in docs.values()), default=0)
        plans: list[tuple[Fault, list[str]]] = []
        taken: set[str] = set()
        for fault in step.faults:
            names = list(dict.fromkeys(self.resolve(x, docs, index) for x in fault.targets))
            if fault.kind is Kind.OUTAGE:
                # the leader may be one of the drawn voters: top up to a majority
                need = len(fault.targets)
                names += [v for v in self.plan.voter_names if v not in names]
                names = names[:need]
            if taken & set(names):
                self.result.skipped.append(f"step {index}: {fault.kind.value} on {names} "
                                           f"(the leader was already a target)")  # fmt: skip
                continue
            taken.update(names)
            plans.append((fault, names))
        async with trio.open_nursery() as nursery:
            for fault, names in plans:
                nursery.start_soon(self.inject, fault, names)
        healed_at = time.monotonic()
        docs = await self.demo.statuses()
        top = max([self.obs.max_height] + [d["ledger"]["height"] for d in docs.values()])
        settled = max(0, top - start_height)
        recovered: float | None = None
        with trio.move_on_after(RECOVERY_TIMEOUT_S):
            await self.demo.wait_until(
                lambda d: _agreed(d, len(self.demo.households), top), RECOVERY_TIMEOUT_S + 1
            )
            recovered = time.monotonic() - healed_at
        kinds = tuple(f.kind.value for f, _ in plans)
        targets = tuple(n for _, names in plans for n in names)
        self.result.recoveries.append(Recovery(index, kinds, targets, recovered, settled))
        if recovered is None:
            self.result.failures.append(
                f"step {index} ({', '.join(kinds)} on {', '.join(targets)}): the grid did not "
                f"recover within {RECOVERY_TIMEOUT_S:.0f} s: {self._status_line()}"
            )
            return False
        self.log(f"step {index} recovered in {recovered:.1f}s at height {top}+")
        return True

    def _status_line(self) -> str:
        docs = self.last_docs
        parts = []
        for h in self.demo.households:
            d = docs.get(h.name)
            if d is None:
                parts.append(f"{h.name}: {'no answer' if h.alive else 'down'}")
            else:
                parts.append(f"{h.name}: {d['raft']['role']} height {d['ledger']['height']} "
                             f"commit {d['raft']['commit_index']}")  # fmt: skip
        return "; ".join(parts)

    async def play(self) -> dict[str, dict[str, Any]] | None:
        """Wait for the first settled slot, play every step, then wait for one more settled
        slot on every node right after a settlement; returns the final statuses (None when the
        grid never started or did not recover)."""
        demo, count = self.demo, len(self.demo.households)
        try:
            docs = await demo.wait_until(lambda d: _agreed(d, count, 1), STARTUP_TIMEOUT_S)
        except trio.TooSlowError:
            self.result.failures.append(f"no settled slot on every node within "
                                        f"{STARTUP_TIMEOUT_S:.0f} s of the start")  # fmt: skip
            return None
        self.result.start_height = next(iter(docs.values()))["ledger"]["height"]
        self.log(f"grid up at height {self.result.start_height}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.poll)
            ok = True
            for i, step in enumerate(self.plan.steps):
                if not await self.step(i, step):
                    ok = False
                    break
            final = None
            if ok:
                # one more slot settled everywhere after the last fault: the grid is live
                target = self.obs.max_height + 1
                try:
                    final = await demo.wait_until(lambda d: _agreed(d, count, target),
                                                  RECOVERY_TIMEOUT_S)  # fmt: skip
                except trio.TooSlowError:
                    self.result.failures.append(
                        f"no slot settled on every node after the last step: {self._status_line()}"
                    )
                else:
                    self.obs.record(final)
            nursery.cancel_scope.cancel()
        return final

    async def release(self) -> None:
        """SIGCONT anything still paused (so a stop can reach it)."""
        for name in list(self.paused):
            h = _household(self.demo, name)
            if h.process is not None and h.alive:
                h.process.send_signal(signal.SIGCONT)
            self.paused.discard(name)


# -- the checks ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerRows:
    """What the checks read from one ledger."""

    report: VerifyReport
    blocks: dict[int, tuple[int, str]]
    """height -> (slot, hash)."""
    balance_sums: dict[str, int]
    sold: dict[int, int]
    bought: dict[int, int]


def read_ledger(url: str) -> LedgerRows:
    """Verify the ledger at ``url`` and read its blocks, balances and settlements."""
    report = verify_ledger(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            b = t.blocks.c
            blocks = {int(r.height): (int(r.slot), str(r.hash))
                      for r in conn.execute(select(b.height, b.slot, b.hash))}  # fmt: skip
            sums: dict[str, int] = defaultdict(int)
            for r in conn.execute(select(t.balances.c.asset, t.balances.c.amount)):
                sums[str(r.asset)] += int(r.amount)
            sold: dict[int, int] = defaultdict(int)
            bought: dict[int, int] = defaultdict(int)
            s = t.settlements.c
            for r in conn.execute(select(s.slot, s.sold_wh, s.bought_wh)):
                sold[int(r.slot)] += int(r.sold_wh)
                bought[int(r.slot)] += int(r.bought_wh)
    finally:
        engine.dispose()
    return LedgerRows(report, blocks, dict(sums), dict(sold), dict(bought))


def check_ledgers(
    ledgers: dict[str, LedgerRows],
    observed: dict[int, dict[str, set[str]]],
    reported: dict[str, dict[str, Any]] | None,
    result: NemesisResult,
) -> None:
    """The after-run checks (module docstring); failures and counts go into ``result``."""
    fail = result.failures.append
    for name, lg in ledgers.items():
        r = lg.report
        if not r.ok:
            fail(f"{name}: ledger does not verify: {r.error}")
        elif r.conservation not in ("ok", "skipped"):
            fail(f"{name}: metering conservation {r.conservation}: {r.conservation_note}")
        heights = sorted(lg.blocks)
        if heights != list(range(1, len(heights) + 1)):
            fail(f"{name}: block heights not contiguous from 1: {heights[:3]}..{heights[-3:]}")
        slots = [lg.blocks[h][0] for h in heights]
        twice = sorted({s for s in slots if slots.count(s) > 1})
        if twice:
            fail(f"{name}: slots settled twice: {twice}")
        holes = [(a, b) for a, b in itertools.pairwise(slots) if b != a + 1]
        if holes:
            fail(f"{name}: settled slots not contiguous: {holes[:5]}")
        bad_sums = {a: v for a, v in lg.balance_sums.items() if v != 0}
        if bad_sums:
            fail(f"{name}: balances do not sum to zero: {bad_sums}")
        if lg.sold != lg.bought:
            diff = {
                s: (lg.sold.get(s), lg.bought.get(s))
                for s in set(lg.sold) | set(lg.bought)
                if lg.sold.get(s) != lg.bought.get(s)
            }
            fail(f"{name}: energy sold != bought: {dict(sorted(diff.items())[:5])}")  # fmt: skip
    if not ledgers:
        return
    heights = {n: len(lg.blocks) for n, lg in ledgers.items()}
    result.height = max(heights.values())
    common = min(heights.values())
    if len(set(heights.values())) != 1:
        fail(f"ledger heights differ: {heights}")
    diverged = [h for h in range(1, common + 1)
                if len({lg.blocks.get(h) for lg in ledgers.values()}) != 1]  # fmt: skip
    if diverged:
        fail(f"ledgers diverge at heights {diverged[:10]} (common height {common})")
    result.divergences += len(diverged)
    lost: list[tuple[str, int]] = []
    seen_diverged: list[tuple[str, int]] = []
    for height, hashes in sorted(observed.items()):
        for head in hashes:
            result.observed_heads += 1
            for name, lg in ledgers.items():
                block = lg.blocks.get(height)
                if block is None:
                    lost.append((name, height))
                elif block[1] != head:
                    seen_diverged.append((name, height))
    if lost:
        fail(f"records reported committed are missing from ledgers: {lost[:10]}")
    if seen_diverged:
        fail(f"ledgers differ from heads reported during the run: {seen_diverged[:10]}")
    result.lost_records += len(lost)
    result.divergences += len(seen_diverged)
    for name, doc in (reported or {}).items():
        lg = ledgers.get(name)
        if lg is None:
            continue
        height, head = doc["ledger"]["height"], doc["ledger"]["head_hash"]
        settled = doc["ledger"].get("settled_through")
        block = lg.blocks.get(height)
        if block is None or block[1] != head:
            fail(f"{name} reported height {height} head {head}; its ledger has {block}")
        elif height == len(lg.blocks) and settled is not None and block[0] != settled:
            fail(f"{name} reported settled_through {settled}; its head block is slot {block[0]}")


async def run_plan(
    plan: Plan, directory: Path | None = None, out: Any = print, keep: bool = False
) -> NemesisResult:
    """Run ``plan`` on a fresh demo grid in ``directory`` (a temporary one when None; kept on
    failure or with ``keep``) and check the ledgers; never raises for a failed check."""
    result = NemesisResult(plan)
    started = time.monotonic()
    settings = DemoSettings(
        households=plan.nodes, voters=plan.voters, slot_seconds=plan.timing.slot_seconds,
        dashboard=False, directory=directory, seed=plan.seed,
        raft_snapshot_entries=plan.snapshot_entries,
    )  # fmt: skip
    demo = Demo(settings, out=lambda _line: None)
    result.directory = demo.directory
    runner = Runner(demo, plan, result, out)
    final: dict[str, dict[str, Any]] | None = None
    try:
        try:
            async with demo.running(quiesce_timeout=3 * plan.timing.slot_seconds):
                try:
                    final = await runner.play()
                finally:
                    with trio.CancelScope(shield=True):
                        await runner.release()
        except Exception as exc:  # a harness error is a failed run, with its seed
            result.failures.append(f"run aborted: {exc.__class__.__name__}: {exc}")
        obs = runner.obs
        result.elections = len(obs.leaders)
        result.max_term = max((term for term, _ in obs.leaders), default=0)
        ledgers = {}
        for h in demo.households:
            ledgers[h.name] = await trio.to_thread.run_sync(read_ledger, h.ledger_url)
        check_ledgers(ledgers, obs.heads, final, result)
        result.wall_s = time.monotonic() - started
        return result
    finally:
        if result.ok and not keep:
            demo.close()
        elif demo.sim is not None:
            demo.sim.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI: run (or replay) one seeded plan, print the table; exit 1 on a failed check."""
    ap = argparse.ArgumentParser(description="seeded nemesis over real node processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of faults (default 120; 3600 with --soak)")  # fmt: skip
    ap.add_argument("--soak", action="store_true", help="an hour of faults")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--voters", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(k.value for k in DEFAULT_KINDS),
                    help=f"comma-separated, of: {', '.join(k.value for k in Kind)}")  # fmt: skip
    ap.add_argument("--cover", action="store_true", help="first steps use every kind once")
    ap.add_argument("--dir", type=Path, default=None, help="grid directory (default: temporary)")
    ap.add_argument("--keep", action="store_true", help="keep the grid directory after a pass")
    ap.add_argument("--plan", action="store_true", help="print the plan as JSON and exit")
    args = ap.parse_args(argv)
    duration = args.duration if args.duration is not None else (3600.0 if args.soak else 120.0)
    try:
        kinds = [Kind(k.strip()) for k in args.kinds.split(",") if k.strip()]
        plan = make_plan(args.seed, duration, nodes=args.nodes, voters=args.voters,
                         kinds=kinds, cover=args.cover)  # fmt: skip
    except (ValueError, NemesisError) as exc:
        print(f"nemesis: {exc}", file=sys.stderr)
        return 2
    if args.plan:
        print(plan.to_json())
        return 0
    print(f"nemesis seed {plan.seed}: {len(plan.steps)} steps, faults {plan.counts()}")
    with contextlib.suppress(KeyboardInterrupt):
        result = trio.run(run_plan, plan, args.dir, print, args.keep)
        print(result.table())
        return 0 if result.ok else 1
    print(f"interrupted; replay: {plan.replay_command()}")
    return 130


if __name__ == "__main__":
    sys.exit(main())
