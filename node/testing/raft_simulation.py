"""A deterministic, seeded, in-process simulator of a Raft group under faults.

Everything random comes from one ``random.Random(seed)``: message drop, duplication,
delay (and so reordering), timer jitter and whatever a test's nemesis decides. The same
seed replays the same run step by step. After every step the simulator checks the safety
invariants and raises ``InvariantViolation`` (naming the seed) on the first breach:

* at most one leader per term;
* committed entries agree across nodes (committed logs are prefixes of each other);
* no two nodes apply different entries at an index; each node applies in order, no gaps;
* an entry acknowledged to a client as committed is never lost or replaced;
* a node's persisted term never decreases and it grants at most one vote per term,
  across crashes and restarts.

Probabilities are integers in per-mille; times are in ticks.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from node.raft.config import Config
from node.raft.errors import ProposalDropped, RaftError
from node.raft.node import RaftNode
from node.raft.storage import MemoryStorage, Storage
from node.raft.types import Entry, EntryType, Message, MessageType, RaftRole, Ready


class InvariantViolation(AssertionError):
    """A safety invariant failed; the message names the seed and the step."""


@dataclass
class NetConfig:
    """The simulated network. Rates are per mille; delays in ticks (0 = same tick)."""

    drop_pm: int = 0
    dup_pm: int = 0
    min_delay: int = 0
    max_delay: int = 0
    jitter_pm: int = 0
    """Chance that a node's timer skips a tick or fires twice in one step."""

    @classmethod
    def unreliable(cls) -> NetConfig:
        """The 'unreliable network' of the Raft test suites: loss, duplicates, reordering."""
        return cls(drop_pm=100, dup_pm=50, min_delay=0, max_delay=3, jitter_pm=50)


@dataclass
class App:
    """The replicated application of one node: a hash chain over applied entries."""

    applied: int = 0
    digest: bytes = b"\x00" * 16
    datas: list[bytes] = field(default_factory=list)
    """Client commands applied since the last snapshot install (for the tests)."""

    def apply(self, e: Entry) -> None:
        """Apply one committed entry."""
        h = hashlib.blake2b(self.digest, digest_size=16)
        h.update(e.index.to_bytes(8, "big"))
        h.update(e.data)
        self.digest = h.digest()
        self.applied = e.index
        if e.type == EntryType.NORMAL and e.data:
            self.datas.append(e.data)

    def snapshot_data(self) -> bytes:
        """Serialize the state for a snapshot."""
        return self.applied.to_bytes(8, "big") + self.digest

    @classmethod
    def from_snapshot(cls, data: bytes) -> App:
        """Restore from snapshot data."""
        return cls(int.from_bytes(data[:8], "big"), data[8:24])


