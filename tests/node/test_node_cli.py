"""``microgrid node run`` refuses to start with a clear one-line error, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from market.models import MemberRole
from market.signing import Signer
from market.state import MarketConfig
from node.cli.run import account_line
from node.setup.genesis import create_genesis, write_genesis
from node.setup.keyfile import create_key_file


def node_run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "node", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def grid(tmp_path: Path, member: str) -> None:
    operator = Signer.from_seed(b"o" * 32)
    market = MarketConfig(grid="g", operator=operator.did, feed_in_tariff=8, retail_price=30)
    genesis = create_genesis(operator, market, [(member, "SIM1", MemberRole.VOTER)])
    write_genesis(genesis, tmp_path / "genesis.json")


METER = '\n[[meters]]\nname = "main"\nprofile = "sdm630"\nendpoint = "tcp://127.0.0.1:1"\n'


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    """Exit 2 and the file named."""
    result = node_run(tmp_path / "nope.toml")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "nope.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_node_without_meters_is_refused(tmp_path: Path) -> None:
    """Exit 1: a household node trades what it meters."""
    me = create_key_file(tmp_path / "node.key")
    grid(tmp_path, me.did)
    (tmp_path / "microgrid.toml").write_text("metrics_port = 0\napi_port = 0\n")
    result = node_run(tmp_path / "microgrid.toml")
    assert result.returncode == 1, result.stderr
    assert "error: no [[meters]] configured" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_account_line_shows_money_as_currency_and_energy_in_wh() -> None:
    mine = [
        {"account": "household:did:key:z1", "asset": "energy", "amount": -3500},
        {"account": "household:did:key:z1", "asset": "money", "amount": 1207},
    ]
    assert account_line(mine) == (
        "money +12.07, energy -3,500 Wh (net received, settled slots)"
    )
    mine[1]["amount"] = -5
    assert account_line(mine).startswith("money -0.05, ")
    assert account_line([]) == "money +0.00, energy +0 Wh (net received, settled slots)"
