"""Engine snapshots: a restored state continues exactly like the original."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market import MECHANISMS, SlotSettled, State, apply
from market.bounds import DEFAULT_MAX_POWER_W
from market.encoding import canonical_json
from market.snapshot import SnapshotError, dump_state, load_state, state_digest
from node.tools import market_sim


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 6), st.integers(1, 2**16), st.sampled_from(MECHANISMS), st.data())
def test_restore_at_any_point_continues_identically(households, seed, mechanism, data) -> None:
    sim = market_sim.build(households, seed, mechanism)
    commands = list(market_sim.commands(sim, 10, first_slot=36))
    cut = data.draw(st.integers(0, len(commands)))
    original = State.initial(sim.config)
    for cmd in commands[:cut]:
        original, _ = apply(original, cmd)
    restored = load_state(dump_state(original))
    assert state_digest(restored) == state_digest(original)
    a_blocks, b_blocks = [], []
    for cmd in commands[cut:]:
        original, ea = apply(original, cmd)
        restored, eb = apply(restored, cmd)
        a_blocks += [e.block for e in ea if isinstance(e, SlotSettled)]
        b_blocks += [e.block for e in eb if isinstance(e, SlotSettled)]
        assert [type(e) for e in ea] == [type(e) for e in eb]
    assert a_blocks == b_blocks
    assert dump_state(original) == dump_state(restored)


def test_digest_differs_when_state_differs() -> None:
    sim = market_sim.build(3, 1)
    commands = list(market_sim.commands(sim, 2))
    s = State.initial(sim.config)
    digests = set()
    for cmd in commands:
        s, _ = apply(s, cmd)
        digests.add(state_digest(s))
    assert len(digests) == len(commands)  # every accepted command changes the state


@pytest.mark.parametrize("bad", [b"", b"microgrid/order/v1\n{}", b"microgrid/snapshot/v1\n{"])
def test_bad_snapshot_is_a_typed_error(bad: bytes) -> None:
    with pytest.raises(SnapshotError):
        load_state(bad)


def _settled_state() -> State:
    """A simulated grid with closed, unsettled slots (books, trades, readings, balances)."""
    sim = market_sim.build(3, 7)
    state = State.initial(sim.config)
    commands = list(market_sim.commands(sim, 4, first_slot=40))
    for cmd in commands[: len(commands) * 3 // 4]:
        state, _ = apply(state, cmd)
    return state


def test_old_snapshot_formats_still_load() -> None:
    """Before max_power_w members were [serial, role]; before closed_books there were none."""
    state = _settled_state()
    assert state.closed_books and state.members and state.balances
    prefix, body = dump_state(state).split(b"\n", 1)
    doc = json.loads(body)
    assert all(power == DEFAULT_MAX_POWER_W for _, _, power in doc["members"].values())
    doc["members"] = {d: [serial, role] for d, (serial, role, _) in doc["members"].items()}
    del doc["closed_books"]
    old = prefix + b"\n" + canonical_json(doc)
    restored = load_state(old)
    assert restored.members == state.members
    assert restored.closed_books == {}
    state.closed_books = {}
    assert dump_state(restored) == dump_state(state)


def test_real_dump_loads_byte_identically() -> None:
    data = dump_state(_settled_state())
    assert dump_state(load_state(data)) == data


def _body(state: State) -> dict:
    return json.loads(dump_state(state).split(b"\n", 1)[1])


def _with(state: State, **changes: object) -> bytes:
    return b"microgrid/snapshot/v1\n" + json.dumps({**_body(state), **changes}).encode()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"height": "7"}, "height"),
        ({"height": True}, "height"),
        ({"members": []}, "members"),
        ({"members": "x"}, "members"),
        ({"head_hash": None}, "head_hash"),
        ({"settled_through": -2}, "settled_through"),
        ({"balances": [["grid", "money", 2**63]]}, "balances"),
        ({"extra": 1}, "unexpected"),
    ],
)
def test_mistyped_field_is_a_snapshot_error(change: dict, match: str) -> None:
    with pytest.raises(SnapshotError, match=match):
        load_state(_with(_settled_state(), **change))


@pytest.mark.parametrize(
    "k, match",
    [("Infinity", "config.k"), ("3/2", "k must be"), ("1/0", "config.k"), (0.5, "float")],
)
def test_bad_config_is_a_snapshot_error(k: object, match: str) -> None:
    """The config goes through MarketConfig's own validation; its ValueError is a SnapshotError."""
    state = _settled_state()
    config = {**_body(state)["config"], "k": k}
    with pytest.raises(SnapshotError, match=match):
        load_state(_with(state, config=config))


def test_deep_nesting_is_a_snapshot_error() -> None:
    with pytest.raises(SnapshotError, match=r"nested deeper than|brackets do not pair up"):
        load_state(b"microgrid/snapshot/v1\n" + b"[" * 100_000)
