"""The operator's browser: what an open dashboard costs the machine it is shown on.

An operator keeps the dashboard open for hours, often on a laptop. Its page polls the server
every ``--refresh`` seconds (the dashboard's default: 5 s); each poll runs the callbacks whose
inputs changed and the browser re-renders their outputs. This benchmark opens the real
dashboard (``dashboard.app``, in a thread of this process) in Debian's headless ``chromium``
(driven by playwright) on the synthetic ledger of ``bench/dashboard_bench.py`` (``--days`` ×
96 slots × ``--households``) and a status API serving a fixed status document, lets the page
settle, then reads the renderer's own counters over ``--seconds`` (Chrome DevTools
``Performance.getMetrics``):

- ``busy``: the renderer's main-thread task time (``TaskDuration``: script, style, layout,
  paint) as a share of one core;
- ``script``: the JavaScript part of it (``ScriptDuration``);
- callbacks per minute: ``POST /_dash-update-component`` requests the page made.

Nothing changes in the ledger during the window: the figures are the cost of a dashboard at
rest. ``--compare-dash VERSION`` installs that Dash release into a temporary directory
(``pip install --target``, from PyPI), measures it the same way in a second process and prints
the ratio: the dashboard pins ``dash<4.2`` because 4.2.0-4.4.1 remount every callback's output
subtree on each update (plotly/dash#3846); ``--compare-dash 4.4.1`` shows what that costs.

Run: ``python -m bench.browser_bench [--refresh 5] [--seconds 30] [--compare-dash 4.4.1]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.dashboard_bench import Generator
from tests.dashboard.status_server import StatusServer

CHROMIUM = os.environ.get("MICROGRID_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip
SETTLE_S = 10.0
"""Seconds after the page loaded before the window starts (first render, figures drawn)."""


def status_document(height: int, head_hash: str) -> dict[str, Any]:
    """A status document in the shape a node serves (docs/dashboard.md), fixed for the run."""
    return {
        "node": "did:key:z6MkBenchNode",
        "raft": {
            "role": "leader",
            "term": 7,
            "leader": "did:key:z6MkBenchNode",
            "leader_changes": 3,
            "commit_index": 1200,
            "applied_index": 1200,
            "last_index": 1200,
        },
        "peers": [{"id": f"p{i}", "up": True} for i in range(1, 5)],
        "members": {"up": 5, "down": 0},
        "ledger": {"height": height, "head_hash": head_hash},
        "invalid_messages": {"bad_signature": 0},
        "meter_read_failures": 0,
    }


def ledger(days: int, households: int) -> Path:
    """The synthetic ledger (generated once, kept in the temp directory)."""
    path = Path(tempfile.gettempdir()) / f"microgrid-dashboard-bench-{days}d-{households}h.db"
    try:
        with sqlite3.connect(path) as db:
            if db.execute("SELECT value FROM meta WHERE key='bench_complete'").fetchone():
                return path
    except sqlite3.Error:
        pass
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    print(f"generating {days} days × 96 slots × {households} households into {path}", flush=True)
    Generator(path, days, households).run()
    return path


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Open the dashboard in chromium and read the renderer's counters over the window."""
    import dash
    from playwright.sync_api import sync_playwright

    from dashboard.app import create_app, serve
    from dashboard.views import Context

    path = ledger(args.days, args.households)
    with sqlite3.connect(path) as db:
        height, head_hash = db.execute(
            "SELECT height, hash FROM blocks ORDER BY height DESC LIMIT 1"
        ).fetchone()
    api = StatusServer(status_document(height, head_hash))
    ctx = Context.open(f"sqlite:///{path}", api.url, verify_enabled=False)
    server = serve(create_app(ctx, refresh_ms=int(args.refresh * 1000)), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    calls: collections.Counter[str] = collections.Counter()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=CHROMIUM_ARGS)  # fmt: skip
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})

                def on_request(request: Any) -> None:
                    if "_dash-update-component" in request.url:
                        output = json.loads(request.post_data or "{}").get("output", "?")
                        calls[output.strip(".").split(".")[0]] += 1

                page.on("request", on_request)
                page.goto(f"http://127.0.0.1:{server.server_port}/")
                page.wait_for_selector("#market-graph .main-svg", timeout=60_000)
                time.sleep(SETTLE_S)
                cdp = page.context.new_cdp_session(page)
                cdp.send("Performance.enable")

                def metrics() -> dict[str, float]:
                    got = cdp.send("Performance.getMetrics")["metrics"]
                    return {m["name"]: m["value"] for m in got}

                calls.clear()
                before, t0 = metrics(), time.monotonic()
                time.sleep(args.seconds)
                after, wall = metrics(), time.monotonic() - t0
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
        api.stop()
        ctx.close()
    return {
        "dash": dash.__version__,
        "busy": (after["TaskDuration"] - before["TaskDuration"]) / wall,
        "script": (after["ScriptDuration"] - before["ScriptDuration"]) / wall,
        "calls_per_min": sum(calls.values()) * 60 / wall,
        "calls": dict(calls.most_common()),
        "wall": wall,
    }


def report(r: dict[str, Any], label: str) -> None:
    """Print one measurement."""
    print(f"  {label} (dash {r['dash']}): renderer busy {100 * r['busy']:5.1f} % of one core, "
          f"script {100 * r['script']:5.1f} %, {r['calls_per_min']:.0f} callbacks/min "
          f"over {r['wall']:.0f} s", flush=True)  # fmt: skip
    print("    callbacks by first output: "
          + ", ".join(f"{k} {v}" for k, v in r["calls"].items()), flush=True)  # fmt: skip


def compare(args: argparse.Namespace, version: str) -> dict[str, Any] | None:
    """The same measurement with Dash ``version`` installed into a temporary directory."""
    target = Path(tempfile.mkdtemp(prefix=f"microgrid-dash-{version}-"))
    try:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
               str(target), f"dash=={version}"]  # fmt: skip
        if subprocess.run(pip, check=False).returncode != 0:
            print(f"  could not install dash=={version}: no comparison", flush=True)
            return None
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.getcwd()])}
        argv = [sys.executable, "-m", "bench.browser_bench", "--json", "--refresh",
                str(args.refresh), "--seconds", str(args.seconds), "--days", str(args.days),
                "--households", str(args.households)]  # fmt: skip
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False,
                             timeout=args.seconds + 300)  # fmt: skip
        if out.returncode != 0:
            print(f"  dash {version} run failed: {out.stderr[-2000:]}", flush=True)
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(target, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Measure the installed Dash, and optionally another release for the ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--refresh", type=float, default=5.0, help="the page's poll interval (s)")
    p.add_argument("--seconds", type=float, default=30.0, help="the measured window")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--households", type=int, default=50)
    p.add_argument("--compare-dash", default=None, metavar="VERSION")
    p.add_argument("--json", action="store_true", help="print one JSON line (comparison runs)")
    args = p.parse_args(argv)
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).exists()):
        print(f"no chromium at {CHROMIUM} (apt-get install chromium; MICROGRID_CHROMIUM)")
        return 1
    mine = measure(args)
    if args.json:
        print(json.dumps(mine))
        return 0
    print(f"dashboard at rest: {args.days} days × {args.households} households, "
          f"refresh {args.refresh:g} s", flush=True)  # fmt: skip
    report(mine, "installed")
    if args.compare_dash:
        other = compare(args, args.compare_dash)
        if other is not None:
            report(other, "compared")
            if mine["busy"] > 0:
                print(f"  busy ratio dash {other['dash']} / {mine['dash']}: "
                      f"{other['busy'] / mine['busy']:.2f}×", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
