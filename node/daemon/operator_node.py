"""The grid operator's node (``microgrid operator run --config FILE``).

A process with a public address that is the grid's **circuit relay v2 hop** and **bootstrap
peer**, and follows the replicated log as a **non-voting, non-trading Raft learner** with its
own ledger (SQLite in ``data_dir``), which its optional dashboard and archive read. It never
votes (it is a learner in every node's initial Raft configuration and outside the engine's
members, so the membership controller never promotes it), never trades or signs readings (no
meters, no agent; it subscribes to no gossip topic, so it neither receives nor forwards the
households' records), and holds the operator's governance key only if ``operator_key_path`` is
configured (checked against the genesis operator; used for nothing else in this version).

**Admission.** The operator node's peer id is named in the operator-signed genesis' bootstrap
list (``microgrid genesis create --bootstrap /ip4/<public ip>/tcp/4001/p2p/<operator node peer
id>``). A bootstrap peer that is not a household is an *infrastructure peer*
(:func:`node.net.relay.infrastructure_peers`): every node's connection gate admits it, its Raft
frames and block requests are accepted, households use it as their relay, and it is a Raft
learner from genesis on. Nobody but the operator can add one (the genesis signature), and it
gains no market rights: the engine does not know it.

Supervised children: ``microgrid dashboard --db <ledger>`` (node never imports dashboard) and
``microgrid archive --from <ledger> --to <url> --follow``; each restarted with back-off if it
exits, stopped (SIGTERM, then SIGKILL after 5 s) when the node stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from node.daemon.block_filler import BlockFiller
from node.daemon.consensus import ConsensusDriver
from node.daemon.household_node import NodeError, open_replica
from node.daemon.http_api import Api, Request
from node.daemon.proposer import Proposer
from node.ledger import LedgerStore
from node.net.block_sync import (
    BLOCKS_PROTOCOL,
    BlockServer,
    store_exporter,
)
from node.net.host import NetNode, NetSettings
from node.net.relay import infrastructure_learners
from node.raft import Config, RaftNode, decode_message, encode_message
from node.raft.storage_sql import SQLStorage
from node.setup.config import ledger_url, raft_url
from node.setup.genesis import Genesis
from node.setup.keyfile import KeyFileError, NodeIdentity, load_key_file

log = logging.getLogger("microgrid.operator")

DEFAULT_OPERATOR_LISTEN = "/ip4/0.0.0.0/tcp/4001"
CHILD_STOP_SECONDS = 5.0
CHILD_RESTART_MAX = 60.0


class OperatorConfigError(ValueError):
    """The operator node's config file or an override is invalid; names the source and key."""


@dataclass(frozen=True)
class DashboardSetting:
    """``[dashboard]``: serve ``microgrid dashboard`` over this node's ledger."""

    host: str = "127.0.0.1"
    port: int = 8050
    args: tuple[str, ...] = ()
    """Further ``microgrid dashboard`` options (``["--refresh", "10"]``)."""


@dataclass(frozen=True)
class ArchiveSetting:
    """``[archive]``: ``microgrid archive --follow`` from this node's ledger to ``url``."""

    url: str
    interval: float = 5.0


@dataclass(frozen=True)
class OperatorConfig:
    """Where the operator node finds its key and the genesis, listens and keeps its data."""

    key_path: Path = Path("node.key")
    genesis_path: Path = Path("genesis.json")
    data_dir: Path = Path("data")
    listen: str = DEFAULT_OPERATOR_LISTEN
    peers: tuple[str, ...] = ()
    api_host: str = "127.0.0.1"
    api_port: int = 8400
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    log_level: str = "INFO"
    log_format: str = "text"
    raft_tick_seconds: float = 0.25
    raft_election_ticks: int = 20
    raft_heartbeat_ticks: int = 4
    raft_snapshot_entries: int = 5000
    max_households: int = 256
    """Relay reservations (one per household) and circuits per household it accepts."""
    operator_key_path: Path | None = None
    """The genesis operator's governance key, only if this node should hold it."""
    dashboard: DashboardSetting | None = None
    archive: ArchiveSetting | None = None

    @property
    def ledger_url(self) -> str:
        """SQLAlchemy URL of this node's ledger (what the dashboard and archive read)."""
        return ledger_url(self.data_dir)

    @property
    def raft_url(self) -> str:
        """SQLAlchemy URL of this node's Raft log."""
        return raft_url(self.data_dir)


