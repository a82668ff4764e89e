"""``RaftNode``: the application's handle on a Raft peer (etcd-raft's ``RawNode``).

The caller loops: feed ``tick()``/``step()``/``propose()``, then ``rd = ready()``; persist
``rd.snapshot``/``rd.entries``/``rd.hard_state``; send ``rd.messages``; apply
``rd.committed_entries``; call ``advance(rd)``. Membership changes in committed entries
take effect inside ``advance`` (when the application has applied them).
"""

from __future__ import annotations

from node.raft.codec import decode_conf_change, encode_conf_change
from node.raft.config import Config
from node.raft.errors import RaftError, SnapshotOutOfDate
from node.raft.progress import ProgressState
from node.raft.raft import Raft
from node.raft.storage import Storage
from node.raft.types import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    EntryType,
    HardState,
    Message,
    RaftRole,
    Ready,
    Snapshot,
    SnapshotMetadata,
    SoftState,
    Status,
)


class RaftNode:
    """A Raft peer over a ``Storage`` holding what it persisted before (empty when new)."""

    def __init__(self, config: Config, storage: Storage) -> None:
        self.config = config
        self.storage = storage
        self.raft = Raft(config, storage)
        self._prev_soft: SoftState = self.raft.soft_state()
        self._prev_hard: HardState = storage.initial_state()[0]
        self._first_soft = True

    # -- inputs ----------------------------------------------------------------------------
    def tick(self) -> None:
        """One logical clock tick."""
        self.raft.tick()

    def step(self, message: Message) -> None:
        """Handle a message received from a peer. Messages not addressed here are ignored."""
        if message.to != self.raft.id:
            return
        self.raft.step(message)

    def campaign(self) -> None:
        """Start an election now (pre-vote first when enabled)."""
        self.raft.hup()

    def propose(self, data: bytes) -> int:
        """Leader: append one command; returns its log index. Raises ``NotLeader`` elsewhere."""
        return self.raft.propose([bytes(data)])

    def propose_batch(self, datas: list[bytes]) -> int:
        """Leader: append several commands at once; returns the last index."""
        return self.raft.propose([bytes(d) for d in datas])

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Leader: propose one membership change; raises ``ConfChangeRejected`` if one is
        still pending. Returns the entry's index."""
        return self.raft.propose_conf_change(cc, encode_conf_change(cc))

    def add_voter(self, node_id: str) -> int:
        """Propose adding ``node_id`` as a voter (promotes it if it is a learner)."""
        return self.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, node_id))

    def add_learner(self, node_id: str) -> int:
        """Propose adding ``node_id`` as a non-voting learner."""
        return self.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, node_id))

    def remove_node(self, node_id: str) -> int:
        """Propose removing ``node_id`` (voter or learner, the leader included)."""
        return self.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, node_id))

    def transfer_leader(self, target: str) -> None:
        """Ask the leader to hand over to ``target`` (forwarded if we are a follower)."""
        self.raft.transfer_leader(target)

    def distrust(self, node_id: str, ticks: int) -> bool:
        """Stop honouring ``node_id``'s leader lease and refuse it votes for ``ticks`` ticks
        (the application caught that leader misbehaving; docs/raft.md, "Distrust"). False
        when refused: this node leads, ``node_id`` is this node or empty, ``ticks`` <= 0."""
        return self.raft.distrust(node_id, ticks)

    def distrusted(self) -> dict[str, int]:
        """Nodes distrusted now and the ticks left for each (a copy)."""
        return dict(self.raft.distrusted)

    def report_snapshot_failed(self, peer: str) -> None:
        """Transport: sending a snapshot to ``peer`` failed; the leader will retry later."""
        pr = self.raft.prs.get(peer)
        leader = self.raft.role == RaftRole.LEADER
        if leader and pr is not None and pr.state == ProgressState.SNAPSHOT:
            pr.become_probe()

    def report_unreachable(self, peer: str) -> None:
        """Transport: a message to ``peer`` could not be delivered; stop pipelining to it
        and probe again."""
        pr = self.raft.prs.get(peer)
        leading = self.raft.role == RaftRole.LEADER
        if leading and pr is not None and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Record the application's snapshot ``data`` taken at applied ``index`` and drop the
        log up to it. The snapshot's membership is the one in force at ``index``.

        All in the caller's thread. A caller that wants the slow parts (serialising ``data``,
        durable writes) off the thread that owns this node splits it in three:
        :meth:`compaction_metadata` (here), :func:`persist_compaction` (a worker thread),
        :meth:`adopt_compaction` (here again)."""
        snap = Snapshot(self.compaction_metadata(index), data)
        persist_compaction(self.storage, snap)
        self.adopt_compaction(snap)
        return self.storage.snapshot()

    def compaction_metadata(self, index: int) -> SnapshotMetadata:
        """Check that the log may be compacted at applied ``index`` and return the snapshot's
        metadata (``index``, its term, the membership in force). Raises ``RaftError`` when it
        may not: ``index`` not applied yet, a membership change applied after it (pending until
        a later snapshot covers it), no newer than the storage's snapshot, or a storage without
        snapshots. Reads the core: call it from the task that owns this node."""
        if index > self.raft.log.applied:
            raise RaftError(f"cannot snapshot at {index}: only {self.raft.log.applied} applied")
        if index < self.raft.conf_index:
            raise RaftError(
                f"cannot snapshot at {index}: membership changed at {self.raft.conf_index}"
            )
        if not _supports_snapshots(self.storage):
            raise RaftError("storage does not support snapshots")
        held = self.storage.snapshot().metadata.index
        if index <= held:
            raise SnapshotOutOfDate(f"cannot snapshot at {index}: the storage holds {held}")
        return SnapshotMetadata(index, self.storage.term(index), self.raft.conf_state())

    def adopt_compaction(self, snap: Snapshot) -> None:
        """Make a compaction the core can see: after :func:`persist_compaction` wrote ``snap``
        durably, update the storage's in-memory log (the view the core reads) to start at
        ``snap``. For a storage without a durable side (``MemoryStorage``) this records the
        snapshot and drops the log. Call from the task that owns this node."""
        adopt = getattr(self.storage, "adopt_compaction", None)
        if adopt is not None:
            adopt(snap)
            return
        m = snap.metadata
        self.storage.create_snapshot(m.index, m.conf_state, snap.data)  # type: ignore[attr-defined]
        self.storage.compact(m.index)  # type: ignore[attr-defined]

    # -- outputs ---------------------------------------------------------------------------
    def has_ready(self) -> bool:
        """Is there anything for the caller to do?"""
        r = self.raft
        if r.soft_state() != self._prev_soft:
            return True
        hs = r.hard_state()
        if hs != self._prev_hard and not hs.is_empty():
            return True
        if r.log.unstable.snapshot is not None or r.log.unstable.entries or r.msgs:
            return True
        return r.log.has_next_committed_entries()

    def ready(self) -> Ready:
        """Collect the work for the caller. Messages are handed out once."""
        r = self.raft
        soft = r.soft_state()
        hs = r.hard_state()
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hs if hs != self._prev_hard and not hs.is_empty() else None,
            entries=tuple(r.log.unstable_entries()),
            snapshot=r.log.unstable.snapshot,
            messages=tuple(r.msgs),
            committed_entries=tuple(r.log.next_committed_entries()),
        )
        r.msgs = []
        return rd

    def advance(self, rd: Ready) -> None:
        """The caller persisted, sent and applied ``rd``."""
        r = self.raft
        if rd.soft_state is not None:
            self._prev_soft = rd.soft_state
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.snapshot is not None:
            r.log.unstable.stable_snap_to(rd.snapshot.metadata.index)
            if rd.snapshot.metadata.index > r.log.applied:
                r.log.applied = rd.snapshot.metadata.index
        if rd.entries:
            last = rd.entries[-1]
            r.log.unstable.stable_to(last.index, last.term)
        for e in rd.committed_entries:
            if e.index <= r.log.applied:
                continue
            r.log.applied_to(e.index)
            if e.type == EntryType.CONF_CHANGE:
                r.apply_conf_change(decode_conf_change(e.data), e.index)

    # -- views -----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """This node's id."""
        return self.raft.id

    @property
    def role(self) -> str:
        """Current role as a string."""
        return str(self.raft.public_role())

    @property
    def term(self) -> int:
        """Current term."""
        return self.raft.term

    @property
    def leader(self) -> str | None:
        """Known leader, or None."""
        return self.raft.lead or None

    def conf_state(self) -> ConfState:
        """Membership in force."""
        return self.raft.conf_state()

    def status(self) -> Status:
        """A snapshot of this node's state."""
        r = self.raft
        progress = {}
        if r.role == RaftRole.LEADER:
            progress = {p: (pr.match, pr.next, str(pr.state)) for p, pr in r.prs.items()}
        cs = r.conf_state()
        return Status(
            id=r.id,
            role=str(r.public_role()),
            term=r.term,
            leader=r.lead or None,
            commit=r.log.committed,
            applied=r.log.applied,
            vote=r.vote,
            last_index=r.log.last_index(),
            first_index=r.log.first_index(),
            voters=cs.voters,
            learners=cs.learners,
            progress=progress,
            lead_transferee=r.lead_transferee if r.lead_transferee != NONE else None,
            direct_learners=tuple(sorted(r.lag.direct)) if r.role == RaftRole.LEADER else (),
            serving=r.served_learners(),
        )


def _supports_snapshots(storage: Storage) -> bool:
    if hasattr(storage, "persist_compaction") and hasattr(storage, "adopt_compaction"):
        return True
    return hasattr(storage, "create_snapshot") and hasattr(storage, "compact")


def persist_compaction(storage: Storage, snap: Snapshot) -> None:
    """The durable half of a compaction (see :meth:`RaftNode.compact`): write ``snap`` and drop
    the entries it covers, for a storage that has a durable side (``SQLStorage``); a no-op for
    one that does not. Touches neither the core nor the in-memory log the core reads, so it may
    run in a worker thread while the task owning the node waits for it, then calls
    :meth:`RaftNode.adopt_compaction`."""
    persist = getattr(storage, "persist_compaction", None)
    if persist is not None:
        persist(snap)
