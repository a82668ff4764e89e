"""Forecast accuracy per household and clock skew per node, from the nodes' ``/status`` (issue
18): real status documents (the agent's :class:`LearningForecaster` and the node's
:class:`ClockWatch` make them) served over loopback HTTP next to unreachable, non-JSON and
hostile ones; the rows, the alerts, the page and the CSV; and :func:`normalise` on odd JSON.

The ledger is the governance grid's (tests/ledger/governance_grid.py), whose households' DIDs
the status documents name."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from dashboard import node_health, views
from dashboard.app import STATUS_VIEW_OUTPUTS, create_app
from dashboard.node_client import MAX_CLOCK_PEERS, NodePoll, fetch_status, normalise
from dashboard.views import Context
from node.agent.forecast import LearningForecaster
from node.daemon.clock import ClockWatch, TimeSample
from node.daemon.replica import Replica
from node.ledger import LedgerStore
from tests.dashboard.conftest import STATUS_VIEWS, callback_payload
from tests.dashboard.status_server import StatusServer, status_doc
from tests.ledger.governance_grid import governance_log
from tests.market.world import signer


def did(name: str) -> str:
    return signer(name).did


def raw_server(body: bytes) -> StatusServer:
    """Serves fixed bytes as ``application/json`` at ``/status``."""
    return StatusServer({}, raw=body)


def forecast_section(slots: int) -> dict[str, Any]:
    """``agent.forecast`` of a forecaster that issued and learned ``slots`` slots of a daily
    pattern with noise (0: a fresh one, no error yet)."""
    f = LearningForecaster(900)
    for slot in range(slots):
        f.issue(slot)
        f.observe(slot, 400 * ((slot % 96) in range(30, 60)) - 150 + (slot * 37) % 90)
    return f.accuracy()


def clock_section(node_ahead_of: dict[str, float], max_skew: float = 5.0) -> dict[str, Any]:
    """The ``clock`` section of a node whose clock is ``node_ahead_of[peer]`` seconds ahead of
    each peer's, as :class:`ClockWatch` reports it after one sample of each (10 ms round trip)."""
    watch = ClockWatch(max_skew=max_skew)
    for peer, ahead in node_ahead_of.items():
        t0 = 1_000_000.0
        assert watch.add(TimeSample(peer, t0, t0 - ahead + 0.005, t0 - ahead + 0.006, t0 + 0.011,
                                    at=50.0))  # fmt: skip
    watch.assess(50.0)
    return watch.report().to_json()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    _world, config, entries = governance_log()
    path = tmp_path_factory.mktemp("nodes") / "ledger.db"
    store = LedgerStore(f"sqlite:///{path}")
    replica = Replica(config, store)
    for index, entry in entries:
        replica.apply_entry(index, entry)
    store.close()
    return f"sqlite:///{path}"


HOSTILE = {
    "node": did("voter"),
    "raft": {"role": {"x": 1}, "term": float("inf"), "leader": 7},
    "ledger": {"height": "12", "head_hash": ["a"]},
    "agent": {"forecast": {"mae_wh": {"last_96": 12.5, "last_672": -3}, "samples": [1],
                           "observed": True, "located": "yes", "capacity_wh": 10**40}},
    "clock": {"offset": float("nan"), "skewed": "yes", "peers": "many"},
}  # fmt: skip


@pytest.fixture
def grid(url: str) -> Iterator[dict[str, Any]]:
    """Five status APIs: bob's node (``--api``: a learned forecast, an honest clock that finds
    carol's 30 s ahead), alice-2's (a fresh forecast, its clock 12 s ahead), one closed port,
    one answering non-JSON nested past any parser's depth, one hostile document (voter's)."""
    bob = StatusServer(
        {
            **status_doc(did("bob"), 10, None),
            "node": did("bob"),
            "agent": {"forecast": forecast_section(300)},
            "clock": clock_section({did("carol"): -30.0, did("voter"): 0.2, did("alice"): 0.1}),
        }
    )
    alice2 = StatusServer(
        {
            **status_doc(did("bob"), 10, None),
            "node": did("alice-2"),
            "agent": {"forecast": forecast_section(0)},
            "clock": clock_section({did("bob"): 12.0, did("voter"): 12.1}),
        }
    )
    closed = StatusServer({})
    closed.stop()
    deep = raw_server(b"[" * 200_000 + b"]" * 200_000)
    hostile = StatusServer(HOSTILE)
    servers = {"bob": bob, "alice-2": alice2, "closed": closed, "deep": deep, "hostile": hostile}
    ctx = Context.open(
        url,
        bob.url,
        verify_enabled=False,
        node_apis=(alice2.url, closed.url, deep.url, hostile.url, bob.url),
    )
    try:
        views.head_view(ctx)
        views.poll_api(ctx)
        assert views.poll_nodes(ctx)["reachable"] == 3
        yield {"ctx": ctx, **servers}
    finally:
        ctx.close()
        for name, server in servers.items():
            if name != "closed":
                server.stop()


