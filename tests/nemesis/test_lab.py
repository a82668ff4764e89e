"""The nemesis's environment faults, on their own (node/testing/nemesis.py): fast, real.

:class:`NetLab` makes one network namespace per household on a bridge: TCP flows between them
and from the root namespace; a ``cut`` stops it both ways, a 100 % ``lose`` one way, ``clear``
restores it; ``teardown`` leaves no namespace, veth or bridge behind. :class:`DiskLab` mounts a
small tmpfs, fills it to ENOSPC and frees it; unmounting keeps the files. :func:`tear` cuts a
SQLite file's last page or WAL frame. Where this machine cannot (not root, no ``ip``/``nft``),
the lab tests skip with the reason, as the runner does. :class:`InjectorLab` (the fallback
without namespaces) writes each household's libp2p faults file: a partition in both sides' files,
a loss in the receiving end's, merged while faults overlap, emptied on healing.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.net.faults import FAULTS_FILE_ENV, NO_FAULTS, FaultRules, FaultsFile
from node.setup.keyfile import NodeIdentity
from node.testing.nemesis import (
    BALLAST,
    DiskLab,
    InjectorLab,
    Kind,
    LabUnavailable,
    NemesisError,
    NetLab,
    make_plan,
    run_plan,
    tear,
)
from node.tools.demo import DemoHousehold

PROBE = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    socket.create_connection((host, port), timeout=1.5).close()
    print("ok")
except OSError as exc:
    print(type(exc).__name__)
"""

LISTENER = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("HOST", 7000))
s.listen(8)
print("up", flush=True)
s.settimeout(0.2)
end = time.time() + 30
while time.time() < end:
    try:
        s.accept()[0].close()
    except OSError:
        pass
"""


@pytest.fixture
def lab() -> Iterator[NetLab]:
    net = NetLab(3)
    try:
        net.setup()
    except LabUnavailable as exc:
        pytest.skip(f"no network namespaces here: {exc}")
    try:
        yield net
    finally:
        assert net.teardown() == []


def _listen(net: NetLab, i: int) -> subprocess.Popen[str]:
    """A one-second TCP listener in household ``i``'s namespace (port 7000), printing 'up'."""
    code = LISTENER.replace("HOST", net.host(i))
    proc = subprocess.Popen([*net.prefix(i), sys.executable, "-c", code],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    return proc


def _probe(net: NetLab, frm: int | None, to: int) -> str:
    prefix = [] if frm is None else list(net.prefix(frm))
    done = subprocess.run([*prefix, sys.executable, "-c", PROBE, net.host(to), "7000"],
                          capture_output=True, text=True, timeout=10)  # fmt: skip
    return done.stdout.strip()


def test_namespaces_cut_lose_clear_and_leave_nothing_behind(lab: NetLab) -> None:
    servers = [_listen(lab, i) for i in range(3)]
    try:
        assert [_probe(lab, 0, 1), _probe(lab, 1, 2), _probe(lab, None, 0)] == ["ok"] * 3
        # h1 cut off: neither way, while h2 <-> h3 and the runner (root namespace) still work
        lab.cut([0])
        assert _probe(lab, 0, 1) == "TimeoutError"
        assert _probe(lab, 1, 0) == "TimeoutError"
        assert _probe(lab, 1, 2) == "ok" and _probe(lab, None, 0) == "ok"
        lab.clear(0)
        assert _probe(lab, 1, 0) == "ok"
        # one-way 100 % loss h2 -> h3: h2's SYNs are dropped; h3's SYN-ACKs to h2 as well
        lab.lose(1, 2, 100)
        assert f"ip daddr {lab.host(2)} drop" in lab.rules(1)
        assert _probe(lab, 1, 2) == "TimeoutError"
        assert _probe(lab, 0, 2) == "ok"
        lab.clear(1)
        assert _probe(lab, 1, 2) == "ok"
        lab.lose(1, 2, 30)
        assert "numgen random mod 100 < 30 drop" in lab.rules(1)
        lab.clear(1)
        assert "drop" not in lab.rules(1)
    finally:
        for s in servers:
            s.kill()
            s.wait()
    names = [lab.namespace(i) for i in range(3)]
    bridge = lab.bridge
    assert lab.teardown() == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in netns for n in names)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert bridge not in links and f"nem{lab.tag}v" not in links


