"""Clear-sky PV with clouds: simple solar geometry, no pvlib.

Declination and hour angle give the sun's elevation for a latitude, day and (solar) time; a
Haurwitz-style clear-sky irradiance follows from it, and a seeded cloud-cover series (a random
walk with knots every ten minutes, shared by the neighbourhood) dims it with Kasten's factor.
"""

from __future__ import annotations

import functools
import math
import random


def sun_elevation_sin(latitude_deg: float, day_of_year: int, solar_hour: float) -> float:
    """Sine of the sun's elevation (negative at night)."""
    decl = math.radians(23.44) * math.sin(2 * math.pi * (284 + day_of_year) / 365)
    lat = math.radians(latitude_deg)
    hour_angle = math.radians(15.0 * (solar_hour - 12.0))
    return math.sin(lat) * math.sin(decl) + math.cos(lat) * math.cos(decl) * math.cos(hour_angle)


def clear_sky_ghi(latitude_deg: float, day_of_year: int, solar_hour: float) -> float:
    """Clear-sky global horizontal irradiance in W/m² (Haurwitz)."""
    s = sun_elevation_sin(latitude_deg, day_of_year, solar_hour)
    if s <= 0.01:
        return 0.0
    return 1098.0 * s * math.exp(-0.057 / s)


class Clouds:
    """Seeded cloud cover (0 clear .. 1 overcast) as a function of simulated seconds."""

    KNOT_S = 600.0

    def __init__(self, seed: int, mean_cover: float = 0.35) -> None:
        self.seed = seed
        self.mean_cover = mean_cover

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - bounded, per-instance keyed
    def _knot(self, index: int) -> float:
        rng = random.Random(f"clouds:{self.seed}:{index}")
        base = self.mean_cover + 0.35 * math.sin(index / 9.0 + self.seed % 7)
        return min(1.0, max(0.0, base + rng.uniform(-0.35, 0.35)))

    def cover(self, t: float) -> float:
        """Cloud cover at simulated time ``t`` (seconds), interpolated between knots."""
        k, frac = divmod(t / self.KNOT_S, 1.0)
        a, b = self._knot(int(k)), self._knot(int(k) + 1)
        return a + (b - a) * frac

    def factor(self, t: float) -> float:
        """Fraction of clear-sky irradiance that reaches the panels (Kasten & Czeplak)."""
        return 1.0 - 0.75 * self.cover(t) ** 3.4


def pv_power_w(kwp: float, latitude_deg: float, day_of_year: int, solar_hour: float,
               cloud_factor: float, performance_ratio: float = 0.85) -> float:
    """AC power of a PV system of ``kwp`` peak kW (W, >= 0)."""
    ghi = clear_sky_ghi(latitude_deg, day_of_year, solar_hour)
    return max(0.0, kwp * 1000.0 * ghi / 1000.0 * performance_ratio * cloud_factor)