class RaftSimulation:
    """A Raft group of ``n`` voters (ids n1..nN) plus ``learners`` learners, seeded."""

    def __init__(
        self,
        n: int = 3,
        seed: int = 0,
        *,
        learners: int = 0,
        pre_vote: bool = True,
        check_quorum: bool = True,
        election_tick: int = 10,
        heartbeat_tick: int = 1,
        net: NetConfig | None = None,
        storage_factory: Callable[[str], Storage] | None = None,
        snapshot_threshold: int | None = None,
        max_size_per_msg: int = 1 << 20,
        max_inflight: int = 64,
        extra_ids: Iterable[str] = (),
        learner_heartbeat_rounds: int = 1,
        delegate_learners: bool = False,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.net = net or NetConfig()
        self.voter_ids = tuple(f"n{i}" for i in range(1, n + 1))
        self.learner_ids = tuple(f"n{i}" for i in range(n + 1, n + learners + 1))
        self.ids: list[str] = [*self.voter_ids, *self.learner_ids, *extra_ids]
        self.snapshot_threshold = snapshot_threshold
        self._storage_factory = storage_factory or (lambda _id: MemoryStorage())
        self._cfg_kw = dict(
            election_tick=election_tick,
            heartbeat_tick=heartbeat_tick,
            pre_vote=pre_vote,
            check_quorum=check_quorum,
            max_size_per_msg=max_size_per_msg,
            max_inflight=max_inflight,
            learner_heartbeat_rounds=learner_heartbeat_rounds,
            delegate_learners=delegate_learners,
        )
        self.configs: dict[str, Config] = {}
        self.storages: dict[str, Storage] = {}
        self.nodes: dict[str, RaftNode | None] = {}
        self.apps: dict[str, App] = {}
        self.time = 0
        self._seq = 0
        self._queue: list[tuple[int, int, Message]] = []
        self.blocked: set[tuple[str, str]] = set()
        self.sent: Counter[MessageType] = Counter()
        self.delivered = 0
        self.intercept: Callable[[Message], Message | None] | None = None
        """Scripted faults: sees every message sent; returns it (possibly altered) or None
        to drop it."""
        self.before_persist: Callable[[str, Ready], str | None] | None = None
        """Hook on every Ready: return "before" to crash the node before it persists the
        Ready, "after" to crash it after persisting but before sending, "sent" to crash it
        right after sending (before applying), None to go on."""
        # invariant bookkeeping
        self.leaders: dict[int, str] = {}
        self.committed: dict[int, Entry] = {}
        self.applied_at: dict[int, tuple[int, bytes]] = {}
        self.acked: dict[bytes, int] = {}
        self.proposed: dict[bytes, str] = {}
        self.votes: dict[tuple[str, int], str] = {}
        """(voter, term) -> candidate, for every vote grant that went on the wire."""
        self.persisted_votes: dict[tuple[str, int], str] = {}
        self.persisted_term: dict[str, int] = {}
        self._checked: dict[str, int] = {}
        self._seen_term: dict[str, int] = {}
        self._client_seq = 0
        for nid in self.ids:
            self._create(nid)

    # -- membership of the simulation -----------------------------------------------------
    def _create(self, nid: str) -> None:
        self.configs[nid] = Config(
            id=nid,
            voters=self.voter_ids,
            learners=self.learner_ids,
            seed=self.rng.randrange(1 << 30),
            **self._cfg_kw,  # type: ignore[arg-type]
        )
        self.storages[nid] = self._storage_factory(nid)
        self.nodes[nid] = None
        self.restart(nid)

    def add_node(self, nid: str) -> None:
        """Start a brand-new node (genesis config, empty storage) that is not yet a member."""
        if nid not in self.ids:
            self.ids.append(nid)
        self._create(nid)

    def alive(self) -> list[str]:
        """Ids of running nodes."""
        return [i for i in self.ids if self.nodes.get(i) is not None]

    def node(self, nid: str) -> RaftNode:
        """The running node ``nid`` (raises if crashed)."""
        n = self.nodes[nid]
        if n is None:
            raise KeyError(f"{nid} is down")
        return n

    # -- faults ----------------------------------------------------------------------------
    def crash(self, nid: str) -> None:
        """Kill ``nid``: everything not persisted (unstable log, unsent messages) is lost."""
        self.nodes[nid] = None
        self._queue = [q for q in self._queue if q[2].to != nid]
        heapq.heapify(self._queue)

    def restart(self, nid: str) -> None:
        """Start ``nid`` again over its persisted storage."""
        storage = self.storages[nid]
        hs, _ = storage.initial_state()
        if hs.term < self.persisted_term.get(nid, 0):
            self._fail(f"{nid} restarted at term {hs.term} < persisted {self.persisted_term[nid]}")
        node = RaftNode(self.configs[nid], storage)
        self.nodes[nid] = node
        self._seen_term[nid] = node.raft.term
        snap = storage.snapshot()
        self.apps[nid] = App.from_snapshot(snap.data) if not snap.is_empty() else App()
        self._checked[nid] = min(self._checked.get(nid, 0), storage.first_index() - 1)

    def replace_storage(self, nid: str, storage: Storage | None = None) -> None:
        """Lose ``nid``'s disk: crash it, give it ``storage`` (default: a fresh empty one; or
        an older copy of its own, as after restoring a backup) and restart it with the same id.

        For a learner this is an operator's mistake the group must absorb (the leader catches
        it up again). For a voter it is outside Raft's assumptions (it forgets its term, its
        vote and entries it acknowledged); the simulator then forgets what that node persisted
        (term, votes) but still checks the votes it sends on the wire."""
        self.crash(nid)
        self.storages[nid] = storage if storage is not None else self._storage_factory(nid)
        hs, _ = self.storages[nid].initial_state()
        self.persisted_term[nid] = hs.term
        self._seen_term[nid] = hs.term
        for key in [k for k in self.persisted_votes if k[0] == nid]:
            del self.persisted_votes[key]
        self._checked[nid] = 0
        self.restart(nid)

    def isolate(self, nid: str) -> None:
        """Cut ``nid`` off from everyone, both directions."""
        for o in self.ids:
            if o != nid:
                self.blocked.add((nid, o))
                self.blocked.add((o, nid))

    def partition(self, *groups: Iterable[str]) -> None:
        """Only nodes in the same group can talk (symmetric partition)."""
        gs = [set(g) for g in groups]
        self.blocked = set()
        for a in self.ids:
            for b in self.ids:
                if a != b and not any(a in g and b in g for g in gs):
                    self.blocked.add((a, b))

    def bridge(self, left: Iterable[str], right: Iterable[str], middle: str) -> None:
        """``left`` and ``right`` cannot talk to each other, ``middle`` talks to both."""
        lset, rset = set(left), set(right)
        self.blocked = {(a, b) for a in lset for b in rset} | {(b, a) for a in lset for b in rset}
        self.blocked -= {(middle, x) for x in self.ids} | {(x, middle) for x in self.ids}

    def block(self, frm: str, to: str) -> None:
        """Drop everything from ``frm`` to ``to`` (asymmetric)."""
        self.blocked.add((frm, to))

    def heal(self) -> None:
        """Remove every partition."""
        self.blocked = set()

    # -- clients ---------------------------------------------------------------------------
    def leader(self) -> str | None:
        """The running leader with the highest term, if any."""
        best: tuple[int, str] | None = None
        for nid in self.alive():
            n = self.node(nid)
            if n.raft.role == RaftRole.LEADER and (best is None or n.raft.term > best[0]):
                best = (n.raft.term, nid)
        return best[1] if best else None

    def propose(self, via: str | None = None, data: bytes | None = None) -> bytes | None:
        """Propose a fresh command at ``via`` (default: the leader). Returns it, or None if
        nobody accepted it."""
        nid = via or self.leader()
        if nid is None or self.nodes.get(nid) is None:
            return None
        if data is None:
            self._client_seq += 1
            data = b"cmd-%d" % self._client_seq
        try:
            self.node(nid).propose(data)
        except (RaftError, ProposalDropped):
            return None
        self.proposed[data] = nid
        self._process(nid)
        return data

    # -- running ---------------------------------------------------------------------------
    def send(self, m: Message) -> None:
        """Put a message on the simulated wire, applying loss, duplication and delay."""
        self.sent[m.type] += 1
        if (m.frm, m.to) in self.blocked:
            return
        if self.intercept is not None:
            m2 = self.intercept(m)
            if m2 is None:
                return
            m = m2
        copies = 1
        if self.net.drop_pm and self.rng.randrange(1000) < self.net.drop_pm:
            copies = 0
        elif self.net.dup_pm and self.rng.randrange(1000) < self.net.dup_pm:
            copies = 2
        for _ in range(copies):
            delay = self.net.min_delay
            if self.net.max_delay > self.net.min_delay:
                delay = self.rng.randint(self.net.min_delay, self.net.max_delay)
            self._seq += 1
            heapq.heappush(self._queue, (self.time + delay, self._seq, m))

    def _process(self, nid: str) -> None:
        """Persist, send and apply one node's Ready (unless the crash hook fires)."""
        node = self.nodes[nid]
        if node is None or not node.has_ready():
            return
        rd = node.ready()
        crash = self.before_persist(nid, rd) if self.before_persist is not None else None
        if crash == "before":
            self.crash(nid)
            return
        storage = self.storages[nid]
        if rd.hard_state is not None:
            if rd.hard_state.term < self.persisted_term.get(nid, 0):
                self._fail(f"{nid} persisted term went down to {rd.hard_state.term}")
            self.persisted_term[nid] = rd.hard_state.term
            if rd.hard_state.vote:
                key = (nid, rd.hard_state.term)
                prev = self.persisted_votes.setdefault(key, rd.hard_state.vote)
                if prev != rd.hard_state.vote:
                    self._fail(f"{nid} persisted votes for {prev} and {rd.hard_state.vote}")
        save_ready = getattr(storage, "save_ready", None)
        if save_ready is not None:
            save_ready(rd)  # one transaction per Ready
        else:
            if rd.snapshot is not None:
                storage.apply_snapshot(rd.snapshot)
            if rd.entries:
                storage.append(rd.entries)
            if rd.hard_state is not None:
                storage.set_hard_state(rd.hard_state)
        if crash == "after":
            self.crash(nid)
            return
        for m in rd.messages:
            if m.type == MessageType.VOTE_RESP and not m.reject:
                prev = self.votes.setdefault((nid, m.term), m.to)
                if prev != m.to:
                    self._fail(f"{nid} voted for {prev} and {m.to} in term {m.term}")
            self.send(m)
        if crash == "sent":
            self.crash(nid)
            return
        app = self.apps[nid]
        if rd.snapshot is not None:
            app2 = App.from_snapshot(rd.snapshot.data)
            if app2.applied > app.applied:
                known = self.applied_at.get(app2.applied)
                if known is not None and known[1] != app2.digest:
                    self._fail(f"{nid} installed a different snapshot at {app2.applied}")
                self.apps[nid] = app = app2
        for e in rd.committed_entries:
            if e.index <= app.applied:
                continue
            if e.index != app.applied + 1:
                self._fail(f"{nid} applied {e.index} after {app.applied}: a gap")
            app.apply(e)
            known = self.applied_at.setdefault(e.index, (e.term, app.digest))
            if known != (e.term, app.digest):
                self._fail(f"{nid} applied a different entry/state at index {e.index}")
            if e.data in self.proposed and self.proposed[e.data] == nid and e.data:
                self.acked.setdefault(e.data, e.index)
        node.advance(rd)
        if self.snapshot_threshold is not None:
            first = storage.first_index()
            applied = node.raft.log.applied
            if (
                applied - first + 1 > self.snapshot_threshold
                and applied >= node.raft.conf_index
                and app.applied == applied
            ):
                node.compact(applied, app.snapshot_data())

    def process_all(self) -> None:
        """Handle every pending Ready."""
        for nid in self.ids:
            self._process(nid)

    def deliver_due(self) -> int:
        """Deliver every message due now, handling Readies as they appear."""
        count = 0
        for _ in range(1000):
            self.process_all()
            if not self._queue or self._queue[0][0] > self.time:
                break
            while self._queue and self._queue[0][0] <= self.time:
                _, _, m = heapq.heappop(self._queue)
                node = self.nodes.get(m.to)
                if node is None or (m.frm, m.to) in self.blocked:
                    continue
                node.step(m)
                count += 1
        self.delivered += count
        return count

    def step(self) -> None:
        """One tick of simulated time: timers fire (with jitter), messages flow, checks run."""
        self.time += 1
        for nid in self.alive():
            node = self.node(nid)
            ticks = 1
            if self.net.jitter_pm and self.rng.randrange(1000) < self.net.jitter_pm:
                ticks = self.rng.choice((0, 2))
            for _ in range(ticks):
                node.tick()
        self.deliver_due()
        self.check_invariants()

    def run(self, ticks: int) -> None:
        """Run for ``ticks`` steps."""
        for _ in range(ticks):
            self.step()

    def run_until(self, pred: Callable[[], bool], max_ticks: int) -> bool:
        """Step until ``pred()`` holds (True) or ``max_ticks`` pass (False)."""
        for _ in range(max_ticks):
            if pred():
                return True
            self.step()
        return pred()

    def wait_leader(self, max_ticks: int = 200) -> str:
        """Run until there is a leader every running voter agrees on; returns its id."""

        def agreed() -> bool:
            lead = self.leader()
            if lead is None:
                return False
            term = self.node(lead).raft.term
            return all(
                self.node(i).raft.lead == lead and self.node(i).raft.term == term
                for i in self.alive()
                if not self._blocked_from(i, lead) and i in self.node(lead).raft.prs
            )

        if not self.run_until(agreed, max_ticks):
            self._fail(f"no agreed leader within {max_ticks} ticks")
        lead = self.leader()
        assert lead is not None
        return lead

    def _blocked_from(self, a: str, b: str) -> bool:
        return (a, b) in self.blocked or (b, a) in self.blocked

    def converge(self, max_ticks: int = 300, nodes: Iterable[str] | None = None) -> None:
        """Run until the given nodes (default: every running member of the leader's
        configuration) applied the leader's whole log; then check every acknowledged entry
        is there."""
        fixed = list(nodes) if nodes is not None else None

        def targets() -> list[str]:
            if fixed is not None:
                return fixed
            lead = self.leader()
            if lead is None:
                return self.alive()
            r = self.node(lead).raft
            return [i for i in self.alive() if i in r.voters or i in r.learners]

        def done() -> bool:
            lead = self.leader()
            if lead is None:
                return False
            commit = self.node(lead).raft.log.committed
            lead_last = self.node(lead).raft.log.last_index()
            return commit == lead_last and all(
                self.nodes[i] is not None and self.apps[i].applied == commit for i in targets()
            )

        if not self.run_until(done, max_ticks):
            states = {
                i: (self.apps[i].applied, self.nodes[i] and self.node(i).status().role)
                for i in targets()
            }
            self._fail(f"no convergence within {max_ticks} ticks: {states}")
        self.check_acked()

    def check_acked(self) -> None:
        """Every acknowledged command is committed at the index it was acknowledged at."""
        for data, idx in self.acked.items():
            e = self.committed.get(idx)
            applied = self.applied_at.get(idx)
            if applied is None or (e is not None and e.data != data):
                self._fail(f"acknowledged command {data!r} at {idx} lost")

    # -- invariants ------------------------------------------------------------------------
    def _fail(self, why: str) -> None:
        raise InvariantViolation(f"seed={self.seed} t={self.time}: {why}")

    def check_invariants(self) -> None:
        """Check the safety invariants over all running nodes."""
        for nid in self.alive():
            r = self.node(nid).raft
            if r.term < self._seen_term.get(nid, 0):
                self._fail(f"{nid} term went down from {self._seen_term[nid]} to {r.term}")
            self._seen_term[nid] = r.term
            if r.role == RaftRole.LEADER:
                prev = self.leaders.setdefault(r.term, nid)
                if prev != nid:
                    self._fail(f"two leaders in term {r.term}: {prev} and {nid}")
            lo = max(self._checked.get(nid, 0), r.log.first_index() - 1)
            hi = r.log.committed
            if hi > lo:
                for e in r.log.slice(lo + 1, hi + 1):
                    known = self.committed.setdefault(e.index, e)
                    if known != e:
                        self._fail(
                            f"{nid} committed {e} at {e.index} but {known} was committed there"
                        )
                self._checked[nid] = hi
        for data, idx in self.acked.items():
            e = self.committed.get(idx)
            if e is not None and e.data != data:
                self._fail(f"acknowledged {data!r} at {idx} replaced by {e.data!r}")

    def fingerprint(self) -> str:
        """A digest of the run so far (time, traffic, committed log, node states): equal
        fingerprints for equal seeds show the run is deterministic."""
        h = hashlib.blake2b(digest_size=16)
        h.update(b"%d|%d|" % (self.time, self.delivered))
        for t in sorted(self.sent):
            h.update(b"%d:%d," % (int(t), self.sent[t]))
        for idx in sorted(self.committed):
            e = self.committed[idx]
            h.update(b"%d/%d/%d/" % (e.index, e.term, int(e.type)) + e.data)
        for nid in self.ids:
            n = self.nodes.get(nid)
            if n is not None:
                st = n.status()
                h.update(f"{nid}{st.role}{st.term}{st.commit}{st.applied}".encode())
            h.update(self.apps[nid].digest)
        return h.hexdigest()

    def applied_commands(self, nid: str) -> list[bytes]:
        """Client commands applied by ``nid`` since its last snapshot install."""
        return list(self.apps[nid].datas)
