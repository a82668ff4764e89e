"""``microgrid archive``: copy a node's settled blocks into an archive database (PostgreSQL).

The archive holds the same tables as a node's ledger (``node/ledger/schema.py``), so the
dashboard and ``microgrid ledger verify`` work on it unchanged. Copying is idempotent and
incremental: each run copies only blocks above the archive's height, in chunks of blocks, each
chunk in one target transaction together with everything the chunk's slots produced
(transactions and postings with their original ids, clearings, orders, trades, readings,
settlements, true-ups, feeder checks) and the balance deltas of its postings, and with the
source's governance records the archive lacks (they decide the rules each block is verified
under). A crash leaves whole chunks; a re-run resumes after the last one. ``households``
(cumulative reputation, not hashed) is refreshed from the source at the end of a run.

Safety: an archive is bound to one microgrid by the genesis hash in ``meta``; a source of another
grid is refused, and so is a source whose block at the archive's height has another hash (a
diverged or rewritten ledger). After copying, the archive is verified with
:func:`node.ledger.verify.verify_ledger`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Table, and_, delete, func, select, update
from sqlalchemy.engine import Connection

from node.ledger import schema as t
from node.ledger.queries import block_columns, has_governance_table, has_true_up_table
from node.ledger.rows import (
    BalanceOverflowError,
    apply_balance_deltas,
    fetch_rows,
    insert_rows,
    read_meta,
)
from node.ledger.store import make_engine
from node.ledger.verify import verify_ledger

CHUNK_BLOCKS = 200
COPIED_META = ("schema_version", "grid", "genesis_hash", "config", "schedule")
"""Meta entries an archive takes from its source; ``schedule`` (the grid's slot timing, which
the dashboard reads) is also added later to an archive bound before its source recorded it."""


class ArchiveError(RuntimeError):
    """The archive cannot be written as asked (other grid, diverged, fails verification)."""


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    """What one archive run did."""

    copied_blocks: int
    height: int
    head_hash: str | None
    verified: bool | None
    seconds: float

    def summary(self) -> str:
        """One line for the CLI."""
        ver = {True: "verified", False: "NOT verified", None: "not checked"}[self.verified]
        head = (self.head_hash or "-")[:16]
        return (
            f"archived {self.copied_blocks} new blocks in {self.seconds:.2f} s; "
            f"archive height {self.height}, head {head}, {ver}"
        )


def _bind(source: Connection, target: Connection) -> tuple[int, str | None]:
    """Check (or write) the target's grid binding; return its height and head hash."""
    src_meta = read_meta(source)
    if "genesis_hash" not in src_meta:
        raise ArchiveError("source has no genesis_hash in meta: not a microgrid ledger")
    dst_meta = read_meta(target)
    if not dst_meta:
        insert_rows(
            target, t.meta, [{"key": k, "value": src_meta[k]} for k in COPIED_META if k in src_meta]
        )
        insert_rows(target, t.meta, [{"key": "archive_height", "value": "0"}])
    elif dst_meta.get("genesis_hash") != src_meta["genesis_hash"]:
        raise ArchiveError(
            f"target archives grid {dst_meta.get('grid')!r} (genesis "
            f"{dst_meta.get('genesis_hash', '')[:16]}…), source is grid {src_meta.get('grid')!r} "
            f"(genesis {src_meta['genesis_hash'][:16]}…): refusing to mix ledgers"
        )
    elif "schedule" in src_meta and dst_meta.get("schedule") != src_meta["schedule"]:
        if "schedule" in dst_meta:
            raise ArchiveError(
                f"target records the schedule {dst_meta['schedule']}, source "
                f"{src_meta['schedule']}: refusing to mix ledgers"
            )
        insert_rows(target, t.meta, [{"key": "schedule", "value": src_meta["schedule"]}])
    head = target.execute(
        select(t.blocks.c.height, t.blocks.c.hash).order_by(t.blocks.c.height.desc()).limit(1)
    ).first()
    if head is None:
        return 0, None
    src = source.execute(select(t.blocks.c.hash).where(t.blocks.c.height == head.height)).scalar()
    if src != head.hash:
        raise ArchiveError(
            f"source block {head.height} is {str(src)[:16]}… but the archive has "
            f"{head.hash[:16]}…: the ledgers diverged"
        )
    return int(head.height), head.hash


