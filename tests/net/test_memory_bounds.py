"""Issue 19 ("RSS per node <= 100 MB ... after 1,000 slots, no growth"): the structures a node
kept growing over a long run stay bounded after many slots' worth of inputs.

In-process and without a network (a node's gossipsub and pubsub are built, not run): each test
feeds far more messages or records than its bound and checks the size never exceeds it, and
that the behaviour the structure serves (replay refusal, equivocation, our own publications
passing validation) is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
from libp2p.pubsub.pb import rpc_pb2

from market.models import Order, Side
from market.state import NONCE_TRIM_STEP
from node.net.host import (
    OWN_IDS_KEPT,
    PENDING_PER_PEER,
    RECENT_DELIVERIES_KEPT,
    NetNode,
    PendingQueues,
)
from node.net.validator import SIGNATURE_DIGEST_BYTES, GossipValidator, SeqnoContent
from node.net.wire import TopicKind, encode_batch
from node.setup.genesis import load_genesis
from node.setup.keyfile import NodeIdentity
from node.testing.harness import make_grid

A = NodeIdentity.from_seed(b"a" * 32)
MEMBERS = {str(A.peer_id): A.did}
WINDOW = 1024
"""The genesis default ``nonce_window`` (``market.config.MarketConfig``)."""


def order(nonce: int, price: int = 10) -> Order:
    return Order(grid="g", nonce=nonce, id=f"o{nonce}", household=A.did, side=Side.BUY,
                 slot=5, quantity_wh=100, price=price).signed_by(A.signer)  # fmt: skip


def test_validator_nonce_sets_stay_within_the_window_over_a_long_run() -> None:
    """A household uses two of its four nonces per slot. Over 1,500 slots (3,000 records) the
    validator's copy of its nonce window holds at most the nonces of ``window + step``; it
    used to grow to ``2 * window`` (about 1,000 slots) before its first prune."""
    v = GossipValidator("g", MEMBERS, clock=lambda: 0.0, nonce_window=WINDOW,
                        rate_per_origin=1e9, burst_per_origin=1e9)  # fmt: skip
    a = str(A.peer_id)
    most = 0
    for slot in range(1500):
        for nonce in (4 * slot, 4 * slot + 2):
            assert v.validate(TopicKind.ORDERS, a, a, encode_batch([order(nonce)]),
                              seqno=nonce + 1).ok  # fmt: skip
            most = max(most, len(v.nonces[A.did].recent))
    assert most <= (WINDOW + NONCE_TRIM_STEP) // 2 + 1
    highest = 4 * 1499 + 2
    # unchanged verdicts: a nonce below the window, and a used one inside it, are replays
    old = v.validate(TopicKind.ORDERS, a, a, encode_batch([order(highest - WINDOW)]), seqno=10**6)
    assert old.reason == "replayed"
    used = v.validate(TopicKind.ORDERS, a, a, encode_batch([order(highest - 4)]), seqno=10**6 + 1)
    assert used.reason == "replayed"
    # a fresh nonce inside the window is still accepted, and an equivocation on it caught
    fresh = highest - WINDOW + 1  # 4 * k + 1: never used
    assert v.validate(TopicKind.ORDERS, a, a, encode_batch([order(fresh)]), seqno=10**6 + 2).ok
    twice = encode_batch([order(fresh, price=11)])
    assert v.validate(TopicKind.ORDERS, a, a, twice, seqno=10**6 + 3).reason == "equivocation"


def test_validator_keeps_signature_digests_not_signatures() -> None:
    """Per author and nonce the equivocation check keeps a 16-byte digest, not the 128-char
    signature text: about a quarter of the memory for the same verdicts."""
    v = GossipValidator("g", MEMBERS, clock=lambda: 0.0, rate_per_origin=1e9,
                        burst_per_origin=1e9)  # fmt: skip
    a = str(A.peer_id)
    for nonce in range(0, 40, 2):
        assert v.validate(TopicKind.ORDERS, a, a, encode_batch([order(nonce)]), seqno=nonce).ok
    kept = v.signatures[A.did]
    assert len(kept) == 20
    assert all(isinstance(d, bytes) and len(d) == SIGNATURE_DIGEST_BYTES for d in kept.values())
    again = v.validate(TopicKind.ORDERS, a, a, encode_batch([order(38, price=12)]), seqno=99)
    assert again.reason == "equivocation"


def test_seqno_content_is_bounded_and_catches_equivocation() -> None:
    seen = SeqnoContent(size=100)
    origin, topics = b"\x00\x24peer", ["/microgrid/g/orders/1"]
    for i in range(5000):
        assert seen.check(origin, i.to_bytes(8, "big"), topics, b"data %d" % i)
        assert len(seen) <= 100
    last = (4999).to_bytes(8, "big")
    assert seen.check(origin, last, topics, b"data 4999")  # the same message again
    assert not seen.check(origin, last, topics, b"other data")  # other content, same seqno
    assert not seen.check(origin, last, ["/microgrid/g/readings/1"], b"data 4999")
    # topics and data are framed: moving bytes between them is other content
    assert not seen.check(origin, last, ["/microgrid/g/orders/1d"], b"ata 4999")
    # the oldest keys were forgotten (bounded): a new content for seqno 0 is a new message
    assert seen.check(origin, (0).to_bytes(8, "big"), topics, b"new")
    with pytest.raises(ValueError, match="positive"):
        SeqnoContent(size=0)


def test_node_gossipsub_and_own_ids_stay_bounded(tmp_path: Path) -> None:
    """A node's gossipsub (built, not started) forwards 3,000 messages and publishes 1,000 of
    its own: no whole message is kept for the equivocation check, the per-topic delivery
    timestamps and our own message ids stay at their bounds, and every own publication still
    passed the topic validator (it reached the message cache)."""
    specs, _, path = make_grid(tmp_path, 2)
    node = NetNode(NodeIdentity.from_seed(specs[0].seed), load_genesis(path))
    node._build()
    gossipsub = node.gossipsub
    topic = node.topics[TopicKind.ORDERS]
    me = node.peer_id.to_bytes()

    def message(seqno: int, data: bytes) -> rpc_pb2.Message:
        return rpc_pb2.Message(from_id=me, seqno=seqno.to_bytes(8, "big"), data=data,
                               topicIDs=[topic])  # fmt: skip

    async def main() -> None:
        with trio.fail_after(60):
            for i in range(3000):
                await gossipsub.publish(node.peer_id, message(i, b"x" * 100))
            assert not gossipsub.equivocation_detection  # libp2p's whole-message store unused
            assert all(len(v) <= RECENT_DELIVERIES_KEPT
                       for v in gossipsub.recent_message_deliveries.values())  # fmt: skip
            assert not gossipsub._check_equivocation(message(2999, b"y"))
            assert gossipsub._check_equivocation(message(2999, b"x" * 100))
            cached = len(gossipsub.mcache.msgs)
            for i in range(1000):
                await node.publish_raw(TopicKind.ORDERS, b"own %d" % i)
                assert len(node._own_ids) <= OWN_IDS_KEPT
            assert len(gossipsub.mcache.msgs) == cached + 1000

    trio.run(main)


def test_gossipsub_queues_only_for_a_peer_whose_hello_is_not_read_yet(tmp_path: Path) -> None:
    """py-libp2p queues each message for a connected peer not subscribed to its topic, to
    cover the moment before the peer's subscriptions arrive, and re-prunes that queue on every
    message. Once the peer's hello has been read on each of its pubsub streams and it is not
    subscribed (a learner, which takes no part in the records' gossip), nothing is queued for
    it; a new stream whose hello is not read yet (a reconnection) is covered again."""
    specs, _, path = make_grid(tmp_path, 3)
    node = NetNode(NodeIdentity.from_seed(specs[0].seed), load_genesis(path))
    node._build()
    gossipsub, pubsub = node.gossipsub, node.pubsub
    queues = gossipsub._pending_messages
    assert isinstance(queues, PendingQueues)
    learner = ID.from_base58(specs[1].peer_id)
    pubsub.peers[learner] = object()  # connected (our stream to it); no subscription known
    gossipsub.peer_protocol[learner] = PROTOCOL_ID_V11  # (add_peer registered it)
    topic = node.topics[TopicKind.ORDERS]
    me = node.peer_id.to_bytes()
    sent = [0]

    def message(seqno: int) -> rpc_pb2.Message:
        return rpc_pb2.Message(from_id=me, seqno=seqno.to_bytes(8, "big"), data=b"r%d" % seqno,
                               topicIDs=[topic])  # fmt: skip

    async def publish(count: int) -> None:
        for _ in range(count):
            sent[0] += 1
            await gossipsub.publish(node.peer_id, message(sent[0]))

    async def main() -> None:
        await publish(10)  # no hello read yet: queued (py-libp2p's cover for the race)
        assert len(queues[learner]) == 10
        first, second = object(), object()
        node._pubsub_inbound[learner] = {first}  # its stream is open: hello not read yet
        await publish(100)
        # still queued, within the bound (gossipsub prunes a queue before each append)
        assert len(queues[learner]) == PENDING_PER_PEER + 1
        node._pubsub_hello.add(first)  # its hello named no orders topic
        queues.pop(learner)  # what gossipsub's flush does when the hello arrives
        await publish(100)
        assert learner not in queues
        node._pubsub_inbound[learner].add(second)  # it reconnects: a new stream, no hello yet
        await publish(3)
        assert len(queues[learner]) == 3

    trio.run(main)


def test_gossipsub_keeps_queueing_for_a_subscribed_peer_it_cannot_send_to_yet(
    tmp_path: Path,
) -> None:
    """A peer whose hello was read and that *is* subscribed, but whose outbound session is
    not registered yet (a new connection, a session moving to another one): gossipsub's queue
    for it is what delivers the message once the session is registered, so it is kept."""
    specs, _, path = make_grid(tmp_path, 3)
    node = NetNode(NodeIdentity.from_seed(specs[0].seed), load_genesis(path))
    node._build()
    gossipsub, pubsub = node.gossipsub, node.pubsub
    queues = gossipsub._pending_messages
    voter = ID.from_base58(specs[1].peer_id)
    topic = node.topics[TopicKind.ORDERS]
    pubsub.peer_topics.setdefault(topic, set()).add(voter)  # its hello named the topic
    stream = object()
    node._pubsub_inbound[voter] = {stream}
    node._pubsub_hello.add(stream)
    assert node._greeted(voter) and voter not in gossipsub.peer_protocol
    me = node.peer_id.to_bytes()

    async def main() -> None:
        for seqno in range(1, 4):
            msg = rpc_pb2.Message(from_id=me, seqno=seqno.to_bytes(8, "big"), data=b"o%d" % seqno,
                                  topicIDs=[topic])  # fmt: skip
            await gossipsub.publish(node.peer_id, msg)
        assert len(queues[voter]) == 3  # flushed to it when its session is registered

    trio.run(main)
