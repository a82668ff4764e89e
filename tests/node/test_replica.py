"""The replica applies committed entries exactly once, across crashes and restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event, insert, select

from market import (
    CloseGate,
    MarketConfig,
    MemberRegistration,
    MemberRole,
    Rejected,
    RejectReason,
    SettleSlot,
    decode_batch,
    encode_batch,
    encode_command,
)
from market.accounting import MONEY, household_account
from market.bounds import STORE_INT
from market.encoding import canonical_bytes, canonical_json
from market.snapshot import state_digest
from node.daemon.replica import (
    ENTRY_ERROR_EXIT_STATUS,
    EntryError,
    Replica,
    ReplicaError,
    exit_status,
)
from node.ledger import LedgerStore, verify_ledger
from node.ledger import schema as t
from node.ledger.store import LedgerStoreError, writes_rows
from node.tools import market_sim
from tests.market.world import GRID, World, signer

POISON_NONCE = 2**63 + 5


def log_entries(households: int, slots: int, seed: int) -> tuple[object, list[tuple[int, bytes]]]:
    """A committed log of a simulated grid (:func:`as_log`)."""
    sim = market_sim.build(households, seed)
    return sim.config, as_log(list(market_sim.commands(sim, slots, first_slot=40)), seed)


def as_log(commands: list, seed: int) -> list[tuple[int, bytes]]:
    """``commands`` as a committed log: batches of a few, with Raft's empty entries between."""
    entries: list[tuple[int, bytes]] = []
    i = 0
    while i < len(commands):
        size = 1 + (i * 7 + seed) % 5
        entries.append((len(entries) + 1, encode_batch(commands[i : i + size])))
        if len(entries) % 9 == 0:
            entries.append((len(entries) + 1, b""))
        i += size
    return entries


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


# --- hostile members (issue 12): bounded values, per-command decoding, typed entry failures ----


def hostile_log() -> tuple[MarketConfig, list[MemberRegistration], list[tuple[int, bytes]]]:
    """Two households' log: entry 1 holds a poison-pill order (a correctly signed nonce of
    2**63 + 5) between valid ones; then two slots are closed, read and settled."""
    w = World()
    w.homes = {name: signer(name) for name in ("alice", "bob")}
    regs = [
        MemberRegistration(
            grid=GRID, operator=w.operator.did, household=w.homes[name].did,
            meter_serial=f"M-{name}", role=MemberRole.VOTER, nonce=i + 1,
        ).signed_by(w.operator)
        for i, name in enumerate(("alice", "bob"))
    ]  # fmt: skip
    sell = w.order("alice", "sell", 500, 10, slot=2)
    buy = w.order("bob", "buy", 500, 30, slot=2)
    fields = sell.model_dump(mode="json", exclude={"signature"})
    fields.update(nonce=POISON_NONCE, id="pill")
    alice = w.homes["alice"]
    pill = canonical_json({**fields, "signature": alice.sign(canonical_bytes("order", fields))})
    first = b"microgrid/batch/v1\n[" + b",".join(
        [encode_command(sell), pill, encode_command(buy)]
    ) + b"]"  # fmt: skip
    batches = [
        [CloseGate(slot=1)],
        [w.reading("alice", 1, 100, 1_000), w.reading("bob", 1, 2_000, 0)],
        [SettleSlot(slot=1)],
        [CloseGate(slot=2)],
        [w.reading("alice", 2, 100, 1_500), w.reading("bob", 2, 2_500, 0)],
        [SettleSlot(slot=2)],
    ]
    entries = [(1, first)] + [(i + 2, encode_batch(b)) for i, b in enumerate(batches)]
    return w.config, regs, entries


def test_a_poison_pill_is_rejected_alone_and_identically_on_every_replica(tmp_path: Path):
    config, regs, entries = hostile_log()
    urls = [f"sqlite:///{tmp_path / f'node{n}.db'}" for n in (1, 2)]
    replicas = [Replica(config, LedgerStore(url), genesis=regs) for url in urls]
    outcomes = []
    for replica in replicas:
        first = replica.apply_entry(*entries[0])
        for index, payload in entries[1:]:
            replica.apply_entry(index, payload)
        outcomes.append(([(type(e).__name__, getattr(e, "reason", None)) for e in first], first[1]))
        replica.store.close()
    assert outcomes[0] == outcomes[1]
    kinds, rejection = outcomes[0]
    assert kinds == [("OrderAccepted", None), ("Rejected", RejectReason.MALFORMED),
                     ("OrderAccepted", None)]  # fmt: skip
    assert isinstance(rejection, Rejected) and rejection.command_type == "order"
    assert "malformed command 1 in batch: order.nonce" in rejection.detail
    assert state_digest(replicas[0].state) == state_digest(replicas[1].state)

    reports = [verify_ledger(url) for url in urls]
    assert all(r.ok for r in reports), reports
    assert reports[0].head_hash == reports[1].head_hash == replicas[0].state.head_hash
    assert reports[0].height == 2
    for url in urls:  # the valid orders traded and settled; the pill is nowhere
        store = LedgerStore(url)
        with store.engine.connect() as conn:
            orders = [r.order_id for r in conn.execute(select(t.orders))]
            trades = [(r.quantity_wh, r.slot) for r in conn.execute(select(t.trades))]
        assert "pill" not in orders and len(orders) == 2
        assert trades == [(500, 2)]
        # a restart replays the whole log, the poison pill included
        recovered = Replica.recover(config, store, None, iter(entries), genesis=regs)
        assert recovered.applied_index == len(entries)
        assert state_digest(recovered.state) == state_digest(replicas[0].state)
        store.close()


