"""The genesis file of a microgrid, signed by the grid operator.

It fixes the market rules (:class:`market.state.MarketConfig`), the slot timing, the member
households (each an operator-signed :class:`market.models.MemberRegistration`: DID, meter
serial, voter/learner role, rated power) and the bootstrap multiaddrs. The operator's
signature covers :meth:`Genesis.signing_bytes`, the canonical encoding
(``market.encoding.canonical_bytes``, kind ``genesis-file``) of every field but the signature.

On disk it is JSON: the signed fields plus ``"signature"``. :func:`load_genesis` refuses a file
whose signature does not verify, whose members are not signed by the operator, or that is
malformed, each with a typed :class:`GenesisError` subclass.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import multiaddr
from pydantic import ValidationError

from market.bounds import DEFAULT_MAX_POWER_W
from market.did import IdentityError, public_key_from_did, verify_signature
from market.encoding import canonical_bytes, loads_untrusted, sha256
from market.models import MemberRegistration, MemberRole, first_error
from market.schedule import Schedule
from market.signing import Signer
from market.state import MarketConfig, MarketConfigError

GENESIS_KIND = "genesis-file"
MAX_GENESIS_BYTES = 4 * 1024 * 1024
MAX_INT_DIGITS = 20
"""Longest integer literal a genesis file may hold: every bounded field fits in 16 digits."""


class GenesisError(ValueError):
    """A genesis file is unusable; subclasses say why."""


class GenesisFormatError(GenesisError):
    """Malformed JSON, missing or mistyped fields, inconsistent values."""


class GenesisSignatureError(GenesisError):
    """The operator's signature over the genesis does not verify."""


class GenesisMemberError(GenesisError):
    """A member registration is not signed by the operator, or is inconsistent."""


@dataclass(frozen=True)
class Genesis:
    """A microgrid's founding document. Build with :func:`create_genesis`, read with
    :func:`load_genesis` / :func:`parse_genesis`."""

    market: MarketConfig
    slot_seconds: int
    gate_closure_lead_seconds: int
    members: tuple[MemberRegistration, ...]
    bootstrap: tuple[str, ...] = ()
    settle_delay_seconds: int = 120
    """Meter readings of a slot are due this long after it ends; then it settles."""
    signature: str = ""
    _by_did: dict[str, MemberRegistration] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_did", {m.household: m for m in self.members})

    @property
    def grid(self) -> str:
        """The grid id."""
        return self.market.grid

    @property
    def operator(self) -> str:
        """The operator's DID."""
        return self.market.operator

    def member(self, did: str) -> MemberRegistration | None:
        """The registration of ``did``, or None if it is not a member."""
        return self._by_did.get(did)

    def is_member(self, did: str) -> bool:
        """True if ``did`` is a member household."""
        return did in self._by_did

    @property
    def member_dids(self) -> tuple[str, ...]:
        """Member DIDs, sorted."""
        return tuple(sorted(self._by_did))

    @property
    def voters(self) -> tuple[str, ...]:
        """DIDs of the Raft voters, sorted."""
        return tuple(sorted(d for d, m in self._by_did.items() if m.role == MemberRole.VOTER))

    def unsigned_fields(self) -> dict[str, Any]:
        """Every signed field as plain canonical-encodable values."""
        return {
            "market": self.market.to_json(),
            "slot_seconds": self.slot_seconds,
            "gate_closure_lead_seconds": self.gate_closure_lead_seconds,
            "settle_delay_seconds": self.settle_delay_seconds,
            "members": [_member_json(m) for m in self.members],
            "bootstrap": list(self.bootstrap),
        }

    def signing_bytes(self) -> bytes:
        """The canonical bytes the operator signs."""
        return canonical_bytes(GENESIS_KIND, self.unsigned_fields())

    def genesis_id(self) -> str:
        """Hex SHA-256 of the signed encoding plus signature: names this exact genesis."""
        return sha256(self.signing_bytes() + self.signature.encode()).hex()

    def to_json_bytes(self) -> bytes:
        """The file format: indented JSON of the signed fields and the signature."""
        doc = self.unsigned_fields()
        doc["signature"] = self.signature
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @property
    def schedule(self) -> Schedule:
        """Slot timing (slot length, gate-closure lead, reading deadline) as a :class:`Schedule`."""
        return Schedule(
            slot_seconds=self.slot_seconds,
            gate_lead_seconds=self.gate_closure_lead_seconds,
            settle_delay_seconds=self.settle_delay_seconds,
        )


