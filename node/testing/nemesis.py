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
partition  cut a node or a minority (the leader too) off from every other node, both ways
loss       drop 30-100 % of one node's packets to another (one way), then stop dropping
disk_full  fill a node's small tmpfs data directory with a ballast file; delete it; restart
           the node if it stopped
torn_page  SIGKILL a node, cut its last page (or part of it, or a WAL's last frame) off one of
           its SQLite files, restart it; a refusal to start is healed (learner: wiped; voter:
           its ledger moved aside, rebuilt from its Raft log)
skew       restart a node (the leader as often as not) with its wall clock 60-300 s off
           (``MICROGRID_CLOCK_OFFSET_SECONDS``), then restart it with the right time; it must
           say it is skewed, lead no longer than a bound, and no gate closes early
jump       step a *running* node's wall clock (the leader as often as not) 60-300 s
           through its test-only faults file (``clock_offset_seconds``), then set it right:
           it must say it is skewed, a leader must hand over within a bound, and no gate
           closes early
========== ================================================================================

``partition`` and ``loss`` run every node in a network namespace of its own, on a bridge, with
nftables drop rules (:class:`NetLab`); where namespaces cannot be made (or with
``--net-faults libp2p``), they go through the nodes' test-only libp2p fault injector instead
(:class:`InjectorLab`: a faults file per node, ``MICROGRID_FAULTS_FILE``, node/net/faults.py).
``disk_full`` mounts its targets' data directories as small tmpfs before the start
(:class:`DiskLab`). Where this machine cannot (not root, no tmpfs; ``--net-faults netns``
without namespaces), those faults are skipped and the reason printed. The newer
kinds are opt-in (``--kinds``, :data:`EXTENDED_KINDS`; ``--kinds extended``, every kind but
``outage``): default plans are unchanged.

The checks after the run (each failure is a line of :attr:`NemesisResult.failures`):

- every ledger verifies (:func:`node.ledger.verify.verify_ledger`: the hash chain, roots,
  signatures, balances, and the metering conservation of a rules-2 grid);
- the ledgers agree block by block up to the lowest height, and their heights are equal;
- in every ledger the settled slots are contiguous and each settled once;
- every ``(height, head)`` a node reported during the run is that height's block in every
  ledger (a missing height is a *lost record*, a different hash a *divergence*);
- each node's last reported ``(height, head, settled_through)`` is its ledger's;
- money and energy are conserved (every asset's balances sum to zero; energy sold equals
  energy bought in every slot);
- no gate closed early by a right clock: every gate closure a node with a right clock applied
  (``/status`` ``slot_times``) is at or after its gate time, and none counted an early one
  (:func:`check_gate_times`).

A ``skew`` step also checks, while the node runs skewed (:class:`SkewWatch`): its ``/status``
says ``clock.skewed``; it leads at most :data:`SKEW_LEAD_BOUND_S` at a stretch; if it was the
leader, the others name another one within that bound. A ``skew`` restarts its node, so a
skewed leader never goes on leading; a ``jump`` (:class:`JumpWatch`) moves the clock of the node
as it runs (every node then follows a faults file, :class:`InjectorLab`), so a leader has to
see its own clock jump and hand over (Raft leader transfer): recorded are when its ``/status``
said ``clock.skewed``, how long until the others named another leader (at most
:data:`SKEW_LEAD_BOUND_S`), how long it led meanwhile, and whether any node with a right clock
applied a gate closure before its gate time meanwhile (none may). A leader with no other voter
to hand over to (:func:`sole_voter_jump_plan`, ``--sole-voter-jump``: one voter and learners,
which :func:`make_plan` never draws) must instead hold: no node may apply any gate closure
while its clock is off, and the grid must settle the held slots once it is right.

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
import errno
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import trio
from sqlalchemy import create_engine, select

from market.schedule import Schedule
from node.ledger import schema as t
from node.ledger.verify import VerifyReport, verify_ledger
from node.net.faults import FAULTS_FILE_ENV, NO_FAULTS, FaultRules, write_rules
from node.tools.demo import Demo, DemoHousehold, DemoSettings, fetch

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
    PARTITION = "partition"
    LOSS = "loss"
    DISK_FULL = "disk_full"
    TORN_PAGE = "torn_page"
    SKEW = "skew"
    JUMP = "jump"


DEFAULT_KINDS: tuple[Kind, ...] = (Kind.KILL, Kind.KILL_WRITE, Kind.PAUSE, Kind.WIPE, Kind.METER)
"""Kinds a plan draws from unless told otherwise (``outage`` only when asked for)."""
NETWORK_KINDS: tuple[Kind, ...] = (Kind.PARTITION, Kind.LOSS)
"""Kinds that need one network namespace per node (:class:`NetLab`) or, where there is none, the
nodes' libp2p fault injector (:class:`InjectorLab`)."""
STORAGE_KINDS: tuple[Kind, ...] = (Kind.DISK_FULL, Kind.TORN_PAGE)
"""Kinds that hit a node's data directory (``disk_full`` needs a tmpfs mount: root)."""
EXTENDED_KINDS: tuple[Kind, ...] = (
    DEFAULT_KINDS + NETWORK_KINDS + STORAGE_KINDS + (Kind.SKEW, Kind.JUMP)
)
"""Every kind except the opt-in ``outage`` (the soak's mix; ``jump`` joined it last, so a plan
of the kinds before it, listed by name, draws as it did)."""
NOT_YET: dict[Kind, str] = {}
"""Kinds named but not implemented, with why (a plan asking for one is refused): none now."""
IMPAIRS_VOTER = frozenset({Kind.KILL, Kind.KILL_WRITE, Kind.PAUSE, Kind.WIPE, Kind.PARTITION,
                           Kind.DISK_FULL, Kind.TORN_PAGE, Kind.SKEW, Kind.JUMP})  # fmt: skip
"""Kinds that take a node out of the Raft group while they last (a ``loss`` impairs one end of
its link: :func:`impaired_voters`)."""
TORN_FILES_LEARNER = ("raft.db", "raft.db-wal", "ledger.db", "ledger.db-wal")
"""Files a ``torn_page`` may cut on a learner."""
TORN_FILES_VOTER = ("ledger.db", "ledger.db-wal")
"""Files a ``torn_page`` may cut on a voter: the ledger only. A voter's Raft log losing its last
(acknowledged) transaction is outside Raft's assumptions, like a wiped voter (docs/raft.md)."""
SKEW_MIN_S = 60.0
SKEW_MAX_S = 300.0
"""A ``skew`` shifts the node's wall clock by 60-300 s, ahead or behind: minutes, far beyond
the bound (``clock_max_skew_seconds``, 5 s), yet within the slot horizons a clock error of an
unsynchronised machine reaches in a day."""
CLOCK_OFFSET_ENV = "MICROGRID_CLOCK_OFFSET_SECONDS"
NET_FAULT_MODES = ("auto", "netns", "libp2p")
"""How ``partition`` and ``loss`` are injected: ``netns``: nftables in per-node network
namespaces (:class:`NetLab`; skipped where there are none); ``libp2p``: the nodes' test-only
fault injector (:class:`InjectorLab`, ``MICROGRID_FAULTS_FILE``); ``auto``: namespaces where
this machine can make them, else the injector."""
"""The node's test-only wall-clock offset (``clock_offset_seconds``; docs/node.md, "Clocks")."""


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
    kill lands. ``percent``: a ``loss``'s drop rate (targets ``(A, B)``: A's packets to B).
    ``file`` and ``cut_bytes``: which file of the data directory a ``torn_page`` cuts, and how
    many bytes off its end (0: the whole last page, or the last frame of a ``-wal``). A
    ``partition``'s targets are the side cut off from every other household, both ways.
    ``skew_s``: a ``skew``'s or ``jump``'s clock offset (positive: the node's clock runs
    ahead)."""

    kind: Kind
    targets: tuple[str, ...]
    duration_s: float
    offset_s: float = 0.0
    percent: int = 0
    file: str = ""
    cut_bytes: int = 0
    skew_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The fault as plain data (the newer kinds' fields only where set)."""
        doc: dict[str, Any] = {
            "kind": self.kind.value, "targets": list(self.targets),
            "duration_s": self.duration_s, "offset_s": self.offset_s,
        }  # fmt: skip
        if self.percent:
            doc["percent"] = self.percent
        if self.file:
            doc["file"] = self.file
            doc["cut_bytes"] = self.cut_bytes
        if self.skew_s:
            doc["skew_s"] = self.skew_s
        return doc


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
    sole_voter_jump: bool = False
    """Made by :func:`sole_voter_jump_plan` (not :func:`make_plan`): the one step jumps the
    clock of the grid's only voter, which has no one to hand over to."""

    @property
    def voter_names(self) -> tuple[str, ...]:
        """The genesis voters (the demo's first households)."""
        return tuple(f"h{i + 1}" for i in range(self.voters))

    @property
    def learner_names(self) -> tuple[str, ...]:
        """The genesis learners."""
        return tuple(f"h{i + 1}" for i in range(self.voters, self.nodes))

    @property
    def disk_targets(self) -> tuple[str, ...]:
        """Households a ``disk_full`` hits: their data directories are small tmpfs mounts."""
        return tuple(sorted({x for s in self.steps for f in s.faults
                             if f.kind is Kind.DISK_FULL for x in f.targets}))  # fmt: skip

    @property
    def needs_netlab(self) -> bool:
        """A ``partition`` or ``loss`` is planned: the nodes run in network namespaces (or
        follow a libp2p faults file each: :class:`InjectorLab`)."""
        return any(f.kind in NETWORK_KINDS for s in self.steps for f in s.faults)

    @property
    def needs_faults_files(self) -> bool:
        """A ``jump`` is planned: every node follows a faults file (:class:`InjectorLab`)."""
        return any(f.kind is Kind.JUMP for s in self.steps for f in s.faults)

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
        } | ({"sole_voter_jump": True} if self.sole_voter_jump else {}),
            sort_keys=True)  # fmt: skip

    def replay_command(self) -> str:
        """The command line that replays this plan."""
        if self.sole_voter_jump:
            return (f"python -m node.testing.nemesis --sole-voter-jump --seed {self.seed} "
                    f"--nodes {self.nodes}")  # fmt: skip
        kinds = ",".join(k.value for k in self.kinds)
        return (f"python -m node.testing.nemesis --seed {self.seed} --duration "
                f"{self.duration_s:g} --nodes {self.nodes} --voters {self.voters} "
                f"--kinds {kinds}" + (" --cover" if self.cover else ""))  # fmt: skip


