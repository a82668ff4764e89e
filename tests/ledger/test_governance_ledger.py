"""The ledger holds the operator's governance history and verifies every block under the rules
and key rotations it put in force; block sync, snapshot installs and the archive carry it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from market import MemberRole
from market.models import ChangeRole, RotateKey
from market.state import State, config_at
from node.daemon.replica import Replica
from node.ledger import LedgerStore, verify_ledger
from node.ledger import chunk_export as chunk_export_module
from node.ledger.chunk import BlockSyncError, decode_chunk, encode_chunk
from node.ledger.chunk_export import export_blocks
from node.ledger.chunk_import import import_blocks
from node.ledger.gaps import missing_ranges
from node.ledger.governance import decode_record, governance_row
from node.ledger.queries import governance_history, rules_history
from node.ledger.snapshot_record import record_snapshot
from node.ledger.statement import household_statement
from node.ledger.store import make_engine
from node.tools import market_sim
from tests.conftest import needs_pg
from tests.ledger.governance_grid import RECORD_TYPES, SLOTS, governance_log
from tests.market.world import World, signer

GOVERNANCE_COLUMNS = (
    "position, log_index, type, household, from_slot, record, record_hash, withdrawn"
)


@dataclass
class Grid:
    world: World
    path: Path
    state: State
    entries: list[tuple[int, bytes]]
    snapshots: dict[int, tuple[int, bytes]]
    """Engine snapshot (log index, bytes) after the entry that reached each height."""

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Grid:
    world, config, entries = governance_log()
    path = tmp_path_factory.mktemp("gov") / "full.db"
    store = LedgerStore(f"sqlite:///{path}")
    replica = Replica(config, store)
    snapshots: dict[int, tuple[int, bytes]] = {}
    for index, data in entries:
        replica.apply_entry(index, data)
        snapshots.setdefault(replica.state.height, replica.snapshot())
    store.close()
    return Grid(world, path, replica.state, entries, snapshots)


@pytest.fixture
def copy(grid: Grid, tmp_path: Path) -> Path:
    """A copy of the full ledger to tamper with."""
    target = tmp_path / "copy.db"
    shutil.copy(grid.path, target)
    return target


def rows(path: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, params).fetchall()


def execute(path: Path, sql: str, *params: object) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA foreign_keys=OFF")
        assert conn.execute(sql, params).rowcount >= 1, sql


def failure(path: Path) -> str:
    report = verify_ledger(f"sqlite:///{path}")
    assert not report.ok
    assert report.error is not None
    return report.error


def replace_record(path: Path, position: int, change: Callable[[Any], Any]) -> None:
    """Rewrite governance row ``position`` consistently (record text, hash and columns) with
    ``change(record)``: only what the record says can then be wrong."""
    ((text, log_index, withdrawn),) = rows(
        path, "SELECT record, log_index, withdrawn FROM governance WHERE position = ?", position
    )
    row = governance_row(position, change(decode_record(text)), log_index, withdrawn)
    execute(
        path,
        "UPDATE governance SET type = ?, household = ?, from_slot = ?, record = ?, "
        "record_hash = ? WHERE position = ?",
        row["type"], row["household"], row["from_slot"], row["record"], row["record_hash"],
        position,
    )  # fmt: skip


# --- what the store writes -----------------------------------------------------------------------


def test_the_ledger_holds_the_records_and_verifies_under_the_rules_of_each_slot(grid: Grid):
    report = verify_ledger(grid.url)
    assert report.ok, report.error
    assert report.height == SLOTS and report.head_hash == grid.state.head_hash
    assert report.governance_records == len(RECORD_TYPES)
    assert report.conservation == "ok"  # across the key rotation and the meter swap
    assert len(report.households) == 4  # alice under her new key, bob, carol, the voter

    stored = rows(grid.path, f"SELECT {GOVERNANCE_COLUMNS} FROM governance ORDER BY position")
    records = grid.state.governance.records
    assert [r[2] for r in stored] == RECORD_TYPES == [r.type for r in records]
    for row, record in zip(stored, records, strict=True):
        position, log_index = row[0], row[1]
        assert row[:-1] == tuple(governance_row(position, record, log_index, 0).values())[:-1]
        assert log_index is not None and 1 <= log_index <= len(grid.entries)
    withdrawn = {r[2]: r[7] for r in stored if r[7]}
    assert withdrawn == {"change_rules": 1}  # bob's bid at 31 left slot 3's book
    assert rows(grid.path, "SELECT COUNT(*) FROM orders WHERE price = 31") == [(0,)]

    rules = dict(rows(grid.path, "SELECT slot, rules FROM blocks"))
    for slot in range(1, SLOTS + 1):
        expected = None if slot < 3 else config_at(grid.state, slot).rules_hash()
        assert rules[slot] == expected, slot
    assert rules[3] != rules[7]


def test_the_queries_give_the_history_and_the_rules_in_force(grid: Grid) -> None:
    engine = make_engine(grid.url, read_only=True)
    try:
        with engine.connect() as conn:
            history = governance_history(conn)
            periods = rules_history(conn)
    finally:
        engine.dispose()
    assert [h.type for h in history] == RECORD_TYPES
    assert [h.position for h in history] == list(range(1, len(RECORD_TYPES) + 1))
    added, rules = history[0], history[1]
    assert added.household == signer("carol").did and added.from_slot == 3
    assert added.fields == {"meter_serial": "M-carol", "role": "learner", "max_power_w": 50_000}
    assert rules.household is None and rules.withdrawn == 1
    assert rules.fields["retail_price"] == 30 and rules.fields["mechanism"] == "pay_as_bid"
    rotation = history[3]
    assert rotation.fields["new_household"] == signer("alice-2").did
    assert rotation.record["signature"] and rotation.fields["household_signature"]

    genesis = grid.state.config
    assert [slot for slot, _ in periods] == [0, 3, 7]
    assert periods[0][1] == genesis.to_json()
    assert periods[1][1] == config_at(grid.state, 3).to_json()
    assert periods[2][1]["time_of_use"] == [[0, 8, 30], [120, 6, 35]]
    assert periods[2][1]["mechanism"] == "pay_as_bid"  # earlier changes stay in force


def test_added_and_rotated_members_get_their_households_row(grid: Grid) -> None:
    got = {did: (serial, role) for did, serial, role in
           rows(grid.path, "SELECT did, meter_serial, role FROM households")}  # fmt: skip
    assert got[signer("carol").did] == ("M-carol", "learner")
    assert got[signer("alice-2").did] == ("M-alice", "learner")
    assert got[signer("bob").did] == ("M-bob-2", "voter")  # the latest scheduled terms
    slots = dict(rows(grid.path, "SELECT did, slots FROM households"))
    assert slots[signer("carol").did] > 0  # its reputation is recorded


# --- verify catches what is altered --------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "fault"),
    [
        ("UPDATE governance SET record = replace(record, '\"from_slot\":5', '\"from_slot\":6') "
         "WHERE position = 4", "governance record 4 (rotate_key from slot 5): not signed by"),
        ("UPDATE governance SET from_slot = 5 WHERE position = 3",
         "governance record 3 (replace_meter from slot 5): its from_slot column"),
        ("UPDATE governance SET record_hash = '" + "ab" * 32 + "' WHERE position = 1",
         "its record_hash column is not what its signed record says"),
        ("UPDATE governance SET type = 'remove_member' WHERE position = 6", "its type column"),
        ("UPDATE governance SET record = '{\"type\":\"close_gate\",\"slot\":1}' "
         "WHERE position = 5", "does not decode: a close_gate command is not a governance"),
        ("DELETE FROM governance WHERE position = 2",
         "governance records jump from 1 to 3: a record was deleted"),
        ("UPDATE blocks SET rules = NULL WHERE height = 3",
         "block 3 (slot 3): its rules column is the genesis rules (NULL), but the rules in "
         "force for slot 3"),
        ("UPDATE blocks SET rules = (SELECT rules FROM blocks WHERE height = 3) WHERE height = 8",
         "block 8 (slot 8): its rules column is"),
        ("UPDATE blocks SET rules = '" + "cd" * 32 + "' WHERE height = 1",
         "block 1 (slot 1): its rules column is cdcdcdcdcdcdcdcd…, but"),
    ],
)  # fmt: skip
def test_a_tampered_governance_row_or_rules_column_fails_verify(
    copy: Path, sql: str, fault: str
) -> None:
    execute(copy, sql)
    assert fault in failure(copy)


def test_grid_fees_are_posted_from_their_slot_and_verified(grid: Grid, copy: Path) -> None:
    fees = rows(
        grid.path,
        "SELECT t.slot, t.kind, t.ref, p.account, p.amount FROM transactions t "
        "JOIN postings p ON p.transaction_id = t.id WHERE t.kind IN ('local_fee', 'grid_fee')",
    )
    assert fees and min(slot for slot, *_ in fees) == 3
    assert {kind for _, kind, *_ in fees} == {"local_fee", "grid_fee"}
    to_network = sum(amount for *_, account, amount in fees if account == "network")
    assert to_network > 0
    assert rows(grid.path, "SELECT amount FROM balances WHERE account = 'network'") == [
        (to_network,)
    ]
    # a buyer's settlements row altered: its local fee no longer follows from it
    settled = rows(
        grid.path,
        "SELECT household, bought_wh, imbalance_wh FROM settlements WHERE slot = 4 "
        "AND bought_wh > 0",
    )
    (household, bought, _) = settled[0]
    execute(
        copy, "UPDATE settlements SET bought_wh = ? WHERE slot = 4 AND household = ?",
        bought + 1000, household,
    )  # fmt: skip
    assert f"block 4 (slot 4): the local_fee of {household}" in failure(copy)


def test_statements_price_each_slot_under_its_rules_and_show_the_fees(grid: Grid) -> None:
    """The voter never trades: under three sets of rules (genesis, retail 30 with fees, then
    time-of-use) its grid-only bill is its bill, to the minor unit. Carol buys locally: her
    fee lines are her fee postings, and every statement reconciles with the balances."""
    engine = make_engine(grid.url)
    try:
        with engine.connect() as conn:
            voter = household_statement(conn, signer("voter").did, 1, SLOTS)
            carol = household_statement(conn, signer("carol").did, 1, SLOTS)
            fee_postings = dict(
                conn.exec_driver_sql(
                    "SELECT t.kind, -SUM(p.amount) FROM transactions t JOIN postings p "
                    "ON p.transaction_id = t.id WHERE p.account = ? AND t.kind LIKE '%_fee' "
                    "GROUP BY t.kind",
                    (f"household:{signer('carol').did}",),
                ).all()
            )
    finally:
        engine.dispose()
    assert voter.rules_changed_at == (3, 7)
    assert voter.total("grid_fees") > 0 and voter.total("local_fees") == 0
    assert voter.savings == 0 and voter.net_bill == voter.grid_only_bill > 0
    assert carol.total("local_fees") == fee_postings["local_fee"] > 0
    assert carol.total("grid_fees") == fee_postings.get("grid_fee", 0)
    assert (carol.local_fee, carol.grid_fee) == (0, 0)  # the genesis rules hold at slot 1
    for statement, name in ((voter, "voter"), (carol, "carol")):
        balance = grid.state.balances.get((f"household:{signer(name).did}", "money"), 0)
        assert statement.money_change == balance


def test_a_forged_countersignature_fails_verify(copy: Path) -> None:
    replace_record(copy, 4, lambda r: r.model_copy(update={"household_signature": "00" * 64}))
    assert "governance record 4 (rotate_key from slot 5): the old key's countersignature" in (
        failure(copy)
    )


def test_an_operator_signed_but_other_rules_change_fails_on_the_blocks(
    grid: Grid, copy: Path
) -> None:
    """A record the operator did sign, but not the one the grid applied: the signature holds,
    the blocks' rules hashes do not."""
    op = grid.world.operator
    replace_record(copy, 2, lambda r: r.model_copy(update={"retail_price": 31}).signed_by(op))
    assert "block 3 (slot 3): its rules column is" in failure(copy)


