"""The replicated history of a running grid's membership and rules.

The operator's governance records (:data:`market.models.GOVERNANCE_RECORDS`) each take effect
from a slot. :class:`Governance` keeps every committed one, in log order, and answers what is in
force for a given slot: a household's *term* (active or not, role, meter) and the market rules.
Records are validated by the engine (:mod:`market.state`) before they are added here; this
module only folds them, so a snapshot holds the records and :meth:`Governance.rebuild` derives
the rest, identically on every node.

Per household, changes come in non-decreasing ``from_slot`` order (the engine refuses a change
before one already scheduled), so a household's terms are sorted both ways. Rules changes may
be scheduled in any order; they apply sorted by ``(from_slot, log order)``, each replacing the
rules it names.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field, replace
from enum import StrEnum

from market.config import MarketConfig
from market.models import (
    AddMember,
    ChangeRole,
    ChangeRules,
    GovernanceRecord,
    MemberChange,
    MemberRole,
    ReinstateMember,
    RemoveMember,
    ReplaceMeter,
    RotateKey,
    SuspendMember,
)


class MemberStatus(StrEnum):
    """Where a household stands in a slot."""

    ACTIVE = "active"
    """Trades and is settled."""
    SUSPENDED = "suspended"
    """Its orders and readings are refused until it is reinstated."""
    REMOVED = "removed"
    """It left the grid; its balance stays in the ledger."""
    ROTATED = "rotated"
    """Its key was replaced: the household goes on under its new DID."""
    PENDING = "pending"
    """Admitted from a later slot."""


@dataclass(frozen=True, slots=True)
class Term:
    """A household's standing from ``from_slot`` until its next term begins."""

    from_slot: int
    status: MemberStatus
    role: MemberRole
    meter_serial: str
    max_power_w: int

    @property
    def active(self) -> bool:
        """True if the household trades and is settled under this term."""
        return self.status == MemberStatus.ACTIVE


