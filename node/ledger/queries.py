"""Read queries over the ledger tables, shared by the node's HTTP API and the dashboard.

Every function takes an open SQLAlchemy :class:`~sqlalchemy.engine.Connection` on a ledger
database (SQLite or PostgreSQL, the tables of :mod:`node.ledger.schema`) and returns plain
Python values. Nothing here knows about wall time, labels or display: slots stay slot numbers,
money stays integer minor units, energy integer Wh.

Slot ranges are half-open on the left: ``(after, upto]``, None for unbounded on that side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, case, func, inspect, select
from sqlalchemy.engine import Connection

from market.config import MarketConfig
from node.ledger import schema as t
from node.ledger.governance import decode_record, own_fields, rules_periods


@dataclass(slots=True)
class SlotRow:
    """Aggregates of one slot: its clearing, its settlement and its block."""

    slot: int
    mechanism: str = ""
    price: int | None = None
    volume_wh: int = 0
    bid_volume_wh: int = 0
    ask_volume_wh: int = 0
    order_count: int = 0
    participants: int = 0
    buyer_pay_wh_price: int = 0
    """Σ quantity × buyer price over the slot's trades (Wh·cent/kWh; /1000 gives cents)."""
    seller_get_wh_price: int = 0
    """Σ quantity × seller price over the slot's trades."""
    settled: bool = False
    import_wh: int = 0
    export_wh: int = 0
    grid_import_wh: int = 0
    """Energy the households bought from the grid: Σ of negative imbalances plus the import of
    the slot's true-ups (counter movement over earlier unmeasured slots, settled here)."""
    grid_export_wh: int = 0
    """Energy the households sold to the grid: Σ of positive imbalances plus the export of the
    slot's true-ups."""
    households: int = 0
    unmeasured: int = 0
    true_ups: int = 0
    """Households whose reading in this slot trued up earlier unmeasured slots."""
    true_up_import_wh: int = 0
    """Import those true-ups settled (included in ``grid_import_wh``)."""
    true_up_export_wh: int = 0
    """Export those true-ups settled (included in ``grid_export_wh``)."""
    height: int | None = None
    block_hash: str | None = None
    feeder_status: str | None = None
    """The slot's feeder check (``feeder_checks.status``: ok, mismatch, no_feeder_reading,
    households_unmeasured); None when the ledger has no check for it (a grid without a feeder
    meter, or a ledger older than the table)."""
    feeder_net_wh: int | None = None
    """The feeder meter's net import over the slot (None unless the check is ok/mismatch)."""
    feeder_households_net_wh: int | None = None
    """Σ of the measured households' net import the check compared it with."""
    feeder_difference_wh: int | None = None
    """feeder net − households' net (positive: the feeder saw more import than the meters)."""
    feeder_allowed_loss_wh: int | None = None
    """Upper bound of the difference the check allowed (tolerance + line losses)."""

    @property
    def unmatched_bid_wh(self) -> int:
        """Bid volume that found no seller."""
        return self.bid_volume_wh - self.volume_wh

    @property
    def unmatched_ask_wh(self) -> int:
        """Ask volume that found no buyer."""
        return self.ask_volume_wh - self.volume_wh


def sum_int(value: Any) -> int:
    """An aggregate as int: PostgreSQL SUM of BIGINT is NUMERIC (Decimal); SQLite gives int or
    None (no rows: 0)."""
    return int(value) if value is not None else 0


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def slot_range(q: Select[Any], slot: Any, after: int | None, upto: int | None) -> Select[Any]:
    """``q`` restricted to ``after < slot <= upto`` (None: unbounded on that side); ``slot`` is
    the column to filter on."""
    if after is not None:
        q = q.where(slot > after)
    if upto is not None:
        q = q.where(slot <= upto)
    return q


def load_clearings(conn: Connection, after: int | None, upto: int | None = None) -> list[SlotRow]:
    """Clearing rows (with trade money sums) of slots in ``(after, upto]``, oldest first."""
    c = t.clearings.c
    q = select(t.clearings).order_by(c.slot)
    tr = t.trades.c
    tq = select(
        tr.slot,
        func.sum(tr.quantity_wh * tr.price).label("pay"),
        func.sum(tr.quantity_wh * tr.sell_price).label("get"),
    ).group_by(tr.slot)
    q = slot_range(q, c.slot, after, upto)
    tq = slot_range(tq, tr.slot, after, upto)
    money = {int(r.slot): (sum_int(r.pay), sum_int(r.get)) for r in conn.execute(tq)}
    rows = []
    for r in conn.execute(q):
        pay, get = money.get(int(r.slot), (0, 0))
        rows.append(
            SlotRow(
                slot=int(r.slot),
                mechanism=r.mechanism,
                price=None if r.price is None else int(r.price),
                volume_wh=int(r.volume_wh),
                bid_volume_wh=int(r.bid_volume_wh),
                ask_volume_wh=int(r.ask_volume_wh),
                order_count=int(r.order_count),
                participants=int(r.participants),
                buyer_pay_wh_price=pay,
                seller_get_wh_price=get,
            )
        )
    return rows


