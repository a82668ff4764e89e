"""Register codec and read planning, property-tested."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meter.codec import decode, encode, float32_step, width
from meter.plan import plan_reads
from meter.profile import FieldSpec

INT_RANGES = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
              "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1),
              "acc32": (0, 2**32 - 1), "int64": (-(2**63), 2**63 - 1),
              "uint64": (0, 2**64 - 1)}


@given(st.sampled_from(sorted(INT_RANGES)), st.sampled_from(["big", "little"]), st.data())
def test_int_round_trip(type_name: str, word_order: str, data: st.DataObject) -> None:
    lo, hi = INT_RANGES[type_name]
    value = data.draw(st.integers(lo, hi))
    regs = encode(value, type_name, word_order)  # type: ignore[arg-type]
    assert len(regs) == width(type_name) and all(0 <= r <= 0xFFFF for r in regs)
    assert decode(regs, type_name, word_order) == value  # type: ignore[arg-type]


@given(st.floats(width=32, allow_nan=False), st.sampled_from(["big", "little"]))
def test_float32_round_trip(value: float, word_order: str) -> None:
    assert decode(encode(value, "float32", word_order), "float32", word_order) == value  # type: ignore[arg-type]


def test_word_order_and_known_encodings() -> None:
    assert encode(1.0, "float32") == [0x3F80, 0x0000]
    assert encode(1.0, "float32", "little") == [0x0000, 0x3F80]
    assert decode([0x0001, 0x0000], "int32", "little") == 1  # Carlo Gavazzi: low word first
    assert decode([0x0000, 0x0001], "int32", "big") == 1
    assert decode(encode("SunS", "string", length=2), "string") == "SunS"
    assert encode("SunS", "string", length=2) == [0x5375, 0x6E53]


def test_sunspec_not_implemented() -> None:
    assert decode([0x8000], "int16", sunspec=True) is None
    assert decode([0x8000], "sunssf", sunspec=True) is None
    assert decode([0xFFFF], "uint16", sunspec=True) is None
    assert decode([0x7FC0, 0], "float32", sunspec=True) is None
    assert decode([0, 0], "acc32", sunspec=True) == 0  # 0 Wh is a real reading
    assert decode([0x8000], "int16") == -32768
    assert math.isnan(decode([0x7FC0, 0], "float32"))  # type: ignore[arg-type]


def test_float32_step_matches_reference_table() -> None:
    """docs: one step is 0.06 Wh at 1,000 kWh, ~1 Wh at 10 MWh, ~8 Wh at 100 MWh."""
    assert float32_step(1000.0) * 1000 == pytest.approx(0.061, abs=0.001)
    assert float32_step(10_000.0) * 1000 == pytest.approx(0.98, abs=0.01)
    assert float32_step(100_000.0) * 1000 == pytest.approx(7.8, abs=0.1)
    x = 123_456.0
    nxt = struct.unpack(">f", struct.pack(">f", x + float32_step(x)))[0]
    assert nxt > x


def test_bad_lengths() -> None:
    with pytest.raises(ValueError):
        decode([1], "float32")
    with pytest.raises(ValueError):
        width("int128")
    with pytest.raises(ValueError):
        width("string")


fields_strategy = st.lists(
    st.builds(
        lambda a, t, f, i: FieldSpec(name=f"f{i}", address=a, type=t, function=f),
        st.integers(0, 2000), st.sampled_from(["uint16", "float32", "float64"]),
        st.sampled_from(["input", "holding"]), st.integers(0, 10**9),
    ),
    max_size=60, unique_by=lambda f: f.name,
)


@given(fields_strategy, st.integers(1, 125), st.integers(0, 40))
def test_plan_covers_every_field_within_limits(fields: list[FieldSpec], max_registers: int,
                                               max_gap: int) -> None:
    fields = [f for f in fields if f.count <= max_registers]
    blocks = plan_reads(fields, max_registers=max_registers, max_gap=max_gap)
    seen = [f.name for b in blocks for f in b.fields]
    assert sorted(seen) == sorted(f.name for f in fields)
    for b in blocks:
        assert 1 <= b.count <= max_registers
        for f in b.fields:
            assert f.function == b.function
            assert b.address <= f.address and f.address + f.count <= b.address + b.count


def test_plan_merges_adjacent_and_splits_at_125() -> None:
    many = [FieldSpec(name=f"r{i}", address=2 * i, type="float32") for i in range(100)]
    blocks = plan_reads(many)
    assert [b.count for b in blocks] == [124, 76]  # 200 registers: two requests
    gap = [FieldSpec(name="a", address=0, type="float32"),
           FieldSpec(name="b", address=30, type="float32")]
    assert len(plan_reads(gap, max_gap=16)) == 2
    assert len(plan_reads(gap, max_gap=28)) == 1
    with pytest.raises(ValueError):
        plan_reads(gap, max_registers=126)
