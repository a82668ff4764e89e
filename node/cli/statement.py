"""``microgrid statement``: a household's energy and money over a range of days, and what it
saved against trading with the grid alone (:mod:`node.ledger.statement`)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from market.schedule import Schedule
    from node.ledger.statement import SlotStatement, Statement

HELP = "a household's energy bought and sold, its bill and savings over a range of days"

MONEY_FIELDS = frozenset(
    {"local_paid", "local_received", "grid_import_paid", "grid_export_received",
     "true_up_money", "local_fees", "grid_fees", "other_money", "grid_only_bill", "net_bill",
     "savings"}
)  # fmt: skip
"""CSV columns in currency units (two decimals); the others are Wh or counts."""


class StatementInputError(ValueError):
    """Bad input to the command: printed as one line, exit status 2."""


def register(subparsers: Any) -> None:
    """Add the ``statement`` command."""
    p = subparsers.add_parser("statement", help=HELP, description=HELP + ".")
    p.add_argument("--config", type=Path, help="this node's config (its ledger and its key's DID)")
    p.add_argument("--db", help="ledger database URL (the operator; with --household)")
    p.add_argument("--household", help="the household's did:key (with --db)")
    p.add_argument("--from", dest="first", required=True, metavar="DATE",
                   help="first day, ISO date (UTC), e.g. 2026-06-01")  # fmt: skip
    p.add_argument("--to", dest="last", required=True, metavar="DATE",
                   help="last day, ISO date (UTC), inclusive")  # fmt: skip
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write one row per settled slot")
    p.set_defaults(func=cmd_statement)


def money(minor: int, plus: bool = False) -> str:
    """Minor units as currency units with two decimals, e.g. ``-1.05`` (``+1.05`` with
    ``plus``)."""
    sign = "-" if minor < 0 else ("+" if plus else "")
    return f"{sign}{abs(minor) // 100}.{abs(minor) % 100:02d}"


def parse_day(text: str, option: str) -> date:
    """An ISO date (``YYYY-MM-DD``) of ``option``; :class:`StatementInputError` otherwise."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise StatementInputError(f"{option}: {text!r} is not an ISO date (YYYY-MM-DD)") from None


def day_slots(schedule: Schedule, first: date, last: date) -> tuple[int, int]:
    """The slots delivering from the start of ``first`` to the end of ``last`` (UTC)."""
    if first > last:
        raise StatementInputError(f"--from {first} is after --to {last}")
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC)
    try:
        end += timedelta(days=1)
    except OverflowError:
        raise StatementInputError(f"--to {last}: beyond the calendar") from None
    return schedule.slot_of(start), schedule.slot_of(end) - 1


def _target(args: argparse.Namespace) -> tuple[str, str, Schedule | None]:
    """(ledger URL, household DID, the genesis schedule if a config gave one)."""
    if args.config is not None:
        if args.db is not None or args.household is not None:
            raise StatementInputError("give --config, or --db with --household, not both")
        from node.setup.config import ConfigError
        from node.setup.files import load_node_files
        from node.setup.genesis import GenesisError
        from node.setup.keyfile import IdentityMismatchError, KeyFileError

        try:
            config, identity, genesis = load_node_files(args.config)
        except (ConfigError, KeyFileError, IdentityMismatchError, GenesisError) as exc:
            raise StatementInputError(str(exc)) from None
        return config.ledger_url, identity.did, genesis.schedule
    if args.db is None or args.household is None:
        raise StatementInputError("give --config, or --db with --household")
    return args.db, args.household, None


def ledger_schedule(meta: dict[str, str], fallback: Schedule | None) -> Schedule:
    """The schedule the ledger records in meta ``schedule`` (else the genesis's, if known)."""
    from market.schedule import Schedule
    from node.ledger.store import SCHEDULE_KEY

    value = meta.get(SCHEDULE_KEY)
    if value is None:
        if fallback is None:
            raise StatementInputError(
                "the ledger records no schedule (no node has opened it yet): cannot turn dates "
                "into slots; use --config with the node's genesis"
            )
        return fallback
    try:
        doc = json.loads(value)
        return Schedule(
            slot_seconds=doc["slot_seconds"],
            gate_lead_seconds=doc["gate_closure_lead_seconds"],
            settle_delay_seconds=doc["settle_delay_seconds"],
        )
    except (ValueError, KeyError, TypeError):
        raise StatementInputError(f"the ledger's schedule is unreadable: {value}") from None


def cmd_statement(args: argparse.Namespace) -> int:
    """Print the statement (and write the CSV); 2 for bad input or nothing to state."""
    try:
        statement, schedule = _load(args)
    except StatementInputError as exc:
        print(f"statement: {exc}", file=sys.stderr)
        return 2
    for line in statement_lines(statement, schedule, args.first, args.last):
        print(line)
    if args.csv is not None:
        try:
            write_csv(args.csv, statement, schedule)
        except OSError as exc:
            print(f"statement: cannot write {args.csv}: {exc.strerror}", file=sys.stderr)
            return 2
        print(f"wrote {len(statement.slots)} slots to {args.csv}")
    return 0


