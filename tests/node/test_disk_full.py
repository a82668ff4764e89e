"""A node whose disk fills stops with one clear line and its own exit status, not a traceback
(node/cli/run.py); what SQLite raises when the file system is full is recognised."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from node.cli.run import DISK_FULL_EXIT, disk_full, disk_full_message


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=10)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


def test_a_full_file_system_is_recognised_in_both_spellings(small_disk: Path) -> None:
    engine = create_engine(f"sqlite:///{small_disk / 'ledger.db'}")
    with pytest.raises(OperationalError) as caught, engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x BLOB)"))
        for _ in range(1000):
            conn.execute(text("INSERT INTO t VALUES (randomblob(4096))"))
    engine.dispose()
    assert disk_full(caught.value) and disk_full(caught.value.orig)
    message = disk_full_message(caught.value, small_disk)
    assert str(small_disk) in message and "free space" in message
    assert not disk_full(sqlite3.OperationalError("database is locked"))
    assert not disk_full(ValueError("disk is full"))
    assert DISK_FULL_EXIT not in (0, 1, 2, 3)
