"""The node's local HTTP API: JSON status for people and the dashboard, on trio with h11.

Bound to 127.0.0.1 unless configured otherwise. Every route says whether it needs
``Authorization: Bearer <token>`` (the token from the node's config, compared in constant time):
by default ``GET`` is open and every other method needs it; a route may demand it for some
requests only (the household's routes: views of other households' rows). Handlers are plain
functions from a :class:`Request` to a JSON-able value (or raise :class:`ApiError`); a route
marked ``blocking`` (it reads the database) runs in a worker thread, at most
``ApiLimits.handler_threads`` at once, so no request can hold up the trio loop that also ticks
Raft. An ``async`` handler runs on the loop and may hand work to :meth:`Api.run_blocking`.

A route marked ``stream`` answers with a :class:`Stream` (server-sent events): the response
head, then chunks as the handler's stream yields them (HTTP/1.1 chunked, or connection-close
framing for an HTTP/1.0 client), until the stream ends, the client hangs up, or a chunk is not
taken within ``send_timeout_s`` (a client that does not read is dropped, never waited for); the
connection then closes. At most ``ApiLimits.max_streams`` streams run at once (503 beyond).

Nothing a client sends can raise out of :meth:`Api.serve`: every connection runs under a
catch-all, a handler bug answers 500, and every refusal is answered with a JSON 4xx/5xx, counted
by status code (:attr:`Api.requests`) and by reason (:attr:`Api.rejections`). The limits are in
:class:`ApiLimits` (documented in docs/node.md, "Local HTTP API").
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import json
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import unquote

import h11
import trio

from market.bounds import bounded_int
from market.encoding import MAX_JSON_DEPTH, json_nesting_problem

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
"""Largest request body (413 beyond it)."""
REQUEST_TIMEOUT_S = 10.0
"""The whole request (line, headers and body) must arrive within this (408)."""

_RECEIVE_BYTES = 16 * 1024
_LINGER_BYTES = 64 * 1024

_REASON_PHRASES = {
    200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    413: "Content Too Large", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}  # fmt: skip
_DEFAULT_REASONS = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed",
    408: "timeout", 409: "conflict", 413: "body_too_large", 429: "too_many_requests",
    431: "header_too_large",
    500: "handler_error", 503: "unavailable",
}  # fmt: skip

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """What one client may ask of the server. Every limit answers with a JSON error (or, for an
    idle keep-alive connection, a plain close) and is counted in :attr:`Api.rejections`."""

    max_header_bytes: int = 8 * 1024
    """Request line plus headers (431)."""
    max_headers: int = 64
    """Header fields in one request (431)."""
    max_body_bytes: int = MAX_BODY_BYTES
    """Request body (413; a declared ``content-length`` above it is refused before reading)."""
    max_json_depth: int = MAX_JSON_DEPTH
    """Nesting of a JSON body (400)."""
    header_timeout_s: float = 5.0
    """From a request's first byte (or, on a new connection, from accepting it) to the end of
    its headers (408). A slowloris client is closed after this."""
    request_timeout_s: float = REQUEST_TIMEOUT_S
    """From a request's first byte to the end of its body (408)."""
    idle_timeout_s: float = 5.0
    """A keep-alive connection waiting for its next request is closed after this."""
    send_timeout_s: float = 10.0
    """Writing one response; a client that does not read is closed after this."""
    handler_timeout_s: float = 10.0
    """A blocking handler waiting for and running in a worker thread (503)."""
    max_connections: int = 256
    """Connections served at once (waiting clients queue for the worker threads, costing the
    loop nothing); one more is answered 503 at once and closed."""
    max_refusing: int = 64
    """Connections being answered 503 at once; beyond that they are closed without an answer."""
    handler_threads: int = 4
    """Worker threads running blocking handlers (the database has one writer; readers need few)."""
    linger_s: float = 0.5
    """After an error answer, how long unread input is drained so the client gets the answer
    (closing a socket with unread input resets the connection)."""
    max_streams: int = 4
    """Streamed answers (``GET /events``) open at once; one more is answered 503."""
    stream_send_buffer: int = 64 * 1024
    """The kernel send buffer of a streaming connection (``SO_SNDBUF``): what a client that
    stops reading can leave unsent before the stream's writer waits (then ``send_timeout_s``
    drops it)."""
    stream_input_bytes: int = 4 * 1024
    """Bytes a client may send on a streaming connection after its request (ignored); more
    closes the stream (a stream takes no further requests)."""


