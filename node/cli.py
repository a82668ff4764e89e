"""The ``microgrid`` command line: one CLI for everything.

Each feature area contributes its subcommands through a module listed in ``COMMAND_MODULES``
that exposes ``register(subparsers)``; every subparser sets ``func`` to a callable taking the
parsed ``argparse.Namespace`` and returning an exit code. Modules are imported only when the
CLI starts, so importing ``node`` stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES: tuple[str, ...] = (
    "node.ledger.cli",
    "node.simulate",
    "dashboard.cli",
    "node.net.cli",
    "node.node_cli",
    "node.demo",
    "meter.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full ``microgrid`` argument parser from every command module."""
    parser = argparse.ArgumentParser(
        prog="microgrid", description="Peer-to-peer energy trading for neighbourhood microgrids."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``microgrid`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
