"""The data layer and the API client without a browser: figures against the ledger's own
postings, the lazy slot cache, slot times and windows, alerts, status normalisation, zoom
bookkeeping."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dash
from sqlalchemy import func, select

from dashboard import data, views
from dashboard.app import apply_zoom, slot_from_click, zoom_from_relayout
from dashboard.node_client import StatusHistory, api_alerts, normalise
from market.schedule import Schedule
from market.settlement import Tariffs
from node.ledger import schema as t
from node.ledger.queries import SlotRow
from tests.dashboard.conftest import new_feeder
from tests.dashboard.status_server import StatusServer, status_doc

PROD = Schedule(900)
DEMO = Schedule(10)


def utc(seconds: int, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A Unix time as the dashboard should label it, computed with datetime."""
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)).strftime(fmt)


def test_community_figures_by_hand() -> None:
    rows = [
        # 1000 Wh drawn, 400 exported: 400 covered locally, 600 from the feeder
        SlotRow(
            slot=0,
            settled=True,
            import_wh=1000,
            export_wh=400,
            volume_wh=300,
            grid_import_wh=700,
            grid_export_wh=100,
            buyer_pay_wh_price=300 * 20,
            seller_get_wh_price=300 * 20,
        ),
        # only export: nothing consumed locally
        SlotRow(slot=1, settled=True, import_wh=0, export_wh=500, grid_export_wh=500),
        SlotRow(slot=2, settled=False, import_wh=999, export_wh=999),  # not settled: ignored
    ]
    f = data.community_figures(rows, lambda _slot: Tariffs(feed_in=8, retail=32))
    assert (f.slots, f.import_wh, f.export_wh) == (2, 1000, 900)
    assert (f.feeder_import_wh, f.feeder_export_wh) == (600, 500)
    assert f.self_sufficiency == 1 - 600 / 1000
    assert f.self_consumption == 1 - 500 / 900
    assert f.grid_only_cost_cents == round((1000 * 32 - 900 * 8) / 1000)
    assert f.actual_cost_cents == round((700 * 32 - 600 * 8) / 1000)
    assert f.savings_cents == f.grid_only_cost_cents - f.actual_cost_cents


def test_actual_cost_matches_the_ledgers_money(tmp_path: Path) -> None:
    feeder = new_feeder(tmp_path, 96, households=6, seed=1)
    feeder.close()
    ctx = views.Context.open(feeder.store.url, verify_enabled=False)
    try:
        views.head_view(ctx)
        rows = ctx.slots.window(None)
        info = ctx.info()
        f = data.community_figures(rows, data.tariffs_in_force(ctx.engine, info))
        with ctx.engine.connect() as conn:
            paid = -conn.execute(
                select(func.sum(t.balances.c.amount)).where(
                    t.balances.c.account.like("household:%"), t.balances.c.asset == "money"
                )
            ).scalar()
            n_tx = conn.execute(select(func.count()).select_from(t.transactions)).scalar()
        # the ledger rounds each transaction; the dashboard rounds once
        assert abs(f.actual_cost_cents - paid) <= n_tx
        assert f.savings_cents > 0 and 0 < f.self_sufficiency < 1
    finally:
        ctx.close()


def test_slot_cache_loads_lazily_and_incrementally(tmp_path: Path) -> None:
    feeder = new_feeder(tmp_path, 40, households=3, seed=2)
    try:
        engine = data.open_engine(feeder.store.url)
        cache = data.SlotCache(engine, initial_slots=10)
        cache.refresh()
        assert (cache.floor, cache.cleared_through, cache.settled_through) == (30, 39, 39)
        assert len(cache.rows) == 10
        assert [r.slot for r in cache.window(15)] == list(range(25, 40))
        assert cache.floor == 25
        full = cache.window(None)
        assert [r.slot for r in full] == list(range(40)) and all(r.settled for r in full)
        feeder.advance(2)
        feeder.close_gates_only(1)
        cache.refresh()
        assert (cache.cleared_through, cache.settled_through) == (42, 41)
        assert not cache.rows[42].settled and cache.rows[41].settled
        fresh = data.SlotCache(engine)
        fresh.refresh()
        for slot in (0, 20, 41, 42):
            assert data.slot_row_dict(fresh.window(None)[slot], PROD) == data.slot_row_dict(
                cache.rows[slot], PROD
            )
        engine.dispose()
    finally:
        feeder.close()


