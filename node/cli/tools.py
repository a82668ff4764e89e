"""CLI: ``microgrid demo`` and ``microgrid simulate``, the tools built on the node."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``demo`` and ``simulate`` to the ``microgrid`` command."""
    p = subparsers.add_parser("demo", help="run a demo microgrid on this machine")
    p.add_argument("--households", type=int, default=5, help="number of households (2-40)")
    p.add_argument("--slot-seconds", type=int, default=10,
                   help="real seconds per slot (each a simulated 15 minutes; 4-900)")
    p.add_argument("--rounds", type=int, default=None,
                   help="stop after this many settled rounds and print the verdict")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    p.add_argument("--dashboard-port", type=int, default=8050)
    p.add_argument("--dir", type=Path, default=None,
                   help="keep keys, genesis and ledgers here (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=1, help="seed of the simulated households")
    p.add_argument("--feeder", action="store_true",
                   help="add a feeder meter at the transformer; h1 signs its readings as the "
                   "operator and every settled slot records the feeder check")
    p.set_defaults(func=cmd_demo)

    s = subparsers.add_parser(
        "simulate", help="simulate a microgrid's market over a day of slots (engine + ledger)"
    )
    s.add_argument("--households", type=int, default=6)
    s.add_argument("--slots", type=int, default=96, help="15-minute slots (96 = one day)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--mechanism", default="uniform", choices=["uniform", "pay_as_bid", "mcafee"])
    s.add_argument("--db", default=None, help="ledger database URL (e.g. sqlite:///ledger.db)")
    s.set_defaults(func=cmd_simulate)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 only if every ledger verifies and all heads are equal."""
    import trio

    from node.tools import demo

    if not 2 <= args.households <= 40:
        print("error: --households must be in 2..40", file=sys.stderr)
        return 2
    if not 4 <= args.slot_seconds <= 900:
        print("error: --slot-seconds must be in 4..900", file=sys.stderr)
        return 2
    if args.feeder and args.households > demo.FEEDER_MAX_HOUSEHOLDS:
        print(f"error: --feeder supports at most {demo.FEEDER_MAX_HOUSEHOLDS} households",
              file=sys.stderr)
        return 2
    if args.rounds is not None and args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    settings = demo.DemoSettings(
        households=args.households, slot_seconds=args.slot_seconds, rounds=args.rounds,
        dashboard=not args.no_dashboard, dashboard_port=args.dashboard_port,
        directory=args.dir, seed=args.seed, feeder=args.feeder,
    )  # fmt: skip
    try:
        return trio.run(demo.run_demo, settings, lambda line: print(line, flush=True))
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_simulate(args: argparse.Namespace) -> int:
    """Simulate the market over ``--slots`` slots and print one row per settled slot."""
    from node.tools import market_sim

    if args.households < 2 or args.slots < 1:
        print("need at least 2 households and 1 slot", file=sys.stderr)
        return 2
    state = market_sim.run(
        args.households, args.slots, args.seed, args.mechanism, args.db, out=sys.stdout
    )
    print(f"\nsettled {state.height} slots; head block {state.head_hash}")
    return 0
