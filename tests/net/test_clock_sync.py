"""The time protocol ``/microgrid/time/1`` between member nodes over real libp2p on 127.0.0.1:
an honest exchange measures a peer's clock offset, and a member's hostile bytes (garbled,
oversized, a flood) are refused, counted and penalised on that stream only."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID

from node.daemon.clock import ClockWatch
from node.net.clock_sync import (
    REQUEST,
    TIME_PROTOCOL,
    TimeQueryError,
    TimeSampler,
    TimeServer,
    TimeWireError,
    connected_member_peers,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    query_time,
)
from node.net.host import NetNode, NetSettings
from node.net.wire import frame
from node.setup.genesis import load_genesis
from node.setup.keyfile import NodeIdentity
from node.testing.harness import make_grid
from tests.net.test_hostile import faults_of, running, send_raw, until

pytestmark = pytest.mark.slow

SKEW = 42.0


def test_frames_round_trip_and_odd_ones_are_refused() -> None:
    """Fixed sizes, version 1, the nonce echoed; anything else is a typed error."""
    nonce = b"12345678"
    assert decode_request(encode_request(nonce)) == nonce
    t1, t2 = decode_response(encode_response(nonce, 1_700_000_000.25, 1_700_000_000.5), nonce)
    assert (t1, t2) == pytest.approx((1_700_000_000.25, 1_700_000_000.5), abs=1e-6)
    for bad in (b"", b"\x01", encode_request(nonce) + b"x", REQUEST.pack(2, nonce)):
        with pytest.raises(TimeWireError) as err:
            decode_request(bad)
        assert err.value.reason == "malformed"
    with pytest.raises(TimeWireError) as wrong:
        decode_response(encode_response(b"87654321", 1.0, 2.0), nonce)
    assert wrong.value.reason == "wrong_nonce"
    with pytest.raises(TimeWireError):
        decode_response(encode_response(nonce, 1.0, 2.0)[:-1], nonce)
    with pytest.raises(ValueError):
        encode_response(nonce, 1e12, 1e12)  # beyond 64-bit nanoseconds


def _nodes(tmp_path: Path, server: TimeServer) -> tuple[list[NetNode], NetNode, NetNode, NetNode]:
    """attacker, victim (serving ``server``), honest: members, all dialling each other."""
    specs, _, path = make_grid(tmp_path, 3)
    genesis = load_genesis(path)
    nodes = [
        NetNode(NodeIdentity.from_seed(s.seed), genesis,
                NetSettings(listen=s.listen, peers=[p.addr for p in specs if p is not s]),
                slot_policy=lambda r: None,
                stream_handlers=[(TIME_PROTOCOL, server.handle)] if i == 1 else [])
        for i, s in enumerate(specs)
    ]  # fmt: skip
    return nodes, nodes[0], nodes[1], nodes[2]


async def test_an_honest_exchange_measures_the_peers_clock(tmp_path: Path) -> None:
    """The victim's clock runs 42 s ahead: the honest node measures an offset of -42 s (ours
    minus the peer's) within the sample's error bound, through the sampler and the watch; a
    node without the protocol gives a typed error."""
    server = TimeServer(lambda: time.time() + SKEW, lambda did: True)
    nodes, a, v, h = _nodes(tmp_path, server)
    watch = ClockWatch(max_skew=1.0)
    async with running(nodes, timeout=40):
        await until(lambda: len(h.connected_peers()) == 2, 20)
        t0, t1, t2, t3 = await query_time(h.host, v.peer_id, time.time)
        assert t0 <= t3 and t1 <= t2
        offset, error = ((t0 - t1) + (t3 - t2)) / 2, ((t3 - t0) - (t2 - t1)) / 2
        assert abs(offset + SKEW) <= error + 0.01, (offset, error)
        with pytest.raises(TimeQueryError) as none:
            await query_time(h.host, a.peer_id, time.time, timeout=5)
        assert none.value.reason == "no_stream"
        sampler = TimeSampler(lambda: h.host, lambda: connected_member_peers(h), time.time,
                              watch.sample, interval=0.5, min_interval=0.2,
                              check_every=0.1)  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(sampler.run)
            await until(lambda: sampler.samples >= 3, 15)
            nursery.cancel_scope.cancel()
    est = watch.assess(trio.current_time(), time.time())
    (peer,) = est.peers  # only the victim answers
    assert peer.peer == v.identity.did and peer.samples >= 3
    assert abs(peer.offset + SKEW) <= peer.error + 0.01
    assert server.served >= 4 and not server.refused.get("rate_limited")


async def test_hostile_time_requests_are_contained_counted_and_banned(tmp_path: Path) -> None:
    """Garbled, wrong-version and oversized requests and a bad varint each reset only their
    stream and are counted against the attacker; a flood beyond the per-peer budget is refused
    and ends in a ban; the honest node is answered throughout."""
    server = TimeServer(time.time, lambda did: True, rate=0.2, burst=3)
    nodes, a, v, h = _nodes(tmp_path, server)
    async with running(nodes, timeout=50):
        await until(lambda: len(v.connected_peers()) == 2, 20)
        cases = {
            "malformed": frame(b"\x01abc"),  # too short
            "oversized": frame(b"\x01" * 65),  # beyond MAX_FRAME
        }
        for i, (reason, data) in enumerate(cases.items()):
            await send_raw(a, v, TIME_PROTOCOL, data)
            await until(lambda i=i: sum(faults_of(v, a, "time").values()) > i, 10)
            assert faults_of(v, a, "time").get(reason), (reason, v.faults)
        # the honest node is still answered (its own budget)
        t0, t1, t2, t3 = await query_time(h.host, v.peer_id, time.time)
        assert abs(((t0 - t1) + (t3 - t2)) / 2) < 1
        # a flood: the attacker's budget is spent, then refused (rate_limited) until banned
        with trio.fail_after(25):
            while not v.penalties.is_banned(str(a.peer_id)):
                await send_raw(a, v, TIME_PROTOCOL, frame(REQUEST.pack(2, b"x" * 8)))
                await trio.sleep(0.02)
        faults = faults_of(v, a, "time")
        assert faults.get("rate_limited", 0) >= 1, faults
        assert server.refused.get("rate_limited", 0) >= 1
        # the honest node still gets its answers, and was never blamed
        await query_time(h.host, v.peer_id, time.time)
        assert not faults_of(v, h, "time")
        assert not v.penalties.is_banned(str(h.peer_id))


async def test_non_members_and_silent_askers_get_no_answer(tmp_path: Path) -> None:
    """A peer the server does not allow gets its stream closed unanswered (typed error at the
    asker); the answer carries the request's nonce."""
    server = TimeServer(time.time, lambda did: False)
    nodes, _a, v, h = _nodes(tmp_path, server)
    async with running(nodes, timeout=30):
        await until(lambda: len(h.connected_peers()) == 2, 20)
        with pytest.raises(TimeQueryError) as refused:
            await query_time(h.host, ID.from_base58(str(v.peer_id)), time.time, timeout=5)
        assert refused.value.reason in ("closed", "malformed")
        assert server.refused == {"not_member": 1}


async def test_the_sampling_interval_stretches_with_many_members() -> None:
    """With 40 connected members and 8 per interval, each is asked about every 5 intervals (the
    cap), so the node makes about 8 requests per interval; with 4 members every interval."""
    for members, expected in ((40, 5.0), (4, 1.0), (12, 1.5)):
        peers = [(ID(bytes([0, 1, i])), f"did:test:{i}") for i in range(members)]
        asked: list[str] = []
        sampler = TimeSampler(lambda: object(), lambda peers=peers: peers, time.time,
                              lambda *a: None, interval=10.0, jitter=0.0,
                              check_every=0.5)  # fmt: skip

        async def record(did: str, peer: ID, asked: list[str] = asked) -> bool:
            asked.append(did)
            return True

        sampler.sample = record  # type: ignore[method-assign]
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(sampler.run)
            await trio.sleep(1.0)  # everyone asked once on connecting, none again yet
            nursery.cancel_scope.cancel()
        assert len(asked) == members
        gaps = [due - start for due in sampler.due.values()]
        assert all(abs(g - 10.0 * expected) <= 0.5 for g in gaps), (members, gaps)
