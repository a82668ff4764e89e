"""Three consensus drivers in one trio loop: Raft core + replica + proposer + ledger stores.

Peers are connected by an in-process transport that can partition them (the libp2p transport
has its own tests under tests/net). The wall clock runs 10x faster than trio's clock, so slots
of 10 s pass in one real second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from market import MeterReading, Order
from market.schedule import Schedule
from market.snapshot import dump_state
from node.daemon.consensus import VIEW_REFRESH_SECONDS, ConsensusDriver
from node.daemon.proposer import Proposer
from node.daemon.replica import Replica
from node.ledger import LedgerStore, verify_ledger
from node.raft import Config, MemoryStorage, Message, RaftNode
from node.raft.storage_sql import SQLStorage
from node.tools import market_sim

SPEED = 10.0
FIRST_SLOT = 40  # 10:00 in the simulation's day: households have surplus and deficit
SCHEDULE = Schedule(slot_seconds=10, gate_lead_seconds=4, settle_delay_seconds=2)


@dataclass
class Network:
    """Delivers messages between drivers unless the link is cut."""

    drivers: dict[str, ConsensusDriver] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)
    delivered: int = 0

    def transport_for(self, frm: str) -> _Link:
        return _Link(self, frm)


@dataclass
class _Link:
    net: Network
    frm: str

    def send(self, message: Message) -> None:
        if self.frm in self.net.cut or message.to in self.net.cut:
            return
        self.net.delivered += 1
        self.net.drivers[message.to].deliver(message)


def build_cluster(tmp_path: Path, wall: Callable[[], float], durable: bool = False):
    sim = market_sim.build(households=5, seed=4)
    ids = [h.signer.did for h in sim.households[:3]]
    net = Network()
    replicas = {}
    registrations = market_sim.registrations(sim)
    for i, node_id in enumerate(ids):
        store = LedgerStore(f"sqlite:///{tmp_path / f'n{i}.db'}")
        proposer = Proposer(SCHEDULE, retry_after=2 * SPEED)
        replica = Replica(sim.config, store, observer=proposer.committed, genesis=registrations)
        raft = RaftNode(
            Config(id=node_id, voters=tuple(ids), election_tick=10, heartbeat_tick=1, seed=i),
            SQLStorage(f"sqlite:///{tmp_path / f'raft{i}.db'}") if durable else MemoryStorage(),
        )
        driver = ConsensusDriver(
            raft=raft,
            storage=raft.storage,
            replica=replica,
            proposer=proposer,
            transport=net.transport_for(node_id),
            tick_seconds=0.05,
            propose_every=0.05,
            wall_clock=wall,
            follow_membership=False,  # a fixed group of 3 for a market of 5 households
        )
        net.drivers[node_id] = driver
        replicas[node_id] = replica
    return sim, net, replicas


async def feed_households(sim, net: Network, wall: Callable[[], float], slots: int) -> None:
    """Gossip stand-in: offer each slot's orders before its gate, readings after it ends."""
    for slot in range(FIRST_SLOT, FIRST_SLOT + slots):
        trading, settling = market_sim.slot_commands(sim, slot)
        await _sleep_until_wall(wall, SCHEDULE.gate_time(slot) - 2)
        for driver in net.drivers.values():
            for cmd in trading:
                if isinstance(cmd, Order):
                    driver.proposer.offer(cmd)
        await _sleep_until_wall(wall, SCHEDULE.end(slot) + 0.5)
        for driver in net.drivers.values():
            for cmd in settling:
                if isinstance(cmd, MeterReading):
                    driver.proposer.offer(cmd)


async def _sleep_until_wall(wall: Callable[[], float], t: float) -> None:
    delay = (t - wall()) / SPEED
    if delay > 0:
        await trio.sleep(delay)


def leader_of(net: Network) -> str | None:
    leaders = [i for i, d in net.drivers.items() if d.raft.role == "leader" and i not in net.cut]
    return leaders[0] if leaders else None


