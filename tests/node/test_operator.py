"""The operator node: its config, its admission by the genesis, the CLI, and a running node in
process (relay hop, Raft learner, /status, a supervised archive child stopped with the node)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import trio

from market import MarketConfig
from market.models import MemberRole
from market.signing import Signer
from node.daemon.household_node import NodeError
from node.daemon.operator_node import (
    OperatorConfigError,
    OperatorNode,
    check_admitted,
    load_operator_config,
)
from node.setup.genesis import Genesis, create_genesis, write_genesis
from node.setup.keyfile import NodeIdentity
from node.testing.harness import free_ports, named_seed

REPO = Path(__file__).resolve().parents[2]


def ident(name: str) -> NodeIdentity:
    return NodeIdentity.from_seed(named_seed(f"operator-test/{name}"))


def genesis_for(op_node: NodeIdentity | None, port: int = 4001) -> Genesis:
    operator = Signer.from_seed(named_seed("operator-test/operator-key"))
    market = MarketConfig(grid="op-grid", operator=operator.did, feed_in_tariff=8,
                          retail_price=30)  # fmt: skip
    homes = [ident("h0"), ident("h1")]
    boot = [] if op_node is None else [f"/ip4/127.0.0.1/tcp/{port}/p2p/{op_node.peer_id}"]
    return create_genesis(operator, market,
                          [(h.did, f"m{i}", MemberRole.VOTER) for i, h in enumerate(homes)],
                          bootstrap=boot)  # fmt: skip


def write_key(path: Path, seed: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, seed)
    os.close(fd)


def test_config_paths_sections_and_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "operator.toml"
    cfg.write_text('key_path = "k/node.key"\nlisten = "/ip4/0.0.0.0/tcp/4001"\napi_port = 0\n'
                   '[dashboard]\nport = 8051\nargs = ["--refresh", "10"]\n'
                   '[archive]\ninterval = 2\n')  # fmt: skip
    config = load_operator_config(cfg, {"MICROGRID_ARCHIVE_URL": "postgresql://a@db/g",
                                        "MICROGRID_OPERATOR_API_PORT": "8401"})  # fmt: skip
    assert config.key_path == tmp_path / "k" / "node.key"
    assert config.api_port == 8401
    assert config.dashboard is not None and config.dashboard.port == 8051
    assert config.dashboard.args == ("--refresh", "10")
    assert config.archive is not None and config.archive.url == "postgresql://a@db/g"
    assert config.archive.interval == 2.0
    assert config.operator_key_path is None
    assert config.ledger_url.endswith("data/ledger.db")


@pytest.mark.parametrize(("text", "error"), [
    ("nonsense = 1\n", "unknown settings"),
    ("api_port = 70000\n", "api_port"),
    ("raft_tick_seconds = -1\n", "positive"),
    ("peers = \"x\"\n", "peers"),
    ("[archive]\ninterval = 2\n", "url"),
    ("[dashboard]\nport = 0\n", "port"),
    ("log_format = \"xml\"\n", "log_format"),
    ("key_path = 1\n", "key_path"),
    ("listen = [\n", "invalid TOML"),
])  # fmt: skip
def test_config_refusals(tmp_path: Path, text: str, error: str) -> None:
    cfg = tmp_path / "operator.toml"
    cfg.write_text(text)
    with pytest.raises(OperatorConfigError, match=error):
        load_operator_config(cfg, {})


def test_admission_by_the_genesis() -> None:
    op = ident("op-node")
    check_admitted(op, genesis_for(op))  # named in the bootstrap list: fine
    with pytest.raises(NodeError, match="not named in the genesis"):
        check_admitted(op, genesis_for(None))
    with pytest.raises(NodeError, match="is a household"):
        check_admitted(ident("h0"), genesis_for(op))


def test_cli_refuses_a_node_the_genesis_does_not_name(tmp_path: Path) -> None:
    write_key(tmp_path / "node.key", named_seed("operator-test/stranger"))
    write_genesis(genesis_for(ident("op-node")), tmp_path / "genesis.json")
    (tmp_path / "operator.toml").write_text("api_port = 0\n")
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "operator", "run", "--config",
         str(tmp_path / "operator.toml")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "not named in the genesis" in out.stderr
    assert not (tmp_path / "data").exists()  # refused before any store was opened


async def test_operator_node_runs_as_relay_and_learner_with_an_archive_child(
    tmp_path: Path,
) -> None:
    op = ident("op-node")
    port, api = free_ports(2)
    seed = named_seed("operator-test/op-node")
    write_key(tmp_path / "node.key", seed)
    write_genesis(genesis_for(op, port), tmp_path / "genesis.json")
    (tmp_path / "operator.toml").write_text(
        f'listen = "/ip4/127.0.0.1/tcp/{port}"\napi_port = {api}\n'
        f'[archive]\nurl = "sqlite:///{tmp_path / "archive.db"}"\ninterval = 1\n'
    )
    config = load_operator_config(tmp_path / "operator.toml", {})
    from node.setup.genesis import load_genesis

    node = OperatorNode(config, op, load_genesis(tmp_path / "genesis.json"))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            try:

                def get() -> dict:
                    url = f"http://127.0.0.1:{node.api_port}/status"
                    with urllib.request.urlopen(url, timeout=5) as resp:
                        return json.load(resp)

                doc = await trio.to_thread.run_sync(get)
                assert doc["role"] == "operator"
                assert doc["raft"]["learner"] is True
                assert doc["holds_operator_key"] is False
                assert doc["connectivity"]["relay"]["hop"] is True
                assert [p["up"] for p in doc["peers"]] == [False, False]
                child = node.children[0]
                with trio.fail_after(20):
                    while not child.status()["running"]:
                        await trio.sleep(0.1)
                pid = child.status()["pid"]
            finally:
                node.stop()
    # the child went with the node
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
