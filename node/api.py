"""The node's local HTTP API: JSON status for people and the dashboard, on trio with h11.

Bound to 127.0.0.1 unless configured otherwise. ``GET`` routes are read-only; every other
method changes state and needs ``Authorization: Bearer <token>`` with the token from the node's
config (compared in constant time). Handlers are plain functions from a :class:`Request` to a
JSON-able value (or raise :class:`ApiError`), so the routing is testable without a socket.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 10.0


class ApiError(Exception):
    """An error answered as JSON ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or ApiError 400."""
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise ApiError(400, f"body is not JSON: {exc}") from None


Handler = Callable[[Request], Any]


@dataclass
class Api:
    """Routes and the token that guards state-changing requests."""

    token: str
    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    requests: dict[int, int] = field(default_factory=dict)
    """Responses sent, by status code (for metrics)."""

    def route(self, method: str, path: str) -> Callable[[Handler], Handler]:
        """Decorator registering ``handler`` for ``method path``."""

        def add(handler: Handler) -> Handler:
            self.routes[(method.upper(), path)] = handler
            return handler

        return add

    def dispatch(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        """Answer one request: (status, JSON-able body)."""
        path, _, qs = target.partition("?")
        query = dict(p.partition("=")[::2] for p in qs.split("&") if p)
        handler = self.routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in self.routes):
                return 405, {"error": f"{method} not allowed on {path}"}
            return 404, {"error": f"no such resource {path}"}
        if method != "GET":
            supplied = headers.get("authorization", "")
            if not (self.token and hmac.compare_digest(supplied, f"Bearer {self.token}")):
                return 401, {"error": "missing or wrong bearer token"}
        try:
            return 200, handler(Request(method, path, query, body))
        except ApiError as exc:
            return exc.status, {"error": exc.message}

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve forever (until cancelled); reports the bound port through ``task_status``."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                while True:
                    try:
                        request, body = await _read_request(conn, stream)
                    except ApiError as exc:
                        self.requests[exc.status] = self.requests.get(exc.status, 0) + 1
                        await _send_json(conn, stream, exc.status, {"error": exc.message})
                        return
                    if request is None:
                        return
                    headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                    status, payload = self.dispatch(
                        request.method.decode(), request.target.decode(), headers, body
                    )
                    self.requests[status] = self.requests.get(status, 0) + 1
                    await _send_json(conn, stream, status, payload)
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
        except (h11.RemoteProtocolError, h11.LocalProtocolError, trio.BrokenResourceError) as exc:
            log.debug("api connection closed: %s", exc)
        finally:
            await stream.aclose()


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            conn.receive_data(data)
            if not data and request is None:
                return None, b""
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, "request body too large")
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


async def _send_json(
    conn: h11.Connection, stream: trio.SocketStream, status: int, payload: Any
) -> None:
    body = json.dumps(payload, sort_keys=True, default=str).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
    ]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))
