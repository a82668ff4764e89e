"""Canonical, versioned byte encoding and hashing.

Everything that is signed or hashed goes through :func:`canonical_bytes`: a domain tag naming the
kind and version, then compact JSON with sorted keys. Only ``str``, ``int``, ``bool``, ``None``,
lists/tuples and string-keyed dicts are allowed: a float anywhere is a programming error, so it
raises instead of producing an encoding that could differ between machines.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

ENCODING_VERSION = 1


class EncodingError(ValueError):
    """A value cannot be canonically encoded (float, bytes, non-string key, ...)."""


MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in JSON from outside (records need 3)."""

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_nesting_problem(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``body`` must not reach the JSON parser (nested deeper than ``max_depth``, or its
    brackets do not pair up), or None.

    Linear and without recursion: strings are cut out, then every pass of a regular expression
    removes the innermost empty ``[]``/``{}`` pairs, at most ``max_depth`` passes.
    """
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return None
    skeleton = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not skeleton:
            return None
        reduced = _EMPTY_PAIR.sub(b"", skeleton)
        if len(reduced) == len(skeleton):
            return "its brackets do not pair up"
        skeleton = reduced
    return None if not skeleton else f"nested deeper than {max_depth} levels"


def loads_untrusted(
    data: bytes | str,
    *,
    allow_floats: bool = True,
    max_int_digits: int | None = None,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """``json.loads`` for bytes from outside: every failure is a :class:`ValueError`.

    ``json.loads`` raises :class:`RecursionError` on deeply nested input (``b"[" * 100_000``
    is 100 kB), at a depth that depends on the calling thread's stack; here input nested deeper
    than ``max_depth`` is refused before parsing with ``ValueError("nested deeper than …")``, the
    same on every node (the replicated log decodes through this). Undecodable bytes and bad
    JSON raise ``json.JSONDecodeError`` / ``UnicodeDecodeError`` (both ``ValueError``), as
    does an integer beyond Python's int-conversion digit limit. With ``allow_floats=False``
    a float, ``NaN`` or ``Infinity`` is refused; with ``max_int_digits`` an integer literal of
    more digits is refused before it is converted (so the cost never depends on the
    interpreter's own limit).
    """
    hooks: dict[str, Any] = {}
    if not allow_floats:
        hooks["parse_float"] = hooks["parse_constant"] = _no_float
    if max_int_digits is not None:
        limit = max_int_digits

        def parse_int(text: str) -> int:
            digits = len(text) - text.startswith("-")
            if digits > limit:
                raise ValueError(f"an integer of {digits} digits exceeds {limit} digits")
            return int(text)

        hooks["parse_int"] = parse_int
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    problem = json_nesting_problem(raw, max_depth)
    if problem is not None:
        raise ValueError(f"JSON {problem}")
    return json.loads(data, **hooks)


def _no_float(text: str) -> Any:
    raise ValueError(f"floats are not allowed: {text[:32]}")


def _check(value: Any, path: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodingError(f"{path}: dict key {key!r} is not a str")
            _check(item, f"{path}.{key}")
        return
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    raise EncodingError(f"{path}: {type(value).__name__} is not canonically encodable")


def canonical_json(value: Any) -> bytes:
    """Compact, key-sorted, ASCII JSON of ``value``; rejects floats and other ambiguous types."""
    _check(value, "$")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def canonical_bytes(kind: str, fields: Mapping[str, Any], version: int = ENCODING_VERSION) -> bytes:
    """The canonical encoding of one record: ``microgrid/<kind>/v<version>\\n`` + canonical JSON.

    The domain tag keeps a signature over one kind of record from being valid for another.
    """
    return f"microgrid/{kind}/v{version}\n".encode() + canonical_json(dict(fields))


def sha256(data: bytes) -> bytes:
    """SHA-256 digest."""
    return hashlib.sha256(data).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash of ``leaves`` (RFC 6962 style: domain-separated leaves and nodes).

    Leaves are hashed as ``H(0x00 || leaf)``, inner nodes as ``H(0x01 || left || right)``, and an
    unbalanced tree splits at the largest power of two below the size, so no two different lists
    share a root (unlike Bitcoin's duplicate-last-leaf rule). The empty list hashes to ``H("")``.
    """
    if not leaves:
        return sha256(b"")
    level_hashes = [sha256(b"\x00" + leaf) for leaf in leaves]
    return _subtree(level_hashes)


def _subtree(hashes: Sequence[bytes]) -> bytes:
    n = len(hashes)
    if n == 1:
        return hashes[0]
    split = 1 << ((n - 1).bit_length() - 1)
    return sha256(b"\x01" + _subtree(hashes[:split]) + _subtree(hashes[split:]))
