"""Fuzz the genesis file parser ``node.setup.genesis.parse_genesis``.

Contract: only a :class:`GenesisError` (format, signature or member error) escapes, in bounded
time; a genesis that parses writes back (``to_json_bytes``) to a file that parses to an equal
genesis. Inputs are raw bytes, byte mutations of a real signed genesis, and JSON edits of it
that are *re-signed by the operator*, so edits reach the checks behind the signature
(consistency, members, bootstrap multiaddrs) instead of all failing the signature check.
"""

from __future__ import annotations

import contextlib
import json
import time
from functools import cache
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from market.encoding import canonical_bytes, sha256
from market.models import MemberRole
from market.signing import Signer
from market.state import MarketConfig
from node.setup.genesis import (
    GENESIS_KIND,
    Genesis,
    GenesisError,
    GenesisFormatError,
    create_genesis,
    parse_genesis,
)
from node.setup.keyfile import peer_id_from_did
from tests.fuzz.strategies import edited_doc, fuzz_settings, mutated, raw_bytes

OPERATOR = Signer.from_seed(sha256(b"fuzz/operator"))
HOMES = [Signer.from_seed(sha256(f"fuzz/home/{i}".encode())) for i in range(3)]


@cache
def valid_genesis() -> Genesis:
    """A signed genesis of three members with a bootstrap address."""
    market = MarketConfig(grid="fuzz-grid", operator=OPERATOR.did, feed_in_tariff=8,
                          retail_price=32)  # fmt: skip
    peer = peer_id_from_did(HOMES[0].did).to_base58()
    return create_genesis(
        OPERATOR,
        market,
        [(h.did, f"M{i}", MemberRole.VOTER if i < 2 else MemberRole.LEARNER)
         for i, h in enumerate(HOMES)],
        bootstrap=[f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}"],
    )


def resign(doc: Any) -> Any:
    """``doc`` with a fresh operator signature over its fields (when it is an object)."""
    if isinstance(doc, dict):
        fields = {k: v for k, v in doc.items() if k != "signature"}
        # floats etc. cannot be canonically encoded: such a document stays unsigned
        with contextlib.suppress(ValueError):
            doc["signature"] = OPERATOR.sign(canonical_bytes(GENESIS_KIND, fields))
    return doc


@st.composite
def genesis_inputs(draw: st.DrawFn) -> bytes:
    valid = valid_genesis().to_json_bytes()
    doc = json.loads(valid)
    return draw(
        st.one_of(
            raw_bytes(),
            mutated(valid),
            edited_doc(doc).map(resign).map(lambda d: json.dumps(d).encode()),
        )
    )


def check(data: bytes) -> Genesis | None:
    """parse_genesis(data), None on a GenesisError; the parsed genesis round-trips."""
    try:
        genesis = parse_genesis(data)
    except GenesisError:
        return None
    assert parse_genesis(genesis.to_json_bytes()) == genesis
    return genesis


def test_valid_genesis_round_trips() -> None:
    assert check(valid_genesis().to_json_bytes()) == valid_genesis()
    doc = resign(json.loads(valid_genesis().to_json_bytes()))
    assert check(json.dumps(doc).encode()) == valid_genesis()


@fuzz_settings()
@given(genesis_inputs())
def test_parse_genesis_raises_only_genesis_errors(data: bytes) -> None:
    check(data)


def test_deeply_nested_genesis_is_a_genesis_error() -> None:
    """json.loads raises RecursionError on b'[' * 100_000 (100 kB, under MAX_GENESIS_BYTES)."""
    with pytest.raises(GenesisFormatError, match=r"nested deeper than|brackets do not pair up"):
        parse_genesis(b"[" * 100_000)


@pytest.mark.parametrize("data", [b"1" * 5000, b'{"slot_seconds": ' + b"9" * 21 + b"}"])
def test_huge_integer_in_genesis_is_a_genesis_error(data: bytes) -> None:
    """json.loads raises a plain ValueError beyond 4300 digits; no genesis integer needs 21."""
    with pytest.raises(GenesisFormatError, match="digits"):
        parse_genesis(data)


def test_long_operator_did_is_refused_quickly() -> None:
    """market.did.b58decode is quadratic (a 4 MiB DID would take tens of minutes); the
    operator DID must be length-checked before it is decoded."""
    doc = json.loads(valid_genesis().to_json_bytes())
    doc["market"]["operator"] = "did:key:z" + "2" * 100_000
    started = time.perf_counter()
    with pytest.raises(GenesisError):
        parse_genesis(json.dumps(doc).encode())
    assert time.perf_counter() - started < 0.25
