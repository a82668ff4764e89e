"""The vocabulary of the contract engine: orders, readings, membership, trades, commands.

Signed records (``Order``, ``CancelOrder``, ``MeterReading``, ``MemberRegistration``) are frozen,
strict pydantic models. Their signature covers :meth:`SignedRecord.signing_bytes`, the canonical
encoding of every other field, tagged with the record kind, so a signature is valid for exactly
one record of one kind in one microgrid.

Every integer and string is bounded here, by the shared table in :mod:`market.bounds`: a value
no store can hold (a nonce of 2**63, a slot of 2**64, a 70 kB id) is refused where it is decoded
(gossip validation, the API, the Raft log) with a :class:`CommandDecodeError`, identically on
every node, and can never reach a ledger. Whether a quantity is positive or a price is inside
the grid's band is the engine's decision, so that such a record reaches the engine and is
rejected there with a typed reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from itertools import pairwise
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

from market.bounds import (
    DEFAULT_MAX_POWER_W,
    CounterWh,
    Did,
    Identifier,
    MeterSerial,
    Nonce,
    PowerW,
    Price,
    QuantityWh,
    Signature,
    Slot,
)
from market.did import verify_signature
from market.encoding import canonical_bytes, canonical_json, loads_untrusted, sha256

MAX_COMMAND_BYTES = 16 * 1024
"""Upper bound on one encoded command; anything larger is rejected before parsing."""
MAX_BATCH_BYTES = 1024 * 1024
"""Upper bound on one encoded batch (one replicated log entry)."""


class Side(StrEnum):
    """Which side of the book an order is on."""

    BUY = "buy"
    SELL = "sell"


class MemberRole(StrEnum):
    """A household's role in replication: a Raft voter or a non-voting learner."""

    VOTER = "voter"
    LEARNER = "learner"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SignedRecord(_Record):
    """Base of every signed record. ``AUTHOR_FIELD`` names the field holding the signer's DID."""

    KIND: ClassVar[str]
    AUTHOR_FIELD: ClassVar[str] = "household"

    grid: Identifier
    nonce: Nonce
    signature: Signature = ""

    def unsigned_fields(self) -> dict[str, Any]:
        """Every field except the signature, as plain canonical-encodable values."""
        return self.model_dump(mode="json", exclude={"signature"})

    def signing_bytes(self) -> bytes:
        """The canonical bytes the signature covers."""
        return canonical_bytes(self.KIND, self.unsigned_fields())

    def signed_by(self, signer: Any) -> Self:
        """A copy signed by ``signer`` (a :class:`market.signing.Signer`)."""
        return self.model_copy(update={"signature": signer.sign(self.signing_bytes())})

    def verify(self, did: str) -> bool:
        """True if the signature is valid for ``did``."""
        return verify_signature(did, self.signing_bytes(), self.signature)

    @property
    def author(self) -> str:
        """The DID whose signature this record must carry."""
        return str(getattr(self, self.AUTHOR_FIELD))


MAX_CURVE_STEPS = 16
"""Most steps of one curve order."""
CurveStep = tuple[QuantityWh, Price]
"""One step of a curve order: ``(quantity_wh, price)``, each bounded like an order's field."""


def curve_problem(
    side: str, quantity_wh: int, price: int, steps: Sequence[CurveStep]
) -> str | None:
    """Why ``steps`` are not a well-formed curve of an order with this side, total and price
    (None: they are, or there are none). The rules of :class:`Order`'s ``steps``."""
    if not steps:
        return None
    if not 2 <= len(steps) <= MAX_CURVE_STEPS:
        return (
            f"a curve has 2 to {MAX_CURVE_STEPS} steps, not {len(steps)} "
            "(a single step is a plain order: leave steps out)"
        )
    total = sum(q for q, _ in steps)
    if quantity_wh != total:
        return f"quantity_wh {quantity_wh} is not the total {total} of the steps"
    if price != steps[0][1]:
        return f"price {price} is not the first step's price {steps[0][1]}"
    prices = [p for _, p in steps]
    if side == Side.BUY and any(a <= b for a, b in pairwise(prices)):
        return "a buy curve's step prices must strictly decrease"
    if side == Side.SELL and any(a >= b for a, b in pairwise(prices)):
        return "a sell curve's step prices must strictly increase"
    return None


