"""CLI: ``microgrid init``, ``identity`` and ``genesis create|show``: setting a household up."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

from market.bounds import MAX_POWER_W, bounded_int
from market.did import IdentityError, public_key_from_did
from market.models import MemberRole
from market.state import MarketConfig
from node.setup.config import (
    PEER_ADDRESS,
    ConfigError,
    MeterSetting,
    load_config,
    meter_setting,
    starter_config_toml,
)
from node.setup.genesis import Genesis, GenesisError, create_genesis, load_genesis, write_genesis
from node.setup.keyfile import KeyFileError, create_key_file, load_key_file

CONFIG_NAME = "microgrid.toml"
KEY_NAME = "node.key"


def register(subparsers: Any) -> None:
    """Add ``init``, ``identity`` and ``genesis`` to the ``microgrid`` command."""
    p = subparsers.add_parser("init", help="create this household's key and a starter config")
    p.add_argument("--dir", type=Path, default=Path("."), help="node directory (default: .)")
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/4001", help="listen multiaddr")
    p.add_argument("--metrics-port", type=int, default=9464)
    p.add_argument("--api-port", type=int, default=8400, help="the node's API port (127.0.0.1)")
    j = p.add_argument_group(
        "joining a grid",
        "a household joining a running grid: the operator's genesis file, the address of any "
        "member to dial and the household's meter (docs/governance.md, 'Joining a running grid')",
    )
    j.add_argument(
        "--genesis",
        type=Path,
        default=None,
        help="the grid's genesis file: verified and copied into the directory",
    )
    j.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="a member's address with its peer id, /ip4/.../tcp/PORT/p2p/12D3KooW...; repeatable",
    )
    j.add_argument(
        "--meter",
        default=None,
        metavar="ENDPOINT",
        help="the household's meter: tcp://HOST:PORT or rtu:///dev/ttyUSB0?baudrate=N",
    )
    j.add_argument("--meter-profile", default="sdm630", help="its profile (default sdm630)")
    j.add_argument("--meter-device-id", type=int, default=1, help="its Modbus device id")
    p.set_defaults(func=cmd_init)

    i = subparsers.add_parser("identity", help="print the peer id and did:key of a key file")
    i.add_argument("--key", type=Path, default=None, help="key file (default: the config's)")
    i.add_argument("--config", type=Path, default=None, help="node config (microgrid.toml)")
    i.set_defaults(func=cmd_identity)

    g = subparsers.add_parser("genesis", help="create or inspect a signed genesis file")
    gs = g.add_subparsers(dest="genesis_command", metavar="ACTION")
    gs.required = True
    c = gs.add_parser("create", help="build a genesis and sign it with the operator's key")
    c.add_argument("--operator-key", type=Path, required=True, help="operator's key file")
    c.add_argument("--grid", required=True, help="grid id")
    c.add_argument(
        "--member", action="append", default=[], metavar="DID,METER,ROLE[,MAX_W]",
        help="a member household: did:key, meter serial, voter|learner and optionally the "
        "meter's rated power in W (default 50000); repeatable",
    )  # fmt: skip
    c.add_argument("--feed-in-tariff", type=int, required=True, help="minor units per kWh")
    c.add_argument("--retail-price", type=int, required=True, help="minor units per kWh")
    c.add_argument(
        "--grid-fee",
        type=int,
        default=0,
        help="grid fee per kWh imported from the grid, minor units (default 0)",
    )
    c.add_argument(
        "--local-fee",
        type=int,
        default=0,
        help="grid fee per kWh bought in the local market, minor units (default 0)",
    )
    c.add_argument("--mechanism", default="uniform", choices=["uniform", "pay_as_bid", "mcafee"])
    c.add_argument("--k", default="1/2", help="k-pricing parameter as a fraction")
    c.add_argument("--slot-seconds", type=int, default=900)
    c.add_argument("--gate-closure-lead-seconds", type=int, default=300)
    c.add_argument(
        "--settle-delay-seconds",
        type=int,
        default=120,
        help="meter readings of a slot are due this long after it ends",
    )
    c.add_argument("--slot-horizon", type=int, default=96)
    c.add_argument("--bootstrap", action="append", default=[], help="multiaddr with /p2p/ID")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--force", action="store_true", help="overwrite --out")
    c.set_defaults(func=cmd_genesis_create)
    s = gs.add_parser("show", help="verify a genesis file and print its summary")
    s.add_argument("path", type=Path)
    s.set_defaults(func=cmd_genesis_show)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _join_settings(args: argparse.Namespace) -> tuple[Genesis | None, MeterSetting | None]:
    """The verified ``--genesis`` and the ``--meter`` of ``init``, with ``--peer`` checked;
    raises ConfigError or GenesisError naming what is wrong."""
    for peer in args.peer:
        if not PEER_ADDRESS.fullmatch(peer):
            raise ConfigError(f"--peer {peer!r}: expected /ip4/HOST/tcp/PORT/p2p/PEER_ID")
    if not 0 < args.api_port <= 65535 or not 0 <= args.metrics_port <= 65535:
        raise ConfigError("--api-port must be in 1..65535 and --metrics-port in 0..65535")
    genesis = None if args.genesis is None else load_genesis(args.genesis)
    meter = None
    if args.meter is not None:
        table = {"name": "main", "profile": args.meter_profile, "endpoint": args.meter,
                 "device_id": args.meter_device_id}  # fmt: skip
        meter = meter_setting(table, "--meter")
    return genesis, meter


def cmd_init(args: argparse.Namespace) -> int:
    """Create the key file (0600, never overwritten) and a starter config; with ``--genesis``,
    ``--peer`` and ``--meter``, one ready to join a running grid."""
    directory: Path = args.dir
    try:
        genesis, meter = _join_settings(args)
    except (ConfigError, GenesisError) as exc:
        return _fail(str(exc))
    directory.mkdir(parents=True, exist_ok=True)
    if genesis is not None:
        target = directory / "genesis.json"
        if target.exists() and load_genesis(target).genesis_id() != genesis.genesis_id():
            return _fail(f"{target} exists and is another grid's genesis; left unchanged")
    try:
        identity = create_key_file(directory / KEY_NAME)
    except KeyFileError as exc:
        return _fail(str(exc))
    print(f"peer id: {identity.peer_id}")
    print(f"did:key: {identity.did}")
    print(f"key:     {directory / KEY_NAME} (mode 0600; back it up, never share it)")
    config = directory / CONFIG_NAME
    if config.exists():
        print(f"config:  {config} exists, left unchanged")
    else:
        # The API token guards placing orders; the config holds it, so only the owner reads it.
        text = starter_config_toml(listen=args.listen, metrics_port=args.metrics_port,
                                   api_port=args.api_port, api_token=secrets.token_urlsafe(24),
                                   peers=args.peer, meter=meter,
                                   meter_endpoint=args.meter or "")  # fmt: skip
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        print(f"config:  {config} (mode 0600: it holds the API token)")
    if genesis is not None:
        target = directory / "genesis.json"
        if not target.exists():
            write_genesis(genesis, target)
        print(f"genesis: {target} (grid {genesis.grid!r}, {genesis.genesis_id()[:16]})")
        if genesis.member(identity.did) is None:
            print(
                "next:    send the grid operator your did:key and meter serial "
                "(`microgrid meter test`); once they ran `microgrid member add`, start "
                "`microgrid node run`: it catches up and trades from the slot admitted"
            )
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    """Print an existing key's identity (what a household sends the grid operator)."""
    path = args.key
    try:
        if path is None:
            path = load_config(args.config).key_path
        identity = load_key_file(path)
    except (ConfigError, KeyFileError) as exc:
        return _fail(str(exc))
    print(f"peer id: {identity.peer_id}")
    print(f"did:key: {identity.did}")
    print(f"key:     {path}")
    return 0