def test_forecast_per_household(grid: dict[str, Any], url: str) -> None:
    ctx = grid["ctx"]
    view = views.node_health_view(ctx)
    assert view.configured == 5  # --api and the --node-api list, bob's given twice
    rows = {r["household"] or r["node_api"]: r for r in view.forecasts}
    bob = rows[did("bob")]
    expected = forecast_section(300)
    assert bob["status"] == "ok" and bob["node_api"] == grid["bob"].url
    assert (bob["mae_96_wh"], bob["samples_96"]) == (expected["mae_wh"]["last_96"], 96)
    assert (bob["mae_672_wh"], bob["samples_672"]) == (
        expected["mae_wh"]["last_672"],
        expected["samples"]["last_672"],
    )
    assert bob["persistence_mae_wh"] == persistence_by_hand(url, did("bob"))[0]
    assert bob["persistence_samples"] == persistence_by_hand(url, did("bob"))[1] > 0
    assert bob["skill_permille"] == 1000 - math.floor(
        1000 * bob["mae_96_wh"] / bob["persistence_mae_wh"] + 0.5
    )
    assert rows[did("alice-2")]["status"] == "no data: no forecast yet"
    assert rows[did("alice-2")]["mae_96_wh"] is None
    assert rows[did("voter")]["status"] == "no data: no forecast yet"  # the hostile document
    assert rows[did("voter")]["observed_slots"] is None
    for name in ("carol", "alice"):
        assert rows[did(name)]["status"].startswith("no data: no status API")
    for name in ("closed", "deep"):
        assert rows[grid[name].url]["status"].startswith("no data: unreachable"), name
    members = {did(n) for n in ("voter", "alice", "bob", "carol")}
    assert {r["household"] for r in view.forecasts} >= members


def persistence_by_hand(url: str, household: str) -> tuple[int, int]:
    """The persistence forecast's MAE over the household's consecutive measured slots, from
    the raw table (the ledger's slots are fewer than the 96-slot window)."""
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT slot, export_wh - import_wh FROM settlements WHERE household = ? AND measured "
            "ORDER BY slot",
            (household,),
        ).fetchall()
    errors = [abs(b[1] - a[1]) for a, b in itertools.pairwise(rows) if b[0] == a[0] + 1]
    return math.floor(sum(errors) / len(errors) + 0.5), len(errors)


def test_clock_per_node_and_the_skew_alerts(grid: dict[str, Any]) -> None:
    ctx = grid["ctx"]
    clocks = views.node_health_view(ctx).clocks
    own = {r["node_api"]: r for r in clocks if r["source"] == "own report"}
    bob, alice2 = own[grid["bob"].url], own[grid["alice-2"].url]
    assert bob["status"] == "ok" and not bob["skewed"] and abs(bob["offset_s"]) < 0.5
    assert alice2["status"] == "SKEWED" and alice2["skewed"] is True
    assert alice2["offset_s"] == pytest.approx(12.0, abs=0.01)
    assert alice2["max_skew_s"] == 5.0 and alice2["peers_sampled"] == 2
    assert own[grid["closed"].url]["status"].startswith("no data: unreachable")
    assert own[grid["deep"].url]["status"].startswith("no data: unreachable")
    assert own[grid["hostile"].url]["status"] == "no data: the node reports no clock"
    seen = {r["node"]: r for r in clocks if r["source"] != "own report"}
    # peers the dashboard does not poll, as bob's node sees them; voter is polled itself
    assert set(seen) == {did("carol"), did("alice")}
    carol = seen[did("carol")]
    assert carol["source"] == f"as seen by {did('bob')}"
    assert carol["skewed"] is True and carol["offset_s"] == pytest.approx(30.0, abs=0.2)
    assert seen[did("alice")]["skewed"] is False
    alerts = views.alerts_view(ctx)
    skewed = [a for a in alerts if a["code"] == "clock_skewed"]
    assert len(skewed) == 2
    assert (
        f"Clock of node {did('alice-2')} is skewed: 12.0 s ahead of the grid's median"
        in (skewed[0]["message"])
    )
    assert "bound 5 s" in skewed[0]["message"]
    assert did("carol") in skewed[1]["message"] and "as seen by" in skewed[1]["message"]
    unreachable = [a["message"] for a in alerts if a["code"] == "node_unreachable"]
    assert len(unreachable) == 2
    assert grid["closed"].url in unreachable[0] and grid["deep"].url in unreachable[1]


