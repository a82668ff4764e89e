"""The operator's governance records as the ledger stores them: rows of the ``governance``
table, their canonical record text and hash, and the history they fold into.

One copy of each, used by the store (writing accepted records), snapshot installs, block sync,
``ledger verify`` and the read queries, so a record is encoded, decoded and folded the same way
everywhere. :func:`first_difference` compares the rows with the engine's records when a node
starts (the rows are not hashed into blocks, so a ledger of another history shows only there).
Decoding is strict (:func:`market.models.decode_command`: every bound of the models): a row is
untrusted bytes until it decodes to a governance record of this grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from market.config import MarketConfig
from market.encoding import canonical_bytes, sha256
from market.governance import Governance, MemberStatus, Term
from market.models import (
    GOVERNANCE_RECORDS,
    ChangeRules,
    CommandDecodeError,
    GovernanceRecord,
    MemberChange,
    MemberRole,
    RotateKey,
    decode_command,
    encode_command,
)
from node.ledger import schema as t

COMMON_FIELDS = frozenset(
    {"type", "grid", "nonce", "signature", "operator", "from_slot", "household"}
)
"""Fields every governance record (or every member change) has; the others are its own."""

_PLACEHOLDER_TERM = Term(0, MemberStatus.ACTIVE, MemberRole.LEARNER, "", 0)
"""A genesis member's standing before its first change, where only the history of rules, key
rotations and meter swaps is wanted (the ledger does not need the genesis terms for those)."""


def record_text(record: GovernanceRecord) -> str:
    """The ``governance.record`` column: the record's canonical JSON, both signatures included
    (exactly the bytes a log entry carries for it)."""
    return encode_command(record).decode("ascii")


def record_hash(record: GovernanceRecord) -> str:
    """The ``governance.record_hash`` column: hex SHA-256 of ``microgrid/governance/v1\\n`` +
    the record's canonical JSON (every field, the operator's signature and, for a key
    rotation, the old key's countersignature)."""
    return sha256(canonical_bytes("governance", record.model_dump(mode="json"))).hex()


