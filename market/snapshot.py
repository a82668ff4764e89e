"""Canonical snapshots of the engine state, for Raft log compaction and node restarts.

``dump_state`` gives the same bytes on every node that applied the same log (dicts are written
sorted, or in log order where order matters), so ``state_digest`` also tells two replicas'
complete states apart, not just their ledgers. ``load_state(dump_state(s))`` continues exactly
as ``s`` would.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from market.accounting import ASSETS, GRID, MARKET, NETWORK, household_account
from market.bounds import (
    MAX_NONCE,
    MAX_NONCE_WINDOW,
    MAX_POWER_W,
    MAX_PRICE,
    MAX_QUANTITY_WH,
    MAX_SLOT,
    SAFE_INT,
    STORE_INT,
    Did,
    Identifier,
    MeterSerial,
)
from market.encoding import canonical_bytes, loads_untrusted, sha256
from market.governance import Governance, MemberStatus, Term
from market.models import (
    GOVERNANCE_RECORDS,
    MAX_CURVE_STEPS,
    Command,
    FeederReading,
    MemberRole,
    MeterReading,
    Order,
    Trade,
    first_error,
)
from market.state import MarketConfig, MarketConfigError, Member, NonceWindow, Reputation, State

SNAPSHOT_KIND = "snapshot"
_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)
_PREFIX = f"microgrid/{SNAPSHOT_KIND}/v1\n".encode()

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)


class SnapshotError(ValueError):
    """Bytes that are not a snapshot this version can load."""


def _record(r: Order | MeterReading | FeederReading) -> dict[str, Any]:
    return r.model_dump(mode="json")


def dump_state(state: State) -> bytes:
    """Canonical bytes of the complete state."""
    body = {
        "config": state.config.to_json(),
        "members": {
            d: [m.meter_serial, str(m.role), m.max_power_w] for d, m in state.members.items()
        },
        "nonces": {d: [w.highest, sorted(w.recent)] for d, w in state.nonces.items()},
        # Books keep log order (it is the auction's time priority); slots are keys.
        "books": {str(s): [_record(o) for o in b.values()] for s, b in state.books.items()},
        "cleared": {str(s): [t.to_json() for t in ts] for s, ts in state.cleared.items()},
        "closed_books": {
            str(s): [_record(o) for o in orders] for s, orders in state.closed_books.items()
        },
        "pending_readings": {
            str(s): {d: _record(r) for d, r in rs.items()}
            for s, rs in state.pending_readings.items()
        },
        "baselines": {d: _record(r) for d, r in state.baselines.items()},
        "closed_through": state.closed_through,
        "settled_through": state.settled_through,
        "balances": [[a, asset, v] for (a, asset), v in sorted(state.balances.items())],
        "reputation": {d: _reputation_fields(r, state.config) for d, r in state.reputation.items()},
        "height": state.height,
        "head_hash": state.head_hash,
    }
    if state.governance.records:  # only then: a grid never changed dumps what it always did
        body["governance"] = [r.model_dump(mode="json") for r in state.governance.records]
    if state.config.has_feeder:  # only then: a grid without a feeder dumps what it always did
        body["pending_feeder"] = {str(s): _record(r) for s, r in state.pending_feeder.items()}
        body["feeder_baseline"] = (
            None if state.feeder_baseline is None else _record(state.feeder_baseline)
        )
    return canonical_bytes(SNAPSHOT_KIND, body)


def state_digest(state: State) -> str:
    """Hex SHA-256 of the snapshot: equal digests mean equal states."""
    return sha256(dump_state(state)).hex()


def config_from_json(data: Any) -> MarketConfig:
    """Inverse of :meth:`MarketConfig.to_json` (:meth:`MarketConfig.from_json`); raises
    :class:`SnapshotError` for anything else."""
    try:
        return MarketConfig.from_json(data)
    except MarketConfigError as exc:
        raise SnapshotError(exc.within("config")) from None


# --- checks of untrusted snapshot values --------------------------------------------------------

_MAX_INT_DIGITS = 20
"""Every integer of a snapshot fits a signed 64-bit store: at most 19 digits."""
_BODY_FIELDS = frozenset(
    {"config", "members", "nonces", "books", "cleared", "closed_books", "pending_readings",
     "baselines", "closed_through", "settled_through", "balances", "reputation", "height",
     "head_hash", "pending_feeder", "feeder_baseline", "governance"}
)  # fmt: skip
_OPTIONAL_FIELDS = frozenset({"closed_books", "governance"})
"""Snapshots written before closed_books existed lack it; ``governance`` is there only once the
operator changed the grid."""
_FEEDER_FIELDS = frozenset({"pending_feeder", "feeder_baseline"})
"""Present exactly when the grid has a feeder meter (older snapshots never do)."""
_TRADE_FIELDS = frozenset(Trade._fields)
_PLAIN_TRADE_FIELDS = _TRADE_FIELDS - {"part"}
"""A trade's fields as :meth:`Trade.to_json` writes them: ``part`` only when it is not 0."""
_MAX_TRADE_PART = 2 * MAX_CURVE_STEPS
"""More than any pair of curve orders can give: each further part starts at a new step."""
_SLOT_KEY = re.compile(r"0|[1-9][0-9]{0,12}")
_HEAD_HASH = re.compile(r"([0-9a-f]{64})?")
_ACCOUNT_PREFIX = household_account("")
_DID: TypeAdapter[str] = TypeAdapter(Did)
_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)
_METER_SERIAL: TypeAdapter[str] = TypeAdapter(MeterSerial)
_ROLES = frozenset(r.value for r in MemberRole)