def test_a_second_lab_picks_another_subnet_and_stale_labs_are_removed(lab: NetLab) -> None:
    assert lab.subnet is not None
    other = NetLab(1)
    other.tag = lab.tag + "0"  # another name: as if a second run of another process
    try:
        other.setup()
        assert other.subnet != lab.subnet
    finally:
        assert other.teardown() == []
    # a namespace whose creator is gone (pid 0x7ffffffe: none) is removed by the next setup
    stale = "nem7ffffffe-h1"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    assert stale in NetLab.remove_stale()
    assert stale not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                       text=True).stdout  # fmt: skip


def test_a_full_tmpfs_fills_frees_and_keeps_its_files(tmp_path: Path) -> None:
    disks = DiskLab()
    data = tmp_path / "h1" / "data"
    try:
        disks.mount(data, mib=2)
    except LabUnavailable as exc:
        pytest.skip(f"no tmpfs mount here: {exc}")
    try:
        (data / "ledger.db").write_bytes(b"x" * 1000)
        written = DiskLab.fill(data)
        assert 1 << 20 < written <= 2 << 20
        with pytest.raises(OSError, match="No space left"):
            (data / "more").write_bytes(b"y" * 8192)
        DiskLab.free(data)
        assert not (data / BALLAST).exists()
        (data / "more").write_bytes(b"y" * 8192)
    finally:
        assert disks.unmount_all() == []
    # unmounted: the files were copied to the disk underneath
    assert (data / "ledger.db").read_bytes() == b"x" * 1000
    assert (data / "more").stat().st_size == 8192
    mounts = Path("/proc/mounts").read_text()
    assert str(data) not in mounts


def test_tear_cuts_a_page_or_a_wal_frame(tmp_path: Path) -> None:
    db = tmp_path / "raft.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (x BLOB)")
    for _ in range(5):
        conn.execute("INSERT INTO t VALUES (?)", (b"z" * 3000,))
        conn.commit()
    wal = tmp_path / "raft.db-wal"
    size = wal.stat().st_size
    assert size > 5 * 4096
    assert "last frame" in tear(tmp_path, "raft.db-wal", 0)
    assert wal.stat().st_size == size - (24 + 4096)
    conn.close()
    # the main file is checkpointed first: its last page then holds rows no WAL frame covers
    done = tear(tmp_path, "raft.db", 0)
    assert "after a WAL checkpoint" in done and done.endswith(" -> 20480 bytes)"), done
    conn = sqlite3.connect(db)
    try:  # the rows of the cut page are gone (zeros): SQLite calls the file malformed
        checked = conn.execute("PRAGMA integrity_check").fetchall()
        assert checked != [("ok",)], checked
    except sqlite3.DatabaseError as exc:
        assert "malformed" in str(exc)
    conn.close()
    assert "absent" in tear(tmp_path, "ledger.db", 0)
    # the torn WAL lost its last transaction only: SQLite ignores a frame without its commit
    db.write_bytes(b"")
    assert tear(tmp_path, "raft.db", 0).endswith("nothing torn")


def test_loopback_is_still_the_demo_default() -> None:
    # a grid without a lab listens on 127.0.0.1 as before (other tests rely on it)
    from node.tools.demo import DemoHousehold, DemoSettings

    h = DemoHousehold(0, "h1", Path("/nonexistent"), "did", "peer", 1, 4001, 8401)
    assert h.api == "http://127.0.0.1:8401" and h.prefix == ()
    s = DemoSettings()
    assert (s.hosts, s.sim_host, s.node_prefixes) == ((), "127.0.0.1", ())
    with socket.socket() as sock:  # and 127.0.0.1 is what the default API URL reaches
        sock.bind(("127.0.0.1", 0))


