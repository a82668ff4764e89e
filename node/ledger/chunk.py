"""The block-sync chunk: its wire format as strict pydantic models, and its exact bytes.

A chunk (:func:`node.ledger.chunk_export.export_blocks`) is ``microgrid/blocksync/v1\\n`` +
canonical JSON (sorted keys, no spaces, ASCII)::

    {"genesis_hash": hex,
     "blocks": [{height, slot, prev_hash, tx_root, trade_root, reading_root, state_hash,
                 tx_count, hash,
                 "transactions": [{txid, kind, slot, ref, "postings": [[account, asset, n]]}],
                 "readings": [{grid, household, meter_serial, slot, import_wh, export_wh,
                               nonce, signature}],
                 "settlements": [{household, measured, import_wh, export_wh, sold_wh,
                                  bought_wh, imbalance_wh, delivered_wh, consumed_wh}],
                 "feeder": {status, meter_serial, import_wh, export_wh, nonce, signature,
                            feeder_net_wh, households_net_wh, difference_wh,
                            allowed_loss_wh},
                 "true_ups": [{household, slots, import_wh, export_wh}],
                 "rules": hex}],
     "gates": [{slot, mechanism, price, volume_wh, bid_volume_wh, ask_volume_wh, order_count,
                participants, "orders": [{order_id, household, side, quantity_wh, price,
                                          nonce, signature, steps}],
                "trades": [{buy_id, sell_id, buyer, seller, quantity_wh, price,
                            sell_price, part}]}],
     "link": [[slot, tx_root, trade_root, reading_root, state_hash, tx_count, feeder, rules]],
     "governance": [{position, log_index, withdrawn, record}]}

``feeder`` (the block's ``feeder_checks`` row; in a link, its hash) is there only in a grid with
a feeder meter: a grid without one exchanges exactly the chunks it did before. ``true_ups`` (the
block's ``true_ups`` rows without slot and height, in household order) is there only in a block
that trued up a household's unmeasured slots: a chunk of blocks without one is byte-identical to
what a node without the ``true_ups`` table sends, so both versions interoperate on such blocks.
``rules`` (the block header's rules hash) is there only in a block settled under rules an
operator's ``change_rules`` put in force; in a link, such a block's header has eight items, the
seventh its feeder hash or ``null``. ``governance`` (rows of the ``governance`` table: position,
log index and withdrawn count, ``null`` if unknown, and the record's canonical JSON text) holds
the records in force from the chunk's slots (from the slot after the block before the chunk,
through its last block's, and, when the chunk reaches the requested last height, every later
one); it is left out when there is none, so a grid that never changed exchanges the chunks it
did before.

An order's ``steps`` (``[[quantity_wh, price], ...]``, its ``orders.steps`` column) is there
only for a curve order and a trade's ``part`` only when not 0 (pay-as-bid trades of curve
orders): chunks of books without curve orders are byte-identical to those of nodes that predate
them, and those nodes' chunks import here.

List order is row order (``position``). ``gates`` holds the gate closures (clearing, book,
trades) of the blocks' slots and, when the chunk reaches the requested last height, of up to
``MAX_GATE_LOOKAHEAD`` following slots. ``link`` holds the headers of the requested blocks
the chunk does not carry (heights ``last block + 1 ..`` requested last; height and prev_hash
are implied): with them the importer checks that *every* chunk chains into the gap's anchor,
not only the one that closes it, so a forked or forged peer cannot land a single block.

:func:`decode_chunk` accepts exactly the canonical bytes of a :class:`Chunk`: no other field, no
missing one, no float, no duplicate key, no bool for an integer, every number and string inside
the bounds of :mod:`market.bounds` (values a grid's engine can produce). Every refusal is a
:class:`BlockSyncError` ``malformed`` naming where (``chunk.blocks[0].slot``) and what.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
)
from pydantic_core import ErrorDetails

from market.bounds import (
    SAFE_INT,
    STORE_INT,
    CounterWh,
    Did,
    Identifier,
    MeterSerial,
    Nonce,
    Price,
    QuantityWh,
    Signature,
    Slot,
)
from market.encoding import EncodingError, canonical_bytes
from market.feeder import FeederCheck, FeederStatus
from market.models import MAX_COMMAND_BYTES, MAX_CURVE_STEPS, CurveStep

CHUNK_KIND = "blocksync"
CHUNK_PREFIX = f"microgrid/{CHUNK_KIND}/v1\n".encode()
"""Every chunk starts with these bytes (the canonical encoding's domain tag)."""
MAX_CHUNK_BLOCKS = 50
"""Most blocks one chunk carries."""
MAX_CHUNK_BYTES = 4 * 1024 * 1024
"""An encoded chunk never exceeds this; the exporter stops earlier."""
MAX_GATE_LOOKAHEAD = 16
"""Most gate closures after a gap's last block that a closing chunk carries (slots closed but
not settled at the snapshot: about (gate lead + settle delay) / slot length + 1, 2 by default)."""

MAX_TRADE_PART = 2 * MAX_CURVE_STEPS
"""Bound of a trade's ``part``: more than two curve orders' trades at different prices can
number (each further part starts at a new step of one of them)."""

HEADER_FIELDS = (
    "height",
    "slot",
    "prev_hash",
    "tx_root",
    "trade_root",
    "reading_root",
    "state_hash",
    "tx_count",
    "hash",
)
"""A block's header fields in :class:`market.accounting.Block` order, then its hash."""


class BlockSyncError(RuntimeError):
    """A chunk cannot be exported or imported; ``reason`` is short and stable.

    Import reasons: ``malformed`` (not a strict v1 chunk), ``wrong_grid`` (another genesis),
    ``not_requested`` (does not start the first gap, or reaches past it), ``bad_chain`` (does not
    chain from the block before the gap or into the gap's anchor: a forked or forged ledger),
    ``not_anchored`` (its link stops before the gap's end: ask for the whole missing range),
    ``bad_block`` (a hash, id, root, signature, balance, state hash or clearing is wrong, or
    gate rows differ from this ledger's), ``incomplete`` (gate rows of a slot are missing).
    Export reasons: ``not_available``, ``too_large``, ``malformed`` (bad arguments).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- field types ---------------------------------------------------------------------------------

Int64 = Annotated[StrictInt, Field(ge=-STORE_INT - 1, le=STORE_INT)]
"""Any integer a 64-bit column holds (settlement flows, balances' postings, feeder sums)."""
Count = Annotated[StrictInt, Field(ge=0, le=STORE_INT)]
Height = Annotated[StrictInt, Field(ge=1, le=SAFE_INT)]
"""Block heights start at 1; block requests are bounded the same way."""
Hex64 = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
"""A SHA-256 hash: 64 lower-case hex digits."""
Text = StrictStr
Kind = Annotated[StrictStr, Field(max_length=32)]
Asset = Annotated[StrictStr, Field(max_length=16)]
Mechanism = Annotated[StrictStr, Field(max_length=16)]
PostingDoc = tuple[Text, Asset, Int64]
"""``[account, asset, amount]``."""


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ChunkTransaction(_Doc):
    """A ledger transaction with its postings in order."""

    txid: Hex64
    kind: Kind
    slot: Slot
    ref: Text
    postings: tuple[PostingDoc, ...]


class ChunkReading(_Doc):
    """A household's signed meter reading (a ``readings`` row without its position)."""

    grid: Identifier
    household: Did
    meter_serial: MeterSerial
    slot: Slot
    import_wh: CounterWh
    export_wh: CounterWh
    nonce: Nonce
    signature: Signature


class ChunkSettlement(_Doc):
    """A household's settlement of the block's slot (a ``settlements`` row without its slot)."""

    household: Did
    measured: StrictBool
    import_wh: Int64
    export_wh: Int64
    sold_wh: Int64
    bought_wh: Int64
    imbalance_wh: Int64
    delivered_wh: Int64
    consumed_wh: Int64


class ChunkFeeder(_Doc):
    """The block's feeder check (a ``feeder_checks`` row without slot and height)."""

    status: FeederStatus
    meter_serial: MeterSerial | None
    import_wh: CounterWh | None
    export_wh: CounterWh | None
    nonce: Nonce | None
    signature: Signature | None
    feeder_net_wh: Int64 | None
    households_net_wh: Int64 | None
    difference_wh: Int64 | None
    allowed_loss_wh: Int64 | None


class ChunkTrueUp(_Doc):
    """A household's true-up in the block's slot (a ``true_ups`` row without slot and height)."""

    household: Did
    slots: Height
    """Unmeasured slots the true-up covers (at least 1)."""
    import_wh: CounterWh
    export_wh: CounterWh


class ChunkBlock(_Doc):
    """A block header with everything its slot's settlement wrote."""

    height: Height
    slot: Slot
    prev_hash: Hex64
    tx_root: Hex64
    trade_root: Hex64
    reading_root: Hex64
    state_hash: Hex64
    tx_count: Count
    hash: Hex64
    transactions: tuple[ChunkTransaction, ...]
    readings: tuple[ChunkReading, ...]
    settlements: tuple[ChunkSettlement, ...]
    feeder: ChunkFeeder | None = None
    """Absent (never ``null``) in a grid without a feeder meter."""
    true_ups: tuple[ChunkTrueUp, ...] = ()
    """Absent (never ``[]``) in a block without a true-up."""
    rules: Hex64 | None = None
    """The header's rules hash; absent (never ``null``) while the genesis rules hold."""

    @field_validator("feeder", mode="before")
    @classmethod
    def _feeder_is_absent_or_an_object(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must be left out, not null, in a grid without a feeder meter")
        return value

    @field_validator("rules", mode="before")
    @classmethod
    def _rules_are_absent_or_a_hash(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must be left out, not null, while the genesis rules hold")
        return value

    @field_validator("true_ups", mode="before")
    @classmethod
    def _true_ups_are_absent_or_some(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("must be left out, not empty, in a block without a true-up")
            return tuple(value)  # strict validation after a "before" validator wants a tuple
        return value

    @model_serializer(mode="wrap")
    def _omit_absent_fields(self, handler: Any) -> dict[str, Any]:
        doc: dict[str, Any] = handler(self)
        if doc.get("feeder") is None:
            doc.pop("feeder", None)
        if not doc.get("true_ups"):
            doc.pop("true_ups", None)
        if doc.get("rules") is None:
            doc.pop("rules", None)
        return doc


class ChunkOrder(_Doc):
    """An order of a closed gate's book (an ``orders`` row without slot and position)."""

    order_id: Identifier
    household: Did
    side: Literal["buy", "sell"]
    quantity_wh: QuantityWh
    price: Price
    nonce: Nonce
    signature: Signature
    steps: Annotated[tuple[CurveStep, ...], Field(max_length=MAX_CURVE_STEPS)] | None = None
    """A curve order's steps; absent (never ``null``) for a plain order."""

    @field_validator("steps", mode="before")
    @classmethod
    def _steps_are_absent_or_some(cls, value: Any) -> Any:
        if value is None or (isinstance(value, list | tuple) and not value):
            raise ValueError("must be left out, not null or empty, for a plain order")
        if isinstance(value, list):  # strict validation after a "before" validator wants tuples
            return tuple(tuple(s) if isinstance(s, list) else s for s in value)
        return value

    @model_serializer(mode="wrap")
    def _omit_absent_steps(self, handler: Any) -> dict[str, Any]:
        doc: dict[str, Any] = handler(self)
        if doc.get("steps") is None:
            doc.pop("steps", None)
        return doc


class ChunkTrade(_Doc):
    """A trade of a closed gate (a ``trades`` row without slot and position)."""

    buy_id: Identifier
    sell_id: Identifier
    buyer: Did
    seller: Did
    quantity_wh: QuantityWh
    price: Price
    sell_price: Price
    part: Annotated[StrictInt, Field(ge=1, le=MAX_TRADE_PART)] | None = None
    """``Trade.part``; absent (never ``null``) when 0."""

    @field_validator("part", mode="before")
    @classmethod
    def _part_is_absent_or_some(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must be left out, not null, for a pair's first trade")
        return value

    @model_serializer(mode="wrap")
    def _omit_absent_part(self, handler: Any) -> dict[str, Any]:
        doc: dict[str, Any] = handler(self)
        if doc.get("part") is None:
            doc.pop("part", None)
        return doc


class ChunkGate(_Doc):
    """A gate closure: the ``clearings`` row, the book and the trades of one slot."""

    slot: Slot
    mechanism: Mechanism
    price: Price | None
    volume_wh: Count
    bid_volume_wh: Count
    ask_volume_wh: Count
    order_count: Count
    participants: Count
    orders: tuple[ChunkOrder, ...]
    trades: tuple[ChunkTrade, ...]


class ChunkGovernance(_Doc):
    """An accepted governance record (a ``governance`` row: the rest is derived from the
    record)."""

    position: Height
    log_index: Count | None
    withdrawn: Count | None
    record: Annotated[StrictStr, Field(min_length=2, max_length=MAX_COMMAND_BYTES)]
    """The record's canonical JSON (``node.ledger.governance.record_text``)."""


LinkHeader = tuple[Slot, Hex64, Hex64, Hex64, Hex64, Count]
"""``[slot, tx_root, trade_root, reading_root, state_hash, tx_count]`` of a block not carried."""
FeederLinkHeader = tuple[Slot, Hex64, Hex64, Hex64, Hex64, Count, Hex64]
"""The same and the block's feeder check hash, in a grid with a feeder meter."""
RulesLinkHeader = tuple[Slot, Hex64, Hex64, Hex64, Hex64, Count, Hex64 | None, Hex64]
"""The same with the feeder check hash (``null`` in a grid without a feeder meter) and the
block's rules hash, for a block settled under changed rules."""


def _link_kind(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) in (7, 8):
        return "with_feeder" if len(value) == 7 else "with_rules"
    return "header"


LinkItem = Annotated[
    Annotated[LinkHeader, Tag("header")]
    | Annotated[FeederLinkHeader, Tag("with_feeder")]
    | Annotated[RulesLinkHeader, Tag("with_rules")],
    Discriminator(_link_kind),
]


class Chunk(_Doc):
    """A decoded chunk: at least one block, the gate closures, the link headers."""

    genesis_hash: Hex64
    blocks: tuple[ChunkBlock, ...]
    gates: tuple[ChunkGate, ...]
    link: tuple[LinkItem, ...]
    governance: tuple[ChunkGovernance, ...] = ()
    """Absent (never ``[]``) when no governance record is in force from the chunk's slots."""

    @field_validator("blocks")
    @classmethod
    def _at_least_one_block(cls, value: tuple[ChunkBlock, ...]) -> tuple[ChunkBlock, ...]:
        if not value:
            raise ValueError("a chunk holds at least one block")
        return value

    @field_validator("governance", mode="before")
    @classmethod
    def _governance_is_absent_or_some(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("must be left out, not empty, when there is no record")
            return tuple(value)
        return value

    @model_serializer(mode="wrap")
    def _omit_absent_governance(self, handler: Any) -> dict[str, Any]:
        doc: dict[str, Any] = handler(self)
        if not doc.get("governance"):
            doc.pop("governance", None)
        return doc


# --- bytes ---------------------------------------------------------------------------------------


def encode_chunk(chunk: Chunk | Mapping[str, Any]) -> bytes:
    """The canonical bytes of a chunk (a model, or the same fields as plain values)."""
    doc = chunk.model_dump(mode="json") if isinstance(chunk, Chunk) else chunk
    return canonical_bytes(CHUNK_KIND, doc)


def decode_chunk(data: bytes) -> Chunk:
    """Strictly decode a chunk: exactly the v1 canonical bytes of a :class:`Chunk`.

    Raises :class:`BlockSyncError` ``malformed`` for anything else, naming where and what.
    """
    if type(data) is not bytes:
        raise BlockSyncError("malformed", f"a chunk is bytes, not {type(data).__name__}")
    if len(data) > MAX_CHUNK_BYTES:
        raise BlockSyncError("malformed", f"{len(data)} bytes exceed {MAX_CHUNK_BYTES}")
    if not data.startswith(CHUNK_PREFIX):
        raise BlockSyncError("malformed", "not a microgrid v1 block-sync chunk")
    body = data[len(CHUNK_PREFIX) :]
    try:  # floats and duplicate keys first: the model parser would take 1.0 or the last key
        json.loads(
            body,
            parse_float=_no_float,
            parse_constant=_no_float,
            object_pairs_hook=_no_duplicates,
        )
    except (ValueError, RecursionError) as exc:
        raise BlockSyncError("malformed", f"not JSON of integers: {exc}") from None
    try:
        chunk = Chunk.model_validate_json(body)
    except ValidationError as exc:
        raise BlockSyncError("malformed", describe_errors(exc.errors())) from None
    try:
        canonical = encode_chunk(chunk)
    except EncodingError as exc:  # pragma: no cover - the models admit only encodable values
        raise BlockSyncError("malformed", str(exc)) from None
    if canonical != data:
        raise BlockSyncError("malformed", "not in canonical form (key order, spacing, escapes)")
    return chunk


def feeder_hash(doc: Mapping[str, Any] | None) -> str | None:
    """The block header's ``feeder`` field for a chunk's ``feeder`` object (None: no feeder).

    Raises :class:`BlockSyncError` ``malformed`` for an unknown status."""
    if doc is None:
        return None
    try:
        return FeederCheck.from_json(0, doc).hash
    except ValueError:
        raise BlockSyncError("malformed", f"feeder status {doc['status']!r} is unknown") from None


def _no_float(text: str) -> Any:
    raise ValueError(f"number {text} is not an integer")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key[:40]!r} in an object")
        seen.add(key)
    return dict(pairs)


_JSON_TYPES = {
    bool: "true/false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def describe_errors(errors: list[ErrorDetails]) -> str:
    """The first of pydantic's ``errors`` as ``chunk.blocks[0].slot: what``, and how many more."""
    err = errors[0]
    where = "chunk"
    for part in err["loc"]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}"
    kind = err["type"]
    if kind == "extra_forbidden":
        what = "unknown field"
    elif kind == "missing":
        what = "missing field"
    elif kind == "value_error" and "error" in err.get("ctx", {}):
        what = str(err["ctx"]["error"])
    else:
        what = err["msg"][:1].lower() + err["msg"][1:]
        if kind.endswith("_type") or kind == "union_tag_invalid":
            what += f", got {_JSON_TYPES.get(type(err['input']), type(err['input']).__name__)}"
    more = len(errors) - 1
    return f"{where}: {what}" + (f" (and {more} more)" if more else "")
