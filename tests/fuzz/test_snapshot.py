"""Fuzz engine snapshot loading: ``market.snapshot.load_state`` on arbitrary bytes.

Contract: only :class:`SnapshotError` escapes; a state that loads dumps to bytes that load to
the same state (``dump_state`` is a fixpoint after one load), and a real dump loads back to
exactly its bytes. Seeds are real states of a simulated grid mid-slot (books, cleared trades,
pending readings, balances, reputation). Snapshots come from the Raft leader over the network,
so a mistyped field must be refused too, not just a crash avoided.
"""

from __future__ import annotations

import json
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from market import State, apply
from market.snapshot import SnapshotError, dump_state, load_state
from node.tools import market_sim
from tests.fuzz.strategies import (
    any_of_json,
    expect_only,
    fuzz_settings,
)
from tests.ledger.feeder_grid import feeder_commands

PREFIX = b"microgrid/snapshot/v1\n"


@cache
def valid_dumps() -> tuple[bytes, ...]:
    """Dumps of one simulated grid's state after several cut points of its command log, and of
    a grid with a feeder meter (pending feeder readings, a feeder baseline)."""
    return plain_dumps() + feeder_dumps()


@cache
def plain_dumps() -> tuple[bytes, ...]:
    """Dumps of a grid without a feeder meter."""
    sim = market_sim.build(3, 5)
    commands = list(market_sim.commands(sim, 4, first_slot=40))
    state = State.initial(sim.config)
    out = [dump_state(state)]
    for i, cmd in enumerate(commands):
        state, _ = apply(state, cmd)
        if i % 5 == 4:
            out.append(dump_state(state))
    return tuple(out)


@cache
def feeder_dumps() -> tuple[bytes, ...]:
    """Dumps of a grid with a feeder meter, each with a pending feeder reading."""
    config, commands = feeder_commands(2, 4, 5)
    state = State.initial(config)
    out = []
    for cmd in commands:
        state, _ = apply(state, cmd)
        if state.pending_feeder:
            out.append(dump_state(state))
    assert out and state.feeder_baseline is not None
    return tuple(out)


@st.composite
def snapshot_inputs(draw: st.DrawFn) -> bytes:
    valid = draw(st.sampled_from(valid_dumps()))
    doc = json.loads(valid[len(PREFIX) :])
    return draw(any_of_json(doc, valid, PREFIX))


def test_real_dumps_load_back_to_their_bytes() -> None:
    for data in valid_dumps():
        assert dump_state(load_state(data)) == data


@fuzz_settings()
@given(snapshot_inputs())
def test_load_state_raises_only_snapshot_error(data: bytes) -> None:
    state = expect_only(load_state, data, SnapshotError)
    if state is not None:
        again = dump_state(state)
        assert dump_state(load_state(again)) == again
        assert isinstance(state.height, int) and isinstance(state.head_hash, str)


def _body_with(**changes: object) -> bytes:
    body = json.loads(plain_dumps()[-1][len(PREFIX) :])
    body.update(changes)
    return PREFIX + json.dumps(body).encode()


def _config_with(**changes: object) -> dict[str, object]:
    return {**json.loads(plain_dumps()[0][len(PREFIX) :])["config"], **changes}


def _feeder_body_with(**changes: object) -> bytes:
    body = json.loads(feeder_dumps()[-1][len(PREFIX) :])
    body.update(changes)
    return PREFIX + json.dumps(body).encode()


def _feeder_reading(**changes: object) -> dict[str, object]:
    body = json.loads(feeder_dumps()[-1][len(PREFIX) :])
    return {**next(iter(body["pending_feeder"].values())), **changes}


def _first(field: str) -> tuple[str, object]:
    """The first key and value of a (non-empty) dict field of the last dump."""
    return next(iter(json.loads(plain_dumps()[-1][len(PREFIX) :])[field].items()))


MALFORMED = {
    # once an escaping RecursionError, AttributeError, OverflowError, or a silent load
    "deep nesting (RecursionError)": PREFIX + b"[" * 100_000,
    "members is a list (AttributeError)": _body_with(members=[]),
    "members is a string": _body_with(members="x"),
    "members is a number": _body_with(members=7),
    "k is Infinity (OverflowError)": _body_with(config=_config_with(k=float("inf"))),
    "height is a string (loaded)": _body_with(height="7"),
    # more of the same classes
    "height is a bool": _body_with(height=True),
    "height is negative": _body_with(height=-1),
    "huge integer": PREFIX + b'{"height": ' + b"9" * 5000 + b"}",
    "k needs minutes to parse": _body_with(config=_config_with(k="1e-999999999")),
    "k is a number": _body_with(config=_config_with(k=1)),
    "config nonce_window is a bool": _body_with(config=_config_with(nonce_window=True)),
    "config has an extra field": _body_with(config=_config_with(extra=1)),
    "unknown top-level field": _body_with(extra=1),
    "missing top-level field": PREFIX + b'{"height": 0}',
    "top level is a list": PREFIX + b"[]",
    "head_hash is a number": _body_with(head_hash=7),
    "member role is a list": _body_with(members={_first("members")[0]: ["M0", []]}),
    "member is a dict": _body_with(members={_first("members")[0]: {}}),
    "member key is no DID": _body_with(members={"a b": ["M0", "voter"]}),
    "nonce window is a string": _body_with(nonces={_first("nonces")[0]: "x"}),
    "nonce above the highest": _body_with(nonces={_first("nonces")[0]: [3, [4]]}),
    "slot key is not canonical": _body_with(books={"07": []}),
    "slot key is negative": _body_with(books={"-1": []}),
    "book order is a list": _body_with(books={"41": [[]]}),
    "reputation has 5 counters": _body_with(reputation={_first("reputation")[0]: [0] * 5}),
    "balance of an unknown asset": _body_with(balances=[["grid", "gold", 1]]),
    "balance listed twice": _body_with(balances=[["grid", "money", 1], ["grid", "money", 2]]),
    "balance amount is a float": _body_with(balances=[["grid", "money", 1.5]]),
    "closed_through is a string": _body_with(closed_through="40"),
    "NaN": _body_with(height=float("nan")),
    # the feeder meter's fields
    "feeder fields in a grid without feeder": _body_with(pending_feeder={}, feeder_baseline=None),
    "feeder grid without pending_feeder": PREFIX
    + json.dumps(
        {
            k: v
            for k, v in json.loads(feeder_dumps()[-1][len(PREFIX) :]).items()
            if k != "pending_feeder"
        }
    ).encode(),
    "pending_feeder is a list": _feeder_body_with(pending_feeder=[]),
    "feeder reading under another slot": _feeder_body_with(pending_feeder={"7": _feeder_reading()}),
    "feeder reading of another meter": _feeder_body_with(
        feeder_baseline=_feeder_reading(meter_serial="OTHER")
    ),
    "feeder reading counter is a string": _feeder_body_with(
        feeder_baseline=_feeder_reading(import_wh="1")
    ),
    "feeder reading is a household reading": _feeder_body_with(
        feeder_baseline={**_feeder_reading(type="reading")}
    ),
    "config with half the feeder fields": _body_with(
        config=_config_with(feeder_serial="F", feeder_loss_permille=5)
    ),
    "config feeder_loss_permille above 1000": _feeder_body_with(
        config={
            **json.loads(feeder_dumps()[-1][len(PREFIX) :])["config"],
            "feeder_loss_permille": 1001,
        }
    ),
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_load_state_refuses_with_snapshot_error(data: bytes) -> None:
    with pytest.raises(SnapshotError):
        load_state(data)
