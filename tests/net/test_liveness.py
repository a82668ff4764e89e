"""Liveness pings over one long-lived stream per peer (node/net/host.py, issue 19)."""

from __future__ import annotations

from pathlib import Path

import trio
from libp2p.host.ping import ID as PING_PROTOCOL_ID

from tests.net.test_hostile import meshed, running, three, until


async def test_pings_reuse_one_stream_and_survive_its_loss(tmp_path: Path) -> None:
    """Every ping to a peer goes over the same stream (no new stream, no multistream
    negotiation per ping); when that stream dies (the peer ended it, as libp2p's own handler
    does after 10 s idle) the next ping opens a new one and succeeds: no miss is counted."""
    _, a, v, h = three(tmp_path)
    async with running([a, v, h]):
        await meshed(a, v, h)
        assert await a._sample_rtt(v.peer_id)
        stream = a._ping_streams[v.peer_id]
        for _ in range(5):
            assert await a._sample_rtt(v.peer_id)
        assert a._ping_streams[v.peer_id] is stream
        assert v._ping_served.get(a.peer_id) == 1
        await stream.reset()
        await until(lambda: v._ping_served.get(a.peer_id) is None, 5)
        assert await a._sample_rtt(v.peer_id)
        assert a._ping_streams[v.peer_id] is not stream
        assert v._ping_served.get(a.peer_id) == 1


async def test_liveness_closes_a_silent_peer_and_keeps_live_ones(tmp_path: Path) -> None:
    """A peer whose pings go unanswered misses ``liveness_failures`` pings in a row and its
    connection is closed; the peers that answer keep theirs."""
    _, a, v, h = three(tmp_path, liveness_interval=0.5, liveness_timeout=0.5)
    async with running([a, v, h]):
        await meshed(a, v, h)
        await until(lambda: a.peer_id in h._ping_streams and v.peer_id in h._ping_streams, 10)

        async def silent(stream: object) -> None:
            await trio.sleep_forever()  # a reads h's pings and never answers

        a.host.set_stream_handler(PING_PROTOCOL_ID, silent)
        await h._ping_streams[a.peer_id].reset()  # h's next ping opens a stream to `silent`
        closed = h.metrics.stream_errors.labels("liveness_closed")
        await until(lambda: closed._value.get() >= 1, 15)
        assert v.peer_id in set(h.connected_peers())
        assert h._ping_failures.get(v.peer_id, 0) == 0