class Order(SignedRecord):
    """A household's offer to buy or sell energy in one delivery slot.

    ``quantity_wh`` is energy in watt-hours; ``price`` is the limit price in integer minor currency
    units per kWh (for a buy order the most it pays, for a sell order the least it accepts).

    **Curve orders.** ``steps`` makes the order price-responsive: ``(quantity_wh, price)``
    steps, 2 to :data:`MAX_CURVE_STEPS`, a buy curve's prices strictly decreasing (the first
    Wh are worth the most to the buyer), a sell curve's strictly increasing. Each step is
    ``quantity_wh`` Wh at most at (buy) or at least at (sell) its own ``price``; clearing fills
    the steps in order like separate rows of the book with the order's time priority. With
    steps, ``quantity_wh`` is their total and ``price`` the first step's price (checked when
    the order is decoded: anything else is malformed), so every rule about an order's total
    (``max_order_wh``, the sell limit) reads ``quantity_wh`` as before, and the engine checks
    every step's quantity (positive) and price (the slot's band) with the reasons a plain
    order's fields get. Without steps (the default) the order is a single step
    ``(quantity_wh, price)``: ``steps`` is left out of its encoding and signed bytes, so every
    order signed before curves existed keeps its bytes and its signature.
    """

    KIND: ClassVar[str] = "order"
    type: Literal["order"] = "order"
    id: Identifier
    household: Did
    side: Side
    slot: Slot
    quantity_wh: QuantityWh
    price: Price
    steps: Annotated[tuple[CurveStep, ...], Field(max_length=MAX_CURVE_STEPS)] = ()

    @model_validator(mode="after")
    def _curve_is_well_formed(self) -> Self:
        problem = curve_problem(self.side, self.quantity_wh, self.price, self.steps)
        if problem is not None:
            raise ValueError(problem)
        return self

    @model_serializer(mode="wrap")
    def _omit_empty_steps(self, handler: Any) -> dict[str, Any]:
        doc: dict[str, Any] = handler(self)
        if not self.steps:
            doc.pop("steps", None)
        return doc

    @property
    def curve(self) -> tuple[CurveStep, ...]:
        """The order's ``(quantity_wh, price)`` steps: its ``steps``, or the one step
        ``(quantity_wh, price)`` of a plain order."""
        return self.steps or ((self.quantity_wh, self.price),)


class CancelOrder(SignedRecord):
    """A household withdraws one of its own resting orders before gate closure."""

    KIND: ClassVar[str] = "cancel"
    type: Literal["cancel"] = "cancel"
    household: Did
    order_id: Identifier


class MeterReading(SignedRecord):
    """Cumulative meter counters at the end of a slot, signed by the household.

    ``import_wh`` counts energy drawn from the feeder, ``export_wh`` energy fed into it; both are
    monotonic counters of the meter named by ``meter_serial``.
    """

    KIND: ClassVar[str] = "reading"
    type: Literal["reading"] = "reading"
    household: Did
    meter_serial: MeterSerial
    slot: Slot
    import_wh: CounterWh
    export_wh: CounterWh


class MemberRegistration(SignedRecord):
    """The grid operator admits a household (its DID, meter, replication role and the most
    power its connection can carry).

    ``max_power_w`` bounds how fast the household's meter counters may rise: the engine refuses
    a reading implying more (:data:`market.errors.RejectReason.IMPLAUSIBLE_READING`). At its
    default it is left out of the signed bytes, so registrations signed before the field
    existed still verify.
    """

    KIND: ClassVar[str] = "registration"
    AUTHOR_FIELD: ClassVar[str] = "operator"
    type: Literal["registration"] = "registration"
    operator: Did
    household: Did
    meter_serial: MeterSerial
    role: MemberRole
    max_power_w: PowerW = DEFAULT_MAX_POWER_W

    def unsigned_fields(self) -> dict[str, Any]:
        """Every field except the signature (and ``max_power_w`` at its default)."""
        fields = super().unsigned_fields()
        if fields["max_power_w"] == DEFAULT_MAX_POWER_W:
            del fields["max_power_w"]
        return fields


class FeederReading(SignedRecord):
    """Cumulative counters of the feeder meter (the operator's meter at the transformer) at the
    end of a slot, signed by the grid operator.

    ``import_wh`` counts energy delivered from the upstream grid into the feeder, ``export_wh``
    energy the feeder sent back upstream. Over a slot, the feeder's net import must equal the
    households' metered net import plus line losses, within the grid's loss band
    (``MarketConfig.feeder_*``); settlement records the comparison in the slot's block.
    """

    KIND: ClassVar[str] = "feeder_reading"
    AUTHOR_FIELD: ClassVar[str] = "operator"
    type: Literal["feeder_reading"] = "feeder_reading"
    operator: Did
    meter_serial: MeterSerial
    slot: Slot
    import_wh: CounterWh
    export_wh: CounterWh


