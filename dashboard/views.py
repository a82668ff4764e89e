"""What each view shows, as plain figures and rows: the bodies of the Dash callbacks.

Every ``*_view`` function takes the :class:`Context` and the view's controls and returns Plotly
figures (``go.Figure``) and lists of flat dicts (tables and CSV). :mod:`dashboard.app` maps them
onto components; ``bench/dashboard_bench.py`` times them and measures their JSON size.

Charts over slots plot against each slot's UTC start on a date axis (the slot number rides along
as ``customdata``: hover text, and what a click on the market chart opens). Windows and buckets
are wall-time spans, turned into slot counts with the context's
:class:`~market.schedule.Schedule` (the node's own type; only its slot length matters here).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import plotly
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from dashboard import data, node_health, statements
from dashboard.node_client import (
    NodePoll,
    NodePolls,
    NodeStatus,
    StatusHistory,
    api_alerts,
    fetch_status,
)
from market.schedule import Schedule
from node.ledger.queries import SlotRow

log = logging.getLogger(__name__)

WINDOW_DAYS: dict[str, int | None] = {"1d": 1, "7d": 7, "30d": 30, "all": None}
"""Market, household and community windows, in days of wall time (None: everything)."""

DEFAULT_WINDOW = "7d"

INITIAL_DAYS = 30
"""Days of slots the slot cache loads on its first refresh (wider windows backfill)."""

MAX_POINTS = 1500
"""Above this many slots a chart shows buckets (minutes, hours, days, weeks) instead of slots."""

BUCKET_SECONDS = (60, 300, 900, 3600, data.DAY_SECONDS, 7 * data.DAY_SECONDS)
"""Wall-time bucket lengths a chart may use (those longer than a slot)."""

COMMUNITY_POINTS = 72
"""At most this many points on the community chart (15-minute slots: hourly up to three days,
then daily): its ratios are only readable over a few dozen buckets."""

STALE_SLOTS = 3
"""Without ``--stale-after``, alert when nothing new reached the ledger for this many slots (a
gate closes every slot, so even a grid without trades changes its ledger each slot)."""


def window_slots(window: str, schedule: Schedule) -> int | None:
    """The newest N slots a window preset covers (None: everything); unknown presets are 7d."""
    days = WINDOW_DAYS.get(window, WINDOW_DAYS[DEFAULT_WINDOW])
    return None if days is None else days * schedule.slots_per_day


def bucket_sizes(schedule: Schedule) -> list[int]:
    """Candidate bucket sizes in slots: 1, then 1 min, 5 min, 15 min, 1 h, 1 day, 1 week of
    slots where that is longer than one slot (900 s slots: 1, 4, 96, 672)."""
    sizes = [1]
    for seconds in BUCKET_SECONDS:
        n = schedule.slots_in(seconds)
        if n > sizes[-1]:
            sizes.append(n)
    return sizes


def _bucket_size(n: int, schedule: Schedule, max_points: int = MAX_POINTS) -> int:
    """The smallest bucket size that draws ``n`` slots in at most ``max_points`` points."""
    size = 1
    for size in bucket_sizes(schedule):
        if n / size <= max_points:
            break
    return size


def bucket_label(size: int, schedule: Schedule) -> str:
    """What a bucket of ``size`` slots is called on an axis: "per slot", "per hour", ..."""
    if size == 1:
        return "per slot"
    seconds = size * schedule.slot_seconds
    for length, name in ((7 * data.DAY_SECONDS, "week"), (data.DAY_SECONDS, "day"),
                         (3600, "hour"), (60, "minute")):  # fmt: skip
        if seconds % length == 0:
            n = seconds // length
            return f"per {name}" if n == 1 else f"per {n} {name}s"
    return f"per {seconds} s"


def _time_axis(schedule: Schedule, title: str) -> dict[str, Any]:
    """A date x axis over slot starts (UTC) with the schedule's hover format."""
    return {"type": "date", "hoverformat": data.time_format(schedule), "title": {"text": title}}


def _axis_title(schedule: Schedule, size: int) -> str:
    per = "" if size == 1 else f", per {data.duration_label(schedule, size)}"
    return f"slot start (UTC){per}"


COLORS = {
    "price": "#1f77b4",
    "local": "#2ca02c",
    "grid_in": "#d62728",
    "grid_out": "#ff7f0e",
    "bid": "#9467bd",
    "ask": "#8c564b",
    "participants": "#7f7f7f",
}


SLOT_OVERRIDE = "override"
SLOT_LEDGER = "ledger"
SLOT_API = "api"
SLOT_DEFAULT = "default"
SLOT_SOURCES = {
    SLOT_OVERRIDE: "from --slot-seconds",
    SLOT_LEDGER: "from the ledger's schedule",
    SLOT_API: "from the node's /status",
    SLOT_DEFAULT: "the genesis default",
}
"""How the page and the log name each source of the slot length."""


