"""The household node daemon: meters, agent, gossip, Raft, contract engine and ledger in one trio
program (``microgrid node run --config FILE``).

Parts and who calls whom (all background tasks live in :meth:`HouseholdNode.run`'s nursery):

- :class:`~node.net.host.NetNode` gossips signed records and carries Raft messages. Every
  validated record heard is offered to the :class:`~node.daemon.proposer.Proposer`; every Raft
  message goes to the :class:`~node.daemon.consensus.ConsensusDriver`.
- The driver runs the Raft core; on the leader it proposes batches of queued records and the
  gate closures and settlements that are due by the wall clock; on every node it applies the
  committed log through the :class:`~node.daemon.replica.Replica` (engine + ledger, with the applied
  index in the same database transaction).
- The meter task polls the household's meters; just after each slot ends it signs the slot's
  :class:`~market.MeterReading` and the agent's :class:`~market.Order` for the next open slot
  (:class:`~node.agent.trader.Trader`), and gossips them.
- With ``[feeder]`` configured (the grid operator's node), the feeder task reads the feeder
  meter just after each slot ends and signs the slot's :class:`~market.models.FeederReading`
  with the operator key, and gossips it like the household's own readings.
- The API task serves ``/status``, ``/orders``, ``/trades``, ``/balances`` and ``/slots`` on
  127.0.0.1; ``POST /orders`` (bearer token) places a manual order.

On start the replica is rebuilt from the Raft log's snapshot and entries up to the ledger's
applied index (:func:`open_replica`), so a restart neither loses nor re-applies an entry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from sqlalchemy import func, select

from market import CancelOrder, MeterReading, Order, RejectReason, Side
from market.accounting import household_account
from market.bounds import MAX_SLOT
from market.events import Event, GateClosed, OrderAccepted, Rejected, SlotSettled
from market.models import FeederReading, MemberRegistration, SignedRecord
from market.signing import Signer
from market.state import State, sell_limit_wh
from meter.metrics import MeterCollector
from meter.reader import MeterConfig, MeterReader, PollResult
from node.agent.trader import NONCE_MANUAL, NONCES_PER_SLOT, MeterMismatch, Trader
from node.daemon.consensus import ConsensusDriver
from node.daemon.http_api import Api, ApiError, Request
from node.daemon.prometheus import NodeCollector
from node.daemon.proposer import Proposer
from node.daemon.replica import Replica
from node.daemon.status import status_document
from node.ledger import LedgerStore
from node.ledger import schema as t
from node.ledger.chunk import BlockSyncError
from node.ledger.chunk_import import import_blocks
from node.ledger.gaps import missing_ranges
from node.ledger.queries import load_block_refs, load_clearings, load_settlement_sums
from node.ledger.rows import fetch_rows
from node.ledger.store import LedgerStoreError
from node.net.block_sync import (
    BLOCKS_PROTOCOL,
    BlockServer,
    FetchError,
    fetch_blocks,
    store_exporter,
)
from node.net.host import NetNode, NetSettings, PublishError, default_slot_policy
from node.net.wire import TopicKind
from node.raft import Config, EntryType, Message, RaftNode, decode_message, encode_message
from node.raft.storage_sql import SQLStorage
from node.setup.config import FeederSetting, NodeConfig
from node.setup.genesis import Genesis
from node.setup.keyfile import KeyFileError, NodeIdentity, load_key_file

log = logging.getLogger("microgrid.node")

BLOCK_SYNC_IDLE_SECONDS = 60.0
"""How long a node without gaps waits before it checks its ledger for one anyway. Gaps appear
when a Raft snapshot from the leader is installed, and the driver wakes block sync right then
(:meth:`HouseholdNode._on_batch_applied`); this re-check is only a bound on that wait."""
BLOCK_SYNC_RETRY_SECONDS = 2.0
SLOTS_PAGE = 500
"""Most slots one ``GET /slots`` answers with."""
NONCE_FEEDER = 2
"""The operator's feeder readings have nonces ``slot * 4 + 2`` (docs/node.md)."""


class NodeError(RuntimeError):
    """The node cannot start (not a member, no meter, inconsistent data); says why."""


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """What the API and the metrics read of the engine, published whole (one reference) by the
    consensus driver's task after each batch of applied entries, while no worker thread applies:
    readers on any thread never see the engine's dicts half-updated (the apply worker mutates
    :class:`~market.state.State` in place), and it always belongs with the driver's published
    :class:`~node.daemon.consensus.ConsensusView` (both are replaced in one trio step)."""

    state: State
    """The engine state object it was taken from (identity only: never read from here)."""
    closed_through: int | None
    settled_through: int | None
    height: int
    head_hash: str
    own_manual_slots: frozenset[int]
    """Open slots whose book holds this household's manual order (nonce ``slot*4+3``)."""
    silent_slots: int = 0
    """Settled slots in a row without a reading of this household's meter (its
    ``Reputation.silent_slots``; orders are refused at ``max_silent_slots``, rules 2)."""
    sell_limit_wh: int | None = None
    """What this household may offer per slot (:func:`market.state.sell_limit_wh`; None:
    rules 1, or not a member)."""


