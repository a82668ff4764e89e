"""``microgrid dashboard`` and ``microgrid archive``."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from typing import Any


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``dashboard`` and ``archive`` commands."""
    p = subparsers.add_parser(
        "dashboard", help="the grid operator's web dashboard over a ledger database"
    )
    p.add_argument("--db", required=True, help="ledger database URL (sqlite:///… or postgresql…)")
    p.add_argument(
        "--api", default=None, help="a node's local status API, e.g. http://127.0.0.1:8400"
    )
    p.add_argument(
        "--node-api",
        action="append",
        default=[],
        metavar="URL",
        help="a household node's status API (repeat for each): its agent's forecast accuracy "
        "and its clock are shown per household (--api is one of them already)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--refresh", type=float, default=5.0, help="seconds between refreshes")
    p.add_argument(
        "--slot-seconds",
        type=_positive_int,
        default=None,
        help="override the grid's slot length in seconds. By default the dashboard reads it "
        "from the ledger (meta 'schedule', recorded by the node); for an older ledger without "
        "one, from the node's /status with --api, else the genesis default 900 (with a notice)",
    )
    p.add_argument(
        "--settle-lag", type=int, default=4, help="slots a settlement may lag its gate closure"
    )
    p.add_argument(
        "--stale-after",
        type=float,
        default=None,
        help="minutes without anything new in the ledger before a 'stale' alert "
        "(default: 3 slots, 45 min at 15-minute slots)",
    )
    p.add_argument(
        "--verify-interval",
        type=float,
        default=60.0,
        help="minimum seconds between two background verifications of a changing ledger",
    )
    p.set_defaults(func=_dashboard)

    a = subparsers.add_parser(
        "archive", help="copy settled blocks of a node's ledger into an archive (PostgreSQL)"
    )
    a.add_argument("--from", dest="source", required=True, help="node ledger database URL")
    a.add_argument("--to", dest="target", required=True, help="archive database URL")
    a.add_argument("--follow", action="store_true", help="keep polling for new blocks")
    a.add_argument("--interval", type=float, default=5.0, help="seconds between polls (--follow)")
    a.add_argument(
        "--no-verify", action="store_true", help="skip verifying the archive after copying"
    )
    a.set_defaults(func=_archive)


def _dashboard(args: argparse.Namespace) -> int:
    from dashboard.app import create_app, serve
    from dashboard.views import SLOT_SOURCES, Context, poll_api

    ctx = Context.open(
        args.db,
        args.api,
        slot_seconds=args.slot_seconds,
        settle_lag_slots=args.settle_lag,
        verify_interval=args.verify_interval,
        stale_after_s=None if args.stale_after is None else args.stale_after * 60,
        node_apis=tuple(args.node_api),
    )
    if args.api:
        poll_api(ctx)  # learn the node's slot length before the first page (never raises)
    notice = ctx.slot_notice()
    if notice:
        print(f"notice: {notice}", file=sys.stderr, flush=True)
    app = create_app(ctx, refresh_ms=int(args.refresh * 1000))
    server = serve(app, args.host, args.port)
    # replay the settlements for the households table now rather than on the first page view
    # (seconds on a year-long ledger of 100 households; then only new slots are read)
    threading.Thread(target=_warm, args=(ctx,), name="warm-household-records", daemon=True).start()
    print(
        f"dashboard on http://{args.host}:{server.server_port}/ (ledger {args.db}, "
        f"{ctx.schedule.slot_seconds} s slots {SLOT_SOURCES[ctx.slot_source]})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        ctx.close()
    return 0


def _warm(ctx: Any) -> None:
    with contextlib.suppress(Exception):  # a broken ledger: the page's own refresh reports it
        ctx.records.update()


def _archive(args: argparse.Namespace) -> int:
    from dashboard.archive import ArchiveError, archive, follow

    try:
        if args.follow:
            follow(args.source, args.target, args.interval, verify=not args.no_verify)
            return 0
        result = archive(args.source, args.target, verify=not args.no_verify)
    except ArchiveError as exc:
        print(f"archive FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    print(result.summary())
    return 0
