"""The leader's proposer and the slot schedule, driven by a simulated clock into a real engine."""

from __future__ import annotations

import math

from market import CloseGate, SettleSlot, SlotSettled, State, apply
from market.schedule import Schedule
from node.daemon.proposer import EngineView, Proposer
from node.tools import market_sim

SCHED = Schedule(slot_seconds=60, gate_lead_seconds=10, settle_delay_seconds=5)


def test_schedule_arithmetic() -> None:
    s = SCHED
    assert s.slot_at(0) == 0 and s.slot_at(59.9) == 0 and s.slot_at(60) == 1
    assert s.gate_time(2) == 110 and s.settle_time(2) == 185
    assert s.open_slot(109.9) == 2 and s.open_slot(110) == 3
    assert s.last_due_gate(110) == 2
    assert s.slot_at(-1) == -1


def view(state: State) -> EngineView:
    return EngineView(state.closed_through, state.settled_through)


def test_records_are_proposed_once_and_retried_only_after_timeout() -> None:
    sim = market_sim.build(3, seed=1)
    trading, _ = market_sim.slot_commands(sim, 5)
    order = trading[0]
    p = Proposer(SCHED, retry_after=5)
    quiet = EngineView(closed_through=0, settled_through=-1)  # nothing else due before t=50
    assert p.offer(order) and not p.offer(order)
    assert p.next_batch(0, quiet) == [order]
    assert p.next_batch(1, quiet) == []
    assert p.next_batch(5, quiet) == [order]  # not committed: retried
    p.committed(order)
    assert p.next_batch(20, quiet) == []


def test_within_a_term_a_proposal_is_not_repeated_a_new_term_repeats_it_at_once() -> None:
    """A leader never drops an entry of its own term, so a slow commit is no reason to propose
    the same records again; a term change is (the entry may have been overwritten)."""
    sim = market_sim.build(3, seed=1)
    trading, _ = market_sim.slot_commands(sim, 5)
    p = Proposer(SCHED)
    quiet = EngineView(closed_through=5, settled_through=4)  # nothing else due before t=350
    for record in trading[:3]:
        assert p.offer(record)
    assert p.next_batch(0, quiet, term=4) == trading[:3]
    assert p.next_batch(20, quiet, term=4) == []  # 20 s without a commit: still in flight
    p.committed(trading[0])
    assert p.next_batch(21, quiet, term=6) == trading[1:3]  # re-elected in a later term
    assert p.next_batch(22, quiet, term=6) == []
    assert p.next_batch(21 + p.retry_after, quiet, term=6) == trading[1:3]  # the backstop


def test_requeue_puts_records_and_deadlines_back() -> None:
    """What the driver does when the core refuses a proposal (leadership transfer)."""
    sim = market_sim.build(3, seed=1)
    trading, _ = market_sim.slot_commands(sim, 5)
    p = Proposer(SCHED)
    now = SCHED.settle_time(10) + 1
    behind = EngineView(closed_through=9, settled_through=8)
    assert p.offer(trading[0])
    first = p.next_batch(now, behind, term=2)
    assert first[0] == trading[0] and SettleSlot(slot=9) in first
    assert p.next_batch(now, behind, term=2) == []
    p.requeue()
    assert p.next_batch(now, behind, term=2) == first


def test_gates_and_settlements_follow_the_clock_in_slot_order() -> None:
    sim = market_sim.build(3, seed=2)
    state = State.initial(sim.config)
    for reg in market_sim.registrations(sim):
        state, _ = apply(state, reg)
    p = Proposer(SCHED, retry_after=1000)
    applied: list = []
    blocks = []
    for now in range(100, 700, 1):
        batch = p.next_batch(now, view(state))
        for cmd in batch:
            state, events = apply(state, cmd)
            p.committed(cmd)
            applied.append((now, cmd))
            blocks += [e for e in events if isinstance(e, SlotSettled)]
    gates = [(t, c.slot) for t, c in applied if isinstance(c, CloseGate)]
    settles = [(t, c.slot) for t, c in applied if isinstance(c, SettleSlot)]
    first = SCHED.last_due_gate(100)
    assert [s for _, s in gates] == list(range(first, first + len(gates)))
    assert all(t >= SCHED.gate_time(s) for t, s in gates)
    assert all(t == SCHED.gate_time(s) for t, s in gates[1:])  # each exactly when due
    assert [s for _, s in settles] == list(range(first, first + len(settles)))
    assert all(t == SCHED.settle_time(s) for t, s in settles)
    assert [b.slot for b in blocks] == [s for _, s in settles]


def test_a_new_leader_catches_up_missed_deadlines_in_one_batch() -> None:
    p = Proposer(SCHED)
    now = SCHED.settle_time(10) + 1
    batch = p.next_batch(now, EngineView(closed_through=7, settled_through=6))
    gates = [c.slot for c in batch if isinstance(c, CloseGate)]
    settles = [c.slot for c in batch if isinstance(c, SettleSlot)]
    assert gates == list(range(8, SCHED.last_due_gate(now) + 1))
    assert settles == [7, 8, 9, 10]
    # The same deadlines are not proposed twice while in flight.
    assert p.next_batch(now, EngineView(closed_through=7, settled_through=6)) == []


def test_next_deadline_is_the_next_gate_or_reading_deadline_by_the_grid_clock() -> None:
    """Issue 19: the time a driver may wake at to propose a gate closure or settlement at once
    rather than at its next propose tick: strictly after now, shifted like the deadlines."""
    s = Schedule(slot_seconds=30, gate_lead_seconds=6, settle_delay_seconds=9)
    p = Proposer(s)
    # slot 10: gate at 294, delivery 300-330, settles at 339; slot 11's gate at 324
    assert p.next_deadline(300.0) == 309.0  # slot 9 settles at 309
    assert p.next_deadline(309.0) == 324.0  # strictly after now
    assert p.next_deadline(325.0) == 339.0
    p.deadline_shift = 0.4  # our clock 0.4 s ahead of the grid's (with the error)
    assert p.next_deadline(325.0) == 339.4
    p.deadline_shift = 0.0
    for now in (123.4, 309.0, 338.99, 10_000.5):  # nothing falls due in between
        due = p.next_deadline(now)
        assert due is not None and due > now
        # the grid committed everything due just before: one command due at `due`, none before
        t = due - 0.001
        view = EngineView(s.last_due_gate(t), math.floor((t - 9) / 30) - 1)
        assert Proposer(s).next_batch(t, view) == []
        (command,) = Proposer(s).next_batch(due, view)
        assert isinstance(command, CloseGate | SettleSlot)
    p.hold_deadlines = True
    assert p.next_deadline(300.0) is None
