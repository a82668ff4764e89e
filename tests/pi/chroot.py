"""An emulated Raspberry Pi: a Debian bookworm arm64 root (debootstrap) run through qemu-user.

Used by ``tests/pi/test_install.py`` (``make pi-test``) to install a node with
``packaging/install.sh`` the way a household would on a Pi, on an x86-64 machine. Needs root,
``debootstrap``, ``qemu-user-static`` (its ``qemu-aarch64-static``) and a kernel that lets us
register a binfmt_misc handler; :func:`preflight` says what is missing so the test can skip with
the reason.

The finished debootstrap root is cached as a tarball under :func:`cache_dir` (key: suite,
architecture, variant), and so are the arm64 ``.deb`` files apt downloads and pip's cache (the
``fastecdsa`` wheel pip compiles), both bind-mounted into the root: a rerun skips the slow
emulated steps. ``MICROGRID_PI_FRESH=1`` ignores the caches (a cold run, as timed in
docs/raspberry-pi.md).

Everything is torn down by :meth:`ArmRoot.close`: every process whose root is this tree is
killed, every mount under it is unmounted (the tree is deleted only when nothing is mounted
under it any more, so a bind of the host's /dev can never be deleted through it), a binfmt
handler registered here is unregistered, and the tree is deleted unless ``keep``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
ARCH = "arm64"
VARIANT = "minbase"
BINFMT_NAME = "qemu-aarch64"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CHROOT_CA_BUNDLE = "/etc/ssl/host-ca-bundle.crt"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class PiTestError(RuntimeError):
    """A step of the emulated install failed; the message names the step and its output."""


def cache_dir() -> Path:
    """Where the rootfs tarball, apt's .deb files and pip's cache are kept between runs."""
    env = os.environ.get("MICROGRID_PI_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "microgrid-pi-test"


def debian_mirror() -> str | None:
    """The Debian archive this machine's apt uses (``MICROGRID_PI_MIRROR`` overrides it)."""
    env = os.environ.get("MICROGRID_PI_MIRROR")
    if env:
        return env
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = dict(
                line.split(":", 1)
                for line in stanza.splitlines()
                if ":" in line and not line.lstrip().startswith("#")
            )
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            suites = fields.get("Suites", "").split()
            if SUITE in suites and "main" in fields.get("Components", "").split():
                for uri in fields.get("URIs", "").split():
                    if uri.rstrip("/").endswith("/debian"):
                        return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text(errors="replace").splitlines():
            words = line.split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE:
                uri = next((w for w in words[1:] if not w.startswith("[")), "")
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    return None


def preflight() -> str | None:
    """None if an emulated arm64 root can be built here, else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mounts, binfmt_misc)"
    for tool, package in (
        ("debootstrap", "debootstrap"),
        ("qemu-aarch64-static", "qemu-user-static"),
        ("chroot", "coreutils"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} missing: apt-get install {package} (make pi-test does)"
    if not BINFMT_CONF.is_file():
        return f"{BINFMT_CONF} missing: qemu-user-static too old or not from Debian"
    if debian_mirror() is None:
        return "no Debian bookworm mirror in apt's sources; set MICROGRID_PI_MIRROR"
    if not (BINFMT_DIR / "register").exists():
        result = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0 or not (BINFMT_DIR / "register").exists():
            return (
                f"binfmt_misc cannot be mounted on {BINFMT_DIR} here "
                f"({result.stderr.strip() or 'no register file'}): no foreign binaries"
            )
    return None


def register_binfmt() -> bool:
    """Make the kernel run aarch64 ELF files with qemu-aarch64-static (flag F: the interpreter
    is opened now, so the chroot needs no copy of it). True if this call registered it (and
    :func:`unregister_binfmt` should undo it); raises PiTestError if the kernel refuses."""
    entry = BINFMT_DIR / BINFMT_NAME
    if entry.exists():
        if entry.read_text().splitlines()[0].strip() != "enabled":
            entry.write_text("1")
        return False
    line = BINFMT_CONF.read_text().strip()
    if ":F" not in line and not re.search(r":[A-Z]*F[A-Z]*$", line):
        line += "F"
    try:
        (BINFMT_DIR / "register").write_text(line)
    except OSError as exc:
        raise PiTestError(f"binfmt_misc refused the qemu-aarch64 handler: {exc}") from None
    return True


def unregister_binfmt() -> None:
    """Remove the handler :func:`register_binfmt` added."""
    entry = BINFMT_DIR / BINFMT_NAME
    if entry.exists():
        entry.write_text("-1")


@dataclass
class Timings:
    """Wall time of each named phase, in order."""

    phases: list[tuple[str, float]] = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        """Record one phase."""
        self.phases.append((name, seconds))

    def measure(self, name: str) -> _Phase:
        """``with timings.measure("phase"): ...`` records the block's wall time."""
        return _Phase(self, name)

    def table(self) -> str:
        """The phases and their total, one per line."""
        lines = [f"{name:<44} {secs:8.1f} s" for name, secs in self.phases]
        total = sum(s for name, s in self.phases if not name.startswith(" "))
        lines.append(f"{'total (steps indented are part of the one above)':<44} {total:8.1f} s")
        return "\n".join(lines)


