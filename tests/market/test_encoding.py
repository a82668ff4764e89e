"""Canonical encoding, Merkle roots, did:key identities and signed records."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from market import CommandDecodeError, Order, Side, decode_command, encode_command
from market.did import (
    IdentityError,
    b58decode,
    b58encode,
    did_from_public_key,
    public_key_from_did,
    verify_signature,
)
from market.encoding import EncodingError, canonical_bytes, canonical_json, merkle_root
from market.models import MAX_COMMAND_BYTES
from tests.market.world import signer


def test_canonical_json_is_key_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": [1, "x", None, True]}) == b'{"a":[1,"x",null,true],"b":1}'


@pytest.mark.parametrize("bad", [1.5, {"x": 0.0}, [b"bytes"], {1: "int key"}])
def test_canonical_json_refuses_ambiguous_values(bad: object) -> None:
    with pytest.raises(EncodingError):
        canonical_json(bad)


def test_domain_tag_separates_kinds_and_versions() -> None:
    assert canonical_bytes("order", {}) != canonical_bytes("reading", {})
    assert canonical_bytes("order", {}, version=1) != canonical_bytes("order", {}, version=2)


def test_merkle_root_distinguishes_lists() -> None:
    a, b, c = b"a", b"b", b"c"
    roots = {merkle_root(x) for x in ([], [a], [a, b], [b, a], [a, b, c], [a, b, c, c])}
    assert len(roots) == 6


@given(st.binary(max_size=40))
def test_base58_round_trip(data: bytes) -> None:
    assert b58decode(b58encode(data)) == data


def test_did_key_round_trip_and_known_prefix() -> None:
    s = signer("x")
    assert s.did.startswith("did:key:z6Mk")  # Ed25519 multicodec prefix
    assert did_from_public_key(public_key_from_did(s.did)) == s.did
    with pytest.raises(IdentityError):
        public_key_from_did("did:web:example.org")
    with pytest.raises(IdentityError):
        public_key_from_did("did:key:z0OIl")  # not base58


def test_signature_checks_never_raise_on_garbage() -> None:
    s = signer("x")
    sig = s.sign(b"payload")
    assert verify_signature(s.did, b"payload", sig)
    assert not verify_signature(s.did, b"payload!", sig)
    assert not verify_signature(signer("y").did, b"payload", sig)
    assert not verify_signature(s.did, b"payload", "zz")
    assert not verify_signature(s.did, b"payload", sig[:-2])
    assert not verify_signature("did:key:nonsense", b"payload", sig)


def test_signature_covers_every_field() -> None:
    s = signer("x")
    o = Order(
        grid="g", id="1", household=s.did, side="buy", slot=1, quantity_wh=5, price=9, nonce=1
    ).signed_by(s)
    assert o.verify(s.did)
    for field, value in [
        ("slot", 2),
        ("quantity_wh", 6),
        ("price", 10),
        ("grid", "h"),
        ("side", Side.SELL),
    ]:
        assert not o.model_copy(update={field: value}).verify(s.did), field


def test_decode_rejects_malformed_commands_with_reasons() -> None:
    s = signer("x")
    o = Order(
        grid="g", id="1", household=s.did, side="buy", slot=1, quantity_wh=5, price=9, nonce=1
    ).signed_by(s)
    assert decode_command(encode_command(o)) == o
    cases = {
        b"not json": "Invalid JSON",
        b'{"type":"order"}': "Field required",
        b'{"type":"launch"}': "does not match",
        encode_command(o).replace(b'"quantity_wh":5', b'"quantity_wh":5.5'): "integer",
        encode_command(o).replace(b'"price":9', b'"price":"9"'): "integer",
        encode_command(o)[:-1] + b',"extra":1}': "Extra inputs",
        b"{" + b" " * MAX_COMMAND_BYTES + b"}": "exceeds",
    }
    for data, message in cases.items():
        with pytest.raises(CommandDecodeError, match=message):
            decode_command(data)


def test_batches_round_trip_and_reject_bad_members() -> None:
    from market import decode_batch, encode_batch
    from market.models import MAX_BATCH_BYTES, CloseGate

    s = signer("x")
    o = Order(
        grid="g", id="1", household=s.did, side="buy", slot=1, quantity_wh=5, price=9, nonce=1
    ).signed_by(s)
    batch = [o, CloseGate(slot=1)]
    assert decode_batch(encode_batch(batch)) == batch
    assert decode_batch(encode_batch([])) == []
    with pytest.raises(CommandDecodeError, match="command 1 in batch"):
        decode_batch(b'microgrid/batch/v1\n[{"type":"close_gate","slot":1},{"type":"settle"}]')
    with pytest.raises(CommandDecodeError, match="not a microgrid"):
        decode_batch(encode_command(o))
    with pytest.raises(CommandDecodeError, match="not a list"):
        decode_batch(b'microgrid/batch/v1\n{"a":1}')
    with pytest.raises(CommandDecodeError, match="exceeds"):
        decode_batch(b"x" * (MAX_BATCH_BYTES + 1))
