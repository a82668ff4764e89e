"""The ``microgrid`` command line: one CLI for everything.

Each feature area contributes its subcommands through a module that exposes
``register(subparsers)``; every subparser sets ``func`` to a callable taking the parsed
``argparse.Namespace`` and returning an exit code. :data:`COMMANDS` names, for each command,
the module that registers it and its one-line help, so ``microgrid --help`` answers from this
table alone and ``microgrid COMMAND ...`` imports only that command's module: a light command
never loads libp2p, SQLAlchemy, Dash or Plotly (``tests/node/test_cli.py`` keeps the table
equal to what the modules register).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("node.cli.tools", "run a demo microgrid on this machine"),
    "init": ("node.cli.setup", "create this household's key and a starter config"),
    "identity": ("node.cli.setup", "print the peer id and did:key of a key file"),
    "genesis": ("node.cli.setup", "create or inspect a signed genesis file"),
    "node": ("node.cli.run", "run this household's node"),
    "status": ("node.cli.run", "ask a running node for its status"),
    "net": ("node.cli.run", "run the network layer of a node"),
    "operator": (
        "node.cli.operator",
        "run the grid operator's node: relay, bootstrap, ledger, dashboard",
    ),
    "member": (
        "node.cli.governance",
        "the grid operator admits, removes, suspends or changes households; list them",
    ),
    "rules": (
        "node.cli.governance",
        "the grid operator changes the market rules; show those in force and their history",
    ),
    "ledger": ("node.cli.ledger", "inspect and verify a ledger database"),
    "statement": (
        "node.cli.statement",
        "a household's energy bought and sold, its bill and savings over a range of days",
    ),
    "simulate": (
        "node.cli.tools",
        "simulate a microgrid's market over a day of slots (engine + ledger)",
    ),
    "meter": ("meter.cli", "Modbus meters: check wiring, list profiles"),
    "meter-sim": ("meter.cli", "serve simulated household meters over Modbus"),
    "dashboard": ("dashboard.cli", "the grid operator's web dashboard over a ledger database"),
    "archive": (
        "dashboard.cli",
        "copy settled blocks of a node's ledger into an archive (PostgreSQL)",
    ),
}
"""Every command: the module that registers it, and its help line."""

COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(m for m, _ in COMMANDS.values()))
"""The modules that register commands (each once)."""


def _parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="microgrid", description="Peer-to-peer energy trading for neighbourhood microgrids."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    return parser, subparsers


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``microgrid`` argument parser.

    With ``command``, the commands of that command's module are registered in full (their
    options, their ``func``); every other command appears by name and help line only. Without
    it, every module is imported and registered (for tools that want the whole tree).
    """
    parser, subparsers = _parser()
    modules = COMMAND_MODULES if command is None else (COMMANDS[command][0],)
    for name in modules:
        importlib.import_module(name).register(subparsers)
    for name, (_module, help_text) in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=help_text)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command ``argv`` asks for (its first word that is not an option), if known."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``microgrid`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    if command is None:
        # --help, no command or an unknown one: the table answers, nothing heavy is imported
        parser, subparsers = _parser()
        for name, (_module, help_text) in COMMANDS.items():
            subparsers.add_parser(name, help=help_text)
        parser.parse_args(argv)  # prints help or the error, and exits
        return 2
    args = build_parser(command).parse_args(argv)
    return int(args.func(args) or 0)
