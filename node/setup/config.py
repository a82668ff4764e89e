"""Node configuration: a small TOML file, overridable by ``MICROGRID_*`` environment variables.

```toml
key_path = "node.key"            # relative paths are relative to this file's directory
genesis_path = "genesis.json"
data_dir = "data"                # ledger.db and raft.db (SQLite) live here
listen = "/ip4/127.0.0.1/tcp/4001"
peers = []                       # extra multiaddrs (with /p2p/ID) besides the genesis bootstrap
metrics_port = 9464              # 0 disables the metrics endpoint
metrics_host = "127.0.0.1"
api_port = 8400                  # local HTTP API (0 disables it)
api_host = "127.0.0.1"
api_token = ""                   # bearer token for state-changing requests ("" refuses them)
mdns = false
hole_punch = true                # behind NAT: upgrade relayed connections by hole punching
liveness_seconds = 30.0          # ping every connected peer this often (2 misses: dropped)
log_level = "INFO"
log_format = "text"              # or "json": one JSON object per line
meter_poll_seconds = 5.0
meter_time_scale = 1.0           # simulated seconds per real second (accelerated simulators)
read_delay_seconds = 0.5         # poll the meter this long after a slot ends
spread_publications = true       # publish reading and order at this household's own offset
raft_tick_seconds = 0.25
raft_election_ticks = 20
raft_heartbeat_ticks = 4
raft_snapshot_entries = 5000     # compact the Raft log after this many applied entries
raft_delegate_learners = true    # learners replicate from voters other than the leader
learner_gossip = false           # as a Raft learner, also receive and forward others' records
clock_max_skew_seconds = 5.0     # clock off the grid's median by more: skewed (docs/node.md)
clock_sample_seconds = 30.0      # compare clocks with each connected member this often
clock_offset_seconds = 0.0       # TESTS AND DRILLS ONLY: shift this node's wall clock

[[meters]]                       # the household's grid-connection meter(s)
name = "main"
profile = "sdm630"               # a shipped profile name or a .toml path
endpoint = "tcp://192.168.1.50:502"   # or "rtu:///dev/ttyUSB0?baudrate=9600&parity=N"
device_id = 1

[feeder]                         # optional: the grid operator's feeder meter (operator node)
name = "feeder"
profile = "sdm630"
endpoint = "tcp://192.168.1.60:502"
device_id = 100
operator_key_path = "operator.key"   # the genesis operator's key (mode 0600)

[[batteries]]                    # optional, at most one: a SunSpec battery inverter (124 + 802)
name = "battery"
endpoint = "tcp://192.168.1.51:502"
device_id = 3
efficiency_permille = 900        # round trip (the register map has none)
horizon_slots = 12               # the planner looks this many slots ahead

[strategy]                       # all optional
sell_floor = 14                  # minor units per kWh
buy_cap = 24
safety = "4/5"                   # share of the forecast surplus offered

[agent]                          # optional: the household's location, for the forecast's
latitude = 52.52                 # clear-sky PV shape (degrees north, -90..90)
longitude = 13.40                # degrees east, -180..180; both or neither
```

Environment overrides (applied after the file) exist for every scalar setting:
``MICROGRID_<SETTING>`` in upper case, e.g. ``MICROGRID_LISTEN``, ``MICROGRID_API_TOKEN``,
``MICROGRID_PEERS`` (comma separated), ``MICROGRID_MDNS`` (true/false/1/0). ``MICROGRID_GENESIS``
is accepted for ``genesis_path``.

``clock_offset_seconds`` (``MICROGRID_CLOCK_OFFSET_SECONDS``) is for tests and drills only: the
node adds it to every wall-clock reading it makes (slots, gossip checks, gate closures, meter
timestamps, its answers to peers' time requests), as if the machine's clock were that far off,
so a test or the nemesis can skew one node of a grid. It logs a warning at startup when set.
Never set it on a real household: a node skewed beyond ``clock_max_skew_seconds`` has its
gossip refused and gives leadership away (docs/node.md, "Clocks").
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from meter.transport import Endpoint, SerialEndpoint, TcpEndpoint
from node.agent.strategy import Strategy

ENV_PREFIX = "MICROGRID_"
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/4001"
DEFAULT_METRICS_PORT = 9464
DEFAULT_API_PORT = 8400


class ConfigError(ValueError):
    """A configuration file or environment override is invalid; names the source and key."""


@dataclass(frozen=True)
class MeterSetting:
    """One Modbus meter of the household."""

    name: str
    profile: str
    endpoint: Endpoint
    device_id: int = 1


@dataclass(frozen=True)
class FeederSetting:
    """The feeder meter this node reads and signs for, as the grid operator (``[feeder]``)."""

    meter: MeterSetting
    operator_key_path: Path
    """The genesis operator's key file (relative paths: to the config file's directory)."""


@dataclass(frozen=True)
class BatterySetting:
    """The household's battery inverter (``[[batteries]]``; docs/node.md, "Batteries")."""

    name: str
    endpoint: Endpoint
    device_id: int = 1
    efficiency_permille: int = 900
    """Round-trip efficiency the planner assumes (SunSpec 124/802 carry none)."""
    horizon_slots: int = 12
    """How many coming slots the planner plans over."""
    max_power_w: int = 50_000
    """A device reporting a larger charge or discharge limit is refused, not believed."""
    max_capacity_wh: int = 1_000_000
    """A device reporting a larger capacity is refused."""
    levels: int = 40
    """State-of-charge steps of the planner's grid (more: finer plans, more CPU)."""
    slot_seconds: float | None = None
    """Seconds of battery time per market slot (default ``slot_seconds`` x
    ``meter_time_scale``; an accelerated simulator whose slots run at another pace sets it)."""


