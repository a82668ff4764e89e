"""Signing with a household's (or the grid operator's) Ed25519 private key.

Ed25519 signatures are deterministic, so signing stays reproducible; still, the contract engine
never signs: only nodes, tools and tests do.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from market.did import did_from_public_key


class Signer:
    """An Ed25519 key pair with its ``did:key`` identifier."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key: bytes = raw
        self.did: str = did_from_public_key(raw)

    @classmethod
    def generate(cls) -> Signer:
        """A fresh random key pair (for key creation, never inside the state machine)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        """A key pair from a 32-byte seed (the raw private key); deterministic."""
        if len(seed) != 32:
            raise ValueError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        """The raw 32-byte private key (keep it secret: file mode 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, payload: bytes) -> str:
        """Hex Ed25519 signature over ``payload``."""
        return self._key.sign(payload).hex()
