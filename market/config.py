"""The market rules of one microgrid: :class:`MarketConfig`.

The genesis fixes a grid's first rules; the operator's :class:`~market.models.ChangeRules`
records change the tariffs, the time-of-use periods, the mechanism and ``k`` from a future slot
(:meth:`MarketConfig.with_changes`; the engine keeps the history, :mod:`market.governance`).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

from pydantic import TypeAdapter, ValidationError

from market.auction import MECHANISMS
from market.bounds import (
    DEFAULT_SLOT_SECONDS,
    MAX_COUNTER_WH,
    MAX_K_DENOMINATOR,
    MAX_NONCE_WINDOW,
    MAX_POWER_W,
    MAX_PRICE,
    MAX_QUANTITY_WH,
    MAX_SLOT_HORIZON,
    MAX_SLOT_SECONDS,
    Did,
    Identifier,
    MeterSerial,
)
from market.encoding import canonical_bytes, sha256
from market.models import MAX_TIME_OF_USE_PERIODS, MINUTES_PER_DAY, TimeOfUsePeriod
from market.settlement import Tariffs

_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)
_DID: TypeAdapter[str] = TypeAdapter(Did)
_METER_SERIAL: TypeAdapter[str] = TypeAdapter(MeterSerial)

DEFAULT_FEEDER_MAX_POWER_W = 1_000_000
"""The feeder meter's rated power unless the genesis says otherwise (1 MW)."""
DEFAULT_FEEDER_LOSS_PERMILLE = 50
"""Allowed line losses unless the genesis says otherwise: 5 % of the energy households moved."""
DEFAULT_FEEDER_TOLERANCE_WH = 100
"""Absolute slack of the feeder check unless the genesis says otherwise."""
RULES = 2
"""The settlement rules this version applies to new grids. 1: the counter movement over
unmeasured slots is left unsettled (grids whose genesis predates the ``rules`` field); 2: it is
trued up at the grid's prices (:class:`market.settlement.Gap`), and a household whose meter
stays silent for ``max_silent_slots`` settled slots has its new orders refused."""
DEFAULT_MAX_SILENT_SLOTS = 4
MAX_SILENT_SLOTS = 10_000
DEFAULT_REPUTATION_WINDOW_SLOTS = 96
"""Slots the delivery record looks back over (an exponentially weighted window: one day of
15-minute slots)."""
DEFAULT_SELL_FLOOR_PERMILLE = 100
"""The share of its meter's capacity a household may always offer, however poor its record."""


