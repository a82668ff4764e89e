"""Meter profiles: register maps as TOML data files, loaded with the standard library.

A profile names the fields a node needs (``import_energy``, ``export_energy``, ``power``,
``voltage``, ``frequency``, ``serial``) plus any extras, each with its 0-based address,
function (``input`` = FC04, ``holding`` = FC03), type, word order, scale, unit, whether it is a
monotonic counter and its plausibility limits. Shipped profiles live in ``meter/profiles/``;
:func:`load_profile` also takes a path, so a user adds a meter without writing Python.

SunSpec profiles (``kind = "sunspec"``) give field offsets relative to a meter model's ID
register; :meth:`Profile.resolve_sunspec` turns them into absolute addresses once a scan has
found the model (see :mod:`meter.sunspec`).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from meter.codec import TYPE_WIDTH, WordOrder, width

PROFILE_DIR = Path(__file__).parent / "profiles"
MODBUS_MAX_REGISTERS = 125
"""Most registers one Modbus read returns (and so the widest field a profile may have)."""
MIN_SCALE, MAX_SCALE = 1e-12, 1e12
"""Bounds on the magnitude of a field's scale: anything outside is a typo, not a meter."""
MAX_RATED_POWER_W = 10**8
"""100 MW: far beyond any household or feeder connection (``market.bounds.MAX_POWER_W``)."""
Function = Literal["input", "holding"]

REQUIRED_FIELDS = ("import_energy", "export_energy", "power")
"""Fields without which a reading is useless to a trading node."""

UNIT_FACTORS: dict[str, tuple[str, Decimal]] = {
    "Wh": ("Wh", Decimal(1)),
    "kWh": ("Wh", Decimal(1000)),
    "MWh": ("Wh", Decimal(1_000_000)),
    "W": ("W", Decimal(1)),
    "kW": ("W", Decimal(1000)),
    "V": ("V", Decimal(1)),
    "A": ("A", Decimal(1)),
    "Hz": ("Hz", Decimal(1)),
    "VA": ("VA", Decimal(1)),
    "var": ("var", Decimal(1)),
    "": ("", Decimal(1)),
}
"""Unit in the register -> (canonical unit, factor). Energy is always reported in Wh."""


class ProfileError(ValueError):
    """A profile file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class FieldSpec:
    """One value in a meter's register map."""

    name: str
    address: int
    function: Function = "input"
    type: str = "float32"
    word_order: WordOrder = "big"
    scale: Decimal = Decimal(1)
    scale_factor: str | None = None
    unit: str = ""
    counter: bool = False
    min: float | None = None
    max: float | None = None
    length: int | None = None

    @property
    def count(self) -> int:
        """Registers this field occupies."""
        return width(self.type, self.length)

    @property
    def canonical_unit(self) -> str:
        """The unit the reader reports this field in (Wh for every energy counter)."""
        return UNIT_FACTORS[self.unit][0]

    @property
    def unit_factor(self) -> Decimal:
        """Factor from the register's unit to the canonical unit."""
        return UNIT_FACTORS[self.unit][1]


@dataclass(frozen=True)
class SunSpecFamily:
    """Field offsets shared by a family of SunSpec meter models (e.g. 201-204)."""

    models: tuple[int, ...]
    length: int
    fields: dict[str, FieldSpec]


@dataclass(frozen=True)
class SunSpecSpec:
    """How to find a SunSpec meter: candidate base addresses and model families."""

    base_addresses: tuple[int, ...]
    families: tuple[SunSpecFamily, ...]
    serial_offset: int = 50
    serial_length: int = 16

    def family_for(self, model_id: int) -> SunSpecFamily | None:
        """The family that describes ``model_id``, if any."""
        return next((f for f in self.families if model_id in f.models), None)


@dataclass(frozen=True)
class Profile:
    """A meter model's register map and plausibility limits."""

    name: str
    manufacturer: str
    model: str
    fields: dict[str, FieldSpec]
    rated_power_w: int
    description: str = ""
    invert_power: bool = False
    max_registers: int = 125
    max_gap: int = 16
    sunspec: SunSpecSpec | None = None
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def is_sunspec(self) -> bool:
        """True when addresses are only known after a SunSpec scan."""
        return self.sunspec is not None and not self.fields

    def resolve_sunspec(self, model_id: int, model_address: int, common_address: int) -> Profile:
        """A concrete profile for a meter model found at ``model_address`` by a scan."""
        if self.sunspec is None:
            raise ProfileError(f"profile {self.name} is not a SunSpec profile")
        family = self.sunspec.family_for(model_id)
        if family is None:
            raise ProfileError(f"profile {self.name} has no fields for SunSpec model {model_id}")
        fields = {
            name: replace(spec, address=model_address + spec.address, function="holding")
            for name, spec in family.fields.items()
        }
        fields["serial"] = FieldSpec(
            name="serial",
            address=common_address + self.sunspec.serial_offset,
            function="holding",
            type="string",
            length=self.sunspec.serial_length,
        )
        return replace(self, fields=fields, model=f"{self.model} {model_id}")


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _int(value: Any, low: int, high: int, what: str) -> int:
    """``value`` if it is an integer in ``low..high``, else a :class:`ProfileError`."""
    if not _is_int(value) or not low <= value <= high:
        raise ProfileError(f"{what} must be an integer in {low}..{high}, not {value!r}")
    return value


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> Any:
    if not isinstance(value, str) or value not in allowed:
        raise ProfileError(f"{what} must be {' or '.join(allowed)}, not {value!r}")
    return value


