"""Household load from the BDEW H25 standard load profile (shipped in ``meter/data/h25.csv``).

The profile gives the average household's 15-minute energy for each month and day type,
normalised to 1,000,000 kWh a year; the H25 dynamisation polynomial scales it over the year.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "h25.csv"


@functools.cache
def _table() -> dict[str, list[float]]:
    with DATA.open(encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
    header = rows[0][1:]
    columns: dict[str, list[float]] = {h: [] for h in header}
    for row in rows[1:]:
        for name, value in zip(header, row[1:], strict=True):
            columns[name].append(float(value))
    return columns


def dynamisation(day_of_year: int) -> float:
    """The H25 seasonal factor for ``day_of_year`` (1..366)."""
    d = float(day_of_year)
    return -3.92e-10 * d**4 + 3.2e-7 * d**3 - 7.02e-5 * d**2 + 0.0021 * d + 1.24


def day_type(weekday: int) -> str:
    """BDEW day type for ``weekday`` (0 = Monday): WT, SA or FT (Sunday)."""
    return "SA" if weekday == 5 else "FT" if weekday == 6 else "WT"


def h25_power_w(month: int, weekday: int, day_of_year: int, second_of_day: float,
                annual_kwh: float) -> float:
    """Average power (W) of a household using ``annual_kwh`` a year, at that time."""
    slot = int(second_of_day // 900) % 96
    kwh_per_quarter = _table()[f"m{month:02d}_{day_type(weekday)}"][slot]
    # kWh per quarter hour per 1e6 kWh/yr -> W for annual_kwh: x4 (per hour) x1000 (W).
    return kwh_per_quarter * 4.0 * 1000.0 * annual_kwh / 1_000_000 * dynamisation(day_of_year)
