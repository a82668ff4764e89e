"""``microgrid archive`` into a real PostgreSQL server (and SQLite), and the dashboard on it.

`make test` starts the local Debian PostgreSQL (.ci/postgres.sh) and passes its admin URL in
MICROGRID_TEST_PG; each test gets a fresh database. Without it the PostgreSQL tests are skipped
with that reason, never in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text

from dashboard import data, views
from dashboard.archive import ArchiveError, archive
from market.schedule import Schedule
from node.cli import main as cli_main
from node.ledger import schema as t
from node.ledger import verify_ledger
from node.ledger.store import schedule_json
from tests.conftest import needs_pg
from tests.dashboard.conftest import (
    ConsoleLog,
    RunningDashboard,
    graph_js,
    needs_browser,
    new_feeder,
    screenshot,
    wait_text,
)

TABLES = (
    t.blocks,
    t.transactions,
    t.postings,
    t.balances,
    t.clearings,
    t.orders,
    t.trades,
    t.readings,
    t.settlements,
    t.true_ups,
    t.households,
)


def counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                tbl.name: int(conn.execute(select(func.count()).select_from(tbl)).scalar() or 0)
                for tbl in TABLES
            }
    finally:
        engine.dispose()


def check_copy(source: str, target: str) -> None:
    """The archive holds exactly the source's settled ledger and verifies."""
    src, dst = verify_ledger(source), verify_ledger(target)
    assert dst.ok, dst.error
    assert (dst.height, dst.head_hash) == (src.height, src.head_hash)
    assert counts(target) == counts(source)


def run_archive_case(tmp_path: Path, target: str) -> None:
    feeder = new_feeder(tmp_path, 20, households=4, seed=3)
    try:
        first = archive(feeder.store.url, target, chunk_blocks=7)
        assert (first.copied_blocks, first.height, first.verified) == (20, 20, True)
        check_copy(feeder.store.url, target)
        again = archive(feeder.store.url, target)
        assert again.copied_blocks == 0 and again.height == 20
        feeder.advance(5)
        more = archive(feeder.store.url, target)
        assert (more.copied_blocks, more.height) == (5, 25)
        check_copy(feeder.store.url, target)
        # gates closed but not settled are not archived
        feeder.close_gates_only(2)
        assert archive(feeder.store.url, target).copied_blocks == 0
        engine = create_engine(target)
        with engine.connect() as conn:
            assert conn.execute(select(func.max(t.clearings.c.slot))).scalar() == 24
        engine.dispose()
    finally:
        feeder.close()


def test_archive_to_sqlite_is_incremental_and_verifies(tmp_path: Path) -> None:
    run_archive_case(tmp_path, f"sqlite:///{tmp_path / 'archive.db'}")


@needs_pg
def test_archive_to_postgres_is_incremental_and_verifies(tmp_path: Path, pg_url: str) -> None:
    run_archive_case(tmp_path, pg_url)


