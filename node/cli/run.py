"""CLI: running a node (``microgrid node run``, ``net run``) and asking it (``status``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from market.accounting import ENERGY, MONEY
from node.setup.config import ConfigError, load_config

if TYPE_CHECKING:  # the command table imports this module: keep it light
    from node.setup.config import NodeConfig
    from node.setup.genesis import Genesis
    from node.setup.keyfile import NodeIdentity


def register(subparsers: Any) -> None:
    """Add ``node run``, ``status`` and ``net run`` to the ``microgrid`` command."""
    n = subparsers.add_parser("node", help="run this household's node")
    ns = n.add_subparsers(dest="node_command", metavar="ACTION")
    ns.required = True
    r = ns.add_parser("run", help="run the node (meters, agent, gossip, Raft, ledger) until "
                                  "SIGINT/SIGTERM")  # fmt: skip
    r.add_argument("--config", type=Path, default=None, help="config file (microgrid.toml)")
    r.set_defaults(func=cmd_node_run)

    s = subparsers.add_parser("status", help="ask a running node for its status")
    s.add_argument("--config", type=Path, default=None, help="the node's config (for its API port)")
    s.add_argument("--api", default=None, help="API base URL (default from the config)")
    s.add_argument("--json", action="store_true", help="print the raw status document")
    s.set_defaults(func=cmd_status)

    n = subparsers.add_parser("net", help="run the network layer of a node")
    ns = n.add_subparsers(dest="net_command", metavar="ACTION")
    ns.required = True
    r = ns.add_parser("run", help="run a node's libp2p host until interrupted")
    r.add_argument("--config", type=Path, default=None, help="config file (microgrid.toml)")
    r.set_defaults(func=cmd_net_run)


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _lean_imports(config_path: Path | None) -> None:
    """Keep libp2p's unused parts out of this process (node/net/lean_imports.py), mDNS's only
    when the config does not turn it on; before anything imports libp2p."""
    from node.net import lean_imports
    from node.setup.config import ConfigError, load_config

    try:
        mdns = load_config(config_path).mdns
    except ConfigError:
        mdns = False  # _load_files reports it
    lean_imports.install(lean_imports.unused(mdns=mdns))


def cmd_node_run(args: argparse.Namespace) -> int:
    """Load config, key and genesis, then run the node until a signal stops it."""
    _lean_imports(args.config)
    import trio

    from node.daemon.household_node import HouseholdNode, NodeError
    from node.daemon.logs import configure
    from node.daemon.replica import ReplicaError, exit_status
    from node.ledger.store import LedgerStoreError
    from node.raft.errors import StorageCorruption, StorageError

    files = _load_files(args.config)
    if isinstance(files, str):
        return _fail(files)
    config, identity, genesis = files
    configure(config.log_level, config.log_format)

    async def main() -> None:
        await _run_until_signal(HouseholdNode(config, identity, genesis))

    fatal = (NodeError, ReplicaError, StorageCorruption, StorageError, LedgerStoreError)
    profile_path = os.environ.get("MICROGRID_PROFILE")  # docs/node.md "Idle cost"
    try:
        if profile_path:
            import cProfile

            with cProfile.Profile() as prof:
                try:
                    trio.run(main)
                finally:
                    prof.dump_stats(profile_path.replace("{pid}", str(os.getpid())))
        else:
            trio.run(main)
    except fatal as exc:
        return _fail(str(exc), exit_status(exc))
    except BaseExceptionGroup as group:
        # raised inside the node's nursery: still a one-line error, not a traceback
        full, group_rest = group.split(disk_full)
        if full is not None:
            return _disk_full_exit(_first_leaf(full), config.data_dir)
        assert group_rest is not None
        known, rest = group_rest.split(fatal)
        if known is None or rest is not None:
            raise
        return _fail(str(_first_leaf(known)), exit_status(known))
    except Exception as exc:
        if not disk_full(exc):
            raise
        return _disk_full_exit(exc, config.data_dir)
    return 0


def _disk_full_exit(exc: BaseException, data_dir: Path) -> int:
    message = disk_full_message(exc, data_dir)
    logging.getLogger("microgrid.node").critical(message, extra={"event": "disk_full"})
    return _fail(message, DISK_FULL_EXIT)


DISK_FULL_EXIT = 4
"""Exit status of a node stopped because its disk is full (1: other fatal errors, 2: usage,
3: a committed entry that could not be applied)."""


def disk_full(exc: BaseException) -> bool:
    """A database write failed because the disk (or the data directory's file system) is
    full: SQLite's ``SQLITE_FULL``, as sqlite3 or SQLAlchemy raise it."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    orig = exc.orig if isinstance(exc, OperationalError) else exc
    return isinstance(orig, sqlite3.OperationalError) and "disk is full" in str(orig).lower()


def disk_full_message(exc: BaseException, data_dir: Path) -> str:
    """One line for the operator: what happened, that nothing half-written was kept, what to
    do."""
    return (
        f"the disk holding {data_dir} is full ({getattr(exc, 'orig', exc)}): the write was rolled "
        "back and nothing half-written was kept; free space and start the node again (it "
        "catches up from its Raft log and its peers)"
    )


def _load_files(config_path: Path | None) -> tuple[NodeConfig, NodeIdentity, Genesis] | str:
    """A node's config, key and verified genesis, or the error naming the file."""
    from node.setup.files import load_node_files
    from node.setup.genesis import GenesisError
    from node.setup.keyfile import KeyFileError

    try:
        return load_node_files(config_path)
    except (ConfigError, KeyFileError, GenesisError) as exc:
        return str(exc)


async def _run_until_signal(node: Any) -> None:
    """Run ``node`` (anything with ``run()`` and ``stop()``) until it returns; SIGINT or SIGTERM
    stop it cleanly (peers disconnected, stores closed)."""
    import trio

    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    node.stop()
                    return

        nursery.start_soon(on_signal)
        await node.run()
        nursery.cancel_scope.cancel()


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _get_json(base: str, path: str) -> Any:
    with urllib.request.urlopen(base.rstrip("/") + path, timeout=5) as resp:
        return json.load(resp)


def account_line(balances: list[dict[str, Any]]) -> str:
    """This household's ledger account in one line: money net received (minor units shown as
    currency with two decimals) and energy net received (bought and imported minus sold and
    exported, settled on metered energy)."""
    amount = {r["asset"]: int(r["amount"]) for r in balances}
    money, energy = amount.get(MONEY, 0), amount.get(ENERGY, 0)
    sign = "-" if money < 0 else "+"
    return (f"money {sign}{abs(money) // 100}.{abs(money) % 100:02d}, energy {energy:+,} Wh "
            "(net received, settled slots)")  # fmt: skip


def cmd_status(args: argparse.Namespace) -> int:
    """Print a running node's status (exit 1 if it cannot be reached)."""
    base = args.api
    if base is None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            return _fail(str(exc))
        base = f"http://{config.api_host}:{config.api_port}"
    try:
        doc = _get_json(base, "/status")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return _fail(f"cannot reach the node at {base}: {exc}", 1)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    raft, ledger = doc["raft"], doc["ledger"]
    up = sum(1 for p in doc["peers"] if p["up"])
    print(f"node      {doc['node']} ({doc.get('membership', '?')}) in grid {doc['grid']}")
    print(f"raft      {raft['role']} term {raft['term']}, leader {raft['leader'] or '-'}, "
          f"commit {raft['commit_index']}, applied {raft['applied_index']}")  # fmt: skip
    indirect = sum(1 for p in doc["peers"] if p.get("indirect") and not p["up"])
    print(f"peers     {up}/{len(doc['peers'])} connected"
          + (f", {indirect} reached through them (a large grid)" if indirect else ""))  # fmt: skip
    print(f"ledger    height {ledger['height']}, head {ledger['head_hash'][:16]}…, "
          f"closed through {ledger['closed_through']}, settled through "
          f"{ledger['settled_through']}")  # fmt: skip
    reading = doc.get("last_reading")
    if reading:
        print(f"reading   slot {reading['slot']}: import {reading['import_wh']} Wh, "
              f"export {reading['export_wh']} Wh at {reading['at']}")  # fmt: skip
    else:
        print("reading   none yet")
    try:
        balances = _get_json(base, "/balances?household=me")["balances"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        balances = None  # an older node, or it stopped in between: the rest is still useful
    if balances is not None:
        print(f"account   {account_line(balances)}")
    if doc.get("meter_read_failures"):
        print(f"meter     {doc['meter_read_failures']} failed reads")
    line = metering_line(doc.get("metering"))
    if line is not None:
        print(f"metering  {line}")
    return 0


def metering_line(metering: Any) -> str | None:
    """The status document's ``metering`` section in one line (None: an older node, or the
    count is unknown): settled slots without a reading of this household's meter, and whether
    its new orders are refused for it."""
    if not isinstance(metering, dict) or metering.get("silent_slots") is None:
        return None
    n, limit = metering["silent_slots"], metering.get("max_silent_slots")
    if metering.get("orders_refused"):
        verdict = "new orders REFUSED (meter_silent) until a reading is accepted"
    elif metering.get("rules", 1) < 2:
        verdict = "orders accepted (rules 1: no limit)"
    else:
        verdict = "orders accepted"
    line = f"{n} settled slots without a reading (limit {limit}): {verdict}"
    if isinstance(metering.get("sell_limit_wh"), int):
        line += f"; may offer {metering['sell_limit_wh']} Wh per slot"
    return line


def cmd_net_run(args: argparse.Namespace) -> int:
    """Run the libp2p host of this node (gossip and Raft transport) until Ctrl-C."""
    _lean_imports(args.config)
    import trio

    files = _load_files(args.config)
    if isinstance(files, str):
        return _fail(files)
    config, identity, genesis = files
    from node.net.host import NetNode, NetSettings, configure_logging

    configure_logging(config.log_level)
    node = NetNode(identity, genesis, NetSettings.from_config(config, identity, genesis))
    print(f"{identity.peer_id} ({identity.did}) joining grid {genesis.grid!r}", flush=True)

    trio.run(_run_until_signal, node)
    print("stopped", flush=True)
    return 0
