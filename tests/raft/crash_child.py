"""Child process for the crash-consistency tests; the parent SIGKILLs it mid-write.

``python -m tests.raft.crash_child cluster DIR SEED RUN``: a 3-node simulated group on
SQLite files in DIR (reopened if they exist) proposes commands forever and prints
``ACK <command>`` once a command is applied by the leader that accepted it.

``python -m tests.raft.crash_child writer DIR``: appends 64-entry Readies to one
SQLStorage forever and prints ``DONE <last index>`` after each transaction commits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from node.raft import Entry, HardState, Ready
from node.raft.storage_sql import SQLStorage
from node.testing.raft_simulation import RaftSimulation


def cluster(d: Path, seed: int, run: int) -> None:
    """Run a simulated group over SQLite files until killed."""
    sim = RaftSimulation(3, seed, storage_factory=lambda nid: SQLStorage(f"sqlite:///{d / nid}.db"))
    sim.wait_leader(400)
    reported: set[bytes] = set()
    i = 0
    while True:
        i += 1
        sim.propose(data=b"r%d-c%d" % (run, i))
        sim.run(1)
        for data in sim.acked:
            if data not in reported:
                reported.add(data)
                print(f"ACK {data.decode()}", flush=True)


def writer(d: Path) -> None:
    """Append batches of entries to one storage until killed."""
    st = SQLStorage(f"sqlite:///{d / 'w'}.db")
    last = st.last_index()
    term = st.initial_state()[0].term + 1
    while True:
        ents = [Entry(last + k, term, b"%d" % (last + k) * 50) for k in range(1, 65)]
        last += 64
        st.save_ready(Ready(None, HardState(term, "w", last - 32), tuple(ents), None, (), ()))
        print(f"DONE {last}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "cluster":
        cluster(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        writer(Path(sys.argv[2]))