def meta_of(url: str) -> dict[str, str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {r.key: r.value for r in conn.execute(select(t.meta.c.key, t.meta.c.value))}
    finally:
        engine.dispose()


def run_schedule_case(tmp_path: Path, target: str) -> None:
    """Issue 13: the archive copies meta ``schedule`` (the dashboard's slot length), also into
    an archive bound before its source recorded one, and refuses a source with another."""
    feeder = new_feeder(tmp_path, 4, households=3, seed=3)  # a ledger of an older node
    try:
        archive(feeder.store.url, target)
        assert "schedule" not in meta_of(target)
        feeder.store.record_schedule(Schedule(10, 3, 2))  # the node's next start
        feeder.advance(2)
        assert archive(feeder.store.url, target).copied_blocks == 2
        assert meta_of(target)["schedule"] == meta_of(feeder.store.url)["schedule"]
        archived = views.Context.open(target, verify_enabled=False)
        try:
            assert (archived.schedule.slot_seconds, archived.slot_source) == (10, views.SLOT_LEDGER)
        finally:
            archived.close()
        feeder.store.set_meta("schedule", schedule_json(Schedule(900, 3, 2)))
        feeder.advance(1)
        with pytest.raises(ArchiveError, match=r"schedule .*refusing to mix ledgers"):
            archive(feeder.store.url, target)
        assert verify_ledger(target).height == 6
    finally:
        feeder.close()


def run_schedule_bind_case(tmp_path: Path, target: str) -> None:
    """A fresh archive takes meta ``schedule`` with the grid binding."""
    feeder = new_feeder(tmp_path, 2, households=3, seed=5, schedule=Schedule(10, 3, 2))
    try:
        archive(feeder.store.url, target)
    finally:
        feeder.close()
    assert json.loads(meta_of(target)["schedule"])["slot_seconds"] == 10


def test_archive_copies_the_schedule_to_sqlite(tmp_path: Path) -> None:
    (tmp_path / "bind").mkdir()
    run_schedule_bind_case(tmp_path / "bind", f"sqlite:///{tmp_path / 'bound.db'}")
    run_schedule_case(tmp_path, f"sqlite:///{tmp_path / 'archive.db'}")


@needs_pg
def test_archive_binding_copies_the_schedule_to_postgres(tmp_path: Path, pg_url: str) -> None:
    run_schedule_bind_case(tmp_path, pg_url)


@needs_pg
def test_archive_copies_the_schedule_to_postgres(tmp_path: Path, pg_url: str) -> None:
    run_schedule_case(tmp_path, pg_url)


@needs_pg
def test_archive_refuses_another_grid(tmp_path: Path, pg_url: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = new_feeder(tmp_path / "a", 6, households=3, seed=1)
    b = new_feeder(tmp_path / "b", 6, households=3, seed=2)
    try:
        archive(a.store.url, pg_url)
        before = counts(pg_url)
        with pytest.raises(ArchiveError, match="refusing to mix ledgers"):
            archive(b.store.url, pg_url)
        assert counts(pg_url) == before
        assert verify_ledger(pg_url).ok
    finally:
        a.close()
        b.close()


@needs_pg
def test_dashboard_views_work_on_the_archive(tmp_path: Path, pg_url: str) -> None:
    feeder = new_feeder(tmp_path, 40, households=5, seed=4)
    try:
        archive(feeder.store.url, pg_url)
    finally:
        feeder.close()
    lite = views.Context.open(feeder.store.url, verify_interval=0)
    pg = views.Context.open(pg_url, verify_interval=0)
    try:
        for ctx in (lite, pg):
            views.head_view(ctx)
            ctx.verify.wait(30)
        assert pg.verify.status()["state"] == "ok"
        head_pg, head_lite = views.head_view(pg), views.head_view(lite)
        head_pg.pop("verify_finished_at")
        head_lite.pop("verify_finished_at")
        assert head_pg == head_lite
        assert views.market_view(pg, "7d").points == views.market_view(lite, "7d").points
        assert views.orderbook_view(pg, 30).orders == views.orderbook_view(lite, 30).orders
        hh = data.household_summary(pg.engine)
        assert hh == data.household_summary(lite.engine)
        assert views.households_view(pg, hh[1]["household"], "1d").slots == (
            views.households_view(lite, hh[1]["household"], "1d").slots
        )
        assert views.community_view(pg, "all").figures == views.community_view(lite, "all").figures
        ledger_pg, ledger_lite = views.ledger_view(pg), views.ledger_view(lite)
        for key in ("height", "head_hash", "transactions", "blocks", "latest_transactions"):
            assert ledger_pg[key] == ledger_lite[key]
        # the dashboard's PostgreSQL sessions are read-only
        with pytest.raises(Exception, match="read-only"), pg.engine.begin() as conn:
            conn.execute(text("DELETE FROM meta"))
    finally:
        lite.close()
        pg.close()


@needs_pg
def test_cli_archive_and_follow(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    feeder = new_feeder(tmp_path, 8, households=3, seed=5)
    args = ["archive", "--from", feeder.store.url, "--to", pg_url]
    try:
        assert cli_main(args) == 0
        assert "archived 8 new blocks" in capsys.readouterr().out
        (tmp_path / "other").mkdir()
        other = new_feeder(tmp_path / "other", 2, households=3, seed=6)
        other.close()
        assert cli_main(["archive", "--from", other.store.url, "--to", pg_url]) == 1
        assert "refusing to mix ledgers" in capsys.readouterr().err
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", *args, "--follow", "--interval", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            feeder.advance(3)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and verify_ledger(pg_url).height != 11:
                time.sleep(0.3)
            assert verify_ledger(pg_url).height == 11
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=20)
        assert "archived 3 new blocks" in out, (out, err)
    finally:
        feeder.close()


@needs_pg
@needs_browser
def test_dashboard_page_on_the_archive(chromium: Any, tmp_path: Path, pg_url: str) -> None:
    feeder = new_feeder(tmp_path, 60, households=4, seed=8)
    try:
        archive(feeder.store.url, pg_url)
    finally:
        feeder.close()
    dash = RunningDashboard(views.Context.open(pg_url))
    page = chromium.new_page()
    try:
        log = ConsoleLog(page)
        page.goto(dash.url)
        wait_text(page, "#head-badge", "height 60")
        page.wait_for_function(graph_js("market-graph", "g.data[0].x.length === 60"))
        wait_text(page, "#book-summary", "cleared")
        wait_text(page, "#kpi-verify", "OK")
        page.wait_for_selector("#no-alerts")
        screenshot(page, "body", "archive-page")
        assert log.errors == []
    finally:
        page.close()
        dash.stop()


def test_archive_copies_a_ledger_of_an_older_node_without_the_added_columns(
    tmp_path: Path,
) -> None:
    """A source ledger written before ``orders.steps`` and ``trades.part`` existed (and not
    opened by this version since) archives whole, and the archive verifies."""
    import sqlite3

    feeder = new_feeder(tmp_path, 4, households=3, seed=3)
    source = feeder.store.url
    path = source.removeprefix("sqlite:///")
    feeder.close()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE orders DROP COLUMN steps")
        conn.execute("ALTER TABLE trades DROP COLUMN part")
    target = f"sqlite:///{tmp_path / 'archive.db'}"
    assert archive(source, target).copied_blocks == 4
    report = verify_ledger(target)
    assert report.ok and report.height == 4, report.error
    engine = create_engine(target)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t.orders)).scalar() > 0
    engine.dispose()