# --- governance: the operator's records that change a running grid ------------------------------

MAX_TIME_OF_USE_PERIODS = 48
MINUTES_PER_DAY = 24 * 60
_K_TEXT = r"^(0|[1-9][0-9]{0,6})/([1-9][0-9]{0,6})$"


class GovernanceRecord(SignedRecord):
    """A change to a running grid, signed by the grid operator and in force from ``from_slot``.

    The engine accepts it only while ``from_slot`` is still open (its gate has not closed), and
    applies it to every record and settlement of ``from_slot`` and later slots, so every node
    applies it at the same slot boundary whatever the time the record was committed."""

    AUTHOR_FIELD: ClassVar[str] = "operator"
    operator: Did
    from_slot: Slot


class MemberChange(GovernanceRecord):
    """A governance record about one household (``household``: its DID)."""

    household: Did


class AddMember(MemberChange):
    """The operator admits a household to a running grid from ``from_slot``."""

    KIND: ClassVar[str] = "add_member"
    type: Literal["add_member"] = "add_member"
    meter_serial: MeterSerial
    role: MemberRole
    max_power_w: PowerW = DEFAULT_MAX_POWER_W


class RemoveMember(MemberChange):
    """The household leaves for good: its orders and readings for ``from_slot`` and later are
    refused, its reading of ``from_slot - 1`` is its last settled one, its balance stays."""

    KIND: ClassVar[str] = "remove_member"
    type: Literal["remove_member"] = "remove_member"


class SuspendMember(MemberChange):
    """Like :class:`RemoveMember`, until a :class:`ReinstateMember`."""

    KIND: ClassVar[str] = "suspend_member"
    type: Literal["suspend_member"] = "suspend_member"


class ReinstateMember(MemberChange):
    """A suspended household trades again from ``from_slot``; what its meter counted while it
    was suspended is trued up with the grid by its first reading after (rules 2)."""

    KIND: ClassVar[str] = "reinstate_member"
    type: Literal["reinstate_member"] = "reinstate_member"


class ChangeRole(MemberChange):
    """The household becomes a Raft voter or a learner from ``from_slot``."""

    KIND: ClassVar[str] = "change_role"
    type: Literal["change_role"] = "change_role"
    role: MemberRole


class RotateKey(MemberChange):
    """The household's key ``household`` is replaced by ``new_household`` from ``from_slot``.

    Its balances, meter and delivery record move to the new DID with the block of
    ``from_slot``. ``household_signature`` is the old key's signature over the same bytes as
    the operator's (:meth:`signing_bytes`): present when the old key still exists, empty when
    it is lost (the operator alone vouches for the hand-over)."""

    KIND: ClassVar[str] = "rotate_key"
    type: Literal["rotate_key"] = "rotate_key"
    new_household: Did
    household_signature: Signature = ""

    def unsigned_fields(self) -> dict[str, Any]:
        """Every field except both signatures."""
        fields = super().unsigned_fields()
        del fields["household_signature"]
        return fields

    def countersigned_by(self, signer: Any) -> RotateKey:
        """A copy carrying the old key's signature (``signer`` holds ``household``'s key)."""
        return self.model_copy(update={"household_signature": signer.sign(self.signing_bytes())})


class ReplaceMeter(MemberChange):
    """The household's meter is swapped for ``meter_serial`` from ``from_slot``.

    ``old_import_wh``/``old_export_wh`` are the old meter's final counters and
    ``new_import_wh``/``new_export_wh`` the new meter's first ones, read at the swap: the
    household's first settled movement after the swap is the old meter's rise up to the swap
    plus the new meter's rise after it, so no Wh is lost or counted twice."""

    KIND: ClassVar[str] = "replace_meter"
    type: Literal["replace_meter"] = "replace_meter"
    meter_serial: MeterSerial
    max_power_w: PowerW = DEFAULT_MAX_POWER_W
    old_import_wh: CounterWh
    old_export_wh: CounterWh
    new_import_wh: CounterWh = 0
    new_export_wh: CounterWh = 0


class TimeOfUsePeriod(_Record):
    """From ``start_minute`` of the day (UTC) until the next period's start, the grid buys at
    ``feed_in_tariff`` and sells at ``retail_price`` (minor units per kWh)."""

    start_minute: Annotated[StrictInt, Field(ge=0, lt=MINUTES_PER_DAY)]
    feed_in_tariff: Price
    retail_price: Price