def impaired_voters(step: Step, voters: Sequence[str]) -> int:
    """How many voters ``step`` takes out of the Raft group at once (a :data:`LEADER` target
    counts as a voter of its own; a ``loss`` counts one end of its link, the receiving one if it
    is a voter: TCP over a lossy one-way path degrades the link both ways, never more)."""
    hit: set[str] = set()
    for f in step.faults:
        if f.kind in IMPAIRS_VOTER or f.kind is Kind.OUTAGE:
            hit.update(x for x in f.targets if x == LEADER or x in voters)
        elif f.kind is Kind.LOSS:
            ends = [x for x in reversed(f.targets) if x == LEADER or x in voters]
            hit.update(ends[:1])
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
    if kind in (Kind.PARTITION, Kind.LOSS, Kind.DISK_FULL, Kind.TORN_PAGE, Kind.SKEW, Kind.JUMP):
        return _newer_fault(kind, rng, free_voters, free_learners, timing, busy, voter_budget)
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


def _newer_fault(kind: Kind, rng: random.Random, free_voters: list[str],
                 free_learners: list[str], timing: Timing, busy: set[str],
                 voter_budget: int) -> Fault | None:  # fmt: skip
    """:func:`_fault` for ``partition``, ``loss``, ``disk_full``, ``torn_page``, ``skew`` and
    ``jump``."""
    slot = timing.slot_seconds
    leader_free = LEADER not in busy
    if kind in (Kind.JUMP, Kind.SKEW):
        # like a kill: the leader twice as often as another voter; a learner without a budget.
        # A skew lasts long enough to restart, compare clocks with the peers and be seen
        # skewed; a jump at least until the node said it is skewed and, a leader, handed over
        # (the runner waits, bounded, for both)
        pool = free_learners + (free_voters if voter_budget > 0 else [])
        if voter_budget > 0 and leader_free:
            pool = [LEADER, LEADER, *pool]
        if not pool:
            return None
        target = rng.choice(pool)
        skew = _r(rng.uniform(SKEW_MIN_S, SKEW_MAX_S)) * rng.choice((1, -1))
        low, high = (0.5, 1.5) if kind is Kind.JUMP else (2.0, 3.0)
        return Fault(kind, (target,), _r(rng.uniform(low * slot, high * slot)), skew_s=skew)
    if kind is Kind.PARTITION:
        # a minority side: up to voter_budget voters (the leader as often as not), maybe a learner
        side: list[str] = []
        if voter_budget > 0 and (free_voters or leader_free):
            n = rng.randint(1, voter_budget)
            if leader_free and rng.random() < 0.5:
                side = [LEADER, *rng.sample(free_voters, min(n - 1, len(free_voters)))]
            else:
                side = rng.sample(free_voters, min(n, len(free_voters)))
        if free_learners and (not side or rng.random() < 0.5):
            side.append(rng.choice(free_learners))
        if not side:
            return None
        low = timing.election_timeout_max_s + 1.0  # the cut-off leader is replaced
        return Fault(kind, tuple(side), _r(rng.uniform(low, 1.5 * slot)))
    if kind is Kind.LOSS:
        # one-way loss from a to b; a voter at either end counts as one impaired voter
        pool = free_learners + (free_voters if voter_budget > 0 else [])
        if voter_budget > 0 and leader_free:
            pool = [LEADER, *pool]
        if len(pool) < 2:
            return None
        a, b = rng.sample(pool, 2)
        if voter_budget <= 0 and (a == LEADER or b == LEADER):
            return None
        percent = rng.choice((30, 50, 70, 100))
        return Fault(kind, (a, b), _r(rng.uniform(3.0, 1.5 * slot)), percent=percent)
    if kind is Kind.DISK_FULL:
        # a named household (its data directory is mounted small before the start); long
        # enough for a settlement to be written while the disk is full
        pool = free_learners + (free_voters if voter_budget > 0 else [])
        if not pool:
            return None
        return Fault(kind, (rng.choice(pool),), _r(rng.uniform(slot, 1.5 * slot)))
    # torn page: a learner (any of its files) or a voter (its ledger only)
    pool = free_learners + (free_voters if voter_budget > 0 else [])
    if voter_budget > 0 and leader_free:
        pool = [LEADER, *pool]
    if not pool:
        return None
    target = rng.choice(pool)
    files = TORN_FILES_LEARNER if target in free_learners else TORN_FILES_VOTER
    cut = rng.choice((0, rng.randint(1, 4095)))
    return Fault(kind, (target,), _r(rng.uniform(1.0, 0.5 * slot)), file=rng.choice(files),
                 cut_bytes=cut)  # fmt: skip


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
    for k in kinds:
        if k in NOT_YET:
            raise NemesisError(f"{k.value}: {NOT_YET[k]}")
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


SOLE_VOTER_HOLD_SLOTS = 1.0
"""How long :func:`sole_voter_jump_plan` keeps the sole voter's clock off, in slots: a gate time
and a settle time (one of each per slot) pass by the right clocks meanwhile."""


def sole_voter_jump_plan(seed: int, *, nodes: int = 3, timing: Timing = Timing()) -> Plan:
    """A grid of one voter and ``nodes - 1`` learners (a tiny neighbourhood) whose voter, the
    leader, gets its running clock jumped 60-300 s *ahead* (seeded) for
    :data:`SOLE_VOTER_HOLD_SLOTS` slots, then set right. :func:`make_plan` never draws this: a
    plan impairs at most a minority of the voters, none of one. What it shows
    (:class:`JumpWatch` ``alone``): the voter says it is skewed (its learners' clocks outvote
    its own: two of them at least), closes no gate and settles nothing while its clock is off
    (no voter to hand over to), and the grid settles every held slot once the clock is right.
    Pure, like :func:`make_plan`."""
    if nodes < 3:
        raise NemesisError(f"a sole voter's clock is outvoted by two learners at least, not "
                           f"{nodes - 1}")  # fmt: skip
    rng = random.Random(f"nemesis:sole-voter-jump:{seed}")
    skew = _r(rng.uniform(SKEW_MIN_S, SKEW_MAX_S))
    hold = _r(SOLE_VOTER_HOLD_SLOTS * timing.slot_seconds)
    step = Step(_r(rng.uniform(1.0, 3.0)), (Fault(Kind.JUMP, (LEADER,), hold, skew_s=skew),))
    return Plan(seed, step.length_s + timing.recovery_allowance_s, nodes, 1, 5000, (Kind.JUMP,),
                True, timing, (step,), sole_voter_jump=True)  # fmt: skip


# -- the environment: network namespaces and small disks ----------------------------------------


class LabUnavailable(Exception):
    """This machine cannot host a kind of fault (no root, no ``ip``/``nft``, no namespaces, no
    tmpfs mount); the message says why. The runner skips those faults and prints it."""


LAB_COMMAND_TIMEOUT_S = 10.0
"""Every ``ip``/``nft``/``mount`` command is bounded by this."""
NETNS_PATTERN = re.compile(r"^nem([0-9a-f]+)-h\d+$")
BRIDGE_PATTERN = re.compile(r"^nem([0-9a-f]+)br$")


