"""The Raft state machine (etcd-raft's ``raft.go``): pure, driven by ``tick`` and ``step``.

Election with randomized timeouts, pre-vote, check-quorum with leader leases, log
replication with fast conflict back-up, commit by counting current-term replicas only,
snapshots, learners, single-server membership changes applied when committed entries are
applied, leader transfer (TIMEOUT_NOW) and distrust (a follower told by its application that the
leader misbehaves stops honouring that leader's lease and refuses it votes, for a bounded number
of ticks; see :meth:`Raft.distrust`). Outgoing messages accumulate in ``msgs``; the
``RaftNode`` wrapper hands them out in a ``Ready`` after the state they depend on is
persisted.
"""

from __future__ import annotations

import random

from node.raft.codec import decode_conf_change
from node.raft.config import Config
from node.raft.delegation import LagWatch, delegate_of, delegated_learners
from node.raft.errors import (
    CompactedError,
    ConfChangeRejected,
    NotLeader,
    ProposalDropped,
    UnavailableError,
)
from node.raft.log import RaftLog
from node.raft.progress import Progress, ProgressState
from node.raft.quorum import VoteResult, committed_index, majority, vote_result
from node.raft.storage import Storage
from node.raft.types import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    RaftRole,
    Snapshot,
    SoftState,
)

TRANSFER_CONTEXT = b"transfer"
"""Context of an election forced by leader transfer: it overrides leader leases."""

_VOTE_RESP = {
    MessageType.VOTE: MessageType.VOTE_RESP,
    MessageType.PRE_VOTE: MessageType.PRE_VOTE_RESP,
}