def test_a_key_rotation_must_be_the_accepted_records(grid: Grid, copy: Path) -> None:
    op, other = grid.world.operator, signer("mallory").did
    replace_record(
        copy,
        4,
        lambda r: RotateKey(**{**r.model_dump(), "new_household": other,
                               "household_signature": ""}).signed_by(op),
    )  # fmt: skip
    error = failure(copy)
    assert "block 5 (slot 5): key_rotation transaction" in error
    assert f"the rotate_key record in force from this slot is {signer('alice').did}>{other}" in (
        error
    )


def test_a_key_rotation_without_its_record_fails_verify(grid: Grid, copy: Path) -> None:
    op = grid.world.operator
    replace_record(
        copy,
        4,
        lambda r: ChangeRole(grid=r.grid, operator=r.operator, nonce=r.nonce,
                             from_slot=r.from_slot, household=r.household,
                             role=MemberRole.VOTER).signed_by(op),
    )  # fmt: skip
    assert "block 5 (slot 5): key_rotation transaction" in failure(copy)
    assert "has no rotate_key record in force from this slot" in failure(copy)


def test_a_key_rotation_moving_other_balances_fails_verify(grid: Grid, copy: Path) -> None:
    """The rotation's postings pointed at another account (and every hash recomputed would
    still not help: the transaction must move exactly the old key's balances)."""
    old = f"household:{signer('alice').did}"
    execute(
        copy,
        "UPDATE postings SET account = ? WHERE account = ? AND transaction_id = "
        "(SELECT id FROM transactions WHERE kind = 'key_rotation')",
        f"household:{signer('bob').did}",
        old,
    )
    assert "block 5 (slot 5): transaction 0 (key_rotation" in failure(copy)


