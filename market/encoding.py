"""Canonical, versioned byte encoding and hashing.

Everything that is signed or hashed goes through :func:`canonical_bytes`: a domain tag naming the
kind and version, then compact JSON with sorted keys. Only ``str``, ``int``, ``bool``, ``None``,
lists/tuples and string-keyed dicts are allowed: a float anywhere is a programming error, so it
raises instead of producing an encoding that could differ between machines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

ENCODING_VERSION = 1


class EncodingError(ValueError):
    """A value cannot be canonically encoded (float, bytes, non-string key, ...)."""


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
