"""Decoding one poll's registers into a :class:`MeterSample`.

Sign convention: ``power_w`` is positive when the household imports from the grid and
negative when it exports (a profile with ``invert_power = true`` is flipped to match).
Energy counters are integer watt-hours (``import_wh``, ``export_wh``), rounded half-even from
the exact register value; ``*_resolution_wh`` is the size of one step of the register at that
value (float32 loses resolution as totals grow: ~1 Wh at 10 MWh, ~8 Wh at 100 MWh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal

from meter.codec import decode, float32_step
from meter.events import ImplausibleValue
from meter.plan import ReadBlock
from meter.profile import REQUIRED_FIELDS, FieldSpec, Profile

Value = int | float | str | None

MAX_COUNTER_WH = 10**15  # equals market.bounds.MAX_COUNTER_WH (tests/meter/test_bounds.py checks)


@dataclass(frozen=True)
class MeterSample:
    """One accepted reading of one meter. Counters are integer Wh; import is positive power."""

    meter: str
    serial: str
    time: float
    import_wh: int
    export_wh: int
    power_w: float
    voltage_v: float | None
    frequency_hz: float | None
    import_resolution_wh: int = 1
    export_resolution_wh: int = 1
    epoch: int = 0
    latency_s: float = 0.0
    values: dict[str, Value] = field(default_factory=dict)


@dataclass(frozen=True)
class Decoded:
    """Decoded, unit-converted field values of one poll, before the counter checks."""

    serial: str
    values: dict[str, Value]
    counters: dict[str, int]
    resolution: dict[str, int]


def _raw_values(profile: Profile, blocks: list[ReadBlock],
                responses: list[list[int]]) -> dict[str, tuple[FieldSpec, Value]]:
    sunspec = profile.sunspec is not None
    raw: dict[str, tuple[FieldSpec, Value]] = {}
    for block, registers in zip(blocks, responses, strict=True):
        for spec in block.fields:
            raw[spec.name] = (spec, decode(block.slice(spec, registers), spec.type,
                                           spec.word_order, sunspec=sunspec))
    return raw


def decode_sample(meter: str, profile: Profile, blocks: list[ReadBlock],
                  responses: list[list[int]]) -> Decoded:
    """Decode and check one poll; raise :class:`ImplausibleValue` on any bad value."""
    raw = _raw_values(profile, blocks, responses)
    values: dict[str, Value] = {}
    counters: dict[str, int] = {}
    resolution: dict[str, int] = {}
    for name, (spec, value) in raw.items():
        if spec.type == "sunssf" or name == "serial":
            continue
        if isinstance(value, str):
            values[name] = value
            continue
        if value is None:
            if name in REQUIRED_FIELDS:
                raise ImplausibleValue(meter, f"{name} is not implemented (SunSpec marker)",
                                       field=name)
            values[name] = None
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ImplausibleValue(meter, f"{name} is {value}", field=name, value=value)
        factor = spec.scale * spec.unit_factor
        if spec.scale_factor:
            sf = raw[spec.scale_factor][1]
            if not isinstance(sf, int) or not -10 <= sf <= 10:
                if name in REQUIRED_FIELDS or sf is not None:
                    raise ImplausibleValue(meter, f"{name}: bad scale factor {sf}",
                                           field=name, value=sf)
                values[name] = None
                continue
            factor = factor * Decimal(10) ** sf
        exact = Decimal(value) * factor
        if name == "power" and profile.invert_power:
            exact = -exact
        if (spec.min is not None and exact < Decimal(str(spec.min))) or (
            spec.max is not None and exact > Decimal(str(spec.max))
        ):
            raise ImplausibleValue(
                meter, f"{name} = {float(exact):g} {spec.canonical_unit} outside "
                f"[{spec.min}, {spec.max}]", field=name, value=float(exact),
            )
        if spec.counter:
            wh = int(exact.to_integral_value(ROUND_HALF_EVEN))
            if not 0 <= wh <= MAX_COUNTER_WH:
                raise ImplausibleValue(meter, f"{name} counter {wh} Wh outside 0..{MAX_COUNTER_WH}",
                                       field=name, value=wh)  # fmt: skip
            counters[name] = wh
            step = (Decimal(float32_step(float(value))) if spec.type == "float32"
                    else Decimal(1)) * factor
            resolution[name] = max(1, int(step.to_integral_value(ROUND_CEILING)))
            values[name] = counters[name]
        else:
            as_float = float(exact)
            if not math.isfinite(as_float):  # a finite register times a large scale
                raise ImplausibleValue(meter, f"{name} = {exact} overflows a float", field=name)
            values[name] = as_float
    serial_value = raw["serial"][1] if "serial" in raw else None
    if serial_value is None or serial_value == "":
        raise ImplausibleValue(meter, "serial number missing", field="serial")
    return Decoded(str(serial_value), values, counters, resolution)