# --- block sync and snapshot installs ------------------------------------------------------------


def synced(grid: Grid, tmp: Path, k_height: int, max_blocks: int) -> tuple[str, list[bytes]]:
    """A ledger that applied the log up to height ``k_height`` (0: nothing), installed the
    final engine state as a snapshot, and filled the gap from the full ledger in chunks of at
    most ``max_blocks`` blocks; the chunks."""
    url = f"sqlite:///{tmp / f'synced-{k_height}.db'}"
    store = LedgerStore(url)
    replica = Replica(grid.state.config, store)
    if k_height:
        stop = grid.snapshots[k_height + 1][0]  # the entry that settled the next block
        for index, data in grid.entries:
            if index >= stop:
                break
            replica.apply_entry(index, data)
    replica.install_snapshot(*grid.snapshots[SLOTS])
    assert missing_ranges(store) == [(k_height + 1, SLOTS)]
    pending = verify_ledger(url)
    assert not pending.ok and "missing" in (pending.error or "")
    chunks = []
    source = LedgerStore(grid.url)
    try:
        while gaps := missing_ranges(store):
            chunks.append(export_blocks(source, *gaps[0]))
            import_blocks(store, chunks[-1])
            assert len(chunks) < 20
    finally:
        source.close()
        store.close()
    return url, chunks


