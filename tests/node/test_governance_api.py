"""Governance through a running node: ``POST /governance``, ``GET /members``, ``GET /rules`` and
the ``microgrid member``/``rules`` commands, against a one-voter grid (real meter simulator,
libp2p host, SQLite, HTTP API on 127.0.0.1, 4-second slots)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from market.models import AddMember, MemberRole, encode_command
from market.signing import Signer
from meter.sim.server import MeterSimulator
from node.cli import main
from node.daemon.household_node import HouseholdNode
from node.setup.keyfile import create_key_file
from tests.node.test_household import (  # noqa: F401  (sim is a fixture)
    call,
    make_grid,
    run_until_stopped,
    sim,
    status_when,
)

pytestmark = pytest.mark.slow

OPERATOR_SEED = b"operator".ljust(32, b".")


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


async def cli(*argv: str) -> tuple[int, str, str]:
    """Run one ``microgrid`` command in a worker thread (it talks HTTP to the node)."""
    return await trio.to_thread.run_sync(lambda: _cli(*argv))


async def test_governance_records_through_the_api_and_the_cli(
    tmp_path: Path,
    sim: MeterSimulator,  # noqa: F811
) -> None:
    operator = Signer.from_seed(OPERATOR_SEED)
    grid = await make_grid(tmp_path, sim, operator=operator)
    key_file = tmp_path / "operator.key"
    create_key_file(key_file, seed=OPERATOR_SEED)
    node = HouseholdNode(grid.config, grid.identity, grid.genesis)
    newcomer = Signer.from_seed(b"newcomer".ljust(32, b"."))

    async def body(node: HouseholdNode) -> None:
        url = f"http://127.0.0.1:{node.api_port}"
        doc = await status_when(
            node,
            lambda d: d["raft"]["role"] == "leader" and d["ledger"]["closed_through"] is not None,
            30,
        )
        code, info = await call(node, "GET", "/governance")
        assert code == 200 and info["operator"] == operator.did and info["grid"] == "test-house"
        assert info["nonce"] % 4 != 2  # never a feeder reading's nonce

        def add(from_slot: int, nonce: int, by: Signer = operator) -> bytes:
            record = AddMember(
                grid="test-house", nonce=nonce, operator=operator.did, from_slot=from_slot,
                household=newcomer.did, meter_serial="NEW-METER", role=MemberRole.LEARNER,
            )  # fmt: skip
            return encode_command(record.signed_by(by))

        # not the operator's signature: 403 with the reason, nothing gossiped
        code, answer = await call(node, "POST", "/governance", add(doc["open_slot"] + 3, 1,
                                                                    by=newcomer))  # fmt: skip
        assert code == 403 and answer["reason"] == "bad_signature", answer
        # not a governance record, or not a record at all: 400
        code, answer = await call(node, "POST", "/governance", b'{"type": "close_gate", "slot": 1}')
        assert code == 400 and "not a governance record" in answer["error"], answer
        code, answer = await call(node, "POST", "/governance", b"{]")
        assert code == 400, answer
        # a slot whose gate has closed: the dry run refuses at once with the engine's reason
        code, answer = await call(node, "POST", "/governance", add(0, info["nonce"]))
        assert code == 409 and answer["reason"] == "effective_slot_closed", answer
        assert answer["stage"] == "dry_run"

        # a valid AddMember commits: 200 with the applied index
        code, info = await call(node, "GET", "/governance")
        from_slot = info["open_slot"] + 3
        record = add(from_slot, info["nonce"])
        code, answer = await call(node, "POST", "/governance?wait=20", record)
        assert code == 200, answer
        assert answer["committed"] and answer["type"] == "add_member"
        assert answer["household"] == newcomer.did and answer["from_slot"] == from_slot
        assert isinstance(answer["applied_index"], int) and answer["withdrawn_orders"] == 0
        # admitted for a later slot: the network accepts its connections from now on
        with trio.fail_after(5):
            while not node.net.is_member(newcomer.did):
                await trio.sleep(0.05)
        # the same record again: already committed
        code, again = await call(node, "POST", "/governance", record)
        assert code == 200 and again["committed"], again

        def standing(doc: dict[str, Any]) -> str | None:
            return next((m["status"] for m in doc["members"] if m["did"] == newcomer.did), None)

        code, members = await call(node, "GET", "/members")
        assert code == 200 and standing(members) == "pending", members
        me = next(m for m in members["members"] if m["did"] == grid.identity.did)
        assert me["status"] == "active" and me["role"] == "voter"
        with trio.fail_after(30):
            while True:
                code, members = await call(node, "GET", "/members")
                if members["slot"] >= from_slot:
                    break
                await trio.sleep(0.2)
        assert standing(members) == "active" and members["members"]

        # the CLI: member list, rules set, rules show
        code, out, err = await cli("member", "list", "--node", url)
        assert code == 0 and newcomer.did in out and "NEW-METER" in out, (out, err)
        code, out, err = await cli("rules", "set", "--operator-key", str(key_file), "--node", url,
                                   "--retail-price", "40", "--feed-in-tariff", "9",
                                   "--grid-fee", "6", "--local-fee", "2",
                                   "--wait", "20")  # fmt: skip
        assert code == 0 and out.startswith("committed: change_rules"), (out, err)
        code, out, err = await cli("rules", "show", "--node", url, "--json")
        assert code == 0, err
        rules = json.loads(out)
        assert [h["rules"]["retail_price"] for h in rules["history"]] == [30, 40]
        assert rules["history"][1]["rules"]["feed_in_tariff"] == 9
        assert (rules["history"][1]["rules"]["grid_fee"], rules["history"][1]["rules"]
                ["local_fee"]) == (6, 2)  # fmt: skip
        assert "grid_fee" not in rules["history"][0]["rules"]  # none in the genesis
        code, out, err = await cli("rules", "show", "--node", url)
        assert code == 0 and "history:" in out and "retail 40" in out, out
        assert "grid fee 6/kWh imported, 2/kWh bought locally" in out, out
        # a refusal exits non-zero with the typed reason
        code, out, err = await cli("member", "suspend", "--operator-key", str(key_file),
                                   "--node", url, "--did", grid.identity.did)  # fmt: skip
        assert code == 1 and "no_voters_left" in err, (out, err)
        code, out, err = await cli("member", "remove", "--operator-key", str(key_file),
                                   "--node", url, "--did", grid.identity.did,
                                   "--from-slot", "1")  # fmt: skip
        assert code == 1 and "effective_slot_closed" in err, (out, err)

    with trio.fail_after(120):
        await run_until_stopped(node, body)


async def test_a_household_outside_the_genesis_starts_and_awaits_admission(
    tmp_path: Path,
    sim: MeterSimulator,  # noqa: F811
) -> None:
    """A node whose key is not in the genesis starts (a household admitted at runtime), says
    so in its status, and signs no reading or order."""
    grid = await make_grid(tmp_path, sim)
    outsider = create_key_file(tmp_path / "outsider.key")
    config = replace(grid.config, key_path=tmp_path / "outsider.key", data_dir=tmp_path / "out")
    node = HouseholdNode(config, outsider, grid.genesis)

    async def body(node: HouseholdNode) -> None:
        doc = await status_when(node, lambda d: True, 10)
        assert doc["membership"] == "not admitted" and doc["node"] == outsider.did
        await trio.sleep(2 * grid.genesis.schedule.slot_seconds)
        assert node.counters["published_order"] == 0
        assert node.counters["published_reading"] == 0
        code, answer = await call(node, "POST", "/orders",
                                  {"side": "buy", "quantity_wh": 100, "price": 20},
                                  token="test-token-0123")  # fmt: skip
        assert code == 409 and "not_active" in answer["error"], answer

    with trio.fail_after(60):
        await run_until_stopped(node, body)