class ChangeRules(GovernanceRecord):
    """New market rules from ``from_slot``: each field given replaces the rule in force, those
    left out (None) stay. ``time_of_use`` replaces the flat tariffs by daily periods; an empty
    list returns to the flat ``feed_in_tariff``/``retail_price``."""

    KIND: ClassVar[str] = "change_rules"
    type: Literal["change_rules"] = "change_rules"
    feed_in_tariff: Price | None = None
    retail_price: Price | None = None
    mechanism: Literal["uniform", "pay_as_bid", "mcafee"] | None = None
    k: Annotated[StrictStr, Field(pattern=_K_TEXT)] | None = None
    time_of_use: (
        Annotated[tuple[TimeOfUsePeriod, ...], Field(max_length=MAX_TIME_OF_USE_PERIODS)] | None
    ) = None
    local_fee: Price | None = None
    """Grid fee per kWh bought in the local market (paid by the buyer); 0 removes it."""
    grid_fee: Price | None = None
    """Grid fee per kWh imported from the grid; 0 removes it."""

    _LATER_FIELDS: ClassVar[tuple[str, ...]] = ("local_fee", "grid_fee")
    """Fields added after the record type shipped: left out of the signed bytes while unset, so
    records signed before they existed keep their signatures."""

    def unsigned_fields(self) -> dict[str, Any]:
        """Every field except the signature, and except the later fields left unset."""
        fields = super().unsigned_fields()
        for name in self._LATER_FIELDS:
            if fields.get(name) is None:
                fields.pop(name, None)
        return fields

    def changes(self) -> dict[str, Any]:
        """The rules this record sets, by :class:`market.state.MarketConfig` field name."""
        return {
            name: getattr(self, name)
            for name in ("feed_in_tariff", "retail_price", "mechanism", "k", "time_of_use",
                         *self._LATER_FIELDS)
            if getattr(self, name) is not None
        }  # fmt: skip


MEMBER_CHANGES = (
    AddMember, RemoveMember, SuspendMember, ReinstateMember, ChangeRole, RotateKey, ReplaceMeter
)  # fmt: skip
GOVERNANCE_RECORDS = (*MEMBER_CHANGES, ChangeRules)


class CloseGate(_Record):
    """Gate closure of a slot, proposed by the Raft leader: the slot's book is cleared."""

    type: Literal["close_gate"] = "close_gate"
    slot: Slot


class SettleSlot(_Record):
    """Settlement of a slot after its reading deadline, proposed by the Raft leader."""

    type: Literal["settle"] = "settle"
    slot: Slot


Command = Annotated[
    Order
    | CancelOrder
    | MeterReading
    | FeederReading
    | MemberRegistration
    | AddMember
    | RemoveMember
    | SuspendMember
    | ReinstateMember
    | ChangeRole
    | RotateKey
    | ReplaceMeter
    | ChangeRules
    | CloseGate
    | SettleSlot,
    Field(discriminator="type"),
]
_COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


