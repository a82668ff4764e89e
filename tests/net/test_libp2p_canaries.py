"""Canaries: each asserts a py-libp2p 0.8.1 defect we work around in node/net/host.py.

When one of these fails, py-libp2p changed: check whether the workaround named in the
assertion message can go (and update docs/network.md).
"""

from __future__ import annotations

import inspect
import time

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.metrics import metrics as libp2p_metrics
from libp2p.peer.id import ID
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub

from node.net import host as net_host


def _gossipsub(**kw: object) -> GossipSub:
    return GossipSub(protocols=[PROTOCOL_ID_V11], degree=3, degree_low=2, degree_high=4, **kw)  # type: ignore[arg-type]


def test_seqno_counter_starts_at_unix_seconds() -> None:
    """Pitfall 6: seqnos start at int(time.time()) (we start at time_ns and hash content)."""
    ps = Pubsub(new_host(key_pair=create_new_key_pair(b"c" * 32)), _gossipsub())
    assert abs(ps.counter - time.time()) < 60, (
        "py-libp2p no longer seeds seqnos from Unix seconds: the time_ns() seed in "
        "NetNode._build may be unnecessary"
    )


def test_equivocation_check_drops_reused_seqno_with_new_content() -> None:
    """Why the seqno seed matters: gossipsub refuses to forward a reused (from, seqno)."""
    gs = _gossipsub()
    frm = ID.from_pubkey(create_new_key_pair(b"d" * 32).public_key).to_bytes()
    seq = int(time.time()).to_bytes(8, "big")
    first = rpc_pb2.Message(from_id=frm, seqno=seq, data=b"before restart", topicIDs=["t"])
    again = rpc_pb2.Message(from_id=frm, seqno=seq, data=b"after restart", topicIDs=["t"])
    assert gs._check_equivocation(first)
    assert not gs._check_equivocation(again), "equivocation check changed: see NetNode._build"


def test_spam_protection_drops_forwarded_messages_above_10_per_second() -> None:
    """Pitfall 2: default spam protection, 10 msg/s per (peer, topic), silent."""
    gs = _gossipsub()
    assert gs.spam_protection_enabled and gs.max_messages_per_topic_per_second == 10.0
    peer = ID.from_pubkey(create_new_key_pair(b"e" * 32).public_key)
    msg = rpc_pb2.Message(data=b"x", topicIDs=["t"])
    results = [gs._check_spam_protection(peer, msg) for _ in range(11)]
    assert results == [True] * 10 + [False], (
        "gossipsub spam protection changed: revisit spam_protection_enabled=False"
    )


def test_subscription_channel_holds_32_and_drops() -> None:
    """Pitfall 2: the subscription channel (32) drops silently; NetNode widens it."""
    assert net_host.LIBP2P_SUBSCRIPTION_CHANNEL_SIZE == 32, "SUBSCRIPTION_CHANNEL_SIZE changed"
    assert "except trio.WouldBlock" in inspect.getsource(Pubsub.notify_subscriptions)
    assert pubsub_module.SUBSCRIPTION_CHANNEL_SIZE in (32, net_host.SUBSCRIPTION_QUEUE)


def test_failed_dial_blocks_peer_for_60_seconds() -> None:
    """Pitfall 3: a private negative cache blocks redials for 60 s (we unblock_peer first)."""
    swarm = new_host(key_pair=create_new_key_pair(b"f" * 32)).get_network()
    cache = swarm._negative_peer_cache  # type: ignore[attr-defined]
    assert cache._ttl == 60.0, "negative dial cache TTL changed: see NetNode._reconnect_loop"
    cache.mark_failed("peer")
    assert cache.is_blocked("peer")
    swarm.unblock_peer(ID(b"peer"))
    cache.mark_failed(str(ID(b"peer")))
    swarm.unblock_peer(ID(b"peer"))
    assert not cache.is_blocked(str(ID(b"peer")))


