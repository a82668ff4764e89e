"""The vocabulary of the contract engine: orders, readings, membership, trades, commands.

Signed records (``Order``, ``CancelOrder``, ``MeterReading``, ``MemberRegistration``) are frozen,
strict pydantic models. Their signature covers :meth:`SignedRecord.signing_bytes`, the canonical
encoding of every other field, tagged with the record kind, so a signature is valid for exactly
one record of one kind in one microgrid. Values are only type-checked here; whether a quantity
is positive or a price is inside the band is the engine's decision, so that a bad record reaches
the engine and is rejected there with a typed reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from market.encoding import canonical_bytes, canonical_json, sha256
from market.identity import verify_signature

MAX_COMMAND_BYTES = 16 * 1024
"""Upper bound on one encoded command; anything larger is rejected before parsing."""
MAX_BATCH_BYTES = 1024 * 1024
"""Upper bound on one encoded batch (one replicated log entry)."""


class Side(StrEnum):
    """Which side of the book an order is on."""

    BUY = "buy"
    SELL = "sell"


class Role(StrEnum):
    """A household's role in replication: a Raft voter or a non-voting learner."""

    VOTER = "voter"
    LEARNER = "learner"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SignedRecord(_Record):
    """Base of every signed record. ``AUTHOR_FIELD`` names the field holding the signer's DID."""

    KIND: ClassVar[str]
    AUTHOR_FIELD: ClassVar[str] = "household"

    grid: StrictStr
    nonce: StrictInt
    signature: StrictStr = ""

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


class Order(SignedRecord):
    """A household's offer to buy or sell energy in one delivery slot.

    ``quantity_wh`` is energy in watt-hours; ``price`` is the limit price in integer minor currency
    units per kWh (for a buy order the most it pays, for a sell order the least it accepts).
    """

    KIND: ClassVar[str] = "order"
    type: Literal["order"] = "order"
    id: StrictStr = Field(min_length=1, max_length=128)
    household: StrictStr
    side: Side
    slot: StrictInt
    quantity_wh: StrictInt
    price: StrictInt


class CancelOrder(SignedRecord):
    """A household withdraws one of its own resting orders before gate closure."""

    KIND: ClassVar[str] = "cancel"
    type: Literal["cancel"] = "cancel"
    household: StrictStr
    order_id: StrictStr


class MeterReading(SignedRecord):
    """Cumulative meter counters at the end of a slot, signed by the household.

    ``import_wh`` counts energy drawn from the feeder, ``export_wh`` energy fed into it; both are
    monotonic counters of the meter named by ``meter_serial``.
    """

    KIND: ClassVar[str] = "reading"
    type: Literal["reading"] = "reading"
    household: StrictStr
    meter_serial: StrictStr
    slot: StrictInt
    import_wh: StrictInt
    export_wh: StrictInt


class MemberRegistration(SignedRecord):
    """The grid operator admits a household (its DID, meter and replication role)."""

    KIND: ClassVar[str] = "registration"
    AUTHOR_FIELD: ClassVar[str] = "operator"
    type: Literal["registration"] = "registration"
    operator: StrictStr
    household: StrictStr
    meter_serial: StrictStr
    role: Role


class CloseGate(_Record):
    """Gate closure of a slot, proposed by the Raft leader: the slot's book is cleared."""

    type: Literal["close_gate"] = "close_gate"
    slot: StrictInt


class SettleSlot(_Record):
    """Settlement of a slot after its reading deadline, proposed by the Raft leader."""

    type: Literal["settle"] = "settle"
    slot: StrictInt


Command = Annotated[
    Order | CancelOrder | MeterReading | MemberRegistration | CloseGate | SettleSlot,
    Field(discriminator="type"),
]
_COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


class CommandDecodeError(ValueError):
    """Bytes that are not one well-formed command."""


def encode_command(command: Command) -> bytes:
    """Canonical bytes of a command, as it is stored in the replicated log."""
    return canonical_json(command.model_dump(mode="json"))


def decode_command(data: bytes) -> Command:
    """Strictly decode one command; raises :class:`CommandDecodeError` with the reason."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandDecodeError(f"command of {len(data)} bytes exceeds {MAX_COMMAND_BYTES}")
    try:
        return _COMMAND_ADAPTER.validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise CommandDecodeError(f"malformed command: {loc}: {first['msg']}") from None


_BATCH_PREFIX = b"microgrid/batch/v1\n"


def encode_batch(commands: Sequence[Command]) -> bytes:
    """Canonical bytes of a batch of commands: the payload of one replicated log entry."""
    return _BATCH_PREFIX + canonical_json([c.model_dump(mode="json") for c in commands])


def decode_batch(data: bytes) -> list[Command]:
    """Strictly decode a batch; raises :class:`CommandDecodeError` naming the bad command."""
    if len(data) > MAX_BATCH_BYTES:
        raise CommandDecodeError(f"batch of {len(data)} bytes exceeds {MAX_BATCH_BYTES}")
    if not data.startswith(_BATCH_PREFIX):
        raise CommandDecodeError("not a microgrid v1 command batch")
    try:
        items = json.loads(data[len(_BATCH_PREFIX) :])
    except ValueError as exc:
        raise CommandDecodeError(f"malformed batch: {exc}") from None
    if not isinstance(items, list):
        raise CommandDecodeError("malformed batch: not a list of commands")
    commands: list[Command] = []
    for i, item in enumerate(items):
        try:
            commands.append(_COMMAND_ADAPTER.validate_python(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise CommandDecodeError(
                f"malformed command {i} in batch: {loc}: {first['msg']}"
            ) from None
    return commands


class Trade(NamedTuple):
    """A match between a buy and a sell order.

    ``price`` is what the buyer pays and ``sell_price`` what the seller receives, both in minor
    units per kWh; they differ only under McAfee trade reduction, where the market keeps the gap.
    Clearing fills the first five fields; the engine adds the slot and both households. (A
    NamedTuple rather than a model: clearing creates one per match, on the hot path.)
    """

    buy_id: str
    sell_id: str
    quantity_wh: int
    price: int
    sell_price: int
    slot: int = 0
    buyer: str = ""
    seller: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain fields for canonical encoding and storage."""
        return self._asdict()

    def encode(self) -> bytes:
        """Canonical bytes (hashed into the block's trade root)."""
        return canonical_bytes("trade", self.to_json())

    @property
    def trade_id(self) -> str:
        """Stable id of the trade within its slot."""
        return f"{self.slot}:{self.buy_id}:{self.sell_id}"


def record_hash(record: SignedRecord) -> bytes:
    """Hash of a signed record including its signature (identifies the exact bytes received)."""
    fields = record.unsigned_fields()
    fields["signature"] = record.signature
    return sha256(canonical_bytes(record.KIND, fields))
