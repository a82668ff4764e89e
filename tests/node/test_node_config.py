"""node/setup/config.py: meters, strategy, API settings, MICROGRID_* overrides and their errors.

tests/net/test_identity_genesis_config.py covers the basics (listen, metrics, peers, mdns,
key_path overrides; unknown top-level keys, invalid TOML, bad metrics port, mdns, log level).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from meter.transport import SerialEndpoint, TcpEndpoint
from node.agent.strategy import Strategy
from node.setup.config import (
    ConfigError,
    MeterSetting,
    NodeConfig,
    load_config,
    parse_endpoint,
    starter_config_toml,
)

METERS = """
[[meters]]
name = "main"
profile = "sdm630"
endpoint = "tcp://192.168.1.50:1502"
device_id = 7

[[meters]]
name = "pv"
profile = "/etc/microgrid/my-meter.toml"
endpoint = "rtu:///dev/ttyUSB0?baudrate=19200&parity=E&stopbits=2"

[[meters]]
name = "gateway"
profile = "em24_ethernet"
endpoint = "tcp://meter.local"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "microgrid.toml"
    path.write_text(text)
    return path


def test_meters_with_tcp_and_rtu_endpoints(tmp_path: Path) -> None:
    """[[meters]] tables become MeterSettings; endpoints parse, default port 502 and device 1."""
    config = load_config(write(tmp_path, METERS), environ={})
    assert config.meters == (
        MeterSetting("main", "sdm630", TcpEndpoint("192.168.1.50", 1502), 7),
        MeterSetting("pv", "/etc/microgrid/my-meter.toml",
                     SerialEndpoint("/dev/ttyUSB0", baudrate=19200, parity="E", stopbits=2), 1),
        MeterSetting("gateway", "em24_ethernet", TcpEndpoint("meter.local", 502), 1),
    )  # fmt: skip
    assert parse_endpoint("rtu:///dev/ttyAMA0") == SerialEndpoint("/dev/ttyAMA0", 9600, "N", 1)


def test_strategy_and_api_settings(tmp_path: Path) -> None:
    """[strategy] and the api_* settings load with their types; omitted ones keep defaults."""
    text = (
        'api_port = 8411\napi_host = "127.0.0.2"\napi_token = "tok"\n'
        "raft_tick_seconds = 1\nread_delay_seconds = 0\n"
        '[strategy]\nsell_floor = 12\nbuy_cap = 26\nsafety = "2/3"\nmin_order_wh = 50\n'
    )
    config = load_config(write(tmp_path, text), environ={})
    assert (config.api_port, config.api_host, config.api_token) == (8411, "127.0.0.2", "tok")
    assert config.raft_tick_seconds == 1.0 and type(config.raft_tick_seconds) is float
    assert config.read_delay_seconds == 0.0
    assert config.strategy == Strategy(sell_floor=12, buy_cap=26, safety=Fraction(2, 3),
                                       min_order_wh=50)  # fmt: skip
    assert config.strategy.max_order_wh == Strategy().max_order_wh
    # a TOML float is read exactly as its decimal text
    config = load_config(write(tmp_path, "[strategy]\nsafety = 0.8\n"), environ={})
    assert config.strategy.safety == Fraction(4, 5)
    assert load_config(None, environ={}).strategy == Strategy()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """MICROGRID_<NAME> overrides the file's value and is converted to the setting's type."""
    path = write(tmp_path, 'api_token = "from-file"\napi_port = 8400\nraft_tick_seconds = 0.25\n')
    env = {
        "MICROGRID_API_TOKEN": "from-env",
        "MICROGRID_API_PORT": "0",
        "MICROGRID_RAFT_TICK_SECONDS": "0.05",
        "MICROGRID_RAFT_ELECTION_TICKS": "30",
        "MICROGRID_LOG_FORMAT": "json",
        "MICROGRID_LOG_LEVEL": "debug",
        "MICROGRID_METER_TIME_SCALE": "60",
        "MICROGRID_RAFT_DELEGATE_LEARNERS": "false",
    }
    assert load_config(path, environ={}).raft_delegate_learners is True
    config = load_config(path, environ=env)
    assert config.raft_delegate_learners is False
    assert config.api_token == "from-env" and config.api_port == 0
    assert config.raft_tick_seconds == 0.05 and config.raft_election_ticks == 30
    assert (config.log_format, config.log_level) == ("json", "DEBUG")
    assert config.meter_time_scale == 60.0
    # unrelated variables and the file's other settings are untouched
    assert load_config(path, environ={"MICROGRID_NOPE": "1"}).api_token == "from-file"


def test_genesis_env_alias_and_relative_env_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MICROGRID_GENESIS is an alias (MICROGRID_GENESIS_PATH wins); relative paths from the file
    resolve against its directory, those from the environment against the current directory."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = conf_dir / "microgrid.toml"
    path.write_text('data_dir = "state"\n')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = load_config(path, environ={"MICROGRID_GENESIS": "g.json"})
    assert config.data_dir == conf_dir / "state"
    assert config.key_path == conf_dir / "node.key"  # default, relative to the file
    assert config.genesis_path == work / "g.json"
    config = load_config(path, environ={"MICROGRID_GENESIS": "a.json",
                                        "MICROGRID_GENESIS_PATH": "b.json",
                                        "MICROGRID_DATA_DIR": "var"})  # fmt: skip
    assert config.genesis_path == work / "b.json" and config.data_dir == work / "var"


