"""The node's HTTP API over a real loopback socket."""

from __future__ import annotations

import http.client
import json

import trio

from node.daemon.http_api import Api, ApiError, Request


def make_api() -> Api:
    api = Api(token="s3cret")
    orders: list = []

    @api.route("GET", "/status")
    def status(_: Request) -> dict:
        return {"role": "leader", "term": 3, "orders": len(orders)}

    @api.route("POST", "/orders")
    def post_order(req: Request) -> dict:
        body = req.json()
        if not isinstance(body, dict) or "quantity_wh" not in body:
            raise ApiError(422, "quantity_wh is required")
        orders.append(body)
        return {"accepted": len(orders)}

    return api


def call(port: int, method: str, path: str, body: bytes | None = None, token: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


async def test_routes_auth_and_errors_over_loopback() -> None:
    api = make_api()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(api.serve, "127.0.0.1", 0)

        def client() -> list:
            return [
                call(port, "GET", "/status"),
                call(port, "GET", "/nope"),
                call(port, "DELETE", "/status", token="s3cret"),
                call(port, "POST", "/orders", b'{"quantity_wh": 5}'),
                call(port, "POST", "/orders", b'{"quantity_wh": 5}', token="wrong"),
                call(port, "POST", "/orders", b'{"quantity_wh": 5}', token="s3cret"),
                call(port, "POST", "/orders", b"{not json", token="s3cret"),
                call(port, "POST", "/orders", b"{}", token="s3cret"),
                call(port, "POST", "/orders", b"x" * 70_000, token="s3cret"),
                call(port, "GET", "/status?verbose=1"),
            ]

        with trio.fail_after(20):
            results = await trio.to_thread.run_sync(client)
        nursery.cancel_scope.cancel()
    statuses = [s for s, _ in results]
    assert statuses == [200, 404, 405, 401, 401, 200, 400, 422, 413, 200]
    assert results[0][1] == {"orders": 0, "role": "leader", "term": 3}
    assert results[5][1] == {"accepted": 1}
    assert results[9][1]["orders"] == 1
    assert "bearer" in results[3][1]["error"]
    assert api.requests[200] == 3 and api.requests[401] == 2


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    api = make_api()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(api.serve, "127.0.0.1", 0)

        def client() -> list[int]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            out = []
            for _ in range(3):
                conn.request("GET", "/status")
                resp = conn.getresponse()
                resp.read()
                out.append(resp.status)
            conn.close()
            return out

        with trio.fail_after(20):
            assert await trio.to_thread.run_sync(client) == [200, 200, 200]
        nursery.cancel_scope.cancel()
