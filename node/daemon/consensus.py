"""The trio shell around the Raft core: ticks, messages, persistence, proposals, applying.

One task owns the :class:`~node.raft.RaftNode` (it is not thread-safe and needs no locks that
way). Its loop: wait for a peer message or the next tick, step or tick the core, let the leader
propose due work, then drain ``Ready``: persist (in a worker thread: SQLite fsyncs), send,
apply committed entries through the :class:`~node.daemon.replica.Replica` (in a worker thread:
clearing a large book takes a while), ``advance``. Messages are sent only after what they
promise is on disk, as Raft requires.

Threads. While a worker thread runs, this task waits for it and nothing else may touch what the
worker touches: the storage's in-memory log (``save_ready`` updates it after its transaction),
the engine state (mutated in place) and the replica's applied index. So no other task, and no
other thread, reads the core, the storage or the replica: they read :attr:`ConsensusDriver.view`,
a :class:`ConsensusView` this task publishes whole (one reference) whenever no worker runs:
after each ``Ready`` that changed the core's state or applied entries, after compaction, and
otherwise at the first wake :data:`VIEW_REFRESH_SECONDS` or more after the last (counters and
peers' progress; the task wakes at least every tick).
What applying produced for others is handed over on this task too: the replica's
``observer`` (the proposer's ``committed``) and :attr:`on_applied` are called here, after the
worker returned, never from the worker.

Every ``snapshot_every`` applied entries it compacts the log. The core's checks and the update
of its in-memory log run in this task; serialising the engine state and the SQL run in a
worker thread, while this task waits for them, so nothing else steps the core or applies to
the replica meanwhile (other tasks only read the published :attr:`ConsensusDriver.view`).
A refusal (a membership change applied after the index) is counted as postponed and retried
after ``compact_retry_seconds``; any other failure is logged with its traceback, counted, and
retried after ``compact_failure_backoff`` seconds, while the node keeps applying.

Censorship. With a :class:`~node.daemon.censorship.CensorshipWatch`, the node hands
every valid record it sees or publishes to :meth:`ConsensusDriver.saw`; this task feeds the
watch the commands it applies (in log order), the leader it follows, and each slot boundary of
the wall clock. A new alert episode is logged once (a warning; the household's own records
have their own message). When the :class:`~node.daemon.censorship.DistrustPolicy` says so (a
voter, the same leader suspected for ``persist_slots`` more slots, at most once per
``min_interval_slots``) the core distrusts that leader for ``distrust_slots`` slots
(docs/raft.md, "Distrust").

Clocks. With a :class:`~node.daemon.clock.ClockWatch` (fed by the node's time sampler), every
``propose_every`` this task re-estimates how far the wall clock is off the grid's median and
logs when this node becomes or stops being *skewed* (``clock_skewed``/``clock_ok``) and when a
peer's clock starts or stops disagreeing (``peer_clock_off``/``peer_clock_ok``). As leader it
sets the proposer's :attr:`~node.daemon.proposer.Proposer.deadline_shift` (judge deadlines by
the grid's median clock) or :attr:`~node.daemon.proposer.Proposer.hold_deadlines` (skewed, or
not compared with any peer yet), and, skewed, hands leadership to the most caught-up voter whose
clock agrees (``transfer_leader``; at most once per slot). As follower it counts each
``CloseGate`` applied earlier than its own corrected clock allows (``early_gate_closure``) and,
as a voter, distrusts a leader that keeps doing it, as the censorship watch does. See
docs/node.md, "Clocks".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio

from market import CloseGate, Command, encode_batch
from market.events import Event
from market.models import SignedRecord
from node.daemon.censorship import CensorshipReport, CensorshipWatch, DistrustPolicy, sighting
from node.daemon.clock import ClockReport, ClockWatch
from node.daemon.membership import desired_roles, next_conf_change
from node.daemon.proposer import EngineView, Proposer
from node.daemon.replica import Replica
from node.raft import (
    ConfChangeRejected,
    EntryType,
    Message,
    NotLeader,
    ProposalDropped,
    RaftError,
    RaftNode,
    Ready,
    Snapshot,
    SnapshotMetadata,
    Status,
    Storage,
)
from node.raft.node import persist_compaction

log = logging.getLogger(__name__)


class Transport(Protocol):
    """Sends Raft messages to peers. Must not block: a slow peer's messages are dropped."""

    def send(self, message: Message) -> None:
        """Queue ``message`` for ``message.to``."""


