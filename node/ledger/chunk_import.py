"""Block sync, the receiving side: check a peer's chunk and insert it into this ledger's gap.

:func:`import_blocks` decodes a chunk (:mod:`node.ledger.chunk`), checks it against the first
gap (:mod:`node.ledger.gaps`) and this ledger, and inserts it, one database transaction per
chunk: a bad chunk changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from market.accounting import Block
from market.config import MarketConfigError
from market.governance import Governance
from market.models import Order, Trade, first_error
from market.snapshot import config_from_json
from market.state import MarketConfig, clear_book
from node.ledger import schema as t
from node.ledger.chunk import (
    HEADER_FIELDS,
    MAX_GATE_LOOKAHEAD,
    BlockSyncError,
    Chunk,
    ChunkBlock,
    ChunkGate,
    ChunkGovernance,
    decode_chunk,
    feeder_hash,
)
from node.ledger.gaps import HEAD_KEY, Gap, read_gaps, write_gaps
from node.ledger.governance import decode_record, fold, record_hash, record_text
from node.ledger.queries import load_governance_records
from node.ledger.rows import (
    BalanceOverflowError,
    apply_balance_deltas,
    fetch_rows,
    insert_rows,
    insert_transaction,
    read_meta,
    steps_column,
)
from node.ledger.store import LedgerStore, LedgerStoreError, write_locked
from node.ledger.verify import LedgerFault, _verify, format_ranges


def import_blocks(store: LedgerStore, data: bytes) -> list[tuple[int, int]]:
    """Verify and insert a chunk that fills (the start of) the first gap; the gaps remaining.

    Before anything is written: strict decoding, the genesis hash, that the chunk starts the
    first gap and stays inside it, every block hash, the chain from the block before the gap
    through the chunk and its ``link`` into the gap's anchor (``block_sync_head``), every
    gate closure (order signatures; clearing and trades recomputed with the auction under the
    rules in force for its slot), and the governance records it carries (each must be the
    record this ledger holds at its position: the installed snapshot brought them; a record
    this ledger does not hold yet is left for the log to bring). Then, in the same database
    transaction, the rows are inserted, balances updated by the postings, a log index or
    withdrawn count this ledger lacks (a record from a snapshot) taken from the chunk, the
    gap shrunk, and the ledger verified from the gap's first block through the block before
    the next gap, or to its end with the end-of-ledger checks (``_verify``: transaction ids,
    balance, roots, reading signatures, state hashes, each ``true_ups`` row against its
    ``true_up`` transaction, the chain into the blocks after the gap).
    Any failure rolls everything back and raises :class:`BlockSyncError`;
    :class:`~node.ledger.LedgerStoreError` means the local database failed, not the chunk.
    """
    chunk = decode_chunk(data)
    try:
        with write_locked(store), store.engine.begin() as conn:
            remaining = _import(conn, chunk)
    except IntegrityError as exc:
        raise BlockSyncError("malformed", f"rows collide: {exc.orig}") from None
    except SQLAlchemyError as exc:
        raise LedgerStoreError(f"block sync write to {store.url} failed: {exc}") from exc
    return remaining


def _import(conn: Connection, chunk: Chunk) -> list[tuple[int, int]]:
    meta = read_meta(conn)
    if chunk.genesis_hash != meta.get("genesis_hash"):
        raise BlockSyncError(
            "wrong_grid",
            f"chunk is of genesis {chunk.genesis_hash[:16]}…, this ledger of "
            f"{meta.get('genesis_hash', '?')[:16]}…",
        )
    gaps = read_gaps(meta)
    blocks = chunk.blocks
    a = blocks[0].height
    if not gaps:
        raise BlockSyncError("not_requested", "this ledger has no gap")
    gap = gaps[0]
    if a != gap.first:
        raise BlockSyncError(
            "not_requested",
            f"chunk starts at block {a}; the first missing block is {gap.first} "
            f"(gaps {format_ranges([(g.first, g.last) for g in gaps])})",
        )
    for i, blk in enumerate(blocks):
        if blk.height != a + i:
            raise BlockSyncError(
                "bad_chain", f"block {i} of the chunk has height {blk.height}, not {a + i}"
            )
    m = blocks[-1].height
    if m > gap.last:
        raise BlockSyncError(
            "not_requested", f"chunk reaches block {m}, past the gap {gap.first}..{gap.last}"
        )
    closes = m == gap.last

    before = _check_chain(conn, chunk, gap, meta["genesis_hash"])
    lo = before.slot if before is not None else None
    fills = _check_governance(conn, chunk.governance)
    new_gates = _new_gates(conn, chunk, gap, lo, closes, meta)
    for blk in blocks:
        for r in blk.readings:
            if r.slot != blk.slot:
                raise BlockSyncError(
                    "malformed", f"block {blk.height} holds a reading of slot {r.slot}"
                )

    _insert(conn, blocks, new_gates)
    for position, values in fills:
        conn.execute(
            update(t.governance).where(t.governance.c.position == position).values(**values)
        )
    remaining = gaps[1:]
    if not closes:
        remaining.insert(0, Gap(m + 1, gap.last, gap.head, gap.gates_through))
    write_gaps(conn, remaining)
    try:
        _verify(
            conn,
            {"blocks": 0, "transactions": 0, "height": 0},
            [None],
            upto=remaining[0].first - 1 if remaining else None,
            start=a,  # blocks before the gap were verified when they landed
        )
    except LedgerFault as fault:
        reason = "bad_chain" if "broken chain" in str(fault) else "bad_block"
        raise BlockSyncError(reason, f"the ledger would not verify: {fault}") from None
    return [(g.first, g.last) for g in remaining]


def _check_chain(conn: Connection, chunk: Chunk, gap: Gap, genesis: str) -> Any:
    """The chain from the block before the gap, through the chunk and its link, to the gap's
    anchor; returns the row (hash, slot) of the block before the gap (None at height 1)."""
    blocks = chunk.blocks
    a, m = blocks[0].height, blocks[-1].height
    b = t.blocks.c
    before = conn.execute(select(b.hash, b.slot).where(b.height == a - 1)).first()
    if a > 1 and before is None:
        raise LedgerStoreError(f"block {a - 1} before the gap {a}..{gap.last} is missing")
    prev = before.hash if before is not None else genesis
    for blk in blocks:
        where = f"block {blk.height} (slot {blk.slot})"
        header = Block(*(getattr(blk, k) for k in HEADER_FIELDS[:-1]), _feeder_hash(blk), blk.rules)
        if header.hash != blk.hash:
            raise BlockSyncError("bad_block", f"{where}: header fields do not hash to its hash")
        if blk.prev_hash != prev:
            raise BlockSyncError(
                "bad_chain",
                f"{where}: prev_hash {blk.prev_hash[:16]}… but block {blk.height - 1} "
                f"is {prev[:16]}… here: a forked or reordered ledger",
            )
        prev = blk.hash
    link = chunk.link
    if len(link) < gap.last - m:
        raise BlockSyncError(
            "not_anchored",
            f"chunk ends at block {m} and links only to {m + len(link)}, short of the gap's "
            f"end {gap.last}: ask for the whole missing range",
        )
    for j, (slot, tx_root, trade_root, reading_root, state_h, tx_count, *extra) in enumerate(
        link[: gap.last - m]
    ):
        prev = Block(
            m + 1 + j, slot, prev, tx_root, trade_root, reading_root, state_h, tx_count, *extra
        ).hash
    anchor = gap.head or _successor_prev_hash(conn, gap.last)
    if prev != anchor:
        raise BlockSyncError(
            "bad_chain",
            f"blocks {a}..{gap.last} lead to {prev[:16]}…, not to this node's snapshot head "
            f"{anchor[:16]}… at height {gap.last}: a forked or forged ledger",
        )
    return before


def _new_gates(
    conn: Connection,
    chunk: Chunk,
    gap: Gap,
    lo: int | None,
    closes: bool,
    meta: dict[str, str],
) -> list[tuple[ChunkGate, bool]]:
    """Check the chunk's gate closures (those of its slots, and when it closes the gap the
    following ones); the ones to insert, each with whether this ledger has its trades."""
    last_slot = chunk.blocks[-1].slot
    local_gates = _local_gate_slots(conn, lo, last_slot + MAX_GATE_LOOKAHEAD)
    following: set[int] = set()
    if closes and gap.gates_through is not None:
        following = set(
            range(last_slot + 1, min(gap.gates_through, last_slot + MAX_GATE_LOOKAHEAD) + 1)
        )
    offered: dict[int, ChunkGate] = {}
    for g in chunk.gates:
        s = g.slot
        in_blocks = (lo is None or s > lo) and s <= last_slot
        in_follow = closes and last_slot < s <= last_slot + MAX_GATE_LOOKAHEAD
        if not (in_blocks or in_follow) or s in offered:
            raise BlockSyncError("malformed", f"gate of slot {s} does not belong in this chunk")
        offered[s] = g
    for s in [*(blk.slot for blk in chunk.blocks), *sorted(following)]:
        if s not in local_gates and s not in offered:
            raise BlockSyncError(
                "incomplete", f"the gate closure of slot {s} is neither in the chunk nor here"
            )
    if "config" not in meta:
        raise LedgerStoreError("meta has no market config: not a node's ledger")
    config = config_from_json(json.loads(meta["config"]))
    gov = _local_governance(conn)
    new_gates = []
    for s, g in sorted(offered.items()):
        if not (s <= last_slot or s in following or s in local_gates):
            continue  # this node closes that gate itself later
        try:
            rules = gov.config_at(config, s)
        except MarketConfigError as exc:
            raise LedgerStoreError(f"the ledger's rules changes make no rules: {exc}") from None
        _check_gate(g, rules)
        local = _local_gate(conn, s)
        if local is not None:
            if local != _gate_rows(g):
                raise BlockSyncError(
                    "bad_block", f"gate closure of slot {s} differs from this ledger's"
                )
            continue
        local_trades = _local_trades(conn, s)
        if local_trades and local_trades != _gate_rows(g)["trades"]:
            raise BlockSyncError(
                "bad_block", f"trades of slot {s} differ from this node's snapshot"
            )
        new_gates.append((g, bool(local_trades)))
    return new_gates


def _local_governance(conn: Connection) -> Governance:
    """The governance history of this ledger's ``governance`` rows."""
    try:
        return fold(load_governance_records(conn))
    except ValueError as exc:
        raise LedgerStoreError(f"this ledger's {exc}") from None