class CommandDecodeError(ValueError):
    """Bytes that are not one well-formed command.

    ``index`` is the command's position in its batch and ``kind`` its ``type`` field when the
    error is about one command of a batch (None otherwise)."""

    def __init__(self, message: str, *, index: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.index = index
        self.kind = kind


def first_error(exc: ValidationError) -> str:
    """``field.path: message`` of a validation error's first fault (never the bad value)."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{loc}: {first['msg']}" if loc else str(first["msg"])


def encode_command(command: Command) -> bytes:
    """Canonical bytes of a command, as it is stored in the replicated log."""
    return canonical_json(command.model_dump(mode="json"))


def decode_command(data: bytes) -> Command:
    """Strictly decode one command; raises :class:`CommandDecodeError` with the reason.

    Every field is checked against :mod:`market.bounds`, so a command this returns can be
    applied and stored by every node."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandDecodeError(f"command of {len(data)} bytes exceeds {MAX_COMMAND_BYTES}")
    try:
        return _COMMAND_ADAPTER.validate_json(data)
    except ValidationError as exc:
        raise CommandDecodeError(f"malformed command: {first_error(exc)}") from None


_BATCH_PREFIX = b"microgrid/batch/v1\n"
_MAX_BATCH_INT_DIGITS = 4300
"""CPython's default int-conversion limit, fixed here: the interpreter's own limit can be
changed per process (``-X int_max_str_digits``, ``sys.set_int_max_str_digits``), and whether a
long integer rejects the whole batch or only its command must not depend on that."""


def encode_batch(commands: Sequence[Command]) -> bytes:
    """Canonical bytes of a batch of commands: the payload of one replicated log entry."""
    return _BATCH_PREFIX + canonical_json([c.model_dump(mode="json") for c in commands])


def _batch_items(data: bytes) -> list[Any]:
    """The framing of a batch: size, prefix, a JSON list. Raises :class:`CommandDecodeError`."""
    if len(data) > MAX_BATCH_BYTES:
        raise CommandDecodeError(f"batch of {len(data)} bytes exceeds {MAX_BATCH_BYTES}")
    if not data.startswith(_BATCH_PREFIX):
        raise CommandDecodeError("not a microgrid v1 command batch")
    try:  # nesting and integer length are checked before parsing, identically on every node
        items = loads_untrusted(data[len(_BATCH_PREFIX) :], max_int_digits=_MAX_BATCH_INT_DIGITS)
    except ValueError as exc:
        raise CommandDecodeError(f"malformed batch: {exc}") from None
    if not isinstance(items, list):
        raise CommandDecodeError("malformed batch: not a list of commands")
    return items


def _batch_item(i: int, item: Any) -> Command:
    try:
        return _COMMAND_ADAPTER.validate_python(item)
    except ValidationError as exc:  # no RecursionError: _batch_items bounds the nesting
        reason = first_error(exc)
        kind = item.get("type") if isinstance(item, dict) else None
        raise CommandDecodeError(
            f"malformed command {i} in batch: {reason}",
            index=i,
            kind=kind if isinstance(kind, str) and len(kind) <= 32 else None,
        ) from None


def decode_batch(data: bytes) -> list[Command]:
    """Strictly decode a batch; raises :class:`CommandDecodeError` naming the bad command."""
    return [_batch_item(i, item) for i, item in enumerate(_batch_items(data))]


def decode_batch_lenient(data: bytes) -> list[Command | CommandDecodeError]:
    """Decode a batch command by command: what the replica applies.

    Raises :class:`CommandDecodeError` only when the framing is bad (size, prefix, not a JSON
    list); otherwise returns one item per command, in order: the command, or the
    :class:`CommandDecodeError` (with ``index`` and ``kind``) saying why that one command is
    malformed. The result depends only on ``data``, so every node gets the same."""
    results: list[Command | CommandDecodeError] = []
    for i, item in enumerate(_batch_items(data)):
        try:
            results.append(_batch_item(i, item))
        except CommandDecodeError as exc:
            results.append(exc)
    return results


class Trade(NamedTuple):
    """A match between a buy and a sell order.

    ``price`` is what the buyer pays and ``sell_price`` what the seller receives, both in minor
    units per kWh; they differ only under McAfee trade reduction, where the market keeps the gap.
    Clearing fills the first five fields and ``part``; the engine adds the slot and both
    households. (A NamedTuple rather than a model: clearing creates one per match, on the hot
    path.)

    Clearing makes one trade per (buy order, sell order, price, sell price): matches of two
    steps of curve orders between the same two orders at the same prices are merged into one
    trade. Only pay-as-bid with curve orders can give one pair of orders trades at different
    prices: ``part`` numbers them, 0 for the pair's first trade (in clearing order), 1, 2, ...
    for the next ones. ``part`` is left out of :meth:`to_json` (and so of the trade's encoding)
    when 0, so trades of books without curve orders encode exactly as before.
    """

    buy_id: str
    sell_id: str
    quantity_wh: int
    price: int
    sell_price: int
    slot: int = 0
    buyer: str = ""
    seller: str = ""
    part: int = 0

    def to_json(self) -> dict[str, Any]:
        """Plain fields for canonical encoding and storage (``part`` only when not 0)."""
        doc = self._asdict()
        if not self.part:
            del doc["part"]
        return doc

    def encode(self) -> bytes:
        """Canonical bytes (hashed into the block's trade root)."""
        return canonical_bytes("trade", self.to_json())

    @property
    def trade_id(self) -> str:
        """Stable id of the trade within its slot: ``slot:buy_id:sell_id``, and ``/part`` for a
        pair's further trade (``part`` > 0: pay-as-bid with curve orders only)."""
        base = f"{self.slot}:{self.buy_id}:{self.sell_id}"
        return f"{base}/{self.part}" if self.part else base


def record_hash(record: SignedRecord) -> bytes:
    """Hash of a signed record including its signature (identifies the exact bytes received)."""
    fields = record.unsigned_fields()
    fields["signature"] = record.signature
    return sha256(canonical_bytes(record.KIND, fields))
