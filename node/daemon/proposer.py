"""What the Raft leader proposes: batches of gossiped records, gate closures, settlements.

Sans-I/O: the node calls :meth:`Proposer.offer` with every validated record it hears,
:meth:`Proposer.committed` with every record that reached the log, and :meth:`Proposer.next_batch`
with the time, the engine's committed view and the leader's Raft term whenever it may propose.

A proposal sits in the leader's log, and a leader never drops an entry of its own term: it
commits, or the term ends (the leader steps down, a new one may overwrite it). So what is in
flight goes back to the queue when the term changes, and within one term only after
``retry_after`` seconds, a backstop. Re-proposing is harmless (the engine rejects the duplicate
nonce deterministically) but not free: under load, when commits take seconds, a short timer
re-proposed a whole slot boundary's records while the first copies were still on their way and
doubled the log's traffic just when it was busiest (issue 19: 50 households on two cores).

Clocks (docs/node.md, "Clocks"). Gate closures and settlements are due by the wall clock, and a
leader's clock can be off the grid's. The driver sets :attr:`Proposer.deadline_shift` (the clock
watch's estimate of how far this clock is ahead of the grid's median, plus its error) and
:attr:`Proposer.hold_deadlines` (this clock is not trusted now: skewed, or not compared with any
peer yet); records are proposed either way, since the engine judges them against the gates that
committed, not against anyone's clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from market import CancelOrder, CloseGate, Command, MeterReading, Order, SettleSlot
from market.models import FeederReading, GovernanceRecord, record_hash
from market.schedule import Schedule

Record = Order | CancelOrder | MeterReading | FeederReading | GovernanceRecord


@dataclass(frozen=True, slots=True)
class EngineView:
    """The committed engine state the leader plans from."""

    closed_through: int | None
    settled_through: int | None


@dataclass
class Proposer:
    """Queues records and decides the leader's next proposal."""

    schedule: Schedule
    max_batch: int = 512
    retry_after: float = 30.0
    """Seconds after which a proposal of the current term that has not committed is proposed
    again: a backstop (a term change requeues at once), so well above a congested commit."""
    pending: dict[bytes, Record] = field(default_factory=dict)
    in_flight: dict[bytes, tuple[float, Record]] = field(default_factory=dict)
    _system_in_flight: dict[tuple[str, int], float] = field(default_factory=dict)
    deadline_shift: float = 0.0
    """Seconds subtracted from ``now`` when judging which gates and settlements are due (the
    clock watch's correction towards the grid's median clock); retries use ``now`` as is."""
    hold_deadlines: bool = False
    """Propose no gate closure or settlement (records still go): the leader's clock is not
    trusted now (node/daemon/clock.py)."""
    term: int | None = None
    """The Raft term of what is in flight (set by :meth:`next_batch`)."""

    def offer(self, record: Record) -> bool:
        """Queue a validated record; False if it is already queued or in flight."""
        key = record_hash(record)
        if key in self.pending or key in self.in_flight:
            return False
        self.pending[key] = record
        return True

    def committed(self, command: Command) -> None:
        """A command reached the log (accepted or rejected): never propose it again."""
        if isinstance(
            command, Order | CancelOrder | MeterReading | FeederReading | GovernanceRecord
        ):
            key = record_hash(command)
            self.pending.pop(key, None)
            self.in_flight.pop(key, None)
        elif isinstance(command, CloseGate):
            self._system_in_flight.pop(("gate", command.slot), None)
        elif isinstance(command, SettleSlot):
            self._system_in_flight.pop(("settle", command.slot), None)

    def requeue(self) -> None:
        """Everything in flight may be lost (the term changed, or the core refused the last
        proposal): queue its records again and let due deadlines be proposed again."""
        for key, (_, record) in self.in_flight.items():
            self.pending.setdefault(key, record)
        self.in_flight.clear()
        self._system_in_flight.clear()

    def next_batch(self, now: float, view: EngineView, term: int | None = None) -> list[Command]:
        """Commands to propose now, in the order they must apply (may be empty).

        Records come first so that orders submitted before a gate deadline make it into the
        slot; then due gate closures and settlements, strictly in slot order, judged at
        ``now - deadline_shift`` (none while :attr:`hold_deadlines`). ``term`` is the leader's
        Raft term: when it differs from the last call's, what was in flight is proposed again.
        """
        if term != self.term:
            self.requeue()
            self.term = term
        for key, (sent, record) in list(self.in_flight.items()):
            if now - sent >= self.retry_after:
                del self.in_flight[key]
                self.pending[key] = record
        batch: list[Command] = []
        for key in list(self.pending)[: self.max_batch]:
            record = self.pending.pop(key)
            self.in_flight[key] = (now, record)
            batch.append(record)
        if not self.hold_deadlines:
            batch.extend(self._system_commands(now - self.deadline_shift, now, view))
        return batch

    def deadlines_due(self, now: float, view: EngineView) -> bool:
        """True if a gate closure or settlement is due at ``now`` (unshifted, ignoring what
        is in flight): whether holding deadlines back holds anything back."""
        due_gate = self.schedule.last_due_gate(now)
        closed = view.closed_through
        if closed is None or closed < due_gate:
            return True
        settled = view.settled_through
        first = closed + 1 if settled is None else settled + 1  # as _system_commands
        return first <= closed and self.schedule.settle_time(first) <= now

    def next_deadline(self, now: float) -> float | None:
        """The next wall time (this node's clock, as ``now``) after ``now`` at which a gate
        closure or a settlement falls due, by the grid's clock (:attr:`deadline_shift`
        added); None while :attr:`hold_deadlines` (the clock check decides when they go).

        The driver proposes every ``propose_every`` seconds (0.2 s), so a settlement that
        falls due between two proposals waits for the next one (0.1 s on average); a driver
        that also wakes at this time proposes it at once. It may be a deadline the grid met
        already (a slot another leader settled earlier): then the wake-up proposes nothing."""
        if self.hold_deadlines:
            return None
        shifted = now - self.deadline_shift
        sch = self.schedule
        gate = sch.gate_time(sch.open_slot(shifted))
        settle = sch.settle_time(
            math.floor((shifted - sch.settle_delay_seconds) / sch.slot_seconds)
        )
        return min(gate, settle) + self.deadline_shift

    def _system_commands(self, due: float, now: float, view: EngineView) -> list[Command]:
        """Gate closures and settlements due at wall time ``due`` (``now``: for retries)."""
        out: list[Command] = []
        due_gate = self.schedule.last_due_gate(due)
        closed = view.closed_through
        next_gate = due_gate if closed is None else closed + 1
        while next_gate <= due_gate:
            if self._claim(("gate", next_gate), now):
                out.append(CloseGate(slot=next_gate))
            next_gate += 1
            if closed is None:
                break  # the first gate is the most recent due one; the rest follow
        last_closed = next_gate - 1
        if view.settled_through is not None or closed is not None:
            settled = view.settled_through if view.settled_through is not None else last_closed
            slot = settled + 1
            while slot <= last_closed and self.schedule.settle_time(slot) <= due:
                if self._claim(("settle", slot), now):
                    out.append(SettleSlot(slot=slot))
                slot += 1
        return out

    def _claim(self, key: tuple[str, int], now: float) -> bool:
        sent = self._system_in_flight.get(key)
        if sent is not None and now - sent < self.retry_after:
            return False
        self._system_in_flight[key] = now
        return True
