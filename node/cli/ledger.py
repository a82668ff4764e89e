"""``microgrid ledger ...``: inspect and verify a ledger database."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from node.ledger.verify import HouseholdConservation, VerifyReport, verify_ledger


def register(subparsers: Any) -> None:
    """Add the ``ledger`` command group."""
    ledger = subparsers.add_parser("ledger", help="inspect and verify a ledger database")
    sub = ledger.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")
    sub.required = True
    verify = sub.add_parser(
        "verify",
        help="recompute every block hash, the chain, that all postings sum to zero, and that "
        "each household's settled energy equals its meter's movement",
    )
    verify.add_argument("--db", required=True, help="database URL, e.g. sqlite:///node.db")
    verify.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="print each household's readings, energy moved and settled, unmeasured slots and "
        "true-ups",
    )
    verify.set_defaults(func=_verify)


def household_lines(h: HouseholdConservation) -> list[str]:
    """The ``--verbose`` lines of one household's conservation figures."""
    if h.first_reading_slot is None:
        readings = "readings  none"
    else:
        readings = f"readings  slots {h.first_reading_slot}..{h.last_reading_slot}"
    mark = "ok" if h.conserved else "MISMATCH"
    return [
        f"household {h.household}: {mark}",
        f"  {readings}: import moved {h.import_moved_wh} Wh, export moved "
        f"{h.export_moved_wh} Wh (net {h.moved_net_wh:+} Wh)",
        f"  settled   energy {h.energy_settled_wh:+} Wh (import {h.settled_import_wh} Wh, "
        f"export {h.settled_export_wh} Wh)",
        f"  slots     {h.measured_slots} measured, {h.unmeasured_slots} unmeasured",
        f"  true-ups  {h.true_ups} over {h.true_up_slots} slots: import "
        f"{h.true_up_import_wh} Wh, export {h.true_up_export_wh} Wh",
    ]


def _print_households(report: VerifyReport, out: Any) -> None:
    for h in report.households:
        for line in household_lines(h):
            print(line, file=out)


def _verify(args: argparse.Namespace) -> int:
    report = verify_ledger(args.db)
    verbose = getattr(args, "verbose", False)
    if not report.ok:
        print(f"ledger verify FAILED: {report.error}", file=sys.stderr)
        print(f"checked {report.blocks} blocks before the fault", file=sys.stderr)
        if report.conservation == "skipped" and report.conservation_note:
            print(f"conservation {report.conservation_note}", file=sys.stderr)
        if verbose:
            _print_households(report, sys.stderr)
        return 1
    head = report.head_hash or "-"
    print(f"ledger OK: {report.blocks} blocks, {report.transactions} transactions")
    print(f"height {report.height}")
    print(f"head {head}")
    if report.conservation_note:
        print(f"conservation {report.conservation_note}")
    if verbose:
        _print_households(report, sys.stdout)
    return 0
