"""The node's HTTP API under abuse, over real loopback sockets: every attack is answered with a
JSON 4xx (or the connection is closed in time), counted, and the server answers the next request;
blocking handlers run off the trio loop, so 200 clients cannot stall it."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from market.bounds import MAX_SLOT
from market.encoding import json_nesting_problem
from node.daemon.http_api import Api, ApiError, ApiLimits, Request

TOKEN = "s3cret-token"


def make_api(limits: ApiLimits | None = None, db: Path | None = None) -> Api:
    """An Api with routes shaped like the household's: an open status, a per-household route
    behind the token unless ``household=me``, a bounded slot query, a JSON POST, a buggy route
    and (with ``db``) a blocking SQLite route."""
    api = Api(token=TOKEN, limits=limits or ApiLimits())
    posted: list[Any] = []

    @api.route("GET", "/status", token=False, params=set())
    def status(_: Request) -> dict[str, Any]:
        return {"ok": True, "posted": len(posted)}

    @api.route("GET", "/orders", blocking=True, ints={"slot": (0, MAX_SLOT)},
               choices={"household": ("me",)},
               token=lambda req: req.query.get("household") != "me")  # fmt: skip
    def orders(req: Request) -> dict[str, Any]:
        return {"slot": req.ints.get("slot"), "mine": req.query.get("household") == "me"}

    @api.route("POST", "/orders")
    def post(req: Request) -> dict[str, Any]:
        body = req.json()
        if not isinstance(body, dict):
            raise ApiError(400, "expected a JSON object")
        posted.append(body)
        return {"accepted": len(posted)}

    @api.route("GET", "/bug")
    def bug(_: Request) -> Any:
        return {}["missing"]

    @api.route("GET", "/recursion", blocking=True)
    def recursion(_: Request) -> Any:
        def down(n: int) -> int:
            return down(n + 1)

        return down(0)

    if db is not None:

        @api.route("GET", "/slots", blocking=True, token=False)
        def slots(_: Request) -> dict[str, Any]:
            with sqlite3.connect(db) as conn:
                rows = conn.execute(
                    "SELECT slot, sum(qty), count(*) FROM orders GROUP BY slot "
                    "ORDER BY slot DESC LIMIT 500"
                ).fetchall()
            return {"slots": [{"slot": s, "wh": q, "orders": n} for s, q, n in rows]}

        @api.route("GET", "/slots-on-loop", token=False)
        def slots_on_loop(req: Request) -> dict[str, Any]:
            return slots(req)

    return api


@asynccontextmanager
async def serving(api: Api) -> AsyncIterator[int]:
    """``api`` served on 127.0.0.1 in a nursery; yields the port, cancels on exit."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(api.serve, "127.0.0.1", 0)
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


