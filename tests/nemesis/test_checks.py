"""The after-run checks of the process nemesis catch what they claim to (pure data, fast).

:func:`node.testing.nemesis.check_ledgers` is fed ledgers as read rows: equal ones pass; a
diverging block, a missing height, a slot settled twice or skipped, a head reported during the
run that no ledger holds, a node whose report differs from its ledger, a ledger that does not
verify and unbalanced books each fail, with the counts of the summary table. The clock checks:
a gate closure applied early by a right clock fails (a skewed node's are left out), and a
``skew`` step's watch notes the verdict, the leadership and the peers, and fails on a skewed
node that never says so or leads too long. A ``jump`` (a running node's clock stepped) leaves
that node's gate times out of the checks for the slots its clock may have timed, forgives what
it counted meanwhile, and its watch times the verdict and the handover and fails on an early
gate closure by a right clock meanwhile. A jump of a sole voter (no one to hand over to) is
not held to a handover or a lead bound; it fails if any gate closes while its clock is off, or
if it ran ahead over a gate time and held nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from market.schedule import Schedule
from node.ledger.verify import VerifyReport
from node.testing.nemesis import (
    SKEW_LEAD_BOUND_S,
    JumpWatch,
    LedgerRows,
    NemesisResult,
    Observations,
    SkewWatch,
    Timing,
    check_gate_times,
    check_ledgers,
    make_plan,
)
from node.tools.demo import DemoHousehold


def ledger(height: int, *, first_slot: int = 100, fork_at: int | None = None,
           ok: bool = True) -> LedgerRows:  # fmt: skip
    blocks = {h: (first_slot + h - 1, ("f" if fork_at is not None and h >= fork_at else "b")
                  + f"{h:063x}") for h in range(1, height + 1)}  # fmt: skip
    head = blocks[height][1] if height else None
    report = VerifyReport(ok, height, head, height, 3 * height,
                          None if ok else "block 2: bad tx_root", conservation="ok")  # fmt: skip
    return LedgerRows(report, blocks, {"money": 0, "energy": 0}, {101: 500}, {101: 500})


def observed(ledger_rows: LedgerRows) -> dict[int, dict[str, set[str]]]:
    return {h: {b[1]: {"h1"}} for h, b in ledger_rows.blocks.items()}


def status(lg: LedgerRows, height: int | None = None) -> dict[str, Any]:
    h = len(lg.blocks) if height is None else height
    return {"ledger": {"height": h, "head_hash": lg.blocks[h][1],
                       "settled_through": lg.blocks[h][0]}}  # fmt: skip


def run(ledgers: dict[str, LedgerRows], seen: dict[int, dict[str, set[str]]],
        reported: dict[str, dict[str, Any]] | None = None) -> NemesisResult:  # fmt: skip
    result = NemesisResult(make_plan(1, 60))
    check_ledgers(ledgers, seen, reported, result)
    return result


def test_equal_ledgers_pass() -> None:
    a = ledger(6)
    result = run({"h1": a, "h2": ledger(6)}, observed(a), {"h1": status(a), "h2": status(a)})
    assert result.ok, result.failures
    assert (result.height, result.divergences, result.lost_records) == (6, 0, 0)
    assert result.observed_heads == 6


def test_a_fork_is_a_divergence() -> None:
    a = ledger(6)
    result = run({"h1": a, "h2": ledger(6, fork_at=4)}, observed(a))
    assert not result.ok
    assert any("diverge at heights [4, 5, 6]" in f for f in result.failures), result.failures
    # the forked ledger also lacks the heads reported during the run
    assert result.divergences == 3 + 3


def test_a_reported_head_missing_from_a_ledger_is_a_lost_record() -> None:
    a = ledger(6)
    result = run({"h1": a, "h2": ledger(4)}, observed(a))
    assert result.lost_records == 2
    assert any("heights differ" in f for f in result.failures)
    assert any("missing from ledgers: [('h2', 5), ('h2', 6)]" in f for f in result.failures)


def test_slots_settled_twice_or_skipped_fail() -> None:
    a = ledger(4)
    twice = replace(a, blocks={**a.blocks, 4: (a.blocks[3][0], a.blocks[4][1])})
    skipped = replace(a, blocks={**a.blocks, 4: (a.blocks[4][0] + 1, a.blocks[4][1])})
    failures = run({"h1": twice}, {}).failures
    assert any("settled twice" in f for f in failures), failures
    failures = run({"h1": skipped}, {}).failures
    assert any("not contiguous" in f for f in failures), failures


def test_a_report_that_is_not_the_ledger_fails() -> None:
    a = ledger(5)
    wrong = {"ledger": {"height": 5, "head_hash": "0" * 64, "settled_through": 104}}
    result = run({"h1": a}, {}, {"h1": wrong})
    assert any("h1 reported height 5" in f for f in result.failures), result.failures
    late = status(a)
    late["ledger"]["settled_through"] = 105
    assert any("settled_through 105" in f for f in run({"h1": a}, {}, {"h1": late}).failures)


def test_unverified_or_unbalanced_ledgers_fail() -> None:
    failures = run({"h1": ledger(3, ok=False)}, {}).failures
    assert any("does not verify: block 2: bad tx_root" in f for f in failures)
    a = ledger(3)
    unbalanced = replace(a, balance_sums={"money": 7, "energy": 0}, bought={101: 499})
    failures = run({"h1": unbalanced}, {}).failures
    assert any("do not sum to zero: {'money': 7}" in f for f in failures), failures
    assert any("sold != bought" in f for f in failures), failures
    bad = replace(a, report=replace(a.report, conservation="failed", conservation_note="h9"))
    assert any("conservation failed: h9" in f for f in run({"h1": bad}, {}).failures)


def test_gate_closures_by_right_clocks_are_timed_and_skewed_ones_left_out() -> None:
    schedule = Schedule(8, 1, 3)
    slot = 1000
    gate = schedule.gate_time(slot)

    def doc(cleared_at: float, early: int = 0) -> dict[str, Any]:
        return {"ledger": {}, "raft": {}, "clock": {"early_gate_closures": early},
                "slot_times": [{"slot": slot, "cleared_at": cleared_at}]}  # fmt: skip

    obs = Observations()
    # h2 runs skewed: its (early, by the runner's clock) closure says nothing of the leader
    obs.record({"h1": doc(gate + 0.2), "h2": doc(gate - 120.0, early=3)}, skewed={"h2"})
    obs.record({"h1": doc(gate + 5.0)})  # a later poll keeps the first time seen
    result = NemesisResult(make_plan(1, 60))
    check_gate_times(obs, schedule, result)
    assert result.ok and result.gate_closures_checked == 1
    assert obs.cleared == {("h1", slot): gate + 0.2}
    # a right clock that applied a closure before its gate time, or counted an early one, fails
    obs.record({"h3": doc(gate - 0.5), "h4": doc(gate + 1.0, early=1)})
    result = NemesisResult(make_plan(1, 60))
    check_gate_times(obs, schedule, result)
    assert len(result.failures) == 2, result.failures
    assert f"({slot}, 'h3', 0.5)" in result.failures[0]
    assert "'h4': 1" in result.failures[1]


def test_a_skew_watch_sees_the_verdict_the_lead_and_the_handover(tmp_path: Path) -> None:
    h = DemoHousehold(1, "h2", tmp_path, "did:key:h2", "peer", 2, 1, 2)
    watch = SkewWatch(h, -117.6, was_leader=True, stopped=100.0, started=101.0)

    def doc(role: str, skewed: bool = False, disagreeing: tuple[str, ...] = ()) -> dict[str, Any]:
        return {"raft": {"role": role}, "clock": {"skewed": skewed, "offset": -117.6,
                                                  "transfers": 0, "held": 0,
                                                  "disagreeing": list(disagreeing)}}  # fmt: skip

    # the old leader is down: nobody leads yet
    watch.observe({"h1": doc("follower")}, "-", 101.0)
    assert watch.moved_at is None
    watch.observe({"h1": doc("leader", disagreeing=("did:key:h2",)), "h2": doc("follower")},
                  "h1", 102.0)  # fmt: skip
    watch.observe({"h1": doc("leader"), "h2": doc("follower", skewed=True)}, "h1", 103.5)
    assert (watch.moved_at, watch.new_leader, watch.seen_at, watch.peers_saw) == (
        102.0,
        "h1",
        103.5,
        {"h1"},
    )
    assert watch.failures(Timing()) == []
    assert "reported skewed 2.5 s after its start (offset -117.6 s)" in watch.outcome()
    assert "leadership moved to h1 2.0 s after its stop" in watch.outcome()
    # leading on while skewed beyond the bound fails; so does never saying it is skewed
    for t in (110.0, 110.0 + SKEW_LEAD_BOUND_S + 1):
        watch.observe({"h2": doc("leader", skewed=True)}, "h2", t)
    assert any("led" in f for f in watch.failures(Timing()))
    quiet = SkewWatch(h, 60.0, was_leader=True, stopped=0.0, started=1.0)
    quiet.observe({"h2": doc("follower")}, "h2", 30.0)
    failures = quiet.failures(Timing())
    assert any("never said clock.skewed" in f for f in failures)
    assert any("named no other leader" in f for f in failures)


def test_a_jumped_clock_is_left_out_of_the_gate_checks_until_its_slots_are_past() -> None:
    """A running node keeps the ``slot_times`` (and the early-closure count) it took while its
    clock was off: those are not a right clock's."""
    schedule = Schedule(8, 1, 3)
    slot = 1000
    gate = schedule.gate_time(slot)

    def doc(s: int, cleared_at: float, early: int = 0) -> dict[str, Any]:
        return {"ledger": {}, "raft": {}, "clock": {"early_gate_closures": early},
                "slot_times": [{"slot": s, "cleared_at": cleared_at}]}  # fmt: skip

    obs = Observations()
    obs.tainted["h1"] = gate + 1.0  # its clock was 250 s ahead until about then
    obs.early_baseline["h1"] = 2
    obs.record({"h1": doc(slot, gate - 250.0, early=2), "h2": doc(slot, gate + 0.1)})
    obs.record({"h1": doc(slot + 1, schedule.gate_time(slot + 1) + 0.2, early=2)})
    result = NemesisResult(make_plan(1, 60))
    check_gate_times(obs, schedule, result)
    assert result.ok, result.failures
    assert result.gate_closures_checked == 2  # h2's slot and h1's next one, after the jump
    obs.record({"h1": doc(slot + 2, schedule.gate_time(slot + 2) - 3.0, early=3)})
    check_gate_times(obs, schedule, result)
    assert len(result.failures) == 2 and "'h1': 1" in result.failures[1], result.failures


