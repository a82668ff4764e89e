"""A household's statement over a range of settled slots: what it traded locally and with the
grid, its bill, and what it saved against trading with the grid alone.

Read-only over the ledger tables (:mod:`node.ledger.schema`): the household's postings give the
money and energy of its trades, imbalances and true-ups (so the bill reconciles with its
balance exactly); its ``settlements`` and ``true_ups`` rows give the metered energy the
grid-only comparison prices. Money stays integer minor units, energy integer Wh; slots stay
slot numbers (the command line turns dates into slots).

**Grid only** is what the same metered energy would have cost under the same rules without the
local market, computed the way the engine settles a household without contracts: per measured
slot its metered net export (export − import) sold at the feed-in tariff or its net import
bought at the retail price plus the grid fee (:func:`market.accounting.money_for`, half up), an
unmeasured slot nothing, and each true-up exactly as
:func:`market.settlement.true_up_transaction` settles it (the gap's import at retail, export at
feed-in, rounded down, with its fee per unmeasured slot, which trading does not change) plus the
grid fee on its import. Each slot is priced under the rules in force for it (the operator's
``change_rules`` records in the ledger's governance history). So a household that never
traded saves exactly zero, and its savings are what the local market earned it. A true-up
belongs to the slot whose reading closed the gap (where its money posts), even if the gap began
before the range.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass, field, fields
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection, Engine

from market.accounting import ENERGY, MONEY, household_account, money_for
from market.settlement import Gap, Tariffs, true_up_transaction
from market.state import MarketConfig
from node.ledger import schema as t
from node.ledger.governance import rules_periods
from node.ledger.queries import (
    has_true_up_table,
    load_block_refs,
    load_governance_records,
    slot_range,
    sum_int,
)
from node.ledger.rows import read_meta


class StatementError(ValueError):
    """The statement cannot be made: no such household, no settled slot in the range, or the
    ledger lacks its market rules."""


@dataclass(frozen=True, slots=True)
class SlotStatement:
    """One settled slot of a household's statement (money in minor units, energy in Wh).

    Signs: ``*_paid`` and ``*_received`` are non-negative; ``true_up_money`` and
    ``other_money`` are what the household received (negative: it paid); ``net_bill`` and
    ``grid_only_bill`` are what it paid (negative: it was paid).
    """

    slot: int
    measured: bool = False
    """Whether the household's meter measured the slot (False also for a slot before it joined:
    then every figure is zero)."""
    metered_import_wh: int = 0
    metered_export_wh: int = 0
    local_bought_wh: int = 0
    local_paid: int = 0
    """What it paid for the energy it bought (the buyer's price, market surplus included)."""
    local_sold_wh: int = 0
    local_received: int = 0
    grid_import_wh: int = 0
    """Energy bought from the grid: negative imbalances plus true-up import."""
    grid_import_paid: int = 0
    """What it paid the grid for negative imbalances (true-up money is in ``true_up_money``)."""
    grid_export_wh: int = 0
    """Energy sold to the grid: positive imbalances plus true-up export."""
    grid_export_received: int = 0
    true_ups: int = 0
    true_up_slots: int = 0
    """Unmeasured slots the true-up covered (this slot and the ones back to the last reading)."""
    true_up_import_wh: int = 0
    true_up_export_wh: int = 0
    true_up_money: int = 0
    local_fees: int = 0
    """Grid fees paid on energy bought locally (``local_fee`` transactions)."""
    grid_fees: int = 0
    """Grid fees paid on energy imported from the grid (``grid_fee`` transactions)."""
    other_money: int = 0
    """Money of any other kind of transaction (a key rotation's carried-over balance)."""
    grid_only_bill: int = 0

    @property
    def unmeasured(self) -> bool:
        """Whether the slot was settled without a usable reading of the household."""
        return not self.measured

    @property
    def money_change(self) -> int:
        """The change of the household's money balance from this slot's block."""
        return (
            self.local_received
            - self.local_paid
            + self.grid_export_received
            - self.grid_import_paid
            + self.true_up_money
            - self.local_fees
            - self.grid_fees
            + self.other_money
        )

    @property
    def net_bill(self) -> int:
        """What the household paid, net, for this slot (negative: it was paid)."""
        return -self.money_change

    @property
    def savings(self) -> int:
        """Grid-only bill minus the actual net bill."""
        return self.grid_only_bill - self.net_bill


SUMMED_FIELDS = tuple(f.name for f in fields(SlotStatement) if f.name not in ("slot", "measured"))
"""The :class:`SlotStatement` fields a :class:`Statement` sums over its slots."""


@dataclass(frozen=True, slots=True)
class Statement:
    """A household's statement over the settled slots in ``first_slot .. last_slot``."""

    household: str
    first_slot: int
    last_slot: int
    feed_in_tariff: int
    """The flat tariffs and grid fees in force at the first settled slot."""
    retail_price: int
    local_fee: int
    grid_fee: int
    rules_changed_at: tuple[int, ...]
    """Slots in the range from which the operator changed the rules (each slot is priced under
    its own)."""
    slots: tuple[SlotStatement, ...]
    """One per settled slot in the range, oldest first."""
    totals: dict[str, int] = field(default_factory=dict)
    """Each of :data:`SUMMED_FIELDS` summed over :attr:`slots`."""

    def total(self, name: str) -> int:
        """The sum of one :data:`SUMMED_FIELDS` field over the slots."""
        return self.totals[name]

    @property
    def settled_slots(self) -> int:
        """Settled slots in the range."""
        return len(self.slots)

    @property
    def measured_slots(self) -> int:
        """Settled slots the household's meter measured."""
        return sum(1 for s in self.slots if s.measured)

    @property
    def unmeasured_slots(self) -> int:
        """Settled slots without a usable reading of the household."""
        return self.settled_slots - self.measured_slots

    @property
    def money_change(self) -> int:
        """The change of the household's money balance over the range's blocks."""
        return sum(s.money_change for s in self.slots)

    @property
    def net_bill(self) -> int:
        """What the household paid, net, over the range (negative: it was paid)."""
        return -self.money_change

    @property
    def grid_only_bill(self) -> int:
        """What the same metered energy would have cost trading with the grid alone."""
        return self.totals["grid_only_bill"]

    @property
    def savings(self) -> int:
        """Grid-only bill minus the actual net bill."""
        return self.grid_only_bill - self.net_bill

    def to_json(self, per_slot: bool = False) -> dict[str, Any]:
        """The statement as a JSON document (money in minor units, energy in Wh): the range,
        the tariffs and fees at its first slot, the slots from which rules changed, the totals,
        the bill, the grid-only bill and the savings; with ``per_slot`` one row per settled
        slot as well."""
        doc: dict[str, Any] = {
            "household": self.household,
            "first_slot": self.first_slot,
            "last_slot": self.last_slot,
            "settled_slots": self.settled_slots,
            "measured_slots": self.measured_slots,
            "tariffs": {"feed_in_tariff": self.feed_in_tariff, "retail_price": self.retail_price,
                        "local_fee": self.local_fee, "grid_fee": self.grid_fee},
            "rules_changed_at": list(self.rules_changed_at),
            "totals": dict(self.totals),
            "money_change": self.money_change,
            "net_bill": self.net_bill,
            "grid_only_bill": self.grid_only_bill,
            "savings": self.savings,
        }  # fmt: skip
        if per_slot:
            doc["slots"] = [
                {"slot": s.slot, "measured": s.measured,
                 **{name: getattr(s, name) for name in SUMMED_FIELDS},
                 "net_bill": s.net_bill, "savings": s.savings}
                for s in self.slots
            ]  # fmt: skip
        return doc


def grid_only_bill(import_wh: int, export_wh: int, tariffs: Tariffs) -> int:
    """What a measured slot's metered flow costs without contracts, as the engine settles it:
    the net export sold at the feed-in tariff, or the net import bought at retail and its grid
    fee."""
    net = export_wh - import_wh
    if net > 0:
        return -money_for(net, tariffs.feed_in)
    return money_for(-net, tariffs.retail) + money_for(-net, tariffs.grid_fee)


class RulesInForce:
    """The rules each slot was settled under: the genesis rules and the ledger's accepted
    ``change_rules`` records."""

    def __init__(self, conn: Connection, base: MarketConfig) -> None:
        try:
            self.periods = rules_periods(base, load_governance_records(conn))
        except ValueError as exc:
            raise StatementError(f"the ledger's rules history is unreadable: {exc}") from None
        self._starts = [slot for slot, _ in self.periods]

    def config(self, slot: int) -> MarketConfig:
        """The rules in force for ``slot``."""
        return self.periods[bisect_right(self._starts, slot) - 1][1]

    def tariffs(self, slot: int) -> Tariffs:
        """The tariffs and grid fees of ``slot``."""
        return self.config(slot).tariffs_at(slot)


def market_config(conn: Connection) -> MarketConfig:
    """The market rules the ledger records in meta ``config``."""
    value = read_meta(conn).get("config")
    if value is None:
        raise StatementError("the ledger records no market rules (meta config): no genesis")
    try:
        return MarketConfig.from_json(json.loads(value))
    except ValueError as exc:
        raise StatementError(f"the ledger's market rules are unreadable: {exc}") from None


def household_known(conn: Connection, did: str) -> bool:
    """Whether ``did`` is a member of the ledger's grid (or has settlements in it)."""
    h, s = t.households.c, t.settlements.c
    if conn.execute(select(h.did).where(h.did == did)).first() is not None:
        return True
    return conn.execute(select(s.slot).where(s.household == did).limit(1)).first() is not None


def household_statement(
    conn_or_engine: Connection | Engine, did: str, first_slot: int, last_slot: int
) -> Statement:
    """The statement of household ``did`` over the settled slots ``first_slot .. last_slot``
    (inclusive). Raises :class:`StatementError` for an unknown household, an empty range or no
    settled slot in it."""
    if isinstance(conn_or_engine, Engine):
        with conn_or_engine.connect() as conn:
            return household_statement(conn, did, first_slot, last_slot)
    conn = conn_or_engine
    if first_slot > last_slot:
        raise StatementError(f"empty range: slot {first_slot} is after slot {last_slot}")
    config = market_config(conn)
    rules = RulesInForce(conn, config)
    if not household_known(conn, did):
        raise StatementError(f"no household {did} in this ledger")
    blocks = load_block_refs(conn, first_slot - 1, last_slot)
    if not blocks:
        raise StatementError(f"no settled slot in {first_slot}..{last_slot}")
    rows: dict[int, dict[str, Any]] = {slot: {} for slot in blocks}
    _add_postings(conn, did, first_slot, last_slot, rows)
    _add_settlements(conn, did, first_slot, last_slot, rows, rules)
    _add_true_ups(conn, did, first_slot, last_slot, rows, rules)
    slots = tuple(SlotStatement(slot=slot, **rows[slot]) for slot in sorted(rows))
    totals = {name: sum(getattr(s, name) for s in slots) for name in SUMMED_FIELDS}
    opening = rules.config(slots[0].slot)
    return Statement(
        household=did,
        first_slot=first_slot,
        last_slot=last_slot,
        feed_in_tariff=opening.feed_in_tariff,
        retail_price=opening.retail_price,
        local_fee=opening.local_fee,
        grid_fee=opening.grid_fee,
        rules_changed_at=tuple(
            slot for slot, _ in rules.periods if slots[0].slot < slot <= slots[-1].slot
        ),
        slots=slots,
        totals=totals,
    )


def _add(row: dict[str, Any], name: str, amount: int) -> None:
    row[name] = row.get(name, 0) + amount


_POSTING_FIELDS: dict[tuple[str, str, bool], str] = {
    ("trade", ENERGY, True): "local_bought_wh",
    ("trade", ENERGY, False): "local_sold_wh",
    ("trade", MONEY, True): "local_received",
    ("trade", MONEY, False): "local_paid",
    ("imbalance", ENERGY, True): "grid_import_wh",
    ("imbalance", ENERGY, False): "grid_export_wh",
    ("imbalance", MONEY, True): "grid_export_received",
    ("imbalance", MONEY, False): "grid_import_paid",
    ("true_up", ENERGY, True): "grid_import_wh",
    ("true_up", ENERGY, False): "grid_export_wh",
    ("local_fee", MONEY, False): "local_fees",
    ("grid_fee", MONEY, False): "grid_fees",
}
"""Where a household's posting goes, by (transaction kind, asset, credit?); amounts are added
as magnitudes. True-up money is netted in ``true_up_money``, anything else in ``other_money``."""


def _add_postings(
    conn: Connection, did: str, first: int, last: int, rows: dict[int, dict[str, Any]]
) -> None:
    tx, p = t.transactions.c, t.postings.c
    credit = case((p.amount > 0, 1), else_=0).label("credit")
    q = (
        select(tx.slot, tx.kind, p.asset, credit, func.sum(p.amount).label("amount"))
        .select_from(t.postings.join(t.transactions, p.transaction_id == tx.id))
        .where(p.account == household_account(did))
        .group_by(tx.slot, tx.kind, p.asset, credit)
    )
    for r in conn.execute(slot_range(q, tx.slot, first - 1, last)):
        row = rows.get(int(r.slot))
        if row is None:  # pragma: no cover - a transaction is written with its block
            continue
        amount = sum_int(r.amount)
        name = _POSTING_FIELDS.get((r.kind, r.asset, bool(r.credit)))
        if name is not None:
            _add(row, name, abs(amount))
        elif r.asset == MONEY:
            _add(row, "true_up_money" if r.kind == "true_up" else "other_money", amount)


def _add_settlements(
    conn: Connection,
    did: str,
    first: int,
    last: int,
    rows: dict[int, dict[str, Any]],
    rules: RulesInForce,
) -> None:
    s = t.settlements.c
    q = select(s.slot, s.measured, s.import_wh, s.export_wh).where(s.household == did)
    for r in conn.execute(slot_range(q, s.slot, first - 1, last)):
        row = rows.get(int(r.slot))
        if row is None:  # pragma: no cover - settlements are written with their block
            continue
        row["measured"] = bool(r.measured)
        if r.measured:
            imp, exp = int(r.import_wh), int(r.export_wh)
            row["metered_import_wh"] = imp
            row["metered_export_wh"] = exp
            _add(row, "grid_only_bill", grid_only_bill(imp, exp, rules.tariffs(int(r.slot))))


def _add_true_ups(
    conn: Connection,
    did: str,
    first: int,
    last: int,
    rows: dict[int, dict[str, Any]],
    rules: RulesInForce,
) -> None:
    if not has_true_up_table(conn):
        return
    c = t.true_ups.c
    q = select(c.slot, c.slots, c.import_wh, c.export_wh).where(c.household == did)
    for r in conn.execute(slot_range(q, c.slot, first - 1, last)):
        row = rows.get(int(r.slot))
        if row is None:  # pragma: no cover - a true-up is written with its block
            continue
        gap = Gap(slots=int(r.slots), import_wh=int(r.import_wh), export_wh=int(r.export_wh))
        _add(row, "true_ups", 1)
        _add(row, "true_up_slots", gap.slots)
        _add(row, "true_up_import_wh", gap.import_wh)
        _add(row, "true_up_export_wh", gap.export_wh)
        tariffs = rules.tariffs(int(r.slot))
        tx = true_up_transaction(int(r.slot), did, gap, tariffs)
        received = sum(
            p.amount
            for p in tx.postings
            if p.account == household_account(did) and p.asset == MONEY
        )
        _add(row, "grid_only_bill", money_for(gap.import_wh, tariffs.grid_fee) - received)
