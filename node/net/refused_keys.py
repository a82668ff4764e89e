"""RSA and secp256k1 libp2p keys, refused without loading their libraries.

Every household, operator and relay of a grid is named by an Ed25519 key (its DID,
docs/security.md), so a node never needs py-libp2p's RSA keys (pycryptodome, with cffi's C
parser) or secp256k1 keys (coincurve): about 2 MB of RSS and 60 ms of start-up per node
(docs/performance.md). In a node process :mod:`node.net.lean_imports` answers imports of
``libp2p.crypto.rsa`` and ``libp2p.crypto.secp256k1`` with this module.

A peer may still *present* such a key: in its Noise handshake, a signed peer record or a
pubsub message. Reading one raises :class:`RefusedKeyType`, a ``ValueError`` (what
py-libp2p's parsers raise for an unknown key type or for garbage key bytes, so every path
that reads a peer's key already contains it) and a ``MissingDeserializerError`` (libp2p's
error for a key type it cannot read). That peer's handshake or message fails; nothing else.
With the real modules the same peer was refused a step later, by the member gate (a peer id
that is not an Ed25519 DID is no member).
"""

from __future__ import annotations

from typing import Any, NoReturn

from libp2p.crypto.exceptions import MissingDeserializerError
from libp2p.crypto.keys import KeyType, PrivateKey, PublicKey


class RefusedKeyType(ValueError, MissingDeserializerError):
    """A peer's key is RSA or secp256k1: a microgrid node accepts Ed25519 keys only."""

    def __init__(self, key_type: KeyType | None) -> None:
        kind = "RSA and secp256k1" if key_type is None else key_type.name
        super().__init__(f"{kind} keys are not accepted (members use Ed25519 keys)")
        self.key_type = key_type


def _refuse(key_type: KeyType) -> NoReturn:
    raise RefusedKeyType(key_type)


class _Refused:
    """What the public and the private key classes share: no instance, no key read."""

    KEY_TYPE: KeyType

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        _refuse(self.KEY_TYPE)

    @classmethod
    def from_bytes(cls, _data: bytes) -> NoReturn:
        """Refused: raises :class:`RefusedKeyType`."""
        _refuse(cls.KEY_TYPE)

    @classmethod
    def deserialize(cls, _data: bytes) -> NoReturn:
        """Refused: raises :class:`RefusedKeyType`."""
        _refuse(cls.KEY_TYPE)

    def to_bytes(self) -> bytes:  # never reached: no instance can be made
        _refuse(self.KEY_TYPE)

    def get_type(self) -> KeyType:
        return self.KEY_TYPE


class _RefusedPublicKey(_Refused, PublicKey):
    def verify(self, data: bytes, signature: bytes) -> bool:  # never reached
        _refuse(self.KEY_TYPE)


class _RefusedPrivateKey(_Refused, PrivateKey):
    @classmethod
    def new(cls, *_args: Any, **_kwargs: Any) -> NoReturn:
        """Refused: raises :class:`RefusedKeyType`."""
        _refuse(cls.KEY_TYPE)

    def sign(self, data: bytes) -> bytes:  # never reached
        _refuse(self.KEY_TYPE)

    def get_public_key(self) -> PublicKey:  # never reached
        _refuse(self.KEY_TYPE)


class RSAPublicKey(_RefusedPublicKey):
    """Stands for ``libp2p.crypto.rsa.RSAPublicKey``: refused."""

    KEY_TYPE = KeyType.RSA


class RSAPrivateKey(_RefusedPrivateKey):
    """Stands for ``libp2p.crypto.rsa.RSAPrivateKey``: refused."""

    KEY_TYPE = KeyType.RSA


class Secp256k1PublicKey(_RefusedPublicKey):
    """Stands for ``libp2p.crypto.secp256k1.Secp256k1PublicKey``: refused."""

    KEY_TYPE = KeyType.Secp256k1


class Secp256k1PrivateKey(_RefusedPrivateKey):
    """Stands for ``libp2p.crypto.secp256k1.Secp256k1PrivateKey``: refused."""

    KEY_TYPE = KeyType.Secp256k1


def create_new_key_pair(*_args: Any, **_kwargs: Any) -> NoReturn:
    """Stands for both modules' ``create_new_key_pair``: a node makes Ed25519 keys only."""
    raise RefusedKeyType(None)


__all__ = [
    "RSAPrivateKey",
    "RSAPublicKey",
    "RefusedKeyType",
    "Secp256k1PrivateKey",
    "Secp256k1PublicKey",
    "create_new_key_pair",
]
