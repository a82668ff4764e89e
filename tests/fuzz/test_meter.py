"""Fuzz Modbus register decoding and meter profile loading.

- ``meter.codec.decode`` turns any register words of the right count into an int in the type's
  range, a float, a str or None; fixed-width values re-encode to the same words.
- ``meter.sample.decode_sample`` (what ``MeterReader.poll`` runs on every response), for every
  shipped profile and for random profiles, on random register words: only a typed
  :class:`MeterError` escapes, energy counters are ``int`` within ``0..MAX_COUNTER_WH`` (never a
  NaN, inf or float), other values are finite floats, None or text.
- ``meter.profile.parse_profile`` / ``load_profile`` on random documents and on byte mutations of
  the shipped TOML files: only :class:`ProfileError`; a profile that loads can be planned
  (``plan_reads``), so the reader never fails on it at poll time.
"""

from __future__ import annotations

import math
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from market.bounds import MAX_COUNTER_WH
from meter.codec import TYPE_WIDTH, decode, encode
from meter.events import MeterError
from meter.plan import plan_reads
from meter.profile import (
    PROFILE_DIR,
    UNIT_FACTORS,
    Profile,
    ProfileError,
    available_profiles,
    load_profile,
    parse_profile,
)
from meter.sample import decode_sample
from tests.fuzz.strategies import fuzz_settings, mutated

WORD = st.integers(0, 0xFFFF)
INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1), "sunssf": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1), "acc32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1),
}  # fmt: skip


@st.composite
def typed_words(draw: st.DrawFn) -> tuple[str, str, list[int]]:
    type_name = draw(st.sampled_from(sorted(TYPE_WIDTH)))
    words = draw(st.lists(WORD, min_size=TYPE_WIDTH[type_name], max_size=TYPE_WIDTH[type_name]))
    return type_name, draw(st.sampled_from(("big", "little"))), words


@fuzz_settings()
@given(typed_words(), st.booleans())
def test_register_decoding_is_total_and_round_trips(case: tuple[str, str, list[int]],
                                                    sunspec: bool) -> None:  # fmt: skip
    type_name, order, words = case
    value = decode(words, type_name, order, sunspec=sunspec)  # type: ignore[arg-type]
    if value is None:
        assert sunspec
        return
    if type_name in INT_RANGES:
        low, high = INT_RANGES[type_name]
        assert type(value) is int and low <= value <= high
        assert encode(value, type_name, order) == words  # type: ignore[arg-type]
    else:
        assert type(value) is float
        if not math.isnan(value):
            assert encode(value, type_name, order) == words  # type: ignore[arg-type]


@fuzz_settings()
@given(st.lists(WORD, max_size=20))
def test_string_registers_decode_to_printable_text(words: list[int]) -> None:
    text = decode(words, "string")
    assert isinstance(text, str) and "\x00" not in text and text == text.strip()


# --- whole samples -------------------------------------------------------------------------------


@cache
def shipped_profiles() -> tuple[Profile, ...]:
    """Every shipped profile, SunSpec ones resolved for each of their models."""
    out = []
    for name in available_profiles():
        profile = load_profile(name)
        if profile.sunspec is None:
            out.append(profile)
            continue
        for family in profile.sunspec.families:
            for model in family.models:
                out.append(profile.resolve_sunspec(model, 40070, 40002))
    return tuple(out)


def check_sample(profile: Profile, data: st.DataObject) -> None:
    """Random words for every planned block; decode_sample raises only MeterError."""
    blocks = plan_reads(profile.fields.values(), max_registers=profile.max_registers,
                        max_gap=profile.max_gap)  # fmt: skip
    special = st.sampled_from([0, 0xFFFF, 0x8000, 0x7FFF, 0x7F80, 0xFF80, 0x7FC0, 0x0001])
    responses = [data.draw(st.lists(WORD | special, min_size=b.count, max_size=b.count))
                 for b in blocks]  # fmt: skip
    try:
        decoded = decode_sample("m", profile, blocks, responses)
    except MeterError:
        return
    assert decoded.serial
    for name, counter in decoded.counters.items():
        assert type(counter) is int and 0 <= counter <= MAX_COUNTER_WH, (name, counter)
        assert decoded.values[name] == counter
        assert type(decoded.resolution[name]) is int and decoded.resolution[name] >= 1
    for name, value in decoded.values.items():
        assert value is None or isinstance(value, str | int) or math.isfinite(value), (name, value)
    for required in ("import_energy", "export_energy", "power"):
        assert decoded.values.get(required) is not None


