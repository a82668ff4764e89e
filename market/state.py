"""The replicated state machine: ``apply(state, command) -> (state, events)``.

Every node feeds the same committed commands, in log order, into :func:`apply` and so holds the
same state and writes the same blocks. The engine reads nothing but its arguments: no clock (gate
closure and settlement are commands the Raft leader proposes), no randomness, no floats.

``apply`` updates ``state`` in place and returns it (copying a large book per command would make
replay quadratic). Every command is fully validated before anything changes, so a rejected
command leaves the state exactly as it was and yields a single :class:`~market.events.Rejected`.

Readings must be physically plausible: between two readings of one meter, neither counter may
rise by more than the household's registered ``max_power_w`` over the slots between them (see
:func:`plausible_rise_wh`), so settlement never sees energy a meter cannot have measured.

In a grid with a feeder meter (``MarketConfig.feeder_serial``), the operator signs a
:class:`~market.models.FeederReading` per slot, checked like a household's reading (against
``feeder_max_power_w``); settlement compares the feeder's net import with the households'
(:mod:`market.feeder`) and hashes the outcome into the block header.

Slot sequencing: gates close strictly one slot after another (``CloseGate(s)`` needs
``s == closed_through + 1`` once the first gate has closed) and slots settle in the same order,
never ahead of their gate. Orders are accepted for open slots up to ``slot_horizon`` ahead;
readings for slots whose gate closed and that are not settled yet.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

from pydantic import TypeAdapter, ValidationError

from market.accounting import Block, roots, state_hash
from market.auction import MECHANISMS, Clearing, clear
from market.bounds import (
    DEFAULT_MAX_POWER_W,
    DEFAULT_SLOT_SECONDS,
    MAX_COUNTER_WH,
    MAX_K_DENOMINATOR,
    MAX_NONCE_WINDOW,
    MAX_POWER_W,
    MAX_PRICE,
    MAX_QUANTITY_WH,
    MAX_SLOT_HORIZON,
    MAX_SLOT_SECONDS,
    READING_SLACK_WH,
    Did,
    Identifier,
    MeterSerial,
)
from market.did import IdentityError, public_key_from_did
from market.encoding import canonical_bytes, sha256
from market.errors import Rejection, RejectReason
from market.events import (
    Event,
    FeederReadingAccepted,
    GateClosed,
    HouseholdRegistered,
    OrderAccepted,
    OrderCancelled,
    ReadingAccepted,
    Rejected,
    SlotSettled,
)
from market.feeder import FeederCheck, HouseholdFlow, feeder_check
from market.models import (
    CancelOrder,
    CloseGate,
    Command,
    FeederReading,
    MemberRegistration,
    MemberRole,
    MeterReading,
    Order,
    SettleSlot,
    Side,
    SignedRecord,
    Trade,
    record_hash,
)
from market.settlement import Gap, HouseholdSettlement, Metered, Tariffs, settle_slot

_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)
_DID: TypeAdapter[str] = TypeAdapter(Did)
_METER_SERIAL: TypeAdapter[str] = TypeAdapter(MeterSerial)

DEFAULT_FEEDER_MAX_POWER_W = 1_000_000
"""The feeder meter's rated power unless the genesis says otherwise (1 MW)."""
DEFAULT_FEEDER_LOSS_PERMILLE = 50
"""Allowed line losses unless the genesis says otherwise: 5 % of the energy households moved."""
DEFAULT_FEEDER_TOLERANCE_WH = 100
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
"""Absolute slack of the feeder check unless the genesis says otherwise."""


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
    {"slot_seconds", "rules", "max_silent_slots", "reputation_window_slots", "sell_floor_permille"}
)
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
            want = str if name in _CONFIG_STRINGS else int
            if type(value) is not want:
                kind = "a string" if want is str else "an integer"
                raise MarketConfigError(f"expected {kind}", name)
        if feeder and not doc["feeder_serial"]:
            raise MarketConfigError("empty (leave the feeder fields out)", "feeder_serial")
        match = _K.fullmatch(doc["k"])
        if match is None:
            raise MarketConfigError("expected a fraction 'numerator/denominator'", "k")
        fields = dict(doc)
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
        if self.has_feeder:
            doc["feeder_serial"] = self.feeder_serial
            doc["feeder_max_power_w"] = self.feeder_max_power_w
            doc["feeder_loss_permille"] = self.feeder_loss_permille
            doc["feeder_tolerance_wh"] = self.feeder_tolerance_wh
        return doc

    def genesis_hash(self) -> str:
        """The hash the first block points back to: ties the chain to these rules."""
        return sha256(canonical_bytes("genesis", self.to_json())).hex()

    @property
    def tariffs(self) -> Tariffs:
        """Feed-in tariff and retail price."""
        return Tariffs(self.feed_in_tariff, self.retail_price)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def plausible_rise_wh(max_power_w: int, slot_seconds: int, slots: int) -> int:
    """Most a meter counter may rise over ``slots`` slots at ``max_power_w``: the energy at that
    power, rounded down to whole Wh, plus :data:`~market.bounds.READING_SLACK_WH` once for the
    quantisation of the two counter values compared."""
    return max_power_w * slot_seconds * slots // 3600 + READING_SLACK_WH