def decode_record(text: Any, grid: str | None = None) -> GovernanceRecord:
    """Strictly decode a ``governance.record`` value; ValueError saying why it is not a
    governance record (of ``grid``, when given)."""
    if not isinstance(text, str):
        raise ValueError(f"the record is {type(text).__name__}, not text")
    try:
        record = decode_command(text.encode("utf-8"))
    except (CommandDecodeError, UnicodeEncodeError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(record, GOVERNANCE_RECORDS):
        raise ValueError(f"a {record.type} command is not a governance record")
    if grid is not None and record.grid != grid:
        raise ValueError(f"the record is for grid {record.grid!r}, not {grid!r}")
    return record


def governance_row(
    position: int, record: GovernanceRecord, log_index: int | None, withdrawn: int | None
) -> dict[str, Any]:
    """The ``governance`` row of the ``position``-th accepted record (1-based, log order)."""
    return {
        "position": position,
        "log_index": log_index,
        "type": record.type,
        "household": record.household if isinstance(record, MemberChange) else None,
        "from_slot": record.from_slot,
        "record": record_text(record),
        "record_hash": record_hash(record),
        "withdrawn": withdrawn,
    }


def own_fields(record: GovernanceRecord) -> dict[str, Any]:
    """What the record sets beyond the common fields (e.g. ``meter_serial`` and ``role`` of an
    ``add_member``, the changed rules of a ``change_rules``), as JSON values."""
    return {k: v for k, v in record.model_dump(mode="json").items() if k not in COMMON_FIELDS}


def fold(records: Iterable[GovernanceRecord]) -> Governance:
    """The governance history of ``records`` (log order): the rules changes, key rotations
    (``predecessor``, ``rotations``) and meter swaps. Genesis members get a placeholder first
    term, so their terms here are not their real ones; use the engine's state for those."""
    gov = Governance()
    for record in records:
        known = isinstance(record, MemberChange) and record.household in gov.terms
        gov.add(record, None if known else _PLACEHOLDER_TERM)
    return gov


def rules_periods(
    base: MarketConfig, records: Iterable[GovernanceRecord]
) -> list[tuple[int, MarketConfig]]:
    """``(from_slot, rules in force from it)``: the genesis rules from slot 0, then one entry
    per slot from which rules changes apply (several changes from one slot: the rules after
    all of them, in log order). Raises :class:`market.config.MarketConfigError` if the
    changes do not make consistent rules (the engine never accepts such records)."""
    gov = Governance()
    for record in records:
        if isinstance(record, ChangeRules):
            gov.add(record)
    periods: dict[int, MarketConfig] = {}
    for slot, config in gov.rules_history(base):
        periods[slot] = config
    return sorted(periods.items())


def rules_hash_at(gov: Governance, base: MarketConfig, slot: int) -> str | None:
    """The block header's ``rules`` for ``slot``: None while the genesis rules hold (no rules
    change from ``slot`` or earlier), else the hash of the rules in force."""
    config = gov.config_at(base, slot)
    return None if config is base else config.rules_hash()


def rotation_ref(rotation: RotateKey) -> str:
    """The ``ref`` of the ``key_rotation`` transaction a key rotation makes."""
    return f"{rotation.household}>{rotation.new_household}"


# --- comparing the ledger's history with the engine's ---------------------------------------------

_COMPARED = ("type", "household", "from_slot", "record_hash", "record")
"""The columns a ``governance`` row must share with the record the engine accepted at its
position (the record text and hash cover every field and signature; the others name it)."""

_SHOWN = 72
"""Longest ledger text a message quotes (a row is untrusted: it may hold anything)."""


@dataclass(frozen=True, slots=True)
class RecordSide:
    """A governance record as one side of a history comparison knows it (for messages):
    the ledger's row, or the record the engine accepted from the Raft log or snapshot."""

    log_index: int | None
    """The log index that committed it; None when unknown (a ledger row recorded from a
    snapshot, or a record the engine has from its snapshot)."""
    kind: str
    """``add_member``, ..., ``change_rules`` (a ledger row's text as stored, shortened)."""
    household: str | None
    """The DID a member change is about (None for ``change_rules``)."""
    from_slot: int | None
    """The first slot it governs (None: the ledger row holds no integer there)."""
    log_index_at_most: int | None = None
    """For a record the engine has from a snapshot: the snapshot's index, which bounds it."""

    def describe(self) -> str:
        """E.g. ``add_member of did:key:z6Mk… from slot 3 at log index 12``."""
        who = "" if self.household is None else f" of {self.household}"
        slot = "?" if self.from_slot is None else str(self.from_slot)
        if self.log_index is not None:
            where = f"log index {self.log_index}"
        elif self.log_index_at_most is not None:
            where = f"log index <= {self.log_index_at_most} (from the snapshot)"
        else:
            where = "an unknown log index"
        return f"{self.kind}{who} from slot {slot} at {where}"


@dataclass(frozen=True, slots=True)
class HistoryDifference:
    """The first governance record on which a ledger and the engine's history disagree."""

    position: int
    """Its place among the accepted records (1-based, log order)."""
    reason: str
    """What differs, e.g. ``the ledger lacks this record``."""
    ledger: RecordSide | None
    """The ledger's row at that position (None: the ledger has none)."""
    log: RecordSide | None
    """The engine's record at that position (None: the engine has none)."""


def ledger_governance_rows(conn: Connection) -> list[dict[str, Any]]:
    """Every ``governance`` row as stored (column name -> value, undecoded: the values are
    untrusted until compared), in position order."""
    g = t.governance
    return [dict(r._mapping) for r in conn.execute(select(g).order_by(g.c.position))]


def engine_governance_rows(
    records: Sequence[GovernanceRecord], known: Mapping[int, tuple[int, int]]
) -> list[dict[str, Any]]:
    """The ``governance`` rows a ledger must hold for the engine's ``records`` (log order):
    ``known`` maps a position (1-based) to the ``(log index, withdrawn count)`` the engine saw
    it committed with; the others (records it has from a snapshot) have both unknown."""
    out = []
    for position, record in enumerate(records, start=1):
        log_index, withdrawn = known.get(position, (None, None))
        out.append(governance_row(position, record, log_index, withdrawn))
    return out


def first_difference(
    ledger: Sequence[Mapping[str, Any]],
    engine: Sequence[Mapping[str, Any]],
    *,
    snapshot_index: int,
    prefix: bool = False,
) -> HistoryDifference | None:
    """The first position where the ledger's ``governance`` rows (:func:`ledger_governance_rows`)
    and the engine's (:func:`engine_governance_rows`) disagree, or None if they agree.

    Row by row, the kind, household, first slot, record text and hash must be equal. A log
    index the ledger knows must be the engine's, or, for a record the engine has from its
    snapshot (log index unknown), at most ``snapshot_index``; the ledger's log indexes never
    decrease. A withdrawn count both sides know must be equal. A NULL log index or withdrawn
    count in the ledger is accepted (a row recorded from a snapshot, before block sync fills
    it). With ``prefix``, the ledger may lack records at the end (a ledger behind a snapshot it
    is about to install); otherwise it must hold exactly the engine's records.
    """
    by_position: dict[int, Mapping[str, Any]] = {}
    for row in ledger:
        position = row.get("position")
        if type(position) is not int:
            return HistoryDifference(0, "a ledger row has no integer position", _side(row), None)
        by_position[position] = row
    last = max(by_position, default=0)
    wanted = range(1, (last if prefix else max(last, len(engine))) + 1)
    previous_index: int | None = None
    for position in sorted(set(wanted) | set(by_position)):
        row = by_position.get(position)
        expected = engine[position - 1] if 1 <= position <= len(engine) else None
        mine = None if row is None else _side(row)
        theirs = None if expected is None else _side(expected, snapshot_index)
        if row is None:
            return HistoryDifference(position, "the ledger lacks this record", None, theirs)
        if expected is None:
            return HistoryDifference(
                position, "the ledger has a record the engine never accepted", mine, None
            )
        reason = _row_difference(row, expected, snapshot_index, previous_index)
        if reason is not None:
            return HistoryDifference(position, reason, mine, theirs)
        if row["log_index"] is not None:
            previous_index = row["log_index"]
    return None


def _row_difference(
    row: Mapping[str, Any],
    expected: Mapping[str, Any],
    snapshot_index: int,
    previous_index: int | None,
) -> str | None:
    """Why ``row`` is not the ledger's row for ``expected`` (None: it is)."""
    for column in _COMPARED:
        if not _same(row.get(column), expected[column]):
            return f"the records differ ({column})"
    log_index = row.get("log_index")
    if log_index is not None:
        if type(log_index) is not int:
            return "the ledger's log index is not an integer"
        if expected["log_index"] is not None and log_index != expected["log_index"]:
            return "the record was committed at another log index"
        if expected["log_index"] is None and not 0 <= log_index <= snapshot_index:
            return f"the ledger's log index is not within the snapshot at {snapshot_index}"
        if previous_index is not None and log_index < previous_index:
            return f"the ledger's log index is below the previous record's {previous_index}"
    withdrawn, want = row.get("withdrawn"), expected["withdrawn"]
    if withdrawn is not None and want is not None and not _same(withdrawn, want):
        return f"the ledger's record withdrew {_printable(withdrawn)} orders, not {want}"
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type (a ledger's ``1`` is not ``True``, ``"3"`` not ``3``)."""
    return type(a) is type(b) and a == b


def _side(row: Mapping[str, Any], snapshot_index: int | None = None) -> RecordSide:
    """A row's :class:`RecordSide`; ``snapshot_index`` bounds an engine row's unknown log
    index. Untrusted text is shortened and made printable."""
    log_index = row.get("log_index")
    from_slot = row.get("from_slot")
    household = row.get("household")
    return RecordSide(
        log_index=log_index if type(log_index) is int else None,
        kind=_printable(row.get("type")),
        household=None if household is None else _printable(household),
        from_slot=from_slot if type(from_slot) is int else None,
        log_index_at_most=snapshot_index if log_index is None else None,
    )


def _printable(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


__all__ = [
    "COMMON_FIELDS",
    "HistoryDifference",
    "RecordSide",
    "decode_record",
    "engine_governance_rows",
    "first_difference",
    "fold",
    "governance_row",
    "ledger_governance_rows",
    "own_fields",
    "record_hash",
    "record_text",
    "rotation_ref",
    "rules_hash_at",
    "rules_periods",
]
