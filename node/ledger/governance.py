"""The operator's governance records as the ledger stores them: rows of the ``governance``
table, their canonical record text and hash, and the history they fold into.

One copy of each, used by the store (writing accepted records), snapshot installs, block sync,
``ledger verify`` and the read queries, so a record is encoded, decoded and folded the same way
everywhere. Decoding is strict (:func:`market.models.decode_command`: every bound of the models):
a row is untrusted bytes until it decodes to a governance record of this grid.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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


__all__ = [
    "COMMON_FIELDS",
    "decode_record",
    "fold",
    "governance_row",
    "own_fields",
    "record_hash",
    "record_text",
    "rotation_ref",
    "rules_hash_at",
    "rules_periods",
]