def _field(name: str, raw: Any, *, where: str, relative: bool = False) -> FieldSpec:
    key = "offset" if relative else "address"
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: field {name!r} must be a table")
    if key not in raw:
        raise ProfileError(f"{where}: field {name!r} needs {key!r}")
    known = {"address", "offset", "type", "function", "word_order", "unit", "scale",
             "scale_factor", "counter", "min", "max", "length"}
    unknown = set(raw) - known
    if unknown:
        raise ProfileError(f"{where}: field {name!r} has unknown keys {sorted(unknown)}")
    what = f"{where}: field {name!r}"
    type_name = raw.get("type", "float32")
    if not isinstance(type_name, str) or (type_name != "string" and type_name not in TYPE_WIDTH):
        raise ProfileError(f"{where}: field {name!r} has unknown type {type_name!r}")
    function = _choice(raw.get("function", "holding" if relative else "input"),
                       ("input", "holding"), f"{what}: function")  # fmt: skip
    word_order = _choice(raw.get("word_order", "big"), ("big", "little"), f"{what}: word_order")
    unit = raw.get("unit", "")
    if not isinstance(unit, str) or unit not in UNIT_FACTORS:
        raise ProfileError(f"{where}: field {name!r} has unknown unit {unit!r}")
    address = raw[key]
    if not _is_int(address) or not 0 <= address <= 0xFFFF:
        raise ProfileError(f"{what}: address out of range 0..0xFFFF: {address!r}")
    scale = raw.get("scale", 1)
    if not _is_number(scale) or not MIN_SCALE <= abs(scale) <= MAX_SCALE:
        raise ProfileError(f"{what}: scale must be a number of magnitude "
                           f"{MIN_SCALE:g}..{MAX_SCALE:g}, not {scale!r}")  # fmt: skip
    scale_factor = raw.get("scale_factor")
    if scale_factor is not None and not isinstance(scale_factor, str):
        raise ProfileError(f"{what}: scale_factor must name a field, not {scale_factor!r}")
    counter = raw.get("counter", False)
    if type(counter) is not bool:
        raise ProfileError(f"{what}: counter must be true or false, not {counter!r}")
    limits = {k: raw.get(k) for k in ("min", "max")}
    for k, v in limits.items():
        if v is not None and not _is_number(v):
            raise ProfileError(f"{what}: {k} must be a finite number, not {v!r}")
    length = raw.get("length")
    if length is not None:
        length = _int(length, 1, MODBUS_MAX_REGISTERS, f"{what}: length")
    spec = FieldSpec(
        name=name,
        address=address,
        function=function,
        type=type_name,
        word_order=word_order,
        scale=Decimal(str(scale)),
        scale_factor=scale_factor,
        unit=unit,
        counter=counter,
        min=None if limits["min"] is None else float(limits["min"]),
        max=None if limits["max"] is None else float(limits["max"]),
        length=length,
    )
    try:
        count = spec.count
    except ValueError as exc:
        raise ProfileError(f"{where}: field {name!r}: {exc}") from None
    if address + count - 1 > 0xFFFF:
        raise ProfileError(f"{what}: registers {address}..{address + count - 1} pass 0xFFFF")
    return spec


def _fields(raw: Any, *, where: str, relative: bool = False,
            max_registers: int = MODBUS_MAX_REGISTERS) -> dict[str, FieldSpec]:  # fmt: skip
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: fields must be a table of field tables")
    fields = {n: _field(n, v, where=where, relative=relative) for n, v in raw.items()}
    for spec in fields.values():
        if spec.scale_factor and spec.scale_factor not in fields:
            raise ProfileError(
                f"{where}: field {spec.name!r} refers to unknown scale factor "
                f"{spec.scale_factor!r}"
            )
        if spec.count > max_registers:
            raise ProfileError(f"{where}: field {spec.name!r} is wider than max_registers "
                               f"({spec.count} > {max_registers})")  # fmt: skip
    return fields


def _check_required(fields: dict[str, FieldSpec], where: str) -> None:
    """The fields a sample is built from must decode to numbers; energies must be counters."""
    for name in REQUIRED_FIELDS:
        spec = fields.get(name)
        if spec is None:
            continue
        if spec.type in ("string", "sunssf"):
            raise ProfileError(f"{where}: field {name!r} must be numeric, not {spec.type}")
        if name != "power" and not spec.counter:
            raise ProfileError(f"{where}: field {name!r} must be a counter (counter = true)")


