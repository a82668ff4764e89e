"""The dashboard under hostile HTTP input, against the real app served by werkzeug on 127.0.0.1
and plain ``http.client``: malformed or unexpected callback payloads are 400, unknown component
suites and paths 404, bodies over 1 MiB 413 (refused before they are read), out-of-range or
wrong-typed callback inputs 400; error answers are short JSON without a traceback; every answer
is counted by status; logs never carry a request body; normal callbacks still answer 200."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from dashboard import http_guard, views
from dashboard.app import MAX_SLOT, STATUS_VIEW_OUTPUTS
from dashboard.views import Context
from tests.dashboard.conftest import STATUS_VIEWS, RunningDashboard, callback_payload, new_feeder
from tests.dashboard.feeder import Feeder

SLOTS = 12
UPDATE = "/_dash-update-component"
LOGGERS = ("dashboard.http", "dashboard.app", "werkzeug", "dash", "flask.app")
"""Loggers that could echo a request: ours, Flask's app logger (named after dashboard.app),
werkzeug's server, Dash."""
LOG_BUDGET = 400
"""Most log bytes one refused or failed request may cost."""


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Feeder]:
    feeder = new_feeder(tmp_path_factory.mktemp("hostile"), SLOTS, households=3, seed=5)
    try:
        yield feeder
    finally:
        feeder.close()


@pytest.fixture(scope="module")
def dash(ledger: Feeder) -> Iterator[RunningDashboard]:
    running = RunningDashboard(Context.open(ledger.store.url), refresh_ms=60_000)
    try:
        yield running
    finally:
        running.stop()