class _Phase:
    def __init__(self, timings: Timings, name: str) -> None:
        self.timings, self.name, self.start = timings, name, 0.0

    def __enter__(self) -> None:
        self.start = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.timings.add(self.name, time.monotonic() - self.start)


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (deepest first)."""
    prefix = str(root).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(root) or point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _pids_in(root: Path) -> list[int]:
    """Processes whose root directory is ``root`` (started in the chroot)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "root") == str(root):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


class ArmRoot:
    """A bookworm arm64 root in a temporary directory, with /proc, /sys and /dev mounted."""

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        keep: bool = False,
        fresh: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        base = workdir or Path(os.environ.get("MICROGRID_PI_WORKDIR", "/var/tmp"))
        self.path = Path(tempfile.mkdtemp(prefix="microgrid-pi-", dir=base))
        self.path.chmod(0o755)  # it is "/" inside: the service user must traverse it
        self.keep, self.fresh, self.log = keep, fresh, log
        self.cache = cache_dir()
        self.registered_binfmt = False
        self.procs: list[subprocess.Popen[str]] = []

    # -- building -------------------------------------------------------------------------

    def tarball(self) -> Path:
        """The cached debootstrap result for this suite, architecture and variant."""
        return self.cache / f"debootstrap-{SUITE}-{ARCH}-{VARIANT}.tar.gz"

    def bootstrap(self, timeout: float) -> str:
        """Fill the root from the cached tarball, or debootstrap it (and cache it). Returns
        ``"cache"`` or ``"debootstrap"``."""
        self.registered_binfmt = register_binfmt()
        tarball = self.tarball()
        if tarball.is_file() and not self.fresh:
            _run(
                ["tar", "-C", str(self.path), "--numeric-owner", "-xzf", str(tarball)],
                "unpacking the cached root",
                timeout,
            )
            self.path.chmod(0o755)  # tar restored the mode "." had when it was cached
            return "cache"
        mirror = debian_mirror()
        assert mirror is not None  # preflight checked
        self.log(f"debootstrap {SUITE} {ARCH} ({VARIANT}) from the host's Debian mirror")
        _run(
            [
                "debootstrap",
                f"--arch={ARCH}",
                f"--variant={VARIANT}",
                SUITE,
                str(self.path),
                mirror,
            ],
            "debootstrap",
            timeout,
        )
        self.path.chmod(0o755)
        self.cache.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        _run(
            ["tar", "-C", str(self.path), "--numeric-owner", "-czf", str(partial), "."],
            "caching the root",
            timeout,
        )
        partial.replace(tarball)
        return "debootstrap"

    def mount(self) -> None:
        """/proc, /sys, /dev, /dev/pts; apt's and pip's caches; the host's DNS and CA bundle."""
        p = self.path
        _run(["mount", "-t", "proc", "proc", str(p / "proc")], "mount proc", 30)
        _run(["mount", "-t", "sysfs", "sysfs", str(p / "sys")], "mount sys", 30)
        _run(["mount", "--bind", "/dev", str(p / "dev")], "mount dev", 30)
        (p / "dev/pts").mkdir(exist_ok=True)
        _run(["mount", "--bind", "/dev/pts", str(p / "dev/pts")], "mount dev/pts", 30)
        if not self.fresh:
            for host, inside in (
                ("apt-archives", "var/cache/apt/archives"),
                ("pip", "root/.cache/pip"),
            ):
                (self.cache / f"{ARCH}-{host}").mkdir(parents=True, exist_ok=True)
                (p / inside).mkdir(parents=True, exist_ok=True)
                _run(
                    ["mount", "--bind", str(self.cache / f"{ARCH}-{host}"), str(p / inside)],
                    f"mount the {host} cache",
                    30,
                )
        resolv = p / "etc/resolv.conf"
        if resolv.is_symlink():
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)
        if HOST_CA_BUNDLE.is_file():  # the host's trust store, for pip behind its TLS proxy
            (p / CHROOT_CA_BUNDLE.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HOST_CA_BUNDLE, p / CHROOT_CA_BUNDLE.lstrip("/"))

    # -- running --------------------------------------------------------------------------

    def env(self, extra: Mapping[str, str] | None = None, home: str = "/root") -> list[str]:
        """``env -i`` arguments: a clean environment for a command in the root."""
        values = {
            "PATH": PATH,
            "HOME": home,
            "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        if (self.path / CHROOT_CA_BUNDLE.lstrip("/")).is_file():
            values["PIP_CERT"] = CHROOT_CA_BUNDLE
        if os.environ.get("PIP_DEFAULT_TIMEOUT"):
            values["PIP_DEFAULT_TIMEOUT"] = os.environ["PIP_DEFAULT_TIMEOUT"]
        values.update(extra or {})
        return ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in values.items())]

    def argv(
        self,
        command: Sequence[str],
        *,
        user: str | None = None,
        groups: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        home: str = "/root",
    ) -> list[str]:
        """The host command running ``command`` inside the root (as ``user`` if given)."""
        prefix = ["chroot"]
        if user is not None:
            prefix.append(f"--userspec={user}:{user}")
            prefix.append(f"--groups={','.join([user, *groups])}")
        return [*prefix, str(self.path), *self.env(env, home), *command]

    def run(
        self,
        command: Sequence[str],
        what: str,
        timeout: float,
        *,
        user: str | None = None,
        groups: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        home: str = "/root",
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the root and wait; raises PiTestError if it fails."""
        argv = self.argv(command, user=user, groups=groups, env=env, home=home)
        return _run(argv, what, timeout, check=check)

    def stream(
        self,
        command: Sequence[str],
        what: str,
        timeout: float,
        on_line: Callable[[float, str], None],
    ) -> int:
        """Run ``command`` inside the root, passing each output line with its time since
        start to ``on_line``; returns the exit status (PiTestError after ``timeout``)."""
        start = time.monotonic()
        proc = subprocess.Popen(
            self.argv(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        deadline = start + timeout
        for line in proc.stdout:
            on_line(time.monotonic() - start, line.rstrip("\n"))
            if time.monotonic() > deadline:
                _kill_group(proc)
                raise PiTestError(f"{what}: still running after {timeout:.0f} s")
        try:
            return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise PiTestError(f"{what}: still running after {timeout:.0f} s") from None

    def spawn(
        self, command: Sequence[str], log_path: Path, **kwargs: object
    ) -> subprocess.Popen[str]:
        """Start ``command`` inside the root in its own session, output to ``log_path``."""
        argv = self.argv(command, **kwargs)  # type: ignore[arg-type]
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Kill, unmount, unregister, delete (unless keep). Returns what could not be undone."""
        problems: list[str] = []
        for proc in self.procs:
            _kill_group(proc)
        for _ in range(3):
            pids = _pids_in(self.path)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        else:
            problems.append(f"processes still running in {self.path}: {_pids_in(self.path)}")
        for point in _mounts_under(self.path):
            result = subprocess.run(
                ["umount", point], capture_output=True, text=True, timeout=60, check=False
            )
            if result.returncode != 0:
                subprocess.run(
                    ["umount", "--lazy", point], capture_output=True, timeout=60, check=False
                )
        left = _mounts_under(self.path)
        if left:
            problems.append(f"still mounted, so {self.path} was NOT deleted: {left}")
        if self.registered_binfmt:
            try:
                unregister_binfmt()
            except OSError as exc:
                problems.append(f"could not unregister the qemu-aarch64 handler: {exc}")
        if left:
            return problems
        if self.keep:
            self.log(f"kept the root: {self.path}")
        else:
            shutil.rmtree(self.path, ignore_errors=True)
            if self.path.exists():
                problems.append(f"could not delete {self.path}")
        return problems


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the process group ``proc`` leads, then SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _run(
    argv: Sequence[str], what: str, timeout: float, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a host command; PiTestError naming ``what`` on a timeout or (``check``) failure."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PiTestError(
            f"{what}: still running after {timeout:.0f} s ({(exc.stdout or b'')[-2000:]!r})"
        ) from None
    if check and result.returncode != 0:
        raise PiTestError(
            f"{what}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result
