"""The node's /status document, served by the node API and read by the dashboard's client."""

from __future__ import annotations

import dataclasses

import trio

from dashboard.node_client import fetch_status
from market import MeterReading, apply
from market.schedule import Schedule
from market.state import sell_limit_wh
from node.cli.run import metering_line
from node.daemon.consensus import ConsensusDriver
from node.daemon.http_api import Api, Request
from node.daemon.proposer import Proposer
from node.daemon.replica import Replica
from node.daemon.status import metering_section, status_document
from node.raft import Config, MemoryStorage, RaftNode
from node.tools import market_sim


class _Nowhere:
    """A one-voter group sends no messages; anything sent would be a bug."""

    def send(self, message: object) -> None:
        raise AssertionError(f"single-voter group sent {message}")


async def test_dashboard_reads_what_the_node_serves(tmp_path) -> None:
    sim = market_sim.build(households=3, seed=9)
    me = sim.households[0].signer.did
    replica = Replica(sim.config, genesis=market_sim.registrations(sim))
    schedule = Schedule(slot_seconds=60, gate_lead_seconds=10, settle_delay_seconds=5)
    wall = [10_000.0]  # a wall clock the test advances
    raft = RaftNode(Config(id=me, voters=(me,), seed=1), MemoryStorage())
    driver = ConsensusDriver(
        raft, raft.storage, replica, Proposer(schedule), _Nowhere(), tick_seconds=0.01,
        wall_clock=lambda: wall[0], follow_membership=False,
    )  # fmt: skip
    peers = {sim.households[1].signer.did: True, sim.households[2].signer.did: False}
    api = Api(token="t")

    @api.route("GET", "/status")
    def status(_: Request) -> dict:
        return status_document(
            driver, peers_up=peers, invalid_messages={"bad_signature": 2}, meter_read_failures=1
        )

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            while replica.state.height < 1:  # it elects itself, closes a gate, settles
                await trio.sleep(0.05)
                wall[0] += 5
            port = await nursery.start(api.serve, "127.0.0.1", 0)
            seen = await trio.to_thread.run_sync(fetch_status, f"http://127.0.0.1:{port}")
            nursery.cancel_scope.cancel()

    assert seen.reachable and seen.node == me
    assert (seen.role, seen.leader) == ("leader", me)
    assert seen.leader_changes == 1
    assert (seen.members_up, seen.members_down, seen.peers) == (2, 1, 2)
    # The wall clock stood still after the loop, so nothing settled after the fetch.
    assert seen.ledger_height == replica.state.height >= 1
    assert seen.head_hash == replica.state.head_hash
    assert seen.apply_lag is not None and seen.apply_lag >= 0
    assert seen.invalid_messages == {"bad_signature": 2} and seen.meter_read_failures == 1


def silent_state(silent: int) -> tuple[market_sim.MarketSimulation, Replica, str]:
    """A grid whose first household sent no reading for ``silent`` settled slots at the end."""
    sim = market_sim.build(households=3, seed=4)
    quiet = sim.households[0].signer.did
    replica = Replica(sim.config, genesis=market_sim.registrations(sim))
    commands = list(market_sim.commands(sim, 9, first_slot=40))  # slots 40..48
    for command in commands[len(sim.households) :]:  # the replica has the registrations
        if (
            isinstance(command, MeterReading)
            and command.household == quiet
            and command.slot > 48 - silent
        ):
            continue
        replica.state, _ = apply(replica.state, command)
    return sim, replica, quiet


def test_status_shows_the_households_meter_silence() -> None:
    """``metering`` says how many settled slots the household's meter has been silent and
    whether its orders are refused for it; ``microgrid status`` prints it in one line."""
    for silent in (0, 3, 4, 6):
        sim, replica, quiet = silent_state(silent)
        count = replica.state.reputation[quiet].silent_slots
        assert count == silent
        raft = RaftNode(Config(id=quiet, voters=(quiet,), seed=1), MemoryStorage())
        driver = ConsensusDriver(raft, raft.storage, replica, Proposer(Schedule()), _Nowhere())
        offer = sell_limit_wh(replica.state, quiet)
        doc = status_document(driver, silent_slots=count, sell_limit_wh=offer)
        limit = sim.config.max_silent_slots
        assert doc["metering"] == {
            "silent_slots": silent,
            "max_silent_slots": limit,
            "rules": 2,
            "orders_refused": silent >= limit,
            "sell_limit_wh": offer,
        }
        line = metering_line(doc["metering"])
        assert line is not None and line.startswith(f"{silent} settled slots without a reading")
        assert ("REFUSED" in line) == (silent >= limit)
        assert line.endswith(f"may offer {offer} Wh per slot")
    assert metering_line(status_document(driver)["metering"]) is None  # not known: no line
    assert metering_line(None) is None  # an older node's document


def test_a_rules_1_grid_never_refuses_orders_for_silence() -> None:
    old = dataclasses.replace(market_sim.build(households=2, seed=1).config, rules=1)
    assert metering_section(old, 50)["orders_refused"] is False
    assert "rules 1" in (metering_line(metering_section(old, 50)) or "")