@pytest.mark.parametrize("durable", [False, True], ids=["memory-log", "sqlite-log"])
async def test_cluster_trades_settles_and_survives_a_partitioned_leader(
    tmp_path: Path, durable: bool
) -> None:
    t0 = trio.current_time()
    base = SCHEDULE.gate_time(FIRST_SLOT) - 3

    def wall() -> float:
        return base + (trio.current_time() - t0) * SPEED

    sim, net, replicas = build_cluster(tmp_path, wall, durable)
    slots = 6
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for driver in net.drivers.values():
                await nursery.start(driver.run)
            nursery.start_soon(feed_households, sim, net, wall, slots)
            # Cut the leader off after a few slots; the other two must carry on.
            await _sleep_until_wall(wall, SCHEDULE.start(FIRST_SLOT + 2))
            first_leader = leader_of(net)
            assert first_leader is not None
            net.cut.add(first_leader)
            await _sleep_until_wall(wall, SCHEDULE.start(FIRST_SLOT + 4))
            second_leader = leader_of(net)
            assert second_leader not in (None, first_leader)
            net.cut.clear()  # heal: the old leader catches up
            last = FIRST_SLOT + slots - 1
            await _sleep_until_wall(wall, SCHEDULE.settle_time(last))
            # then until every replica has applied the last settlement (a loaded machine may
            # need longer than a fixed grace period; fail_after bounds the wait)
            while any(r.state.settled_through != last for r in replicas.values()):
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    heads = {r.state.head_hash for r in replicas.values()}
    heights = {r.state.height for r in replicas.values()}
    assert len(heads) == 1 and heights == {slots}, (heads, heights)
    (head,) = heads
    for r in replicas.values():
        assert r.state.settled_through == FIRST_SLOT + slots - 1
        r.store.close()
        report = verify_ledger(r.store.url)
        assert report.ok, report.error
        assert report.head_hash == head
    # Trades happened between households and were settled.
    any_state = next(iter(replicas.values())).state
    assert sum(rep.sold_wh for rep in any_state.reputation.values()) > 0
    stats = [d.stats for d in net.drivers.values()]
    assert sum(s.proposals for s in stats) > 0 and all(s.applied_entries > 0 for s in stats)


# -- log compaction: off the trio thread, failures counted ---------------------------------------


def _solo_driver(tmp_path: Path, snapshot_every: int = 5) -> ConsensusDriver:
    """One voter on real SQLite Raft storage, leading at once; no ledger store."""
    sim = market_sim.build(households=2, seed=1)
    raft = RaftNode(
        Config(id="n1", voters=("n1",), election_tick=10, heartbeat_tick=1, seed=0),
        SQLStorage(f"sqlite:///{tmp_path / 'raft.db'}"),
    )
    raft.campaign()
    return ConsensusDriver(
        raft=raft,
        storage=raft.storage,
        replica=Replica(sim.config),
        proposer=Proposer(SCHEDULE),
        transport=Network().transport_for("n1"),
        snapshot_every=snapshot_every,
    )


async def _commit(driver: ConsensusDriver, n: int) -> None:
    """Commit and apply ``n`` empty entries through the driver's own Ready loop."""
    for _ in range(n):
        driver.raft.propose(b"")
    await driver._drain_ready()


def _stored_entries(storage: SQLStorage) -> list[int]:
    from sqlalchemy import text

    with storage.engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT idx FROM raft_entries ORDER BY idx"))]


async def test_compaction_truncates_the_log_off_the_trio_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = _solo_driver(tmp_path)
    storage = driver.storage
    assert isinstance(storage, SQLStorage)
    threads: list[bool] = []
    serialise = driver.replica.snapshot

    def snapshot_recording_thread() -> tuple[int, bytes]:
        try:
            trio.lowlevel.current_trio_token()
            threads.append(True)  # on the trio thread
        except RuntimeError:
            threads.append(False)
        return serialise()

    monkeypatch.setattr(driver.replica, "snapshot", snapshot_recording_thread)
    await _commit(driver, 8)
    applied = driver.replica.applied_index
    assert applied >= 8
    assert driver.stats.snapshots == 1 and driver.stats.compaction_failures == 0
    assert threads == [False]  # the engine was serialised in a worker thread
    assert storage.snapshot().metadata.index == applied
    assert storage.first_index() == applied + 1  # the core's view of the log is truncated
    assert driver.raft.status().first_index == applied + 1
    assert _stored_entries(storage) == []  # and so is the database
    await _commit(driver, 2)  # the node goes on; the new entries are kept
    assert _stored_entries(storage) == [applied + 1, applied + 2]
    storage.close()
    reopened = SQLStorage(f"sqlite:///{tmp_path / 'raft.db'}")
    assert reopened.snapshot().metadata.index == applied
    assert reopened.snapshot().data == dump_state(driver.replica.state)  # empty entries since
    assert reopened.first_index() == applied + 1 and reopened.last_index() == applied + 2
    reopened.close()


