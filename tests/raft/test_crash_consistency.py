"""Crash consistency: SIGKILL a real child process mid-write, restart over the same files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.raft.storage_sql import SQLStorage
from node.testing.raft_simulation import RaftSimulation

ROOT = Path(__file__).resolve().parents[2]


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.raft.crash_child", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def _read_until(proc: subprocess.Popen[str], prefix: str, count: int, timeout: float) -> list[str]:
    assert proc.stdout is not None
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"child exited early: {err[-2000:]}")
        if line.startswith(prefix):
            got.append(line[len(prefix) :].strip())
    return got


def _kill(proc: subprocess.Popen[str], rng: random.Random) -> None:
    time.sleep(rng.random() * 0.05)  # land somewhere inside a write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_storage_killed_mid_write_recovers(tmp_path: Path, soak: bool) -> None:
    """Every batch the child reported committed is there after SIGKILL, nothing half-written
    is visible, and the child resumes over the same file."""
    rng = random.Random(4)
    confirmed = 0
    for _ in range(6 if soak else 3):
        proc = _spawn("writer", str(tmp_path))
        done = _read_until(proc, "DONE ", rng.randint(2, 8), 60)
        _kill(proc, rng)
        confirmed = max(confirmed, int(done[-1]))
        st = SQLStorage(f"sqlite:///{tmp_path / 'w'}.db")
        last = st.last_index()
        assert last >= confirmed and last % 64 == 0  # whole transactions only
        ents = st.entries(1, last + 1)
        assert [e.index for e in ents] == list(range(1, last + 1))
        assert all(e.data == b"%d" % e.index * 50 for e in ents)
        assert st.initial_state()[0].commit == last - 32
        st.close()


@pytest.mark.soak
def test_cluster_killed_mid_run_keeps_acknowledged_entries(tmp_path: Path, soak: bool) -> None:
    """A 3-node group on SQLite files in a child process is killed mid-run again and
    again; restarted over the same files it keeps every acknowledged command."""
    rng = random.Random(7)
    acked: list[str] = []
    for run in range(4 if soak else 2):
        proc = _spawn("cluster", str(tmp_path), str(run), str(run))
        acked += _read_until(proc, "ACK ", rng.randint(3, 15), 120)
        _kill(proc, rng)
    assert acked
    storages = {}

    def factory(nid: str) -> SQLStorage:
        storages[nid] = SQLStorage(f"sqlite:///{tmp_path / nid}.db")
        return storages[nid]

    sim = RaftSimulation(3, 99, storage_factory=factory)
    sim.wait_leader(400)
    sim.propose()
    sim.converge(400)
    for nid in sim.ids:
        applied = {d.decode() for d in sim.applied_commands(nid)}
        missing = [a for a in acked if a not in applied]
        assert not missing, f"{nid} lost acknowledged commands {missing[:5]}"
