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
    """A peer that answers no ping and is not heard from otherwise misses
    ``liveness_failures`` pings in a row and its connection is closed; the peers that answer
    keep theirs."""
    _, a, v, h = three(tmp_path, liveness_interval=0.5, liveness_timeout=0.5)
    async with running([a, v, h]):
        await meshed(a, v, h)
        await until(lambda: a.peer_id in h._ping_streams and v.peer_id in h._ping_streams, 10)

        async def silent(stream: object) -> None:
            await trio.sleep_forever()  # a reads h's pings and never answers

        async def no_ping(peer: object, timeout: float = 0.0) -> bool:
            return True  # a stops pinging h: h hears nothing from it

        a.host.set_stream_handler(PING_PROTOCOL_ID, silent)
        a._sample_rtt = no_ping  # type: ignore[method-assign]
        await h._ping_streams[a.peer_id].reset()  # h's next ping opens a stream to `silent`
        closed = h.metrics.stream_errors.labels("liveness_closed")
        await until(lambda: closed._value.get() >= 1, 15)
        assert v.peer_id in set(h.connected_peers())
        assert h._ping_failures.get(v.peer_id, 0) == 0


async def test_a_slow_peer_that_is_heard_from_keeps_its_connection(tmp_path: Path) -> None:
    """A peer whose answers come too late (a loaded machine) but whose own pings arrive is
    not cut off: its late pings are counted as ``ping_late``, never as misses."""
    _, a, v, h = three(tmp_path, liveness_interval=0.5, liveness_timeout=0.5)
    async with running([a, v, h]):
        await meshed(a, v, h)
        await until(lambda: a.peer_id in h._ping_streams, 10)

        async def late(stream: object) -> None:
            await trio.sleep_forever()  # answers nothing in time; a still pings h itself

        a.host.set_stream_handler(PING_PROTOCOL_ID, late)
        await h._ping_streams[a.peer_id].reset()
        late_pings = h.metrics.stream_errors.labels("ping_late")
        await until(lambda: late_pings._value.get() >= 3, 15)
        assert h._ping_failures.get(a.peer_id, 0) == 0
        assert a.peer_id in set(h.connected_peers())
        assert h.metrics.stream_errors.labels("liveness_closed")._value.get() == 0


async def test_each_liveness_round_releases_the_source_files_read_for_tracebacks(
    tmp_path: Path,
) -> None:
    """A node keeps no source file read for a traceback past its next liveness round
    (node/net/source_lines.py: libp2p formats a traceback for every failed connection)."""
    import linecache
    import traceback

    _, a, v, h = three(tmp_path, liveness_interval=0.5, liveness_timeout=0.5)
    async with running([a, v, h]):
        await meshed(a, v, h)
        try:
            raise RuntimeError("a traceback to format")
        except RuntimeError as exc:
            traceback.format_exception(exc)
        assert __file__ in linecache.cache
        await until(lambda: __file__ not in linecache.cache, 5)