async def test_a_log_holding_many_bytes_is_compacted_before_its_entry_count(
    tmp_path: Path,
) -> None:
    """The storage keeps every entry since the snapshot in memory: a few large entries
    trigger the compaction that many small ones would (``snapshot_bytes``)."""
    driver = _solo_driver(tmp_path, snapshot_every=1000)
    driver.snapshot_bytes = 64 * 1024
    for _ in range(3):  # 48 kB: under the bound
        driver.raft.propose(b"x" * 16 * 1024)
    await driver._drain_ready()
    assert driver.stats.snapshots == 0
    driver.raft.propose(b"x" * 20 * 1024)  # 68 kB: over it
    await driver._drain_ready()
    applied = driver.replica.applied_index
    assert driver.stats.snapshots == 1 and driver.storage.first_index() == applied + 1
    await _commit(driver, 5)  # small entries: no second compaction for a while
    assert driver.stats.snapshots == 1
    driver.storage.close()


async def test_a_storage_failure_during_compaction_is_logged_counted_and_not_retried_hot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import text

    driver = _solo_driver(tmp_path)
    storage = driver.storage
    assert isinstance(storage, SQLStorage)
    with storage.engine.begin() as conn:  # the snapshot row can no longer be written
        conn.execute(text("DROP TABLE raft_snapshot"))
    with caplog.at_level("INFO", logger="node.daemon.consensus"):
        await _commit(driver, 8)
    assert driver.stats.compaction_failures == 1 and driver.stats.snapshots == 0
    (record,) = [r for r in caplog.records if "compaction" in r.getMessage()]
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert "raft_snapshot" in caplog.text  # the traceback names the cause
    applied = driver.replica.applied_index
    assert storage.first_index() == 1 and storage.snapshot().metadata.index == 0  # untouched
    assert _stored_entries(storage)[-1] == applied
    await _commit(driver, 8)  # the node keeps applying, and backs off before trying again
    assert driver.replica.applied_index == applied + 8
    assert driver.stats.compaction_failures == 1


async def test_a_refused_compaction_is_postponed_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.raft import RaftError

    driver = _solo_driver(tmp_path)
    driver.compact_retry_seconds = 0.0
    real_check = driver.raft.compaction_metadata

    def refuse(index: int) -> object:
        raise RaftError(f"cannot snapshot at {index}: membership changed at {index + 1}")

    monkeypatch.setattr(driver.raft, "compaction_metadata", refuse)
    with caplog.at_level("INFO", logger="node.daemon.consensus"):
        await _commit(driver, 8)
    assert driver.stats.compactions_postponed == 1 and driver.stats.snapshots == 0
    assert driver.stats.compaction_failures == 0
    (record,) = [r for r in caplog.records if "postponed" in r.getMessage()]
    assert record.levelname == "INFO" and record.exc_info is None
    monkeypatch.setattr(driver.raft, "compaction_metadata", real_check)
    await _commit(driver, 1)  # retried later: done
    assert driver.stats.snapshots == 1
    assert driver.storage.snapshot().metadata.index == driver.replica.applied_index



