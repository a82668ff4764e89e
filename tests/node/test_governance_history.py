"""A node refuses to run on a ledger made under another governance history (issue 15).

The ``governance`` rows are not hashed into blocks, so on every start the replica compares them
with the records the engine accepted while replaying the Raft snapshot and log: a row missing,
extra, altered, at another log index, or a ledger of another history of the same genesis stops
the node with :class:`GovernanceHistoryMismatch`, naming the first differing record on both
sides and telling the operator what to do. Real SQLite ledgers and Raft logs throughout.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from market import MemberRole, decode_batch, encode_batch
from market.models import AddMember, ChangeRole, ChangeRules, GovernanceRecord
from market.signing import Signer
from market.state import MarketConfig
from node.daemon.household_node import open_replica
from node.daemon.replica import (
    GovernanceHistoryMismatch,
    Replica,
    ReplicaError,
    exit_status,
)
from node.ledger import LedgerStore, verify_ledger
from node.ledger.governance import governance_row
from node.raft.storage_sql import SQLStorage
from node.raft.types import ConfState, Entry, HardState
from node.setup.genesis import Genesis, create_genesis, write_genesis
from node.setup.keyfile import create_key_file
from tests.ledger.governance_grid import governance_commands
from tests.market.world import World
from tests.node.test_replica import as_log

Log = list[tuple[int, bytes]]


@dataclass
class History:
    world: World
    config: MarketConfig
    entries: Log
    snapshots: dict[int, bytes]
    """Engine snapshot after each log index."""
    ledger: Path
    """A ledger that applied every entry (copy it before changing it)."""

    def index_of(self, kind: str, nth: int = 0) -> int:
        """The log index of the entry committing the ``nth`` record of ``kind``."""
        found = [i for i, data in self.entries if f'"type":"{kind}"'.encode() in data]
        return found[nth]


def build_ledger(config: MarketConfig, entries: Log, path: Path) -> dict[int, bytes]:
    """Apply ``entries`` to a new ledger at ``path``; the engine snapshot after each index."""
    store = LedgerStore(f"sqlite:///{path}")
    try:
        replica = Replica(config, store)
        snapshots = {}
        for index, data in entries:
            replica.apply_entry(index, data)
            snapshots[index] = replica.snapshot()[1]
        return snapshots
    finally:
        store.close()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    world, commands = governance_commands()
    entries = as_log(commands, 3)
    path = tmp_path_factory.mktemp("history") / "full.db"
    snapshots = build_ledger(world.config, entries, path)
    return History(world, world.config, entries, snapshots, path)


@pytest.fixture
def ledger(history: History, tmp_path: Path) -> Path:
    """A copy of the full ledger to change."""
    target = tmp_path / "ledger.db"
    shutil.copy(history.ledger, target)
    return target


def genesis_of(config: MarketConfig) -> Genesis:
    """The grid's genesis as ``open_replica`` reads it (members register in the log)."""
    return Genesis(market=config, slot_seconds=900, gate_closure_lead_seconds=300, members=())


def raft_log(path: Path, history: History, snapshot_at: int | None = None) -> SQLStorage:
    """A Raft log holding ``history``'s entries, compacted into the engine snapshot at
    ``snapshot_at`` (None: not compacted)."""
    storage = SQLStorage(f"sqlite:///{path}")
    storage.append([Entry(i, 1, data) for i, data in history.entries])
    storage.set_hard_state(HardState(1, "", history.entries[-1][0]))
    if snapshot_at is not None:
        storage.create_snapshot(snapshot_at, ConfState(), history.snapshots[snapshot_at])
        storage.compact(snapshot_at)
    return storage


@pytest.fixture
def storage(history: History, tmp_path: Path) -> Iterator[SQLStorage]:
    s = raft_log(tmp_path / "raft.db", history)
    yield s
    s.close()


