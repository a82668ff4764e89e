"""CLI: ``microgrid operator run --config FILE``: the grid operator's node (relay, bootstrap,
ledger follower, dashboard and archive supervisor; docs/operator.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``operator run`` to the ``microgrid`` command."""
    o = subparsers.add_parser(
        "operator", help="run the grid operator's node: relay, bootstrap, ledger, dashboard"
    )
    os_ = o.add_subparsers(dest="operator_command", metavar="ACTION")
    os_.required = True
    r = os_.add_parser("run", help="run the operator node until SIGINT/SIGTERM")
    r.add_argument("--config", type=Path, required=True, help="operator node config (TOML)")
    r.set_defaults(func=cmd_operator_run)


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def cmd_operator_run(args: argparse.Namespace) -> int:
    """Load the config, key and genesis; run the operator node until a signal stops it."""
    from node.net import lean_imports

    lean_imports.install()  # before anything imports libp2p
    import trio

    from node.cli.run import _first_leaf, _run_until_signal
    from node.daemon.household_node import NodeError
    from node.daemon.logs import configure
    from node.daemon.operator_node import (
        OperatorConfigError,
        OperatorNode,
        load_operator_config,
    )
    from node.daemon.replica import ReplicaError, exit_status
    from node.ledger.store import LedgerStoreError
    from node.raft.errors import StorageCorruption, StorageError
    from node.setup.genesis import GenesisError, load_genesis
    from node.setup.keyfile import KeyFileError, load_key_file

    try:
        config = load_operator_config(args.config)
        identity = load_key_file(config.key_path)
        genesis = load_genesis(config.genesis_path)
    except (OperatorConfigError, KeyFileError, GenesisError) as exc:
        return _fail(str(exc))
    configure(config.log_level, config.log_format)
    fatal = (NodeError, ReplicaError, StorageCorruption, StorageError, LedgerStoreError)
    try:
        node = OperatorNode(config, identity, genesis)
    except NodeError as exc:  # not admitted by the genesis, a bad operator key: exit 2
        return _fail(str(exc))
    try:
        print(f"operator node {identity.peer_id} for grid {genesis.grid!r}", flush=True)
        trio.run(_run_until_signal, node)
    except fatal as exc:
        return _fail(str(exc), exit_status(exc))
    except BaseExceptionGroup as group:
        known, rest = group.split(fatal)
        if known is None or rest is not None:
            raise
        return _fail(str(_first_leaf(known)), exit_status(known))
    return 0
