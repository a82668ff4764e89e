"""Block sync, the serving side: read a chunk of ledger blocks for a peer that misses them.

:func:`export_blocks` reads blocks with everything their slots produced (transactions and
postings, readings, settlements, true-ups, the feeder check, the gate closures) and the
governance records in force from those slots, and encodes them
as one chunk (:mod:`node.ledger.chunk`, which documents the format), within ``MAX_CHUNK_BLOCKS``
blocks and ``MAX_CHUNK_BYTES`` bytes. No networking here: ``node/net/block_sync.py`` carries the
bytes.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from market.feeder import FEEDER_CHECK_FIELDS
from node.ledger import schema as t
from node.ledger.chunk import (
    CHUNK_PREFIX,
    HEADER_FIELDS,
    MAX_CHUNK_BLOCKS,
    MAX_CHUNK_BYTES,
    MAX_GATE_LOOKAHEAD,
    BlockSyncError,
    encode_chunk,
    feeder_hash,
)
from node.ledger.gaps import read_gaps
from node.ledger.rows import fetch_rows, read_meta, steps_from_column
from node.ledger.store import LedgerStore

__all__ = ["MAX_CHUNK_BLOCKS", "MAX_CHUNK_BYTES", "export_blocks"]


def export_blocks(store: LedgerStore, first: int, last: int) -> bytes:
    """Canonical bytes of blocks ``first..last`` with everything their slots produced.

    At most ``MAX_CHUNK_BLOCKS`` blocks and ``MAX_CHUNK_BYTES`` bytes, never fewer than one
    block. The chunk also carries the headers of the requested blocks it leaves out (``link``)
    and, when it reaches ``last``, the gate closures of up to ``MAX_GATE_LOOKAHEAD`` slots after
    ``last``: ask for a whole missing range. Raises :class:`BlockSyncError` ``not_available`` if
    block ``first`` is not here or lies in this ledger's own gap, ``too_large`` if one block and
    the link do not fit in ``MAX_CHUNK_BYTES``.
    """
    if type(first) is not int or type(last) is not int or not 1 <= first <= last:
        raise BlockSyncError("malformed", f"bad block range {first!r}..{last!r}")
    with store.engine.connect() as conn:
        meta = read_meta(conn)
        if "genesis_hash" not in meta:
            raise BlockSyncError("not_available", "this database is not a microgrid ledger")
        for gap in read_gaps(meta):
            if gap.first <= first <= gap.last:
                raise BlockSyncError(
                    "not_available",
                    f"block {first} is in this ledger's own gap "
                    f"{gap.first}..{gap.last} (block sync pending)",
                )
            if first < gap.first <= last:
                last = gap.first - 1
        b = t.blocks.c
        headers = fetch_rows(
            conn, select(t.blocks).where(b.height.between(first, last)).order_by(b.height)
        )
        headers = [h for i, h in enumerate(headers) if h["height"] == first + i]  # contiguous
        if not headers:
            raise BlockSyncError("not_available", f"block {first} is not in this ledger")
        last = headers[-1]["height"]
        feeders = _feeder_docs(conn, first, last)
        for h in headers:
            h["feeder"] = feeders.get(h["height"])
        prev_slot = conn.execute(select(b.slot).where(b.height == first - 1)).scalar()
        candidates = headers[:MAX_CHUNK_BLOCKS]
        hi = candidates[-1]["slot"]
        gates = _gate_docs(conn, prev_slot, hi + MAX_GATE_LOOKAHEAD)
        # Blocks whose gate rows this ledger lacks (its own gap's aftermath) are not exported.
        for i, h in enumerate(candidates):
            if h["slot"] not in gates:
                candidates = candidates[:i]
                break
        if not candidates:
            raise BlockSyncError(
                "not_available", f"the gate closure of block {first}'s slot is not in this ledger"
            )
        blocks = _block_bodies(conn, candidates)
        governance = _governance_docs(conn, prev_slot)
    return _assemble(meta["genesis_hash"], blocks, headers, gates, prev_slot, governance)


def _block_bodies(conn: Connection, headers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first, last = headers[0]["height"], headers[-1]["height"]
    tx, p = t.transactions.c, t.postings.c
    txs = fetch_rows(
        conn,
        select(t.transactions)
        .where(tx.block_height.between(first, last))
        .order_by(tx.block_height, tx.position),
    )
    postings: dict[int, list[list[Any]]] = {}
    for r in conn.execute(
        select(p.transaction_id, p.account, p.asset, p.amount)
        .join(t.transactions, p.transaction_id == tx.id)
        .where(tx.block_height.between(first, last))
        .order_by(p.transaction_id, p.position)
    ):
        postings.setdefault(r.transaction_id, []).append([r.account, r.asset, r.amount])
    lo, hi = headers[0]["slot"], headers[-1]["slot"]
    by_height: dict[int, dict[str, Any]] = {}
    for h in headers:
        by_height[h["height"]] = {
            **_block_doc(h),
            "transactions": [],
            "readings": [],
            "settlements": [],
        }
        if h["feeder"] is not None:
            by_height[h["height"]]["feeder"] = h["feeder"]
    slot_height = {h["slot"]: h["height"] for h in headers}
    for r in txs:
        by_height[r["block_height"]]["transactions"].append(
            {
                "txid": r["txid"],
                "kind": r["kind"],
                "slot": r["slot"],
                "ref": r["ref"],
                "postings": postings.get(r["id"], []),
            }
        )
    rd, st = t.readings.c, t.settlements.c
    for r in fetch_rows(
        conn,
        select(t.readings).where(rd.slot.between(lo, hi)).order_by(rd.slot, rd.position),
    ):
        if r["slot"] in slot_height:
            del r["position"]
            by_height[slot_height[r["slot"]]]["readings"].append(r)
    for r in fetch_rows(
        conn,
        select(t.settlements).where(st.slot.between(lo, hi)).order_by(st.slot, st.household),
    ):
        if r["slot"] in slot_height:
            slot = r.pop("slot")
            by_height[slot_height[slot]]["settlements"].append(r)
    tu = t.true_ups.c
    for r in fetch_rows(
        conn,
        select(tu.block_height, tu.household, tu.slots, tu.import_wh, tu.export_wh)
        .where(tu.block_height.between(first, last))
        .order_by(tu.block_height, tu.household),
    ):
        # Only blocks with a true-up carry the key: other blocks encode as they always did.
        height = r.pop("block_height")
        by_height[height].setdefault("true_ups", []).append(r)
    return [by_height[h["height"]] for h in headers]


def _assemble(
    genesis: str,
    blocks: list[dict[str, Any]],
    headers: list[dict[str, Any]],
    gates: dict[int, dict[str, Any]],
    prev_slot: int | None,
    governance: list[tuple[int, dict[str, Any]]],
) -> bytes:
    """The largest chunk of ``blocks`` (with link, gates and the governance records in force
    from their slots) within ``MAX_CHUNK_BYTES``."""

    def size(doc: Any) -> int:
        return len(json.dumps(doc, sort_keys=True, separators=(",", ":")))

    def gate_list(n: int) -> list[dict[str, Any]]:
        hi = blocks[n - 1]["slot"]
        chosen = [
            gates[s] for s in sorted(gates) if (prev_slot is None or s > prev_slot) and s <= hi
        ]
        if n == len(headers):  # reaches the requested last block: bring the following gates
            s = hi + 1
            while s in gates and s <= hi + MAX_GATE_LOOKAHEAD:
                chosen.append(gates[s])
                s += 1
        return chosen

    def governance_list(n: int) -> list[dict[str, Any]]:
        hi = blocks[n - 1]["slot"]
        return [doc for slot, doc in governance if n == len(headers) or slot <= hi]

    block_sizes = [size(b) + 1 for b in blocks]
    link_sizes = [size(_link_doc(h)) + 1 for h in headers]
    gate_sizes = {s: size(g) + 1 for s, g in gates.items()}
    envelope = len(CHUNK_PREFIX) + 200

    def estimate(n: int) -> int:
        return (
            envelope
            + sum(block_sizes[:n])
            + sum(link_sizes[n:])
            + sum(gate_sizes[g["slot"]] for g in gate_list(n))
            + sum(size(doc) + 1 for doc in governance_list(n))
        )

    n = len(blocks)
    while n > 1 and estimate(n) > MAX_CHUNK_BYTES:
        n -= 1
    while True:
        doc: dict[str, Any] = {
            "genesis_hash": genesis,
            "blocks": blocks[:n],
            "gates": gate_list(n),
            "link": [_link_doc(h) for h in headers[n:]],
        }
        records = governance_list(n)
        if records:  # left out when there is none: chunks of unchanged grids stay as before
            doc["governance"] = records
        data = encode_chunk(doc)
        if len(data) <= MAX_CHUNK_BYTES:
            return data
        if n == 1:
            raise BlockSyncError(
                "too_large",
                f"block {blocks[0]['height']} with the headers up to {headers[-1]['height']} "
                f"takes {len(data)} bytes, more than {MAX_CHUNK_BYTES}",
            )
        n -= 1


def _block_doc(row: dict[str, Any]) -> dict[str, Any]:
    doc = {k: row[k] for k in HEADER_FIELDS}
    if row.get("rules") is not None:
        doc["rules"] = row["rules"]
    return doc


def _link_doc(row: dict[str, Any]) -> list[Any]:
    doc = [
        row["slot"],
        row["tx_root"],
        row["trade_root"],
        row["reading_root"],
        row["state_hash"],
        row["tx_count"],
    ]
    feeder = None if row.get("feeder") is None else feeder_hash(row["feeder"])
    if row.get("rules") is not None:
        doc += [feeder, row["rules"]]
    elif feeder is not None:
        doc.append(feeder)
    return doc


def _governance_docs(conn: Connection, after_slot: int | None) -> list[tuple[int, dict[str, Any]]]:
    """``(from_slot, chunk object)`` of the governance rows in force from a slot after
    ``after_slot`` (every row when None), in log order."""
    g = t.governance.c
    q = select(g.position, g.log_index, g.withdrawn, g.record, g.from_slot).order_by(g.position)
    if after_slot is not None:
        q = q.where(g.from_slot > after_slot)
    return [
        (
            int(r.from_slot),
            {
                "position": r.position,
                "log_index": r.log_index,
                "withdrawn": r.withdrawn,
                "record": r.record,
            },
        )
        for r in conn.execute(q)
    ]


def _feeder_docs(conn: Connection, first: int, last: int) -> dict[int, dict[str, Any]]:
    """The ``feeder_checks`` rows of blocks ``first..last`` as chunk objects, by height."""
    f = t.feeder_checks.c
    return {
        r["block_height"]: {k: r[k] for k in FEEDER_CHECK_FIELDS}
        for r in fetch_rows(
            conn, select(t.feeder_checks).where(f.block_height.between(first, last))
        )
    }


def _gate_docs(conn: Connection, lo: int | None, hi: int) -> dict[int, dict[str, Any]]:
    """Gate closures of slots in (lo, hi] that this ledger holds completely."""
    c = t.clearings.c
    q = select(t.clearings).where(c.slot <= hi).order_by(c.slot)
    if lo is not None:
        q = q.where(c.slot > lo)
    gates = {r["slot"]: {**r, "orders": [], "trades": []} for r in fetch_rows(conn, q)}
    if not gates:
        return gates
    first = min(gates)
    # Orders and trades of a gate are written with its clearing row: read after it, only the
    # slots whose clearing we saw (a gate committing meanwhile is left for the next chunk).
    for table, key, drop in (
        (t.orders, "orders", ("slot", "position")),
        (t.trades, "trades", ("slot", "position")),
    ):
        q = (
            select(table)
            .where(table.c.slot >= first, table.c.slot <= hi)
            .order_by(table.c.slot, table.c.position)
        )
        for r in fetch_rows(conn, q):
            if r["slot"] in gates:
                gates[r["slot"]][key].append(_gate_row_doc(r, drop))
    return gates


def _gate_row_doc(row: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    """An ``orders`` or ``trades`` row as its chunk object: without ``drop``, and without a
    plain order's ``steps`` or a trade's ``part`` when NULL (a curve order's steps as a list)."""
    doc = {k: v for k, v in row.items() if k not in drop}
    if "steps" in doc:
        if doc["steps"] is None:
            del doc["steps"]
        else:
            try:
                doc["steps"] = steps_from_column(doc["steps"])
            except ValueError as exc:
                raise BlockSyncError(
                    "not_available", f"order {doc.get('order_id')}: {exc}"
                ) from None
    if "part" in doc and doc["part"] is None:
        del doc["part"]
    return doc