@dataclass
class Context:
    """Everything a view needs: the read-only engine, caches and the API client state."""

    db_url: str
    engine: Engine
    api_url: str | None = None
    node_apis: tuple[str, ...] = ()
    """The household nodes' status APIs (``--node-api``): their forecasts and clocks."""
    schedule: Schedule = field(default_factory=Schedule)
    """The grid's slots in wall time (only :attr:`~market.schedule.Schedule.slot_seconds` is
    used; the gate and settlement timings are the genesis defaults): see :attr:`slot_source`."""
    slot_source: str = SLOT_DEFAULT
    """Where :attr:`schedule`'s slot length comes from, strongest first: :data:`SLOT_OVERRIDE`
    (``--slot-seconds``), :data:`SLOT_LEDGER` (the ledger's ``schedule`` meta), :data:`SLOT_API`
    (the node's ``/status``, for a ledger that does not record its schedule), :data:`SLOT_DEFAULT`
    (the genesis default, with a notice). :meth:`open` and :func:`head_view` read the ledger,
    :func:`poll_api` the node."""
    settle_lag_slots: int = 4
    stale_after_s: float | None = None
    """Alert when nothing new reached the ledger for this long (None: STALE_SLOTS slots)."""
    alert_window_slots: int | None = None
    """Slots the ``slot_not_cleared`` alert looks back over (None: one day of the schedule's)."""
    api_timeout: float = 1.5
    slots: data.SlotCache = field(init=False)
    verify: data.VerifyCache = field(init=False)
    records: data.HouseholdRecords = field(init=False)
    nodes: NodePolls = field(init=False)
    """The newest poll of ``api_url`` and of each of ``node_apis``."""
    history: StatusHistory = field(default_factory=StatusHistory)
    verify_interval: float = 60.0
    verify_enabled: bool = True
    """Verify the ledger in the background when its head changes (off only for the bench)."""
    _info: data.LedgerInfo | None = None
    _head_key: Any = None
    _head_changed_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cache: dict[Any, Any] = field(default_factory=dict)
    """Results of the statement and node views by (view, head, controls): a few entries."""

    def __post_init__(self) -> None:
        urls = ((self.api_url,) if self.api_url else ()) + tuple(self.node_apis)
        self.nodes = NodePolls(urls, timeout=self.api_timeout)
        self.slots = data.SlotCache(
            self.engine, initial_slots=INITIAL_DAYS * self.schedule.slots_per_day
        )
        self.verify = data.VerifyCache(self.db_url, min_interval=self.verify_interval)
        self.records = data.HouseholdRecords(self.engine)

    def stale_after(self) -> float:
        """Seconds without anything new in the ledger before the ``ledger_stale`` alert."""
        if self.stale_after_s is not None:
            return self.stale_after_s
        return float(STALE_SLOTS * self.schedule.slot_seconds)

    def use_slot_seconds(self, slot_seconds: int, source: str = SLOT_API) -> bool:
        """Switch to another slot length (the ledger's schedule or the node's ``/status`` says
        so); True if it changed."""
        with self._lock:
            changed = slot_seconds != self.schedule.slot_seconds
            if changed or source != self.slot_source:
                log.log(
                    logging.INFO if source == SLOT_LEDGER else logging.WARNING,
                    "slot length %d s (%s) replaces %d s (%s)",
                    slot_seconds,
                    SLOT_SOURCES.get(source, source),
                    self.schedule.slot_seconds,
                    SLOT_SOURCES.get(self.slot_source, self.slot_source),
                )
            self.slot_source = source
            if not changed:
                return False
            self.schedule = Schedule(slot_seconds)
            self.slots.initial_slots = INITIAL_DAYS * self.schedule.slots_per_day
            return True

    def alert_window(self) -> int:
        """Slots the ledger alerts look back over."""
        if self.alert_window_slots is not None:
            return self.alert_window_slots
        return self.schedule.slots_per_day

    def learn_schedule(self) -> bool:
        """Take the slot length from the ledger's ``schedule`` meta unless ``--slot-seconds``
        overrides it or it was read already; True if the schedule changed. A ledger that is
        missing or unreadable, or records no schedule (yet), leaves the schedule as it is."""
        if self.slot_source in (SLOT_OVERRIDE, SLOT_LEDGER):
            return False
        try:
            seconds = data.ledger_slot_seconds(self.engine)
        except SQLAlchemyError:
            return False
        if seconds is None:
            return False
        return self.use_slot_seconds(seconds, SLOT_LEDGER)

    def slot_notice(self) -> str | None:
        """What the page says when the slot length is only the genesis default."""
        if self.slot_source != SLOT_DEFAULT:
            return None
        return (
            "The ledger does not record its grid's slot length (its node records it on its "
            f"next start): assuming the genesis default of {self.schedule.slot_seconds} s slots. "
            "Start the dashboard with --api (the node's slot length) or --slot-seconds to "
            "say otherwise."
        )

    @classmethod
    def open(
        cls,
        db_url: str,
        api_url: str | None = None,
        *,
        slot_seconds: int | None = None,
        **kwargs: Any,
    ) -> Context:
        """A context on the ledger at ``db_url`` (opened read-only).

        The slot length is ``slot_seconds`` (or ``schedule``) when given, an override; otherwise
        the ledger's ``schedule`` meta, else the node's ``/status`` (:func:`poll_api`), else the
        genesis default (900 s, with :meth:`slot_notice`)."""
        if slot_seconds is not None:
            kwargs["schedule"] = Schedule(slot_seconds)
        if "schedule" in kwargs:
            kwargs.setdefault("slot_source", SLOT_OVERRIDE)
        ctx = cls(db_url=db_url, engine=data.open_engine(db_url), api_url=api_url, **kwargs)
        ctx.learn_schedule()
        return ctx

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def info(self) -> data.LedgerInfo:
        """Ledger meta (grid, tariffs), read once it exists."""
        with self._lock:
            if self._info is None or not self._info.genesis_hash:
                self._info = data.ledger_info(self.engine)
            return self._info


# --- header / polling -------------------------------------------------------------------------


def head_view(ctx: Context) -> dict[str, Any]:
    """The head of the ledger plus verification state: changes whenever a view must redraw.

    Also refreshes the slot cache and starts a background verification when one is due.
    """
    head = data.head_info(ctx.engine)
    ctx.learn_schedule()  # a ledger the node opened (or restarted on) after the dashboard
    if ctx.verify_enabled:
        ctx.verify.poke(head.key())
    ctx.slots.refresh()
    status = ctx.verify.status()
    now = time.time()
    if head.key() != ctx._head_key:
        ctx._head_key, ctx._head_changed_at = head.key(), now
    return {
        "height": head.height,
        "head_hash": head.head_hash,
        "settled_through": head.settled_through,
        "closed_through": head.closed_through,
        "verify_state": status["state"],
        "verify_finished_at": status.get("finished_at"),
        "slot_seconds": ctx.schedule.slot_seconds,
        "stale_since": (
            ctx._head_changed_at if now - ctx._head_changed_at > ctx.stale_after() else None
        ),
    }


