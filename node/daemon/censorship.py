"""Censorship detection: is the Raft leader silently dropping one household's records?

Pure: no I/O, no clock. The node tells a :class:`CensorshipWatch` which valid records it saw or
published (:meth:`~CensorshipWatch.seen`, a :class:`Sighting` made by :func:`sighting` from the
record and the wall time the caller read), which commands the replica applied, in log order
(:meth:`~CensorshipWatch.on_command`: a record accepted *or* rejected by the engine counts as
committed, the leader did not drop it; ``CloseGate``/``SettleSlot`` are deadlines), who leads,
and when a slot ends (:meth:`~CensorshipWatch.end_slot`, which returns a
:class:`CensorshipReport`). A :class:`DistrustPolicy` turns reports that keep accusing the same
leader into a bounded Raft ``distrust`` (docs/raft.md, "Distrust").

The rule (docs/node.md, "Censorship alerts"). A record is *failing* when this node saw it in
time for the leader to propose it and either

- it is still uncommitted ``after_slots`` (N) slots after it was seen, or
- its deadline passed first: the ``CloseGate`` of its slot (orders; a governance record's
  ``from_slot``) or the ``SettleSlot`` of its slot (meter and feeder readings) was applied while
  it was still uncommitted. The engine would now refuse it (``gate_closed``,
  ``slot_settled``, ``effective_slot_closed``): it is *missed*, and it stays missed even if the
  leader commits it later, so a leader cannot censor by holding a record until the engine must
  refuse it, nor by closing a gate early.

A record seen too late to be proposable (after its deadline's wall time minus a grace for
gossip to reach the leader, :func:`proposal_grace`, or after this node applied the deadline)
expires silently when its deadline is applied: the household was late, not censored.

A household H is *suspected* at a slot boundary when, for one class of its records (orders,
readings, feeder readings, governance), it has a failing record seen at slot ``s`` at least N
slots ago, no record of that class of H seen at ``s`` or later was committed in time (one glitch
is cleared by the next record that gets through), and some other household had a record seen at
``s`` or later committed in time (the leader was serving the others: a stalled grid, or this
node partitioned away, accuses no one). Evidence counts against the current leader only: ages
run from when it became leader (as this node learned it), and missed records are forgiven when
the leader changes. The report names the leader suspected.

Bounded memory: at most ``max_per_household`` uncommitted records per household and
``max_records`` in all (the oldest dropped and counted), ``max_committed`` keys of committed
records (to ignore a copy gossiped again after it committed), and nothing older than
``retain_slots``. A Raft snapshot installed from the leader skips commands: what was uncommitted
is then forgotten (counted as ``unknown``).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from market.models import (
    CancelOrder,
    CloseGate,
    FeederReading,
    GovernanceRecord,
    MeterReading,
    Order,
    SettleSlot,
    SignedRecord,
)
from market.schedule import Schedule

RecordKey = tuple[str, str, int]
"""(kind, signer DID, nonce): one record of one signer, whatever its bytes."""

RecordClass = Literal["order", "reading", "feeder", "governance"]
MAX_GRACE_SECONDS = 2.0
"""At most this long before its deadline a record must have been seen to count as proposable."""


class Deadline(NamedTuple):
    """The applied command after which the engine refuses a record: ``("gate", slot)`` for
    ``CloseGate(slot)``, ``("settle", slot)`` for ``SettleSlot(slot)``."""

    kind: Literal["gate", "settle"]
    slot: int


@dataclass(frozen=True, slots=True)
class Sighting:
    """One valid record this node saw or published, as the watch needs it."""

    key: RecordKey
    household: str
    """The signer's DID (the grid operator's for feeder readings and governance records)."""
    cls: RecordClass
    slot: int
    """The wall-clock slot it was seen in."""
    deadline: Deadline | None
    """When the engine stops accepting it (None: a cancellation, judged by age alone)."""
    timely: bool
    """Seen early enough for the leader to propose it before its deadline."""


def record_key(record: SignedRecord) -> RecordKey:
    """The record's stable key: kind, signer, nonce."""
    return (record.KIND, record.author, record.nonce)


