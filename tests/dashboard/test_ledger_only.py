"""The dashboard from the ledger database alone: no status API, or one that cannot be reached;
and ``microgrid dashboard`` as a real process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dashboard.views import Context
from tests.dashboard.conftest import (
    ConsoleLog,
    RunningDashboard,
    graph_js,
    needs_browser,
    new_feeder,
    screenshot,
    wait_text,
)
from tests.dashboard.feeder import Feeder

SLOTS = 60


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Feeder]:
    feeder = new_feeder(tmp_path_factory.mktemp("ledger-only"), SLOTS, households=4, seed=9)
    try:
        yield feeder
    finally:
        feeder.close()


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_browser
@pytest.mark.parametrize("api", ["none", "unreachable"])
def test_views_work_without_the_api(chromium: Any, ledger: Feeder, api: str) -> None:
    api_url = None if api == "none" else f"http://127.0.0.1:{closed_port()}"
    dash = RunningDashboard(Context.open(ledger.store.url, api_url, api_timeout=0.3))
    page = chromium.new_page()
    try:
        log = ConsoleLog(page)
        page.goto(dash.url)
        wait_text(page, "#head-badge", f"height {SLOTS}")
        page.wait_for_function(graph_js("market-graph", f"g.data[0].x.length === {SLOTS}"))
        page.wait_for_function(graph_js("household-graph", f"g.data[0].x.length === {SLOTS}"))
        wait_text(page, "#book-summary", "cleared")
        wait_text(page, "#kpi-verify", "OK")
        wait_text(page, "#kpi-self-sufficiency", "%")
        if api == "none":
            wait_text(page, "#network-state", "No node status API configured")
            wait_text(page, "#api-badge", "no status API")
            page.wait_for_selector("#no-alerts")
        else:
            wait_text(page, "#network-state", "unreachable")
            wait_text(page, "#api-badge", "unreachable")
            page.wait_for_selector(".alert[data-code=api_unreachable]")
        screenshot(page, "#section-network", f"network-api-{api}")
        assert log.errors == []
    finally:
        page.close()
        dash.stop()


def test_cli_serves_the_dashboard(ledger: Feeder, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *[sys.executable, "-m", "node.cli", "dashboard", "--db", ledger.store.url],
            *["--port", "0", "--slot-seconds", "10"],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("dashboard on http://127.0.0.1:"), line
        assert line.rstrip().endswith(", 10 s slots from --slot-seconds)"), line
        url = line.split()[2]
        deadline = time.monotonic() + 20
        html = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    html = resp.read().decode()
                break
            except OSError:
                time.sleep(0.2)
        assert "Microgrid operator" in html
        with urllib.request.urlopen(url + "_dash-layout", timeout=5) as resp:
            assert b"market-graph" in resp.read()
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


@pytest.mark.parametrize("value", ["0", "-900", "15m"])
def test_cli_refuses_a_bad_slot_length(ledger: Feeder, value: str) -> None:
    proc = subprocess.run(
        [
            *[sys.executable, "-m", "node.cli", "dashboard", "--db", ledger.store.url],
            f"--slot-seconds={value}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--slot-seconds" in proc.stderr


@needs_browser
def test_unreadable_and_empty_ledgers_are_shown_not_crashed(chromium: Any, tmp_path: Path) -> None:
    missing = RunningDashboard(Context.open(f"sqlite:///{tmp_path / 'missing.db'}"))
    empty_feeder = Feeder(f"sqlite:///{tmp_path / 'empty.db'}", households=3, seed=2)
    empty = RunningDashboard(Context.open(empty_feeder.store.url))
    page = chromium.new_page()
    try:
        log = ConsoleLog(page)
        page.goto(missing.url)
        page.wait_for_selector(".alert[data-code=ledger_unreadable]")
        wait_text(page, "#head-badge", "ledger unreadable")
        page.goto(empty.url)
        wait_text(page, "#head-badge", "height 0")
        wait_text(page, "#book-summary", "No slot has closed yet")
        page.wait_for_selector("#no-alerts")
        page.wait_for_function(
            "() => document.querySelectorAll('#household-summary tbody tr').length === 3"
        )
        assert log.errors == []
    finally:
        page.close()
        missing.stop()
        empty.stop()
        empty_feeder.close()