def _int_list(value: Any, low: int, high: int, what: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ProfileError(f"{what} must be a non-empty list of integers")
    return tuple(_int(v, low, high, what) for v in value)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ProfileError(f"{what} must be a string, not {value!r}")
    return value


def parse_profile(data: Any, *, source: str = "<data>") -> Profile:
    """Build a :class:`Profile` from the parsed TOML document ``data``.

    Raises :class:`ProfileError` for anything malformed (and nothing else), so a profile that
    parses can be planned and decoded: every address and width fits Modbus, every limit and
    scale is a finite number, every flag a boolean.
    """
    meta = data.get("meter") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or "name" not in meta:
        raise ProfileError(f"{source}: needs a [meter] table with a name")
    limits = _int(meta.get("max_registers", 125), 1, MODBUS_MAX_REGISTERS,
                  f"{source}: max_registers")  # fmt: skip
    sunspec = None
    fields: dict[str, FieldSpec] = {}
    kind = meta.get("kind", "fixed")
    if kind == "sunspec":
        raw = data.get("sunspec", {})
        if not isinstance(raw, dict) or not isinstance(raw.get("family", []), list):
            raise ProfileError(f"{source}: [sunspec] must be a table with [[sunspec.family]]")
        families = []
        for i, fam in enumerate(raw.get("family", [])):
            what = f"{source}: sunspec.family[{i}]"
            if not isinstance(fam, dict) or "models" not in fam or "length" not in fam:
                raise ProfileError(f"{what} needs models and length")
            families.append(SunSpecFamily(
                models=_int_list(fam["models"], 1, 0xFFFE, f"{what}.models"),
                length=_int(fam["length"], 0, 0xFFFF, f"{what}.length"),
                fields=_fields(fam.get("fields", {}), where=source, relative=True,
                               max_registers=limits),
            ))  # fmt: skip
        if not families:
            raise ProfileError(f"{source}: a SunSpec profile needs [[sunspec.family]] entries")
        for fam in families:
            missing = [f for f in REQUIRED_FIELDS if f not in fam.fields]
            if missing:
                raise ProfileError(f"{source}: SunSpec family {fam.models} lacks {missing}")
            _check_required(fam.fields, f"{source}: SunSpec family {fam.models}")
        sunspec = SunSpecSpec(
            base_addresses=_int_list(raw.get("base_addresses", [40000, 0, 50000]), 0, 0xFFFF,
                                     f"{source}: sunspec.base_addresses"),
            families=tuple(families),
            serial_offset=_int(raw.get("serial_offset", 50), 0, 0xFFFF,
                               f"{source}: sunspec.serial_offset"),
            serial_length=_int(raw.get("serial_length", 16), 1, limits,
                               f"{source}: sunspec.serial_length"),
        )  # fmt: skip
    elif kind == "fixed":
        fields = _fields(data.get("fields", {}), where=source, max_registers=limits)
        missing = [f for f in (*REQUIRED_FIELDS, "serial") if f not in fields]
        if missing:
            raise ProfileError(f"{source}: profile lacks required fields {missing}")
        _check_required(fields, source)
    else:
        raise ProfileError(f"{source}: meter kind must be fixed or sunspec, not {kind!r}")
    invert = meta.get("invert_power", False)
    if type(invert) is not bool:
        raise ProfileError(f"{source}: invert_power must be true or false")
    notes = meta.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ProfileError(f"{source}: notes must be a list of strings")
    name = meta["name"]
    return Profile(
        name=_text(name, f"{source}: meter.name"),
        manufacturer=_text(meta.get("manufacturer", ""), f"{source}: meter.manufacturer"),
        model=_text(meta.get("model", name), f"{source}: meter.model"),
        description=_text(meta.get("description", ""), f"{source}: meter.description"),
        fields=fields,
        rated_power_w=_int(meta.get("rated_power_w", 50_000), 1, MAX_RATED_POWER_W,
                           f"{source}: rated_power_w"),
        invert_power=invert,
        max_registers=limits,
        max_gap=_int(meta.get("max_gap", 16), 0, MODBUS_MAX_REGISTERS, f"{source}: max_gap"),
        sunspec=sunspec,
        source=source,
        notes=tuple(notes),
    )  # fmt: skip


def available_profiles() -> list[str]:
    """Names of the profiles shipped in ``meter/profiles/``."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name (``"sdm630"``) or any profile file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ProfileError(
            f"no profile {name_or_path!r} (shipped: {', '.join(available_profiles())})"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, a 4301-digit integer
        raise ProfileError(f"{path}: {exc}") from None
    except RecursionError:
        raise ProfileError(f"{path}: nested too deeply") from None
    return parse_profile(data, source=str(path))