@fuzz_settings()
@given(st.sampled_from(range(64)), st.data())
def test_shipped_profiles_decode_any_registers_to_a_sample_or_meter_error(
    i: int, data: st.DataObject
) -> None:
    profiles = shipped_profiles()
    check_sample(profiles[i % len(profiles)], data)


FIELD_TYPES = (*sorted(TYPE_WIDTH), "string")
HOSTILE = st.sampled_from([None, True, "x", "", [], {}, -1, 2**70, 1.5, math.nan, math.inf,
                           -math.inf, 1e308, "1e999999999", "nan"])  # fmt: skip


@st.composite
def field_docs(draw: st.DrawFn, name: str, address: int) -> dict[str, Any]:
    type_name = draw(st.sampled_from(FIELD_TYPES))
    doc: dict[str, Any] = {"address": address, "type": type_name,
                           "function": draw(st.sampled_from(("input", "holding"))),
                           "word_order": draw(st.sampled_from(("big", "little")))}  # fmt: skip
    if type_name == "string":
        doc["length"] = draw(st.integers(1, 8))
    if draw(st.booleans()):
        doc["unit"] = draw(st.sampled_from(sorted(UNIT_FACTORS)))
    if draw(st.booleans()):
        doc["scale"] = draw(st.sampled_from([0.001, 0.01, 0.1, 1, 10, 1000, 1e-9, 1e12, -1, 0]))
    if draw(st.booleans()):
        doc["counter"] = True
    if draw(st.booleans()):
        doc["min"] = draw(st.integers(-(10**6), 0) | st.floats(allow_nan=False))
    if draw(st.booleans()):
        doc["max"] = draw(st.integers(0, 10**16) | st.floats(allow_nan=False))
    if draw(st.integers(0, 9)) == 0:  # a hostile value for one key
        doc[draw(st.sampled_from(sorted({*doc, "scale", "min", "max", "length", "counter"})))] = (
            draw(HOSTILE)
        )
    return doc