def test_libp2p_metrics_server_binds_all_interfaces() -> None:
    """Pitfall 7: libp2p's Prometheus server binds 0.0.0.0 (we serve our own on 127.0.0.1)."""
    source = inspect.getsource(libp2p_metrics.Metrics.start_prometheus_server)
    assert "start_http_server(metrics)" in source, "libp2p metrics server binding changed"


def test_default_security_offers_plaintext() -> None:
    """py-libp2p's default security list includes /plaintext: we pass sec_opt=Noise only."""
    import libp2p

    source = inspect.getsource(libp2p.new_swarm)
    assert "PLAINTEXT_PROTOCOL_ID" in source, "default security transports changed"


@pytest.mark.parametrize("n", [1])
async def test_libp2p_logger_does_not_propagate(n: int) -> None:
    """Pitfall 5: libp2p sets its logger to propagate=False at import; we turn it back on."""
    import logging

    await trio.sleep(0)
    assert net_host.LIBP2P_LOGGER_PROPAGATED_AT_IMPORT is False, "libp2p logger now propagates"
    net_host.configure_logging("INFO")
    assert logging.getLogger("libp2p").propagate is True


def test_outbound_rpc_queue_holds_32_and_drops() -> None:
    """Pitfall 2: per-peer outbound queue of 32 drops silently (NetNode waits for room)."""
    from libp2p.pubsub.rpc_queue import RpcQueue

    queue = RpcQueue()
    results = [queue.push(rpc_pb2.RPC()) for _ in range(33)]
    assert results == [True] * 32 + [False], "RpcQueue changed: see NetNode._await_outbound_room"
    assert net_host.OUTBOUND_HIGH_WATER < 32


class _StubStream:
    """Just enough of a YamuxStream for its window-update method."""

    def __init__(self) -> None:
        self.window_lock = trio.Lock()
        self._pending_recv_release = 0
        self.target_recv_window = 256 * 1024
        self.recv_window = self.target_recv_window - 1  # one byte arrived...
        self.stream_id = 1
        self.conn = type("Conn", (), {"stream_buffers": {1: bytearray()}})()  # ...and was read
        self.updates: list[int] = []
        for name in ("_window_update_full_grow", "_window_update_pending_flush",
                     "_window_update_partial_slack", "_window_update_bytes_read_only",
                     "_window_update_hysteresis_skips"):  # fmt: skip
            setattr(self, name, 0)

    def _grow_threshold(self) -> int:
        return self.target_recv_window // 2

    def _apply_autotune_epoch(self, buffered: int) -> int:
        return 0

    async def send_window_update(self, increment: int, skip_lock: bool = False) -> None:
        self.updates.append(increment)


async def test_yamux_sends_a_window_update_after_every_small_read() -> None:
    """py-libp2p bug: a 1-byte read triggers a WINDOW_UPDATE (we batch per half window)."""
    stub = _StubStream()
    await net_host.LIBP2P_YAMUX_WINDOW_UPDATE(stub, bytes_read=1)  # type: ignore[arg-type]
    # (it even credits 2 bytes for the 1 consumed: delta + bytes_read)
    assert len(stub.updates) == 1 and stub.updates[0] >= 1, (
        "yamux window updates changed: see patch_yamux_window_updates"
    )
    ours = _StubStream()
    await net_host._batched_window_update(ours, bytes_read=1)
    assert ours.updates == [] and ours._pending_recv_release == 1
    await net_host._batched_window_update(ours, bytes_read=128 * 1024)
    assert ours.updates == [128 * 1024 + 1]


def test_auto_connector_dials_towards_hundreds_of_connections() -> None:
    """libp2p's AutoConnector aims at ~200 connections from the peerstore (we disable it)."""
    from libp2p.network.config import ConnectionConfig

    config = ConnectionConfig(max_connections_per_peer=1)
    assert (config.low_watermark + config.high_watermark) // 2 >= 100, "auto-connect target changed"
    swarm = new_host(key_pair=create_new_key_pair(b"g" * 32)).get_network()
    assert hasattr(swarm.auto_connector, "maybe_connect"), "AutoConnector API changed"