class Client:
    """Plain http.client requests to the running dashboard."""

    def __init__(self, dash: RunningDashboard) -> None:
        self.port = dash.server.server_port
        status, body = self.get("/_dash-dependencies")
        assert status == 200
        self.deps = {d["output"]: d for d in json.loads(body)}

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        content_type: str = "application/json",
        chunked: bool = False,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {"Content-Type": content_type} if body is not None else {}
            if chunked:
                data = body.encode() if isinstance(body, str) else body
                assert data is not None
                parts = (data[i : i + 65536] for i in range(0, len(data), 65536))
                conn.request(method, path, body=parts, headers=headers, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def post(self, body: Any) -> tuple[int, bytes]:
        return self.request(
            "POST", UPDATE, body if isinstance(body, bytes | str) else json.dumps(body)
        )

    def payload(
        self, output: str, values: dict[str, Any], changed: list[str] | None = None
    ) -> dict[str, Any]:
        """The body Dash's renderer sends for ``output`` with these ``id.property`` values."""
        return callback_payload(self.deps[output], values, changed)

    def call(self, output: str, values: dict[str, Any]) -> tuple[int, bytes]:
        return self.post(self.payload(output, values))

    def head(self) -> dict[str, Any]:
        """The head document the page keeps in its store (from the real head poll)."""
        status, body = self.call("head.data", {"tick.n_intervals": 1})
        assert status == 200, body
        return json.loads(body)["response"]["head"]["data"]

    def stats(self) -> dict[str, int]:
        status, body = self.get(http_guard.STATS_PATH)
        assert status == 200
        return json.loads(body)["responses"]


@pytest.fixture(scope="module")
def client(dash: RunningDashboard) -> Client:
    return Client(dash)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of the loggers that could echo a request, at DEBUG (werkzeug at the level
    ``serve()`` gives it, as when deployed)."""
    levels = {name: logging.getLogger(name).level for name in LOGGERS if name != "werkzeug"}
    caplog.set_level(logging.DEBUG)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def log_bytes(caplog: pytest.LogCaptureFixture) -> int:
    """Bytes the captured records would write (message and any traceback)."""
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    return sum(len(handler.format(r)) + 1 for r in caplog.records)


def assert_clean_error(status: int, body: bytes, expected: int) -> dict[str, Any]:
    """A short JSON error with ``expected`` status and no traceback."""
    assert status == expected, body[:300]
    assert len(body) < 300, body[:300]
    doc = json.loads(body)
    assert doc["status"] == expected and doc["error"]
    assert b"Traceback" not in body and b'File "' not in body
    return doc


def assert_ok(client: Client) -> None:
    """Normal callbacks still answer 200."""
    head = client.head()
    assert head["height"] == SLOTS
    status, body = client.call("market-graph.figure", {"head.data": head, "window.value": "7d"})
    assert status == 200, body[:300]
    assert json.loads(body)["response"]["market-graph"]["figure"]["data"]


# --- callback payloads ------------------------------------------------------------------------

HEAD_OUT = {"id": "head", "property": "data"}
TICK = {"id": "tick", "property": "n_intervals", "value": 1}
HEAD_STATE = {"id": "head", "property": "data", "value": None}


def head_body(**changes: Any) -> dict[str, Any]:
    body = {
        "output": "head.data",
        "outputs": HEAD_OUT,
        "inputs": [TICK],
        "state": [HEAD_STATE],
        "changedPropIds": ["tick.n_intervals"],
    }
    for key, value in changes.items():
        if value is ...:
            body.pop(key)
        else:
            body[key] = value
    return body


MALFORMED: dict[str, Any] = {
    "not JSON": "not json{",
    "empty body": "",
    "truncated JSON": '{"output": "head.data", "inputs": [',
    "invalid UTF-8": b'{"output": "\xff\xfe"}',
    "JSON array": "[1, 2]",
    "JSON string": '"head.data"',
    "JSON number": "42",
    "JSON null": "null",
    "empty object": {},
    "unknown output": head_body(output="nope.data"),
    "output of wrong type": head_body(output=["head.data"]),
    "output missing": head_body(output=...),
    "inputs missing": head_body(inputs=...),
    "inputs not a list": head_body(inputs={"0": TICK}),
    "too few inputs": head_body(inputs=[]),
    "too many inputs": head_body(inputs=[TICK, TICK]),
    "input not an object": head_body(inputs=["tick.n_intervals"]),
    "input of another component": head_body(inputs=[{**TICK, "id": "window"}]),
    "input property unknown": head_body(inputs=[{**TICK, "property": "__class__"}]),
    "input id of wrong type": head_body(inputs=[{**TICK, "id": ["tick"]}]),
    "state missing entry": head_body(state=[]),
    "state not a list": head_body(state="head.data"),
    "outputs missing": head_body(outputs=...),
    "outputs of another callback": head_body(outputs={"id": "api", "property": "data"}),
    "outputs as list for a single output": head_body(outputs=[HEAD_OUT, HEAD_OUT]),
    "changedPropIds not a list": head_body(changedPropIds="tick.n_intervals"),
    "changedPropIds of numbers": head_body(changedPropIds=[1]),
    "deeply nested (JSON decoder's limit)": '{"output": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "nested deeper than 64": head_body(inputs=[{**TICK, "value": json.loads("[" * 80 + "]" * 80)}]),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_callback_payloads_are_400(
    client: Client, logs: pytest.LogCaptureFixture, name: str
) -> None:
    before = client.stats().get("400", 0)
    status, body = client.post(MALFORMED[name])
    assert_clean_error(status, body, 400)
    assert client.stats().get("400", 0) == before + 1
    assert not [r for r in logs.records if r.levelno >= logging.WARNING]
    assert log_bytes(logs) <= LOG_BUDGET
    assert_ok(client)


def test_wrong_content_type_is_415(client: Client) -> None:
    body = json.dumps(head_body())
    status, raw = client.request("POST", UPDATE, body, content_type="text/plain")
    assert_clean_error(status, raw, 415)
    status, raw = client.request(
        "POST", UPDATE, "a=1", content_type="application/x-www-form-urlencoded"
    )
    assert_clean_error(status, raw, 415)


def test_callback_endpoint_only_takes_post(client: Client) -> None:
    status, body = client.get(UPDATE)
    assert_clean_error(status, body, 404)
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    try:
        conn.request("PUT", UPDATE, json.dumps(head_body()), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert_clean_error(response.status, response.read(), 405)
        assert response.getheader("Allow") and "POST" in response.getheader("Allow", "")
    finally:
        conn.close()


HOUSEHOLDS = (
    "..household-graph.figure...household-table.children...household.options...household.value.."
)

# --- callback input values --------------------------------------------------------------------


def bad_inputs(head: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Out-of-range or wrong-typed values for each callback that takes client values."""
    book = "..book-graph.figure...book-summary.children.."
    households = HOUSEHOLDS
    community = "..community-kpis.children...community-graph.figure.."
    cases: dict[str, tuple[str, dict[str, Any]]] = {}
    for label, slot in {
        "negative": -1,
        "above 2**53": MAX_SLOT + 1,
        "beyond SQLite": 10**30,
        "fractional": 1.5,
        "text": "abc",
        "boolean": True,
        "list": [5],
        "object": {"slot": 5},
        "digits beyond 20": "1" * 40,
    }.items():
        cases[f"slot {label}"] = (book, {"head.data": head, "slot-input.value": slot})
        cases[f"csv slot {label}"] = (
            "dl-book.data",
            {"csv-book.n_clicks": 1, "slot-input.value": slot},
        )
    for label, window in {
        "unknown preset": "365d",
        "object": {"a": 1},
        "list": ["7d"],
        "number": 7,
        "null": None,
    }.items():
        cases[f"market window {label}"] = (
            "market-graph.figure",
            {"head.data": head, "window.value": window},
        )
        cases[f"community window {label}"] = (
            community,
            {"head.data": head, "window.value": window},
        )
        cases[f"csv market window {label}"] = (
            "dl-market.data",
            {"csv-market.n_clicks": 1, "window.value": window},
        )
    for label, household in {
        "list": ["did:key:z"],
        "number": 3,
        "object": {"id": "x"},
        "huge": "did:key:" + "z" * 5000,
    }.items():
        cases[f"household {label}"] = (
            households,
            {"head.data": head, "household.value": household, "window.value": "7d"},
        )
    for label, zoom in {
        "list": [1],
        "string": "zoom",
        "range of three": {"revision": "x", "range": [1, 2, 3]},
        "range of objects": {"revision": "x", "range": [{}, {}]},
        "revision object": {"revision": {"a": 1}, "range": [1, 2]},
    }.items():
        cases[f"zoom store {label}"] = (
            "market-graph.figure",
            {"head.data": head, "window.value": "7d", "market-graph-zoom.data": zoom},
        )
    for label, forged in {
        "string": "height 5",
        "list": [head],
        "missing fields": {"height": 1},
        "only a verify state": {"verify_state": "ok"},
        "hash of wrong type": {**head, "head_hash": 5},
        "settled slot negative": {**head, "settled_through": -3},
        "settled slot huge": {**head, "settled_through": 10**30},
        "verify state list": {**head, "verify_state": ["ok"]},
        "error of wrong type": {"error": {"a": 1}},
    }.items():
        cases[f"head {label}"] = (
            "..title.children...head-badge.children...verify-badge.children...verify-badge.className..",
            {"head.data": forged},
        )
    cases["head poll state forged"] = (
        "head.data",
        {"tick.n_intervals": 1, "head.data": "forged"},
    )
    cases["tick negative"] = ("head.data", {"tick.n_intervals": -1})
    cases["tick text"] = ("api.data", {"tick.n_intervals": "1"})
    cases["csv clicks text"] = ("dl-ledger.data", {"csv-ledger.n_clicks": "many"})
    cases["api store list"] = (STATUS_VIEWS, {"api.data": [1, 2]})
    cases["status digests not a list"] = (STATUS_VIEWS, {"status-sent.data": "digests"})
    cases["status digests too few"] = (STATUS_VIEWS, {"status-sent.data": ["0" * 16]})
    cases["status digests of numbers"] = (
        STATUS_VIEWS,
        {"status-sent.data": [7] * (len(STATUS_VIEW_OUTPUTS))},
    )
    cases["relayout list"] = (
        "market-graph-zoom.data",
        {"market-graph.relayoutData": [1], "market-graph.figure": None},
    )
    cases["relayout range of objects"] = (
        "market-graph-zoom.data",
        {"market-graph.relayoutData": {"xaxis.range": [{}, []]}, "market-graph.figure": None},
    )
    cases["figure state list"] = (
        "market-graph-zoom.data",
        {"market-graph.relayoutData": {"xaxis.range": [1, 2]}, "market-graph.figure": [1]},
    )
    cases["figure layout list"] = (
        "market-graph-zoom.data",
        {
            "market-graph.relayoutData": {"xaxis.range": [1, 2]},
            "market-graph.figure": {"layout": []},
        },
    )
    cases["click list"] = ("slot-input.value", {"market-graph.clickData": [1]})
    cases["click points string"] = (
        "slot-input.value",
        {"market-graph.clickData": {"points": "ab"}},
    )
    cases["click slot huge"] = (
        "slot-input.value",
        {"market-graph.clickData": {"points": [{"customdata": [1e300]}]}},
    )
    cases["slot NaN"] = (
        "..book-graph.figure...book-summary.children..",
        {"head.data": head, "slot-input.value": float("nan")},
    )
    cases["head height NaN"] = (
        "..ledger-summary.children...ledger.children..",
        {"head.data": {**head, "height": float("nan")}},
    )
    cases["click slot negative"] = (
        "slot-input.value",
        {"market-graph.clickData": {"points": [{"customdata": -4}]}},
    )
    return cases


def test_bad_callback_inputs_are_400(client: Client, logs: pytest.LogCaptureFixture) -> None:
    head = client.head()
    cases = bad_inputs(head)
    before = client.stats()
    refused = {}
    for name, (output, values) in cases.items():
        status, body = client.call(output, values)
        refused[name] = status
        if status == 400:
            assert_clean_error(status, body, 400)
    assert refused == dict.fromkeys(cases, 400)
    after = client.stats()
    assert after.get("400", 0) - before.get("400", 0) == len(cases)
    assert after.get("500", 0) == before.get("500", 0)
    assert not [r for r in logs.records if r.levelno >= logging.WARNING]
    assert log_bytes(logs) <= LOG_BUDGET * len(cases)
    assert_ok(client)


def test_good_callback_inputs_in_range(client: Client, ledger: Feeder) -> None:
    head = client.head()
    book = "..book-graph.figure...book-summary.children.."
    for slot in (None, "", 0, 3, 3.0, "3", MAX_SLOT):
        status, body = client.call(book, {"head.data": head, "slot-input.value": slot})
        assert status == 200, (slot, body[:300])
    status, body = client.call(
        "slot-input.value", {"market-graph.clickData": {"points": [{"customdata": [7]}]}}
    )
    assert status == 200 and json.loads(body)["response"]["slot-input"]["value"] == 7
    # a click that hit nothing with a slot number (no customdata, or not a finite number) is
    # ignored, as a click on a tariff line is
    for points in ([{"x": 1}], [{"customdata": [float("inf")]}], [{"customdata": "7"}], []):
        status, body = client.call(
            "slot-input.value", {"market-graph.clickData": {"points": points}}
        )
        assert status in (200, 204) and "slot-input" not in body.decode(), (points, body)
    for window in views.WINDOW_DAYS:
        status, _ = client.call("market-graph.figure", {"head.data": head, "window.value": window})
        assert status == 200
    zoom = {"revision": "market-7d-900", "range": ["1970-01-01 00:15", "1970-01-01 01:00"]}
    status, body = client.call(
        "market-graph.figure",
        {"head.data": head, "window.value": "7d", "market-graph-zoom.data": zoom},
    )
    assert status == 200
    status, body = client.call(
        "market-graph-zoom.data",
        {
            "market-graph.relayoutData": {"xaxis.autorange": True},
            "market-graph.figure": {"layout": {"uirevision": "market-7d-900"}},
        },
    )
    assert status == 200
    status, body = client.call(
        HOUSEHOLDS,
        {"head.data": head, "household.value": "did:key:unknown", "window.value": "30d"},
    )
    assert status == 200


# --- component suites and paths ---------------------------------------------------------------


def test_component_suites_and_unknown_paths_are_404(client: Client) -> None:
    status, page = client.get("/")
    assert status == 200
    scripts = re.findall(rb'src="(/_dash-component-suites/[^"]+)"', page)
    assert scripts
    for script in scripts:
        assert client.get(script.decode())[0] == 200
    real = scripts[0].decode()
    package = real.split("/")[2]
    before = client.stats().get("404", 0)
    odd = [
        "/_dash-component-suites/dash/../../../../etc/passwd",
        "/_dash-component-suites/dash/%2e%2e/%2e%2e/etc/passwd",
        "/_dash-component-suites/dash/..%2F..%2Fdash.py",
        f"/_dash-component-suites/{package}/dash.py",
        f"/_dash-component-suites/{package}/__init__.py",
        "/_dash-component-suites/os/path.py",
        "/_dash-component-suites/sys/x.js",
        "/_dash-component-suites/nonexistent_pkg/x.js",
        "/_dash-component-suites/dash/dcc/nope.js",
        "/_dash-component-suites/dash/dcc/dash_core_components.v1_0mXYZ.js",
        "/_dash-component-suites/dash/dcc/dash_core_components.v1_0m.js.map.nope",
        real.rsplit("/", 1)[0] + "/",
        "/_dash-component-suites/dash",
        "/etc/passwd",
        "/../../etc/passwd",
        "/nonexistent/path",
        "/_dash-nothing",
        "/" + "a" * 20_000,
    ]
    for path in odd:
        status, body = client.get(path)
        assert_clean_error(status, body, 404)
    assert client.stats().get("404", 0) == before + len(odd)
    assert_ok(client)


# --- bodies and logs --------------------------------------------------------------------------


def test_ten_megabyte_body_is_413_and_not_logged(
    client: Client, logs: pytest.LogCaptureFixture
) -> None:
    before = client.stats().get("413", 0)
    huge = json.dumps({"output": "x" * (10 * 1024 * 1024), "inputs": []})
    status, body = client.post(huge)
    assert_clean_error(status, body, 413)
    # the same through chunked encoding (no Content-Length): cut at the limit while reading
    status, body = client.request("POST", UPDATE, huge[: 2 * 1024 * 1024], chunked=True)
    assert_clean_error(status, body, 413)
    assert client.stats().get("413", 0) == before + 2
    assert log_bytes(logs) <= LOG_BUDGET * 2
    assert "xxxxxxxxxx" not in logs.text
    assert_ok(client)


def test_big_unknown_output_under_the_limit_is_not_echoed(
    client: Client, logs: pytest.LogCaptureFixture
) -> None:
    """Dash's own answer to an unknown output was a chained KeyError naming it twice, logged with
    its traceback by Flask: the whole body, twice."""
    marker = "Q" * (900 * 1024)
    status, body = client.post(head_body(output=marker))
    assert_clean_error(status, body, 400)
    status, body = client.post(head_body(inputs=[{**TICK, "value": marker}, TICK]))
    assert_clean_error(status, body, 400)
    assert "QQQQQQQQQQ" not in logs.text
    assert log_bytes(logs) <= LOG_BUDGET * 2


def test_our_own_bug_is_500_logged_once_without_the_body(
    client: Client, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_ctx: Any) -> Any:
        raise RuntimeError("bug in ledger_view: " + "S" * 100_000)

    monkeypatch.setattr(views, "ledger_view", broken)
    head = client.head()
    before = client.stats().get("500", 0)
    payload = client.payload("..ledger-summary.children...ledger.children..", {"head.data": head})
    payload["inputs"][0]["value"] = {**head, "padding": "P" * 500_000}
    status, body = client.post(payload)
    doc = assert_clean_error(status, body, 500)
    assert doc["error"] == "Internal Server Error"
    assert client.stats().get("500", 0) == before + 1
    errors = [r for r in logs.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage()[:200] for r in errors]
    line = logs.handler.format(errors[0])
    assert "\n" not in line and len(line) <= LOG_BUDGET + 200
    assert "RuntimeError" in line and "POST /_dash-update-component" in line
    assert "ledger_view" in line or "broken" in line
    assert "PPPPPPPPPP" not in logs.text and "S" * 200 not in logs.text
    assert errors[0].exc_info is None
    monkeypatch.undo()
    assert_ok(client)


def test_malformed_request_line_is_logged_clipped(
    client: Client, dash: RunningDashboard, logs: pytest.LogCaptureFixture
) -> None:
    """http.server answers a bad request line itself and logs it (repr'd) at error level; the
    dashboard's request handler clips that line."""
    with socket.create_connection(("127.0.0.1", client.port), timeout=10) as sock:
        sock.sendall(b"GET /a b " + b"R" * 60_000 + b" HTTP/1.1\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    werkzeug = [r for r in logs.records if r.name == "werkzeug"]
    assert werkzeug, "http.server logs a bad request line"
    assert all(len(r.getMessage()) <= http_guard.MAX_LOG_CHARS + 200 for r in werkzeug)
    assert_ok(client)


def test_stats_count_every_status(client: Client) -> None:
    """Each answer moves exactly its own status's counter by one (self-contained: it does not
    rely on other tests having run first)."""
    sends = {
        "200": lambda: client.get("/"),
        "400": lambda: client.post("not json{"),
        "404": lambda: client.get("/nonexistent/path"),
        "413": lambda: client.post(json.dumps({"output": "x" * (2 * 1024 * 1024)})),
        "415": lambda: client.request("POST", UPDATE, "{}", content_type="text/plain"),
    }
    for status, send in sends.items():
        before = client.stats()  # counted itself once it has answered: one more 200
        assert send()[0] == int(status)
        expected = {**before, "200": before.get("200", 0) + 1}
        expected[status] = expected.get(status, 0) + 1
        assert client.stats() == expected, status
