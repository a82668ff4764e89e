"""Feeder checks in the ledger: the store writes them with the block, `ledger verify` recomputes
them, block sync and the archive carry them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from market import FeederStatus, SlotSettled, State, apply
from market.encoding import canonical_bytes
from node.daemon.replica import Replica
from node.ledger import LedgerStore, LedgerStoreError, chunk_export, verify_ledger
from node.ledger.chunk import BlockSyncError, decode_chunk
from node.ledger.chunk_export import export_blocks
from node.ledger.chunk_import import import_blocks
from node.tools import market_sim
from tests.conftest import needs_pg
from tests.ledger.feeder_grid import FEEDER_SERIAL, feeder_commands, feeder_log_entries
from tests.ledger.test_sync import TABLES, fill

FEEDER_TABLES = (*TABLES, "feeder_checks")
MISSING = frozenset({45})
"""The slot whose feeder reading never arrives."""


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def tamper(path: Path, sql: str) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute(sql).rowcount >= 1, sql


def run_feeder_grid(url: str, slots: int = 12, **kwargs: Any) -> tuple[State, list[SlotSettled]]:
    config, commands = feeder_commands(4, slots, 9, **kwargs)
    store = LedgerStore(url)
    store.init_genesis(config)
    state = State.initial(config)
    settled = []
    for index, command in enumerate(commands, start=1):
        state, events = apply(state, command)
        settled += [e for e in events if isinstance(e, SlotSettled)]
        store.record(events, applied_index=index)
    store.close()
    return state, settled


@pytest.fixture
def ledger(tmp_path: Path) -> tuple[Path, State, list[SlotSettled]]:
    path = tmp_path / "feeder.db"
    state, settled = run_feeder_grid(f"sqlite:///{path}", missing_feeder=MISSING)
    return path, state, settled


def test_each_block_has_its_feeder_row_and_the_ledger_verifies(ledger) -> None:
    path, state, settled = ledger
    report = verify_ledger(f"sqlite:///{path}")
    assert report.ok, report.error
    assert (
        (report.height, report.head_hash)
        == (state.height, state.head_hash)
        == (12, report.head_hash)
    )
    got = rows(path, "SELECT slot, block_height, status, meter_serial, import_wh, nonce, "
                     "feeder_net_wh, households_net_wh, difference_wh, allowed_loss_wh "
                     "FROM feeder_checks ORDER BY slot")  # fmt: skip
    assert [r[:2] for r in got] == [(40 + i, 1 + i) for i in range(12)]
    statuses = {r[0]: r[2] for r in got}
    # slot 40: no baseline; 45: no reading; 46: its baseline is of 44
    assert {s for s, st in statuses.items() if st == "no_feeder_reading"} == {40, 45, 46}
    assert {st for s, st in statuses.items() if s not in (40, 45, 46)} == {"ok"}
    by_slot = {r[0]: r for r in got}
    assert by_slot[45][3:] == (None,) * 7
    assert by_slot[46][3] == FEEDER_SERIAL and by_slot[46][5] == 46 * 4 + 2
    assert by_slot[46][6:] == (None,) * 4
    # the row is exactly the engine's check, and its hash is in the block header
    for ev in settled:
        check = ev.feeder
        assert check is not None and ev.block.feeder == check.hash
        row = by_slot[ev.slot]
        assert (row[2], row[6], row[7], row[8], row[9]) == (
            str(check.status),
            check.feeder_net_wh,
            check.households_net_wh,
            check.difference_wh,
            check.allowed_loss_wh,
        )


def test_mismatching_slots_verify_as_recorded(tmp_path: Path) -> None:
    """A mismatch is a finding, not a ledger fault: the block verifies with it."""
    path = tmp_path / "lossy.db"
    _, settled = run_feeder_grid(f"sqlite:///{path}", slots=6, loss_permille=200)
    assert {ev.feeder.status for ev in settled[1:]} == {FeederStatus.MISMATCH}
    report = verify_ledger(f"sqlite:///{path}")
    assert report.ok, report.error


@pytest.mark.parametrize(
    ("sql", "fault"),
    [
        ("DELETE FROM feeder_checks WHERE slot = 44", "feeder check row is missing"),
        ("UPDATE feeder_checks SET status = 'mismatch' WHERE slot = 43", "does not match"),
        ("UPDATE feeder_checks SET households_net_wh = households_net_wh + 1 WHERE slot = 43",
         "does not match"),
        ("UPDATE feeder_checks SET allowed_loss_wh = 10 WHERE slot = 43", "does not match"),
        ("UPDATE feeder_checks SET import_wh = import_wh + 1 WHERE slot = 43",
         "invalid operator signature"),
        ("UPDATE feeder_checks SET signature = substr(signature, 2) || '0' WHERE slot = 43",
         "invalid operator signature"),
        ("UPDATE feeder_checks SET nonce = NULL WHERE slot = 43", "partial feeder reading"),
        ("UPDATE feeder_checks SET status = 'fine' WHERE slot = 43", "status 'fine' is unknown"),
        # what the check is recomputed from: the settlements rows
        ("UPDATE settlements SET export_wh = export_wh + 500 WHERE slot = 43 AND export_wh > 0",
         "feeder check row does not match"),
        ("UPDATE settlements SET measured = 0 WHERE slot = 43 AND rowid = "
         "(SELECT min(rowid) FROM settlements WHERE slot = 43)", "feeder check row does not match"),
        # and the previous block's feeder reading (the baseline), re-signed rows aside
        ("DELETE FROM feeder_checks WHERE slot = 47", "feeder check row is missing"),
    ],
)  # fmt: skip
def test_a_tampered_or_deleted_feeder_row_fails_verify(ledger, sql: str, fault: str) -> None:
    path, _, _ = ledger
    tamper(path, sql)
    report = verify_ledger(f"sqlite:///{path}")
    assert not report.ok
    assert fault in report.error, report.error


def test_a_consistently_rewritten_feeder_row_breaks_the_block_hash(ledger) -> None:
    """Rewriting a check so that it recomputes (ok -> a missing reading) changes its hash."""
    path, _, _ = ledger
    tamper(path, "UPDATE feeder_checks SET status = 'no_feeder_reading', meter_serial = NULL, "
                 "import_wh = NULL, export_wh = NULL, nonce = NULL, signature = NULL, "
                 "feeder_net_wh = NULL, households_net_wh = NULL, difference_wh = NULL, "
                 "allowed_loss_wh = NULL WHERE slot = 51")  # fmt: skip
    report = verify_ledger(f"sqlite:///{path}")
    assert not report.ok
    assert "block 12 (slot 51): header fields do not hash" in report.error, report.error


def test_a_feeder_row_in_a_grid_without_feeder_fails_verify(tmp_path: Path) -> None:
    path = tmp_path / "plain.db"
    market_sim.run(households=3, slots=4, seed=2, db=f"sqlite:///{path}")
    assert rows(path, "SELECT count(*) FROM feeder_checks") == [(0,)]
    assert verify_ledger(f"sqlite:///{path}").ok
    tamper(path, "INSERT INTO feeder_checks (slot, block_height, status) VALUES (2, 3, 'ok')")
    report = verify_ledger(f"sqlite:///{path}")
    assert not report.ok and "grid without a feeder meter" in report.error


def test_the_feeder_row_is_written_in_the_blocks_transaction(tmp_path: Path) -> None:
    """If the feeder row cannot be written, neither is the block (nor anything else)."""
    url = f"sqlite:///{tmp_path / 'atomic.db'}"
    config, commands = feeder_commands(3, 3, 4)
    store = LedgerStore(url)
    store.init_genesis(config)
    state = State.initial(config)
    # a conflicting row for slot 41's check (pointing at a stray block) makes its insert fail
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO blocks (height, slot, hash, prev_hash, tx_root, trade_root, "
            "reading_root, state_hash, tx_count) VALUES (99, 999, 'h', 'p', 't', 'r', 'e', 's', 0)"
        )
        conn.exec_driver_sql(
            "INSERT INTO feeder_checks (slot, block_height, status) VALUES (41, 99, 'ok')"
        )
    failed = 0
    for index, command in enumerate(commands, start=1):
        state, events = apply(state, command)
        if any(isinstance(e, SlotSettled) and e.slot == 41 for e in events):
            with pytest.raises(LedgerStoreError):
                store.record(events, applied_index=index)
            failed = index
            break
        store.record(events, applied_index=index)
    assert failed
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT slot FROM blocks ORDER BY height").fetchall() == [
            (40,),
            (999,),
        ]
        assert (
            conn.exec_driver_sql("SELECT count(*) FROM settlements WHERE slot = 41").scalar() == 0
        )
    assert store.applied_index() == failed - 1
    store.close()


# --- block sync -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A full ledger of a feeder grid, and one that skipped blocks 4..~30 by a snapshot taken
    while a feeder reading was pending."""
    tmp = tmp_path_factory.mktemp("feeder-sync")
    config, entries = feeder_log_entries(3, 40, 3, missing_feeder=frozenset({55}))
    full = f"sqlite:///{tmp / 'full.db'}"
    store = LedgerStore(full)
    replica = Replica(config, store)
    snap_index = cut_index = None
    for index, data in entries:
        replica.apply_entry(index, data)
        st = replica.state
        mid = (st.closed_through or 0) > (st.settled_through or 0)
        if cut_index is None and st.height == 3 and mid:
            cut_index = index
        if snap_index is None and st.height >= 28 and mid and st.pending_feeder:
            snap_index, snapshot, snap_height = index, replica.snapshot()[1], st.height
    store.close()
    assert cut_index and snap_index
    gapped = f"sqlite:///{tmp / 'gapped.db'}"
    store = LedgerStore(gapped)
    replica = Replica(config, store)
    for index, data in entries[:cut_index]:
        replica.apply_entry(index, data)
    replica.install_snapshot(snap_index, snapshot)
    for index, data in entries[snap_index:]:
        replica.apply_entry(index, data)
    store.close()
    return {"full": full, "gapped": gapped, "tmp": tmp, "height": snap_height}


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    path = url.split(":///", 1)[1]
    with sqlite3.connect(path) as conn:
        return {
            "feeder_checks": sorted(conn.execute("SELECT * FROM feeder_checks")),
            "blocks": sorted(conn.execute("SELECT * FROM blocks")),
            "settlements": sorted(conn.execute("SELECT * FROM settlements")),
        }