def test_gossipsub_has_no_flood_publish() -> None:
    """With an empty mesh, our own publish reaches nobody (we flood our own messages)."""
    source = inspect.getsource(GossipSub._get_peers_to_send)
    assert "if topic in self.mesh:" in source and "flood" not in source.replace(
        "floodsub", ""
    ), "gossipsub publish peer selection changed: see NetNode._flood_own_publications"
    assert not hasattr(GossipSub, "flood_publish")


async def test_pubsub_stream_handler_lets_decode_errors_kill_the_host() -> None:
    """A frame that is not an RPC on /meshsub/1.1.0: libp2p's pubsub stream handler does not
    catch ``DecodeError`` and it fails the swarm service, i.e. the host (we replace the read
    loop and guard every stream handler: ``install_stream_guard``, ``_read_pubsub_stream``)."""
    from google.protobuf.message import DecodeError
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.tools.anyio_service import background_trio_service

    kps = [create_new_key_pair(bytes([0x70 + i]) * 32) for i in range(2)]
    hosts = [new_host(key_pair=kp) for kp in kps]
    listen = [__import__("multiaddr").Multiaddr("/ip4/127.0.0.1/tcp/0")]
    victim_error: list[BaseException] = []

    async def victim(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ps = Pubsub(hosts[1], _gossipsub())
        try:
            async with hosts[1].run(listen_addrs=listen), background_trio_service(ps), \
                    background_trio_service(ps.router):  # fmt: skip
                task_status.started()
                await trio.sleep_forever()
        except BaseException as exc:
            if isinstance(exc, trio.Cancelled):
                raise
            victim_error.append(exc)  # the point of the canary

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(victim)
            async with hosts[0].run(listen_addrs=listen):
                await hosts[0].connect(PeerInfo(hosts[1].get_id(), hosts[1].get_addrs()))
                stream = await hosts[0].new_stream(hosts[1].get_id(), [TProtocol("/meshsub/1.1.0")])
                await stream.write(b"\x0a" + b"\xff" * 10)
                while not victim_error:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    leaves: list[BaseException] = []
    todo = list(victim_error)
    while todo:
        exc = todo.pop()
        if isinstance(exc, BaseExceptionGroup):
            todo.extend(exc.exceptions)
        else:
            leaves.append(exc)
    assert any(isinstance(e, DecodeError) for e in leaves), (
        "py-libp2p's pubsub stream handler no longer lets DecodeError kill the host: "
        f"revisit NetNode._read_pubsub_stream / install_stream_guard ({victim_error!r})"
    )


def test_pubsub_read_loop_is_the_one_we_replaced() -> None:
    """``NetNode._read_pubsub_stream`` mirrors libp2p 0.8.1's loop: if libp2p changed it,
    port the change (or drop our copy if libp2p now contains faults and budgets)."""
    import hashlib

    source = inspect.getsource(net_host.LIBP2P_READ_PUBSUB_STREAM)
    assert hashlib.sha256(source.encode()).hexdigest() == (
        "ac0c4ad87ca39288d70fcc5a58a842613bc8c47f32c171995a5775bc83fa4430"
    ), "Pubsub.continuously_read_stream changed: review NetNode._read_pubsub_stream"
    handler = inspect.getsource(Pubsub.stream_handler)
    assert "self.continuously_read_stream(stream)" in handler, "stream_handler changed"
    assert "DecodeError" not in handler and "except Exception" not in handler


def test_signature_check_raises_on_a_garbage_key() -> None:
    """libp2p's pubsub signature check deserialises ``msg.key`` when the origin id embeds no
    key and re-raises its error: inside ``push_msg`` (a pubsub task) that stops pubsub. We
    refuse non-member origins first (``NetNode._guarded_push_msg``)."""
    from libp2p.pubsub.validators import signature_validator

    msg = rpc_pb2.Message(from_id=b"\x12\x20" + b"\x01" * 32, data=b"x", seqno=b"\x00" * 8,
                          topicIDs=["t"], key=b"\xff\xff\xff", signature=b"x")  # fmt: skip
    with pytest.raises(Exception):  # noqa: B017 - whatever it raises, it must not return
        signature_validator(msg)


async def test_blacklist_teardown_races_the_dead_peer_handler() -> None:
    """libp2p's ``_teardown_if_connected`` deletes ``peers[peer]`` after awaiting the stream
    reset; a disconnect in between (we close a banned peer at once) makes it raise KeyError
    in a pubsub task (we replace it per node: ``NetNode._teardown_if_connected``)."""
    ps = Pubsub(new_host(key_pair=create_new_key_pair(b"h" * 32)), _gossipsub())
    peer = ID.from_pubkey(create_new_key_pair(b"i" * 32).public_key)

    class Stream:
        async def reset(self) -> None:
            await trio.sleep(0)
            del ps.peers[peer]  # the dead-peer handler ran meanwhile

    ps.peers[peer] = Stream()  # type: ignore[assignment]
    with pytest.raises(KeyError):
        await net_host.LIBP2P_TEARDOWN_IF_CONNECTED(ps, peer)


def test_prune_peer_exchange_dials_without_deadline() -> None:
    """gossipsub dials peers named in a PRUNE's peer exchange, inline in the RPC read loop
    and without a deadline (we strip PX: members only, our own dialling)."""
    source = inspect.getsource(GossipSub.handle_prune)
    assert "await self._do_px(px_peers)" in source, "PRUNE peer exchange changed"
    assert "host.connect(" in inspect.getsource(GossipSub._do_px)


def test_pubsub_sessions_are_per_peer_id() -> None:
    """libp2p keeps one pubsub session per peer id: registration skips a peer already in
    ``peers`` (live or dead) and removal skips a peer that still has a connection. A reconnect
    racing the disconnect then leaves a dead session registered (docs/libp2p.md, pitfall 8);
    ``NetNode._handle_dead_pubsub_peer`` and ``_register_pubsub_peer`` replace and wrap them.
    If libp2p changed either, review those two."""
    new_peer = inspect.getsource(net_host.LIBP2P_HANDLE_NEW_PEER)
    assert "if peer_id in self.peers:" in new_peer, "_handle_new_peer no longer skips known peers"
    assert "self.peers[peer_id] = stream" in new_peer, "_handle_new_peer registers differently"
    dead_peer = inspect.getsource(net_host.LIBP2P_HANDLE_DEAD_PEER)
    assert "self._forget_all_subscriptions(peer_id)" in dead_peer, "_handle_dead_peer changed"
    assert "self.router.remove_peer(peer_id)" in dead_peer, "_handle_dead_peer changed"
    assert Pubsub._handle_dead_peer is net_host.LIBP2P_HANDLE_DEAD_PEER  # replaced per node only


def test_listen_addresses_survive_a_closed_listener() -> None:
    """``guard_listen_addrs``: once a listener's socket is closed (the host shutting down),
    ``get_addrs`` answers the last addresses instead of raising EBADF into pubsub."""
    from node.net.host import guard_listen_addrs

    calls = {"n": 0}

    class Host:
        def get_addrs(self) -> list[str]:
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(9, "Bad file descriptor")
            return ["/ip4/127.0.0.1/tcp/4001"]

    host = Host()
    guard_listen_addrs(host)
    assert host.get_addrs() == ["/ip4/127.0.0.1/tcp/4001"]
    assert host.get_addrs() == ["/ip4/127.0.0.1/tcp/4001"]
    assert calls["n"] == 2