def test_starter_config_loads_back(tmp_path: Path) -> None:
    """starter_config_toml() loads with its arguments; its commented examples are valid too."""
    text = starter_config_toml(listen="/ip4/0.0.0.0/tcp/4101", metrics_port=0, api_port=8499,
                               api_token="s3cret-token")  # fmt: skip
    config = load_config(write(tmp_path, text), environ={})
    assert config.listen == "/ip4/0.0.0.0/tcp/4101"
    assert (config.metrics_port, config.api_port, config.api_token) == (0, 8499, "s3cret-token")
    assert config.genesis_path == tmp_path / "genesis.json"
    assert config.data_dir == tmp_path / "data"
    assert config.meters == () and config.strategy == Strategy()
    # uncomment the example [[meters]] and [strategy] sections
    lines = [line[2:] if line.startswith(("# [", "# name", "# profile", "# endpoint",
                                          "# device_id", "# sell_floor", "# buy_cap",
                                          "# safety")) else line
             for line in text.splitlines()]  # fmt: skip
    config = load_config(write(tmp_path, "\n".join(lines)), environ={})
    assert config.meters == (MeterSetting("main", "sdm630", TcpEndpoint("192.168.1.50", 502)),)
    assert config.strategy == Strategy(sell_floor=14, buy_cap=24, safety=Fraction(4, 5))


METER = '[[meters]]\nname = "main"\nprofile = "sdm630"\nendpoint = "tcp://h:502"\n'


@pytest.mark.parametrize(
    "text, match",
    [
        (METER + "baud = 9600\n", r"meters\[0\]: unknown settings \['baud'\]"),
        (METER + METER, "meter names must be unique"),
        (METER + "device_id = 248\n", r"meters\[0\]: device_id must be an integer in 0\.\.247"),
        (METER + 'device_id = "1"\n', "device_id must be an integer"),
        (METER + "device_id = true\n", "device_id must be an integer"),
        (METER.replace("tcp://h:502", "http://h:502"), "'http://h:502' is not tcp://HOST:PORT"),
        (METER.replace("tcp://h:502", "tcp://h:99999"), "bad port in 'tcp://h:99999'"),
        (METER.replace("tcp://h:502", "tcp://h:0"), "bad port in 'tcp://h:0'"),
        (METER.replace("tcp://h:502", "rtu:///dev/x?baudrate=fast"), "bad serial settings"),
        (METER.replace("tcp://h:502", "rtu:///dev/x?parity=X"), "bad serial settings"),
        (METER.replace("tcp://h:502", "rtu:///dev/x?stopbits=3"), "bad serial settings"),
        (METER.replace('profile = "sdm630"\n', ""), r"meters\[0\]: profile must be a non-empty"),
        ('meters = "main"\n', "meters must be a list"),
        ("[strategy]\nsafety = 0\n", r"strategy\.safety must be in \(0, 1\]"),
        ('[strategy]\nsafety = "3/2"\n', r"strategy\.safety must be in \(0, 1\]"),
        ('[strategy]\nsafety = "-1/5"\n', r"strategy\.safety must be in \(0, 1\]"),
        ('[strategy]\nsafety = "most"\n', "strategy.safety must be a fraction"),
        ('[strategy]\nsafety = "1/0"\n', "strategy.safety must be a fraction"),
        ("[strategy]\nbuy_cap = -1\n", "strategy.buy_cap must be a non-negative integer"),
        ("[strategy]\ngreed = 1\n", r"strategy: unknown settings \['greed'\]"),
        ("raft_election_ticks = 4\nraft_heartbeat_ticks = 4\n", "must exceed raft_heartbeat"),
        ("raft_election_ticks = 3\nraft_heartbeat_ticks = 4\n", "must exceed raft_heartbeat"),
        ("raft_heartbeat_ticks = 0\n", "raft_heartbeat_ticks must be a positive integer"),
        ("api_port = -1\n", r"api_port must be an integer in 0\.\.65535"),
        ("api_port = true\n", "api_port must be an integer"),
        ("api_token = 5\n", "api_token must be a string"),
        ("raft_tick_seconds = 0\n", "raft_tick_seconds must be positive"),
        ("read_delay_seconds = -0.5\n", "read_delay_seconds must be positive"),
        ('log_format = "xml"\n', "log_format must be"),
    ],
)
def test_config_file_errors(tmp_path: Path, text: str, match: str) -> None:
    """Each bad setting raises ConfigError naming the file and the setting."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    "env, match",
    [
        ({"MICROGRID_API_PORT": "-1"}, r"MICROGRID_API_PORT: api_port must be an integer in 0"),
        ({"MICROGRID_API_PORT": "80.5"}, "MICROGRID_API_PORT: api_port '80.5' is not a number"),
        ({"MICROGRID_RAFT_TICK_SECONDS": "0"}, "MICROGRID_RAFT_TICK_SECONDS: raft_tick_seconds"),
        ({"MICROGRID_RAFT_TICK_SECONDS": "fast"}, "'fast' is not a number"),
        ({"MICROGRID_RAFT_ELECTION_TICKS": "4"}, "must exceed raft_heartbeat_ticks"),
        ({"MICROGRID_DATA_DIR": ""}, "MICROGRID_DATA_DIR: data_dir must be a non-empty"),
        ({"MICROGRID_RAFT_DELEGATE_LEARNERS": "maybe"}, "'maybe' is not a boolean"),
    ],
)
def test_environment_errors(tmp_path: Path, env: dict[str, str], match: str) -> None:
    """A bad MICROGRID_* value raises ConfigError naming the variable (or the check)."""
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, ""), environ=env)


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a file, the defaults apply and relative paths resolve against the current dir."""
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={})
    assert config.data_dir == tmp_path / "data"
    assert config.ledger_url == f"sqlite:///{tmp_path / 'data' / 'ledger.db'}"
    assert config.raft_url == f"sqlite:///{tmp_path / 'data' / 'raft.db'}"
    defaults = NodeConfig()
    assert (config.api_port, config.api_token, config.meters) == (
        defaults.api_port, "", ()
    )
