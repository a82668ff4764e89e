"""The test-only libp2p fault injector (node/net/faults.py): the rules model, the faults file a
running node follows, and real NetNodes on 127.0.0.1 in process obeying it.

- a partition (each side's file names the other) closes the connection, keeps it closed and
  stops gossip and Raft both ways; healing (empty rules) reconnects and gossip flows again both
  ways (the peer was never blacklisted in pubsub);
- a 100 % one-way loss A->B (B drops what arrives from A: the nemesis' way; then A drops what
  it sends to B) stops A's gossip, Raft frames and block requests at B, while B's gossip and
  Raft frames still reach A;
- a running node survives its faults file being half-written, malformed or deleted: the last
  good rules stay in force;
- the model validates peers, percentages and sizes;
- the live clock offset (``clock_offset_seconds``): validated like the rest, and a running
  node's wall clock follows it at once (and back to right when the key goes), with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pytest
import trio

from node.net.block_sync import FetchError, fetch_blocks
from node.net.faults import (
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    NO_FAULTS,
    FaultRules,
    FaultRulesError,
    FaultsFile,
    LiveClockOffset,
    faults_file_from_env,
    peer_key,
    write_rules,
)
from node.net.host import NetNode, NetSettings
from node.net.wire import TopicKind
from node.raft import Message, MessageType
from node.setup.config import MAX_CLOCK_OFFSET, load_config
from node.setup.genesis import load_genesis
from node.setup.keyfile import NodeIdentity
from node.testing.harness import make_grid
from tests.net.test_membership_gate import Grid, connected, in_mesh, order, running, until

A_DID = NodeIdentity.from_seed(b"a" * 32).did
A_ID = str(NodeIdentity.from_seed(b"a" * 32).peer_id)
B_DID = NodeIdentity.from_seed(b"b" * 32).did


# -- the model ----------------------------------------------------------------------------------


def test_rules_name_peers_by_did_or_peer_id_and_drop_by_percentage() -> None:
    rules = FaultRules.make([A_DID], {B_DID: 100}, {A_ID: 0})
    assert rules.partitioned_peers == frozenset({A_ID})  # a DID becomes its peer id
    assert rules.partitioned(A_ID) and not rules.partitioned(peer_key(B_DID))
    rng = random.Random(1)
    b = peer_key(B_DID)
    assert rules.drop_inbound(b, rng) and rules.drop_inbound(A_ID, rng)  # partitioned: both
    assert rules.drop_outbound(A_ID, rng) and not rules.drop_outbound(b, rng)
    assert rules.outbound == {}  # a 0 % loss is no rule
    half = FaultRules.make(drop_inbound={b: 50})
    dropped = sum(half.drop_inbound(b, rng) for _ in range(2000))
    assert 850 < dropped < 1150
    assert not NO_FAULTS.drop_inbound(b, rng) and NO_FAULTS.empty
    again = FaultRules.from_json(rules.to_json())
    assert again == rules and not again.empty


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ("[]", "not a JSON object"),
        ("{", "not JSON"),
        ('{"partition": []}', "unknown keys"),
        ('{"partitioned": "x"}', "not a list"),
        ('{"drop_inbound": []}', "not an object"),
        ('{"partitioned": ["did:key:zNotAKey"]}', "bad DID"),
        ('{"partitioned": ["12D3Koo0WHello"]}', "not a base58 peer id"),
        ('{"partitioned": ["' + "1" * 40 + '"]}', "not a peer id multihash"),
        ('{"partitioned": [7]}', "must be a string"),
        (json.dumps({"drop_inbound": {A_ID: 101}}), "integer percentage"),
        (json.dumps({"drop_inbound": {A_ID: -1}}), "integer percentage"),
        (json.dumps({"drop_outbound": {A_ID: 50.5}}), "integer percentage"),
        (json.dumps({"drop_outbound": {A_ID: True}}), "integer percentage"),
        (json.dumps({"drop_outbound": {A_ID: "50"}}), "integer percentage"),
        ('{"clock_offset_seconds": "60"}', "clock_offset_seconds"),
        ('{"clock_offset_seconds": true}', "clock_offset_seconds"),
        ('{"clock_offset_seconds": null}', "clock_offset_seconds"),
        ('{"clock_offset_seconds": NaN}', "clock_offset_seconds"),
        ('{"clock_offset_seconds": -Infinity}', "clock_offset_seconds"),
        ('{"clock_offset_seconds": 1e300}', "clock_offset_seconds"),
        (json.dumps({"clock_offset_seconds": MAX_CLOCK_OFFSET + 1}), "clock_offset_seconds"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(doc: str, error: str) -> None:
    with pytest.raises(FaultRulesError, match=error):
        FaultRules.from_json(doc, "f.json")


def test_a_clock_offset_is_a_rule_of_its_own() -> None:
    """``clock_offset_seconds``: any finite number of seconds within the config's bound, either
    way; written only when set (files without it read and write as before)."""
    rules = FaultRules.from_json(json.dumps({"clock_offset_seconds": 150}))
    assert rules.clock_offset == 150.0 and not rules.empty
    assert rules.partitioned_peers == frozenset() and not rules.inbound and not rules.outbound
    assert FaultRules.from_json(rules.to_json()) == rules
    assert json.loads(rules.to_json())["clock_offset_seconds"] == 150.0
    edge = FaultRules.make(clock_offset_seconds=-MAX_CLOCK_OFFSET)
    assert edge.clock_offset == -MAX_CLOCK_OFFSET
    both = FaultRules.make([A_DID], clock_offset_seconds=-0.25)
    assert FaultRules.from_json(both.to_json()) == both and both.partitioned(A_ID)
    assert "clock_offset_seconds" not in FaultRules.make([A_DID]).to_json()
    assert FaultRules.from_json('{"clock_offset_seconds": 0}') == NO_FAULTS


def test_the_live_clock_offset_moves_a_clock_at_once(caplog: pytest.LogCaptureFixture) -> None:
    live = LiveClockOffset()
    clock = live.shift(lambda: 1000.0)
    assert clock() == 1000.0
    with caplog.at_level(logging.WARNING, "microgrid.net.faults"):
        assert live.follow(150)
        assert clock() == 1150.0  # the same function: it reads the holder on every call
        assert not live.follow(150.0)  # unchanged: no warning
        assert live.follow(-90.5) and clock() == 909.5
        for bad in (float("nan"), float("inf"), MAX_CLOCK_OFFSET + 1, True):
            with pytest.raises(FaultRulesError, match="clock_offset_seconds"):
                live.follow(bad)  # type: ignore[arg-type]
        assert clock() == 909.5
        assert live.follow(0) and clock() == 1000.0 and live.changes == 3
    jumps = [r.getMessage() for r in caplog.records if "wall clock jumps" in r.getMessage()]
    assert len(jumps) == 3 and "+150 s" in jumps[0] and "-240.5 s" in jumps[1], jumps


async def test_a_running_node_follows_the_clock_offset_in_its_faults_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The faults loop sets the node's live offset within a poll of the file changing; the key
    removed, the clock is right again (the network rules beside it are kept as usual)."""
    specs, _, path = make_grid(tmp_path, 1)
    grid = Grid(load_genesis(path))
    faults = tmp_path / "faults.json"
    write_rules(faults, NO_FAULTS)
    node = grid.node(specs[0], [], faults_file=faults)
    clock = node.clock_offset.shift(lambda: 1000.0)  # what a household node builds its clock as
    with caplog.at_level(logging.WARNING, "microgrid.net.faults"):
        async with running(grid.nodes, timeout=30):
            await trio.sleep(0.3)
            assert clock() == 1000.0
            write_rules(faults, FaultRules.make(clock_offset_seconds=150))
            await until(lambda: clock() == 1150.0, 5)
            write_rules(faults, FaultRules.make([B_DID], clock_offset_seconds=-60))
            await until(lambda: clock() == 940.0, 5)
            assert node.fault_rules.partitioned(peer_key(B_DID))
            write_rules(faults, FaultRules.make([B_DID]))  # the key removed: right again
            await until(lambda: clock() == 1000.0, 5)
            assert node.fault_rules.partitioned(peer_key(B_DID))
    assert node.clock_offset.changes == 3
    assert sum("wall clock jumps" in r.getMessage() for r in caplog.records) == 3