_SCALARS: dict[str, type] = {
    "listen": str, "api_host": str, "metrics_host": str, "log_level": str, "log_format": str,
    "api_port": int, "metrics_port": int, "raft_election_ticks": int,
    "raft_heartbeat_ticks": int, "raft_snapshot_entries": int, "max_households": int,
    "raft_tick_seconds": float,
}  # fmt: skip
_PATHS = ("key_path", "genesis_path", "data_dir", "operator_key_path")
ENV_PREFIX = "MICROGRID_OPERATOR_"


def _scalar(key: str, value: Any, source: str) -> Any:
    kind = _SCALARS[key]
    if isinstance(value, str) and kind is not str:
        try:
            value = kind(value)
        except ValueError:
            raise OperatorConfigError(f"{source}: {key} must be {kind.__name__}") from None
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise OperatorConfigError(f"{source}: {key} must be {kind.__name__}")
    if key.endswith("_port") and not 0 <= value <= 65535:
        raise OperatorConfigError(f"{source}: {key} must be in 0..65535")
    if kind in (int, float) and not key.endswith("_port") and value <= 0:
        raise OperatorConfigError(f"{source}: {key} must be positive")
    if key == "log_level" and value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise OperatorConfigError(f"{source}: log_level must be DEBUG, INFO, WARNING or ERROR")
    if key == "log_format" and value not in {"text", "json"}:
        raise OperatorConfigError(f"{source}: log_format must be text or json")
    return value.upper() if key == "log_level" else value


