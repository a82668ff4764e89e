"""A node process leaves py-libp2p's unused optional dependencies out (node/net/lean_imports.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.net import lean_imports

PROBE = """
import json, sys
from node.net import lean_imports
finder = lean_imports.install()
import node.daemon.household_node, node.daemon.operator_node, node.net.host, node.net.relay
import libp2p.pubsub.gossipsub
real = sorted(p for p in lean_imports.UNUSED
              if p in sys.modules and not lean_imports.is_placeholder(sys.modules[p]))
print(json.dumps({"installed": finder is not None, "real": real,
                  "answered": sorted(finder.answered) if finder else [],
                  "libp2p": "libp2p.host.basic_host" in sys.modules}))
"""


def _probe(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
        env={**os.environ, **env}, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_node_imports_libp2p_without_its_unused_packages() -> None:
    """Everything a node and an operator node import loads, libp2p included, and none of the
    unused packages is really imported (libp2p asked for some of them: placeholders)."""
    doc = _probe({lean_imports.DISABLE_ENV: ""})
    assert doc["installed"] and doc["libp2p"]
    assert doc["real"] == []
    # (zeroconf, httpx, aioquic: only libp2p's blocked modules and dnspython asked for them)
    answered = {str(n) for n in doc["answered"]}
    # multiaddr's DNS resolver is ours (node/net/system_resolver.py), so dnspython stays out
    assert "multiaddr.resolvers.dns" in answered
    # libp2p's own unused subpackages too, not its used neighbours
    assert {"libp2p.kad_dht", "libp2p.transport.quic", "libp2p.security.tls"} <= {
        ".".join(n.split(".")[:3]) if not n.startswith("libp2p.kad_dht") else "libp2p.kad_dht"
        for n in answered
    }
    used = ("libp2p.transport.tcp", "libp2p.security.noise")
    assert not any(n.startswith(used) for n in answered)


def test_a_dotted_name_blocks_that_subpackage_only() -> None:
    """``libp2p.kad_dht`` blocks it and its submodules, not a sibling sharing its prefix; the
    mDNS packages stay loadable when the config turns mDNS on."""
    finder = lean_imports._UnusedFinder(frozenset({"mg_pkg.sub"}))
    assert finder.find_spec("mg_pkg.sub", None) is not None
    assert finder.find_spec("mg_pkg.sub.deep", None) is not None
    assert finder.find_spec("mg_pkg.subway", None) is None
    assert finder.find_spec("mg_pkg", None) is None
    assert "zeroconf" in lean_imports.unused() and "libp2p.discovery.mdns" in lean_imports.unused()
    with_mdns = lean_imports.unused(mdns=True)
    assert not set(lean_imports.MDNS_PACKAGES) & set(with_mdns)
    assert "aioquic" in with_mdns


def test_the_switch_turns_it_off() -> None:
    """With MICROGRID_FULL_IMPORTS=1 nothing is blocked: libp2p loads its optional parts."""
    doc = _probe({lean_imports.DISABLE_ENV: "1"})
    assert not doc["installed"]
    assert "aioquic" in doc["real"]


def test_a_placeholder_fails_loudly_when_used() -> None:
    """Module bodies may import, subclass and catch placeholders; calling one raises a typed
    error naming what was used."""
    finder = lean_imports._UnusedFinder(frozenset({"mg_absent_pkg"}))
    spec = finder.find_spec("mg_absent_pkg.sub", None)
    assert spec is not None
    module = finder.create_module(spec)
    a, b = module.Connection, module.Protocol
    assert a is module.Connection and a is not b

    class Both(a, b):  # two placeholders as bases
        pass

    try:
        raise ValueError("x")
    except a:  # a valid except clause that never matches
        pytest.fail("a placeholder matched a real exception")
    except ValueError:
        pass
    with pytest.raises(lean_imports.UnusedDependencyError, match=r"mg_absent_pkg\.sub\.Conn"):
        module.Connection(1)
    with pytest.raises(lean_imports.UnusedDependencyError):
        Both()
    with pytest.raises(lean_imports.UnusedDependencyError, match=r"Protocol\.make"):
        module.Protocol.make()
    assert finder.find_spec("json", None) is None


MDNS_PROBE = """
import sys
from pathlib import Path
from node.net import lean_imports
lean_imports.install(lean_imports.unused(mdns={mdns}))
from node.net.host import NetNode, NetSettings
from node.setup.genesis import load_genesis
from node.setup.keyfile import NodeIdentity
node = NetNode(NodeIdentity.from_seed(b"m" * 32), load_genesis(sys.argv[1]),
               NetSettings(mdns=True), slot_policy=lambda r: None)
try:
    node._build()
    print("built", type(node.host.mDNS).__name__)
except lean_imports.UnusedDependencyError as exc:
    print("refused", exc.name)
"""


@pytest.mark.parametrize("mdns", [False, True])
def test_mdns_in_the_config_loads_what_mdns_needs(mdns: bool, tmp_path: Path) -> None:
    """A node whose config turns mDNS on builds its host with mDNS discovery; blocked, the
    first use fails loudly (what ``microgrid node run`` avoids by reading the config first)."""
    from node.testing.harness import make_grid

    _, _, genesis = make_grid(tmp_path, 1)
    out = subprocess.run(
        [sys.executable, "-c", MDNS_PROBE.format(mdns=mdns), str(genesis)], capture_output=True,
        text=True, timeout=120, env={**os.environ, lean_imports.DISABLE_ENV: ""}, check=True,
    )  # fmt: skip
    last = out.stdout.strip().splitlines()[-1]
    if mdns:
        assert last == "built MDNSDiscovery"
    else:
        assert last.startswith("refused libp2p.discovery.mdns")