def test_a_jump_watch_times_the_verdict_the_handover_and_early_gates(tmp_path: Path) -> None:
    schedule = Schedule(8, 1, 3)
    slot = 1000
    gate = schedule.gate_time(slot)
    h = DemoHousehold(0, "h1", tmp_path, "did:key:h1", "peer", 1, 1, 2)

    def doc(role: str, skewed: bool = False, transfers: int = 0, early: int = 0,
            cleared: float | None = None) -> dict[str, Any]:  # fmt: skip
        times = [] if cleared is None else [{"slot": slot, "cleared_at": cleared}]
        return {"raft": {"role": role}, "slot_times": times,
                "clock": {"skewed": skewed, "offset": 250.2, "transfers": transfers,
                          "held": 0, "early_gate_closures": early, "disagreeing": []}}  # fmt: skip

    watch = JumpWatch(h, 250.2, was_leader=True)
    watch.start({"h1": doc("leader", transfers=1), "h2": doc("follower", early=4)})
    watch.at, watch.wall_at, watch.lead_since = 100.0, gate - 3.0, 100.0
    watch.observe({"h1": doc("leader", transfers=1), "h2": doc("follower", early=4)},
                  "h1", 100.4, schedule)  # fmt: skip
    after = {"h1": doc("follower", skewed=True, transfers=2),
             "h2": doc("leader", early=4, cleared=gate + 0.3)}  # fmt: skip
    watch.observe(after, "h2", 100.75, schedule)
    assert (watch.seen_at, watch.moved_at, watch.new_leader) == (100.75, 100.75, "h2")
    assert watch.handover_s == 0.75 and watch.transfers == 1 and watch.longest_lead == 0.75
    assert watch.timed == {("h2", slot)} and not watch.early and not watch.counted
    assert watch.failures() == []
    line = watch.outcome()
    assert "jump h1 (the leader) +250.2 s: reported skewed 0.8 s after the jump" in line
    assert "handed over to h2 0.8 s after the jump" in line and "no gate closed early" in line
    # a right clock applying a gate closure early meanwhile (or counting one) fails
    watch.observe({"h3": doc("follower", early=1, cleared=gate - 2.0)}, "h2", 101.5, schedule)
    watch.before["h3"] = 0
    watch.observe({"h3": doc("follower", early=1, cleared=gate - 2.0)}, "h2", 102.0, schedule)
    failures = watch.failures()
    assert any("gates closed early" in f and "('h3', 1000)" in f for f in failures), failures
    assert any("counted early gate closures" in f and "'h3': 1" in f for f in failures)
    # a leader that never says so and never hands over fails both ways
    stuck = JumpWatch(h, -90.0, was_leader=True, at=0.0, lead_since=0.0)
    stuck.observe({"h1": doc("leader")}, "h1", SKEW_LEAD_BOUND_S + 1, schedule)
    failures = stuck.failures()
    assert any("never said clock.skewed" in f for f in failures)
    assert any("named no other leader" in f for f in failures)
    assert any("led" in f for f in failures)


