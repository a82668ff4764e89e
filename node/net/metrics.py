"""Prometheus metrics of the network layer, on a registry of their own, served on 127.0.0.1.

libp2p's own ``Metrics.start_prometheus_server`` binds 0.0.0.0 (pitfall 7 of
docs/libp2p.md); :meth:`NetMetrics.serve` binds ``127.0.0.1`` unless told
otherwise. Peer labels are bounded: only member peer ids, everything else is ``other``.
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
        self.peers = Gauge("microgrid_net_peers", "Connected peers", registry=r)
        self.gossip_in = Counter(
            "microgrid_gossip_in", "Gossip messages delivered locally", ["topic"], registry=r
        )
        self.gossip_records_in = Counter(
            "microgrid_gossip_records_in", "Records delivered by gossip", ["topic"], registry=r
        )
        self.gossip_out = Counter(
            "microgrid_gossip_out", "Gossip messages published", ["topic"], registry=r
        )
        self.gossip_invalid = Counter(
            "microgrid_gossip_invalid", "Rejected gossip messages", ["reason"], registry=r
        )
        self.gossip_invalid_by_peer = Counter(
            "microgrid_gossip_invalid_by_peer",
            "Rejected gossip messages by forwarding peer",
            ["peer"],
            registry=r,
        )
        self.gossip_penalised_by_peer = Counter(
            "microgrid_gossip_penalised_by_peer",
            "Rejected gossip messages by penalised culprit (author or forwarder)",
            ["peer", "reason"],
            registry=r,
        )
        self.gossip_dropped = Counter(
            "microgrid_gossip_dropped",
            "Inbound gossip dropped before validation (per-peer budgets)",
            ["reason"],
            registry=r,
        )
        self.gossip_dropped_by_peer = Counter(
            "microgrid_gossip_dropped_by_peer",
            "Inbound gossip dropped before validation, by forwarding peer",
            ["peer"],
            registry=r,
        )
        self.stream_faults = Counter(
            "microgrid_net_stream_faults",
            "Inbound streams reset because a peer's bytes broke the protocol",
            ["protocol", "reason"],
            registry=r,
        )
        self.stream_faults_by_peer = Counter(
            "microgrid_net_stream_faults_by_peer",
            "Protocol faults by peer",
            ["peer", "protocol"],
            registry=r,
        )
        self.peers_refused = Counter(
            "microgrid_net_peers_refused", "Connections refused", ["reason"], registry=r
        )
        self.peers_banned = Counter("microgrid_net_peers_banned", "Peer bans", registry=r)
        self.dials = Counter("microgrid_net_dials", "Dial attempts", ["result"], registry=r)
        self.raft_sent = Counter("microgrid_raft_frames_sent", "Raft frames sent", registry=r)
        self.raft_received = Counter(
            "microgrid_raft_frames_received", "Raft frames received and accepted", registry=r
        )
        self.raft_dropped = Counter(
            "microgrid_raft_frames_dropped", "Raft frames dropped", ["reason"], registry=r
        )
        self.stream_errors = Counter(
            "microgrid_stream_errors", "Stream errors", ["kind"], registry=r
        )
        self.rtt = Histogram(
            "microgrid_peer_rtt_seconds",
            "Ping round-trip time to peers",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self._server: Any = None

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
