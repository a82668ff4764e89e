"""Households behind NAT reach each other through the operator node's relay: Linux network
namespaces created (and removed) by the test.

Topology (addresses from the documentation ranges)::

    [pub] 203.0.113.2 --- [wan] --- 198.51.100.2 [nat1] 192.168.1.1 --- 192.168.1.2 [h1]
                              \\---- 198.51.100.10 [nat2] 192.168.2.1 --- 192.168.2.2 [h2]

``pub`` runs the operator node (``microgrid operator run``: relay hop, bootstrap, Raft
learner) on a public address; ``nat1``/``nat2`` masquerade their home's traffic (nftables) and
drop every new inbound connection (no port forwarded); ``h1``/``h2`` run a household's network
layer (``python -m tests.net.test_nat child``: a NetNode configured from the genesis, which
names only the operator node, publishing one order a second and reporting what it receives and
how each member is connected).

What is checked: the two households connect through the relay (``/p2p-circuit``) and gossip
both ways; DCUtR (hole punching) then replaces the relayed connection by a direct one (Linux
masquerade keeps the source port and lets a TCP simultaneous open through: endpoint-
independent mapping), and gossip keeps flowing with the relay *cut* (the operator killed);
with hole punching off, cutting the relay stops the gossip and the grid recovers when the
operator returns; a home whose public address changes mid-run (its NAT's WAN address
replaced, connection tracking flushed) reconnects through the relay and gossips again.

Skipped, with the reason, where the machine cannot create network namespaces (not root, no
``ip``/``nft``). Every namespace, process and file is removed in a ``finally``; every wait is
bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PUBLIC_IP = "203.0.113.2"
OP_PORT = 4001
HOME_PORT = 4002


# -- the child: one household's network layer, JSON lines on stdout ------------------------


async def publish_orders(node: Any, me: Any, name: str, slot: int,
                         emit: Callable[..., None]) -> None:  # fmt: skip
    """A child's gossip (here and in tests/net/test_relays.py): one signed order a second for
    ``slot``, nonces from the wall clock (they grow across restarts); a publish that finds no
    peer yet is reported and tried again."""
    import trio

    from market.models import Order, Side
    from node.net.wire import TopicKind

    nonce = int(time.time() * 10)
    while True:
        nonce += 1
        o = Order(grid=node.genesis.grid, nonce=nonce, id=f"{name}-{nonce}", household=me.did,
                  side=Side.SELL, slot=slot, quantity_wh=100,
                  price=10).signed_by(me.signer)  # fmt: skip
        try:
            await node.publish(TopicKind.ORDERS, [o])
        except Exception as exc:  # no peer yet: keep trying
            emit(event="publish_error", error=str(exc))
        await trio.sleep(1.0)


async def stop_on_signal(node: Any, scope: Any) -> None:
    """A child's SIGTERM/SIGINT: stop the node, cancel ``scope``."""
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            node.stop()
            scope.cancel()
            return


def _child(argv: list[str]) -> None:
    """``python -m tests.net.test_nat child --name h1 --genesis G --listen ADDR [--no-punch]``.
    Like ``microgrid node run``, it keeps libp2p's unused packages out (node/net/lean_imports)."""
    from node.net import lean_imports

    lean_imports.install()
    import math

    import trio

    from node.net.host import NetNode, NetSettings, configure_logging
    from node.net.relay import connection_kinds, relay_addresses
    from node.net.wire import TopicKind
    from node.setup.genesis import load_genesis
    from node.setup.keyfile import NodeIdentity
    from node.testing.harness import named_seed

    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--genesis", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--no-punch", action="store_true")
    a = p.parse_args(argv)
    configure_logging("WARNING", "ERROR")
    import logging

    for name in os.environ.get("MG_DEBUG_LOGGERS", "").split(","):
        if name:  # e.g. libp2p.relay.circuit_v2.dcutr (docs/network.md, hole punching)
            logging.getLogger(name).setLevel("DEBUG")
    genesis = load_genesis(Path(a.genesis))
    me = NodeIdentity.from_seed(named_seed(f"nat-test/{a.name}"))
    slot = math.floor(time.time() / 900) + 2

    def emit(**doc: Any) -> None:
        print(json.dumps(doc), flush=True)

    def on_gossip(kind: TopicKind, records: Any, origin: str) -> None:
        emit(event="gossip", origin=origin, nonces=[r.nonce for r in records], t=time.time())

    settings = NetSettings(listen=a.listen, peers=list(genesis.bootstrap),
                           relays=relay_addresses(genesis), hole_punch=not a.no_punch,
                           relay_wait=1.0, liveness_interval=3.0,
                           liveness_timeout=2.0)  # fmt: skip
    node = NetNode(me, genesis, settings, on_gossip=on_gossip, slot_policy=lambda r: None)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            emit(event="ready", did=me.did, peer=str(me.peer_id))

            async def report() -> None:
                while True:
                    emit(
                        event="conn",
                        kinds=connection_kinds(node.host, node.member_peers),
                        reserved=bool(node.relay_client and node.relay_client.reserved()),
                    )
                    await trio.sleep(0.5)

            nursery.start_soon(report)
            nursery.start_soon(publish_orders, node, me, a.name, slot, emit)
            nursery.start_soon(stop_on_signal, node, nursery.cancel_scope)

    trio.run(main)