def _cmd(args: Sequence[str], stdin: str | None = None) -> str:
    """Run one bounded command; raise :class:`LabUnavailable` with its error on failure."""
    try:
        done = subprocess.run(list(args), input=stdin, capture_output=True, text=True,
                              timeout=LAB_COMMAND_TIMEOUT_S, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabUnavailable(f"{' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        raise LabUnavailable(f"{' '.join(args)}: exit {done.returncode}: "
                             f"{(done.stderr or done.stdout).strip()[:300]}")  # fmt: skip
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NetLab:
    """One network namespace per household, joined by a bridge in the root namespace.

    Household ``i`` runs in namespace ``nem<tag>-h<i+1>`` (``<tag>``: this process's pid in
    hex) with address ``10.77.<n>.<i+2>`` on a veth ``nem<tag>v<i>`` into bridge ``nem<tag>br``
    (``10.77.<n>.1``: the
    meter simulator and the runner, which reaches every node's API through it). Each namespace
    holds an nftables table ``inet nemesis`` with an ``out`` (output hook) and an ``in`` (input
    hook) chain; faults add drop rules there and healing flushes them. :meth:`teardown` removes
    everything (it never raises); :meth:`setup` first removes what an earlier run whose process
    is gone left behind (same names, a dead pid)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.tag = f"{os.getpid():x}"
        self.subnet: int | None = None
        self.namespaces: list[str] = []
        """Namespaces created (and so to delete)."""
        self.bridge_made = False

    @property
    def bridge(self) -> str:
        """The bridge's interface name (at most 15 characters)."""
        return f"nem{self.tag}br"

    def namespace(self, i: int) -> str:
        """Household ``i``'s namespace."""
        return f"nem{self.tag}-h{i + 1}"

    def host(self, i: int) -> str:
        """Household ``i``'s address."""
        return f"10.77.{self.subnet}.{i + 2}"

    def veth(self, i: int) -> str:
        """The root namespace's end of household ``i``'s veth pair."""
        return f"nem{self.tag}v{i}"

    @property
    def gateway(self) -> str:
        """The bridge's address (simulator and runner)."""
        return f"10.77.{self.subnet}.1"

    def prefix(self, i: int) -> tuple[str, ...]:
        """The command prefix running a process in household ``i``'s namespace (``ip netns
        exec`` execs the command: the process keeps its pid, so signals reach the node)."""
        return ("ip", "netns", "exec", self.namespace(i))

    @staticmethod
    def remove_stale() -> list[str]:
        """Delete namespaces and bridges of earlier runs whose process is gone; their names."""
        removed: list[str] = []
        with contextlib.suppress(LabUnavailable):
            for line in _cmd(["ip", "netns", "list"]).splitlines():
                name = line.split()[0] if line.split() else ""
                m = NETNS_PATTERN.match(name)
                if m and int(m.group(1), 16) != os.getpid() and not _pid_alive(int(m.group(1), 16)):
                    with contextlib.suppress(LabUnavailable):
                        _cmd(["ip", "netns", "del", name])
                        removed.append(name)
            for line in _cmd(["ip", "-o", "link", "show", "type", "bridge"]).splitlines():
                parts = line.split(":")
                name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
                m = BRIDGE_PATTERN.match(name)
                if m and int(m.group(1), 16) != os.getpid() and not _pid_alive(int(m.group(1), 16)):
                    with contextlib.suppress(LabUnavailable):
                        _cmd(["ip", "link", "del", name])
                        removed.append(name)
        return removed

    def _pick_subnet(self) -> int:
        used = set(re.findall(r"inet 10\.77\.(\d+)\.", _cmd(["ip", "-4", "-o", "addr", "show"])))
        start = os.getpid() % 200 + 20
        for n in itertools.chain(range(start, 250), range(20, start)):
            if str(n) not in used:
                return n
        raise LabUnavailable("no free 10.77.x.0/24 subnet")

    def setup(self) -> None:
        """Create the bridge, the namespaces, their veths, addresses and nftables tables;
        raise :class:`LabUnavailable` (after removing whatever was made) when that fails."""
        if os.geteuid() != 0:
            raise LabUnavailable("not root: network namespaces need CAP_NET_ADMIN")
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                raise LabUnavailable(f"no `{tool}` command")
        self.remove_stale()
        try:
            self.subnet = self._pick_subnet()
            _cmd(["ip", "link", "add", self.bridge, "type", "bridge"])
            self.bridge_made = True
            _cmd(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
            _cmd(["ip", "link", "set", self.bridge, "up"])
            for i in range(self.count):
                ns, veth = self.namespace(i), self.veth(i)
                _cmd(["ip", "netns", "add", ns])
                self.namespaces.append(ns)
                _cmd(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                      "netns", ns])  # fmt: skip
                _cmd(["ip", "link", "set", veth, "master", self.bridge, "up"])
                _cmd(["ip", "-n", ns, "addr", "add", f"{self.host(i)}/24", "dev", "eth0"])
                _cmd(["ip", "-n", ns, "link", "set", "eth0", "up"])
                _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
                _cmd(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=(
                    "table inet nemesis {\n"
                    "  chain out { type filter hook output priority 0; policy accept; }\n"
                    "  chain in { type filter hook input priority 0; policy accept; }\n"
                    "}\n"))  # fmt: skip
        except LabUnavailable:
            self.teardown()
            raise

    def _nft(self, i: int, script: str) -> None:
        _cmd(["ip", "netns", "exec", self.namespace(i), "nft", "-f", "-"], stdin=script)

    def cut(self, side: Sequence[int]) -> None:
        """Cut the households ``side`` off from all the others, both directions (each side
        member drops what it sends to, and what it receives from, every other household)."""
        others = [j for j in range(self.count) if j not in side]
        if not others:
            return
        addrs = ", ".join(self.host(j) for j in others)
        for i in side:
            self._nft(i, f"add rule inet nemesis out ip daddr {{ {addrs} }} drop\n"
                         f"add rule inet nemesis in ip saddr {{ {addrs} }} drop\n")  # fmt: skip

    def lose(self, a: int, b: int, percent: int) -> None:
        """Drop ``percent`` % of household ``a``'s packets to ``b`` (at random, one way)."""
        if not 0 < percent <= 100:
            raise ValueError(f"loss of {percent} %")
        rate = "" if percent == 100 else f"numgen random mod 100 < {percent} "
        self._nft(a, f"add rule inet nemesis out ip daddr {self.host(b)} {rate}drop\n")

    def clear(self, i: int) -> None:
        """Remove every fault rule in household ``i``'s namespace."""
        self._nft(i, "flush chain inet nemesis out\nflush chain inet nemesis in\n")

    def rules(self, i: int) -> str:
        """The nftables ruleset of household ``i``'s namespace (for the event log)."""
        return _cmd(["ip", "netns", "exec", self.namespace(i), "nft", "list", "ruleset"])

    def teardown(self) -> list[str]:
        """Kill any process left in the namespaces (ours), delete them (their veths and nft
        tables go with them) and the bridge; the errors, if any (never raises)."""
        errors: list[str] = []
        for i, ns in enumerate(self.namespaces):
            with contextlib.suppress(LabUnavailable):  # now: a namespace goes in the background
                _cmd(["ip", "link", "del", self.veth(i)])
            with contextlib.suppress(LabUnavailable):
                for pid in _cmd(["ip", "netns", "pids", ns]).split():
                    with contextlib.suppress(OSError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                _cmd(["ip", "netns", "del", ns])
            except LabUnavailable as exc:
                errors.append(str(exc))
        self.namespaces = []
        if self.bridge_made:
            try:
                _cmd(["ip", "link", "del", self.bridge])
            except LabUnavailable as exc:
                errors.append(str(exc))
            self.bridge_made = False
        return errors


class InjectorLab:
    """``partition`` and ``loss`` through the nodes' libp2p fault injector (node/net/faults.py),
    where network namespaces are unavailable or not wanted.

    Every household's node runs with ``MICROGRID_FAULTS_FILE`` naming ``faults.json`` in its
    directory (:meth:`prepare`, before the first start; restarts keep it). A partition of side
    S makes every member of S name every other household as partitioned, and every other
    household name the members of S (no connection either way, no dialling); a loss A->B makes
    B drop that share of the messages arriving from A (gossip, Raft frames, block and clock
    requests); a clock jump of A by D seconds sets ``clock_offset_seconds`` D in A's file (its
    running wall clock follows; ``jump``). Faults active together are merged (the highest loss
    per link); healing one rewrites the files without it, an empty file when nothing is left.
    A node follows its file within 0.2 s."""

    def __init__(self) -> None:
        self.households: list[DemoHousehold] = []
        self.active: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, ...], int]] = {}
        """(kind, households) -> (households, loss percentage) of each fault in force."""
        self.offsets: dict[str, float] = {}
        """Household -> the live clock offset in force (``jump``)."""
        self.written: dict[str, FaultRules] = {}

    @staticmethod
    def path(h: DemoHousehold) -> Path:
        """Household ``h``'s faults file."""
        return h.directory / "faults.json"

    def prepare(self, households: Sequence[DemoHousehold]) -> None:
        """Give every household an empty faults file and the variable naming it."""
        self.households = list(households)
        for h in self.households:
            write_rules(self.path(h), NO_FAULTS)
            self.written[h.name] = NO_FAULTS
            h.environment[FAULTS_FILE_ENV] = str(self.path(h))

    def cut(self, side: Sequence[str]) -> None:
        """Cut the households ``side`` off from all the others, both ways."""
        self.active[(Kind.PARTITION.value, tuple(side))] = (tuple(side), 0)
        self._write()

    def lose(self, a: str, b: str, percent: int) -> None:
        """Drop ``percent`` % of household ``a``'s messages to ``b`` (at random, one way)."""
        if not 0 < percent <= 100:
            raise ValueError(f"loss of {percent} %")
        self.active[(Kind.LOSS.value, (a, b))] = ((a, b), percent)
        self._write()

    def clear(self, kind: Kind, names: Sequence[str]) -> None:
        """Heal the ``kind`` fault on ``names`` (the others in force stay)."""
        self.active.pop((kind.value, tuple(names)), None)
        self._write()

    def jump(self, name: str, seconds: float) -> None:
        """Step household ``name``'s running wall clock to ``seconds`` off the right time."""
        self.offsets[name] = seconds
        self._write()

    def set_right(self, name: str) -> None:
        """Household ``name``'s clock right again (its file without ``clock_offset_seconds``)."""
        self.offsets.pop(name, None)
        self._write()

    def rules(self) -> dict[str, FaultRules]:
        """Every household's rules for the faults in force."""
        did = {h.name: h.did for h in self.households}
        cut: dict[str, set[str]] = {h.name: set() for h in self.households}
        lost: dict[str, dict[str, int]] = {h.name: {} for h in self.households}
        for (kind, _), (names, percent) in self.active.items():
            if kind == Kind.PARTITION.value:
                others = [n for n in did if n not in names]
                for n in names:
                    cut[n].update(did[o] for o in others)
                for o in others:
                    cut[o].update(did[n] for n in names)
            else:
                a, b = names
                lost[b][did[a]] = max(percent, lost[b].get(did[a], 0))
        return {n: FaultRules.make(cut[n], lost[n], clock_offset_seconds=self.offsets.get(n, 0.0))
                for n in did}  # fmt: skip

    def _write(self) -> None:
        every = self.rules()
        for h in self.households:
            rules = every[h.name]
            if self.written.get(h.name) != rules:
                write_rules(self.path(h), rules)
                self.written[h.name] = rules

    def clear_all(self) -> None:
        """Heal everything (the files stay, empty)."""
        self.active.clear()
        self.offsets.clear()
        with contextlib.suppress(OSError):
            self._write()


DISK_MIB = 64
"""Size of a ``disk_full`` household's tmpfs data directory (an hour's ledger and Raft log take
a few MiB; the ballast fills the rest while the fault lasts)."""
BALLAST = "nemesis-ballast"


