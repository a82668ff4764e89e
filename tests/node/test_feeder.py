"""The feeder meter on the node side: the ``[feeder]`` config, the operator-key checks at start,
and end to end a demo grid with ``--feeder`` whose every ledger records feeder checks that add
up (household processes, real libp2p on 127.0.0.1, real Modbus TCP to the simulator)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from market.models import MemberRole
from market.signing import Signer
from market.state import MarketConfig
from node.daemon.household_node import HouseholdNode, NodeError
from node.ledger import schema as t
from node.setup.config import ConfigError, load_config
from node.setup.genesis import Genesis, create_genesis
from node.setup.keyfile import NodeIdentity, create_key_file
from node.tools.demo import Demo
from tests.node.test_demo import (
    SLOT_SECONDS,
    STARTUP_TIMEOUT,
    check_all_ledgers,
    check_energy_against_meters,
    rows,
    running_demo,
)

BASE = '''
data_dir = "data"
metrics_port = 0
api_port = 0

[[meters]]
name = "main"
profile = "sdm630"
endpoint = "tcp://127.0.0.1:5020"
device_id = 1
'''
FEEDER = '''
[feeder]
name = "feeder"
profile = "sdm630"
endpoint = "tcp://127.0.0.1:5020"
device_id = 100
operator_key_path = "keys/operator.key"
'''


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "microgrid.toml"
    path.write_text(text)
    return path


# -- configuration ----------------------------------------------------------------------------


def test_feeder_table_is_optional_and_resolved_against_the_file(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE), environ={}).feeder is None
    config = load_config(write(tmp_path, BASE + FEEDER), environ={})
    assert config.feeder is not None
    m = config.feeder.meter
    assert (m.name, m.profile, m.device_id) == ("feeder", "sdm630", 100)
    assert (m.endpoint.host, m.endpoint.port) == ("127.0.0.1", 5020)  # type: ignore[union-attr]
    assert config.feeder.operator_key_path == tmp_path.resolve() / "keys" / "operator.key"
    absolute = FEEDER.replace('"keys/operator.key"', '"/etc/microgrid/operator.key"')
    config = load_config(write(tmp_path, BASE + absolute), environ={})
    assert config.feeder is not None
    assert config.feeder.operator_key_path == Path("/etc/microgrid/operator.key")
    # no environment override reaches into [feeder]
    assert load_config(write(tmp_path, BASE), environ={"MICROGRID_FEEDER": "x"}).feeder is None


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: f.replace('operator_key_path = "keys/operator.key"\n', ""), "operator_key_path"),
    (lambda f: f.replace('"keys/operator.key"', '""'), "operator_key_path"),
    (lambda f: f.replace('"keys/operator.key"', "7"), "operator_key_path"),
    (lambda f: f.replace("device_id = 100", "device_id = 300"), "device_id"),
    (lambda f: f.replace("device_id = 100", 'device_id = "100"'), "device_id"),
    (lambda f: f.replace('"tcp://127.0.0.1:5020"', '"udp://x"'), "feeder: 'udp://x' is not"),
    (lambda f: f.replace('profile = "sdm630"\n', ""), "profile"),
    (lambda f: f.replace('name = "feeder"', 'name = "main"'), "unique"),
    (lambda f: f + "voltage = 1\n", "unknown settings"),
    (lambda f: None, "must be a table"),  # a scalar where the table belongs
])  # fmt: skip
def test_bad_feeder_settings_are_config_errors(tmp_path: Path, change: Any, message: str
                                              ) -> None:  # fmt: skip
    changed = change(FEEDER)
    text = "feeder = 3\n" + BASE if changed is None else BASE + changed
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(write(tmp_path, text), environ={})
    assert str(tmp_path / "microgrid.toml") in str(exc.value)


# -- start-up checks ----------------------------------------------------------------------------


def _grid(tmp_path: Path, operator: Signer, member: NodeIdentity, feeder_serial: str) -> Genesis:
    rules: dict[str, Any] = {"feeder_serial": feeder_serial} if feeder_serial else {}
    market = MarketConfig(grid="feeder-test", operator=operator.did, feed_in_tariff=8,
                          retail_price=30, **rules)  # fmt: skip
    return create_genesis(operator, market, [(member.did, "meter-1", MemberRole.VOTER)],
                          slot_seconds=60)  # fmt: skip


@pytest.mark.parametrize("case", ["wrong_key", "missing", "too_open", "no_feeder_serial"])
def test_node_refuses_to_start_without_the_genesis_operator_key(tmp_path: Path, case: str
                                                               ) -> None:  # fmt: skip
    operator = Signer.from_seed(b"o" * 32)
    member = NodeIdentity.from_seed(b"m" * 32)
    genesis = _grid(tmp_path, operator, member, "" if case == "no_feeder_serial" else "F-1")
    keys = tmp_path / "keys"
    keys.mkdir()
    if case == "wrong_key":
        create_key_file(keys / "operator.key", b"w" * 32)
    elif case != "missing":
        create_key_file(keys / "operator.key", b"o" * 32)
    if case == "too_open":
        os.chmod(keys / "operator.key", 0o644)
    config = load_config(write(tmp_path, BASE + FEEDER), environ={})
    expected = {"wrong_key": "is not the genesis operator|but the genesis operator",
                "missing": "does not exist", "too_open": "too open",
                "no_feeder_serial": "no feeder meter"}[case]  # fmt: skip
    with pytest.raises(NodeError, match=expected) as exc:
        HouseholdNode(config, member, genesis)
    assert "[feeder]" in str(exc.value)
    assert not (tmp_path / "data").exists()  # refused before any store was opened


def test_proposer_forgets_a_committed_feeder_reading() -> None:
    """Queued like a household's reading, and never re-proposed once it reached the log."""
    from market.models import FeederReading
    from market.schedule import Schedule
    from node.daemon.proposer import EngineView, Proposer

    operator = Signer.from_seed(b"o" * 32)
    reading = FeederReading(grid="g", nonce=4 * 7 + 2, operator=operator.did, meter_serial="F",
                            slot=7, import_wh=5, export_wh=1).signed_by(operator)  # fmt: skip
    proposer = Proposer(Schedule(60, 10, 20), retry_after=1.0)
    assert proposer.offer(reading) and not proposer.offer(reading)
    view = EngineView(closed_through=None, settled_through=None)
    assert reading in proposer.next_batch(0.0, view)
    proposer.committed(reading)
    assert reading not in proposer.next_batch(5.0, view)  # past retry_after: still gone


