"""The battery runs of the forecast benchmark (bench/forecast_bench.py, issue 18) in a short
form: a June week of the simulator's households under the evening peak tariff, batteries
planned per slot and their energy ordered at the household's own limits (``plain``) or at the
battery-aware prices (``aware``)."""

from __future__ import annotations

import io

import pytest

from bench import forecast_bench


@pytest.mark.slow
def test_battery_aware_prices_save_the_battery_households_more() -> None:
    result = forecast_bench.run_batteries(days=7, households=8, seed=1, start_day=150)
    out = io.StringIO()
    forecast_bench.report_batteries(result, out)
    text = out.getvalue()
    batteries = [i for i, h in enumerate(result.homes) if h.battery is not None]
    assert batteries, text  # the simulator gave some households a battery
    assert "battery households:" in text
    aware = sum(result.saved("aware", i) for i in batteries)
    plain = sum(result.saved("plain", i) for i in batteries)
    none = sum(result.saved("none", i) for i in batteries)
    assert aware > plain and aware > none, text
