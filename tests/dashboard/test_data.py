"""The data layer and the API client without a browser: figures against the ledger's own
postings, the lazy slot cache, alerts, status normalisation, zoom bookkeeping."""

from __future__ import annotations

import time
from pathlib import Path

import dash
from sqlalchemy import func, select

from dashboard import data, views
from dashboard.api import StatusHistory, api_alerts, normalise
from dashboard.app import apply_zoom, zoom_from_relayout
from node.ledger import schema as t
from tests.dashboard.conftest import new_feeder


def test_community_figures_by_hand() -> None:
    rows = [
        # 1000 Wh drawn, 400 exported: 400 covered locally, 600 from the feeder
        data.SlotRow(
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
        data.SlotRow(slot=1, settled=True, import_wh=0, export_wh=500, grid_export_wh=500),
        data.SlotRow(slot=2, settled=False, import_wh=999, export_wh=999),  # not settled: ignored
    ]
    f = data.community_figures(rows, feed_in=8, retail=32)
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
        f = data.community_figures(rows, info.feed_in_tariff, info.retail_price)
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
            assert fresh.window(None)[slot].as_dict() == cache.rows[slot].as_dict()
        engine.dispose()
    finally:
        feeder.close()


def test_ledger_alerts() -> None:
    head = data.HeadInfo(height=10, head_hash="ab", settled_through=9, closed_through=16)
    rows = [
        data.SlotRow(slot=1, bid_volume_wh=100, ask_volume_wh=50, volume_wh=0),
        data.SlotRow(slot=2, bid_volume_wh=100, ask_volume_wh=0, volume_wh=0),  # one side only
        data.SlotRow(slot=3, bid_volume_wh=100, ask_volume_wh=50, volume_wh=50),
    ]
    alerts = data.ledger_alerts(rows, head, {"state": "failed", "error": "boom"}, 4)
    assert [a["code"] for a in alerts] == [
        "ledger_invalid",
        "slot_not_cleared",
        "settlement_overdue",
    ]
    assert "Slot 1 " in alerts[1]["message"]
    ok_head = data.HeadInfo(height=10, head_hash="ab", settled_through=9, closed_through=11)
    assert data.ledger_alerts(rows[1:], ok_head, {"state": "ok"}, 4) == []


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
