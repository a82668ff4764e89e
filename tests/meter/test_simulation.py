"""The simulated households: deterministic, realistic shapes, counters consistent."""

from __future__ import annotations

import datetime as dt

from meter.sim import MeterSimulator, make_households
from meter.sim.load import h25_power_w
from meter.sim.solar import Clouds, clear_sky_ghi
from tests.meter.conftest import START


def test_same_seed_same_run() -> None:
    a = MeterSimulator(6, seed=42, speed=0, start=START)
    b = MeterSimulator(6, seed=42, speed=0, start=START)
    c = MeterSimulator(6, seed=43, speed=0, start=START)
    for sim in (a, b, c):
        sim.advance(2 * 3600)
    assert a.states() == b.states()
    assert a.states() != c.states()
    assert make_households(6, 42) == make_households(6, 42)


def test_advance_in_pieces_equals_one_go() -> None:
    a = MeterSimulator(3, seed=1, speed=0, start=START)
    b = MeterSimulator(3, seed=1, speed=0, start=START)
    a.advance(3600)
    for _ in range(7):
        b.advance(514.3)  # remainders carry over: steps stay on the same grid
    b.advance_to(3600)
    assert a.states() == b.states()


def test_h25_year_energy_matches_annual_consumption() -> None:
    start = dt.datetime(2025, 1, 1)
    total_wh = 0.0
    for q in range(365 * 96):
        t = start + dt.timedelta(minutes=15 * q)
        total_wh += h25_power_w(t.month, t.weekday(), t.timetuple().tm_yday,
                                t.hour * 3600 + t.minute * 60, 3500) / 4
    assert abs(total_wh / 1000 - 3500) / 3500 < 0.03  # within 3 % of the annual figure


def test_h25_evening_peak_and_night_trough() -> None:
    evening = h25_power_w(1, 2, 15, 19 * 3600, 3500)
    night = h25_power_w(1, 2, 15, 4 * 3600, 3500)
    assert evening > 2 * night


def test_clear_sky_pv_shape() -> None:
    assert clear_sky_ghi(52.5, 172, 0.0) == 0.0
    noon = clear_sky_ghi(52.5, 172, 12.0)
    assert 800 < noon < 1000
    assert clear_sky_ghi(52.5, 172, 9.0) < noon
    assert clear_sky_ghi(52.5, 355, 12.0) < noon / 2  # winter
    clouds = Clouds(1)
    factors = [clouds.factor(t) for t in range(0, 86400, 300)]
    assert min(factors) < 0.8 and max(factors) > 0.95 and all(0.2 < f <= 1 for f in factors)


def test_counters_monotonic_and_consistent_with_power() -> None:
    sim = MeterSimulator(8, seed=9, speed=0, start=START)
    prev = sim.states()
    for _ in range(200):
        sim.advance(sim.step_s)
        now = sim.states()
        for dev, s in now.items():
            p = prev[dev]
            assert s.import_wh >= p.import_wh and s.export_wh >= p.export_wh
            net = (s.import_wh - p.import_wh) - (s.export_wh - p.export_wh)
            assert abs(net - s.power_w * sim.step_s / 3600) < 1e-6
            assert abs(s.power_w - (s.load_w - s.pv_w + s.battery_w)) < 1e-6
        prev = now


def test_surplus_and_deficit_in_a_larger_neighbourhood() -> None:
    sim = MeterSimulator(30, seed=5, speed=0, start=START, step_s=60)
    for hour in (13.0, 19.5):
        sim.advance_to((hour - 12.5) * 3600)
        powers = [s.power_w for s in sim.states().values()]
        assert sum(p > 0 for p in powers) >= 3 and sum(p < 0 for p in powers) >= 1, hour
