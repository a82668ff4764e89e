"""The dashboard's HTTP endpoints under hostile input: clear 4xx answers, bounded logs, counters.

Dash answers what it does not expect with a 500 and Flask logs the exception with its traceback,
whose messages can carry what the client sent (an unknown callback ``output`` is in two chained
``KeyError`` messages: a 10 MB body is logged twice). :func:`install` puts a guard in front of
Dash's endpoints:

- a request body over ``max_body`` bytes (Flask's ``MAX_CONTENT_LENGTH``, 1 MiB) is refused with
  413 from its ``Content-Length`` before anything reads it (a chunked body: once one byte past
  the limit has been read);
- ``POST /_dash-update-component``: a body that is not JSON, nests deeper than
  :data:`MAX_JSON_DEPTH`, or does not name a registered callback with exactly its inputs, state
  and outputs is refused with 400 (a wrong ``Content-Type``: 415) before Dash sees it;
- ``/_dash-component-suites/<package>/<path>``: a package or file Dash did not register (unknown
  package, traversal, malformed fingerprint) is 404; so is any path but the page itself;
- callbacks refuse out-of-range or wrong-typed inputs with :class:`BadInput` (400);
- every error answer is a short JSON document (no traceback); every response is counted by
  status (:class:`HttpStats`, served at :data:`STATS_PATH`);
- an exception from our own code is a 500, logged once as one line (method, path, status, body
  size, exception type and where it was raised), never with the request body.

:class:`ClippedLogHandler` is werkzeug's request handler with log lines clipped (a malformed
request line can be 64 KiB, and ``http.server`` logs it in its error message).
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

from dash import Dash
from dash.exceptions import InvalidResourceError
from dash.fingerprint import check_fingerprint
from flask import jsonify, request
from werkzeug.exceptions import (
    BadRequest,
    HTTPException,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
)
from werkzeug.serving import WSGIRequestHandler

log = logging.getLogger("dashboard.http")

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (the biggest real callback, a figure sent back as State, is
about 150 KiB)."""

MAX_JSON_DEPTH = 64
"""Deepest nesting of a callback payload (a Plotly figure sent back as State is about 10)."""

MAX_LOG_CHARS = 300
"""Longest piece of client-controlled text (a path, a request line) that reaches a log line."""

STATS_PATH = "/_dashboard/http-stats"
"""GET: the responses served so far, by status: ``{"responses": {"200": 12, "400": 3}}``."""


class BadInput(BadRequest):
    """A request or callback input the dashboard refuses (400).

    The description names the offending input, never its value.
    """


class HttpStats:
    """Responses served, by HTTP status; thread-safe (werkzeug serves each request in a thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_status: Counter[int] = Counter()

    def count(self, status: int) -> None:
        """One more response with ``status``."""
        with self._lock:
            self._by_status[status] += 1

    def snapshot(self) -> dict[int, int]:
        """The counts so far."""
        with self._lock:
            return dict(self._by_status)


def clip(text: str, limit: int = MAX_LOG_CHARS) -> str:
    """``text`` with control characters escaped, cut to ``limit`` characters: one bounded log
    line (cut after escaping, so escapes cannot make it longer)."""
    escaped = repr(text[: limit + 1])[1:-1]
    return escaped if len(escaped) <= limit else escaped[:limit] + "…"


def _where(exc: BaseException) -> str:
    """Where ``exc`` was raised (innermost frame, and the innermost frame in our own code)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    spots = [frames[-1]]
    ours = [f for f in frames if "/dashboard/" in f.filename.replace("\\", "/")]
    if ours and ours[-1] is not frames[-1]:
        spots.insert(0, ours[-1])
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} in {f.name}" for f in spots)


def _summary() -> str:
    """Method, path and declared body size of the current request (never the body)."""
    size = request.content_length
    return f"{request.method} {clip(request.path, 200)} ({'?' if size is None else size} bytes)"


def _error(status: int, message: str) -> Any:
    response = jsonify({"status": status, "error": message})
    response.status_code = status
    return response


