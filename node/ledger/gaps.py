"""Block-sync gaps: the ledger heights an installed Raft snapshot skipped, kept in ``meta``.

A node that fell behind a compacted Raft log installs an engine snapshot
(:meth:`node.daemon.replica.Replica.install_snapshot`): the engine continues from it at once, but
the ledger lacks the blocks between its head and the snapshot's height, and new blocks are appended
after that gap. :func:`node.ledger.snapshot_record.record_snapshot` writes the gap down, block sync
(:mod:`node.ledger.chunk_export`, :mod:`node.ledger.chunk_import`) fills it.

Meta (docs/ledger.md, "Block sync"); the three lists run in step, one item per gap:

- ``block_sync_needed`` ``"5..9,14..20"``: the missing heights, ascending, inclusive.
- ``block_sync_head`` ``"<hex>,<hex>"``: per gap, the hash of its last block (the installed
  snapshot's head hash): the anchor a chunk must chain into.
- ``block_sync_gates`` ``"12,23"``: per gap, the last slot whose gate the snapshot had closed
  (``-`` if none). Gates closed in the skipped log entries for slots *after* the gap's last
  block (closed but not yet settled at the snapshot) are missing too; the chunk that closes the
  gap brings them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from node.ledger import schema as t
from node.ledger.rows import read_meta
from node.ledger.store import LedgerStore, LedgerStoreError
from node.ledger.verify import SYNC_NEEDED_KEY, format_ranges, parse_ranges

HEAD_KEY = "block_sync_head"
GATES_KEY = "block_sync_gates"
GAP_KEYS = (SYNC_NEEDED_KEY, HEAD_KEY, GATES_KEY)
"""The meta keys that describe the gaps; absent when the ledger is complete."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Gap:
    """One missing height range and what anchors it."""

    first: int
    last: int
    head: str
    """Hash of block ``last`` (the snapshot's head hash); "" if unknown (older ledgers)."""
    gates_through: int | None
    """Last slot whose gate the snapshot had closed."""


def read_gaps(meta: dict[str, str]) -> list[Gap]:
    """The gaps recorded in ``meta``, ascending; :class:`LedgerStoreError` if unreadable."""
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


def write_gaps(conn: Connection, gaps: list[Gap]) -> None:
    """Replace the gap entries in meta by ``gaps`` (none left: the keys are removed)."""
    conn.execute(delete(t.meta).where(t.meta.c.key.in_(GAP_KEYS)))
    if gaps:
        values = (
            format_ranges([(g.first, g.last) for g in gaps]),
            ",".join(g.head for g in gaps),
            ",".join("-" if g.gates_through is None else str(g.gates_through) for g in gaps),
        )
        conn.execute(
            insert(t.meta),
            [{"key": k, "value": v} for k, v in zip(GAP_KEYS, values, strict=True)],
        )


def missing_ranges(store: LedgerStore) -> list[tuple[int, int]]:
    """Gaps (inclusive height ranges) this ledger still needs, from meta; [] when complete."""
    return [(g.first, g.last) for g in read_gaps(store.meta())]


def head_hash_at(store: LedgerStore, height: int) -> str | None:
    """Hash of block ``height``: the ledger's own, or, when that height ends a gap still to be
    filled, the snapshot head the gap must chain into (None if neither is known)."""
    with store.engine.connect() as conn:
        own = conn.execute(select(t.blocks.c.hash).where(t.blocks.c.height == height)).scalar()
        if own is not None:
            return str(own)
        for gap in read_gaps(read_meta(conn)):
            if gap.last == height and gap.head:
                return gap.head
    return None