def load_operator_config(path: Path | str, environ: dict[str, str] | None = None
                         ) -> OperatorConfig:  # fmt: skip
    """Load the operator node's TOML file (relative paths against its directory), then
    ``MICROGRID_OPERATOR_<KEY>`` overrides of the scalar settings and
    ``MICROGRID_ARCHIVE_URL`` (keep a database password out of the file)."""
    environ = dict(os.environ) if environ is None else environ
    path = Path(path)
    source = str(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise OperatorConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:
        raise OperatorConfigError(f"{path}: invalid TOML: {exc}") from None
    base = path.resolve().parent
    known = {*_SCALARS, *_PATHS, "peers", "dashboard", "archive"}
    unknown = set(doc) - known
    if unknown:
        raise OperatorConfigError(f"{source}: unknown settings {sorted(unknown)}")
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _SCALARS:
            values[key] = _scalar(key, value, source)
        elif key in _PATHS:
            if not isinstance(value, str) or not value:
                raise OperatorConfigError(f"{source}: {key} must be a non-empty path")
            values[key] = base / value
        elif key == "peers":
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise OperatorConfigError(f"{source}: peers must be a list of multiaddrs")
            values[key] = tuple(value)
    for key in _SCALARS:
        env = environ.get(ENV_PREFIX + key.upper())
        if env is not None:
            values[key] = _scalar(key, env, ENV_PREFIX + key.upper())
    dash = doc.get("dashboard")
    if dash is not None:
        if not isinstance(dash, dict) or set(dash) - {"host", "port", "args", "enabled"}:
            raise OperatorConfigError(f"{source}: [dashboard] takes host, port, args, enabled")
        if dash.get("enabled", True) is True:
            port = dash.get("port", 8050)
            if type(port) is not int or not 0 < port <= 65535:
                raise OperatorConfigError(f"{source}: [dashboard] port must be in 1..65535")
            args = dash.get("args", [])
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise OperatorConfigError(f"{source}: [dashboard] args must be strings")
            values["dashboard"] = DashboardSetting(str(dash.get("host", "127.0.0.1")), port,
                                                   tuple(args))  # fmt: skip
    arch = doc.get("archive")
    url = environ.get("MICROGRID_ARCHIVE_URL")
    if arch is not None or url:
        arch = arch or {}
        if not isinstance(arch, dict) or set(arch) - {"url", "interval"}:
            raise OperatorConfigError(f"{source}: [archive] takes url and interval")
        url = url or arch.get("url")
        interval = arch.get("interval", 5.0)
        if not isinstance(url, str) or not url:
            raise OperatorConfigError(f"{source}: [archive] url (or MICROGRID_ARCHIVE_URL) "
                                      "is required")  # fmt: skip
        if type(interval) not in (int, float) or interval <= 0:
            raise OperatorConfigError(f"{source}: [archive] interval must be positive")
        values["archive"] = ArchiveSetting(url, float(interval))
    for key in ("key_path", "genesis_path", "data_dir"):  # defaults: next to the file
        values.setdefault(key, base / getattr(OperatorConfig, key))
    return OperatorConfig(**values)


def check_admitted(identity: NodeIdentity, genesis: Genesis) -> None:
    """:class:`NodeError` unless the genesis names this node as infrastructure (a bootstrap
    peer that is not a household)."""
    if genesis.is_member(identity.did):
        raise NodeError(f"{identity.peer_id} is a household of grid {genesis.grid!r}: an "
                        "operator node needs its own key (not a household's)")  # fmt: skip
    if identity.did not in infrastructure_learners(genesis):
        raise NodeError(
            f"this operator node ({identity.peer_id}) is not named in the genesis of grid "
            f"{genesis.grid!r}: the operator admits it by listing its public address in the "
            f"signed genesis' bootstrap list (microgrid genesis create --bootstrap "
            f"/ip4/<public ip>/tcp/<port>/p2p/{identity.peer_id})"
        )


@dataclass
class Child:
    """One supervised subprocess (the dashboard or the archive follower)."""

    name: str
    argv: list[str]
    process: trio.Process | None = None
    starts: int = 0
    last_exit: int | None = None
    log_path: Path | None = None

    def status(self) -> dict[str, Any]:
        """For ``/status``."""
        running = self.process is not None and self.process.returncode is None
        return {"running": running, "pid": self.process.pid if running and self.process else None,
                "starts": self.starts, "last_exit": self.last_exit,
                "log": None if self.log_path is None else str(self.log_path)}  # fmt: skip


class _RaftLink:
    def __init__(self, net: NetNode) -> None:
        self.net = net

    def send(self, message: Any) -> None:
        if self.net.raft is not None:
            self.net.raft.send(message)


@dataclass
class OperatorNode:
    """The operator node. ``await nursery.start(node.run)``; ``node.stop()``."""

    config: OperatorConfig
    identity: NodeIdentity
    genesis: Genesis
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_admitted(self.identity, self.genesis)
        if self.config.operator_key_path is not None:
            try:
                signer = load_key_file(self.config.operator_key_path).signer
            except KeyFileError as exc:
                raise NodeError(f"operator_key_path: {exc}") from None
            if signer.did != self.genesis.operator:
                raise NodeError(f"operator_key_path {self.config.operator_key_path} is "
                                f"{signer.did}, not the genesis operator "
                                f"{self.genesis.operator}")  # fmt: skip
        self.holds_operator_key = self.config.operator_key_path is not None
        config, genesis = self.config, self.genesis
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = LedgerStore(config.ledger_url)
        self.raft_storage = SQLStorage(config.raft_url)
        self.proposer = Proposer(genesis.schedule)
        self.replica = open_replica(genesis, self.store, self.raft_storage)
        self.store.record_schedule(genesis.schedule)
        self.replica.observer = self.proposer.committed
        voters = genesis.voters
        learners = tuple(d for d in genesis.member_dids if d not in voters)
        self.raft = RaftNode(
            Config(id=self.identity.did, voters=voters,
                   learners=learners + infrastructure_learners(genesis),
                   election_tick=config.raft_election_ticks,
                   heartbeat_tick=config.raft_heartbeat_ticks),
            self.raft_storage,
        )  # fmt: skip
        own = str(self.identity.peer_id)
        self.block_server = BlockServer(store_exporter(self.store),
                                        lambda d: self.net.is_allowed_peer(d))  # fmt: skip
        self.net = NetNode(
            self.identity, genesis,
            NetSettings(listen=config.listen,
                        peers=[a for a in (*genesis.bootstrap, *config.peers) if own not in a],
                        metrics_port=config.metrics_port or None,
                        metrics_host=config.metrics_host, relay_hop=True, subscribe=False),
            raft_codec=(encode_message, decode_message), on_raft=self._on_raft,
            stream_handlers=[(BLOCKS_PROTOCOL, self.block_server.handle)],
        )  # fmt: skip
        self.driver = ConsensusDriver(
            raft=self.raft, storage=self.raft_storage, replica=self.replica,
            proposer=self.proposer, transport=_RaftLink(self.net),
            tick_seconds=config.raft_tick_seconds, propose_every=config.raft_tick_seconds,
            snapshot_every=config.raft_snapshot_entries, on_applied=self._on_applied,
        )  # fmt: skip
        self.api = Api("")
        self.api.route("GET", "/status", token=False, params=set())(self._get_status)
        self.api_port: int | None = None
        self._stop = trio.Event()
        self.started = trio.Event()
        self.counters: Counter[str] = Counter()
        """Block sync's events (:class:`~node.daemon.block_filler.BlockFiller`)."""
        self.block_filler = BlockFiller(self.store, self.net, self.counters)
        python = [sys.executable, "-m", "node.cli"]
        logs = config.data_dir
        if config.dashboard is not None:
            d = config.dashboard
            self.children.append(Child("dashboard", [
                *python, "dashboard", "--db", config.ledger_url, "--host", d.host,
                "--port", str(d.port), *(["--api", f"http://{config.api_host}:{config.api_port}"]
                                         if config.api_port else []), *d.args,
            ], log_path=logs / "dashboard.log"))  # fmt: skip
        if config.archive is not None:
            a = config.archive
            self.children.append(Child("archive", [
                *python, "archive", "--from", config.ledger_url, "--to", a.url, "--follow",
                "--interval", str(a.interval)], log_path=logs / "archive.log"))  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[OperatorNode] = trio.TASK_STATUS_IGNORED
                  ) -> None:  # fmt: skip
        """Run until :meth:`stop` or cancellation; children are stopped, stores closed."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.net.run)
                await nursery.start(self.driver.run)
                if self.config.api_port:
                    self.api_port = await nursery.start(self.api.serve, self.config.api_host,
                                                        self.config.api_port)  # fmt: skip
                nursery.start_soon(self.block_filler.run)
                for child in self.children:
                    nursery.start_soon(self._supervise, child)
                log.info("operator node started", extra={
                    "event": "started", "did": self.identity.did, "grid": self.genesis.grid,
                    "listen": self.net.listen_addrs, "api_port": self.api_port})  # fmt: skip
                self.started.set()
                task_status.started(self)
                await self._stop.wait()
                self.net.stop()
                nursery.cancel_scope.cancel()
        finally:
            self.store.close()
            self.raft_storage.close()
            log.info("operator node stopped", extra={"event": "stopped"})

    def stop(self) -> None:
        """Ask :meth:`run` to shut down cleanly."""
        self._stop.set()

    # -- Raft --------------------------------------------------------------------------------

    def _on_raft(self, message: Any) -> None:
        self.driver.deliver(message)

    def _on_applied(self, entries: list[tuple[int, list[Any]]], installed: bool) -> None:
        if installed:
            self.block_filler.wake()

    # -- children ----------------------------------------------------------------------------

    async def _supervise(self, child: Child) -> None:
        """Run ``child``, restarting it with back-off (1 s doubling to 60 s) when it exits."""
        delay = 1.0
        while True:
            assert child.log_path is not None
            with child.log_path.open("ab") as out:
                started = time.monotonic()
                child.starts += 1
                log.info("starting %s", child.name, extra={"event": "child_start",
                                                         "child": child.name})  # fmt: skip
                try:
                    child.process = await trio.lowlevel.open_process(
                        child.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                        start_new_session=True)  # fmt: skip
                except OSError as exc:
                    log.error("cannot start %s: %s", child.name, exc)
                    child.last_exit = -1
                else:
                    try:
                        child.last_exit = await child.process.wait()
                    finally:
                        with trio.CancelScope(shield=True):
                            await _terminate(child.process)
                    log.warning("%s exited with %s", child.name, child.last_exit,
                                extra={"event": "child_exit", "child": child.name})  # fmt: skip
            if time.monotonic() - started > 60:
                delay = 1.0
            await trio.sleep(delay)
            delay = min(CHILD_RESTART_MAX, delay * 2)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The operator node's ``/status`` document."""
        view = self.driver.view
        raft = view.raft
        connected = {str(p) for p in self.net.connected_peers()}
        return {
            "node": self.identity.did, "peer_id": str(self.identity.peer_id),
            "role": "operator", "grid": self.genesis.grid,
            "raft": {"role": str(raft.role), "term": raft.term, "leader": raft.leader,
                     "commit_index": raft.commit, "applied_index": view.applied_index,
                     "learner": self.identity.did in raft.learners},
            "ledger": view.ledger(),
            "listen": list(self.net.listen_addrs),
            "peers": [{"did": did, "up": pid in connected}
                      for pid, did in sorted(self.net.member_peers.items())],
            "connectivity": self.net.connectivity(),
            "holds_operator_key": self.holds_operator_key,
            "children": {c.name: c.status() for c in self.children},
            "blocks_synced": self.counters["block_chunks_synced"],
            "block_sync": dict(sorted(self.counters.items())),
        }  # fmt: skip

    async def _get_status(self, req: Request) -> Any:
        return self.status()


async def _terminate(process: trio.Process) -> None:
    """SIGTERM the child's process group, SIGKILL after :data:`CHILD_STOP_SECONDS`."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    with trio.move_on_after(CHILD_STOP_SECONDS):
        await process.wait()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with trio.move_on_after(2):
        await process.wait()