def poll_api(ctx: Context) -> dict[str, Any]:
    """Poll the node's status API once (when configured) and record it in the history."""
    if not ctx.api_url:
        return {"configured": False}
    status = fetch_status(ctx.api_url, timeout=ctx.api_timeout)
    ctx.history.add(status)
    ctx.nodes.record(ctx.api_url, status)
    if (
        status.reachable
        and status.slot_seconds is not None
        and ctx.slot_source in (SLOT_API, SLOT_DEFAULT)  # the ledger and the override win
    ):
        ctx.use_slot_seconds(status.slot_seconds, SLOT_API)
    # the forecast and clock sections stay here (the nodes section reads ctx.nodes): the store
    # travels to the browser and back with every refresh
    doc = {k: v for k, v in status.as_dict().items() if k not in ("forecast", "clock")}
    return {"configured": True, **doc}


def poll_status(ctx: Context) -> dict[str, Any]:
    """Poll the node's status API (:func:`poll_api`) and the household nodes' (:func:`poll_nodes`,
    as ``nodes``): the one poll of each refresh, so the page's status views redraw once."""
    return {**poll_api(ctx), "nodes": poll_nodes(ctx)}


# --- market -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChartPoints:
    """The points a chart over slots draws: single slots, or wall-time buckets of slots."""

    bucket_size: int
    """Slots per point (1: one point per slot)."""
    points: list[dict[str, Any]]
    """One flat dict per point, oldest first (``slot``: its first slot, ``time``: its label)."""


def _bucket(rows: list[SlotRow], schedule: Schedule) -> ChartPoints:
    """Rows as chart points: single slots, or wall-time buckets above MAX_POINTS slots."""
    size = _bucket_size(len(rows), schedule)
    if size == 1:
        return ChartPoints(1, [data.slot_row_dict(r, schedule) for r in rows])
    out: dict[int, dict[str, Any]] = {}
    weighted: dict[int, list[int]] = {}
    for r in rows:
        key = r.slot // size * size
        b = out.setdefault(
            key,
            {
                "slot": key,
                "time": data.slot_label(schedule, key),
                "price": None,
                "local_wh": 0,
                "grid_import_wh": 0,
                "grid_export_wh": 0,
                "true_up_import_wh": 0,
                "true_up_export_wh": 0,
                "unmatched_bid_wh": 0,
                "unmatched_ask_wh": 0,
                "participants": 0,
                "orders": 0,
            },
        )
        b["local_wh"] += r.volume_wh
        b["grid_import_wh"] += r.grid_import_wh
        b["grid_export_wh"] += r.grid_export_wh
        b["true_up_import_wh"] += r.true_up_import_wh
        b["true_up_export_wh"] += r.true_up_export_wh
        b["unmatched_bid_wh"] += r.unmatched_bid_wh
        b["unmatched_ask_wh"] += r.unmatched_ask_wh
        b["participants"] = max(b["participants"], r.participants)
        b["orders"] += r.order_count
        if r.price is not None and r.volume_wh:
            w = weighted.setdefault(key, [0, 0])
            w[0] += r.price * r.volume_wh
            w[1] += r.volume_wh
    for key, (num, den) in weighted.items():
        out[key]["price"] = round(num / den, 2)
    return ChartPoints(size, [out[k] for k in sorted(out)])


@functools.lru_cache(maxsize=8)
def _market_layout(price_title: str, x_title: str, hoverformat: str) -> str:
    """The three stacked subplots' layout (built once by make_subplots, kept as JSON)."""
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        row_heights=[0.4, 0.4, 0.2],
        subplot_titles=(
            price_title,
            "Energy (Wh): local trades, with the grid, unmatched orders",
            "Participants",
        ),
    )
    fig.update_layout(
        barmode="group",
        height=620,
        margin={"l": 60, "r": 20, "t": 40, "b": 40},
        legend={"orientation": "h", "y": -0.12},
        hovermode="x unified",
        template="plotly_white",
    )
    fig.update_xaxes(type="date", hoverformat=hoverformat)
    fig.update_xaxes(title_text=x_title, row=3)
    return json.dumps(fig.to_plotly_json()["layout"], cls=plotly.utils.PlotlyJSONEncoder)


@dataclass(frozen=True, slots=True)
class MarketView:
    """The market chart and the points it draws."""

    figure: dict[str, Any]
    """Price, volumes and participants per point (a plain Plotly figure dict)."""
    points: list[dict[str, Any]]
    """The chart's points (slots, or buckets of slots): the table and CSV rows."""


