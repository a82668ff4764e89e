"""The public RaftNode surface: Ready/advance protocol, status, restarts, errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import node.raft as raft_pkg
from node.raft import (
    Config,
    ConfigError,
    Entry,
    MemoryStorage,
    Message,
    MessageType,
    NotLeader,
    RaftError,
    RaftNode,
    Ready,
)
from node.raft.errors import CompactedError, UnavailableError


def _single(seed: int = 1) -> tuple[RaftNode, MemoryStorage]:
    st = MemoryStorage()
    return RaftNode(Config(id="a", voters=("a",), seed=seed), st), st


def _persist(st: MemoryStorage, rd: Ready) -> None:
    if rd.snapshot is not None:
        st.apply_snapshot(rd.snapshot)
    st.append(rd.entries)
    if rd.hard_state is not None:
        st.set_hard_state(rd.hard_state)


def test_required_surface_from_the_issue() -> None:
    """The snippet of issue 4 works as written."""
    node = RaftNode(
        Config(
            id="a",
            voters=("a", "b", "c"),
            learners=(),
            election_tick=10,
            heartbeat_tick=1,
            pre_vote=True,
            check_quorum=True,
            seed=1,
        ),
        storage=MemoryStorage(),
    )
    for _ in range(25):
        node.tick()
    rd = node.ready()
    assert {m.to for m in rd.messages} == {"b", "c"}
    assert all(m.type == MessageType.PRE_VOTE and m.frm == "a" for m in rd.messages)
    assert rd.soft_state is not None and rd.soft_state.role == "pre_candidate"
    node.advance(rd)
    with pytest.raises(NotLeader) as exc:
        node.propose(b"command")
    assert exc.value.leader is None
    s = node.status()
    assert (s.role, s.term, s.leader, s.commit, s.applied) == ("pre_candidate", 0, None, 0, 0)
    for p in ("b", "c"):
        node.step(Message(MessageType.PRE_VOTE_RESP, to="a", frm=p, term=1))
    assert node.status().role == "candidate"
    node.step(Message(MessageType.VOTE_RESP, to="a", frm="b", term=1))
    assert node.status().role == "leader" and node.status().leader == "a"


def test_single_node_commits_and_restarts() -> None:
    """A single voter elects itself, commits, and comes back with its log after restart."""
    node, st = _single()
    for _ in range(30):
        node.tick()
    assert node.status().role == "leader"
    idx = node.propose(b"x")
    rd = node.ready()
    assert rd.hard_state is not None and rd.hard_state.commit == idx
    assert [e.data for e in rd.entries] == [b"", b"x"]
    assert [e.data for e in rd.committed_entries] == [b"", b"x"]
    _persist(st, rd)
    node.advance(rd)
    assert node.status().applied == idx
    assert not node.has_ready()
    again = RaftNode(Config(id="a", voters=("a",), seed=2), st)
    s = again.status()
    assert (s.role, s.term, s.commit, s.applied) == ("follower", 1, 2, 0)
    rd = again.ready()
    assert [e.data for e in rd.committed_entries] == [b"", b"x"]  # re-applied after restart
    assert rd.hard_state is None  # nothing new to persist


def test_ready_hands_out_messages_once_and_hard_state_only_on_change() -> None:
    """Messages are handed out once; hard_state is None when unchanged."""
    node = RaftNode(Config(id="a", voters=("a", "b"), seed=3), MemoryStorage())
    node.campaign()
    rd = node.ready()
    assert rd.hard_state is None  # a pre-vote changes no durable state
    assert rd.messages
    node.advance(rd)
    assert not node.ready().messages


def test_stale_and_misaddressed_messages_are_ignored() -> None:
    """A message for another node or from an old term does not change state."""
    node, _ = _single()
    node.step(Message(MessageType.APP, to="zz", frm="b", term=50))
    assert node.status().term == 0


def test_learner_role_and_no_campaign() -> None:
    """A genesis learner reports role 'learner' and never campaigns."""
    node = RaftNode(Config(id="d", voters=("a", "b", "c"), learners=("d",)), MemoryStorage())
    for _ in range(100):
        node.tick()
    assert node.status().role == "learner"
    assert not node.ready().messages


def test_config_validation() -> None:
    """Invalid configurations are rejected with ConfigError."""
    with pytest.raises(ConfigError):
        Config(id="a", voters=("a",), election_tick=1, heartbeat_tick=1)
    with pytest.raises(ConfigError):
        Config(id="a", voters=("a", "b"), learners=("b",))
    with pytest.raises(ConfigError):
        Config(id="", voters=("a",))


def test_memory_storage_bounds_and_compaction() -> None:
    """Compacted and unavailable indexes raise typed errors."""
    st = MemoryStorage()
    st.append([Entry(i, 1, b"") for i in range(1, 11)])
    st.compact(4)
    assert (st.first_index(), st.last_index(), st.term(4)) == (5, 10, 1)
    with pytest.raises(CompactedError):
        st.term(3)
    with pytest.raises(CompactedError):
        st.entries(4, 6)
    with pytest.raises(UnavailableError):
        st.entries(5, 12)
    assert issubclass(CompactedError, RaftError)


def test_compact_requires_applied_index() -> None:
    """node.compact only snapshots what the application has applied."""
    node, st = _single()
    for _ in range(30):
        node.tick()
    node.propose(b"x")
    rd = node.ready()
    _persist(st, rd)
    node.advance(rd)
    with pytest.raises(RaftError):
        node.compact(node.status().applied + 1, b"state")
    snap = node.compact(node.status().applied, b"state")
    assert snap.metadata.conf_state.voters == ("a",)
    assert st.first_index() == node.status().applied + 1


def _drain(node: RaftNode, st: MemoryStorage) -> None:
    while node.has_ready():
        rd = node.ready()
        _persist(st, rd)
        node.advance(rd)


def test_compaction_checks_refuse_before_any_write() -> None:
    """compaction_metadata refuses (RaftError) an unapplied index, one before an applied
    membership change and one the storage already covers; it writes nothing."""
    node, st = _single()
    node.campaign()
    _drain(node, st)
    node.propose(b"x")
    _drain(node, st)
    before = node.status().applied
    node.add_learner("b")
    _drain(node, st)
    changed = node.status().applied
    assert changed > before
    with pytest.raises(RaftError, match="only"):
        node.compaction_metadata(changed + 1)
    with pytest.raises(RaftError, match="membership changed"):
        node.compaction_metadata(before)
    assert st.first_index() == 1 and st.snapshot().metadata.index == 0
    meta = node.compaction_metadata(changed)
    assert meta.index == changed and meta.term == st.term(changed)
    assert meta.conf_state.learners == ("b",)
    node.compact(changed, b"state")
    assert st.snapshot().metadata.index == changed and st.first_index() == changed + 1
    with pytest.raises(RaftError, match="holds"):
        node.compaction_metadata(changed)


def test_split_compaction_on_sqlite_matches_compact(tmp_path: Path) -> None:
    """persist_compaction (durable, touches no in-memory state) then adopt_compaction (the
    core's view) leave SQLStorage as compact() does, and survive a reopen."""
    from node.raft import Snapshot
    from node.raft.node import persist_compaction
    from node.raft.storage_sql import SQLStorage

    url = f"sqlite:///{tmp_path / 'raft.db'}"
    st = SQLStorage(url)
    node = RaftNode(Config(id="a", voters=("a",), seed=1), st)
    node.campaign()
    for _ in range(5):
        node.propose(b"x")
    while node.has_ready():
        rd = node.ready()
        st.save_ready(rd)
        node.advance(rd)
    applied = node.status().applied
    snap = Snapshot(node.compaction_metadata(applied), b"state")
    persist_compaction(st, snap)
    assert st.first_index() == 1  # the core's view is unchanged until adopted
    assert node.status().first_index == 1
    node.adopt_compaction(snap)
    assert st.first_index() == applied + 1 and st.snapshot() == snap
    assert node.status().first_index == applied + 1
    st.close()
    again = SQLStorage(url)
    assert again.snapshot() == snap and again.first_index() == applied + 1
    assert again.last_index() == applied
    again.close()


FORBIDDEN = {"trio", "socket", "time", "asyncio", "sqlite3", "sqlalchemy", "threading", "os"}


def test_core_is_pure() -> None:
    """No module of the core (everything but storage_sql) imports I/O, clocks or threads,
    and none contains a float literal."""
    root = Path(raft_pkg.__file__).parent
    for path in sorted(root.glob("*.py")):
        if path.name == "storage_sql.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                names = []
            bad = FORBIDDEN.intersection(names)
            assert not bad, f"{path.name} imports {bad}"
            if isinstance(node, ast.Constant):
                assert not isinstance(node.value, float), f"float literal in {path.name}"


def test_transport_feedback_resets_flow_control() -> None:
    """report_unreachable puts a pipelining follower back to probing;
    report_snapshot_failed lets the leader retry a snapshot."""
    from node.testing.raft_simulation import RaftSimulation

    sim = RaftSimulation(3, seed=2, snapshot_threshold=8)
    lead = sim.wait_leader()
    sim.propose()
    sim.converge()
    peer = next(i for i in sim.ids if i != lead)
    node = sim.node(lead)
    assert node.status().progress[peer][2] == "replicate"
    node.report_unreachable(peer)
    assert node.status().progress[peer][2] == "probe"
    sim.isolate(peer)
    for _ in range(30):
        sim.propose()
        sim.run(1)
    sim.heal()
    sim.intercept = lambda m: None if m.type == MessageType.SNAP else m
    sim.run(3)
    assert node.status().progress[peer][2] == "snapshot"
    node.report_snapshot_failed(peer)
    assert node.status().progress[peer][2] == "probe"
    sim.intercept = None
    sim.converge()
