"""Fixtures of the dashboard tests: a real simulated ledger, the app on a loopback port, a
loopback status API, and Debian's headless Chromium driven by Playwright.

Chromium is the Debian package (/usr/bin/chromium, ``apt-get install chromium``); no browser is
ever downloaded. Without it (or without Playwright) the browser tests are skipped outside CI and
fail in CI.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import case, create_engine, func, insert, select

from dashboard.app import STATUS_VIEW_OUTPUTS, create_app, serve
from dashboard.views import Context
from market.schedule import Schedule
from node.ledger import schema as t
from tests.dashboard.feeder import Feeder, FeederGrid

CHROMIUM = os.environ.get("MICROGRID_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
TEST_TIMEOUT_S = 150


@pytest.fixture(autouse=True)
def _bounded_test() -> Iterator[None]:
    """Every dashboard test is bounded in time: a hung one dumps its stacks and exits."""
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def browser_available() -> bool:
    """Debian's Chromium and the Playwright package are both installed."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists()


needs_browser = pytest.mark.skipif(
    not browser_available() and not os.environ.get("CI"),
    reason="needs Debian's chromium (apt-get install chromium) and pip playwright",
)


class RunningDashboard:
    """A Dash app on a free loopback port, in a thread of this process."""

    def __init__(self, ctx: Context, refresh_ms: int = 700) -> None:
        self.ctx = ctx
        self.app = create_app(ctx, refresh_ms=refresh_ms)
        self.server = serve(self.app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the database."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)
        self.ctx.verify.wait(30)
        self.ctx.close()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A persistent Chromium context on a fresh user data dir."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
            accept_downloads=True,
        )
        context.set_default_timeout(20_000)
        try:
            yield context
        finally:
            context.close()


class ConsoleLog:
    """Browser console errors and uncaught page errors of one page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")


def screenshot(page: Any, selector: str, name: str) -> Path:
    """Save a screenshot of one element under artifacts/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.locator(selector).screenshot(path=str(path))
    return path


def new_feeder(
    tmp: Path,
    slots: int,
    households: int = 6,
    seed: int = 1,
    first_slot: int = 0,
    schedule: Schedule | None = None,
) -> Feeder:
    """A ledger of ``slots`` settled slots from ``first_slot`` on, produced by the real engine
    and store; ``schedule``: the grid's schedule, recorded in meta as a node does (None: a
    ledger of an older node, without one)."""
    feeder = Feeder(
        f"sqlite:///{tmp / 'ledger.db'}",
        households=households,
        seed=seed,
        first_slot=first_slot,
        schedule=schedule,
    )
    feeder.advance(slots)
    return feeder


def graph_js(graph_id: str, expr: str) -> str:
    """A JS predicate over the Plotly graph div ``g`` inside the dcc.Graph ``graph_id``."""
    return (
        "() => { const g = document.querySelector('#" + graph_id + " .js-plotly-plot');"
        " if (!g || !g.data || !g.layout) return false; try { return (" + expr + "); }"
        " catch (e) { return false; } }"
    )


def graph_eval(page: Any, graph_id: str, expr: str) -> Any:
    """Evaluate ``expr`` over the Plotly graph div ``g`` (None if it is not drawn yet)."""
    return page.evaluate(graph_js(graph_id, expr).replace("return false; try", "return null; try"))


def wait_text(page: Any, selector: str, needle: str) -> None:
    """Wait until the element at ``selector`` shows ``needle``."""
    page.wait_for_function(
        "([s, n]) => { const e = document.querySelector(s); return e && e.innerText.includes(n); }",
        arg=[selector, needle],
    )


STATUS_VIEWS = (
    ".." + "...".join(f"{c}.{p}" for c, p in (*STATUS_VIEW_OUTPUTS, ("status-sent", "data"))) + ".."
)
"""The output key (``/_dash-dependencies``) of the callback that draws the status views."""


