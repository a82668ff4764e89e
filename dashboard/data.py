"""Read-only data access for the dashboard: SQLAlchemy engine in, plain rows out.

Every function here takes an :class:`~sqlalchemy.Engine` on a ledger database (SQLite file or
PostgreSQL, the tables of ``node/ledger/schema.py``) and returns plain Python values: dicts,
lists, ints. No Dash, no Plotly: the callbacks in :mod:`dashboard.app` stay thin, and
``bench/dashboard_bench.py`` times the same functions. The per-slot queries the node's HTTP API
shares (:class:`~node.ledger.queries.SlotRow`, ``load_clearings`` …) are in
:mod:`node.ledger.queries`.

Slots are numbered as in the running system (``market/schedule.py``): slot ``s`` delivers during
``[s * L, (s + 1) * L)`` Unix seconds, ``L`` the grid's slot length. The node's own
:class:`~market.schedule.Schedule` carries ``L`` to every function that turns slots into times
(:func:`slot_label` and friends format them); there is no module-level slot length. ``L`` comes
from the ledger's ``schedule`` meta entry (:func:`ledger_slot_seconds`, written by the
node), else ``microgrid dashboard --slot-seconds`` (an override) or the node's ``/status``.

Money is in integer minor units (cents) and energy in integer Wh, as in the ledger. Derived money
figures (costs, savings) are computed from energy and prices in integer arithmetic and rounded
once at the end; they are display figures, not settlement.

:class:`SlotCache` keeps one row of aggregates per slot in memory and extends it incrementally
(only slots newer than what it holds are queried), so a refresh of a year-long ledger costs a
query over the newest slots, not a scan of millions of settlement rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import Engine, event, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from market.governance import Governance, MemberStatus, Term
from market.models import (
    MAX_COMMAND_BYTES,
    AddMember,
    ChangeRole,
    ChangeRules,
    GovernanceRecord,
    MemberChange,
    MemberRole,
    ReplaceMeter,
    RotateKey,
    TimeOfUsePeriod,
)
from market.schedule import DAY_SECONDS, Schedule
from market.settlement import Tariffs
from market.state import (
    MarketConfig,
    MarketConfigError,
    delivery_score_permille,
    offer_share_permille,
    window_add,
)
from node.ledger import schema as t
from node.ledger.governance import decode_record, rules_periods
from node.ledger.queries import (
    FEEDER_FIELDS,
    SlotRow,
    has_feeder_table,
    has_governance_table,
    has_rules_column,
    has_true_up_table,
    load_block_refs,
    load_clearings,
    load_feeder_checks,
    load_household_true_ups,
    load_settlement_sums,
    sum_int,
)
from node.ledger.statement import RulesInForce, StatementError, market_config
from node.ledger.store import SCHEDULE_KEY, make_engine
from node.ledger.verify import VerifyReport, verify_ledger

DEFAULT_SLOT_SECONDS = Schedule().slot_seconds
"""A production grid's slot length (15 minutes, the genesis default); ``microgrid demo`` runs
10-second slots."""


def time_format(schedule: Schedule) -> str:
    """Format of slot labels, with seconds when slots are not whole minutes (strftime; the same
    directives serve as Plotly's d3 ``hoverformat``)."""
    return "%Y-%m-%d %H:%M:%S" if schedule.slot_seconds % 60 else "%Y-%m-%d %H:%M"


def slot_label(schedule: Schedule, slot: int) -> str:
    """UTC start of ``slot``: ``2026-12-02 10:15`` (``03:51:40`` for sub-minute slots).

    Also a value Plotly reads on a date axis. A slot beyond what the C library can date
    (a typo in the slot box) is labelled ``slot N``.
    """
    day, seconds = divmod(schedule.start(slot), DAY_SECONDS)
    try:
        date = _utc_date(day)
    except (OverflowError, OSError, ValueError):
        return f"slot {slot}"
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if schedule.slot_seconds % 60:
        return f"{date} {hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{date} {hours:02d}:{minutes:02d}"


def duration_label(schedule: Schedule, slots: int) -> str:
    """``slots`` slots as a wall-time span: ``15 min``, ``1 h``, ``1 day``, ``10 s``."""
    seconds = slots * schedule.slot_seconds
    for unit, name in ((7 * DAY_SECONDS, "week"), (DAY_SECONDS, "day"), (3600, "h")):
        if seconds % unit == 0:
            n = seconds // unit
            return f"{n} {name}" + ("s" if n != 1 and name != "h" else "")
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


@functools.lru_cache(maxsize=4096)
def _utc_date(day: int) -> str:
    """``YYYY-MM-DD`` of day ``day`` since the epoch (UTC); labels of a year cost 365 calls."""
    return time.strftime("%Y-%m-%d", time.gmtime(day * DAY_SECONDS))


def open_engine(url: str) -> Engine:
    """A read-only engine on the ledger at ``url``.

    SQLite files open with ``mode=ro``; PostgreSQL sessions are set to read-only transactions,
    so the dashboard cannot write to a ledger even by mistake.
    """
    engine = make_engine(url, read_only=True)
    if engine.dialect.name == "postgresql":

        def _read_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            cursor.close()
            dbapi_connection.commit()

        event.listen(engine, "connect", _read_only)
    return engine


# --- meta and head ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerInfo:
    """What the ledger says about itself: grid, rules, tariffs."""

    grid: str
    genesis_hash: str
    feed_in_tariff: int
    retail_price: int
    mechanism: str
    config: dict[str, Any]


def ledger_info(engine: Engine) -> LedgerInfo:
    """Grid name, genesis hash and market rules from the ``meta`` table."""
    with engine.connect() as conn:
        meta = {r.key: r.value for r in conn.execute(select(t.meta.c.key, t.meta.c.value))}
    config = json.loads(meta.get("config", "{}") or "{}")
    return LedgerInfo(
        grid=meta.get("grid", "?"),
        genesis_hash=meta.get("genesis_hash", ""),
        feed_in_tariff=int(config.get("feed_in_tariff", 0)),
        retail_price=int(config.get("retail_price", 0)),
        mechanism=str(config.get("mechanism", "?")),
        config=config,
    )


def ledger_slot_seconds(engine: Engine) -> int | None:
    """The grid's slot length from the ledger's ``schedule`` meta entry (the genesis
    ``slot_seconds``, written by the node when it opens its ledger); None when the ledger does
    not record it (a ledger of an older node, or one no node has opened yet) or it is unreadable.

    Not the ``config`` entry's ``slot_seconds``: that is the metered seconds per slot of the
    market rules, which may be longer than the wall-clock slot."""
    with engine.connect() as conn:
        value = conn.execute(select(t.meta.c.value).where(t.meta.c.key == SCHEDULE_KEY)).scalar()
    if value is None:
        return None
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    seconds = doc.get("slot_seconds") if isinstance(doc, dict) else None
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
        return None
    return seconds


@dataclass(frozen=True, slots=True)
class HeadInfo:
    """The newest block and how far gates and settlement have got."""

    height: int
    head_hash: str | None
    settled_through: int | None
    """Slot of the newest block (settled slot)."""
    closed_through: int | None
    """Newest slot whose gate closed (has a clearing)."""

    def key(self) -> tuple[int, str | None, int | None]:
        """Changes whenever anything new reached the ledger."""
        return (self.height, self.head_hash, self.closed_through)


def head_info(engine: Engine) -> HeadInfo:
    """Height, head hash, newest settled and newest cleared slot, counts (cheap queries)."""
    with engine.connect() as conn:
        head = conn.execute(
            select(t.blocks.c.height, t.blocks.c.hash, t.blocks.c.slot)
            .order_by(t.blocks.c.height.desc())
            .limit(1)
        ).first()
        closed = conn.execute(select(func.max(t.clearings.c.slot))).scalar()
    return HeadInfo(
        height=int(head.height) if head else 0,
        head_hash=head.hash if head else None,
        settled_through=int(head.slot) if head else None,
        closed_through=int(closed) if closed is not None else None,
    )


# --- per-slot aggregates ----------------------------------------------------------------------
# The queries (:class:`SlotRow`, ``load_clearings`` …) live in :mod:`node.ledger.queries`, shared
# with the node's HTTP API; here: their display form and the incremental cache.


def slot_row_dict(row: SlotRow, schedule: Schedule) -> dict[str, Any]:
    """A flat dict of ``row`` for tables and CSV (``time``: the slot's UTC start)."""
    return {
        "slot": row.slot,
        "time": slot_label(schedule, row.slot),
        "mechanism": row.mechanism,
        "price": row.price,
        "local_wh": row.volume_wh,
        "grid_import_wh": row.grid_import_wh,
        "grid_export_wh": row.grid_export_wh,
        "bid_volume_wh": row.bid_volume_wh,
        "ask_volume_wh": row.ask_volume_wh,
        "unmatched_bid_wh": row.unmatched_bid_wh,
        "unmatched_ask_wh": row.unmatched_ask_wh,
        "orders": row.order_count,
        "participants": row.participants,
        "settled": row.settled,
        "metered_import_wh": row.import_wh,
        "metered_export_wh": row.export_wh,
        "unmeasured": row.unmeasured,
        "true_ups": row.true_ups,
        "true_up_import_wh": row.true_up_import_wh,
        "true_up_export_wh": row.true_up_export_wh,
        "height": row.height,
        "block_hash": row.block_hash,
    }


@dataclass
class SlotCache:
    """Per-slot aggregates of one ledger, loaded lazily and extended incrementally.

    The first :meth:`refresh` loads only the newest ``initial_slots`` slots; later refreshes load
    only slots newer than those held; :meth:`window` loads older slots once when a wider window
    asks for them. Thread-safe: Dash serves callbacks from several threads.
    """

    engine: Engine
    initial_slots: int = 30 * (DAY_SECONDS // DEFAULT_SLOT_SECONDS)
    """Slots loaded by the first refresh (:class:`dashboard.views.Context` passes 30 days')."""
    rows: dict[int, SlotRow] = field(default_factory=dict)
    cleared_through: int | None = None
    settled_through: int | None = None
    traded_through: int | None = None
    """Newest slot with a trade (the order book's default)."""
    floor: int | None = None
    """Every slot from here up to ``cleared_through`` is loaded."""
    genesis_hash: str | None = None
    feeder_table: bool = False
    """Whether the ledger has ``feeder_checks`` (once seen, never asked again: tables are not
    dropped; until then asked on every refresh, so an upgraded node's ledger is picked up)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refresh(self) -> None:
        """Load clearings, settlements and blocks of slots not seen yet."""
        with self._lock, self.engine.connect() as conn:
            genesis = conn.execute(
                select(t.meta.c.value).where(t.meta.c.key == "genesis_hash")
            ).scalar()
            max_block = conn.execute(select(func.max(t.blocks.c.slot))).scalar()
            if genesis != self.genesis_hash or (
                self.settled_through is not None
                and (max_block is None or int(max_block) < self.settled_through)
            ):
                # Another ledger (or a rewound one) behind the same URL: start over.
                self.rows.clear()
                self.cleared_through = self.settled_through = self.traded_through = None
                self.floor = None
                self.feeder_table = False
                self.genesis_hash = genesis
            if self.floor is None:
                newest = conn.execute(select(func.max(t.clearings.c.slot))).scalar()
                if newest is None:
                    return
                self.floor = max(int(newest) - self.initial_slots + 1, 0)
            start = self.floor - 1
            cleared = start if self.cleared_through is None else self.cleared_through
            settled = start if self.settled_through is None else self.settled_through
            for row in load_clearings(conn, cleared):
                self._put_clearing(row)
                self.cleared_through = row.slot
                if row.volume_wh > 0:
                    self.traded_through = row.slot
            last = self._load_blocks(conn, settled, None)
            if last is not None:
                self.settled_through = last

    def _put_clearing(self, row: SlotRow) -> None:
        old = self.rows.get(row.slot)
        if old is not None and old.settled:
            for key in (
                "settled",
                "height",
                "block_hash",
                "import_wh",
                "export_wh",
                "grid_import_wh",
                "grid_export_wh",
                "households",
                "unmeasured",
                "true_ups",
                "true_up_import_wh",
                "true_up_export_wh",
                *FEEDER_FIELDS,
            ):
                setattr(row, key, getattr(old, key))
        self.rows[row.slot] = row

    def _load_blocks(self, conn: Connection, after: int, upto: int | None) -> int | None:
        """Mark slots in ``(after, upto]`` settled with their block, sums and feeder check;
        newest slot."""
        sums = load_settlement_sums(conn, after, upto)
        if not self.feeder_table:
            self.feeder_table = has_feeder_table(conn)
        feeder = load_feeder_checks(conn, after, upto) if self.feeder_table else {}
        last = None
        for slot, block in load_block_refs(conn, after, upto).items():
            row = self.rows.setdefault(slot, SlotRow(slot=slot))
            row.settled = True
            row.height = block.height
            row.block_hash = block.hash
            for key, value in sums.get(slot, {}).items():
                setattr(row, key, value)
            for key, value in feeder.get(slot, {}).items():
                setattr(row, key, value)
            last = slot
        return last

    def _backfill(self, start: int) -> None:
        """Load slots ``start .. floor-1`` (older than what is held)."""
        assert self.floor is not None
        with self.engine.connect() as conn:
            if start < 0:
                first = conn.execute(select(func.min(t.clearings.c.slot))).scalar()
                start = int(first) if first is not None else self.floor
            if start >= self.floor:
                return
            for row in load_clearings(conn, start - 1, self.floor - 1):
                self._put_clearing(row)
            self._load_blocks(conn, start - 1, self.floor - 1)
        self.floor = start

    def window(self, slots: int | None) -> list[SlotRow]:
        """The newest ``slots`` slots (all when None), oldest first."""
        with self._lock:
            if self.floor is not None and self.cleared_through is not None:
                start = -1 if slots is None else self.cleared_through - slots + 1
                if start < self.floor and self.floor > 0:
                    self._backfill(start)
            keys = sorted(self.rows)
            if slots is not None:
                keys = keys[-slots:]
            return [self.rows[k] for k in keys]


# --- order book -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderBook:
    """The book of one slot at gate closure and its clearing."""

    slot: int
    bids: list[dict[str, Any]]
    asks: list[dict[str, Any]]
    price: int | None
    volume_wh: int
    mechanism: str | None
    cleared: bool
    """False when the slot's gate has not closed (no clearing row)."""


def order_book(engine: Engine, slot: int) -> OrderBook:
    """Every order of ``slot`` (bids highest price first, asks lowest first) and its clearing."""
    o = t.orders.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(o.order_id, o.household, o.side, o.quantity_wh, o.price, o.position)
            .where(o.slot == slot)
            .order_by(o.position)
        ).all()
        clr = conn.execute(select(t.clearings).where(t.clearings.c.slot == slot)).first()
    orders = [
        {
            "order_id": r.order_id,
            "household": r.household,
            "side": r.side,
            "quantity_wh": int(r.quantity_wh),
            "price": int(r.price),
            "position": int(r.position),
        }
        for r in rows
    ]
    bids = sorted(
        (x for x in orders if x["side"] == "buy"), key=lambda x: (-x["price"], x["position"])
    )
    asks = sorted(
        (x for x in orders if x["side"] == "sell"), key=lambda x: (x["price"], x["position"])
    )
    return OrderBook(
        slot=slot,
        bids=bids,
        asks=asks,
        price=None if clr is None or clr.price is None else int(clr.price),
        volume_wh=int(clr.volume_wh) if clr is not None else 0,
        mechanism=clr.mechanism if clr is not None else None,
        cleared=clr is not None,
    )


class StepCurve(NamedTuple):
    """A supply or demand curve as plot coordinates (unpacks as ``xs, ys``)."""

    energy_wh: list[int]
    """x: cumulative quantity in Wh."""
    price: list[int]
    """y: the price of the order at that quantity (cents/kWh)."""


def step_curve(orders: Sequence[dict[str, Any]]) -> StepCurve:
    """Cumulative-quantity step curve (x in Wh, y in price) of orders already sorted."""
    xs: list[int] = []
    ys: list[int] = []
    total = 0
    for order in orders:
        xs.extend([total, total + order["quantity_wh"]])
        ys.extend([order["price"], order["price"]])
        total += order["quantity_wh"]
    return StepCurve(energy_wh=xs, price=ys)


# --- households -------------------------------------------------------------------------------


def household_summary(
    engine: Engine, records: HouseholdRecords | None = None
) -> list[dict[str, Any]]:
    """One row per household: role, meter, balances, reputation and delivery figures, and its
    metering: settled slots without a usable reading (``unmeasured_slots``: estimated zero) and
    the true-ups that settled their counter movement at the next reading (count, slots covered,
    import and export Wh), and the delivery record that caps its offers. ``records``: the
    caller's :class:`HouseholdRecords`, brought up to date here (without one, the settlements
    are read in full)."""
    h = t.households.c
    bal = t.balances.c
    if records is None:
        records = HouseholdRecords(engine)
    record = records.update()
    with engine.connect() as conn:
        balances: dict[str, dict[str, int]] = {}
        for r in conn.execute(
            select(bal.account, bal.asset, bal.amount).where(bal.account.like("household:%"))
        ):
            balances.setdefault(r.account[len("household:") :], {})[r.asset] = int(r.amount)
        trued = load_household_true_ups(conn)
        rows = conn.execute(select(t.households).order_by(h.did)).all()
    out = []
    for r in rows:
        b = balances.get(r.did, {})
        n_true_ups, true_up_slots, true_up_import, true_up_export = trued.get(r.did, (0, 0, 0, 0))
        out.append(
            {
                "household": r.did,
                "short": short_did(r.did),
                "meter": r.meter_serial,
                "role": r.role,
                "balance_cents": b.get("money", 0),
                "energy_wh": b.get("energy", 0),
                "reputation_permille": int(r.reputation_permille),
                "sold_wh": int(r.sold_wh),
                "delivered_wh": int(r.delivered_wh),
                "bought_wh": int(r.bought_wh),
                "consumed_wh": int(r.consumed_wh),
                "slots": int(r.slots),
                "missed_readings": int(r.missed_readings),
                "unmeasured_slots": record.unmeasured.get(r.did, 0),
                "true_ups": n_true_ups,
                "true_up_slots": true_up_slots,
                "true_up_import_wh": true_up_import,
                "true_up_export_wh": true_up_export,
                **record.delivery.get(r.did, {"recent_delivery_permille": None,
                                              "offer_share_permille": None}),
            }
        )  # fmt: skip
    return out


@dataclass(frozen=True, slots=True)
class RecordFigures:
    """What :class:`HouseholdRecords` derives from the settlements, per household."""

    unmeasured: dict[str, int]
    """Settled slots without a usable reading."""
    delivery: dict[str, dict[str, int]]
    """``recent_delivery_permille`` and ``offer_share_permille`` (rules 2 only)."""


@dataclass
class HouseholdRecords:
    """Per-household figures replayed from the ``settlements`` rows, incrementally: the first
    :meth:`update` reads every settled slot once, later ones only the new slots (the table can
    hold millions of rows). The delivery record that caps a household's offers (rules 2;
    docs/ledger.md) uses the engine's own window arithmetic, so it is the engine's figure for a
    ledger complete from its genesis (one that installed a Raft snapshot lacks the early
    slots). Thread-safe: Dash serves callbacks from several threads."""

    engine: Engine
    through: int | None = None
    """Newest slot replayed."""
    genesis_hash: str | None = None
    config: MarketConfig | None = None
    unmeasured: dict[str, int] = field(default_factory=dict)
    recent: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per household: recent sold and delivered Wh over the reputation window."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self) -> RecordFigures:
        """Replay the slots settled since the last call; the figures as of the newest."""
        s = t.settlements.c
        with self._lock, self.engine.connect() as conn:
            meta = {
                r.key: r.value
                for r in conn.execute(
                    select(t.meta.c.key, t.meta.c.value).where(
                        t.meta.c.key.in_(("genesis_hash", "config"))
                    )
                )
            }
            if meta.get("genesis_hash") != self.genesis_hash:  # another ledger: start over
                self.genesis_hash = meta.get("genesis_hash")
                self.through, self.unmeasured, self.recent = None, {}, {}
                try:
                    self.config = MarketConfig.from_json(json.loads(meta.get("config") or "null"))
                except (ValueError, MarketConfigError):
                    self.config = None
            q = select(s.slot, s.household, s.measured, s.sold_wh, s.delivered_wh).order_by(
                s.slot, s.household
            )
            if self.through is not None:
                q = q.where(s.slot > self.through)
            config = self.config
            window = None if config is None or config.rules < 2 else config.reputation_window_slots
            for r in conn.execute(q):
                self.through = int(r.slot)
                if not r.measured:
                    self.unmeasured[r.household] = self.unmeasured.get(r.household, 0) + 1
                if window is not None:
                    sold, delivered = self.recent.get(r.household, (0, 0))
                    self.recent[r.household] = (
                        window_add(sold, int(r.sold_wh), window),
                        window_add(delivered, int(r.delivered_wh), window),
                    )
            delivery = {}
            if config is not None and window is not None:
                for did, (sold, delivered) in self.recent.items():
                    score = delivery_score_permille(sold, delivered)
                    delivery[did] = {
                        "recent_delivery_permille": score,
                        "offer_share_permille": offer_share_permille(config, score),
                    }
            return RecordFigures(dict(self.unmeasured), delivery)


def household_slots(
    engine: Engine, household: str, first_slot: int | None = None, *, schedule: Schedule
) -> list[dict[str, Any]]:
    """Metered vs traded energy and imbalance of one household per settled slot, and the
    true-up its reading in that slot settled (``true_up_slots`` unmeasured slots before it,
    their import and export; zeros when none)."""
    s = t.settlements.c
    q = (
        select(
            s.slot,
            s.measured,
            s.import_wh,
            s.export_wh,
            s.sold_wh,
            s.bought_wh,
            s.imbalance_wh,
        )
        .where(s.household == household)
        .order_by(s.slot)
    )
    if first_slot is not None:
        q = q.where(s.slot >= first_slot)
    with engine.connect() as conn:
        trued: dict[int, tuple[int, int, int]] = {}
        if has_true_up_table(conn):
            c = t.true_ups.c
            tq = select(c.slot, c.slots, c.import_wh, c.export_wh).where(c.household == household)
            if first_slot is not None:
                tq = tq.where(c.slot >= first_slot)
            trued = {
                int(r.slot): (int(r.slots), int(r.import_wh), int(r.export_wh))
                for r in conn.execute(tq)
            }
        out = []
        for r in conn.execute(q):
            gap_slots, gap_import, gap_export = trued.get(int(r.slot), (0, 0, 0))
            out.append(
                {
                    "slot": int(r.slot),
                    "time": slot_label(schedule, int(r.slot)),
                    "measured": bool(r.measured),
                    "metered_import_wh": int(r.import_wh),
                    "metered_export_wh": int(r.export_wh),
                    "traded_buy_wh": int(r.bought_wh),
                    "traded_sell_wh": int(r.sold_wh),
                    "imbalance_wh": int(r.imbalance_wh),
                    "true_up_slots": gap_slots,
                    "true_up_import_wh": gap_import,
                    "true_up_export_wh": gap_export,
                }
            )
        return out


def short_did(did: str) -> str:
    """A short, still distinctive form of a DID for labels."""
    tail = did.rsplit(":", 1)[-1]
    return f"…{tail[-8:]}" if len(tail) > 8 else tail


# --- community --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommunityFigures:
    """Community-level figures over a set of settled slots (definitions in docs/dashboard.md)."""

    slots: int
    import_wh: int
    export_wh: int
    feeder_import_wh: int
    feeder_export_wh: int
    local_traded_wh: int
    self_sufficiency: float | None
    self_consumption: float | None
    grid_only_cost_cents: int
    actual_cost_cents: int
    savings_cents: int


def community_figures(
    rows: Iterable[SlotRow], tariffs_at: Callable[[int], Tariffs]
) -> CommunityFigures:
    """Self-sufficiency, self-consumption and savings vs grid-only over settled ``rows``, each
    slot priced at ``tariffs_at(slot)`` (the rules in force for it: :func:`tariffs_in_force`).

    - self-sufficiency = 1 − Σ_s max(I_s − E_s, 0) / Σ_s I_s
    - self-consumption = 1 − Σ_s max(E_s − I_s, 0) / Σ_s E_s
    - grid-only cost = Σ I × (retail + grid fee) − Σ E × feed-in (every household alone with
      the utility)
    - actual cost = Σ trades (buyer price − seller price) × Wh + local volume × local fee +
      grid imports × (retail + grid fee) − grid exports × feed-in (what the ledger settled)
    - savings = grid-only cost − actual cost

    where I_s and E_s are the community's metered import and export settled in slot s: the
    measured slots' flows plus the true-ups settled in s (counter movement over earlier
    unmeasured slots, which ``grid_import_wh``/``grid_export_wh`` include too).
    """
    n = imp = exp = fimp = fexp = local = 0
    grid_only = actual = 0  # in Wh·cent/kWh, divided by 1000 at the end
    for r in rows:
        if not r.settled:
            continue
        n += 1
        slot_imp = r.import_wh + r.true_up_import_wh
        slot_exp = r.export_wh + r.true_up_export_wh
        imp += slot_imp
        exp += slot_exp
        fimp += max(slot_imp - slot_exp, 0)
        fexp += max(slot_exp - slot_imp, 0)
        local += r.volume_wh
        tariffs = tariffs_at(r.slot)
        import_price = tariffs.retail + tariffs.grid_fee
        grid_only += slot_imp * import_price - slot_exp * tariffs.feed_in
        actual += (
            r.buyer_pay_wh_price
            - r.seller_get_wh_price
            + r.volume_wh * tariffs.local_fee
            + r.grid_import_wh * import_price
            - r.grid_export_wh * tariffs.feed_in
        )
    grid_only_c = _round_div(grid_only, 1000)
    actual_c = _round_div(actual, 1000)
    return CommunityFigures(
        slots=n,
        import_wh=imp,
        export_wh=exp,
        feeder_import_wh=fimp,
        feeder_export_wh=fexp,
        local_traded_wh=local,
        self_sufficiency=(1 - fimp / imp) if imp else None,
        self_consumption=(1 - fexp / exp) if exp else None,
        grid_only_cost_cents=grid_only_c,
        actual_cost_cents=actual_c,
        savings_cents=grid_only_c - actual_c,
    )


def _round_div(a: int, b: int) -> int:
    """a / b rounded half away from zero, in integers."""
    q, r = divmod(abs(a), b)
    if 2 * r >= b:
        q += 1
    return q if a >= 0 else -q


def tariffs_in_force(engine: Engine, info: LedgerInfo) -> Callable[[int], Tariffs]:
    """Slot -> the tariffs and grid fees the ledger's rules put in force for it (the genesis
    rules and the operator's ``change_rules`` records); the flat genesis tariffs of ``info``
    when the ledger's rules history cannot be read."""
    try:
        with engine.connect() as conn:
            return RulesInForce(conn, market_config(conn)).tariffs
    except (StatementError, SQLAlchemyError):
        flat = Tariffs(info.feed_in_tariff, info.retail_price)
        return lambda _slot: flat


def bucketed_community(
    rows: Sequence[SlotRow],
    tariffs_at: Callable[[int], Tariffs],
    per: int | None = None,
    *,
    schedule: Schedule,
) -> list[dict[str, Any]]:
    """:func:`community_figures` per bucket of ``per`` slots (by default a day of
    ``schedule``'s)."""
    if per is None:
        per = schedule.slots_per_day
    buckets: dict[int, list[SlotRow]] = {}
    for r in rows:
        buckets.setdefault(r.slot // per * per, []).append(r)
    out = []
    for first in sorted(buckets):
        f = community_figures(buckets[first], tariffs_at)
        if not f.slots:
            continue
        out.append(
            {
                "slot": first,
                "time": slot_label(schedule, first),
                "slots": f.slots,
                "self_sufficiency": f.self_sufficiency,
                "self_consumption": f.self_consumption,
                "grid_only_cost_cents": f.grid_only_cost_cents,
                "actual_cost_cents": f.actual_cost_cents,
                "savings_cents": f.savings_cents,
            }
        )
    return out


# --- ledger -----------------------------------------------------------------------------------


def transaction_count(engine: Engine) -> int:
    """Number of ledger transactions (Σ of the block headers' tx_count)."""
    with engine.connect() as conn:
        return sum_int(conn.execute(select(func.sum(t.blocks.c.tx_count))).scalar())


def latest_blocks(engine: Engine, limit: int = 10, *, schedule: Schedule) -> list[dict[str, Any]]:
    """The newest blocks, newest first."""
    b = t.blocks.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(b.height, b.slot, b.hash, b.prev_hash, b.tx_count, b.state_hash)
            .order_by(b.height.desc())
            .limit(limit)
        ).all()
    return [
        {
            "height": int(r.height),
            "slot": int(r.slot),
            "time": slot_label(schedule, int(r.slot)),
            "hash": r.hash,
            "prev_hash": r.prev_hash,
            "tx_count": int(r.tx_count),
            "state_hash": r.state_hash,
        }
        for r in rows
    ]


def latest_transactions(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    """The newest transactions with the money and energy each moves (Σ of positive postings)."""
    tx = t.transactions.c
    p = t.postings.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(tx.id, tx.block_height, tx.position, tx.txid, tx.kind, tx.slot, tx.ref)
            .order_by(tx.id.desc())
            .limit(limit)
        ).all()
        ids = [r.id for r in rows]
        moved: dict[int, dict[str, int]] = {}
        if ids:
            for r in conn.execute(
                select(p.transaction_id, p.asset, func.sum(p.amount).label("amt"))
                .where(p.transaction_id.in_(ids), p.amount > 0)
                .group_by(p.transaction_id, p.asset)
            ):
                moved.setdefault(int(r.transaction_id), {})[r.asset] = sum_int(r.amt)
    return [
        {
            "height": int(r.block_height),
            "position": int(r.position),
            "slot": int(r.slot),
            "kind": r.kind,
            "ref": r.ref,
            "txid": r.txid,
            "money_cents": moved.get(int(r.id), {}).get("money", 0),
            "energy_wh": moved.get(int(r.id), {}).get("energy", 0),
        }
        for r in rows
    ]


@dataclass
class VerifyCache:
    """Runs :func:`verify_ledger` in a background thread and keeps the last report.

    A verification starts when the head has changed since the last one *and* at least
    ``min_interval`` seconds (and ten times the last verification's duration) have passed, or
    when none was run yet. Callbacks never wait for it:
    they read :meth:`status`.
    """

    url: str
    min_interval: float = 60.0
    report: VerifyReport | None = None
    verified_key: tuple[Any, ...] | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    running: bool = False
    _started_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def poke(self, key: tuple[Any, ...]) -> None:
        """Start a verification of the ledger at head ``key`` if one is due."""
        with self._lock:
            if self.running or key == self.verified_key:
                return
            # at most ~10 % of one core on verification, however big the ledger grows
            wait = max(self.min_interval, 10 * (self.duration_s or 0.0))
            if self.report is not None and time.monotonic() - self._started_at < wait:
                return
            self.running = True
            self._started_at = time.monotonic()
            self._thread = threading.Thread(
                target=self._run, args=(key,), name="ledger-verify", daemon=True
            )
            self._thread.start()

    def _run(self, key: tuple[Any, ...]) -> None:
        start = time.monotonic()
        try:
            report = verify_ledger(self.url)
        except Exception as exc:  # a verifier bug must not kill the dashboard
            report = VerifyReport(False, 0, None, 0, 0, f"verify crashed: {exc!r}")
        with self._lock:
            self.report = report
            self.verified_key = key
            self.finished_at = time.time()
            self.duration_s = time.monotonic() - start
            self.running = False

    def wait(self, timeout: float) -> bool:
        """Wait for a running verification (tests and the bench); True when none is running."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    def status(self) -> dict[str, Any]:
        """The newest report as a dict (``state``: ok, failed, pending)."""
        with self._lock:
            r = self.report
            if r is None:
                return {"state": "pending", "running": self.running}
            return {
                "state": "ok" if r.ok else "failed",
                "running": self.running,
                "height": r.height,
                "head_hash": r.head_hash,
                "blocks": r.blocks,
                "transactions": r.transactions,
                "error": r.error,
                "conservation": r.conservation,
                "finished_at": self.finished_at,
                "duration_s": self.duration_s,
            }


# --- alerts -----------------------------------------------------------------------------------


def ledger_alerts(
    rows: Sequence[SlotRow],
    head: HeadInfo,
    verify: dict[str, Any],
    settle_lag_slots: int = 4,
    *,
    schedule: Schedule,
) -> list[dict[str, str]]:
    """Alerts the ledger itself shows: a slot that did not clear, a slot whose feeder check
    found a mismatch, settlement overdue, a ledger that does not verify. ``rows`` are the slots
    to look at (the recent window)."""
    alerts: list[dict[str, str]] = []
    if verify.get("state") == "failed":
        alerts.append(
            {
                "level": "danger",
                "code": "ledger_invalid",
                "message": f"Ledger does not verify: {verify.get('error')}",
            }
        )
    for r in rows:
        if r.bid_volume_wh > 0 and r.ask_volume_wh > 0 and r.volume_wh == 0:
            alerts.append(
                {
                    "level": "warning",
                    "code": "slot_not_cleared",
                    "message": (
                        f"Slot {r.slot} ({slot_label(schedule, r.slot)} UTC) did not clear: "
                        f"{r.bid_volume_wh} Wh bid and {r.ask_volume_wh} Wh offered, no trade"
                    ),
                }
            )
        if r.feeder_status == "mismatch":
            alerts.append(feeder_mismatch_alert(r, schedule))
    if head.closed_through is not None:
        settled = head.settled_through if head.settled_through is not None else -1
        behind = head.closed_through - settled
        if behind > settle_lag_slots:
            alerts.append(
                {
                    "level": "danger",
                    "code": "settlement_overdue",
                    "message": (
                        f"Settlement overdue: gates closed through slot {head.closed_through} "
                        f"({slot_label(schedule, head.closed_through)} UTC) "
                        f"but settled only through {head.settled_through if settled >= 0 else '-'}"
                        f" ({behind} slots behind, limit {settle_lag_slots})"
                    ),
                }
            )
    return alerts


def feeder_mismatch_alert(row: SlotRow, schedule: Schedule) -> dict[str, str]:
    """The ``feeder_mismatch`` alert of a slot whose feeder check failed: the feeder meter's net
    import and the households' metered net differ by more than the grid's loss band."""
    diff = row.feeder_difference_wh
    sign = "" if diff is None or diff < 0 else "+"
    return {
        "level": "danger",
        "code": "feeder_mismatch",
        "message": (
            f"Slot {row.slot} ({slot_label(schedule, row.slot)} UTC) does not add up at the "
            "feeder: "
            f"difference {sign}{diff} Wh (feeder net import {row.feeder_net_wh} Wh, "
            f"households' meters {row.feeder_households_net_wh} Wh, allowed losses up to "
            f"{row.feeder_allowed_loss_wh} Wh)"
        ),
    }


@dataclass(frozen=True, slots=True)
class FeederSummary:
    """Feeder checks of a set of slots, counted by status."""

    slots: int
    """Slots with a feeder check."""
    ok: int
    mismatch: int
    no_feeder_reading: int
    households_unmeasured: int

    @property
    def incomplete(self) -> int:
        """Checks that compared nothing ("feeder check incomplete")."""
        return self.no_feeder_reading + self.households_unmeasured


def feeder_summary(rows: Iterable[SlotRow]) -> FeederSummary | None:
    """Count the feeder checks of ``rows`` by status; None when none of them has a check (a
    grid without a feeder meter, or a ledger without the ``feeder_checks`` table)."""
    counts = {"ok": 0, "mismatch": 0, "no_feeder_reading": 0, "households_unmeasured": 0}
    n = 0
    for r in rows:
        if r.feeder_status is None:
            continue
        n += 1
        if r.feeder_status in counts:
            counts[r.feeder_status] += 1
    if n == 0:
        return None
    return FeederSummary(slots=n, **counts)


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text of a list of flat dicts (header from the first row's keys)."""
    import csv
    import io

    buf = io.StringIO()
    if not rows:
        return ""
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


# --- governance -------------------------------------------------------------------------------
# The operator's governance records as the ledger stores them (``governance`` rows, in log
# order) and the rules periods they make, with the blocks settled under each. Every row is
# untrusted: one that does not decode is shown as unreadable, never raised.

MAX_GOVERNANCE_ROWS = 10_000
"""Governance rows read at most (a real grid has a handful a year; a ledger with more is
shown cut, with a problem saying so)."""

MAX_TEXT_CHARS = 256
"""Text columns (type, household, meter serial) are clipped to this many characters."""

MAX_PROBLEM_CHARS = 200
"""A decoding error is clipped to this many characters on the page."""

GENESIS_LABEL = "genesis"
"""What the page says for slot 0 of the rules history (the genesis rules)."""

RULE_FIELDS = (
    "feed_in_tariff",
    "retail_price",
    "mechanism",
    "k",
    "time_of_use",
    "local_fee",
    "grid_fee",
)
"""The market rules a ``change_rules`` may set (the grid fees may be absent from an older
``MarketConfig``: read with a default of 0)."""

GRID_FEES = {"local_fee", "grid_fee"} <= {f.name for f in dataclasses.fields(MarketConfig)}
"""Whether this version's market rules have grid fees (``local_fee``, ``grid_fee``): the rules
table shows their columns only then."""

_STATUS_ORDER = {"active": 0, "pending": 1, "suspended": 2, "removed": 3, "rotated": 4}


@dataclass(frozen=True, slots=True)
class GovernanceEntry:
    """One row of the membership history: an accepted governance record (``governance`` row,
    in log order) and the household's standing after it. A row that does not decode has
    ``kind`` from its ``type`` column, ``status`` :data:`UNREADABLE` and the reason in
    ``problem``."""

    position: int | None
    log_index: int | None
    from_slot: int | None
    time: str
    """UTC start of ``from_slot`` ("—" when the row has no usable slot)."""
    kind: str
    household: str | None
    """The DID a member change is about (None: a rules change)."""
    new_household: str | None
    """A key rotation's new DID."""
    role: str | None
    """The household's role after the record ("?" when the ledger cannot tell)."""
    meter_serial: str | None
    """The household's meter after the record ("?" when the ledger cannot tell)."""
    status: str | None
    """The household's status from ``from_slot`` (active, suspended, removed, rotated), or
    :data:`UNREADABLE`; None for a rules change."""
    withdrawn: int | None
    """Resting orders the record took out of the books (None: not known)."""
    detail: str
    """What the record sets, in words."""
    problem: str | None = None
    record_hash: str | None = None

    @property
    def short(self) -> str:
        """The household's DID, shortened for a table cell ("" for a rules change)."""
        return short_did(self.household) if self.household else ""

    def as_row(self) -> dict[str, Any]:
        """A flat dict for tables and CSV (full DIDs)."""
        return {
            "position": self.position,
            "log_index": self.log_index,
            "from_slot": self.from_slot,
            "time": self.time,
            "kind": self.kind,
            "household": self.household,
            "new_household": self.new_household,
            "role": self.role,
            "meter_serial": self.meter_serial,
            "status": self.status,
            "withdrawn": self.withdrawn,
            "detail": self.detail,
            "problem": self.problem,
            "record_hash": self.record_hash,
        }


UNREADABLE = "unreadable"
"""The status of a governance row whose record does not decode."""


@dataclass(frozen=True, slots=True)
class MemberEntry:
    """A household as the ledger's governance history leaves it, as of a slot."""

    household: str
    role: str
    meter_serial: str
    status: str
    """active, pending (admitted from a later slot), suspended, removed or rotated."""
    since: int | None
    """The slot its current standing holds from (0: since genesis; None: pending)."""
    since_time: str
    scheduled: str
    """Changes already scheduled for later slots, in words ("" if none)."""

    @property
    def short(self) -> str:
        """The DID shortened for a table cell."""
        return short_did(self.household)

    def as_row(self) -> dict[str, Any]:
        """A flat dict for tables and CSV."""
        return {
            "household": self.household,
            "role": self.role,
            "meter_serial": self.meter_serial,
            "status": self.status,
            "since": self.since,
            "since_time": self.since_time,
            "scheduled": self.scheduled,
        }


@dataclass(frozen=True, slots=True)
class RulesPeriod:
    """The market rules in force from ``from_slot`` until the next period, and the blocks the
    ledger settled under them."""

    from_slot: int
    time: str
    """UTC start of ``from_slot`` (:data:`GENESIS_LABEL` for the genesis rules)."""
    feed_in_tariff: int
    retail_price: int
    mechanism: str
    k: str
    time_of_use: str
    """Daily periods as ``HH:MM feed-in/retail`` (UTC), "" for flat tariffs."""
    local_fee: int
    grid_fee: int
    rules_hash: str | None
    """What ``blocks.rules`` names for these rules (None: the genesis rules, NULL)."""
    changed: tuple[str, ...]
    """Rules that differ from the previous period's."""
    records: tuple[int, ...]
    """Positions of the ``change_rules`` records that apply from ``from_slot``."""
    blocks: int
    """Blocks in the period's slots whose ``rules`` names these rules."""
    first_height: int | None
    last_height: int | None
    first_slot: int | None
    last_slot: int | None
    other_blocks: int
    """Blocks in the period's slots whose ``rules`` names other rules (``ledger verify``
    fails on such a ledger)."""

    def as_row(self) -> dict[str, Any]:
        """A flat dict for tables and CSV."""
        return {
            "from_slot": self.from_slot,
            "time": self.time,
            "feed_in_tariff": self.feed_in_tariff,
            "retail_price": self.retail_price,
            "mechanism": self.mechanism,
            "k": self.k,
            "time_of_use": self.time_of_use,
            "local_fee": self.local_fee,
            "grid_fee": self.grid_fee,
            "changed": ", ".join(self.changed),
            "records": ", ".join(map(str, self.records)),
            "blocks": self.blocks,
            "first_height": self.first_height,
            "last_height": self.last_height,
            "first_slot": self.first_slot,
            "last_slot": self.last_slot,
            "other_blocks": self.other_blocks,
            "rules_hash": self.rules_hash,
        }


@dataclass(frozen=True, slots=True)
class GovernanceOverview:
    """The ledger's governance history: records, members, rules periods."""

    entries: list[GovernanceEntry]
    """Every accepted record, in log order (the newest :data:`MAX_GOVERNANCE_ROWS`)."""
    members: list[MemberEntry]
    """Every household the ledger knows, as of :attr:`as_of`: active ones first."""
    rules: list[RulesPeriod]
    """Rules periods, oldest first (the genesis rules from slot 0)."""
    as_of: int
    """The slot the member list describes: the first slot whose gate has not closed."""
    problems: list[str]
    """What could not be read (unreadable rows, rules that do not fold), for the page."""

    @property
    def empty(self) -> bool:
        """No governance record since genesis."""
        return not self.entries


def _as_int(value: Any) -> int | None:
    """An integer column's value, or None for anything else a hostile ledger may hold."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _clip(value: Any, limit: int = MAX_TEXT_CHARS) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@functools.lru_cache(maxsize=1024)
def _decode_governance(text: str, grid: str | None) -> GovernanceRecord | str:
    """A ``governance.record`` decoded, or why not (records never change: cached)."""
    try:
        return decode_record(text, grid)
    except ValueError as exc:
        return _clip(str(exc), MAX_PROBLEM_CHARS) or "unreadable"


def time_of_use_label(periods: Iterable[Any]) -> str:
    """Daily time-of-use periods as ``00:00 8/30 · 02:00 6/35`` (start UTC, feed-in/retail)."""
    out = []
    for p in periods:
        if isinstance(p, TimeOfUsePeriod):
            start, feed_in, retail = p.start_minute, p.feed_in_tariff, p.retail_price
        else:
            start, feed_in, retail = p
        out.append(f"{start // 60:02d}:{start % 60:02d} {feed_in}/{retail}")
    return " · ".join(out)


def _record_detail(record: GovernanceRecord) -> str:
    """What a record sets, in words."""
    if isinstance(record, AddMember):
        return f"meter {record.meter_serial}, {record.role}, up to {record.max_power_w} W"
    if isinstance(record, ChangeRole):
        return f"role → {record.role}"
    if isinstance(record, RotateKey):
        signed = " (countersigned by the old key)" if record.household_signature else ""
        return f"new key {short_did(record.new_household)}{signed}"
    if isinstance(record, ReplaceMeter):
        return (
            f"meter → {record.meter_serial}; old meter's final counters "
            f"{record.old_import_wh}/{record.old_export_wh} Wh, new meter's first "
            f"{record.new_import_wh}/{record.new_export_wh} Wh (import/export)"
        )
    if isinstance(record, ChangeRules):
        parts = []
        for name, value in record.changes().items():
            if name == "time_of_use":
                parts.append(f"time of use {time_of_use_label(value) or 'off (flat tariffs)'}")
            else:
                parts.append(f"{name.replace('_', ' ')} {value}")
        return "; ".join(parts)
    return ""


def _role_label(role: Any) -> str:
    return str(role.value if isinstance(role, MemberRole) else role)


_OTHER_ROLE = {MemberRole.VOTER: MemberRole.LEARNER, MemberRole.LEARNER: MemberRole.VOTER}


def _term_change(before: Term | None, after: Term) -> str:
    """What changes from ``before`` to ``after``, in words (``removed``, ``role voter``)."""
    parts = []
    if before is None or before.status != after.status:
        parts.append(str(after.status))
    if before is not None and before.role != after.role:
        parts.append(f"role {_role_label(after.role)}")
    if before is not None and before.meter_serial != after.meter_serial:
        parts.append(f"meter {after.meter_serial}")
    return ", ".join(parts) or "unchanged"


@dataclass
class _MemberFold:
    """The households' terms folded from the readable records (market.governance's own fold),
    with each genesis member's first term taken from the ledger: role from its ``households``
    row (or the opposite of its first role change), meter from the row (or, when its meter was
    swapped later, its last reading before the swap)."""

    conn: Connection
    households: dict[str, tuple[str, str]]
    """DID -> (meter serial, role) of the ``households`` row (the latest scheduled ones)."""
    first_role_change: dict[str, MemberRole]
    first_swap: dict[str, int]
    gov: Governance = field(default_factory=Governance)
    unknown_role: set[str] = field(default_factory=set)
    unknown_meter: set[str] = field(default_factory=set)

    def genesis_term(self, did: str) -> Term:
        row = self.households.get(did)
        role: MemberRole | None = None
        if did in self.first_role_change:
            role = _OTHER_ROLE.get(self.first_role_change[did])
        elif row is not None and row[1] in {r.value for r in MemberRole}:
            role = MemberRole(row[1])
        meter: str | None = row[0] if row is not None else None
        if did in self.first_swap:
            rd = t.readings.c
            meter = _clip(
                self.conn.execute(
                    select(rd.meter_serial)
                    .where(rd.household == did, rd.slot < self.first_swap[did])
                    .order_by(rd.slot.desc())
                    .limit(1)
                ).scalar()
            )
        if role is None:
            self.unknown_role.add(did)
        if not meter:
            self.unknown_meter.add(did)
        return Term(0, MemberStatus.ACTIVE, role or MemberRole.LEARNER, meter or "", 0)

    def add(self, record: GovernanceRecord) -> None:
        """Fold one record (ValueError/TypeError: it does not fit the history)."""
        genesis = None
        if isinstance(record, MemberChange) and record.household not in self.gov.terms:
            genesis = self.genesis_term(record.household)
        self.gov.add(record, genesis)
        if isinstance(record, AddMember):
            self.unknown_role.discard(record.household)
            self.unknown_meter.discard(record.household)
        elif isinstance(record, ChangeRole):
            self.unknown_role.discard(record.household)
        elif isinstance(record, ReplaceMeter):
            self.unknown_meter.discard(record.household)
        elif isinstance(record, RotateKey):
            for unknown in (self.unknown_role, self.unknown_meter):
                if record.household in unknown:
                    unknown.add(record.new_household)
                else:
                    unknown.discard(record.new_household)

    def role(self, did: str, term: Term) -> str:
        return "?" if did in self.unknown_role else _role_label(term.role)

    def meter(self, did: str, term: Term) -> str:
        return "?" if did in self.unknown_meter or not term.meter_serial else term.meter_serial


def governance_overview(
    engine: Engine, *, schedule: Schedule, as_of: int | None = None
) -> GovernanceOverview:
    """The membership and rules history of the ledger behind ``engine``.

    Reads the ``governance`` rows in log order (a ledger without the table has none), decodes
    each strictly (a row that does not decode becomes an :data:`UNREADABLE` entry and a
    problem; the rest of the history is folded without it), folds the records with the engine's
    own :class:`~market.governance.Governance` into each household's terms, and the rules
    changes into rules periods (:func:`node.ledger.governance.rules_periods`), counting the
    blocks each period's slots were settled under by their ``rules`` column. ``as_of``: the
    slot the member list describes (default: the first slot whose gate has not closed)."""
    g = t.governance.c
    h = t.households.c
    problems: list[str] = []
    with engine.connect() as conn:
        meta = {
            r.key: r.value
            for r in conn.execute(
                select(t.meta.c.key, t.meta.c.value).where(t.meta.c.key.in_(("grid", "config")))
            )
        }
        if as_of is None:
            closed = _as_int(conn.execute(select(func.max(t.clearings.c.slot))).scalar())
            as_of = 0 if closed is None else closed + 1
        raw: list[Any] = []
        if has_governance_table(conn):
            raw = conn.execute(
                select(
                    g.position,
                    g.log_index,
                    func.substr(g.type, 1, 64).label("type"),
                    func.substr(g.household, 1, MAX_TEXT_CHARS + 1).label("household"),
                    g.from_slot,
                    func.substr(g.record, 1, MAX_COMMAND_BYTES + 1).label("record"),
                    func.substr(g.record_hash, 1, 64).label("record_hash"),
                    g.withdrawn,
                )
                .order_by(g.position)
                .limit(MAX_GOVERNANCE_ROWS + 1)
            ).all()
        if len(raw) > MAX_GOVERNANCE_ROWS:
            raw = raw[:MAX_GOVERNANCE_ROWS]
            problems.append(f"Only the first {MAX_GOVERNANCE_ROWS} governance records are shown.")
        households: dict[str, tuple[str, str]] = {}
        for r in conn.execute(
            select(
                func.substr(h.did, 1, MAX_TEXT_CHARS + 1).label("did"),
                func.substr(h.meter_serial, 1, MAX_TEXT_CHARS).label("meter_serial"),
                func.substr(h.role, 1, 16).label("role"),
            ).order_by(h.did)
        ):
            if isinstance(r.did, str) and len(r.did) <= MAX_TEXT_CHARS:
                households[r.did] = (str(r.meter_serial or ""), str(r.role or ""))
        grid = meta.get("grid")
        decoded: list[tuple[Any, GovernanceRecord | str]] = []
        for r in raw:
            text = r.record
            if not isinstance(text, str):
                decoded.append((r, "the record is not text"))
            elif len(text) > MAX_COMMAND_BYTES:
                decoded.append((r, f"the record exceeds {MAX_COMMAND_BYTES} characters"))
            else:
                decoded.append((r, _decode_governance(text, grid)))
        readable = [rec for _, rec in decoded if not isinstance(rec, str)]
        positions = [_as_int(r.position) for r, rec in decoded if not isinstance(rec, str)]
        first_role_change: dict[str, MemberRole] = {}
        first_swap: dict[str, int] = {}
        for rec in readable:
            if isinstance(rec, ChangeRole):
                first_role_change.setdefault(rec.household, rec.role)
            elif isinstance(rec, ReplaceMeter):
                first_swap.setdefault(rec.household, rec.from_slot)
        fold = _MemberFold(conn, households, first_role_change, first_swap)
        entries = [_entry(r, rec, fold, schedule, problems) for r, rec in decoded]
        members = _members(fold, as_of, schedule)
        rules = _rules_periods(conn, meta.get("config"), readable, positions, schedule, problems)
    return GovernanceOverview(
        entries=entries, members=members, rules=rules, as_of=as_of, problems=problems
    )


def _entry(
    row: Any,
    record: GovernanceRecord | str,
    fold: _MemberFold,
    schedule: Schedule,
    problems: list[str],
) -> GovernanceEntry:
    """The history entry of one ``governance`` row, folding its record into ``fold``."""
    position = _as_int(row.position)
    withdrawn = _as_int(row.withdrawn)
    record_hash = _clip(row.record_hash, 64)
    if isinstance(record, str):
        from_slot = _as_int(row.from_slot)
        problems.append(f"Governance record {position} is unreadable: {record}")
        return GovernanceEntry(
            position=position,
            log_index=_as_int(row.log_index),
            from_slot=from_slot,
            time="—" if from_slot is None or from_slot < 0 else slot_label(schedule, from_slot),
            kind=_clip(row.type, 64) or "?",
            household=_clip(row.household),
            new_household=None,
            role=None,
            meter_serial=None,
            status=UNREADABLE,
            withdrawn=withdrawn,
            detail="",
            problem=record,
            record_hash=record_hash,
        )
    problem = None
    columns = (row.type, row.household, _as_int(row.from_slot))
    household = record.household if isinstance(record, MemberChange) else None
    if columns != (record.type, household, record.from_slot):
        problem = "its type, household or from_slot column differs from the signed record"
        problems.append(f"Governance record {position}: {problem}")
    role = meter = status = None
    try:
        fold.add(record)
    except (ValueError, TypeError) as exc:
        problem = _clip(f"does not fit the history: {exc}", MAX_PROBLEM_CHARS)
        problems.append(f"Governance record {position} {problem}")
    else:
        if household is not None:
            term = fold.gov.terms[household][-1]
            role, meter = fold.role(household, term), fold.meter(household, term)
            status = str(term.status)
    return GovernanceEntry(
        position=position,
        log_index=_as_int(row.log_index),
        from_slot=record.from_slot,
        time=slot_label(schedule, record.from_slot),
        kind=record.type,
        household=household,
        new_household=record.new_household if isinstance(record, RotateKey) else None,
        role=role,
        meter_serial=meter,
        status=status,
        withdrawn=withdrawn,
        detail=_record_detail(record),
        problem=problem,
        record_hash=record_hash,
    )


def _members(fold: _MemberFold, as_of: int, schedule: Schedule) -> list[MemberEntry]:
    """Every household of the ledger (``households`` rows and governance records) as of
    ``as_of``, with what is scheduled for later."""
    out = []
    for did in sorted(set(fold.households) | set(fold.gov.terms)):
        terms = fold.gov.terms.get(did)
        if terms is None:  # a genesis member no record changed
            meter, role = fold.households[did]
            out.append(MemberEntry(did, role or "?", meter or "?", "active", 0, GENESIS_LABEL, ""))
            continue
        now = fold.gov.term_at(did, as_of) or terms[0]
        later = [term for term in terms if term.from_slot > as_of]
        scheduled, before = [], now
        for term in later:
            scheduled.append(f"{_term_change(before, term)} from slot {term.from_slot}")
            before = term
        pending = now.status == MemberStatus.PENDING
        since = None if pending else now.from_slot
        out.append(
            MemberEntry(
                household=did,
                role=fold.role(did, now),
                meter_serial=fold.meter(did, now),
                status=str(now.status),
                since=since,
                since_time=(
                    "—"
                    if since is None
                    else GENESIS_LABEL
                    if since == 0
                    else slot_label(schedule, since)
                ),
                scheduled="; ".join(scheduled),
            )
        )
    out.sort(key=lambda m: (_STATUS_ORDER.get(m.status, 9), m.household))
    return out


def _rule_values(config: MarketConfig) -> dict[str, Any]:
    """The changeable rules of ``config`` (grid fees 0 when this ``MarketConfig`` has none)."""
    return {
        "feed_in_tariff": config.feed_in_tariff,
        "retail_price": config.retail_price,
        "mechanism": config.mechanism,
        "k": f"{config.k.numerator}/{config.k.denominator}",
        "time_of_use": time_of_use_label(config.time_of_use),
        "local_fee": int(getattr(config, "local_fee", 0) or 0),
        "grid_fee": int(getattr(config, "grid_fee", 0) or 0),
    }


def _rules_periods(
    conn: Connection,
    config_text: str | None,
    records: Sequence[GovernanceRecord],
    positions: Sequence[int | None],
    schedule: Schedule,
    problems: list[str],
) -> list[RulesPeriod]:
    """The rules periods of ``records`` over the genesis rules in ``config_text``, with the
    blocks of each period's slots counted by their ``rules`` column."""
    if config_text is None:
        return []
    try:
        base = MarketConfig.from_json(json.loads(config_text))
        periods = rules_periods(base, records)
    except (ValueError, TypeError, ArithmeticError) as exc:  # MarketConfigError is a ValueError
        problems.append(_clip(f"The rules history cannot be folded: {exc}", MAX_PROBLEM_CHARS))
        return []
    by_slot: dict[int, list[int]] = {}
    for position, record in zip(positions, records, strict=True):
        if isinstance(record, ChangeRules) and position is not None:
            by_slot.setdefault(record.from_slot, []).append(position)
    rules_column = has_rules_column(conn)
    b = t.blocks.c
    out: list[RulesPeriod] = []
    previous: dict[str, Any] | None = None
    for i, (from_slot, config) in enumerate(periods):
        upto = periods[i + 1][0] if i + 1 < len(periods) else None
        expected = None if config is base else config.rules_hash()
        counted = [
            func.count().label("n"),
            func.min(b.height).label("h0"),
            func.max(b.height).label("h1"),
            func.min(b.slot).label("s0"),
            func.max(b.slot).label("s1"),
        ]
        # an older ledger without the column: every block was settled under the genesis rules
        q = select(b.rules, *counted).group_by(b.rules) if rules_column else select(*counted)
        q = q.where(b.slot >= from_slot)
        if upto is not None:
            q = q.where(b.slot < upto)
        blocks = other = 0
        h0 = h1 = s0 = s1 = None
        for r in conn.execute(q):
            n = _as_int(r.n) or 0
            if (r.rules if rules_column else None) == expected:
                blocks = n
                h0, h1, s0, s1 = (_as_int(v) for v in (r.h0, r.h1, r.s0, r.s1))
            else:
                other += n
        values = _rule_values(config)
        changed = (
            () if previous is None else tuple(k for k in RULE_FIELDS if values[k] != previous[k])
        )
        previous = values
        out.append(
            RulesPeriod(
                from_slot=from_slot,
                time=GENESIS_LABEL if from_slot == 0 else slot_label(schedule, from_slot),
                **values,
                rules_hash=expected,
                changed=changed,
                records=tuple(by_slot.get(from_slot, ())),
                blocks=blocks,
                first_height=h0,
                last_height=h1,
                first_slot=s0,
                last_slot=s1,
                other_blocks=other,
            )
        )
    return out