def _check_governance(
    conn: Connection, carried: tuple[ChunkGovernance, ...]
) -> list[tuple[int, dict[str, Any]]]:
    """Check the chunk's governance rows against this ledger's; the values to fill in
    (position, columns), for rows whose log index or withdrawn count this ledger lacks.

    Each carried record must decode, be canonical, and equal this ledger's record at its
    position (``bad_block`` otherwise: a forked or forged peer). A position this ledger has no
    row for is skipped: this node applies that record from its own log later."""
    g = t.governance.c
    local = {
        r.position: r
        for r in conn.execute(select(g.position, g.record_hash, g.log_index, g.withdrawn))
    }
    fills = []
    seen: set[int] = set()
    for item in carried:
        where = f"governance record {item.position} of the chunk"
        if item.position in seen:
            raise BlockSyncError("malformed", f"{where} is listed twice")
        seen.add(item.position)
        try:
            record = decode_record(item.record)
        except ValueError as exc:
            raise BlockSyncError("malformed", f"{where}: {exc}") from None
        if record_text(record) != item.record:
            raise BlockSyncError("malformed", f"{where} is not in canonical form")
        mine = local.get(item.position)
        if mine is None:
            continue
        if mine.record_hash != record_hash(record):
            raise BlockSyncError("bad_block", f"{where} differs from this ledger's")
        values: dict[str, Any] = {}
        if mine.log_index is None and item.log_index is not None:
            values["log_index"] = item.log_index
        if mine.withdrawn is None and item.withdrawn is not None:
            values["withdrawn"] = item.withdrawn
        if values:
            fills.append((item.position, values))
    return fills