def test_the_section_and_its_csv_through_the_app(grid: dict[str, Any]) -> None:
    ctx = grid["ctx"]
    app = create_app(ctx)
    client = app.server.test_client()
    deps = {d["output"]: d for d in client.get("/_dash-dependencies").get_json()}
    values = {"api.data": {"configured": True, "nodes": {"configured": 5}}}
    response = client.post(
        "/_dash-update-component", json=callback_payload(deps[STATUS_VIEWS], values)
    )
    assert response.status_code == 200
    page = json.dumps(response.get_json()["response"]["node-health"])
    assert "forecast-rows" in page and "clock-rows" in page and "SKEWED" in page
    assert "no data: no forecast yet" in page and "no data: unreachable" in page
    response = client.post(
        "/_dash-update-component",
        json=callback_payload(deps["dl-nodes.data"], {"csv-nodes.n_clicks": 1}),
    )
    assert response.status_code == 200
    body = response.get_json()["response"]["dl-nodes"]["data"]
    rows = {r["household"]: r for r in csv.DictReader(io.StringIO(body["content"]))}
    assert rows[did("alice-2")]["clock_skewed"] == "True"
    assert rows[did("bob")]["clock_status"] == "ok" and rows[did("bob")]["mae_96_wh"]
    assert rows[did("carol")]["clock_status"] == "no data"
    # a status store of the wrong shape is refused, not crashed on
    bad = callback_payload(deps[STATUS_VIEWS], {"api.data": ["x"]})
    assert client.post("/_dash-update-component", json=bad).status_code == 400


def test_a_refresh_sends_the_page_only_the_status_views_that_changed(url: str) -> None:
    """Each refresh polls the node once and draws every status view in one request; the page
    keeps digests of what it shows and sends them back, so a refresh that changes nothing
    sends no view, and one whose poll changed the node's term and invalid messages sends the
    badge and the network section but not the unchanged forecasts and clocks."""
    api = StatusServer({**status_doc(did("bob"), 10, None), "node": did("bob")})
    ctx = Context.open(url, api.url, verify_enabled=False)
    try:
        client = create_app(ctx).server.test_client()
        deps = {d["output"]: d for d in client.get("/_dash-dependencies").get_json()}

        def post(output: str, values: dict[str, Any]) -> dict[str, Any]:
            response = client.post(
                "/_dash-update-component", json=callback_payload(deps[output], values)
            )
            assert response.status_code == 200, response.get_data(as_text=True)[:300]
            return response.get_json()["response"]

        head = post("head.data", {"tick.n_intervals": 1})["head"]["data"]
        status = post("api.data", {"tick.n_intervals": 1})["api"]["data"]
        first = post(STATUS_VIEWS, {"head.data": head, "api.data": status})
        assert set(first) == {c for c, _ in STATUS_VIEW_OUTPUTS} | {"status-sent"}
        sent = first["status-sent"]["data"]
        assert len(sent) == len(STATUS_VIEW_OUTPUTS)
        values = {"head.data": head, "api.data": status, "status-sent.data": sent}
        again = post(STATUS_VIEWS, values)
        assert set(again) == {"status-sent"} and again["status-sent"]["data"] == sent

        api.doc = {**api.doc, "raft": {**api.doc["raft"], "term": 8},
                   "invalid_messages": {"bad_signature": 9}}  # fmt: skip
        status = post("api.data", {"tick.n_intervals": 2})["api"]["data"]
        changed = post(STATUS_VIEWS, {**values, "api.data": status})
        assert "term 8" in changed["api-badge"]["children"]
        assert "className" not in changed["api-badge"]  # still "badge ok"
        assert changed["invalid-graph"]["figure"]["data"][0]["y"] == [9]
        assert {"network-kpis", "lag-graph"} <= set(changed)
        assert "node-health" not in changed and "alerts" not in changed
    finally:
        ctx.close()
        api.stop()