def start(history: History, ledger: Path, storage: SQLStorage) -> Replica:
    """Start a node's replica on ``ledger`` as the node does (:func:`open_replica`)."""
    store = LedgerStore(f"sqlite:///{ledger}")
    try:
        return open_replica(genesis_of(history.config), store, storage)
    finally:
        store.close()


def refused(history: History, ledger: Path, storage: SQLStorage) -> GovernanceHistoryMismatch:
    with pytest.raises(GovernanceHistoryMismatch) as info:
        start(history, ledger, storage)
    err = info.value
    message = str(err)
    assert "was made under a different governance history" in message, message
    assert f"at governance record {err.position} " in message
    assert "stop using this ledger: move it aside" in message and str(ledger) in message
    assert isinstance(err, ReplicaError) and exit_status(err) == 1
    return err


def sql(path: Path, statement: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(statement, params).fetchall()
    conn.close()
    return rows


def row_values(position: int, record: GovernanceRecord, log_index: int | None) -> list[object]:
    row = governance_row(position, record, log_index, 0)
    return [row[c] for c in ("type", "household", "from_slot", "record", "record_hash")]


# --- an agreeing history starts ------------------------------------------------------------------


@pytest.mark.parametrize("snapshot_at", [None, "mid", "end"])
def test_a_ledger_of_the_same_history_starts(
    history: History, ledger: Path, tmp_path: Path, snapshot_at: str | None
) -> None:
    last = history.entries[-1][0]
    at = {None: None, "mid": history.index_of("rotate_key"), "end": last}[snapshot_at]
    storage = raft_log(tmp_path / "raft.db", history, at)
    try:
        replica = start(history, ledger, storage)
    finally:
        storage.close()
    assert replica.applied_index == last
    assert len(replica.state.governance.records) == len(sql(ledger, "SELECT * FROM governance"))


def test_a_ledger_that_stopped_midway_starts_and_catches_up(
    history: History, tmp_path: Path, storage: SQLStorage
) -> None:
    """A crash after some records: the ledger holds the first ones, the log more."""
    stop = history.index_of("change_role")
    path = tmp_path / "partial.db"
    build_ledger(history.config, [e for e in history.entries if e[0] <= stop], path)
    store = LedgerStore(f"sqlite:///{path}")
    try:
        replica = open_replica(genesis_of(history.config), store, storage)
        assert replica.applied_index == stop
        for index, data in history.entries:
            replica.apply_entry(index, data)
    finally:
        store.close()
    assert sql(path, "SELECT * FROM governance") == sql(history.ledger, "SELECT * FROM governance")


def test_a_ledger_from_a_snapshot_install_starts_with_unknown_log_indexes(
    history: History, tmp_path: Path
) -> None:
    """Rows recorded from an installed snapshot have no log index: they agree with a Raft log
    compacted at that snapshot; a log index beyond it does not."""
    last = history.entries[-1][0]
    path = tmp_path / "installed.db"
    store = LedgerStore(f"sqlite:///{path}")
    try:
        replica = Replica(history.config, store)
        for index, data in history.entries[:2]:
            replica.apply_entry(index, data)
        replica.install_snapshot(last, history.snapshots[last])
    finally:
        store.close()
    # two rows from the applied entries, seven from the snapshot (log index unknown)
    assert sql(path, "SELECT COUNT(*) FROM governance WHERE log_index IS NULL") == [(7,)]
    assert sql(path, "SELECT COUNT(*) FROM governance") == [(9,)]
    storage = raft_log(tmp_path / "raft.db", history, last)
    try:
        assert start(history, path, storage).applied_index == last
        sql(path, "UPDATE governance SET log_index = ? WHERE position = 3", last + 1)
        err = refused(history, path, storage)
    finally:
        storage.close()
    assert err.position == 3 and "not within the snapshot" in err.reason
    assert err.ledger is not None and err.ledger.log_index == last + 1
    assert err.log is not None and err.log.log_index is None
    assert err.log.log_index_at_most == last
    assert f"log index <= {last} (from the snapshot)" in str(err)


# --- a ledger whose rows were changed is refused -------------------------------------------------


def test_a_deleted_governance_row_is_refused(
    history: History, ledger: Path, storage: SQLStorage
) -> None:
    sql(ledger, "DELETE FROM governance WHERE position = 4")
    err = refused(history, ledger, storage)
    assert (err.position, err.reason, err.ledger) == (4, "the ledger lacks this record", None)
    assert err.log is not None and err.log.kind == "rotate_key"
    assert err.log.log_index == history.index_of("rotate_key")
    assert err.log.household == history.world.homes["alice"].did
    assert err.log.from_slot == 5
    assert "ledger: none; log: rotate_key of did:key:" in str(err)


def test_the_last_governance_row_deleted_is_refused(
    history: History, ledger: Path, storage: SQLStorage
) -> None:
    sql(ledger, "DELETE FROM governance WHERE position = 9")
    err = refused(history, ledger, storage)
    assert err.position == 9 and err.ledger is None
    assert err.log is not None and err.log.kind == "remove_member"


def test_an_altered_from_slot_is_refused(
    history: History, ledger: Path, storage: SQLStorage
) -> None:
    sql(ledger, "UPDATE governance SET from_slot = 7 WHERE position = 5")
    err = refused(history, ledger, storage)
    assert err.position == 5 and err.reason == "the records differ (from_slot)"
    assert err.ledger is not None and err.log is not None
    assert (err.ledger.kind, err.ledger.from_slot) == ("change_role", 7)
    assert (err.log.kind, err.log.from_slot) == ("change_role", 6)
    assert err.ledger.log_index == err.log.log_index == history.index_of("change_role")


def test_an_operator_signed_but_other_record_is_refused(
    history: History, ledger: Path, storage: SQLStorage
) -> None:
    """A row rewritten consistently (record, hash and columns) with a record the operator
    signed, in force from another slot: the record hash tells it apart."""
    w = history.world
    (text,) = sql(ledger, "SELECT record FROM governance WHERE position = 5")[0]
    other = ChangeRole.model_validate_json(str(text))
    other = other.model_copy(update={"from_slot": 7}).signed_by(w.operator)
    sql(
        ledger,
        "UPDATE governance SET type = ?, household = ?, from_slot = ?, record = ?, "
        "record_hash = ? WHERE position = 5",
        *row_values(5, other, None),
    )
    err = refused(history, ledger, storage)
    assert err.position == 5 and err.reason.startswith("the records differ")
    assert err.ledger is not None and err.ledger.from_slot == 7


def test_a_record_text_changed_under_its_columns_is_refused(
    history: History, ledger: Path, storage: SQLStorage
) -> None:
    sql(ledger, "UPDATE governance SET record = record || ' ' WHERE position = 2")
    err = refused(history, ledger, storage)
    assert (err.position, err.reason) == (2, "the records differ (record)")


def test_a_record_at_another_log_index_is_refused(
    history: History, ledger: Path, storage: SQLStorage
) -> None:
    index = history.index_of("replace_meter")
    sql(ledger, "UPDATE governance SET log_index = ? WHERE position = 3", index - 1)
    err = refused(history, ledger, storage)
    assert (err.position, err.reason) == (3, "the record was committed at another log index")
    assert err.ledger is not None and err.log is not None
    assert (err.ledger.log_index, err.log.log_index) == (index - 1, index)


def test_another_withdrawn_count_is_refused(
    history: History, ledger: Path, storage: SQLStorage
) -> None:
    sql(ledger, "UPDATE governance SET withdrawn = withdrawn + 1 WHERE position = 2")
    err = refused(history, ledger, storage)
    assert err.position == 2 and "withdrew 2 orders, not 1" in err.reason


def test_an_added_governance_row_is_refused(
    history: History, ledger: Path, storage: SQLStorage
) -> None:
    """A record the operator signed but the grid never committed."""
    w = history.world
    extra = w.govern(ChangeRules, 50, retail_price=31)
    last = history.entries[-1][0]
    sql(
        ledger,
        "INSERT INTO governance (position, log_index, type, household, from_slot, record, "
        "record_hash, withdrawn) VALUES (10, ?, ?, ?, ?, ?, ?, 0)",
        last,
        *row_values(10, extra, last),
    )
    err = refused(history, ledger, storage)
    assert err.position == 10 and err.reason == "the ledger has a record the engine never accepted"
    assert err.log is None and err.ledger is not None
    assert (err.ledger.kind, err.ledger.from_slot, err.ledger.log_index) == (
        "change_rules",
        50,
        last,
    )
    assert "; log: none)" in str(err)


def test_hostile_row_values_are_refused_and_quoted_harmlessly(
    history: History, ledger: Path, storage: SQLStorage
) -> None:
    sql(
        ledger,
        "UPDATE governance SET household = ?, from_slot = 'soon', log_index = 'x' "
        "WHERE position = 1",
        "did:key:\x1b[31m" + "z" * 500,
    )
    err = refused(history, ledger, storage)
    assert err.position == 1 and err.reason == "the records differ (household)"
    assert err.ledger is not None and err.ledger.from_slot is None
    assert err.ledger.household is not None and len(err.ledger.household) <= 72
    assert "\x1b" not in str(err) and "from slot ?" in str(err)


# --- a ledger of another history of the same genesis ---------------------------------------------


def test_a_ledger_of_another_history_with_the_same_genesis_is_refused(
    history: History, tmp_path: Path, storage: SQLStorage
) -> None:
    """Another grid started from the same genesis committed one more rules change, for a slot
    far ahead, in the entry that admitted carol: every block is the same, so the ledger verifies
    and the head check passes; only the governance history tells the ledgers apart."""
    w = history.world
    far = w.govern(ChangeRules, 10_000, retail_price=31)
    index = history.index_of("add_member")
    k = next(i for i, (at, _) in enumerate(history.entries) if at == index)
    other = list(history.entries)
    other[k] = (index, encode_batch([*decode_batch(other[k][1]), far]))
    path = tmp_path / "other.db"
    build_ledger(history.config, other, path)
    assert sql(path, "SELECT hash FROM blocks") == sql(history.ledger, "SELECT hash FROM blocks")
    report = verify_ledger(f"sqlite:///{path}")
    assert report.ok, report.error
    err = refused(history, path, storage)
    ours = sql(history.ledger, "SELECT type, log_index FROM governance ORDER BY position")
    before = sum(1 for _, at in ours if at <= index)
    assert err.position == before + 1 and err.reason == "the records differ (type)"
    assert err.ledger is not None and err.log is not None
    assert (err.ledger.kind, err.ledger.from_slot, err.ledger.log_index) == (
        "change_rules",
        10_000,
        index,
    )
    assert (err.log.kind, err.log.log_index) == ours[before]


def test_a_snapshot_of_another_history_is_refused_before_it_is_installed(
    history: History, tmp_path: Path
) -> None:
    """A node whose ledger holds records the leader's snapshot lacks stops before recording
    the snapshot (at runtime, or on a restart after a crash between persisting the snapshot
    in the Raft log and recording it in the ledger)."""
    w = history.world
    stop = history.index_of("replace_meter")
    other = [e for e in history.entries if e[0] < stop]
    admit = w.govern(
        AddMember, 40, household=w.homes["alice-2"].did, meter_serial="M-x", role=MemberRole.LEARNER
    )
    other.append((stop, encode_batch([admit])))
    path = tmp_path / "behind.db"
    build_ledger(history.config, other, path)
    last = history.entries[-1][0]
    before = sql(path, "SELECT * FROM governance")
    store = LedgerStore(f"sqlite:///{path}")
    try:
        replica = Replica.recover(history.config, store, None, iter(other))
        with pytest.raises(GovernanceHistoryMismatch) as info:
            replica.install_snapshot(last, history.snapshots[last])
        assert replica.applied_index == stop  # nothing installed
    finally:
        store.close()
    assert info.value.position == 3 and info.value.reason == "the records differ (type)"
    assert info.value.log is not None and info.value.log.kind == "replace_meter"
    assert info.value.log.log_index_at_most == last
    assert sql(path, "SELECT * FROM governance") == before
    storage = raft_log(tmp_path / "raft.db", history, last)
    try:
        err = refused(history, path, storage)  # open_replica installs the stored snapshot
    finally:
        storage.close()
    assert err.position == 3


def test_following_the_advice_rebuilds_the_history(
    history: History, ledger: Path, tmp_path: Path, storage: SQLStorage
) -> None:
    """The refused ledger moved aside, the node starts on a new one beside the same Raft log
    and rebuilds the governance rows (and blocks) the grid committed."""
    sql(ledger, "UPDATE governance SET from_slot = 7 WHERE position = 5")
    refused(history, ledger, storage)
    fresh = tmp_path / "fresh.db"
    store = LedgerStore(f"sqlite:///{fresh}")
    try:
        replica = open_replica(genesis_of(history.config), store, storage)
        assert replica.applied_index == 0
        for entry in storage.entries(1, storage.last_index() + 1):
            replica.apply_entry(entry.index, entry.data)
    finally:
        store.close()
    for query in ("SELECT * FROM governance ORDER BY position", "SELECT hash FROM blocks"):
        assert sql(fresh, query) == sql(history.ledger, query)
    assert start(history, fresh, storage).applied_index == history.entries[-1][0]


# --- the operator sees one line and a non-zero exit ----------------------------------------------


def test_node_run_on_a_ledger_of_another_history_exits_with_the_message(tmp_path: Path) -> None:
    """``microgrid node run`` on a data directory whose ledger another history of the same
    genesis made: exit 1, ``error: ...`` naming the record and what to do, no traceback."""
    operator = Signer.from_seed(b"o" * 32)
    me = create_key_file(tmp_path / "node.key")
    market = MarketConfig(grid="g", operator=operator.did, feed_in_tariff=8, retail_price=30)
    genesis = create_genesis(operator, market, [(me.did, "SIM1", MemberRole.VOTER)])
    write_genesis(genesis, tmp_path / "genesis.json")
    (tmp_path / "microgrid.toml").write_text(
        'metrics_port = 0\napi_port = 0\n\n[[meters]]\nname = "main"\nprofile = "sdm630"\n'
        'endpoint = "tcp://127.0.0.1:1"\n'
    )

    def admit(name: str, nonce: int) -> bytes:
        record = AddMember(grid="g", operator=operator.did, from_slot=5, nonce=nonce,
                           household=Signer.from_seed(name.encode() * 32).did,
                           meter_serial=f"M-{name}", role=MemberRole.LEARNER)  # fmt: skip
        return encode_batch([record.signed_by(operator)])

    data = tmp_path / "data"
    data.mkdir()
    raft = SQLStorage(f"sqlite:///{data / 'raft.db'}")
    raft.append([Entry(1, 1, admit("c", 100))])
    raft.set_hard_state(HardState(1, "", 1))
    raft.close()
    store = LedgerStore(f"sqlite:///{data / 'ledger.db'}")
    replica = Replica(market, store, genesis=list(genesis.members))
    replica.apply_entry(1, admit("d", 100))
    store.close()

    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "node", "run", "--config",
         str(tmp_path / "microgrid.toml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("error: "))
    assert "was made under a different governance history" in line
    assert "at governance record 1 the records differ (household)" in line
    assert "add_member of did:key:" in line and "at log index 1" in line
    assert "stop using this ledger: move it aside" in line and str(data / "ledger.db") in line
