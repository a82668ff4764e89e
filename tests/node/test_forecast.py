"""The learning forecaster (node/agent/forecast.py): daily pattern, day types, clear-sky shape,
persisted state, accuracy, and the ``[agent]`` config."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pytest

from market import MarketConfig
from market.schedule import Schedule
from market.signing import Signer
from node.agent.forecast import (
    MAX_FILE_BYTES,
    ForecastCollector,
    LearningForecaster,
    clear_sky,
    load_forecaster,
    save_forecaster,
    slot_clear_sky,
)
from node.agent.trader import Trader
from node.setup.config import ConfigError, load_config

SLOT = 900
PER_DAY = 86_400 // SLOT
MONDAY = int(dt.datetime(2025, 3, 3, tzinfo=dt.UTC).timestamp()) // SLOT
"""Slot 0:00 UTC of Monday 2025-03-03."""


def daily(k: int) -> int:
    """A household's typical net: -200 Wh at night, a morning and an evening peak."""
    hour = (k % PER_DAY) // 4
    return -900 if hour in (7, 19) else -200 if hour < 6 else -400


def test_learns_a_daily_pattern_and_ignores_noise() -> None:
    rng = random.Random(4)
    f = LearningForecaster(SLOT)
    for k in range(MONDAY, MONDAY + 14 * PER_DAY):
        f.observe(k, daily(k) + rng.randint(-60, 60))
    tomorrow = range(MONDAY + 14 * PER_DAY, MONDAY + 15 * PER_DAY)
    errors = [abs((f.predict(k) or 0) - daily(k)) for k in tomorrow]
    assert max(errors) < 120 and sum(errors) / len(errors) < 40
    assert f.predict(MONDAY + 14 * PER_DAY + 7 * 4) < -700  # the 07:00 peak, from history
    assert isinstance(f.predict(MONDAY + 14 * PER_DAY), int)


def test_weekend_differs_from_weekdays() -> None:
    """Saturdays use 1 kWh more per slot at 10:00: the forecast for the next Saturday knows it,
    the next Monday does not."""
    f = LearningForecaster(SLOT)
    ten = 10 * 4
    for day in range(21):
        k = MONDAY + day * PER_DAY + ten
        saturday = day % 7 == 5
        f.observe(k, -1_300 if saturday else -300)
    next_saturday = MONDAY + 26 * PER_DAY + ten
    next_monday = MONDAY + 28 * PER_DAY + ten
    assert f.day_type(next_saturday) == 1 and f.day_type(next_monday) == 0
    assert f.day_type(MONDAY + 6 * PER_DAY) == 2
    assert abs(f.predict(next_saturday) + 1_300) < 100  # type: ignore[operator]
    assert abs(f.predict(next_monday) + 300) < 100  # type: ignore[operator]


def test_clear_sky_is_zero_at_night_and_peaks_at_solar_noon_of_the_longitude() -> None:
    june = dt.datetime(2025, 6, 21, tzinfo=dt.UTC).timestamp()
    for lon, noon_utc in ((0.0, 12.0), (15.0, 11.0), (-90.0, 18.0)):
        values = {h / 4: clear_sky(52.5, lon, june + h * 900) for h in range(96)}
        peak = max(values, key=values.__getitem__)
        assert abs(peak - noon_utc) <= 0.5, (lon, peak)
        assert values[(noon_utc + 12) % 24] == 0.0  # midnight: dark
        assert 0.7 < values[peak] < 1.1
    # winter is lower and shorter than summer; the southern hemisphere the other way round
    dec = dt.datetime(2025, 12, 21, 12, tzinfo=dt.UTC).timestamp()
    assert clear_sky(52.5, 0, dec) < clear_sky(52.5, 0, june + 12 * 3600) / 2
    assert clear_sky(-33.9, 0, dec) > clear_sky(-33.9, 0, june + 12 * 3600)
    assert slot_clear_sky(52.5, 0, june, 900) == 0.0


def test_pv_follows_the_season_through_the_clear_sky_term() -> None:
    """A PV household metered in spring: the forecast has a PV bump at midday, none at night,
    and learned a positive capacity."""
    f = LearningForecaster(SLOT, 52.5, 0.0)
    start = int(dt.datetime(2025, 4, 1, tzinfo=dt.UTC).timestamp()) // SLOT
    for k in range(start, start + 30 * PER_DAY):
        pv = round(2_000 * f.clear_sky(k))
        f.observe(k, pv - 150)
    day = start + 30 * PER_DAY
    noon, night = day + 48, day + 4
    assert f.predict(noon) > 1_000  # type: ignore[operator]
    assert abs(f.predict(night) + 150) < 30  # type: ignore[operator]
    assert f.capacity > 0


def test_unseen_time_of_day_falls_back_to_the_latest_slot() -> None:
    f = LearningForecaster(SLOT)
    assert f.predict(MONDAY) is None
    f.observe(MONDAY, 123)
    assert f.predict(MONDAY + 1) == 123
    assert f.predict(MONDAY + PER_DAY) == 123  # the same time of day: learned