class DiskLab:
    """Small tmpfs mounts as households' data directories (``disk_full``)."""

    def __init__(self) -> None:
        self.mounts: list[Path] = []

    def mount(self, path: Path, mib: int = DISK_MIB) -> None:
        """Mount a ``mib`` MiB tmpfs on ``path`` (created); :class:`LabUnavailable` if not."""
        if os.geteuid() != 0:
            raise LabUnavailable("not root: a tmpfs mount needs CAP_SYS_ADMIN")
        path.mkdir(parents=True, exist_ok=True)
        _cmd(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(path)])
        self.mounts.append(path)

    @staticmethod
    def fill(path: Path) -> int:
        """Write a ballast file in ``path`` until the disk is full; the bytes written."""
        written = 0
        fd = os.open(path / BALLAST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for chunk in (1 << 20, 4096, 1):
                block = bytes(chunk)
                while True:
                    try:
                        n = os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
                    written += n
        finally:
            os.close(fd)
        return written

    @staticmethod
    def free(path: Path) -> None:
        """Delete the ballast."""
        (path / BALLAST).unlink(missing_ok=True)

    def unmount_all(self) -> list[str]:
        """Copy each mount's files to the disk underneath (the run's logs and ledgers stay
        readable and can be kept) and unmount it; the errors, if any (never raises)."""
        errors: list[str] = []
        for path in reversed(self.mounts):
            keep = path.with_name(path.name + ".nemesis-copy")
            try:
                self.free(path)
                shutil.copytree(path, keep, dirs_exist_ok=True)
                _cmd(["umount", str(path)])
                shutil.rmtree(path, ignore_errors=True)
                keep.rename(path)
            except (OSError, LabUnavailable) as exc:
                errors.append(f"{path}: {exc}")
                with contextlib.suppress(LabUnavailable):
                    _cmd(["umount", "-l", str(path)])
        self.mounts = []
        return errors


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
    cleared: dict[tuple[str, int], float] = field(default_factory=dict)
    """(node, slot) -> when that node applied the slot's gate closure, by its own wall clock,
    for nodes whose clock was right (``/status`` ``slot_times``: the runner's clock is theirs)."""
    early_gate_closures: dict[str, int] = field(default_factory=dict)
    """The most ``clock.early_gate_closures`` each node with a right clock reported (beyond
    :attr:`early_baseline`)."""
    early_baseline: dict[str, int] = field(default_factory=dict)
    """Node -> its ``clock.early_gate_closures`` when its jumped clock was set right (a running
    node keeps what it counted while its own clock was off: not a right clock's count)."""
    tainted: dict[str, float] = field(default_factory=dict)
    """Node -> a wall time: its ``slot_times`` of slots whose gate time is not later were (or
    may have been) taken while its running clock was off (``jump``), and are not checked."""

    def record(self, docs: dict[str, dict[str, Any]], skewed: Iterable[str] = ()) -> None:
        """Note one round of ``/status`` documents; ``skewed``: nodes whose clock was off (or
        changed) meanwhile, left out of the gate-closure observations."""
        self.polls += 1
        off = set(skewed)
        for name, doc in docs.items():
            if name not in off:
                self._record_clock(name, doc)
            ledger, raft = doc.get("ledger") or {}, doc.get("raft") or {}
            height, head = ledger.get("height"), ledger.get("head_hash")
            if isinstance(height, int) and height > 0 and isinstance(head, str):
                self.heads[height].setdefault(head, set()).add(name)
                self.max_height = max(self.max_height, height)
            if raft.get("leader") and isinstance(raft.get("term"), int):
                self.leaders.add((raft["term"], raft["leader"]))

    def _record_clock(self, name: str, doc: dict[str, Any]) -> None:
        for row in doc.get("slot_times") or ():
            at, slot = row.get("cleared_at"), row.get("slot")
            if isinstance(at, int | float) and isinstance(slot, int):
                self.cleared.setdefault((name, slot), float(at))
        early = (doc.get("clock") or {}).get("early_gate_closures")
        if isinstance(early, int):
            early -= self.early_baseline.get(name, 0)
            if early > self.early_gate_closures.get(name, 0):
                self.early_gate_closures[name] = early

    def timed_closures(self, schedule: Schedule) -> dict[tuple[str, int], float]:
        """:attr:`cleared` without the closures a jumped clock may have timed (:attr:`tainted`)."""
        return {(name, slot): at for (name, slot), at in self.cleared.items()
                if schedule.gate_time(slot) > self.tainted.get(name, -math.inf)}  # fmt: skip


@dataclass
class NemesisResult:
    """A run's figures and the checks' failures (empty: passed)."""

    plan: Plan
    failures: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    """Faults injected, by kind (a skipped fault is not counted)."""
    skipped: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    """Kinds this machine cannot inject (no namespaces, no tmpfs), with the reason; their
    faults are skipped."""
    net_faults: str = ""
    """How ``partition`` and ``loss`` were injected (empty: none planned)."""
    outcomes: list[str] = field(default_factory=list)
    """What a ``disk_full`` or ``torn_page`` did to its node (kept running, exited with what,
    discarded the torn tail, refused to start and was healed how)."""
    recoveries: list[Recovery] = field(default_factory=list)
    height: int = 0
    start_height: int = 0
    elections: int = 0
    max_term: int = 0
    divergences: int = 0
    lost_records: int = 0
    observed_heads: int = 0
    gate_closures_checked: int = 0
    """Gate closures applied by nodes with a right clock, compared with their gate times."""
    jumps: list[JumpWatch] = field(default_factory=list)
    """What each ``jump`` observed (its line is in :attr:`outcomes` too)."""
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
            ("gate closures timed", str(self.gate_closures_checked)),
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
        for o in self.outcomes:
            lines.append(f"    {o}")
        if self.net_faults:
            lines.append(f"  partition and loss through {self.net_faults}")
        for kind, why in self.unavailable.items():
            lines.append(f"  {kind} unavailable here: {why}")
        if self.skipped:
            lines.append(f"  skipped: {'; '.join(self.skipped)}")
        if self.ok:
            lines.append(f"PASS seed {p.seed}")
        else:
            lines.append(f"FAIL seed {p.seed}:")
            lines += [f"  - {f}" for f in self.failures]
            if self.directory is not None:
                lines.append(f"  logs and ledgers: {self.directory}")
        forced = " --net-faults libp2p" if self.net_faults.startswith("the libp2p") else ""
        lines.append(f"replay: {p.replay_command()}{forced}")
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


START_TIMEOUT_S = 45.0
"""How long a restarted torn node may take to answer or refuse."""


_EXCEPTION_LINE = re.compile(
    r"^[\s|]*((?:[\w.]+\.)?\w*(?:Error|Exception|Corruption|Mismatch|Full)\b.*)$"
)


def _last_error(h: DemoHousehold, tail_bytes: int = 64 * 1024) -> str:
    """The last error a node logged (its JSON log's last error/critical line, else its last
    non-JSON line: a traceback's last line), shortened."""
    path = h.directory / "node.log"
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - tail_bytes))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError as exc:
        return f"no log: {exc}"
    for line in reversed(lines):
        if line.startswith("error: "):  # the CLI's one-line fatal error (node/cli/run.py)
            return line[:300]
        try:
            doc = json.loads(line)
        except ValueError:
            found = _EXCEPTION_LINE.match(line)
            if found:  # a traceback's last line (also inside an exception group's frame)
                return found.group(1).strip()[:300]
            continue
        if isinstance(doc, dict) and str(doc.get("level", "")).lower() in ("error", "critical"):
            text = " ".join(str(doc.get(k)) for k in ("event", "message", "error", "exc_info")
                            if doc.get(k))  # fmt: skip
            return text[:300] or line[:300]
    return "no error logged"


def tear(data: Path, name: str, cut_bytes: int) -> str:
    """Cut ``cut_bytes`` (0: one page, or a ``-wal``'s last frame) off the end of ``data/name``
    (its process is stopped); what was done, as text. A main database file is first
    checkpointed (``wal_checkpoint(TRUNCATE)``, as SQLite does by itself every 1000 pages), so
    its last page holds data no WAL frame covers any more: a crash right after a checkpoint."""
    path = data / name
    note = ""
    if not name.endswith("-wal") and path.exists() and path.with_name(name + "-wal").exists():
        conn = sqlite3.connect(path, timeout=5)
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            note = "WAL busy, " if busy else "after a WAL checkpoint, "
        finally:
            conn.close()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{name} absent: nothing torn"
    if size == 0:
        return f"{name} empty: nothing torn"
    with path.open("rb") as fh:
        head = fh.read(32)
    if name.endswith("-wal"):
        page = int.from_bytes(head[8:12], "big") if len(head) >= 12 else 4096
        whole = 24 + (page or 4096)
    else:
        page = int.from_bytes(head[16:18], "big") if len(head) >= 18 else 4096
        whole = 65536 if page == 1 else (page or 4096)
    cut = min(size, whole if cut_bytes == 0 else cut_bytes)
    os.truncate(path, size - cut)
    what = "its last page" if cut_bytes == 0 else f"{cut} bytes"
    if name.endswith("-wal") and cut_bytes == 0:
        what = "its last frame"
    return f"{name} cut by {what} ({note}{size} -> {size - cut} bytes)"


SKEW_LEAD_BOUND_S = 16.0
"""Longest a skewed node may lead at a stretch, and the longest the others may take to name
another leader after a skewed leader stopped: two 8 s slots. A skewed leader hands over within
0.2 s of seeing its clock is off (samples come on connecting), the handover or election takes
up to an election timeout (3 s); the rest is a loaded machine's slack."""
GATE_SLACK_S = 0.001
"""A gate closure applied earlier than this before its gate time, by a right clock, is early."""
JUMP_APPLY_SLACK_S = 1.0
"""A gate closure the sole voter proposed just before its clock jumped may be applied this long
after (a commit round and a poll); later ones were proposed with its clock off."""


