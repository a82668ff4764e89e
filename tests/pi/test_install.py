"""The Raspberry Pi install, proven in an emulated arm64 Debian bookworm root (``make pi-test``).

Skipped unless ``MICROGRID_PI_TEST=1`` (it takes minutes of emulated CPU; docs/raspberry-pi.md
has the measured time), and skipped with the reason printed where the machine cannot run arm64
binaries (no root, no debootstrap or qemu-user-static, binfmt_misc not allowed).

What it does, as a household would on a Pi (tests/pi/chroot.py builds the root):

1. debootstrap a bookworm arm64 root (or unpack the cached one) and register qemu-aarch64;
2. build the project's wheel on the host and copy it, packaging/ and docs/ into the root;
3. ``packaging/install.sh WHEEL`` inside: apt prerequisites, the ``microgrid`` user, the venv
   (pip compiles fastecdsa for aarch64), /etc/microgrid, /var/lib/microgrid, the unit; then
   once more, to show it is idempotent;
4. ``microgrid meter-sim`` on loopback and ``microgrid meter test`` against it;
5. ``microgrid init`` as the service user, a one-household genesis signed by an operator key;
6. the unit's ``ExecStart`` run by hand as the service user with the unit's environment,
   working directory and umask (systemd does not run in a chroot; the unit file itself is
   checked with the host's ``systemd-analyze verify``), until ``microgrid status`` answers;
   SIGTERM stops it with exit 0;
7. ``install.sh --uninstall`` removes the venv and the unit and keeps key and data.

Every phase's wall time is printed (run with ``-s``) and written to ``last-run.txt`` in the
cache directory. ``MICROGRID_PI_KEEP=1`` keeps the root for a look afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.pi.chroot import ArmRoot, PiTestError, Timings, cache_dir, preflight

pytestmark = [pytest.mark.pi, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SRC = "/usr/local/src/microgrid"
CONF = "/etc/microgrid/microgrid.toml"
UNIT = "/etc/systemd/system/microgrid-node.service"
USER = "microgrid"
INSTALL_TIMEOUT = 45 * 60
"""apt and pip under emulation, fastecdsa compiled by qemu-emulated gcc on two shared cores."""
STATUS_TIMEOUT = 300
"""The node importing libp2p under emulation, opening its databases, electing itself."""


def _enabled() -> bool:
    return os.environ.get("MICROGRID_PI_TEST", "") in ("1", "true", "yes")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _build_wheel(out: Path) -> Path:
    """The project's wheel, built from a copy of the tree (the tree itself stays untouched)."""
    staging = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("market", "meter", "node", "dashboard"):
        shutil.copytree(REPO / name, staging / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, staging / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--wheel-dir",
            str(out),
            str(staging),
        ],
        check=True,
        timeout=600,
    )
    wheels = sorted(out.glob("microgrid-*.whl"))
    assert wheels, "pip wheel built no microgrid wheel"
    return wheels[0]


