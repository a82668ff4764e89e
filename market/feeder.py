"""The feeder-meter check: does a settled slot add up at the transformer?

A grid with a feeder meter (``MarketConfig.feeder_serial``) compares, at each settlement, the
energy the feeder meter measured over the slot with what the households' meters measured. Line
losses make the feeder import a little more than the households' net import; a member that
inflates its export (or hides its import) within its meter's rated power passes the per-meter
plausibility rule, but makes the slot not add up.

Pure integer arithmetic, no I/O: the engine computes the check at ``SettleSlot`` and
``ledger verify`` recomputes it from the ledger's rows with the same function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from market.encoding import canonical_bytes, sha256
from market.models import FeederReading

FEEDER_CHECK_KIND = "feeder_check"
"""Kind tag of the canonical encoding a block's ``feeder`` header field hashes."""


class FeederStatus(StrEnum):
    """Outcome of a slot's feeder check. Stable strings: stored in ``feeder_checks.status``."""

    OK = "ok"
    """The feeder's net import equals the households' within the loss band."""
    MISMATCH = "mismatch"
    """The slot does not add up: some household's meter (or the feeder's) is wrong."""
    NO_FEEDER_READING = "no_feeder_reading"
    """No feeder reading for the slot, or none for the slot before to difference against."""
    HOUSEHOLDS_UNMEASURED = "households_unmeasured"
    """Some member household has no measured settlement in the slot: nothing to compare."""


@dataclass(frozen=True, slots=True)
class FeederCheck:
    """The feeder comparison of one settled slot (one ``feeder_checks`` row).

    The reading fields (``meter_serial`` .. ``signature``) are the feeder reading of the slot
    the check used, or all None when there was none. The four numbers are None unless the
    status is ``ok`` or ``mismatch``.
    """

    slot: int
    status: FeederStatus
    meter_serial: str | None = None
    import_wh: int | None = None
    export_wh: int | None = None
    nonce: int | None = None
    signature: str | None = None
    feeder_net_wh: int | None = None
    """The feeder's net import over the slot (import rise minus export rise)."""
    households_net_wh: int | None = None
    """Sum over the measured households of import minus export in the slot."""
    difference_wh: int | None = None
    """``feeder_net_wh - households_net_wh``: the line losses, if the meters are honest."""
    allowed_loss_wh: int | None = None
    """The most ``difference_wh`` may be: tolerance plus the loss per mille of energy moved."""

    def to_json(self) -> dict[str, Any]:
        """The fields the block's ``feeder`` hash covers (every field but ``slot``, which the
        block header carries itself)."""
        doc = {name: getattr(self, name) for name in FEEDER_CHECK_FIELDS}
        doc["status"] = str(self.status)
        return doc

    @classmethod
    def from_json(cls, slot: int, doc: Mapping[str, Any]) -> FeederCheck:
        """Inverse of :meth:`to_json` (also takes a ``feeder_checks`` row's mapping); raises
        :class:`ValueError` for an unknown status."""
        status = FeederStatus(doc["status"])
        return cls(slot, status, *(doc[name] for name in FEEDER_CHECK_FIELDS[1:]))

    @property
    def hash(self) -> str:
        """Hex SHA-256 of the canonical encoding (kind ``feeder_check``): the block header's
        ``feeder`` field."""
        return sha256(canonical_bytes(FEEDER_CHECK_KIND, self.to_json())).hex()


FEEDER_CHECK_FIELDS = tuple(f.name for f in dataclasses.fields(FeederCheck) if f.name != "slot")
"""The fields of :meth:`FeederCheck.to_json`, in order: a ``feeder_checks`` row without slot
and block height, and a block-sync chunk's ``feeder`` object."""


@dataclass(frozen=True, slots=True)
class HouseholdFlow:
    """What one member household's settlement measured in the slot (the check's input)."""

    measured: bool
    import_wh: int
    export_wh: int


def feeder_check(
    slot: int,
    reading: FeederReading | None,
    baseline: FeederReading | None,
    households: Iterable[HouseholdFlow],
    *,
    loss_permille: int,
    tolerance_wh: int,
) -> FeederCheck:
    """The feeder check of ``slot``.

    ``reading`` is the feeder reading of ``slot`` (None if none was accepted), ``baseline`` the
    last feeder reading settlement used before it, ``households`` the settlement of every member
    household in the slot. Status, in this order: ``no_feeder_reading`` without a reading or
    without a baseline of ``slot - 1``; ``households_unmeasured`` if a household was not
    measured; else ``ok`` when ``-tolerance_wh <= difference_wh <= allowed_loss_wh``, where
    ``allowed_loss_wh = tolerance_wh + loss_permille * moved // 1000`` and ``moved`` sums the
    households' import and export; ``mismatch`` otherwise.
    """
    fields: dict[str, Any] = {}
    if reading is not None:
        fields = {
            "meter_serial": reading.meter_serial,
            "import_wh": reading.import_wh,
            "export_wh": reading.export_wh,
            "nonce": reading.nonce,
            "signature": reading.signature,
        }
    if reading is None or baseline is None or baseline.slot != slot - 1:
        return FeederCheck(slot, FeederStatus.NO_FEEDER_READING, **fields)
    flows = list(households)
    if not all(h.measured for h in flows):
        return FeederCheck(slot, FeederStatus.HOUSEHOLDS_UNMEASURED, **fields)
    feeder_net = (reading.import_wh - baseline.import_wh) - (reading.export_wh - baseline.export_wh)
    households_net = sum(h.import_wh - h.export_wh for h in flows)
    moved = sum(h.import_wh + h.export_wh for h in flows)
    difference = feeder_net - households_net
    allowed = tolerance_wh + loss_permille * moved // 1000
    ok = -tolerance_wh <= difference <= allowed
    return FeederCheck(
        slot,
        FeederStatus.OK if ok else FeederStatus.MISMATCH,
        **fields,
        feeder_net_wh=feeder_net,
        households_net_wh=households_net,
        difference_wh=difference,
        allowed_loss_wh=allowed,
    )


__all__ = [
    "FEEDER_CHECK_FIELDS",
    "FEEDER_CHECK_KIND",
    "FeederCheck",
    "FeederStatus",
    "HouseholdFlow",
    "feeder_check",
]
