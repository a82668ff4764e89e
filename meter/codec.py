"""Register codecs: Modbus 16-bit registers to Python values and back.

Pure functions, shared by the reader (decode) and the simulator (encode). Registers are
big-endian 16-bit words on the wire; ``word_order`` says which word of a 32/64-bit value comes
first (``"big"``: high word first, Eastron and SunSpec; ``"little"``: low word first, Carlo
Gavazzi). SunSpec "not implemented" markers decode to ``None``.
"""

from __future__ import annotations

import math
import struct
from typing import Literal

WordOrder = Literal["big", "little"]

TYPE_WIDTH: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "sunssf": 1,
    "int32": 2,
    "uint32": 2,
    "acc32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
"""Registers per value for every fixed-width type (``string`` takes its own ``length``)."""

_STRUCT: dict[str, str] = {
    "int16": ">h",
    "uint16": ">H",
    "sunssf": ">h",
    "int32": ">i",
    "uint32": ">I",
    "acc32": ">I",
    "float32": ">f",
    "int64": ">q",
    "uint64": ">Q",
    "float64": ">d",
}

NOT_IMPLEMENTED: dict[str, int] = {"int16": 0x8000, "sunssf": 0x8000, "uint16": 0xFFFF}
"""SunSpec "not implemented" raw values of the one-register types."""


def width(type_name: str, length: int | None = None) -> int:
    """Number of registers a value of ``type_name`` occupies."""
    if type_name == "string":
        if not length or length < 1:
            raise ValueError("a string field needs a positive length (registers)")
        return length
    try:
        return TYPE_WIDTH[type_name]
    except KeyError:
        raise ValueError(f"unknown register type {type_name!r}") from None


def _ordered(registers: list[int], word_order: WordOrder) -> list[int]:
    return list(reversed(registers)) if word_order == "little" else list(registers)


def decode(
    registers: list[int],
    type_name: str,
    word_order: WordOrder = "big",
    *,
    sunspec: bool = False,
) -> int | float | str | None:
    """Decode registers into an int, float or str; ``None`` for a SunSpec "not implemented".

    With ``sunspec=True``, 0x8000 (int16, sunssf), 0xFFFF (uint16) and NaN (float32) mean
    "not implemented" and decode to ``None``. An acc32 of 0 is read as 0: SunSpec also uses 0
    for "not accumulated", but a meter that never exported legitimately shows 0 Wh.
    """
    if type_name == "string":
        raw = b"".join(r.to_bytes(2, "big") for r in registers)
        return raw.split(b"\x00", 1)[0].decode("ascii", errors="replace").strip()
    n = width(type_name)
    if len(registers) != n:
        raise ValueError(f"{type_name} needs {n} registers, got {len(registers)}")
    if sunspec and n == 1 and registers[0] == NOT_IMPLEMENTED.get(type_name):
        return None
    data = b"".join((r & 0xFFFF).to_bytes(2, "big") for r in _ordered(registers, word_order))
    value = struct.unpack(_STRUCT[type_name], data)[0]
    if sunspec and isinstance(value, float) and math.isnan(value):
        return None
    return value


def encode(value: int | float | str, type_name: str, word_order: WordOrder = "big",
           length: int | None = None) -> list[int]:
    """Encode a value into registers (the inverse of :func:`decode`); ints are range-checked."""
    if type_name == "string":
        n = width(type_name, length)
        raw = str(value).encode("ascii")[: 2 * n].ljust(2 * n, b"\x00")
        return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 2 * n, 2)]
    fmt = _STRUCT[type_name]
    if type_name.startswith("float"):
        data = struct.pack(fmt, float(value))
    else:
        data = struct.pack(fmt, int(value))
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return _ordered(words, word_order)


def float32_step(value: float) -> float:
    """Distance from ``value`` to the next float32 (one unit in the last place)."""
    (bits,) = struct.unpack(">I", struct.pack(">f", abs(value)))
    (nxt,) = struct.unpack(">f", struct.pack(">I", bits + 1))
    (cur,) = struct.unpack(">f", struct.pack(">I", bits))
    return nxt - cur