class ApiError(Exception):
    """An error answered as JSON ``{"error": message}`` with ``status``; ``reason`` is the key it
    is counted under in :attr:`Api.rejections` (default: from the status). ``details`` are more
    fields of the answer (e.g. a typed engine reason), next to ``error``."""

    def __init__(
        self,
        status: int,
        message: str,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or _DEFAULT_REASONS.get(status, f"http_{status}")
        self.details = dict(details or {})


@dataclass(frozen=True, slots=True)
class Stream:
    """A streamed answer (a route registered with ``stream=True``): 200 with ``content_type``,
    then each chunk ``next()`` returns, sent as it comes, until it returns None. ``close`` runs
    once when the stream ends for any reason (the client hung up or stopped reading, the
    producer ended it, the node stops): it releases what the handler took."""

    next: Callable[[], Awaitable[bytes | None]]
    close: Callable[[], None]
    content_type: str = "text/event-stream"


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer with a status other than 200 (e.g. 202 Accepted), returned by a
    handler that runs on the loop (a ``blocking`` handler always answers 200)."""

    status: int
    payload: Any


class _Close(Exception):
    """End the connection without an answer (idle, client gone), counted under ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request: path and query percent-decoded, header names lower-case."""

    method: str
    path: str
    query: Mapping[str, str]
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    max_json_depth: int = MAX_JSON_DEPTH
    ints: Mapping[str, int] = field(default_factory=dict)
    """The route's integer parameters present in the query, parsed and range-checked."""

    def json(self) -> Any:
        """The body as JSON (an empty body is ``null``), or ApiError 400.

        Nesting deeper than ``max_json_depth`` is refused before parsing, by a scan that cannot
        recurse; the body is already at most ``ApiLimits.max_body_bytes``.
        """
        body = self.body or b"null"
        problem = json_nesting_problem(body, self.max_json_depth)
        if problem is not None:
            raise ApiError(400, f"body is not JSON: {problem}", "bad_json")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"body is not JSON: {exc}", "bad_json") from None

    def int_param(self, name: str, *, low: int = 0, high: int) -> int | None:
        """Query parameter ``name`` as an integer in ``low..high`` (None if absent), or
        ApiError 400 naming the parameter."""
        text = self.query.get(name)
        if text is None:
            return None
        try:
            return bounded_int(text, name, low=low, high=high)
        except ValueError as exc:
            raise ApiError(400, str(exc), "bad_query") from None

    def choice_param(self, name: str, allowed: tuple[str, ...]) -> str | None:
        """Query parameter ``name`` if it is one of ``allowed`` (None if absent), or 400."""
        value = self.query.get(name)
        if value is not None and value not in allowed:
            raise ApiError(400, f"{name} must be one of {', '.join(allowed)}, got {value[:40]!r}",
                           "bad_query")  # fmt: skip
        return value


Handler = Callable[[Request], Any]
"""A route's handler: returns a JSON-able value (an ``async`` handler, an awaitable of one)."""
TokenRule = bool | Callable[[Request], bool]
"""Whether a request needs the bearer token: always, never, or decided per request."""