def load_settlement_sums(
    conn: Connection, after: int | None, upto: int | None = None
) -> dict[int, dict[str, int]]:
    """Per-slot sums of the settlements table for slots in ``(after, upto]``; the keys are
    :class:`SlotRow` attributes."""
    s = t.settlements.c
    q = select(
        s.slot,
        func.sum(s.import_wh).label("imp"),
        func.sum(s.export_wh).label("exp"),
        func.sum(case((s.imbalance_wh < 0, -s.imbalance_wh), else_=0)).label("gin"),
        func.sum(case((s.imbalance_wh > 0, s.imbalance_wh), else_=0)).label("gout"),
        func.count().label("n"),
        func.sum(case((s.measured, 0), else_=1)).label("unmeasured"),
    ).group_by(s.slot)
    q = slot_range(q, s.slot, after, upto)
    sums = {
        int(r.slot): {
            "import_wh": sum_int(r.imp),
            "export_wh": sum_int(r.exp),
            "grid_import_wh": sum_int(r.gin),
            "grid_export_wh": sum_int(r.gout),
            "households": sum_int(r.n),
            "unmeasured": sum_int(r.unmeasured),
            "true_ups": 0,
            "true_up_import_wh": 0,
            "true_up_export_wh": 0,
        }
        for r in conn.execute(q)
    }
    for slot, (n, imp, exp) in load_true_up_sums(conn, after, upto).items():
        row = sums.get(slot)
        if row is None:  # pragma: no cover - a true-up is written with its slot's settlements
            continue
        row["true_ups"] = n
        row["true_up_import_wh"] = imp
        row["true_up_export_wh"] = exp
        row["grid_import_wh"] += imp
        row["grid_export_wh"] += exp
    return sums


def has_true_up_table(conn: Connection) -> bool:
    """Whether the ledger has the ``true_ups`` table (ledgers of older nodes and archives made
    before it lack it: they have no true-ups)."""
    return inspect(conn).has_table(t.true_ups.name)


def load_true_up_sums(
    conn: Connection, after: int | None, upto: int | None = None
) -> dict[int, tuple[int, int, int]]:
    """Per slot in ``(after, upto]``: (true-ups, their import Wh, their export Wh); nothing for a
    ledger without the ``true_ups`` table (checked first: on PostgreSQL a failed statement
    aborts the transaction the other queries run in)."""
    if not has_true_up_table(conn):
        return {}
    c = t.true_ups.c
    q = select(
        c.slot,
        func.count().label("n"),
        func.sum(c.import_wh).label("imp"),
        func.sum(c.export_wh).label("exp"),
    ).group_by(c.slot)
    q = slot_range(q, c.slot, after, upto)
    return {int(r.slot): (int(r.n), sum_int(r.imp), sum_int(r.exp)) for r in conn.execute(q)}


def load_household_true_ups(conn: Connection) -> dict[str, tuple[int, int, int, int]]:
    """Per household: (true-ups, unmeasured slots they covered, import Wh, export Wh); empty
    for a ledger without the ``true_ups`` table."""
    if not has_true_up_table(conn):
        return {}
    c = t.true_ups.c
    q = select(
        c.household,
        func.count().label("n"),
        func.sum(c.slots).label("slots"),
        func.sum(c.import_wh).label("imp"),
        func.sum(c.export_wh).label("exp"),
    ).group_by(c.household)
    return {
        r.household: (int(r.n), sum_int(r.slots), sum_int(r.imp), sum_int(r.exp))
        for r in conn.execute(q)
    }


@dataclass(frozen=True, slots=True)
class BlockRef:
    """Which block settled a slot."""

    height: int
    hash: str


def load_block_refs(
    conn: Connection, after: int | None, upto: int | None = None
) -> dict[int, BlockRef]:
    """The block of each settled slot in ``(after, upto]``, by slot, oldest first."""
    b = t.blocks.c
    q = slot_range(select(b.slot, b.height, b.hash).order_by(b.slot), b.slot, after, upto)
    return {int(r.slot): BlockRef(int(r.height), r.hash) for r in conn.execute(q)}


FEEDER_FIELDS = (
    "feeder_status",
    "feeder_net_wh",
    "feeder_households_net_wh",
    "feeder_difference_wh",
    "feeder_allowed_loss_wh",
)
""":class:`SlotRow` attributes loaded from ``feeder_checks``."""


def has_feeder_table(conn: Connection) -> bool:
    """Whether the ledger has the ``feeder_checks`` table (ledgers of older nodes and archives
    made before it lack it: their grids show no feeder)."""
    return inspect(conn).has_table(t.feeder_checks.name)


