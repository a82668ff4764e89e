"""The block-sync chunk models (``node.ledger.chunk``): what they refuse at the edges, always as
``BlockSyncError("malformed", ...)`` naming where and what, and that real chunks round-trip to
the exact bytes a ledger exports."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from market.bounds import MAX_COUNTER_WH, MAX_SLOT, STORE_INT
from market.encoding import canonical_bytes
from node.ledger import LedgerStore, chunk_export
from node.ledger.chunk import (
    CHUNK_KIND,
    CHUNK_PREFIX,
    MAX_CHUNK_BYTES,
    BlockSyncError,
    Chunk,
    decode_chunk,
    encode_chunk,
)
from node.ledger.chunk_export import export_blocks
from node.tools import market_sim


@pytest.fixture(scope="module")
def chunks(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A one-block chunk with a link to block 6, and a chunk of all six blocks."""
    url = f"sqlite:///{tmp_path_factory.mktemp('chunk') / 'ledger.db'}"
    market_sim.run(households=3, slots=6, seed=4, db=url)
    store = LedgerStore(url)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(chunk_export, "MAX_CHUNK_BLOCKS", 1)
            linked = export_blocks(store, 1, 6)
        return linked, export_blocks(store, 1, 6)
    finally:
        store.close()


def doc_of(data: bytes) -> dict[str, Any]:
    return json.loads(data[len(CHUNK_PREFIX) :])