def market_view(ctx: Context, window: str) -> MarketView:
    """Clearing price with tariff lines, local vs grid volume, unmatched volume, participants.

    The figure is a plain dict (traces without plotly's per-property validation: a year of
    slots costs milliseconds, not a second). x is each point's UTC start on a date axis;
    ``customdata`` is its slot number (a bucket's first slot), which a click opens.
    """
    info = ctx.info()
    schedule = ctx.schedule
    rows = ctx.slots.window(window_slots(window, schedule))
    chart = _bucket(rows, schedule)
    size, points = chart.bucket_size, chart.points
    xs = [p["time"] for p in points]
    slots = [p["slot"] for p in points]
    layout = json.loads(
        _market_layout(
            "Clearing price (cents/kWh)" + (" — volume-weighted per bucket" if size > 1 else ""),
            _axis_title(schedule, size),
            data.time_format(schedule),
        )
    )
    layout["uirevision"] = f"market-{window}-{schedule.slot_seconds}"
    hover = "%{y} · slot %{customdata}<extra>%{fullData.name}</extra>"
    data_: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "x": xs,
            "y": [p["price"] for p in points],
            "customdata": slots,
            "name": "clearing price",
            "mode": "lines+markers",
            "line": {"color": COLORS["price"], "shape": "hv"},
            "marker": {"size": 4},
            "connectgaps": False,
            "hovertemplate": hover,
            "xaxis": "x",
            "yaxis": "y",
        }
    ]
    for value, name, dash in (
        (info.retail_price, "retail price (cap)", "dash"),
        (info.feed_in_tariff, "feed-in tariff (floor)", "dot"),
    ):
        data_.append(
            {
                "type": "scatter",
                "x": [xs[0], xs[-1]] if xs else [],
                "y": [value, value] if xs else [],
                "name": f"{name} {value}",
                "mode": "lines",
                "line": {"color": "#444", "dash": dash, "width": 1},
                "hoverinfo": "skip",
                "xaxis": "x",
                "yaxis": "y",
            }
        )
    for key, name, color in (
        ("local_wh", "traded locally", COLORS["local"]),
        ("grid_import_wh", "from grid (imbalance, true-ups)", COLORS["grid_in"]),
        ("grid_export_wh", "to grid (imbalance, true-ups)", COLORS["grid_out"]),
    ):
        data_.append(
            {
                "type": "bar",
                "x": xs,
                "y": [p[key] for p in points],
                "customdata": slots,
                "name": name,
                "marker": {"color": color},
                "hovertemplate": hover,
                "xaxis": "x2",
                "yaxis": "y2",
            }
        )
    for key, name, color in (
        ("unmatched_bid_wh", "unmatched bids", COLORS["bid"]),
        ("unmatched_ask_wh", "unmatched asks", COLORS["ask"]),
    ):
        data_.append(
            {
                "type": "scatter",
                "x": xs,
                "y": [p[key] for p in points],
                "customdata": slots,
                "name": name,
                "mode": "lines",
                "line": {"color": color, "width": 1.5},
                "hovertemplate": hover,
                "xaxis": "x2",
                "yaxis": "y2",
            }
        )
    data_.append(
        {
            "type": "bar",
            "x": xs,
            "y": [p["participants"] for p in points],
            "customdata": slots,
            "name": "participants",
            "marker": {"color": COLORS["participants"]},
            "hovertemplate": hover,
            "xaxis": "x3",
            "yaxis": "y3",
        }
    )
    return MarketView(figure={"data": data_, "layout": layout}, points=points)


# --- order book -------------------------------------------------------------------------------


def default_book_slot(ctx: Context) -> int | None:
    """The newest slot with a trade, else the newest slot whose gate closed."""
    if ctx.slots.traded_through is not None:
        return ctx.slots.traded_through
    return ctx.slots.cleared_through


@dataclass(frozen=True, slots=True)
class OrderBookView:
    """One slot's order book: its chart, a one-line summary and its orders."""

    figure: go.Figure
    """Supply and demand step curves with the clearing point and the tariff lines."""
    summary: str
    """What happened in the slot, in one line (bids, asks, cleared volume and price)."""
    orders: list[dict[str, Any]]
    """Every order of the slot (bids highest price first, then asks lowest first): the CSV."""


def orderbook_view(ctx: Context, slot: int | None) -> OrderBookView:
    """Supply and demand step curves of one slot with its clearing point."""
    if slot is None:
        slot = default_book_slot(ctx)
    fig = go.Figure()
    fig.update_layout(
        height=420,
        margin={"l": 60, "r": 20, "t": 40, "b": 50},
        template="plotly_white",
        xaxis_title="cumulative energy (Wh)",
        yaxis_title="price (cents/kWh)",
        uirevision=f"book-{slot}",
    )
    if slot is None:
        return OrderBookView(fig, "No slot has closed yet.", [])
    book = data.order_book(ctx.engine, slot)
    for orders, name, color in (
        (book.asks, "supply (asks)", COLORS["ask"]),
        (book.bids, "demand (bids)", COLORS["bid"]),
    ):
        curve = data.step_curve(orders)
        fig.add_trace(
            go.Scatter(
                x=curve.energy_wh, y=curve.price, name=name, mode="lines", line={"color": color}
            )
        )
    if book.volume_wh and book.price is not None:
        fig.add_trace(
            go.Scatter(
                x=[book.volume_wh],
                y=[book.price],
                name=f"clearing {book.volume_wh} Wh @ {book.price}",
                mode="markers",
                marker={"size": 12, "color": "#000", "symbol": "x"},
            )
        )
    elif book.volume_wh:
        fig.add_vline(x=book.volume_wh, line_dash="dash", annotation_text="traded volume")
    info = ctx.info()
    fig.add_hline(y=info.retail_price, line_dash="dash", line_width=1, line_color="#888")
    fig.add_hline(y=info.feed_in_tariff, line_dash="dot", line_width=1, line_color="#888")
    fig.update_layout(
        title=f"Order book of slot {slot} ({data.slot_label(ctx.schedule, slot)} UTC)"
    )
    if not book.cleared:
        summary = f"Slot {slot}: gate not closed (no clearing recorded)."
    elif book.volume_wh == 0:
        summary = (
            f"Slot {slot}: {len(book.bids)} bids, {len(book.asks)} asks — no trade "
            f"({book.mechanism})."
        )
    else:
        price = "—" if book.price is None else f"{book.price} cents/kWh"
        summary = (
            f"Slot {slot}: {len(book.bids)} bids, {len(book.asks)} asks — cleared "
            f"{book.volume_wh} Wh at {price} ({book.mechanism})."
        )
    rows = [{"slot": slot, **o, "household": o["household"]} for o in [*book.bids, *book.asks]]
    return OrderBookView(figure=fig, summary=summary, orders=rows)


