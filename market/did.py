"""Household identity: Ed25519 public keys as ``did:key`` identifiers, and signature checks.

A ``did:key`` for Ed25519 is ``did:key:z`` + base58btc(0xed 0x01 + 32-byte public key), as in the
W3C did:key method. The contract engine only ever verifies; signing lives in :mod:`market.signing`.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_ED25519_MULTICODEC = b"\xed\x01"
DID_PREFIX = "did:key:z"


class IdentityError(ValueError):
    """A DID or public key is malformed."""


def b58encode(data: bytes) -> str:
    """Base58btc (Bitcoin alphabet) encoding."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58[rem])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Inverse of :func:`b58encode`; raises IdentityError on a character outside the alphabet."""
    n = 0
    for c in text:
        if c not in _B58_INDEX:
            raise IdentityError(f"invalid base58 character {c!r}")
        n = n * 58 + _B58_INDEX[c]
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\x00" * pad + body


def did_from_public_key(public_key: bytes) -> str:
    """The ``did:key`` identifier of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise IdentityError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
    return DID_PREFIX + b58encode(_ED25519_MULTICODEC + public_key)


def public_key_from_did(did: str) -> bytes:
    """The raw Ed25519 public key inside a ``did:key`` identifier."""
    if not did.startswith(DID_PREFIX):
        raise IdentityError(f"not an Ed25519 did:key: {did[:40]!r}")
    raw = b58decode(did[len(DID_PREFIX) :])
    if len(raw) != 34 or raw[:2] != _ED25519_MULTICODEC:
        raise IdentityError(f"not an Ed25519 did:key: {did[:40]!r}")
    return raw[2:]


def verify_signature(did: str, payload: bytes, signature_hex: str) -> bool:
    """True if ``signature_hex`` is a valid Ed25519 signature by ``did`` over ``payload``.

    Never raises on bad input: a malformed DID or signature is simply not valid.
    """
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key_from_did(did))
        signature = bytes.fromhex(signature_hex)
        if len(signature) != 64:
            return False
        key.verify(signature, payload)
    except (IdentityError, ValueError, InvalidSignature):
        return False
    return True