def test_a_sole_voters_jump_needs_no_handover_but_no_gate_may_close(tmp_path: Path) -> None:
    schedule = Schedule(8, 1, 3)
    slot = 1000
    gate = schedule.gate_time(slot)
    h = DemoHousehold(0, "h1", tmp_path, "did:key:h1", "peer", 1, 1, 2)

    def doc(role: str, *, held: int = 0, cleared: float | None = None,
            settled: float | None = None) -> dict[str, Any]:  # fmt: skip
        times = [] if cleared is None else [{"slot": slot, "cleared_at": cleared}]
        if settled is not None:
            times.append({"slot": slot - 1, "settled_at": settled})
        return {"raft": {"role": role}, "slot_times": times,
                "clock": {"skewed": role == "leader", "offset": 120.0, "transfers": 0,
                          "held": held, "early_gate_closures": 0, "disagreeing": []}}  # fmt: skip

    def watch() -> JumpWatch:
        w = JumpWatch(h, 120.0, was_leader=True, alone=True)
        w.start({"h1": doc("follower"), "h2": doc("follower")})
        w.at, w.wall_at, w.lead_since = 100.0, gate - 5.0, 100.0
        return w

    # it keeps leading past the bound and never hands over: fine, it held, nothing closed
    ok = watch()
    ok.observe({"h1": doc("leader", held=1), "h2": doc("follower")}, "h1", 100.5, schedule)
    ok.observe({"h1": doc("leader", held=1), "h2": doc("follower")}, "h1",
               100.0 + SKEW_LEAD_BOUND_S + 4, schedule)  # fmt: skip
    ok.heal(schedule, gate + 5.0)
    assert ok.gates_passed == 1 and ok.held == 1 and ok.longest_lead > SKEW_LEAD_BOUND_S
    assert ok.failures() == [], ok.failures()
    line = ok.outcome()
    assert "the sole voter, no one to hand over to: held deadlines (1 holds, 1 gate times" in line
    assert "no gate closed and no slot settled anywhere meanwhile" in line
    assert "never moved" not in line
    # a gate closed by a right clock while the voter's clock was off (even on time) fails,
    # and so does running ahead over a gate time without holding anything
    bad = watch()
    off = doc("follower", cleared=gate + 0.5, settled=gate + 1.0)
    bad.observe({"h1": doc("leader"), "h2": off}, "h1", 106.0, schedule)
    bad.heal(schedule, gate + 5.0)
    failures = bad.failures()
    assert any("yet gates closed" in f and "('h2', 1000)" in f for f in failures), failures
    assert any("yet slots settled" in f and "('h2', 999)" in f for f in failures), failures
    assert any("held no deadline" in f for f in failures), failures
    assert "1 gate closures and 1 settlements applied meanwhile" in bad.outcome()
    # a closure applied within a second of the jump was proposed before it: not counted
    late = watch()
    late.observe({"h1": doc("leader", held=1), "h2": doc("follower", cleared=gate - 4.5)}, "h1",
                 101.0, schedule)  # fmt: skip
    assert not late.closed_while_off
