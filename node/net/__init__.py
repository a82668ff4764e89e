"""The network layer: libp2p host, gossip of signed records, Raft over streams, metrics.

See docs/network.md. Importing this package does not import libp2p (which takes over a
second); import :mod:`node.net.host` for the host itself.
"""
