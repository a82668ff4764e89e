"""Engine snapshots: a restored state continues exactly like the original."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market import MECHANISMS, SlotSettled, State, apply
from market.snapshot import SnapshotError, dump_state, load_state, state_digest
from node import simulate


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 6), st.integers(1, 2**16), st.sampled_from(MECHANISMS), st.data())
def test_restore_at_any_point_continues_identically(households, seed, mechanism, data) -> None:
    sim = simulate.build(households, seed, mechanism)
    commands = list(simulate.commands(sim, 10, first_slot=36))
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
    sim = simulate.build(3, 1)
    commands = list(simulate.commands(sim, 2))
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