def test_block_sync_carries_the_feeder_rows(
    synced: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunk_export, "MAX_CHUNK_BLOCKS", 10)  # several chunks, with links
    target = synced["tmp"] / "filled.db"
    target.write_bytes(Path(synced["gapped"].split(":///", 1)[1]).read_bytes())
    url = f"sqlite:///{target}"
    before = verify_ledger(url)
    last = synced["height"]
    assert not before.ok and before.missing == ((4, last),)
    heights = {r[1] for r in rows(target, "SELECT * FROM feeder_checks")}
    assert heights == set(range(1, 4)) | set(range(last + 1, 41))
    chunks: list[bytes] = []
    fill(synced["full"], url, chunks)
    chunk = decode_chunk(chunks[0])
    assert all(b.feeder is not None for b in chunk.blocks)
    assert len(chunks) == 3 and chunk.link and all(len(item) == 7 for item in chunk.link)
    assert dump(url) == dump(synced["full"])
    full, filled = verify_ledger(synced["full"]), verify_ledger(url)
    assert full.ok and filled.ok, (full.error, filled.error)
    assert (
        (filled.height, filled.head_hash) == (full.height, full.head_hash) == (40, full.head_hash)
    )
    statuses = [r[0] for r in rows(target, "SELECT status FROM feeder_checks ORDER BY slot")]
    assert statuses.count("ok") == 37 and statuses.count("no_feeder_reading") == 3