def open_replica(
    genesis: Genesis, store: LedgerStore, storage: SQLStorage
) -> Replica:
    """The replica after a restart: engine rebuilt from the Raft snapshot and log up to the
    ledger's applied index (a fresh node starts from the genesis)."""
    members = list(genesis.members)
    snap = storage.snapshot()
    snapshot = (snap.metadata.index, snap.data) if snap.metadata.index > 0 else None
    ledger_index = store.applied_index()
    if snapshot is not None and snapshot[0] > ledger_index:
        # Crashed between persisting a snapshot received from the leader and recording it.
        replica = Replica(genesis.market, store, genesis=members)
        replica.install_snapshot(*snapshot)
        return replica
    first = snapshot[0] + 1 if snapshot else 1
    last = min(ledger_index, storage.last_index())
    entries = storage.entries(first, last + 1) if last >= first else []
    return Replica.recover(
        genesis.market,
        store,
        snapshot,
        ((e.index, e.data if e.type == EntryType.NORMAL else b"") for e in entries),
        genesis=members,
    )


class _RaftLink:
    """The driver's transport: the NetNode's Raft streams, once the host is up."""

    def __init__(self, net: NetNode) -> None:
        self.net = net
        self.unsent = 0

    def send(self, message: Message) -> None:
        if self.net.raft is None:
            self.unsent += 1
            return
        self.net.raft.send(message)