# --- households -------------------------------------------------------------------------------


HOUSEHOLD_KEYS = (
    "metered_import_wh",
    "metered_export_wh",
    "traded_buy_wh",
    "traded_sell_wh",
    "imbalance_wh",
    "true_up_slots",
    "true_up_import_wh",
    "true_up_export_wh",
)


def _bucket_household(slots: list[dict[str, Any]], schedule: Schedule) -> ChartPoints:
    """A household's slots as chart points: single slots, or sums per wall-time bucket."""
    size = _bucket_size(len(slots), schedule)
    if size == 1:
        return ChartPoints(1, slots)
    out: dict[int, dict[str, Any]] = {}
    for r in slots:
        key = r["slot"] // size * size
        b = out.get(key)
        if b is None:
            b = out[key] = {
                "slot": key,
                "time": data.slot_label(schedule, key),
                **dict.fromkeys(HOUSEHOLD_KEYS, 0),
            }
        for k in HOUSEHOLD_KEYS:
            b[k] += r[k]
    return ChartPoints(size, [out[k] for k in sorted(out)])


@dataclass(frozen=True, slots=True)
class HouseholdsView:
    """Every household's figures and the chosen household's slots."""

    figure: dict[str, Any]
    """Metered vs traded energy of :attr:`household` per point (a plain Plotly figure dict)."""
    summary: list[dict[str, Any]]
    """One row per household (:func:`dashboard.data.household_summary`): the table."""
    slots: list[dict[str, Any]]
    """Every settled slot of :attr:`household` in the window (unbucketed): the CSV."""
    household: str | None
    """The household shown: the one asked for if it exists, else the first (None: none)."""


def households_view(ctx: Context, household: str | None, window: str) -> HouseholdsView:
    """Table of every household and per-slot metered vs traded energy of the chosen one.

    Windows longer than MAX_POINTS slots are drawn as sums per wall-time bucket (the CSV keeps
    every slot). x is the slots' UTC start; the figure is a plain dict, like the market's.
    """
    schedule = ctx.schedule
    summary = data.household_summary(ctx.engine, ctx.records)
    if household is None or household not in {r["household"] for r in summary}:
        household = summary[0]["household"] if summary else None
    layout: dict[str, Any] = {
        "height": 420,
        "margin": {"l": 60, "r": 20, "t": 40, "b": 40},
        "template": _template(),
        "barmode": "relative",
        "hovermode": "x unified",
        "uirevision": f"household-{household}-{window}-{schedule.slot_seconds}",
        "yaxis": {"title": {"text": "Wh (export up, import down)"}},
        "xaxis": _time_axis(schedule, "slot start (UTC)"),
        "legend": {"orientation": "h", "y": -0.22},
    }
    if household is None:
        return HouseholdsView({"data": [], "layout": layout}, summary, [], None)
    n = window_slots(window, schedule)
    first = None
    if n is not None and ctx.slots.settled_through is not None:
        first = ctx.slots.settled_through - n + 1
    slots = data.household_slots(ctx.engine, household, first, schedule=schedule)
    chart = _bucket_household(slots, schedule)
    size, points = chart.bucket_size, chart.points
    xs = [r["time"] for r in points]
    numbers = [r["slot"] for r in points]
    layout["xaxis"] = _time_axis(schedule, _axis_title(schedule, size))
    hover = "%{y} · slot %{customdata}<extra>%{fullData.name}</extra>"
    traces: list[dict[str, Any]] = []
    for key, name, color, sign in (
        ("metered_export_wh", "metered export", "#2ca02c", 1),
        ("metered_import_wh", "metered import", "#d62728", -1),
        # counter movement over earlier unmeasured slots, settled by this slot's reading
        ("true_up_export_wh", "trued-up export", "#98df8a", 1),
        ("true_up_import_wh", "trued-up import", "#ff9896", -1),
    ):
        traces.append(
            {
                "type": "bar",
                "x": xs,
                "y": [sign * r[key] for r in points],
                "customdata": numbers,
                "hovertemplate": hover,
                "name": name,
                "marker": {"color": color},
            }
        )
    for key, name, color, sign in (
        ("traded_sell_wh", "sold (traded)", "#17becf", 1),
        ("traded_buy_wh", "bought (traded)", "#9467bd", -1),
    ):
        traces.append(
            {
                "type": "scatter",
                "x": xs,
                "y": [sign * r[key] for r in points],
                "customdata": numbers,
                "hovertemplate": hover,
                "name": name,
                "mode": "lines",
                "line": {"color": color, "shape": "hv"},
            }
        )
    traces.append(
        {
            "type": "scatter",
            "x": xs,
            "y": [r["imbalance_wh"] for r in points],
            "customdata": numbers,
            "hovertemplate": hover,
            "name": "imbalance (to grid +)",
            "mode": "markers",
            "marker": {"color": "#000", "size": 4},
        }
    )
    per = "" if size == 1 else f" (sums per {data.duration_label(schedule, size)})"
    layout["title"] = {"text": f"Household {data.short_did(household)}: metered vs traded{per}"}
    return HouseholdsView(
        figure={"data": traces, "layout": layout}, summary=summary, slots=slots, household=household
    )


@functools.lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    """The plotly_white template as a plain dict (for figures built without validation)."""
    import plotly.io as pio

    return pio.templates["plotly_white"].to_plotly_json()


# --- community --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommunityView:
    """The community's figures over a window, and per wall-time bucket."""

    figures: data.CommunityFigures
    """Self-sufficiency, self-consumption, costs and savings over the whole window."""
    figure: go.Figure
    """The ratios and savings per bucket."""
    buckets: list[dict[str, Any]]
    """One row per bucket (:func:`dashboard.data.bucketed_community`): the CSV."""


