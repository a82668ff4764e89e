"""The counter guard as a pure state machine (no I/O): backwards, jumps, re-baselining,
serial changes and float32 resolution."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meter.events import CounterBackwards, CounterJump
from meter.guard import CounterGuard
from meter.sample import Decoded


def d(imp: int, exp: int = 0, serial: str = "A", res: int = 1) -> Decoded:
    """A decoded poll with the given counters."""
    return Decoded(serial, {"power": 100.0, "voltage": 230.0, "frequency": 50.0},
                   {"import_energy": imp, "export_energy": exp},
                   {"import_energy": res, "export_energy": 1})


def test_accepts_plausible_rise() -> None:
    g = CounterGuard("m", rated_power_w=3600)  # 1 Wh per second at most
    assert g.feed(d(1000), 0.0, 0.0)[0] is not None
    sample, events, error = g.feed(d(1100), 100.0, 100.0)
    assert error is None and sample is not None and sample.import_wh == 1100 and not events


def test_rejects_rise_beyond_rated_power() -> None:
    g = CounterGuard("m", rated_power_w=3600)
    g.feed(d(1000), 0.0, 0.0)
    sample, _, error = g.feed(d(1103), 100.0, 100.0)  # limit 100 + 1 (res) + 1 (slack)
    assert sample is None and isinstance(error, CounterJump)
    assert error.context["allowed_wh"] == 102
    assert g.feed(d(1102), 100.0, 100.0)[0] is not None


def test_backwards_is_rejected_and_baseline_kept() -> None:
    g = CounterGuard("m", rated_power_w=10_000, rebaseline_after=3)
    g.feed(d(5000), 0.0, 0.0)
    sample, _, error = g.feed(d(4999), 10.0, 10.0)
    assert sample is None and isinstance(error, CounterBackwards)
    sample, _, error = g.feed(d(5010), 20.0, 20.0)  # back to normal: no new epoch
    assert sample is not None and sample.epoch == 0


def test_consistent_restart_rebaselines_after_n_polls() -> None:
    g = CounterGuard("m", rated_power_w=10_000, rebaseline_after=3)
    g.feed(d(5000), 0.0, 0.0)
    assert g.feed(d(10), 10.0, 10.0)[2] is not None
    assert g.feed(d(20), 20.0, 20.0)[2] is not None
    sample, events, error = g.feed(d(30), 30.0, 30.0)
    assert error is None and sample is not None and sample.epoch == 1
    assert [e.kind for e in events] == ["counter_rebaselined"]
    assert events[0].context["old_counters"]["import_energy"] == 5000


def test_inconsistent_glitches_never_rebaseline() -> None:
    g = CounterGuard("m", rated_power_w=10_000, rebaseline_after=3)
    g.feed(d(5000), 0.0, 0.0)
    for i, value in enumerate([10, 900_000, 20, 900_000, 30, 900_000]):
        sample, _, error = g.feed(d(value), 10.0 * (i + 1), 0.0)
        assert sample is None and error is not None
    assert g.epoch == 0


def test_serial_change_is_a_new_epoch() -> None:
    g = CounterGuard("m", rated_power_w=10_000)
    g.feed(d(5000, serial="A"), 0.0, 0.0)
    sample, events, error = g.feed(d(12, serial="B"), 5.0, 5.0)
    assert error is None and sample is not None and sample.epoch == 1 and sample.serial == "B"
    assert events[0].kind == "serial_changed"
    assert events[0].context["old_serial"] == "A" and events[0].context["new_serial"] == "B"


def test_low_resolution_reported_once_per_epoch() -> None:
    g = CounterGuard("m", rated_power_w=10_000, max_resolution_wh=1)
    _, events, _ = g.feed(d(150_000_000, res=16), 0.0, 0.0)
    assert [e.kind for e in events] == ["low_resolution"]
    _, events, _ = g.feed(d(150_000_016, res=16), 10.0, 10.0)
    assert events == []


@given(st.lists(st.tuples(st.integers(-5_000, 50_000), st.sampled_from(["A", "A", "A", "B"]),
                          st.floats(0.5, 120.0)), min_size=1, max_size=60))
def test_no_implausible_counter_ever_accepted(steps: list[tuple[int, str, float]]) -> None:
    """Whatever a meter sends, accepted samples within an epoch never go backwards and never
    rise faster than rated power allows; epochs only change with an event."""
    g = CounterGuard("m", rated_power_w=3600, rebaseline_after=3)
    t, imp = 0.0, 1_000_000
    accepted: list[tuple[int, float, int]] = []  # (epoch, time, import)
    for delta, serial, dt_s in steps:
        t += dt_s
        imp = max(0, imp + delta)
        sample, events, error = g.feed(d(imp, serial=serial), t, t)
        assert (sample is None) != (error is None)
        if sample is None:
            continue
        if accepted and accepted[-1][0] == sample.epoch:
            _, prev_t, prev_imp = accepted[-1]
            assert sample.import_wh >= prev_imp
            assert sample.import_wh - prev_imp <= g.allowed_rise(t - prev_t, 1)
        elif accepted:
            assert sample.epoch == accepted[-1][0] + 1
            assert {e.kind for e in events} & {"serial_changed", "counter_rebaselined"}
        accepted.append((sample.epoch, t, sample.import_wh))


def test_a_forward_jump_never_becomes_a_baseline() -> None:
    """A +1 MWh jump that stays is rejected on every poll (never signed), with an event each
    ``rebaseline_after`` polls; when the counter is back in range it is accepted again."""
    g = CounterGuard("m", rated_power_w=10_000, rebaseline_after=3)
    g.feed(d(5000), 0.0, 0.0)
    kinds: list[str] = []
    for i in range(1, 10):
        sample, events, error = g.feed(d(1_005_000 + i), 10.0 * i, 10.0 * i)
        assert sample is None and isinstance(error, CounterJump)
        kinds += [e.kind for e in events]
    assert kinds == ["counter_jump_persists"] * 3 and g.epoch == 0
    sample, _, error = g.feed(d(5100), 100.0, 100.0)  # back in range: accepted, same epoch
    assert error is None and sample is not None and sample.epoch == 0