@pytest.mark.parametrize(("k_height", "max_blocks"), [(0, 50), (0, 3), (4, 50), (4, 2)])
def test_a_snapshot_and_block_sync_reproduce_the_governance_rows_and_rules(
    grid: Grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k_height: int, max_blocks: int
) -> None:
    monkeypatch.setattr(chunk_export_module, "MAX_CHUNK_BLOCKS", max_blocks)
    url, chunks = synced(grid, tmp_path, k_height, max_blocks)
    path = Path(url.split(":///", 1)[1])
    for sql in (
        f"SELECT {GOVERNANCE_COLUMNS} FROM governance ORDER BY position",
        "SELECT height, slot, hash, rules FROM blocks ORDER BY height",
        "SELECT did, meter_serial, role FROM households ORDER BY did",
    ):
        assert rows(path, sql) == rows(grid.path, sql), sql
    report = verify_ledger(url)
    assert report.ok, report.error
    assert report.head_hash == grid.state.head_hash and report.conservation == "ok"
    decoded = [decode_chunk(c) for c in chunks]
    assert {b.slot: b.rules for c in decoded for b in c.blocks} == dict(
        rows(grid.path, "SELECT slot, rules FROM blocks WHERE height > ?", k_height)
    )
    assert any(c.governance for c in decoded)
    if max_blocks < SLOTS - k_height:  # link headers of blocks under changed rules
        assert any(len(item) == 8 for c in decoded for item in c.link)


