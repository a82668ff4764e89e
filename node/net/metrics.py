"""Prometheus metrics of the network layer, on a registry of their own, served on 127.0.0.1.

libp2p's own ``Metrics.start_prometheus_server`` binds 0.0.0.0 (pitfall 7 of
docs/libp2p.md); :meth:`NetMetrics.serve` binds ``127.0.0.1`` unless told
otherwise. Peer labels are bounded: only (current) member peer ids, everything else is
``other``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server


class NetMetrics:
    """Counters and gauges of one node; each node (and test) gets its own registry."""

    def __init__(self, member_peers: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._members = set(member_peers)
        r = self.registry

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, list(labels), registry=r)

        self.peers = Gauge("microgrid_net_peers", "Connected peers", registry=r)
        self.members = Gauge("microgrid_net_members", "Households on the current member list",
                             registry=r)  # fmt: skip
        self.members.set(len(self._members))
        self.gossip_in = counter("microgrid_gossip_in", "Gossip messages delivered locally",
                                 "topic")  # fmt: skip
        self.gossip_records_in = counter("microgrid_gossip_records_in",
                                         "Records delivered by gossip", "topic")  # fmt: skip
        self.gossip_out = counter("microgrid_gossip_out", "Gossip messages published", "topic")
        # rejected and dropped gossip: each by reason, and by (bounded) peer label
        self.gossip_invalid = counter("microgrid_gossip_invalid", "Rejected gossip messages",
                                      "reason")  # fmt: skip
        self.gossip_invalid_by_peer = counter(
            "microgrid_gossip_invalid_by_peer",
            "Rejected gossip messages by forwarding peer",
            "peer",
        )
        self.gossip_penalised_by_peer = counter(
            "microgrid_gossip_penalised_by_peer",
            "Rejected gossip messages by penalised culprit (author or forwarder)",
            "peer",
            "reason",
        )
        self.gossip_dropped = counter(
            "microgrid_gossip_dropped",
            "Inbound gossip dropped before validation (per-peer budgets)",
            "reason",
        )
        self.gossip_dropped_by_peer = counter(
            "microgrid_gossip_dropped_by_peer",
            "Inbound gossip dropped before validation, by forwarding peer",
            "peer",
        )
        self.stream_faults = counter(
            "microgrid_net_stream_faults",
            "Inbound streams reset because a peer's bytes broke the protocol",
            "protocol",
            "reason",
        )
        self.stream_faults_by_peer = counter(
            "microgrid_net_stream_faults_by_peer", "Protocol faults by peer", "peer", "protocol"
        )
        self.peers_refused = counter("microgrid_net_peers_refused", "Connections refused",
                                     "reason")  # fmt: skip
        self.peers_banned = counter("microgrid_net_peers_banned", "Peer bans")
        self.dials = counter("microgrid_net_dials", "Dial attempts", "result")
        self.raft_sent = counter("microgrid_raft_frames_sent", "Raft frames sent")
        self.raft_bytes_sent = counter(
            "microgrid_raft_bytes_sent", "Bytes of Raft frames sent (length prefix included)"
        )
        self.raft_bytes_unpacked = counter(
            "microgrid_raft_bytes_unpacked",
            "Bytes the Raft frames sent would have been without packing (deflate)",
        )
        self.raft_received = counter("microgrid_raft_frames_received",
                                     "Raft frames received and accepted")  # fmt: skip
        self.raft_dropped = counter("microgrid_raft_frames_dropped", "Raft frames dropped",
                                    "reason")  # fmt: skip
        self.stream_errors = counter("microgrid_stream_errors", "Stream errors", "kind")
        self.rtt = Histogram(
            "microgrid_peer_rtt_seconds",
            "Ping round-trip time to peers",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self._server: Any = None

    def set_members(self, member_peers: Iterable[str]) -> None:
        """Replace the member peer ids that get a label of their own (the list changes at
        runtime); series already recorded for a former member stay (bounded by the members
        ever admitted)."""
        self._members = set(member_peers)

    def peer_label(self, peer: str) -> str:
        """``peer`` if it is a member, else ``other`` (bounded label cardinality)."""
        return peer if peer in self._members else "other"

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP server, if any."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
