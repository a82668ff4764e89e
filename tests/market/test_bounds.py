"""Bounds on every value entering the engine, and the plausibility of meter readings (issue 12).

A member can sign anything. Whatever it signs must either fit every store and every rule, or be
refused where it is decoded, with a typed reason, identically on every node.
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from typing import Any

import pytest

from market import (
    CommandDecodeError,
    MarketConfig,
    MemberRegistration,
    MemberRole,
    Rejected,
    RejectReason,
    SlotSettled,
    decode_batch,
    decode_batch_lenient,
    decode_command,
)
from market.bounds import (
    DEFAULT_MAX_POWER_W,
    MAX_COUNTER_WH,
    MAX_DID_CHARS,
    MAX_ID_CHARS,
    MAX_K_DENOMINATOR,
    MAX_NONCE,
    MAX_NONCE_WINDOW,
    MAX_POWER_W,
    MAX_PRICE,
    MAX_QUANTITY_WH,
    MAX_SIGNATURE_CHARS,
    MAX_SLOT,
    MAX_SLOT_HORIZON,
    MAX_SLOT_SECONDS,
    READING_SLACK_WH,
    STORE_INT,
    bounded_int,
)
from market.encoding import canonical_bytes, canonical_json
from market.models import _BATCH_PREFIX
from market.snapshot import dump_state, load_state
from market.state import plausible_rise_wh
from tests.market.world import GRID, World, signer

POISON_NONCE = 2**63 + 5
ALICE, BOB = signer("alice"), signer("bob")

# One valid command of each type, as the JSON a decoder receives (signatures are not checked
# by decoding, so a placeholder of the right form will do).
SIG = "ab" * 64
BASE: dict[str, dict[str, Any]] = {
    "order": {
        "type": "order", "grid": GRID, "nonce": 1, "signature": SIG, "id": "o-1",
        "household": ALICE.did, "side": "sell", "slot": 5, "quantity_wh": 100, "price": 10,
    },
    "cancel": {
        "type": "cancel", "grid": GRID, "nonce": 1, "signature": SIG, "household": ALICE.did,
        "order_id": "o-1",
    },
    "reading": {
        "type": "reading", "grid": GRID, "nonce": 1, "signature": SIG, "household": ALICE.did,
        "meter_serial": "M-1", "slot": 5, "import_wh": 10, "export_wh": 20,
    },
    "registration": {
        "type": "registration", "grid": GRID, "nonce": 1, "signature": SIG,
        "operator": BOB.did, "household": ALICE.did, "meter_serial": "M-1", "role": "voter",
        "max_power_w": 10_000,
    },
    "close_gate": {"type": "close_gate", "slot": 5},
    "settle": {"type": "settle", "slot": 5},
}  # fmt: skip

SIGNED = ("order", "cancel", "reading", "registration")
SLOTTED = ("order", "reading", "close_gate", "settle")
# (command type, field, value at its limit, value just past it)
LIMITS: list[tuple[str, str, Any, Any]] = [
    *[(kind, "nonce", MAX_NONCE, MAX_NONCE + 1) for kind in SIGNED],
    *[(kind, "nonce", 0, -1) for kind in SIGNED],
    *[(kind, "grid", "g" * MAX_ID_CHARS, "g" * (MAX_ID_CHARS + 1)) for kind in SIGNED],
    *[(kind, "grid", "g", "") for kind in SIGNED],
    *[(kind, "signature", "a" * MAX_SIGNATURE_CHARS, "a" * (MAX_SIGNATURE_CHARS + 1))
      for kind in SIGNED],
    ("order", "signature", "", "AB" * 64),  # upper case: a second spelling of one signature
    *[(kind, "slot", MAX_SLOT, MAX_SLOT + 1) for kind in SLOTTED],
    *[(kind, "slot", 0, -1) for kind in SLOTTED],
    ("order", "quantity_wh", MAX_QUANTITY_WH, MAX_QUANTITY_WH + 1),
    ("order", "quantity_wh", 0, -1),
    ("order", "price", MAX_PRICE, MAX_PRICE + 1),
    ("order", "price", 0, -1),
    ("order", "id", "i" * MAX_ID_CHARS, "i" * (MAX_ID_CHARS + 1)),
    ("order", "id", "x", ""),
    ("order", "id", "~!", "a b"),
    ("order", "household", "d" * MAX_DID_CHARS, "d" * (MAX_DID_CHARS + 1)),
    ("order", "household", "d", "did\nkey"),
    ("cancel", "order_id", "i" * MAX_ID_CHARS, "i" * (MAX_ID_CHARS + 1)),
    ("cancel", "household", "d" * MAX_DID_CHARS, "d" * (MAX_DID_CHARS + 1)),
    ("reading", "import_wh", MAX_COUNTER_WH, MAX_COUNTER_WH + 1),
    ("reading", "export_wh", MAX_COUNTER_WH, MAX_COUNTER_WH + 1),
    ("reading", "import_wh", 0, -1),
    ("reading", "export_wh", 0, -1),
    ("reading", "meter_serial", "s" * MAX_ID_CHARS, "s" * (MAX_ID_CHARS + 1)),
    ("reading", "meter_serial", "SN 12", " SN12"),
    ("reading", "meter_serial", "x", "SN\x0012"),
    ("registration", "max_power_w", MAX_POWER_W, MAX_POWER_W + 1),
    ("registration", "max_power_w", 0, -1),
    ("registration", "operator", "d" * MAX_DID_CHARS, "d" * (MAX_DID_CHARS + 1)),
    ("registration", "household", "d" * MAX_DID_CHARS, "d" * (MAX_DID_CHARS + 1)),
    ("registration", "meter_serial", "s" * MAX_ID_CHARS, ""),
    ("order", "nonce", 7, True),  # strict: a bool is not an integer
    ("order", "price", 10, 10.0),  # nor is a float
]  # fmt: skip


def command_bytes(kind: str, **changes: Any) -> bytes:
    return json.dumps({**BASE[kind], **changes}).encode()  # json: floats too, like an attacker


@pytest.mark.parametrize(("kind", "name", "at_limit", "past"), LIMITS)
def test_every_bounded_field_is_accepted_at_its_limit_and_refused_past_it(
    kind: str, name: str, at_limit: Any, past: Any
) -> None:
    decoded = decode_command(command_bytes(kind, **{name: at_limit}))
    assert getattr(decoded, name) == at_limit
    with pytest.raises(CommandDecodeError, match=rf"{kind}\.{name}:"):
        decode_command(command_bytes(kind, **{name: past}))


def poison_pill() -> bytes:
    """A correctly signed order whose nonce no 64-bit column holds (built as raw JSON: the
    model refuses to construct it, a modified node would not)."""
    fields = {k: v for k, v in BASE["order"].items() if k != "signature"}
    fields["nonce"] = POISON_NONCE
    return canonical_json({**fields, "signature": ALICE.sign(canonical_bytes("order", fields))})


def test_the_poison_pill_order_is_refused_by_decode_command() -> None:
    assert POISON_NONCE > STORE_INT
    with pytest.raises(CommandDecodeError, match=r"order\.nonce: .*less than or equal to"):
        decode_command(poison_pill())


def test_a_batch_decodes_command_by_command() -> None:
    good = BASE["close_gate"]
    batch = _BATCH_PREFIX + b"[" + poison_pill() + b"," + canonical_json(good) + b",7]"
    with pytest.raises(CommandDecodeError, match=r"malformed command 0 in batch: order\.nonce"):
        decode_batch(batch)  # the strict decoder still refuses the whole batch
    first, second, third = decode_batch_lenient(batch)
    assert isinstance(first, CommandDecodeError)
    assert (first.index, first.kind) == (0, "order") and "nonce" in str(first)
    assert second == decode_command(canonical_json(good))
    assert isinstance(third, CommandDecodeError) and (third.index, third.kind) == (2, None)
    assert "command 2" in str(third)


def test_a_long_integer_rejects_the_batch_whatever_the_interpreter_limit() -> None:
    """Python's int-conversion limit (4300 digits by default) can be changed per process; the
    batch decoder fixes it, so whether the entry is rejected whole does not depend on it."""
    whole = _BATCH_PREFIX + b'[{"type":"settle","slot":' + b"1" * 4301 + b"}]"
    one = _BATCH_PREFIX + b'[{"type":"settle","slot":' + b"1" * 4300 + b"}]"
    default = sys.get_int_max_str_digits()
    for limit in (0, default):
        sys.set_int_max_str_digits(limit)
        try:
            with pytest.raises(CommandDecodeError, match=r"malformed batch: .*4301 digits"):
                decode_batch_lenient(whole)
            (item,) = decode_batch_lenient(one)
            assert isinstance(item, CommandDecodeError) and item.kind == "settle"
        finally:
            sys.set_int_max_str_digits(default)


@pytest.mark.parametrize(
    "framing",
    [b"not a batch", _BATCH_PREFIX + b"{}", _BATCH_PREFIX + b"[", _BATCH_PREFIX + b"[" * 50_000],
)
def test_a_batch_with_bad_framing_is_refused_whole(framing: bytes) -> None:
    with pytest.raises(CommandDecodeError):
        decode_batch_lenient(framing)


def config(**changes: Any) -> MarketConfig:
    fields: dict[str, Any] = {
        "grid": GRID, "operator": BOB.did, "feed_in_tariff": 8, "retail_price": 30,
    }  # fmt: skip
    return MarketConfig(**{**fields, **changes})


@pytest.mark.parametrize(
    ("name", "at_limit", "past"),
    [
        ("retail_price", MAX_PRICE, MAX_PRICE + 1),
        ("feed_in_tariff", 0, -1),
        ("max_order_wh", MAX_QUANTITY_WH, MAX_QUANTITY_WH + 1),
        ("max_order_wh", 1, 0),
        ("nonce_window", MAX_NONCE_WINDOW, MAX_NONCE_WINDOW + 1),
        ("nonce_window", 1, 0),
        ("slot_horizon", MAX_SLOT_HORIZON, MAX_SLOT_HORIZON + 1),
        ("slot_horizon", 1, 0),
        ("slot_seconds", MAX_SLOT_SECONDS, MAX_SLOT_SECONDS + 1),
        ("slot_seconds", 1, 0),
        ("k", Fraction(1, MAX_K_DENOMINATOR), Fraction(1, MAX_K_DENOMINATOR + 1)),
        ("grid", "g" * MAX_ID_CHARS, "g" * (MAX_ID_CHARS + 1)),
        ("grid", "g", "a grid"),
        ("operator", "d" * MAX_DID_CHARS, ""),
        ("slot_horizon", 96, True),
    ],
)
def test_market_config_refuses_rules_no_node_could_store(
    name: str, at_limit: Any, past: Any
) -> None:
    extra = {"feed_in_tariff": MAX_PRICE} if name == "retail_price" else {}
    assert getattr(config(**{name: at_limit}), name) == at_limit
    with pytest.raises(ValueError, match=name.split("_")[0]):
        config(**{name: past, **extra})


def test_slot_seconds_is_hashed_only_when_not_the_default() -> None:
    assert "slot_seconds" not in config().to_json()  # genesis hashes of older grids unchanged
    assert config(slot_seconds=60).to_json()["slot_seconds"] == 60
    assert config(slot_seconds=60).genesis_hash() != config().genesis_hash()


def test_bounded_int_parses_untrusted_text() -> None:
    assert bounded_int(" 42 ", "slot") == 42
    assert bounded_int("-3", "x", low=-3) == -3
    for text in ("", "--5", "4e3", "٣", "1" * 21, "9007199254740992", "-1"):
        with pytest.raises(ValueError, match="slot must be an integer"):
            bounded_int(text, "slot")


# --- plausible readings -------------------------------------------------------------------------

PER_SLOT = DEFAULT_MAX_POWER_W * 900 // 3600  # 12,500 Wh at 50 kW over a 15-minute slot
BOUND = PER_SLOT + READING_SLACK_WH


def metered_world() -> World:
    w = World()
    w.register("alice")
    w.register("bob")
    w.close(1)
    w.ok(w.reading("alice", 1, 1_000, 2_000))  # alice's counter baseline
    w.settle(1)
    w.close(2)
    return w


def alice_settlement(events: list) -> Any:
    (settled,) = [e for e in events if isinstance(e, SlotSettled)]
    return next(s for s in settled.settlements if s.household == settled_did("alice"))


def settled_did(name: str) -> str:
    return signer(name).did


def test_the_plausible_rise_is_power_times_time_plus_slack() -> None:
    assert plausible_rise_wh(DEFAULT_MAX_POWER_W, 900, 1) == BOUND == 12_600
    assert plausible_rise_wh(3_600, 8, 3) == 24 + READING_SLACK_WH
    assert plausible_rise_wh(1_000, 1, 1) == 0 + READING_SLACK_WH  # 0.28 Wh rounds down


def test_one_gwh_of_export_in_one_slot_is_implausible() -> None:
    w = metered_world()
    rejected = w.rejected(w.reading("alice", 2, 1_000, 2_000 + 10**9))
    assert rejected.reason == RejectReason.IMPLAUSIBLE_READING
    assert f"at most {BOUND} Wh at {DEFAULT_MAX_POWER_W} W" in rejected.detail
    assert "export_wh rose 1000000000 Wh from slot 1 to 2" in rejected.detail


@pytest.mark.parametrize("counter", ["import", "export"])
def test_a_reading_at_exactly_the_bound_is_accepted_and_settled(counter: str) -> None:
    w = metered_world()
    imp, exp = (1_000 + BOUND, 2_000) if counter == "import" else (1_000, 2_000 + BOUND)
    past = (imp + 1, exp) if counter == "import" else (imp, exp + 1)
    assert w.rejected(w.reading("alice", 2, *past)).reason == RejectReason.IMPLAUSIBLE_READING
    w.ok(w.reading("alice", 2, imp, exp))
    alice = alice_settlement(w.settle(2))
    assert alice.measured and (alice.import_wh, alice.export_wh) == (imp - 1_000, exp - 2_000)
    assert alice.imbalance_wh == (exp - 2_000) - (imp - 1_000)


def test_after_a_gap_a_counter_may_rise_by_the_bound_times_the_slots_elapsed() -> None:
    w = metered_world()
    w.settle(2)  # no reading for slots 2 and 3
    w.close(3)
    w.settle(3)
    w.close(4)
    limit = 3 * PER_SLOT + READING_SLACK_WH  # slots 1 -> 4
    too_much = w.reading("alice", 4, 1_000, 2_000 + limit + 1)
    assert w.rejected(too_much).reason == RejectReason.IMPLAUSIBLE_READING
    w.ok(w.reading("alice", 4, 1_000, 2_000 + limit))
    alice = alice_settlement(w.settle(4))
    assert not alice.measured  # no reading of slot 3 to difference against: zero delivery


def test_readings_arriving_out_of_order_are_checked_against_both_neighbours() -> None:
    w = metered_world()
    w.close(3)
    # slot 3 first: two slots after the baseline, so it may rise by twice a slot's energy
    w.ok(w.reading("alice", 3, 1_000, 2_000 + 2 * PER_SLOT + READING_SLACK_WH))
    # slot 2 at the baseline would leave slot 3 two slots' worth above it in one slot
    assert w.rejected(w.reading("alice", 2, 1_000, 2_000)).reason == (
        RejectReason.IMPLAUSIBLE_READING
    )
    w.ok(w.reading("alice", 2, 1_000, 2_000 + PER_SLOT))
    assert alice_settlement(w.settle(2)).export_wh == PER_SLOT
    assert alice_settlement(w.settle(3)).export_wh == PER_SLOT + READING_SLACK_WH


def test_the_bound_follows_the_registered_power_and_slot_length() -> None:
    w = World()
    w.config = config(grid=GRID, operator=w.operator.did, slot_seconds=60)
    w.state = type(w.state).initial(w.config)
    w.register("alice")
    small = MemberRegistration(
        grid=GRID, operator=w.operator.did, household=w.homes["alice"].did,
        meter_serial="M-alice", role=MemberRole.LEARNER, max_power_w=3_600,
        nonce=w.nonce(w.operator.did),
    ).signed_by(w.operator)  # fmt: skip
    w.ok(small)  # re-registered with a 3.6 kW connection: 60 Wh per 60-second slot
    w.close(1)
    w.ok(w.reading("alice", 1, 0, 0))
    w.close(2)
    limit = 60 + READING_SLACK_WH
    assert w.rejected(w.reading("alice", 2, limit + 1, 0)).reason == (
        RejectReason.IMPLAUSIBLE_READING
    )
    w.ok(w.reading("alice", 2, limit, 0))
    # the registered power survives a snapshot
    assert load_state(dump_state(w.state)).members[w.homes["alice"].did].max_power_w == 3_600


def test_counters_going_backwards_are_still_a_regression() -> None:
    w = metered_world()
    assert w.rejected(w.reading("alice", 2, 999, 2_000)).reason == RejectReason.COUNTER_REGRESSION


def test_registration_signatures_are_unchanged_at_the_default_power() -> None:
    operator = signer("operator")
    fields = {
        "grid": GRID, "nonce": 1, "operator": operator.did, "household": ALICE.did,
        "meter_serial": "M-1", "role": MemberRole.VOTER,
    }  # fmt: skip
    default = MemberRegistration(**fields).signed_by(operator)
    legacy = {k: str(v) for k, v in fields.items() if k != "nonce"} | {"nonce": 1}
    assert default.signing_bytes() == canonical_bytes(
        "registration", {**legacy, "type": "registration"}
    )
    stronger = MemberRegistration(**fields, max_power_w=60_000)
    assert b'"max_power_w":60000' in stronger.signing_bytes()
    assert not stronger.model_copy(update={"signature": default.signature}).verify(operator.did)


def test_a_rejected_reading_never_reaches_settlement() -> None:
    w = metered_world()
    w.rejected(w.reading("alice", 2, 1_000, 2_000 + 10**9))
    alice = alice_settlement(w.settle(2))
    assert not alice.measured and alice.export_wh == 0
    assert all(not isinstance(e, Rejected) for e in w.close(3))


# --- the genesis carries the rated power and the metered slot length ----------------------------


def test_a_genesis_carries_each_members_power_and_the_metered_slot_length() -> None:
    from node.setup.genesis import GenesisFormatError, create_genesis, parse_genesis

    operator = signer("operator")
    market = config(operator=operator.did, slot_seconds=60)
    members = [(ALICE.did, "M-1", "voter", 7_000), (BOB.did, "M 2", "learner")]
    genesis = create_genesis(operator, market, members, slot_seconds=60)
    loaded = parse_genesis(genesis.to_json_bytes())
    assert loaded.market.slot_seconds == 60
    assert [m.max_power_w for m in loaded.members] == [7_000, DEFAULT_MAX_POWER_W]
    assert b'"max_power_w": 7000' in genesis.to_json_bytes()

    # older files (no slot_seconds, no max_power_w at the default) still load
    legacy_members = [(BOB.did, "M 2", "voter")]
    legacy = create_genesis(operator, config(operator=operator.did), legacy_members)
    text = legacy.to_json_bytes()
    assert b'slot_seconds": 900' in text and b"max_power_w" not in text
    assert parse_genesis(text).market.slot_seconds == 900

    with pytest.raises(GenesisFormatError, match="shorter than the slot"):
        create_genesis(operator, market, members, slot_seconds=120)
    with pytest.raises(GenesisFormatError, match=r"members\[0\]\.max_power_w"):
        create_genesis(operator, market, [(ALICE.did, "M-1", "voter", MAX_POWER_W + 1)])
