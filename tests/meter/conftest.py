"""Fixtures for the meter tests: an in-process simulator on loopback and a reader for it."""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Iterator

import pytest

from meter.reader import MeterConfig, MeterReader
from meter.sim import MeterSimulator
from meter.transport import TcpEndpoint

HOST = "127.0.0.1"
START = dt.datetime(2025, 6, 21, 12, 30)


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a float32 register holds it."""
    return struct.unpack(">f", struct.pack(">f", x))[0]


def expected_counter_wh(sim: MeterSimulator, device_id: int, wh: float) -> int:
    """What an exact reader must report for a counter of ``wh`` on that meter's registers."""
    profile = sim.config(device_id).profile
    if profile == "sunspec":
        model = sim.config(device_id).sunspec_model
        return round(f32(wh)) if model >= 211 else round(wh)
    if profile.startswith("em"):
        return round(round(wh / 100)) * 100  # int32 x 0.1 kWh
    return round(f32(wh / 1000) * 1000)


@pytest.fixture
def sim() -> Iterator[MeterSimulator]:
    """Eight seeded households (SDM630 and SunSpec) on an ephemeral port, clock under test
    control (speed 0), started at 12:30 on midsummer day and advanced to 13:00."""
    simulator = MeterSimulator(8, seed=7, speed=0, host=HOST, port=0, start=START)
    simulator.advance(1800)
    with simulator:
        yield simulator


def configs_for(sim: MeterSimulator, port: int | None = None) -> list[MeterConfig]:
    """One reader config per simulated household."""
    return [
        MeterConfig(f"hh{d}", sim.config(d).profile, TcpEndpoint(HOST, port or sim.ports[0]), d)
        for d in sim.device_ids
    ]


@pytest.fixture
def reader(sim: MeterSimulator) -> Iterator[MeterReader]:
    """A reader for every household of ``sim`` with short timeouts."""
    r = MeterReader(configs_for(sim), timeout_s=0.3, retries=1, backoff_s=0.02,
                    rebaseline_after=3, clock=lambda: sim.sim_time)
    yield r
    r.close()
