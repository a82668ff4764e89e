"""The community's statements (issue 18, "what a household gains"): for a period of days, every
household's statement as ``microgrid statement --from DATE --to DATE`` prints it, and the
community's totals.

Nothing is recomputed here: each row is :func:`node.ledger.statement.household_statement` over
the slots the command line turns the dates into (:func:`node.cli.statement.parse_day`,
:func:`node.cli.statement.day_slots`), so every slot is priced under the rules in force for it
and fees, true-ups and the grid-only comparison follow the statement code exactly. The totals
row is the sum of the households' rows. Dates arrive from the page as text and are hostile: bad
ones, a period with nothing settled and an unreadable ledger are a :class:`CommunityStatements`
with a ``message``, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from sqlalchemy import func, select, union
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from market.schedule import Schedule
from node.cli.statement import MONEY_FIELDS, StatementInputError, day_slots, money, parse_day
from node.ledger import schema as t
from node.ledger.statement import SUMMED_FIELDS, Statement, StatementError, household_statement

DEFAULT_DAYS = 30
"""Without dates: the newest 30 days of the ledger (all of it when it is shorter)."""

MAX_DATE_CHARS = 32
"""Longest date text a callback accepts (an ISO date is 10 characters)."""

MAX_HOUSEHOLDS = 10_000
"""Households stated at most (a feeder has tens)."""

COUNT_FIELDS = ("measured_slots", "unmeasured_slots")
"""Per household: its settled slots measured and not (their totals are household-slots)."""

FIGURES: tuple[str, ...] = (*COUNT_FIELDS, *SUMMED_FIELDS, "money_change", "net_bill", "savings")
"""The integer figures of a row, in the order of the CSV: the statement's totals
(:data:`node.ledger.statement.SUMMED_FIELDS`), its balance change, bill and savings."""


@dataclass(frozen=True, slots=True)
class StatementPeriod:
    """The days stated and the slots they cover (UTC)."""

    first_day: date
    last_day: date
    first_slot: int
    last_slot: int
    default: bool
    """Neither date was given: the newest :data:`DEFAULT_DAYS` days of the ledger."""

    def label(self) -> str:
        """``2026-06-01 .. 2026-06-30``."""
        return f"{self.first_day.isoformat()} .. {self.last_day.isoformat()}"


@dataclass(frozen=True, slots=True)
class CommunityStatements:
    """One row per household (its statement's figures), the totals, or why there are none."""

    period: StatementPeriod | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Per household, by DID: ``household`` and every :data:`FIGURES` entry (integers: money
    in minor units, energy in Wh)."""
    totals: dict[str, int] | None = None
    """Each :data:`FIGURES` entry summed over :attr:`rows` (None without rows)."""
    settled_slots: int = 0
    first_settled: int | None = None
    last_settled: int | None = None
    rules_changed_at: tuple[int, ...] = ()
    """Slots in the period from which the operator changed the rules."""
    tariffs: dict[str, int] = field(default_factory=dict)
    """The flat tariffs and fees in force at the period's first settled slot."""
    message: str | None = None
    """Why there is no table (bad dates, nothing settled, an unreadable ledger)."""

    def csv_rows(self) -> list[dict[str, Any]]:
        """The table as CSV rows, as ``microgrid statement --csv`` writes money (currency units,
        two decimals) and energy (Wh): one per household, then ``household = TOTAL``."""
        if self.period is None or not self.rows or self.totals is None:
            return []
        out = []
        for row in [*self.rows, {"household": "TOTAL", **self.totals}]:
            out.append(
                {
                    "household": row["household"],
                    "from": self.period.first_day.isoformat(),
                    "to": self.period.last_day.isoformat(),
                    "settled_slots": self.settled_slots,
                    **{
                        name: money(row[name]) if name in MONEY_FIELDS else row[name]
                        for name in FIGURES
                    },
                }
            )
        return out


def statement_figures(statement: Statement) -> dict[str, int]:
    """A statement's :data:`FIGURES` (what ``microgrid statement`` prints, as integers)."""
    return {
        "measured_slots": statement.measured_slots,
        "unmeasured_slots": statement.unmeasured_slots,
        **{name: statement.total(name) for name in SUMMED_FIELDS},
        "money_change": statement.money_change,
        "net_bill": statement.net_bill,
        "savings": statement.savings,
    }


def settled_range(conn: Connection) -> tuple[int, int] | None:
    """The first and last settled slot of the ledger (None: nothing settled)."""
    b = t.blocks.c
    row = conn.execute(select(func.min(b.slot), func.max(b.slot))).first()
    if row is None or row[0] is None:
        return None
    return int(row[0]), int(row[1])


def _day(schedule: Schedule, slot: int) -> date:
    return schedule.start_datetime(slot).date()


def _parse(text: str | None, option: str) -> date | None:
    if text is None or not text.strip():
        return None
    if len(text) > MAX_DATE_CHARS:
        raise StatementInputError(f"{option}: not an ISO date (YYYY-MM-DD)")
    return parse_day(text.strip(), option)


def statement_period(
    conn: Connection, schedule: Schedule, first_text: str | None, last_text: str | None
) -> StatementPeriod | str:
    """The period the controls ask for, or a message saying what is wrong with them. A date
    left empty is the default: ``to`` the newest settled day, ``from`` :data:`DEFAULT_DAYS` days
    before ``to`` (inclusive) but not before the ledger's first settled day."""
    try:
        first, last = _parse(first_text, "from"), _parse(last_text, "to")
    except StatementInputError as exc:
        return str(exc)
    settled = settled_range(conn) if first is None or last is None else None
    if (first is None or last is None) and settled is None:
        return "No settled slot in the ledger yet: no statement to show."
    try:
        if last is None:
            assert settled is not None
            last = _day(schedule, settled[1])
            if first is not None and first > last:
                last = first
        if first is None:
            first = last - timedelta(days=DEFAULT_DAYS - 1)
            if settled is not None:
                first = min(last, max(first, _day(schedule, settled[0])))
    except OverflowError:
        return "the period is beyond the calendar"
    try:
        first_slot, last_slot = day_slots(schedule, first, last)
    except StatementInputError as exc:
        return str(exc).replace("--from", "from").replace("--to", "to")
    except OverflowError:
        return "the period is beyond the calendar"
    given = bool((first_text or "").strip() or (last_text or "").strip())
    return StatementPeriod(first, last, first_slot, last_slot, default=not given)


def ledger_households(conn: Connection, first_slot: int, last_slot: int) -> list[str]:
    """Every member of the ledger's grid and every household settled in the slots, sorted."""
    h, s = t.households.c, t.settlements.c
    q = union(
        select(h.did.label("did")),
        select(s.household.label("did")).where(s.slot.between(first_slot, last_slot)).distinct(),
    )
    dids = sorted({str(r.did) for r in conn.execute(q)})
    return dids[:MAX_HOUSEHOLDS]


def community_statements(
    engine: Engine, schedule: Schedule, first_text: str | None, last_text: str | None
) -> CommunityStatements:
    """Every household's statement over the days ``first_text .. last_text`` (ISO dates, UTC,
    inclusive; empty: the default period) and the community's totals; a message instead for
    bad dates, a period without a settled slot or a ledger that cannot be read."""
    try:
        with engine.connect() as conn:
            return _statements(conn, schedule, first_text, last_text)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        return CommunityStatements(None, message=f"Cannot read the ledger: {reason}")


def _statements(
    conn: Connection, schedule: Schedule, first_text: str | None, last_text: str | None
) -> CommunityStatements:
    period = statement_period(conn, schedule, first_text, last_text)
    if isinstance(period, str):
        return CommunityStatements(None, message=period)
    b = t.blocks.c
    settled_in = conn.execute(
        select(func.count()).where(b.slot.between(period.first_slot, period.last_slot))
    ).scalar()
    if not settled_in:
        settled = settled_range(conn)
        held = (
            "the ledger has none yet"
            if settled is None
            else f"the ledger holds {_day(schedule, settled[0])} .. {_day(schedule, settled[1])}"
        )
        return CommunityStatements(
            period, message=f"No settled slot in {period.label()} (UTC): {held}."
        )
    rows: list[dict[str, Any]] = []
    first: Statement | None = None
    try:
        for did in ledger_households(conn, period.first_slot, period.last_slot):
            statement = household_statement(conn, did, period.first_slot, period.last_slot)
            first = first or statement
            rows.append({"household": did, **statement_figures(statement)})
    except StatementError as exc:  # unreadable rules: the statement says what
        return CommunityStatements(period, message=str(exc))
    if first is None:
        return CommunityStatements(period, message="No households in the ledger.")
    totals = {name: sum(r[name] for r in rows) for name in FIGURES}
    return CommunityStatements(
        period,
        rows=rows,
        totals=totals,
        settled_slots=first.settled_slots,
        first_settled=first.slots[0].slot,
        last_settled=first.slots[-1].slot,
        rules_changed_at=first.rules_changed_at,
        tariffs={
            "feed_in_tariff": first.feed_in_tariff,
            "retail_price": first.retail_price,
            "local_fee": first.local_fee,
            "grid_fee": first.grid_fee,
        },
    )
