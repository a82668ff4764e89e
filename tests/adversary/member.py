"""A hostile member of a grid, built from the project's own libraries.

:class:`HostileMember` holds a member household's real key (so libp2p admits it and its records
carry valid signatures) and runs a real :class:`~node.net.host.NetNode` in the test's trio loop.
It does what an honest node never does: signs records outside the bounds the models enforce,
publishes bytes without validating them, writes raw bytes on the protocols' streams, floods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from market.encoding import canonical_bytes, canonical_json
from node.net.host import NetNode, NetSettings
from node.net.wire import TopicKind, encode_uvarint
from node.setup.genesis import Genesis
from node.setup.keyfile import NodeIdentity
from node.tools.ports import free_ports

MESHSUB = "/meshsub/1.1.0"
RAFT = "/microgrid/raft/1"
BLOCKS = "/microgrid/blocks/1"


def raw_record(identity: NodeIdentity, kind: str, fields: dict[str, Any]) -> bytes:
    """A record's canonical command bytes, signed by ``identity`` whatever its values.

    The models refuse out-of-range values at construction, so a hostile member builds the
    canonical JSON itself: exactly what a modified node could send.
    """
    unsigned = {k: v for k, v in fields.items() if k != "signature"}
    signature = identity.signer.sign(canonical_bytes(kind, unsigned))
    return canonical_json({**unsigned, "signature": signature})


def raw_batch(records: Sequence[bytes], batch_seq: int = 1) -> bytes:
    """A gossip batch (node/net/wire.py layout) around already-encoded record bytes."""
    out = bytearray([1]) + encode_uvarint(batch_seq) + encode_uvarint(len(records))
    for raw in records:
        out += encode_uvarint(len(raw)) + raw
    return bytes(out)


class HostileMember:
    """A member's key on a NetNode that publishes and writes whatever it is told."""

    def __init__(self, identity: NodeIdentity, genesis: Genesis, peers: Sequence[str]) -> None:
        self.identity = identity
        self.genesis = genesis
        port = free_ports(1)[0]
        self.net = NetNode(
            identity,
            genesis,
            # the attacker's program dials whom it is told (no address exchange of its own):
            # the tests place its hosts deliberately
            NetSettings(
                listen=f"/ip4/127.0.0.1/tcp/{port}", peers=list(peers), reconnect_max=1.0,
                learn_addrs=False,
            ),
            slot_policy=lambda record: None,
        )
        self._seq = 0

    @property
    def did(self) -> str:
        """The member DID the attacker holds."""
        return self.identity.did

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the host (returns once it listens)."""
        await nursery.start(self.net.run)

    def stop(self) -> None:
        """Leave the grid."""
        self.net.stop()

    async def wait_connected(self, peer_ids: Sequence[str], timeout: float = 30.0) -> None:
        """Until the host holds a connection to each of ``peer_ids`` (libp2p ids)."""
        with trio.fail_after(timeout):
            while not set(peer_ids) <= {str(p) for p in self.net.connected_peers()}:
                await trio.sleep(0.1)

    def order(self, **overrides: Any) -> bytes:
        """A signed order's bytes; ``overrides`` replace any field (even out of range)."""
        self._seq += 1
        fields: dict[str, Any] = {
            "type": "order", "grid": self.genesis.grid, "household": self.did,
            "id": f"attack-{self._seq}", "side": "sell", "slot": 0, "quantity_wh": 100,
            "price": self.genesis.market.feed_in_tariff, "nonce": 10**9 + self._seq,
        }  # fmt: skip
        fields.update(overrides)
        return raw_record(self.identity, "order", fields)

    def reading(self, **overrides: Any) -> bytes:
        """A signed meter reading's bytes; ``overrides`` replace any field."""
        self._seq += 1
        member = self.genesis.member(self.did)
        assert member is not None
        fields: dict[str, Any] = {
            "type": "reading", "grid": self.genesis.grid, "household": self.did,
            "meter_serial": member.meter_serial, "slot": 0, "import_wh": 0, "export_wh": 0,
            "nonce": 10**9 + self._seq,
        }  # fmt: skip
        fields.update(overrides)
        return raw_record(self.identity, "reading", fields)

    async def publish(self, kind: TopicKind, data: bytes) -> None:
        """Publish bytes on a grid topic with no validation of our own."""
        await self.net.publish_raw(kind, data)

    async def flood(self, kind: TopicKind, batches: Sequence[bytes],
                    peer_ids: Sequence[str]) -> None:  # fmt: skip
        """Publish every batch to each of ``peer_ids`` whatever the gossip mesh holds.

        An attacker sends to every peer it reaches, not to its mesh: the peers are made the
        router's direct peers for the flood (gossipsub sends to those always), once connected.
        """
        await self.wait_connected(peer_ids)
        direct = self.net.pubsub.router.direct_peers
        added = [ID.from_base58(p) for p in peer_ids if ID.from_base58(p) not in direct]
        for peer in added:
            direct[peer] = PeerInfo(peer, [])
        try:
            for batch in batches:
                await self.publish(kind, batch)
        finally:
            for peer in added:
                direct.pop(peer, None)

    async def write_stream(self, peer_id: str, protocol: str, data: bytes,
                           *, linger: float = 0.5) -> bool:  # fmt: skip
        """Open ``protocol`` to a peer, write ``data``, linger, close. False if refused."""
        try:
            with trio.fail_after(5):
                stream = await self.net.host.new_stream(ID.from_base58(peer_id),
                                                        [TProtocol(protocol)])  # fmt: skip
        except Exception:
            return False
        try:
            with trio.move_on_after(5):
                await stream.write(data)
                await trio.sleep(linger)
        except Exception:
            pass
        finally:
            with trio.move_on_after(2), contextlib.suppress(Exception):
                await stream.close()
        return True
