"""The ranges every number and string from outside may take: one table, used everywhere.

Every value that enters the engine (from gossip, the local API, the Raft log, a block-sync chunk
or a file) is checked against these bounds where it is decoded, so every node refuses the same
inputs for the same reason and every accepted value fits every store: SQLite ``INTEGER`` and
PostgreSQL ``BIGINT`` hold signed 64-bit integers, and a browser's JSON holds integers exactly
only up to 2**53 - 1. The money a slot can move is bounded too: quantity times price stays far
inside 64 bits (see ``MAX_MONEY`` below), so balances summed over centuries of slots still fit.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, StrictInt, StrictStr

SAFE_INT = 2**53 - 1
"""Largest integer every store and every JSON reader (JavaScript's Number) holds exactly."""
STORE_INT = 2**63 - 1
"""Largest integer SQLite INTEGER / PostgreSQL BIGINT can store."""

MAX_NONCE = SAFE_INT
"""Nonces: a node derives them from the slot (``slot * 4 + kind``), far below this."""
MAX_SLOT = 2**40
"""Slot indices: at one-second slots this is 34,000 years after 1970."""
MAX_QUANTITY_WH = 10**9
"""One order: at most 1 GWh (a grid's own ``max_order_wh`` is usually far smaller)."""
MAX_PRICE = 10**6
"""Price in minor currency units per kWh (10,000.00 per kWh)."""
MAX_COUNTER_WH = 10**15
"""A meter's cumulative counter: 1 PWh, more than any household meter can count."""
MAX_POWER_W = 10**8
"""A meter's rated power: 100 MW, far beyond any household or feeder connection."""
MAX_MONEY = MAX_QUANTITY_WH * MAX_PRICE // 1000
"""Most money one trade can move (10**12 minor units): ~9 million such trades fit in BIGINT."""
MAX_ID_CHARS = 128
"""Order ids, meter serials, grid ids."""
DEFAULT_MAX_POWER_W = 50_000
"""A registration's meter power when the operator names none: a generous household connection
(3 x 63 A at 230 V is 43.5 kW). Registrations at this value sign exactly the bytes they did
before the field existed, so older genesis files still verify."""
READING_SLACK_WH = 100
"""Quantisation slack of the reading plausibility rule: one counter step of a meter with
0.1 kWh resolution, or of a float32 kWh register below 2,097,152 kWh. Added once per pair of
readings compared, never per slot."""
MAX_SLOT_SECONDS = 86_400
"""A market slot lasts at most a day."""
DEFAULT_SLOT_SECONDS = 900
"""Metered seconds per slot unless the genesis says otherwise (15-minute slots)."""
MAX_SLOT_HORIZON = 100_000
"""Orders at most this many slots ahead (about 2.8 years of 15-minute slots)."""
MAX_NONCE_WINDOW = 65_536
"""Each signer's anti-replay window; the engine keeps up to twice this many nonces per signer."""
MAX_K_DENOMINATOR = 1_000_000
"""k-pricing's ``k`` is a fraction with at most this denominator."""
MAX_DID_CHARS = 128
"""A did:key of an Ed25519 key is 56 characters."""
MAX_SIGNATURE_CHARS = 128
"""A hex Ed25519 signature is exactly 128 characters."""

_PRINTABLE = r"^[\x21-\x7e]+$"
"""Visible ASCII, no spaces or control characters: ids are shown in logs, CSV and HTML."""
_PRINTABLE_SPACED = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"
"""Visible ASCII with inner spaces (a meter's serial string may hold some), none at the ends."""
_HEX = r"^[0-9a-f]*$"
"""Lower-case hex only: one spelling per signature (``bytes.fromhex`` would also take upper
case and spaces, giving one signature many record hashes)."""

_DECIMAL = re.compile(r"-?[0-9]+")

Nonce = Annotated[StrictInt, Field(ge=0, le=MAX_NONCE)]
Slot = Annotated[StrictInt, Field(ge=0, le=MAX_SLOT)]
QuantityWh = Annotated[StrictInt, Field(ge=0, le=MAX_QUANTITY_WH)]
Price = Annotated[StrictInt, Field(ge=0, le=MAX_PRICE)]
CounterWh = Annotated[StrictInt, Field(ge=0, le=MAX_COUNTER_WH)]
PowerW = Annotated[StrictInt, Field(ge=0, le=MAX_POWER_W)]
Identifier = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=_PRINTABLE)]
MeterSerial = Annotated[
    StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=_PRINTABLE_SPACED)
]
Did = Annotated[StrictStr, Field(min_length=1, max_length=MAX_DID_CHARS, pattern=_PRINTABLE)]
Signature = Annotated[StrictStr, Field(max_length=MAX_SIGNATURE_CHARS, pattern=_HEX)]


def bounded_int(text: str, name: str, *, low: int = 0, high: int = SAFE_INT) -> int:
    """Parse a decimal integer from untrusted text (a query parameter, a config value).

    Raises :class:`ValueError` naming ``name`` and the allowed range; never anything else, and
    never accepts more than 20 characters (so ``int()`` cannot be made to work hard).
    """
    text = text.strip()
    if not text or len(text) > 20 or _DECIMAL.fullmatch(text) is None:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {text[:24]!r}")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value}")
    return value
