"""Node configuration: a small TOML file, overridable by ``MICROGRID_*`` environment variables.

```toml
key_path = "node.key"            # relative paths are relative to this file's directory
genesis_path = "genesis.json"
data_dir = "data"
listen = "/ip4/127.0.0.1/tcp/4001"
peers = []                       # extra multiaddrs (with /p2p/ID) besides the genesis bootstrap
metrics_port = 9464              # 0 disables the metrics endpoint
metrics_host = "127.0.0.1"
mdns = false
log_level = "INFO"
```

Environment overrides (applied after the file): ``MICROGRID_KEY_PATH``, ``MICROGRID_GENESIS_PATH``,
``MICROGRID_DATA_DIR``, ``MICROGRID_LISTEN``, ``MICROGRID_PEERS`` (comma separated),
``MICROGRID_METRICS_PORT``, ``MICROGRID_METRICS_HOST``, ``MICROGRID_MDNS`` (true/false/1/0),
``MICROGRID_LOG_LEVEL``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "MICROGRID_"
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/4001"
DEFAULT_METRICS_PORT = 9464


class ConfigError(ValueError):
    """A configuration file or environment override is invalid; names the source and key."""


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
    mdns: bool = False
    log_level: str = "INFO"


_PATHS = {"key_path", "genesis_path", "data_dir"}
_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check and convert one setting's value; ``source`` names the file or env var."""
    if name in _PATHS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {name} must be a non-empty string path")
        return Path(value)
    if name in ("listen", "metrics_host"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {name} must be a non-empty string")
        return value
    if name == "peers":
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise ConfigError(f"{source}: peers must be a list of multiaddr strings")
        return tuple(value)
    if name == "metrics_port":
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{source}: metrics_port {value!r} is not an integer") from None
        if type(value) is not int or not 0 <= value <= 65535:
            raise ConfigError(f"{source}: metrics_port must be an integer in 0..65535")
        return value
    if name == "mdns":
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(f"{source}: mdns {value!r} is not a boolean")
            value = lowered in ("1", "true", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: mdns must be a boolean")
        return value
    if name == "log_level":
        if not isinstance(value, str) or value.upper() not in _LEVELS:
            raise ConfigError(f"{source}: log_level must be one of {sorted(_LEVELS)}")
        return value.upper()
    raise ConfigError(f"{source}: unknown setting {name!r}")  # pragma: no cover


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
    if path is not None:
        path = Path(path)
        base = path.resolve().parent
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        unknown = set(doc) - names
        if unknown:
            raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
        values = {k: _coerce(k, v, str(path)) for k, v in doc.items()}
        values = {k: base / v if k in _PATHS else v for k, v in values.items()}
        config = replace(config, **values)
    overrides = {}
    for name in names:
        env = ENV_PREFIX + name.upper()
        if env in environ:
            overrides[name] = _coerce(name, environ[env], env)
    # the env var for genesis_path is documented as MICROGRID_GENESIS_PATH; also accept the
    # shorter MICROGRID_GENESIS
    if "genesis_path" not in overrides and ENV_PREFIX + "GENESIS" in environ:
        overrides["genesis_path"] = _coerce("genesis_path", environ[ENV_PREFIX + "GENESIS"],
                                            ENV_PREFIX + "GENESIS")
    config = replace(config, **overrides)
    return replace(
        config,
        **{k: (base / getattr(config, k)) for k in _PATHS if not getattr(config, k).is_absolute()},
    )


def starter_config_toml(
    *, listen: str = DEFAULT_LISTEN, metrics_port: int = DEFAULT_METRICS_PORT
) -> str:
    """The text of a starter config written by ``microgrid init``."""
    return (
        "# Microgrid node configuration. Every setting can be overridden by an environment\n"
        "# variable MICROGRID_<SETTING> (e.g. MICROGRID_LISTEN). Relative paths are relative\n"
        "# to this file.\n"
        'key_path = "node.key"\n'
        'genesis_path = "genesis.json"\n'
        'data_dir = "data"\n'
        f'listen = "{listen}"\n'
        "peers = []\n"
        f"metrics_port = {metrics_port}\n"
        'metrics_host = "127.0.0.1"\n'
        "mdns = false\n"
        'log_level = "INFO"\n'
    )