def _object(value: Any, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise SnapshotError(f"{where}: expected an object")
    return value


def _array(value: Any, where: str, lengths: tuple[int, ...] | None = None) -> list[Any]:
    if type(value) is not list:
        raise SnapshotError(f"{where}: expected a list")
    if lengths is not None and len(value) not in lengths:
        raise SnapshotError(f"{where}: expected {' or '.join(map(str, lengths))} items")
    return value


def _int(value: Any, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:  # bools are not ints here
        raise SnapshotError(f"{where}: expected an integer in {low}..{high}")
    return value


def _text(value: Any, where: str, adapter: TypeAdapter[str]) -> str:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise SnapshotError(f"{where}: {exc.errors()[0]['msg']}") from None


def _did(value: Any, where: str) -> str:
    return _text(value, where, _DID)


def _slot(key: str, where: str) -> int:
    """A slot number as a dict key: the canonical decimal ``str(slot)``."""
    if _SLOT_KEY.fullmatch(key) is None or int(key) > MAX_SLOT:
        raise SnapshotError(f"{where}: key is not a slot in 0..{MAX_SLOT}")
    return int(key)


def _model(model: type[R], value: Any, where: str) -> R:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise SnapshotError(f"{where}{'.' + loc if loc else ''}: {first['msg']}") from None


def _member(fields: Any, where: str) -> Member:
    # Snapshots written before max_power_w existed hold [serial, role]: the default power.
    serial, role, *rest = _array(fields, where, (2, 3))
    serial = _text(serial, f"{where}[0] (meter serial)", _METER_SERIAL)
    if not isinstance(role, str) or role not in _ROLES:
        raise SnapshotError(f"{where}[1]: role must be one of {sorted(_ROLES)}")
    if rest:
        power = _int(rest[0], f"{where}[2] (max_power_w)", 0, MAX_POWER_W)
        return Member(serial, MemberRole(role), power)
    return Member(serial, MemberRole(role))


def _nonce_window(fields: Any, where: str) -> NonceWindow:
    highest, recent = _array(fields, where, (2,))
    highest = _int(highest, f"{where}[0] (highest)", -1, MAX_NONCE)
    recent = _array(recent, f"{where}[1] (recent)")
    if len(recent) > 2 * MAX_NONCE_WINDOW:
        raise SnapshotError(f"{where}[1]: more than {2 * MAX_NONCE_WINDOW} recent nonces")
    return NonceWindow(highest, {_int(n, f"{where}[1]", 0, highest) for n in recent})


def _orders(value: Any, slot: int, where: str) -> list[Order]:
    orders = [_model(Order, o, f"{where}[{i}]") for i, o in enumerate(_array(value, where))]
    if any(o.slot != slot for o in orders):
        raise SnapshotError(f"{where}: an order is for another slot")
    if len({o.id for o in orders}) != len(orders):
        raise SnapshotError(f"{where}: order ids repeat")
    return orders


def _trade(value: Any, slot: int, where: str) -> Trade:
    doc = _object(value, where)
    if set(doc) not in (_TRADE_FIELDS, _PLAIN_TRADE_FIELDS):
        raise SnapshotError(
            f"{where}: expected the fields {sorted(_PLAIN_TRADE_FIELDS)} and maybe 'part'"
        )
    part = _int(doc["part"], f"{where}.part", 1, _MAX_TRADE_PART) if "part" in doc else 0
    return Trade(
        buy_id=_text(doc["buy_id"], f"{where}.buy_id", _IDENTIFIER),
        sell_id=_text(doc["sell_id"], f"{where}.sell_id", _IDENTIFIER),
        quantity_wh=_int(doc["quantity_wh"], f"{where}.quantity_wh", 0, MAX_QUANTITY_WH),
        price=_int(doc["price"], f"{where}.price", 0, MAX_PRICE),
        sell_price=_int(doc["sell_price"], f"{where}.sell_price", 0, MAX_PRICE),
        slot=_int(doc["slot"], f"{where}.slot", slot, slot),
        buyer=_did(doc["buyer"], f"{where}.buyer"),
        seller=_did(doc["seller"], f"{where}.seller"),
        part=part,
    )


def _reading(
    value: Any, did: str, where: str, slot: int | None = None, lineage: list[str] | None = None
) -> MeterReading:
    reading = _model(MeterReading, value, where)
    if reading.household not in (lineage or [did]) or (slot is not None and reading.slot != slot):
        raise SnapshotError(f"{where}: the reading is not of this household and slot")
    return reading


def _governance(value: Any, state: State) -> Governance:
    records = []
    for i, item in enumerate(_array(value, "governance")):
        try:
            record = _COMMAND.validate_python(item)
        except ValidationError as exc:
            raise SnapshotError(f"governance[{i}]: {first_error(exc)}") from None
        if not isinstance(record, GOVERNANCE_RECORDS) or record.grid != state.config.grid:
            raise SnapshotError(f"governance[{i}]: not a governance record of this grid")
        records.append(record)
    initial = {
        did: Term(0, MemberStatus.ACTIVE, m.role, m.meter_serial, m.max_power_w)
        for did, m in state.members.items()
    }
    try:
        return Governance.rebuild(records, initial_terms=initial)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"governance: records that do not fold: {exc}") from None


def _feeder_reading(value: Any, config: MarketConfig, where: str, slot: int) -> FeederReading:
    reading = _model(FeederReading, value, where)
    if reading.slot != slot or reading.operator != config.operator:
        raise SnapshotError(f"{where}: the feeder reading is not the operator's of this slot")
    if reading.meter_serial != config.feeder_serial or reading.grid != config.grid:
        raise SnapshotError(f"{where}: the feeder reading is not of this grid's feeder meter")
    return reading


def _balance(fields: Any, where: str) -> tuple[tuple[str, str], int]:
    account, asset, amount = _array(fields, where, (3,))
    if not isinstance(account, str):
        raise SnapshotError(f"{where}[0]: expected an account name")
    if account.startswith(_ACCOUNT_PREFIX):
        _did(account[len(_ACCOUNT_PREFIX) :], f"{where}[0] (household account)")
    elif account not in (GRID, MARKET, NETWORK):
        raise SnapshotError(f"{where}[0]: not a ledger account")
    if not isinstance(asset, str) or asset not in ASSETS:
        raise SnapshotError(f"{where}[1]: asset must be one of {list(ASSETS)}")
    return (account, asset), _int(amount, f"{where}[2]", -STORE_INT, STORE_INT)


def _reputation_fields(r: Reputation, config: MarketConfig) -> list[int]:
    fields = [r.sold_wh, r.delivered_wh, r.bought_wh, r.consumed_wh, r.slots, r.missed_readings]
    if config.rules >= 2:  # rules 1 dumps what it always did
        fields += [r.silent_slots, r.recent_sold_wh, r.recent_delivered_wh]
    return fields


def _reputation(fields: Any, where: str, config: MarketConfig) -> Reputation:
    counters = _array(fields, where, (9,) if config.rules >= 2 else (6,))
    return Reputation(*(_int(n, f"{where}[{i}]", 0, STORE_INT) for i, n in enumerate(counters)))


def _by_did(value: Any, where: str, load: Callable[[str, Any, str], T]) -> dict[str, T]:
    out = {}
    for key, item in _object(value, where).items():
        did = _did(key, f"{where}: key")
        out[did] = load(did, item, f"{where}[{did!r}]")
    return out


def _by_slot(value: Any, where: str, load: Callable[[int, Any, str], T]) -> dict[int, T]:
    out = {}
    for key, item in _object(value, where).items():
        slot = _slot(key, where)
        out[slot] = load(slot, item, f"{where}[{slot}]")
    return out


def _optional_slot(value: Any, where: str, low: int) -> int | None:
    return None if value is None else _int(value, where, low, MAX_SLOT)


def load_state(data: bytes) -> State:
    """Rebuild a state from :func:`dump_state` bytes; raises :class:`SnapshotError`, nothing else.

    The bytes may come from the Raft leader over the network, so every field is checked as it
    is loaded: its JSON type (an integer is never a bool or float), the ranges of
    :mod:`market.bounds`, the market rules through :class:`MarketConfig`'s own validation, and
    that records sit under their own slot and household. Deep nesting, floats and over-long
    integers are refused by the JSON decoder. Snapshots written before ``max_power_w`` and
    ``closed_books`` existed still load, and so do those from before curve orders (an order's
    ``steps`` and a trade's ``part`` are written only when set); ``pending_feeder`` and
    ``feeder_baseline`` are there exactly when the grid has a feeder meter (so older snapshots,
    of grids without one, load)."""
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(_PREFIX):
        raise SnapshotError("not a microgrid v1 engine snapshot")
    try:
        return _load_body(data[len(_PREFIX) :])
    except SnapshotError as exc:
        raise SnapshotError(f"malformed engine snapshot: {exc}") from None
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # pragma: no cover
        # every field is checked above; this only keeps the promise of a typed error
        raise SnapshotError(f"malformed engine snapshot: {type(exc).__name__}: {exc}") from None


def _load_body(text: bytes) -> State:
    try:
        body = loads_untrusted(text, allow_floats=False, max_int_digits=_MAX_INT_DIGITS)
    except ValueError as exc:
        raise SnapshotError(f"not canonical JSON: {exc}") from None
    body = _object(body, "snapshot")
    if "config" not in body:
        raise SnapshotError("fields ['config'] missing or unexpected")
    config = config_from_json(body["config"])
    expected = _BODY_FIELDS if config.has_feeder else _BODY_FIELDS - _FEEDER_FIELDS
    missing = expected - _OPTIONAL_FIELDS - set(body)
    unexpected = set(body) - expected
    if missing or unexpected:
        wrong = sorted(missing | unexpected)[:10]
        raise SnapshotError(f"fields {wrong} missing or unexpected")
    state = State(config=config)
    state.members = _by_did(body["members"], "members", lambda _, m, w: _member(m, w))
    state.nonces = _by_did(body["nonces"], "nonces", lambda _, n, w: _nonce_window(n, w))
    state.books = _by_slot(
        body["books"], "books", lambda s, os, w: {o.id: o for o in _orders(os, s, w)}
    )
    state.cleared = _by_slot(
        body["cleared"],
        "cleared",
        lambda s, ts, w: tuple(_trade(t, s, f"{w}[{i}]") for i, t in enumerate(_array(ts, w))),
    )
    # Snapshots written before closed_books existed load without them: a node installing
    # one then lacks those slots' orders and clearing rows (docs/ledger.md).
    state.closed_books = _by_slot(
        body.get("closed_books", {}), "closed_books", lambda s, os, w: tuple(_orders(os, s, w))
    )
    state.pending_readings = _by_slot(
        body["pending_readings"],
        "pending_readings",
        lambda s, rs, w: _by_did(rs, w, lambda d, r, w2: _reading(r, d, w2, s)),
    )
    if "governance" in body:
        state.governance = _governance(body["governance"], state)
    # a baseline moves to a household's new DID with its key: it may be signed by an older one
    state.baselines = _by_did(
        body["baselines"],
        "baselines",
        lambda d, r, w: _reading(r, d, w, lineage=state.governance.lineage(d)),
    )
    state.closed_through = _optional_slot(body["closed_through"], "closed_through", 0)
    state.settled_through = _optional_slot(body["settled_through"], "settled_through", -1)
    rows = _array(body["balances"], "balances")
    balances = [_balance(b, f"balances[{i}]") for i, b in enumerate(rows)]
    state.balances = dict(balances)
    if len(state.balances) != len(balances):
        raise SnapshotError("balances: an account's asset is listed twice")
    state.reputation = _by_did(
        body["reputation"], "reputation", lambda _, r, w: _reputation(r, w, config)
    )
    state.height = _int(body["height"], "height", 0, SAFE_INT)
    head_hash = body["head_hash"]
    if not isinstance(head_hash, str) or _HEAD_HASH.fullmatch(head_hash) is None:
        raise SnapshotError("head_hash: expected a hex SHA-256")
    state.head_hash = head_hash
    if config.has_feeder:
        state.pending_feeder = _by_slot(
            body["pending_feeder"],
            "pending_feeder",
            lambda s, r, w: _feeder_reading(r, config, w, s),
        )
        baseline = body["feeder_baseline"]
        if baseline is not None:
            slot = _model(FeederReading, baseline, "feeder_baseline").slot
            state.feeder_baseline = _feeder_reading(baseline, config, "feeder_baseline", slot)
    return state