def _disagreeing(doc: dict[str, Any]) -> list[str]:
    """The peers a ``/status`` document lists as off the grid's median clock."""
    listed = (doc.get("clock") or {}).get("disagreeing")
    return listed if isinstance(listed, list) else []


@dataclass
class _ClockWatch:
    """What a ``skew`` and a ``jump`` watch alike while a node's clock is off: its own verdict
    (``clock.skewed``), its leadership, the handover to another leader, the peers that saw its
    clock off, and the outcome line's and the failures' common parts. What differs stays in
    :class:`SkewWatch` and :class:`JumpWatch`: what their times count from, how they count the
    node's counters and a stretch of leading, and (a jump) the gate timing meanwhile."""

    household: DemoHousehold
    skew_s: float
    was_leader: bool
    _: KW_ONLY
    seen_at: float | None = None
    """When its ``/status`` first said ``clock.skewed``."""
    offset: float | None = None
    """The offset it then reported."""
    moved_at: float | None = None
    """When the other nodes first named another leader (it led when the step began)."""
    new_leader: str = "-"
    """Whom they then named."""
    lead_since: float | None = None
    """Since when it leads (None: the last poll found it not leading)."""
    longest_lead: float = 0.0
    """Longest stretch it led while its clock was off."""
    transfers: int = 0
    """Leadership handovers it made while its clock was off."""
    held: int = 0
    """Gate closures or settlements it held back meanwhile."""
    peers_saw: set[str] = field(default_factory=set)
    """Nodes that listed its clock as off the median (``clock.disagreeing``)."""
    exited: str | None = None
    """How its process exited while its clock was off (None: it did not)."""

    def _note_counters(self, clock: dict[str, Any]) -> None:
        """Note the node's ``transfers`` and ``held`` from its ``/status`` ``clock`` object."""
        raise NotImplementedError

    def _note_round(
        self,
        docs: dict[str, dict[str, Any]],
        others_leader: str,
        now: float,
        *,
        lead_through_loss: bool,
    ) -> None:
        """Note what both kinds watch in one round of ``/status`` documents (``others_leader``:
        whom the other nodes name). ``lead_through_loss``: a stretch of leading lasts up to the
        first poll that finds the node not leading, not only up to the last that found it
        leading."""
        h = self.household
        doc = docs.get(h.name)
        if doc is not None:
            clock = doc.get("clock") or {}
            if clock.get("skewed") and self.seen_at is None:
                self.seen_at, self.offset = now, clock.get("offset")
            self._note_counters(clock)
            leads = (doc.get("raft") or {}).get("role") == "leader"
            if leads and self.lead_since is None:
                self.lead_since = now
            if self.lead_since is not None and (leads or lead_through_loss):
                self.longest_lead = max(self.longest_lead, now - self.lead_since)
            if not leads:
                self.lead_since = None
        if self.was_leader and self.moved_at is None and others_leader not in ("-", h.name):
            self.moved_at, self.new_leader = now, others_leader
        for name, d in docs.items():
            if name != h.name and h.did in _disagreeing(d):
                self.peers_saw.add(name)

    def _moved_after(self, since: float) -> float | None:
        """Seconds from ``since`` until the other nodes named another leader (None: never)."""
        return None if self.moved_at is None else self.moved_at - since

    def _verdict_parts(self, off: str, since: float, after: str) -> list[str]:
        """The outcome's first parts: how it exited while ``off`` (if it did), and when it
        reported itself skewed, ``after`` (text) ``since`` (a monotonic time)."""
        parts: list[str] = []
        if self.exited is not None:
            parts.append(f"exited while {off} ({self.exited})")
        if self.seen_at is None:
            parts.append("never reported skewed")
        else:
            shown = "?" if self.offset is None else f"{self.offset:+.1f} s"
            parts.append(
                f"reported skewed {self.seen_at - since:.1f} s after {after} (offset {shown})"
            )
        return parts

    def _handover_part(self, moved: str, since: float, after: str) -> str:
        """The outcome's part for a node that led: whom leadership ``moved`` (text) to, how
        long ``after`` (text) ``since`` (a monotonic time)."""
        took = self._moved_after(since)
        if took is None:
            return "leadership never moved"
        return f"{moved} {self.new_leader} {took:.1f} s after {after}"

    def _counts(self) -> str:
        """The outcome's handover and hold counts, in parentheses."""
        return f"({self.transfers} handovers, {self.held} holds)"

    def _line(self, kind: str, parts: list[str]) -> str:
        """The outcome line: ``kind``, the node, ``parts``, then the peers that saw it off."""
        seen_by = f"seen off by {','.join(sorted(self.peers_saw)) or 'no node'}"
        lead = " (the leader)" if self.was_leader else ""
        head = f"{kind} {self.household.name}{lead} {self.skew_s:+g} s: "
        return head + "; ".join([*parts, seen_by])

    def _failures(
        self,
        kind: str,
        *,
        off: str,
        led: str,
        leader: str,
        handover_s: float | None,
        hands_over: bool = True,
    ) -> list[str]:
        """The checks both kinds make: it did not exit while ``off``; it said it is skewed; it
        led at most :data:`SKEW_LEAD_BOUND_S` at a stretch ``led`` (text); if it led (``leader``:
        text), the others named another leader within that bound (``handover_s``). Without
        ``hands_over`` (no other voter to hand over to) the last two are not checked."""
        name, out = self.household.name, []
        if self.exited is not None:
            out.append(f"{kind} {name}: the node exited while {off}: {self.exited}")
        if self.seen_at is None:
            out.append(f"{kind} {name} ({self.skew_s:+g} s): /status never said clock.skewed")
        if not hands_over:
            return out
        if self.longest_lead > SKEW_LEAD_BOUND_S:
            out.append(
                f"{kind} {name}: led {self.longest_lead:.1f} s at a stretch {led} "
                f"(bound {SKEW_LEAD_BOUND_S:g} s)"
            )
        if self.was_leader and (handover_s is None or handover_s > SKEW_LEAD_BOUND_S):
            out.append(
                f"{kind} {name}: {leader} and the others named no other leader within "
                f"{SKEW_LEAD_BOUND_S:g} s"
            )
        return out


@dataclass
class SkewWatch(_ClockWatch):
    """What the runner saw of one ``skew``: the node's own verdict, its leadership, its peers.

    A ``skew`` restarts its node, so its times count from the restarts: the verdict from the
    skewed process's start (:attr:`started`), the handover from the right-clock process's stop
    (:attr:`stopped`). Its counters (``transfers``, ``held``) are the skewed process's own (a
    fresh process counts from zero), and a stretch of leading lasts up to the last poll that
    found it leading."""

    stopped: float
    """Monotonic time the right-clock process was stopped."""
    started: float = 0.0
    """Monotonic time the skewed process was started."""

    def observe(self, docs: dict[str, dict[str, Any]], others_leader: str, now: float) -> None:
        """Note one round of ``/status`` documents (``others_leader``: whom the other nodes
        name)."""
        self._note_round(docs, others_leader, now, lead_through_loss=False)

    def _note_counters(self, clock: dict[str, Any]) -> None:
        """The skewed process's own counters (it started with them at zero)."""
        self.transfers = max(self.transfers, int(clock.get("transfers") or 0))
        self.held = max(self.held, int(clock.get("held") or 0))

    def outcome(self) -> str:
        """One line for the table."""
        parts = self._verdict_parts("skewed", self.started, "its start")
        if self.was_leader:
            parts.append(self._handover_part("leadership moved to", self.stopped, "its stop"))
        parts.append(f"led {self.longest_lead:.1f} s while skewed {self._counts()}")
        return self._line("skew", parts)

    def failures(self, timing: Timing) -> list[str]:
        """What the step's skew checks found wrong (``timing``: the plan's; the checks' bound
        is :data:`SKEW_LEAD_BOUND_S`)."""
        return self._failures(
            "skew",
            off="skewed",
            led="while skewed",
            leader="the leader was skewed",
            handover_s=self._moved_after(self.stopped),
        )