def record_class(record: SignedRecord) -> RecordClass:
    """Which class of records ``record`` is judged with."""
    if isinstance(record, MeterReading):
        return "reading"
    if isinstance(record, FeederReading):
        return "feeder"
    if isinstance(record, GovernanceRecord):
        return "governance"
    return "order"


def deadline_of(record: SignedRecord) -> Deadline | None:
    """The command after which the engine refuses ``record`` (None: no such command)."""
    if isinstance(record, Order):
        return Deadline("gate", record.slot)
    if isinstance(record, MeterReading | FeederReading):
        return Deadline("settle", record.slot)
    if isinstance(record, GovernanceRecord):
        return Deadline("gate", record.from_slot)
    return None


def deadline_time(deadline: Deadline, schedule: Schedule) -> int:
    """The wall time at which the leader proposes ``deadline``'s command."""
    if deadline.kind == "gate":
        return schedule.gate_time(deadline.slot)
    return schedule.settle_time(deadline.slot)


def proposal_grace(schedule: Schedule) -> float:
    """How long before its deadline a record must be seen to count as proposable: time for
    gossip to reach the leader and for clocks to differ. Half the settle delay (readings are
    signed just after their slot ends and are due ``settle_delay`` later), at most
    :data:`MAX_GRACE_SECONDS`."""
    return min(MAX_GRACE_SECONDS, schedule.settle_delay_seconds / 2)


def sighting(
    record: SignedRecord, now: float, schedule: Schedule, grace: float | None = None
) -> Sighting:
    """What the watch records for ``record`` seen at wall time ``now`` (read by the caller)."""
    deadline = deadline_of(record)
    if grace is None:
        grace = proposal_grace(schedule)
    timely = deadline is None or now <= deadline_time(deadline, schedule) - grace
    return Sighting(record_key(record), record.author, record_class(record),
                    schedule.slot_at(now), deadline, timely)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Suspicion:
    """One suspected household at one slot boundary."""

    household: str
    overdue: int
    """Its failing records (overdue or missed), counted in the rule."""
    uncommitted: int
    """All its records this node tracks as not committed (failing or not yet)."""
    oldest_age_slots: int
    """Slots since the oldest failing record was seen."""
    classes: tuple[str, ...]
    since_slot: int
    """The slot boundary at which this alert episode began."""

    def to_json(self) -> dict[str, Any]:
        """The status document's form."""
        return {"household": self.household, "overdue": self.overdue,
                "uncommitted": self.uncommitted, "oldest_age_slots": self.oldest_age_slots,
                "classes": list(self.classes), "since_slot": self.since_slot}  # fmt: skip


@dataclass(frozen=True, slots=True)
class CensorshipReport:
    """What the watch concluded at one slot boundary (immutable: safe to read anywhere)."""

    own: str
    after_slots: int
    slot: int | None = None
    leader: str | None = None
    leader_since: int | None = None
    suspected: tuple[Suspicion, ...] = ()
    suspected_leader: str | None = None
    """The leader the suspicions are evidence against (None: no suspicion, or no leader)."""
    own_suspected: bool = False
    own_uncommitted: int = 0
    new_alerts: tuple[str, ...] = ()
    """Households whose alert episode began at this boundary (log once per episode)."""
    cleared: tuple[str, ...] = ()
    """Households whose alert episode ended at this boundary."""
    tracked: int = 0
    """Uncommitted records tracked now (missed ones included)."""
    counters: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The status document's ``censorship`` section (without the distrust part)."""
        own = next((s for s in self.suspected if s.household == self.own), None)
        return {
            "slot": self.slot, "after_slots": self.after_slots, "leader": self.leader,
            "leader_since": self.leader_since, "suspected_leader": self.suspected_leader,
            "suspected": [s.to_json() for s in self.suspected],
            "own": {"suspected": self.own_suspected, "uncommitted": self.own_uncommitted,
                    "oldest_age_slots": None if own is None else own.oldest_age_slots},
            "tracked": self.tracked, "counters": dict(sorted(self.counters.items())),
        }  # fmt: skip