@dataclass(frozen=True)
class AgentSetting:
    """``[agent]``: the household's location for the forecast's clear-sky PV term (docs/node.md,
    "The agent's forecast"); None: no clear-sky term."""

    latitude: float | None = None
    longitude: float | None = None

    @property
    def location(self) -> tuple[float, float] | None:
        """(latitude, longitude), or None when not configured."""
        if self.latitude is None or self.longitude is None:
            return None
        return self.latitude, self.longitude


@dataclass(frozen=True)
class NodeConfig:
    """Where a node finds its key and genesis, where it listens and keeps its data."""

    key_path: Path = Path("node.key")
    genesis_path: Path = Path("genesis.json")
    data_dir: Path = Path("data")
    listen: str = DEFAULT_LISTEN
    peers: tuple[str, ...] = field(default_factory=tuple)
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    api_host: str = "127.0.0.1"
    api_token: str = ""
    mdns: bool = False
    hole_punch: bool = True
    """Behind NAT (the genesis names an operator node): try to replace relayed connections by
    direct ones (DCUtR, docs/network.md). False: stay on the relay."""
    liveness_seconds: float = 30.0
    """Seconds between liveness pings of each connected peer; a connection missing two in a row
    is closed (a home whose public address changed: docs/network.md, "Address changes")."""
    log_level: str = "INFO"
    log_format: str = "text"
    meter_poll_seconds: float = 5.0
    meter_time_scale: float = 1.0
    read_delay_seconds: float = 0.5
    spread_publications: bool = True
    """Publish each slot's reading and next order at this household's own offset after the
    slot end (node/daemon/spread.py) rather than all households at the same instant. False:
    both right after the meter is read."""
    raft_tick_seconds: float = 0.25
    raft_election_ticks: int = 20
    raft_heartbeat_ticks: int = 4
    raft_snapshot_entries: int = 5000
    raft_delegate_learners: bool = True
    """Learners get the committed log from a voter other than the leader (docs/raft.md,
    "Delegated learner replication"). Every node of a grid should agree; set false on every
    node while a grid is upgraded from a release without it (an older node refuses the
    message as malformed)."""
    learner_gossip: bool = False
    """As a Raft learner, take part in the gossip of everyone's records (receive, validate,
    forward) rather than only publishing its own: the voters need every record (any may
    lead), a learner gets them all in the committed log (docs/network.md, "Who gossips
    records"). True costs a learner most of its CPU per round in a large grid."""
    clock_max_skew_seconds: float = 5.0
    """This node's clock off the grid's median by more than this: skewed (docs/node.md)."""
    clock_sample_seconds: float = 30.0
    """How often each connected member's clock is sampled (jittered)."""
    clock_offset_seconds: float = 0.0
    """Tests and drills only: added to every wall-clock reading of the node (see above)."""
    meters: tuple[MeterSetting, ...] = ()
    strategy: Strategy = field(default_factory=Strategy)
    feeder: FeederSetting | None = None
    batteries: tuple[BatterySetting, ...] = ()
    agent: AgentSetting = field(default_factory=AgentSetting)

    @property
    def ledger_url(self) -> str:
        """SQLAlchemy URL of this node's ledger database."""
        return ledger_url(self.data_dir)

    @property
    def raft_url(self) -> str:
        """SQLAlchemy URL of this node's Raft log."""
        return raft_url(self.data_dir)


