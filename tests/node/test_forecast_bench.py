"""The forecast benchmark in its shortened CI form (bench/forecast_bench.py, issue 18): 14
simulated days of the meter simulator's households through the real engine, the previous agent
against the learning one."""

from __future__ import annotations

import io

import pytest

from bench import forecast_bench


@pytest.mark.slow
def test_the_learning_forecaster_is_not_worse_on_pv_households() -> None:
    result = forecast_bench.run(days=14, households=8, seed=1)
    out = io.StringIO()
    forecast_bench.report(result, out)
    assert "PV households: MAE" in out.getvalue()
    pv = [h for h in result.homes if h.has_pv]
    assert pv and len(pv) < len(result.homes)  # both kinds of household took part
    for agent in forecast_bench.AGENTS:  # every slot after the first two had a forecast
        assert all(len(e) >= 14 * 96 - 3 for e in result.results[agent].abs_errors)
    old = result.mae("previous", lambda h: h.has_pv)
    new = result.mae("learning", lambda h: h.has_pv)
    assert 0 < new <= old, out.getvalue()
    # and over every household
    assert result.mae("learning") <= result.mae("previous"), out.getvalue()