def community_view(ctx: Context, window: str) -> CommunityView:
    """Self-sufficiency, self-consumption and savings over the window, and per wall-time
    bucket: the smallest of :func:`bucket_sizes` that draws the window's span in at most
    COMMUNITY_POINTS points (15-minute slots: per hour up to three days, then per day)."""
    info = ctx.info()
    schedule = ctx.schedule
    rows = ctx.slots.window(window_slots(window, schedule))
    tariffs_at = data.tariffs_in_force(ctx.engine, info)
    figures = data.community_figures(rows, tariffs_at)
    span = (rows[-1].slot - rows[0].slot + 1) if rows else 0
    per = _bucket_size(span, schedule, COMMUNITY_POINTS)
    daily = data.bucketed_community(rows, tariffs_at, per, schedule=schedule)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    days = [d["time"] for d in daily]
    for key, name, color in (
        ("self_sufficiency", "self-sufficiency", "#2ca02c"),
        ("self_consumption", "self-consumption", "#1f77b4"),
    ):
        fig.add_trace(
            go.Scatter(
                x=days,
                y=[None if d[key] is None else round(100 * d[key], 2) for d in daily],
                name=f"{name} (%)",
                mode="lines+markers",
                line={"color": color},
            ),
            secondary_y=False,
        )
    fig.add_trace(
        go.Bar(
            x=days,
            y=[d["savings_cents"] / 100 for d in daily],
            name="savings vs grid-only (currency units)",
            customdata=[d["slot"] for d in daily],
            hovertemplate="%{y:.2f} · from slot %{customdata}<extra>savings</extra>",
            marker_color="#bcbd22",
            opacity=0.6,
        ),
        secondary_y=True,
    )
    fig.update_layout(
        height=380,
        margin={"l": 60, "r": 60, "t": 30, "b": 40},
        template="plotly_white",
        uirevision=f"community-{window}-{schedule.slot_seconds}",
        legend={"orientation": "h", "y": -0.2},
        xaxis=_time_axis(schedule, "UTC, " + bucket_label(per, schedule)),
    )
    fig.update_yaxes(title_text="%", range=[0, 100], secondary_y=False)
    fig.update_yaxes(title_text="savings", secondary_y=True)
    return CommunityView(figures=figures, figure=fig, buckets=daily)


# --- feeder check -----------------------------------------------------------------------------


def _feeder_points(rows: list[SlotRow], schedule: Schedule) -> ChartPoints:
    """Settled slots with a feeder check as chart points: single slots, or sums per wall-time
    bucket above MAX_POINTS slots.

    A slot's households' net is the figure its check compared (ok/mismatch), else the
    settlements' Σ import − export. A bucket sums both over its compared slots only (feeder
    net None when none compared), and counts its mismatches.
    """
    checked = [r for r in rows if r.settled and r.feeder_status is not None]
    size = _bucket_size(len(checked), schedule)
    out: dict[int, dict[str, Any]] = {}
    for r in checked:
        compared = r.feeder_net_wh is not None
        households = (
            r.feeder_households_net_wh
            if compared and r.feeder_households_net_wh is not None
            else r.import_wh - r.export_wh
        )
        mismatch = r.feeder_status == "mismatch"
        if size == 1:
            out[r.slot] = {
                "slot": r.slot,
                "time": data.slot_label(schedule, r.slot),
                "status": r.feeder_status,
                "feeder_net_wh": r.feeder_net_wh,
                "households_net_wh": households,
                "difference_wh": r.feeder_difference_wh,
                "allowed_loss_wh": r.feeder_allowed_loss_wh,
                "mismatches": int(mismatch),
            }
            continue
        key = r.slot // size * size
        b = out.setdefault(
            key,
            {
                "slot": key,
                "time": data.slot_label(schedule, key),
                "status": "",
                "feeder_net_wh": None,
                "households_net_wh": None,
                "difference_wh": None,
                "allowed_loss_wh": None,
                "mismatches": 0,
            },
        )
        b["mismatches"] += int(mismatch)
        b["status"] = "mismatch" if b["mismatches"] else "checked"
        if compared:
            for k, v in (
                ("feeder_net_wh", r.feeder_net_wh),
                ("households_net_wh", households),
                ("difference_wh", r.feeder_difference_wh),
            ):
                b[k] = (b[k] or 0) + (v or 0)
    return ChartPoints(size, [out[k] for k in sorted(out)])


@dataclass(frozen=True, slots=True)
class FeederView:
    """The feeder meter next to the households' meters."""

    figure: dict[str, Any] | None
    """Feeder vs households' net import per point (a plain Plotly figure dict); None when no
    slot of the window has a feeder check."""
    points: list[dict[str, Any]]
    """The chart's points (slots, or sums per bucket)."""


