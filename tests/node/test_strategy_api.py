"""The strategy API (issue 18, docs/strategy-api.md) over loopback against a running
HouseholdNode (one household, a real meter simulator, 4-second slots): curve orders for a slot
ahead, replaced and cancelled, with today's refusals; the engine's book and the ledger hold
exactly the final order; ``GET /events`` delivers the order verdicts, clearings and settlements
in order, resumes with Last-Event-ID, drops a client that never reads without holding up the
node, and refuses a fifth stream; the example client runs against the node and exits cleanly.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from meter.sim.server import MeterSimulator
from node.daemon.household_node import HouseholdNode
from node.ledger import schema as t
from tests.node.test_household import (
    SLOT_SECONDS,
    TOKEN,
    call,
    ledger_rows,
    make_grid,
    run_until_stopped,
    sim,
    status_when,
)

pytestmark = pytest.mark.slow
_ = sim  # the fixture

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "strategy_client.py"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("strategy_client", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = load_example()


class Follower:
    """A thread following ``GET /events`` with the example client's parser."""

    def __init__(self, port: int, last_event_id: str | None = None) -> None:
        self.events: list[tuple[str | None, str, Any]] = []
        self.error: BaseException | None = None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        self.sock = conn.sock
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        conn.request("GET", "/events", headers=headers)
        self.resp = conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        assert self.resp.getheader("content-type") == "text/event-stream"
        self.iterator = client.parse_events(self.resp)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.iterator:
                self.events.append(event)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.error = exc

    def named(self, name: str) -> list[Any]:
        return [data for _, n, data in list(self.events) if n == name]

    def close(self) -> None:
        # shutdown wakes the reading thread, then the socket is closed
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.resp.close()
        self.sock.close()


async def wait_for(check: Any, timeout: float, what: str) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.1)


def mine(node: HouseholdNode, slot: int) -> list[dict[str, Any]]:
    return [r for r in ledger_rows(node.config.ledger_url, t.orders)
            if r["slot"] == slot and r["household"] == node.identity.did]  # fmt: skip


