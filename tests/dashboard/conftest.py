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

from dashboard.app import create_app, serve
from dashboard.views import Context
from tests.dashboard.feeder import Feeder

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
    tmp: Path, slots: int, households: int = 6, seed: int = 1, first_slot: int = 0
) -> Feeder:
    """A ledger of ``slots`` settled slots from ``first_slot`` on, produced by the real engine
    and store."""
    feeder = Feeder(
        f"sqlite:///{tmp / 'ledger.db'}", households=households, seed=seed, first_slot=first_slot
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
