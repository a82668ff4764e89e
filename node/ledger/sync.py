"""Block sync, the database side: fill the ledger gap an installed Raft snapshot leaves.

A node that fell behind a compacted Raft log installs an engine snapshot
(:meth:`node.daemon.replica.Replica.install_snapshot`): the engine continues from it at once, but
the ledger lacks the blocks between its head and the snapshot's height, and new blocks are appended
after that gap. :func:`record_snapshot` writes down what is missing (meta, below); a peer's
:func:`export_blocks` reads a chunk of those blocks with everything their slots produced, and
:func:`import_blocks` checks the chunk and inserts it, one database transaction per chunk.
No networking here: ``node/net/block_sync.py`` carries the bytes.

Meta (docs/ledger.md, "Block sync"); the three lists run in step, one item per gap:

- ``block_sync_needed`` ``"5..9,14..20"``: the missing heights, ascending, inclusive.
- ``block_sync_head`` ``"<hex>,<hex>"``: per gap, the hash of its last block (the installed
  snapshot's head hash): the anchor a chunk must chain into.
- ``block_sync_gates`` ``"12,23"``: per gap, the last slot whose gate the snapshot had closed
  (``-`` if none). Gates closed in the skipped log entries for slots *after* the gap's last
  block (closed but not yet settled at the snapshot) are missing too; the chunk that closes the
  gap brings them.

A chunk (:func:`export_blocks`) is ``microgrid/blocksync/v1\\n`` + canonical JSON::

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
                            allowed_loss_wh}}],
     "gates": [{slot, mechanism, price, volume_wh, bid_volume_wh, ask_volume_wh, order_count,
                participants, "orders": [{order_id, household, side, quantity_wh, price,
                                          nonce, signature}],
                "trades": [{buy_id, sell_id, buyer, seller, quantity_wh, price,
                            sell_price}]}],
     "link": [[slot, tx_root, trade_root, reading_root, state_hash, tx_count, feeder]]}

``feeder`` (the block's ``feeder_checks`` row; in a link, its hash) is there only in a grid with
a feeder meter: a grid without one exchanges exactly the chunks it did before.

List order is row order (``position``). ``gates`` holds the gate closures (clearing, book,
trades) of the blocks' slots and, when the chunk reaches the requested last height, of up to
``MAX_GATE_LOOKAHEAD`` following slots. ``link`` holds the headers of the requested blocks
the chunk does not carry (heights ``last block + 1 ..`` requested last; height and prev_hash
are implied): with them the importer checks that *every* chunk chains into the gap's anchor,
not only the one that closes it, so a forked or forged peer cannot land a single block.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from market.accounting import Block
from market.encoding import EncodingError, canonical_bytes
from market.events import GateClosed
from market.feeder import FEEDER_CHECK_FIELDS, FeederCheck
from market.models import Order, Trade
from market.snapshot import config_from_json
from market.state import Reputation, State, clear_book
from node.ledger import schema as t
from node.ledger.store import LedgerStore, LedgerStoreError, write_gate, write_trades
from node.ledger.verify import (
    SYNC_NEEDED_KEY,
    LedgerFault,
    _verify,
    format_ranges,
    parse_ranges,
)

MAX_CHUNK_BLOCKS = 50
MAX_CHUNK_BYTES = 4 * 1024 * 1024
"""An encoded chunk never exceeds this; :func:`export_blocks` stops earlier."""
MAX_GATE_LOOKAHEAD = 16
"""Most gate closures after a gap's last block that a closing chunk carries (slots closed but
not settled at the snapshot: about (gate lead + settle delay) / slot length + 1, 2 by default)."""

CHUNK_KIND = "blocksync"
_PREFIX = f"microgrid/{CHUNK_KIND}/v1\n".encode()
HEAD_KEY = "block_sync_head"
GATES_KEY = "block_sync_gates"


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


@dataclass(frozen=True, slots=True)
class Gap:
    """One missing height range and what anchors it."""

    first: int
    last: int
    head: str
    """Hash of block ``last`` (the snapshot's head hash); "" if unknown (older ledgers)."""
    gates_through: int | None
    """Last slot whose gate the snapshot had closed."""


# --- meta -------------------------------------------------------------------------------------


def _meta(conn: Connection) -> dict[str, str]:
    return {r.key: r.value for r in conn.execute(select(t.meta.c.key, t.meta.c.value))}


def _read_gaps(meta: dict[str, str]) -> list[Gap]:
    try:
        ranges = parse_ranges(meta.get(SYNC_NEEDED_KEY, ""))
    except ValueError as exc:
        raise LedgerStoreError(f"meta {SYNC_NEEDED_KEY} is unreadable: {exc}") from None
    # Without the two keys (written before anchors were recorded) a gap anchors on its successor.
    heads = meta[HEAD_KEY].split(",") if HEAD_KEY in meta else [""] * len(ranges)
    gates = meta[GATES_KEY].split(",") if GATES_KEY in meta else ["-"] * len(ranges)
    if len(heads) != len(ranges) or len(gates) != len(ranges):
        raise LedgerStoreError(
            f"meta {SYNC_NEEDED_KEY}, {HEAD_KEY} and {GATES_KEY} do not list the same gaps"
        )
    out = []
    for (first, last), head, g in zip(ranges, heads, gates, strict=True):
        if head and not _HEX64.fullmatch(head):
            raise LedgerStoreError(f"meta {HEAD_KEY} has a bad hash {head[:20]!r}")
        if g != "-" and not re.fullmatch(r"-?[0-9]+", g):
            raise LedgerStoreError(f"meta {GATES_KEY} has a bad slot {g[:20]!r}")
        out.append(Gap(first, last, head, None if g == "-" else int(g)))
    return out


def _write_gaps(conn: Connection, gaps: list[Gap]) -> None:
    keys = (SYNC_NEEDED_KEY, HEAD_KEY, GATES_KEY)
    conn.execute(delete(t.meta).where(t.meta.c.key.in_(keys)))
    if gaps:
        values = (
            format_ranges([(g.first, g.last) for g in gaps]),
            ",".join(g.head for g in gaps),
            ",".join("-" if g.gates_through is None else str(g.gates_through) for g in gaps),
        )
        conn.execute(
            insert(t.meta), [{"key": k, "value": v} for k, v in zip(keys, values, strict=True)]
        )


def missing_ranges(store: LedgerStore) -> list[tuple[int, int]]:
    """Gaps (inclusive height ranges) this ledger still needs, from meta; [] when complete."""
    return [(g.first, g.last) for g in _read_gaps(store.meta())]


def head_hash_at(store: LedgerStore, height: int) -> str | None:
    """Hash of block ``height``: the ledger's own, or, when that height ends a gap still to be
    filled, the snapshot head the gap must chain into (None if neither is known)."""
    with store.engine.connect() as conn:
        own = conn.execute(select(t.blocks.c.hash).where(t.blocks.c.height == height)).scalar()
        if own is not None:
            return str(own)
        for gap in _read_gaps(_meta(conn)):
            if gap.last == height and gap.head:
                return gap.head
    return None


def _locked(store: LedgerStore) -> Any:
    """The store's process-wide write lock, where the store has one."""
    return getattr(store, "write_lock", None) or contextlib.nullcontext()


# --- installing a snapshot ----------------------------------------------------------------------


def record_snapshot(store: LedgerStore, state: State, applied_index: int) -> None:
    """Record in the ledger that the engine jumped to snapshot ``state`` at ``applied_index``.

    One transaction: the new gap (merged with a gap it touches, so an earlier gap is never
    lost), the applied index, the ``households`` table from the snapshot's members and
    reputation (registrations in the skipped entries never reached this ledger), and the gate
    closures of slots closed but not settled at the snapshot: clearing, book and trades, from
    the snapshot's ``closed_books`` (the trades are hashed into blocks this node will write, so
    those blocks verify even before the gap is filled, and this node can serve them).
    """
    try:
        with _locked(store), store.engine.begin() as conn:
            gaps = _read_gaps(_meta(conn))
            local = conn.execute(select(t.blocks.c.height).order_by(t.blocks.c.height.desc()))
            have = max(local.scalar() or 0, gaps[-1].last if gaps else 0)
            # A gap ending at ``have`` has no block after it: the new one continues it.
            open_end = bool(gaps) and gaps[-1].last == have
            if state.height > have:
                first = gaps.pop().first if open_end else have + 1
                gaps.append(Gap(first, state.height, state.head_hash, state.closed_through))
            elif open_end and state.height == have:
                g = gaps.pop()  # same height, later gates: more gate closures are missing
                gaps.append(Gap(g.first, g.last, g.head, state.closed_through))
            _write_gaps(conn, gaps)
            conn.execute(
                update(t.meta)
                .where(t.meta.c.key == "applied_index")
                .values(value=str(applied_index))
            )
            _write_households(conn, state)
            for slot, trades in sorted(state.cleared.items()):
                _write_skipped_gate(conn, state, slot, trades)
    except SQLAlchemyError as exc:
        raise LedgerStoreError(f"recording a snapshot in {store.url} failed: {exc}") from exc


def _write_skipped_gate(conn: Connection, state: State, slot: int, trades: tuple) -> None:
    """The rows of the gate closure of ``slot`` (closed, not settled) unless this ledger has
    them: this node applied that closure itself, or an earlier snapshot brought it."""
    if conn.execute(select(t.clearings.c.slot).where(t.clearings.c.slot == slot)).first():
        return
    have_trades = conn.execute(select(t.trades.c.slot).where(t.trades.c.slot == slot)).first()
    orders = state.closed_books.get(slot)
    if orders is None:  # a snapshot from before closed_books: only the trades are known
        if not have_trades:
            write_trades(conn, trades)
        return
    clearing, recomputed = clear_book(state.config, slot, orders)
    if recomputed != tuple(trades):
        raise LedgerStoreError(
            f"snapshot is inconsistent: the book of slot {slot} does not clear to its trades"
        )
    write_gate(conn, GateClosed(slot, clearing, orders, recomputed), with_trades=not have_trades)


def _write_households(conn: Connection, state: State) -> None:
    h = t.households.c
    existing = {r.did for r in conn.execute(select(h.did))}
    for did, member in sorted(state.members.items()):
        rep = state.reputation.get(did, Reputation())
        values = {
            "meter_serial": member.meter_serial,
            "role": str(member.role),
            "sold_wh": rep.sold_wh,
            "delivered_wh": rep.delivered_wh,
            "bought_wh": rep.bought_wh,
            "consumed_wh": rep.consumed_wh,
            "slots": rep.slots,
            "missed_readings": rep.missed_readings,
            "reputation_permille": rep.score_permille,
        }
        if did in existing:
            conn.execute(update(t.households).where(h.did == did).values(**values))
        else:
            conn.execute(insert(t.households).values(did=did, **values))


# --- export -----------------------------------------------------------------------------------


def _rows(conn: Connection, query: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(query)]


def _block_doc(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in _HEADER_FIELDS}


def _feeder_hash(doc: dict[str, Any] | None) -> str | None:
    """The block header's ``feeder`` field for a chunk's ``feeder`` object (None: no feeder).
    Raises :class:`BlockSyncError` ``malformed`` for an unknown status."""
    if doc is None:
        return None
    try:
        return FeederCheck.from_json(0, doc).hash
    except ValueError:
        raise BlockSyncError("malformed", f"feeder status {doc['status']!r} is unknown") from None


def _link_doc(row: dict[str, Any]) -> list[Any]:
    doc = [
        row["slot"],
        row["tx_root"],
        row["trade_root"],
        row["reading_root"],
        row["state_hash"],
        row["tx_count"],
    ]
    if row.get("feeder") is not None:
        doc.append(_feeder_hash(row["feeder"]))
    return doc


def _feeder_docs(conn: Connection, first: int, last: int) -> dict[int, dict[str, Any]]:
    """The ``feeder_checks`` rows of blocks ``first..last`` as chunk objects, by height."""
    f = t.feeder_checks.c
    return {
        r["block_height"]: {k: r[k] for k in FEEDER_CHECK_FIELDS}
        for r in _rows(conn, select(t.feeder_checks).where(f.block_height.between(first, last)))
    }


def _gate_docs(conn: Connection, lo: int | None, hi: int) -> dict[int, dict[str, Any]]:
    """Gate closures of slots in (lo, hi] that this ledger holds completely."""
    c = t.clearings.c
    q = select(t.clearings).where(c.slot <= hi).order_by(c.slot)
    if lo is not None:
        q = q.where(c.slot > lo)
    gates = {r["slot"]: {**r, "orders": [], "trades": []} for r in _rows(conn, q)}
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
        for r in _rows(conn, q):
            if r["slot"] in gates:
                gates[r["slot"]][key].append({k: v for k, v in r.items() if k not in drop})
    return gates


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
        meta = _meta(conn)
        if "genesis_hash" not in meta:
            raise BlockSyncError("not_available", "this database is not a microgrid ledger")
        for gap in _read_gaps(meta):
            if gap.first <= first <= gap.last:
                raise BlockSyncError(
                    "not_available",
                    f"block {first} is in this ledger's own gap "
                    f"{gap.first}..{gap.last} (block sync pending)",
                )
            if first < gap.first <= last:
                last = gap.first - 1
        b = t.blocks.c
        headers = _rows(
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
    return _assemble(meta["genesis_hash"], blocks, headers, gates, prev_slot)


def _block_bodies(conn: Connection, headers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first, last = headers[0]["height"], headers[-1]["height"]
    tx, p = t.transactions.c, t.postings.c
    txs = _rows(
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
    for r in _rows(
        conn,
        select(t.readings).where(rd.slot.between(lo, hi)).order_by(rd.slot, rd.position),
    ):
        if r["slot"] in slot_height:
            del r["position"]
            by_height[slot_height[r["slot"]]]["readings"].append(r)
    for r in _rows(
        conn,
        select(t.settlements).where(st.slot.between(lo, hi)).order_by(st.slot, st.household),
    ):
        if r["slot"] in slot_height:
            slot = r.pop("slot")
            by_height[slot_height[slot]]["settlements"].append(r)
    return [by_height[h["height"]] for h in headers]


def _assemble(
    genesis: str,
    blocks: list[dict[str, Any]],
    headers: list[dict[str, Any]],
    gates: dict[int, dict[str, Any]],
    prev_slot: int | None,
) -> bytes:
    """The largest chunk of ``blocks`` (with link and gates) within ``MAX_CHUNK_BYTES``."""

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

    block_sizes = [size(b) + 1 for b in blocks]
    link_sizes = [size(_link_doc(h)) + 1 for h in headers]
    gate_sizes = {s: size(g) + 1 for s, g in gates.items()}
    envelope = len(_PREFIX) + 200

    def estimate(n: int) -> int:
        return (
            envelope
            + sum(block_sizes[:n])
            + sum(link_sizes[n:])
            + sum(gate_sizes[g["slot"]] for g in gate_list(n))
        )

    n = len(blocks)
    while n > 1 and estimate(n) > MAX_CHUNK_BYTES:
        n -= 1
    while True:
        data = canonical_bytes(
            CHUNK_KIND,
            {
                "genesis_hash": genesis,
                "blocks": blocks[:n],
                "gates": gate_list(n),
                "link": [_link_doc(h) for h in headers[n:]],
            },
        )
        if len(data) <= MAX_CHUNK_BYTES:
            return data
        if n == 1:
            raise BlockSyncError(
                "too_large",
                f"block {blocks[0]['height']} with the headers up to {headers[-1]['height']} "
                f"takes {len(data)} bytes, more than {MAX_CHUNK_BYTES}",
            )
        n -= 1


# --- strict decoding ----------------------------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEADER_FIELDS = (
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
_INT64 = 1 << 63
Check = Callable[[Any, str], None]


def _bad(where: str, what: str) -> BlockSyncError:
    return BlockSyncError("malformed", f"{where}: {what}")


def _int(v: Any, where: str) -> None:
    if type(v) is not int:
        raise _bad(where, f"expected an integer, got {type(v).__name__}")
    if not -_INT64 <= v < _INT64:
        raise _bad(where, "integer out of the 64-bit range")


def _nat(v: Any, where: str) -> None:
    _int(v, where)
    if v < 0:
        raise _bad(where, "negative")


def _opt_int(v: Any, where: str) -> None:
    if v is not None:
        _int(v, where)


def _bool(v: Any, where: str) -> None:
    if type(v) is not bool:
        raise _bad(where, f"expected true/false, got {type(v).__name__}")


def _str(max_len: int | None = None) -> Check:
    def check(v: Any, where: str) -> None:
        if type(v) is not str:
            raise _bad(where, f"expected a string, got {type(v).__name__}")
        if max_len is not None and len(v) > max_len:
            raise _bad(where, f"longer than {max_len} characters")

    return check


def _hex(v: Any, where: str) -> None:
    if type(v) is not str or not _HEX64.fullmatch(v):
        raise _bad(where, "expected 64 lowercase hex digits")


def _list(item: Check) -> Check:
    def check(v: Any, where: str) -> None:
        if type(v) is not list:
            raise _bad(where, f"expected a list, got {type(v).__name__}")
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]")

    return check


def _obj(spec: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    """An object of exactly the fields of ``spec``, plus any of ``optional``."""
    extra_spec = optional or {}

    def check(v: Any, where: str) -> None:
        if type(v) is not dict:
            raise _bad(where, f"expected an object, got {type(v).__name__}")
        if set(v) - set(extra_spec) != set(spec):
            extra = sorted(set(v) - set(spec) - set(extra_spec))
            missing = sorted(set(spec) - set(v))
            raise _bad(where, f"unknown fields {extra}, missing fields {missing}")
        for key, item in spec.items():
            item(v[key], f"{where}.{key}")
        for key, item in extra_spec.items():
            if key in v:
                item(v[key], f"{where}.{key}")

    return check


def _tuple(*items: Check) -> Check:
    def check(v: Any, where: str) -> None:
        if type(v) is not list or len(v) != len(items):
            raise _bad(where, f"expected a list of {len(items)}")
        for i, (x, item) in enumerate(zip(v, items, strict=True)):
            item(x, f"{where}[{i}]")

    return check


def _link_item(v: Any, where: str) -> None:
    """A link header: six items, a seventh (the feeder check hash) in a grid with a feeder."""
    if type(v) is list and len(v) == 7:
        _tuple(_int, _hex, _hex, _hex, _hex, _nat, _hex)(v, where)
    else:
        _tuple(_int, _hex, _hex, _hex, _hex, _nat)(v, where)


def _opt(item: Check) -> Check:
    def check(v: Any, where: str) -> None:
        if v is not None:
            item(v, where)

    return check


def _side(v: Any, where: str) -> None:
    if v not in ("buy", "sell") or type(v) is not str:
        raise _bad(where, "expected 'buy' or 'sell'")


_text = _str()
_CHUNK = _obj(
    {
        "genesis_hash": _hex,
        "blocks": _list(
            _obj(
                {
                    "height": _nat,
                    "slot": _int,
                    "prev_hash": _hex,
                    "tx_root": _hex,
                    "trade_root": _hex,
                    "reading_root": _hex,
                    "state_hash": _hex,
                    "tx_count": _nat,
                    "hash": _hex,
                    "transactions": _list(
                        _obj(
                            {
                                "txid": _hex,
                                "kind": _str(32),
                                "slot": _int,
                                "ref": _text,
                                "postings": _list(_tuple(_text, _str(16), _int)),
                            }
                        )
                    ),
                    "readings": _list(
                        _obj(
                            {
                                "grid": _text,
                                "household": _text,
                                "meter_serial": _text,
                                "slot": _int,
                                "import_wh": _int,
                                "export_wh": _int,
                                "nonce": _int,
                                "signature": _str(128),
                            }
                        )
                    ),
                    "settlements": _list(
                        _obj(
                            {
                                "household": _text,
                                "measured": _bool,
                                "import_wh": _int,
                                "export_wh": _int,
                                "sold_wh": _int,
                                "bought_wh": _int,
                                "imbalance_wh": _int,
                                "delivered_wh": _int,
                                "consumed_wh": _int,
                            }
                        )
                    ),
                },
                {
                    "feeder": _obj(
                        {
                            "status": _str(24),
                            "meter_serial": _opt(_str(128)),
                            "import_wh": _opt_int,
                            "export_wh": _opt_int,
                            "nonce": _opt_int,
                            "signature": _opt(_str(128)),
                            "feeder_net_wh": _opt_int,
                            "households_net_wh": _opt_int,
                            "difference_wh": _opt_int,
                            "allowed_loss_wh": _opt_int,
                        }
                    )
                },
            )
        ),
        "gates": _list(
            _obj(
                {
                    "slot": _int,
                    "mechanism": _str(16),
                    "price": _opt_int,
                    "volume_wh": _int,
                    "bid_volume_wh": _int,
                    "ask_volume_wh": _int,
                    "order_count": _nat,
                    "participants": _nat,
                    "orders": _list(
                        _obj(
                            {
                                "order_id": _str(128),
                                "household": _text,
                                "side": _side,
                                "quantity_wh": _int,
                                "price": _int,
                                "nonce": _int,
                                "signature": _str(128),
                            }
                        )
                    ),
                    "trades": _list(
                        _obj(
                            {
                                "buy_id": _str(128),
                                "sell_id": _str(128),
                                "buyer": _text,
                                "seller": _text,
                                "quantity_wh": _int,
                                "price": _int,
                                "sell_price": _int,
                            }
                        )
                    ),
                }
            )
        ),
        "link": _list(_link_item),
    }
)


def _no_float(text: str) -> Any:
    raise ValueError(f"number {text} is not an integer")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in an object")
    return out


def decode_chunk(data: bytes) -> dict[str, Any]:
    """Strictly decode a chunk: exactly the v1 canonical bytes of the documented fields."""
    if type(data) is not bytes:
        raise BlockSyncError("malformed", f"a chunk is bytes, not {type(data).__name__}")
    if len(data) > MAX_CHUNK_BYTES:
        raise BlockSyncError("malformed", f"{len(data)} bytes exceed {MAX_CHUNK_BYTES}")
    if not data.startswith(_PREFIX):
        raise BlockSyncError("malformed", "not a microgrid v1 block-sync chunk")
    try:
        doc = json.loads(
            data[len(_PREFIX) :],
            parse_float=_no_float,
            parse_constant=_no_float,
            object_pairs_hook=_no_duplicates,
        )
    except (ValueError, RecursionError) as exc:
        raise BlockSyncError("malformed", f"not JSON of integers: {exc}") from None
    _CHUNK(doc, "chunk")
    try:
        canonical = canonical_bytes(CHUNK_KIND, doc)
    except EncodingError as exc:  # pragma: no cover - the schema admits only encodable values
        raise BlockSyncError("malformed", str(exc)) from None
    if canonical != data:
        raise BlockSyncError("malformed", "not in canonical form (key order, spacing, escapes)")
    if not doc["blocks"]:
        raise BlockSyncError("malformed", "a chunk holds at least one block")
    return doc


# --- import -------------------------------------------------------------------------------------


def import_blocks(store: LedgerStore, data: bytes) -> list[tuple[int, int]]:
    """Verify and insert a chunk that fills (the start of) the first gap; the gaps remaining.

    Before anything is written: strict decoding, the genesis hash, that the chunk starts the
    first gap and stays inside it, every block hash, the chain from the block before the gap
    through the chunk and its ``link`` into the gap's anchor (``block_sync_head``), and every
    gate closure (order signatures; clearing and trades recomputed with the auction). Then, in
    the same database transaction, the rows are inserted, balances updated by the postings, the
    gap shrunk, and the ledger verified from the gap's first block through the block before
    the next gap, or to its end with the end-of-ledger checks (``_verify``: transaction ids,
    balance, roots, reading signatures, state hashes, the chain into the blocks after the gap).
    Any failure rolls everything back and raises :class:`BlockSyncError`;
    :class:`~node.ledger.LedgerStoreError` means the local database failed, not the chunk.
    """
    chunk = decode_chunk(data)
    try:
        with _locked(store), store.engine.begin() as conn:
            remaining = _import(conn, chunk)
    except IntegrityError as exc:
        raise BlockSyncError("malformed", f"rows collide: {exc.orig}") from None
    except SQLAlchemyError as exc:
        raise LedgerStoreError(f"block sync write to {store.url} failed: {exc}") from exc
    return remaining


def _import(conn: Connection, chunk: dict[str, Any]) -> list[tuple[int, int]]:
    meta = _meta(conn)
    if chunk["genesis_hash"] != meta.get("genesis_hash"):
        raise BlockSyncError(
            "wrong_grid",
            f"chunk is of genesis {chunk['genesis_hash'][:16]}…, this ledger of "
            f"{meta.get('genesis_hash', '?')[:16]}…",
        )
    gaps = _read_gaps(meta)
    blocks = chunk["blocks"]
    a = blocks[0]["height"]
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
        if blk["height"] != a + i:
            raise BlockSyncError(
                "bad_chain", f"block {i} of the chunk has height {blk['height']}, not {a + i}"
            )
    m = blocks[-1]["height"]
    if m > gap.last:
        raise BlockSyncError(
            "not_requested", f"chunk reaches block {m}, past the gap {gap.first}..{gap.last}"
        )
    closes = m == gap.last

    # The chain: from the block before the gap, through the chunk and its link, to the anchor.
    b = t.blocks.c
    before = conn.execute(select(b.hash, b.slot).where(b.height == a - 1)).first()
    if a > 1 and before is None:
        raise LedgerStoreError(f"block {a - 1} before the gap {a}..{gap.last} is missing")
    prev = before.hash if before is not None else meta["genesis_hash"]
    for blk in blocks:
        where = f"block {blk['height']} (slot {blk['slot']})"
        header = Block(*(blk[k] for k in _HEADER_FIELDS[:-1]), _feeder_hash(blk.get("feeder")))
        if header.hash != blk["hash"]:
            raise BlockSyncError("bad_block", f"{where}: header fields do not hash to its hash")
        if blk["prev_hash"] != prev:
            raise BlockSyncError(
                "bad_chain",
                f"{where}: prev_hash {blk['prev_hash'][:16]}… but block {blk['height'] - 1} "
                f"is {prev[:16]}… here: a forked or reordered ledger",
            )
        prev = blk["hash"]
    link = chunk["link"]
    if len(link) < gap.last - m:
        raise BlockSyncError(
            "not_anchored",
            f"chunk ends at block {m} and links only to {m + len(link)}, short of the gap's "
            f"end {gap.last}: ask for the whole missing range",
        )
    for j, (slot, tx_root, trade_root, reading_root, state_h, tx_count, *feeder) in enumerate(
        link[: gap.last - m]
    ):
        prev = Block(
            m + 1 + j, slot, prev, tx_root, trade_root, reading_root, state_h, tx_count, *feeder
        ).hash
    anchor = gap.head or _successor_prev_hash(conn, gap.last)
    if prev != anchor:
        raise BlockSyncError(
            "bad_chain",
            f"blocks {a}..{gap.last} lead to {prev[:16]}…, not to this node's snapshot head "
            f"{anchor[:16]}… at height {gap.last}: a forked or forged ledger",
        )

    # Gate closures: those of the chunk's slots, and when closing the following ones.
    slots = [blk["slot"] for blk in blocks]
    lo = before.slot if before is not None else None
    local_gates = _local_gate_slots(conn, lo, slots[-1] + MAX_GATE_LOOKAHEAD)
    following: set[int] = set()
    if closes and gap.gates_through is not None:
        following = set(
            range(slots[-1] + 1, min(gap.gates_through, slots[-1] + MAX_GATE_LOOKAHEAD) + 1)
        )
    offered = {}
    for g in chunk["gates"]:
        s = g["slot"]
        in_blocks = (lo is None or s > lo) and s <= slots[-1]
        in_follow = closes and slots[-1] < s <= slots[-1] + MAX_GATE_LOOKAHEAD
        if not (in_blocks or in_follow) or s in offered:
            raise BlockSyncError("malformed", f"gate of slot {s} does not belong in this chunk")
        offered[s] = g
    for s in [*slots, *sorted(following)]:
        if s not in local_gates and s not in offered:
            raise BlockSyncError(
                "incomplete", f"the gate closure of slot {s} is neither in the chunk nor here"
            )
    if "config" not in meta:
        raise LedgerStoreError("meta has no market config: not a node's ledger")
    config = config_from_json(json.loads(meta["config"]))
    new_gates = []
    for s, g in sorted(offered.items()):
        if not (s <= slots[-1] or s in following or s in local_gates):
            continue  # this node closes that gate itself later
        _check_gate(g, config)
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

    for blk in blocks:
        for r in blk["readings"]:
            if r["slot"] != blk["slot"]:
                raise BlockSyncError(
                    "malformed", f"block {blk['height']} holds a reading of slot {r['slot']}"
                )

    _insert(conn, blocks, new_gates)
    remaining = gaps[1:]
    if not closes:
        remaining.insert(0, Gap(m + 1, gap.last, gap.head, gap.gates_through))
    _write_gaps(conn, remaining)
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


def _gate_rows(g: dict[str, Any]) -> dict[str, Any]:
    """A chunk's gate closure as the rows it stands for (positions, no slot repetition)."""
    return {
        "clearing": {k: v for k, v in g.items() if k not in ("orders", "trades")},
        "orders": [{"position": i, **o} for i, o in enumerate(g["orders"])],
        "trades": [{"position": i, **tr} for i, tr in enumerate(g["trades"])],
    }


def _local_trades(conn: Connection, slot: int) -> list[dict[str, Any]]:
    c = t.trades.c
    rows = _rows(conn, select(t.trades).where(c.slot == slot).order_by(c.position))
    for r in rows:
        del r["slot"]
    return rows


def _local_gate(conn: Connection, slot: int) -> dict[str, Any] | None:
    clearing = _rows(conn, select(t.clearings).where(t.clearings.c.slot == slot))
    if not clearing:
        return None
    c = t.orders.c
    orders = _rows(conn, select(t.orders).where(c.slot == slot).order_by(c.position))
    for r in orders:
        del r["slot"]
    return {"clearing": clearing[0], "orders": orders, "trades": _local_trades(conn, slot)}


def _check_gate(g: dict[str, Any], config: Any) -> None:
    """Signed orders, and the clearing and trades the engine computes from them."""
    s = g["slot"]
    orders = []
    for o in g["orders"]:
        try:
            order = Order.model_validate(
                {
                    "grid": config.grid,
                    "id": o["order_id"],
                    "household": o["household"],
                    "side": o["side"],
                    "slot": s,
                    "quantity_wh": o["quantity_wh"],
                    "price": o["price"],
                    "nonce": o["nonce"],
                    "signature": o["signature"],
                }
            )
        except ValueError as exc:
            raise BlockSyncError("malformed", f"order of slot {s}: {exc}") from None
        if not order.verify(order.household):
            raise BlockSyncError("bad_block", f"order {order.id} of slot {s}: bad signature")
        orders.append(order)
    if len({o.id for o in orders}) != len(orders):
        raise BlockSyncError("malformed", f"slot {s} lists an order id twice")
    c, enriched = clear_book(config, s, orders)
    trades = [tr.to_json() for tr in enriched]
    owner = {o.id: o.household for o in orders}
    given = [Trade(**tr, slot=s).to_json() for tr in g["trades"]]
    expected = {
        "mechanism": str(c.mechanism),
        "price": c.price,
        "volume_wh": c.volume_wh,
        "bid_volume_wh": c.bid_volume_wh,
        "ask_volume_wh": c.ask_volume_wh,
        "order_count": len(orders),
        "participants": len(set(owner.values())),
    }
    if given != trades or any(g[k] != v for k, v in expected.items()):
        raise BlockSyncError("bad_block", f"clearing of slot {s} is not what its orders clear to")


def _put(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(insert(table), rows)


def _insert(
    conn: Connection, blocks: list[dict[str, Any]], gates: list[tuple[dict[str, Any], bool]]
) -> None:
    deltas: dict[tuple[str, str], int] = {}
    for blk in blocks:
        _put(conn, t.blocks, [_block_doc(blk)])
        for pos, tx in enumerate(blk["transactions"]):
            tx_pk = conn.execute(
                insert(t.transactions)
                .values(
                    block_height=blk["height"],
                    position=pos,
                    txid=tx["txid"],
                    kind=tx["kind"],
                    slot=tx["slot"],
                    ref=tx["ref"],
                )
                .returning(t.transactions.c.id)
            ).scalar_one()
            _put(
                conn,
                t.postings,
                [
                    {
                        "transaction_id": tx_pk,
                        "position": i,
                        "account": acc,
                        "asset": asset,
                        "amount": amount,
                    }
                    for i, (acc, asset, amount) in enumerate(tx["postings"])
                ],
            )
            for acc, asset, amount in tx["postings"]:
                deltas[(acc, asset)] = deltas.get((acc, asset), 0) + amount
        _put(conn, t.readings, [{"position": i, **r} for i, r in enumerate(blk["readings"])])
        _put(conn, t.settlements, [{"slot": blk["slot"], **s} for s in blk["settlements"]])
        if "feeder" in blk:
            _put(
                conn,
                t.feeder_checks,
                [{"slot": blk["slot"], "block_height": blk["height"], **blk["feeder"]}],
            )
    for g, have_trades in gates:
        rows = _gate_rows(g)
        _put(conn, t.clearings, [rows["clearing"]])
        _put(conn, t.orders, [{"slot": g["slot"], **o} for o in rows["orders"]])
        if not have_trades:
            _put(conn, t.trades, [{"slot": g["slot"], **tr} for tr in rows["trades"]])
    _apply_deltas(conn, deltas)


def _apply_deltas(conn: Connection, deltas: dict[tuple[str, str], int]) -> None:
    bal = t.balances.c
    existing = {(r.account, r.asset): r.amount for r in conn.execute(select(t.balances))}
    new = []
    for (account, asset), delta in sorted(deltas.items()):
        if (account, asset) in existing:
            conn.execute(
                update(t.balances)
                .where(bal.account == account, bal.asset == asset)
                .values(amount=existing[(account, asset)] + delta)
            )
        else:
            new.append({"account": account, "asset": asset, "amount": delta})
    _put(conn, t.balances, new)