def test_rules_are_bounded() -> None:
    ids = [
        str(NodeIdentity.from_seed(i.to_bytes(32, "big")).peer_id) for i in range(MAX_ENTRIES + 1)
    ]
    assert len(FaultRules.make(ids[:MAX_ENTRIES]).partitioned_peers) == MAX_ENTRIES
    with pytest.raises(FaultRulesError, match="entries"):
        FaultRules.make(ids)
    with pytest.raises(FaultRulesError, match="bytes"):
        FaultRules.from_json(" " * (MAX_FILE_BYTES + 1))


def test_the_switch_is_an_environment_variable(tmp_path: Path) -> None:
    assert faults_file_from_env({}) is None
    assert faults_file_from_env({"MICROGRID_FAULTS_FILE": " "}) is None
    path = tmp_path / "f.json"
    assert faults_file_from_env({"MICROGRID_FAULTS_FILE": str(path)}) == path


def test_a_node_process_takes_the_file_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``microgrid node run`` builds its network settings with ``NetSettings.from_config``: the
    variable reaches them (and only the variable: no config key)."""
    specs, _, path = make_grid(tmp_path, 1)
    genesis, identity = load_genesis(path), NodeIdentity.from_seed(specs[0].seed)
    config = load_config(None, environ={})
    monkeypatch.delenv("MICROGRID_FAULTS_FILE", raising=False)
    assert NetSettings.from_config(config, identity, genesis).faults_file is None
    monkeypatch.setenv("MICROGRID_FAULTS_FILE", str(tmp_path / "f.json"))
    assert NetSettings.from_config(config, identity, genesis).faults_file == tmp_path / "f.json"


def test_a_faults_file_keeps_its_last_good_rules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Absent, half-written, malformed, oversized, a FIFO: the last good rules stay, each problem is
    logged once; a good file is read again as soon as it changes."""
    path = tmp_path / "faults.json"
    faults = FaultsFile(path)
    with caplog.at_level(logging.WARNING, "microgrid.net.faults"):
        assert faults.poll() is None and faults.poll() is None  # absent: logged once
        assert len(caplog.records) == 1 and "cannot read" in caplog.records[0].getMessage()
        good = FaultRules.make([A_DID])
        write_rules(path, good)
        assert faults.poll() == good and faults.rules == good
        assert faults.poll() is None  # unchanged: not read again
        text = good.to_json()
        path.write_text(text[: len(text) // 2])  # half-written
        assert faults.poll() is None and faults.rules == good
        path.write_text(json.dumps({"partitioned": ["nonsense"]}))
        assert faults.poll() is None and faults.rules == good
        path.write_text(" " * (MAX_FILE_BYTES + 10))
        assert faults.poll() is None and faults.rules == good
        path.unlink()
        assert faults.poll() is None and faults.rules == good
        assert faults.poll() is None  # still absent: not logged again
        os.mkfifo(path)  # would block a reader: refused without opening it
        assert faults.poll() is None and faults.rules == good
        path.unlink()
        assert faults.errors == 6  # absent at first, then five more problems, each logged once
        assert len([r for r in caplog.records if "keeping the last good" in r.getMessage()]) == 6
        write_rules(path, NO_FAULTS)
        assert faults.poll() == NO_FAULTS and faults.loads == 2 and faults.last_error is None


# -- real nodes ---------------------------------------------------------------------------------


def _raft_terms(grid: Grid, node: NetNode) -> list[int]:
    return [m.term for m in grid.raft.get(grid.nodes.index(node), [])]


def _heartbeat(src: NetNode, dst: NetNode, term: int) -> None:
    assert src.raft is not None
    src.raft.send(Message(type=MessageType.HEARTBEAT, to=dst.identity.did,
                          frm=src.identity.did, term=term))  # fmt: skip


async def _applied(node: NetNode, rules: FaultRules) -> None:
    """Wait until ``node`` follows ``rules`` (its loop polls every 0.2 s)."""
    await until(lambda: node.fault_rules == (NO_FAULTS if rules.empty else rules), 5)


@pytest.mark.slow
async def test_a_partition_stops_gossip_both_ways_and_healing_restores_it(
    tmp_path: Path,
) -> None:
    specs, _, path = make_grid(tmp_path, 2)
    grid = Grid(load_genesis(path))
    sa, sb = specs
    fa, fb = tmp_path / "a.json", tmp_path / "b.json"
    write_rules(fa, NO_FAULTS)
    a = grid.node(sa, [sb], faults_file=fa, reconnect_max=1.0)
    b = grid.node(sb, [sa], faults_file=fb, reconnect_max=1.0)  # b's file absent at first
    async with running(grid.nodes, timeout=80):
        await until(lambda: in_mesh(a, b) and in_mesh(b, a), 20)
        await a.publish(TopicKind.ORDERS, [order(a.identity, grid.genesis, 1)])
        await until(lambda: 1 in grid.got(b, a), 10)

        cut_a, cut_b = FaultRules.make([sb.did]), FaultRules.make([sa.peer_id])
        write_rules(fa, cut_a)
        write_rules(fb, cut_b)
        await _applied(a, cut_a)
        await _applied(b, cut_b)
        await until(lambda: not connected(a, b) and not connected(b, a), 10)
        # nothing passes either way, and neither dials the other
        await a.publish(TopicKind.ORDERS, [order(a.identity, grid.genesis, 2)])
        await b.publish(TopicKind.ORDERS, [order(b.identity, grid.genesis, 1)])
        _heartbeat(a, b, 5)
        _heartbeat(b, a, 6)
        for _ in range(8):
            assert not connected(a, b) and not connected(b, a)
            await trio.sleep(0.25)
        assert 2 not in grid.got(b, a) and 1 not in grid.got(a, b)
        assert 5 not in _raft_terms(grid, b) and 6 not in _raft_terms(grid, a)
        assert not b.pubsub.is_peer_blacklisted(a.peer_id)
        assert a.fault_drops["connection"] + b.fault_drops["connection"] >= 1

        # heal: they reconnect, the mesh forms again and gossip and Raft flow both ways
        write_rules(fa, NO_FAULTS)
        write_rules(fb, NO_FAULTS)
        await until(lambda: connected(a, b), 15)
        await until(lambda: in_mesh(a, b) and in_mesh(b, a), 20)
        await a.publish(TopicKind.ORDERS, [order(a.identity, grid.genesis, 3)])
        await b.publish(TopicKind.ORDERS, [order(b.identity, grid.genesis, 2)])
        await until(lambda: 3 in grid.got(b, a) and 2 in grid.got(a, b), 10)
        _heartbeat(a, b, 7)
        _heartbeat(b, a, 8)
        await until(lambda: 7 in _raft_terms(grid, b) and 8 in _raft_terms(grid, a), 10)
        assert not a.penalties.score(str(b.peer_id)) and not b.penalties.score(str(a.peer_id))


@pytest.mark.slow
async def test_a_one_way_loss_drops_one_direction_only(tmp_path: Path) -> None:
    """A->B at 100 %: first as B dropping what arrives from A (what the nemesis writes), then as
    A dropping what it sends to B. B's gossip and Raft frames reach A all along; a broken faults
    file leaves the loss in force."""
    specs, _, path = make_grid(tmp_path, 2)
    grid = Grid(load_genesis(path))
    sa, sb = specs
    fa, fb = tmp_path / "a.json", tmp_path / "b.json"
    write_rules(fa, NO_FAULTS)
    write_rules(fb, NO_FAULTS)
    a = grid.node(sa, [sb], faults_file=fa)
    b = grid.node(sb, [], faults_file=fb)
    async with running(grid.nodes, timeout=80):
        await until(lambda: in_mesh(a, b) and in_mesh(b, a), 20)
        nonce = {"a": 0, "b": 0}
        term = [10]

        async def check_one_way(dropped_by: NetNode) -> None:
            nonce["a"] += 1
            nonce["b"] += 1
            term[0] += 2
            na, nb, t = nonce["a"], nonce["b"], term[0]
            await a.publish(TopicKind.ORDERS, [order(a.identity, grid.genesis, na)])
            await b.publish(TopicKind.ORDERS, [order(b.identity, grid.genesis, nb)])
            _heartbeat(a, b, t)
            _heartbeat(b, a, t + 1)
            await until(lambda: nb in grid.got(a, b) and t + 1 in _raft_terms(grid, a), 10)
            await trio.sleep(1.0)
            assert na not in grid.got(b, a) and t not in _raft_terms(grid, b)
            assert connected(a, b)  # message loss: the connection stays
            drops = dropped_by.fault_drops
            assert drops["gossip_in"] + drops["gossip_out"] >= 1
            assert drops["raft_in"] + drops["raft_out"] >= 1

        lose_in = FaultRules.make(drop_inbound={sa.did: 100})
        write_rules(fb, lose_in)
        await _applied(b, lose_in)
        await check_one_way(b)
        with pytest.raises(FetchError):  # A's block request is lost too
            await fetch_blocks(a.host, b.peer_id, 1, 1, timeout=3)
        assert b.fault_drops["stream_in"] == 1
        assert await fetch_blocks(b.host, a.peer_id, 1, 1) == b"chunk"  # B's reaches A

        # the file half-written, then malformed: B keeps dropping
        text = lose_in.to_json()
        fb.write_text(text[:10])
        await trio.sleep(0.6)
        fb.write_text('{"drop_inbound": {"x": 1}}')
        await trio.sleep(0.6)
        assert b.fault_rules == lose_in
        await check_one_way(b)

        lose_out = FaultRules.make(drop_outbound={sb.peer_id: 100})
        write_rules(fb, NO_FAULTS)
        write_rules(fa, lose_out)
        await _applied(b, NO_FAULTS)
        await _applied(a, lose_out)
        await check_one_way(a)

        # healed: A's gossip and Raft reach B again
        write_rules(fa, NO_FAULTS)
        await _applied(a, NO_FAULTS)
        last = nonce["a"] + 1
        await a.publish(TopicKind.ORDERS, [order(a.identity, grid.genesis, last)])
        _heartbeat(a, b, 99)
        await until(lambda: last in grid.got(b, a) and 99 in _raft_terms(grid, b), 10)
        assert not b.penalties.score(str(a.peer_id)) and not a.penalties.score(str(b.peer_id))