@dataclass(slots=True)
class NonceWindow:
    """Anti-replay window of one signer: each nonce once, none far below the highest."""

    highest: int = -1
    recent: set[int] = field(default_factory=set)

    def check(self, nonce: int, window: int) -> None:
        """Raise :class:`Rejection` unless ``nonce`` is fresh."""
        if nonce < 0 or nonce <= self.highest - window or nonce in self.recent:
            raise Rejection(
                RejectReason.REPLAYED_NONCE, f"nonce {nonce} already used or below the window"
            )

    def consume(self, nonce: int, window: int) -> None:
        """Record ``nonce`` as used."""
        self.recent.add(nonce)
        if nonce > self.highest:
            self.highest = nonce
        if len(self.recent) > 2 * window:
            floor = self.highest - window
            self.recent = {n for n in self.recent if n > floor}


@dataclass(frozen=True, slots=True)
class Member:
    """A registered household."""

    meter_serial: str
    role: MemberRole
    max_power_w: int = DEFAULT_MAX_POWER_W


@dataclass(slots=True)
class Reputation:
    """Delivery reliability of a household, accumulated over settled slots."""

    sold_wh: int = 0
    delivered_wh: int = 0
    bought_wh: int = 0
    consumed_wh: int = 0
    slots: int = 0
    missed_readings: int = 0
    silent_slots: int = 0
    """Settled slots in a row without a reading of this household (0 once a reading arrives)."""
    recent_sold_wh: int = 0
    """Energy sold, over the reputation window (each settled slot keeps ``(W - 1) / W`` of the
    previous value, rounded down, and adds the slot's)."""
    recent_delivered_wh: int = 0
    """Energy delivered against sales, over the same window."""

    @property
    def recent_score_permille(self) -> int:
        """Sales honoured over the window, in permille (1000 with none: a newcomer)."""
        return delivery_score_permille(self.recent_sold_wh, self.recent_delivered_wh)

    @property
    def score_permille(self) -> int:
        """Share of contracted energy honoured, in permille (1000 with no contracts yet)."""
        contracted = self.sold_wh + self.bought_wh
        if contracted == 0:
            return 1000
        return (self.delivered_wh + self.consumed_wh) * 1000 // contracted


def window_add(total: int, add: int, window: int) -> int:
    """``total`` over an exponentially weighted window of ``window`` slots after one more slot
    adds ``add``: it keeps ``(window - 1) / window`` of the old total, rounded down."""
    return total * (window - 1) // window + add