@dataclass
class DriverStats:
    """Counters for metrics and the status API."""

    ticks: int = 0
    steps: int = 0
    proposals: int = 0
    proposed_commands: int = 0
    applied_entries: int = 0
    snapshots: int = 0
    """Log compactions done."""
    compactions_postponed: int = 0
    """Compactions refused by the core (a membership change pending): retried later."""
    compaction_failures: int = 0
    """Compactions that failed (storage error, a bug): logged with the traceback."""
    dropped_inbound: int = 0
    leader_changes: int = 0
    conf_changes_proposed: int = 0
    """Raft membership changes this node proposed as leader, following the grid's members."""
    distrusts: int = 0
    """Leaders this node distrusted for censoring (the core accepted the distrust)."""


@dataclass(frozen=True, slots=True)
class ConsensusView:
    """One consistent picture of the driver, taken on its task while no worker thread runs:
    the core's status, the replica's applied index and the engine's ledger summary as of that
    index, and the counters. Safe to read from any task or thread (it never changes)."""

    raft: Status
    applied_index: int
    height: int
    head_hash: str
    closed_through: int | None
    settled_through: int | None
    stats: DriverStats
    censorship: CensorshipReport | None = None
    """The censorship watch's report of the last slot boundary (None: no watch)."""
    distrusted: tuple[tuple[str, int], ...] = ()
    """Nodes the core distrusts now, with the ticks left."""
    clock: ClockReport | None = None
    """The clock watch's last assessment (None: no watch)."""

    def ledger(self) -> dict[str, object]:
        """The status document's ``ledger`` section."""
        return {"height": self.height, "head_hash": self.head_hash,
                "closed_through": self.closed_through,
                "settled_through": self.settled_through}  # fmt: skip


@dataclass
class _Applied:
    """What one batch of committed entries produced in the worker thread, for the driver's
    task: the commands applied (for the replica's observer) and each entry's events."""

    commands: list[Command] = field(default_factory=list)
    entries: list[tuple[int, list[Event]]] = field(default_factory=list)
    snapshot_installed: bool = False


DUE_LATE = 0.005
"""Seconds after a deadline at which the leader wakes to propose it (clock rounding)."""
DUE_MIN_WAIT = 0.01
"""Shortest wait for a deadline (a clock stepped back cannot make the driver spin)."""
VIEW_REFRESH_SECONDS = 0.2
"""How old the published view may get while only counters and peers' progress changed (a wake
whose ``Ready`` persisted, applied and changed nothing: a heartbeat, a response). Taking it
costs 50-100 us at 50 households (the core's status with every peer's progress, the clock
report over every peer), and a delegate voter wakes about a hundred times a second for its
learners' responses: it was about 5 % of such a voter's CPU, each view a copy of the last."""