def changed(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = doc_of(data)
    change(doc)
    return canonical_bytes(CHUNK_KIND, doc)


def malformed(data: Any) -> str:
    with pytest.raises(BlockSyncError) as err:
        decode_chunk(data)
    assert err.value.reason == "malformed", err.value
    return err.value.detail


def with_reading(doc: dict[str, Any]) -> dict[str, Any]:
    return next(b for b in doc["blocks"] if b["readings"])["readings"][0]


def with_order(doc: dict[str, Any]) -> dict[str, Any]:
    return next(g for g in doc["gates"] if g["orders"])["orders"][0]


def test_real_chunks_round_trip_to_their_exact_bytes(chunks: tuple[bytes, bytes]) -> None:
    for data in chunks:
        chunk = decode_chunk(data)
        assert isinstance(chunk, Chunk)
        assert encode_chunk(chunk) == data
        assert chunk.model_dump(mode="json") == doc_of(data)  # nothing added, nothing dropped
        assert encode_chunk(doc_of(data)) == data
    one, whole = (decode_chunk(c) for c in chunks)
    assert [b.height for b in one.blocks] == [1] and len(one.link) == 5
    assert [b.height for b in whole.blocks] == list(range(1, 7)) and not whole.link
    assert all(b.feeder is None for b in whole.blocks)  # a grid without a feeder meter


EDGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "extra_top": (lambda d: d.update(extra=1), "chunk.extra: unknown field"),
    "extra_block": (lambda d: d["blocks"][0].update(bonus=1), "chunk.blocks[0].bonus: unknown"),
    "extra_order": (lambda d: with_order(d).update(x=""), "].orders[0].x: unknown field"),
    "missing": (lambda d: d["blocks"][0].pop("hash"), "chunk.blocks[0].hash: missing field"),
    "bool_for_int": (lambda d: d["blocks"][0].update(tx_count=True), "tx_count"),
    "str_for_int": (lambda d: d["blocks"][0].update(slot="7"), "chunk.blocks[0].slot"),
    "int_for_bool": (
        lambda d: d["blocks"][0]["settlements"][0].update(measured=1),
        "settlements[0].measured",
    ),
    "int64_overflow": (lambda d: d["blocks"][0].update(tx_count=STORE_INT + 1), "tx_count"),
    "negative_count": (lambda d: d["blocks"][0].update(tx_count=-1), "tx_count"),
    "height_zero": (lambda d: d["blocks"][0].update(height=0), "chunk.blocks[0].height"),
    "slot_beyond": (lambda d: d["blocks"][0].update(slot=MAX_SLOT + 1), "chunk.blocks[0].slot"),
    "counter_beyond": (
        lambda d: with_reading(d).update(import_wh=MAX_COUNTER_WH + 1),
        "readings[0].import_wh",
    ),
    "nonce_negative": (lambda d: with_order(d).update(nonce=-1), "orders[0].nonce"),
    "side": (lambda d: with_order(d).update(side="hold"), "orders[0].side"),
    "bad_hash": (lambda d: d.update(genesis_hash="AB" * 32), "chunk.genesis_hash"),
    "long_signature": (lambda d: with_reading(d).update(signature="a" * 130), "signature"),
    "feeder_null": (lambda d: d["blocks"][0].update(feeder=None), "not null"),
    "short_link": (lambda d: d["link"][0].pop(), "chunk.link[0]"),
    "long_link": (lambda d: d["link"][0].extend(["0" * 64, 1]), "chunk.link[0]"),
    "link_not_list": (lambda d: d["link"].__setitem__(0, 5), "chunk.link[0]"),
    "no_blocks": (lambda d: d.update(blocks=[]), "chunk.blocks: a chunk holds at least one"),
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_values_outside_the_models_are_malformed_and_named(
    chunks: tuple[bytes, bytes], name: str
) -> None:
    change, words = EDGES[name]
    detail = malformed(changed(chunks[0], change))
    assert words in detail, detail


def test_a_bool_where_an_integer_belongs_says_so(chunks: tuple[bytes, bytes]) -> None:
    detail = malformed(changed(chunks[0], lambda d: d["blocks"][0].update(tx_count=True)))
    assert detail.startswith("chunk.blocks[0].tx_count: ") and "got true/false" in detail


@pytest.mark.parametrize(
    ("name", "edit", "words"),
    [
        ("float", lambda c: c.replace(b'"tx_count":', b'"tx_count":1.0,"x":', 1), "integer"),
        ("exponent", lambda c: c.replace(b'"tx_count":', b'"tx_count":1e3,"x":', 1), "integer"),
        ("nan", lambda c: c.replace(b'"tx_count":', b'"tx_count":NaN,"x":', 1), "integer"),
        (
            "duplicate_key",
            lambda c: c.replace(b'{"blocks":', b'{"gates":[],"blocks":', 1),
            "duplicate key 'gates'",
        ),
        ("spacing", lambda c: c.replace(b'":', b'": ', 1), "canonical"),
        ("prefix", lambda c: b"microgrid/batch/v1\n" + c.split(b"\n", 1)[1], "block-sync"),
        ("truncated", lambda c: c[:-10], "JSON"),
        ("deep", lambda c: CHUNK_PREFIX + b"[" * 100_000, "JSON"),
        ("huge_literal", lambda c: c.replace(b'"tx_count":', b'"tx_count":9' + b"9" * 5000, 1),
         "JSON"),
        ("not_bytes", lambda c: c.decode(), "bytes"),
        ("too_big", lambda c: c + b" " * MAX_CHUNK_BYTES, "exceed"),
    ],
)  # fmt: skip
def test_bytes_that_are_not_a_canonical_chunk_are_malformed(
    chunks: tuple[bytes, bytes], name: str, edit: Callable[[Any], Any], words: str
) -> None:
    detail = malformed(edit(chunks[0]))
    assert words in detail, detail


def test_a_non_ascii_escape_spelled_differently_is_not_canonical(
    chunks: tuple[bytes, bytes],
) -> None:
    """Same values, other bytes: ``\\u0041`` for ``A`` is refused (one spelling per chunk)."""
    data = chunks[1]
    assert b'"household":"d' in data
    assert "canonical" in malformed(data.replace(b'"household":"d', b'"household":"\\u0064', 1))


def test_every_problem_is_counted_but_the_first_is_named(chunks: tuple[bytes, bytes]) -> None:
    def two(d: dict[str, Any]) -> None:
        d["blocks"][0].update(slot=-1, tx_count=-1)

    detail = malformed(changed(chunks[0], two))
    assert detail.startswith("chunk.blocks[0].slot: ") and detail.endswith("(and 1 more)")
