"""The whole grid behind NAT (issue 17): households in homes with no inbound port elect, trade
and settle through the operator node's relay, then over hole-punched direct connections, and
keep settling with the relay cut.

Topology (network namespaces the test creates; the NAT routers are tests/net/test_nat.py's)::

    [pub] 203.0.113.2 --- [wan] --- 198.51.100.2  [nat1] 192.168.1.1 --- 192.168.1.2 [h1]
                             |----- 198.51.100.10 [nat2] 192.168.2.1 --- 192.168.2.2 [h2]
                             \\----- 198.51.100.18 [nat3] 192.168.3.1 --- 192.168.3.2 [h3]

``pub`` runs the operator node (``microgrid operator run``: relay hop, bootstrap, Raft learner;
the only address the genesis names). Each ``nat<i>`` masquerades its home's traffic (nftables)
and drops every new inbound connection. Each ``h<i>`` runs a real household, ``microgrid node
run`` (meter, agent, Raft voter: three voters, a majority of two, ledger), listening on its LAN
address. The meter simulator and the test stay in the root namespace, joined to ``pub`` and to
each home by a *management* veth (:class:`Mgmt`, a /30 each): a home routes only the
simulator's address over it (its meter, like a meter on the home LAN) and the root namespace
only the home's LAN address (the test reads every node's ``/status``); the homes never reach
each other that way (no route, and the root namespace does not forward).

``test_grid_behind_nat_settles_through_the_relay_and_survives_its_cut`` (CI, 26-35 s):

1. the households connect through the relay, elect a leader, clear orders and settle slots;
2. DCUtR replaces every relayed household pair with a direct connection;
3. the relay cut (the operator node SIGKILLed): two more slots, one of them after the cut,
   settle on every household over the direct connections, which stay direct;
4. the operator node returns and catches up (a learner, over Raft);
5. after the stop every ledger verifies (``microgrid ledger verify``'s check), the households'
   heads are equal, the operator's ledger is a prefix of theirs reaching the height they had
   while it ran, and orders were matched.

With ``--soak`` (opt-in, ~35-45 s each): hole punching off (``hole_punch = false``), cutting the
relay stops settlement (no path between the homes) and the grid settles again once the relay
returns; and a home's public address changes mid-run (liveness pings every 2 s) and every
household settles again.

Skipped with the reason where network namespaces are unavailable (not root, no ``ip``/``nft``).
Every namespace, process and file is removed in a ``finally``; every wait is bounded.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from sqlalchemy import create_engine, func, select

from node.ledger import schema as t
from node.ledger.verify import verify_ledger
from node.setup.keyfile import create_key_file
from node.tools.demo import Demo, DemoSettings, fetch
from tests.net.test_nat import NAT_RULES, OP_PORT, PUBLIC_IP, Net, Proc, _netns_unavailable

pytestmark = pytest.mark.slow

HOMES = 3
SLOT_SECONDS = 5
OP_API_PORT = 8400


def home_ip(i: int) -> str:
    """Home ``i``'s (1-based) LAN address: its node's listen and API address."""
    return f"192.168.{i}.2"


def nat_wan_ip(i: int, moved: bool = False) -> str:
    """NAT router ``i``'s public (WAN) address."""
    return f"198.51.100.{8 * (i - 1) + (3 if moved else 2)}"


