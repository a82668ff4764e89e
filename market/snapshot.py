"""Canonical snapshots of the engine state, for Raft log compaction and node restarts.

``dump_state`` gives the same bytes on every node that applied the same log (dicts are written
sorted, or in log order where order matters), so ``state_digest`` also tells two replicas'
complete states apart, not just their ledgers. ``load_state(dump_state(s))`` continues exactly
as ``s`` would.
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

from market.encoding import canonical_bytes, sha256
from market.models import MeterReading, Order, Role, Trade
from market.state import MarketConfig, Member, NonceWindow, Reputation, State

SNAPSHOT_KIND = "snapshot"
_PREFIX = f"microgrid/{SNAPSHOT_KIND}/v1\n".encode()


class SnapshotError(ValueError):
    """Bytes that are not a snapshot this version can load."""


def _record(r: Order | MeterReading) -> dict[str, Any]:
    return r.model_dump(mode="json")


def dump_state(state: State) -> bytes:
    """Canonical bytes of the complete state."""
    body = {
        "config": state.config.to_json(),
        "members": {d: [m.meter_serial, str(m.role)] for d, m in state.members.items()},
        "nonces": {d: [w.highest, sorted(w.recent)] for d, w in state.nonces.items()},
        # Books keep log order (it is the auction's time priority); slots are keys.
        "books": {str(s): [_record(o) for o in b.values()] for s, b in state.books.items()},
        "cleared": {str(s): [t.to_json() for t in ts] for s, ts in state.cleared.items()},
        "closed_books": {
            str(s): [_record(o) for o in orders] for s, orders in state.closed_books.items()
        },
        "pending_readings": {
            str(s): {d: _record(r) for d, r in rs.items()}
            for s, rs in state.pending_readings.items()
        },
        "baselines": {d: _record(r) for d, r in state.baselines.items()},
        "closed_through": state.closed_through,
        "settled_through": state.settled_through,
        "balances": [[a, asset, v] for (a, asset), v in sorted(state.balances.items())],
        "reputation": {
            d: [r.sold_wh, r.delivered_wh, r.bought_wh, r.consumed_wh, r.slots, r.missed_readings]
            for d, r in state.reputation.items()
        },
        "height": state.height,
        "head_hash": state.head_hash,
    }
    return canonical_bytes(SNAPSHOT_KIND, body)


def state_digest(state: State) -> str:
    """Hex SHA-256 of the snapshot: equal digests mean equal states."""
    return sha256(dump_state(state)).hex()


def config_from_json(data: dict[str, Any]) -> MarketConfig:
    """Inverse of :meth:`MarketConfig.to_json`."""
    fields = dict(data)
    fields["k"] = Fraction(fields["k"])
    return MarketConfig(**fields)


def load_state(data: bytes) -> State:
    """Rebuild a state from :func:`dump_state` bytes; raises :class:`SnapshotError`."""
    if not data.startswith(_PREFIX):
        raise SnapshotError("not a microgrid v1 engine snapshot")
    try:
        body = json.loads(data[len(_PREFIX) :])
        state = State(config=config_from_json(body["config"]))
        state.members = {d: Member(s, Role(r)) for d, (s, r) in body["members"].items()}
        state.nonces = {d: NonceWindow(h, set(rec)) for d, (h, rec) in body["nonces"].items()}
        state.books = {
            int(s): {o["id"]: Order.model_validate(o) for o in orders}
            for s, orders in body["books"].items()
        }
        state.cleared = {int(s): tuple(Trade(**t) for t in ts) for s, ts in body["cleared"].items()}
        # Snapshots written before closed_books existed load without them: a node installing
        # one then lacks those slots' orders and clearing rows (docs/ledger.md).
        state.closed_books = {
            int(s): tuple(Order.model_validate(o) for o in orders)
            for s, orders in body.get("closed_books", {}).items()
        }
        state.pending_readings = {
            int(s): {d: MeterReading.model_validate(r) for d, r in rs.items()}
            for s, rs in body["pending_readings"].items()
        }
        state.baselines = {d: MeterReading.model_validate(r) for d, r in body["baselines"].items()}
        state.closed_through = body["closed_through"]
        state.settled_through = body["settled_through"]
        state.balances = {(a, asset): v for a, asset, v in body["balances"]}
        state.reputation = {d: Reputation(*fields) for d, fields in body["reputation"].items()}
        state.height = body["height"]
        state.head_hash = body["head_hash"]
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"malformed engine snapshot: {exc}") from exc
    return state
