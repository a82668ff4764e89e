"""Household identity: one Ed25519 key for signing records and for the libp2p connection.

The key file holds the raw 32-byte Ed25519 seed (file mode 0600). From it come both the
:class:`market.signing.Signer` (``did:key``, record signatures) and the libp2p key pair
(peer id ``12D3KooW…``, Noise authentication), so the author of a signed order and the peer that
sent it over an authenticated connection are provably the same household. ``did:key`` and the
libp2p peer id are two spellings of the same public key: :func:`peer_id_from_did` and
:func:`did_from_peer_id` convert between them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PublicKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.peer.id import ID

from market.did import IdentityError, did_from_public_key, public_key_from_did
from market.signing import Signer

SEED_BYTES = 32
KEY_FILE_MODE = 0o600


class KeyFileError(Exception):
    """A key file cannot be created or loaded; the message names the path and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"key file {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class IdentityMismatchError(Exception):
    """The libp2p key derived from a seed differs from the signing key (must never happen)."""


@dataclass(frozen=True)
class NodeIdentity:
    """A household's key material: the record signer and the libp2p key pair of one seed."""

    signer: Signer
    key_pair: KeyPair
    peer_id: ID

    @property
    def did(self) -> str:
        """The household's ``did:key`` identifier."""
        return self.signer.did

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeIdentity:
        """Both keys from one 32-byte seed; checks they are the same Ed25519 key."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"Ed25519 seed must be {SEED_BYTES} bytes, got {len(seed)}")
        signer = Signer.from_seed(seed)
        key_pair = create_new_key_pair(seed)
        libp2p_public = key_pair.public_key.to_bytes()
        if libp2p_public != signer.public_key:
            raise IdentityMismatchError(
                "libp2p public key differs from the signing key for the same seed: "
                f"{libp2p_public.hex()} != {signer.public_key.hex()}"
            )
        return cls(signer=signer, key_pair=key_pair, peer_id=ID.from_pubkey(key_pair.public_key))


def create_key_file(path: Path | str, seed: bytes | None = None) -> NodeIdentity:
    """Create a new key file (mode 0600) and return its identity; never overwrites.

    ``seed`` is for tests and tools that need a fixed identity; by default a fresh random key.
    Raises :class:`KeyFileError` if the file exists or cannot be written.
    """
    path = Path(path)
    seed = seed if seed is not None else Signer.generate().seed()
    identity = NodeIdentity.from_seed(seed)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except FileExistsError:
        raise KeyFileError(path, "already exists; refusing to overwrite a household key") from None
    except OSError as exc:
        raise KeyFileError(path, f"cannot create: {exc.strerror}") from None
    try:
        os.fchmod(fd, KEY_FILE_MODE)  # the umask may have narrowed it; never widened
        os.write(fd, seed)
        os.fsync(fd)
    finally:
        os.close(fd)
    return identity


def load_key_file(path: Path | str) -> NodeIdentity:
    """Load a key file; refuses a file readable by group/others or not exactly 32 bytes."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(path, "does not exist (run `microgrid init`)") from None
    except OSError as exc:
        raise KeyFileError(path, f"cannot stat: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(path, "is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            path, f"mode {stat.S_IMODE(st.st_mode):04o} is too open; chmod 600 it"
        )
    seed = path.read_bytes()
    if len(seed) != SEED_BYTES:
        raise KeyFileError(path, f"holds {len(seed)} bytes, expected a {SEED_BYTES}-byte seed")
    return NodeIdentity.from_seed(seed)


def peer_id_from_did(did: str) -> ID:
    """The libp2p peer id of an Ed25519 ``did:key``; raises IdentityError if malformed."""
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key_from_did(did)))


def did_from_peer_id(peer_id: ID) -> str:
    """The ``did:key`` of a peer id that embeds an Ed25519 key; raises IdentityError otherwise."""
    try:
        key = peer_id.extract_public_key()
    except Exception as exc:  # malformed multihash/protobuf inside a remote-supplied id
        raise IdentityError(f"peer id {peer_id} holds no readable public key: {exc}") from None
    if key is None or key.get_type() != KeyType.Ed25519:
        raise IdentityError(f"peer id {peer_id} does not embed an Ed25519 key")
    return did_from_public_key(key.to_bytes())