# --- callback payloads ------------------------------------------------------------------------


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` (decoded JSON) nests deeper than ``limit`` (iteratively)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= limit and children:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _check_deps(items: Any, expected: list[dict[str, Any]], name: str) -> None:
    """``items`` are exactly the registered ``expected`` (id, property) pairs, in order."""
    if not isinstance(items, list):
        raise BadInput(f"bad callback payload: {name} must be a list")
    if len(items) != len(expected):
        raise BadInput(f"bad callback payload: {name} must list {len(expected)} dependencies")
    for i, (item, want) in enumerate(zip(items, expected, strict=True)):
        if isinstance(want["id"], dict):  # pattern-matching dependency: a list of matches
            if not isinstance(item, dict | list):
                raise BadInput(f"bad callback payload: {name}[{i}] must be an object or a list")
            continue
        if not isinstance(item, dict):
            raise BadInput(f"bad callback payload: {name}[{i}] must be an object")
        if item.get("id") != want["id"] or item.get("property") != want["property"]:
            expected = f"{want['id']}.{want['property']}"
            raise BadInput(f"bad callback payload: {name}[{i}] is not {expected}")


def check_callback_body(body: Any, callback_map: dict[str, Any]) -> None:
    """Refuse (:class:`BadInput`) a callback request that is not one Dash's renderer would send
    for a registered callback: unknown ``output``, inputs, state or outputs that are not the
    callback's own, ``changedPropIds`` that are not a list of strings, nesting deeper than
    :data:`MAX_JSON_DEPTH`. Values are left to the callbacks (see ``dashboard.app``)."""
    if not isinstance(body, dict):
        raise BadInput("bad callback payload: must be a JSON object")
    if _too_deep(body, MAX_JSON_DEPTH):
        raise BadInput(f"bad callback payload: nested deeper than {MAX_JSON_DEPTH}")
    output = body.get("output")
    if not isinstance(output, str) or output not in callback_map:
        raise BadInput("bad callback payload: unknown output")
    spec = callback_map[output]
    _check_deps(body.get("inputs"), spec["inputs"], "inputs")
    _check_deps(body.get("state", []), spec["state"], "state")
    registered = spec["output"]
    if isinstance(registered, list):
        _check_deps(body.get("outputs"), [o.to_dict() for o in registered], "outputs")
    else:
        _check_deps([body.get("outputs")], [registered.to_dict()], "outputs")
    changed = body.get("changedPropIds", [])
    if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
        raise BadInput("bad callback payload: changedPropIds must be a list of strings")
    if len(changed) > len(spec["inputs"]):
        raise BadInput("bad callback payload: more changedPropIds than inputs")


# --- callback input values --------------------------------------------------------------------


def optional_dict(value: Any, name: str) -> dict[str, Any] | None:
    """``value`` if it is None or an object, else :class:`BadInput`."""
    if value is None or isinstance(value, dict):
        return value
    raise BadInput(f"{name} must be an object")


def optional_count(value: Any, name: str) -> int | None:
    """A click or interval counter: None or a non-negative integer, else :class:`BadInput`."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise BadInput(f"{name} must be a non-negative integer")


def bounded_int(value: Any, name: str, lo: int, hi: int) -> int | None:
    """None (or "") for nothing, else an integer in ``[lo, hi]``: an int, a float with no
    fraction or a string of digits (what a number box may send); else :class:`BadInput`."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadInput(f"{name} must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise BadInput(f"{name} must be an integer")
        value = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not (0 < len(text) <= 20 and text.lstrip("-").isdigit()):
            raise BadInput(f"{name} must be an integer")
        value = int(text)
    elif not isinstance(value, int):
        raise BadInput(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise BadInput(f"{name} must be between {lo} and {hi}")
    return value


def one_of(value: Any, name: str, allowed: Any) -> Any:
    """``value`` if it is a string in ``allowed``, else :class:`BadInput`."""
    if isinstance(value, str) and value in allowed:
        return value
    raise BadInput(f"{name} must be one of {', '.join(sorted(allowed))}")


def optional_str(value: Any, name: str, max_len: int) -> str | None:
    """None or a string of at most ``max_len`` characters, else :class:`BadInput`."""
    if value is None or (isinstance(value, str) and len(value) <= max_len):
        return value
    raise BadInput(f"{name} must be a string of at most {max_len} characters")


# --- the guard --------------------------------------------------------------------------------


def install(app: Dash, max_body: int = MAX_BODY_BYTES) -> HttpStats:
    """Guard ``app``'s endpoints (see the module docstring); returns its response counters, also
    at ``app.server.extensions["dashboard_http"]`` and ``GET STATS_PATH``."""
    server = app.server
    stats = HttpStats()
    server.extensions["dashboard_http"] = stats
    server.config["MAX_CONTENT_LENGTH"] = max_body
    prefix = app.config.routes_pathname_prefix

    def refuse_big_bodies() -> None:
        size = request.content_length
        if size is not None:
            if size > max_body:  # refused from the header, before anything reads the body
                raise RequestEntityTooLarge(f"request body over {max_body} bytes")
        elif "wsgi.input_terminated" in request.environ:
            # chunked, no length announced: werkzeug stops reading at the limit without a
            # word, so read one byte past it (cached for Dash) to tell "too big" from "fits"
            request.max_content_length = max_body + 1
            if len(request.get_data(cache=True)) > max_body:
                raise RequestEntityTooLarge(f"request body over {max_body} bytes")

    # first, before Dash's own setup hook: a refused request costs nothing
    server.before_request_funcs.setdefault(None, []).insert(0, refuse_big_bodies)

    @server.after_request
    def _count(response: Any) -> Any:
        stats.count(response.status_code)
        return response

    @server.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        code = exc.code or 500
        if code >= 500:
            log.error("%d %s: %s", code, _summary(), exc.name)
        else:
            log.debug("%d %s: %s", code, _summary(), clip(exc.description or exc.name, 120))
        message = exc.description if isinstance(exc, BadInput) else exc.name
        response = _error(code, message or "error")
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @server.errorhandler(InvalidResourceError)
    def _no_resource(_exc: InvalidResourceError) -> Any:
        log.debug("404 %s: invalid resource", _summary())
        return _error(404, "Not Found")

    @server.errorhandler(Exception)
    def _server_error(exc: Exception) -> Any:  # Flask sends HTTPExceptions to _http_error
        log.error(
            "500 %s: %s %s at %s",
            _summary(),
            type(exc).__name__,
            clip(str(exc), 100),
            _where(exc),
        )
        return _error(500, "Internal Server Error")

    def wrap(name: str, guard: Callable[..., None]) -> None:
        endpoint = prefix + name
        original = server.view_functions[endpoint]

        def guarded(*args: Any, **kwargs: Any) -> Any:
            guard(*args, **kwargs)
            return original(*args, **kwargs)

        guarded.__name__ = getattr(original, "__name__", "guarded")
        server.view_functions[endpoint] = guarded

    def callback_guard() -> None:
        try:
            body = request.get_json()  # cached: Dash's dispatch reads the same object
        except RecursionError:
            raise BadInput("bad callback payload: nested too deeply") from None
        except HTTPException as exc:
            if exc.code == 400:
                raise BadInput("request body is not JSON") from None
            raise
        check_callback_body(body, app.callback_map)

    def suite_guard(package_name: str, fingerprinted_path: str) -> None:
        path, _ = check_fingerprint(fingerprinted_path)
        registered = app.registered_paths.get(package_name)
        if not registered or path not in registered:
            raise NotFound()

    def unknown_path(path: str = "") -> Any:
        raise NotFound()

    wrap("_dash-update-component", callback_guard)
    wrap("_dash-component-suites/<string:package_name>/<path:fingerprinted_path>", suite_guard)
    # one page: every other path is 404 (Dash's catch-all would serve the page for any path)
    server.view_functions[prefix + "<path:path>"] = unknown_path

    def http_stats() -> Any:
        return jsonify({"responses": {str(k): v for k, v in sorted(stats.snapshot().items())}})

    server.add_url_rule(STATS_PATH, "dashboard_http_stats", http_stats, methods=["GET"])
    return stats


class ClippedLogHandler(WSGIRequestHandler):
    """werkzeug's request handler with every log line clipped to :data:`MAX_LOG_CHARS` (plus the
    address and date): ``http.server`` puts a malformed request line (up to 64 KiB) in its
    error message."""

    def log(self, type: str, message: str, *args: Any) -> None:
        try:
            text = message % args if args else message
        except (TypeError, ValueError):
            text = message
        text = text.rstrip("\n").replace("\r", "\\r").replace("\n", "\\n")
        if len(text) > MAX_LOG_CHARS:
            text = text[:MAX_LOG_CHARS] + "…"
        super().log(type, "%s", text)
