"""``microgrid ledger ...``: inspect and verify a ledger database."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from node.ledger.verify import verify_ledger


def register(subparsers: Any) -> None:
    """Add the ``ledger`` command group."""
    ledger = subparsers.add_parser("ledger", help="inspect and verify a ledger database")
    sub = ledger.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")
    sub.required = True
    verify = sub.add_parser(
        "verify",
        help="recompute every block hash, the chain, and that all postings sum to zero",
    )
    verify.add_argument("--db", required=True, help="database URL, e.g. sqlite:///node.db")
    verify.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    report = verify_ledger(args.db)
    if not report.ok:
        print(f"ledger verify FAILED: {report.error}", file=sys.stderr)
        print(f"checked {report.blocks} blocks before the fault", file=sys.stderr)
        return 1
    head = report.head_hash or "-"
    print(f"ledger OK: {report.blocks} blocks, {report.transactions} transactions")
    print(f"height {report.height}")
    print(f"head {head}")
    return 0