async def read_response(stream: trio.SocketStream, timeout: float = 5.0
                        ) -> tuple[int | None, dict[str, str], Any]:  # fmt: skip
    """One HTTP response: (status, headers, decoded JSON body); (None, {}, None) if the server
    closed without an answer."""
    data = b""
    with trio.fail_after(timeout):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                if not data:
                    return None, {}, None
                raise AssertionError(f"connection closed inside a response head: {data!r}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("ascii").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}  # fmt: skip
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = await stream.receive_some(65536)
            assert chunk, "connection closed inside a response body"
            body += chunk
    return status, headers, json.loads(body[:length])


async def exchange(port: int, raw: bytes, timeout: float = 5.0) -> tuple[int | None, Any]:
    """Send ``raw`` on a new connection; the answer's status and JSON body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        status, _, body = await read_response(stream, timeout)
        return status, body


async def get(port: int, target: str, token: str | None = None) -> tuple[int | None, Any]:
    auth = f"authorization: Bearer {token}\r\n" if token else ""
    return await exchange(port, f"GET {target} HTTP/1.1\r\nhost: x\r\n{auth}\r\n".encode())


async def closed_within(stream: trio.SocketStream, seconds: float) -> bytes:
    """Everything the server sends until it closes (fails after ``seconds``)."""
    data = b""
    with trio.fail_after(seconds):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def still_answers(port: int) -> None:
    assert await get(port, "/status") == (200, {"ok": True, "posted": 0})


# -- malformed and oversized requests -----------------------------------------------------------


async def test_a_header_byte_0xff_is_400_and_the_server_answers_the_next_request() -> None:
    api = make_api()
    async with serving(api) as port:
        status, body = await exchange(port, b"GET /status HTTP/1.1\r\nhost: x\r\nx-a: \xff\r\n\r\n")
        assert status == 400 and "ASCII" in body["error"]
        # a non-ASCII request target is malformed HTTP
        status, body = await exchange(port, b"GET /st\xe4tus HTTP/1.1\r\nhost: x\r\n\r\n")
        assert status == 400 and "malformed" in body["error"]
        # not HTTP at all (a TLS client hello)
        status, _ = await exchange(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 20)
        assert status == 400
        await still_answers(port)
    assert api.rejections["bad_encoding"] == 1 and api.rejections["malformed"] == 2
    assert api.requests[400] == 3 and api.requests[200] == 1


async def test_query_integers_out_of_range_are_400_naming_the_parameter() -> None:
    api = make_api()
    async with serving(api) as port:
        for target, name in [
            ("/orders?slot=18446744073709551616", "slot"),
            ("/orders?slot=9223372036854775807", "slot"),
            (f"/orders?slot={MAX_SLOT + 1}", "slot"),
            ("/orders?slot=-1", "slot"),
            ("/orders?slot=soon", "slot"),
            ("/orders?slot=1" + "0" * 5000, "slot"),
        ]:
            # checked before the token: the request is a 400 naming the parameter
            for token in (TOKEN, None):
                status, body = await get(port, target, token)
                assert status == 400 and body["error"].startswith(f"{name} must be"), body
        # percent-decoding; bounds inclusive
        assert await get(port, "/orders?slot=%31%32", TOKEN) == (200, {"slot": 12, "mine": False})
        assert (await get(port, f"/orders?slot={MAX_SLOT}", TOKEN))[1]["slot"] == MAX_SLOT
        # repeated, unknown, nameless and undecodable parameters, and a bad filter value
        for target, message in [
            ("/orders?slot=1&slot=2", "'slot' given twice"),
            ("/orders?slot=1&verbose=1", "unknown query parameter 'verbose'"),
            ("/orders?=1", "without a name"),
            ("/orders?slot=%ff", "not UTF-8"),
            ("/orders?household=someone", "household must be one of me"),
        ]:
            status, body = await get(port, target, TOKEN)
            assert status == 400 and message in body["error"], (target, body)
        await still_answers(port)
    assert api.rejections["bad_query"] == 17


async def test_deeply_nested_json_is_400_without_recursing() -> None:
    api = make_api()
    deep = b"[" * 30_000 + b"]" * 30_000

    def post(body: bytes, token: str = TOKEN) -> bytes:
        return (f"POST /orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip

    async with serving(api) as port:
        status, body = await exchange(port, post(deep))
        assert status == 400 and "nested deeper than 32 levels" in body["error"]
        status, body = await exchange(port, post(b'{"a":' * 8_000 + b"1" + b"}" * 8_000))
        assert status == 400 and "nested deeper" in body["error"]
        status, body = await exchange(port, post(b"[" * 30_000 + b"}" * 30_000))
        assert status == 400 and "not JSON" in body["error"]
        # not even looked at without the token
        assert (await exchange(port, post(deep, token="wrong")))[0] == 401
        # 32 levels, brackets inside strings and a wide flat body are fine
        ok = b'{"a": ' * 31 + b'{"s": "[[[[{{{{\\"]]"}' + b"}" * 31
        assert await exchange(port, post(ok)) == (200, {"accepted": 1})
        wide = b'{"xs": [' + b",".join([b"[]"] * 20_000) + b"]}"
        assert await exchange(port, post(wide)) == (200, {"accepted": 2})
        assert (await get(port, "/status"))[0] == 200
    assert api.rejections["bad_json"] == 3 and api.rejections["unauthorized"] == 1


def test_the_nesting_scan_is_linear() -> None:
    assert json_nesting_problem(b"[" * 33 + b"]" * 33, 32) == "nested deeper than 32 levels"
    assert json_nesting_problem(b"[" * 32 + b"]" * 32, 32) is None
    assert json_nesting_problem(b'["' + b"[" * 100 + b'"]', 32) is None
    started = time.perf_counter()
    for body in (b"[" * 65_536, b"[]" * 32_768, b'"' + b"\\[" * 32_000 + b'"', b"[{" * 32_768):
        json_nesting_problem(body, 32)
    assert time.perf_counter() - started < 0.5


async def test_a_ten_megabyte_body_is_413_before_it_is_read() -> None:
    api = make_api()
    async with serving(api) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            # only the head is sent: the answer cannot have waited for the 10 MB
            await stream.send_all(b"POST /orders HTTP/1.1\r\nhost: x\r\n"
                                  b"content-length: 10000000\r\n\r\n" + b"x" * 65_536)  # fmt: skip
            started = trio.current_time()
            status, headers, body = await read_response(stream, timeout=2)
            assert status == 413 and "65536 bytes" in body["error"]
            assert headers["connection"] == "close"
            assert trio.current_time() - started < 1.5
            # the server closes: sending the rest fails or goes nowhere
            await closed_within(stream, 3)
        # a chunked body is cut off at the limit
        chunk = b"x" * 40_000
        chunked = (b"POST /orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + TOKEN.encode()
                   + b"\r\ntransfer-encoding: chunked\r\n\r\n"
                   + (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 2)  # fmt: skip
        assert (await exchange(port, chunked))[0] == 413
        await still_answers(port)
    assert api.rejections["body_too_large"] == 2 and api.requests[413] == 2


async def test_twenty_kilobytes_of_headers_or_too_many_headers_are_431() -> None:
    api = make_api()
    async with serving(api) as port:
        big = b"GET /status HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 20_000 + b"\r\n\r\n"
        status, body = await exchange(port, big)
        assert status == 431 and "8192 bytes" in body["error"]
        fields = b"".join(b"x-%d: 1\r\n" % i for i in range(100))
        many = b"GET /status HTTP/1.1\r\nhost: x\r\n" + fields
        status, body = await exchange(port, many + b"\r\n")
        assert status == 431 and "more than 64 header fields" in body["error"]
        long_target = b"GET /status?" + b"a" * 20_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n"
        assert (await exchange(port, long_target))[0] == 431
        await still_answers(port)
    assert api.rejections["header_too_large"] == 2 and api.rejections["too_many_headers"] == 1


# -- slow, idle and too many clients --------------------------------------------------------------


async def test_slowloris_is_answered_408_and_closed_within_the_header_timeout() -> None:
    limits = ApiLimits(header_timeout_s=2.0, request_timeout_s=3.0, idle_timeout_s=1.0)
    api = make_api(limits)
    async with serving(api) as port, trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)

        async def drip() -> None:
            for byte in b"GET /status HTTP/1.1\r\nhost: x\r\n" * 10:
                await stream.send_all(bytes([byte]))
                await trio.sleep(1.0)

        nursery.start_soon(drip)
        started = trio.current_time()
        status, _, body = await read_response(stream, timeout=5)
        assert status == 408 and "in time" in body["error"]
        await closed_within(stream, limits.linger_s + 1)
        assert trio.current_time() - started < limits.header_timeout_s + limits.linger_s + 1
        nursery.cancel_scope.cancel()
    assert api.rejections["header_timeout"] == 1
    # the defaults close a slowloris well within 10 s
    defaults = ApiLimits()
    assert defaults.header_timeout_s + defaults.linger_s <= 10
    assert defaults.request_timeout_s <= 10


async def test_slow_bodies_silent_and_idle_connections_are_closed_in_time() -> None:
    limits = ApiLimits(header_timeout_s=1.0, request_timeout_s=2.0, idle_timeout_s=1.0)
    api = make_api(limits)
    async with serving(api) as port:
        # headers at once, then the body a byte at a time: 408 at the whole-request timeout
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            head = f"POST /orders HTTP/1.1\r\nauthorization: Bearer {TOKEN}\r\nhost: x\r\n"
            await stream.send_all(head.encode() + b"content-length: 100\r\n\r\n{")
            started = trio.current_time()
            with trio.move_on_after(3):
                async with trio.open_nursery() as nursery:

                    async def drip() -> None:
                        while True:
                            await trio.sleep(0.5)
                            await stream.send_all(b" ")

                    nursery.start_soon(drip)
                    status, _, _ = await read_response(stream, timeout=3)
                    nursery.cancel_scope.cancel()
            assert status == 408 and trio.current_time() - started < 2.5
        # connected, silent: closed without an answer at the header timeout
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            assert await closed_within(stream, 2.5) == b""
        # keep-alive: answered, then closed after the idle timeout
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await read_response(stream))[0] == 200
            started = trio.current_time()
            assert await closed_within(stream, 2.5) == b""
            assert trio.current_time() - started >= 0.9
        await still_answers(port)
    assert api.rejections["request_timeout"] == 1
    assert api.rejections["no_request"] == 1 and api.rejections["idle_timeout"] == 1


async def test_connections_over_the_limit_get_503_and_the_server_recovers() -> None:
    api = make_api(ApiLimits(max_connections=4, header_timeout_s=30))
    async with serving(api) as port:
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
        with trio.fail_after(5):
            while api.connections < 4:
                await trio.sleep(0.01)
        for _ in range(3):
            started = trio.current_time()
            status, body = await get(port, "/status")
            assert status == 503 and "too many connections" in body["error"]
            assert trio.current_time() - started < 1.0  # answered at once, not queued
        for stream in held:
            await stream.aclose()
        with trio.fail_after(5):
            while api.connections:
                await trio.sleep(0.01)
        await still_answers(port)
    assert api.rejections["too_many_connections"] == 3 and api.requests[503] == 3


async def test_handler_bugs_answer_500_and_are_counted() -> None:
    api = make_api()
    async with serving(api) as port:
        status, body = await get(port, "/bug")
        assert status == 500 and body == {"error": "internal error (logged by the node)"}
        assert (await get(port, "/recursion"))[0] == 500  # in a worker thread
        await still_answers(port)
    assert api.rejections["handler_error"] == 2 and api.requests[500] == 2


async def test_garbage_and_half_requests_never_stop_the_server() -> None:
    api = make_api(ApiLimits(header_timeout_s=1.0))
    junk = [
        b"\r\n\r\n\r\n",
        b"GET /status HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
        b"GET /status HTTP/1.1\r\ncontent-length: 99999999999999999999999\r\n\r\n",
        b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        b"GET /status HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
        b"GET /status HTTP/1.1\r\nhost: x\r\n" + b"\x00" * 100 + b"\r\n\r\n",
        b"GET /status HTTP/1.1\r\nho",  # then the client hangs up
        b"\xff" * 10_000,
    ]
    async with serving(api) as port:
        for raw in junk:
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(raw)
                await stream.send_eof()
                answer = await closed_within(stream, 3)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), (raw, answer)
        await still_answers(port)
    assert api.rejections["connection_error"] == 0


# -- the token rule -------------------------------------------------------------------------------


async def test_the_token_guards_other_households_rows_not_the_status() -> None:
    api = make_api()
    async with serving(api) as port:
        assert (await get(port, "/status"))[0] == 200
        assert (await get(port, "/orders?household=me")) == (200, {"slot": None, "mine": True})
        status, body = await get(port, "/orders?slot=3")
        assert status == 401 and "bearer token" in body["error"]
        assert (await get(port, "/orders?slot=3", token="wrong"))[0] == 401
        assert await get(port, "/orders?slot=3", TOKEN) == (200, {"slot": 3, "mine": False})
        assert (await get(port, "/status?x=1"))[0] == 400  # /status takes no parameters
    empty = make_api()
    empty.token = ""  # no token configured: private requests are refused, even "Bearer "
    async with serving(empty) as port:
        assert (await get(port, "/orders?slot=3", token=" "))[0] == 401
        assert (await get(port, "/status"))[0] == 200


# -- handlers never block the loop ----------------------------------------------------------------

HAMMER = r"""
import json, os, socket, sys, threading, time
os.nice(19)  # the clients yield the CPU to the server under test (CI machines have few cores)
port, clients, seconds, path = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
counts = {}
lock = threading.Lock()
request = f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()

def count(key):
    with lock:
        counts[key] = counts.get(key, 0) + 1

def read_one(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            return None
        body += chunk
    return int(head[9:12])

def client(stop_at):
    s = None
    while time.monotonic() < stop_at:
        try:
            if s is None:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(request)
            status = read_one(s)
            count(str(status))
            if status != 200:
                s.close(); s = None; time.sleep(0.05)
        except OSError as exc:
            count(type(exc).__name__)
            if s is not None:
                s.close()
            s = None
            time.sleep(0.05)
    if s is not None:
        s.close()

stop_at = time.monotonic() + seconds
threads = [threading.Thread(target=client, args=(stop_at,)) for _ in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(counts))
"""


def make_db(path: Path) -> Path:
    """A SQLite database whose per-slot query takes a few milliseconds."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (slot INTEGER, household TEXT, qty INTEGER)")
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?)",
                         ((i // 40, f"h{i % 40}", i % 977) for i in range(40_000)))  # fmt: skip
    return path


async def hammer_and_measure(
    port: int, path: str, seconds: float
) -> tuple[dict[str, int], list[float]]:
    """200 clients (another process, so they do not share this process's GIL) send ``GET path``
    for ``seconds`` while a heartbeat task on this trio loop measures its scheduling lag."""
    lags: list[float] = []
    result: dict[str, Any] = {}

    async def hammer() -> None:
        done = await trio.run_process(
            [sys.executable, "-c", HAMMER, str(port), "200", str(seconds), path],
            capture_stdout=True,
        )
        result.update(json.loads(done.stdout))

    async def heartbeat() -> None:
        await trio.sleep(0.5)  # let the clients connect
        end = trio.current_time() + seconds - 1.0
        while trio.current_time() < end:
            due = trio.current_time() + 0.005
            await trio.sleep_until(due)
            lags.append(trio.current_time() - due)

    with trio.fail_after(seconds + 30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hammer)
            nursery.start_soon(heartbeat)
    return result, sorted(lags)


def p99(lags: list[float]) -> float:
    return lags[int(len(lags) * 0.99)]


@pytest.mark.slow
async def test_two_hundred_clients_do_not_stall_the_trio_loop(tmp_path: Path) -> None:
    """Blocking handlers run in the API's worker threads: the heartbeat on the loop stays on
    time (p99 lag < 100 ms) while 200 clients hammer a database route. The same handler run on
    the loop (the control) delays the heartbeat several times more.

    A shared CI host's other load can delay any process now and then, so the measurement gets
    up to three tries; handlers on the loop fail every one of them (see the control)."""
    api = make_api(db=make_db(tmp_path / "orders.db"))
    async with serving(api) as port:
        tries: list[float] = []
        for _ in range(3):
            counts, lags = await hammer_and_measure(port, "/slots", 4.0)
            assert counts.get("200", 0) > 200, counts
            assert set(counts) <= {"200"}, counts  # no refusals: 200 clients fit the limit
            tries.append(p99(lags))
            if tries[-1] < 0.1:
                break
        assert min(tries) < 0.1, tries

        control, on_loop = await hammer_and_measure(port, "/slots-on-loop", 3.0)
        assert control.get("200", 0) > 0, control
        assert p99(on_loop) > 2 * min(tries), (p99(on_loop), tries)
        await still_answers(port)