class Mgmt:
    """The management links of one run: ``10.79.<subnet>.<4n>/30`` for link ``n`` (0: ``pub``,
    ``i``: home ``i``), ``.4n+1`` the root end, ``.4n+2`` the namespace's ``mgmt``. The subnet
    is one no interface of this machine uses yet (a run killed before its cleanup leaves its
    addresses behind until its namespaces are removed)."""

    def __init__(self) -> None:
        used = set(re.findall(r"inet 10\.79\.(\d+)\.", _sh("ip", "-4", "-o", "addr", "show")))
        free = [n for n in range(256) if str(n) not in used]
        if not free:
            raise RuntimeError("no free 10.79.x.0/24 for the management links")
        self.subnet = free[0]
        self.made: list[str] = []
        """Root-namespace interfaces of the links made."""

    def root(self, n: int) -> str:
        """The root namespace's end of link ``n``."""
        return f"10.79.{self.subnet}.{4 * n + 1}"

    def far(self, n: int) -> str:
        """The namespace's end of link ``n``."""
        return f"10.79.{self.subnet}.{4 * n + 2}"

    @property
    def sim_host(self) -> str:
        """Where the meter simulator listens: the root end of ``pub``'s link."""
        return self.root(0)

    @property
    def operator_api(self) -> str:
        """The operator node's API base URL (its end of ``pub``'s link)."""
        return f"http://{self.far(0)}:{OP_API_PORT}"

    def close(self) -> None:
        """Delete the root ends of the links made (and so the links): a deleted namespace can
        linger in the kernel, its veths with it, while sockets of its processes wind down."""
        for name in self.made:
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=20)
        self.made.clear()

    def link(self, net: Net, role: str, n: int) -> None:
        """Link ``n`` between the root namespace and ``role`` (deleting the namespace removes
        both ends and the routes through them)."""
        root_if = f"m{net.tag}{role}"[:15]
        _sh("ip", "link", "add", root_if, "type", "veth", "peer", "name", "mgmt", "netns",
            net.ns(role))  # fmt: skip
        self.made.append(root_if)
        _sh("ip", "addr", "add", f"{self.root(n)}/30", "dev", root_if)
        _sh("ip", "link", "set", root_if, "up")
        net.sh(role, "ip", "addr", "add", f"{self.far(n)}/30", "dev", "mgmt")
        net.sh(role, "ip", "link", "set", "mgmt", "up")


def _sh(*cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=20,
                          check=True).stdout  # fmt: skip


def build_grid(net: Net, mgmt: Mgmt) -> None:
    """The topology of the module docstring, its management links ``mgmt``."""
    roles = ["wan", "pub", *(f"nat{i}" for i in range(1, HOMES + 1)),
             *(f"h{i}" for i in range(1, HOMES + 1))]  # fmt: skip
    for role in roles:
        net.add(role)
    net.link("wan", "pub", "203.0.113.1/24", "pub", "eth0", f"{PUBLIC_IP}/24")
    net.sh("pub", "ip", "route", "add", "default", "via", "203.0.113.1")
    net.sh("wan", "sysctl", "-qw", "net.ipv4.ip_forward=1")
    mgmt.link(net, "pub", 0)
    for i in range(1, HOMES + 1):
        router, home = f"nat{i}", f"h{i}"
        gw = f"198.51.100.{8 * (i - 1) + 1}"
        net.link("wan", f"n{i}", f"{gw}/29", router, "wan", f"{nat_wan_ip(i)}/29")
        net.link(router, "lan", f"192.168.{i}.1/24", home, "eth0", f"{home_ip(i)}/24")
        net.sh(router, "ip", "route", "add", "default", "via", gw)
        net.sh(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _sh("ip", "netns", "exec", net.ns(router), "nft", "-f", "-", stdin=NAT_RULES)
        net.sh(home, "ip", "route", "add", "default", "via", f"192.168.{i}.1")
        mgmt.link(net, home, i)
        # the home reaches the meter simulator, and the test the home's API, over this link only
        net.sh(home, "ip", "route", "add", f"{mgmt.sim_host}/32", "via", mgmt.root(i))
        # replace: a stale run's route may linger while the kernel dismantles its namespaces
        _sh("ip", "route", "replace", f"{home_ip(i)}/32", "via", mgmt.far(i))


def write_operator(directory: Path, settings: DemoSettings, mgmt: Mgmt) -> tuple[Path, str]:
    """The operator node's key and ``operator.toml`` (next to the demo's genesis); returns
    the config path and its bootstrap multiaddr."""
    directory.mkdir(parents=True)
    identity = create_key_file(directory / "node.key")
    (directory / "operator.toml").write_text(
        'key_path = "node.key"\ngenesis_path = "../demo/genesis.json"\ndata_dir = "data"\n'
        f'listen = "/ip4/{PUBLIC_IP}/tcp/{OP_PORT}"\n'
        f'api_host = "{mgmt.far(0)}"\napi_port = {OP_API_PORT}\nlog_level = "INFO"\n'
        f"raft_tick_seconds = {settings.raft_tick_seconds}\n"
        f"raft_election_ticks = {settings.raft_election_ticks}\n"
        f"raft_heartbeat_ticks = {settings.raft_heartbeat_ticks}\n"
    )
    return directory / "operator.toml", f"/ip4/{PUBLIC_IP}/tcp/{OP_PORT}/p2p/{identity.peer_id}"


def all_connected(docs: dict[str, dict[str, Any]], dids: dict[str, str],
                  kind: str | None = None) -> bool:  # fmt: skip
    """Every household reports a connection (``kind``: of that kind, ``direct`` or
    ``relayed``) to every other."""
    for name in dids:
        conns = docs.get(name, {}).get("connectivity", {}).get("connections", {})
        for n, other in dids.items():
            if n != name and (other not in conns or kind not in (None, conns[other])):
                return False
    return True


def trades(url: str) -> int:
    """How many trades a ledger records."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(t.trades)).scalar_one())
    finally:
        engine.dispose()


def block_hash(url: str, height: int) -> str | None:
    """The hash of a ledger's block at ``height`` (None if it has none)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                select(t.blocks.c.hash).where(t.blocks.c.height == height)
            ).scalar_one_or_none()
    finally:
        engine.dispose()


