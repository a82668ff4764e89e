"""Raft frames deflated on ``/microgrid/raft/2``, over real libp2p hosts on 127.0.0.1: long
messages go packed between current nodes, plain to a node of an older release, and a hostile
packed frame is contained to its stream and counted against its sender."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from node.net.raft_transport import RAFT_PROTOCOL_PACKED
from node.net.wire import MAX_RAFT_FRAME, frame
from node.raft import Message, MessageType
from node.setup.genesis import load_genesis
from node.testing.harness import make_grid
from tests.net.test_hostile import Grid, faults_of, meshed, running, send_raw, until
from tests.net.test_raft_transport_unit import append

pytestmark = pytest.mark.slow


async def test_entries_go_packed_to_a_current_node_and_plain_to_an_older_one(
    tmp_path: Path,
) -> None:
    specs, _, path = make_grid(tmp_path, 3)
    grid = Grid(specs, load_genesis(path))
    sender, current, older = (
        grid.node(i, s, [p for p in specs if p is not s], raft_packed=i != 2)
        for i, s in enumerate(specs)
    )
    async with running(grid.nodes):
        await meshed(sender, current, older)
        assert sender.raft is not None and older.raft is not None
        to_current = append(sender.identity.did, current.identity.did, 60)
        assert sender.raft.send(to_current)
        await until(lambda: to_current in grid.raft.get(1, []), 10)
        packed_sent, packed_plain = sender.raft.bytes_sent, sender.raft.bytes_unpacked
        assert packed_sent < 0.6 * packed_plain, (packed_sent, packed_plain)
        to_older = append(sender.identity.did, older.identity.did, 60)
        assert sender.raft.send(to_older)
        await until(lambda: to_older in grid.raft.get(2, []), 10)
        # the older node's frames went as they were: bytes on the wire == bytes unpacked
        assert (sender.raft.bytes_sent - packed_sent
                == sender.raft.bytes_unpacked - packed_plain)  # fmt: skip
        # and it can still send to a current node (which serves both protocols)
        back = append(older.identity.did, sender.identity.did, 60)
        assert older.raft.send(back)
        await until(lambda: back in grid.raft.get(0, []), 10)
        assert older.raft.bytes_sent == older.raft.bytes_unpacked


async def test_a_deflate_bomb_is_refused_counted_and_raft_keeps_flowing(tmp_path: Path) -> None:
    specs, _, path = make_grid(tmp_path, 3)
    grid = Grid(specs, load_genesis(path))
    a, v, h = (grid.node(i, s, [p for p in specs if p is not s]) for i, s in enumerate(specs))
    async with running(grid.nodes):
        await meshed(a, v, h)
        bomb = b"\x01" + zlib.compress(b"\0" * (MAX_RAFT_FRAME + (1 << 20)), 9)
        await send_raw(a, v, RAFT_PROTOCOL_PACKED, frame(bomb))
        await until(lambda: faults_of(v, a, "raft").get("oversized") == 1, 10)
        await send_raw(a, v, RAFT_PROTOCOL_PACKED, frame(b"\x01" + b"\xff" * 64))
        await until(lambda: faults_of(v, a, "raft").get("malformed") == 1, 10)
        assert h.raft is not None
        h.raft.send(Message(type=MessageType.HEARTBEAT, to=v.identity.did,
                            frm=h.identity.did, term=4))  # fmt: skip
        await until(lambda: any(m.term == 4 for m in grid.raft.get(1, [])), 10)
