#!/usr/bin/env python3
"""An external strategy for a household node (docs/strategy-api.md), standard library only.

It follows the node's event stream (``GET /events``, server-sent events), and after each
clearing places a buy curve for the slot ``--ahead`` slots past the one just cleared (replacing
the manual order it placed there before); when a slot cleared above ``--cancel-above`` it
cancels its order for that later slot instead (prices are running high: buy from the grid's
agent alone). It prints every event it sees, reconnects with ``Last-Event-ID`` if the stream
breaks, and exits after ``--slots`` clearings.

    python examples/strategy_client.py --url http://127.0.0.1:8400 --token "$TOKEN" --slots 4

The token is the node config's ``api_token`` (``--token`` or ``MICROGRID_API_TOKEN``): placing
and cancelling orders need it; the stream does not.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

MAX_LINE = 64 * 1024
Event = tuple[str | None, str, Any]
"""One server-sent event: its id (None without one), name and JSON data."""


class Node:
    """The node's API at ``url`` (``http://host:port``)."""

    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 8400
        self.token, self.timeout = token, timeout

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request; (status, decoded JSON answer)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            data = None if body is None else json.dumps(body).encode()
            if data is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def events(
        self, last_event_id: str | None, timeout: float = 60.0
    ) -> tuple[http.client.HTTPResponse, Iterator[Event]]:
        """Open ``GET /events``: the response (close it when done) and an iterator of
        (id, event, data)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        conn.request("GET", "/events", headers=headers)
        resp = conn.getresponse()  # the node closes after a stream: resp owns the socket
        conn.close()
        if resp.status != 200:
            answer = resp.read(4096)
            resp.close()
            raise ConnectionError(f"GET /events: {resp.status} {answer[:200]!r}")
        return resp, parse_events(resp)


def parse_events(resp: Any) -> Iterator[Event]:
    """Server-sent events from a readable response: (id or None, event name, JSON data).
    Comments (keep-alives) and ``retry`` lines are skipped; the iterator ends with the stream."""
    event_id: str | None = None
    name, data = "message", []
    while True:
        raw = resp.readline(MAX_LINE)
        if not raw:
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event_id, name, json.loads("\n".join(data))
            event_id, name, data = None, "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                event_id = value
            elif field == "event":
                name = value
            elif field == "data":
                data.append(value)


def curve(band: dict[str, int], quantity_wh: int) -> list[list[int]]:
    """A three-step buy curve inside the price band: a third of the energy near the retail
    price, a third at the middle, a third just above the feed-in tariff."""
    low, high = band["feed_in_tariff"], band["retail_price"]
    prices = sorted({high - 1, (low + high) // 2, low + 1}, reverse=True)
    share = max(1, quantity_wh // len(prices))
    return [[share, p] for p in prices]


def run(args: argparse.Namespace) -> int:
    node = Node(args.url, args.token)
    code, rules = node.call("GET", "/rules")
    if code != 200:
        print(f"GET /rules: {code} {rules}", file=sys.stderr)
        return 1
    band = rules["band"]
    cleared, last_id, failures = 0, None, 0
    deadline = time.monotonic() + args.max_seconds
    while cleared < args.slots:
        if time.monotonic() > deadline:
            print("giving up: no more clearings in time", file=sys.stderr)
            return 2
        try:
            resp, events = node.events(last_id)
        except (OSError, ConnectionError) as exc:
            failures += 1
            if failures > 5:
                print(f"cannot follow the node's events: {exc}", file=sys.stderr)
                return 1
            time.sleep(1.0)
            continue
        try:
            for event_id, name, data in events:
                last_id = event_id or last_id
                if name == "hello":
                    print(f"hello: household {data['household']}, open slot "
                          f"{data['open_slot']}", flush=True)  # fmt: skip
                elif name == "order":
                    print(
                        f"order {data['order_id']}: {data['status']}"
                        + (f" ({data['reason']})" if data.get("reason") else ""),
                        flush=True,
                    )
                elif name == "settlement":
                    print(f"settled slot {data['slot']}: money {data['money']}", flush=True)
                elif name == "gap":
                    print(f"gap: {data['reason']}; resync from {data['resync']}", flush=True)
                elif name == "clearing":
                    cleared += 1
                    print(
                        f"cleared slot {data['slot']}: price {data['price']}, "
                        f"{data['volume_wh']} Wh, my trades {len(data['trades'])}",
                        flush=True,
                    )
                    react(node, data, band, args)
                    if cleared >= args.slots:
                        break
        except (OSError, ValueError, http.client.HTTPException) as exc:
            print(f"stream broke ({exc}); reconnecting from {last_id}", flush=True)
            time.sleep(0.5)
        finally:
            resp.close()
    print(f"done after {cleared} clearings", flush=True)
    return 0


def react(node: Node, clearing: dict[str, Any], band: dict[str, int],
          args: argparse.Namespace) -> None:  # fmt: skip
    """After a clearing: place (or replace) a curve for a later slot, or cancel it when the
    cleared price is above ``--cancel-above``."""
    target = clearing["slot"] + args.ahead
    price = clearing["price"]
    if args.cancel_above is not None and price is not None and price > args.cancel_above:
        code, answer = node.call("DELETE", f"/orders?slot={target}")
        print(f"cancel slot {target}: {code} {answer}", flush=True)
        return
    steps = curve(band, args.quantity_wh)
    body = {"side": "buy", "slot": target, "steps": steps, "replace": True}
    code, answer = node.call("POST", "/orders", body)
    if code == 200:
        print(f"placed {answer['queued']} for slot {target}: {steps}", flush=True)
    else:  # e.g. 409 gate closed, 429 too many manual records this slot
        print(f"order for slot {target} refused: {code} {answer.get('error')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8400")
    parser.add_argument("--token", default=os.environ.get("MICROGRID_API_TOKEN", ""))
    parser.add_argument("--slots", type=int, default=4, help="clearings to follow, then exit")
    parser.add_argument("--ahead", type=int, default=2, help="order this many slots ahead")
    parser.add_argument("--quantity-wh", type=int, default=300)
    parser.add_argument(
        "--cancel-above",
        type=int,
        default=None,
        help="cancel instead when a slot cleared above this price",
    )
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