def block_slots(url: str) -> set[int]:
    """The slots a ledger holds a block for."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {int(r.slot) for r in conn.execute(select(t.blocks.c.slot))}
    finally:
        engine.dispose()


async def operator_head(api: str) -> tuple[int, str | None] | None:
    """The operator node's ledger (height, head hash) from its API at ``api``, None if it does
    not answer."""
    doc = await fetch(f"{api}/status")
    if doc is None:
        return None
    return int(doc["ledger"]["height"]), doc["ledger"]["head_hash"]


def test_household_nat_settings_reach_the_network_layer() -> None:
    """``hole_punch`` and ``liveness_seconds`` (file or ``MICROGRID_*``) become the host's
    ``hole_punch`` and ``liveness_interval``; bad values are refused, naming the setting."""
    from market import MarketConfig
    from market.models import MemberRole
    from market.signing import Signer
    from node.net.host import NetSettings
    from node.setup.config import ConfigError, load_config
    from node.setup.genesis import create_genesis
    from node.setup.keyfile import NodeIdentity
    from node.testing.harness import named_seed

    default = load_config(None, environ={})
    assert (default.hole_punch, default.liveness_seconds) == (True, 30.0)
    config = load_config(None, environ={"MICROGRID_HOLE_PUNCH": "false",
                                        "MICROGRID_LIVENESS_SECONDS": "2"})  # fmt: skip
    me = NodeIdentity.from_seed(named_seed("nat-grid/config/home"))
    relay = NodeIdentity.from_seed(named_seed("nat-grid/config/operator-node"))
    operator = Signer.from_seed(named_seed("nat-grid/config/operator"))
    genesis = create_genesis(
        operator, MarketConfig(grid="g", operator=operator.did, feed_in_tariff=8,
                               retail_price=30),
        [(me.did, "m-1", MemberRole.VOTER)],
        bootstrap=[f"/ip4/{PUBLIC_IP}/tcp/{OP_PORT}/p2p/{relay.peer_id}"],
    )  # fmt: skip
    net = NetSettings.from_config(config, me, genesis)
    assert (net.hole_punch, net.liveness_interval) == (False, 2.0)
    assert list(net.relays) == list(genesis.bootstrap)  # the operator node is the relay
    for env in ({"MICROGRID_HOLE_PUNCH": "maybe"}, {"MICROGRID_LIVENESS_SECONDS": "0"},
                {"MICROGRID_LIVENESS_SECONDS": "-1"}):  # fmt: skip
        with pytest.raises(ConfigError, match=next(iter(env)).removeprefix("MICROGRID_").lower()):
            load_config(None, environ=env)


@pytest.fixture
def netns() -> None:
    """Skip, with the reason, where network namespaces are unavailable (a sync fixture: an
    async test's own ``pytest.skip`` loses its reason under pytest-trio)."""
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def soak_only(soak: bool) -> None:
    """Skip unless ``--soak``: the further grids behind NAT (~35-45 s each) are opt-in."""
    if not soak:
        pytest.skip("a further grid behind NAT (~35-45 s): run with --soak")


class NatGrid:
    """A running grid behind NAT: the namespaces, the demo's households, the operator node."""

    def __init__(self, net: Net, mgmt: Mgmt, demo: Demo, op_config: Path, logs: Path) -> None:
        self.net = net
        self.mgmt = mgmt
        self.demo = demo
        self.op_config = op_config
        self.logs = logs
        self.operators: list[Proc] = []
        self.began = time.monotonic()
        self.marks: dict[str, float] = {}
        self.dids: dict[str, str] = {}
        self.target = 0
        """A height every household had reached while the operator node ran (its ledger must
        reach it too)."""

    def mark(self, what: str) -> None:
        """Record (and print) when ``what`` happened, in seconds since the start."""
        self.marks[what] = round(time.monotonic() - self.began, 1)
        print(f"{self.marks[what]:6.1f} s  {what}")

    def start_operator(self) -> Proc:
        """Start (or restart) the operator node in ``pub``."""
        p = Proc(self.net, "pub", [sys.executable, "-m", "node.cli", "operator", "run",
                                   "--config", str(self.op_config)],
                 self.logs / f"operator-{len(self.operators)}.log")  # fmt: skip
        self.operators.append(p)
        return p

    def kill_operator(self) -> None:
        """The relay cut: SIGKILL the operator node."""
        self.operators[-1].stop(signal.SIGKILL)
        self.mark("operator killed (relay cut)")

    async def watch(self, kind: str) -> None:
        """Mark when every household pair is first connected, then first connected ``kind``."""
        first = "every household pair connected"
        then = f"every household pair {kind}"
        while then not in self.marks:
            docs = await self.demo.statuses()
            if first not in self.marks and all_connected(docs, self.dids):
                self.mark(first)
            if all_connected(docs, self.dids, kind):
                self.mark(then)
            await trio.sleep(0.5)

    async def settle_after(self, slot: int, rounds: int, timeout: float) -> None:
        """Wait until ``rounds`` more slots, one of them after ``slot``, settled on every live
        household (the demo's table rows)."""
        await self.demo.print_new_rounds()
        before = self.demo.rounds
        with trio.fail_after(timeout):
            while self.demo.rounds < before + rounds or (self.demo.printed_through or 0) <= slot:
                await self.demo.print_new_rounds()
                await trio.sleep(0.25)

    async def operator_catches_up(self, timeout: float = 40) -> None:
        """Wait until the operator node's ledger reaches the households' height."""
        docs = await self.demo.statuses()
        self.target = max(d["ledger"]["height"] for d in docs.values())
        with trio.fail_after(timeout):
            while (head := await operator_head(self.mgmt.operator_api)) is None or head[
                0
            ] < self.target:
                await trio.sleep(0.5)
        self.mark("operator caught up")

    def check_ledgers(self) -> None:
        """After the stop: every household's ledger verifies and all heads are equal; the
        operator's verifies, reached :attr:`target` and is the households' chain; orders were
        matched."""
        verdict = self.demo.verdict()
        assert verdict.ok, verdict.message
        op = verify_ledger(f"sqlite:///{self.op_config.parent / 'data' / 'ledger.db'}")
        assert op.ok, op.error
        # the households stopped first: the operator may lack their very last block, but what
        # it has is their chain
        first = self.demo.households[0].ledger_url
        assert self.target <= op.height <= verdict.reports["h1"].height
        assert op.head_hash == block_hash(first, op.height)
        assert trades(first) > 0, "no order was ever matched"
        print(f"timings: {self.marks}; {verdict.message}; operator at {op.height}")


@asynccontextmanager
async def nat_grid(tmp_path: Path, **environment: str) -> AsyncIterator[NatGrid]:
    """The namespaces, the operator node and the households (their node processes get
    ``environment`` on top of this process's, e.g. ``MICROGRID_HOLE_PUNCH="false"``); inside,
    the grid runs; on the way out the households are stopped (after they agree on a height),
    then the operator; then :meth:`NatGrid.check_ledgers` may run. Skips where namespaces are
    unavailable; removes every namespace and process in a ``finally``."""
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    net = Net()
    mgmt = Mgmt()
    demo: Demo | None = None
    grid: NatGrid | None = None
    try:
        build_grid(net, mgmt)
        settings = DemoSettings(
            households=HOMES, voters=HOMES, slot_seconds=SLOT_SECONDS, dashboard=False,
            directory=tmp_path / "demo", sim_host=mgmt.sim_host,
            hosts=tuple(home_ip(i) for i in range(1, HOMES + 1)),
            node_prefixes=tuple(("ip", "netns", "exec", net.ns(f"h{i}"))
                                for i in range(1, HOMES + 1)),
            environment={i: dict(environment) for i in range(1, HOMES + 1)},
        )  # fmt: skip
        op_config, op_addr = write_operator(tmp_path / "op", settings, mgmt)
        settings.bootstrap = (op_addr,)
        demo = Demo(settings, out=lambda line: None)
        grid = NatGrid(net, mgmt, demo, op_config, tmp_path)

        async def before_start() -> None:
            assert grid is not None
            grid.start_operator()

        async with demo.running(quiesce_timeout=3 * SLOT_SECONDS, before_start=before_start):
            grid.dids = {h.name: h.did for h in demo.households}
            yield grid
        for p in grid.operators:
            p.stop()
    finally:
        for p in grid.operators if grid is not None else ():
            p.stop(signal.SIGKILL)
        net.close()
        mgmt.close()
        if demo is not None:
            demo.close()


async def test_grid_behind_nat_settles_through_the_relay_and_survives_its_cut(
    tmp_path: Path, netns: None
) -> None:
    """Relay, election and settlement; direct connections; settling with the relay cut; the
    operator returns and catches up; every ledger verifies and agrees."""
    async with nat_grid(tmp_path) as g, trio.open_nursery() as nursery:
        nursery.start_soon(g.watch, "direct")
        await g.demo.wait_until(
            lambda docs: len(docs) == HOMES and g.demo.leader_name(docs) != "-", 60
        )
        g.mark("leader elected")
        await g.demo.wait_rounds(1, 60)
        g.mark("a slot settled on every household")
        with trio.fail_after(40):  # DCUtR: every pair direct
            while "every household pair direct" not in g.marks:
                await trio.sleep(0.2)
        g.kill_operator()
        cut = g.demo.schedule.slot_at(time.time())
        await g.settle_after(cut, 2, 6 * SLOT_SECONDS)
        g.mark("2 more slots settled on every household, relay cut")
        docs = await g.demo.statuses()
        assert len(docs) == HOMES and all_connected(docs, g.dids, "direct"), docs
        g.start_operator()
        await g.operator_catches_up()
    g.check_ledgers()
    settled = block_slots(g.demo.households[0].ledger_url)
    lost = set(range(cut - 1, max(settled) + 1)) - settled
    assert not lost, f"slots lost around the relay cut: {sorted(lost)}"


@pytest.mark.soak
async def test_grid_behind_nat_relay_only_recovers_when_the_relay_returns(
    tmp_path: Path, soak_only: None, netns: None
) -> None:
    """Hole punching off (``hole_punch = false``): the grid settles over the relay, stops when
    the relay is cut (no path between the homes) and settles again once it returns."""
    async with nat_grid(tmp_path, MICROGRID_HOLE_PUNCH="false") as g:
        await g.demo.wait_rounds(1, 60)
        g.mark("a slot settled on every household")
        await g.demo.wait_until(lambda docs: all_connected(docs, g.dids, "relayed"), 20)
        g.kill_operator()
        await g.demo.wait_until(
            lambda docs: not any(
                d["connectivity"]["connections"].get(did)
                for d in docs.values() for did in g.dids.values()
            ), 20,
        )  # fmt: skip
        g.mark("no household connected to another")
        quiet = await g.demo.statuses()
        await trio.sleep(2 * SLOT_SECONDS)
        later = await g.demo.statuses()
        assert {n: d["ledger"]["height"] for n, d in later.items()} == {
            n: d["ledger"]["height"] for n, d in quiet.items()
        }, "settled with no path between the homes"
        g.start_operator()
        await g.settle_after(g.demo.schedule.slot_at(time.time()), 1, 60)
        g.mark("settling again after the relay returned")
        await g.operator_catches_up()
    g.check_ledgers()


@pytest.mark.soak
async def test_grid_behind_nat_settles_again_after_a_home_moves(
    tmp_path: Path, soak_only: None, netns: None
) -> None:
    """A home's public address changes mid-run (its NAT's WAN address replaced): its dead
    connections are dropped by the liveness pings (every 2 s here), it reconnects through the
    relay and every household settles again."""
    async with nat_grid(tmp_path, MICROGRID_LIVENESS_SECONDS="2") as g, \
            trio.open_nursery() as nursery:  # fmt: skip
        nursery.start_soon(g.watch, "direct")
        await g.demo.wait_rounds(1, 60)
        with trio.fail_after(40):
            while "every household pair direct" not in g.marks:
                await trio.sleep(0.2)
        net = g.net
        net.sh("nat3", "ip", "addr", "del", f"{nat_wan_ip(3)}/29", "dev", "wan")
        net.sh("nat3", "ip", "addr", "add", f"{nat_wan_ip(3, moved=True)}/29", "dev", "wan")
        net.sh("nat3", "ip", "route", "replace", "default", "via", "198.51.100.17")
        net.sh("nat3", "conntrack", "-F", check=False)  # if installed
        g.mark("h3's public address changed")
        await g.settle_after(g.demo.schedule.slot_at(time.time()) + 1, 2, 90)
        g.mark("2 slots settled on every household after the move")
        await g.operator_catches_up()
    g.check_ledgers()