def _copy_chunk(source: Connection, target: Connection, first: int, last: int) -> int:
    """Copy blocks ``first..last`` (heights) and what their slots produced; returns count."""
    b, tx, p = t.blocks.c, t.transactions.c, t.postings.c
    blocks = fetch_rows(
        source,
        select(*block_columns(source)).where(b.height.between(first, last)).order_by(b.height),
    )
    if not blocks:
        return 0
    _copy_governance(source, target)
    prev_slot = source.execute(select(b.slot).where(b.height == first - 1)).scalar()
    lo = -1 if prev_slot is None else int(prev_slot)
    hi = int(blocks[-1]["slot"])

    def by_slot(table: Table, *order: Any) -> list[dict[str, Any]]:
        # an older node's ledger, not yet opened by this version, lacks the added columns
        c = table.c
        columns = t.present_columns(source, table)
        return fetch_rows(
            source, select(*columns).where(and_(c.slot > lo, c.slot <= hi)).order_by(*order)
        )

    txs = fetch_rows(
        source,
        select(t.transactions).where(tx.block_height.between(first, last)).order_by(tx.id),
    )
    postings = fetch_rows(
        source,
        select(t.postings)
        .join(t.transactions, p.transaction_id == tx.id)
        .where(tx.block_height.between(first, last))
        .order_by(p.id),
    )
    insert_rows(target, t.blocks, blocks)
    insert_rows(target, t.transactions, txs)
    insert_rows(target, t.postings, postings)
    insert_rows(target, t.clearings, by_slot(t.clearings, t.clearings.c.slot))
    insert_rows(target, t.orders, by_slot(t.orders, t.orders.c.slot, t.orders.c.position))
    insert_rows(target, t.trades, by_slot(t.trades, t.trades.c.slot, t.trades.c.position))
    insert_rows(target, t.readings, by_slot(t.readings, t.readings.c.slot, t.readings.c.position))
    insert_rows(target, t.settlements, by_slot(t.settlements, t.settlements.c.slot))
    fc = t.feeder_checks.c
    insert_rows(
        target,
        t.feeder_checks,
        fetch_rows(
            source,
            select(t.feeder_checks).where(fc.block_height.between(first, last)).order_by(fc.slot),
        ),
    )
    if has_true_up_table(source):  # a ledger file of an older node has none to copy
        tu = t.true_ups.c
        insert_rows(
            target,
            t.true_ups,
            fetch_rows(
                source,
                select(t.true_ups)
                .where(tu.block_height.between(first, last))
                .order_by(tu.slot, tu.household),
            ),
        )
    deltas: dict[tuple[str, str], int] = {}
    for row in postings:
        key = (row["account"], row["asset"])
        deltas[key] = deltas.get(key, 0) + int(row["amount"])
    try:
        apply_balance_deltas(target, deltas)
    except BalanceOverflowError as exc:
        raise ArchiveError(f"blocks {first}..{last}: {exc}") from None
    target.execute(update(t.meta).where(t.meta.c.key == "archive_height").values(value=str(last)))
    return len(blocks)


def _copy_governance(source: Connection, target: Connection) -> None:
    """The source's ``governance`` rows after the archive's last one (records are only ever
    appended, in log order); a log index or withdrawn count the archive lacks is taken too."""
    if not has_governance_table(source):  # an older node's ledger: no record was accepted
        return
    g = t.governance.c
    have = {r.position: r for r in target.execute(select(g.position, g.log_index, g.withdrawn))}
    rows = fetch_rows(source, select(t.governance).order_by(g.position))
    insert_rows(target, t.governance, [r for r in rows if r["position"] not in have])
    for r in rows:
        mine = have.get(r["position"])
        known = (r["log_index"], r["withdrawn"])
        if mine is not None and (mine.log_index, mine.withdrawn) != known:
            target.execute(
                update(t.governance)
                .where(g.position == r["position"])
                .values(log_index=r["log_index"], withdrawn=r["withdrawn"])
            )


def _refresh_households(source: Connection, target: Connection) -> None:
    rows = fetch_rows(source, select(t.households).order_by(t.households.c.did))
    target.execute(delete(t.households))
    insert_rows(target, t.households, rows)


def archive_engines(
    source: Engine,
    target: Engine,
    *,
    chunk_blocks: int = CHUNK_BLOCKS,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Copy every settled block the target lacks; returns the number of blocks copied."""
    t.ensure_schema(target)  # includes the per-household settlements index and added columns
    with source.connect() as src, target.begin() as dst:
        height, _ = _bind(src, dst)
    copied = 0
    while True:
        with source.connect() as src:
            src_height = src.execute(select(func.max(t.blocks.c.height))).scalar() or 0
            if src_height <= height:
                break
            last = min(height + chunk_blocks, int(src_height))
            with target.begin() as dst:
                # re-check under the chunk's transaction: another archiver may have moved on
                now, _ = _bind(src, dst)
                if now != height:
                    height = now
                    continue
                n = _copy_chunk(src, dst, height + 1, last)
        copied += n
        height = last
        if progress is not None:
            progress(height)
    with source.connect() as src, target.begin() as dst:
        _refresh_households(src, dst)
    return copied


def archive(
    source_url: str, target_url: str, *, verify: bool = True, chunk_blocks: int = CHUNK_BLOCKS
) -> ArchiveResult:
    """Copy new settled blocks from ``source_url`` to ``target_url`` and verify the archive."""
    start = time.monotonic()
    source = make_engine(source_url, read_only=True)
    target = make_engine(target_url)
    try:
        copied = archive_engines(source, target, chunk_blocks=chunk_blocks)
        with target.connect() as conn:
            head = conn.execute(
                select(t.blocks.c.height, t.blocks.c.hash)
                .order_by(t.blocks.c.height.desc())
                .limit(1)
            ).first()
    finally:
        source.dispose()
        target.dispose()
    verified = None
    if verify:
        report = verify_ledger(target_url)
        if not report.ok:
            raise ArchiveError(f"the archive does not verify: {report.error}")
        verified = True
    return ArchiveResult(
        copied_blocks=copied,
        height=int(head.height) if head else 0,
        head_hash=head.hash if head else None,
        verified=verified,
        seconds=time.monotonic() - start,
    )


def follow(
    source_url: str,
    target_url: str,
    interval: float = 5.0,
    *,
    verify: bool = True,
    rounds: int | None = None,
    out: Callable[[str], None] | None = None,
) -> None:
    """Archive, then keep polling every ``interval`` seconds (``rounds`` bounds it for tests).

    A round that copied blocks verifies the archive (when ``verify``); a failed verification or
    a refused source stops the loop with :class:`ArchiveError`.
    """
    n = 0
    while rounds is None or n < rounds:
        result = archive(source_url, target_url, verify=False)
        if result.copied_blocks:
            if verify:
                report = verify_ledger(target_url)
                if not report.ok:
                    raise ArchiveError(f"the archive does not verify: {report.error}")
            line = result.summary().replace("not checked", "verified" if verify else "not checked")
            if out is None:
                print(line, flush=True)
            else:
                out(line)
        n += 1
        if rounds is None or n < rounds:
            time.sleep(interval)