@dataclass(slots=True)
class _Tracked:
    household: str
    cls: RecordClass
    slot: int
    deadline: Deadline | None
    timely: bool


COUNTER_NAMES = ("seen", "committed", "committed_late", "missed", "expired_late",
                 "dropped", "aged_out", "unknown", "forgiven", "alerts")  # fmt: skip
"""The watch's counters: records seen, committed in time, committed after they were missed,
missed (their deadline applied first), expired because they were seen too late, dropped by
the memory caps, aged out, forgotten at a snapshot install, missed ones forgiven at a leader
change; and alert episodes."""


class CensorshipWatch:
    """Which valid records seen here the leader commits, per household (module docstring)."""

    def __init__(
        self,
        own: str,
        *,
        after_slots: int = 3,
        retain_slots: int = 16,
        max_per_household: int = 256,
        max_records: int = 4096,
        max_committed: int = 8192,
    ) -> None:
        if after_slots < 1 or retain_slots <= after_slots:
            raise ValueError("need 1 <= after_slots < retain_slots")
        if max_per_household < 1 or max_records < max_per_household or max_committed < 1:
            raise ValueError("memory caps must be positive, max_records >= max_per_household")
        self.own = own
        self.after_slots = after_slots
        self.retain_slots = retain_slots
        self.max_per_household = max_per_household
        self.max_records = max_records
        self.max_committed = max_committed
        self.pending: OrderedDict[RecordKey, _Tracked] = OrderedDict()
        """Uncommitted records before their deadline, oldest first."""
        self.missed: OrderedDict[RecordKey, _Tracked] = OrderedDict()
        """Timely records whose deadline was applied first (kept as evidence)."""
        self._per_household: Counter[str] = Counter()
        self._by_deadline: dict[Deadline, set[RecordKey]] = {}
        self._committed: OrderedDict[RecordKey, int] = OrderedDict()
        """Records the log holds -> the slot boundary they were committed after (so a copy
        seen later is not tracked again); kept for ``retain_slots``, at most
        ``max_committed``."""
        self.served: dict[tuple[str, str], int] = {}
        """(household, class) -> latest seen slot of one of its records committed in time."""
        self._served_household: dict[str, int] = {}
        self.closed_through: int | None = None
        self.settled_through: int | None = None
        self.slot: int | None = None
        self.leader: str | None = None
        self.leader_since: int | None = None
        self._episodes: dict[str, int] = {}
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTER_NAMES})
        self.report = CensorshipReport(own, after_slots)
        """The report of the last slot boundary."""

    # -- inputs ----------------------------------------------------------------------------

    def sync(self, closed_through: int | None, settled_through: int | None) -> None:
        """The engine's committed gates and settlements (at start, before any command)."""
        self.closed_through, self.settled_through = closed_through, settled_through

    def seen(self, s: Sighting) -> bool:
        """Track a valid record seen or published here; False if it is already tracked,
        committed, judged, or its deadline was already applied (seen too late: expired)."""
        key = s.key
        if key in self.pending or key in self.missed or key in self._committed:
            return False
        if s.deadline is not None and self._passed(s.deadline):
            self.counters["expired_late"] += 1
            return False
        self.counters["seen"] += 1
        self.pending[key] = _Tracked(s.household, s.cls, s.slot, s.deadline, s.timely)
        self._per_household[s.household] += 1
        if s.deadline is not None:
            self._by_deadline.setdefault(s.deadline, set()).add(key)
        if self._per_household[s.household] > self.max_per_household:
            oldest = next(k for k, t in self.pending.items() if t.household == s.household)
            self._forget(oldest)
            self.counters["dropped"] += 1
        while len(self.pending) + len(self.missed) > self.max_records:
            source = self.missed if self.missed else self.pending
            oldest = next(iter(source))
            self._forget(oldest)
            self.counters["dropped"] += 1
        return True

    def on_command(self, command: object) -> None:
        """One command the replica applied (accepted or rejected), in log order."""
        if isinstance(command, CloseGate):
            self.deadline(Deadline("gate", command.slot))
        elif isinstance(command, SettleSlot):
            self.deadline(Deadline("settle", command.slot))
        elif isinstance(command, Order | CancelOrder | MeterReading | FeederReading
                        | GovernanceRecord):  # fmt: skip
            self.committed(record_key(command))

    def committed(self, key: RecordKey) -> None:
        """The record ``key`` reached the log (the engine accepted or rejected it)."""
        tracked = self.pending.get(key)
        if tracked is not None:
            self._forget(key)
            self.counters["committed"] += 1
            pair = (tracked.household, tracked.cls)
            self.served[pair] = max(self.served.get(pair, tracked.slot), tracked.slot)
            h = tracked.household
            self._served_household[h] = max(self._served_household.get(h, tracked.slot),
                                            tracked.slot)  # fmt: skip
        elif key in self.missed:
            self.counters["committed_late"] += 1  # still missed: the engine refused it
        self._committed[key] = -1 if self.slot is None else self.slot
        self._committed.move_to_end(key)
        while len(self._committed) > self.max_committed:
            self._committed.popitem(last=False)

    def deadline(self, deadline: Deadline) -> None:
        """``deadline``'s command was applied: uncommitted records due by then are missed
        (seen in time) or expire (seen too late)."""
        if deadline.kind == "gate":
            self.closed_through = max(self.closed_through or deadline.slot, deadline.slot)
        else:
            self.settled_through = max(self.settled_through or deadline.slot, deadline.slot)
        due = [d for d in self._by_deadline if d.kind == deadline.kind and d.slot <= deadline.slot]
        for d in due:
            for key in sorted(self._by_deadline.pop(d)):
                tracked = self.pending.pop(key)
                if tracked.timely:
                    self.missed[key] = tracked
                    self.counters["missed"] += 1
                else:
                    self._per_household[tracked.household] -= 1
                    self.counters["expired_late"] += 1

    def snapshot_installed(self, closed_through: int | None, settled_through: int | None) -> None:
        """A Raft snapshot from the leader replaced the engine state: the commands it covers
        were never seen here one by one, so what was uncommitted is forgotten."""
        self.counters["unknown"] += len(self.pending) + len(self.missed)
        self.pending.clear()
        self.missed.clear()
        self._per_household.clear()
        self._by_deadline.clear()
        self.sync(closed_through, settled_through)

    def leader_changed(self, leader: str | None) -> None:
        """This node learned the current leader (None: none known; keeps the last one). A new
        leader starts with a clean record: missed records are forgiven, ages restart."""
        if not leader or leader == self.leader:
            return
        self.leader = leader
        self.leader_since = self.slot
        for key in list(self.missed):
            self._forget(key)
            self.counters["forgiven"] += 1

    # -- the slot boundary -----------------------------------------------------------------

    def end_slot(self, slot: int) -> CensorshipReport:
        """Slot ``slot`` began: age, judge and report (also kept as :attr:`report`)."""
        self.slot = slot
        horizon = slot - self.retain_slots
        for source in (self.pending, self.missed):
            for key in [k for k, t in source.items() if t.slot < horizon]:
                self._forget(key)
                self.counters["aged_out"] += 1
        # a committed record's deadline is long applied by now: a late copy is refused as
        # expired without this memory of it (commit order is slot order: oldest first)
        while self._committed and next(iter(self._committed.values())) < horizon:
            self._committed.popitem(last=False)
        start = self.leader_since if self.leader_since is not None else horizon
        failing: dict[str, dict[str, list[int]]] = {}
        uncommitted: Counter[str] = Counter()
        for source in (self.pending, self.missed):
            for key, t in list(source.items()):
                uncommitted[t.household] += 1
                served = self.served.get((t.household, t.cls))
                if served is not None and t.slot <= served:
                    if source is self.missed:  # a later record got through: a glitch
                        self._forget(key)
                        uncommitted[t.household] -= 1
                    continue
                overdue = source is self.missed or t.timely
                if overdue and slot - max(t.slot, start) >= self.after_slots:
                    failing.setdefault(t.household, {}).setdefault(t.cls, []).append(t.slot)
        best = sorted(((s, h) for h, s in self._served_household.items()), reverse=True)[:2]
        suspected: list[Suspicion] = []
        for household, classes in sorted(failing.items()):
            others = [s for s, h in best if h != household]
            if not others:
                continue
            hit = {c: slots for c, slots in classes.items() if min(slots) <= others[0]}
            if not hit:
                continue
            first = min(min(slots) for slots in hit.values())
            since = self._episodes.setdefault(household, slot)
            suspected.append(Suspicion(household, sum(len(s) for s in hit.values()),
                                       uncommitted[household], slot - first,
                                       tuple(sorted(hit)), since))  # fmt: skip
        names = {s.household for s in suspected}
        new = tuple(s.household for s in suspected if s.since_slot == slot)
        cleared = tuple(sorted(h for h in self._episodes if h not in names))
        for h in cleared:
            del self._episodes[h]
        self.counters["alerts"] += len(new)
        self.report = CensorshipReport(
            own=self.own, after_slots=self.after_slots, slot=slot, leader=self.leader,
            leader_since=self.leader_since, suspected=tuple(suspected),
            suspected_leader=self.leader if suspected else None,
            own_suspected=self.own in names, own_uncommitted=uncommitted[self.own],
            new_alerts=new, cleared=cleared, tracked=len(self.pending) + len(self.missed),
            counters=dict(self.counters),
        )  # fmt: skip
        return self.report

    # -- helpers ---------------------------------------------------------------------------

    def _passed(self, deadline: Deadline) -> bool:
        through = self.closed_through if deadline.kind == "gate" else self.settled_through
        return through is not None and deadline.slot <= through

    def _forget(self, key: RecordKey) -> None:
        tracked = self.pending.pop(key, None)
        if tracked is None:
            tracked = self.missed.pop(key, None)
            if tracked is None:
                return
        elif tracked.deadline is not None:
            keys = self._by_deadline.get(tracked.deadline)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_deadline[tracked.deadline]
        self._per_household[tracked.household] -= 1
        if self._per_household[tracked.household] <= 0:
            del self._per_household[tracked.household]


