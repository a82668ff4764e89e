"""What a node writes to its ledger when it installs a Raft snapshot.

The engine jumps to the snapshot; the ledger records the blocks it skipped as a gap
(:mod:`node.ledger.gaps`, filled later by block sync), the households as the snapshot knows
them, the governance records the snapshot carries that the ledger lacks, and the gate closures
the snapshot had made but not yet settled.
"""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from market.events import GateClosed
from market.state import Reputation, State, clear_book, config_at, latest_term
from node.ledger import schema as t
from node.ledger.gaps import Gap, read_gaps, write_gaps
from node.ledger.governance import governance_row, record_hash
from node.ledger.rows import read_meta
from node.ledger.store import (
    LedgerStore,
    LedgerStoreError,
    write_gate,
    write_locked,
    write_trades,
)


def record_snapshot(store: LedgerStore, state: State, applied_index: int) -> None:
    """Record in the ledger that the engine jumped to snapshot ``state`` at ``applied_index``.

    One transaction: the new gap (merged with a gap it touches, so an earlier gap is never
    lost), the applied index, the ``households`` table from the snapshot's members and
    reputation (registrations in the skipped entries never reached this ledger), and the gate
    closures of slots closed but not settled at the snapshot: clearing, book and trades, from
    the snapshot's ``closed_books`` (the trades are hashed into blocks this node will write, so
    those blocks verify even before the gap is filled, and this node can serve them).
    The governance records of the snapshot (``state.governance.records``, in log order) that
    the ledger lacks get their ``governance`` rows, with the log index and the withdrawn count
    unknown (NULL) until block sync brings them; the rows the ledger has must be the snapshot's
    first records, else :class:`LedgerStoreError` (the ledger and the agreed snapshot differ).
    """
    try:
        with write_locked(store), store.engine.begin() as conn:
            gaps = read_gaps(read_meta(conn))
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
            write_gaps(conn, gaps)
            conn.execute(
                update(t.meta)
                .where(t.meta.c.key == "applied_index")
                .values(value=str(applied_index))
            )
            _write_governance(conn, state)
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
    clearing, recomputed = clear_book(config_at(state, slot), slot, orders)
    if recomputed != tuple(trades):
        raise LedgerStoreError(
            f"snapshot is inconsistent: the book of slot {slot} does not clear to its trades"
        )
    write_gate(conn, GateClosed(slot, clearing, orders, recomputed), with_trades=not have_trades)


def _write_households(conn: Connection, state: State) -> None:
    h = t.households.c
    existing = {r.did for r in conn.execute(select(h.did))}
    for did in sorted(state.members):
        rep = state.reputation.get(did, Reputation())
        term = latest_term(state, did)  # as the store keeps it: the latest scheduled terms
        values = {
            "meter_serial": term.meter_serial,
            "role": str(term.role),
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


def _write_governance(conn: Connection, state: State) -> None:
    """``governance`` rows for the snapshot's records beyond those the ledger has."""
    g = t.governance.c
    local = list(conn.execute(select(g.position, g.record_hash).order_by(g.position)))
    records = state.governance.records
    for i, row in enumerate(local):
        if row.position != i + 1 or i >= len(records):
            raise LedgerStoreError(
                f"the ledger's governance record {row.position} is not among the snapshot's "
                f"{len(records)} records"
            )
        if row.record_hash != record_hash(records[i]):
            raise LedgerStoreError(
                f"the ledger's governance record {row.position} differs from the snapshot's"
            )
    rows = [
        governance_row(position, record, None, None)
        for position, record in enumerate(records[len(local) :], start=len(local) + 1)
    ]
    if rows:
        conn.execute(insert(t.governance), rows)