def _feeder_hash(blk: ChunkBlock) -> str | None:
    return None if blk.feeder is None else feeder_hash(blk.feeder.model_dump(mode="json"))


def _successor_prev_hash(conn: Connection, height: int) -> str:
    b = t.blocks.c
    value = conn.execute(select(b.prev_hash).where(b.height == height + 1)).scalar()
    if value is None:
        raise LedgerStoreError(
            f"no anchor for the gap ending at {height}: meta {HEAD_KEY} is missing and there is "
            f"no block {height + 1}"
        )
    return str(value)


def _local_gate_slots(conn: Connection, lo: int | None, hi: int) -> set[int]:
    c = t.clearings.c
    q = select(c.slot).where(c.slot <= hi)
    if lo is not None:
        q = q.where(c.slot > lo)
    return {r.slot for r in conn.execute(q)}


def _gate_rows(g: ChunkGate) -> dict[str, Any]:
    """A chunk's gate closure as the rows it stands for (positions, no slot repetition)."""
    return {
        "clearing": g.model_dump(exclude={"orders", "trades"}),
        "orders": [
            {"position": i, **o.model_dump(), "steps": steps_column(o.steps)}
            for i, o in enumerate(g.orders)
        ],
        "trades": [
            {"position": i, **tr.model_dump(), "part": tr.part} for i, tr in enumerate(g.trades)
        ],
    }


