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

import functools
import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import Engine, event, func, select
from sqlalchemy.engine import Connection

from market.schedule import DAY_SECONDS, Schedule
from market.state import (
    MarketConfig,
    MarketConfigError,
    delivery_score_permille,
    offer_share_permille,
    window_add,
)
from node.ledger import schema as t
from node.ledger.queries import (
    FEEDER_FIELDS,
    SlotRow,
    has_feeder_table,
    has_true_up_table,
    load_block_refs,
    load_clearings,
    load_feeder_checks,
    load_household_true_ups,
    load_settlement_sums,
    sum_int,
)
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


def community_figures(rows: Iterable[SlotRow], feed_in: int, retail: int) -> CommunityFigures:
    """Self-sufficiency, self-consumption and savings vs grid-only over settled ``rows``.

    - self-sufficiency = 1 − Σ_s max(I_s − E_s, 0) / Σ_s I_s
    - self-consumption = 1 − Σ_s max(E_s − I_s, 0) / Σ_s E_s
    - grid-only cost = Σ I × retail − Σ E × feed-in (every household alone with the utility)
    - actual cost = Σ trades (buyer price − seller price) × Wh + grid imports × retail −
      grid exports × feed-in (what the ledger settled)
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
        grid_only += slot_imp * retail - slot_exp * feed_in
        actual += (
            r.buyer_pay_wh_price
            - r.seller_get_wh_price
            + r.grid_import_wh * retail
            - r.grid_export_wh * feed_in
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


def bucketed_community(
    rows: Sequence[SlotRow],
    feed_in: int,
    retail: int,
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
        f = community_figures(buckets[first], feed_in, retail)
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