def reencode(data: bytes, change: Any) -> bytes:
    doc = json.loads(data.split(b"\n", 1)[1])
    change(doc)
    return canonical_bytes("blocksync", doc)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d["blocks"][1]["feeder"].update(households_net_wh=1), "bad_block"),
        (lambda d: d["blocks"][1]["feeder"].update(status="mismatch"), "bad_block"),
        (lambda d: d["blocks"][1]["feeder"].update(status="bogus"), "malformed"),
        (lambda d: d["blocks"][1].pop("feeder"), "bad_block"),
        (lambda d: d["blocks"][1]["feeder"].update(extra=1), "malformed"),
        (lambda d: d["link"][0].pop(), "bad_chain"),
        (lambda d: d["link"][0].__setitem__(6, "0" * 64), "bad_chain"),
    ],
)
def test_a_chunk_with_a_tampered_feeder_row_is_refused(
    synced: dict[str, Any], change: Any, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunk_export, "MAX_CHUNK_BLOCKS", 5)
    target = synced["tmp"] / f"refuse-{reason}.db"
    target.write_bytes(Path(synced["gapped"].split(":///", 1)[1]).read_bytes())
    url = f"sqlite:///{target}"
    src, dst = LedgerStore(synced["full"]), LedgerStore(url)
    try:
        data = export_blocks(src, 4, synced["height"])
        before = dump(url)
        bad = reencode(data, change)
        with pytest.raises(BlockSyncError) as info:
            import_blocks(dst, bad)
        assert info.value.reason == reason, info.value
        assert dump(url) == before
    finally:
        src.close()
        dst.close()


def test_a_chunk_without_feeder_objects_stays_as_before(tmp_path: Path) -> None:
    """A grid without a feeder meter exchanges exactly the chunks it did: no feeder keys."""
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    market_sim.run(households=3, slots=5, seed=2, db=url)
    store = LedgerStore(url)
    try:
        chunk = decode_chunk(export_blocks(store, 1, 5))
    finally:
        store.close()
    assert all(b.feeder is None for b in chunk.blocks)


# --- the archive --------------------------------------------------------------------------------


def archive_case(source: Path, target: str) -> None:
    from dashboard.archive import archive

    archive(f"sqlite:///{source}", target, chunk_blocks=5)
    report = verify_ledger(target)
    assert report.ok, report.error
    from sqlalchemy import create_engine, text

    engine = create_engine(target)
    try:
        with engine.connect() as conn:
            copied = sorted(tuple(r) for r in conn.execute(text("SELECT * FROM feeder_checks")))
    finally:
        engine.dispose()
    assert copied == sorted(rows(source, "SELECT * FROM feeder_checks"))
    assert len(copied) == 12


def test_the_archive_copies_the_feeder_rows(ledger, tmp_path: Path) -> None:
    path, _, _ = ledger
    archive_case(path, f"sqlite:///{tmp_path / 'archive.db'}")


@needs_pg
def test_the_postgres_archive_copies_the_feeder_rows(ledger, pg_url: str) -> None:
    path, _, _ = ledger
    archive_case(path, pg_url)