def _local_trades(conn: Connection, slot: int) -> list[dict[str, Any]]:
    c = t.trades.c
    rows = fetch_rows(conn, select(t.trades).where(c.slot == slot).order_by(c.position))
    for r in rows:
        del r["slot"]
    return rows


def _local_gate(conn: Connection, slot: int) -> dict[str, Any] | None:
    clearing = fetch_rows(conn, select(t.clearings).where(t.clearings.c.slot == slot))
    if not clearing:
        return None
    c = t.orders.c
    orders = fetch_rows(conn, select(t.orders).where(c.slot == slot).order_by(c.position))
    for r in orders:
        del r["slot"]
    return {"clearing": clearing[0], "orders": orders, "trades": _local_trades(conn, slot)}


def _check_gate(g: ChunkGate, config: MarketConfig) -> None:
    """Signed orders, and the clearing and trades the engine computes from them."""
    s = g.slot
    orders = []
    for o in g.orders:
        fields = {
            "grid": config.grid,
            "id": o.order_id,
            "household": o.household,
            "side": o.side,
            "slot": s,
            "quantity_wh": o.quantity_wh,
            "price": o.price,
            "nonce": o.nonce,
            "signature": o.signature,
        }
        if o.steps is not None:
            fields["steps"] = o.steps
        try:
            order = Order.model_validate(fields)
        except ValidationError as exc:  # a curve that is not well formed, ...
            raise BlockSyncError(
                "malformed", f"order {o.order_id} of slot {s}: {first_error(exc)}"
            ) from None
        if not order.verify(order.household):
            raise BlockSyncError("bad_block", f"order {order.id} of slot {s}: bad signature")
        orders.append(order)
    if len({o.id for o in orders}) != len(orders):
        raise BlockSyncError("malformed", f"slot {s} lists an order id twice")
    c, enriched = clear_book(config, s, orders)
    trades = [tr.to_json() for tr in enriched]
    owner = {o.id: o.household for o in orders}
    given = [Trade(**tr.model_dump(), slot=s).to_json() for tr in g.trades]
    expected = {
        "mechanism": str(c.mechanism),
        "price": c.price,
        "volume_wh": c.volume_wh,
        "bid_volume_wh": c.bid_volume_wh,
        "ask_volume_wh": c.ask_volume_wh,
        "order_count": len(orders),
        "participants": len(set(owner.values())),
    }
    if given != trades or any(getattr(g, k) != v for k, v in expected.items()):
        raise BlockSyncError("bad_block", f"clearing of slot {s} is not what its orders clear to")


def _insert(
    conn: Connection, blocks: tuple[ChunkBlock, ...], gates: list[tuple[ChunkGate, bool]]
) -> None:
    """The rows of ``blocks`` and ``gates``, and the balances moved by their postings."""
    deltas: dict[tuple[str, str], int] = {}
    for blk in blocks:
        insert_rows(conn, t.blocks, [blk.model_dump(include={*HEADER_FIELDS, "rules"})])
        for pos, tx in enumerate(blk.transactions):
            header = (tx.txid, tx.kind, tx.slot, tx.ref)
            insert_transaction(conn, blk.height, pos, header, tx.postings, deltas)
        insert_rows(
            conn,
            t.readings,
            [{"position": i, **r.model_dump()} for i, r in enumerate(blk.readings)],
        )
        insert_rows(
            conn, t.settlements, [{"slot": blk.slot, **s.model_dump()} for s in blk.settlements]
        )
        insert_rows(
            conn,
            t.true_ups,
            [
                {"slot": blk.slot, "block_height": blk.height, **tu.model_dump()}
                for tu in blk.true_ups
            ],
        )
        if blk.feeder is not None:
            insert_rows(
                conn,
                t.feeder_checks,
                [
                    {
                        "slot": blk.slot,
                        "block_height": blk.height,
                        **blk.feeder.model_dump(mode="json"),
                    }
                ],
            )
    for g, have_trades in gates:
        rows = _gate_rows(g)
        insert_rows(conn, t.clearings, [rows["clearing"]])
        insert_rows(conn, t.orders, [{"slot": g.slot, **o} for o in rows["orders"]])
        if not have_trades:
            insert_rows(conn, t.trades, [{"slot": g.slot, **tr} for tr in rows["trades"]])
    try:
        apply_balance_deltas(conn, deltas)
    except BalanceOverflowError as exc:
        raise BlockSyncError("bad_block", str(exc)) from None
