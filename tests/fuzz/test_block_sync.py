"""Fuzz block-sync decoding: chunks (``node.ledger.chunk.decode_chunk``) and requests
(``node.net.block_sync.decode_request``).

- ``decode_chunk`` raises only :class:`BlockSyncError` (reason ``malformed``); a chunk that
  decodes is exactly the canonical encoding of what it decoded to.
- ``decode_request`` raises only ``ValueError`` (its documented error); what decodes
  re-encodes (``encode_request``) to a request that decodes the same.

Seeds are real chunks exported from a ledger that applied a simulated grid's log.
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from market.encoding import canonical_bytes
from node.daemon.replica import Replica
from node.ledger import LedgerStore
from node.ledger.chunk import CHUNK_KIND, BlockSyncError, decode_chunk, encode_chunk
from node.ledger.chunk_export import export_blocks
from node.net.block_sync import MAX_REQUEST_BYTES, decode_request, encode_request
from tests.fuzz.strategies import (
    any_of_json,
    expect_only,
    fuzz_settings,
    json_mutated,
    mutated,
    raw_bytes,
)
from tests.node.test_replica import log_entries

PREFIX = f"microgrid/{CHUNK_KIND}/v1\n".encode()


@cache
def valid_chunks() -> tuple[bytes, ...]:
    """Chunks of a 3-household, 6-slot ledger: one block, a few blocks with link headers."""
    config, entries = log_entries(3, 6, 3)
    with tempfile.TemporaryDirectory(prefix="fuzz-ledger-") as tmp:
        store = LedgerStore(f"sqlite:///{Path(tmp) / 'ledger.db'}")
        try:
            replica = Replica(config, store)
            for index, data in entries:
                replica.apply_entry(index, data)
            height = replica.state.height
            return (export_blocks(store, 1, 1), export_blocks(store, 1, height),
                    export_blocks(store, 2, height))  # fmt: skip
        finally:
            store.close()


@st.composite
def chunk_inputs(draw: st.DrawFn) -> bytes:
    valid = draw(st.sampled_from(valid_chunks()))
    doc = json.loads(valid[len(PREFIX) :])
    return draw(any_of_json(doc, valid, PREFIX))


def test_real_chunks_decode() -> None:
    for data in valid_chunks():
        chunk = decode_chunk(data)
        assert chunk.blocks and encode_chunk(chunk) == data
        assert canonical_bytes(CHUNK_KIND, json.loads(data[len(PREFIX) :])) == data


@fuzz_settings()
@given(chunk_inputs())
def test_decode_chunk_raises_only_block_sync_error(data: bytes) -> None:
    try:
        chunk = decode_chunk(data)
    except BlockSyncError as exc:
        assert exc.reason == "malformed"
        return
    assert encode_chunk(chunk) == data


@st.composite
def request_inputs(draw: st.DrawFn) -> bytes:
    valid = encode_request(draw(st.integers(1, 2**64)), draw(st.integers(1, 2**64)))
    return draw(st.one_of(
        raw_bytes(MAX_REQUEST_BYTES), mutated(valid),
        json_mutated({"first": 1, "last": 2}).filter(lambda b: len(b) <= 4 * MAX_REQUEST_BYTES),
    ))  # fmt: skip


@fuzz_settings()
@given(request_inputs())
def test_decode_request_raises_only_value_error(data: bytes) -> None:
    result = expect_only(decode_request, data, ValueError)
    if result is not None:
        first, last = result
        assert type(first) is int and type(last) is int and 1 <= first <= last
        assert decode_request(encode_request(first, last)) == (first, last)


def test_block_requests_beyond_what_a_ledger_holds_are_refused() -> None:
    """A request for block 2**64 is refused as malformed instead of overflowing the query."""
    with pytest.raises(ValueError):
        decode_request(b'{"first":1,"last":18446744073709551616}')
    with pytest.raises(ValueError):
        decode_request(b'{"first":' + b"9" * 300 + b',"last":1}')
    assert decode_request(b'{"first":1,"last":9007199254740991}') == (1, 2**53 - 1)
