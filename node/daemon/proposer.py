"""What the Raft leader proposes: batches of gossiped records, gate closures, settlements.

Sans-I/O: the node calls :meth:`Proposer.offer` with every validated record it hears,
:meth:`Proposer.committed` with every record that reached the log, and :meth:`Proposer.next_batch`
with the time and the engine's committed view whenever it may propose. Re-proposing a record is
harmless (the engine rejects the duplicate nonce deterministically), so records whose proposal
did not commit in time simply go back to the queue; that also carries them over a leader change.
"""

from __future__ import annotations

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
    retry_after: float = 5.0
    pending: dict[bytes, Record] = field(default_factory=dict)
    in_flight: dict[bytes, tuple[float, Record]] = field(default_factory=dict)
    _system_in_flight: dict[tuple[str, int], float] = field(default_factory=dict)

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

    def next_batch(self, now: float, view: EngineView) -> list[Command]:
        """Commands to propose now, in the order they must apply (may be empty).

        Records come first so that orders submitted before a gate deadline make it into the
        slot; then due gate closures and settlements, strictly in slot order.
        """
        for key, (sent, record) in list(self.in_flight.items()):
            if now - sent >= self.retry_after:
                del self.in_flight[key]
                self.pending[key] = record
        batch: list[Command] = []
        for key in list(self.pending)[: self.max_batch]:
            record = self.pending.pop(key)
            self.in_flight[key] = (now, record)
            batch.append(record)
        batch.extend(self._system_commands(now, view))
        return batch

    def _system_commands(self, now: float, view: EngineView) -> list[Command]:
        out: list[Command] = []
        due_gate = self.schedule.last_due_gate(now)
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
            while slot <= last_closed and self.schedule.settle_time(slot) <= now:
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