def cmd_genesis_create(args: argparse.Namespace) -> int:
    """Build and sign a genesis from the command line."""
    try:
        operator = load_key_file(args.operator_key).signer
        members = []
        for spec in args.member:
            parts = [p.strip() for p in spec.split(",")]
            if len(parts) not in (3, 4):
                return _fail(f"--member {spec!r}: expected DID,METER,ROLE[,MAX_W]")
            did, meter, role = parts[:3]
            public_key_from_did(did)
            if role not in (MemberRole.VOTER.value, MemberRole.LEARNER.value):
                return _fail(f"--member {spec!r}: role must be voter or learner")
            if len(parts) == 4:
                max_w = bounded_int(parts[3], "MAX_W", low=1, high=MAX_POWER_W)
                members.append((did, meter, MemberRole(role), max_w))
            else:
                members.append((did, meter, MemberRole(role)))
        num, _, den = args.k.partition("/")
        market = MarketConfig(
            grid=args.grid, operator=operator.did, feed_in_tariff=args.feed_in_tariff,
            retail_price=args.retail_price, grid_fee=args.grid_fee, local_fee=args.local_fee,
            mechanism=args.mechanism,
            k=Fraction(int(num), int(den or 1)), slot_horizon=args.slot_horizon,
            slot_seconds=args.slot_seconds,
        )  # fmt: skip
        genesis = create_genesis(
            operator, market, members, slot_seconds=args.slot_seconds,
            gate_closure_lead_seconds=args.gate_closure_lead_seconds,
            settle_delay_seconds=args.settle_delay_seconds, bootstrap=args.bootstrap,
        )  # fmt: skip
        write_genesis(genesis, args.out, overwrite=args.force)
    except (KeyFileError, GenesisError, IdentityError) as exc:
        return _fail(str(exc))
    except ValueError as exc:
        return _fail(f"invalid market parameters: {exc}")
    print(f"genesis {genesis.genesis_id()[:16]} for grid {genesis.grid!r}: "
          f"{len(genesis.members)} members -> {args.out}")  # fmt: skip
    return 0


def cmd_genesis_show(args: argparse.Namespace) -> int:
    """Verify a genesis file and print what it says."""
    try:
        genesis = load_genesis(args.path)
    except GenesisError as exc:
        return _fail(str(exc))
    print(f"grid:      {genesis.grid}")
    print(f"genesis:   {genesis.genesis_id()}")
    print(f"operator:  {genesis.operator}")
    market = genesis.market
    print(f"tariffs:   feed-in {market.feed_in_tariff}, retail {market.retail_price}")
    if market.grid_fee or market.local_fee:
        print(f"fees:      {market.grid_fee}/kWh imported, {market.local_fee}/kWh bought locally")
    print(f"slots:     {genesis.slot_seconds} s, gate closes {genesis.gate_closure_lead_seconds} s"
          f" before, readings due {genesis.settle_delay_seconds} s after")  # fmt: skip
    for m in genesis.members:
        print(f"member:    {m.household} {m.meter_serial} {m.role.value}")
    for a in genesis.bootstrap:
        print(f"bootstrap: {a}")
    return 0
