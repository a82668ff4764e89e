"""Fuzz the node config loader ``node.setup.config.load_config`` (TOML file + environment).

Contract: only :class:`ConfigError` escapes, in bounded time, for any file bytes and any
``MICROGRID_*`` values; a config that loads holds only sane values (finite positive intervals,
ports in range, a safety share in (0, 1], device ids in 0..247). There is no encoder to round-trip
through, so the loaded values are checked instead; a starter config (``starter_config_toml``)
loads to the values it was written with.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from node.setup.config import (
    ConfigError,
    NodeConfig,
    SerialEndpoint,
    TcpEndpoint,
    load_config,
    starter_config_toml,
)
from tests.fuzz.strategies import fuzz_settings, mutated, raw_bytes

FULL = (
    starter_config_toml(listen="/ip4/0.0.0.0/tcp/4001", api_token="secret")
    + """meter_poll_seconds = 2.5
meter_time_scale = 1.0
read_delay_seconds = 0.5
raft_tick_seconds = 0.25
raft_election_ticks = 20
raft_heartbeat_ticks = 4
raft_snapshot_entries = 5000

[[meters]]
name = "main"
profile = "sdm630"
endpoint = "tcp://192.168.1.50:502"
device_id = 1

[[meters]]
name = "pv"
profile = "em24_rs485"
endpoint = "rtu:///dev/ttyUSB0?baudrate=9600&parity=E&stopbits=1"
device_id = 2

[strategy]
sell_floor = 14
buy_cap = 24
safety = "4/5"
"""
)

TOML_TOKENS = (
    "nan", "+nan", "-nan", "inf", "-inf", "1e999", "-1e999", "0.0", "-0.0", "1e-400",
    "9223372036854775807", "-9223372036854775808", "9" * 4301, "0x7fffffffffffffff", "0b1", "0o7",
    '"1e-99999999"', '"1/0"', '"0/1"', '"-1/2"', '"99/100"', '"1e2"', '"nan"', '"inf"',
    "true", "[]", "{}", "[" * 3000 + "]" * 3000, "{a=" * 2000 + "1" + "}" * 2000,
    '"tcp://[::1"', '"tcp://h:99999"', '"tcp://h:0"', '"rtu://"', '"rtu:///d?baudrate=-1"',
    '"rtu:///d?stopbits=x"', '"rtu:///d?parity=Q"', '"\\u0000"', '"' + "x" * 5000 + '"',
    "1979-05-27T07:32:00Z", "'''\n'''",
)  # fmt: skip
"""TOML value tokens substituted for a setting's value."""


@st.composite
def config_texts(draw: st.DrawFn) -> bytes:
    """The full valid config with one to three values replaced by hostile tokens, or mutated."""
    lines = FULL.splitlines()
    settable = [i for i, line in enumerate(lines) if " = " in line and not line.startswith("#")]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.sampled_from(settable))
        key = lines[i].split(" = ", 1)[0]
        lines[i] = f"{key} = {draw(st.sampled_from(TOML_TOKENS))}"
    text = ("\n".join(lines) + "\n").encode()
    return draw(st.one_of(st.just(text), mutated(text), mutated(FULL.encode()), raw_bytes(512)))


ENV_NAMES = (
    "KEY_PATH", "GENESIS_PATH", "GENESIS", "DATA_DIR", "LISTEN", "PEERS", "METRICS_PORT",
    "METRICS_HOST", "API_PORT", "API_HOST", "API_TOKEN", "MDNS", "LOG_LEVEL", "LOG_FORMAT",
    "METER_POLL_SECONDS", "METER_TIME_SCALE", "READ_DELAY_SECONDS", "RAFT_TICK_SECONDS",
    "RAFT_ELECTION_TICKS", "RAFT_HEARTBEAT_TICKS", "RAFT_SNAPSHOT_ENTRIES",
)  # fmt: skip
ENV_VALUES = st.one_of(
    st.sampled_from(("nan", "inf", "-inf", "1e999", "0", "-1", "1", "65536", "0x10", "1_0",
                     " 5 ", "true", "yes", "", ",", "1e-99999999", "9" * 5000, "\x00")),
    st.text(max_size=20),
)  # fmt: skip


def assert_sane(config: NodeConfig) -> None:
    """Every value a loaded config may hold."""
    for name in ("meter_poll_seconds", "meter_time_scale", "raft_tick_seconds"):
        value = getattr(config, name)
        assert type(value) is float and math.isfinite(value) and value > 0, (name, value)
    assert type(config.read_delay_seconds) is float
    assert math.isfinite(config.read_delay_seconds) and config.read_delay_seconds >= 0
    for name in ("metrics_port", "api_port"):
        assert 0 <= getattr(config, name) <= 65535
    assert 0 < config.raft_heartbeat_ticks < config.raft_election_ticks
    assert config.raft_snapshot_entries > 0
    assert 0 < config.strategy.safety <= 1
    for meter in config.meters:
        assert 0 <= meter.device_id <= 247
        if isinstance(meter.endpoint, TcpEndpoint):
            assert 0 < meter.endpoint.port <= 65535
        else:
            assert isinstance(meter.endpoint, SerialEndpoint) and meter.endpoint.baudrate > 0


def load(text: bytes | None, environ: dict[str, str]) -> NodeConfig | None:
    """load_config from a file holding ``text`` (None: no file); None on a ConfigError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if text is not None:
            path = Path(tmp) / "node.toml"
            path.write_bytes(text)
        try:
            config = load_config(path, environ)
        except ConfigError:
            return None
    assert_sane(config)
    return config


def test_full_config_loads() -> None:
    config = load(FULL.encode(), {})
    assert config is not None and len(config.meters) == 2 and config.api_token == "secret"
    assert config.meter_poll_seconds == 2.5 and config.listen == "/ip4/0.0.0.0/tcp/4001"


@fuzz_settings()
@given(config_texts())
def test_config_file_raises_only_config_error(text: bytes) -> None:
    load(text, {})


@fuzz_settings()
@given(st.dictionaries(st.sampled_from(ENV_NAMES).map(lambda n: "MICROGRID_" + n), ENV_VALUES,
                       max_size=4))  # fmt: skip
def test_environment_overrides_raise_only_config_error(environ: dict[str, str]) -> None:
    load(None, environ)


def _with(setting: str, value: str) -> bytes:
    lines = [f"{setting} = {value}" if line.startswith(f"{setting} = ") else line
             for line in FULL.splitlines()]  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


def test_regressions_found_by_fuzzing_are_config_errors() -> None:
    """Each of these escaped as another exception, loaded a NaN, or took minutes."""
    cases = [
        (_with("meter_poll_seconds", "nan"), {}),  # loaded: trio.sleep(nan) later
        (_with("raft_tick_seconds", "inf"), {}),  # loaded: the node never ticks
        (None, {"MICROGRID_READ_DELAY_SECONDS": "nan"}),
        (None, {"MICROGRID_METER_TIME_SCALE": "1e999"}),
        (_with("peers", "[" * 3000 + "]" * 3000), {}),  # RecursionError from tomllib
        (_with("endpoint", '"tcp://[::1"'), {}),  # ValueError from urlsplit
        (_with("safety", '"1e-99999999"'), {}),  # Fraction() ran for minutes
        (_with("api_port", "9" * 4301), {}),  # ValueError from tomllib (int digits limit)
    ]
    for text, environ in cases:
        assert load(text, environ) is None, (text and text[-200:], environ)