def load_feeder_checks(
    conn: Connection, after: int | None, upto: int | None = None
) -> dict[int, dict[str, Any]]:
    """The ``feeder_checks`` rows of slots in ``(after, upto]`` as :data:`FEEDER_FIELDS` dicts
    per slot. The table must exist (see :func:`has_feeder_table`): the caller checks first
    rather than catching the error, since on PostgreSQL a failed statement aborts the whole
    transaction the other queries run in.
    """
    f = t.feeder_checks.c
    q = select(
        f.slot, f.status, f.feeder_net_wh, f.households_net_wh, f.difference_wh, f.allowed_loss_wh
    ).order_by(f.slot)
    q = slot_range(q, f.slot, after, upto)
    return {
        int(r.slot): {
            "feeder_status": str(r.status),
            "feeder_net_wh": _opt_int(r.feeder_net_wh),
            "feeder_households_net_wh": _opt_int(r.households_net_wh),
            "feeder_difference_wh": _opt_int(r.difference_wh),
            "feeder_allowed_loss_wh": _opt_int(r.allowed_loss_wh),
        }
        for r in conn.execute(q)
    }


# --- governance ----------------------------------------------------------------------------------


def has_rules_column(conn: Connection) -> bool:
    """Whether ``blocks`` has the ``rules`` column (a ledger of an older node opened read-only
    lacks it until a node opens it: all its blocks are of the genesis rules)."""
    return any(c["name"] == "rules" for c in inspect(conn).get_columns(t.blocks.name))


def block_columns(conn: Connection) -> list[Any]:
    """The ``blocks`` columns this ledger has (every one, or all but ``rules`` in an older
    ledger): select these rather than the table when the ledger may be older."""
    if has_rules_column(conn):
        return list(t.blocks.c)
    return [c for c in t.blocks.c if c.name != "rules"]


def has_governance_table(conn: Connection) -> bool:
    """Whether the ledger has the ``governance`` table (an older ledger opened read-only lacks
    it: no governance record was ever accepted there)."""
    return inspect(conn).has_table(t.governance.name)


@dataclass(frozen=True, slots=True)
class GovernanceRow:
    """One accepted governance record (a ``governance`` row), decoded."""

    position: int
    """1, 2, ...: its place among the accepted records, in log order."""
    log_index: int | None
    """The Raft log index that committed it (None: recorded from a snapshot)."""
    type: str
    """``add_member``, ``remove_member``, ``suspend_member``, ``reinstate_member``,
    ``change_role``, ``rotate_key``, ``replace_meter`` or ``change_rules``."""
    household: str | None
    """The DID a member change is about (None for ``change_rules``)."""
    from_slot: int
    """The first slot it is in force for."""
    fields: dict[str, Any]
    """What it sets beyond the common fields: e.g. ``meter_serial``, ``role`` and
    ``max_power_w`` of an ``add_member``, ``new_household`` of a ``rotate_key``, the changed
    rules of a ``change_rules`` (JSON values: ``k`` as ``"n/d"``, time-of-use periods as
    objects)."""
    record: dict[str, Any]
    """The whole signed record as JSON (signatures included)."""
    record_hash: str
    withdrawn: int | None
    """Resting orders it took out of the books (None: unknown, recorded from a snapshot)."""


def load_governance_records(conn: Connection) -> list[Any]:
    """The accepted governance records (:class:`market.models.GovernanceRecord`), in log
    order; [] for a ledger without the table. ValueError naming the position of a row that
    does not decode (``ledger verify`` reports such a ledger)."""
    if not has_governance_table(conn):
        return []
    g = t.governance.c
    out = []
    for r in conn.execute(select(g.position, g.record).order_by(g.position)):
        try:
            out.append(decode_record(r.record))
        except ValueError as exc:
            raise ValueError(f"governance record {r.position}: {exc}") from None
    return out


def governance_history(conn: Connection) -> list[GovernanceRow]:
    """Every accepted governance record, in log order (empty for a ledger without the table).
    ValueError naming the position of a row that does not decode."""
    if not has_governance_table(conn):
        return []
    out = []
    for r in conn.execute(select(t.governance).order_by(t.governance.c.position)):
        try:
            record = decode_record(r.record)
        except ValueError as exc:
            raise ValueError(f"governance record {r.position}: {exc}") from None
        out.append(
            GovernanceRow(
                position=int(r.position),
                log_index=_opt_int(r.log_index),
                type=str(r.type),
                household=r.household,
                from_slot=int(r.from_slot),
                fields=own_fields(record),
                record=record.model_dump(mode="json"),
                record_hash=str(r.record_hash),
                withdrawn=_opt_int(r.withdrawn),
            )
        )
    return out


def rules_history(conn: Connection) -> list[tuple[int, dict[str, Any]]]:
    """``(from_slot, rules JSON)``: the genesis market rules (``meta.config``) from slot 0,
    then the rules in force from each slot an operator's ``change_rules`` applies from (several
    from one slot: the rules after all of them), oldest first; the JSON is
    :meth:`market.config.MarketConfig.to_json`. [] for a ledger without market rules in meta.
    ValueError if the rows or meta do not make rules."""
    value = conn.execute(select(t.meta.c.value).where(t.meta.c.key == "config")).scalar()
    if value is None:
        return []
    base = MarketConfig.from_json(json.loads(value))
    return [(slot, c.to_json()) for slot, c in rules_periods(base, load_governance_records(conn))]
