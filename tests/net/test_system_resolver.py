"""DNS names in multiaddrs are resolved by the operating system (node/net/system_resolver.py).

A node process (``lean_imports`` installed) leaves dnspython out and answers
``multiaddr.resolvers.dns`` with our resolver over ``getaddrinfo``: ``/etc/hosts`` names such
as ``localhost`` (and a home network's mDNS names, where nss-mdns is installed) resolve, which
dnspython's own queries to DNS servers never did. Real hosts on 127.0.0.1, in a subprocess so
the import hook is the node's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from multiaddr import Multiaddr
from multiaddr.exceptions import ResolutionError

from node.net import lean_imports
from node.net.system_resolver import MAX_ADDRESSES, DNSResolver
from node.testing.harness import make_grid

PROBE = """
import json, sys
import trio
from node.net import lean_imports
lean_imports.install()
from node.net.host import NetNode, NetSettings
from node.setup.genesis import load_genesis
from node.setup.keyfile import NodeIdentity
import multiaddr.resolvers

genesis = load_genesis(sys.argv[1])
seed_a, seed_b = bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
listen_a, listen_b, addr_b = sys.argv[4], sys.argv[5], sys.argv[6]

def node(seed, listen, peers):
    return NetNode(NodeIdentity.from_seed(seed), genesis,
                   NetSettings(listen=listen, peers=peers, reconnect_max=1.0),
                   slot_policy=lambda r: None)

async def main():
    a, b = node(seed_a, listen_a, [addr_b]), node(seed_b, listen_b, [])
    ok = False
    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            for x in (a, b):
                await nursery.start(x.run)
            while str(b.peer_id) not in {str(p) for p in a.connected_peers()}:
                await trio.sleep(0.05)
            ok = True
            nursery.cancel_scope.cancel()
    print(json.dumps({"connected": ok,
                      "resolver": multiaddr.resolvers.DNSResolver.__module__,
                      "dnspython": "dns" in sys.modules
                                   and not lean_imports.is_placeholder(sys.modules["dns"])}))

trio.run(main)
"""


def test_a_node_dials_a_peer_by_its_hosts_file_name_without_dnspython(tmp_path: Path) -> None:
    """A dials B at ``/dns4/localhost/tcp/<port>/p2p/<B>`` (only B's IP address was known
    before): connected, through our resolver, with dnspython never loaded."""
    specs, _, genesis = make_grid(tmp_path, 2)
    a, b = specs
    by_name = b.addr.replace("/ip4/127.0.0.1/", "/dns4/localhost/")
    assert by_name != b.addr
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(genesis), a.seed.hex(), b.seed.hex(), a.listen,
         b.listen, by_name],
        capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, lean_imports.DISABLE_ENV: ""},
    )  # fmt: skip
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc == {"connected": True, "resolver": "node.net.system_resolver",
                   "dnspython": False}, out.stderr[-2000:]  # fmt: skip


async def test_a_name_resolves_with_the_rest_of_the_address_kept() -> None:
    """``/dns4`` gives IPv4 addresses only, each followed by the rest of the address; an IP
    address passes through; a name that does not resolve, and ``/dnsaddr``, raise the
    resolver's own error (what the TCP transport retries and reports)."""
    r = DNSResolver()
    peer = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    got = await r.resolve(Multiaddr(f"/dns4/localhost/tcp/4001/p2p/{peer}"))
    assert [str(m) for m in got] == [f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}"]
    plain = Multiaddr("/ip4/192.0.2.1/tcp/1")
    assert await r.resolve(plain) == [plain]
    with pytest.raises(ResolutionError, match="cannot resolve"):
        with trio.fail_after(30):
            await r.resolve(Multiaddr("/dns4/no-such-host.invalid/tcp/1"))
    with pytest.raises(ResolutionError, match="dnsaddr"):
        await r.resolve(Multiaddr("/dnsaddr/bootstrap.example.org"))
    assert MAX_ADDRESSES >= 2