class Raft:
    """One Raft peer's protocol state. Use it through ``RaftNode``."""

    def __init__(self, config: Config, storage: Storage) -> None:
        self.id = config.id
        self.cfg = config
        self.rng = random.Random(f"{config.seed}:{config.id}")
        self.log = RaftLog(storage, config.max_committed_size_per_ready)
        hs, cs = storage.initial_state()
        if cs is None:
            cs = ConfState(tuple(sorted(config.voters)), tuple(sorted(config.learners)))
        self.voters: set[str] = set(cs.voters)
        self.learners: set[str] = set(cs.learners)
        self.prs: dict[str, Progress] = {}
        self.term = 0
        self.vote = NONE
        self.lead = NONE
        self.role = RaftRole.FOLLOWER
        self.msgs: list[Message] = []
        self.votes: dict[str, bool] = {}
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._heartbeat_round = 0
        self.randomized_election_timeout = config.election_tick
        self.pending_conf_index = 0
        self.lead_transferee = NONE
        self.conf_index = self.log.first_index() - 1
        """Log index of the latest membership applied (the snapshot's, or a conf change's)."""
        self._snap_elapsed: dict[str, int] = {}
        self.lag = LagWatch(config.delegate_patience)
        """Leader: which delegated learners it serves itself because they fell behind."""
        self._sync: dict[str, Progress] = {}
        """Delegate (a follower voter): its learners' progress (``delegation``)."""
        self._sync_key: tuple[str, int] | None = None
        self._sync_elapsed = 0
        self._sync_seen: dict[str, int] = {}
        self.distrusted: dict[str, int] = {}
        """Node id -> ticks left during which this node neither honours that node's leader lease
        nor votes for it (:meth:`distrust`). Volatile: a restart forgets it."""
        if not hs.is_empty():
            if hs.commit < self.log.committed or hs.commit > self.log.last_index():
                hs = HardState(hs.term, hs.vote, max(self.log.committed, hs.commit))
            self.term = hs.term
            self.vote = hs.vote
            self.log.commit_to(hs.commit)
        self.become_follower(self.term, NONE)

    # -- state views -----------------------------------------------------------------------
    def hard_state(self) -> HardState:
        """What must be persisted."""
        return HardState(self.term, self.vote, self.log.committed)

    def soft_state(self) -> SoftState:
        """RaftRole, leader and term for the application."""
        return SoftState(self.public_role(), self.lead, self.term)

    def public_role(self) -> RaftRole:
        """The role, reporting a non-leading learner as LEARNER."""
        if self.role == RaftRole.FOLLOWER and self.id in self.learners:
            return RaftRole.LEARNER
        return self.role

    def conf_state(self) -> ConfState:
        """The membership currently in force (as of the applied index)."""
        return ConfState(tuple(sorted(self.voters)), tuple(sorted(self.learners)))

    def promotable(self) -> bool:
        """May this node campaign? Only a voter without a pending snapshot."""
        return self.id in self.voters and self.log.unstable.snapshot is None

    def _peers(self) -> list[str]:
        return sorted(p for p in self.prs if p != self.id)

    # -- sending ---------------------------------------------------------------------------
    def send(self, m: Message) -> None:
        """Queue a message for the next Ready."""
        self.msgs.append(m)

    def _msg(self, type_: MessageType, to: str, **kw: object) -> Message:
        kw.setdefault("term", self.term)
        return Message(type=type_, to=to, frm=self.id, **kw)  # type: ignore[arg-type]

    def send_append(self, to: str, send_if_empty: bool = True) -> bool:
        """Send entries (or a snapshot) to ``to`` according to its progress."""
        pr = self.prs.get(to)
        if pr is None or pr.is_paused() or self._delegated(to):
            return False
        try:
            prev_term = self.log.term(pr.next - 1)
            ents = self.log.entries_from(pr.next, self.cfg.max_size_per_msg)
        except CompactedError:
            return self._send_snapshot(to, pr)
        except UnavailableError:
            pr.become_probe()
            pr.next = min(pr.next, self.log.last_index() + 1)
            return False
        if not ents and not send_if_empty:
            return False
        self.send(
            self._msg(
                MessageType.APP,
                to,
                index=pr.next - 1,
                log_term=prev_term,
                entries=tuple(ents),
                commit=self.log.committed,
            )
        )
        if pr.state == ProgressState.REPLICATE:
            if ents:
                last = ents[-1].index
                pr.optimistic_update(last)
                pr.inflights.add(last)
        elif pr.state == ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def _send_snapshot(self, to: str, pr: Progress) -> bool:
        snap = self.log.snapshot()
        if snap.is_empty():
            return False
        pr.become_snapshot(snap.metadata.index)
        self._snap_elapsed[to] = 0
        self.send(self._msg(MessageType.SNAP, to, snapshot=snap))
        return True

    def bcast_append(self) -> None:
        """Send appends to every peer that is not paused."""
        for p in self._peers():
            self.send_append(p)

    def bcast_heartbeat(self) -> None:
        """Send heartbeats carrying a safe commit index to every peer.

        The commit index is ``min(match, committed)`` with the term of our entry there
        (``log_term``): the follower takes it only if it holds that very entry, and otherwise
        answers with a rejection that tells us it lost entries it had acknowledged. When that
        entry is compacted away (the peer is behind our snapshot) no commit index is sent.
        A caught-up learner is skipped except every ``learner_heartbeat_rounds``-th round."""
        self._heartbeat_round += 1
        sparse = self._heartbeat_round % self.cfg.learner_heartbeat_rounds != 0
        last = self.log.last_index()
        self._watch_delegated()
        for p in self._peers():
            pr = self.prs[p]
            if sparse and p in self.learners:
                if self._delegated(p):
                    if pr.match >= self.log.committed:
                        continue
                elif pr.state == ProgressState.REPLICATE and pr.match == last:
                    continue
            commit = min(pr.match, self.log.committed)
            term = self.log.zero_term_on_missing(commit)
            if term == 0:
                commit = 0
            self.send(self._msg(MessageType.HEARTBEAT, p, commit=commit, log_term=term))

    # -- role changes ----------------------------------------------------------------------
    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.cfg.election_tick + self.rng.randrange(
            self.cfg.election_tick
        )
        self.lead_transferee = NONE
        self.votes = {}
        self._snap_elapsed = {}
        self._reset_progress()
        self.pending_conf_index = 0
        self.lag.reset()
        self._sync = {}
        self._sync_key = None
        self._sync_seen = {}

    def _reset_progress(self) -> None:
        last = self.log.last_index()
        self.prs = {}
        for p in sorted(self.voters | self.learners):
            pr = Progress(last + 1, self.cfg.max_inflight, is_learner=p in self.learners)
            pr.recent_active = True
            if p == self.id:
                pr.match = last
            self.prs[p] = pr

    def become_follower(self, term: int, lead: str) -> None:
        """Follow ``lead`` (or nobody) at ``term``."""
        self._reset(term)
        self.lead = lead
        self.role = RaftRole.FOLLOWER

    def become_pre_candidate(self) -> None:
        """Start a pre-vote: no term change, no vote cast."""
        self.votes = {}
        self.lead = NONE
        self.role = RaftRole.PRE_CANDIDATE

    def become_candidate(self) -> None:
        """Start a real election at term + 1, voting for ourselves."""
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = RaftRole.CANDIDATE

    def become_leader(self) -> None:
        """Lead: replicate an empty entry of the new term to commit everything before it."""
        self._reset(self.term)
        self.lead = self.id
        self.role = RaftRole.LEADER
        self.prs[self.id].become_replicate()
        self.append_entries([Entry(0, 0, b"")])
        # No membership change until this term's first entry is applied (Ongaro's fix).
        self.pending_conf_index = self.log.last_index()

    # -- elections -------------------------------------------------------------------------
    def hup(self, transfer: bool = False) -> None:
        """Start an election (pre-vote first when enabled, unless forced by a transfer)."""
        if self.role == RaftRole.LEADER or not self.promotable():
            return
        if self._has_unapplied_conf_change():
            return
        if self.cfg.pre_vote and not transfer:
            self._campaign(pre=True)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _has_unapplied_conf_change(self) -> bool:
        if self.log.applied >= self.log.committed:
            return False
        lo = max(self.log.applied + 1, self.log.first_index())
        try:
            ents = self.log.slice(lo, self.log.committed + 1)
        except (CompactedError, UnavailableError):
            return False
        return any(e.type == EntryType.CONF_CHANGE for e in ents)

    def _campaign(self, pre: bool, transfer: bool = False) -> None:
        if pre:
            self.become_pre_candidate()
            vote_type = MessageType.PRE_VOTE
            term = self.term + 1
        else:
            self.become_candidate()
            vote_type = MessageType.VOTE
            term = self.term
        if self._poll(self.id, True) == VoteResult.WON:
            if pre:
                self._campaign(pre=False)
            else:
                self.become_leader()
            return
        ctx = TRANSFER_CONTEXT if transfer else b""
        for p in sorted(self.voters):
            if p == self.id:
                continue
            self.send(
                self._msg(
                    vote_type,
                    p,
                    term=term,
                    index=self.log.last_index(),
                    log_term=self.log.last_term(),
                    context=ctx,
                )
            )

    def _poll(self, frm: str, granted: bool) -> VoteResult:
        self.votes.setdefault(frm, granted)
        return vote_result(self.voters, self.votes)

    # -- distrust --------------------------------------------------------------------------
    def distrust(self, node_id: str, ticks: int) -> bool:
        """Distrust ``node_id`` (normally the current leader, which the application caught
        misbehaving: censoring records) for ``ticks`` ticks. Meanwhile this node

        - does not honour ``node_id``'s leader lease: its heartbeats and appends are still
          accepted (the log keeps replicating) but no longer hold back this node's election
          timer, and vote requests from other candidates are answered as if no leader were
          known (pre-votes and votes granted on the usual log check);
        - campaigns on its election timeout (pre-vote first), and stays a pre-candidate while
          the distrusted leader's heartbeats arrive, so they do not cancel the pre-vote;
        - refuses every vote and pre-vote request from ``node_id`` (a transfer's too).

        Pre-vote keeps a minority harmless: a pre-candidate needs a majority of pre-votes, and
        voters that trust the leader ignore them within its lease, so no term moves. A majority
        distrusting the leader elects another node, which the distrusted one cannot win back
        while the distrust lasts. Refused (False) when this node leads, for itself, for an
        empty id or a non-positive ``ticks``; distrusting a node again keeps the longer time."""
        if ticks <= 0 or node_id in (NONE, self.id) or self.role == RaftRole.LEADER:
            return False
        self.distrusted[node_id] = max(self.distrusted.get(node_id, 0), ticks)
        return True

    def _trusted_lead(self) -> bool:
        """A leader is known and not distrusted: its lease holds."""
        return self.lead != NONE and self.lead not in self.distrusted

    # -- ticks -----------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance the logical clock by one tick."""
        if self.distrusted:
            for nid, left in list(self.distrusted.items()):
                if left <= 1:
                    del self.distrusted[nid]
                else:
                    self.distrusted[nid] = left - 1
        if self.role == RaftRole.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()
            if self.role == RaftRole.FOLLOWER:
                self._tick_sync()

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self.hup()

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum and not self._quorum_active():
                self.become_follower(self.term, NONE)
                return
            if self.lead_transferee != NONE:
                self.lead_transferee = NONE  # transfer timed out
        for p, elapsed in list(self._snap_elapsed.items()):
            pr = self.prs.get(p)
            if pr is None or pr.state != ProgressState.SNAPSHOT:
                del self._snap_elapsed[p]
            elif elapsed + 1 >= self.cfg.election_tick:
                del self._snap_elapsed[p]
                pr.become_probe()  # the snapshot was probably lost: retry
            else:
                self._snap_elapsed[p] = elapsed + 1
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self.bcast_heartbeat()

    def _quorum_active(self) -> bool:
        active = 0
        for p, pr in self.prs.items():
            if p == self.id:
                if p in self.voters:
                    active += 1
                continue
            if pr.recent_active and p in self.voters:
                active += 1
            pr.recent_active = False
        return active >= majority(len(self.voters))

    # -- proposals -------------------------------------------------------------------------
    def append_entries(self, ents: list[Entry]) -> None:
        """Leader: assign index/term to new entries and append them to our log."""
        li = self.log.last_index()
        numbered = [Entry(li + 1 + i, self.term, e.data, e.type) for i, e in enumerate(ents)]
        last = self.log.append(numbered)
        self.prs[self.id].maybe_update(last)
        self._maybe_commit()

    def propose(self, datas: list[bytes]) -> int:
        """Leader: append normal entries and replicate them; returns the last index."""
        self._check_can_propose()
        self.append_entries([Entry(0, 0, d) for d in datas])
        self.bcast_append()
        return self.log.last_index()

    def _check_can_propose(self) -> None:
        if self.role != RaftRole.LEADER:
            raise NotLeader(self.lead or None, self.term)
        if self.lead_transferee != NONE:
            raise ProposalDropped(f"leadership transfer to {self.lead_transferee} in progress")
        if self.id not in self.prs:
            raise ProposalDropped("this leader has been removed from the group")

    def propose_conf_change(self, cc: ConfChange, data: bytes) -> int:
        """Leader: append a membership change; only one may be pending at a time."""
        self._check_can_propose()
        if self.pending_conf_index > self.log.applied:
            raise ConfChangeRejected(
                f"membership change pending at {self.pending_conf_index}, "
                f"applied {self.log.applied}"
            )
        self._validate_conf_change(cc)
        self.append_entries([Entry(0, 0, data, EntryType.CONF_CHANGE)])
        self.pending_conf_index = self.log.last_index()
        self.bcast_append()
        return self.log.last_index()

    def _validate_conf_change(self, cc: ConfChange) -> None:
        if not cc.node_id:
            raise ConfChangeRejected("empty node id")
        voters = set(self.voters)
        if cc.type == ConfChangeType.ADD_VOTER:
            voters.add(cc.node_id)
        elif cc.type == ConfChangeType.ADD_LEARNER:
            if cc.node_id == self.id:
                raise ConfChangeRejected("demote the leader by transferring leadership first")
            voters.discard(cc.node_id)
        else:
            if cc.node_id not in self.voters and cc.node_id not in self.learners:
                raise ConfChangeRejected(f"{cc.node_id} is not a member")
            voters.discard(cc.node_id)
        if not voters:
            raise ConfChangeRejected("the group would have no voters")

    def transfer_leader(self, target: str) -> None:
        """Ask the leader (via this node) to hand leadership to ``target``."""
        self.step(Message(MessageType.TRANSFER_LEADER, to=self.id, frm=target))

    # -- membership ------------------------------------------------------------------------
    def apply_conf_change(self, cc: ConfChange, index: int) -> ConfState:
        """Apply a committed membership change (called as its entry is applied)."""
        nid = cc.node_id
        if cc.type == ConfChangeType.ADD_VOTER:
            self.learners.discard(nid)
            self.voters.add(nid)
        elif cc.type == ConfChangeType.ADD_LEARNER:
            self.voters.discard(nid)
            self.learners.add(nid)
        else:
            self.voters.discard(nid)
            self.learners.discard(nid)
        self.conf_index = index
        if nid in self.voters or nid in self.learners:
            pr = self.prs.get(nid)
            if pr is None:
                pr = Progress(self.log.last_index() + 1, self.cfg.max_inflight)
                pr.recent_active = True
                self.prs[nid] = pr
            pr.is_learner = nid in self.learners
        else:
            self.prs.pop(nid, None)
            self._snap_elapsed.pop(nid, None)
        if self.role == RaftRole.LEADER:
            if self.id not in self.voters:
                # Removed or demoted leader: make sure followers learn the commit, step down.
                self.bcast_append()
                self.become_follower(self.term, NONE)
            else:
                if self._maybe_commit():
                    self.bcast_append()
                else:
                    for p in self._peers():
                        self.send_append(p, send_if_empty=False)
                if self.lead_transferee != NONE and self.lead_transferee not in self.voters:
                    self.lead_transferee = NONE
        elif self.role in (RaftRole.CANDIDATE, RaftRole.PRE_CANDIDATE) and (
            self.id not in self.voters
        ):
            self.become_follower(self.term, NONE)
        return self.conf_state()

    # -- step ------------------------------------------------------------------------------
    def step(self, m: Message) -> None:
        """Handle one message from a peer (or a local TRANSFER_LEADER)."""
        if m.type == MessageType.TRANSFER_LEADER and m.term == 0:
            self._step_role(m)
            return
        if m.term > self.term:
            if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
                force = m.context == TRANSFER_CONTEXT
                in_lease = (
                    self.cfg.check_quorum
                    and self._trusted_lead()
                    and self.election_elapsed < self.cfg.election_tick
                )
                if not force and in_lease:
                    return  # a leader is alive as far as we know: ignore the disruption
            if m.type == MessageType.PRE_VOTE:
                pass  # never change term on a pre-vote
            elif m.type == MessageType.PRE_VOTE_RESP and not m.reject:
                pass  # granted pre-votes carry the future term
            elif m.type in (MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP):
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and m.type in (
                MessageType.HEARTBEAT,
                MessageType.APP,
            ):
                # Tell a stale leader about our term so it steps down.
                self.send(self._msg(MessageType.APP_RESP, m.frm))
            elif m.type == MessageType.PRE_VOTE:
                self.send(self._msg(MessageType.PRE_VOTE_RESP, m.frm, reject=True))
            return

        if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            self._handle_vote_request(m)
        else:
            self._step_role(m)

    def _handle_vote_request(self, m: Message) -> None:
        if m.frm in self.distrusted:
            self.send(self._msg(_VOTE_RESP[m.type], m.frm, reject=True))
            return
        can_vote = (
            self.vote == m.frm
            or (self.vote == NONE and self.lead == NONE)
            or (m.type == MessageType.PRE_VOTE and m.term > self.term)
        )
        resp = _VOTE_RESP[m.type]
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self.send(self._msg(resp, m.frm, term=m.term))
            if m.type == MessageType.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self.send(self._msg(resp, m.frm, reject=True))

    def _step_role(self, m: Message) -> None:
        if self.role == RaftRole.LEADER:
            self._step_leader(m)
        elif self.role in (RaftRole.CANDIDATE, RaftRole.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _step_leader(self, m: Message) -> None:
        if m.type == MessageType.TRANSFER_LEADER:
            self._handle_transfer(m.frm)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if m.type == MessageType.APP_RESP:
            pr.recent_active = True
            if m.reject:
                next_probe = m.reject_hint
                if m.log_term > 0:
                    next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
                if m.index >= pr.match and self._lost_entries(pr, next_probe, m.commit):
                    self.send_append(m.frm)
                    return
                if pr.maybe_decr_to(m.index, next_probe):
                    if pr.state == ProgressState.REPLICATE:
                        pr.become_probe()
                    self.send_append(m.frm)
                return
            old_paused = pr.is_paused()
            if not pr.maybe_update(m.index):
                return
            if pr.state == ProgressState.PROBE:
                pr.become_replicate()
            elif pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
                pr.become_probe()
                pr.become_replicate()
            elif pr.state == ProgressState.REPLICATE:
                pr.inflights.free_le(m.index)
            if self._maybe_commit():
                self.bcast_append()
            elif old_paused:
                self.send_append(m.frm)
            while self.send_append(m.frm, send_if_empty=False):
                pass
            if m.frm == self.lead_transferee and pr.match == self.log.last_index():
                self.send(self._msg(MessageType.TIMEOUT_NOW, m.frm))
        elif m.type == MessageType.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if not m.reject and self.cfg.delegate_learners and m.frm in self.learners:
                # A learner's committed entries are ours (leader completeness): what it has
                # committed is what it holds of our log, whoever sent it the entries.
                pr.maybe_update(min(m.commit, self.log.last_index()))
            if m.reject:
                hint = m.reject_hint
                if m.log_term > 0:
                    hint, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
                self._lost_entries(pr, hint, m.commit)
            if pr.state == ProgressState.REPLICATE and pr.inflights.full():
                pr.inflights.reset()
                pr.become_probe()
            if pr.match < self.log.last_index():
                self.send_append(m.frm)

    def _lost_entries(self, pr: Progress, hint: int, follower_commit: int) -> bool:
        """A follower's rejection says its log matches ours only up to ``hint``: if that is
        below the ``match`` it acknowledged in this term, it lost entries (its disk was wiped
        or restored from an older copy; etcd-raft assumes this never happens). Forget its
        acknowledgements beyond what it provably holds (its commit index: ``hint`` itself may
        name an entry of another term) and probe it from ``hint + 1``; True if so.

        A rejection delayed past a later acknowledgement looks the same; it only costs a
        re-sent append (``match`` goes down, the commit index never does)."""
        if hint >= pr.match:
            return False
        pr.reset_after_loss(min(hint, follower_commit), hint + 1)
        return True

    def _handle_transfer(self, target: str) -> None:
        if target not in self.voters:
            return  # learners and strangers cannot lead
        if self.lead_transferee != NONE:
            if self.lead_transferee == target:
                return
            self.lead_transferee = NONE
        if target == self.id:
            return
        self.lead_transferee = target
        self.election_elapsed = 0
        if self.prs[target].match == self.log.last_index():
            self.send(self._msg(MessageType.TIMEOUT_NOW, target))
        else:
            self.send_append(target)

    def _step_candidate(self, m: Message) -> None:
        my_resp = (
            MessageType.PRE_VOTE_RESP
            if self.role == RaftRole.PRE_CANDIDATE
            else MessageType.VOTE_RESP
        )
        if (
            self.role == RaftRole.PRE_CANDIDATE
            and m.frm in self.distrusted
            and m.type in (MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP)
        ):
            # A distrusted leader of our term: replicate from it as a follower would, but
            # keep the pre-vote going (its heartbeats must not cancel the campaign).
            if m.type == MessageType.APP:
                self._handle_append(m)
            elif m.type == MessageType.HEARTBEAT:
                self._handle_heartbeat(m)
            else:
                self._handle_snapshot(m)
            return
        if m.type == MessageType.APP:
            self.become_follower(m.term, m.frm)
            self._handle_append(m)
        elif m.type == MessageType.HEARTBEAT:
            self.become_follower(m.term, m.frm)
            self._handle_heartbeat(m)
        elif m.type == MessageType.SNAP:
            self.become_follower(m.term, m.frm)
            self._handle_snapshot(m)
        elif m.type == my_resp:
            res = self._poll(m.frm, not m.reject)
            if res == VoteResult.WON:
                if self.role == RaftRole.PRE_CANDIDATE:
                    self._campaign(pre=False)
                else:
                    self.become_leader()
                    self.bcast_append()
            elif res == VoteResult.LOST:
                self.become_follower(self.term, NONE)
        elif m.type == MessageType.TRANSFER_LEADER:
            pass  # no leader to forward to

    def _step_follower(self, m: Message) -> None:
        # a distrusted leader's messages are handled, but do not hold back the election timer
        trusted = m.frm not in self.distrusted
        if m.type == MessageType.APP:
            if trusted:
                self.election_elapsed = 0
            self.lead = m.frm
            self._handle_append(m)
        elif m.type == MessageType.HEARTBEAT:
            if trusted:
                self.election_elapsed = 0
            self.lead = m.frm
            self._handle_heartbeat(m)
        elif m.type == MessageType.SNAP:
            if trusted:
                self.election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot(m)
        elif m.type == MessageType.TRANSFER_LEADER:
            if self.lead != NONE:
                self.send(Message(MessageType.TRANSFER_LEADER, to=self.lead, frm=m.frm))
        elif m.type == MessageType.TIMEOUT_NOW:
            self.hup(transfer=True)
        elif m.type == MessageType.SYNC:
            self._handle_sync(m)
        elif m.type == MessageType.SYNC_RESP:
            self._handle_sync_resp(m)
        if m.type in (MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP):
            self._serve_learners()  # our commit index may have moved

    # -- follower handlers -----------------------------------------------------------------
    def _handle_append(self, m: Message, resp: MessageType = MessageType.APP_RESP) -> None:
        """Append ``m``'s entries (an APP, or a delegate's SYNC answered with ``resp``)."""
        if m.index < self.log.committed:
            self.send(self._msg(resp, m.frm, index=self.log.committed))
            return
        last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self.send(self._msg(resp, m.frm, index=last_new))
            return
        hint = min(m.index, self.log.last_index())
        hint, hint_term = self.log.find_conflict_by_term(hint, m.log_term)
        self.send(
            self._msg(
                resp,
                m.frm,
                index=m.index,
                reject=True,
                reject_hint=hint,
                log_term=hint_term,
                commit=self.log.committed,
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        """Take the leader's commit index if we hold its entry (same index and term);
        otherwise we lack entries the leader believes we acknowledged (our disk was wiped
        or rolled back): reject with our last matching index and our commit index so the
        leader probes us again. A durable follower always holds the entry: the leader sends
        at most what we acknowledged in its term."""
        if m.commit <= self.log.committed:
            self.send(self._msg(MessageType.HEARTBEAT_RESP, m.frm, commit=self.log.committed))
            return
        if m.log_term > 0 and self.log.match_term(m.commit, m.log_term):
            self.log.commit_to(m.commit)
            self.send(self._msg(MessageType.HEARTBEAT_RESP, m.frm, commit=self.log.committed))
            return
        hint = min(m.commit, self.log.last_index())
        hint, hint_term = self.log.find_conflict_by_term(hint, m.log_term)
        self.send(
            self._msg(
                MessageType.HEARTBEAT_RESP,
                m.frm,
                reject=True,
                reject_hint=hint,
                log_term=hint_term,
                commit=self.log.committed,
            )
        )

    def _handle_snapshot(self, m: Message) -> None:
        assert m.snapshot is not None
        if self._restore(m.snapshot):
            self.send(self._msg(MessageType.APP_RESP, m.frm, index=self.log.last_index()))
        else:
            self.send(self._msg(MessageType.APP_RESP, m.frm, index=self.log.committed))

    def _restore(self, s: Snapshot) -> bool:
        meta = s.metadata
        if meta.index <= self.log.committed:
            return False
        if self.log.match_term(meta.index, meta.term):
            self.log.commit_to(meta.index)  # we have the entries: just fast-forward
            return False
        self.log.restore(s)
        self.voters = set(meta.conf_state.voters)
        self.learners = set(meta.conf_state.learners)
        self.conf_index = meta.index
        lead = self.lead
        self._reset_progress()
        self.lead = lead
        return True

    # -- delegated learner replication (Config.delegate_learners, node.raft.delegation) ----
    def _delegated(self, p: str) -> bool:
        """Leader: is learner ``p`` served by a delegate rather than by us?"""
        return (
            self.cfg.delegate_learners
            and p in self.learners
            and p not in self.lag.direct
            and delegate_of(p, self.voters, self.id) != self.id
        )

    def _watch_delegated(self) -> None:
        """Leader, once per heartbeat round: serve a delegated learner ourselves while it is
        behind the commit index of ``delegate_patience`` rounds ago; hand it back once it has
        caught up and its delegate is active."""
        if not self.cfg.delegate_learners or not self.learners:
            return
        due = self.lag.round(self.log.committed)
        for p in sorted(self.learners):
            pr = self.prs.get(p)
            d = delegate_of(p, self.voters, self.id)
            if pr is None or p == self.id or d == self.id:
                continue
            if p in self.lag.direct:
                dpr = self.prs.get(d)
                if (
                    pr.match >= self.log.committed
                    and dpr is not None
                    and dpr.recent_active
                    and dpr.state == ProgressState.REPLICATE
                ):
                    self.lag.direct.discard(p)
            elif pr.match < due:
                self.lag.direct.add(p)
                pr.become_probe()
                self.send_append(p)

    def served_learners(self) -> tuple[str, ...]:
        """Follower voter: the learners it serves as their delegate now (sorted)."""
        return tuple(self._sync)

    def _delegate_prs(self) -> dict[str, Progress]:
        """Follower voter: the learners we serve under the current leader, with their
        progress (recomputed when the leader or the membership changes)."""
        serving = (
            self.cfg.delegate_learners
            and self.role == RaftRole.FOLLOWER
            and self.id in self.voters
            and self.lead not in (NONE, self.id)
        )
        if not serving:
            if self._sync:
                self._sync, self._sync_key, self._sync_seen = {}, None, {}
            return self._sync
        key = (self.lead, self.conf_index)
        if key != self._sync_key:
            mine = delegated_learners(self.id, self.learners, self.voters, self.lead)
            self._sync = {
                p: self._sync.get(p)
                or Progress(self.log.committed + 1, self.cfg.max_inflight, is_learner=True)
                for p in mine
            }
            self._sync_seen = {p: v for p, v in self._sync_seen.items() if p in self._sync}
            self._sync_key = key
        return self._sync

    def _serve_learners(self) -> None:
        for p in self._delegate_prs():
            while self._send_sync(p):
                pass

    def _send_sync(self, to: str) -> bool:
        """Delegate: send ``to`` our committed entries from its ``next`` on (never past our
        commit index: only committed entries are the same everywhere)."""
        pr = self._sync.get(to)
        hi = self.log.committed
        if pr is None or pr.is_paused() or pr.next > hi:
            return False
        try:
            prev_term = self.log.term(pr.next - 1)
            ents = self.log.slice(pr.next, hi + 1, self.cfg.max_size_per_msg)
        except (CompactedError, UnavailableError):
            pr.become_snapshot(0)  # we cannot serve it: the leader will (LagWatch)
            return False
        self.send(
            self._msg(
                MessageType.SYNC,
                to,
                index=pr.next - 1,
                log_term=prev_term,
                entries=tuple(ents),
                commit=hi,
            )
        )
        if pr.state == ProgressState.REPLICATE:
            pr.optimistic_update(ents[-1].index)
            pr.inflights.add(ents[-1].index)
        else:
            pr.probe_sent = True
        return True

    def _tick_sync(self) -> None:
        """Delegate, every heartbeat interval: retry what may have been lost (a probe, a
        stalled pipeline, a learner we could not serve) and send what is committed."""
        self._sync_elapsed += 1
        if self._sync_elapsed < self.cfg.heartbeat_tick:
            return
        self._sync_elapsed = 0
        prs = self._delegate_prs()
        for p, pr in prs.items():
            stalled = self._sync_seen.get(p) == pr.match and pr.match < self.log.committed
            self._sync_seen[p] = pr.match
            if pr.state == ProgressState.SNAPSHOT:
                prs[p] = Progress(self.log.committed + 1, self.cfg.max_inflight, is_learner=True)
            elif pr.state == ProgressState.REPLICATE and (stalled or pr.inflights.full()):
                pr.become_probe()
            elif pr.state == ProgressState.PROBE:
                pr.probe_sent = False
            while self._send_sync(p):
                pass

    def _handle_sync(self, m: Message) -> None:
        """Learner: committed entries from our delegate; like an append, without taking the
        sender for the leader (a voter's committed entries are the leader's)."""
        if self.id not in self.learners or m.frm not in self.voters or m.frm == self.id:
            return
        self._handle_append(m, MessageType.SYNC_RESP)

    def _handle_sync_resp(self, m: Message) -> None:
        """Delegate: a learner's answer (the leader's append-response logic, for committed
        entries only)."""
        pr = self._delegate_prs().get(m.frm)
        if pr is None:
            return
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if next_probe < pr.match:  # the learner lost entries it acknowledged
                pr.reset_after_loss(min(next_probe, m.commit), next_probe + 1)
                self._send_sync(m.frm)
            elif pr.maybe_decr_to(m.index, next_probe):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_sync(m.frm)
            return
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        while self._send_sync(m.frm):
            pass

    # -- commit ----------------------------------------------------------------------------
    def _maybe_commit(self) -> bool:
        matches = {p: pr.match for p, pr in self.prs.items()}
        mci = committed_index(self.voters, matches)
        return self.log.maybe_commit(mci, self.term)


def decode_entry_conf_change(e: Entry) -> ConfChange:
    """The ConfChange carried by a CONF_CHANGE entry."""
    return decode_conf_change(e.data)