def ledger_url(data_dir: Path) -> str:
    """SQLAlchemy URL of the ledger database in a node's data directory."""
    return f"sqlite:///{data_dir / 'ledger.db'}"


def raft_url(data_dir: Path) -> str:
    """SQLAlchemy URL of the Raft log in a node's data directory."""
    return f"sqlite:///{data_dir / 'raft.db'}"


_PATHS = {"key_path", "genesis_path", "data_dir"}
_STRINGS = {"listen", "metrics_host", "api_host"}
_PORTS = {"metrics_port", "api_port"}
_POSITIVE_FLOATS = {
    "meter_poll_seconds",
    "meter_time_scale",
    "raft_tick_seconds",
    "clock_max_skew_seconds",
    "clock_sample_seconds",
    "liveness_seconds",
}
MAX_CLOCK_OFFSET = 10 * 365 * 86_400
"""Largest test clock offset accepted (ten years either way)."""
_POSITIVE_INTS = {"raft_election_ticks", "raft_heartbeat_ticks", "raft_snapshot_entries"}
_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
_PARITIES = ("N", "E", "O", "M", "S")
_FRACTION = re.compile(r"[-+]?[0-9]{1,12}(\.[0-9]{1,12})?(/[0-9]{1,12})?")
"""What a strategy.safety may look like: 4/5, 0.8, 1 (bounded, no exponent)."""


def _number(name: str, value: Any, source: str, kind: type) -> Any:
    if isinstance(value, str):
        try:
            value = kind(value)
        except ValueError:
            raise ConfigError(f"{source}: {name} {value!r} is not a number") from None
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{source}: {name} must be {'an integer' if kind is int else 'a number'}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{source}: {name} must be a finite number, not {value}")
    return value


def parse_endpoint(text: str, source: str = "endpoint") -> Endpoint:
    """``tcp://host:port`` or ``rtu:///dev/ttyUSB0?baudrate=9600&parity=N&stopbits=1``."""
    try:
        parts = urlsplit(text)
        parts.hostname  # noqa: B018 - raises ValueError on a malformed [IPv6] host
    except ValueError as exc:
        raise ConfigError(f"{source}: {text!r} is not a valid URL: {exc}") from None
    if parts.scheme == "tcp" and parts.hostname:
        try:
            port = 502 if parts.port is None else parts.port
        except ValueError:
            raise ConfigError(f"{source}: bad port in {text!r}") from None
        if port == 0:
            raise ConfigError(f"{source}: bad port in {text!r}")
        return TcpEndpoint(parts.hostname, port)
    if parts.scheme == "rtu" and parts.path:
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            serial = SerialEndpoint(
                parts.path,
                baudrate=int(query.get("baudrate", 9600)),
                parity=query.get("parity", "N"),
                stopbits=int(query.get("stopbits", 1)),
            )
        except ValueError:
            raise ConfigError(f"{source}: bad serial settings in {text!r}") from None
        if serial.baudrate <= 0 or serial.parity not in _PARITIES or serial.stopbits not in (1, 2):
            raise ConfigError(
                f"{source}: bad serial settings in {text!r} (baudrate > 0, parity one of "
                f"{'/'.join(_PARITIES)}, stopbits 1 or 2)"
            )
        return serial
    raise ConfigError(f"{source}: {text!r} is not tcp://HOST:PORT or rtu:///DEVICE?baudrate=N")


_METER_KEYS = {"name", "profile", "endpoint", "device_id"}