def test_an_entry_the_store_cannot_record_stops_the_replica_naming_it(tmp_path: Path):
    config, regs, entries = hostile_log()
    store = LedgerStore(f"sqlite:///{tmp_path / 'l.db'}")
    replica = Replica(config, store, genesis=regs)
    for index, payload in entries[:-1]:
        replica.apply_entry(index, payload)
    # alice's money balance one trade short of what a BIGINT column holds
    alice = household_account(regs[0].household)
    with store.engine.begin() as conn:
        conn.execute(insert(t.balances).values(account=alice, asset=MONEY, amount=STORE_INT - 1))
    last, payload = entries[-1]
    with pytest.raises(EntryError, match=rf"committed log entry {last} \(settle 2\)") as caught:
        replica.apply_entry(last, payload)
    err = caught.value
    assert err.index == last and err.commands == ("settle 2",)
    assert isinstance(err.cause, LedgerStoreError) and "64-bit" in str(err.cause)
    assert store.applied_index() == last - 1 and store.head() and store.head().height == 1
    with pytest.raises(EntryError) as again:  # a failed replica refuses to go on
        replica.apply_entry(last + 1, b"")
    assert again.value is err
    assert exit_status(err) == ENTRY_ERROR_EXIT_STATUS != 1
    assert exit_status(ExceptionGroup("node", [ExceptionGroup("driver", [err])])) == 3
    assert exit_status(ReplicaError("a gap")) == exit_status(LedgerStoreError("disk")) == 1


def test_an_engine_failure_stops_the_replica_and_its_recovery_naming_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    config, regs, entries = hostile_log()
    url = f"sqlite:///{tmp_path / 'l.db'}"
    replica = Replica(config, LedgerStore(url), genesis=regs)
    for index, payload in entries:
        replica.apply_entry(index, payload)
    replica.store.close()

    def broken_apply(state: object, command: object) -> None:
        raise ZeroDivisionError("a bug in the engine")

    monkeypatch.setattr("node.daemon.replica.apply", broken_apply)
    store = LedgerStore(url)
    with pytest.raises(EntryError, match=r"committed log entry 1 .*ZeroDivisionError") as caught:
        Replica.recover(config, store, None, iter(entries), genesis=[])
    alice, bob = (r.household for r in regs)
    assert caught.value.commands == (f"order by {alice}", "malformed order", f"order by {bob}")
    store.close()


def test_only_entries_with_rows_commit_and_a_crash_applies_the_others_again(tmp_path: Path):
    """Issue 19: the ledger commits (one fsync each) only the entries whose events write rows;
    the index of the others waits. A crash loses only that waiting index: the restart applies
    those entries again, they write nothing again, and the ledger is the crash-free one. A
    snapshot for log compaction commits the waiting index first."""
    config, entries = log_entries(3, 4, 7)
    entries.append((len(entries) + 1, b""))  # the log ends with a Raft no-op
    url = f"sqlite:///{tmp_path / 'l.db'}"
    store = LedgerStore(url)
    replica = Replica(config, store)
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    with_rows = [i for i, data in entries if writes_rows(replica.apply_entry(i, data))]
    assert 0 < len(with_rows) < len(entries)
    assert len(commits) == len(with_rows)
    assert store.meta()["applied_index"] == str(with_rows[-1])
    assert store.applied_index() == replica.applied_index == len(entries)
    store.engine.dispose()  # the process dies: no close, the waiting index is lost

    store = LedgerStore(url)
    assert store.applied_index() == with_rows[-1]
    replica = Replica.recover(config, store, None, iter(entries))
    assert replica.applied_index == with_rows[-1]
    for index, payload in entries:
        replica.apply_entry(index, payload)
    assert replica.state.head_hash == reference_head(config, entries)
    assert replica.snapshot()[0] == len(entries)
    assert store.meta()["applied_index"] == str(len(entries))  # committed before compaction
    store.close()
    report = verify_ledger(url)
    assert report.ok, report.error
    assert report.head_hash == reference_head(config, entries)
