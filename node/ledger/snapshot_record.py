"""What a node writes to its ledger when it installs a Raft snapshot.

The engine jumps to the snapshot; the ledger records the blocks it skipped as a gap
(:mod:`node.ledger.gaps`, filled later by block sync), the households as the snapshot knows
them, and the gate closures the snapshot had made but not yet settled.
"""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from market.events import GateClosed
from market.state import Reputation, State, clear_book
from node.ledger import schema as t
from node.ledger.gaps import Gap, read_gaps, write_gaps
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