# -- the parent: namespaces, processes, checks ---------------------------------------------


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=check)


def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed"
    probe = f"mgp{uuid.uuid4().hex[:8]}"
    try:
        result = _run("ip", "netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ip netns add failed: {exc}"
    if result.returncode != 0:
        return f"ip netns add failed: {result.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


class Net:
    """The namespaces of one test run (unique names), torn down by :meth:`close`."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.created: list[str] = []

    def ns(self, role: str) -> str:
        return f"mg{self.tag}{role}"

    def sh(self, role: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.ns(role), *cmd, check=check)

    def add(self, role: str) -> None:
        _run("ip", "netns", "add", self.ns(role))
        self.created.append(self.ns(role))
        self.sh(role, "ip", "link", "set", "lo", "up")

    def link(self, a: str, a_if: str, a_ip: str, b: str, b_if: str, b_ip: str) -> None:
        """A veth pair between namespaces ``a`` and ``b`` with the given addresses."""
        tmp_a, tmp_b = f"v{self.tag}{a_if}"[:15], f"v{self.tag}{b_if}"[:15]
        _run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _run("ip", "link", "set", tmp_a, "netns", self.ns(a))
        _run("ip", "link", "set", tmp_b, "netns", self.ns(b))
        for role, tmp, name, ip in ((a, tmp_a, a_if, a_ip), (b, tmp_b, b_if, b_ip)):
            self.sh(role, "ip", "link", "set", tmp, "name", name)
            self.sh(role, "ip", "addr", "add", ip, "dev", name)
            self.sh(role, "ip", "link", "set", name, "up")

    def close(self) -> None:
        for name in reversed(self.created):
            for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", name, check=False)
        self.created.clear()


NAT_RULES = """
table ip mgnat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" accept
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }
}
"""
REJECTING_NAT_RULES = NAT_RULES.replace('iifname "wan" drop', 'iifname "wan" accept')
"""A NAT whose router answers an unsolicited SYN to its own address (no mapping yet) with a
RST, as Linux does with no input firewall: the RST tears down the other side's fresh mapping
and hole punching fails unless both SYNs cross in flight."""


def build(net: Net, rules: str = NAT_RULES) -> None:
    """The topology of the module docstring; ``rules``: the routers' nftables ruleset."""
    for role in ("wan", "pub", "nat1", "nat2", "h1", "h2"):
        net.add(role)
    net.link("wan", "pub", "203.0.113.1/24", "pub", "eth0", f"{PUBLIC_IP}/24")
    net.link("wan", "n1", "198.51.100.1/29", "nat1", "wan", "198.51.100.2/29")
    net.link("wan", "n2", "198.51.100.9/29", "nat2", "wan", "198.51.100.10/29")
    net.link("nat1", "lan", "192.168.1.1/24", "h1", "eth0", "192.168.1.2/24")
    net.link("nat2", "lan", "192.168.2.1/24", "h2", "eth0", "192.168.2.2/24")
    net.sh("pub", "ip", "route", "add", "default", "via", "203.0.113.1")
    for i, router in ((1, "nat1"), (2, "nat2")):
        net.sh(router, "ip", "route", "add", "default", "via", f"198.51.100.{8 * i - 7}")
        net.sh(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        subprocess.run(["ip", "netns", "exec", net.ns(router), "nft", "-f", "-"],
                       input=rules, text=True, capture_output=True, timeout=20,
                       check=True)  # fmt: skip
        net.sh(f"h{i}", "ip", "route", "add", "default", "via", f"192.168.{i}.1")
    net.sh("wan", "sysctl", "-qw", "net.ipv4.ip_forward=1")


class Proc:
    """A child process in a namespace, its JSON-line events collected by a reader thread."""

    def __init__(self, net: Net, role: str, argv: list[str], log: Path) -> None:
        import threading

        self.events: list[dict[str, Any]] = []
        self.log = log.open("w")
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", net.ns(role), *argv], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True,
        )  # fmt: skip
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.log.write(line)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.log.close()

    def kinds(self) -> dict[str, str]:
        """The latest report of how each member is connected."""
        for e in reversed(self.events):
            if e.get("event") == "conn":
                return e["kinds"]
        return {}

    def gossip_from(self, did: str, after: float = 0.0) -> int:
        return sum(
            1
            for e in list(self.events)
            if e.get("event") == "gossip" and e["origin"] == did and e["t"] > after
        )


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` every 0.2 s; returns the seconds it took, fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def nat_grid(tmp_path: Path, *, punch: bool, rules: str = NAT_RULES
             ) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The namespaces, a genesis naming the operator node, the operator and two homes."""
    from market import MarketConfig
    from market.models import MemberRole
    from market.signing import Signer
    from node.setup.genesis import create_genesis, write_genesis
    from node.setup.keyfile import NodeIdentity
    from node.testing.harness import named_seed

    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    op_seed = named_seed("nat-test/operator-node")
    op = NodeIdentity.from_seed(op_seed)
    homes = {n: NodeIdentity.from_seed(named_seed(f"nat-test/{n}")) for n in ("h1", "h2")}
    operator = Signer.from_seed(named_seed("nat-test/operator-key"))
    market = MarketConfig(grid="nat-grid", operator=operator.did, feed_in_tariff=8,
                          retail_price=30)  # fmt: skip
    genesis = create_genesis(
        operator, market, [(h.did, f"m-{n}", MemberRole.VOTER) for n, h in homes.items()],
        gate_closure_lead_seconds=0,
        bootstrap=[f"/ip4/{PUBLIC_IP}/tcp/{OP_PORT}/p2p/{op.peer_id}"],
    )  # fmt: skip
    write_genesis(genesis, tmp_path / "genesis.json", overwrite=True)
    key = tmp_path / "op" / "node.key"
    key.parent.mkdir()
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, op_seed)
    os.close(fd)
    (tmp_path / "op" / "operator.toml").write_text(
        f'key_path = "node.key"\ngenesis_path = "../genesis.json"\ndata_dir = "data"\n'
        f'listen = "/ip4/0.0.0.0/tcp/{OP_PORT}"\napi_port = 8400\nlog_level = "INFO"\n'
    )
    net = Net()
    procs: list[Proc] = []
    try:
        build(net, rules)
        py = [sys.executable, "-m"]

        def start_operator() -> Proc:
            p = Proc(net, "pub", [*py, "node.cli", "operator", "run", "--config",
                                  str(tmp_path / "op" / "operator.toml")],
                     tmp_path / f"operator-{len(procs)}.log")  # fmt: skip
            procs.append(p)
            return p

        def start_home(name: str) -> Proc:
            argv = [
                *py,
                "tests.net.test_nat",
                "child",
                "--name",
                name,
                "--genesis",
                str(tmp_path / "genesis.json"),
                "--listen",
                f"/ip4/0.0.0.0/tcp/{HOME_PORT}",
            ] + ([] if punch else ["--no-punch"])
            p = Proc(net, name, argv, tmp_path / f"{name}-{len(procs)}.log")
            procs.append(p)
            return p

        g = {"net": net, "operator": start_operator(), "start_operator": start_operator,
             "h1": start_home("h1"), "h2": start_home("h2"),
             "did": {n: h.did for n, h in homes.items()}, "tmp": tmp_path}  # fmt: skip
        yield g
    finally:
        for p in procs:
            p.stop()
        net.close()
        for p in procs:
            if p.proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
                print(f"--- {p.log.name} exited {p.proc.returncode}")


def _connected(g: dict[str, Any], kind: str | None = None) -> bool:
    k1 = g["h1"].kinds().get(g["did"]["h2"])
    k2 = g["h2"].kinds().get(g["did"]["h1"])
    return k1 is not None and k2 is not None and (kind is None or (k1 == kind and k2 == kind))


def _gossip_flows(g: dict[str, Any], after: float) -> bool:
    return (g["h1"].gossip_from(g["did"]["h2"], after) >= 2
            and g["h2"].gossip_from(g["did"]["h1"], after) >= 2)  # fmt: skip


pytestmark = pytest.mark.slow


def test_nat_relay_then_hole_punch_survives_the_relay_cut(tmp_path: Path) -> None:
    """Relay first, DCUtR to direct, gossip with the operator killed, address change."""
    with nat_grid(tmp_path, punch=True) as g:
        took = wait_until(lambda: _connected(g), 60, "the homes connected (relay)")
        print(f"connected after {took:.1f} s: {g['h1'].kinds()}")
        wait_until(lambda: _gossip_flows(g, 0), 30, "gossip both ways")
        took = wait_until(lambda: _connected(g, "direct"), 60, "a hole-punched connection")
        print(f"direct after {took:.1f} s more")
        # cut the relay: the operator node is killed; the direct connection carries gossip
        g["operator"].stop(signal.SIGKILL)
        cut = time.time()
        wait_until(lambda: _gossip_flows(g, cut), 20, "gossip with the relay cut")
        assert _connected(g, "direct")
        # the relay returns; then h2's public address changes (its NAT's WAN address)
        g["start_operator"]()
        net = g["net"]
        net.sh("nat2", "ip", "addr", "del", "198.51.100.10/29", "dev", "wan")
        net.sh("nat2", "ip", "addr", "add", "198.51.100.11/29", "dev", "wan")
        net.sh("nat2", "ip", "route", "replace", "default", "via", "198.51.100.9")
        net.sh("nat2", "conntrack", "-F", check=False)  # if installed
        moved = time.time()
        try:
            took = wait_until(lambda: _gossip_flows(g, moved), 90, "gossip after h2 moved")
        finally:
            print("h1", [e for e in g["h1"].events if e.get("event") == "conn"][-1:])
            print("h2", [e for e in g["h2"].events if e.get("event") == "conn"][-1:])
        print(f"gossip again {took:.1f} s after the address change: {g['h1'].kinds()}")


def test_nat_relay_only_recovers_when_the_relay_returns(tmp_path: Path) -> None:
    """Without hole punching the homes stay relayed; cutting the relay stops gossip; the
    grid recovers once the operator node is back."""
    with nat_grid(tmp_path, punch=False) as g:
        wait_until(lambda: _connected(g, "relayed"), 60, "the homes connected (relay)")
        wait_until(lambda: _gossip_flows(g, 0), 30, "gossip both ways over the relay")
        g["operator"].stop(signal.SIGKILL)
        wait_until(lambda: not _connected(g), 20, "the circuit gone with the relay")
        time.sleep(3)
        quiet = time.time()
        time.sleep(3)
        assert g["h1"].gossip_from(g["did"]["h2"], quiet) == 0  # no path between the homes
        g["start_operator"]()
        back = time.time()
        took = wait_until(lambda: _gossip_flows(g, back), 60, "gossip after the relay returned")
        print(f"gossip again {took:.1f} s after the operator restarted")
        wait_until(lambda: _connected(g, "relayed"), 10, "both ends report a relayed connection")


def test_nat_rejecting_router_stays_on_the_relay(tmp_path: Path) -> None:
    """Routers that answer unsolicited SYNs with a RST: DCUtR runs and fails (py-libp2p 0.8.1
    gives up after 3 attempts per peer), the homes keep gossiping over the relay."""
    with nat_grid(tmp_path, punch=True, rules=REJECTING_NAT_RULES) as g:
        wait_until(lambda: _connected(g, "relayed"), 60, "the homes connected (relay)")
        wait_until(lambda: _gossip_flows(g, 0), 30, "gossip both ways over the relay")
        time.sleep(15)  # DCUtR's rounds (every 2 s, up to 3 attempts) are over by then
        later = time.time()
        wait_until(lambda: _gossip_flows(g, later), 20, "gossip still flowing")
        kinds = (g["h1"].kinds(), g["h2"].kinds())
        print(f"after DCUtR gave up: {kinds}")
        assert _connected(g, "relayed"), kinds


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    _child(sys.argv[2:])