def callback_payload(
    dep: dict[str, Any], values: dict[str, Any], changed: list[str] | None = None
) -> dict[str, Any]:
    """The body Dash's renderer posts to ``/_dash-update-component`` for the callback ``dep``
    (an entry of ``/_dash-dependencies``), with these ``id.property`` values; ``changed``
    defaults to its first input."""

    def spec(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for i in items:
            value = values.get(f"{i['id']}.{i['property']}")
            out.append({"id": i["id"], "property": i["property"], "value": value})
        return out

    output = dep["output"]
    outputs = [
        {"id": o.split(".")[0], "property": o.split(".")[1]} for o in output.strip(".").split("...")
    ]
    first = f"{dep['inputs'][0]['id']}.{dep['inputs'][0]['property']}"
    return {
        "output": output,
        "outputs": outputs if len(outputs) > 1 else outputs[0],
        "inputs": spec(dep["inputs"]),
        "state": spec(dep["state"]),
        "changedPropIds": changed if changed is not None else [first],
    }


FEEDER_TOLERANCE_WH = 100
FEEDER_LOSS_PERMILLE = 50


def write_feeder_checks(
    url: str, special: dict[int, tuple[str, int]] | None = None, after: int | None = None
) -> dict[int, dict[str, Any]]:
    """Insert a ``feeder_checks`` row for every block of the ledger at ``url`` above slot
    ``after`` (as the store will once the engine computes feeder checks; the blocks must exist
    for the foreign key). The numbers follow the spec: households' net = Σ measured
    (import − export) from the settlements, allowed loss = tolerance + 5 % of the energy moved.

    ``special`` maps a slot to ``(status, difference_wh)``: ``mismatch`` with that difference,
    ``no_feeder_reading`` or ``households_unmeasured`` (difference ignored); every other slot is
    ``ok`` with a difference of +10 Wh. Returns the inserted rows by slot.
    """
    special = special or {}
    s = t.settlements.c
    engine = create_engine(url)
    rows: dict[int, dict[str, Any]] = {}
    try:
        with engine.begin() as conn:
            net = {
                int(r.slot): (int(r.net), int(r.moved))
                for r in conn.execute(
                    select(
                        s.slot,
                        func.sum(case((s.measured, s.import_wh - s.export_wh), else_=0)).label(
                            "net"
                        ),
                        func.sum(case((s.measured, s.import_wh + s.export_wh), else_=0)).label(
                            "moved"
                        ),
                    ).group_by(s.slot)
                )
            }
            base = conn.execute(
                select(func.max(t.feeder_checks.c.import_wh), func.max(t.feeder_checks.c.export_wh))
            ).first()
            imp, exp = (int(base[0] or 10_000_000), int(base[1] or 5_000_000)) if base else (0, 0)
            blocks = select(t.blocks.c.slot, t.blocks.c.height).order_by(t.blocks.c.slot)
            if after is not None:
                blocks = blocks.where(t.blocks.c.slot > after)
            for blk in conn.execute(blocks).all():
                slot = int(blk.slot)
                households, moved = net.get(slot, (0, 0))
                status, diff = special.get(slot, ("ok", 10))
                row: dict[str, Any] = {
                    "slot": slot,
                    "block_height": int(blk.height),
                    "status": status,
                    **dict.fromkeys(
                        ("meter_serial", "import_wh", "export_wh", "nonce", "signature"), None
                    ),
                    **dict.fromkeys(
                        (
                            "feeder_net_wh",
                            "households_net_wh",
                            "difference_wh",
                            "allowed_loss_wh",
                        ),
                        None,
                    ),
                }
                if status != "no_feeder_reading":
                    feeder_net = households + diff
                    imp += max(feeder_net, 0)
                    exp += max(-feeder_net, 0)
                    row |= {
                        "meter_serial": "FEEDER-1",
                        "import_wh": imp,
                        "export_wh": exp,
                        "nonce": slot * 4 + 2,
                        "signature": "00" * 64,
                    }
                if status in ("ok", "mismatch"):
                    row |= {
                        "feeder_net_wh": households + diff,
                        "households_net_wh": households,
                        "difference_wh": diff,
                        "allowed_loss_wh": FEEDER_TOLERANCE_WH
                        + FEEDER_LOSS_PERMILLE * moved // 1000,
                    }
                rows[slot] = row
            if rows:
                conn.execute(insert(t.feeder_checks), list(rows.values()))
    finally:
        engine.dispose()
    return rows


def feeder_check_rows(url: str) -> dict[int, dict[str, Any]]:
    """The ``feeder_checks`` rows of the ledger at ``url`` by slot, read straight from the table
    (what the engine and store wrote, not the dashboard's reading of it)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {r.slot: r._asdict() for r in conn.execute(select(t.feeder_checks))}
    finally:
        engine.dispose()


def new_feeder_grid(
    tmp: Path,
    slots: int,
    households: int = 6,
    seed: int = 1,
    first_slot: int = 0,
    tamper: dict[int, int] | None = None,
    skip: set[int] | None = None,
) -> FeederGrid:
    """A ledger of a grid with a feeder meter: ``slots`` settled slots with their feeder checks,
    produced by the real engine and store (see :class:`FeederGrid`)."""
    grid = FeederGrid(
        f"sqlite:///{tmp / 'ledger.db'}",
        households=households,
        seed=seed,
        first_slot=first_slot,
        tamper=tamper,
        skip=skip,
    )
    grid.advance(slots)
    return grid
