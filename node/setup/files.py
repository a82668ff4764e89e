"""Loading a node's three files: its config, its key and the grid's genesis."""

from __future__ import annotations

from pathlib import Path

from node.setup.config import NodeConfig, load_config
from node.setup.genesis import Genesis, load_genesis
from node.setup.keyfile import NodeIdentity, load_key_file


def load_node_files(
    config_path: Path | None,
) -> tuple[NodeConfig, NodeIdentity, Genesis]:
    """A node's config, key and verified genesis; raises ConfigError, KeyFileError or
    GenesisError naming the file."""
    config = load_config(config_path)
    return config, load_key_file(config.key_path), load_genesis(config.genesis_path)