class HouseholdNode:
    """One household's node. ``await nursery.start(node.run)`` starts it; ``node.stop()``."""

    def __init__(
        self,
        config: NodeConfig,
        identity: NodeIdentity,
        genesis: Genesis,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        member = genesis.member(identity.did)
        if member is None:
            raise NodeError(f"{identity.did} is not a member of grid {genesis.grid!r}")
        if not config.meters:
            raise NodeError("no [[meters]] configured: a household node trades what it meters")
        self.operator: Signer | None = (
            None if config.feeder is None else operator_signer(config.feeder, genesis)
        )
        """The grid operator's signer, for the feeder readings (only with ``[feeder]``)."""
        self.config = config
        self.identity = identity
        self.genesis = genesis
        self.member: MemberRegistration = member
        self.schedule = genesis.schedule
        self.wall_clock = wall_clock
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = LedgerStore(config.ledger_url)
        self.raft_storage = SQLStorage(config.raft_url)
        retry = min(5.0, self.schedule.slot_seconds / 2)
        self.proposer = Proposer(self.schedule, retry_after=retry)
        self.replica = open_replica(genesis, self.store, self.raft_storage)
        # after the replica bound the ledger to the grid (init_genesis): readers such as the
        # dashboard take the wall-clock slot length from here; older ledgers get it now
        self.store.record_schedule(self.schedule)
        # called on the driver's task once a batch was applied, never from the apply worker
        self.replica.observer = self.proposer.committed
        voters = genesis.voters
        self.raft = RaftNode(
            Config(
                id=identity.did,
                voters=voters,
                learners=tuple(d for d in genesis.member_dids if d not in voters),
                election_tick=config.raft_election_ticks,
                heartbeat_tick=config.raft_heartbeat_ticks,
            ),
            self.raft_storage,
        )
        self.block_server = BlockServer(store_exporter(self.store), genesis.is_member)
        self.net = NetNode(
            identity,
            genesis,
            NetSettings.from_config(config, identity, genesis),
            on_gossip=self._on_gossip,
            slot_policy=default_slot_policy(genesis, wall_clock),
            raft_codec=(encode_message, decode_message),
            on_raft=self._on_raft,
            stream_handlers=[(BLOCKS_PROTOCOL, self.block_server.handle)],
        )
        self.raft_link = _RaftLink(self.net)
        self.driver = ConsensusDriver(
            raft=self.raft,
            storage=self.raft_storage,
            replica=self.replica,
            proposer=self.proposer,
            transport=self.raft_link,
            tick_seconds=config.raft_tick_seconds,
            propose_every=min(0.2, config.raft_tick_seconds),
            snapshot_every=config.raft_snapshot_entries,
            wall_clock=wall_clock,
            on_applied=self._on_batch_applied,
        )
        scale = config.meter_time_scale
        meters = [*config.meters, *([config.feeder.meter] if config.feeder else [])]
        self.reader = MeterReader(
            [MeterConfig(m.name, m.profile, m.endpoint, m.device_id) for m in meters],
            clock=lambda: time.monotonic() * scale,
            wall_clock=wall_clock,
        )
        self.trader = Trader(
            identity.signer,
            genesis.market,
            self.schedule,
            member.meter_serial,
            config.strategy,
            meter_time_scale=scale,
        )
        self._engine = self._take_snapshot(self.replica.state, rescan=True)
        self.api = Api(config.api_token)
        self._register_routes()
        self.api_port: int | None = None
        self.counters: Counter[str] = Counter()
        """Event counts, all kept on the trio thread (gossip, meters, publishing, block sync,
        engine rejections: the driver hands applied events over on its task)."""
        self.last_reading: MeterReading | None = None
        self.last_reading_at: str | None = None
        self.last_poll: dict[str, PollResult] = {}
        self.last_feeder_reading: FeederReading | None = None
        self.last_feeder_poll: PollResult | None = None
        self.last_feeder_error: str | None = None
        """Why the last slot's feeder reading was not signed (None after a signed one)."""
        self._meter_failing: dict[str, tuple[str, float]] = {}
        self.slot_times: dict[int, dict[str, float]] = {}
        """Wall-clock seconds at which this node applied each recent slot's clearing
        (``cleared_at``) and settlement (``settled_at``): for status and the benchmarks."""
        self._manual_send, self._manual_recv = trio.open_memory_channel[SignedRecord](64)
        self._block_sync_wake = trio.Event()
        """Set when the ledger may have a new gap (a snapshot was installed): block sync
        looks at once instead of at its next idle re-check."""
        self._stop = trio.Event()
        self.started = trio.Event()
        # one Prometheus endpoint for the network, the meters and the node (127.0.0.1)
        self.net.metrics.registry.register(MeterCollector(self.reader))
        self.net.metrics.registry.register(NodeCollector(self))

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[HouseholdNode] = trio.TASK_STATUS_IGNORED
                  ) -> None:  # fmt: skip
        """Run every part until :meth:`stop` or cancellation; closes the stores on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.net.run)
                await nursery.start(self.driver.run)
                if self.config.api_port:
                    self.api_port = await nursery.start(
                        self.api.serve, self.config.api_host, self.config.api_port
                    )
                nursery.start_soon(self._meter_loop)
                if self.config.feeder is not None:
                    nursery.start_soon(self._feeder_loop)
                nursery.start_soon(self._publish_manual)
                nursery.start_soon(self._block_sync_loop)
                log.info(
                    "node started", extra={"event": "started", "did": self.identity.did,
                                           "grid": self.genesis.grid, "api_port": self.api_port,
                                           "applied_index": self.replica.applied_index,
                                           "height": self.replica.state.height},
                )  # fmt: skip
                self.started.set()
                task_status.started(self)
                await self._stop.wait()
                self.net.stop()
                nursery.cancel_scope.cancel()
        finally:
            self.reader.close()
            self.store.close()
            self.raft_storage.close()
            log.info("node stopped", extra={"event": "stopped",
                                            "applied_index": self.replica.applied_index})

    def stop(self) -> None:
        """Ask :meth:`run` to shut down cleanly."""
        self._stop.set()

    # -- inputs from the network ------------------------------------------------------------

    def _on_gossip(self, kind: TopicKind, records: tuple[SignedRecord, ...], origin: str) -> None:
        for record in records:
            if isinstance(record, Order | CancelOrder | MeterReading | FeederReading):
                self.proposer.offer(record)
                self.counters[f"gossip_{record.KIND}"] += 1

    def _on_raft(self, message: Any) -> None:
        self.driver.deliver(message)

    def _on_batch_applied(self, entries: list[tuple[int, list[Event]]], installed: bool) -> None:
        """The driver applied a batch of entries (``installed``: after a snapshot from the
        leader): count, log and time what they produced, then publish the engine. On the
        driver's task, while no worker thread applies."""
        for index, events in entries:
            self._on_applied(index, events)
        if installed:  # the snapshot recorded the heights it skipped: block sync, look now
            self._block_sync_wake.set()
        self._publish_engine([e for _, events in entries for e in events], rescan=installed)

    def _on_applied(self, index: int, events: list[Event]) -> None:
        """Count, log and time each rejection, clearing and settlement of one applied entry
        (the trio thread)."""
        for event in events:
            if isinstance(event, Rejected):
                # every node sees every rejection; a household is told about its own
                self.counters[f"engine_rejected_{event.reason.value}"] += 1
                if event.author == self.identity.did:
                    self.counters["own_rejected"] += 1
                    # a replayed nonce is mostly a re-proposed copy of a record that already
                    # counted (the proposer retries what did not commit in time)
                    level = logging.INFO if event.reason is RejectReason.REPLAYED_NONCE else (
                        logging.WARNING)  # fmt: skip
                    log.log(level, "own record rejected by the engine", extra={
                        "event": "rejected", "index": index, "reason": event.reason.value,
                        "command": event.command_type, "detail": event.detail})  # fmt: skip
            elif isinstance(event, GateClosed):
                self._slot_time(event.slot, "cleared_at")
                c = event.clearing
                log.info("slot cleared", extra={
                    "event": "cleared", "slot": event.slot, "index": index, "price": c.price,
                    "volume_wh": c.volume_wh, "orders": len(event.orders),
                    "trades": len(event.trades)})  # fmt: skip
            elif isinstance(event, SlotSettled):
                self._slot_time(event.slot, "settled_at")
                log.info("slot settled", extra={
                    "event": "settled", "slot": event.slot, "index": index,
                    "height": event.block.height, "readings": len(event.readings),
                    "hash": event.block.hash})  # fmt: skip

    def _slot_time(self, slot: int, what: str) -> None:
        self.slot_times.setdefault(slot, {})[what] = self.wall_clock()
        while len(self.slot_times) > 64:
            del self.slot_times[min(self.slot_times)]

    # -- meters and the agent ---------------------------------------------------------------

    @property
    def trading_meter(self) -> str:
        """Name of the meter whose readings are settled (the first configured)."""
        return self.config.meters[0].name

    async def _poll(self) -> PollResult:
        # the household's own meters only: the feeder task reads the feeder meter itself, so a
        # dead feeder never delays this household's slot reading
        results = await self.reader.poll_all([m.name for m in self.config.meters])
        self.last_poll = results
        now = time.monotonic()
        for name, result in results.items():
            failing = self._meter_failing.get(name)
            if result.ok:
                if failing is not None:
                    del self._meter_failing[name]
                    log.info("meter answers again", extra={"event": "meter_ok", "meter": name})
                continue
            self.counters["meter_read_failures"] += 1
            error = str(result.error)
            # a dead meter is polled every few seconds: log a change of error, else once a
            # minute (the counter has every failure)
            if failing is None or failing[0] != error or now - failing[1] >= 60:
                self._meter_failing[name] = (error, now)
                log.warning("meter read failed", extra={
                    "event": "meter_error", "meter": name, "error": error,
                    "failures": self.counters["meter_read_failures"]})  # fmt: skip
        return results[self.trading_meter]

    async def _meter_loop(self) -> None:
        """Poll the meters; at each slot end sign the reading and the next order."""
        first = await self._poll()
        now = self.wall_clock()
        if first.sample is not None:
            try:
                self.trader.check_meter(first.sample)
                self.trader.observe_power(self.schedule.slot_at(now), first.sample)
            except MeterMismatch as exc:
                log.error(str(exc), extra={"event": "meter_mismatch"})
            await self._place_order(self.schedule.open_slot(now))
        slot = self.schedule.slot_at(now)
        poll_every = self.config.meter_poll_seconds
        next_poll = now + poll_every
        while True:
            boundary = self.schedule.end(slot) + self.config.read_delay_seconds
            wake = min(boundary, next_poll)
            await trio.sleep(max(0.0, wake - self.wall_clock()))
            now = self.wall_clock()
            if now >= boundary:
                await self._slot_ended(slot)
                slot = self.schedule.slot_at(now)
                await self._place_order(self.schedule.open_slot(self.wall_clock()))
            if now >= next_poll:
                result = await self._poll()
                next_poll = now + poll_every
                if result.sample is not None and self.trader.forecaster.last is None:
                    # the first poll failed: seed the forecast now, not two slot ends later
                    with contextlib.suppress(MeterMismatch):
                        self.trader.check_meter(result.sample)
                        self.trader.observe_power(self.schedule.slot_at(now), result.sample)
                        await self._place_order(self.schedule.open_slot(self.wall_clock()))

    async def _slot_ended(self, slot: int) -> None:
        """Read the meter for ``slot`` (retrying until its reading deadline) and publish."""
        deadline = self.schedule.settle_time(slot) - self.schedule.settle_delay_seconds / 4
        while True:
            result = await self._poll()
            if result.sample is not None:
                break
            if self.wall_clock() + 0.5 >= deadline:
                self.counters["readings_missed"] += 1
                log.error("no reading for slot", extra={"event": "reading_missed", "slot": slot})
                return
            await trio.sleep(0.5)
        try:
            reading = self.trader.slot_ended(slot, result.sample)
        except MeterMismatch as exc:
            self.counters["meter_mismatch"] += 1
            log.error(str(exc), extra={"event": "meter_mismatch", "slot": slot})
            return
        self.last_reading = reading
        self.last_reading_at = dt.datetime.fromtimestamp(result.sample.time, dt.UTC).isoformat()
        await self._publish(TopicKind.READINGS, reading)

    # -- the feeder meter (the grid operator's node) ----------------------------------------

    async def _feeder_loop(self) -> None:
        """``read_delay_seconds`` after each slot end, sign and gossip the feeder reading."""
        slot = self.schedule.slot_at(self.wall_clock())
        while True:
            boundary = self.schedule.end(slot) + self.config.read_delay_seconds
            await trio.sleep(max(0.0, boundary - self.wall_clock()))
            if self.wall_clock() < boundary:
                continue  # woke early (an injected clock): wait again
            await self._feeder_slot_ended(slot)
            slot = max(slot + 1, self.schedule.slot_at(self.wall_clock()))

    async def _feeder_slot_ended(self, slot: int) -> None:
        """Read the feeder meter for ``slot`` (retrying until its reading deadline), sign the
        :class:`FeederReading` with the operator key and publish it."""
        assert self.config.feeder is not None and self.operator is not None
        name = self.config.feeder.meter.name
        deadline = self.schedule.settle_time(slot) - self.schedule.settle_delay_seconds / 4
        while True:
            result = await self.reader.poll(name)
            self.last_feeder_poll = result
            if result.sample is not None:
                break
            self.counters["feeder_read_failures"] += 1
            if self.wall_clock() + 0.5 >= deadline:
                self.counters["feeder_readings_missed"] += 1
                self.last_feeder_error = f"slot {slot}: no feeder reading: {result.error}"
                log.error("no feeder reading for slot", extra={
                    "event": "feeder_reading_missed", "slot": slot,
                    "error": str(result.error)})  # fmt: skip
                return
            await trio.sleep(0.5)
        sample = result.sample
        serial = self.genesis.market.feeder_serial
        if sample.serial != serial:
            self.counters["feeder_mismatch"] += 1
            self.last_feeder_error = (f"feeder meter {name!r} reports serial {sample.serial!r}, "
                                      f"but the genesis registers {serial!r}")  # fmt: skip
            log.error(self.last_feeder_error, extra={"event": "feeder_mismatch", "slot": slot})
            return
        reading = FeederReading(
            grid=self.genesis.grid,
            nonce=slot * NONCES_PER_SLOT + NONCE_FEEDER,
            operator=self.operator.did,
            meter_serial=serial,
            slot=slot,
            import_wh=sample.import_wh,
            export_wh=sample.export_wh,
        ).signed_by(self.operator)
        self.last_feeder_reading = reading
        self.last_feeder_error = None
        await self._publish(TopicKind.READINGS, reading)

    def feeder_status(self) -> dict[str, Any] | None:
        """The status document's ``feeder`` section (None without ``[feeder]``)."""
        if self.config.feeder is None:
            return None
        poll, reading = self.last_feeder_poll, self.last_feeder_reading
        return {
            "meter": self.config.feeder.meter.name,
            "ok": poll is not None and poll.ok and self.last_feeder_error is None,
            "error": self.last_feeder_error if self.last_feeder_error is not None else (
                None if poll is None or poll.error is None else str(poll.error)),
            "last_reading": None if reading is None else {
                "slot": reading.slot, "import_wh": reading.import_wh,
                "export_wh": reading.export_wh, "nonce": reading.nonce,
                "meter_serial": reading.meter_serial},
            "readings_missed": self.counters["feeder_readings_missed"],
            "read_failures": self.counters["feeder_read_failures"],
        }  # fmt: skip

    async def _place_order(self, slot: int) -> None:
        order = self.trader.order_for(slot, self.engine_snapshot().sell_limit_wh)
        if order is not None:
            await self._publish(TopicKind.ORDERS, order)

    async def _publish(self, kind: TopicKind, record: SignedRecord) -> None:
        """Gossip one own record and queue it for proposal here too."""
        assert isinstance(record, Order | CancelOrder | MeterReading | FeederReading)
        try:
            await self.net.publish(kind, [record])
        except PublishError as exc:
            self.counters["publish_refused"] += 1
            log.warning("own record refused", extra={"event": "publish_refused",
                                                     "reason": exc.verdict.reason})  # fmt: skip
            return
        self.proposer.offer(record)
        self.counters[f"published_{record.KIND}"] += 1
        log.info(f"published {record.KIND}", extra={"event": "published", "kind": record.KIND,
                                                    "slot": getattr(record, "slot", None)})

    async def _publish_manual(self) -> None:
        async for record in self._manual_recv:
            kind = TopicKind.READINGS if isinstance(record, MeterReading) else TopicKind.ORDERS
            await self._publish(kind, record)

    # -- block sync ---------------------------------------------------------------------------

    async def _block_sync_loop(self) -> None:
        """Fill the ledger's gaps (left by an installed Raft snapshot) from connected members.

        Each chunk is checked before it lands (:func:`node.ledger.chunk_import.import_blocks`);
        a peer that sends a bad chunk is skipped for this round and counted.
        """
        while True:
            # a fresh event before reading: a snapshot installed during the read wakes us again
            wake = self._block_sync_wake = trio.Event()
            gaps = await trio.to_thread.run_sync(missing_ranges, self.store)
            if not gaps:
                with trio.move_on_after(BLOCK_SYNC_IDLE_SECONDS):
                    await wake.wait()
                continue
            first, last = gaps[0]
            peers = [p for p in self.net.connected_peers()
                     if str(p) in self.net.member_peers]  # fmt: skip
            random.shuffle(peers)
            for peer in peers:
                try:
                    data = await fetch_blocks(self.net.host, peer, first, last)
                    remaining = await trio.to_thread.run_sync(self._import_blocks, data)
                except FetchError as exc:
                    self.counters[f"block_fetch_{exc.reason}"] += 1
                    log.info("block fetch failed", extra={"event": "block_fetch_failed",
                             "peer": str(peer), "first": first, "reason": exc.reason})  # fmt: skip
                    continue
                except LedgerStoreError as exc:  # our own database, not the peer's chunk
                    self.counters["block_import_local_error"] += 1
                    log.error("block import failed locally", extra={
                        "event": "block_import_failed", "error": str(exc)})  # fmt: skip
                    await trio.sleep(BLOCK_SYNC_RETRY_SECONDS)
                    break
                except BlockSyncError as exc:
                    self.counters[f"block_import_{exc.reason}"] += 1
                    log.warning("blocks from a peer refused", extra={
                        "event": "block_import_refused", "peer": str(peer), "first": first,
                        "reason": exc.reason, "detail": str(exc)})  # fmt: skip
                    continue
                self.counters["block_chunks_synced"] += 1
                log.info("blocks synced", extra={
                    "event": "blocks_synced", "peer": str(peer), "first": first,
                    "remaining": [list(r) for r in remaining]})  # fmt: skip
                break
            else:
                await trio.sleep(BLOCK_SYNC_RETRY_SECONDS)

    def _import_blocks(self, data: bytes) -> list[tuple[int, int]]:
        with self.store.write_lock:
            return import_blocks(self.store, data)

    def all_counters(self) -> dict[str, int]:
        """Every event count of this node (status document and metrics)."""
        # dict() of a dict copies it in one step under the GIL: safe from the metrics thread
        return dict(self.counters)

    # -- the local API ------------------------------------------------------------------------
    #
    # Handlers that read the ledger database run in the API's worker threads (``blocking``), so
    # no client can hold up the trio loop that ticks Raft; what they need of the engine comes
    # from the published EngineSnapshot, and /status from the driver's published view, never
    # from the live core, storage or engine state the driver's worker threads update.
    # Rows of other households (orders, trades, balances) need the bearer token; /status,
    # /slots (per-slot totals) and the ``household=me`` views are open.

    def _take_snapshot(self, state: State, events: Sequence[Event] = (), *, rescan: bool = False
                       ) -> EngineSnapshot:  # fmt: skip
        """A snapshot of ``state``: call only where ``state`` cannot change meanwhile (on the
        driver's task between batches, or before the node runs). ``rescan`` reads the own manual
        orders from the books; otherwise they are carried forward from the last snapshot plus
        ``events``."""
        me, nonce = self.identity.did, self.trader.nonce
        if rescan:
            manual = {slot for slot, book in state.books.items() for o in book.values()
                      if o.household == me and o.nonce == nonce(slot, NONCE_MANUAL)}  # fmt: skip
        else:
            manual = set(self._engine.own_manual_slots)
            manual.update(e.order.slot for e in events if isinstance(e, OrderAccepted)
                          and e.order.household == me
                          and e.order.nonce == nonce(e.order.slot, NONCE_MANUAL))  # fmt: skip
        closed = state.closed_through
        if closed is not None:
            manual = {slot for slot in manual if slot > closed}
        rep = state.reputation.get(me)
        limit = (
            sell_limit_wh(state, me) if state.config.rules >= 2 and me in state.members else None
        )
        return EngineSnapshot(state, closed, state.settled_through, state.height,
                              state.head_hash, frozenset(manual),
                              0 if rep is None else rep.silent_slots, limit)  # fmt: skip

    def _publish_engine(self, events: Sequence[Event], *, rescan: bool = False) -> None:
        """Publish a new :class:`EngineSnapshot` (the driver's task, after a batch's events). A
        state object other than the last one's (an installed Raft snapshot) is read afresh."""
        state = self.replica.state
        rescan = rescan or state is not self._engine.state
        self._engine = self._take_snapshot(state, events, rescan=rescan)

    def engine_snapshot(self) -> EngineSnapshot:
        """The engine as of the last applied batch; safe from any thread (one reference)."""
        return self._engine

    def status(self, missing_blocks: list[tuple[int, int]] | None = None) -> dict[str, Any]:
        """The ``/status`` document (on the trio thread: it reads the network's state; consensus
        and ledger come from the driver's published view).

        ``missing_blocks``: the ledger's block-sync gaps, read from the database by the caller
        in a worker thread (None: read here, blocking; for tests and tools)."""
        if missing_blocks is None:
            missing_blocks = missing_ranges(self.store)
        connected = {str(p) for p in self.net.connected_peers()}
        peers = {did: pid in connected for pid, did in self.net.member_peers.items()
                 if did != self.identity.did}  # fmt: skip
        doc = status_document(
            self.driver,
            peers_up=peers,
            invalid_messages=dict(self.net.validator.rejected),
            meter_read_failures=self.counters["meter_read_failures"],
            last_reading=self.last_reading,
            last_reading_at=self.last_reading_at,
            silent_slots=self.engine_snapshot().silent_slots,
            sell_limit_wh=self.engine_snapshot().sell_limit_wh,
        )
        doc["membership"] = self.member.role.value
        doc["open_slot"] = self.schedule.open_slot(self.wall_clock())
        doc["slot_seconds"] = self.schedule.slot_seconds
        doc["counters"] = self.all_counters()
        doc["block_sync"] = {"missing": [list(r) for r in missing_blocks]}
        doc["slot_times"] = [{"slot": slot, **times}
                             for slot, times in sorted(self.slot_times.items())]  # fmt: skip
        doc["meters"] = {
            name: {"ok": r.ok, "error": None if r.error is None else str(r.error),
                   "power_w": None if r.sample is None else r.sample.power_w}
            for name, r in self.last_poll.items()
        }  # fmt: skip
        doc["feeder"] = self.feeder_status()
        doc["network"] = self._network_faults()
        doc["api"] = {"connections": self.api.connections,
                      "responses": {str(k): v for k, v in sorted(self.api.requests.items())},
                      "rejections": dict(sorted(self.api.rejections.items()))}  # fmt: skip
        return doc

    def _network_faults(self) -> dict[str, Any]:
        """What peers did wrong below gossip validation: protocol faults per protocol and
        reason, gossip dropped by the per-peer budgets, peers banned now."""
        faults: dict[str, int] = {}
        for (_peer, protocol, reason), n in list(self.net.faults.items()):
            key = f"{protocol} {reason}"
            faults[key] = faults.get(key, 0) + n
        dropped: dict[str, int] = {}
        for (_peer, reason), n in list(self.net.dropped.items()):
            dropped[reason] = dropped.get(reason, 0) + n
        banned = sorted(self.net.member_peers.get(p, p)
                        for p in list(self.net.penalties.banned_until))  # fmt: skip
        return {"stream_faults": dict(sorted(faults.items())),
                "gossip_dropped": dict(sorted(dropped.items())), "banned": banned}  # fmt: skip

    def _register_routes(self) -> None:
        api = self.api
        mine = {"household": ("me",)}
        api.route("GET", "/status", token=False, params=set())(self._get_status)
        api.route("GET", "/orders", blocking=True, token=_others_rows,
                  ints={"slot": (0, MAX_SLOT)}, choices=mine)(self._get_orders)  # fmt: skip
        api.route("POST", "/orders", token=True, params=set())(self._post_order)
        api.route("GET", "/trades", blocking=True, token=_others_rows,
                  ints={"since": (0, MAX_SLOT)}, choices=mine)(self._get_trades)  # fmt: skip
        api.route("GET", "/balances", blocking=True, token=_others_rows,
                  choices=mine)(self._get_balances)  # fmt: skip
        api.route("GET", "/slots", blocking=True, token=False,
                  ints={"since": (0, MAX_SLOT)})(self._get_slots)  # fmt: skip

    async def _get_status(self, req: Request) -> Any:
        """``/status``: the database part in a worker thread, the rest on the trio thread."""
        missing = await self.api.run_blocking(missing_ranges, self.store)
        return self.status(missing)

    def _rows(self, query: Any) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            return fetch_rows(conn, query)

    def _get_orders(self, req: Request) -> Any:
        """Orders of one slot (default: the last cleared slot) from the ledger (worker thread);
        ``household=me`` filters."""
        c = t.orders.c
        slot = req.ints.get("slot")
        if slot is None:
            slot = self.engine_snapshot().closed_through
        q = select(t.orders).where(c.slot == slot).order_by(c.position)
        if _only_mine(req):
            q = q.where(c.household == self.identity.did)
        return {"slot": slot, "orders": self._rows(q)}

    def _get_trades(self, req: Request) -> Any:
        """Trades from slot ``since`` on (default: the last 96 slots); ``household=me`` filters
        (worker thread)."""
        c = t.trades.c
        since = req.ints.get("since")
        if since is None:
            since = max(0, (self.engine_snapshot().closed_through or 0) - 95)
        q = select(t.trades).where(c.slot >= since).order_by(c.slot, c.position).limit(5000)
        if _only_mine(req):
            q = q.where((c.buyer == self.identity.did) | (c.seller == self.identity.did))
        return {"since": since, "trades": self._rows(q)}

    def _get_balances(self, req: Request) -> Any:
        """Every account's balance per asset (money in minor units, energy in Wh);
        ``household=me`` gives only this household's account (worker thread)."""
        c = t.balances.c
        q = select(t.balances).order_by(c.account, c.asset)
        if _only_mine(req):
            q = q.where(c.account == household_account(self.identity.did))
        return {"balances": self._rows(q)}

    def _get_slots(self, req: Request) -> Any:
        """Per cleared slot: clearing price, local volume, grid import/export, block. At most
        ``SLOTS_PAGE`` slots: from ``since`` on, or the newest ones (worker thread)."""
        since = req.ints.get("since")
        if since is None:
            closed = self.engine_snapshot().closed_through
            after, upto = (None if closed is None else closed - SLOTS_PAGE), None
        else:
            after, upto = since - 1, since - 1 + SLOTS_PAGE
        with self.store.engine.connect() as conn:
            rows = load_clearings(conn, after, upto)
            sums = load_settlement_sums(conn, after, upto)
            blocks = load_block_refs(conn, after, upto)
            count = conn.execute(select(func.count()).select_from(t.blocks)).scalar_one()
        out = []
        for row in rows:
            s = sums.get(row.slot)
            block = blocks.get(row.slot)
            out.append({
                "slot": row.slot, "price": row.price, "local_wh": row.volume_wh,
                "orders": row.order_count, "settled": s is not None,
                "grid_import_wh": s["grid_import_wh"] if s else None,
                "grid_export_wh": s["grid_export_wh"] if s else None,
                "metered_import_wh": s["import_wh"] if s else None,
                "metered_export_wh": s["export_wh"] if s else None,
                "height": block.height if block else None,
                "block_hash": block.hash if block else None,
            })  # fmt: skip
        return {"blocks": int(count), "slots": out}

    def _post_order(self, req: Request) -> Any:
        """Place a manual order ``{"side", "quantity_wh", "price", "slot"?}`` (signed here; on
        the trio thread: it queues the order on a trio channel, and reads no database)."""
        body = req.json()
        if not isinstance(body, dict):
            raise ApiError(400, "expected a JSON object")
        try:
            side = Side(body["side"])
            qty, price = body["quantity_wh"], body["price"]
        except (KeyError, ValueError, TypeError) as exc:
            raise ApiError(400, f"side (buy|sell), quantity_wh and price are required: {exc}"
                           ) from None  # fmt: skip
        slot = body.get("slot", self.schedule.open_slot(self.wall_clock()))
        if not all(type(v) is int for v in (qty, price, slot)):
            raise ApiError(400, "quantity_wh, price and slot must be integers")
        market = self.genesis.market
        if not 0 < qty <= market.max_order_wh:
            raise ApiError(400, f"quantity_wh must be in 1..{market.max_order_wh}")
        if not market.feed_in_tariff <= price <= market.retail_price:
            raise ApiError(400, f"price must be in {market.feed_in_tariff}..{market.retail_price}")
        if not 0 <= slot <= MAX_SLOT:
            raise ApiError(400, f"slot must be in 0..{MAX_SLOT}")
        # what the engine would refuse for this household's record (docs/ledger.md), said now
        # rather than after the order was signed and gossiped
        engine = self.engine_snapshot()
        if market.rules >= 2 and engine.silent_slots >= market.max_silent_slots:
            raise ApiError(409, f"meter_silent: no reading of this household's meter for "
                                f"{engine.silent_slots} settled slots; orders are refused until "
                                "one is accepted")  # fmt: skip
        if side == Side.SELL and engine.sell_limit_wh is not None and qty > engine.sell_limit_wh:
            raise ApiError(409, f"over_sell_limit: this household may offer at most "
                                f"{engine.sell_limit_wh} Wh per slot (its delivery record)")
        now = self.wall_clock()
        if now >= self.schedule.gate_time(slot):
            raise ApiError(409, f"the gate of slot {slot} has closed")
        # The engine accepts slots up to slot_horizon past the last closed gate; a farther one
        # would also push this household's nonce window past its own next readings.
        last = self.schedule.last_due_gate(now) + market.slot_horizon
        if slot > last:
            raise ApiError(400, f"slot {slot} is too far ahead (orders go up to slot {last})")
        # One manual order per slot: its nonce is derived from the slot (node/agent/trader.py), so a
        # second one would be rejected as a replay after the API had accepted it. Signed since
        # this process started, or in the slot's book (the published engine snapshot).
        if slot in self.trader.manual_slots or slot in self.engine_snapshot().own_manual_slots:
            raise ApiError(409, f"a manual order for slot {slot} is already placed (one per slot)")
        order = self.trader.sign_order(slot, side, qty, price)
        try:
            self._manual_send.send_nowait(order)
        except trio.WouldBlock:
            raise ApiError(503, "too many orders queued; try again") from None
        closed = self.schedule.last_due_gate(now)
        self.trader.manual_slots = {s for s in self.trader.manual_slots if s > closed} | {slot}
        return {"queued": order.id, "slot": slot}


def operator_signer(feeder: FeederSetting, genesis: Genesis) -> Signer:
    """The operator's signer from ``[feeder]``'s key file; :class:`NodeError` if the file is
    unusable, the key is not the genesis operator's, or the grid has no feeder meter."""
    try:
        signer = load_key_file(feeder.operator_key_path).signer
    except KeyFileError as exc:
        raise NodeError(f"[feeder] operator_key_path: {exc}") from None
    operator = genesis.market.operator
    if signer.did != operator:
        raise NodeError(f"[feeder] operator key {feeder.operator_key_path} is {signer.did}, but "
                        f"the genesis operator of grid {genesis.grid!r} is {operator}")
    if not genesis.market.feeder_serial:
        raise NodeError(f"[feeder] is configured, but grid {genesis.grid!r} has no feeder meter "
                        "(its genesis market has no feeder_serial)")
    return signer


def _only_mine(req: Request) -> bool:
    """``household=me`` (the only filter value: the route refuses another with 400)."""
    return req.query.get("household") == "me"


def _others_rows(req: Request) -> bool:
    """The token rule of routes with per-household rows: needed unless ``household=me``."""
    return req.query.get("household") != "me"