def test_ledger_alerts() -> None:
    head = data.HeadInfo(height=10, head_hash="ab", settled_through=9, closed_through=16)
    rows = [
        SlotRow(slot=1, bid_volume_wh=100, ask_volume_wh=50, volume_wh=0),
        SlotRow(slot=2, bid_volume_wh=100, ask_volume_wh=0, volume_wh=0),  # one side only
        SlotRow(slot=3, bid_volume_wh=100, ask_volume_wh=50, volume_wh=50),
    ]
    alerts = data.ledger_alerts(rows, head, {"state": "failed", "error": "boom"}, 4, schedule=PROD)
    assert [a["code"] for a in alerts] == [
        "ledger_invalid",
        "slot_not_cleared",
        "settlement_overdue",
    ]
    assert "Slot 1 (1970-01-01 00:15 UTC) did not clear" in alerts[1]["message"]
    assert "through slot 16 (1970-01-01 04:00 UTC)" in alerts[2]["message"]
    ok_head = data.HeadInfo(height=10, head_hash="ab", settled_through=9, closed_through=11)
    assert data.ledger_alerts(rows[1:], ok_head, {"state": "ok"}, 4, schedule=PROD) == []


def test_status_normalisation() -> None:
    nested = normalise(
        {
            "raft": {
                "role": "follower",
                "term": 3,
                "leader": "did:key:zL",
                "commit_index": 10,
                "applied_index": 7,
                "last_index": 12,
            },
            "peers": [{"up": True}, {"up": False}, {"up": True}],
            "invalid_messages": {"bad_signature": 2, "junk": "x"},
        }
    )
    assert (nested.role, nested.term, nested.leader) == ("follower", 3, "did:key:zL")
    assert (nested.commit_lag, nested.apply_lag) == (2, 3)
    assert (nested.peers, nested.members_up, nested.members_down) == (3, 2, 1)
    assert nested.invalid_messages == {"bad_signature": 2}
    flat = normalise(
        {
            "role": "leader",
            "term": "4",
            "leader": "",
            "commit_lag": 1,
            "peers": 5,
            "members_up": 4,
            "members_down": 0,
            "ledger_height": 9,
        }
    )
    assert (flat.term, flat.leader, flat.commit_lag, flat.peers) == (4, None, 1, 5)
    assert [a["code"] for a in api_alerts(flat, True)] == ["no_leader"]
    assert not normalise(["not", "an", "object"]).reachable
    assert api_alerts(None, False) == []
    history = StatusHistory()
    for term, leader in ((1, "a"), (1, "a"), (2, "b"), (2, None)):
        history.add(normalise({"term": term, "leader": leader}))
    assert history.observed_leader_changes == 2


def test_zoom_bookkeeping() -> None:
    assert zoom_from_relayout({"xaxis.range[0]": 3, "xaxis.range[1]": 9}) == [3, 9]
    assert zoom_from_relayout({"xaxis2.range[0]": 1, "xaxis2.range[1]": 2}) == [1, 2]
    assert zoom_from_relayout({"xaxis.range": [4, 5]}) == [4, 5]
    assert zoom_from_relayout({"xaxis.autorange": True}) is None
    assert zoom_from_relayout({"autosize": True}) is dash.no_update
    fig = {"data": [], "layout": {"uirevision": "m-7d", "xaxis": {}, "xaxis2": {"matches": "x"}}}
    out = apply_zoom(fig, {"revision": "m-7d", "range": [1, 2]})
    assert out["layout"]["xaxis"]["range"] == [1, 2]
    assert out["layout"]["xaxis2"] == {"matches": "x", "range": [1, 2], "autorange": False}
    other = {"data": [], "layout": {"uirevision": "m-30d"}}
    assert "xaxis" not in apply_zoom(other, {"revision": "m-7d", "range": [1, 2]})["layout"]


