"""``microgrid demo``: a whole microgrid on this machine, from meters to ledgers.

It starts the meter simulator (real Modbus TCP on 127.0.0.1), creates an operator key, one key
and config per household and a signed genesis, starts every household as its own
``microgrid node run`` process (real libp2p, SQLite ledgers) and the dashboard on the first
household's ledger, then prints one table row per settled round. With ``--rounds R`` it stops
after R rounds, otherwise at Ctrl-C; either way it then stops the nodes, verifies every ledger,
compares the head hashes and exits 0 only if all verify and agree.

Accelerated time: one slot of ``--slot-seconds`` real seconds is a 15-minute slot of the
simulated households. The simulated clock runs during each slot but stands still for its first
``freeze`` seconds, so the counters a node reads just after a slot boundary are exactly the
meters' values at that boundary (recorded in ``truth.jsonl``; tests compare the ledgers with
it). A real meter needs none of this: its slot is as long as the market's.

With ``--feeder`` the simulator also serves a feeder meter (the operator's meter at the
transformer: the households' net flow plus 2 % line losses, device 100), the genesis registers
its serial (``feeder_serial``), and household h1 doubles as the operator's node: its config gets
``[feeder]`` with the demo's operator key, so it signs and gossips a feeder reading per slot and
every ledger records the slot's feeder check (``feeder_checks``; the table's last column).

``DemoSettings.batteries`` gives chosen households a simulated battery behind their meter (no
PV, a SunSpec 124/802 inverter the simulator serves) and their configs a ``[[batteries]]``
table; ``DemoSettings.environment`` (``DemoHousehold.environment``) sets environment variables
for a household's node process, e.g. the test-only ``MICROGRID_CLOCK_OFFSET_SECONDS``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, TextIO

import trio

from market.models import MemberRole
from market.schedule import Schedule
from market.state import MarketConfig
from meter.reader import MeterConfig, MeterReader
from meter.sim.feeder import DEFAULT_FEEDER_DEVICE
from meter.sim.household import make_households
from meter.sim.server import MeterSimulator
from meter.transport import TcpEndpoint
from node.daemon.spread import Publication, publication_times, spread_fraction
from node.ledger import schema as t
from node.ledger.verify import VerifyReport, verify_ledger
from node.setup.genesis import create_genesis, write_genesis
from node.setup.keyfile import create_key_file
from node.tools.ports import free_ports

NODE_PYTHON_OPTIONS = ("-OO",)
"""How the demo starts its node processes' Python, as the systemd unit does
(``PYTHONOPTIMIZE=2``): without docstrings, which take about 6 MB of each node's memory
(docs/performance.md, "Memory"). Nothing in a node relies on a docstring or an ``assert``."""
SOURCE_PACKAGES = ("node", "market", "meter")
"""What a node process imports of this repository: compiled for ``NODE_PYTHON_OPTIONS`` before
the nodes start (:func:`compile_sources`)."""
SIM_SLOT_SECONDS = 900
SIM_START = dt.datetime(2025, 6, 21, 9, 0)
"""Mid-morning of a June day: PV households have surplus while others still draw."""
FEEDER_PROFILE = "sdm630"
FEEDER_MAX_HOUSEHOLDS = 10
"""The simulated feeder is an SDM630 (69 kW rated, the reader's plausibility limit): enough for
ten demo households' combined flow."""


def compile_sources() -> bool:
    """Byte-compile the repository's packages for ``NODE_PYTHON_OPTIONS`` (``-OO``) once, so
    that N node processes do not each compile them at start-up: without a cache (a checkout
    whose bytecode was never written, or ``PYTHONDONTWRITEBYTECODE`` set) every node spent about
    0.5 CPU-seconds of its 1.7 s of imports compiling them, 25 CPU-seconds for 50 households
    starting together on one machine (issue 19). Up-to-date files are only checked. False if
    it could not (a read-only install: the nodes then compile in memory, as before)."""
    roots = [str(Path(__file__).resolve().parents[2] / name) for name in SOURCE_PACKAGES]
    try:
        done = subprocess.run(
            [sys.executable, *NODE_PYTHON_OPTIONS, "-m", "compileall", "-q", "-j", "0", *roots],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass
class DemoSettings:
    """What ``microgrid demo`` runs."""

    households: int = 5
    slot_seconds: int = 10
    rounds: int | None = None
    dashboard: bool = True
    dashboard_port: int = 8050
    directory: Path | None = None
    seed: int = 1
    voters: int = 3
    feed_in_tariff: int = 8
    retail_price: int = 30
    raft_tick_seconds: float = 0.1
    raft_election_ticks: int = 15
    raft_heartbeat_ticks: int = 2
    """Fast Raft timing (heartbeat 0.2 s, elections after 1.5-3 s) so a killed leader is
    replaced within a short demo slot; a real node uses the config defaults (1 s, 5-10 s)."""
    raft_snapshot_entries: int = 5000
    """Log compaction interval (tests make it small to exercise snapshots and block sync)."""
    feeder: bool = False
    """Serve a feeder meter and let h1 sign its readings with the operator key (``--feeder``)."""
    spare_meters: int = 0
    """Simulated meters served beside the households' but in no genesis (households without PV
    or battery, device ids after theirs): for households that join the running grid
    (:attr:`Demo.spare`, :meth:`Demo.adopt`)."""
    hosts: tuple[str, ...] = ()
    """Per-household host address (index i: household ``h{i+1}``) its node listens on (libp2p
    and API) and the genesis bootstrap names; a household without one uses 127.0.0.1. For a grid
    whose nodes run in network namespaces of their own (the nemesis's partitions)."""
    sim_host: str = "127.0.0.1"
    """The address the meter simulator listens on and the nodes' configs name (a namespaced
    grid: the bridge's address in the root namespace)."""
    node_prefixes: tuple[tuple[str, ...], ...] = ()
    """Per-household command prefix for the node process (e.g. ``("ip", "netns", "exec",
    "mg-h1")``); none: the node runs as is."""
    batteries: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Household number (1: ``h1``) -> ``(kWh, kW)``: that household's simulated meter gets a
    battery of this capacity and charge/discharge limit behind it (a SunSpec 124/802 inverter
    the simulator serves), and its config a ``[[batteries]]`` table, so its node plans the
    battery (docs/node.md, "Batteries"). Such a household has no PV and starts with
    :attr:`battery_initial_permille` of charge: whatever it sells it bought, or stored, first."""
    battery_initial_permille: int = 150
    """State of charge a battery of :attr:`batteries` starts at."""
    battery_horizon_slots: int = 8
    """The ``horizon_slots`` of a battery household's ``[[batteries]]`` table."""
    start_interval: float = 0.0
    """Seconds between starting one household's node and the next (0: all at once). Dozens of
    nodes on one small machine all doing their imports and their first handshakes in the same
    seconds is a load no real grid sees (households do not boot together); the node bench
    staggers large grids."""
    environment: dict[int, dict[str, str]] = field(default_factory=dict)
    """Household number -> environment variables its node process starts with, on top of this
    process's (e.g. ``MICROGRID_CLOCK_OFFSET_SECONDS``): :attr:`DemoHousehold.environment`."""
    bootstrap: tuple[str, ...] | None = None
    """The genesis bootstrap list (multiaddrs with ``/p2p/``); None: every household's listen
    address. A grid behind NAT names only the operator node (relay and bootstrap; its key is the
    caller's): the households' own addresses are private (tests/net/test_nat_grid.py)."""

    @property
    def gate_lead_seconds(self) -> int:
        """Gate closure this long before a slot starts."""
        return max(1, self.slot_seconds // 5)

    @property
    def settle_delay_seconds(self) -> int:
        """Readings due this long after a slot ends."""
        return max(2, math.ceil(self.slot_seconds * 0.3))

    @property
    def freeze_seconds(self) -> float:
        """The simulated meters stand still this long after each slot boundary (a node reads
        its meter 0.3 s after the boundary; the rest is slack for a loaded machine)."""
        return min(2.0, self.slot_seconds / 4)

    @property
    def read_delay_seconds(self) -> float:
        """Every node reads its meter this long after a slot boundary, inside the freeze."""
        return round(min(0.3, self.freeze_seconds / 2), 3)


@dataclass(frozen=True)
class SpareMeter:
    """A simulated meter no genesis household reads: for a household joining later."""

    device_id: int
    profile: str
    serial: str


@dataclass
class DemoHousehold:
    """One household of the demo: its directory, ports and process."""

    index: int
    name: str
    directory: Path
    did: str
    peer_id: str
    device_id: int
    listen_port: int
    api_port: int
    process: trio.Process | None = None
    log: TextIO | None = None
    starts: int = 0
    joined: bool = False
    """Set up outside the demo (``microgrid init``, :meth:`Demo.adopt`): its config has the
    defaults' timing, so the demo's accelerated settings reach it through the environment."""
    host: str = "127.0.0.1"
    """The address its node listens on (libp2p and API): :attr:`DemoSettings.hosts`."""
    prefix: tuple[str, ...] = ()
    """Command prefix of its node process: :attr:`DemoSettings.node_prefixes`."""
    environment: dict[str, str] = field(default_factory=dict)
    """Environment variables its node process starts with, over this process's (and, for a
    joined household, over the demo's timing): :attr:`DemoSettings.environment`. Changed
    between starts, it applies from the next :meth:`Demo.start_node` (the nemesis restarts a
    node with ``MICROGRID_CLOCK_OFFSET_SECONDS`` for a clock skew, then without)."""
    battery_device: int | None = None
    """The simulator's device id of its battery inverter (:attr:`DemoSettings.batteries`)."""

    @property
    def config_path(self) -> Path:
        """This household's microgrid.toml."""
        return self.directory / "microgrid.toml"

    @property
    def ledger_url(self) -> str:
        """Its ledger database."""
        return f"sqlite:///{self.directory / 'data' / 'ledger.db'}"

    @property
    def api(self) -> str:
        """Its API base URL."""
        return f"http://{self.host}:{self.api_port}"

    @property
    def alive(self) -> bool:
        """True while its process runs."""
        return self.process is not None and self.process.returncode is None


@dataclass
class DemoVerdict:
    """The outcome of a demo run: every ledger verified and all heads equal."""

    reports: dict[str, VerifyReport]
    ok: bool
    message: str


class SimClock:
    """Drives the simulator's clock from the wall clock (see the module docstring)."""

    def __init__(self, sim: MeterSimulator, schedule: Schedule, freeze: float, first_slot: int,
                 truth_path: Path, feeder_truth_path: Path | None = None) -> None:  # fmt: skip
        self.sim = sim
        self.schedule = schedule
        self.freeze = freeze
        self.first_slot = first_slot
        self.truth_path = truth_path
        self.feeder_truth_path = feeder_truth_path
        """Where the feeder meter's counters at each slot boundary go (with a feeder)."""
        self.recorded: set[int] = set()

    def sim_time(self, t: float) -> float:
        """Simulated seconds at wall time ``t``."""
        slot = self.schedule.slot_at(t)
        into = t - self.schedule.start(slot) - self.freeze
        share = min(1.0, max(0.0, into / (self.schedule.slot_seconds - self.freeze)))
        return max(0.0, (slot - self.first_slot + share) * SIM_SLOT_SECONDS)

    def step(self, t: float) -> None:
        """Advance to wall time ``t``; record the counters at a slot boundary once reached."""
        target = self.sim_time(t)
        self.sim.advance_to(target)
        slot = self.schedule.slot_at(t)
        boundary = (slot - self.first_slot) * SIM_SLOT_SECONDS
        ended = slot - 1
        if self.sim.sim_time == boundary and ended not in self.recorded and slot > self.first_slot:
            self.recorded.add(ended)
            with self.truth_path.open("a") as fh:
                for device_id, state in self.sim.states().items():
                    fh.write(json.dumps({
                        "slot": ended, "device_id": device_id, "serial": state.serial,
                        "import_wh": state.import_wh, "export_wh": state.export_wh,
                    }) + "\n")  # fmt: skip
            if self.sim.feeder is not None and self.feeder_truth_path is not None:
                f = self.sim.feeder_state()
                with self.feeder_truth_path.open("a") as fh:
                    fh.write(json.dumps({
                        "slot": ended, "device_id": f.device_id, "serial": f.serial,
                        "import_wh": f.import_wh, "export_wh": f.export_wh,
                    }) + "\n")  # fmt: skip

    async def run(self) -> None:
        """Step every 50 ms until cancelled."""
        while True:
            self.step(time.time())
            await trio.sleep(0.05)


def _node_config(h: DemoHousehold, settings: DemoSettings, sim_port: int, profile: str,
                 peers_token: str, feeder_device: int | None = None) -> str:  # fmt: skip
    s = settings
    scale = SIM_SLOT_SECONDS / (s.slot_seconds - s.freeze_seconds) * 1.25
    feeder = "" if feeder_device is None else (
        "\n[feeder]   # this household's node is also the operator's: it signs feeder readings\n"
        'name = "feeder"\n'
        f'profile = "{FEEDER_PROFILE}"\n'
        f'endpoint = "tcp://{s.sim_host}:{sim_port}"\n'
        f"device_id = {feeder_device}\n"
        'operator_key_path = "../operator.key"\n'
    )  # fmt: skip
    battery = "" if h.battery_device is None else (
        "\n[[batteries]]   # the simulated battery inverter behind this household's meter\n"
        'name = "battery"\n'
        f'endpoint = "tcp://{s.sim_host}:{sim_port}"\n'
        f"device_id = {h.battery_device}\n"
        f"horizon_slots = {s.battery_horizon_slots}\n"
        f"slot_seconds = {SIM_SLOT_SECONDS}   # each demo slot is 15 simulated minutes\n"
    )  # fmt: skip
    return (
        "# written by `microgrid demo`\n"
        'key_path = "node.key"\n'
        'genesis_path = "../genesis.json"\n'
        'data_dir = "data"\n'
        f'listen = "/ip4/{h.host}/tcp/{h.listen_port}"\n'
        "metrics_port = 0\n"
        f"api_port = {h.api_port}\n"
        + ("" if h.host == "127.0.0.1" else f'api_host = "{h.host}"\n')
        + f'api_token = "{peers_token}"\n'
        'log_format = "json"\n'
        f"meter_poll_seconds = {max(1.0, s.slot_seconds / 2)}\n"
        f"meter_time_scale = {scale:.3f}\n"
        f"read_delay_seconds = {s.read_delay_seconds:.3f}\n"
        f"raft_tick_seconds = {s.raft_tick_seconds}\n"
        f"raft_election_ticks = {s.raft_election_ticks}\n"
        f"raft_heartbeat_ticks = {s.raft_heartbeat_ticks}\n"
        f"raft_snapshot_entries = {s.raft_snapshot_entries}\n"
        "\n[[meters]]\n"
        'name = "main"\n'
        f'profile = "{profile}"\n'
        f'endpoint = "tcp://{s.sim_host}:{sim_port}"\n'
        f"device_id = {h.device_id}\n" + feeder + battery
    )


def get_json(url: str, timeout: float = 2.0, token: str | None = None) -> Any:
    """GET ``url`` (with the bearer ``token``, if given) and decode its JSON (raises
    OSError/ValueError)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=timeout) as resp:  # fmt: skip
        return json.load(resp)


async def fetch(url: str, timeout: float = 2.0, token: str | None = None) -> Any | None:
    """:func:`get_json` off the trio thread; None when the node does not answer (or refuses)."""
    try:
        return await trio.to_thread.run_sync(get_json, url, timeout, token)
    except (OSError, ValueError, urllib.error.URLError):
        return None


class Demo:
    """A demo microgrid: prepare, start, watch, stop, verify. Tests drive it step by step."""

    def __init__(self, settings: DemoSettings, out: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.out = out
        self._tmp: str | None = None
        if settings.directory is None:
            self._tmp = tempfile.mkdtemp(prefix="microgrid-demo-")
            self.directory = Path(self._tmp)
        else:
            self.directory = settings.directory
            self.directory.mkdir(parents=True, exist_ok=True)
        self.schedule = Schedule(settings.slot_seconds, settings.gate_lead_seconds,
                                 settings.settle_delay_seconds)  # fmt: skip
        self.households: list[DemoHousehold] = []
        self.sim: MeterSimulator | None = None
        self.clock: SimClock | None = None
        self.started_at: float | None = None
        """Monotonic time :meth:`running` started the nodes."""
        self.dashboard: trio.Process | None = None
        self.token = secrets.token_urlsafe(16)
        self.printed_through: int | None = None
        self.rounds = 0
        self.names: dict[str, str] = {}
        self.spare: list[SpareMeter] = []
        """Simulated meters outside the genesis (:attr:`DemoSettings.spare_meters`)."""

    @property
    def truth_path(self) -> Path:
        """Where the simulator's counters at each slot boundary are written."""
        return self.directory / "truth.jsonl"

    @property
    def feeder_truth_path(self) -> Path:
        """Where the simulated feeder meter's counters at each slot boundary are written."""
        return self.directory / "feeder-truth.jsonl"

    # -- setup ------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Compile the sources; start the meter simulator; write keys, configs and the signed
        genesis."""
        s = self.settings
        await trio.to_thread.run_sync(compile_sources)
        if (self.directory / "genesis.json").exists():
            raise FileExistsError(
                f"{self.directory} already holds a demo; pick another --dir or remove it"
            )
        # every third household without PV or battery: buyers beside the PV sellers
        configs = [
            replace(c, pv_kwp=0.0, battery_kwh=0.0, battery_kw=0.0, initial_export_wh=0.0)
            if i % 3 == 1 else c
            for i, c in enumerate(make_households(s.households + s.spare_meters, s.seed))
        ]  # fmt: skip
        # the spare meters' households draw from the grid: buyers for the PV sellers
        configs[s.households:] = [
            replace(c, pv_kwp=0.0, battery_kwh=0.0, battery_kw=0.0, initial_export_wh=0.0)
            for c in configs[s.households:]
        ]  # fmt: skip
        for number, (kwh, kw) in sorted(s.batteries.items()):
            if not 1 <= number <= s.households or not (kwh > 0 and kw > 0):
                raise ValueError(f"batteries: household {number} of {s.households} with "
                                 f"{kwh} kWh / {kw} kW")  # fmt: skip
            configs[number - 1] = replace(
                configs[number - 1], pv_kwp=0.0, battery_kwh=kwh, battery_kw=kw,
                battery_initial_permille=s.battery_initial_permille, initial_export_wh=0.0,
            )  # fmt: skip
        self.sim = MeterSimulator(configs, seed=s.seed, speed=0, start=SIM_START,
                                  feeder=s.feeder, feeder_device=DEFAULT_FEEDER_DEVICE,
                                  feeder_profile=FEEDER_PROFILE,
                                  host=s.sim_host).start()  # fmt: skip
        sim_port = self.sim.ports[0]
        probe: list[tuple[int, str]] = [(c.device_id, c.profile) for c in configs]
        if self.sim.feeder_device is not None:
            probe.append((self.sim.feeder_device, FEEDER_PROFILE))
        serials = await self._probe_serials(sim_port, probe)
        ports = free_ports(2 * s.households)
        operator_key = self.directory / "operator.key"
        operator = create_key_file(operator_key).signer
        self.spare = [SpareMeter(c.device_id, c.profile, serials[c.device_id])
                      for c in configs[s.households:]]  # fmt: skip
        for i, c in enumerate(configs[: s.households]):
            directory = self.directory / f"h{i + 1}"
            directory.mkdir()
            identity = create_key_file(directory / "node.key")
            h = DemoHousehold(i, f"h{i + 1}", directory, identity.did, str(identity.peer_id),
                          c.device_id, ports[2 * i], ports[2 * i + 1],
                          host=s.hosts[i] if i < len(s.hosts) else "127.0.0.1",
                          prefix=s.node_prefixes[i] if i < len(s.node_prefixes)
                          else (), environment=dict(s.environment.get(i + 1, {})))  # fmt: skip
            if i + 1 in s.batteries:
                h.battery_device = self.sim.battery_device(c.device_id)
            directory.joinpath("microgrid.toml").write_text(
                _node_config(
                    h,
                    s,
                    sim_port,
                    c.profile,
                    self.token,
                    self.sim.feeder_device if i == 0 else None,
                )
            )
            os.chmod(directory / "microgrid.toml", 0o600)
            self.households.append(h)
            self.names[h.did] = h.name
        feeder_rules: dict[str, Any] = {}
        if self.sim.feeder_device is not None:
            # 50 permille of allowed losses against the simulator's 20, 100 Wh of slack
            feeder_rules = {"feeder_serial": serials[self.sim.feeder_device],
                            "feeder_max_power_w": 1_000_000, "feeder_loss_permille": 50,
                            "feeder_tolerance_wh": 100}  # fmt: skip
        market = MarketConfig(
            grid="demo", operator=operator.did, feed_in_tariff=s.feed_in_tariff,
            retail_price=s.retail_price, mechanism="uniform", k=Fraction(1, 2), **feeder_rules,
        )  # fmt: skip
        genesis = create_genesis(
            operator,
            market,
            [(h.did, serials[h.device_id],
              MemberRole.VOTER if h.index < s.voters else MemberRole.LEARNER)
             for h in self.households],
            slot_seconds=s.slot_seconds,
            gate_closure_lead_seconds=s.gate_lead_seconds,
            settle_delay_seconds=s.settle_delay_seconds,
            bootstrap=list(s.bootstrap) if s.bootstrap is not None else
            [f"/ip4/{h.host}/tcp/{h.listen_port}/p2p/{h.peer_id}" for h in self.households],
        )  # fmt: skip
        write_genesis(genesis, self.directory / "genesis.json")
        first_slot = self.schedule.slot_at(time.time())
        self.clock = SimClock(self.sim, self.schedule, s.freeze_seconds, first_slot,
                              self.truth_path, self.feeder_truth_path)  # fmt: skip
        self.clock.step(time.time())

    async def _probe_serials(self, port: int, meters: list[tuple[int, str]]) -> dict[int, str]:
        """Read each simulated meter ``(device id, profile)`` once, over Modbus, for the serial
        the genesis registers."""
        reader = MeterReader([MeterConfig(f"d{device_id}", profile,
                                          TcpEndpoint(self.settings.sim_host, port), device_id)
                              for device_id, profile in meters])  # fmt: skip
        try:
            with trio.fail_after(30):
                results = await reader.poll_all()
        finally:
            reader.close()
        serials = {}
        for device_id, _ in meters:
            r = results[f"d{device_id}"]
            if r.sample is None:
                raise RuntimeError(f"simulated meter {device_id} did not answer: {r.error}")
            serials[device_id] = r.sample.serial
        return serials

    @property
    def operator_key_path(self) -> Path:
        """The grid operator's key file (it signs the genesis and governance records)."""
        return self.directory / "operator.key"

    @property
    def genesis_path(self) -> Path:
        """The signed genesis file."""
        return self.directory / "genesis.json"

    @property
    def meter_endpoint(self) -> str:
        """The simulator's Modbus TCP endpoint, as a config's ``endpoint``."""
        assert self.sim is not None, "prepare() first"
        return f"tcp://{self.settings.sim_host}:{self.sim.ports[0]}"

    def timing_environment(self) -> dict[str, str]:
        """``MICROGRID_*`` overrides giving a node configured outside the demo the demo's
        accelerated meter and Raft timing (what :func:`_node_config` writes for its own)."""
        s = self.settings
        scale = SIM_SLOT_SECONDS / (s.slot_seconds - s.freeze_seconds) * 1.25
        return {
            "MICROGRID_METER_POLL_SECONDS": str(max(1.0, s.slot_seconds / 2)),
            "MICROGRID_METER_TIME_SCALE": f"{scale:.3f}",
            "MICROGRID_READ_DELAY_SECONDS": f"{min(0.3, s.freeze_seconds / 2):.3f}",
            "MICROGRID_RAFT_TICK_SECONDS": str(s.raft_tick_seconds),
            "MICROGRID_RAFT_ELECTION_TICKS": str(s.raft_election_ticks),
            "MICROGRID_RAFT_HEARTBEAT_TICKS": str(s.raft_heartbeat_ticks),
            "MICROGRID_RAFT_SNAPSHOT_ENTRIES": str(s.raft_snapshot_entries),
            "MICROGRID_METRICS_PORT": "0",
            "MICROGRID_LOG_FORMAT": "json",
        }

    def adopt(self, directory: Path, name: str) -> DemoHousehold:
        """Take a household set up outside the demo (its ``microgrid.toml``, key and genesis in
        ``directory``, e.g. by ``microgrid init --genesis ... --peer ... --meter ...``) into the
        demo: started, watched, stopped and verified like the others. Its meter must be one of
        the simulator's (:attr:`spare`)."""
        from node.setup.config import load_config
        from node.setup.keyfile import load_key_file

        config = load_config(directory / "microgrid.toml", environ={})
        identity = load_key_file(config.key_path)
        if len(config.meters) != 1:
            raise ValueError(f"{directory}: expected one [[meters]] table")
        listen_port = int(config.listen.rstrip("/").rsplit("/", 1)[-1])
        h = DemoHousehold(len(self.households), name, directory, identity.did,
                          str(identity.peer_id), config.meters[0].device_id, listen_port,
                          config.api_port, joined=True)  # fmt: skip
        self.households.append(h)
        self.names[h.did] = name
        return h

    def reload_identity(self, h: DemoHousehold) -> None:
        """Read ``h``'s key file again (after the household replaced it: a key rotation)."""
        from node.setup.keyfile import load_key_file

        config_key = h.directory / "node.key"
        if h.joined:
            from node.setup.config import load_config

            config_key = load_config(h.config_path, environ={}).key_path
        identity = load_key_file(config_key)
        h.did, h.peer_id = identity.did, str(identity.peer_id)
        self.names[h.did] = h.name

    async def start_node(self, h: DemoHousehold) -> None:
        """Start (or restart) one household's node process."""
        if h.log is None:
            h.log = (h.directory / "node.log").open("a")
        env = None
        if h.joined or h.environment:
            timing = self.timing_environment() if h.joined else {}
            env = {**os.environ, **timing, **h.environment}
        h.process = await trio.lowlevel.open_process(
            [*h.prefix, sys.executable, *NODE_PYTHON_OPTIONS, "-m", "node.cli", "node", "run",
             "--config", str(h.config_path)],
            stdout=h.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        h.starts += 1

    async def start(
        self, nursery: trio.Nursery, only: Sequence[DemoHousehold] | None = None
    ) -> None:
        """Start the simulator clock, every node (or those in ``only``: tests hold the other
        households' keys) and (unless disabled) the dashboard."""
        assert self.clock is not None
        nursery.start_soon(self.clock.run)
        for i, h in enumerate(self.households if only is None else only):
            if i and self.settings.start_interval > 0:
                await trio.sleep(self.settings.start_interval)
            await self.start_node(h)
        if self.settings.dashboard:
            first = self.households[0]
            log = (self.directory / "dashboard.log").open("a")
            self.dashboard = await trio.lowlevel.open_process(
                [sys.executable, "-m", "node.cli", "dashboard", "--db", first.ledger_url,
                 "--api", first.api, "--port", str(self.settings.dashboard_port),
                 "--refresh", str(max(2, self.settings.slot_seconds // 2)),
                 *(a for h in self.households[1:] for a in ("--node-api", h.api))],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    @contextlib.asynccontextmanager
    async def running(
        self,
        first: int | None = None,
        quiesce_timeout: float | None = None,
        before_start: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[trio.Nursery]:
        """Prepare and start the demo (with ``first``, only the first ``first`` households'
        nodes: tests hold the other households' keys), yielding the nursery its
        tasks run in. On the way out, also on an error or a cancel: every node is stopped
        (:meth:`stop_all`, shielded), the demo's tasks cancelled, any survivor SIGKILLed.
        :meth:`close` stays with the caller, who may still read the ledgers (a temporary
        directory goes with it). :attr:`started_at` is the monotonic time of the start.
        ``before_start`` runs after :meth:`prepare` (directories, configs, genesis written),
        before any node starts (e.g. to mount a household's data directory)."""
        try:
            await self.prepare()
            if before_start is not None:
                await before_start()
            async with trio.open_nursery() as nursery:
                self.started_at = time.monotonic()
                await self.start(nursery, None if first is None else self.households[:first])
                try:
                    yield nursery
                finally:
                    with trio.CancelScope(shield=True):
                        await self.stop_all(quiesce_timeout=quiesce_timeout)
                    nursery.cancel_scope.cancel()
        finally:
            for h in self.households:
                if h.alive:
                    self.kill(h)

    # -- control ----------------------------------------------------------------------------

    def kill(self, h: DemoHousehold) -> None:
        """SIGKILL a node (a crash: nothing is flushed or closed)."""
        if h.alive:
            assert h.process is not None
            h.process.kill()

    async def terminate(self, h: DemoHousehold, timeout: float = 15.0) -> int | None:
        """SIGTERM a node and wait for it to exit (SIGKILL after ``timeout``)."""
        if h.process is None:
            return None
        if h.alive:
            h.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            await h.process.wait()
        if h.alive:
            h.process.kill()
            await h.process.wait()
        return h.process.returncode

    def publications(self, slot: int) -> list[Publication]:
        """When each household publishes its reading and order after ``slot`` ends
        (node/daemon/spread.py): for benchmarks that measure CPU away from them."""
        end = self.schedule.end(slot)
        delay = self.settings.read_delay_seconds
        return [
            publication_times(self.schedule, end, delay, spread_fraction(h.did))
            for h in self.households
        ]

    async def statuses(self, skip: Collection[str] = ()) -> dict[str, dict[str, Any]]:
        """``/status`` of every live node that answers, by household name (not of those named
        in ``skip``)."""
        out: dict[str, dict[str, Any]] = {}

        async def one(h: DemoHousehold) -> None:
            doc = await fetch(h.api + "/status")
            if doc is not None:
                out[h.name] = doc

        async with trio.open_nursery() as nursery:
            for h in self.households:
                if h.alive and h.name not in skip:
                    nursery.start_soon(one, h)
        return out

    async def wait_until(self, predicate: Callable[[dict[str, dict[str, Any]]], bool],
                         timeout: float, interval: float = 0.25,
                         ) -> dict[str, dict[str, Any]]:  # fmt: skip
        """Poll statuses every ``interval`` seconds until ``predicate`` holds (raises
        trio.TooSlowError on timeout). A benchmark polls seldom: every poll is a ``/status``
        request to every node."""
        with trio.fail_after(timeout):
            while True:
                docs = await self.statuses()
                if docs and predicate(docs):
                    return docs
                await trio.sleep(interval)

    def leader_name(self, docs: dict[str, dict[str, Any]]) -> str:
        """The leader as most live nodes see it, by household name."""
        votes: dict[str, int] = {}
        for d in docs.values():
            leader = d["raft"]["leader"]
            if leader:
                votes[leader] = votes.get(leader, 0) + 1
        if not votes:
            return "-"
        best = max(votes, key=lambda k: votes[k])
        return self.names.get(best, best[-8:])

    # -- the live table -----------------------------------------------------------------------

    def header(self) -> str:
        """The table's heading line."""
        feeder = f" {'feeder':>22}" if self.settings.feeder else ""
        return (f"{'round':>5} {'slot':>10} {'price':>5} {'local Wh':>9} {'grid in Wh':>10} "
                f"{'grid out Wh':>11} {'leader':>6} {'height':>6} {'nodes':>5}"
                + feeder)  # fmt: skip

    async def print_new_rounds(self) -> int:
        """Print a row for each slot settled on every live node since the last call."""
        docs = await self.statuses()
        if not docs:
            return 0
        heights = [d["ledger"]["height"] for d in docs.values()]
        common = min(heights)
        source = next(h for h in self.households if h.name in docs)
        since = "" if self.printed_through is None else f"?since={self.printed_through + 1}"
        page = await fetch(source.api + "/slots" + since)
        if page is None:
            return 0
        printed = 0
        checks: dict[int, str] = {}
        if self.settings.feeder:
            with contextlib.suppress(Exception):  # a display column: never stop the demo
                checks = await trio.to_thread.run_sync(feeder_checks, source.ledger_url)
        for row in page["slots"]:
            if not row["settled"] or row["height"] is None or row["height"] > common:
                continue
            if self.printed_through is not None and row["slot"] <= self.printed_through:
                continue
            self.rounds += 1
            printed += 1
            self.printed_through = row["slot"]
            agree = sum(1 for h in heights if h >= row["height"])
            feeder = f" {checks.get(row['slot'], '-'):>22}" if self.settings.feeder else ""
            price = "-" if row["price"] is None else str(row["price"])
            self.out(f"{self.rounds:>5} {row['slot']:>10} {price:>5} {row['local_wh']:>9} "
                     f"{row['grid_import_wh']:>10} {row['grid_export_wh']:>11} "
                     f"{self.leader_name(docs):>6} {row['height']:>6} "
                     f"{agree:>2}/{len(self.households):<2}{feeder}")  # fmt: skip
        return printed

    async def wait_rounds(self, rounds: int, timeout: float) -> None:
        """Print rows until ``rounds`` rounds in all have settled on every live node (raises
        trio.TooSlowError after ``timeout`` seconds)."""
        with trio.fail_after(timeout):
            while self.rounds < rounds:
                await self.print_new_rounds()
                if self.rounds < rounds:
                    await trio.sleep(0.25)

    # -- the end --------------------------------------------------------------------------------

    async def stop_all(self, quiesce_timeout: float | None = None) -> None:
        """Wait (bounded) until the live nodes agree on the ledger height, then stop them all
        at once, and the dashboard."""
        timeout = quiesce_timeout if quiesce_timeout is not None else 3 * self.settings.slot_seconds
        with trio.move_on_after(timeout):
            await self.wait_until(_same_height, timeout)
        async with trio.open_nursery() as nursery:
            for h in self.households:
                nursery.start_soon(self.terminate, h)
        if self.dashboard is not None and self.dashboard.returncode is None:
            self.dashboard.terminate()
            with trio.move_on_after(5):
                await self.dashboard.wait()
            if self.dashboard.returncode is None:
                self.dashboard.kill()
        for h in self.households:
            if h.log is not None:
                h.log.close()
                h.log = None

    def verdict(self) -> DemoVerdict:
        """Verify every ledger and compare their heads."""
        reports = {h.name: verify_ledger(h.ledger_url) for h in self.households}
        bad = {n: r.error for n, r in reports.items() if not r.ok}
        heads = {(r.height, r.head_hash) for r in reports.values()}
        if bad:
            return DemoVerdict(reports, False, f"ledgers failing verification: {bad}")
        if len(heads) != 1:
            return DemoVerdict(reports, False, f"ledgers differ: {sorted(heads, key=str)}")
        ((height, head),) = heads
        if height == 0:
            return DemoVerdict(reports, False, "no slot was settled")
        return DemoVerdict(reports, True, f"all {len(reports)} ledgers verify; height {height}, "
                                      f"head {head}")  # fmt: skip

    def close(self) -> None:
        """Stop the simulator; remove a temporary directory."""
        if self.sim is not None:
            self.sim.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def feeder_checks(ledger_url: str) -> dict[int, str]:
    """Slot -> the recorded feeder check in a ledger, e.g. ``ok +212 Wh`` (the difference
    between the feeder's and the households' net import), or the status alone."""
    from sqlalchemy import create_engine, select

    engine = create_engine(ledger_url)
    try:
        with engine.connect() as conn:
            c = t.feeder_checks.c
            rows = conn.execute(
                select(c.slot, c.status, c.difference_wh).order_by(c.slot.desc()).limit(200)
            )
            return {int(r.slot): r.status if r.difference_wh is None
                    else f"{r.status} {r.difference_wh:+d} Wh" for r in rows}  # fmt: skip
    finally:
        engine.dispose()


def _same_height(docs: dict[str, dict[str, Any]]) -> bool:
    return len({(d["ledger"]["height"], d["ledger"]["head_hash"]) for d in docs.values()}) == 1


async def run_demo(settings: DemoSettings, out: Callable[[str], None] = print) -> int:
    """The ``microgrid demo`` flow; returns the exit code."""
    demo = Demo(settings, out)
    stopped_by_user = False
    try:
        await demo.prepare()
        out(f"demo microgrid: {settings.households} households, {settings.slot_seconds} s slots "
            f"(each a simulated 15 minutes), directory {demo.directory}")  # fmt: skip
        async with trio.open_nursery() as nursery:
            await demo.start(nursery)
            if settings.dashboard:
                out(f"dashboard: http://127.0.0.1:{settings.dashboard_port}/")
            out(f"node APIs: {', '.join(f'{h.name} {h.api}' for h in demo.households)}")
            out(demo.header())
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

                async def watch_signals() -> None:
                    nonlocal stopped_by_user
                    async for _ in signals:
                        stopped_by_user = True
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch_signals)
                while settings.rounds is None or demo.rounds < settings.rounds:
                    await demo.print_new_rounds()
                    for h in demo.households:
                        if h.process is not None and not h.alive:
                            out(f"{h.name} exited with {h.process.returncode}; see "
                                f"{h.directory / 'node.log'}")  # fmt: skip
                            nursery.cancel_scope.cancel()
                    await trio.sleep(0.5)
                nursery.cancel_scope.cancel()
        if stopped_by_user:
            out("stopping…")
        await demo.stop_all()
        verdict = demo.verdict()
        out(("PASS: " if verdict.ok else "FAIL: ") + verdict.message)
        return 0 if verdict.ok else 1
    finally:
        await _shielded_stop(demo)
        if settings.directory is not None:
            out(f"ledgers kept in {settings.directory}/h*/data/ledger.db")
        demo.close()


async def _shielded_stop(demo: Demo) -> None:
    with trio.CancelScope(shield=True):
        for h in demo.households:
            if h.alive:
                await demo.terminate(h, timeout=5)