def feeder_view(ctx: Context, window: str) -> FeederView:
    """The feeder meter's net import per slot next to the households' metered net, mismatching
    slots marked (a red cross on the feeder's bar, the difference in its hover text).

    Its figure is None (and it has no points) when no slot of the window has a feeder check: a
    grid without a feeder meter (or a ledger older than the ``feeder_checks`` table) shows
    nothing new. The figure is a plain dict; x is the slots' UTC start, ``customdata`` the slot
    number.
    """
    schedule = ctx.schedule
    rows = ctx.slots.window(window_slots(window, schedule))
    chart = _feeder_points(rows, schedule)
    size, points = chart.bucket_size, chart.points
    if not points:
        return FeederView(None, [])
    xs = [p["time"] for p in points]
    slots = [p["slot"] for p in points]
    hover = "%{y} Wh · slot %{customdata}<extra>%{fullData.name}</extra>"
    bad = [p for p in points if p["mismatches"]]
    traces: list[dict[str, Any]] = [
        {
            "type": "bar",
            "x": xs,
            "y": [p["feeder_net_wh"] for p in points],
            "customdata": slots,
            "hovertemplate": hover,
            "name": "feeder meter: net import",
            "marker": {"color": "#1f77b4"},
        },
        {
            "type": "scatter",
            "x": xs,
            "y": [p["households_net_wh"] for p in points],
            "customdata": slots,
            "hovertemplate": hover,
            "name": "households' meters: net import",
            "mode": "lines+markers",
            "line": {"color": "#ff7f0e"},
            "marker": {"size": 5},
        },
        {
            "type": "scatter",
            "x": [p["time"] for p in bad],
            "y": [
                p["feeder_net_wh"] if p["feeder_net_wh"] is not None else p["households_net_wh"]
                for p in bad
            ],
            "customdata": [[p["slot"], p["difference_wh"], p["mismatches"]] for p in bad],
            "hovertemplate": (
                "slot %{customdata[0]}: difference %{customdata[1]} Wh"
                "<extra>feeder mismatch</extra>"
            ),
            "name": "feeder mismatch",
            "mode": "markers",
            "marker": {"color": "#c62828", "symbol": "x", "size": 12},
        },
    ]
    per = (
        ""
        if size == 1
        else f" (sums per {data.duration_label(schedule, size)} over the compared slots)"
    )
    layout: dict[str, Any] = {
        "height": 320,
        "margin": {"l": 60, "r": 20, "t": 40, "b": 40},
        "template": _template(),
        "hovermode": "closest",
        "uirevision": f"feeder-{window}-{schedule.slot_seconds}",
        "title": {"text": f"Feeder meter vs households' meters: net import, Wh{per}"},
        "xaxis": _time_axis(schedule, _axis_title(schedule, size)),
        "yaxis": {"title": {"text": "Wh (import +, export −)"}},
        "legend": {"orientation": "h", "y": -0.25},
    }
    return FeederView(figure={"data": traces, "layout": layout}, points=points)


def feeder_summary_view(ctx: Context) -> data.FeederSummary | None:
    """The feeder checks of the alert window counted by status (None: no feeder)."""
    return data.feeder_summary(ctx.slots.window(ctx.alert_window()))


# --- ledger -----------------------------------------------------------------------------------


def ledger_view(ctx: Context) -> dict[str, Any]:
    """Height, head hash, verification status, latest blocks and transactions."""
    head = data.head_info(ctx.engine)
    return {
        "height": head.height,
        "head_hash": head.head_hash,
        "settled_through": head.settled_through,
        "closed_through": head.closed_through,
        "transactions": data.transaction_count(ctx.engine),
        "verify": ctx.verify.status(),
        "blocks": data.latest_blocks(ctx.engine, 10, schedule=ctx.schedule),
        "latest_transactions": data.latest_transactions(ctx.engine, 15),
    }


# --- consensus and network ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetworkView:
    """The node's latest status and the consensus charts."""

    latest: NodeStatus | None
    """The newest poll of the node's status API (None: not polled, or no API)."""
    invalid_figure: go.Figure
    """Invalid gossip messages by reason."""
    lag_figure: go.Figure
    """Commit and apply lag over the dashboard's polls."""


def network_view(ctx: Context) -> NetworkView:
    """Latest node status and two charts: invalid messages by reason, lag over time."""
    latest = ctx.history.latest()
    bars = go.Figure()
    bars.update_layout(
        height=300,
        margin={"l": 60, "r": 20, "t": 40, "b": 60},
        template="plotly_white",
        title="Invalid messages by reason",
        uirevision="invalid",
    )
    if latest is not None and latest.reachable:
        reasons = sorted(latest.invalid_messages)
        bars.add_trace(
            go.Bar(
                x=reasons,
                y=[latest.invalid_messages[k] for k in reasons],
                marker_color="#d62728",
                name="invalid",
            )
        )
    lag = go.Figure()
    polls = [p for p in ctx.history.polls() if p.reachable]
    ts = [time.strftime("%H:%M:%S", time.gmtime(p.fetched_at)) for p in polls]
    for key, name in (("commit_lag", "commit lag"), ("apply_lag", "apply lag")):
        lag.add_trace(
            go.Scatter(x=ts, y=[getattr(p, key) for p in polls], name=name, mode="lines+markers")
        )
    lag.update_layout(
        height=300,
        margin={"l": 60, "r": 20, "t": 40, "b": 60},
        template="plotly_white",
        title="Commit / apply lag (log entries) over the dashboard's polls (UTC)",
        uirevision="lag",
    )
    return NetworkView(latest=latest, invalid_figure=bars, lag_figure=lag)


def alerts_view(ctx: Context) -> list[dict[str, str]]:
    """Every current alert: ledger ones and, when an API is configured, consensus ones."""
    head = data.head_info(ctx.engine)
    recent = ctx.slots.window(ctx.alert_window())
    alerts = data.ledger_alerts(
        recent, head, ctx.verify.status(), ctx.settle_lag_slots, schedule=ctx.schedule
    )
    if ctx._head_key is not None and time.time() - ctx._head_changed_at > ctx.stale_after():
        since = time.strftime("%H:%M:%S", time.gmtime(ctx._head_changed_at))
        alerts.append(
            {
                "level": "warning",
                "code": "ledger_stale",
                "message": (
                    f"Nothing new reached the ledger since {since} UTC "
                    f"({(time.time() - ctx._head_changed_at) / 60:.0f} min): is the node applying?"
                ),
            }
        )
    latest = ctx.history.latest()
    alerts.extend(api_alerts(latest, bool(ctx.api_url)))
    polls = ctx.nodes.latest()
    alerts.extend(node_health.unreachable_alerts([p for p in polls if p.url != ctx.api_url]))
    alerts.extend(node_health.clock_alerts(node_health.clock_rows(polls, _labels(ctx))))
    if (
        latest is not None
        and latest.reachable
        and latest.last_reading_slot is not None
        and latest.last_reading_slot - (head.settled_through or -1) > ctx.settle_lag_slots
        and not any(a["code"] == "settlement_overdue" for a in alerts)
    ):
        alerts.append(
            {
                "level": "danger",
                "code": "settlement_overdue",
                "message": (
                    f"Settlement overdue: the node has meter readings for slot "
                    f"{latest.last_reading_slot} but the ledger is settled only through "
                    f"{head.settled_through if head.settled_through is not None else '-'}"
                ),
            }
        )
    return alerts


