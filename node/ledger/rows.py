"""Small helpers every ledger reader and writer shares: meta, rows as dicts, inserts, balances.

One copy of each, used by the ledger store, block sync (export, import, snapshot recording) and
the archive (``dashboard/archive.py``), so the ledger is read and written the same way
everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.engine import Connection

from market.bounds import STORE_INT
from market.encoding import canonical_json, loads_untrusted
from node.ledger import schema as t


class BalanceOverflowError(ValueError):
    """A balance would leave the range of a 64-bit column; nothing of it was written."""


def steps_column(steps: Iterable[Iterable[int]] | None) -> str | None:
    """The ``orders.steps`` value of an order's steps: canonical JSON ``[[q,p],...]``, NULL
    (None) for a plain order (no steps)."""
    items = [list(step) for step in steps or ()]
    return canonical_json(items).decode() if items else None


def steps_from_column(value: str | None) -> list[list[int]] | None:
    """The steps an ``orders.steps`` value holds (None for NULL). Raises ``ValueError`` for a
    value that is not a list of ``[int, int]`` pairs (a hand-edited ledger)."""
    if value is None:
        return None
    steps = loads_untrusted(value, allow_floats=False, max_int_digits=20)
    if not (
        type(steps) is list
        and steps
        and all(type(s) is list and len(s) == 2 and all(type(n) is int for n in s) for s in steps)
    ):
        raise ValueError(f"orders.steps {value[:60]!r} is not a list of [quantity_wh, price]")
    return steps


def read_meta(conn: Connection) -> dict[str, str]:
    """All ``meta`` entries, key to value."""
    return {r.key: r.value for r in conn.execute(select(t.meta.c.key, t.meta.c.value))}


def fetch_rows(conn: Connection, query: Any) -> list[dict[str, Any]]:
    """The rows of ``query`` as plain dicts (column name to value)."""
    return [dict(r._mapping) for r in conn.execute(query)]


def insert_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` into ``table`` in one statement; nothing for no rows."""
    if rows:
        conn.execute(insert(table), rows)


def insert_transaction(
    conn: Connection,
    block_height: int,
    position: int,
    header: tuple[str, str, int, str],
    postings: Iterable[tuple[str, str, int]],
    deltas: dict[tuple[str, str], int],
) -> None:
    """Insert one transaction (``header``: txid, kind, slot, ref) of block ``block_height``
    and its postings ``(account, asset, amount)``, adding each posting to ``deltas`` (the
    balance moves :func:`apply_balance_deltas` applies once per block)."""
    txid, kind, slot, ref = header
    tx_pk = conn.execute(
        insert(t.transactions)
        .values(block_height=block_height, position=position, txid=txid, kind=kind, slot=slot,
                ref=ref)
        .returning(t.transactions.c.id)
    ).scalar_one()  # fmt: skip
    rows = []
    for i, (account, asset, amount) in enumerate(postings):
        rows.append({"transaction_id": tx_pk, "position": i, "account": account,
                     "asset": asset, "amount": amount})  # fmt: skip
        deltas[(account, asset)] = deltas.get((account, asset), 0) + amount
    insert_rows(conn, t.postings, rows)


def insert_transactions(
    conn: Connection,
    block_height: int,
    transactions: Sequence[tuple[tuple[str, str, int, str], Iterable[tuple[str, str, int]]]],
    deltas: dict[tuple[str, str], int],
) -> None:
    """Insert the transactions of block ``block_height`` at positions 0, 1, ... (each a
    ``header``: txid, kind, slot, ref, and its postings ``(account, asset, amount)``), as
    :func:`insert_transaction` does one at a time, in three statements whatever their number:
    a settlement of 50 households is hundreds of transactions, and a statement per row was
    most of a node's CPU at the slot's deadline, when every node writes the same block."""
    if not transactions:
        return
    insert_rows(conn, t.transactions, [
        {"block_height": block_height, "position": pos, "txid": txid, "kind": kind,
         "slot": slot, "ref": ref}
        for pos, ((txid, kind, slot, ref), _) in enumerate(transactions)])  # fmt: skip
    tx = t.transactions.c
    query = select(tx.position, tx.id).where(tx.block_height == block_height)
    ids: dict[int, int] = {pos: pk for pos, pk in conn.execute(query)}
    rows = []
    for pos, (_, postings) in enumerate(transactions):
        for i, (account, asset, amount) in enumerate(postings):
            rows.append({"transaction_id": ids[pos], "position": i, "account": account,
                         "asset": asset, "amount": amount})  # fmt: skip
            deltas[(account, asset)] = deltas.get((account, asset), 0) + amount
    insert_rows(conn, t.postings, rows)


def apply_balance_deltas(conn: Connection, deltas: Mapping[tuple[str, str], int]) -> None:
    """Add ``deltas`` (``(account, asset)`` to an amount) to the ``balances`` table.

    Raises :class:`BalanceOverflowError`, before writing anything, if a balance would not fit
    a 64-bit column.
    """
    if not deltas:
        return
    bal = t.balances.c
    existing = {
        (r.account, r.asset): int(r.amount)
        for r in conn.execute(select(bal.account, bal.asset, bal.amount))
    }
    changed, new = [], []
    for (account, asset), delta in sorted(deltas.items()):
        amount = existing.get((account, asset), 0) + delta
        if not -STORE_INT <= amount <= STORE_INT:
            raise BalanceOverflowError(
                f"balance of {account} in {asset} would be {amount}, beyond a 64-bit column"
            )
        row = {"account": account, "asset": asset, "amount": amount}
        (changed if (account, asset) in existing else new).append(row)
    if changed:  # one executemany
        conn.execute(
            update(t.balances)
            .where(bal.account == bindparam("b_account"), bal.asset == bindparam("b_asset"))
            .values(amount=bindparam("b_amount")),
            [{"b_account": r["account"], "b_asset": r["asset"], "b_amount": r["amount"]}
             for r in changed],
        )  # fmt: skip
    insert_rows(conn, t.balances, new)
