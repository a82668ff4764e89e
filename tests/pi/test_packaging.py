"""packaging/ checked on the host, in seconds (CI runs these; the emulated install is
``test_install.py``): the installer's usage errors touch nothing, the unit keeps its hardening
and passes ``systemd-analyze verify``, the journald drop-in parses."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
INSTALL = PACKAGING / "install.sh"
UNIT = PACKAGING / "microgrid-node.service"


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip


def _service_settings() -> dict[str, list[str]]:
    section, out = "", {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_installer_is_valid_bash_and_prints_usage() -> None:
    assert subprocess.run(["bash", "-n", str(INSTALL)], timeout=30, check=False).returncode == 0
    result = _install("--help")
    assert result.returncode == 0
    assert "--uninstall" in result.stdout and "SOURCE" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give a wheel or a source directory"),
        (("--purge",), "--purge goes with --uninstall"),
        (("/nonexistent/microgrid.whl",), "does not exist"),
        (("--uninstall", "x.whl"), "--uninstall takes no SOURCE"),
        (("--bogus",), "unknown option --bogus"),
        (("a.whl", "b.whl"), "one SOURCE only"),
    ],
)
def test_installer_usage_errors_exit_2_before_touching_anything(
    args: tuple[str, ...], message: str
) -> None:
    result = _install(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_unit_keeps_its_hardening() -> None:
    s = _service_settings()
    expected = {
        "User": ["microgrid"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "ReadWritePaths": ["/var/lib/microgrid"],
        "CapabilityBoundingSet": [""],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX AF_NETLINK"],
        "Restart": ["on-failure"],
        "RestartPreventExitStatus": ["2 3"],
        "ExecStart": [
            "/opt/microgrid/bin/microgrid node run --config /etc/microgrid/microgrid.toml"
        ],
        # -OO: no docstrings, about 6 MB less per node (install.sh compiles the venv for it)
        "Environment": ["MICROGRID_DATA_DIR=/var/lib/microgrid", "PYTHONOPTIMIZE=2"],
    }
    for key, value in expected.items():
        assert s.get(key) == value, (key, s.get(key))
    unit = UNIT.read_text()
    assert "StartLimitBurst=5" in unit and "StartLimitIntervalSec=600" in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants ExecStart to exist: point it at a binary this host has
    unit = tmp_path / "microgrid-node.service"
    unit.write_text(UNIT.read_text().replace("/opt/microgrid/bin/microgrid", "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    level = re.search(r"Overall exposure level for microgrid-node.service: ([0-9.]+) (\w+)",
                      security.stdout)  # fmt: skip
    assert level, security.stdout[-2000:]
    assert float(level[1]) <= 2.0 and level[2] == "OK", level[0]  # 1.9 with systemd 252


def test_journald_dropin_caps_the_journal() -> None:
    text = (PACKAGING / "journald-microgrid.conf").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert text.count("[Journal]") == 1
    assert settings["SystemMaxUse"] == "200M" and settings["Compress"] == "yes"