# -- end to end ---------------------------------------------------------------------------------


def _feeder_truth(demo: Demo) -> dict[int, tuple[float, float]]:
    out = {}
    for line in demo.feeder_truth_path.read_text().splitlines():
        r = json.loads(line)
        out[r["slot"]] = (r["import_wh"], r["export_wh"])
    return out


@pytest.mark.slow
async def test_demo_with_a_feeder_settles_slots_whose_feeder_checks_add_up(tmp_path: Path
                                                                           ) -> None:  # fmt: skip
    """Four households, h1 also the operator's node: after the first slots (each meter's
    baseline) every settled slot's feeder check is ``ok`` on every ledger, with the difference
    the simulator's 2 % line losses; all ledgers verify with equal heads."""
    async with running_demo(tmp_path, households=4, feeder=True) as demo:
        assert demo.sim is not None and demo.sim.feeder is not None
        await demo.wait_rounds(6, timeout=STARTUP_TIMEOUT + 10 * SLOT_SECONDS)
        docs = await demo.statuses()
        feeder = docs["h1"]["feeder"]
        assert feeder["ok"] and feeder["error"] is None, feeder
        assert feeder["last_reading"]["meter_serial"] == str(demo.sim.feeder_state().serial)
        assert docs["h2"]["feeder"] is None  # only the operator's node reads the feeder
        invalid = {name: d["invalid_messages"] for name, d in docs.items()}
        assert not any(invalid.values()), invalid
    check_all_ledgers(demo)
    ref = demo.households[0].ledger_url
    check_energy_against_meters(demo, ref)
    truth = _feeder_truth(demo)
    heights = {r.slot: r.height for r in rows(ref, t.blocks)}
    reference = sorted(tuple(r) for r in rows(ref, t.feeder_checks))
    assert len(reference) == len(heights)  # one row per block
    for h in demo.households[1:]:
        assert sorted(tuple(r) for r in rows(h.ledger_url, t.feeder_checks)) == reference
    checks = {r.slot: r for r in rows(ref, t.feeder_checks)}
    ok = [s for s, r in sorted(checks.items()) if r.status == "ok"]
    assert len(ok) >= 3, {s: r.status for s, r in checks.items()}
    # once it adds up it keeps adding up; nothing ever mismatches
    assert [s for s in sorted(checks) if s >= ok[0]] == ok, {s: r.status for s, r in checks.items()}
    assert all(r.status != "mismatch" for r in checks.values())
    for slot in ok:
        r = checks[slot]
        # the reading the check used is the feeder meter's counters at the slot's end
        imp, exp = truth[slot]
        assert abs(r.import_wh - imp) <= 1 and abs(r.export_wh - exp) <= 1, (r, imp, exp)
        assert r.meter_serial == str(demo.sim.feeder_state().serial)
        assert r.nonce == slot * 4 + 2
        # the simulator's losses (2 % of the energy moved) inside the allowed band (5 % + 100)
        assert r.feeder_net_wh - r.households_net_wh == r.difference_wh
        assert 0 <= r.difference_wh <= r.allowed_loss_wh, r
        settlements = [s for s in rows(ref, t.settlements) if s.slot == slot]
        moved = sum(s.import_wh + s.export_wh for s in settlements)
        assert len(settlements) == 4 and all(s.measured for s in settlements)
        assert abs(r.difference_wh - 0.02 * moved) <= 2 + 8, (r, moved)  # 8 rounded counters