def test_bucket_labels_and_community_bucket_sizes() -> None:
    assert [views.bucket_label(n, DEMO) for n in views.bucket_sizes(DEMO)] == [
        "per slot", "per minute", "per 5 minutes", "per 15 minutes", "per hour", "per day",
        "per week",
    ]  # fmt: skip
    assert [views.bucket_label(n, PROD) for n in views.bucket_sizes(PROD)] == [
        "per slot", "per hour", "per day", "per week",
    ]  # fmt: skip
    assert views.bucket_label(3, Schedule(7)) == "per 21 s"
    # community: at most COMMUNITY_POINTS points; 15-minute slots hourly up to 3 days
    assert views._bucket_size(3 * 96, PROD, views.COMMUNITY_POINTS) == 4
    assert views._bucket_size(3 * 96 + 4, PROD, views.COMMUNITY_POINTS) == 96
    assert views._bucket_size(72, DEMO, views.COMMUNITY_POINTS) == 1


def test_stale_alert_defaults_to_three_slots(tmp_path: Path) -> None:
    feeder = new_feeder(tmp_path, 2, households=2, seed=5)
    feeder.close()
    ctx = views.Context.open(feeder.store.url, None, verify_enabled=False, schedule=PROD)
    try:
        assert ctx.stale_after() == 3 * 900
        ctx.use_slot_seconds(10)  # the node's /status reports its slot length
        assert ctx.stale_after() == 30
        views.head_view(ctx)
        ctx._head_changed_at -= 31  # as if the head had not changed for 31 s
        assert views.head_view(ctx)["stale_since"] is not None
        assert "ledger_stale" in [a["code"] for a in views.alerts_view(ctx)]
        ctx.stale_after_s = 3600.0  # --stale-after 60 wins over the slot length
        assert views.head_view(ctx)["stale_since"] is None
    finally:
        ctx.close()


def test_stale_ledger_and_readings_ahead_of_settlement(tmp_path: Path) -> None:
    feeder = new_feeder(tmp_path, 4, households=3, seed=3)
    feeder.close()
    ctx = views.Context.open(
        feeder.store.url, "http://127.0.0.1:9", verify_enabled=False, stale_after_s=0.2
    )
    try:
        first = views.head_view(ctx)
        assert first["stale_since"] is None
        assert [a["code"] for a in views.alerts_view(ctx)] == ["api_unreachable"]  # not polled
        time.sleep(0.3)
        assert views.head_view(ctx)["stale_since"] is not None
        ctx.history.add(normalise({"leader": "did:key:zL", "last_reading": {"slot": 20}}))
        codes = [a["code"] for a in views.alerts_view(ctx)]
        assert codes == ["ledger_stale", "settlement_overdue"]
    finally:
        ctx.close()


def test_slot_labels_are_the_utc_start_of_the_slot() -> None:
    # slot s starts at s * slot_seconds Unix seconds (market/schedule.py)
    assert data.slot_label(PROD, 1_960_000) == utc(1_960_000 * 900) == "2025-11-24 16:00"
    assert data.slot_label(PROD, 1_960_000) == PROD.start_datetime(1_960_000).strftime(
        data.time_format(PROD)
    )
    slot = DEMO.slot_at(1_796_183_512.3)
    label = data.slot_label(DEMO, slot)
    assert label == utc(slot * 10, "%Y-%m-%d %H:%M:%S") == "2026-12-02 03:51:50"
    # seconds whenever a slot start can fall inside a minute
    assert data.slot_label(Schedule(90), 1) == "1970-01-01 00:01:30"
    assert data.slot_label(Schedule(3600), 24) == "1970-01-02 00:00"
    assert data.slot_label(PROD, 10**16) == f"slot {10**16}"  # beyond any calendar
    assert (PROD.slots_per_day, DEMO.slots_per_day, Schedule(7).slots_per_day) == (
        96,
        8640,
        86_400 // 7,
    )
    assert Schedule(100_000).slots_per_day == 1  # at least one
    spans = [data.duration_label(s, n) for s, n in ((PROD, 4), (PROD, 96), (DEMO, 6), (DEMO, 1))]
    assert spans == ["1 h", "1 day", "1 min", "10 s"]
    assert [data.time_format(s) for s in (PROD, DEMO)] == ["%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S"]