@pytest.fixture
def torn_ledger(tmp_path: Path) -> str:
    """A real 40-slot ledger (market_sim), checkpointed, with 571 bytes cut off its last page:
    the torn main-file page the process nemesis found a node accepting (seed 5, h2)."""
    from node.tools import market_sim

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    market_sim.run(households=5, slots=40, seed=7, db=url)
    assert (
        "after a WAL checkpoint" in tear(tmp_path, "ledger.db", 571)
        or not (tmp_path / "ledger.db-wal").exists()
    )
    return url


def test_a_partially_torn_ledger_page_is_caught_by_verify(torn_ledger: str) -> None:
    from node.ledger import verify_ledger

    report = verify_ledger(torn_ledger)
    assert not report.ok, "the cut bytes were live rows: verify must reject the ledger"


def test_a_node_refuses_a_ledger_with_a_torn_last_page(torn_ledger: str) -> None:
    # what `microgrid node run` opens at start (node/daemon/household_node.py): the store
    from node.ledger import LedgerStore
    from node.ledger.store import LedgerStoreError

    with pytest.raises(LedgerStoreError, match=r"is torn: .* not a whole number of its"):
        store = LedgerStore(torn_ledger)
        try:
            store.applied_index()
        finally:
            store.close()


def test_the_injector_writes_each_households_faults_file(tmp_path: Path) -> None:
    hs = []
    for i in range(4):
        ident = NodeIdentity.from_seed(bytes([i + 1]) * 32)
        (tmp_path / f"h{i + 1}").mkdir()
        hs.append(DemoHousehold(i, f"h{i + 1}", tmp_path / f"h{i + 1}", ident.did,
                                str(ident.peer_id), i + 1, 0, 0))  # fmt: skip
    h1, h2, h3, h4 = hs
    lab = InjectorLab()
    lab.prepare(hs)
    files = {h.name: FaultsFile(InjectorLab.path(h)) for h in hs}

    def read() -> dict[str, FaultRules]:
        out = {}
        for name, f in files.items():
            f.poll()
            assert f.last_error is None, f.last_error
            out[name] = f.rules
        return out

    assert all(h.environment[FAULTS_FILE_ENV] == str(InjectorLab.path(h)) for h in hs)
    assert all(r == NO_FAULTS for r in read().values())
    lab.cut(["h1", "h4"])  # both sides name each other: no connection either way
    lab.lose("h2", "h3", 70)  # h3 drops 70 % of what arrives from h2
    lab.lose("h1", "h3", 30)
    rules = read()
    assert rules["h1"].partitioned_peers == {h2.peer_id, h3.peer_id}
    assert rules["h4"].partitioned_peers == {h2.peer_id, h3.peer_id}
    assert rules["h2"].partitioned_peers == {h1.peer_id, h4.peer_id} and not rules["h2"].inbound
    assert rules["h3"].inbound == {h2.peer_id: 70, h1.peer_id: 30}
    lab.clear(Kind.PARTITION, ["h1", "h4"])
    rules = read()
    assert not any(r.partitioned_peers for r in rules.values())
    assert rules["h3"].inbound == {h2.peer_id: 70, h1.peer_id: 30}
    lab.clear(Kind.LOSS, ["h2", "h3"])
    lab.jump("h2", 250.2)  # a running clock stepped (jump): beside the network rules
    lab.cut(["h2"])
    rules = read()
    assert rules["h2"].clock_offset == 250.2 and rules["h2"].partitioned_peers
    assert all(r.clock_offset == 0 for n, r in rules.items() if n != "h2")
    lab.set_right("h2")
    rules = read()
    assert rules["h2"].clock_offset == 0 and rules["h2"].partitioned_peers
    lab.jump("h3", -60)
    lab.clear_all()
    assert all(r.empty for r in read().values())


async def test_the_runner_refuses_an_unknown_net_fault_mode() -> None:
    plan = make_plan(1, 10, kinds=[Kind.PARTITION], cover=True)
    with pytest.raises(NemesisError, match="net_faults"):
        await run_plan(plan, net_faults="iptables")
