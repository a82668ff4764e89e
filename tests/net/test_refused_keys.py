"""A node refuses RSA and secp256k1 peer keys without loading their libraries
(node/net/refused_keys.py).

Grid members are named by Ed25519 keys. A node process answers ``libp2p.crypto.rsa`` and
``libp2p.crypto.secp256k1`` with key classes that refuse such a key the way py-libp2p's parsers
refuse an unknown key type (a ``ValueError``), and leaves pycryptodome and coincurve out. A
peer presenting such a key must only fail its own handshake: the node stays up and a member
still connects. The attacker runs in this (full-imports) process with real keys; the node and
the member run in a child process with the node's import hook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto import rsa, secp256k1
from libp2p.crypto.exceptions import MissingDeserializerError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from node.net import lean_imports, refused_keys
from node.testing.harness import free_ports, make_grid

CHILD = """
import json, sys
import trio
from node.net import lean_imports
lean_imports.install()
from node.net.host import NetNode, NetSettings
from node.setup.genesis import load_genesis
from node.setup.keyfile import NodeIdentity
import libp2p.crypto.serialization as ser

genesis = load_genesis(sys.argv[1])
seed_a, seed_b = bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
listen_a, listen_b, addr_b = sys.argv[4], sys.argv[5], sys.argv[6]

async def main():
    b = NetNode(NodeIdentity.from_seed(seed_b), genesis, NetSettings(listen=listen_b),
                slot_policy=lambda r: None)
    connected = False
    with trio.move_on_after(90):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            print("ready", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # the attacker has tried
            a = NetNode(NodeIdentity.from_seed(seed_a), genesis,
                        NetSettings(listen=listen_a, peers=[addr_b], reconnect_max=1.0),
                        slot_policy=lambda r: None)
            await nursery.start(a.run)
            with trio.move_on_after(30):
                while str(a.peer_id) not in {str(p) for p in b.connected_peers()}:
                    await trio.sleep(0.05)
                connected = True
            nursery.cancel_scope.cancel()
    real = [m for m in ("Crypto", "coincurve")
            if m in sys.modules and not lean_imports.is_placeholder(sys.modules[m])]
    print(json.dumps({"member_connected": connected, "real": real,
                      "rsa": ser.RSAPublicKey.__module__}), flush=True)

trio.run(main)
"""


def test_the_refused_key_classes_fail_like_an_unknown_key_type() -> None:
    """Reading an RSA or secp256k1 key raises an error that is both a ``ValueError`` and
    libp2p's ``MissingDeserializerError``; no key pair can be made."""
    real = rsa.create_new_key_pair(2048).public_key.to_bytes()
    for cls in (refused_keys.RSAPublicKey, refused_keys.Secp256k1PublicKey,
                refused_keys.RSAPrivateKey, refused_keys.Secp256k1PrivateKey):  # fmt: skip
        with pytest.raises(ValueError, match="not accepted") as info:
            cls.from_bytes(real)
        assert isinstance(info.value, MissingDeserializerError)
    with pytest.raises(refused_keys.RefusedKeyType):
        refused_keys.create_new_key_pair()


async def _attack(kp: object, target: str) -> str:
    """Dial ``target`` with a host holding ``kp``; how it ended."""
    port = free_ports(1)[0]
    host = new_host(key_pair=kp)
    info = PeerInfo(ID.from_base58(target.rsplit("/", 1)[1]),
                    [multiaddr.Multiaddr(target.rsplit("/p2p/", 1)[0])])  # fmt: skip
    async with host.run(listen_addrs=[multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]):
        try:
            with trio.fail_after(15):
                await host.connect(info)
        except Exception as exc:
            return f"refused: {type(exc).__name__}"
        await trio.sleep(0.5)
        return "open" if host.get_network().get_connections(info.peer_id) else "closed"


async def test_a_peer_with_an_rsa_or_secp256k1_key_fails_its_handshake_only(
    tmp_path: Path,
) -> None:
    """Two attackers (secp256k1, RSA) dial a node: neither gets a connection; then a member
    connects to the same node, whose process never loaded pycryptodome or coincurve."""
    specs, _, genesis = make_grid(tmp_path, 2)
    a, b = specs
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(genesis), a.seed.hex(), b.seed.hex(), a.listen,
         b.listen, b.addr],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, lean_imports.DISABLE_ENV: ""},
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdin is not None
        line = await trio.to_thread.run_sync(child.stdout.readline)
        assert line.strip() == "ready", child.stderr.read() if child.stderr else ""
        outcomes = [await _attack(secp256k1.create_new_key_pair(), b.addr),
                    await _attack(rsa.create_new_key_pair(2048), b.addr)]  # fmt: skip
        # refused in the handshake itself (with the real key modules the handshake succeeded
        # and the member gate closed the connection a moment later)
        assert all(o.startswith("refused") for o in outcomes), outcomes
        assert child.poll() is None, "the node process died"
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = await trio.to_thread.run_sync(lambda: child.communicate(timeout=120))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc == {"member_connected": True, "real": [],
                   "rsa": "node.net.refused_keys"}, err[-3000:]  # fmt: skip
