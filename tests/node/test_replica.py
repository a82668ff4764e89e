"""The replica applies committed entries exactly once, across crashes and restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market import Rejected, RejectReason, decode_batch, encode_batch
from node import simulate
from node.ledger import LedgerStore, verify_ledger
from node.replica import Replica, ReplicaError


def log_entries(households: int, slots: int, seed: int) -> tuple[object, list[tuple[int, bytes]]]:
    """A committed log: batches of a few commands, with Raft's empty entries in between."""
    sim = simulate.build(households, seed)
    commands = list(simulate.commands(sim, slots, first_slot=40))
    entries: list[tuple[int, bytes]] = []
    i = 0
    while i < len(commands):
        size = 1 + (i * 7 + seed) % 5
        entries.append((len(entries) + 1, encode_batch(commands[i : i + size])))
        if len(entries) % 9 == 0:
            entries.append((len(entries) + 1, b""))
        i += size
    return sim.config, entries


def reference_head(config, entries) -> str:
    r = Replica(config)
    for index, data in entries:
        r.apply_entry(index, data)
    return r.state.head_hash


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 5), st.integers(1, 1000), st.data())
def test_crash_and_recover_anywhere_gives_the_same_ledger(tmp_path_factory, households, seed, data):
    config, entries = log_entries(households, 6, seed)
    url = f"sqlite:///{tmp_path_factory.mktemp('r') / 'ledger.db'}"
    crash_at = data.draw(st.integers(0, len(entries)))
    snap_at = data.draw(st.integers(0, crash_at))
    store = LedgerStore(url)
    replica = Replica(config, store)
    snapshot = None
    for index, payload in entries[:crash_at]:
        replica.apply_entry(index, payload)
        if index == snap_at:
            snapshot = replica.snapshot()
    store.close()  # the process dies; only the database and the snapshot survive

    store = LedgerStore(url)
    after = [e for e in entries if snapshot is None or e[0] > snapshot[0]]
    replica = Replica.recover(config, store, snapshot, iter(after))
    assert replica.applied_index == crash_at
    for index, payload in entries:
        replica.apply_entry(index, payload)  # already-applied entries are skipped
    store.close()
    report = verify_ledger(url)
    assert report.ok, report.error
    assert report.head_hash == reference_head(config, entries)


def test_malformed_entry_is_rejected_deterministically_and_counted_as_applied(tmp_path: Path):
    config, entries = log_entries(3, 2, 1)
    replica = Replica(config, LedgerStore(f"sqlite:///{tmp_path / 'l.db'}"))
    for index, payload in entries[:3]:
        replica.apply_entry(index, payload)
    events = replica.apply_entry(4, b'microgrid/batch/v1\n[{"type":"order"}]')
    assert [(type(e), e.reason) for e in events] == [(Rejected, RejectReason.MALFORMED)]
    assert replica.applied_index == 4 and replica.store.applied_index() == 4


def test_gaps_and_missing_entries_stop_the_node(tmp_path: Path):
    config, entries = log_entries(3, 2, 1)
    url = f"sqlite:///{tmp_path / 'l.db'}"
    store = LedgerStore(url)
    replica = Replica(config, store)
    replica.apply_entry(1, entries[0][1])
    with pytest.raises(ReplicaError, match="gap"):
        replica.apply_entry(3, entries[2][1])
    for index, payload in entries[1:10]:
        replica.apply_entry(index, payload)
    with pytest.raises(ReplicaError, match="missing"):
        Replica.recover(config, store, None, iter(entries[:5]))


def test_a_forked_ledger_is_detected_on_recovery(tmp_path: Path):
    config, entries = log_entries(3, 3, 1)
    url = f"sqlite:///{tmp_path / 'l.db'}"
    store = LedgerStore(url)
    replica = Replica(config, store)
    for index, payload in entries:
        replica.apply_entry(index, payload)
    # Another history of the same length: one order batch loses its last order.
    forked = list(entries)
    k = next(i for i, (_, p) in enumerate(entries) if b'"type":"order"' in p and b"},{" in p)
    commands = decode_batch(entries[k][1])
    forked[k] = (entries[k][0], encode_batch(commands[:-1]))
    with pytest.raises(ReplicaError, match="forked"):
        Replica.recover(config, store, None, iter(forked))