def _load(args: argparse.Namespace) -> tuple[Statement, Schedule]:
    from sqlalchemy.exc import SQLAlchemyError

    from node.ledger.rows import read_meta
    from node.ledger.statement import StatementError, household_statement
    from node.ledger.store import make_engine

    first, last = parse_day(args.first, "--from"), parse_day(args.last, "--to")
    if first > last:
        raise StatementInputError(f"--from {first} is after --to {last}")
    url, did, genesis_schedule = _target(args)
    try:
        engine = make_engine(url, read_only=True)
    except (SQLAlchemyError, ValueError) as exc:
        raise StatementInputError(f"bad database URL {url!r}: {exc}") from None
    try:
        with engine.connect() as conn:
            schedule = ledger_schedule(read_meta(conn), genesis_schedule)
            first_slot, last_slot = day_slots(schedule, first, last)
            return household_statement(conn, did, first_slot, last_slot), schedule
    except StatementError as exc:
        raise StatementInputError(str(exc)) from None
    except SQLAlchemyError as exc:
        reason = str(exc.orig if getattr(exc, "orig", None) else exc).splitlines()[0]
        raise StatementInputError(f"cannot read the ledger {url}: {reason}") from None
    finally:
        engine.dispose()


def _row(label: str, energy: str, amount: str) -> str:
    return f"  {label:<26}{energy:>16}{amount:>12}"


def statement_lines(statement: Statement, schedule: Schedule, first: str, last: str) -> list[str]:
    """The printed statement: the period, a table of energy and money with totals, the bill,
    the grid-only bill and the savings."""
    s = statement
    tot = s.totals
    start = schedule.start_datetime(s.slots[0].slot).strftime("%Y-%m-%d %H:%M")
    end = schedule.end_datetime(s.slots[-1].slot).strftime("%Y-%m-%d %H:%M")
    lines = [
        f"statement of {s.household}",
        f"period    {first} .. {last} (UTC): {s.settled_slots} settled slots, "
        f"{start} .. {end} (slots {s.slots[0].slot}..{s.slots[-1].slot})",
        f"metering  {s.measured_slots} measured, {s.unmeasured_slots} unmeasured; "
        f"{tot['true_ups']} true-up{'' if tot['true_ups'] == 1 else 's'} over "
        f"{tot['true_up_slots']} slots",
        f"tariffs   retail {money(s.retail_price)}/kWh, feed-in {money(s.feed_in_tariff)}/kWh"
        + (
            f"; grid fees {money(s.local_fee)}/kWh bought locally, {money(s.grid_fee)}/kWh imported"
            if s.local_fee or s.grid_fee
            else ""
        ),
    ]
    if s.rules_changed_at:
        changes = ", ".join(str(slot) for slot in s.rules_changed_at)
        lines.append(f"rules     changed from slot {changes}: each slot is priced under its own")
    lines += [
        "",
        _row("", "energy", "money"),
        _row("bought locally", f"{tot['local_bought_wh']} Wh", money(-tot["local_paid"], True)),
        _row("sold locally", f"{tot['local_sold_wh']} Wh", money(tot["local_received"], True)),
        _row(
            "imported from the grid",
            f"{tot['grid_import_wh']} Wh",
            money(-tot["grid_import_paid"], True),
        ),
        _row(
            "exported to the grid",
            f"{tot['grid_export_wh']} Wh",
            money(tot["grid_export_received"], True),
        ),
    ]
    if tot["true_ups"]:
        lines.append(
            _row(
                "true-ups (Wh incl. above)",
                f"+{tot['true_up_import_wh']}/-{tot['true_up_export_wh']} Wh",
                money(tot["true_up_money"], True),
            )
        )
    if tot["local_fees"] or tot["grid_fees"]:
        lines.append(_row("grid fees, local trades", "", money(-tot["local_fees"], True)))
        lines.append(_row("grid fees, grid imports", "", money(-tot["grid_fees"], True)))
    if tot["other_money"]:
        lines.append(_row("other", "", money(tot["other_money"], True)))
    bill = s.net_bill
    lines += [
        _row("balance change", "", money(s.money_change, True)),
        "",
        f"  {'net bill':<26}{money(abs(bill)):>28} {'paid' if bill >= 0 else 'received'}",
        f"  {'grid only':<26}{money(abs(s.grid_only_bill)):>28} "
        f"{'paid' if s.grid_only_bill >= 0 else 'received'}",
        f"  {'savings':<26}{money(s.savings):>28}",
    ]
    return lines


def csv_row(slot: SlotStatement, schedule: Schedule) -> dict[str, Any]:
    """One CSV row: the slot, its start (UTC), measured, and every figure of it."""
    from node.ledger.statement import SUMMED_FIELDS

    values: dict[str, Any] = {
        "slot": slot.slot,
        "start_utc": schedule.start_datetime(slot.slot).isoformat(),
        "measured": int(slot.measured),
    }
    for name in (*SUMMED_FIELDS, "net_bill", "savings"):
        value = getattr(slot, name)
        values[name] = money(value) if name in MONEY_FIELDS else value
    return values


def write_csv(path: Path, statement: Statement, schedule: Schedule) -> None:
    """Write one row per settled slot of ``statement`` to ``path``."""
    rows = [csv_row(slot, schedule) for slot in statement.slots]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