class MarketConfigError(ValueError):
    """Market rules read from a file or a peer that :meth:`MarketConfig.from_json` refuses."""

    def __init__(self, problem: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.problem = problem
        self.field = field

    def within(self, where: str) -> str:
        """The message with the document's path in front, e.g. ``market.k: ...``."""
        return f"{where}.{self.field}: {self.problem}" if self.field else f"{where}: {self.problem}"


_CONFIG_FIELDS = frozenset(
    {"grid", "operator", "feed_in_tariff", "retail_price", "mechanism", "k", "slot_horizon",
     "max_order_wh", "nonce_window"}
)  # fmt: skip
"""What :meth:`MarketConfig.to_json` always writes; ``slot_seconds`` too unless it is the
default, and the :data:`_FEEDER_CONFIG_FIELDS` when the grid has a feeder meter."""
_FEEDER_CONFIG_FIELDS = frozenset(
    {"feeder_serial", "feeder_max_power_w", "feeder_loss_permille", "feeder_tolerance_wh"}
)
_OPTIONAL_CONFIG_FIELDS = frozenset(
    {"slot_seconds", "rules", "max_silent_slots", "reputation_window_slots", "sell_floor_permille",
     "time_of_use", "local_fee", "grid_fee"}
)  # fmt: skip
"""Left out by :meth:`MarketConfig.to_json` at their defaults (``rules`` at 1), so the genesis
files and hashes of grids created before they existed stay valid."""
_CONFIG_STRINGS = frozenset({"grid", "operator", "mechanism", "k", "feeder_serial"})
_K = re.compile(r"(0|[1-9][0-9]{0,19})/([1-9][0-9]{0,19})")
"""``k`` as ``to_json`` writes it: ``numerator/denominator`` in decimal (never parsed by
``Fraction(str)``, which would take ``"1e-999999999"`` and work for minutes)."""


@dataclass(frozen=True, slots=True)
class MarketConfig:
    """The market rules of one microgrid, fixed by its signed genesis."""

    grid: str
    operator: str
    """DID of the grid operator, who signs membership."""
    feed_in_tariff: int
    """Price floor: what the grid pays per kWh (minor units)."""
    retail_price: int
    """Price cap: what the grid charges per kWh (minor units)."""
    mechanism: str = "uniform"
    k: Fraction = Fraction(1, 2)
    slot_horizon: int = 96
    """How many slots ahead of the last closed gate orders are accepted."""
    max_order_wh: int = 1_000_000
    nonce_window: int = 1024
    """Nonces may arrive out of order within this window below a signer's highest nonce."""
    slot_seconds: int = DEFAULT_SLOT_SECONDS
    """Metered seconds per slot: with each member's ``max_power_w`` it bounds how much a meter
    counter can rise per slot. A real meter meters the genesis slot length; an accelerated
    simulation (the demo) may meter more per slot, never less."""
    feeder_serial: str = ""
    """Serial of the feeder meter at the transformer; "" means the grid has none (no feeder
    check, and :class:`~market.models.FeederReading` is rejected ``unknown_meter``)."""
    feeder_max_power_w: int = DEFAULT_FEEDER_MAX_POWER_W
    """Bounds the feeder counters' rise per slot, like a household's ``max_power_w``."""
    feeder_loss_permille: int = DEFAULT_FEEDER_LOSS_PERMILLE
    """Allowed line losses, per mille of the energy the households moved (import + export)."""
    feeder_tolerance_wh: int = DEFAULT_FEEDER_TOLERANCE_WH
    """Absolute slack of the feeder check (meter resolution, timing)."""
    rules: int = RULES
    """Version of the settlement rules (:data:`RULES`); a genesis without the field means 1."""
    max_silent_slots: int = DEFAULT_MAX_SILENT_SLOTS
    """Settled slots in a row without a reading after which a household's new orders are
    refused (``meter_silent``) until its meter reports again (rules 2)."""
    reputation_window_slots: int = DEFAULT_REPUTATION_WINDOW_SLOTS
    """Window of the delivery record that limits what a household may offer (rules 2)."""
    sell_floor_permille: int = DEFAULT_SELL_FLOOR_PERMILLE
    """What a household may offer per slot however poor its record, in permille of what its
    meter can export in a slot (rules 2; a newcomer may offer all of it)."""
    time_of_use: tuple[tuple[int, int, int], ...] = ()
    """Daily tariff periods ``(start_minute, feed_in_tariff, retail_price)``, UTC, the first
    starting at minute 0, in increasing order; empty: the flat ``feed_in_tariff`` and
    ``retail_price`` hold all day. A slot's tariffs, and so its orders' price band, are those of
    the period its start falls in (:meth:`tariffs_at`)."""
    local_fee: int = 0
    """Grid fee per kWh a household buys in the local market (minor units), paid by the buyer
    to the ``network`` account; 0: none."""
    grid_fee: int = 0
    """Grid fee per kWh a household imports from the grid (minor units), on top of the retail
    price, paid to the ``network`` account; 0: none."""

    def __post_init__(self) -> None:
        """Refuse rules no node could store or apply: every bound of :mod:`market.bounds`."""
        for name, adapter in (("grid", _IDENTIFIER), ("operator", _DID)):
            try:
                adapter.validate_python(getattr(self, name))
            except ValidationError as exc:
                raise ValueError(f"{name}: {exc.errors()[0]['msg']}") from None
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {self.mechanism!r}")
        _check_int("feed_in_tariff", self.feed_in_tariff, 0, MAX_PRICE)
        _check_int("retail_price", self.retail_price, 0, MAX_PRICE)
        if not self.feed_in_tariff <= self.retail_price:
            raise ValueError("need 0 <= feed_in_tariff <= retail_price")
        if not isinstance(self.k, Fraction) or not 0 <= self.k <= 1:
            raise ValueError("k must be a Fraction in [0, 1]")
        if self.k.denominator > MAX_K_DENOMINATOR:
            raise ValueError(f"k's denominator must be at most {MAX_K_DENOMINATOR}")
        _check_int("slot_horizon", self.slot_horizon, 1, MAX_SLOT_HORIZON)
        _check_int("max_order_wh", self.max_order_wh, 1, MAX_QUANTITY_WH)
        _check_int("nonce_window", self.nonce_window, 1, MAX_NONCE_WINDOW)
        _check_int("slot_seconds", self.slot_seconds, 1, MAX_SLOT_SECONDS)
        if not isinstance(self.feeder_serial, str):
            raise ValueError("feeder_serial must be a string")
        if self.feeder_serial:
            try:
                _METER_SERIAL.validate_python(self.feeder_serial)
            except ValidationError as exc:
                raise ValueError(f"feeder_serial: {exc.errors()[0]['msg']}") from None
        _check_int("feeder_max_power_w", self.feeder_max_power_w, 0, MAX_POWER_W)
        _check_int("feeder_loss_permille", self.feeder_loss_permille, 0, 1000)
        _check_int("feeder_tolerance_wh", self.feeder_tolerance_wh, 0, MAX_COUNTER_WH)
        _check_int("rules", self.rules, 1, RULES)
        _check_int("max_silent_slots", self.max_silent_slots, 1, MAX_SILENT_SLOTS)
        _check_int("reputation_window_slots", self.reputation_window_slots, 1, MAX_SILENT_SLOTS)
        _check_int("sell_floor_permille", self.sell_floor_permille, 0, 1000)
        _check_time_of_use(self.time_of_use)
        _check_int("local_fee", self.local_fee, 0, MAX_PRICE)
        _check_int("grid_fee", self.grid_fee, 0, MAX_PRICE)

    @classmethod
    def from_json(cls, doc: object) -> MarketConfig:
        """Inverse of :meth:`to_json`, for rules read from a genesis file, a snapshot or a
        ledger: exactly the fields ``to_json`` writes, strings as strings, integers as
        integers (never a bool or a float), ``k`` as ``numerator/denominator`` in decimal,
        then every bound of ``__post_init__``. Raises :class:`MarketConfigError` naming the
        field."""
        if not isinstance(doc, dict):
            raise MarketConfigError("expected an object")
        wrong = (set(doc) ^ _CONFIG_FIELDS) - _OPTIONAL_CONFIG_FIELDS - _FEEDER_CONFIG_FIELDS
        if wrong:
            raise MarketConfigError(f"fields {sorted(map(str, wrong))[:10]} missing or unexpected")
        feeder = set(doc) & _FEEDER_CONFIG_FIELDS
        if feeder and feeder != _FEEDER_CONFIG_FIELDS:
            missing = sorted(_FEEDER_CONFIG_FIELDS - feeder)
            raise MarketConfigError(f"feeder fields {missing} missing (all four or none)")
        for name, value in doc.items():
            if name == "time_of_use":
                continue
            want = str if name in _CONFIG_STRINGS else int
            if type(value) is not want:
                kind = "a string" if want is str else "an integer"
                raise MarketConfigError(f"expected {kind}", name)
        fields = dict(doc)
        if "time_of_use" in doc:
            fields["time_of_use"] = _time_of_use_from_json(doc["time_of_use"])
        if feeder and not doc["feeder_serial"]:
            raise MarketConfigError("empty (leave the feeder fields out)", "feeder_serial")
        match = _K.fullmatch(doc["k"])
        if match is None:
            raise MarketConfigError("expected a fraction 'numerator/denominator'", "k")
        fields["k"] = Fraction(int(match[1]), int(match[2]))
        fields.setdefault("rules", 1)  # written since rules 2: its absence means the first rules
        try:
            return cls(**fields)
        except (ValueError, TypeError, ZeroDivisionError) as exc:
            raise MarketConfigError(str(exc)) from None

    @property
    def has_feeder(self) -> bool:
        """True if the grid has a feeder meter (and so a feeder check per block)."""
        return self.feeder_serial != ""

    def to_json(self) -> dict[str, object]:
        """Canonical fields (k as a fraction string).

        ``slot_seconds`` is left out at its default (900), and the four ``feeder_*`` fields
        unless the grid has a feeder meter, so the genesis hash, genesis files and ledgers of
        grids created before the fields existed stay valid."""
        doc: dict[str, object] = {
            "grid": self.grid,
            "operator": self.operator,
            "feed_in_tariff": self.feed_in_tariff,
            "retail_price": self.retail_price,
            "mechanism": self.mechanism,
            "k": f"{self.k.numerator}/{self.k.denominator}",
            "slot_horizon": self.slot_horizon,
            "max_order_wh": self.max_order_wh,
            "nonce_window": self.nonce_window,
        }
        if self.slot_seconds != DEFAULT_SLOT_SECONDS:
            doc["slot_seconds"] = self.slot_seconds
        if self.rules != 1:
            doc["rules"] = self.rules
        if self.max_silent_slots != DEFAULT_MAX_SILENT_SLOTS:
            doc["max_silent_slots"] = self.max_silent_slots
        if self.reputation_window_slots != DEFAULT_REPUTATION_WINDOW_SLOTS:
            doc["reputation_window_slots"] = self.reputation_window_slots
        if self.sell_floor_permille != DEFAULT_SELL_FLOOR_PERMILLE:
            doc["sell_floor_permille"] = self.sell_floor_permille
        if self.time_of_use:
            doc["time_of_use"] = [list(period) for period in self.time_of_use]
        if self.local_fee:
            doc["local_fee"] = self.local_fee
        if self.grid_fee:
            doc["grid_fee"] = self.grid_fee
        if self.has_feeder:
            doc["feeder_serial"] = self.feeder_serial
            doc["feeder_max_power_w"] = self.feeder_max_power_w
            doc["feeder_loss_permille"] = self.feeder_loss_permille
            doc["feeder_tolerance_wh"] = self.feeder_tolerance_wh
        return doc

    def rules_hash(self) -> str:
        """Hex hash of these rules, as a block header names the rules its slot was settled
        under."""
        return sha256(canonical_bytes("rules", self.to_json())).hex()

    def genesis_hash(self) -> str:
        """The hash the first block points back to: ties the chain to these rules."""
        return sha256(canonical_bytes("genesis", self.to_json())).hex()

    @property
    def tariffs(self) -> Tariffs:
        """The flat feed-in tariff and retail price (without time-of-use: every slot's), and
        the grid fees."""
        return Tariffs(self.feed_in_tariff, self.retail_price, self.local_fee, self.grid_fee)

    def tariffs_at(self, slot: int) -> Tariffs:
        """The grid's tariffs in ``slot``: the time-of-use period its start falls in, or the
        flat tariffs (the grid fees hold all day). Feed-in tariff and retail price are also
        the slot's price band for orders."""
        if not self.time_of_use:
            return self.tariffs
        minute = slot * self.slot_seconds % 86_400 // 60
        i = bisect_right(self.time_of_use, minute, key=lambda p: p[0]) - 1
        _, feed_in, retail = self.time_of_use[i]
        return Tariffs(feed_in, retail, self.local_fee, self.grid_fee)

    def with_changes(self, changes: Mapping[str, Any]) -> MarketConfig:
        """These rules with ``changes`` (:meth:`market.models.ChangeRules.changes`) applied:
        ``k`` as ``numerator/denominator`` text, ``time_of_use`` as
        :class:`~market.models.TimeOfUsePeriod` records. Raises :class:`MarketConfigError` if
        the result is not a consistent set of rules."""
        fields: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "k":
                match = _K.fullmatch(value)
                if match is None:
                    raise MarketConfigError("expected a fraction 'numerator/denominator'", "k")
                fields["k"] = Fraction(int(match[1]), int(match[2]))
            elif name == "time_of_use":
                fields["time_of_use"] = tuple(
                    (p.start_minute, p.feed_in_tariff, p.retail_price)
                    if isinstance(p, TimeOfUsePeriod)
                    else tuple(p)
                    for p in value
                )
            elif name in {"feed_in_tariff", "retail_price", "mechanism", "local_fee", "grid_fee"}:
                fields[name] = value
            else:
                raise MarketConfigError("not a rule that can change", name)
        try:
            return replace(self, **fields)
        except (ValueError, TypeError, ZeroDivisionError) as exc:
            raise MarketConfigError(str(exc)) from None


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def _check_time_of_use(periods: object) -> None:
    """Time-of-use periods: a tuple of ``(start_minute, feed_in_tariff, retail_price)``, the
    first at minute 0, strictly increasing, ``0 <= feed_in_tariff <= retail_price``."""
    if not isinstance(periods, tuple) or len(periods) > MAX_TIME_OF_USE_PERIODS:
        raise ValueError(f"time_of_use: a tuple of at most {MAX_TIME_OF_USE_PERIODS} periods")
    previous = -1
    for i, period in enumerate(periods):
        if not isinstance(period, tuple) or len(period) != 3:
            raise ValueError(f"time_of_use[{i}] must be (start_minute, feed_in, retail)")
        start, feed_in, retail = period
        _check_int(f"time_of_use[{i}] start_minute", start, 0, MINUTES_PER_DAY - 1)
        _check_int(f"time_of_use[{i}] feed_in_tariff", feed_in, 0, MAX_PRICE)
        _check_int(f"time_of_use[{i}] retail_price", retail, 0, MAX_PRICE)
        if i == 0 and start != 0:
            raise ValueError("time_of_use must start at minute 0")
        if start <= previous:
            raise ValueError("time_of_use periods must start in increasing minutes")
        if feed_in > retail:
            raise ValueError(f"time_of_use[{i}]: need feed_in_tariff <= retail_price")
        previous = start


def _time_of_use_from_json(doc: object) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(doc, list) or not all(
        isinstance(p, list) and len(p) == 3 and all(type(v) is int for v in p) for p in doc
    ):
        raise MarketConfigError("expected a list of [start_minute, feed_in, retail]", "time_of_use")
    return tuple((p[0], p[1], p[2]) for p in doc)