def _member_json(m: MemberRegistration) -> dict[str, Any]:
    doc = m.unsigned_fields()
    doc["signature"] = m.signature
    return doc


def create_genesis(
    operator: Signer,
    market: MarketConfig,
    members: Iterable[tuple[str, str, MemberRole | str] | tuple[str, str, MemberRole | str, int]],
    *,
    slot_seconds: int = 900,
    gate_closure_lead_seconds: int = 300,
    settle_delay_seconds: int = 120,
    bootstrap: Iterable[str] = (),
) -> Genesis:
    """Build and sign a genesis: ``members`` are ``(did, meter_serial, role)`` triples, or
    ``(did, meter_serial, role, max_power_w)`` to name the most power (W) the household's meter
    can measure (default :data:`~market.bounds.DEFAULT_MAX_POWER_W`).

    Each member gets an operator-signed :class:`MemberRegistration` (nonce = its position), and
    the whole document is signed by ``operator``, which must be ``market.operator``. Raises
    :class:`GenesisFormatError` for a value outside the bounds of :mod:`market.bounds`.
    """
    if operator.did != market.operator:
        raise GenesisFormatError(
            f"operator key {operator.did} is not the market's operator {market.operator}"
        )
    registrations = []
    for i, member in enumerate(members):
        did, serial, role, *power = member
        try:
            registration = MemberRegistration(
                grid=market.grid,
                nonce=i,
                operator=operator.did,
                household=did,
                meter_serial=serial,
                role=MemberRole(role),
                max_power_w=power[0] if power else DEFAULT_MAX_POWER_W,
            )
        except ValidationError as exc:
            raise GenesisFormatError(f"members[{i}].{first_error(exc)}") from None
        except ValueError as exc:  # an unknown role
            raise GenesisFormatError(f"members[{i}]: {exc}") from None
        registrations.append(registration.signed_by(operator))
    unsigned = Genesis(
        market=market,
        slot_seconds=slot_seconds,
        gate_closure_lead_seconds=gate_closure_lead_seconds,
        settle_delay_seconds=settle_delay_seconds,
        members=tuple(registrations),
        bootstrap=tuple(bootstrap),
    )
    _check_consistency(unsigned)
    return replace(unsigned, signature=operator.sign(unsigned.signing_bytes()))


def _market_from_json(doc: Any) -> MarketConfig:
    try:
        return MarketConfig.from_json(doc)
    except MarketConfigError as exc:
        raise GenesisFormatError(exc.within("market")) from None


def parse_genesis(data: bytes) -> Genesis:
    """Parse and fully verify a genesis file's bytes; raises a :class:`GenesisError`."""
    if len(data) > MAX_GENESIS_BYTES:
        raise GenesisFormatError(f"genesis of {len(data)} bytes exceeds {MAX_GENESIS_BYTES}")
    try:
        # Deep nesting, floats and over-long integers are refused here as GenesisFormatError
        # (json.loads alone would raise RecursionError or a plain ValueError).
        doc = loads_untrusted(data, allow_floats=False, max_int_digits=MAX_INT_DIGITS)
    except ValueError as exc:
        raise GenesisFormatError(f"not a valid genesis JSON document: {exc}") from None
    if not isinstance(doc, dict):
        raise GenesisFormatError("top level must be an object")
    expected = {
        "market", "slot_seconds", "gate_closure_lead_seconds", "settle_delay_seconds", "members",
        "bootstrap", "signature",
    }  # fmt: skip
    if set(doc) != expected:
        raise GenesisFormatError(f"fields {sorted(set(doc) ^ expected)} missing or unexpected")
    market = _market_from_json(doc["market"])
    for name in ("slot_seconds", "gate_closure_lead_seconds", "settle_delay_seconds"):
        if type(doc[name]) is not int:
            raise GenesisFormatError(f"{name}: expected an integer")
    if not isinstance(doc["members"], list) or not isinstance(doc["bootstrap"], list):
        raise GenesisFormatError("members and bootstrap must be lists")
    if not all(isinstance(a, str) for a in doc["bootstrap"]):
        raise GenesisFormatError("bootstrap: expected a list of multiaddr strings")
    if not isinstance(doc["signature"], str):
        raise GenesisFormatError("signature: expected a hex string")
    members = []
    for i, item in enumerate(doc["members"]):
        try:
            members.append(MemberRegistration.model_validate(item))
        except ValidationError as exc:
            raise GenesisFormatError(f"members[{i}].{first_error(exc)}") from None
    genesis = Genesis(
        market=market,
        slot_seconds=doc["slot_seconds"],
        gate_closure_lead_seconds=doc["gate_closure_lead_seconds"],
        settle_delay_seconds=doc["settle_delay_seconds"],
        members=tuple(members),
        bootstrap=tuple(doc["bootstrap"]),
        signature=doc["signature"],
    )
    verify_genesis(genesis)
    return genesis


