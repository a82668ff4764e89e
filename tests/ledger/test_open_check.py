"""Damage inside a SQLite ledger file is found when the node opens it (issue 16).

A zeroed page keeps the file size, so the torn-file check cannot see it. ``LedgerStore`` runs
``PRAGMA quick_check`` at open when the last stop was not clean (no clean-shutdown marker, or a
file changed since the marker was written) and a bounded tail check at every open; a clean file
opens without the full check. The ledgers here are filled with synthetic rows of the real
schema (:func:`fill_ledger`: per slot a block, and per household a reading, a settlement, an
order, a transaction with two postings, a trade per two households). The check times are
printed (run with ``-s``), not asserted.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from node.ledger.store import (
    LedgerCorruptError,
    LedgerStore,
    LedgerStoreError,
    clean_marker_path,
)

SIG = "ab" * 64


def _hash(height: int) -> str:
    return hashlib.sha256(str(height).encode()).hexdigest()


def fill_ledger(path: Path, blocks: int, households: int, batch: int = 2000) -> None:
    """Create the ledger schema at ``path`` (through LedgerStore) and add ``blocks`` blocks of
    synthetic rows for ``households`` households, with raw SQLite (fast)."""
    LedgerStore(f"sqlite:///{path}").close()
    dids = [f"did:key:z6Mk{'h' * 40}{i:04d}" for i in range(households)]
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    tx_id = posting_id = 0
    for start in range(1, blocks + 1, batch):
        rows: dict[str, list[tuple[object, ...]]] = {k: [] for k in (
            "blocks", "readings", "settlements", "orders", "trades", "transactions",
            "postings")}  # fmt: skip
        for h in range(start, min(blocks, start + batch - 1) + 1):
            slot = 1_000_000 + h
            rows["blocks"].append((h, slot, _hash(h), _hash(h - 1), _hash(-h), _hash(-h), _hash(-h),
                                   _hash(-h), households))  # fmt: skip
            for i, did in enumerate(dids):
                rows["readings"].append((slot, did, i, "demo", f"meter-{i}", 1000 * h + i, 10 * h,
                                         h, SIG))  # fmt: skip
                rows["settlements"].append((slot, did, 1, 500, 200, 100, 100, 50, 100, 100))
                rows["orders"].append((slot, f"o-{slot}-{i}", i, did, "buy" if i % 2 else "sell",
                                       300, 25, h, SIG))  # fmt: skip
                if i % 2:
                    rows["trades"].append((slot, i // 2, f"o-{slot}-{i}", f"o-{slot}-{i - 1}", did,
                                           dids[i - 1], 300, 25, 25))  # fmt: skip
                tx_id += 1
                rows["transactions"].append((tx_id, h, i, _hash(tx_id), "trade", slot, did))
                for pos, (account, amount) in enumerate(((f"household:{did}", -7500),
                                                         ("grid", 7500))):  # fmt: skip
                    posting_id += 1
                    rows["postings"].append((posting_id, tx_id, pos, account, "money", amount))
        db.executemany("INSERT INTO blocks (height, slot, hash, prev_hash, tx_root, trade_root, "
                       "reading_root, state_hash, tx_count) VALUES (?,?,?,?,?,?,?,?,?)",
                       rows["blocks"])  # fmt: skip
        db.executemany("INSERT INTO readings (slot, household, position, grid, meter_serial, "
                       "import_wh, export_wh, nonce, signature) VALUES (?,?,?,?,?,?,?,?,?)",
                       rows["readings"])  # fmt: skip
        db.executemany("INSERT INTO settlements (slot, household, measured, import_wh, export_wh, "
                       "sold_wh, bought_wh, imbalance_wh, delivered_wh, consumed_wh) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?)", rows["settlements"])  # fmt: skip
        db.executemany("INSERT INTO orders (slot, order_id, position, household, side, "
                       "quantity_wh, price, nonce, signature) VALUES (?,?,?,?,?,?,?,?,?)",
                       rows["orders"])  # fmt: skip
        db.executemany("INSERT INTO trades (slot, position, buy_id, sell_id, buyer, seller, "
                       "quantity_wh, price, sell_price) VALUES (?,?,?,?,?,?,?,?,?)",
                       rows["trades"])  # fmt: skip
        db.executemany("INSERT INTO transactions (id, block_height, position, txid, kind, slot, "
                       "ref) VALUES (?,?,?,?,?,?,?)", rows["transactions"])  # fmt: skip
        db.executemany("INSERT INTO postings (id, transaction_id, position, account, asset, "
                       "amount) VALUES (?,?,?,?,?,?)", rows["postings"])  # fmt: skip
        db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def zero_page(path: Path, page: int | None = None) -> int:
    """Overwrite one page (default: the middle one) with zeros, keeping the file size; returns
    the page number (1-based)."""
    with path.open("r+b") as f:
        header = f.read(100)
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65_536 if page_size == 1 else page_size
        pages = path.stat().st_size // page_size
        page = page or pages // 2
        f.seek((page - 1) * page_size)
        f.write(bytes(page_size))
    return page


def unclean_stop(store: LedgerStore) -> None:
    """What a killed node leaves: the connections gone, no clean-shutdown marker."""
    store.engine.dispose()


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    """A ledger of 400 slots for 10 households (a few MB), closed cleanly."""
    path = tmp_path / "ledger.db"
    fill_ledger(path, 400, 10)
    LedgerStore(f"sqlite:///{path}").close()  # full check (filled behind its back), then clean
    assert clean_marker_path(path).exists()
    return path


def test_a_page_zeroed_in_the_middle_after_an_unclean_stop_is_refused(ledger: Path) -> None:
    url = f"sqlite:///{ledger}"
    store = LedgerStore(url)
    assert store.open_check is not None and store.open_check.clean
    assert not clean_marker_path(ledger).exists()  # removed at open: a crash leaves none
    unclean_stop(store)
    size = ledger.stat().st_size
    page = zero_page(ledger)
    assert ledger.stat().st_size == size
    # the tail check alone does not see it (that is why quick_check runs after an unclean stop)
    LedgerStore(url, full_check=False).engine.dispose()
    started = time.perf_counter()
    with pytest.raises(LedgerCorruptError) as exc:
        LedgerStore(url)
    took = time.perf_counter() - started
    message = str(exc.value)
    print(f"\nzeroed page {page} of {size // 4096}: refused in {took * 1000:.1f} ms: {message}")
    assert isinstance(exc.value, LedgerStoreError)
    assert "\n" not in message and str(ledger) in message and "quick_check" in message
    assert "move the ledger aside" in message and "restart the node" in message
    assert exc.value.path == str(ledger)
    assert not clean_marker_path(ledger).exists()  # refused: still no marker, checked again


def test_a_clean_file_opens_without_the_full_check(ledger: Path) -> None:
    url = f"sqlite:///{ledger}"
    size_mb = ledger.stat().st_size / 1e6
    store = LedgerStore(url)
    check = store.open_check
    assert check is not None and check.clean and check.reason == "clean shutdown"
    assert check.quick_check_seconds is None
    store.close()
    unclean = LedgerStore(url)  # marker written by close: clean again
    unclean_stop(unclean)
    after_crash = LedgerStore(url)
    check2 = after_crash.open_check
    assert check2 is not None and not check2.clean
    assert check2.reason == "no clean-shutdown marker" and check2.quick_check_seconds is not None
    after_crash.close()
    print(f"\n{size_mb:.1f} MB ledger: clean open tail check {check.tail_seconds * 1000:.1f} ms; "
          f"after an unclean stop quick_check {check2.quick_check_seconds * 1000:.1f} ms "
          f"+ tail {check2.tail_seconds * 1000:.1f} ms")  # fmt: skip


def test_a_page_zeroed_while_stopped_after_a_clean_close_is_found(ledger: Path) -> None:
    """The marker records the file's size and mtime: a file written since is checked fully."""
    time.sleep(0.05)
    zero_page(ledger)
    with pytest.raises(LedgerCorruptError, match="changed since its clean shutdown"):
        LedgerStore(f"sqlite:///{ledger}")


def test_the_tail_check_runs_at_every_open(ledger: Path) -> None:
    """A broken hash link among the newest blocks is refused even without the full check."""
    db = sqlite3.connect(ledger)
    db.execute("UPDATE blocks SET prev_hash = ? WHERE height = 398", ("0" * 64,))
    db.commit()
    db.close()
    with pytest.raises(LedgerCorruptError, match=r"damaged inside: block 398 links to 0000"):
        LedgerStore(f"sqlite:///{ledger}", full_check=False)


@pytest.mark.parametrize("content", [b"", b"\xff" * 5000, b"[]", b'{"v": 1, "size": "x"}'])
def test_a_hostile_marker_means_unclean(ledger: Path, content: bytes) -> None:
    clean_marker_path(ledger).write_bytes(content)
    store = LedgerStore(f"sqlite:///{ledger}")
    assert store.open_check is not None and not store.open_check.clean
    assert store.open_check.quick_check_seconds is not None
    store.close()