def _unit_service(text: str) -> dict[str, list[str]]:
    """The [Service] section of a unit file: key -> values in order."""
    section, out = "", {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_pi_install_in_emulated_arm64_root(tmp_path: Path) -> None:
    """install.sh on arm64 bookworm: init, meter test against the simulator, a node that
    answers status, a clean stop, uninstall; every phase timed."""
    if not _enabled():
        pytest.skip(
            "the emulated Pi install takes many minutes: MICROGRID_PI_TEST=1 (make pi-test) runs it"
        )
    reason = preflight()
    if reason is not None:
        print(f"pi-test skipped: {reason}", flush=True)
        pytest.skip(reason)

    timings = Timings()
    lines: list[str] = []

    def log(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    keep = os.environ.get("MICROGRID_PI_KEEP", "") in ("1", "true", "yes")
    fresh = os.environ.get("MICROGRID_PI_FRESH", "") in ("1", "true", "yes")
    root = ArmRoot(keep=keep, fresh=fresh, log=log)
    started = time.monotonic()
    try:
        _scenario(root, tmp_path, timings, log)
    finally:
        problems = root.close()
        log(timings.table())
        log(f"wall time including teardown: {time.monotonic() - started:.1f} s")
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "last-run.txt").write_text("\n".join(lines) + "\n")
        assert not problems, problems


def _scenario(root: ArmRoot, tmp: Path, timings: Timings, say: Callable[[str], None]) -> None:
    with timings.measure("rootfs (debootstrap or cached tarball)"):
        how = root.bootstrap(timeout=40 * 60)
    say(f"root {root.path} from {how}")
    root.mount()
    with timings.measure("wheel built on the host"):
        wheel = _build_wheel(tmp / "dist")
    src = root.path / SRC.lstrip("/")
    (src / "dist").mkdir(parents=True)
    shutil.copytree(REPO / "packaging", src / "packaging")
    (src / "docs").mkdir()
    for doc in ("raspberry-pi.md", "node.md", "meters.md"):
        shutil.copy2(REPO / "docs" / doc, src / "docs" / doc)
    shutil.copy2(wheel, src / "dist" / wheel.name)
    inside_wheel = f"{SRC}/dist/{wheel.name}"

    # 3. the installer, with its own steps timed from its log lines
    steps: list[tuple[float, str]] = []

    def on_line(at: float, line: str) -> None:
        say(f"  [{at:6.1f} s] {line}")
        if line.startswith("install.sh: "):
            steps.append((at, line[len("install.sh: ") :]))

    t0 = time.monotonic()
    status = root.stream(
        ["bash", f"{SRC}/packaging/install.sh", inside_wheel],
        "install.sh",
        INSTALL_TIMEOUT,
        on_line,
    )
    timings.add("install.sh (apt + venv + pip + unit)", time.monotonic() - t0)
    assert status == 0, f"install.sh exited {status}"
    for (at, text), (nxt, _) in zip(steps, [*steps[1:], (time.monotonic() - t0, "")], strict=True):
        timings.add(f"  install.sh: {text[:34]}", nxt - at)
    t0 = time.monotonic()
    again = root.run(
        ["bash", f"{SRC}/packaging/install.sh", inside_wheel], "install.sh, second run", 20 * 60
    )
    timings.add("install.sh again (idempotent)", time.monotonic() - t0)
    assert "all present" in again.stdout, again.stdout
    assert "created system user" not in again.stdout, again.stdout

    # what the installer made
    stat = root.run(
        [
            "stat",
            "-c",
            "%n %U:%G %a",
            "/etc/microgrid",
            "/var/lib/microgrid",
            "/opt/microgrid",
            UNIT,
        ],
        "stat",
        60,
    ).stdout
    assert "/etc/microgrid microgrid:microgrid 700" in stat, stat
    assert "/var/lib/microgrid microgrid:microgrid 700" in stat, stat
    assert "/opt/microgrid root:root 755" in stat, stat
    user = root.run(["getent", "passwd", USER], "getent", 60).stdout
    assert user.split(":")[6].strip() == "/usr/sbin/nologin", user
    arch = root.run(
        ["/opt/microgrid/bin/python", "-c", "import platform; print(platform.machine())"],
        "venv python",
        300,
    ).stdout.strip()
    assert arch == "aarch64", arch
    unit_text = (root.path / UNIT.lstrip("/")).read_text()
    _verify_unit_on_host(root, tmp, say)

    # 4. the meter simulator on loopback, and meter test against it
    sim_port, api_port, p2p_port = _free_ports(3)
    mg = "/opt/microgrid/bin/microgrid"
    with timings.measure("meter-sim started, meter test"):
        sim = root.spawn(
            [
                mg,
                "meter-sim",
                "--households",
                "1",
                "--host",
                "127.0.0.1",
                "--port",
                str(sim_port),
                "--status-every",
                "0",
            ],
            tmp / "meter-sim.log",
        )
        meter = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if sim.poll() is not None:
                raise PiTestError(
                    f"meter-sim exited {sim.returncode}: "
                    f"{(tmp / 'meter-sim.log').read_text()[-2000:]}"
                )
            result = root.run(
                [
                    mg,
                    "meter",
                    "test",
                    "--profile",
                    "sdm630",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(sim_port),
                    "--device-id",
                    "1",
                    "--json",
                ],
                "meter test",
                240,
                user=USER,
                home="/var/lib/microgrid",
                check=False,
            )
            if result.returncode == 0:
                meter = json.loads(result.stdout)
                break
            time.sleep(2)
        assert meter is not None and meter["ok"], "meter test never read the simulator"
    serial = str(meter["serial"])
    say(f"meter test: serial {serial}, import {meter['import_wh']} Wh")

    # 5. the household's key and config, an operator and a one-household genesis
    with timings.measure("init, genesis create"):
        init = root.run(
            [
                mg,
                "init",
                "--dir",
                "/etc/microgrid",
                "--listen",
                f"/ip4/127.0.0.1/tcp/{p2p_port}",
                "--api-port",
                str(api_port),
                "--metrics-port",
                "0",
                "--meter",
                f"tcp://127.0.0.1:{sim_port}",
            ],
            "microgrid init",
            300,
            user=USER,
            home="/var/lib/microgrid",
        ).stdout
        did = re.search(r"did:key: (\S+)", init)
        peer = re.search(r"peer id: (\S+)", init)
        assert did and peer, init
        root.run([mg, "init", "--dir", "/root/operator"], "operator init", 300)
        root.run(
            [
                mg,
                "genesis",
                "create",
                "--operator-key",
                "/root/operator/node.key",
                "--grid",
                "pi-test",
                "--member",
                f"{did.group(1)},{serial},voter",
                "--feed-in-tariff",
                "8",
                "--retail-price",
                "30",
                "--bootstrap",
                f"/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{peer.group(1)}",
                "--out",
                "/root/genesis.json",
            ],
            "genesis create",
            300,
        )
        root.run(
            [
                "install",
                "-o",
                USER,
                "-g",
                USER,
                "-m",
                "0600",
                "/root/genesis.json",
                "/etc/microgrid/genesis.json",
            ],
            "placing the genesis",
            60,
        )
    modes = root.run(
        ["stat", "-c", "%n %U %a", "/etc/microgrid/node.key", CONF, "/etc/microgrid/genesis.json"],
        "stat",
        60,
    ).stdout
    for name in ("node.key", "microgrid.toml", "genesis.json"):
        assert f"/etc/microgrid/{name} microgrid 600" in modes, modes

    # 6. the unit's ExecStart, by hand, as the unit would run it
    service = _unit_service(unit_text)
    assert service["User"] == [USER] and service["WorkingDirectory"] == ["/var/lib/microgrid"]
    env = dict(e.split("=", 1) for e in service.get("Environment", []))
    groups = " ".join(service.get("SupplementaryGroups", [])).split()
    umask = service.get("UMask", ["0022"])[0]
    exec_start = service["ExecStart"][0]
    workdir = service["WorkingDirectory"][0]
    command = [
        "bash",
        "-c",
        f'umask {umask} && cd {workdir} && exec "$@"',
        "microgrid-node",
        *exec_start.split(),
    ]
    t0 = time.monotonic()
    node = root.spawn(
        command, tmp / "node.log", user=USER, groups=groups, env=env, home="/var/lib/microgrid"
    )
    answer = ""
    deadline = t0 + STATUS_TIMEOUT
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise PiTestError(
                f"the node exited {node.returncode}: {(tmp / 'node.log').read_text()[-3000:]}"
            )
        result = root.run([mg, "status", "--config", CONF], "microgrid status", 120, check=False)
        if result.returncode == 0 and "raft      leader" in result.stdout:
            answer = result.stdout
            break
        time.sleep(3)
    timings.add("node started until status shows it leader", time.monotonic() - t0)
    assert answer, (
        f"no status answer in {STATUS_TIMEOUT} s: {(tmp / 'node.log').read_text()[-3000:]}"
    )
    say(answer)
    assert did.group(1) in answer and "in grid pi-test" in answer, answer
    data = root.run(
        ["stat", "-c", "%n %U %a", "/var/lib/microgrid/ledger.db", "/var/lib/microgrid/raft.db"],
        "stat data",
        60,
    ).stdout
    assert data.count(" microgrid 600") == 2, data
    rss = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{node.pid}/status").read_text())
    if rss:
        say(f"node RSS under qemu-user: {int(rss[1]) // 1024} MB (the emulator included)")
    t0 = time.monotonic()
    os.kill(node.pid, signal.SIGTERM)
    code = node.wait(timeout=120)
    timings.add("node stopped by SIGTERM", time.monotonic() - t0)
    assert code == 0, f"SIGTERM: exit {code}: {(tmp / 'node.log').read_text()[-2000:]}"
    sim.send_signal(signal.SIGINT)
    try:
        sim.wait(timeout=60)
    except subprocess.TimeoutExpired:
        sim.kill()

    # 7. uninstall keeps the household's key and ledger
    with timings.measure("install.sh --uninstall"):
        out = root.run(
            ["bash", f"{SRC}/packaging/install.sh", "--uninstall"], "uninstall", 300
        ).stdout
    assert "kept /etc/microgrid" in out, out
    assert not (root.path / "opt/microgrid").exists()
    assert not (root.path / UNIT.lstrip("/")).exists()
    assert (root.path / "etc/microgrid/node.key").is_file()
    assert (root.path / "var/lib/microgrid/ledger.db").is_file()


def _verify_unit_on_host(root: ArmRoot, tmp: Path, say: Callable[[str], None]) -> None:
    """The installed unit is packaging's, and passes the host's ``systemd-analyze verify``
    with ``ExecStart`` pointed at the command installed in the root (the root itself has no
    systemd to verify against). Skipped when the host has no systemd-analyze."""
    installed = (root.path / UNIT.lstrip("/")).read_text()
    assert installed == (REPO / "packaging" / "microgrid-node.service").read_text()
    if shutil.which("systemd-analyze") is None:
        say("systemd-analyze not on the host: unit not verified")
        return
    command = root.path / "opt/microgrid/bin/microgrid"
    assert os.access(command, os.X_OK), command
    unit = tmp / "microgrid-node.service"
    unit.write_text(installed.replace("/opt/microgrid/bin/microgrid", str(command)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    say(f"systemd-analyze verify: exit {result.returncode} {result.stderr.strip()[:1500]}")
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
