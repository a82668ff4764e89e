"""Governance on a running grid of real node processes (issue 15).

One demo grid (node/tools/demo.py: the meter simulator over Modbus TCP, a signed genesis, one
``microgrid node run`` process per household, libp2p on 127.0.0.1, SQLite ledgers) of five
households, h1-h3 voters and h4, h5 learners, plus a spare simulated meter no genesis household
reads. The grid operator drives every change as a user would, through the CLI
(``microgrid member ...`` / ``microgrid rules set`` with the demo's operator key file, posted to
some node's API), while the grid keeps settling slots:

- a new household h6 is set up with ``microgrid init --genesis --peer --meter`` (its key, the
  genesis file, one member's address, the spare meter), started before it is admitted, then
  admitted with ``member add``: it catches up and its orders become trades after its
  ``from_slot``; promoted with ``member set-role --role voter``, it votes, and a genesis voter
  killed with SIGKILL does not stop the slots from settling;
- h4 (a PV seller) is removed with ``member remove``: the other nodes drop it, its key cannot
  join the mesh again, no record of it is in any block from its ``from_slot`` on, and its
  account keeps its balance;
- h5 (a buyer: the sellers outnumber the buyers, so a buyer's orders trade) rotates its key (a
  new key from ``microgrid init``, ``member rotate-key --old-key``; its node restarted with the
  new key file in place of the old): it trades under the new DID, and the ledger has the
  ``key_rotation`` transaction moving its balances;
- the retail price changes from a future slot with ``rules set``: the blocks before carry no
  rules hash and settle imbalances at the genesis price, the blocks after carry the new rules'
  hash and settle at the new price;

and at the end ``microgrid ledger verify`` passes on every node's ledger and the members' heads
agree (the removed household's ledger stops where it left, a prefix of the others').
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from sqlalchemy import create_engine, select

from market.accounting import ENERGY, MONEY, household_account, money_for
from node.ledger import schema as t
from node.net.wire import TopicKind
from node.setup.genesis import Genesis, load_genesis
from node.setup.keyfile import load_key_file
from node.tools.demo import Demo, DemoHousehold, fetch
from node.tools.ports import free_ports
from tests.adversary.member import HostileMember
from tests.node.test_demo import SLOT_SECONDS, STARTUP_TIMEOUT, running_demo

pytestmark = pytest.mark.slow

NEW_RETAIL = 40
"""The retail price ``rules set`` changes to (the demo's genesis has 30)."""
CLI_TIMEOUT = 60


# --- helpers ---------------------------------------------------------------------------------


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``microgrid ARGS`` as a user runs it (bounded in time)."""
    with trio.fail_after(CLI_TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "node.cli", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def operator(demo: Demo, node: DemoHousehold, *args: str) -> dict[str, Any]:
    """``microgrid member|rules ACTION ... --operator-key --node`` (the operator's key file, a
    node's API); asserts it committed (exit 0) and returns the node's answer."""
    r = await cli(
        *args,
        "--operator-key",
        str(demo.operator_key_path),
        "--node",
        node.api,
        "--wait",
        "30",
        "--json",
    )
    assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    assert isinstance(doc.get("from_slot"), int), doc
    return doc


def did_of(init_output: bytes) -> str:
    """The did:key ``microgrid init`` printed."""
    for line in init_output.decode().splitlines():
        if line.startswith("did:key:"):
            return line.split()[-1]
    raise AssertionError(f"no did:key in {init_output!r}")


def rows(url: str, table: Any) -> list[Any]:
    """Every row of a ledger table (also while the node writes it: SQLite readers do not block
    its writer; a busy moment is retried)."""
    for attempt in range(10):
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(select(table)))
        except Exception:
            if attempt == 9:
                raise
        finally:
            engine.dispose()
        time.sleep(0.2)
    raise AssertionError("unreachable")


def trades_of(url: str, did: str, since: int) -> list[Any]:
    """Trades of ``did`` (either side) in settled slots from ``since``."""
    settled = {b.slot for b in rows(url, t.blocks)}
    return [
        tr
        for tr in rows(url, t.trades)
        if tr.slot >= since and tr.slot in settled and did in (tr.buyer, tr.seller)
    ]


def height(docs: dict[str, dict[str, Any]], name: str) -> int:
    return int(docs[name]["ledger"]["height"])


async def wait_live(
    demo: Demo, names: list[str], pred: Callable[[dict[str, dict[str, Any]]], bool], timeout: float
) -> dict[str, dict[str, Any]]:
    """Until every named node answers and ``pred`` holds; a node process that exited fails."""

    def ok(docs: dict[str, dict[str, Any]]) -> bool:
        dead = [h.name for h in demo.households if h.name in names and not h.alive]
        assert not dead, f"node processes exited: {dead}"
        return all(n in docs for n in names) and pred(docs)

    return await demo.wait_until(ok, timeout)


async def settle_more(demo: Demo, names: list[str], more: int, timeout: float) -> int:
    """Until the named nodes all settled ``more`` further slots; returns the lowest height."""
    docs = await wait_live(demo, names, lambda d: True, timeout)
    start = max(height(docs, n) for n in names)
    docs = await wait_live(
        demo, names, lambda d: min(height(d, n) for n in names) >= start + more, timeout
    )
    return min(height(docs, n) for n in names)


def caught_up(names: list[str]) -> Callable[[dict[str, dict[str, Any]]], bool]:
    """The named nodes all have the same height and head hash."""

    def pred(docs: dict[str, dict[str, Any]]) -> bool:
        heads = {
            (d["ledger"]["height"], d["ledger"]["head_hash"]) for n, d in docs.items() if n in names
        }
        return len(heads) == 1

    return pred


def all_connected(demo: Demo, names: list[str]) -> Callable[[dict[str, dict[str, Any]]], bool]:
    """Each named node reports a connection to every other named node."""
    dids = {h.name: h.did for h in demo.households if h.name in names}

    def pred(docs: dict[str, dict[str, Any]]) -> bool:
        for name in names:
            up = {p["id"] for p in docs[name]["peers"] if p["up"]}
            if not {d for n, d in dids.items() if n != name} <= up:
                return False
        return True

    return pred


async def verify_with_cli(h: DemoHousehold, out: dict[str, tuple[int, str]]) -> None:
    """``microgrid ledger verify --db`` on a stopped node's ledger: exit 0; its height and
    head go to ``out``."""
    r = await cli("ledger", "verify", "--db", h.ledger_url)
    assert r.returncode == 0, (h.name, r.stdout, r.stderr)
    fields = dict(line.split(" ", 1) for line in r.stdout.decode().splitlines() if " " in line)
    out[h.name] = (int(fields["height"]), fields["head"].strip())


def refused_in_log(h: DemoHousehold, peer_id: str) -> int:
    """How often ``h``'s node logged refusing ``peer_id`` at its gate (a non-member)."""
    text = (h.directory / "node.log").read_text(errors="replace")
    return text.count(f"refusing non_member peer {peer_id}")


def imbalance_payments(url: str) -> list[tuple[int, int, int]]:
    """(slot, energy Wh, money) of every imbalance the grid delivered (the household paid the
    retail price for ``energy``)."""
    txs = {x.id: x for x in rows(url, t.transactions) if x.kind == "imbalance"}
    postings: dict[int, list[Any]] = defaultdict(list)
    for p in rows(url, t.postings):
        if p.transaction_id in txs:
            postings[p.transaction_id].append(p)
    out = []
    for tx_id, ps in postings.items():
        paid = [p for p in ps if p.asset == MONEY and p.account != "grid" and p.amount < 0]
        got = [p for p in ps if p.asset == ENERGY and p.account != "grid" and p.amount > 0]
        if paid and got:
            out.append((txs[tx_id].slot, got[0].amount, -paid[0].amount))
    return out


# --- the scenario ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the grid run left for the checks: its ledgers, the DIDs and the changes' slots."""

    demo: Demo
    genesis: Genesis
    joined: str
    old_did: str
    new_did: str
    removed: str
    add_from: int
    rotate_from: int
    remove_from: int
    rules_from: int
    heads: dict[str, tuple[int, str]]
    """``microgrid ledger verify``'s (height, head) of each household's ledger."""
    members: list[str]

    @property
    def url(self) -> str:
        """A member's ledger (h2: up all along)."""
        return self.demo.households[1].ledger_url


async def run_grid(tmp_path: Path) -> Outcome:
    """Join (and promote, then a genesis voter killed), remove, rotate a key and change the
    retail price on a running grid through the operator CLI; stop it and verify every ledger
    with the CLI. What the grid must do while it runs is asserted here; the ledgers are left
    for the tests below."""
    async with running_demo(tmp_path, 5, voters=3, spare_meters=1) as demo:
        h1, h2, h3, h4, h5 = demo.households
        genesis = load_genesis(demo.genesis_path)
        await wait_live(
            demo,
            [h.name for h in demo.households],
            lambda d: min(height(d, n) for n in d) >= 1,
            STARTUP_TIMEOUT,
        )

        # -- a household joins: key, genesis, one member's address and its meter, by the CLI
        spare = demo.spare[0]
        listen, api = free_ports(2)
        init = await cli(
            "init",
            "--dir",
            str(demo.directory / "h6"),
            "--genesis",
            str(demo.genesis_path),
            "--peer",
            f"/ip4/127.0.0.1/tcp/{h2.listen_port}/p2p/{h2.peer_id}",
            "--meter",
            demo.meter_endpoint,
            "--meter-profile",
            spare.profile,
            "--meter-device-id",
            str(spare.device_id),
            "--listen",
            f"/ip4/127.0.0.1/tcp/{listen}",
            "--api-port",
            str(api),
            "--metrics-port",
            "0",
        )
        assert init.returncode == 0, init.stderr
        assert b"send the grid operator your did:key" in init.stdout
        h6 = demo.adopt(demo.directory / "h6", "h6")
        assert h6.did == did_of(init.stdout) and genesis.member(h6.did) is None
        await demo.start_node(h6)  # before its admission: it follows, refused by the members
        added = await operator(
            demo,
            h2,
            "member",
            "add",
            "--did",
            h6.did,
            "--meter-serial",
            spare.serial,
            "--role",
            "learner",
        )
        add_from = added["from_slot"]

        # -- h5's key is lost: a new one made with the CLI, the old one countersigns
        new_key = await cli("init", "--dir", str(tmp_path / "h5-new"))
        assert new_key.returncode == 0, new_key.stderr
        old_did, new_did = h5.did, did_of(new_key.stdout)
        rotated = await operator(
            demo,
            h3,
            "member",
            "rotate-key",
            "--did",
            old_did,
            "--new-did",
            new_did,
            "--old-key",
            str(h5.directory / "node.key"),
        )
        rotate_from = rotated["from_slot"]
        # the household puts its new key file in place of the old and restarts its node (same
        # config and data directory): the node follows as the pending DID, trades from then
        await demo.terminate(h5)
        shutil.copyfile(tmp_path / "h5-new" / "node.key", h5.directory / "node.key")
        os.chmod(h5.directory / "node.key", 0o600)
        demo.reload_identity(h5)
        assert h5.did == new_did
        await demo.start_node(h5)

        # -- h4 leaves the grid; the retail price changes two slots after everything else
        removed = await operator(demo, h1, "member", "remove", "--did", h4.did)
        remove_from = removed["from_slot"]
        rules_from = max(add_from, rotate_from, remove_from) + 2
        changed = await operator(
            demo,
            h1,
            "rules",
            "set",
            "--retail-price",
            str(NEW_RETAIL),
            "--from-slot",
            str(rules_from),
        )
        assert changed["from_slot"] == rules_from
        listed = await cli("member", "list", "--node", h2.api, "--json")
        assert listed.returncode == 0, listed.stderr
        standing = {m["did"]: m for m in json.loads(listed.stdout)["members"]}
        assert {h6.did, new_did, old_did, h4.did} <= set(standing), standing

        # -- the newcomer catches up and trades after its from_slot; so does h5's new DID
        members = ["h1", "h2", "h3", "h5", "h6"]
        with trio.fail_after(14 * SLOT_SECONDS):
            while not (
                trades_of(h2.ledger_url, h6.did, add_from)
                and trades_of(h2.ledger_url, new_did, rotate_from)
            ):
                assert h6.alive and h5.alive, "a node exited"
                await trio.sleep(1)
        await wait_live(demo, members, caught_up(members), 6 * SLOT_SECONDS)
        docs = await demo.statuses()
        assert docs["h6"]["membership"] == "learner", docs["h6"].get("membership")

        # -- h4, removed: the others dropped it, and its key cannot join the mesh again
        def dropped(d: dict[str, dict[str, Any]]) -> bool:
            return all(p["id"] != h4.did or not p["up"] for n in members for p in d[n]["peers"])

        await wait_live(demo, members, dropped, 4 * SLOT_SECONDS)
        h4_docs = await fetch(h4.api + "/status")
        assert h4_docs is not None and h4_docs["membership"] == "removed", h4_docs
        await demo.terminate(h4)
        gates = (h1, h2, h3)
        refusals = {h.name: refused_in_log(h, h4.peer_id) for h in gates}
        async with trio.open_nursery() as nursery:
            intruder = HostileMember(
                load_key_file(h4.directory / "node.key"),
                genesis,
                [f"/ip4/127.0.0.1/tcp/{h.listen_port}/p2p/{h.peer_id}" for h in gates],
            )
            await intruder.start(nursery)
            # it dials and publishes orders for two slots: each connection is refused at the
            # gate (and its gossip blacklisted), whatever the transport let through meanwhile
            with trio.move_on_after(2 * SLOT_SECONDS):
                while True:
                    open_slot = demo.schedule.open_slot(time.time())
                    order = intruder.order(
                        slot=open_slot, side="buy", price=genesis.market.retail_price
                    )
                    with contextlib.suppress(Exception):  # no peer to send it to: the point
                        await intruder.publish(TopicKind.ORDERS, order)
                    await trio.sleep(1)
            intruder.stop()
            nursery.cancel_scope.cancel()
        more = {h.name: refused_in_log(h, h4.peer_id) - refusals[h.name] for h in gates}
        assert any(more.values()), f"no gate refused the removed household's key: {more}"

        # -- the newcomer votes; a genesis voter dies; slots still settle
        await operator(demo, h2, "member", "set-role", "--did", h6.did, "--role", "voter")
        await wait_live(
            demo,
            members,
            lambda d: (
                d["h6"]["raft"]["role"] in ("follower", "leader")
                and h6.did in d["h2"]["raft"]["voters"]
            ),
            8 * SLOT_SECONDS,
        )
        # a voter may lead: it takes part in the records' gossip (a learner only publishes)
        await wait_live(demo, members, lambda d: d["h6"]["connectivity"]["record_gossip"],
                        2 * SLOT_SECONDS)  # fmt: skip
        # The next leader may be any voter, and it must reach every member. h6 and h5's new
        # key were admitted at runtime: no static dial list names them (both dial only the
        # genesis bootstrap, h6 also its --peer), so the others, and they each other, reach
        # them at addresses learned from the members (docs/network.md, "Member addresses").
        # Killing h1 before that would test the network's warm-up, not the claim.
        await wait_live(demo, members, all_connected(demo, members), 6 * SLOT_SECONDS)
        demo.kill(h1)
        survivors = ["h2", "h3", "h5", "h6"]
        settled = await settle_more(demo, survivors, 2, 20 * SLOT_SECONDS)
        assert settled > 0
        await demo.start_node(h1)  # and it catches up from the others
        await wait_live(
            demo,
            members,
            lambda d: (
                caught_up(members)(d)
                and height(d, "h1") > settled
                and all(d[n]["ledger"]["settled_through"] >= rules_from + 1 for n in members)
            ),
            STARTUP_TIMEOUT,
        )

    # -- every ledger verifies with the CLI; the members' heads agree -------------------------
    heads: dict[str, tuple[int, str]] = {}
    async with trio.open_nursery() as nursery:
        for h in demo.households:
            nursery.start_soon(verify_with_cli, h, heads)
    return Outcome(
        demo,
        genesis,
        h6.did,
        old_did,
        new_did,
        h4.did,
        add_from,
        rotate_from,
        remove_from,
        rules_from,
        heads,
        members,
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """One grid run for the module's checks (about two minutes)."""
    return trio.run(run_grid, tmp_path_factory.mktemp("governance-grid"))


def test_every_ledger_verifies_and_the_members_heads_agree(grid: Outcome) -> None:
    """``microgrid ledger verify`` passed on all six ledgers (in the run); the members' heads
    are equal and the removed household's ledger is a prefix of theirs."""
    assert len({grid.heads[n] for n in grid.members}) == 1, grid.heads
    by_height = {b.height: b.hash for b in rows(grid.url, t.blocks)}
    h4_height, h4_head = grid.heads["h4"]
    assert by_height[h4_height] == h4_head, "the removed household's ledger is not a prefix"


def test_a_joined_household_trades_only_from_its_slot(grid: Outcome) -> None:
    """Nothing of the newcomer before its ``from_slot``; its readings and trades after."""
    orders, readings = rows(grid.url, t.orders), rows(grid.url, t.readings)
    assert all(o.slot >= grid.add_from for o in orders if o.household == grid.joined)
    assert all(r.slot >= grid.add_from for r in readings if r.household == grid.joined)
    assert {r.slot for r in readings if r.household == grid.joined} >= {grid.add_from}
    assert trades_of(grid.url, grid.joined, grid.add_from)


def test_a_removed_household_is_silent_and_keeps_its_balance(grid: Outcome) -> None:
    """No order or reading of the removed household from its ``from_slot``; no posting on its
    account after; its balance stays in the ledger."""
    url, did = grid.url, grid.removed
    assert not [o for o in rows(url, t.orders) if o.household == did and o.slot >= grid.remove_from]
    assert not [
        r for r in rows(url, t.readings) if r.household == did and r.slot >= grid.remove_from
    ]
    account = household_account(did)
    balance = {b.asset: b.amount for b in rows(url, t.balances) if b.account == account}
    assert balance.get(MONEY) and balance.get(ENERGY), balance
    late = {x.id for x in rows(url, t.transactions) if x.slot >= grid.remove_from}
    assert not [
        p for p in rows(url, t.postings) if p.account == account and p.transaction_id in late
    ]
    gov = {(g.type, g.household, g.from_slot) for g in rows(url, t.governance)}
    assert ("remove_member", did, grid.remove_from) in gov


def test_a_removed_household_reading_of_the_slot_before_its_removal_is_settled(
    grid: Outcome,
) -> None:
    """docs/governance.md: "its reading of ``from_slot - 1`` is the last one settled"."""
    readings = rows(grid.url, t.readings)
    slots = [r.slot for r in readings if r.household == grid.removed]
    assert max(slots) == grid.remove_from - 1, (slots, grid.remove_from)


def test_a_rotated_key_trades_under_its_new_did(grid: Outcome) -> None:
    """The key_rotation transaction at the rotation's slot moved the old account's balances;
    the old DID is silent after it, the new one trades."""
    url = grid.url
    rotation = [x for x in rows(url, t.transactions) if x.kind == "key_rotation"]
    assert [(x.slot, x.ref) for x in rotation] == [
        (grid.rotate_from, f"{grid.old_did}>{grid.new_did}")
    ]
    assert not [
        o for o in rows(url, t.orders) if o.household == grid.old_did and o.slot >= grid.rotate_from
    ]
    old_account = household_account(grid.old_did)
    assert not [b for b in rows(url, t.balances) if b.account == old_account and b.amount]
    assert trades_of(url, grid.new_did, grid.rotate_from)
    gov = {(g.type, g.household, g.from_slot) for g in rows(url, t.governance)}
    assert ("rotate_key", grid.old_did, grid.rotate_from) in gov


def test_a_rules_change_settles_the_blocks_from_its_slot_at_the_new_price(grid: Outcome) -> None:
    """Blocks before the change carry no rules hash and settle imbalances at the genesis retail
    price; from its slot they carry the new rules' hash and settle at the new price."""
    new_rules = grid.genesis.market.with_changes({"retail_price": NEW_RETAIL}).rules_hash()
    blocks = {b.slot: b for b in rows(grid.url, t.blocks)}
    assert any(s < grid.rules_from for s in blocks) and any(s >= grid.rules_from for s in blocks)
    for slot, block in blocks.items():
        assert block.rules == (None if slot < grid.rules_from else new_rules), (slot, block.rules)
    payments = imbalance_payments(grid.url)
    before = [(s, e, m) for s, e, m in payments if s < grid.rules_from]
    after = [(s, e, m) for s, e, m in payments if s >= grid.rules_from]
    assert before and after, payments
    retail = grid.genesis.market.retail_price
    assert all(m == money_for(e, retail) for _, e, m in before), before
    assert all(m == money_for(e, NEW_RETAIL) for _, e, m in after), after