def verify_genesis(genesis: Genesis) -> None:
    """Check the operator's signature, every member's registration and consistency."""
    try:
        public_key_from_did(genesis.operator)
    except IdentityError as exc:
        raise GenesisFormatError(f"market.operator: {exc}") from None
    if not verify_signature(genesis.operator, genesis.signing_bytes(), genesis.signature):
        raise GenesisSignatureError(
            f"genesis of grid {genesis.grid!r} is not signed by its operator {genesis.operator}"
        )
    for i, reg in enumerate(genesis.members):
        if reg.operator != genesis.operator or not reg.verify(genesis.operator):
            raise GenesisMemberError(
                f"members[{i}] ({reg.household}) is not signed by the operator {genesis.operator}"
            )
    _check_consistency(genesis)


def _check_consistency(genesis: Genesis) -> None:
    if genesis.slot_seconds <= 0:
        raise GenesisFormatError(f"slot_seconds must be positive, got {genesis.slot_seconds}")
    if genesis.market.slot_seconds < genesis.slot_seconds:
        # The engine bounds meter readings by max_power_w over market.slot_seconds: shorter
        # than the real slot, it would refuse honest readings at full power.
        raise GenesisFormatError(
            f"market.slot_seconds ({genesis.market.slot_seconds}) is shorter than the slot "
            f"({genesis.slot_seconds} s): honest meter readings would be refused"
        )
    if genesis.gate_closure_lead_seconds < 0:
        raise GenesisFormatError("gate_closure_lead_seconds must be >= 0")
    if genesis.settle_delay_seconds < 0:
        raise GenesisFormatError("settle_delay_seconds must be >= 0")
    seen: set[str] = set()
    for i, reg in enumerate(genesis.members):
        if reg.grid != genesis.grid:
            raise GenesisMemberError(f"members[{i}] is for grid {reg.grid!r}, not {genesis.grid!r}")
        try:
            public_key_from_did(reg.household)
        except IdentityError as exc:
            raise GenesisMemberError(f"members[{i}]: {exc}") from None
        if reg.household in seen:
            raise GenesisMemberError(f"members[{i}]: {reg.household} is listed twice")
        seen.add(reg.household)
    if genesis.members and not any(m.role == MemberRole.VOTER for m in genesis.members):
        raise GenesisMemberError("at least one member must be a voter")
    for addr in genesis.bootstrap:
        try:
            maddr = multiaddr.Multiaddr(addr)
        except Exception as exc:
            raise GenesisFormatError(f"bootstrap address {addr!r}: {exc}") from None
        if "p2p" not in [p.name for p in maddr.protocols()]:
            raise GenesisFormatError(f"bootstrap address {addr!r} lacks /p2p/<peer id>")


def load_genesis(path: Path | str) -> Genesis:
    """Read and verify a genesis file; raises :class:`GenesisError` (or OSError on I/O)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GenesisFormatError(f"cannot read genesis {path}: {exc.strerror}") from None
    try:
        return parse_genesis(data)
    except GenesisError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def write_genesis(genesis: Genesis, path: Path | str, *, overwrite: bool = False) -> None:
    """Write a genesis file (verifying it first); refuses to overwrite unless asked."""
    verify_genesis(genesis)
    path = Path(path)
    mode = "wb" if overwrite else "xb"
    try:
        with path.open(mode) as fh:
            fh.write(genesis.to_json_bytes())
    except FileExistsError:
        raise GenesisFormatError(f"{path} already exists; refusing to overwrite") from None