@st.composite
def profile_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A fixed-address profile: the required fields plus extras, some with scale factors."""
    names = ["import_energy", "export_energy", "power", "serial", "voltage", "frequency", "sf"]
    fields: dict[str, Any] = {}
    address = draw(st.integers(0, 100))
    for name in names:
        fields[name] = draw(field_docs(name, address))
        address += 8 + draw(st.integers(0, 20))
    fields["sf"]["type"] = "sunssf"
    for name in ("import_energy", "power"):
        if draw(st.booleans()):
            fields[name]["scale_factor"] = "sf"
    meta = {"name": "fuzz", "rated_power_w": draw(st.integers(1, 10**6)),
            "invert_power": draw(st.booleans()), "max_registers": draw(st.integers(1, 125)),
            "max_gap": draw(st.integers(0, 30))}  # fmt: skip
    return {"meter": meta, "fields": fields}


@fuzz_settings()
@given(profile_docs(), st.data())
def test_random_profiles_load_or_fail_typed_and_decode_or_fail_typed(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    try:
        profile = parse_profile(doc)
    except ProfileError:
        return
    check_sample(profile, data)


# --- profile files ------------------------------------------------------------------------------

PROFILE_TEXTS = tuple(sorted(p.read_bytes() for p in PROFILE_DIR.glob("*.toml")))
TOML_TOKENS = (b"nan", b"inf", b"-inf", b"1e999", b"-1", b"99999999999999999999", b"9" * 4301,
               b'"x"', b"[]", b"{}", b"[" * 3000 + b"]" * 3000, b"true", b'"string"', b"0x10000",
               b"1.5", b'"1e-999999999"', b"\xff")  # fmt: skip


@st.composite
def profile_texts(draw: st.DrawFn) -> bytes:
    text = draw(st.sampled_from(PROFILE_TEXTS))
    lines = text.split(b"\n")
    values = [i for i, line in enumerate(lines) if b" = " in line and not line.startswith(b"#")]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.sampled_from(values))
        lines[i] = lines[i].split(b" = ", 1)[0] + b" = " + draw(st.sampled_from(TOML_TOKENS))
    edited = b"\n".join(lines)
    return draw(st.one_of(st.just(edited), mutated(edited), mutated(text)))


@fuzz_settings()
@given(profile_texts())
def test_profile_files_load_or_raise_profile_error(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "meter.toml"
        path.write_bytes(text)
        try:
            profile = load_profile(path)
        except ProfileError:
            return
    if profile.sunspec is None:
        plan_reads(profile.fields.values(), max_registers=profile.max_registers,
                   max_gap=profile.max_gap)  # fmt: skip
    else:
        for family in profile.sunspec.families:
            resolved = profile.resolve_sunspec(family.models[0], 40070, 40002)
            plan_reads(resolved.fields.values(), max_registers=resolved.max_registers,
                       max_gap=resolved.max_gap)  # fmt: skip


def _sdm630_doc() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((PROFILE_DIR / "sdm630.toml").read_text())


def test_profile_regressions_found_by_fuzzing_are_profile_errors() -> None:
    """Each of these escaped as TypeError/ValueError/OverflowError/RecursionError, or loaded and
    then failed at poll time (decimal.InvalidOperation on a NaN limit, ValueError from
    plan_reads for a field wider than one request)."""
    edits: list[tuple[str, str, Any]] = [
        ("power", "min", math.nan), ("power", "scale", math.inf), ("power", "scale", "x"),
        ("power", "address", "x"), ("power", "address", 1.5), ("power", "counter", "false"),
        ("power", "length", "4"), ("power", "unit", []), ("power", "scale_factor", []),
        ("serial", "type", "string"),  # a string field without a length
        ("power", "type", "sunssf"),  # loaded; samples then lacked power (KeyError at poll)
        ("import_energy", "counter", False),  # loaded; KeyError building the sample
    ]  # fmt: skip
    for field, key, value in edits:
        doc = _sdm630_doc()
        doc["fields"][field][key] = value
        try:
            parse_profile(doc)
        except ProfileError:
            continue
        raise AssertionError(f"{field}.{key} = {value!r} loaded")
    doc = _sdm630_doc()
    doc["fields"]["serial"].update(type="string", length=126)
    try:
        parse_profile(doc)
    except ProfileError:
        pass
    else:
        raise AssertionError("a 126-register field loaded")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.toml"
        path.write_bytes((PROFILE_DIR / "sdm630.toml").read_bytes().replace(
            b"rated_power_w = 69000", b"rated_power_w = " + b"9" * 4301))  # fmt: skip
        try:
            load_profile(path)
        except ProfileError:
            pass
        else:
            raise AssertionError("a 4301-digit rated power loaded")
    doc = _sdm630_doc()
    doc["meter"]["rated_power_w"] = math.inf
    try:
        parse_profile(doc)
    except ProfileError:
        pass
    else:
        raise AssertionError("rated_power_w = inf loaded")


def test_negative_or_huge_counters_are_implausible_values() -> None:
    """An int32 counter of -1 Wh, or a uint32 scaled beyond any meter, is refused as
    ImplausibleValue, never handed on (a MeterReading could not even be signed with it)."""
    for type_name, scale in (("int32", 1), ("uint32", 10**12)):
        doc = _sdm630_doc()
        for spec in doc["fields"].values():  # zeros elsewhere are then plausible
            spec.pop("min", None)
            spec.pop("max", None)
        doc["fields"]["import_energy"].update(type=type_name, unit="Wh", scale=scale)
        profile = parse_profile(doc)
        blocks = plan_reads(profile.fields.values(), max_registers=profile.max_registers,
                            max_gap=profile.max_gap)  # fmt: skip
        responses = []
        for block in blocks:
            regs = [0] * block.count
            for spec in block.fields:
                start = spec.address - block.address
                if spec.name == "import_energy":
                    regs[start : start + 2] = [0xFFFF, 0xFFFF]
                elif spec.name == "serial":
                    regs[start : start + 2] = [0, 7]
            responses.append(regs)
        try:
            decoded = decode_sample("m", profile, blocks, responses)
        except MeterError as exc:
            assert exc.context.get("field") == "import_energy"
            continue
        raise AssertionError(f"{type_name} counter {decoded.counters} accepted")