def test_windows_and_buckets_follow_the_slot_length() -> None:
    assert [views.window_slots(w, PROD) for w in ("1d", "7d", "30d", "all")] == [
        96,
        7 * 96,
        30 * 96,
        None,
    ]
    assert [views.window_slots(w, DEMO) for w in ("1d", "7d", "30d", "all")] == [
        8640,
        7 * 8640,
        30 * 8640,
        None,
    ]
    assert views.window_slots("bogus", DEMO) == 7 * 8640
    # hours, days, weeks of 15-minute slots, as before; minutes too for 10-second slots
    assert views.bucket_sizes(PROD) == [1, 4, 96, 672]
    assert views.bucket_sizes(DEMO) == [1, 6, 30, 90, 360, 8640, 60480]
    # one day of 10-second slots: 8640 slots drawn as 1440 one-minute buckets
    first = 179_599_998  # a multiple of 6 slots: buckets start on whole minutes
    assert first * 10 % 60 == 0
    rows = [SlotRow(slot=first + i, volume_wh=1, price=20) for i in range(8640)]
    chart = views._bucket(rows, DEMO)
    points = chart.points
    assert (chart.bucket_size, len(points)) == (6, 1440)
    assert points[1]["slot"] == first + 6
    assert points[1]["time"] == utc((first + 6) * 10, "%Y-%m-%d %H:%M:%S")
    assert points[1]["time"].endswith(":00") and points[1]["local_wh"] == 6
    # the same number of 15-minute slots is 90 days: daily buckets
    assert views._bucket([SlotRow(slot=s) for s in range(8640)], PROD).bucket_size == 96


