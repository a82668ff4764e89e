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
- The API task serves ``/status``, ``/orders``, ``/trades``, ``/balances``, ``/slots``,
  ``/members`` and ``/rules`` on 127.0.0.1; ``POST /orders`` (bearer token) places a manual
  order; ``POST /governance`` takes one of the grid operator's signed governance records (its
  signature authorises it: no token), checks it against the engine, gossips it and answers once
  it is committed (docs/node.md, "Governance").
- A household admitted at runtime (an operator's ``AddMember``, not in the genesis) starts as a
  follower that is not yet a member: it catches up and signs readings and orders only for slots
  the engine says it is active in.

On start the replica is rebuilt from the Raft log's snapshot and entries up to the ledger's
applied index (:func:`open_replica`), so a restart neither loses nor re-applies an entry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import trio
from sqlalchemy import func, select

import market.state as engine
from market import CancelOrder, MeterReading, Order, RejectReason
from market.accounting import household_account
from market.bounds import MAX_SLOT
from market.events import (
    Event,
    GateClosed,
    GovernanceAccepted,
    OrderAccepted,
    Rejected,
    SlotSettled,
)
from market.governance import Term
from market.models import (
    GOVERNANCE_RECORDS,
    Command,
    CommandDecodeError,
    FeederReading,
    GovernanceRecord,
    MemberRegistration,
    MemberRole,
    SignedRecord,
    decode_command,
    record_hash,
)
from market.settlement import Tariffs
from market.signing import Signer
from market.state import State, sell_limit_wh
from meter.battery import BatteryClient
from meter.events import MeterError
from meter.metrics import MeterCollector
from meter.reader import MeterConfig, MeterReader, PollResult
from node.agent.battery import BatteryAgent
from node.agent.forecast import FORECAST_FILE, ForecastCollector, load_forecaster, write_forecast
from node.agent.trader import NONCE_MANUAL, NONCES_PER_SLOT, MeterMismatch, Trader
from node.daemon.block_filler import BlockFiller
from node.daemon.censorship import CensorshipWatch
from node.daemon.clock import ClockWatch, offset_clock
from node.daemon.consensus import ConsensusDriver
from node.daemon.events_stream import StrategyApi, with_steps_lists
from node.daemon.http_api import Api, ApiError, Reply, Request
from node.daemon.membership import desired_roles
from node.daemon.prometheus import NodeCollector
from node.daemon.proposer import Proposer
from node.daemon.replica import Replica
from node.daemon.spread import Publication, order_slot_at, publication_times, spread_fraction
from node.daemon.status import (
    GovernanceShadow,
    connected_members,
    dry_run,
    free_operator_nonce,
    governance_outcome,
    governance_shadow,
    members_document,
    record_summary,
    rules_document,
    status_document,
)
from node.ledger import LedgerStore
from node.ledger import schema as t
from node.ledger.gaps import missing_ranges
from node.ledger.queries import load_block_refs, load_clearings, load_settlement_sums
from node.ledger.rows import fetch_rows
from node.ledger.statement import StatementError, household_statement
from node.net.block_sync import (
    BLOCKS_PROTOCOL,
    BlockServer,
    store_exporter,
)
from node.net.clock_sync import (
    TIME_PROTOCOL,
    TimeSampler,
    TimeServer,
    connected_member_peers,
)
from node.net.faults import LiveClockOffset, faults_file_from_env
from node.net.host import NetNode, NetSettings, PublishError, default_slot_policy
from node.net.relay import infrastructure_learners
from node.net.wire import TopicKind
from node.raft import Config, EntryType, Message, RaftNode, decode_message, encode_message
from node.raft.storage_sql import SQLStorage
from node.setup.config import FeederSetting, NodeConfig
from node.setup.genesis import Genesis
from node.setup.keyfile import KeyFileError, NodeIdentity, load_key_file

log = logging.getLogger("microgrid.node")

SLOTS_PAGE = 500
"""Most slots one ``GET /slots`` answers with."""
STATEMENT_DEFAULT_SLOTS = 96
"""Settled slots ``GET /statement`` covers unless asked (one day of 15-minute slots)."""
STATEMENT_MAX_SLOTS = 3000
"""Most slots one ``GET /statement`` covers (a month of 15-minute slots)."""
NONCE_FEEDER = 2
"""The operator's feeder readings have nonces ``slot * 4 + 2`` (docs/node.md); its governance
records ``slot * 4 + k`` for k in 0, 1, 3 (:data:`node.daemon.status.OPERATOR_NONCE_KINDS`)."""
GOVERNANCE_WAIT_SECONDS = 10
"""How long ``POST /governance`` waits for the record to commit unless ``wait`` says."""
MAX_GOVERNANCE_WAIT_SECONDS = 120
NONCE_RESERVE_SECONDS = 120.0
"""A nonce ``GET /governance`` handed out is not handed out again for this long."""


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
    governance: GovernanceShadow | None = None
    """Members, governance history, the operator's nonces, gates and counter baselines, copied
    (:func:`node.daemon.status.governance_shadow`): terms and rules per slot, ``/members``,
    ``/rules`` and the dry run of ``POST /governance`` read this, on the trio thread."""

    @property
    def shadow(self) -> State:
        """The governance shadow's state (members, terms, rules; never the books)."""
        assert self.governance is not None
        return self.governance.state

    def term(self, did: str, slot: int) -> Term | None:
        """The household's term in ``slot`` (None: not a member)."""
        return engine.member_term(self.shadow, did, slot)

    def band(self, slot: int) -> Tariffs:
        """The price band (the tariffs) of ``slot`` under the rules in force there."""
        return engine.config_at(self.shadow, slot).tariffs_at(slot)


@dataclass(slots=True)
class _GovernanceWait:
    """A ``POST /governance`` waiting for its record to commit."""

    record: GovernanceRecord
    done: trio.Event
    accepted: bool = False
    index: int | None = None
    answer: dict[str, Any] | None = None


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
        if config.clock_offset_seconds:  # tests and drills only (node/setup/config.py)
            log.warning("clock_offset_seconds = %s: this node's wall clock is shifted (tests and "
                        "drills only)", config.clock_offset_seconds)  # fmt: skip
            wall_clock = offset_clock(wall_clock, config.clock_offset_seconds)
        self.live_clock_offset = LiveClockOffset()
        """Test-only: the faults file's ``clock_offset_seconds`` (node/net/faults.py), on top."""
        if faults_file_from_env() is not None:  # tests and drills only: the clock may jump
            wall_clock = self.live_clock_offset.shift(wall_clock)
        member = genesis.member(identity.did)
        if not config.meters:
            raise NodeError("no [[meters]] configured: a household node trades what it meters")
        self.operator: Signer | None = (
            None if config.feeder is None else operator_signer(config.feeder, genesis)
        )
        """The grid operator's signer, for the feeder readings (only with ``[feeder]``)."""
        self.config = config
        self.identity = identity
        self.spread_fraction = spread_fraction(identity.did)
        """This household's turn after each slot end (node/daemon/spread.py)."""
        self.genesis = genesis
        self.member: MemberRegistration | None = member
        """This household's genesis registration; None for a household the operator admitted
        at runtime (``AddMember``): it follows the grid and trades once the engine says it is
        active in a slot."""
        self.schedule = genesis.schedule
        self.wall_clock = wall_clock
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = LedgerStore(config.ledger_url)
        if (check := self.store.open_check) is not None:  # docs/ledger.md, "Opening"
            log.info("ledger checked at open", extra={
                "event": "ledger_checked", "clean": check.clean, "reason": check.reason,
                "quick_check_seconds": check.quick_check_seconds,
                "tail_seconds": round(check.tail_seconds, 4)})  # fmt: skip
        self.raft_storage = SQLStorage(config.raft_url)
        self.proposer = Proposer(self.schedule)
        self.replica = open_replica(genesis, self.store, self.raft_storage)
        # after the replica bound the ledger to the grid (init_genesis): readers such as the
        # dashboard take the wall-clock slot length from here; older ledgers get it now
        self.store.record_schedule(self.schedule)
        # called on the driver's task once a batch was applied, never from the apply worker
        self.replica.observer = self._committed
        self._batch_commands: list[Command] = []
        """Commands the replica applied since the last ``_on_batch_applied`` (in log order)."""
        self._waits: dict[bytes, _GovernanceWait] = {}
        """``POST /governance`` requests waiting, by the record's hash."""
        self._reserved_nonces: dict[int, float] = {}
        """Operator nonces ``GET /governance`` handed out, and until when they stay reserved."""
        self._connected: tuple[str, ...] | None = None
        """The DIDs last handed to the network's ``update_members``."""
        self._core: list[str] | None = None
        """The voters last handed to the network's ``set_core_members``."""
        self._members_basis: tuple[object, ...] | None = None
        """What :meth:`_update_members` last derived them from (see there)."""
        self._admission_logged: str | None = None
        voters = genesis.voters
        self.raft = RaftNode(
            Config(
                id=identity.did,
                voters=voters,
                learners=tuple(d for d in genesis.member_dids if d not in voters)
                + infrastructure_learners(genesis),  # the operator node (node/net/relay.py)
                election_tick=config.raft_election_ticks,
                heartbeat_tick=config.raft_heartbeat_ticks,
                # a caught-up learner hears from the leader once per election timeout
                learner_heartbeat_rounds=max(
                    1, config.raft_election_ticks // config.raft_heartbeat_ticks
                ),
                delegate_learners=config.raft_delegate_learners,
                # a delegated learner behind for an election timeout is served by the leader
                delegate_patience=max(
                    3, config.raft_election_ticks // config.raft_heartbeat_ticks
                ),
            ),
            self.raft_storage,
        )
        # the replicated member list decides who may fetch blocks (net.update_members keeps it)
        self.block_server = BlockServer(store_exporter(self.store),
                                        lambda d: self.net.is_allowed_peer(d))  # fmt: skip
        slot = self.schedule.slot_seconds  # clocks: docs/node.md, "Clocks"
        self.clock = ClockWatch(max_skew=config.clock_max_skew_seconds, transfer_every=slot,
                                distrust_every=8 * slot)  # fmt: skip
        self.time_server = TimeServer(wall_clock, lambda d: self.net.is_member(d))
        self._gossip_roles = trio.Event()
        """Set when the Raft membership or the desired voters may have changed: the gossip
        subscription follows this node's role (:meth:`_follow_gossip_role`)."""
        self.net = NetNode(
            identity,
            genesis,
            replace(
                NetSettings.from_config(config, identity, genesis),
                subscribe=self._wants_record_gossip(),
            ),
            on_gossip=self._on_gossip,
            slot_policy=default_slot_policy(genesis, wall_clock),
            raft_codec=(encode_message, decode_message),
            on_raft=self._on_raft,
            stream_handlers=[(BLOCKS_PROTOCOL, self.block_server.handle),
                             (TIME_PROTOCOL, self.time_server.handle)],
            clock_offset=self.live_clock_offset,
        )
        self.time_sampler = TimeSampler(
            lambda: self.net.host, lambda: connected_member_peers(self.net), wall_clock,
            self.clock.sample, interval=config.clock_sample_seconds,
        )  # fmt: skip
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
            censorship=CensorshipWatch(identity.did),
            clock=self.clock,
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
            "" if member is None else member.meter_serial,
            config.strategy,
            meter_time_scale=scale,
            # an accelerated meter's days are not the sun's: no clear-sky term then
            location=config.agent.location if scale == 1.0 else None,
        )
        # the forecast's learned state survives restarts (docs/node.md, "The agent's forecast")
        self.forecast_path = config.data_dir / FORECAST_FILE
        lat, lon = self.trader.location or (None, None)
        self.trader.forecaster, problem = load_forecaster(
            self.forecast_path, self.schedule.slot_seconds, lat, lon
        )
        if problem is not None:
            log.warning("forecast state ignored: %s", problem, extra={"event": "forecast_ignored"})
        # the battery planner (docs/node.md, "Batteries"): at most one [[batteries]] table
        self.battery: BatteryAgent | None = None
        self.battery_client: BatteryClient | None = None
        self.battery_error: str | None = None
        if config.batteries:
            b = config.batteries[0]
            self.battery_client = BatteryClient(
                b.name, b.endpoint, b.device_id, max_power_w=b.max_power_w,
                max_capacity_wh=b.max_capacity_wh, clock=lambda: time.monotonic() * scale,
                wall_clock=wall_clock)  # fmt: skip
            self.battery = BatteryAgent(
                b.slot_seconds or self.schedule.slot_seconds * scale, b.efficiency_permille,
                b.horizon_slots, b.levels)  # fmt: skip
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
        # manual orders, curves, replace and cancel, GET /events (docs/strategy-api.md)
        self.strategy = StrategyApi(self)
        self.block_filler = BlockFiller(self.store, self.net, self.counters)
        """Block sync: fills the ledger's gaps left by a snapshot from the leader."""
        self._stop = trio.Event()
        self.started = trio.Event()
        # one Prometheus endpoint for the network, the meters and the node (127.0.0.1)
        self.net.metrics.registry.register(MeterCollector(self.reader))
        self.net.metrics.registry.register(NodeCollector(self))
        self.net.metrics.registry.register(ForecastCollector(lambda: self.trader.forecaster))

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[HouseholdNode] = trio.TASK_STATUS_IGNORED
                  ) -> None:  # fmt: skip
        """Run every part until :meth:`stop` or cancellation; closes the stores on the way out."""
        try:
            # the members and the voters before the first dial: in a large grid a learner must
            # not start dialling everyone (NetSettings.full_mesh_members)
            self._update_members()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.net.run)
                await nursery.start(self.time_sampler.run)
                await nursery.start(self.driver.run)
                if self.config.api_port:
                    self.api_port = await nursery.start(
                        self.api.serve, self.config.api_host, self.config.api_port
                    )
                nursery.start_soon(self._follow_gossip_role)
                nursery.start_soon(self._meter_loop)
                if self.config.feeder is not None:
                    nursery.start_soon(self._feeder_loop)
                nursery.start_soon(self._publish_manual)
                nursery.start_soon(self.strategy.run)
                nursery.start_soon(self.block_filler.run)
                log.info(
                    "node started", extra={"event": "started", "did": self.identity.did,
                                           "grid": self.genesis.grid, "api_port": self.api_port,
                                           "applied_index": self.replica.applied_index,
                                           "height": self.replica.state.height},
                )  # fmt: skip
                self._update_members()
                if self.member is None:
                    self._log_admission(self.schedule.open_slot(self.wall_clock()))
                self.started.set()
                task_status.started(self)
                await self._stop.wait()
                self.net.stop()
                nursery.cancel_scope.cancel()
        finally:
            self.reader.close()
            if self.battery_client is not None:
                self.battery_client.close()
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
                self.driver.saw(record)
                self.counters[f"gossip_{record.KIND}"] += 1
            elif isinstance(record, GOVERNANCE_RECORDS):
                self.proposer.offer(record)
                self.driver.saw(record)
                self.counters["gossip_governance"] += 1

    def _committed(self, command: Command) -> None:
        """The replica's observer (the driver's task, after a batch applied): the proposer
        never proposes the command again, and ``_on_batch_applied`` gets to see it."""
        self.proposer.committed(command)
        self._batch_commands.append(command)

    def _on_raft(self, message: Any) -> None:
        self.driver.deliver(message)

    def _on_batch_applied(self, entries: list[tuple[int, list[Event]]], installed: bool) -> None:
        """The driver applied a batch of entries (``installed``: after a snapshot from the
        leader): count, log and time what they produced, then publish the engine. On the
        driver's task, while no worker thread applies."""
        for index, events in entries:
            self._on_applied(index, events)
        if installed:  # the snapshot recorded the heights it skipped: block sync, look now
            self.block_filler.wake()
        commands, self._batch_commands = self._batch_commands, []
        self._publish_engine([e for _, events in entries for e in events], rescan=installed)
        self.strategy.after_batch(entries, commands, installed)
        self._governance_committed(entries, commands)
        self._update_members()
        if self.net.subscribed != self._wants_record_gossip():
            self._gossip_roles.set()

    def _governance_committed(
        self, entries: list[tuple[int, list[Event]]], commands: list[Command]
    ) -> None:
        """Answer the ``POST /governance`` requests whose record this batch committed.

        The engine answers each applied command with exactly one event, and a malformed command
        (no command reaches the observer) with one ``malformed`` rejection, so a batch's
        commands and its other events pair up in order; if they ever do not, only acceptances
        (which carry their record) are matched. A record committed inside an installed snapshot
        is found in the governance history."""
        if not self._waits:
            return
        paired: list[tuple[int, Command, Event]] = []
        malformed = RejectReason.MALFORMED
        verdicts = [(i, e) for i, events in entries for e in events
                    if not (isinstance(e, Rejected) and e.reason is malformed)]  # fmt: skip
        if len(verdicts) == len(commands):
            paired = [(i, c, e) for (i, e), c in zip(verdicts, commands, strict=True)]
        else:
            paired = [(i, e.record, e) for i, e in verdicts if isinstance(e, GovernanceAccepted)]
        for index, command, event in paired:
            if not isinstance(command, GOVERNANCE_RECORDS):
                continue
            wait = self._waits.get(record_hash(command))
            if wait is None or wait.done.is_set():
                continue
            wait.accepted, wait.answer = governance_outcome(command, [event])
            wait.index = index
            wait.done.set()
        shadow = self._engine.governance
        for key, wait in self._waits.items():
            if not wait.done.is_set() and shadow is not None and key in shadow.hashes:
                wait.accepted, wait.answer = True, record_summary(wait.record)
                wait.index = self.replica.applied_index
                wait.done.set()

    def _update_members(self) -> None:
        """Tell the network which households may connect (every one active, suspended or
        admitted from a later slot), when that changed; a network layer without
        ``update_members`` keeps the genesis members."""
        update = getattr(self.net, "update_members", None)
        shadow = self._engine.governance
        if update is None or shadow is None:
            return
        # Both lists follow from the governance history and the members (a new history object
        # when a record is added or a snapshot installed) and from the first slot not closed
        # or not settled: unchanged, skip them (each walks every member's terms; on every
        # applied batch that was about 9 % of a learner's CPU at 50 households).
        state = shadow.state
        basis = (state.governance, shadow.records, len(state.members), state.closed_through,
                 state.settled_through)  # fmt: skip
        last = self._members_basis
        if last is not None and last[0] is basis[0] and last[1:] == basis[1:]:
            return
        self._members_basis = basis
        dids = tuple(connected_members(shadow))
        if dids != self._connected:
            self._connected = dids
            update(list(dids))
        set_core = getattr(self.net, "set_core_members", None)
        if set_core is not None:  # the voters: every member keeps a connection to them
            roles = desired_roles(shadow.state)
            core = [d for d, role in roles.items() if role == MemberRole.VOTER]
            if core != self._core:
                self._core = core
                set_core(core)
                self._gossip_roles.set()

    def _wants_record_gossip(self) -> bool:
        """Whether this node receives and forwards the grid's records on gossip: a Raft voter
        (any voter may lead, and a leader proposes what it heard), a member the engine wants
        as a voter (about to become one), or every node with ``learner_gossip``. A learner
        gets every record in the committed log and only publishes its own (flood publish
        reaches every subscribed peer it is connected to: the voters)."""
        did = self.identity.did
        return (
            self.config.learner_gossip
            or did in self.raft.conf_state().voters
            or did in (self._core or ())
        )

    async def _follow_gossip_role(self) -> None:
        """Join or leave the record gossip as this node's role changes (checked whenever the
        membership may have changed, and once a minute as a bound). A failed change is
        logged, counted and tried again 5 s later; it never stops the node."""
        while True:
            with trio.move_on_after(60):
                await self._gossip_roles.wait()
            self._gossip_roles = trio.Event()
            wanted = self._wants_record_gossip()
            try:  # returns at once when nothing changes
                with trio.fail_after(10):
                    await self.net.subscribe_records(wanted)
            except Exception as exc:  # libp2p's errors, or too slow: contained, retried
                self.counters["gossip_subscription_failures"] += 1
                log.warning("could not %s the gossip of the grid's records: %r",
                            "join" if wanted else "leave", exc,
                            extra={"event": "gossip_subscription_failed"})  # fmt: skip
                await trio.sleep(5)
                self._gossip_roles.set()

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
                if self.battery is not None:  # what neighbours paid: the planner's prices
                    self.battery.observe_clearing(event.slot, c.price, c.volume_wh,
                                                  self._engine.band(event.slot))  # fmt: skip
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
                self._check_meter(first.sample, self.schedule.slot_at(now))
                self.trader.observe_power(self.schedule.slot_at(now), first.sample)
            except MeterMismatch as exc:
                log.error(str(exc), extra={"event": "meter_mismatch"})
            await self._place_order(order_slot_at(self.schedule, now))
        slot = self.schedule.slot_at(now)
        poll_every = self.config.meter_poll_seconds
        next_poll = now + poll_every
        async with trio.open_nursery() as publications:
            await self._meter_rounds(slot, next_poll, publications)

    async def _meter_rounds(self, slot: int, next_poll: float, publications: trio.Nursery) -> None:
        """The meter loop's rounds: poll every ``meter_poll_seconds``; at each slot end read
        the meter, sign the reading and leave its publication and the next order to a task
        in ``publications`` that waits for this household's turn (node/daemon/spread.py)."""
        poll_every = self.config.meter_poll_seconds
        while True:
            boundary = self.schedule.end(slot) + self.config.read_delay_seconds
            wake = min(boundary, next_poll)
            await trio.sleep(max(0.0, wake - self.wall_clock()))
            now = self.wall_clock()
            if now >= boundary:
                ended, slot = slot, self.schedule.slot_at(now)
                times = publication_times(
                    self.schedule, self.schedule.end(ended), self.config.read_delay_seconds,
                    self.spread_fraction, self.config.spread_publications,
                )  # fmt: skip
                await self._battery_slot(ended)
                reading = await self._slot_ended(ended)
                publications.start_soon(self._publish_spread, times, reading)
            if now >= next_poll:
                result = await self._poll()
                next_poll = now + poll_every
                if result.sample is not None and self.trader.forecaster.last is None:
                    # the first poll failed: seed the forecast now, not two slot ends later
                    with contextlib.suppress(MeterMismatch):
                        self._check_meter(result.sample, self.schedule.slot_at(now))
                        self.trader.observe_power(self.schedule.slot_at(now), result.sample)
                        await self._place_order(order_slot_at(self.schedule,
                                                              self.wall_clock()))  # fmt: skip

    def _active_term(self, slot: int) -> Term | None:
        """This household's term in ``slot`` if it is active there (None: it must not sign a
        reading or an order for the slot; logged once per change of standing)."""
        term = self.engine_snapshot().term(self.identity.did, slot)
        if term is not None and term.active:
            if self._admission_logged is not None:
                self._admission_logged = None
                log.info("household active: trading", extra={
                    "event": "admitted", "slot": slot, "role": term.role.value})  # fmt: skip
            return term
        self._log_admission(slot, term)
        return None

    def _log_admission(self, slot: int, term: Term | None = None) -> None:
        """Log (once per standing) that this household does not trade in ``slot`` and why."""
        standing = "not admitted" if term is None else term.status.value
        if self._admission_logged == standing:
            return
        self._admission_logged = standing
        if term is None:
            message = ("awaiting admission: this household is not (yet) a member of the grid; "
                       "following the ledger, no readings or orders until the operator's "
                       "add_member is in force")  # fmt: skip
        else:
            message = f"household {term.status.value} in slot {slot}: no readings or orders"
        log.warning(message, extra={"event": "not_active", "slot": slot, "standing": standing})

    def _check_meter(self, sample: Any, slot: int) -> None:
        """The sample's meter against the one registered for ``slot`` (the household's term
        there; the genesis meter while not admitted): raises :class:`MeterMismatch`."""
        term = self.engine_snapshot().term(self.identity.did, slot)
        if term is None:
            return  # not admitted: no registered meter to compare with yet
        self.trader.meter_serial = term.meter_serial
        self.trader.check_meter(sample, term.meter_serial)

    async def _slot_ended(self, slot: int) -> MeterReading | None:
        """Read the meter for ``slot`` (retrying until its reading deadline) and sign the
        reading (published by :meth:`_publish_spread`); None when there is none."""
        term = self._active_term(slot)
        if term is None:
            return None
        deadline = self.schedule.settle_time(slot) - self.schedule.settle_delay_seconds / 4
        while True:
            result = await self._poll()
            if result.sample is not None:
                break
            if self.wall_clock() + 0.5 >= deadline:
                self.counters["readings_missed"] += 1
                log.error("no reading for slot", extra={"event": "reading_missed", "slot": slot})
                return None
            await trio.sleep(0.5)
        try:
            reading = self.trader.slot_ended(slot, result.sample, term.meter_serial,
                                             self._battery_energy(slot))  # fmt: skip
        except MeterMismatch as exc:
            self.counters["meter_mismatch"] += 1
            log.error(str(exc), extra={"event": "meter_mismatch", "slot": slot})
            return None
        self.last_reading = reading
        self.last_reading_at = dt.datetime.fromtimestamp(result.sample.time, dt.UTC).isoformat()
        await self._save_forecast()
        return reading

    async def _publish_spread(self, times: Publication, reading: MeterReading | None) -> None:
        """Publish ``reading`` and place the next order, each at this household's time."""
        if reading is not None:
            await trio.sleep(max(0.0, times.reading_at - self.wall_clock()))
            await self._publish(TopicKind.READINGS, reading)
        await trio.sleep(max(0.0, times.order_at - self.wall_clock()))
        await self._place_order(times.order_slot)

    async def _save_forecast(self) -> None:
        """Persist the forecaster's state (atomically, in a worker thread); a failed write is
        logged and retried at the next slot end."""
        try:
            doc = self.trader.forecaster.to_json()  # here: the trio thread owns the forecaster
            await trio.to_thread.run_sync(write_forecast, doc, self.forecast_path)
        except OSError as exc:
            self.counters["forecast_save_failures"] += 1
            log.warning("forecast state not saved: %s", exc, extra={"event": "forecast_error"})

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

    # -- the battery (docs/node.md, "Batteries") ---------------------------------------------

    async def _battery_slot(self, ended: int) -> None:
        """At the end of slot ``ended``: read the battery, plan from the slot whose order is
        placed next, and force the battery to the energy committed for the slot starting now
        (no commitment: its own self-consumption). A failed read or write is counted and
        logged; the setpoint written last reverts by itself after two slots."""
        agent, client = self.battery, self.battery_client
        if agent is None or client is None:
            return
        engine = self.engine_snapshot()
        open_slot = self.schedule.open_slot(self.wall_clock())
        try:
            with trio.fail_after(max(1.0, self.schedule.settle_delay_seconds / 4)):
                status = await client.read()
                decision = agent.decide(status, ended + 1, open_slot,
                                        self.trader.forecaster.predict, engine.band)  # fmt: skip
                if decision.setpoint_wh is None:
                    await client.release()
                else:
                    revert = math.ceil(2 * agent.slot_seconds)
                    await client.set_power(agent.setpoint_w(decision.setpoint_wh),
                                           revert_s=revert)  # fmt: skip
        except (MeterError, trio.TooSlowError) as exc:
            self.counters["battery_failures"] += 1
            self.battery_error = str(exc) or "battery read/write timed out"
            log.warning("battery failed", extra={"event": "battery_error", "slot": ended,
                                                 "error": self.battery_error})  # fmt: skip
            return
        self.battery_error = None
        log.info("battery planned", extra={
            "event": "battery", "slot": ended + 1, "soc_wh": status.soc_wh,
            "setpoint_wh": decision.setpoint_wh, "order_slot": decision.order_slot,
            "battery_wh": decision.battery_wh})  # fmt: skip

    def _battery_energy(self, slot: int) -> int:
        """What the planned battery moved in ``slot`` (0 without one, or if unknown)."""
        energy = None if self.battery is None else self.battery.battery_energy(slot)
        return energy or 0

    def battery_status(self) -> dict[str, Any] | None:
        """The status document's ``battery`` section (None without ``[[batteries]]``)."""
        agent, client = self.battery, self.battery_client
        if agent is None or client is None:
            return None
        last, plan = agent.last, agent.plan
        return {
            "name": client.name, "ok": self.battery_error is None and client.last is not None,
            "error": self.battery_error,
            "status": None if client.last is None else client.last.as_dict(),
            "setpoint_wh": None if last is None else last.setpoint_wh,
            "setpoint_w": None if last is None or last.setpoint_wh is None
            else agent.setpoint_w(last.setpoint_wh),
            "delivering": None if last is None else last.delivering,
            "committed": {str(k): v for k, v in sorted(agent.committed.items())},
            "plan": [] if plan is None else plan.as_list(),
            "recent_clearings": [{"slot": s, "price": p} for s, p, _ in agent.clearings][-4:],
            "failures": self.counters["battery_failures"], "writes": client.writes,
        }  # fmt: skip

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
        """The agent's order for ``slot``, if the household is active there, priced inside the
        slot's band under the rules in force there."""
        if self._active_term(slot) is None:
            return
        engine = self.engine_snapshot()
        order = self.trader.order_for(
            slot, engine.sell_limit_wh, engine.band(slot),
            0 if self.battery is None else self.battery.order_energy(slot))  # fmt: skip
        if order is not None:
            await self._publish(TopicKind.ORDERS, order)

    async def _publish(self, kind: TopicKind, record: SignedRecord, *,
                       offer_if_refused: bool = False) -> str | None:  # fmt: skip
        """Gossip one own record (or an operator's governance record, ``kind`` governance) and
        queue it for proposal here too. Returns why gossip refused it (None: gossiped);
        ``offer_if_refused`` queues it for proposal all the same (a record the engine's dry
        run accepted: the leader may be this node)."""
        assert isinstance(
            record, Order | CancelOrder | MeterReading | FeederReading | GovernanceRecord
        )
        try:
            await self.net.publish(kind, [record])
        except PublishError as exc:
            self.counters["publish_refused"] += 1
            log.warning("own record refused", extra={"event": "publish_refused",
                                                     "reason": exc.verdict.reason})  # fmt: skip
            if offer_if_refused:
                self.proposer.offer(record)  # type: ignore[arg-type]
            return str(exc.verdict.reason)
        self.proposer.offer(record)  # type: ignore[arg-type]
        self.driver.saw(record)  # watched until committed (gossiped records only)
        self.counters[f"published_{record.KIND}"] += 1
        log.info(f"published {record.KIND}", extra={"event": "published", "kind": record.KIND,
                                                    "slot": getattr(record, "slot", None)})
        return None

    async def _publish_manual(self) -> None:
        async for record in self._manual_recv:
            kind = TopicKind.READINGS if isinstance(record, MeterReading) else TopicKind.ORDERS
            await self._publish(kind, record)

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
        previous = None if rescan else self._engine.governance
        return EngineSnapshot(state, closed, state.settled_through, state.height,
                              state.head_hash, frozenset(manual),
                              0 if rep is None else rep.silent_slots, limit,
                              governance_shadow(state, previous))  # fmt: skip

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
        wants = getattr(self.net, "wants", None)
        indirect = {did for pid, did in self.net.member_peers.items()
                    if wants is not None and not wants(pid)}  # fmt: skip
        doc = status_document(
            self.driver,
            peers_up=peers,
            peers_indirect=indirect,
            invalid_messages=dict(self.net.validator.rejected),
            meter_read_failures=self.counters["meter_read_failures"],
            last_reading=self.last_reading,
            last_reading_at=self.last_reading_at,
            silent_slots=self.engine_snapshot().silent_slots,
            sell_limit_wh=self.engine_snapshot().sell_limit_wh,
        )
        open_slot = self.schedule.open_slot(self.wall_clock())
        term = self.engine_snapshot().term(self.identity.did, open_slot)
        # the role while active; else where the household stands (pending, suspended, ...)
        doc["membership"] = (
            "not admitted" if term is None else term.role.value if term.active
            else term.status.value
        )  # fmt: skip
        doc["open_slot"] = open_slot
        doc["slot_seconds"] = self.schedule.slot_seconds
        doc["counters"] = self.all_counters()
        raft_net = self.net.raft
        doc["raft_transport"] = None if raft_net is None else {
            "frames_sent": raft_net.sent, "bytes_sent": raft_net.bytes_sent,
            "bytes_unpacked": raft_net.bytes_unpacked}  # fmt: skip
        doc["block_sync"] = {"missing": [list(r) for r in missing_blocks]}
        doc["slot_times"] = [{"slot": slot, **times}
                             for slot, times in sorted(self.slot_times.items())]  # fmt: skip
        doc["meters"] = {
            name: {"ok": r.ok, "error": None if r.error is None else str(r.error),
                   "power_w": None if r.sample is None else r.sample.power_w}
            for name, r in self.last_poll.items()
        }  # fmt: skip
        doc["feeder"] = self.feeder_status()
        doc["battery"] = self.battery_status()
        doc["agent"] = {"forecast": self.trader.forecaster.accuracy()}
        doc["network"] = self._network_faults()
        doc["connectivity"] = self.net.connectivity()  # relay, direct/relayed (docs/network.md)
        doc["connectivity"]["record_gossip"] = self.net.subscribed  # docs/network.md
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
        # governance: the operator's signature authorises a record, so no token; the views are
        # built on the trio thread from the published governance shadow (no database)
        waits = {"wait": (0, MAX_GOVERNANCE_WAIT_SECONDS)}
        api.route("POST", "/governance", token=False, ints=waits)(self._post_governance)
        api.route("GET", "/governance", token=False, params=set())(self._get_governance)
        api.route("GET", "/members", token=False,
                  ints={"slot": (0, MAX_SLOT)})(self._get_members)  # fmt: skip
        api.route("GET", "/rules", token=False, ints={"slot": (0, MAX_SLOT)})(self._get_rules)
        api.route("GET", "/statement", blocking=True, token=False,
                  ints={"from_slot": (0, MAX_SLOT), "to_slot": (0, MAX_SLOT)},
                  choices={"detail": ("slots",)})(self._get_statement)  # fmt: skip

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
        rows = with_steps_lists(self._rows(q))
        closed = self.engine_snapshot().closed_through
        if _only_mine(req) and slot is not None and (closed is None or slot > closed):
            rows += self.strategy.open_rows(slot)  # its book: this household's orders only
        return {"slot": slot, "orders": rows}

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

    def _get_statement(self, req: Request) -> Any:
        """This household's statement (node/ledger/statement.py) over settled slots
        ``from_slot..to_slot`` (default: the newest ``STATEMENT_DEFAULT_SLOTS`` settled ones; at
        most ``STATEMENT_MAX_SLOTS``); ``detail=slots`` adds one row per slot (worker thread)."""
        settled = self.engine_snapshot().settled_through
        last = req.ints.get("to_slot", settled)
        if last is None:
            raise ApiError(404, "no settled slot yet", "no_statement")
        first = req.ints.get("from_slot", max(0, last - STATEMENT_DEFAULT_SLOTS + 1))
        if not 0 <= last - first < STATEMENT_MAX_SLOTS:
            raise ApiError(400, f"from_slot..to_slot must span 1..{STATEMENT_MAX_SLOTS} slots")
        try:
            statement = household_statement(self.store.engine, self.identity.did, first, last)
        except StatementError as exc:
            raise ApiError(404, str(exc), "no_statement") from None
        return statement.to_json(per_slot=req.query.get("detail") == "slots")

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

    async def _post_order(self, req: Request) -> Any:
        """Place a manual order ``{"side", "quantity_wh", "price", "slot"?}`` or a curve
        (``"steps": [[quantity_wh, price], ...]``), or replace the slot's one (``"replace"``):
        checked, signed here and queued for gossip (docs/strategy-api.md; on the trio thread,
        the nonce state is written in a worker thread)."""
        return await self.strategy.post_order(req)

    # -- governance ------------------------------------------------------------------------

    def _open_slot(self) -> int:
        return self.schedule.open_slot(self.wall_clock())

    def _shadow(self) -> GovernanceShadow:
        shadow = self.engine_snapshot().governance
        assert shadow is not None  # every snapshot the node takes has one
        return shadow

    def _get_members(self, req: Request) -> Any:
        """``GET /members[?slot=N]``: every household, its standing in the open slot (or
        ``slot``) and the changes scheduled after it."""
        slot = req.ints.get("slot", self._open_slot())
        return members_document(self._shadow(), slot)

    def _get_rules(self, req: Request) -> Any:
        """``GET /rules[?slot=N]``: the rules in force in the open slot (or ``slot``) and the
        history of rules changes."""
        slot = req.ints.get("slot", self._open_slot())
        return rules_document(self._shadow(), slot)

    def _get_governance(self, req: Request) -> Any:
        """``GET /governance``: what the operator needs to sign a record now: the grid, the
        operator's DID, the open slot, the first slot a change may take effect from, and a
        fresh operator nonce (reserved for a while, so concurrent callers get different ones;
        docs/node.md, "Operator nonces")."""
        now = self.wall_clock()
        shadow = self._shadow()
        self._reserved_nonces = {n: t for n, t in self._reserved_nonces.items() if t > now}
        nonce = free_operator_nonce(shadow, self.schedule.slot_at(now),
                                    set(self._reserved_nonces))  # fmt: skip
        if nonce is not None:
            self._reserved_nonces[nonce] = now + NONCE_RESERVE_SECONDS
        closed = shadow.state.closed_through
        return {
            "grid": self.genesis.grid, "operator": self.genesis.operator,
            "open_slot": self.schedule.open_slot(now), "slot_seconds": self.schedule.slot_seconds,
            "closed_through": closed, "first_open_slot": 0 if closed is None else closed + 1,
            "nonce": nonce,
        }  # fmt: skip

    async def _post_governance(self, req: Request) -> Any:
        """``POST /governance[?wait=S]``: one operator-signed governance record (the model's
        JSON). 400 if it is not one, 403 if it is not the genesis operator's for this grid;
        checked against the engine (a dry run on the governance shadow): 409 with the engine's
        typed reason if it would be refused. Otherwise gossiped, queued for proposal, and
        answered once committed (200: what it changed and the log index; 409: the engine's
        rejection) or after ``wait`` seconds (default 10) with 202 (submitted, not committed
        yet)."""
        try:
            record = decode_command(req.body)
        except CommandDecodeError as exc:
            raise ApiError(400, str(exc), "bad_record") from None
        if not isinstance(record, GOVERNANCE_RECORDS):
            raise ApiError(400, f"a {record.type} is not a governance record (one of "
                                f"{', '.join(r.KIND for r in GOVERNANCE_RECORDS)})",
                           "not_governance")  # fmt: skip
        refusal = _operator_refusal(record, self.genesis)
        if refusal is not None:
            raise ApiError(403, f"{refusal[0]}: {refusal[1]}", refusal[0],
                           {"reason": refusal[0], "detail": refusal[1]})  # fmt: skip
        key = record_hash(record)
        if key in self._shadow().hashes:  # posted again after it committed
            return {"committed": True, "applied_index": None, **record_summary(record)}
        wait = self._waits.get(key)
        if wait is None:
            accepted, answer = governance_outcome(record, dry_run(self._shadow(), record))
            if not accepted:
                reason = answer["reason"]
                self.counters[f"governance_refused_{reason}"] += 1
                raise ApiError(409, f"{reason}: {answer['detail']}", f"governance_{reason}",
                               {**answer, "stage": "dry_run"})  # fmt: skip
            wait = self._waits[key] = _GovernanceWait(record, trio.Event())
            gossip = await self._publish(TopicKind.GOVERNANCE, record, offer_if_refused=True)
            log.info("governance record submitted", extra={
                "event": "governance_submitted", "type": record.type,
                "from_slot": record.from_slot, "gossip": gossip or "ok"})  # fmt: skip
        with trio.move_on_after(req.ints.get("wait", GOVERNANCE_WAIT_SECONDS)):
            await wait.done.wait()
        self._prune_waits()
        if not wait.done.is_set():
            # still watched: posting the same record again waits for the same commit
            return Reply(202, {"committed": False, "submitted": True,
                               **record_summary(record)})  # fmt: skip
        answer = {**(wait.answer or {}), "applied_index": wait.index}
        if wait.accepted:
            return {"committed": True, **answer}
        reason = answer.get("reason", "unknown")
        self.counters[f"governance_rejected_{reason}"] += 1
        raise ApiError(409, f"{reason}: {answer.get('detail', '')}", f"governance_{reason}",
                       {**answer, "committed": True, "accepted": False, "stage": "engine"})

    def _prune_waits(self) -> None:
        """Forget answered waits, and unanswered ones whose first slot has closed (the engine
        can no longer accept them) or beyond the newest 256."""
        closed = self.engine_snapshot().closed_through
        for key, wait in list(self._waits.items()):
            gone = closed is not None and wait.record.from_slot <= closed
            if wait.done.is_set() or gone:
                del self._waits[key]
        while len(self._waits) > 256:
            del self._waits[next(iter(self._waits))]


def _operator_refusal(record: GovernanceRecord, genesis: Genesis) -> tuple[str, str] | None:
    """Why ``record`` is not the genesis operator's for this grid, as (reason, detail)."""
    if record.grid != genesis.grid:
        return "wrong_grid", f"record is for grid {record.grid!r}, this is {genesis.grid!r}"
    if record.operator != genesis.operator:
        return "not_operator", f"{record.operator} is not the grid operator"
    if not record.verify(genesis.operator):
        return "bad_signature", f"{record.KIND} signature does not verify for the operator"
    return None


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
