"""The grid operator's Dash app: layout and thin callbacks over :mod:`dashboard.views`.

``create_app(ctx)`` builds the app; :func:`serve` runs it on a threaded WSGI server (in its own
thread or process, never on a trio loop). One ``dcc.Interval`` polls the ledger head (a couple of
cheap queries); the views redraw only when the head changed, and every figure carries a
``uirevision`` so a refresh keeps the user's zoom and legend choices. Callbacks refuse client
values out of range or of the wrong type with 400, and :mod:`dashboard.http_guard` guards Dash's
endpoints (request size, callback payloads, component suites, logs). The page's styles are
``dashboard/assets/dashboard.css``, served by Dash from :data:`ASSETS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dash
from dash import Dash, Input, Output, State, dcc, html
from plotly.utils import PlotlyJSONEncoder
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.serving import BaseWSGIServer, make_server

from dashboard import data, http_guard, node_health, statements, views
from dashboard.http_guard import BadInput
from dashboard.views import Context
from node.cli.statement import MONEY_FIELDS, money

ASSETS = Path(__file__).resolve().parent / "assets"
"""Static files Dash serves under ``/assets/`` and links from the page (the stylesheet)."""

INDEX = """<!DOCTYPE html>
<html lang="en">
<head>
{%metas%}
<title>{%title%}</title>
{%favicon%}
{%css%}
</head>
<body>
{%app_entry%}
<footer>{%config%}{%scripts%}{%renderer%}</footer>
</body>
</html>"""


ZOOMABLE = ("market-graph", "household-graph", "community-graph", "feeder-graph")
"""Graphs whose x zoom survives live refreshes (see :func:`zoom_from_relayout`)."""

MAX_SLOT = 2**53 - 1
"""Largest slot number a callback accepts (the browser's largest exact integer); larger ones,
negative ones and non-numbers are refused with 400."""

MAX_HOUSEHOLD_CHARS = 256
"""Longest household id the household dropdown may send (a did:key is under 70 characters)."""


# --- what callbacks accept from the client (anything else: 400, see dashboard.http_guard) ------


def _window(value: Any) -> str:
    return http_guard.one_of(value, "window", views.WINDOW_DAYS)


def _slot(value: Any) -> int | None:
    """The slot box (or a click's slot): None for "newest", else a slot number in range."""
    return http_guard.bounded_int(value, "slot", 0, MAX_SLOT)


def _household(value: Any) -> str | None:
    return http_guard.optional_str(value, "household", MAX_HOUSEHOLD_CHARS)


def _date_text(value: Any, name: str) -> str | None:
    """A date box: None or text of at most :data:`dashboard.statements.MAX_DATE_CHARS`
    characters (whether it is a date is the view's to say, as a message)."""
    return http_guard.optional_str(value, name, statements.MAX_DATE_CHARS)


def _statement_from(value: Any) -> str | None:
    return _date_text(value, "from")


def _statement_to(value: Any) -> str | None:
    return _date_text(value, "to")


def _scalar(value: Any) -> bool:
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def _range(value: Any, name: str) -> list[Any] | None:
    """An x range: None (autorange) or two numbers or date strings."""
    if value is None:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(_scalar(v) and (not isinstance(v, str) or len(v) <= 64) for v in value)
    ):
        return value
    raise BadInput(f"{name} must be two numbers or dates")


def _zoom_state(value: Any) -> dict[str, Any] | None:
    """A zoom store, as :func:`_register_zoom` writes it."""
    zoom = http_guard.optional_dict(value, "zoom")
    if zoom is None:
        return None
    if not _scalar(zoom.get("revision")):
        raise BadInput("zoom revision must be a string")
    _range(zoom.get("range"), "zoom range")
    return zoom


def _head(value: Any) -> dict[str, Any] | None:
    """The head store, as ``_poll_head`` writes it (an error, or the head's fields)."""
    head = http_guard.optional_dict(value, "head")
    if not head:
        return head
    if "error" in head:
        if isinstance(head["error"], str):
            return head
        raise BadInput("head error must be a string")
    ok = (
        all(k in head for k in ("height", "head_hash", "settled_through", "verify_state"))
        and isinstance(head.get("height"), int | None)
        and isinstance(head.get("head_hash"), str | None)
        and isinstance(head.get("settled_through"), int | None)
        and isinstance(head.get("verify_state"), str)
    )
    settled = head.get("settled_through")
    if not ok or (settled is not None and not 0 <= settled <= MAX_SLOT):
        raise BadInput("head must be the dashboard's head document")
    return head


def zoom_from_relayout(relayout: dict[str, Any] | None) -> Any:
    """The x range a user zoomed to, from a graph's ``relayoutData``.

    Returns ``[x0, x1]`` for a zoom or pan, ``None`` for a reset (autorange), and
    ``dash.no_update`` for events that do not touch the x axis (hover, legend clicks). Plotly's
    ``uirevision`` alone does not keep the zoom of subplots with matched x axes across a
    ``Plotly.react`` in this Dash/plotly.js, so the app re-applies the range it recorded.
    """
    if not relayout:
        return dash.no_update
    for key, value in relayout.items():
        if re.fullmatch(r"xaxis\d*\.autorange", key) and value:
            return None
        if re.fullmatch(r"xaxis\d*\.range", key) and isinstance(value, list):
            return list(value[:2])
        m = re.fullmatch(r"(xaxis\d*)\.range\[0\]", key)
        if m and f"{m.group(1)}.range[1]" in relayout:
            return [value, relayout[f"{m.group(1)}.range[1]"]]
    return dash.no_update


def slot_from_click(click: dict[str, Any] | None) -> Any:
    """The slot number a click on the market chart hit (the points' ``customdata``).

    The chart's x axis is the slots' start time; every trace but the tariff lines carries the
    slot number (a bucket's first slot) as ``customdata``. ``dash.no_update`` when the click
    hit nothing with a slot.
    """
    points = (click or {}).get("points") or []
    for point in points:
        value = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return int(value)
    return dash.no_update


def apply_zoom(fig: Any, zoom: dict[str, Any] | None) -> dict[str, Any]:
    """Re-apply a recorded x range to every x axis of ``fig`` (same ``uirevision`` only).

    Returns the figure as a plain dict.
    """
    if not isinstance(fig, dict):
        fig = fig.to_plotly_json()
    layout = fig.setdefault("layout", {})
    if zoom and zoom.get("range") and zoom.get("revision") == layout.get("uirevision"):
        axes = [k for k in layout if re.fullmatch(r"xaxis\d*", k)] or ["xaxis"]
        for axis in axes:
            layout[axis] = {**(layout.get(axis) or {}), "range": zoom["range"], "autorange": False}
    return fig


def _register_zoom(app: Dash, graph: str) -> None:
    """Record the x range the user zoomed ``graph`` to (re-applied on each refresh)."""

    @app.callback(
        Output(f"{graph}-zoom", "data"),
        Input(graph, "relayoutData"),
        State(graph, "figure"),
        prevent_initial_call=True,
    )
    def _zoom(relayout: dict[str, Any] | None, fig: dict[str, Any] | None) -> Any:
        relayout = http_guard.optional_dict(relayout, "relayoutData")
        fig = http_guard.optional_dict(fig, "figure")
        layout = http_guard.optional_dict((fig or {}).get("layout"), "figure layout")
        rng = zoom_from_relayout(relayout)
        if rng is dash.no_update:
            return rng
        revision = (layout or {}).get("uirevision")
        if not _scalar(revision):
            raise BadInput("figure uirevision must be a string")
        return {"revision": revision, "range": _range(rng, "x range")}


def _table(
    rows: list[dict[str, Any]],
    columns: list[tuple[str, str]],
    table_id: str,
    *,
    titles: dict[str, str] | None = None,
    row_class: Callable[[dict[str, Any]], str | None] | None = None,
) -> Any:
    """A plain HTML table of ``rows`` (columns: (key, heading)). ``titles`` maps a column to
    the row key whose value is its cell's hover text (a shortened DID's full DID);
    ``row_class`` gives a row its CSS class."""
    titles = titles or {}

    def cell(r: dict[str, Any], key: str) -> Any:
        value = r.get(key)
        text = "—" if value is None or value == "" else str(value)
        title = r.get(titles[key]) if key in titles else None
        return html.Td(text, title=str(title)) if title else html.Td(text)

    def row(r: dict[str, Any]) -> Any:
        cls = row_class(r) if row_class else None
        cells = [cell(r, k) for k, _ in columns]
        return html.Tr(cells, className=cls) if cls else html.Tr(cells)

    return html.Table(
        [
            html.Thead(html.Tr([html.Th(h) for _, h in columns])),
            html.Tbody([row(r) for r in rows]),
        ],
        className="grid",
        id=table_id,
    )


def _kpi(label: str, value: str, kpi_id: str | None = None) -> Any:
    kwargs = {"id": kpi_id} if kpi_id else {}
    return html.Div(
        [html.Div(value, className="v"), html.Div(label, className="k")], className="kpi", **kwargs
    )


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _permille(value: int | None) -> str:
    """A permille figure as a percentage ("—": not known, e.g. a rules-1 grid)."""
    return "—" if value is None else f"{value / 10:.1f} %"


def _money(cents: int) -> str:
    return f"{cents / 100:,.2f}"


def _section(sid: str, title: str, children: list[Any], csv: str | None = None) -> html.Section:
    """A titled section; ``csv``: the section's "Download CSV" button (an entry of
    :data:`CSV_DOWNLOADS`, by its ``csv-<name>`` button id's name)."""
    head: list[Any] = [html.H2(title)]
    if csv:
        download = next(d for d in CSV_DOWNLOADS if d.button_id == f"csv-{csv}")
        head = [
            html.Div(
                [
                    html.H2(title, style={"flex": "1"}),
                    html.Button("Download CSV", id=download.button_id, className="csv", n_clicks=0),
                    dcc.Download(id=download.download_id),
                ],
                className="controls",
            )
        ]
    return html.Section([*head, *children], id=f"section-{sid}")


def layout(ctx: Context, refresh_ms: int) -> Any:
    """The page: header with head/verify/API badges, then one section per view."""
    window_opts = [
        {"label": "last day", "value": "1d"},
        {"label": "last 7 days", "value": "7d"},
        {"label": "last 30 days", "value": "30d"},
        {"label": "everything", "value": "all"},
    ]
    return html.Div(
        [
            dcc.Interval(id="tick", interval=refresh_ms, n_intervals=0),
            dcc.Store(id="head"),
            dcc.Store(id="api"),
            dcc.Store(id="status-sent"),
            *[dcc.Store(id=f"{g}-zoom") for g in ZOOMABLE],
            html.Header(
                [
                    html.H1(id="title", children="Microgrid"),
                    html.Span(id="head-badge", className="badge", children="height —"),
                    html.Span(id="verify-badge", className="badge pending", children="verify …"),
                    html.Span(id="api-badge", className="badge off", children="API —"),
                    html.Nav(
                        [
                            html.A(name, href=f"#section-{sid}")
                            for sid, name in (
                                ("alerts", "Alerts"),
                                ("market", "Market"),
                                ("book", "Order book"),
                                ("households", "Households"),
                                ("community", "Community"),
                                ("statements", "Statements"),
                                ("governance", "Governance"),
                                ("ledger", "Ledger"),
                                ("network", "Consensus & network"),
                                ("nodes", "Forecasts & clocks"),
                            )
                        ]
                    ),
                    html.Div(
                        [
                            html.Label("window "),
                            dcc.RadioItems(
                                id="window",
                                options=window_opts,
                                value="7d",
                                inline=True,
                                inputStyle={"marginLeft": "8px"},
                            ),
                        ],
                        style={"display": "flex", "alignItems": "center", "fontSize": "14px"},
                    ),
                ]
            ),
            html.Main(
                [
                    _section("alerts", "Alerts", [html.Div(id="alerts")]),
                    _section(
                        "market",
                        "Market per slot",
                        [
                            html.Div("Click a slot to open its order book.", className="muted"),
                            dcc.Graph(id="market-graph", config={"displaylogo": False}),
                        ],
                        csv="market",
                    ),
                    _section(
                        "book",
                        "Order book",
                        [
                            html.Div(
                                [
                                    html.Label("slot", htmlFor="slot-input"),
                                    dcc.Input(
                                        id="slot-input",
                                        type="number",
                                        debounce=True,
                                        placeholder="newest",
                                        min=0,
                                        step=1,
                                    ),
                                    html.Span(id="book-summary", className="muted"),
                                ],
                                className="controls",
                            ),
                            dcc.Graph(id="book-graph", config={"displaylogo": False}),
                        ],
                        csv="book",
                    ),
                    _section(
                        "households",
                        "Households",
                        [
                            html.Div(
                                [
                                    html.Label("household"),
                                    dcc.Dropdown(
                                        id="household",
                                        clearable=False,
                                        style={"minWidth": "420px"},
                                    ),
                                ],
                                className="controls",
                            ),
                            dcc.Graph(id="household-graph", config={"displaylogo": False}),
                            html.Div(id="household-table"),
                        ],
                        csv="households",
                    ),
                    _section(
                        "community",
                        "Community",
                        [
                            html.Div(id="community-kpis", className="kpis"),
                            dcc.Graph(id="community-graph", config={"displaylogo": False}),
                            html.Div(
                                dcc.Graph(id="feeder-graph", config={"displaylogo": False}),
                                id="feeder-block",
                                style={"display": "none"},
                            ),
                        ],
                        csv="community",
                    ),
                    _section(
                        "statements",
                        "Community statements: what each household gains",
                        [
                            html.Div(
                                [
                                    html.Label("from", htmlFor="statement-from"),
                                    dcc.Input(
                                        id="statement-from",
                                        type="text",
                                        debounce=True,
                                        placeholder="YYYY-MM-DD",
                                        maxLength=statements.MAX_DATE_CHARS,
                                        style={"width": "8.5em"},
                                    ),
                                    html.Label("to", htmlFor="statement-to"),
                                    dcc.Input(
                                        id="statement-to",
                                        type="text",
                                        debounce=True,
                                        placeholder="YYYY-MM-DD",
                                        maxLength=statements.MAX_DATE_CHARS,
                                        style={"width": "8.5em"},
                                    ),
                                    html.Span(
                                        "UTC days, inclusive; empty: the newest 30 days",
                                        className="muted",
                                    ),
                                ],
                                className="controls",
                            ),
                            html.Div(id="statement-summary", className="muted"),
                            html.Div(id="statement-table"),
                        ],
                        csv="statements",
                    ),
                    _section(
                        "governance",
                        "Governance: members and rules",
                        [html.Div(id="governance")],
                        csv="governance",
                    ),
                    _section(
                        "ledger",
                        "Ledger",
                        [html.Div(id="ledger-summary", className="kpis"), html.Div(id="ledger")],
                        csv="ledger",
                    ),
                    _section(
                        "network",
                        "Consensus & network",
                        [
                            html.Div(id="network-kpis", className="kpis"),
                            html.Div(
                                [
                                    dcc.Graph(
                                        id="invalid-graph",
                                        config={"displaylogo": False},
                                        style={"flex": "1"},
                                    ),
                                    dcc.Graph(
                                        id="lag-graph",
                                        config={"displaylogo": False},
                                        style={"flex": "1"},
                                    ),
                                ],
                                style={"display": "flex", "gap": "8px"},
                            ),
                        ],
                        csv="network",
                    ),
                    _section(
                        "nodes",
                        "Forecasts and clocks of the household nodes",
                        [html.Div(id="node-health")],
                        csv="nodes",
                    ),
                ]
            ),
        ]
    )


def create_app(ctx: Context, refresh_ms: int = 5000) -> Dash:
    """The Dash app over ``ctx`` (a ledger database and optionally a node's status API)."""
    app = Dash(
        __name__,
        title="Microgrid operator",
        update_title=None,
        serve_locally=True,
        suppress_callback_exceptions=False,
        assets_folder=str(ASSETS),
    )
    app.index_string = INDEX
    app.layout = lambda: layout(ctx, refresh_ms)

    @app.callback(Output("head", "data"), Input("tick", "n_intervals"), State("head", "data"))
    def _poll_head(_n: int, old: dict[str, Any] | None) -> Any:
        http_guard.optional_count(_n, "n_intervals")
        old = _head(old)
        try:
            new = views.head_view(ctx)
        except SQLAlchemyError as exc:  # missing file, server down: say so, keep polling
            new = {"error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"}
        return dash.no_update if new == old else new

    @app.callback(Output("api", "data"), Input("tick", "n_intervals"))
    def _poll_api(_n: int) -> Any:
        http_guard.optional_count(_n, "n_intervals")
        return views.poll_status(ctx)

    @app.callback(
        *(Output(component, prop) for component, prop in STATUS_VIEW_OUTPUTS),
        Output("status-sent", "data"),
        Input("head", "data"),
        Input("api", "data"),
        State("status-sent", "data"),
    )
    def _status_views(head: Any, api: Any, sent: Any) -> Any:
        head = _head(head)
        api = http_guard.optional_dict(api, "api")
        values = (
            *api_badge(api),
            alerts_children(ctx, head),
            *network_children(ctx),
            node_health_children(views.node_health_view(ctx)),
        )
        return only_changed(values, sent)

    @app.callback(
        Output("title", "children"),
        Output("head-badge", "children"),
        Output("verify-badge", "children"),
        Output("verify-badge", "className"),
        Input("head", "data"),
    )
    def _header(head: dict[str, Any] | None) -> Any:
        head = _head(head)
        if not head:
            return dash.no_update
        if "error" in head:
            return "Microgrid", "ledger unreadable", "not verified", "badge failed"
        info = ctx.info()
        short = (head["head_hash"] or "—")[:12]
        settled = head["settled_through"]
        through = (
            "—" if settled is None else f"{settled} ({data.slot_label(ctx.schedule, settled)} UTC)"
        )
        state = head["verify_state"]
        label = {"ok": "ledger verified", "failed": "ledger FAILS verification"}.get(
            state, "verifying…"
        )
        return (
            f"Microgrid {info.grid}",
            f"height {head['height']} · head {short} · settled through slot {through}",
            label,
            f"badge {state}",
        )

    for graph in ZOOMABLE:
        _register_zoom(app, graph)

    @app.callback(
        Output("market-graph", "figure"),
        Input("head", "data"),
        Input("window", "value"),
        State("market-graph-zoom", "data"),
    )
    def _market(head: Any, window: str, zoom: Any) -> Any:
        head, window, zoom = _head(head), _window(window), _zoom_state(zoom)
        if not head or "error" in head:
            return dash.no_update
        return apply_zoom(views.market_view(ctx, window).figure, zoom)

    @app.callback(
        Output("slot-input", "value"),
        Input("market-graph", "clickData"),
        prevent_initial_call=True,
    )
    def _pick_slot(click: dict[str, Any] | None) -> Any:
        click = http_guard.optional_dict(click, "clickData")
        if not isinstance((click or {}).get("points"), list | None):
            raise BadInput("clickData points must be a list")
        slot = slot_from_click(click)
        return slot if slot is dash.no_update else _slot(slot)

    @app.callback(
        Output("book-graph", "figure"),
        Output("book-summary", "children"),
        Input("head", "data"),
        Input("slot-input", "value"),
    )
    def _book(head: Any, slot: Any) -> Any:
        head, slot = _head(head), _slot(slot)
        if not head or "error" in head:
            return dash.no_update, dash.no_update
        book = views.orderbook_view(ctx, slot)
        return book.figure, book.summary

    @app.callback(
        Output("household-graph", "figure"),
        Output("household-table", "children"),
        Output("household", "options"),
        Output("household", "value"),
        Input("head", "data"),
        Input("household", "value"),
        Input("window", "value"),
        State("household-graph-zoom", "data"),
    )
    def _households(head: Any, household: str | None, window: str, zoom: Any) -> Any:
        head, household = _head(head), _household(household)
        window, zoom = _window(window), _zoom_state(zoom)
        if not head or "error" in head:
            return (dash.no_update,) * 4
        view = views.households_view(ctx, household, window)
        fig = apply_zoom(view.figure, zoom)
        table_rows = [
            {
                **r,
                "balance": _money(r["balance_cents"]),
                "reputation": f"{r['reputation_permille'] / 10:.1f} %",
                "recent_delivery": _permille(r.get("recent_delivery_permille")),
                "may_offer": _permille(r.get("offer_share_permille")),
            }
            for r in view.summary
        ]
        table = _table(
            table_rows,
            [
                ("short", "household"),
                ("role", "role"),
                ("meter", "meter"),
                ("balance", "balance"),
                ("energy_wh", "energy balance (Wh)"),
                ("reputation", "reputation"),
                ("recent_delivery", "delivered (recent)"),
                ("may_offer", "may offer (of meter capacity)"),
                ("sold_wh", "sold Wh"),
                ("delivered_wh", "delivered Wh"),
                ("bought_wh", "bought Wh"),
                ("consumed_wh", "taken Wh"),
                ("missed_readings", "missed readings"),
                ("unmeasured_slots", "unmeasured slots"),
                ("true_up_import_wh", "trued-up import Wh"),
                ("true_up_export_wh", "trued-up export Wh"),
            ],
            "household-summary",
        )
        options = [
            {"label": f"{r['short']} ({r['meter']}, {r['role']})", "value": r["household"]}
            for r in view.summary
        ]
        return fig, table, options, view.household

    @app.callback(
        Output("community-kpis", "children"),
        Output("community-graph", "figure"),
        Input("head", "data"),
        Input("window", "value"),
        State("community-graph-zoom", "data"),
    )
    def _community(head: Any, window: str, zoom: Any) -> Any:
        head, window, zoom = _head(head), _window(window), _zoom_state(zoom)
        if not head or "error" in head:
            return dash.no_update, dash.no_update
        view = views.community_view(ctx, window)
        f = view.figures
        fig = apply_zoom(view.figure, zoom)
        kpis = [
            _kpi("self-sufficiency", _pct(f.self_sufficiency), "kpi-self-sufficiency"),
            _kpi("self-consumption", _pct(f.self_consumption), "kpi-self-consumption"),
            _kpi("savings vs grid-only", _money(f.savings_cents), "kpi-savings"),
            _kpi("cost with the market", _money(f.actual_cost_cents)),
            _kpi("cost grid-only", _money(f.grid_only_cost_cents)),
            _kpi("traded locally (kWh)", f"{f.local_traded_wh / 1000:,.1f}"),
            _kpi("settled slots", str(f.slots)),
        ]
        return kpis, fig

    @app.callback(
        Output("feeder-graph", "figure"),
        Output("feeder-block", "style"),
        Input("head", "data"),
        Input("window", "value"),
        State("feeder-graph-zoom", "data"),
    )
    def _feeder(head: Any, window: str, zoom: Any) -> Any:
        head, window, zoom = _head(head), _window(window), _zoom_state(zoom)
        if not head or "error" in head:
            return dash.no_update, dash.no_update
        fig = views.feeder_view(ctx, window).figure
        if fig is None:  # a grid without a feeder meter: nothing new on the page
            return {"data": [], "layout": {}}, {"display": "none"}
        return apply_zoom(fig, zoom), {"display": "block"}

    @app.callback(Output("governance", "children"), Input("head", "data"))
    def _governance(head: Any) -> Any:
        head = _head(head)
        if not head or "error" in head:
            return dash.no_update
        return governance_children(views.governance_view(ctx))

    @app.callback(
        Output("ledger-summary", "children"), Output("ledger", "children"), Input("head", "data")
    )
    def _ledger(head: Any) -> Any:
        head = _head(head)
        if not head or "error" in head:
            return dash.no_update, dash.no_update
        v = views.ledger_view(ctx)
        status = v["verify"]
        if status["state"] == "ok":
            ver = f"OK ({status['blocks']} blocks, {status['duration_s']:.2f} s)"
        elif status["state"] == "failed":
            ver = f"FAILED: {status['error']}"
        else:
            ver = "pending"
        if status.get("running") and status["state"] != "pending":
            ver += " · re-verifying"
        kpis = [
            _kpi("height", str(v["height"]), "kpi-height"),
            _kpi("transactions", str(v["transactions"])),
            _kpi("verification", ver, "kpi-verify"),
            html.Div(
                [
                    html.Div(v["head_hash"] or "—", className="v mono", id="head-hash"),
                    html.Div("head hash", className="k"),
                ],
                className="kpi",
                style={"flex": "1"},
            ),
        ]
        blocks = [
            {**b, "hash": b["hash"][:16], "prev_hash": b["prev_hash"][:16]} for b in v["blocks"]
        ]
        txs = [
            {**x, "txid": x["txid"][:16], "ref": _short_ref(x["ref"])}
            for x in v["latest_transactions"]
        ]
        return kpis, [
            html.H3("Latest blocks", style={"fontSize": "15px"}),
            _table(
                blocks,
                [
                    ("height", "height"),
                    ("slot", "slot"),
                    ("time", "time"),
                    ("tx_count", "transactions"),
                    ("hash", "hash"),
                    ("prev_hash", "prev"),
                ],
                "blocks-table",
            ),
            html.H3("Latest transactions", style={"fontSize": "15px"}),
            _table(
                txs,
                [
                    ("height", "block"),
                    ("position", "#"),
                    ("slot", "slot"),
                    ("kind", "kind"),
                    ("ref", "ref"),
                    ("money_cents", "money (cents)"),
                    ("energy_wh", "energy (Wh)"),
                    ("txid", "txid"),
                ],
                "tx-table",
            ),
        ]

    @app.callback(
        Output("statement-summary", "children"),
        Output("statement-table", "children"),
        Input("head", "data"),
        Input("statement-from", "value"),
        Input("statement-to", "value"),
    )
    def _statements(head: Any, first: Any, last: Any) -> Any:
        head, first, last = _head(head), _statement_from(first), _statement_to(last)
        if not head or "error" in head:
            return dash.no_update, dash.no_update
        return statements_children(views.statements_view(ctx, first, last), ctx)

    for download in CSV_DOWNLOADS:
        _register_csv(app, ctx, download)
    http_guard.install(app)
    return app


@dataclass(frozen=True, slots=True)
class Control:
    """A page control a CSV download reads: its component id and its validator (which refuses
    out-of-range client values with 400, as the views' own callbacks do)."""

    component_id: str
    check: Callable[[Any], Any]


CONTROLS: dict[str, Control] = {
    "window": Control("window", _window),
    "slot": Control("slot-input", _slot),
    "household": Control("household", _household),
    "first": Control("statement-from", _statement_from),
    "last": Control("statement-to", _statement_to),
}
"""The controls a CSV download may read, by the keyword its rows function takes."""


@dataclass(frozen=True, slots=True)
class CsvDownload:
    """One "Download CSV" button: what it downloads and under which file name."""

    button_id: str
    download_id: str
    """The ``dcc.Download`` next to the button."""
    filename: str
    rows: Callable[..., list[dict[str, Any]]]
    """``rows(ctx, **controls)``: the data its view shows, as flat dicts."""
    controls: tuple[str, ...] = ()
    """Keys of :data:`CONTROLS` whose values ``rows`` takes as keyword arguments."""


def _market_rows(ctx: Context, window: str) -> list[dict[str, Any]]:
    return views.market_view(ctx, window).points


def _book_rows(ctx: Context, slot: int | None) -> list[dict[str, Any]]:
    return views.orderbook_view(ctx, slot).orders


def _household_rows(ctx: Context, household: str | None, window: str) -> list[dict[str, Any]]:
    """The chosen household's slots, else (no slot yet) every household's summary."""
    view = views.households_view(ctx, household, window)
    return [{"household": view.household, **r} for r in view.slots] or view.summary


def _community_rows(ctx: Context, window: str) -> list[dict[str, Any]]:
    return views.community_view(ctx, window).buckets


def _ledger_rows(ctx: Context) -> list[dict[str, Any]]:
    return views.ledger_view(ctx)["blocks"]


def _governance_rows(ctx: Context) -> list[dict[str, Any]]:
    """Every accepted governance record in log order (full DIDs, no shortened ones)."""
    return [
        {k: v for k, v in r.items() if k != "short"} for r in views.governance_view(ctx).history
    ]


def _network_rows(ctx: Context) -> list[dict[str, Any]]:
    """Every poll of the node's status API, one column per invalid-message reason."""
    return [
        {k: v for k, v in p.as_dict().items() if k not in ("invalid_messages", "forecast", "clock")}
        | {f"invalid_{k}": v for k, v in p.invalid_messages.items()}
        for p in ctx.history.polls()
    ]


def _statement_rows(ctx: Context, first: str | None, last: str | None) -> list[dict[str, Any]]:
    """The statements table: one row per household and the totals (empty: nothing to state)."""
    return views.statements_view(ctx, first, last).csv_rows()


def _node_rows(ctx: Context) -> list[dict[str, Any]]:
    """Per household: its agent's forecast accuracy and its node's clock."""
    view = views.node_health_view(ctx)
    return node_health.csv_rows(view.forecasts, view.clocks)


CSV_DOWNLOADS: tuple[CsvDownload, ...] = (
    CsvDownload("csv-market", "dl-market", "microgrid-market.csv", _market_rows, ("window",)),
    CsvDownload("csv-book", "dl-book", "microgrid-orderbook.csv", _book_rows, ("slot",)),
    CsvDownload(
        "csv-households",
        "dl-households",
        "microgrid-household.csv",
        _household_rows,
        ("household", "window"),
    ),
    CsvDownload(
        "csv-community", "dl-community", "microgrid-community.csv", _community_rows, ("window",)
    ),
    CsvDownload(
        "csv-statements",
        "dl-statements",
        "microgrid-statements.csv",
        _statement_rows,
        ("first", "last"),
    ),
    CsvDownload("csv-governance", "dl-governance", "microgrid-governance.csv", _governance_rows),
    CsvDownload("csv-ledger", "dl-ledger", "microgrid-blocks.csv", _ledger_rows),
    CsvDownload("csv-network", "dl-network", "microgrid-network.csv", _network_rows),
    CsvDownload("csv-nodes", "dl-nodes", "microgrid-forecasts-clocks.csv", _node_rows),
)
"""One download per view: the data the view shows, as CSV."""


def _register_csv(app: Dash, ctx: Context, download: CsvDownload) -> None:
    """The callback of one "Download CSV" button."""
    controls = [CONTROLS[name] for name in download.controls]

    @app.callback(
        Output(download.download_id, "data"),
        Input(download.button_id, "n_clicks"),
        *(State(c.component_id, "value") for c in controls),
        prevent_initial_call=True,
    )
    def _csv(n_clicks: Any, *values: Any) -> Any:
        http_guard.optional_count(n_clicks, "n_clicks")
        kwargs = {
            name: c.check(v) for name, c, v in zip(download.controls, controls, values, strict=True)
        }
        rows = download.rows(ctx, **kwargs)
        return dcc.send_string(data.rows_to_csv(rows), download.filename)


def _feeder_summary(summary: data.FeederSummary | None, window_slots: int) -> list[Any]:
    """The small "feeder check" line under the alerts (nothing for a grid without a feeder):
    incomplete checks are counted here, not raised as alerts."""
    if summary is None:
        return []
    parts = [f"{summary.ok} ok", f"{summary.mismatch} mismatch"]
    if summary.incomplete:
        why = []
        if summary.no_feeder_reading:
            why.append(f"{summary.no_feeder_reading} without a feeder reading")
        if summary.households_unmeasured:
            why.append(f"{summary.households_unmeasured} with unmeasured households")
        parts.append(f"feeder check incomplete: {summary.incomplete} ({', '.join(why)})")
    else:
        parts.append("feeder check incomplete: 0")
    return [
        html.Div(
            f"Feeder check, {summary.slots} slots checked of the newest {window_slots}: "
            + " · ".join(parts),
            className="muted",
            id="feeder-summary",
        )
    ]


def _heights(r: dict[str, Any]) -> str:
    """A rules period's blocks: ``4 (heights 3–6)``, ``0``."""
    if not r["blocks"]:
        return "0"
    return f"{r['blocks']} (heights {r['first_height']}–{r['last_height']})"


def governance_children(view: views.GovernanceView) -> list[Any]:
    """The governance section: problems, the history of records (or the "no governance changes
    since genesis" state), the member list, the rules periods and the blocks under each."""
    out: list[Any] = [
        html.Div(
            p,
            className="alert warning",
            **{"data-code": "governance_unreadable"},
        )
        for p in view.problems
    ]
    out.append(html.H3("Membership and rules changes, in log order", className="sub"))
    if view.empty:
        out.append(
            html.Div(
                "No governance changes since genesis: the genesis members and rules hold.",
                className="alert none",
                id="governance-empty",
            )
        )
    else:
        out.append(
            _table(
                [
                    {**r, "detail": "; ".join(x for x in (r["detail"], r["problem"]) if x)}
                    for r in view.history
                ],
                [
                    ("position", "#"),
                    ("from_slot", "from slot"),
                    ("time", "slot start (UTC)"),
                    ("kind", "change"),
                    ("short", "household"),
                    ("role", "role"),
                    ("meter_serial", "meter"),
                    ("status", "status after"),
                    ("withdrawn", "orders withdrawn"),
                    ("detail", "detail"),
                ],
                "governance-history",
                titles={"short": "household", "detail": "new_household", "status": "problem"},
                row_class=lambda r: "unreadable" if r.get("status") == data.UNREADABLE else None,
            )
        )
    out.append(
        html.H3(
            f"Members as of slot {view.as_of} ({view.as_of_time} UTC, the first open slot)",
            className="sub",
        )
    )
    if view.members:
        out.append(
            _table(
                view.members,
                [
                    ("short", "household"),
                    ("role", "role"),
                    ("meter_serial", "meter"),
                    ("status", "status"),
                    ("since", "since slot"),
                    ("since_time", "since (UTC)"),
                    ("scheduled", "scheduled"),
                ],
                "governance-members",
                titles={"short": "household"},
                row_class=lambda r: "former" if r["status"] in ("removed", "rotated") else None,
            )
        )
    else:
        out.append(html.Div("No households in the ledger.", className="muted"))
    out.append(
        html.H3("Market rules over time, and the blocks settled under each", className="sub")
    )
    columns = [
        ("from_slot", "from slot"),
        ("time", "in force from (UTC)"),
        ("feed_in_tariff", "feed-in tariff"),
        ("retail_price", "retail price"),
        ("mechanism", "mechanism"),
        ("k", "k"),
        ("time_of_use", "time of use (UTC start feed-in/retail)"),
    ]
    if view.grid_fees:
        columns += [("local_fee", "local fee"), ("grid_fee", "grid fee")]
    columns += [
        ("changed", "changed"),
        ("blocks_label", "blocks settled"),
        ("slots_label", "slots"),
        ("other_blocks", "blocks under other rules"),
    ]
    if view.rules:
        out.append(
            _table(
                [
                    {
                        **r,
                        "blocks_label": _heights(r),
                        "slots_label": (
                            f"{r['first_slot']}–{r['last_slot']}" if r["blocks"] else None
                        ),
                    }
                    for r in view.rules
                ],
                columns,
                "governance-rules",
                titles={"blocks_label": "rules_hash"},
                row_class=lambda r: "unreadable" if r["other_blocks"] else None,
            )
        )
    else:
        out.append(html.Div("The ledger records no market rules yet.", className="muted"))
    return out


STATEMENT_COLUMNS: list[tuple[str, str]] = [
    ("short", "household"),
    ("measured_slots", "measured slots"),
    ("local_bought_wh", "bought locally Wh"),
    ("local_paid", "paid"),
    ("local_sold_wh", "sold locally Wh"),
    ("local_received", "received"),
    ("grid_import_wh", "from the grid Wh"),
    ("grid_import_paid", "paid"),
    ("grid_export_wh", "to the grid Wh"),
    ("grid_export_received", "received"),
    ("true_up_money", "true-ups"),
    ("local_fees", "fees, local"),
    ("grid_fees", "fees, grid"),
    ("other_money", "other"),
    ("net_bill", "net bill"),
    ("grid_only_bill", "grid only"),
    ("savings", "savings"),
]
"""The statements table: what ``microgrid statement`` prints per household (money in currency
units; bills and paid amounts positive when paid, received amounts positive when received;
``net bill`` and ``grid only`` negative when the household was paid)."""


DEFAULT_NOTE = ", the default period: the newest 30 days, or the whole ledger when shorter"
"""What the statements summary adds when no date was given."""


def statements_children(view: statements.CommunityStatements, ctx: Context) -> tuple[Any, Any]:
    """The statements section's summary line and table (or its message)."""
    if view.message or view.period is None or view.totals is None:
        message = view.message or "Nothing to state."
        summary = "" if view.period is None else f"{view.period.label()} (UTC)"
        return summary, html.Div(message, className="alert secondary", id="statement-message")
    p = view.period
    span = (
        f"{data.slot_label(ctx.schedule, view.first_settled)} .. "
        f"{data.slot_label(ctx.schedule, view.last_settled)}"
        if view.first_settled is not None and view.last_settled is not None
        else "—"
    )
    tariffs = view.tariffs
    parts = [
        f"{p.label()} (UTC){DEFAULT_NOTE if p.default else ''}: "
        f"{view.settled_slots} settled slots, {span} (slots {view.first_settled}.."
        f"{view.last_settled})",
        f"tariffs at its start: retail {money(tariffs['retail_price'])}/kWh, feed-in "
        f"{money(tariffs['feed_in_tariff'])}/kWh"
        + (
            f", grid fees {money(tariffs['local_fee'])}/kWh bought locally, "
            f"{money(tariffs['grid_fee'])}/kWh imported"
            if tariffs["local_fee"] or tariffs["grid_fee"]
            else ""
        ),
    ]
    if view.rules_changed_at:
        changed = ", ".join(str(slot) for slot in view.rules_changed_at)
        parts.append(f"rules changed from slot {changed}: each slot is priced under its own")
    money_fields = {k for k, _ in STATEMENT_COLUMNS} & set(MONEY_FIELDS)

    def shown(row: dict[str, Any], short: str) -> dict[str, Any]:
        return {
            **{k: money(v) if k in money_fields else v for k, v in row.items()},
            "short": short,
        }

    rows = [shown(r, data.short_did(r["household"])) for r in view.rows]
    rows.append({**shown(view.totals, "community total"), "household": "TOTAL"})
    table = _table(
        rows,
        STATEMENT_COLUMNS,
        "statement-rows",
        titles={"short": "household"},
        row_class=lambda r: "total" if r["household"] == "TOTAL" else None,
    )
    return " · ".join(parts), table


def _wh(value: int | None) -> str | None:
    return None if value is None else f"{value:,}"


def _offset(value: float | None) -> str | None:
    return None if value is None else f"{value:+.2f}"


STATUS_VIEW_OUTPUTS: tuple[tuple[str, str], ...] = (
    ("api-badge", "children"),
    ("api-badge", "className"),
    ("alerts", "children"),
    ("network-kpis", "children"),
    ("invalid-graph", "figure"),
    ("lag-graph", "figure"),
    ("node-health", "children"),
)
"""What each status poll redraws, in one callback (one request per refresh, not one per view:
docs/dashboard.md "What an open dashboard costs the operator's browser")."""


DIGEST_BYTES = 8
"""Length of an output digest (a collision only skips one redraw until the next change)."""


def output_digest(value: Any) -> str:
    """A short digest of one callback output as the page receives it (figures and components
    serialized the way Dash sends them)."""
    text = json.dumps(value, cls=PlotlyJSONEncoder, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).hexdigest()


def only_changed(values: tuple[Any, ...], sent: Any) -> tuple[Any, ...]:
    """``values`` with each one the page already shows replaced by ``dash.no_update``, followed
    by the digests of all of them for the page's ``status-sent`` store. ``sent`` is that store
    as the page sends it back: None (a new page) or one digest per value, else
    :class:`BadInput`."""
    if sent is not None and not (
        isinstance(sent, list)
        and len(sent) == len(values)
        and all(isinstance(d, str) and len(d) == 2 * DIGEST_BYTES for d in sent)
    ):
        raise BadInput(f"status-sent must be a list of {len(values)} digests")
    digests = [output_digest(v) for v in values]
    before = sent or [None] * len(values)
    return (
        *(dash.no_update if d == b else v for v, d, b in zip(values, digests, before, strict=True)),
        digests,
    )


def api_badge(api: dict[str, Any] | None) -> tuple[str, str]:
    """The header's status API badge: its text and class."""
    if not api or not api.get("configured"):
        return "no status API (ledger only)", "badge off"
    if not api.get("reachable"):
        return "status API unreachable", "badge failed"
    return f"API ok · {api.get('role') or '?'} · term {api.get('term')}", "badge ok"


def alerts_children(ctx: Context, head: dict[str, Any] | None) -> list[Any]:
    """The alerts section: the ledger's and the feeder's alerts, or that there are none."""
    if head and "error" in head:
        return [
            html.Div(
                f"Cannot read the ledger database: {head['error']}",
                className="alert danger",
                **{"data-code": "ledger_unreadable"},
            )
        ]
    alerts = views.alerts_view(ctx)
    feeder = _feeder_summary(views.feeder_summary_view(ctx), ctx.alert_window())
    notice = ctx.slot_notice()
    if notice:  # a notice, not an alert: the grid may well be fine
        feeder = [html.Div(notice, className="alert secondary", id="slot-notice"), *feeder]
    if not alerts:
        return [html.Div("No alerts.", className="alert none", id="no-alerts"), *feeder]
    return [
        *(
            html.Div(a["message"], className=f"alert {a['level']}", **{"data-code": a["code"]})
            for a in alerts
        ),
        *feeder,
    ]


def network_children(ctx: Context) -> tuple[list[Any], Any, Any]:
    """The consensus and network section: its figures (KPIs) and its two charts."""
    network = views.network_view(ctx)
    latest, bars, lag = network.latest, network.invalid_figure, network.lag_figure
    if not ctx.api_url:
        note = html.Div(
            "No node status API configured (start with --api URL): consensus and network "
            "health are not available; every other view works from the ledger.",
            className="alert secondary",
            id="network-state",
        )
        return [note], bars, lag
    if latest is None or not latest.reachable:
        why = latest.error if latest is not None else "not polled yet"
        note = html.Div(
            f"Status API unreachable: {why}", className="alert secondary", id="network-state"
        )
        return [note], bars, lag
    leader = latest.leader
    changes = (
        str(latest.leader_changes)
        if latest.leader_changes is not None
        else f"{ctx.history.observed_leader_changes} seen"
    )
    members = (
        f"{latest.members_up} up / {latest.members_down} down"
        if latest.members_up is not None
        else "—"
    )
    kpis = [
        _kpi("role", latest.role or "—", "kpi-role"),
        _kpi("term", str(latest.term), "kpi-term"),
        _kpi("leader", data.short_did(leader) if leader else "NONE", "kpi-leader"),
        _kpi("leader changes", changes),
        _kpi("peers", "—" if latest.peers is None else str(latest.peers)),
        _kpi("members", members, "kpi-members"),
        _kpi("commit lag", _opt(latest.commit_lag)),
        _kpi("apply lag", _opt(latest.apply_lag)),
        _kpi("node ledger height", _opt(latest.ledger_height)),
        _kpi("last reading (slot)", _opt(latest.last_reading_slot)),
        _kpi("meter read failures", _opt(latest.meter_read_failures)),
        html.Span(
            f"polled {time.strftime('%H:%M:%S', time.gmtime(latest.fetched_at))} UTC",
            className="muted",
            id="network-state",
        ),
    ]
    return kpis, bars, lag


def node_health_children(view: views.NodeHealthView) -> list[Any]:
    """The forecasts table (per household) and the clocks table (per node)."""
    out: list[Any] = []
    if not view.configured:
        out.append(
            html.Div(
                "No node status API configured (start with --api URL, and --node-api URL for "
                "each household's node): forecast accuracy and clocks show no data.",
                className="alert secondary",
                id="nodes-state",
            )
        )
    out.append(
        html.H3(
            "Forecast accuracy per household: the agent's mean absolute error per slot against "
            "the naive persistence forecast (last 96 slots)",
            className="sub",
        )
    )
    rows = [
        {
            **r,
            "mae_96": _wh(r["mae_96_wh"]),
            "mae_672": _wh(r["mae_672_wh"]),
            "persistence": _wh(r["persistence_mae_wh"]),
            "skill": _permille(r["skill_permille"]),
        }
        for r in view.forecasts
    ]
    out.append(
        _table(
            rows,
            [
                ("short", "household"),
                ("node_api", "node status API"),
                ("mae_96", "forecast MAE Wh (last 96)"),
                ("samples_96", "slots"),
                ("persistence", "persistence MAE Wh"),
                ("persistence_samples", "slots"),
                ("skill", "skill vs persistence"),
                ("mae_672", "forecast MAE Wh (last 672)"),
                ("status", "status"),
            ],
            "forecast-rows",
            titles={"short": "household"},
            row_class=lambda r: "former" if str(r["status"]).startswith("no data") else None,
        )
    )
    out.append(
        html.H3(
            "Clocks: offset from the grid's median (seconds, + ahead / − behind)",
            className="sub",
        )
    )
    if view.clocks:
        out.append(
            _table(
                [
                    {
                        **r,
                        "label": r["short"] or r["node_api"],
                        "offset": _offset(r["offset_s"]),
                        "error": None if r["error_s"] is None else f"± {r['error_s']:.2f}",
                        "bound": None if r["max_skew_s"] is None else f"{r['max_skew_s']:g}",
                    }
                    for r in view.clocks
                ],
                [
                    ("label", "node"),
                    ("source", "source"),
                    ("offset", "offset s"),
                    ("error", "error s"),
                    ("bound", "bound s"),
                    ("peers_sampled", "peers sampled"),
                    ("status", "status"),
                ],
                "clock-rows",
                titles={"label": "node"},
                row_class=lambda r: "skewed" if r["skewed"] else None,
            )
        )
    else:
        out.append(html.Div("No node polled: no clock to show.", className="muted"))
    return out


def _opt(value: Any) -> str:
    return "—" if value is None else str(value)


def _short_ref(ref: str) -> str:
    if ref.startswith("did:"):
        return data.short_did(ref)
    parts = ref.split(":")
    return ref if len(ref) <= 40 else ":".join(p[:12] for p in parts)


def serve(app: Dash, host: str = "127.0.0.1", port: int = 8050) -> BaseWSGIServer:
    """A threaded WSGI server for ``app`` bound to ``host:port`` (0 = a free port).

    Call ``serve_forever()`` on it (in a thread, or the main thread of its own process) and
    ``shutdown()`` to stop it.
    """
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return make_server(
        host, port, app.server, threaded=True, request_handler=http_guard.ClippedLogHandler
    )


def wait_for_verify(ctx: Context, timeout: float) -> dict[str, Any]:
    """Block until a pending background verification finished (tests, bench)."""
    ctx.verify.wait(timeout)
    return ctx.verify.status()
