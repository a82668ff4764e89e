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

import tomllib
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from meter.codec import TYPE_WIDTH, WordOrder, width

PROFILE_DIR = Path(__file__).parent / "profiles"
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


def _field(name: str, raw: dict[str, Any], *, where: str, relative: bool = False) -> FieldSpec:
    key = "offset" if relative else "address"
    if key not in raw:
        raise ProfileError(f"{where}: field {name!r} needs {key!r}")
    type_name = raw.get("type", "float32")
    if type_name != "string" and type_name not in TYPE_WIDTH:
        raise ProfileError(f"{where}: field {name!r} has unknown type {type_name!r}")
    function = raw.get("function", "holding" if relative else "input")
    if function not in ("input", "holding"):
        raise ProfileError(f"{where}: field {name!r}: function must be input or holding")
    word_order = raw.get("word_order", "big")
    if word_order not in ("big", "little"):
        raise ProfileError(f"{where}: field {name!r}: word_order must be big or little")
    unit = raw.get("unit", "")
    if unit not in UNIT_FACTORS:
        raise ProfileError(f"{where}: field {name!r} has unknown unit {unit!r}")
    address = int(raw[key])
    if not 0 <= address <= 0xFFFF:
        raise ProfileError(f"{where}: field {name!r}: address out of range")
    known = {"address", "offset", "type", "function", "word_order", "unit", "scale",
             "scale_factor", "counter", "min", "max", "length"}
    unknown = set(raw) - known
    if unknown:
        raise ProfileError(f"{where}: field {name!r} has unknown keys {sorted(unknown)}")
    spec = FieldSpec(
        name=name,
        address=address,
        function=function,
        type=type_name,
        word_order=word_order,
        scale=Decimal(str(raw.get("scale", 1))),
        scale_factor=raw.get("scale_factor"),
        unit=unit,
        counter=bool(raw.get("counter", False)),
        min=None if raw.get("min") is None else float(raw["min"]),
        max=None if raw.get("max") is None else float(raw["max"]),
        length=raw.get("length"),
    )
    try:
        spec.count  # noqa: B018 - validates string length
    except ValueError as exc:
        raise ProfileError(f"{where}: field {name!r}: {exc}") from None
    return spec


def _fields(raw: dict[str, Any], *, where: str, relative: bool = False) -> dict[str, FieldSpec]:
    fields = {n: _field(n, v, where=where, relative=relative) for n, v in raw.items()}
    for spec in fields.values():
        if spec.scale_factor and spec.scale_factor not in fields:
            raise ProfileError(
                f"{where}: field {spec.name!r} refers to unknown scale factor "
                f"{spec.scale_factor!r}"
            )
    return fields


def parse_profile(data: dict[str, Any], *, source: str = "<data>") -> Profile:
    """Build a :class:`Profile` from the parsed TOML document ``data``."""
    meta = data.get("meter")
    if not isinstance(meta, dict) or "name" not in meta:
        raise ProfileError(f"{source}: needs a [meter] table with a name")
    sunspec = None
    fields: dict[str, FieldSpec] = {}
    if meta.get("kind", "fixed") == "sunspec":
        raw = data.get("sunspec", {})
        families = tuple(
            SunSpecFamily(
                models=tuple(int(m) for m in fam["models"]),
                length=int(fam["length"]),
                fields=_fields(fam.get("fields", {}), where=source, relative=True),
            )
            for fam in raw.get("family", [])
        )
        if not families:
            raise ProfileError(f"{source}: a SunSpec profile needs [[sunspec.family]] entries")
        for fam in families:
            missing = [f for f in REQUIRED_FIELDS if f not in fam.fields]
            if missing:
                raise ProfileError(f"{source}: SunSpec family {fam.models} lacks {missing}")
        sunspec = SunSpecSpec(
            base_addresses=tuple(int(a) for a in raw.get("base_addresses", (40000, 0, 50000))),
            families=families,
            serial_offset=int(raw.get("serial_offset", 50)),
            serial_length=int(raw.get("serial_length", 16)),
        )
    else:
        fields = _fields(data.get("fields", {}), where=source)
        missing = [f for f in (*REQUIRED_FIELDS, "serial") if f not in fields]
        if missing:
            raise ProfileError(f"{source}: profile lacks required fields {missing}")
    limits = meta.get("max_registers", 125)
    if not 1 <= limits <= 125:
        raise ProfileError(f"{source}: max_registers must be 1..125")
    return Profile(
        name=str(meta["name"]),
        manufacturer=str(meta.get("manufacturer", "")),
        model=str(meta.get("model", meta["name"])),
        description=str(meta.get("description", "")),
        fields=fields,
        rated_power_w=int(meta.get("rated_power_w", 50_000)),
        invert_power=bool(meta.get("invert_power", False)),
        max_registers=int(limits),
        max_gap=int(meta.get("max_gap", 16)),
        sunspec=sunspec,
        source=source,
        notes=tuple(meta.get("notes", ())),
    )


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
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: {exc}") from None
    return parse_profile(data, source=str(path))
