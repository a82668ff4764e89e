"""The ledger's model: postings, transactions, blocks, and how each is hashed.

Double entry: every transaction's postings sum to zero per asset, so total money and total
energy are conserved. Assets are ``money`` (integer minor currency units) and ``energy``
(integer Wh). Accounts are ``household:<did>``, ``grid`` (the utility, counterparty of every
imbalance), ``market`` (keeps McAfee's trade-reduction surplus) and ``network`` (collects the
grid fees the rules set: per kWh bought locally and per kWh imported from the grid).

One block per settled slot. Its hash covers the height, slot, previous block hash, the Merkle
roots of its transactions, trades and readings, the state hash (the hash of every account
balance after the block) and, in a grid with a feeder meter, the hash of the slot's feeder
check. Anyone holding the raw rows can recompute all of it (``microgrid ledger verify``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from market.encoding import canonical_bytes, merkle_root, sha256

MONEY = "money"
ENERGY = "energy"
ASSETS = (MONEY, ENERGY)
GRID = "grid"
MARKET = "market"
NETWORK = "network"
ZERO_HASH = "00" * 32


def household_account(did: str) -> str:
    """The ledger account of a household."""
    return f"household:{did}"


def money_for(energy_wh: int, price_per_kwh: int) -> int:
    """Money in minor units for ``energy_wh`` at ``price_per_kwh``, rounded half up.

    Both arguments are non-negative; one rounding rule everywhere keeps both sides of a
    transfer equal, so postings still sum to exactly zero.
    """
    if energy_wh < 0 or price_per_kwh < 0:
        raise ValueError("money_for takes non-negative energy and price")
    return (energy_wh * price_per_kwh + 500) // 1000


@dataclass(frozen=True, slots=True)
class Posting:
    """One line of a transaction: ``amount`` of ``asset`` credited (+) or debited (-)."""

    account: str
    asset: str
    amount: int

    def to_json(self) -> list[Any]:
        """Compact canonical form."""
        return [self.account, self.asset, self.amount]


@dataclass(frozen=True, slots=True)
class Transaction:
    """A balanced set of postings with what caused it (``kind``, ``ref``) in a slot."""

    kind: str
    slot: int
    ref: str
    postings: tuple[Posting, ...]

    def encode(self) -> bytes:
        """Canonical bytes; the transaction id is their hash."""
        return canonical_bytes(
            "tx",
            {
                "kind": self.kind,
                "slot": self.slot,
                "ref": self.ref,
                "postings": [p.to_json() for p in self.postings],
            },
        )

    @property
    def txid(self) -> str:
        """Hex SHA-256 of the canonical encoding."""
        return sha256(self.encode()).hex()

    def imbalance(self) -> dict[str, int]:
        """Sum of postings per asset; all zeros for a valid transaction."""
        totals = dict.fromkeys(ASSETS, 0)
        for p in self.postings:
            totals[p.asset] = totals.get(p.asset, 0) + p.amount
        return totals

    def is_balanced(self) -> bool:
        """True if every asset's postings sum to zero."""
        return all(v == 0 for v in self.imbalance().values())


def transfer(
    kind: str, slot: int, ref: str, legs: Iterable[tuple[str, str, str, int]]
) -> Transaction:
    """A transaction from transfer legs ``(from_account, to_account, asset, amount)``.

    Each leg with a positive amount becomes a debit and a credit; zero legs are left out.
    """
    postings: list[Posting] = []
    for src, dst, asset, amount in legs:
        if amount < 0:
            raise ValueError(f"negative transfer {amount} of {asset} in {kind} {ref}")
        if amount:
            postings.append(Posting(src, asset, -amount))
            postings.append(Posting(dst, asset, amount))
    return Transaction(kind, slot, ref, tuple(postings))


def state_hash(height: int, balances: Mapping[tuple[str, str], int]) -> str:
    """Hash of every account balance after the block at ``height`` (sorted, so order-free)."""
    rows = [[account, asset, amount] for (account, asset), amount in sorted(balances.items())]
    return sha256(canonical_bytes("balances", {"height": height, "balances": rows})).hex()


@dataclass(frozen=True, slots=True)
class Block:
    """The header of one settled slot's block."""

    height: int
    slot: int
    prev_hash: str
    tx_root: str
    trade_root: str
    reading_root: str
    state_hash: str
    tx_count: int
    feeder: str | None = None
    """Hex hash of the slot's feeder check (:class:`market.feeder.FeederCheck`) in a grid with
    a feeder meter; None (and left out of the header, so older blocks hash as before) else."""
    rules: str | None = None
    """Hex hash of the market rules the slot was settled under
    (:meth:`market.config.MarketConfig.rules_hash`) once an operator's rules change is in
    force; None (left out of the header) while the genesis rules hold."""

    def to_json(self) -> dict[str, Any]:
        """Header fields (everything the block hash covers); ``feeder`` and ``rules`` only when
        set."""
        doc: dict[str, Any] = {
            "height": self.height,
            "slot": self.slot,
            "prev_hash": self.prev_hash,
            "tx_root": self.tx_root,
            "trade_root": self.trade_root,
            "reading_root": self.reading_root,
            "state_hash": self.state_hash,
            "tx_count": self.tx_count,
        }
        if self.feeder is not None:
            doc["feeder"] = self.feeder
        if self.rules is not None:
            doc["rules"] = self.rules
        return doc

    @property
    def hash(self) -> str:
        """Hex SHA-256 of the canonical header."""
        return sha256(canonical_bytes("block", self.to_json())).hex()


def roots(
    transactions: Iterable[Transaction],
    trade_encodings: Iterable[bytes],
    reading_encodings: Iterable[bytes],
) -> tuple[str, str, str]:
    """Merkle roots (hex) of a block's transactions (by txid), trades and readings."""
    return (
        merkle_root([bytes.fromhex(t.txid) for t in transactions]).hex(),
        merkle_root(list(trade_encodings)).hex(),
        merkle_root(list(reading_encodings)).hex(),
    )