def meter_setting(item: dict[str, Any], where: str) -> MeterSetting:
    """One meter table's ``name``, ``profile``, ``endpoint`` and ``device_id``, checked as the
    config file's are; raises :class:`ConfigError` naming ``where``."""
    for key in ("name", "profile", "endpoint"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise ConfigError(f"{where}: {key} must be a non-empty string")
    device_id = item.get("device_id", 1)
    if type(device_id) is not int or not 0 <= device_id <= 247:
        raise ConfigError(f"{where}: device_id must be an integer in 0..247")
    return MeterSetting(item["name"], item["profile"], parse_endpoint(item["endpoint"], where),
                        device_id)  # fmt: skip


def _meters(value: Any, source: str) -> tuple[MeterSetting, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{source}: meters must be a list of [[meters]] tables")
    out = []
    for i, item in enumerate(value):
        where = f"{source}: meters[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(item) - _METER_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown settings {sorted(unknown)}")
        out.append(meter_setting(item, where))
    if len({m.name for m in out}) != len(out):
        raise ConfigError(f"{source}: meter names must be unique")
    return tuple(out)


def _feeder(value: Any, source: str) -> FeederSetting:
    """``[feeder]``: a meter table like ``[[meters]]`` plus ``operator_key_path`` (kept
    relative here; :func:`load_config` resolves it against the file's directory)."""
    where = f"{source}: feeder"
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [feeder] must be a table")
    unknown = set(value) - _METER_KEYS - {"operator_key_path"}
    if unknown:
        raise ConfigError(f"{where}: unknown settings {sorted(unknown)}")
    key_path = value.get("operator_key_path")
    if not isinstance(key_path, str) or not key_path:
        raise ConfigError(f"{where}: operator_key_path must be a non-empty string path")
    return FeederSetting(meter_setting(value, where), Path(key_path))


_BATTERY_INTS = {"efficiency_permille": (1, 1000), "horizon_slots": (2, 48),
                 "max_power_w": (1, 1_000_000), "max_capacity_wh": (1, 10_000_000),
                 "levels": (4, 64)}  # fmt: skip


def _batteries(value: Any, source: str) -> tuple[BatterySetting, ...]:
    """``[[batteries]]``: at most one table of ``name``, ``endpoint``, ``device_id`` and the
    planner's bounded integers (``_BATTERY_INTS``) and optional ``slot_seconds``."""
    if not isinstance(value, list):
        raise ConfigError(f"{source}: batteries must be a list of [[batteries]] tables")
    if len(value) > 1:
        raise ConfigError(f"{source}: at most one [[batteries]] table (one battery planner)")
    out = []
    for i, item in enumerate(value):
        where = f"{source}: batteries[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(item) - {"name", "endpoint", "device_id", "slot_seconds", *_BATTERY_INTS}
        if unknown:
            raise ConfigError(f"{where}: unknown settings {sorted(unknown)}")
        for key in ("name", "endpoint"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ConfigError(f"{where}: {key} must be a non-empty string")
        device_id = item.get("device_id", 1)
        if type(device_id) is not int or not 0 <= device_id <= 247:
            raise ConfigError(f"{where}: device_id must be an integer in 0..247")
        kwargs: dict[str, Any] = {}
        for key, (low, high) in _BATTERY_INTS.items():
            if key in item:
                if type(item[key]) is not int or not low <= item[key] <= high:
                    raise ConfigError(f"{where}: {key} must be an integer in {low}..{high}")
                kwargs[key] = item[key]
        if "slot_seconds" in item:
            seconds = _number("slot_seconds", item["slot_seconds"], where, float)
            if not 1 <= seconds <= 86_400:
                raise ConfigError(f"{where}: slot_seconds must be in 1..86400")
            kwargs["slot_seconds"] = seconds
        out.append(BatterySetting(item["name"], parse_endpoint(item["endpoint"], where),
                                  device_id, **kwargs))  # fmt: skip
    return tuple(out)


def _strategy(value: Any, source: str) -> Strategy:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [strategy] must be a table")
    allowed = {"sell_floor", "buy_cap", "safety", "min_order_wh", "max_order_wh"}
    unknown = set(value) - allowed
    if unknown:
        raise ConfigError(f"{source}: strategy: unknown settings {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key in ("sell_floor", "buy_cap", "min_order_wh", "max_order_wh"):
        if key in value:
            if type(value[key]) is not int or value[key] < 0:
                raise ConfigError(f"{source}: strategy.{key} must be a non-negative integer")
            kwargs[key] = value[key]
    if "safety" in value:
        text = str(value["safety"]).strip()
        try:
            # No exponents: Fraction("1e-99999999") takes minutes to build its denominator.
            if type(value["safety"]) is bool or not _FRACTION.fullmatch(text):
                raise ValueError(text)
            safety = Fraction(text)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f'{source}: strategy.safety must be a fraction like "4/5"') from None
        if not 0 < safety <= 1:
            raise ConfigError(f"{source}: strategy.safety must be in (0, 1]")
        kwargs["safety"] = safety
    return Strategy(**kwargs)


def _agent(value: Any, source: str) -> AgentSetting:
    """``[agent]``: ``latitude`` (-90..90) and ``longitude`` (-180..180), both or neither."""
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [agent] must be a table")
    unknown = set(value) - {"latitude", "longitude"}
    if unknown:
        raise ConfigError(f"{source}: agent: unknown settings {sorted(unknown)}")
    if ("latitude" in value) != ("longitude" in value):
        raise ConfigError(f"{source}: agent: latitude and longitude go together")
    if not value:
        return AgentSetting()
    lat = _number("agent.latitude", value["latitude"], source, float)
    lon = _number("agent.longitude", value["longitude"], source, float)
    if not -90 <= lat <= 90:
        raise ConfigError(f"{source}: agent.latitude must be within -90..90 degrees, not {lat}")
    if not -180 <= lon <= 180:
        raise ConfigError(f"{source}: agent.longitude must be within -180..180 degrees, not {lon}")
    return AgentSetting(lat, lon)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check and convert one setting's value; ``source`` names the file or env var."""
    if name in _PATHS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {name} must be a non-empty string path")
        return Path(value)
    if name in _STRINGS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {name} must be a non-empty string")
        return value
    if name == "api_token":
        if not isinstance(value, str):
            raise ConfigError(f"{source}: api_token must be a string")
        return value
    if name == "peers":
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise ConfigError(f"{source}: peers must be a list of multiaddr strings")
        return tuple(value)
    if name in _PORTS:
        value = _number(name, value, source, int)
        if not 0 <= value <= 65535:
            raise ConfigError(f"{source}: {name} must be an integer in 0..65535")
        return value
    if name in _POSITIVE_FLOATS or name == "read_delay_seconds":
        value = _number(name, value, source, float)
        if value < 0 or (name in _POSITIVE_FLOATS and value == 0):
            raise ConfigError(f"{source}: {name} must be positive")
        return value
    if name == "clock_offset_seconds":
        value = _number(name, value, source, float)
        if abs(value) > MAX_CLOCK_OFFSET:
            raise ConfigError(f"{source}: {name} must be within ±{MAX_CLOCK_OFFSET} seconds")
        return value
    if name in _POSITIVE_INTS:
        value = _number(name, value, source, int)
        if value <= 0:
            raise ConfigError(f"{source}: {name} must be a positive integer")
        return value
    if name in ("mdns", "hole_punch", "raft_delegate_learners", "spread_publications",
                "learner_gossip"):
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(f"{source}: {name} {value!r} is not a boolean")
            value = lowered in ("1", "true", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be a boolean")
        return value
    if name == "log_level":
        if not isinstance(value, str) or value.upper() not in _LEVELS:
            raise ConfigError(f"{source}: log_level must be one of {sorted(_LEVELS)}")
        return value.upper()
    if name == "log_format":
        if value not in ("text", "json"):
            raise ConfigError(f"{source}: log_format must be \"text\" or \"json\"")
        return value
    if name == "meters":
        return _meters(value, source)
    if name == "strategy":
        return _strategy(value, source)
    if name == "feeder":
        return _feeder(value, source)
    if name == "batteries":
        return _batteries(value, source)
    if name == "agent":
        return _agent(value, source)
    raise ConfigError(f"{source}: unknown setting {name!r}")  # pragma: no cover


def _check(config: NodeConfig, source: str) -> NodeConfig:
    if config.raft_election_ticks <= config.raft_heartbeat_ticks:
        raise ConfigError(f"{source}: raft_election_ticks must exceed raft_heartbeat_ticks")
    if config.feeder is not None and config.feeder.meter.name in {m.name for m in config.meters}:
        raise ConfigError(f"{source}: feeder: name {config.feeder.meter.name!r} is also a "
                          "[[meters]] name; meter names must be unique")
    meter_names = {m.name for m in config.meters} | (
        {config.feeder.meter.name} if config.feeder else set())
    for battery in config.batteries:
        if battery.name in meter_names:
            raise ConfigError(f"{source}: batteries: name {battery.name!r} is also a meter's; "
                              "names must be unique")
    return config


def load_config(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> NodeConfig:
    """Load the TOML file at ``path`` (if given), then apply ``MICROGRID_*`` overrides.

    Relative paths in the file are resolved against the file's directory; relative paths from
    the environment against the current directory.
    """
    environ = os.environ if environ is None else environ
    names = {f.name for f in fields(NodeConfig)}
    config = NodeConfig()
    base = Path.cwd()
    source = "environment"
    if path is not None:
        path = Path(path)
        source = str(path)
        base = path.resolve().parent
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, a 4301-digit integer
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
        unknown = set(doc) - names
        if unknown:
            raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
        values = {k: _coerce(k, v, str(path)) for k, v in doc.items()}
        values = {k: base / v if k in _PATHS else v for k, v in values.items()}
        feeder = values.get("feeder")
        if feeder is not None and not feeder.operator_key_path.is_absolute():
            values["feeder"] = replace(feeder, operator_key_path=base / feeder.operator_key_path)
        config = replace(config, **values)
    overrides = {}
    for name in names - {"meters", "strategy", "feeder", "batteries", "agent"}:
        env = ENV_PREFIX + name.upper()
        if env in environ:
            overrides[name] = _coerce(name, environ[env], env)
    # the env var for genesis_path is documented as MICROGRID_GENESIS_PATH; also accept the
    # shorter MICROGRID_GENESIS
    if "genesis_path" not in overrides and ENV_PREFIX + "GENESIS" in environ:
        overrides["genesis_path"] = _coerce("genesis_path", environ[ENV_PREFIX + "GENESIS"],
                                            ENV_PREFIX + "GENESIS")
    # relative paths from the environment are relative to the current directory (see above)
    overrides = {k: Path.cwd() / v if k in _PATHS else v for k, v in overrides.items()}
    config = replace(config, **overrides)
    config = replace(
        config,
        **{k: (base / getattr(config, k)) for k in _PATHS if not getattr(config, k).is_absolute()},
    )
    return _check(config, source)


PEER_ADDRESS = re.compile(
    r"/(ip4|ip6|dns|dns4|dns6)/[^/\s]{1,253}/tcp/[0-9]{1,5}/p2p/[1-9A-HJ-NP-Za-km-z]{40,64}"
)
"""What a ``peers`` entry written by ``microgrid init --peer`` may look like: a member's
libp2p address with its peer id (``/ip4/192.168.1.20/tcp/4001/p2p/12D3KooW...``)."""


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=True)


def starter_config_toml(
    *,
    listen: str = DEFAULT_LISTEN,
    metrics_port: int = DEFAULT_METRICS_PORT,
    api_port: int = DEFAULT_API_PORT,
    api_token: str = "",
    peers: Sequence[str] = (),
    meter: MeterSetting | None = None,
    meter_endpoint: str = "",
) -> str:
    """The text of a starter config written by ``microgrid init``.

    ``peers``: members to dial besides the genesis bootstrap (a household joining a running
    grid gives one member's address). ``meter`` (with ``meter_endpoint``, its endpoint as the
    user wrote it): an active ``[[meters]]`` table instead of the commented example."""
    peer_list = ", ".join(_toml_string(p) for p in peers)
    if meter is None:
        meters = (
            "# The household's grid-connection meter (see `microgrid meter test`).\n"
            "# [[meters]]\n"
            '# name = "main"\n'
            '# profile = "sdm630"\n'
            '# endpoint = "tcp://192.168.1.50:502"   # or "rtu:///dev/ttyUSB0?baudrate=9600"\n'
            "# device_id = 1\n"
        )
    else:
        meters = (
            "# The household's grid-connection meter (see `microgrid meter test`).\n"
            "[[meters]]\n"
            f"name = {_toml_string(meter.name)}\n"
            f"profile = {_toml_string(meter.profile)}\n"
            f"endpoint = {_toml_string(meter_endpoint)}\n"
            f"device_id = {meter.device_id}\n"
        )
    return (
        "# Microgrid node configuration. Every scalar setting can be overridden by an\n"
        "# environment variable MICROGRID_<SETTING> (e.g. MICROGRID_LISTEN). Relative paths are\n"
        "# relative to this file.\n"
        'key_path = "node.key"\n'
        'genesis_path = "genesis.json"\n'
        'data_dir = "data"\n'
        f"listen = {_toml_string(listen)}\n"
        f"peers = [{peer_list}]\n"
        f"metrics_port = {metrics_port}\n"
        'metrics_host = "127.0.0.1"\n'
        f"api_port = {api_port}\n"
        'api_host = "127.0.0.1"\n'
        f"api_token = {_toml_string(api_token)}   # keep this file private (mode 0600)\n"
        "mdns = false\n"
        'log_level = "INFO"\n'
        'log_format = "text"\n'
        "\n" + meters + "\n"
        "# [strategy]   # limit prices in minor units per kWh; defaults sit inside the tariffs\n"
        "# sell_floor = 14\n"
        "# buy_cap = 24\n"
        '# safety = "4/5"\n'
    )