@dataclass(slots=True)
class Governance:
    """Committed governance records and what they put in force, slot by slot."""

    records: list[GovernanceRecord] = field(default_factory=list)
    """Every committed governance record, in log order."""
    terms: dict[str, list[Term]] = field(default_factory=dict)
    """Households that governance records changed: their terms in slot order. A household
    missing here is a genesis member, active in every slot on its registration's terms."""
    predecessor: dict[str, str] = field(default_factory=dict)
    """A rotated key's new DID -> the DID it replaced."""
    rotations: list[RotateKey] = field(default_factory=list)
    swaps: dict[str, list[ReplaceMeter]] = field(default_factory=dict)
    """Meter swaps by the DID they were made under, in slot order."""
    rules_changes: list[tuple[int, int, ChangeRules]] = field(default_factory=list)
    """``(from_slot, log position, record)``, sorted."""
    _configs: dict[int, MarketConfig] = field(default_factory=dict, repr=False)
    """Rules in force after the first *n* changes, by *n* (a cache)."""

    def copy(self) -> Governance:
        """An independent copy (records are immutable and shared)."""
        return Governance.rebuild(self.records, initial_terms=self._initial_terms())

    def _initial_terms(self) -> dict[str, Term]:
        return {did: terms[0] for did, terms in self.terms.items()}

    @classmethod
    def rebuild(
        cls, records: list[GovernanceRecord], *, initial_terms: dict[str, Term]
    ) -> Governance:
        """The governance after ``records`` (in log order); ``initial_terms`` gives each genesis
        member a record changed its term before the first change (what :meth:`add` was given)."""
        gov = cls()
        for record in records:
            did = record.household if isinstance(record, MemberChange) else ""
            gov.add(record, initial_terms.get(did))
        return gov

    # --- folding ---------------------------------------------------------------------------

    def add(self, record: GovernanceRecord, genesis_term: Term | None = None) -> None:
        """Fold one validated record in. ``genesis_term`` is the household's standing before
        its first change when it is a genesis member (ignored otherwise)."""
        self.records.append(record)
        if isinstance(record, ChangeRules):
            entry = (record.from_slot, len(self.records), record)
            self.rules_changes.insert(
                bisect_right(self.rules_changes, entry[:2], key=lambda e: e[:2]), entry
            )
            self._configs.clear()
            return
        if not isinstance(record, MemberChange):
            raise TypeError(f"not a governance record: {type(record).__name__}")
        did, slot = record.household, record.from_slot
        if isinstance(record, AddMember):
            self.terms[did] = [
                Term(0, MemberStatus.PENDING, record.role, record.meter_serial, record.max_power_w),
                Term(slot, MemberStatus.ACTIVE, record.role, record.meter_serial,
                     record.max_power_w),
            ]  # fmt: skip
            return
        terms = self.terms.get(did)
        if terms is None:
            if genesis_term is None:
                raise ValueError(f"{record.type}: {did} is not a member")
            terms = self.terms[did] = [genesis_term]
        last = terms[-1]
        if isinstance(record, RemoveMember):
            new = replace(last, from_slot=slot, status=MemberStatus.REMOVED)
        elif isinstance(record, SuspendMember):
            new = replace(last, from_slot=slot, status=MemberStatus.SUSPENDED)
        elif isinstance(record, ReinstateMember):
            new = replace(last, from_slot=slot, status=MemberStatus.ACTIVE)
        elif isinstance(record, ChangeRole):
            new = replace(last, from_slot=slot, role=record.role)
        elif isinstance(record, ReplaceMeter):
            new = replace(
                last, from_slot=slot, meter_serial=record.meter_serial,
                max_power_w=record.max_power_w,
            )  # fmt: skip
            self.swaps.setdefault(did, []).append(record)
        elif isinstance(record, RotateKey):
            new = replace(last, from_slot=slot, status=MemberStatus.ROTATED)
            successor = replace(last, from_slot=slot)
            self.terms[record.new_household] = [
                replace(successor, from_slot=0, status=MemberStatus.PENDING),
                successor,
            ]
            self.predecessor[record.new_household] = did
            self.rotations.append(record)
        else:  # pragma: no cover - the Command union is closed
            raise TypeError(type(record).__name__)
        if terms[-1].from_slot == slot:
            terms[-1] = new  # two changes from the same slot: the later one builds on the first
            if len(terms) >= 2 and terms[-2] == replace(new, from_slot=terms[-2].from_slot):
                terms.pop()
        else:
            terms.append(new)

    # --- queries ----------------------------------------------------------------------------

    def term_at(self, did: str, slot: int) -> Term | None:
        """The household's term in ``slot``, or None if governance never changed it (then it is
        a genesis member on its registration's terms, or not a member)."""
        terms = self.terms.get(did)
        if terms is None:
            return None
        i = bisect_right(terms, slot, key=lambda t: t.from_slot) - 1
        return terms[max(i, 0)]

    def last_term(self, did: str) -> Term | None:
        """The household's term once every scheduled change is in force (None: never changed)."""
        terms = self.terms.get(did)
        return None if terms is None else terms[-1]

    def last_change_slot(self, did: str) -> int:
        """The slot of the household's latest scheduled change (-1: none)."""
        terms = self.terms.get(did)
        return -1 if terms is None else terms[-1].from_slot

    def lineage(self, did: str) -> list[str]:
        """``did`` and the DIDs it replaced by key rotation, newest first."""
        chain = [did]
        while chain[-1] in self.predecessor and len(chain) <= len(self.records):
            chain.append(self.predecessor[chain[-1]])
        return chain

    def swaps_between(self, did: str, after_slot: int, through_slot: int) -> list[ReplaceMeter]:
        """Meter swaps of the household (under any of its DIDs) in force from a slot in
        ``(after_slot, through_slot]``, in slot order."""
        found = [
            sw
            for d in self.lineage(did)
            for sw in self.swaps.get(d, ())
            if after_slot < sw.from_slot <= through_slot
        ]
        return sorted(found, key=lambda sw: sw.from_slot)

    def config_at(self, base: MarketConfig, slot: int) -> MarketConfig:
        """The market rules in force in ``slot``: the genesis rules ``base`` with every rules
        change from ``slot`` or earlier applied in ``(from_slot, log order)``."""
        n = bisect_right(self.rules_changes, slot, key=lambda e: e[0])
        return self._config_after(base, n)

    def _config_after(self, base: MarketConfig, n: int) -> MarketConfig:
        if n == 0:
            return base
        config = self._configs.get(n)
        if config is None:
            config = self._config_after(base, n - 1).with_changes(
                self.rules_changes[n - 1][2].changes()
            )
            self._configs[n] = config
        return config

    def rules_history(self, base: MarketConfig) -> list[tuple[int, MarketConfig]]:
        """``(from_slot, rules)`` for the genesis rules (slot 0) and after each change."""
        history = [(0, base)]
        for n, (slot, _, _) in enumerate(self.rules_changes, start=1):
            history.append((slot, self._config_after(base, n)))
        return history


__all__ = ["Governance", "MemberStatus", "Term"]
