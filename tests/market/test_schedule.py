"""The slot schedule (``market/schedule.py``): slot times as Unix seconds and as UTC datetimes,
the slot of a time, slot counts of wall-time spans, and the checks on its timings. Everything is
a pure function of the schedule and the time passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from market.schedule import DAY_SECONDS, EPOCH, Schedule

PROD = Schedule()
DEMO = Schedule(slot_seconds=10, gate_lead_seconds=3, settle_delay_seconds=2)


def test_defaults_are_the_genesis_timings() -> None:
    assert (PROD.slot_seconds, PROD.gate_lead_seconds, PROD.settle_delay_seconds) == (900, 300, 120)
    assert Schedule(900) == PROD


def test_slot_boundaries_and_deadlines() -> None:
    assert (PROD.start(4), PROD.end(4)) == (3600, 4500)
    assert (PROD.gate_time(4), PROD.settle_time(4)) == (3300, 4620)
    assert [PROD.slot_at(t) for t in (0, 899.9, 900, -0.5)] == [0, 0, 1, -1]
    assert PROD.open_slot(3299) == 4 and PROD.open_slot(3300) == 5
    assert PROD.last_due_gate(3300) == 4


def test_start_and_end_datetimes_are_utc() -> None:
    start = PROD.start_datetime(1_960_000)
    assert start == datetime(2025, 11, 24, 16, 0, tzinfo=UTC)
    assert start.tzinfo is UTC
    assert PROD.end_datetime(1_960_000) == start + timedelta(minutes=15)
    assert int(start.timestamp()) == PROD.start(1_960_000)
    assert DEMO.start_datetime(179_618_304) == datetime(2026, 12, 2, 3, 44, 0, tzinfo=UTC)
    assert PROD.start_datetime(-1) == EPOCH - timedelta(seconds=900)
    with pytest.raises(OverflowError):
        PROD.start_datetime(10**16)  # beyond any calendar


def test_slot_of_a_datetime() -> None:
    start = PROD.start_datetime(1_960_000)
    assert PROD.slot_of(start) == 1_960_000
    assert PROD.slot_of(start - timedelta(microseconds=1)) == 1_959_999
    assert PROD.slot_of(PROD.end_datetime(1_960_000)) == 1_960_001
    # any timezone names the same instant
    cet = timezone(timedelta(hours=1))
    assert PROD.slot_of(start.astimezone(cet)) == 1_960_000
    assert DEMO.slot_of(datetime(2026, 12, 2, 3, 51, 52, 300_000, tzinfo=UTC)) == DEMO.slot_at(
        1_796_183_512.3
    )
    assert isinstance(PROD.slot_of(start), int)
    with pytest.raises(ValueError, match="timezone"):
        PROD.slot_of(datetime(2025, 11, 24, 16, 0))  # naive: which 16:00?


def test_slots_in_a_span() -> None:
    assert (PROD.slots_per_day, DEMO.slots_per_day, Schedule(7).slots_per_day) == (
        96,
        8640,
        DAY_SECONDS // 7,
    )
    assert (PROD.slots_in(3600), DEMO.slots_in(60), PROD.slots_in(1000)) == (4, 6, 1)
    assert PROD.slots_in(60) == 1 and Schedule(100_000).slots_per_day == 1  # at least one


@pytest.mark.parametrize(
    "timings",
    [(0, 300, 120), (-10, 300, 120), (900, -1, 120), (900, 300, -1),
     (1.5, 300, 120), (True, 300, 120), (900, 300.0, 120), (900, 300, "120")],
)  # fmt: skip
def test_invalid_timings_are_refused(timings: tuple[object, object, object]) -> None:
    with pytest.raises(ValueError):
        Schedule(*timings)  # type: ignore[arg-type]