def test_without_any_status_api_every_household_has_no_data(url: str) -> None:
    ctx = Context.open(url, verify_enabled=False)
    try:
        assert views.poll_nodes(ctx) == {"configured": 0}
        view = views.node_health_view(ctx)
        assert view.configured == 0 and view.clocks == []
        assert view.forecasts and all(
            r["status"].startswith("no data: no status API") for r in view.forecasts
        )
        assert not [a for a in views.alerts_view(ctx) if a["code"].startswith(("clock", "node"))]
    finally:
        ctx.close()


# --- odd JSON ---------------------------------------------------------------------------------


ODD_FORECASTS: list[Any] = [
    None, "x", [], {"forecast": None}, {"forecast": []}, {"forecast": {"mae_wh": "12"}},
    {"forecast": {"mae_wh": {"last_96": True}, "samples": {"last_96": 96}}},
    {"forecast": {"mae_wh": {"last_96": 10**40}, "samples": {"last_96": 96}}},
    {"forecast": {"mae_wh": {"last_96": float("nan")}, "samples": {"last_96": 1}}},
    {"forecast": {"mae_wh": {"last_96": -1}, "samples": {"last_96": 1}}},
    {"forecast": {"mae_wh": {"last_96": 5}, "samples": {"last_96": 0}}},
]  # fmt: skip

ODD_CLOCKS: list[Any] = [
    None, 1, "skewed", [], {}, {"skewed": 1}, {"skewed": None},
    {"skewed": True, "offset": "12"}, {"skewed": True, "offset": float("inf")},
    {"skewed": False, "offset": 10**400, "error": -1, "max_skew": 0},
    {"skewed": True, "offset": 3.0, "peers": [1, None, {"peer": 5}, {"peer": "x" * 300},
                                              {"peer": "p", "offset": "1", "error": 0}]},
    {"skewed": False, "offset": 0.0, "disagreeing": [1, None, "x" * 300, "ok"]},
]  # fmt: skip


@pytest.mark.parametrize("agent", ODD_FORECASTS)
def test_odd_forecast_sections(agent: Any) -> None:
    status = normalise({"node": "n", "agent": agent})
    assert status.reachable
    forecast = status.forecast
    assert forecast is None or forecast.mae(96) is None
    if forecast is not None:
        assert all(v is None or isinstance(v, int) for v in forecast.mae_wh.values())


@pytest.mark.parametrize("clock", ODD_CLOCKS)
def test_odd_clock_sections(clock: Any) -> None:
    status = normalise({"node": "n", "clock": clock})
    c = status.clock
    if c is None:
        return
    assert isinstance(c.skewed, bool)
    assert c.offset is None or (isinstance(c.offset, float) and math.isfinite(c.offset))
    assert c.error >= 0 and (c.max_skew is None or c.max_skew > 0)
    assert all(len(p.peer) <= 256 and math.isfinite(p.offset) for p in c.peers)
    assert all(isinstance(p, str) and len(p) <= 256 for p in c.disagreeing)
    rows = node_health.clock_rows([NodePoll("http://127.0.0.1:1", status, "n")], {})
    assert rows[0]["status"] in ("ok", "SKEWED", "no data: no peer sampled yet")
    node_health.clock_alerts(rows)  # formats whatever was validated


def test_many_clock_peers_are_bounded() -> None:
    peers = [{"peer": f"p{i}", "offset": 0.1, "error": 0.01, "samples": 1} for i in range(5000)]
    disagreeing = [f"p{i}" for i in range(5000)]
    clock = {"skewed": False, "offset": 0.0, "peers": peers, "disagreeing": disagreeing}
    status = normalise({"node": "n", "clock": clock})
    assert status.clock is not None
    assert len(status.clock.peers) == len(status.clock.disagreeing) == MAX_CLOCK_PEERS


@pytest.mark.parametrize(
    "body",
    [
        b'{"node": "n", "raft": {"term": 1' + b"0" * 5000 + b"}}",  # beyond int parsing
        b"[" * 100_000,  # nested too deep
        b"\xff\xfe",  # not UTF-8
        b'{"node": "n", "raft": {"term": Infinity, "commit_index": NaN}}',
        b"null",
    ],
)
def test_odd_status_bodies_never_raise(body: bytes) -> None:
    server = raw_server(body)
    try:
        status = fetch_status(server.url, timeout=2)
    finally:
        server.stop()
    assert (
        status.error is None
        or "did not return JSON" in status.error
        or ("not a JSON object" in status.error)
    )
    if status.reachable:
        assert status.term is None and status.commit_index is None
