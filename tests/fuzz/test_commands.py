"""Fuzz the replicated log's byte format: ``decode_command`` and ``decode_batch``.

Contract (market/models.py): only :class:`CommandDecodeError` escapes, and whatever decodes
re-encodes canonically: decoding the re-encoding gives the same commands, and re-encoding is a
fixpoint. Seeds are real commands of a simulated grid (every kind), so mutations start from
encodings the engine accepts.
"""

from __future__ import annotations

import json
from functools import cache

from hypothesis import given
from hypothesis import strategies as st

from market.models import (
    MAX_BATCH_BYTES,
    MAX_COMMAND_BYTES,
    CancelOrder,
    Command,
    CommandDecodeError,
    FeederReading,
    decode_batch,
    decode_batch_lenient,
    decode_command,
    encode_batch,
    encode_command,
)
from node.tools import market_sim
from tests.fuzz.strategies import (
    any_of_json,
    expect_only,
    fuzz_settings,
    json_mutated,
)

BATCH_PREFIX = b"microgrid/batch/v1\n"


@cache
def seed_commands() -> tuple[Command, ...]:
    """One simulated grid's commands (registrations, orders, readings, gates, settlements)
    and a cancel: every command kind, as the engine sees them."""
    sim = market_sim.build(3, 7)
    commands = list(market_sim.commands(sim, 3, first_slot=40))
    order = next(c for c in commands if c.type == "order")
    home = sim.households[0].signer
    cancel = CancelOrder(
        grid=sim.config.grid, household=home.did, order_id=order.id, nonce=99
    ).signed_by(home)
    feeder = FeederReading(
        grid=sim.config.grid,
        operator=sim.operator.did,
        meter_serial="FEEDER 1",
        slot=41,
        import_wh=12_345,
        export_wh=678,
        nonce=41 * 4 + 2,
    ).signed_by(sim.operator)
    return (*commands, cancel, feeder)


def check_command_round_trip(command: Command) -> None:
    """A decoded command re-encodes to bytes that decode to it again, and nowhere else."""
    raw = encode_command(command)
    if len(raw) > MAX_COMMAND_BYTES:  # escapes can make a re-encoding larger than its input
        return
    again = decode_command(raw)
    assert again == command
    assert encode_command(again) == raw


def check_batch_round_trip(commands: list[Command]) -> None:
    """A decoded batch re-encodes to a batch that decodes to the same commands."""
    raw = encode_batch(commands)
    if len(raw) > MAX_BATCH_BYTES:  # a decoded batch can re-encode larger (escapes)
        return
    again = decode_batch(raw)
    assert again == commands
    assert encode_batch(again) == raw


command_seeds = st.sampled_from(seed_commands())


@st.composite
def command_inputs(draw: st.DrawFn) -> bytes:
    """Random bytes, or a real command's encoding, byte-mutated or JSON-edited."""
    command = draw(command_seeds)
    raw = encode_command(command)
    return draw(any_of_json(json.loads(raw), raw))


@st.composite
def batch_inputs(draw: st.DrawFn) -> bytes:
    """Random bytes behind the batch prefix, or a real batch, byte-mutated or JSON-edited."""
    commands = draw(st.lists(command_seeds, max_size=6))
    raw = encode_batch(commands)
    doc = json.loads(raw[len(BATCH_PREFIX) :])
    return draw(
        st.one_of(
            any_of_json(doc, raw, BATCH_PREFIX),
            json_mutated(doc, BATCH_PREFIX),
            st.just(BATCH_PREFIX + b"[" + b'"x",' * 1000 + b"1]"),
        )
    )


@fuzz_settings()
@given(command_inputs())
def test_decode_command_raises_only_its_typed_error(data: bytes) -> None:
    command = expect_only(decode_command, data, CommandDecodeError)
    if command is not None:
        check_command_round_trip(command)


@fuzz_settings()
@given(batch_inputs())
def test_decode_batch_raises_only_its_typed_error(data: bytes) -> None:
    commands = expect_only(decode_batch, data, CommandDecodeError)
    if commands is not None:
        assert isinstance(commands, list)
        check_batch_round_trip(commands)


@fuzz_settings()
@given(batch_inputs())
def test_lenient_batch_decoding_reports_each_bad_command(data: bytes) -> None:
    """Only bad framing raises; otherwise one item per command, each a command that round-trips
    or a typed error naming its position, and the good ones are what strict decoding keeps."""
    items = expect_only(decode_batch_lenient, data, CommandDecodeError)
    if items is None:
        return
    for i, item in enumerate(items):
        if isinstance(item, CommandDecodeError):
            assert item.index == i
        else:
            check_command_round_trip(item)
    strict = expect_only(decode_batch, data, CommandDecodeError)
    if strict is not None:
        assert strict == items
    else:
        assert any(isinstance(item, CommandDecodeError) for item in items)


def test_seed_commands_cover_every_kind_and_round_trip() -> None:
    kinds = {c.type for c in seed_commands()}
    assert kinds == {
        "registration", "order", "cancel", "reading", "feeder_reading", "close_gate", "settle"
    }  # fmt: skip
    for command in seed_commands():
        check_command_round_trip(command)
    check_batch_round_trip(list(seed_commands()))


def test_deeply_nested_batch_is_a_typed_error() -> None:
    """100,000 nested lists (100 kB, far under the 1 MiB limit) must not raise RecursionError."""
    data = BATCH_PREFIX + b"[" * 100_000
    assert expect_only(decode_batch, data, CommandDecodeError) is None