def test_accuracy_counts_issued_forecasts_only() -> None:
    f = LearningForecaster(SLOT)
    assert f.accuracy()["mae_wh"] == {"last_96": None, "last_672": None}
    f.observe(MONDAY, -100)
    assert f.issue(MONDAY + 1) == -100
    f.observe(MONDAY + 1, -160)  # 60 Wh off
    f.observe(MONDAY + 2, -100)  # no forecast was issued: not counted
    assert f.issue(MONDAY + 3) is not None
    f.observe(MONDAY + 3, (f.predict(MONDAY + 3) or 0) + 20)
    summary = f.accuracy()
    assert summary["samples"] == {"last_96": 2, "last_672": 2}
    assert summary["mae_wh"]["last_96"] == 40
    assert summary["observed"] == 4


def test_state_round_trips_through_the_file(tmp_path: Path) -> None:
    f = LearningForecaster(SLOT, 48.1, 11.6)
    rng = random.Random(1)
    for k in range(MONDAY, MONDAY + 9 * PER_DAY):
        f.issue(k)
        f.observe(k, round(1_500 * f.clear_sky(k)) - 300 + rng.randint(-50, 50))
    f.issue(MONDAY + 9 * PER_DAY + 1)
    path = tmp_path / "forecast.json"
    save_forecaster(f, path)
    assert not (tmp_path / "forecast.json.tmp").exists()
    assert path.stat().st_size < 100_000
    g, problem = load_forecaster(path, SLOT, 48.1, 11.6)
    assert problem is None
    for k in range(MONDAY + 9 * PER_DAY, MONDAY + 10 * PER_DAY):
        assert g.predict(k) == f.predict(k)
    assert g.accuracy() == f.accuracy()
    assert g.issued == f.issued
    # another place keeps the averages and relearns the PV capacity
    h, problem = load_forecaster(path, SLOT, -33.9, 18.4)
    assert problem is None and h.capacity == 0.0 and h.level == g.level
    # no file yet: fresh, no complaint
    fresh, problem = load_forecaster(tmp_path / "none.json", SLOT)
    assert problem is None and fresh.observed == 0


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"format": 2}',
        b"[" * 100_000,
        b"{}",
    ],
)
def test_a_corrupt_file_is_ignored(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "forecast.json"
    path.write_bytes(content)
    f, problem = load_forecaster(path, SLOT)
    assert problem is not None and str(path) in problem
    assert f.observed == 0 and f.predict(MONDAY) is None


def test_a_hostile_file_is_ignored(tmp_path: Path) -> None:
    f = LearningForecaster(SLOT)
    f.observe(MONDAY, 100)
    good = f.to_json()
    path = tmp_path / "forecast.json"

    def attempt(**change: object) -> str | None:
        path.write_text(json.dumps({**good, **change}))
        return load_forecaster(path, SLOT)[1]

    assert attempt() is None
    assert attempt(slot_seconds=60) is not None  # another slot length
    assert attempt(level=[1.0] * 3) is not None  # wrong length
    assert attempt(level=["x"] * PER_DAY) is not None
    assert attempt(level=[1e300] * PER_DAY) is not None  # out of range
    assert attempt(spread=[-1.0] * PER_DAY) is not None
    assert attempt(capacity=True) is not None
    assert attempt(errors=[1] * 10_000) is not None
    assert attempt(errors=[-5]) is not None
    assert attempt(issued=[[1, 2, 3]]) is not None
    assert attempt(phi=[[0, 1]]) is not None
    path.write_text(json.dumps({"format": 1, "x": "a" * MAX_FILE_BYTES}))
    assert "larger than" in (load_forecaster(path, SLOT)[1] or "")
    path.write_text('{"format": NaN}')
    assert load_forecaster(path, SLOT)[1] is not None


def test_the_trader_forecasts_with_the_learning_forecaster() -> None:
    operator = Signer.from_seed(b"o" * 32)
    config = MarketConfig(grid="g", operator=operator.did, feed_in_tariff=8, retail_price=30)
    trader = Trader(Signer.from_seed(b"h" * 32), config, Schedule(900, 300, 120), "s",
                    location=(52.5, 13.4))  # fmt: skip
    assert isinstance(trader.forecaster, LearningForecaster) and trader.forecaster.located
    trader.forecaster.observe(MONDAY, -700)
    order = trader.order_for(MONDAY + 2)
    assert order is not None and order.quantity_wh == 700
    assert trader.forecaster.issued == {MONDAY + 2: -700}  # its error is measured later


def test_agent_config_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "microgrid.toml"
    path.write_text("[agent]\nlatitude = 52.5\nlongitude = -13\n")
    assert load_config(path, {}).agent.location == (52.5, -13.0)
    path.write_text("")
    assert load_config(path, {}).agent.location is None
    for bad in ("latitude = 91\nlongitude = 0", "latitude = 0\nlongitude = 181",
                "latitude = 10", "latitude = true\nlongitude = 0", "altitude = 3",
                'latitude = "nan"\nlongitude = 0'):  # fmt: skip
        path.write_text(f"[agent]\n{bad}\n")
        with pytest.raises(ConfigError, match="agent"):
            load_config(path, {})


def test_the_accuracy_is_a_prometheus_gauge() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    f = LearningForecaster(SLOT)
    registry = CollectorRegistry()
    registry.register(ForecastCollector(lambda: f))  # type: ignore[arg-type]
    assert "microgrid_forecast_mae_wh{" not in generate_latest(registry).decode()  # none yet
    f.observe(MONDAY, -100)
    f.issue(MONDAY + 1)
    f.observe(MONDAY + 1, -150)
    text = generate_latest(registry).decode()
    assert 'microgrid_forecast_mae_wh{window="96"} 50.0' in text
    assert 'microgrid_forecast_samples{window="672"} 1.0' in text
