"""The block-sync stream protocol between two member nodes over real libp2p on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID

from node.ledger.chunk import BlockSyncError
from node.net.block_sync import (
    BLOCKS_PROTOCOL,
    BlockServer,
    FetchError,
    decode_request,
    encode_request,
    fetch_blocks,
)
from node.net.host import NetNode, NetSettings
from node.setup.genesis import Genesis, load_genesis
from node.setup.keyfile import NodeIdentity
from node.testing.harness import NodeSpec, make_grid

pytestmark = pytest.mark.slow


def pair(specs: list[NodeSpec], genesis: Genesis, handler: Any) -> list[NetNode]:
    """Two nodes: the first dials the second, which serves the block protocol with ``handler``."""
    a, b = specs
    return [
        NetNode(NodeIdentity.from_seed(s.seed), genesis,
                NetSettings(listen=s.listen, peers=[other.addr] if i == 0 else []),
                stream_handlers=[(BLOCKS_PROTOCOL, handler)] if i == 1 else [])
        for i, (s, other) in enumerate(((a, b), (b, a)))
    ]  # fmt: skip


def test_requests_round_trip_and_odd_ones_are_refused() -> None:
    """A request is exactly {first, last} with 1 <= first <= last, integers."""
    assert decode_request(encode_request(5, 9)) == (5, 9)
    for bad in (b'{"first":5}', b'{"first":5,"last":4}', b'{"first":0,"last":1}',
                b'{"first":1.0,"last":2}', b'{"first":true,"last":2}', b"[1,2]",
                b'{"first":1,"last":2,"x":0}'):  # fmt: skip
        with pytest.raises(ValueError):
            decode_request(bad)


async def test_a_member_fetches_blocks_and_gets_typed_refusals(tmp_path: Path) -> None:
    """The server hands out what its exporter returns, answers an exporter's refusal with its
    reason, and the requester sees a typed FetchError, not a libp2p exception."""
    specs, _, path = make_grid(tmp_path, 2)
    genesis = load_genesis(path)
    asked: list[tuple[int, int]] = []

    def export(first: int, last: int) -> bytes:
        asked.append((first, last))
        if first > 100:
            raise BlockSyncError("not_available", f"block {first} is not in this ledger")
        return b"chunk %d..%d" % (first, last)

    server = BlockServer(export, genesis.is_member)
    a, b = specs
    nodes = pair(specs, genesis, server.handle)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            while not nodes[0].connected_peers():
                await trio.sleep(0.05)
            host, peer = nodes[0].host, ID.from_base58(b.peer_id)
            assert await fetch_blocks(host, peer, 3, 9) == b"chunk 3..9"
            with pytest.raises(FetchError) as refused:
                await fetch_blocks(host, peer, 101, 120)
            assert refused.value.reason == "not_available"
            assert "block 101 is not in this ledger" in refused.value.detail
            # a node without the protocol: no stream, typed
            with pytest.raises(FetchError) as none:
                await fetch_blocks(nodes[1].host, ID.from_base58(a.peer_id), 1, 2, timeout=5)
            assert none.value.reason == "no_stream"
            for node in nodes:
                node.stop()
    assert asked == [(3, 9), (101, 120)]
    assert server.served == 1 and server.refused == {"not_available": 1}


async def test_a_peer_resetting_the_stream_gives_a_typed_error(tmp_path: Path) -> None:
    """A peer that resets each block stream (or whose connection closes meanwhile): the
    requester sees a FetchError, never a libp2p exception (the block filler catches only
    FetchError; anything else would stop the node). At once, the reset races the protocol
    negotiation (``no_stream``) and the request (``closed``); a moment later it comes while the
    requester sends or waits for the answer (``closed``, ``malformed``)."""
    specs, _, path = make_grid(tmp_path, 2)
    genesis = load_genesis(path)
    delay = 0.0

    async def reset(stream: object) -> None:
        await trio.sleep(delay)
        await stream.reset()  # type: ignore[attr-defined]

    b = specs[1]
    nodes = pair(specs, genesis, reset)
    reasons: dict[float, list[str]] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            while not nodes[0].connected_peers():
                await trio.sleep(0.05)
            host, peer = nodes[0].host, ID.from_base58(b.peer_id)
            for delay in (0.0, 0.2):
                for _ in range(5):
                    with pytest.raises(FetchError) as exc:
                        await fetch_blocks(host, peer, 1, 2, timeout=5)
                    reasons.setdefault(delay, []).append(exc.value.reason)
            for node in nodes:
                node.stop()
    assert set(reasons[0.0]) <= {"no_stream", "closed", "malformed"}, reasons
    assert set(reasons[0.2]) <= {"closed", "malformed"}, reasons