def test_ten_second_ledger_labels_and_windows(tmp_path: Path) -> None:
    first = 179_618_304  # 2026-12-02 03:44 UTC in 10-second slots, as in `microgrid demo`
    feeder = new_feeder(tmp_path, 200, households=3, seed=7, first_slot=first)
    feeder.close()
    demo = views.Context.open(feeder.store.url, verify_enabled=False, schedule=DEMO)
    prod = views.Context.open(feeder.store.url, verify_enabled=False)
    try:
        for ctx in (demo, prod):
            views.head_view(ctx)
        assert demo.alert_window() == 8640 and prod.alert_window() == 96
        # one day of 10-second slots holds all 200; one day of 15-minute slots the newest 96
        market = views.market_view(demo, "1d")
        fig, points = market.figure, market.points
        assert [p["slot"] for p in points] == list(range(first, first + 200))
        expected = [utc(s * 10, "%Y-%m-%d %H:%M:%S") for s in range(first, first + 200)]
        assert [p["time"] for p in points] == expected
        assert fig["data"][0]["x"] == expected  # plotted against the slot start ...
        assert fig["data"][0]["customdata"] == list(range(first, first + 200))  # ... slot rides
        assert fig["layout"]["xaxis"]["type"] == "date"
        assert fig["layout"]["xaxis"]["hoverformat"] == "%Y-%m-%d %H:%M:%S"
        prod_points = views.market_view(prod, "1d").points
        assert [p["slot"] for p in prod_points] == list(range(first + 104, first + 200))
        assert prod_points[0]["time"] == utc((first + 104) * 900)
        # households: the window in wall time, x = slot starts
        households = views.households_view(demo, None, "1d")
        assert len(households.slots) == 200 and households.slots[0]["time"] == expected[0]
        assert households.figure["data"][0]["x"] == expected
        assert len(views.households_view(prod, None, "1d").slots) == 96
        # community per minute of wall time: 200 slots of 10 s are 2,000 s, 34 minutes at most
        # (per slot would be 200 points, over COMMUNITY_POINTS); 15-minute slots: per hour
        community = views.community_view(demo, "all")
        cfig, buckets = community.figure, community.buckets
        minutes = sorted({(s * 10) // 60 * 60 for s in range(first, first + 200)})
        assert [d["time"] for d in buckets] == [utc(m, "%Y-%m-%d %H:%M:%S") for m in minutes]
        assert sum(d["slots"] for d in buckets) == 200
        assert list(cfig.data[0].x) == [d["time"] for d in buckets]
        assert cfig.layout.xaxis.type == "date"
        assert cfig.layout.xaxis.title.text == "UTC, per minute"
        hourly_view = views.community_view(prod, "all")
        pfig, hourly = hourly_view.figure, hourly_view.buckets
        assert pfig.layout.xaxis.title.text == "UTC, per hour"
        assert [d["time"] for d in hourly] == sorted(
            {utc(s * 900 // 3600 * 3600) for s in range(first, first + 200)}
        )
        # ledger tables and the order book title
        blocks = views.ledger_view(demo)["blocks"]
        assert blocks[0]["slot"] == first + 199 and blocks[0]["time"] == expected[-1]
        title = views.orderbook_view(demo, first + 5).figure.layout.title.text
        assert title == f"Order book of slot {first + 5} ({expected[5]} UTC)"
        assert data.rows_to_csv(points).splitlines()[1].startswith(f"{first},{expected[0]},")
    finally:
        demo.close()
        prod.close()


def test_the_nodes_slot_length_wins(tmp_path: Path) -> None:
    assert normalise({"slot_seconds": 10}).slot_seconds == 10
    for junk in ("x", 0, -5, True, None):
        assert normalise({"slot_seconds": junk}).slot_seconds is None
    feeder = new_feeder(tmp_path, 3, households=3, seed=3, first_slot=179_618_304)
    feeder.close()
    doc = status_doc("did:key:zL", 3, None)
    assert "slot_seconds" not in doc  # the field is optional: the command line's value stays
    server = StatusServer(doc)
    ctx = views.Context.open(feeder.store.url, server.url, verify_enabled=False)
    try:
        views.poll_api(ctx)
        assert ctx.schedule == PROD and views.head_view(ctx)["slot_seconds"] == 900
        server.doc = {**doc, "slot_seconds": 10}
        assert views.poll_api(ctx)["slot_seconds"] == 10
        assert ctx.schedule == DEMO
        assert views.head_view(ctx)["slot_seconds"] == 10  # the head changes: views redraw
        first_point = views.market_view(ctx, "7d").points[0]
        assert first_point["time"] == utc(179_618_304 * 10, data.time_format(DEMO))
        server.stop()
        views.poll_api(ctx)  # unreachable: keeps what it learnt
        assert ctx.schedule == DEMO
    finally:
        ctx.close()


def test_a_click_opens_the_slot_in_customdata() -> None:
    click = {"points": [{"x": "2025-11-24 16:00", "customdata": 1_960_000, "curveNumber": 5}]}
    assert slot_from_click(click) == 1_960_000
    assert slot_from_click({"points": [{"x": "2025-11-24 16:00"}, {"customdata": [7]}]}) == 7
    assert slot_from_click({"points": [{"x": "2025-11-24 16:00"}]}) is dash.no_update
    assert slot_from_click(None) is dash.no_update


def test_censorship_alerts_from_the_nodes_own_report() -> None:
    """The status document's ``censorship`` section as the node writes it
    (:class:`node.daemon.censorship.CensorshipReport`) becomes one alert per suspected
    household, and its own household's alert when it is the victim; junk is ignored."""
    from node.daemon.censorship import CensorshipReport, Suspicion

    victim, other, leader = "did:key:zVictim", "did:key:zOther", "did:key:zLeader"
    report = CensorshipReport(
        own=victim, after_slots=3, slot=40, leader=leader, leader_since=30,
        suspected=(Suspicion(victim, 2, 3, 4, ("orders", "readings"), 39),
                   Suspicion(other, 1, 1, 3, ("readings",), 40)),
        suspected_leader=leader, own_suspected=True, own_uncommitted=3,
    )  # fmt: skip
    doc = {"node": victim, "raft": {"leader": leader, "term": 2},
           "censorship": report.to_json()}  # fmt: skip
    status = normalise(doc)
    assert [c.household for c in status.censored] == [victim, other]
    alerts = api_alerts(status, True)
    assert [a["code"] for a in alerts] == ["own_records_censored", "censorship_suspected"]
    assert leader in alerts[0]["message"]
    assert other in alerts[1]["message"] and "for 3 slots" in alerts[1]["message"]
    # a peer's view of the same: the victim's alert, not an own one
    peer = normalise({**doc, "node": other, "censorship": {**report.to_json(), "own": {}}})
    assert [a["code"] for a in api_alerts(peer, True)] == ["censorship_suspected"] * 2
    # hostile sections change nothing
    for junk in ("x", {"suspected": "x"}, {"suspected": [1, {"household": 5}, {}]},
                 {"suspected": [{"household": "x" * 300}]}):  # fmt: skip
        assert api_alerts(normalise({**doc, "censorship": junk}), True) == []
    assert len(normalise({**doc, "censorship": {"suspected": [{"household": "h"}] * 500}})
               .censored) == 64  # fmt: skip