@dataclass
class JumpWatch(_ClockWatch):
    """What the runner saw of one ``jump``: the running node's own verdict, its leadership, the
    handover, and the gate closures the nodes with right clocks applied meanwhile.

    A ``jump`` moves the clock of the running node, so its times count from the jump
    (:attr:`at`); ``transfers`` and ``held`` are its counters' increases over :attr:`before`;
    ``lead_since`` of a leader at the jump is the jump (the runner sets it), and
    ``longest_lead`` is the longest stretch it led after the jump, up to the first poll that
    found it not leading (an upper bound: polls are half a second apart)."""

    at: float = 0.0
    """Monotonic time its faults file got the offset."""
    wall_at: float = 0.0
    """The runner's (right) wall clock then."""
    before: dict[str, int] = field(default_factory=dict)
    """Counters before the jump: ``transfers``, ``held`` of the node, and each other node's
    ``early_gate_closures`` (by name)."""
    own_early: int = 0
    """The most ``early_gate_closures`` the jumped node itself reported meanwhile."""
    timed: set[tuple[str, int]] = field(default_factory=set)
    """(node, slot) gate closures nodes with right clocks applied after the jump."""
    early: dict[tuple[str, int], float] = field(default_factory=dict)
    """Those of them applied before the gate time: seconds early."""
    counted: dict[str, int] = field(default_factory=dict)
    """Early gate closures nodes with right clocks counted meanwhile."""
    alone: bool = False
    """It led with no other voter in the grid to hand over to (:func:`sole_voter_jump_plan`):
    instead of a handover, no gate may close anywhere while its clock is off."""
    closed_while_off: dict[tuple[str, int], float] = field(default_factory=dict)
    """(node, slot) -> wall time: gate closures nodes with right clocks applied from
    :data:`JUMP_APPLY_SLACK_S` after the jump on (``alone``: there must be none)."""
    settled_while_off: dict[tuple[str, int], float] = field(default_factory=dict)
    """The same for settlements (``settled_at``; ``alone``: there must be none)."""
    wall_healed: float = 0.0
    """The runner's wall clock when the node's clock was set right."""
    gates_passed: int = 0
    """Gate times the right clocks passed between the jump and :attr:`wall_healed`."""

    def start(self, docs: dict[str, dict[str, Any]]) -> None:
        """Note the counters before the jump (``docs``: every node's ``/status`` then)."""
        for name, doc in docs.items():
            clock = doc.get("clock") or {}
            if name == self.household.name:
                self.before["transfers"] = int(clock.get("transfers") or 0)
                self.before["held"] = int(clock.get("held") or 0)
            elif isinstance(clock.get("early_gate_closures"), int):
                self.before[name] = clock["early_gate_closures"]

    def observe(
        self,
        docs: dict[str, dict[str, Any]],
        others_leader: str,
        now: float,
        schedule: Schedule,
        off: Iterable[str] = (),
    ) -> None:
        """Note one round of ``/status`` documents (``others_leader``: whom the other nodes
        name; ``off``: other nodes whose clock is off too, left out of the gate timing)."""
        skip = set(off) | {self.household.name}
        self._note_round(docs, others_leader, now, lead_through_loss=True)
        for name, d in docs.items():
            if name in skip:
                continue
            for row in d.get("slot_times") or ():
                at, slot, settled = row.get("cleared_at"), row.get("slot"), row.get("settled_at")
                if (self.alone and isinstance(slot, int) and isinstance(settled, int | float)
                        and settled >= self.wall_at + JUMP_APPLY_SLACK_S):  # fmt: skip
                    self.settled_while_off[(name, slot)] = float(settled)
                if not (isinstance(at, int | float) and isinstance(slot, int)):
                    continue
                if at >= self.wall_at - 1.0:  # applied after the jump (the poll's slack)
                    self.timed.add((name, slot))
                    if at < schedule.gate_time(slot) - GATE_SLACK_S:
                        self.early[(name, slot)] = round(schedule.gate_time(slot) - at, 3)
                if self.alone and at >= self.wall_at + JUMP_APPLY_SLACK_S:
                    self.closed_while_off[(name, slot)] = float(at)
            early = (d.get("clock") or {}).get("early_gate_closures")
            if isinstance(early, int) and early > self.before.get(name, early):
                self.counted[name] = early - self.before[name]

    def _note_counters(self, clock: dict[str, Any]) -> None:
        """Its counters' increases since the jump, and its own early gate closures."""
        self.transfers = max(
            self.transfers, int(clock.get("transfers") or 0) - self.before.get("transfers", 0)
        )
        self.held = max(self.held, int(clock.get("held") or 0) - self.before.get("held", 0))
        self.own_early = max(self.own_early, int(clock.get("early_gate_closures") or 0))

    @property
    def handover_s(self) -> float | None:
        """Seconds from the jump until the other nodes named another leader (None: never)."""
        return self._moved_after(self.at)

    def heal(self, schedule: Schedule, wall: float) -> None:
        """Note that its clock was set right at the runner's wall time ``wall`` (and how many
        gate times the right clocks passed since the jump)."""
        self.wall_healed = wall
        first = schedule.slot_at(self.wall_at) - 1
        last = schedule.slot_at(wall + schedule.gate_lead_seconds) + 1
        self.gates_passed = sum(1 for slot in range(first, last + 1)
                                if self.wall_at < schedule.gate_time(slot) <= wall)  # fmt: skip

    def outcome(self) -> str:
        """One line for the table."""
        parts = self._verdict_parts("its clock was off", self.at, "the jump")
        if self.alone:
            closed = "no gate closed and no slot settled anywhere meanwhile"
            if self.closed_while_off or self.settled_while_off:
                closed = (
                    f"{len(self.closed_while_off)} gate closures and "
                    f"{len(self.settled_while_off)} settlements applied meanwhile"
                )
            parts.append(
                f"the sole voter, no one to hand over to: held deadlines ({self.held} holds, "
                f"{self.gates_passed} gate times passed while its clock was off), {closed}"
            )
            return self._line("jump", parts)
        if self.was_leader:
            parts.append(self._handover_part("handed over to", self.at, "the jump"))
        parts.append(
            f"led at most {self.longest_lead:.1f} s at a stretch after the jump {self._counts()}"
        )
        if self.early or self.counted:
            parts.append(
                f"gates closed early: {sorted(self.early.items())[:5]} counted {self.counted}"
            )
        else:
            parts.append(f"no gate closed early ({len(self.timed)} closures timed meanwhile)")
        return self._line("jump", parts)

    def failures(self) -> list[str]:
        """What the step's jump checks found wrong."""
        name = self.household.name
        out = self._failures(
            "jump",
            off="its clock was off",
            led="after its clock jumped",
            leader="the leader's clock jumped",
            handover_s=self.handover_s,
            hands_over=not self.alone,
        )
        if self.alone:
            if self.closed_while_off:
                out.append(
                    f"jump {name}: the sole voter's clock was off, yet gates closed (node, slot "
                    f"-> wall time): {dict(sorted(self.closed_while_off.items())[:10])}"
                )
            if self.settled_while_off:
                out.append(
                    f"jump {name}: the sole voter's clock was off, yet slots settled (node, "
                    f"slot -> wall time): {dict(sorted(self.settled_while_off.items())[:10])}"
                )
            if self.skew_s > 0 and self.gates_passed and not self.held:
                out.append(
                    f"jump {name}: the sole voter's clock ran {self.skew_s:+g} s ahead over "
                    f"{self.gates_passed} gate times, and it held no deadline (clock.held)"
                )
        if self.early:
            out.append(
                f"jump {name}: gates closed early by right clocks meanwhile (node, slot "
                f"-> seconds): {dict(sorted(self.early.items())[:10])}"
            )
        if self.counted:
            out.append(
                f"jump {name}: nodes with right clocks counted early gate closures "
                f"meanwhile: {self.counted}"
            )
        return out


def check_gate_times(obs: Observations, schedule: Schedule, result: NemesisResult) -> None:
    """No gate closed early by a right clock: every gate closure a node with a right clock
    applied (``slot_times`` ``cleared_at``, by its clock, which is the runner's) is at or after
    the slot's gate time, and no such node counted an early one (``clock.early_gate_closures``)."""
    timed = obs.timed_closures(schedule)
    early = sorted((slot, name, round(schedule.gate_time(slot) - at, 3))
                   for (name, slot), at in timed.items()
                   if at < schedule.gate_time(slot) - GATE_SLACK_S)  # fmt: skip
    result.gate_closures_checked = len(timed)
    if early:
        result.failures.append(f"gates closed early by right clocks (slot, node, seconds): "
                               f"{early[:10]}")  # fmt: skip
    counted = {n: c for n, c in obs.early_gate_closures.items() if c}
    if counted:
        result.failures.append(f"nodes with right clocks counted early gate closures: {counted}")