def delivery_score_permille(sold_wh: int, delivered_wh: int) -> int:
    """The share of sales delivered, in permille (1000 with no sales: a newcomer)."""
    if sold_wh == 0:
        return 1000
    return min(1000, delivered_wh * 1000 // sold_wh)


def offer_share_permille(config: MarketConfig, score_permille: int) -> int:
    """The share of its meter's capacity per slot a household with ``score_permille`` may offer
    (:func:`sell_limit_wh`)."""
    return max(score_permille, config.sell_floor_permille)


@dataclass(slots=True)
class State:
    """Everything the contract engine knows. Build with :meth:`State.initial`."""

    config: MarketConfig
    members: dict[str, Member] = field(default_factory=dict)
    nonces: dict[str, NonceWindow] = field(default_factory=dict)
    books: dict[int, dict[str, Order]] = field(default_factory=dict)
    """Open slots' orders by id, in log order (dicts keep insertion order)."""
    cleared: dict[int, tuple] = field(default_factory=dict)
    """Closed, unsettled slots: their enriched trades."""
    closed_books: dict[int, tuple[Order, ...]] = field(default_factory=dict)
    """Closed, unsettled slots: the books they cleared, in log order. Settlement does not need
    them; a node that installs a snapshot does, to write those gate closures to its ledger."""
    pending_readings: dict[int, dict[str, MeterReading]] = field(default_factory=dict)
    baselines: dict[str, MeterReading] = field(default_factory=dict)
    """The last reading each household's settlement used."""
    pending_feeder: dict[int, FeederReading] = field(default_factory=dict)
    """Closed, unsettled slots: the feeder reading accepted for each."""
    feeder_baseline: FeederReading | None = None
    """The last feeder reading a settlement used."""
    closed_through: int | None = None
    settled_through: int | None = None
    balances: dict[tuple[str, str], int] = field(default_factory=dict)
    reputation: dict[str, Reputation] = field(default_factory=dict)
    height: int = 0
    head_hash: str = ""

    @classmethod
    def initial(cls, config: MarketConfig) -> State:
        """The state before any command: no members, empty ledger."""
        return cls(config=config, head_hash=config.genesis_hash())

    def copy(self) -> State:
        """A deep, independent copy (for tests and what-if evaluation)."""
        return copy.deepcopy(self)


def apply(state: State, command: Command) -> tuple[State, list[Event]]:
    """Apply one committed command. Returns the (same, updated) state and what happened."""
    try:
        if isinstance(command, Order):
            events = _submit_order(state, command)
        elif isinstance(command, CancelOrder):
            events = _cancel_order(state, command)
        elif isinstance(command, MeterReading):
            events = _submit_reading(state, command)
        elif isinstance(command, FeederReading):
            events = _submit_feeder_reading(state, command)
        elif isinstance(command, MemberRegistration):
            events = _register(state, command)
        elif isinstance(command, CloseGate):
            events = _close_gate(state, command.slot)
        elif isinstance(command, SettleSlot):
            events = _settle(state, command.slot)
        else:
            raise TypeError(f"not a command: {type(command).__name__}")
    except Rejection as rejection:
        author = command.author if isinstance(command, SignedRecord) else None
        kind = getattr(command, "type", type(command).__name__)
        return state, [Rejected(rejection.reason, rejection.detail, kind, author)]
    return state, events


# --- signed records ---------------------------------------------------------------------------


def _authenticate(state: State, record: SignedRecord) -> None:
    """Grid, membership, signature and replay checks common to every signed record."""
    if record.grid != state.config.grid:
        raise Rejection(RejectReason.WRONG_GRID, f"record is for grid {record.grid!r}")
    author = record.author
    if isinstance(record, (MemberRegistration, FeederReading)):
        if author != state.config.operator:
            raise Rejection(RejectReason.NOT_OPERATOR, f"{author} is not the grid operator")
    elif author not in state.members:
        raise Rejection(RejectReason.UNKNOWN_HOUSEHOLD, f"{author} is not a member")
    if not record.verify(author):
        raise Rejection(RejectReason.BAD_SIGNATURE, f"{record.KIND} signature does not verify")
    state.nonces.get(author, NonceWindow()).check(record.nonce, state.config.nonce_window)


def _consume_nonce(state: State, record: SignedRecord) -> None:
    window = state.nonces.setdefault(record.author, NonceWindow())
    window.consume(record.nonce, state.config.nonce_window)


def _register(state: State, reg: MemberRegistration) -> list[Event]:
    _authenticate(state, reg)
    try:
        public_key_from_did(reg.household)
    except IdentityError as exc:
        raise Rejection(RejectReason.INVALID_HOUSEHOLD_ID, str(exc)) from None
    if not reg.meter_serial:
        raise Rejection(RejectReason.UNKNOWN_METER, "registration names no meter serial")
    _consume_nonce(state, reg)
    previous = state.members.get(reg.household)
    state.members[reg.household] = Member(reg.meter_serial, reg.role, reg.max_power_w)
    state.reputation.setdefault(reg.household, Reputation())
    if previous is not None and previous.meter_serial != reg.meter_serial:
        # A replaced meter starts a new counter baseline.
        state.baselines.pop(reg.household, None)
    return [HouseholdRegistered(reg)]


def _submit_order(state: State, order: Order) -> list[Event]:
    _authenticate(state, order)
    cfg = state.config
    if not 0 < order.quantity_wh <= cfg.max_order_wh:
        raise Rejection(
            RejectReason.INVALID_QUANTITY,
            f"quantity {order.quantity_wh} Wh outside 1..{cfg.max_order_wh}",
        )
    if not cfg.feed_in_tariff <= order.price <= cfg.retail_price:
        raise Rejection(
            RejectReason.PRICE_OUT_OF_BAND,
            f"price {order.price} outside [{cfg.feed_in_tariff}, {cfg.retail_price}]",
        )
    if state.closed_through is not None:
        if order.slot <= state.closed_through:
            raise Rejection(RejectReason.GATE_CLOSED, f"gate of slot {order.slot} is closed")
        if order.slot > state.closed_through + cfg.slot_horizon:
            raise Rejection(
                RejectReason.SLOT_TOO_FAR, f"slot {order.slot} is beyond the order horizon"
            )
    if cfg.rules >= 2:
        rep = state.reputation.get(order.household)
        if rep is not None and rep.silent_slots >= cfg.max_silent_slots:
            raise Rejection(
                RejectReason.METER_SILENT,
                f"no meter reading for {rep.silent_slots} settled slots: orders are refused "
                "until the meter reports again",
            )
    book = state.books.get(order.slot, {})
    if order.id in book:
        raise Rejection(RejectReason.DUPLICATE_ORDER, f"order id {order.id!r} already in book")
    mine = [o for o in book.values() if o.household == order.household]  # one pass over the book
    for resting in mine:
        if resting.side != order.side:
            raise Rejection(
                RejectReason.CONFLICTING_SIDE,
                f"household already has a {resting.side} order in slot {order.slot}",
            )
    if cfg.rules >= 2 and order.side == Side.SELL:
        limit = sell_limit_wh(state, order.household)
        offered = sum(o.quantity_wh for o in mine) + order.quantity_wh
        if offered > limit:
            rep = state.reputation.get(order.household, Reputation())
            raise Rejection(
                RejectReason.OVER_SELL_LIMIT,
                f"offers of {offered} Wh in slot {order.slot} exceed the {limit} Wh its "
                f"delivery record allows ({rep.recent_score_permille} permille of sales "
                "delivered recently)",
            )
    _consume_nonce(state, order)
    state.books.setdefault(order.slot, {})[order.id] = order
    return [OrderAccepted(order)]


def _cancel_order(state: State, cancel: CancelOrder) -> list[Event]:
    _authenticate(state, cancel)
    for book in state.books.values():
        order = book.get(cancel.order_id)
        if order is not None and order.household == cancel.household:
            break
    else:
        raise Rejection(
            RejectReason.UNKNOWN_ORDER, f"no open order {cancel.order_id!r} of this household"
        )
    _consume_nonce(state, cancel)
    del book[cancel.order_id]
    return [OrderCancelled(cancel, order)]


def _submit_reading(state: State, reading: MeterReading) -> list[Event]:
    _authenticate(state, reading)
    member = state.members[reading.household]
    if reading.meter_serial != member.meter_serial:
        raise Rejection(
            RejectReason.UNKNOWN_METER,
            f"meter {reading.meter_serial!r} is not the registered {member.meter_serial!r}",
        )
    _check_reading_slot(state, reading.slot)
    if reading.import_wh < 0 or reading.export_wh < 0:
        raise Rejection(RejectReason.INVALID_COUNTER, "meter counters must be non-negative")
    pending = state.pending_readings.get(reading.slot, {})
    if reading.household in pending:
        raise Rejection(RejectReason.DUPLICATE_READING, f"slot {reading.slot} already read")
    _check_monotonic(state, reading)
    _consume_nonce(state, reading)
    state.pending_readings.setdefault(reading.slot, {})[reading.household] = reading
    rep = state.reputation.get(reading.household)
    if rep is not None:
        rep.silent_slots = 0  # the meter reports again: its orders are accepted at once
    return [ReadingAccepted(reading)]


def _check_reading_slot(state: State, slot: int) -> None:
    """A reading (a household's or the feeder's) is for a slot whose gate closed and which has
    not settled yet."""
    if state.closed_through is None or slot > state.closed_through:
        raise Rejection(RejectReason.SLOT_NOT_CLOSED, f"gate of slot {slot} not closed")
    if state.settled_through is not None and slot <= state.settled_through:
        raise Rejection(RejectReason.SLOT_SETTLED, f"slot {slot} is already settled")


def _check_monotonic(state: State, reading: MeterReading) -> None:
    """Counters of one meter never go backwards across slots (pending or settled), and never
    rise faster than the household's registered power allows.

    The reading is compared with every other known reading of the same meter (the baseline and
    the pending ones, earlier or later slots): between two readings ``d`` slots apart, each
    counter may rise by at most :func:`plausible_rise_wh` ``(max_power_w, slot_seconds, d)``.
    So any two readings settlement differences were checked against each other.
    """
    base = state.baselines.get(reading.household)
    if base is not None and base.meter_serial != reading.meter_serial:
        base = None
    pending = [
        r
        for p in state.pending_readings.values()
        if (r := p.get(reading.household)) is not None and r.meter_serial == reading.meter_serial
    ]
    max_power_w = state.members[reading.household].max_power_w
    slot_seconds = state.config.slot_seconds
    if state.config.rules >= 2 and base is not None:
        if any(is_restart(base, r, max_power_w, slot_seconds) for r in pending):
            base = None  # a pending restart supersedes the old epoch's baseline
        elif is_restart(base, reading, max_power_w, slot_seconds):
            if pending:
                raise Rejection(
                    RejectReason.COUNTER_REGRESSION,
                    f"counters below those of slot {base.slot}: a meter restart is accepted "
                    "only as the next reading after the settled one",
                )
            return  # a restart: checked from zero by is_restart
    known = [r for r in (base, *pending) if r is not None]
    _check_counters(reading, known, max_power_w, slot_seconds)


def sell_limit_wh(state: State, household: str) -> int:
    """The most ``household`` may offer in one slot (rules 2): what its meter can export in a
    slot at its rated power, scaled by the share of its recent sales it delivered, and never
    below the grid's floor share of it."""
    cfg = state.config
    capacity = plausible_rise_wh(state.members[household].max_power_w, cfg.slot_seconds, 1)
    rep = state.reputation.get(household)
    score = 1000 if rep is None else rep.recent_score_permille
    return capacity * offer_share_permille(cfg, score) // 1000


def is_restart(
    base: MeterReading, reading: MeterReading, max_power_w: int, slot_seconds: int
) -> bool:
    """True if ``reading`` is a restart of the meter's registers after ``base``: a later slot,
    *both* counters below ``base``'s (a reset, a replaced memory, a wrapped register), and no
    higher than the meter could have counted from zero since ``base``. (A reading with one
    counter below is a fault: ``counter_regression``.)"""
    if reading.slot <= base.slot:
        return False
    if reading.import_wh >= base.import_wh or reading.export_wh >= base.export_wh:
        return False
    limit = plausible_rise_wh(max_power_w, slot_seconds, reading.slot - base.slot)
    return reading.import_wh <= limit and reading.export_wh <= limit


def _check_counters(
    reading: MeterReading | FeederReading,
    known: Sequence[MeterReading | FeederReading],
    max_power_w: int,
    slot_seconds: int,
) -> None:
    """Compare ``reading`` with every ``known`` reading of the same meter: no counter below an
    earlier one or above a later one (``counter_regression``), no rise beyond
    :func:`plausible_rise_wh` between the two (``implausible_reading``)."""
    for other in known:
        earlier = other.slot < reading.slot
        if earlier and (other.import_wh > reading.import_wh or other.export_wh > reading.export_wh):
            raise Rejection(
                RejectReason.COUNTER_REGRESSION,
                f"counters below those of slot {other.slot} "
                f"({reading.import_wh}/{reading.export_wh} < {other.import_wh}/{other.export_wh})",
            )
        if not earlier and (
            other.import_wh < reading.import_wh or other.export_wh < reading.export_wh
        ):
            raise Rejection(
                RejectReason.COUNTER_REGRESSION,
                f"counters above those of later slot {other.slot}",
            )
        first, last = (other, reading) if earlier else (reading, other)
        slots = last.slot - first.slot
        limit = plausible_rise_wh(max_power_w, slot_seconds, slots)
        for name in ("import_wh", "export_wh"):
            rise = getattr(last, name) - getattr(first, name)
            if rise > limit:
                raise Rejection(
                    RejectReason.IMPLAUSIBLE_READING,
                    f"{name} rose {rise} Wh from slot {first.slot} to {last.slot}: at most "
                    f"{limit} Wh at {max_power_w} W over {slots} x "
                    f"{slot_seconds} s (+{READING_SLACK_WH} Wh)",
                )


def _submit_feeder_reading(state: State, reading: FeederReading) -> list[Event]:
    """The operator's feeder-meter reading of a closed, unsettled slot (one per slot)."""
    _authenticate(state, reading)
    cfg = state.config
    if not cfg.has_feeder:
        raise Rejection(RejectReason.UNKNOWN_METER, "this grid has no feeder meter")
    if reading.meter_serial != cfg.feeder_serial:
        raise Rejection(
            RejectReason.UNKNOWN_METER,
            f"meter {reading.meter_serial!r} is not the feeder meter {cfg.feeder_serial!r}",
        )
    _check_reading_slot(state, reading.slot)
    if reading.slot in state.pending_feeder:
        raise Rejection(
            RejectReason.DUPLICATE_READING, f"feeder of slot {reading.slot} already read"
        )
    known = [
        r
        for r in (state.feeder_baseline, *state.pending_feeder.values())
        if r is not None and r.meter_serial == reading.meter_serial
    ]
    _check_counters(reading, known, cfg.feeder_max_power_w, cfg.slot_seconds)
    _consume_nonce(state, reading)
    state.pending_feeder[reading.slot] = reading
    return [FeederReadingAccepted(reading)]


# --- leader-proposed system commands ------------------------------------------------------------


def clear_book(
    config: MarketConfig, slot: int, orders: Sequence[Order]
) -> tuple[Clearing, tuple[Trade, ...]]:
    """Clear one slot's book (in log order) as the gate closure does: the clearing, and its
    trades with slot, buyer and seller filled in. Block sync and snapshot installs use it to
    recompute a gate closure they did not apply."""
    clearing = clear(orders, config.mechanism, config.k)
    owner = {o.id: o.household for o in orders}
    trades = tuple(
        t._replace(slot=slot, buyer=owner[t.buy_id], seller=owner[t.sell_id])
        for t in clearing.trades
    )
    return clearing, trades


def _close_gate(state: State, slot: int) -> list[Event]:
    if state.closed_through is not None and slot != state.closed_through + 1:
        raise Rejection(
            RejectReason.OUT_OF_SEQUENCE,
            f"next gate to close is slot {state.closed_through + 1}, not {slot}",
        )
    if state.closed_through is None:
        # Orders for slots before the first gate can never clear: drop them with the gate.
        for stale in [s for s in state.books if s < slot]:
            del state.books[stale]
        state.settled_through = slot - 1
    book = state.books.pop(slot, {})
    orders = tuple(book.values())
    clearing, trades = clear_book(state.config, slot, orders)
    state.closed_through = slot
    state.cleared[slot] = trades
    state.closed_books[slot] = orders
    return [GateClosed(slot, clearing, orders, trades)]


def _settle(state: State, slot: int) -> list[Event]:
    if state.settled_through is None or state.closed_through is None:
        raise Rejection(RejectReason.SLOT_NOT_CLOSED, "no gate has closed yet")
    if slot <= state.settled_through:
        raise Rejection(RejectReason.SLOT_SETTLED, f"slot {slot} is already settled")
    if slot != state.settled_through + 1:
        raise Rejection(
            RejectReason.OUT_OF_SEQUENCE,
            f"next slot to settle is {state.settled_through + 1}, not {slot}",
        )
    if slot > state.closed_through:
        raise Rejection(RejectReason.SLOT_NOT_CLOSED, f"gate of slot {slot} is not closed")

    trades = state.cleared.pop(slot, ())
    state.closed_books.pop(slot, None)
    readings = state.pending_readings.pop(slot, {})
    households = sorted(state.members)
    metered: dict[str, Metered] = {}
    gaps: dict[str, Gap] = {}
    used: list[MeterReading] = []
    for did in households:
        reading = readings.get(did)
        if reading is None:
            continue
        base = state.baselines.get(did)
        if base is not None and base.meter_serial == reading.meter_serial:
            moved_import = reading.import_wh - base.import_wh
            moved_export = reading.export_wh - base.export_wh
            if moved_import < 0 or moved_export < 0:
                # accepted only as a restart (rules 2): counted from zero, and what the meter
                # counted between the settled reading and the restart is estimated as zero
                gaps[did] = Gap(slot - base.slot, reading.import_wh, reading.export_wh)
            elif base.slot == slot - 1:
                metered[did] = Metered(moved_import, moved_export)
            elif state.config.rules >= 2:
                gaps[did] = Gap(slot - base.slot, moved_import, moved_export)
        state.baselines[did] = reading
        used.append(reading)

    transactions, settlements = settle_slot(
        slot, trades, households, metered, state.config.tariffs, gaps
    )
    feeder = _feeder_check(state, slot, settlements)
    for tx in transactions:
        for p in tx.postings:
            key = (p.account, p.asset)
            state.balances[key] = state.balances.get(key, 0) + p.amount
    reading_later = {did for p in state.pending_readings.values() for did in p}
    for s in settlements:
        rep = state.reputation.setdefault(s.household, Reputation())
        _update_reputation(
            rep, s, readings, reading_later, state.config.rules,
            state.config.reputation_window_slots,
        )  # fmt: skip

    height = state.height + 1
    tx_root, trade_root, reading_root = roots(
        transactions, (t.encode() for t in trades), (reading_leaf(r) for r in used)
    )
    block = Block(
        height=height,
        slot=slot,
        prev_hash=state.head_hash,
        tx_root=tx_root,
        trade_root=trade_root,
        reading_root=reading_root,
        state_hash=state_hash(height, state.balances),
        tx_count=len(transactions),
        feeder=None if feeder is None else feeder.hash,
    )
    state.height = height
    state.head_hash = block.hash
    state.settled_through = slot
    reputation = tuple((did, replace(state.reputation[did])) for did in households)
    return [
        SlotSettled(
            slot,
            block,
            tuple(transactions),
            tuple(settlements),
            tuple(used),
            trades,
            reputation,
            feeder,
        )
    ]


def _feeder_check(
    state: State, slot: int, settlements: Sequence[HouseholdSettlement]
) -> FeederCheck | None:
    """The feeder check of ``slot`` (None without a feeder meter); the reading it used becomes
    the feeder baseline."""
    cfg = state.config
    if not cfg.has_feeder:
        return None
    reading = state.pending_feeder.pop(slot, None)
    check = feeder_check(
        slot,
        reading,
        state.feeder_baseline,
        (HouseholdFlow(s.measured, s.import_wh, s.export_wh) for s in settlements),
        loss_permille=cfg.feeder_loss_permille,
        tolerance_wh=cfg.feeder_tolerance_wh,
    )
    if reading is not None:
        state.feeder_baseline = reading
    return check


def reading_leaf(reading: MeterReading) -> bytes:
    """The Merkle leaf of a reading in its block (hash of the signed record)."""
    return record_hash(reading)


def _update_reputation(
    rep: Reputation,
    s: HouseholdSettlement,
    readings: dict[str, MeterReading],
    reading_later: set[str],
    rules: int,
    window: int,
) -> None:
    """Count the slot in ``rep``; ``reading_later`` are the households with a reading accepted
    for a later, unsettled slot (their meter is not silent)."""
    rep.slots += 1
    if rules >= 2:
        rep.recent_sold_wh = window_add(rep.recent_sold_wh, s.sold_wh, window)
        rep.recent_delivered_wh = window_add(rep.recent_delivered_wh, s.delivered_wh, window)
    rep.sold_wh += s.sold_wh
    rep.bought_wh += s.bought_wh
    rep.delivered_wh += s.delivered_wh
    rep.consumed_wh += s.consumed_wh
    if rules < 2 or s.household in readings or s.household in reading_later:
        rep.silent_slots = 0
    else:
        rep.silent_slots = min(rep.silent_slots + 1, MAX_SILENT_SLOTS)
    if s.household not in readings:
        rep.missed_readings += 1


__all__ = [
    "DEFAULT_FEEDER_LOSS_PERMILLE",
    "DEFAULT_FEEDER_MAX_POWER_W",
    "DEFAULT_FEEDER_TOLERANCE_WH",
    "MarketConfig",
    "Member",
    "NonceWindow",
    "Reputation",
    "Side",
    "State",
    "apply",
    "delivery_score_permille",
    "is_restart",
    "offer_share_permille",
    "plausible_rise_wh",
    "reading_leaf",
    "sell_limit_wh",
    "window_add",
]