async def test_curves_replace_cancel_and_the_event_stream(
    tmp_path: Path, sim: MeterSimulator
) -> None:
    grid = await make_grid(tmp_path, sim)
    node = HouseholdNode(grid.config, grid.identity, grid.genesis)
    # small enough that a client that never reads fills the socket and is dropped in the test
    node.api.limits = replace(node.api.limits, send_timeout_s=2.0, stream_send_buffer=4096)
    node.strategy.log.keepalive = 1.0
    did8 = grid.identity.did[-8:]

    async def body(node: HouseholdNode) -> None:
        assert node.api_port is not None
        port = node.api_port
        doc = await status_when(node, lambda d: d["raft"]["role"] == "leader", 15)
        follower = await trio.to_thread.run_sync(Follower, port)
        try:
            await scenario(node, port, doc, follower)
        finally:
            await trio.to_thread.run_sync(follower.close)

    async def scenario(node: HouseholdNode, port: int, doc: dict[str, Any],
                       follower: Follower) -> None:  # fmt: skip
        slot = doc["open_slot"] + 3  # several slots ahead
        curve = {"side": "buy", "slot": slot, "steps": [[300, 25], [200, 20], [100, 12]]}
        # today's limits and reasons, per step for a curve, checked before anything is signed
        bad: list[tuple[Any, int, str]] = [
            ({**curve, "steps": [[300, 25], [200, 5]]}, 400, "step 1 price must be in 8..30"),
            ({**curve, "steps": [[300, 12], [200, 25]]}, 400, "must strictly decrease"),
            ({**curve, "steps": [[300, 25], [0, 20]]}, 400, "step 1 quantity_wh must be in"),
            ({**curve, "steps": [[300, 25]]}, 400, "2 to 16 steps"),
            ({**curve, "steps": [[1, 2, 3], [4, 5]]}, 400, "integer pairs"),
            ({**curve, "quantity_wh": 5}, 400, "not the total"),
            ({**curve, "price": 20}, 400, "not the first step's price"),
            ({**curve, "steps": [[999_999, 25], [2, 20]]}, 400,
             "quantity_wh must be in 1..1000000"),
            ({**curve, "slot": slot - 4}, 409, f"the gate of slot {slot - 4} has closed"),
            ({**curve, "slot": slot + 200}, 400, "too far ahead"),
            ({**curve, "replace": 3}, 400, "replace must be"),
            ({**curve, "colour": "red"}, 400, "unknown field 'colour'"),
            ({**curve, "side": "sell", "steps": [[10**5, 9], [10**5, 10]]}, 409,
             "over_sell_limit"),
        ]  # fmt: skip
        for order, code, message in bad:
            got, answer = await call(node, "POST", "/orders", order, token=TOKEN)
            assert got == code and message in answer["error"], (order, answer)
        assert (await call(node, "POST", "/orders", curve))[0] == 401
        assert not node.strategy.queued and not node.strategy.nonces.current

        # place a curve: the slot's own manual nonce
        code, first = await call(node, "POST", "/orders", curve, token=TOKEN)
        assert code == 200 and first == {"queued": f"{slot}-{did8}-3", "slot": slot}, first
        code, answer = await call(node, "POST", "/orders", {**curve, "steps": [[50, 20], [50, 9]]},
                                  token=TOKEN)  # fmt: skip
        assert code == 409 and "already placed" in answer["error"], answer
        code, answer = await call(node, "POST", "/orders", {**curve, "replace": "nope"},
                                  token=TOKEN)  # fmt: skip
        assert code == 409 and "replace names 'nope'" in answer["error"], answer
        # it rests in the book: GET /orders shows it, steps a list
        await wait_for(lambda: first["queued"] in {o.id for o in node.strategy.published.get(
            slot, ())}, 10, "first order accepted")  # fmt: skip
        code, page = await call(node, "GET", f"/orders?slot={slot}&household=me")
        rows = [r for r in page["orders"] if r["order_id"] == first["queued"]]
        assert code == 200 and rows and rows[0]["status"] == "open", page
        assert rows[0]["steps"] == [[300, 25], [200, 20], [100, 12]]
        assert rows[0]["quantity_wh"] == 600 and rows[0]["price"] == 25

        # replace it: a cancel of the old one, then the new one (pool nonces)
        second_curve = {**curve, "steps": [[400, 22], [100, 10]], "replace": first["queued"]}
        code, second = await call(node, "POST", "/orders", second_curve, token=TOKEN)
        assert code == 200 and second["replaced"] == first["queued"], second
        assert second["queued"].startswith(f"{slot}-{did8}-n")
        await wait_for(lambda: {o.id for o in node.strategy.published.get(slot, ())}
                       & {first["queued"], second["queued"]} == {second["queued"]}, 10,
                       "replaced")  # fmt: skip

        # cancel it, then place a plain order (no manual order left: no replace needed)
        code, answer = await call(node, "DELETE", f"/orders?slot={slot}", token=TOKEN)
        assert code == 200 and answer["cancelled"] == second["queued"], answer
        assert (await call(node, "DELETE", f"/orders?slot={slot}"))[0] == 401
        code, answer = await call(node, "DELETE", f"/orders?slot={slot}", token=TOKEN)
        assert code == 404, answer
        code, answer = await call(node, "DELETE", "/orders?id=nope", token=TOKEN)
        assert code == 404, answer
        final = {"side": "buy", "slot": slot, "quantity_wh": 777, "price": 19}
        code, third = await call(node, "POST", "/orders", final, token=TOKEN)
        assert code == 200 and "replaced" not in third, third
        # no nonce was ever signed twice: the ids (and so the nonces) differ
        assert len({first["queued"], second["queued"], third["queued"]}) == 3
        state = json.loads((node.config.data_dir / "manual_orders.json").read_text())
        assert state["current"] == {str(slot): third["queued"]}
        assert set(state["withdrawn"]) == {first["queued"], second["queued"]}

        # the engine sees exactly the final state: one manual order, the plain one
        await status_when(node, lambda d: (d["ledger"]["closed_through"] or -1) >= slot, 30)
        rows = await trio.to_thread.run_sync(mine, node, slot)
        manual = [r for r in rows if r["order_id"].startswith(f"{slot}-{did8}-")]
        assert [(r["order_id"], r["quantity_wh"], r["price"], r["steps"]) for r in manual] == [
            (third["queued"], 777, 19, None)], rows  # fmt: skip
        code, page = await call(node, "GET", f"/orders?slot={slot}&household=me")
        assert [r["order_id"] for r in page["orders"] if r["order_id"] in manual[0]["order_id"]]

        # the stream: verdicts of the three orders in order, the clearing, then the settlement
        await wait_for(lambda: any(s["slot"] == slot for s in follower.named("settlement")),
                       20, "settlement")  # fmt: skip
        events = list(follower.events)
        assert events[0][1] == "hello" and events[0][2]["household"] == grid.identity.did
        ours = [(d["order_id"], d["status"]) for _, n, d in events
                if n == "order" and d.get("slot") == slot and d["manual"]]  # fmt: skip
        assert ours == [(first["queued"], "accepted"), (first["queued"], "withdrawn"),
                        (second["queued"], "accepted"), (second["queued"], "withdrawn"),
                        (third["queued"], "accepted")], ours  # fmt: skip
        names = [n for _, n, d in events if n in ("clearing", "settlement") and d["slot"] == slot]
        assert names == ["clearing", "settlement"]
        clearing = next(d for d in follower.named("clearing") if d["slot"] == slot)
        assert clearing["my_orders"] >= 1 and set(clearing) >= {"price", "volume_wh", "trades"}
        settlement = next(d for d in follower.named("settlement") if d["slot"] == slot)
        assert settlement["height"] >= 1 and settlement["settlement"]["household"] == \
            grid.identity.did  # fmt: skip
        ids = [client_id(i) for i, _, _ in events if i is not None]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        # every slot's clearing comes before its settlement, slots in order
        cleared = [d["slot"] for d in follower.named("clearing")]
        assert cleared == sorted(cleared)

        # resume: Last-Event-ID gets exactly what came after it; an id this process never
        # buffered gets a gap event, then everything buffered
        middle = [e for e in events if e[0] is not None][len(ids) // 2]
        resumed = await trio.to_thread.run_sync(Follower, port, middle[0])
        try:
            after = [e for e in events if e[0] is not None and client_id(e[0]) > client_id(
                middle[0])]  # fmt: skip
            await wait_for(lambda: len([e for e in resumed.events if e[0]]) >= len(after), 10,
                           "replay")  # fmt: skip
            assert [e for e in resumed.events if e[0]][: len(after)] == after
        finally:
            await trio.to_thread.run_sync(resumed.close)
        old = await trio.to_thread.run_sync(Follower, port, "0")
        try:
            await wait_for(lambda: len(old.events) >= 3, 10, "gap")
            assert [n for _, n, _ in old.events[:2]] == ["hello", "gap"]
            assert old.events[1][2]["reason"] == "not_buffered"
        finally:
            await trio.to_thread.run_sync(old.close)
        code, answer = await call(node, "GET", "/events?last_event_id=x.y")
        assert code == 400 and "Last-Event-ID" in answer["error"]

        await slow_client_and_limit(node, port)
        await example_client(node, port)

    async def slow_client_and_limit(node: HouseholdNode, port: int) -> None:
        """A client that never reads is dropped; the node applies on time meanwhile; a fifth
        stream is refused."""
        hang = socket.socket()
        hang.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        hang.connect(("127.0.0.1", port))
        hang.sendall(b"GET /events HTTP/1.1\r\nhost: x\r\nlast-event-id: 0\r\n\r\n")
        try:
            start = node.replica.applied_index
            opened = node.wall_clock()
            # closed streams give their place back once the node sees the hang-up
            await wait_for(lambda: node.api.streams == 2, 5, "closed streams released")
            # the stream limit: the hanging one, the follower, and two more; a fifth is refused
            more = [await trio.to_thread.run_sync(Follower, port) for _ in range(2)]
            try:
                assert node.api.streams == 4
                code, answer = await call(node, "GET", "/events")
                assert code == 503 and "too many event streams" in answer["error"], answer
                assert node.api.rejections["too_many_streams"] == 1
            finally:
                for f in more:
                    await trio.to_thread.run_sync(f.close)
            dropped = ("stream_send_timeout", "stream_dropped_slow")
            await wait_for(lambda: sum(node.api.rejections[r] for r in dropped) >= 1,
                           8 * SLOT_SECONDS, "slow client dropped")  # fmt: skip
            # meanwhile the node went on applying, and cleared each slot on time
            assert node.replica.applied_index > start
            lags = [
                times["cleared_at"] - node.schedule.gate_time(s)
                for s, times in node.slot_times.items()
                if "cleared_at" in times and node.schedule.gate_time(s) >= opened - 1
            ]
            assert lags and max(lags) < 1.5, lags
            # the dropped stream's place is free again: a new one opens
            await wait_for(lambda: node.api.streams <= 2, 5, "places freed")
            again = await trio.to_thread.run_sync(Follower, port)
            await trio.to_thread.run_sync(again.close)
        finally:
            hang.close()

    async def example_client(node: HouseholdNode, port: int) -> None:
        """examples/strategy_client.py follows two clearings, places its curves, exits 0."""
        with trio.fail_after(60):
            done = await trio.run_process(
                [sys.executable, str(EXAMPLE), "--url", f"http://127.0.0.1:{port}",
                 "--token", TOKEN, "--slots", "2", "--max-seconds", "50"],
                capture_stdout=True, capture_stderr=True, check=False)  # fmt: skip
        out = done.stdout.decode()
        assert done.returncode == 0, (out, done.stderr.decode())
        assert "hello: household" in out and out.count("cleared slot") == 2, out
        assert "placed " in out and "done after 2 clearings" in out, out
        placed = [line.split()[1] for line in out.splitlines() if line.startswith("placed ")]
        assert placed and all(p.startswith(f"{int(p.split('-')[0])}-{did8}-") for p in placed)

    with trio.fail_after(150):
        await run_until_stopped(node, body)


def client_id(text: str) -> tuple[int, int]:
    index, _, n = text.partition(".")
    return int(index), int(n)