class Runner:
    """Plays one :class:`Plan` on a running :class:`Demo`."""

    def __init__(self, demo: Demo, plan: Plan, result: NemesisResult, out: Any = print,
                 net: NetLab | None = None, disks: DiskLab | None = None,
                 injector: InjectorLab | None = None,
                 clocks: InjectorLab | None = None) -> None:  # fmt: skip
        self.demo = demo
        self.plan = plan
        self.result = result
        self.obs = Observations()
        self.out = out
        self.t0 = time.monotonic()
        self.paused: set[str] = set()
        self.last_docs: dict[str, dict[str, Any]] = {}
        self.net = net
        self.disks = disks
        self.injector = injector
        """The libp2p fault injector, where ``partition`` and ``loss`` go through it."""
        self.clocks = clocks
        """The nodes' faults files, where a ``jump`` is planned (the injector's, if any)."""
        self.exits: dict[str, int] = {}
        """Nodes that exited on their own during a fault (not killed by us): the exit status."""
        self.skewed: set[str] = set()
        """Nodes running with a clock offset now (``skew``)."""
        self.unskewed: list[tuple[DemoHousehold, str]] = []
        """Nodes a ``skew`` or ``jump`` step set right, and the kind (looked at after the
        recovery)."""

    def log(self, text: str) -> None:
        """Note an event (kept in the result; printed by the CLI)."""
        line = f"[{time.monotonic() - self.t0:7.1f}s] {text}"
        self.result.events.append(line)
        self.out(line)

    async def poll(self) -> None:
        """Record every node's status every :data:`POLL_SECONDS` until cancelled."""
        while True:
            skewed, starts = set(self.skewed), {h.name: h.starts for h in self.demo.households}
            docs = await self.demo.statuses()
            # a node whose clock was off, or that restarted meanwhile, says nothing of gate times
            skewed |= self.skewed | {h.name for h in self.demo.households
                                     if h.starts != starts.get(h.name)}  # fmt: skip
            self.obs.record(docs, skewed)
            self.last_docs = docs
            await trio.sleep(POLL_SECONDS)

    async def watch_statuses(self) -> dict[str, dict[str, Any]]:
        """``/status`` of every live node that answers, as :meth:`Demo.statuses`, without the
        paused ones (SIGSTOP: their API would only time out, 2 s, and a clock watch polling
        them would see every change that much later)."""
        return await self.demo.statuses(skip=self.paused)

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
        if fault.kind.value in self.result.unavailable:
            self.result.skipped.append(f"{what}: {self.result.unavailable[fault.kind.value]}")
            return
        if fault.kind in NETWORK_KINDS + STORAGE_KINDS:
            await self.inject_newer(fault, hs, what)
            return
        if fault.kind is Kind.SKEW:
            await self.inject_skew(fault, hs[0], what)
            return
        if fault.kind is Kind.JUMP:
            await self.inject_jump(fault, hs[0], what)
            return
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

    def _count(self, fault: Fault) -> None:
        self.result.faults[fault.kind.value] = self.result.faults.get(fault.kind.value, 0) + 1

    async def _hold(self, seconds: float, hs: list[DemoHousehold]) -> None:
        """Sleep ``seconds``; note any of ``hs`` whose process exits meanwhile."""
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            for h in hs:
                if h.process is not None and not h.alive and h.name not in self.exits:
                    self.exits[h.name] = int(h.process.returncode or 0)
                    self.log(f"{h.name} exited with {h.process.returncode} during the fault: "
                             f"{_last_error(h)}")  # fmt: skip
            await trio.sleep(min(0.5, max(0.0, deadline - trio.current_time())))

    async def inject_newer(self, fault: Fault, hs: list[DemoHousehold], what: str) -> None:
        """Apply, hold and heal a ``partition``, ``loss``, ``disk_full`` or ``torn_page``."""
        net, kind = self.net, fault.kind
        for h in hs:
            self.exits.pop(h.name, None)
        torn: str | None = None
        try:
            if kind is Kind.PARTITION:
                if self.injector is not None:
                    self.injector.cut([h.name for h in hs])
                else:
                    assert net is not None
                    await trio.to_thread.run_sync(net.cut, [h.index for h in hs])
            elif kind is Kind.LOSS:
                a, b = hs
                if self.injector is not None:
                    self.injector.lose(a.name, b.name, fault.percent)
                else:
                    assert net is not None
                    await trio.to_thread.run_sync(net.lose, a.index, b.index, fault.percent)
                what = f"loss {a.name}->{b.name} {fault.percent}% for {fault.duration_s:g}s"
            elif kind is Kind.DISK_FULL:
                for h in hs:
                    written = await trio.to_thread.run_sync(DiskLab.fill, h.directory / "data")
                    what += f" (ballast {written // 1024} KiB)"
            elif kind is Kind.TORN_PAGE:
                for h in hs:
                    await self._kill(h)
                    torn = await trio.to_thread.run_sync(tear, h.directory / "data", fault.file,
                                                         fault.cut_bytes)  # fmt: skip
                    what += f": {torn}"
            self.log(f"inject {what}")
            self._count(fault)
            await self._hold(fault.duration_s, [] if kind is Kind.TORN_PAGE else hs)
        finally:
            with trio.CancelScope(shield=True):
                await self.heal_newer(fault, hs, torn)

    async def heal_newer(self, fault: Fault, hs: list[DemoHousehold], torn: str | None) -> None:
        """Undo a newer fault: flush the nft chains, delete the ballast and restart a node that
        stopped, restart a torn node and heal a refusal (learner: wipe; voter: ledger aside)."""
        kind, net = fault.kind, self.net
        names = ",".join(h.name for h in hs)
        if kind in NETWORK_KINDS and self.injector is not None:
            self.injector.clear(kind, [h.name for h in hs])
            self.log(f"heal {kind.value} {names}")
            return
        if kind in NETWORK_KINDS:
            assert net is not None
            for h in hs[:1] if kind is Kind.LOSS else hs:
                await trio.to_thread.run_sync(net.clear, h.index)
            self.log(f"heal {kind.value} {names}")
            return
        if kind is Kind.DISK_FULL:
            for h in hs:
                DiskLab.free(h.directory / "data")
                if h.alive:
                    self.result.outcomes.append(
                        f"disk_full {h.name}: kept running (no exit while the disk was full)"
                    )
                else:
                    code = self.exits.get(h.name, h.process.returncode if h.process else None)
                    self.result.outcomes.append(
                        f"disk_full {h.name}: exited with {code} ({_last_error(h)}); restarted"
                    )
                    await self.demo.start_node(h)
            self.log(f"heal disk_full {names}")
            return
        for h in hs:  # torn page
            outcome = await self._start_torn(h, fault)
            self.result.outcomes.append(f"torn_page {h.name} {torn}: {outcome}")
            self.log(f"heal torn_page {h.name}: {outcome}")

    async def _start_torn(self, h: DemoHousehold, fault: Fault) -> str:
        """Restart a node whose file was torn: ``started`` once its API answers, or (it exits
        first: a refusal) heal it and start again."""
        await self.demo.start_node(h)
        code = await self._started_or_exit(h)
        if code is None:
            return "started (the torn tail was discarded or harmless)"
        error = _last_error(h)
        if h.name in self.plan.learner_names:
            shutil.rmtree(h.directory / "data", ignore_errors=True)
            healed = "wiped (a learner), restarted"
        else:
            aside = h.directory / "data" / f"torn-{h.starts}"
            aside.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                src = h.directory / "data" / f"ledger.db{suffix}"
                if src.exists():
                    src.rename(aside / src.name)
            healed = f"ledger moved aside to {aside.name}/ (a voter), restarted"
        await self.demo.start_node(h)
        again = await self._started_or_exit(h)
        if again is not None:
            self.result.failures.append(f"torn_page {h.name}: refused again after being "
                                        f"healed, exit {again}: {_last_error(h)}")  # fmt: skip
            return f"refused (exit {code}: {error}); {healed}; refused again (exit {again})"
        return f"refused to start (exit {code}: {error}); {healed}"

    async def _started_or_exit(self, h: DemoHousehold) -> int | None:
        """Wait (at most :data:`START_TIMEOUT_S`) until ``h``'s API answers (None) or its
        process exits (the exit status)."""
        with trio.move_on_after(START_TIMEOUT_S):
            while True:
                if h.process is not None and not h.alive:
                    return int(h.process.returncode or 0)
                if await fetch(h.api + "/status") is not None:
                    return None
                await trio.sleep(0.25)
        return None  # neither: the recovery wait will tell

    async def inject_skew(self, fault: Fault, h: DemoHousehold, what: str) -> None:
        """Restart ``h`` with its clock ``fault.skew_s`` off for the fault's duration (longer
        until its ``/status`` says it is skewed, at most :data:`START_TIMEOUT_S` more), watch
        it, then restart it with the right time. Checked: it reports ``clock.skewed``; it leads
        at most :data:`SKEW_LEAD_BOUND_S` at a time; if it led when the step began, the others
        name another leader within :data:`SKEW_LEAD_BOUND_S` of its stop."""
        docs = self.last_docs or await self.demo.statuses()
        was_leader = self.demo.leader_name(docs) == h.name
        self.skewed.add(h.name)
        watch = SkewWatch(h, fault.skew_s, was_leader, time.monotonic())
        try:
            await self.demo.terminate(h, timeout=10)
            h.environment[CLOCK_OFFSET_ENV] = f"{fault.skew_s:g}"
            await self.demo.start_node(h)
            watch.started = time.monotonic()
            lead = " (the leader)" if was_leader else ""
            self.log(f"inject {what}: {fault.skew_s:+g} s{lead}")
            self._count(fault)
            await self._watch_skew(watch, fault.duration_s)
        finally:
            with trio.CancelScope(shield=True):
                h.environment.pop(CLOCK_OFFSET_ENV, None)
                await self.demo.terminate(h, timeout=10)
                await self.demo.start_node(h)
                self.skewed.discard(h.name)
                self.unskewed.append((h, Kind.SKEW.value))
                line = watch.outcome()
                self.result.outcomes.append(line)
                self.result.failures += watch.failures(self.plan.timing)
                self.log(f"heal skew {h.name}: restarted with the right time; {line}")

    async def _watch_skew(self, w: SkewWatch, duration: float) -> None:
        """Poll every node while ``w``'s node runs skewed (see :meth:`inject_skew`)."""
        h = w.household
        while True:
            now = time.monotonic()
            if now >= w.started + duration and (
                w.seen_at is not None or now >= w.started + duration + START_TIMEOUT_S
            ):
                return
            if not h.alive:
                w.exited = f"exit {h.process.returncode if h.process else '?'}: {_last_error(h)}"
                return
            docs = await self.watch_statuses()
            w.observe(docs, self.demo.leader_name({n: d for n, d in docs.items()
                                                   if n != h.name}), time.monotonic())  # fmt: skip
            await trio.sleep(0.5)

    async def inject_jump(self, fault: Fault, h: DemoHousehold, what: str) -> None:
        """Step ``h``'s running wall clock ``fault.skew_s`` off through its faults file, for the
        fault's duration (longer until its ``/status`` says it is skewed and, if it led, the
        others name another leader: at most :data:`START_TIMEOUT_S` more), watch it
        (:class:`JumpWatch`), then set its clock right. Its gate times are left out of the
        run's gate checks from the jump until the slots its clock may have timed are past
        (:attr:`Observations.tainted`)."""
        clocks = self.clocks
        if clocks is None:  # run_plan gives every node a faults file when a jump is planned
            self.result.skipped.append(f"{what}: the nodes follow no faults file")
            return
        docs = await self.watch_statuses()
        was_leader = self.demo.leader_name(docs) == h.name
        self.skewed.add(h.name)
        watch = JumpWatch(h, fault.skew_s, was_leader)
        # no other voter to hand over to: a sole voter (sole_voter_jump_plan)
        watch.alone = was_leader and not set(self.plan.voter_names) - {h.name}
        watch.start(docs)
        try:
            watch.at, watch.wall_at = time.monotonic(), time.time()
            watch.lead_since = watch.at if was_leader else None
            clocks.jump(h.name, fault.skew_s)
            lead = " (the leader)" if was_leader else ""
            self.log(f"inject {what}: its running clock {fault.skew_s:+g} s{lead}")
            self._count(fault)
            await self._watch_jump(watch, fault.duration_s)
        finally:
            with trio.CancelScope(shield=True):
                clocks.set_right(h.name)
                watch.heal(self.demo.schedule, time.time())
                await trio.sleep(1.0)  # the node follows its file within 0.2 s
                doc = (await self.demo.statuses()).get(h.name) or {}
                early = (doc.get("clock") or {}).get("early_gate_closures")
                own = max(watch.own_early, early if isinstance(early, int) else 0)
                self.obs.early_baseline[h.name] = own
                self.obs.tainted[h.name] = time.time() + abs(fault.skew_s) + 2.0
                self.skewed.discard(h.name)
                self.unskewed.append((h, Kind.JUMP.value))
                line = watch.outcome()
                self.result.jumps.append(watch)
                self.result.outcomes.append(line)
                self.result.failures += watch.failures()
                self.log(f"heal jump {h.name}: its clock set right; {line}")

    async def _watch_jump(self, w: JumpWatch, duration: float) -> None:
        """Poll every node while ``w``'s node runs with its clock off (see
        :meth:`inject_jump`)."""
        h = w.household
        while True:
            now = time.monotonic()
            handed = not w.was_leader or w.alone or w.moved_at is not None
            done = w.seen_at is not None and handed
            if now >= w.at + duration and (done or now >= w.at + duration + START_TIMEOUT_S):
                return
            if not h.alive:
                w.exited = f"exit {h.process.returncode if h.process else '?'}: {_last_error(h)}"
                return
            docs = await self.watch_statuses()
            others = self.demo.leader_name({n: d for n, d in docs.items() if n != h.name})
            w.observe(docs, others, time.monotonic(), self.demo.schedule, self.skewed)
            await trio.sleep(0.5)

    async def after_recovery(self) -> None:
        """After a ``skew`` or ``jump`` step recovered: note which nodes still list the healed
        node's clock as off (their samples of the skewed clock age out within five minutes)."""
        if not self.unskewed:
            return
        docs = await self.demo.statuses()
        for h, kind in self.unskewed:
            stale = sorted(n for n, d in docs.items()
                           if n != h.name and h.did in _disagreeing(d))  # fmt: skip
            note = (f"{kind} {h.name} healed: no node lists its clock as off" if not stale else
                    f"{kind} {h.name} healed: still listed as off by {','.join(stale)} (their "
                    "least-delay samples of its skewed clock age out within 5 min)")  # fmt: skip
            self.result.outcomes.append(note)
            self.log(note)
        self.unskewed = []

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
            if fault.kind is Kind.LOSS and len(names) < 2:
                # both ends resolved to the leader: the other end is a seeded other household
                rest = [h.name for h in self.demo.households if h.name not in names]
                names.append(random.Random(f"nemesis:{self.plan.seed}:{index}").choice(rest))
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
        await self.after_recovery()
        return True

    def _status_line(self) -> str:
        docs = self.last_docs
        parts = []
        for h in self.demo.households:
            d = docs.get(h.name)
            if d is None:
                gone = "down" if h.process is None else f"down (exit {h.process.returncode})"
                parts.append(f"{h.name}: {'no answer' if h.alive else gone}")
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
    plan: Plan,
    directory: Path | None = None,
    out: Any = print,
    keep: bool = False,
    net_faults: str = "auto",
) -> NemesisResult:
    """Run ``plan`` on a fresh demo grid in ``directory`` (a temporary one when None; kept on
    failure or with ``keep``) and check the ledgers; never raises for a failed check.

    A plan with a ``partition`` or ``loss`` runs every node in a network namespace of its own
    (:class:`NetLab`) or, where namespaces cannot be made or ``net_faults`` is ``libp2p``,
    injects them through the nodes' libp2p fault injector (:class:`InjectorLab`; with
    ``net_faults="netns"`` they are skipped instead, :data:`NET_FAULT_MODES`); a
    ``disk_full`` target's data directory is a small tmpfs (:class:`DiskLab`). A fault that
    cannot be injected is skipped and the reason is printed and kept in
    :attr:`NemesisResult.unavailable`. Namespaces, bridge, nft tables and mounts are removed at
    the end whatever happens (the mounts' files are copied to disk first)."""
    if net_faults not in NET_FAULT_MODES:
        raise NemesisError(f"net_faults {net_faults!r}: one of {', '.join(NET_FAULT_MODES)}")
    result = NemesisResult(plan)
    started = time.monotonic()
    net: NetLab | None = None
    injector: InjectorLab | None = None
    if plan.needs_netlab and net_faults != "libp2p":
        lab = NetLab(plan.nodes)
        try:
            await trio.to_thread.run_sync(lab.setup)
            net = lab
            result.net_faults = "nftables in network namespaces"
        except LabUnavailable as exc:
            if net_faults == "netns":
                for kind in NETWORK_KINDS:
                    result.unavailable[kind.value] = f"no network namespaces: {exc}"
                out(f"nemesis: skipping {', '.join(k.value for k in NETWORK_KINDS)}: {exc}")
            else:
                out(f"nemesis: no network namespaces ({exc}): partition and loss through the "
                    "libp2p fault injector")  # fmt: skip
    if plan.needs_netlab and net is None and net_faults != "netns":
        injector = InjectorLab()
        result.net_faults = "the libp2p fault injector (MICROGRID_FAULTS_FILE)"
    clocks = injector if injector is not None or not plan.needs_faults_files else InjectorLab()
    settings = DemoSettings(
        households=plan.nodes, voters=plan.voters, slot_seconds=plan.timing.slot_seconds,
        dashboard=False, directory=directory, seed=plan.seed,
        raft_snapshot_entries=plan.snapshot_entries,
    )  # fmt: skip
    if net is not None:
        settings.hosts = tuple(net.host(i) for i in range(plan.nodes))
        settings.sim_host = net.gateway
        settings.node_prefixes = tuple(net.prefix(i) for i in range(plan.nodes))
    demo = Demo(settings, out=lambda _line: None)
    result.directory = demo.directory
    disks = DiskLab()
    runner = Runner(demo, plan, result, out, net=net, disks=disks, injector=injector,
                    clocks=clocks)  # fmt: skip

    async def before_start() -> None:
        if clocks is not None:  # every node follows its faults file from its first start
            clocks.prepare(demo.households)
        for name in plan.disk_targets:
            try:
                data = _household(demo, name).directory / "data"
                await trio.to_thread.run_sync(disks.mount, data)
            except LabUnavailable as exc:
                result.unavailable[Kind.DISK_FULL.value] = f"no tmpfs data directory: {exc}"
                out(f"nemesis: skipping disk_full: {exc}")
                return

    final: dict[str, dict[str, Any]] | None = None
    try:
        if net is not None:
            runner.log(f"network namespaces {net.namespace(0)}.. on bridge {net.bridge} "
                       f"({net.gateway}/24)")  # fmt: skip
        try:
            async with demo.running(quiesce_timeout=3 * plan.timing.slot_seconds,
                                    before_start=before_start):  # fmt: skip
                try:
                    final = await runner.play()
                finally:
                    with trio.CancelScope(shield=True):
                        await runner.release()
                        if clocks is not None:
                            clocks.clear_all()
        except Exception as exc:  # a harness error is a failed run, with its seed
            result.failures.append(f"run aborted: {exc.__class__.__name__}: {exc}")
            runner.log("".join(traceback.format_exception(exc))[-3000:])
        obs = runner.obs
        result.elections = len(obs.leaders)
        result.max_term = max((term for term, _ in obs.leaders), default=0)
        ledgers = {}
        for h in demo.households:
            ledgers[h.name] = await trio.to_thread.run_sync(read_ledger, h.ledger_url)
        check_ledgers(ledgers, obs.heads, final, result)
        check_gate_times(obs, demo.schedule, result)
        result.wall_s = time.monotonic() - started
        return result
    finally:
        for h in demo.households:  # nothing of ours may outlive the run
            if h.alive:
                demo.kill(h)
        for err in disks.unmount_all():
            result.failures.append(f"cleanup: {err}")
        if net is not None:
            for err in net.teardown():
                result.failures.append(f"cleanup: {err}")
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
    ap.add_argument("--nodes", type=int, default=None,
                    help="households (default 4; 3 with --sole-voter-jump)")  # fmt: skip
    ap.add_argument("--voters", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(k.value for k in DEFAULT_KINDS),
                    help=f"comma-separated, of: {', '.join(k.value for k in Kind)}; "
                         "'extended': every kind but outage")  # fmt: skip
    ap.add_argument("--cover", action="store_true", help="first steps use every kind once")
    ap.add_argument("--sole-voter-jump", action="store_true",
                    help="one voter and learners: the voter's running clock jumps minutes "
                         "ahead; it must hold every gate until its clock is right (ignores "
                         "--duration, --voters, --kinds)")  # fmt: skip
    ap.add_argument("--dir", type=Path, default=None, help="grid directory (default: temporary)")
    ap.add_argument("--keep", action="store_true", help="keep the grid directory after a pass")
    ap.add_argument("--plan", action="store_true", help="print the plan as JSON and exit")
    ap.add_argument("--net-faults", choices=NET_FAULT_MODES, default="auto",
                    help="partition and loss: nftables in network namespaces (netns), the "
                         "nodes' libp2p fault injector (libp2p), or namespaces where possible "
                         "(auto)")  # fmt: skip
    args = ap.parse_args(argv)
    duration = args.duration if args.duration is not None else (3600.0 if args.soak else 120.0)
    try:
        if args.sole_voter_jump:
            plan = sole_voter_jump_plan(args.seed, nodes=args.nodes or 3)
        else:
            names = args.kinds.replace("extended", ",".join(k.value for k in EXTENDED_KINDS))
            kinds = [Kind(k.strip()) for k in names.split(",") if k.strip()]
            plan = make_plan(args.seed, duration, nodes=args.nodes or 4, voters=args.voters,
                             kinds=kinds, cover=args.cover)  # fmt: skip
    except (ValueError, NemesisError) as exc:
        print(f"nemesis: {exc}", file=sys.stderr)
        return 2
    if args.plan:
        print(plan.to_json())
        return 0
    print(f"nemesis seed {plan.seed}: {len(plan.steps)} steps, faults {plan.counts()}")
    with contextlib.suppress(KeyboardInterrupt):
        result = trio.run(run_plan, plan, args.dir, print, args.keep, args.net_faults)
        print(result.table())
        return 0 if result.ok else 1
    print(f"interrupted; replay: {plan.replay_command()}")
    return 130


if __name__ == "__main__":
    sys.exit(main())