def test_block_sync_refuses_a_chunk_with_an_altered_rules_hash_or_record(
    grid: Grid, tmp_path: Path
) -> None:
    store = LedgerStore(f"sqlite:///{tmp_path / 'target.db'}")
    try:
        store.init_genesis(grid.state.config)
        record_snapshot(store, grid.state, applied_index=10_000)
        with LedgerStore(grid.url) as source:
            data = export_blocks(source, 1, SLOTS)
        doc = json.loads(data.split(b"\n", 1)[1])

        def with_change(change: Callable[[dict[str, Any]], None]) -> bytes:
            altered = json.loads(json.dumps(doc))
            change(altered)
            return encode_chunk(altered)

        def rules(d: dict[str, Any]) -> None:
            d["blocks"][4]["rules"] = d["blocks"][2]["rules"][::-1]

        def dropped_rules(d: dict[str, Any]) -> None:
            del d["blocks"][4]["rules"]

        def record(d: dict[str, Any]) -> None:
            d["governance"][0]["record"] = d["governance"][1]["record"]

        for change, reason, says in (
            (rules, "bad_block", "block 5 (slot 5): header fields do not hash"),
            (dropped_rules, "bad_block", "block 5 (slot 5): header fields do not hash"),
            (record, "bad_block", "governance record 1 of the chunk differs"),
        ):
            with pytest.raises(BlockSyncError) as caught:
                import_blocks(store, with_change(change))
            assert caught.value.reason == reason and says in str(caught.value)
        assert missing_ranges(store) == [(1, SLOTS)]  # nothing changed
        assert import_blocks(store, data) == []
    finally:
        store.close()
    assert verify_ledger(store.url).ok


def test_a_null_rules_or_empty_governance_is_not_canonical(grid: Grid) -> None:
    with LedgerStore(grid.url) as source:
        data = export_blocks(source, 1, SLOTS)
    doc = json.loads(data.split(b"\n", 1)[1])
    doc["blocks"][0]["rules"] = None
    with pytest.raises(BlockSyncError, match=r"chunk.blocks\[0\].rules: must be left out"):
        decode_chunk(encode_chunk(doc))
    del doc["blocks"][0]["rules"]
    doc["governance"] = []
    with pytest.raises(BlockSyncError, match=r"chunk\.governance: must be left out"):
        decode_chunk(encode_chunk(doc))


# --- older ledgers and the archive ---------------------------------------------------------------


def test_a_ledger_of_an_older_node_opens_and_works(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    state = market_sim.run(households=3, slots=6, seed=11, db=url)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE governance")
        conn.execute("ALTER TABLE blocks DROP COLUMN rules")
    report = verify_ledger(url)  # read-only: neither table nor column
    assert report.ok, report.error
    assert report.head_hash == state.head_hash and report.governance_records == 0
    engine = make_engine(url, read_only=True)
    try:
        with engine.connect() as conn:
            assert governance_history(conn) == []
            assert rules_history(conn) == [(0, state.config.to_json())]
    finally:
        engine.dispose()
    with LedgerStore(url) as store:  # a node opening it adds them
        chunk = export_blocks(store, 1, 6)
    assert "rules" in {r[1] for r in rows(path, "PRAGMA table_info(blocks)")}
    assert rows(path, "SELECT COUNT(*) FROM governance") == [(0,)]
    assert rows(path, "SELECT COUNT(*) FROM blocks WHERE rules IS NULL") == [(6,)]
    assert b'"rules"' not in chunk and b'"governance"' not in chunk
    assert verify_ledger(url).ok
    LedgerStore(url).close()  # idempotent


def archive_case(grid: Grid, target: str) -> None:
    from sqlalchemy import text

    from dashboard.archive import archive

    archive(grid.url, target, chunk_blocks=3)
    report = verify_ledger(target)
    assert report.ok and report.governance_records == len(RECORD_TYPES), report.error
    engine = make_engine(target)
    try:
        with engine.connect() as conn:
            for sql in (
                f"SELECT {GOVERNANCE_COLUMNS} FROM governance ORDER BY position",
                "SELECT height, rules FROM blocks ORDER BY height",
            ):
                copied = [tuple(r) for r in conn.execute(text(sql))]
                assert copied == rows(grid.path, sql)
    finally:
        engine.dispose()


def test_the_archive_copies_the_governance_rows(grid: Grid, tmp_path: Path) -> None:
    archive_case(grid, f"sqlite:///{tmp_path / 'archive.db'}")


@needs_pg
def test_the_postgres_archive_gets_the_column_and_the_governance_rows(
    grid: Grid, pg_url: str
) -> None:
    """An archive made before the ``rules`` column: the next run adds it, then copies on."""
    from sqlalchemy import text

    from node.ledger import schema as t

    engine = make_engine(pg_url)
    try:
        t.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE blocks DROP COLUMN rules"))
    finally:
        engine.dispose()
    archive_case(grid, pg_url)