async def test_the_view_is_taken_again_on_a_state_change_and_otherwise_at_most_every_refresh(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A wake that changed nothing but counters (a heartbeat, a response) does not take the
    view again for :data:`VIEW_REFRESH_SECONDS` (a delegate voter wakes about a hundred times
    a second); a ``Ready`` that applies entries publishes it at once."""
    driver = _solo_driver(tmp_path, snapshot_every=0)
    await _commit(driver, 1)
    view = driver.view
    assert view.applied_index == driver.replica.applied_index
    driver.stats.steps += 1  # what a step without a Ready changes
    await driver._drain_ready()
    assert driver.view is view  # kept: nothing but a counter changed
    mock_clock.jump(VIEW_REFRESH_SECONDS)  # (trio's clock stands still otherwise)
    await driver._drain_ready()
    assert driver.view is not view and driver.view.stats.steps == driver.stats.steps
    view = driver.view
    await _commit(driver, 2)  # at once, however recent the last view
    assert driver.view is not view
    assert driver.view.applied_index == driver.replica.applied_index == view.applied_index + 2
    driver.storage.close()  # type: ignore[attr-defined]


# -- threads: only the driver's task hands over what was applied ---------------------------------


def _on_trio_thread() -> bool:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


async def test_what_applies_is_handed_over_on_the_drivers_task_and_published_whole(
    tmp_path: Path,
) -> None:
    """The apply worker never calls the replica's observer or ``on_applied`` (they touch trio
    state: the proposer, the node's counters); the published view matches the replica."""
    from market import CloseGate, encode_batch

    driver = _solo_driver(tmp_path, snapshot_every=0)
    calls: list[tuple[str, bool]] = []
    driver.replica.observer = lambda command: calls.append(("observer", _on_trio_thread()))
    driver.on_applied = lambda entries, installed: calls.append(("applied", _on_trio_thread()))
    view = driver.view
    driver.raft.propose(encode_batch([CloseGate(slot=7)]))
    await driver._drain_ready()
    assert ("observer", True) in calls and ("applied", True) in calls
    assert all(on_trio for _, on_trio in calls), calls
    assert view is not driver.view  # replaced whole, never mutated
    assert driver.view.applied_index == driver.replica.applied_index >= 2
    assert driver.view.raft.commit == driver.view.applied_index
    assert driver.view.closed_through == driver.replica.state.closed_through == 7
    assert driver.view.stats.applied_entries == driver.stats.applied_entries
    driver.storage.close()  # type: ignore[attr-defined]


async def test_an_idle_cluster_sends_heartbeats_without_storage_transactions(
    tmp_path: Path,
) -> None:
    """Issue 19: a Ready of messages alone (heartbeats, their responses) has nothing to make
    durable, so the driver starts no worker thread and no SQL transaction for it."""
    base = SCHEDULE.gate_time(FIRST_SLOT) - 3
    _sim, net, _replicas = build_cluster(tmp_path, lambda: base, durable=True)
    saves = {"n": 0}
    for driver in net.drivers.values():
        original = driver.storage.save_ready

        def counting(rd, original=original):
            saves["n"] += 1
            return original(rd)

        driver.storage.save_ready = counting
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for driver in net.drivers.values():
                await nursery.start(driver.run)
            while leader_of(net) is None or any(
                d.raft.status().commit < 1 for d in net.drivers.values()
            ):
                await trio.sleep(0.05)
            await trio.sleep(0.5)  # the election's and the first entry's writes are done
            saves["n"], delivered = 0, net.delivered
            await trio.sleep(1.0)  # 20 ticks of 0.05 s, a heartbeat every tick
            assert net.delivered - delivered >= 20, "no heartbeats flowed"
            assert saves["n"] == 0
            nursery.cancel_scope.cancel()


async def test_the_leader_proposes_a_gate_closure_when_it_falls_due_not_at_its_next_tick(
    tmp_path: Path,
) -> None:
    """The driver wakes at the proposer's next deadline: with proposals only every 30 s, a
    gate that falls due 0.3 s after the start is closed within a tenth of a second of it."""
    driver = _solo_driver(tmp_path)
    driver.propose_every = 30.0
    gate_slot = SCHEDULE.open_slot(1_000_000.0)
    gate_at = SCHEDULE.gate_time(gate_slot)
    t0 = trio.current_time()
    driver.wall_clock = lambda: gate_at - 0.3 + (trio.current_time() - t0)
    seen: float | None = None
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            while seen is None:
                closed = driver.replica.state.closed_through
                if closed is not None and closed >= gate_slot:
                    seen = driver.wall_clock()
                await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
    assert gate_at <= seen < gate_at + 0.1, seen - gate_at