# --- governance ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GovernanceView:
    """The membership and rules history, as table rows (full DIDs; the page shortens them)."""

    history: list[dict[str, Any]]
    """Every accepted governance record in log order (:meth:`data.GovernanceEntry.as_row`,
    plus ``short``): the table and the CSV."""
    members: list[dict[str, Any]]
    """Every household as of :attr:`as_of` (:meth:`data.MemberEntry.as_row`, plus ``short``)."""
    rules: list[dict[str, Any]]
    """The rules periods with the blocks settled under each (:meth:`data.RulesPeriod.as_row`)."""
    as_of: int
    as_of_time: str
    problems: list[str]
    """Rows that could not be read and rules that do not fold: shown, never raised."""
    grid_fees: bool
    """Whether the market rules have grid fees (show their columns)."""

    @property
    def empty(self) -> bool:
        """No governance change since genesis."""
        return not self.history


def governance_view(ctx: Context) -> GovernanceView:
    """The ledger's governance history (:func:`dashboard.data.governance_overview`): records,
    the member list as of the first slot whose gate has not closed, rules periods."""
    schedule = ctx.schedule
    overview = data.governance_overview(ctx.engine, schedule=schedule)
    return GovernanceView(
        history=[{**e.as_row(), "short": e.short} for e in overview.entries],
        members=[{**m.as_row(), "short": m.short} for m in overview.members],
        rules=[p.as_row() for p in overview.rules],
        as_of=overview.as_of,
        as_of_time=data.slot_label(schedule, overview.as_of),
        problems=overview.problems,
        grid_fees=data.GRID_FEES,
    )


# --- community statements -----------------------------------------------------------------------


def _cached(ctx: Context, key: Any, make: Any) -> Any:
    """``make()``, remembered under ``key`` (the newest few keys are kept)."""
    with ctx._lock:
        if key in ctx._cache:
            return ctx._cache[key]
    value = make()
    with ctx._lock:
        ctx._cache[key] = value
        while len(ctx._cache) > 16:
            ctx._cache.pop(next(iter(ctx._cache)))
    return value


def statements_view(
    ctx: Context, first: str | None = None, last: str | None = None
) -> statements.CommunityStatements:
    """Every household's statement over the days ``first .. last`` (ISO dates, UTC; empty: the
    newest 30 days of the ledger, or all of it) and the community's totals
    (:func:`dashboard.statements.community_statements`), or a message saying why there are
    none. Recomputed only when the ledger head or the dates change."""
    try:
        head = data.head_info(ctx.engine).key()
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        return statements.CommunityStatements(None, message=f"Cannot read the ledger: {reason}")
    key = ("statements", head, ctx.schedule.slot_seconds, first, last)
    return _cached(
        ctx, key, lambda: statements.community_statements(ctx.engine, ctx.schedule, first, last)
    )


# --- forecasts and clocks of the household nodes ------------------------------------------------


def poll_nodes(ctx: Context) -> dict[str, Any]:
    """Poll the household nodes' status APIs (``--node-api``; ``--api`` is polled by
    :func:`poll_api`) once: how many are configured and reachable."""
    if not ctx.node_apis:
        return {"configured": 0}
    polls = ctx.nodes.poll(skip=ctx.api_url)
    return {
        "configured": len(ctx.nodes.urls),
        "reachable": sum(1 for p in polls if p.status.reachable),
        "polled_at": round(time.time(), 3),
    }


def _labels(ctx: Context) -> dict[str, str]:
    """The ledger's households: DID to short label (empty when the ledger cannot be read)."""
    return {m["household"]: m["short"] for m in _ledger_side(ctx)[0]}


def _ledger_side(ctx: Context) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ledger's households and their persistence-forecast errors, cached per ledger head
    (none when the ledger cannot be read: the node side still shows)."""
    try:
        key = data.head_info(ctx.engine).key()
        members = _cached(ctx, ("members", key), lambda: node_health.member_labels(ctx.engine))
        persistence = _cached(
            ctx, ("persistence", key), lambda: node_health.persistence_errors(ctx.engine)
        )
    except SQLAlchemyError:
        return [], {}
    return members, persistence


@dataclass(frozen=True, slots=True)
class NodeHealthView:
    """Per household the agent's forecast accuracy; per node its clock."""

    configured: int
    """Status APIs configured (``--api`` and ``--node-api``)."""
    forecasts: list[dict[str, Any]]
    """:func:`dashboard.node_health.forecast_rows`."""
    clocks: list[dict[str, Any]]
    """:func:`dashboard.node_health.clock_rows`."""
    polls: list[NodePoll]


def node_health_view(ctx: Context) -> NodeHealthView:
    """The forecast table (every household of the ledger) and the clock table (every polled
    node and the peers they sampled), from the newest polls of the nodes' ``/status``."""
    polls = ctx.nodes.latest()
    members, persistence = _ledger_side(ctx)
    return NodeHealthView(
        configured=len(ctx.nodes.urls),
        forecasts=node_health.forecast_rows(members, polls, persistence),
        clocks=node_health.clock_rows(polls, {m["household"]: m["short"] for m in members}),
        polls=polls,
    )