@dataclass
class ConsensusDriver:
    """Drives one Raft peer and applies what commits."""

    raft: RaftNode
    storage: Storage
    replica: Replica
    proposer: Proposer
    transport: Transport
    tick_seconds: float = 0.1
    propose_every: float = 0.2
    snapshot_every: int = 5000
    """Compact the log after this many applied entries (0: never)."""
    snapshot_bytes: int = 1024 * 1024
    """...or once the entries written since the last compaction hold this many bytes (0: no
    bound): the storage keeps every entry since the snapshot in memory, and a large grid's
    entries are large (50 households: about 10 kB each, 5000 of them 50 MB; issue 19). 1 MiB
    is about 25 slots of 50 households, 300 of 3."""
    compact_retry_seconds: float = 1.0
    """Wait before retrying a postponed compaction (checks only: cheap)."""
    compact_failure_backoff: float = 60.0
    """Wait before retrying a failed compaction (not hot: it serialises the engine)."""
    wall_clock: Callable[[], float] = time.time
    inbox_size: int = 1024
    stats: DriverStats = field(default_factory=DriverStats)
    follow_membership: bool = True
    """As leader, change the Raft group to follow the grid's members (False: a fixed group,
    for tests that run one Raft peer for a market of several households)."""
    on_applied: Callable[[list[tuple[int, list[Event]]], bool], None] | None = None
    """Called on the driver's task after each batch of committed entries was applied, with
    ``(index, events)`` per entry and whether a snapshot from the leader was installed (the
    engine state may be read there: no worker runs). An exception stops the driver."""
    censorship: CensorshipWatch | None = None
    """Watches which records seen here the leader commits (None: no censorship detection)."""
    distrust_policy: DistrustPolicy = field(default_factory=DistrustPolicy)
    clock: ClockWatch | None = None
    """Compares this node's clock with its peers' (None: the wall clock is trusted as is)."""

    def __post_init__(self) -> None:
        self._inbox_send, self._inbox = trio.open_memory_channel[Message](self.inbox_size)
        self._last_snapshot = self.replica.applied_index
        self._log_bytes = 0
        """Entry bytes made durable since the last compaction (approximate: a trigger)."""
        self._compact_not_before = float("-inf")
        self._leader: str | None = None
        self._desired: tuple[int, dict] = (-1, {})
        """(applied index, :func:`~node.daemon.membership.desired_roles` at that index)."""
        self._slot: int | None = None
        """The wall-clock slot of the last censorship check."""
        self._disagreeing: frozenset[str] = frozenset()
        """Peers whose clock disagreed with the grid's at the last clock check."""
        self._holding = False
        """As leader, due deadlines were held back at the last clock check."""
        self._due_wall: float | None = None
        """As leader, the wall time of the next gate closure or settlement, until proposed."""
        if self.censorship is not None:
            state = self.replica.state
            self.censorship.sync(state.closed_through, state.settled_through)
        self.view: ConsensusView = self._take_view()
        """The latest :class:`ConsensusView` (replaced whole: read it from anywhere)."""
        self._view_at = -math.inf
        """When :attr:`view` was last published (trio time)."""

    def _take_view(self) -> ConsensusView:
        """On the driver's task, while no worker thread runs."""
        state = self.replica.state
        return ConsensusView(
            self.raft.status(), self.replica.applied_index, state.height, state.head_hash,
            state.closed_through, state.settled_through, replace(self.stats),
            None if self.censorship is None else self.censorship.report,
            tuple(sorted(self.raft.distrusted().items())),
            None if self.clock is None else self.clock.report(),
        )  # fmt: skip

    def publish_view(self) -> None:
        """Publish a fresh :attr:`view` (the driver's task)."""
        self.view = self._take_view()
        self._view_at = trio.current_time()

    def deliver(self, message: Message) -> None:
        """Hand a received message to the driver; dropped (and counted) when the inbox is full."""
        try:
            self._inbox_send.send_nowait(message)
        except trio.WouldBlock:
            self.stats.dropped_inbound += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled."""
        task_status.started()
        next_tick = trio.current_time() + self.tick_seconds
        next_propose = trio.current_time()
        while True:
            due = self._next_due()
            with trio.move_on_after(max(0.0, min(next_tick, due) - trio.current_time())):
                message = await self._inbox.receive()
                self._step(message)
                while True:  # drain what else arrived, then process it in one Ready
                    try:
                        self._step(self._inbox.receive_nowait())
                    except trio.WouldBlock:
                        break
            now = trio.current_time()
            if now >= next_tick:
                self.raft.tick()
                self.stats.ticks += 1
                next_tick = now + self.tick_seconds
            if now >= next_propose or now >= due:
                self._check_clock()
                self._propose()
                next_propose = now + self.propose_every
                self._due_wall = None  # the next deadline is looked up afresh
            self._check_slot()
            await self._drain_ready()

    def _next_due(self) -> float:
        """Leader: the monotonic time at which the next gate closure or settlement falls due
        (``Proposer.next_deadline``), so it is proposed then rather than at the next proposal
        tick (up to ``propose_every`` later); ``inf`` otherwise. A few milliseconds late, so
        the proposer, judging by the wall clock then, finds it due."""
        if self.raft.role != "leader":
            self._due_wall = None
            return math.inf
        wall = self.wall_clock()
        if self._due_wall is None:  # kept until a proposal: a wake just short of it retries
            self._due_wall = self.proposer.next_deadline(wall)
        if self._due_wall is None:
            return math.inf
        return trio.current_time() + max(DUE_MIN_WAIT, self._due_wall - wall + DUE_LATE)

    def _step(self, message: Message) -> None:
        self.stats.steps += 1
        self.raft.step(message)

    def _propose(self) -> None:
        if self.raft.role != "leader":
            return
        if self.follow_membership:
            self._follow_membership()
        state = self.replica.state
        batch = self.proposer.next_batch(
            self.wall_clock(),
            EngineView(state.closed_through, state.settled_through),
            self.raft.term,
        )
        if not batch:
            return
        try:
            self.raft.propose(encode_batch(batch))
        except (NotLeader, ProposalDropped):
            # lost leadership this instant, or handing it over: propose it all again later
            self.proposer.requeue()
            return
        self.stats.proposals += 1
        self.stats.proposed_commands += len(batch)

    def _follow_membership(self) -> None:
        """Leader: propose the next Raft membership change the grid's members call for (one
        at a time; the core refuses another while one is unapplied)."""
        applied = self.replica.applied_index
        if self._desired[0] != applied:
            self._desired = (applied, desired_roles(self.replica.state))
        status = self.raft.status()
        cc = next_conf_change(self._desired[1], status, known=self.replica.state.members)
        if cc is None:
            return
        try:
            self.raft.propose_conf_change(cc)
        except (ConfChangeRejected, NotLeader, ProposalDropped):
            return  # one is pending, or leadership moves: the next tick asks again
        self.stats.conf_changes_proposed += 1
        log.info(
            "membership change proposed: %s %s",
            cc.type.name,
            cc.node_id,
            extra={"event": "conf_change", "change": cc.type.name, "peer": cc.node_id},
        )

    async def _drain_ready(self) -> None:
        while self.raft.has_ready():
            rd = self.raft.ready()
            if rd.soft_state is not None and (rd.soft_state.leader or None) != self._leader:
                self._leader = rd.soft_state.leader or None
                if self._leader is not None:
                    self.stats.leader_changes += 1
                    if self.censorship is not None:
                        self.censorship.leader_changed(self._leader)
            if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
                # only then is there anything to make durable: a Ready of messages alone (a
                # heartbeat and its response) costs no worker thread and no SQL transaction
                await trio.to_thread.run_sync(self._persist, rd)
            for message in rd.messages:
                self.transport.send(message)
            if rd.committed_entries or rd.snapshot is not None:
                observer = self.replica.observer
                applied = _Applied()
                try:
                    await trio.to_thread.run_sync(self._apply, rd, applied)
                finally:  # back on this task: hand over what was applied, even before a failure
                    self._applied(observer, applied)
            self.raft.advance(rd)
            if (rd.soft_state is not None or rd.hard_state is not None or rd.entries
                    or rd.committed_entries or rd.snapshot is not None):  # fmt: skip
                self.publish_view()  # before the next worker: others read it meanwhile
        await self._maybe_compact()
        if trio.current_time() - self._view_at >= VIEW_REFRESH_SECONDS:
            self.publish_view()  # counters, peers' progress (VIEW_REFRESH_SECONDS)

    def _applied(self, observer: Callable[[Command], None] | None, applied: _Applied) -> None:
        """Driver's task: count, tell the observer and :attr:`on_applied` what was applied."""
        self.stats.applied_entries += len(applied.entries)
        watch = self.censorship
        if watch is not None:
            if applied.snapshot_installed:  # applied before the batch's entries
                state = self.replica.state
                watch.snapshot_installed(state.closed_through, state.settled_through)
            for command in applied.commands:
                watch.on_command(command)
        if self.clock is not None:
            for command in applied.commands:
                if isinstance(command, CloseGate):
                    self._gate_closed(command.slot)
        if observer is not None:
            for command in applied.commands:
                observer(command)
        if self.on_applied is not None and (applied.entries or applied.snapshot_installed):
            self.on_applied(applied.entries, applied.snapshot_installed)

    # -- censorship ------------------------------------------------------------------------

    def saw(self, record: SignedRecord) -> bool:
        """A valid record this node heard on gossip or published (the trio thread): watched
        until it commits. False without a watch, or when the watch already knows it."""
        if self.censorship is None:
            return False
        return self.censorship.seen(sighting(record, self.wall_clock(), self.proposer.schedule))

    def _check_slot(self) -> None:
        """At each wall-clock slot boundary: judge, log new alert episodes, maybe distrust."""
        if self.censorship is None:
            return
        slot = self.proposer.schedule.slot_at(self.wall_clock())
        if self._slot is None:
            self._slot = slot  # the first boundary is the next one
            return
        if slot <= self._slot:
            return
        self._slot = slot
        report = self.censorship.end_slot(slot)
        for household in report.new_alerts:
            suspicion = next(s for s in report.suspected if s.household == household)
            extra = {"event": "censorship_suspected", "household": household,
                     "leader": report.suspected_leader, "slot": slot,
                     "overdue": suspicion.overdue, "classes": list(suspicion.classes),
                     "oldest_age_slots": suspicion.oldest_age_slots}  # fmt: skip
            if household == self.raft.id:
                log.warning("this household's records are not committed while others' are: "
                            "the leader may be censoring it", extra=extra)  # fmt: skip
            else:
                log.warning("a household's records are not committed while others' are: the "
                            "leader may be censoring it", extra=extra)  # fmt: skip
        for household in report.cleared:
            log.info("censorship alert cleared", extra={
                "event": "censorship_cleared", "household": household, "slot": slot})  # fmt: skip
        status = self.raft.status()
        target = self.distrust_policy.decide(
            slot, report.suspected_leader, me=self.raft.id, leading=status.role == "leader",
            voter=self.raft.id in status.voters,
        )  # fmt: skip
        if target is None:
            return
        ticks = self.distrust_ticks()
        if self.raft.distrust(target, ticks):
            self.stats.distrusts += 1
            log.warning("distrusting the leader for censorship: not honouring its lease nor "
                        "voting for it", extra={"event": "distrust", "leader": target,
                                                "slot": slot, "ticks": ticks})  # fmt: skip

    # -- clocks ------------------------------------------------------------------------------

    def _check_clock(self) -> None:
        """Re-estimate this clock against the grid's; log changes; as leader steer the
        proposer and hand leadership away while skewed; as follower distrust a leader that
        keeps closing gates early (see the module docstring)."""
        clock = self.clock
        if clock is None:
            return
        mono = trio.current_time()
        was = clock.skewed
        est = clock.assess(mono, self.wall_clock())
        extra = {"offset": est.offset, "error": est.error, "peers_sampled": est.sampled,
                 "max_skew": clock.max_skew}  # fmt: skip
        if clock.skewed and not was:
            log.warning("this node's clock is off the grid's by %+.3f s (error %.3f s, bound "
                        "%.1f s): as leader it closes no gate and hands leadership away",
                        est.offset, est.error, clock.max_skew,
                        extra={"event": "clock_skewed", **extra})  # fmt: skip
        elif was and not clock.skewed:
            log.info("this node's clock agrees with the grid's again",
                     extra={"event": "clock_ok", **extra})  # fmt: skip
        off = {p.peer: p for p in est.disagreeing(clock.max_skew)}
        for peer in sorted(set(off) - self._disagreeing):
            ahead = (est.offset or 0.0) - off[peer].offset
            log.warning("a peer's clock is off the grid's by %+.3f s", ahead,
                        extra={"event": "peer_clock_off", "peer": peer,
                               "peer_offset": ahead})  # fmt: skip
        for peer in sorted(self._disagreeing - set(off)):
            log.info("a peer's clock agrees with the grid's again",
                     extra={"event": "peer_clock_ok", "peer": peer})  # fmt: skip
        self._disagreeing = frozenset(off)
        status = self.raft.status()
        me = self.raft.id
        proposer = self.proposer
        if status.role != "leader":
            proposer.hold_deadlines, proposer.deadline_shift, self._holding = False, 0.0, False
            target = clock.distrust_target(self._leader, mono, me=me, leading=False,
                                           voter=me in status.voters)  # fmt: skip
            if target is not None and self.raft.distrust(target, self.distrust_ticks()):
                log.warning("distrusting the leader: it keeps closing gates early",
                            extra={"event": "distrust", "leader": target,
                                   "reason": "early_gate_closures"})  # fmt: skip
            return
        local = self.wall_clock()
        # a leader with other voters is connected to a quorum of them, which it samples
        # within seconds; a sole voter has no one whose clock it must wait for (its learners
        # may all be down)
        alone = not set(status.voters) - {me}
        due_at = clock.deadline_time(local, mono, alone=alone)
        if due_at is None:
            proposer.hold_deadlines = True
            state = self.replica.state
            due = proposer.deadlines_due(local, EngineView(state.closed_through,
                                                           state.settled_through))  # fmt: skip
            if due and not self._holding:
                clock.note_held()
                log.warning("holding back due gate closures and settlements: this node's clock "
                            "is %s", "skewed" if clock.skewed else "not compared with any peer yet",
                            extra={"event": "deadlines_held", **extra})  # fmt: skip
            self._holding = due
        else:
            proposer.hold_deadlines, proposer.deadline_shift = False, local - due_at
            self._holding = False
        if clock.skewed and status.lead_transferee is None:
            matches = {peer: match for peer, (match, _next, _state) in status.progress.items()}
            target = clock.transfer_target(me, status.voters, matches)
            if target is not None and clock.may_transfer(mono):
                self.raft.transfer_leader(target)
                log.warning("handing leadership to %s: this node's clock is skewed", target,
                            extra={"event": "clock_transfer", "to": target, **extra})  # fmt: skip

    def _gate_closed(self, slot: int) -> None:
        """A ``CloseGate`` of ``slot`` was applied: count it if the leader closed it early."""
        assert self.clock is not None
        if self.raft.role == "leader":
            return  # our own proposal: judged by our own (corrected) clock already
        gate = self.proposer.schedule.gate_time(slot)
        local = self.wall_clock()
        if self.clock.gate_closed(gate, local, self._leader):
            log.warning("the leader closed the gate of slot %d %.1f s early by this node's clock",
                        slot, gate - local, extra={"event": "early_gate_closure", "slot": slot,
                                                   "leader": self._leader,
                                                   "early_seconds": gate - local})  # fmt: skip

    def distrust_ticks(self) -> int:
        """How long a distrust lasts, in ticks: ``distrust_slots`` slots, and at least four
        maximal election timeouts (time for the others to distrust too and elect)."""
        slots = self.distrust_policy.distrust_slots * self.proposer.schedule.slot_seconds
        return max(math.ceil(slots / self.tick_seconds), 8 * self.raft.config.election_tick)

    def _persist(self, rd: Ready) -> None:
        """Worker thread: make ``rd`` durable. SQLStorage also updates its in-memory log here,
        after the transaction: the core is not stepped and no one else reads the storage
        meanwhile (they read :attr:`view`)."""
        self._log_bytes += sum(len(e.data) for e in rd.entries)
        save_ready = getattr(self.storage, "save_ready", None)
        if save_ready is not None:  # SQLStorage: the whole Ready in one transaction
            save_ready(rd)
            return
        if rd.snapshot is not None:
            self.storage.apply_snapshot(rd.snapshot)
        if rd.entries:
            self.storage.append(list(rd.entries))
        if rd.hard_state is not None:
            self.storage.set_hard_state(rd.hard_state)

    def _apply(self, rd: Ready, out: _Applied) -> None:
        """Worker thread: apply ``rd``'s snapshot and committed entries, collecting into ``out``
        what the driver's task hands over afterwards. The replica's observer is routed into
        ``out`` meanwhile (restored after), so it is never called from this thread."""
        replica = self.replica
        observer, replica.observer = replica.observer, out.commands.append
        try:
            if rd.snapshot is not None and rd.snapshot.metadata.index > replica.applied_index:
                replica.install_snapshot(rd.snapshot.metadata.index, rd.snapshot.data)
                out.snapshot_installed = True
            for entry in rd.committed_entries:
                data = entry.data if entry.type == EntryType.NORMAL else b""
                out.entries.append((entry.index, replica.apply_entry(entry.index, data)))
        finally:
            replica.observer = observer

    async def _maybe_compact(self) -> None:
        applied = self.replica.applied_index
        held = self.storage.snapshot().metadata.index  # e.g. one installed from the leader
        if held > self._last_snapshot:
            self._last_snapshot, self._log_bytes = held, 0
        due = self.snapshot_every and applied - self._last_snapshot >= self.snapshot_every
        full = self.snapshot_bytes and self._log_bytes >= self.snapshot_bytes
        if applied <= self._last_snapshot or not (due or full):
            return
        if trio.current_time() < self._compact_not_before:
            return
        try:  # on this task: the core is not thread-safe
            meta = self.raft.compaction_metadata(applied)
        except RaftError as exc:  # a membership change applied after `applied`: expected
            self.stats.compactions_postponed += 1
            self._compact_not_before = trio.current_time() + self.compact_retry_seconds
            log.info("log compaction at %d postponed: %s", applied, exc)
            return
        try:
            snap = await trio.to_thread.run_sync(self._write_compaction, meta)
            self.raft.adopt_compaction(snap)  # back on this task: the core's in-memory log
        except Exception:
            self.stats.compaction_failures += 1
            self._compact_not_before = trio.current_time() + self.compact_failure_backoff
            log.exception(
                "log compaction at %d failed; the log keeps growing, retry in %.0f s",
                applied,
                self.compact_failure_backoff,
            )
            return
        self._last_snapshot, self._log_bytes = applied, 0
        self.stats.snapshots += 1
        self.publish_view()

    def _write_compaction(self, meta: SnapshotMetadata) -> Snapshot:
        """Worker thread: serialise the engine state and write the snapshot durably. The driver
        task waits for it, so the replica does not change and the core is not stepped."""
        index, data = self.replica.snapshot()
        if index != meta.index:
            raise RuntimeError(f"replica at {index} while compacting at {meta.index}")
        snap = Snapshot(meta, data)
        persist_compaction(self.storage, snap)
        return snap