@dataclass
class DistrustPolicy:
    """When a voter distrusts its leader for censorship: the same leader suspected at
    ``persist_slots`` (M) more slot boundaries after the first, this node a voter and not the
    leader, and at most one distrust per ``min_interval_slots`` (K) slots (so alerts cannot be
    used to flap leadership). A distrust lasts ``distrust_slots`` slots (at least a few election
    timeouts: the driver converts it to ticks)."""

    persist_slots: int = 2
    min_interval_slots: int = 8
    distrust_slots: int = 2
    last_slot: int | None = None
    """The slot boundary of the last distrust."""
    last_target: str | None = None
    count: int = 0
    _suspect: tuple[str, int] | None = None

    def decide(self, slot: int, suspected_leader: str | None, *, me: str, leading: bool,
               voter: bool) -> str | None:  # fmt: skip
        """At the boundary of ``slot``: the leader to distrust now, or None."""
        if suspected_leader is None or suspected_leader == me:
            self._suspect = None
            return None
        if self._suspect is None or self._suspect[0] != suspected_leader:
            self._suspect = (suspected_leader, slot)
        if slot - self._suspect[1] < self.persist_slots or leading or not voter:
            return None
        if self.last_slot is not None and slot - self.last_slot < self.min_interval_slots:
            return None
        self.last_slot, self.last_target = slot, suspected_leader
        self.count += 1
        return suspected_leader
