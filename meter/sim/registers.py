"""Register images of simulated meters, encoded from a :class:`MeterState` with a profile.

Fixed-address profiles are encoded field by field with the same profile data the reader
decodes with (so a profile file drives both sides). SunSpec devices get a full chain: the
"SunS" marker at 40000 (or 0 or 50000), common model 1, a meter model (201-204 integer + scale
factors or 211-214 float32) and the end marker; unused points carry "not implemented" values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from meter.codec import encode
from meter.profile import FieldSpec, Profile
from meter.sim.household import MeterState

SUNSPEC_BASE = 40000
SUNSPEC_SF = {"current_sf": -2, "voltage_sf": -1, "frequency_sf": -2, "power_sf": 0,
              "energy_sf": 0}
COMMON_LENGTH = 66


@dataclass(frozen=True)
class Image:
    """Registers of one table (holding or input) from ``start``, contiguous."""

    start: int
    registers: list[int]


def _raw(spec: FieldSpec, value: float | int, profile: Profile, sf: int = 0,
         bad: float | None = None) -> list[int]:
    if spec.type == "string":
        return encode(f"SIM{value}" if isinstance(value, int) else str(value), "string",
                      length=spec.length)
    if bad is not None and spec.type.startswith("float"):
        return encode(bad, spec.type, spec.word_order)
    if bad is not None and not math.isfinite(bad):
        bad = 1e12  # integer registers have no NaN or inf: a wild value the limits must catch
    if bad is not None:
        value = bad
    if spec.name == "power" and profile.invert_power:
        value = -value
    scaled = Decimal(str(float(value))) / spec.unit_factor / spec.scale / (Decimal(10) ** sf)
    if spec.type.startswith("float"):
        return encode(float(scaled), spec.type, spec.word_order)
    limit = 2 ** (16 * spec.count - (0 if spec.type.startswith("u") or spec.type == "acc32"
                                     else 1))
    raw = int(scaled.to_integral_value())
    lo = 0 if spec.type.startswith("u") or spec.type == "acc32" else -limit + 1
    return encode(max(lo, min(limit - 1, raw)), spec.type, spec.word_order)


def _place(table: dict[int, int], address: int, words: list[int]) -> None:
    for i, w in enumerate(words):
        table[address + i] = w


def _images(tables: dict[str, dict[int, int]]) -> dict[str, Image]:
    out = {}
    for name, table in tables.items():
        if table:
            lo, hi = min(table), max(table)
            out[name] = Image(lo, [table.get(a, 0) for a in range(lo, hi + 1)])
    return out


def fixed_image(profile: Profile, state: MeterState,
                bad_power: float | None = None) -> dict[str, Image]:
    """Encode ``state`` with a fixed-address profile (SDM630, EM24, ...); ``bad_power``
    replaces the power reading (fault injection: NaN, inf or an impossible value)."""
    tables: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
    for spec in profile.fields.values():
        value = state.field_value(spec.name)
        bad = bad_power if spec.name == "power" else None
        _place(tables[spec.function], spec.address, _raw(spec, value, profile, bad=bad))
    return _images(tables)


def sunspec_layout(profile: Profile, model_id: int,
                   base: int = SUNSPEC_BASE) -> tuple[int, int, int]:
    """(common model address, meter model address, meter model length) for ``base``."""
    assert profile.sunspec is not None
    family = profile.sunspec.family_for(model_id)
    if family is None:
        raise ValueError(f"no SunSpec family for model {model_id}")
    common = base + 2
    return common, common + 2 + COMMON_LENGTH, family.length


def sunspec_image(profile: Profile, model_id: int, state: MeterState,
                  bad_power: float | None = None,
                  base: int = SUNSPEC_BASE) -> dict[str, Image]:
    """Encode ``state`` as a SunSpec device at ``base`` (40000, 0 or 50000): marker, model 1,
    meter model, end marker."""
    assert profile.sunspec is not None
    common, meter_at, length = sunspec_layout(profile, model_id, base)
    family = profile.sunspec.family_for(model_id)
    assert family is not None
    table: dict[int, int] = {}
    _place(table, base, [0x5375, 0x6E53])
    _place(table, common, [1, COMMON_LENGTH])
    _place(table, common + 2, encode("Microgrid", "string", length=16))
    _place(table, common + 18, encode(f"SimMeter {model_id}", "string", length=16))
    _place(table, common + 34, encode("", "string", length=8))
    _place(table, common + 42, encode("1.0", "string", length=8))
    _place(table, common + 50, encode(f"SIM{state.serial}", "string", length=16))
    _place(table, common + 66, [1, 0x8000])
    floats = model_id >= 211
    filler = [0x7FC0, 0x0000] * (length // 2) if floats else [0x8000] * length
    _place(table, meter_at, [model_id, length, *filler[:length]])
    if floats:
        _place(table, meter_at + 2 + length - 2, [0, 0])  # Evt bitfield32
    else:
        for off in range(38, 38 + 16 * 2, 2):  # acc32 points: 0 is "not accumulated"
            _place(table, meter_at + off, [0, 0])
        _place(table, meter_at + 55, [0] * (length + 2 - 55))  # VAh/VArh, SFs, Evt
    for spec in family.fields.values():
        address = meter_at + spec.address
        if spec.type == "sunssf":
            _place(table, address, encode(SUNSPEC_SF.get(spec.name, 0), "sunssf"))
            continue
        sf = SUNSPEC_SF.get(spec.scale_factor or "", 0)
        value = state.field_value(spec.name)
        bad = bad_power if spec.name == "power" else None
        if bad is not None and not floats and not math.isfinite(bad):
            _place(table, address, [0x8000])  # int16 "not implemented"
            continue
        _place(table, address, _raw(spec, value, profile, sf=sf, bad=bad))
    _place(table, meter_at + 2 + length, [0xFFFF, 0])
    return _images({"holding": table})
