"""Unit tests: key files, DID <-> peer id, the signed genesis, the node config, the CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from market.did import IdentityError
from market.models import MemberRegistration, MemberRole
from market.signing import Signer
from market.state import MarketConfig
from node.cli import main as cli_main
from node.setup.config import ConfigError, NodeConfig, load_config, starter_config_toml
from node.setup.genesis import (
    GenesisFormatError,
    GenesisMemberError,
    GenesisSignatureError,
    create_genesis,
    load_genesis,
    parse_genesis,
    write_genesis,
)
from node.setup.keyfile import (
    KeyFileError,
    NodeIdentity,
    create_key_file,
    did_from_peer_id,
    load_key_file,
    peer_id_from_did,
)

SEED = bytes(range(32))


# -- identity --------------------------------------------------------------------------


def test_libp2p_key_is_the_signing_key() -> None:
    ident = NodeIdentity.from_seed(SEED)
    assert ident.key_pair.public_key.to_bytes() == Signer.from_seed(SEED).public_key
    assert ident.did == Signer.from_seed(SEED).did
    assert str(ident.peer_id).startswith("12D3KooW")
    assert peer_id_from_did(ident.did) == ident.peer_id
    assert did_from_peer_id(ident.peer_id) == ident.did
    # libp2p signatures verify with the market's verifier and vice versa
    payload = b"hello"
    sig = ident.key_pair.private_key.sign(payload)
    assert sig.hex() == ident.signer.sign(payload)


def test_key_file_create_load_mode_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    created = create_key_file(path, SEED)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == SEED
    assert load_key_file(path).did == created.did
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        create_key_file(path)
    assert path.read_bytes() == SEED
    fresh = create_key_file(tmp_path / "other.key")
    assert fresh.did != created.did


def test_key_file_refusals(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_key_file(tmp_path / "missing.key")
    loose = tmp_path / "loose.key"
    loose.write_bytes(SEED)
    os.chmod(loose, 0o644)
    with pytest.raises(KeyFileError, match="too open"):
        load_key_file(loose)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    os.chmod(short, 0o600)
    with pytest.raises(KeyFileError, match="31 bytes"):
        load_key_file(short)


def test_bad_did_is_an_identity_error() -> None:
    with pytest.raises(IdentityError):
        peer_id_from_did("did:web:example.org")


# -- genesis ---------------------------------------------------------------------------

OPERATOR = Signer.from_seed(b"o" * 32)
HOUSES = [Signer.from_seed(bytes([i + 1]) * 32) for i in range(3)]


def _genesis(**kw: object) -> object:
    market = MarketConfig(grid="g", operator=OPERATOR.did, feed_in_tariff=8, retail_price=30)
    return create_genesis(
        OPERATOR, market,
        [(h.did, f"m{i}", MemberRole.VOTER if i < 2 else MemberRole.LEARNER)
         for i, h in enumerate(HOUSES)],
        slot_seconds=60, gate_closure_lead_seconds=10,
        bootstrap=["/ip4/127.0.0.1/tcp/4001/p2p/" + str(NodeIdentity.from_seed(SEED).peer_id)],
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_genesis_round_trip(tmp_path: Path) -> None:
    genesis = _genesis()
    path = tmp_path / "genesis.json"
    write_genesis(genesis, path)  # type: ignore[arg-type]
    loaded = load_genesis(path)
    assert loaded == genesis
    assert loaded.voters == tuple(sorted(h.did for h in HOUSES[:2]))
    assert loaded.is_member(HOUSES[2].did) and not loaded.is_member(OPERATOR.did)
    assert loaded.schedule.gate_time(10) == 590
    with pytest.raises(GenesisFormatError, match="refusing to overwrite"):
        write_genesis(genesis, path)  # type: ignore[arg-type]


def _doc(genesis: object) -> dict:
    return json.loads(genesis.to_json_bytes())  # type: ignore[attr-defined]


def test_genesis_refuses_tampering() -> None:
    doc = _doc(_genesis())
    doc["market"]["retail_price"] = 31
    with pytest.raises(GenesisSignatureError):
        parse_genesis(json.dumps(doc).encode())
    doc = _doc(_genesis())
    doc["signature"] = "00" * 64
    with pytest.raises(GenesisSignatureError):
        parse_genesis(json.dumps(doc).encode())


def test_genesis_refuses_member_not_signed_by_operator() -> None:
    # a genesis correctly signed by the operator, but one registration signed by someone else
    genesis = _genesis()
    rogue = MemberRegistration(
        grid="g", nonce=9, operator=OPERATOR.did, household=Signer.from_seed(b"r" * 32).did,
        meter_serial="mr", role=MemberRole.VOTER,
    ).signed_by(HOUSES[0])  # fmt: skip
    doc = _doc(genesis)
    doc["members"].append({**rogue.unsigned_fields(), "signature": rogue.signature})
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    from market.encoding import canonical_bytes

    doc["signature"] = OPERATOR.sign(canonical_bytes("genesis-file", unsigned))
    with pytest.raises(GenesisMemberError, match="not signed by the operator"):
        parse_genesis(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("bootstrap"), "missing or unexpected"),
        (lambda d: d.__setitem__("slot_seconds", 1.5), "floats"),
        (lambda d: d["market"].__setitem__("k", "1/0"), "market"),
        (lambda d: d["members"][0].__setitem__("role", "king"), "members"),
        (lambda d: d.__setitem__("extra", 1), "unexpected"),
    ],
)
def test_genesis_format_errors(mutate: object, match: str) -> None:
    doc = _doc(_genesis())
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(GenesisFormatError, match=match):
        parse_genesis(json.dumps(doc).encode())
    with pytest.raises(GenesisFormatError):
        parse_genesis(b"not json")


def test_genesis_requires_p2p_bootstrap() -> None:
    with pytest.raises(GenesisFormatError, match="/p2p/"):
        create_genesis(
            OPERATOR,
            MarketConfig(grid="g", operator=OPERATOR.did, feed_in_tariff=8, retail_price=30),
            [(HOUSES[0].did, "m", MemberRole.VOTER)],
            bootstrap=["/ip4/127.0.0.1/tcp/1"],
        )


# -- config ----------------------------------------------------------------------------


def test_config_file_and_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "microgrid.toml"
    path.write_text(starter_config_toml(listen="/ip4/127.0.0.1/tcp/5000", metrics_port=0))
    config = load_config(path, environ={})
    assert config.listen == "/ip4/127.0.0.1/tcp/5000"
    assert config.key_path == tmp_path / "node.key"
    assert config.metrics_port == 0 and config.metrics_host == "127.0.0.1"
    env = {
        "MICROGRID_LISTEN": "/ip4/127.0.0.1/tcp/6000",
        "MICROGRID_METRICS_PORT": "9999",
        "MICROGRID_MDNS": "true",
        "MICROGRID_PEERS": "/ip4/127.0.0.1/tcp/1/p2p/a, /ip4/127.0.0.1/tcp/2/p2p/b",
        "MICROGRID_KEY_PATH": "/etc/microgrid/node.key",
    }
    config = load_config(path, environ=env)
    assert config.listen == "/ip4/127.0.0.1/tcp/6000" and config.metrics_port == 9999
    assert config.mdns is True and len(config.peers) == 2
    assert config.key_path == Path("/etc/microgrid/node.key")
    assert load_config(None, environ={}) .listen == NodeConfig().listen


@pytest.mark.parametrize(
    "text, env, match",
    [
        ("bogus = 1\n", {}, "unknown settings"),
        ("metrics_port = 'x'\n", {}, "metrics_port"),
        ("listen = \n", {}, "invalid TOML"),
        ("", {"MICROGRID_METRICS_PORT": "70000"}, "MICROGRID_METRICS_PORT"),
        ("", {"MICROGRID_MDNS": "maybe"}, "MICROGRID_MDNS"),
        ("", {"MICROGRID_LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, env: dict, match: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, environ=env)


# -- CLI -------------------------------------------------------------------------------


def test_cli_init_and_genesis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["init", "--dir", str(tmp_path / "op")]) == 0
    assert cli_main(["init", "--dir", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "12D3KooW" in out and "did:key:z6Mk" in out
    assert cli_main(["init", "--dir", str(tmp_path / "h")]) == 2  # refuses to overwrite
    assert "refusing to overwrite" in capsys.readouterr().err
    # the identity of an existing key, from the key or through the config
    assert cli_main(["identity", "--key", str(tmp_path / "h" / "node.key")]) == 0
    by_key = capsys.readouterr().out
    assert cli_main(["identity", "--config", str(tmp_path / "h" / "microgrid.toml")]) == 0
    by_config = capsys.readouterr().out
    did = load_key_file(tmp_path / "h" / "node.key").did
    assert f"did:key: {did}" in by_key and by_key == by_config
    assert cli_main(["identity", "--key", str(tmp_path / "nope.key")]) == 2
    assert "does not exist" in capsys.readouterr().err
    config = load_config(tmp_path / "h" / "microgrid.toml", environ={})
    did = load_key_file(config.key_path).did
    rc = cli_main([
        "genesis", "create", "--operator-key", str(tmp_path / "op" / "node.key"), "--grid", "g1",
        "--member", f"{did},meter-1,voter", "--feed-in-tariff", "8", "--retail-price", "30",
        "--slot-seconds", "60", "--out", str(config.genesis_path),
    ])  # fmt: skip
    assert rc == 0
    genesis = load_genesis(config.genesis_path)
    assert genesis.is_member(did) and genesis.slot_seconds == 60
    assert cli_main(["genesis", "show", str(config.genesis_path)]) == 0
    assert did in capsys.readouterr().out