@dataclass(frozen=True, slots=True)
class Route:
    """One ``method path``: its handler and how it runs."""

    handler: Handler
    blocking: bool
    """Run in a worker thread (it touches the database): never on the trio loop."""
    token: TokenRule
    params: frozenset[str] | None
    """Query parameters it takes (others are refused with 400); None: not checked."""
    ints: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """Integer parameters and their ranges, checked before the token (400 naming them)."""
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Parameters that take one of a few values, checked before the token."""
    stream: bool = False
    """It answers with a :class:`Stream` (counted against ``ApiLimits.max_streams``)."""


def parse_query(qs: str) -> dict[str, str]:
    """``a=1&b=x%20y`` as a dict, percent-decoded (``+`` is a space); ApiError 400 for a
    parameter given twice, an empty name or bytes that are not UTF-8."""
    query: dict[str, str] = {}
    for part in qs.split("&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition("=")
        try:
            name = unquote(raw_name.replace("+", " "), errors="strict")
            value = unquote(raw_value.replace("+", " "), errors="strict")
        except UnicodeDecodeError:
            raise ApiError(400, f"query parameter {raw_name[:40]!r} is not UTF-8",
                           "bad_query") from None  # fmt: skip
        if not name:
            raise ApiError(400, "query parameter without a name", "bad_query")
        if name in query:
            raise ApiError(400, f"query parameter {name[:40]!r} given twice", "bad_query")
        query[name] = value
    return query


@dataclass
class Api:
    """Routes, the token that guards private requests, limits and counters."""

    token: str
    limits: ApiLimits = field(default_factory=ApiLimits)
    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    requests: Counter[int] = field(default_factory=Counter)
    """Responses sent, by status code (for metrics)."""
    rejections: Counter[str] = field(default_factory=Counter)
    """Requests refused and connections closed early, by reason (for metrics)."""
    connections: int = 0
    """Connections being served now."""
    refusing: int = 0
    """Connections being answered 503 now (over ``max_connections``)."""
    streams: int = 0
    """Streamed answers being sent now (at most ``ApiLimits.max_streams``)."""
    _limiter: trio.CapacityLimiter | None = field(default=None, repr=False)

    def route(
        self,
        method: str,
        path: str,
        *,
        blocking: bool = False,
        token: TokenRule | None = None,
        params: frozenset[str] | set[str] | None = None,
        ints: Mapping[str, tuple[int, int]] | None = None,
        choices: Mapping[str, tuple[str, ...]] | None = None,
        stream: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Decorator registering ``handler`` for ``method path``.

        ``token``: whether the bearer token is needed (default: for every method but GET).
        ``blocking``: run the handler in a worker thread. ``params``: the query parameters it
        takes (None: any); ``ints`` (name: (low, high)) and ``choices`` (name: values) are taken
        too, and checked before the token (the handler finds the integers in ``Request.ints``).
        ``stream``: the handler returns a :class:`Stream` (never ``blocking``).
        """
        needs_token: TokenRule = method.upper() != "GET" if token is None else token
        ints, choices = dict(ints or {}), dict(choices or {})
        allowed = None
        if params is not None or ints or choices:
            allowed = frozenset(params or ()) | frozenset(ints) | frozenset(choices)

        def add(handler: Handler) -> Handler:
            self.routes[(method.upper(), path)] = Route(
                handler, blocking and not stream, needs_token, allowed, ints, choices, stream
            )
            return handler

        return add

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """The worker threads blocking handlers share (created in the running trio loop)."""
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.limits.handler_threads)
        return self._limiter

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in one of the API's worker threads (503 after
        ``handler_timeout_s``); for ``async`` handlers that read the database."""
        with trio.move_on_after(self.limits.handler_timeout_s):
            return await trio.to_thread.run_sync(
                fn, *args, limiter=self.limiter, abandon_on_cancel=True
            )
        raise ApiError(503, "the node is busy: try again", "handler_timeout")

    def authorized(self, headers: Mapping[str, str]) -> bool:
        """Whether ``headers`` carry this API's bearer token (never with an empty token)."""
        supplied = headers.get("authorization", "").encode("ascii", "replace")
        return bool(self.token) and hmac.compare_digest(
            supplied, f"Bearer {self.token}".encode("ascii", "replace")
        )

    def resolve(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[Route, Request]:
        """The route and the parsed request, or ApiError: 404, 405, then 400 (parameters),
        then 401 (token)."""
        raw_path, _, qs = target.partition("?")
        try:
            path = unquote(raw_path, errors="strict")
        except UnicodeDecodeError:
            raise ApiError(400, "path is not UTF-8", "bad_encoding") from None
        route = self.routes.get((method, path))
        if route is None:
            if any(p == path for _, p in self.routes):
                raise ApiError(405, f"{method} not allowed on {path}")
            raise ApiError(404, f"no such resource {path[:200]}")
        query = parse_query(qs)
        if route.params is not None:
            unknown = sorted(set(query) - route.params)
            if unknown:
                takes = ", ".join(sorted(route.params)) or "none"
                raise ApiError(400, f"unknown query parameter {unknown[0][:40]!r} "
                                    f"(takes: {takes})", "bad_query")  # fmt: skip
        request = Request(method, path, query, body, headers, self.limits.max_json_depth)
        parsed: dict[str, int] = {}
        for name, (low, high) in route.ints.items():
            value = request.int_param(name, low=low, high=high)
            if value is not None:
                parsed[name] = value
        for name, values in route.choices.items():
            request.choice_param(name, values)
        request = replace(request, ints=parsed)
        needs_token = route.token(request) if callable(route.token) else route.token
        if needs_token and not self.authorized(headers):
            raise ApiError(401, "missing or wrong bearer token")
        return route, request

    async def dispatch(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, bytes | Stream]:
        """Answer one request: (status, JSON body bytes), or (200, a :class:`Stream`) from a
        streaming route, which then holds one of the ``max_streams`` places until the caller
        closes it. Never raises but Cancelled: a handler's unexpected exception answers 500
        (logged with its traceback)."""
        try:
            route, request = self.resolve(method, target, headers, body)
            if route.stream:
                return 200, await self._open_stream(route, request)
            if route.blocking:
                return 200, await self.run_blocking(_encode_result, route.handler, request)
            result = route.handler(request)
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, Reply):
                return result.status, _encode(result.payload)
            return 200, _encode(result)
        except ApiError as exc:
            self.rejections[exc.reason] += 1
            return exc.status, _encode({**exc.details, "error": exc.message})
        except Exception:
            self.rejections["handler_error"] += 1
            log.warning("api handler failed", exc_info=True,
                        extra={"event": "api_handler_error", "method": method,
                               "path": target.partition("?")[0][:200]})  # fmt: skip
            return 500, _encode({"error": "internal error (logged by the node)"})

    async def _open_stream(self, route: Route, request: Request) -> Stream:
        """Take one of the ``max_streams`` places (503 when none is free) and start the
        route's stream; the place is given back when the stream closes."""
        if self.streams >= self.limits.max_streams:
            raise ApiError(
                503,
                f"too many event streams open (at most {self.limits.max_streams}); try again",
                "too_many_streams",
            )
        self.streams += 1  # no checkpoint since the check: places are never over-booked
        try:
            result = route.handler(request)
            if inspect.isawaitable(result):
                result = await result
        except BaseException:
            self.streams -= 1
            raise
        if not isinstance(result, Stream):
            self.streams -= 1
            raise TypeError(f"stream route {request.path} returned {type(result).__name__}")
        closed = False

        def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                self.streams -= 1
                result.close()

        return replace(result, close=close)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve forever (until cancelled); reports the bound port through ``task_status``."""
        _ = self.limiter
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._connection, listeners)

    # -- one connection -----------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        """Serve one connection; nothing raised here reaches the listener's nursery."""
        peer = _peer(stream)
        try:
            if self.connections >= self.limits.max_connections:
                await self._refuse(stream, peer)
                return
            self.connections += 1
            try:
                await self._serve(stream, peer)
            finally:
                self.connections -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.rejections["connection_lost"] += 1
            log.debug("api connection from %s lost: %s", peer, exc)
        except Exception:
            self.rejections["connection_error"] += 1
            log.warning("api connection from %s failed", peer, exc_info=True,
                        extra={"event": "api_connection_error", "peer": peer})  # fmt: skip
        finally:
            await stream.aclose()

    async def _refuse(self, stream: trio.SocketStream, peer: str) -> None:
        """Over ``max_connections``: answer 503 at once and close (never queue)."""
        if self.refusing >= self.limits.max_refusing:
            self.rejections["too_many_connections_dropped"] += 1
            return  # closed without an answer: even refusals are bounded
        self.rejections["too_many_connections"] += 1
        self.refusing += 1
        try:
            log.debug("api connection from %s refused: too many connections", peer)
            await self._answer_and_close(stream, 503, "too many connections: try again")
        finally:
            self.refusing -= 1

    async def _serve(self, stream: trio.SocketStream, peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        first = True
        while True:
            try:
                request, headers, body = await self._read_request(conn, stream, first)
            except _Close as close:
                if close.reason != "client_closed":
                    self.rejections[close.reason] += 1
                return
            except ApiError as exc:
                self.rejections[exc.reason] += 1
                log.debug("api request from %s refused (%s): %s", peer, exc.reason, exc.message)
                await self._answer_and_close(stream, exc.status, exc.message)
                return
            first = False
            method, target = request.method.decode("ascii"), request.target.decode("ascii")
            status, payload = await self.dispatch(method, target, headers, body)
            if isinstance(payload, Stream):
                try:
                    await self._send_stream(conn, stream, payload)
                finally:
                    payload.close()
                return
            if status >= 400:
                log.debug("api %s %s from %s: %d", method, target[:200], peer, status)
            self._count(status)
            response = h11.Response(status_code=status, headers=_headers(len(payload)))
            with trio.move_on_after(self.limits.send_timeout_s) as sending:
                await stream.send_all(conn.send(response))
                await stream.send_all(conn.send(h11.Data(data=payload)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            if sending.cancelled_caught:
                self.rejections["send_timeout"] += 1
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _send_stream(self, conn: h11.Connection, stream: trio.SocketStream,
                           body: Stream) -> None:  # fmt: skip
        """Send a streamed answer until it ends, the client hangs up or sends more than
        ``stream_input_bytes``, or a chunk is not taken within ``send_timeout_s``. Every way
        it ends is counted; nothing is raised but Cancelled."""
        self._count(200)
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.stream_send_buffer)
        head = h11.Response(status_code=200, headers=[
            ("content-type", body.content_type), ("cache-control", "no-store"),
            ("x-accel-buffering", "no"), ("connection", "close")])  # fmt: skip
        limits = self.limits
        ended: list[str] = []

        async def watch_input(scope: trio.CancelScope) -> None:
            """A stream takes no more requests: end it when the client hangs up (or floods)."""
            received = 0
            try:
                while received <= limits.stream_input_bytes:
                    data = await stream.receive_some(_RECEIVE_BYTES)
                    if not data:
                        ended.append("stream_client_closed")
                        break
                    received += len(data)
                else:
                    ended.append("stream_input")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                ended.append("stream_client_closed")
            scope.cancel()

        async def send(data: bytes) -> bool:
            with trio.move_on_after(limits.send_timeout_s) as sending:
                await stream.send_all(data)
            if sending.cancelled_caught:
                ended.append("stream_send_timeout")
            return not sending.cancelled_caught

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_input, nursery.cancel_scope)
            try:
                if await send(conn.send(head)):
                    while (chunk := await body.next()) is not None:
                        if not await send(conn.send(h11.Data(data=chunk))):
                            break
                    else:
                        ended.append("stream_ended")
                        await send(conn.send(h11.EndOfMessage()))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                ended.append("stream_client_closed")
            except Exception:
                ended.append("stream_error")
                log.warning("api stream failed", exc_info=True,
                            extra={"event": "api_stream_error"})  # fmt: skip
            nursery.cancel_scope.cancel()
        reason = ended[0] if ended else "stream_closed"
        if reason not in ("stream_ended", "stream_client_closed"):
            self.rejections[reason] += 1

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream, first: bool
    ) -> tuple[h11.Request, dict[str, str], bytes]:
        """The next request, its headers and its body; or ApiError (answered, then the
        connection closes) or _Close (closed without an answer)."""
        limits = self.limits
        start = trio.current_time()
        if not conn.trailing_data[0]:  # nothing pipelined: wait for the request's first byte
            wait = limits.header_timeout_s if first else limits.idle_timeout_s
            with trio.move_on_at(start + wait):
                data = await stream.receive_some(_RECEIVE_BYTES)
                if not data:
                    raise _Close("client_closed")
                conn.receive_data(data)
            if not conn.trailing_data[0]:
                raise _Close("no_request" if first else "idle_timeout")
            if not first:
                start = trio.current_time()
        request: h11.Request | None = None
        headers: dict[str, str] = {}
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    raise ApiError(431, "request line and headers over "
                                        f"{limits.max_header_bytes} bytes",
                                   "header_too_large") from None  # fmt: skip
                if conn.trailing_data[1]:  # the client sent half a request and hung up
                    raise _Close("incomplete") from None
                raise ApiError(400, f"malformed HTTP request: {exc}", "malformed") from None
            except ValueError as exc:  # a field h11 passes on unchecked
                raise ApiError(400, f"malformed HTTP request: {exc}", "malformed") from None
            if event is h11.NEED_DATA:
                if request is None:
                    deadline, what = start + limits.header_timeout_s, "header_timeout"
                else:
                    deadline, what = start + limits.request_timeout_s, "request_timeout"
                with trio.move_on_at(deadline):
                    conn.receive_data(await stream.receive_some(_RECEIVE_BYTES))
                    continue
                raise ApiError(408, "request not received in time", what)
            if isinstance(event, h11.Request):
                request = event
                headers = _decode_headers(event, limits.max_headers)
                declared = _content_length(event)
                if declared is not None and declared > limits.max_body_bytes:
                    raise ApiError(413, f"request body over {limits.max_body_bytes} bytes")
                if conn.they_are_waiting_for_100_continue:
                    with trio.move_on_after(limits.send_timeout_s):
                        await stream.send_all(conn.send(h11.InformationalResponse(
                            status_code=100, headers=[])))  # fmt: skip
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limits.max_body_bytes:
                    raise ApiError(413, f"request body over {limits.max_body_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, headers, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise _Close("client_closed" if request is None else "incomplete")

    async def _answer_and_close(self, stream: trio.SocketStream, status: int, message: str
                                ) -> None:  # fmt: skip
        """Send a JSON error with ``connection: close`` outside h11's state machine (the request
        may be unreadable), then drain unread input briefly so the client reads the answer."""
        self._count(status)
        payload = _encode({"error": message})
        head = [f"HTTP/1.1 {status} {_REASON_PHRASES.get(status, 'Error')}"]
        head += [f"{k}: {v}" for k, v in _headers(len(payload))] + ["connection: close", "", ""]
        with trio.move_on_after(self.limits.send_timeout_s):
            await stream.send_all("\r\n".join(head).encode("ascii") + payload)
            await stream.send_eof()
        drained = 0
        with trio.move_on_after(self.limits.linger_s):
            while drained < _LINGER_BYTES:
                data = await stream.receive_some(_RECEIVE_BYTES)
                if not data:
                    break
                drained += len(data)

    def _count(self, status: int) -> None:
        self.requests[status] += 1


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"


def _decode_headers(request: h11.Request, max_headers: int) -> dict[str, str]:
    """Header names (lower-case) and values as ASCII text; 431 for too many, 400 for bytes
    that are not ASCII."""
    if len(request.headers) > max_headers:
        raise ApiError(431, f"more than {max_headers} header fields", "too_many_headers")
    headers: dict[str, str] = {}
    try:
        for name, value in request.headers:
            key = name.decode("ascii").lower()
            text = value.decode("ascii")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        request.method.decode("ascii")
        request.target.decode("ascii")
    except UnicodeDecodeError:
        raise ApiError(400, "request line and headers must be ASCII", "bad_encoding") from None
    return headers


def _content_length(request: h11.Request) -> int | None:
    """The declared body length (h11 checked it: digits, at most 20, never two values)."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


def _headers(length: int) -> list[tuple[str, str]]:
    return [
        ("content-type", "application/json"),
        ("content-length", str(length)),
        ("cache-control", "no-store"),
    ]


def _encode(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, default=str).encode()


def _encode_result(handler: Handler, request: Request) -> bytes:
    """Run a blocking handler and encode its answer, both in the worker thread."""
    return _encode(handler(request))
