"""The node's status document (``GET /status``), as the dashboard and ``microgrid status`` read it.

One function assembles it from the parts' own counters, so the document's shape lives in one
place (documented in docs/dashboard.md, "Status API the dashboard reads"). Consensus and ledger
come from one :class:`~node.daemon.consensus.ConsensusView`, the driver's published picture:
never from the live core, storage or engine, which the driver's worker threads update (so the
applied index, the commit index and the ledger's height always belong together). What it shows
of the engine beyond that (this household's meter silence) comes from the node's published
``EngineSnapshot``, passed in by the caller; the market rules are immutable.

The governance documents (``GET /members``, ``GET /rules``) and the dry run of ``POST
/governance`` read a :class:`GovernanceShadow`: the part of the engine state the operator's
governance records are checked against (members, governance history, the operator's nonce
window, gates, counter baselines), copied on the driver's task between batches (never the books,
which can be large), so they never touch the live engine the apply worker mutates.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from market import MarketConfig, MeterReading
from market.events import Event, GovernanceAccepted, Rejected
from market.governance import MemberStatus, Term
from market.models import GovernanceRecord, MemberChange, RotateKey, record_hash
from market.state import NonceWindow, State, apply, config_at, latest_term, member_term
from node.daemon.consensus import ConsensusDriver

CONNECTED_STATUSES = frozenset({MemberStatus.ACTIVE, MemberStatus.SUSPENDED, MemberStatus.PENDING})
"""Households whose latest term is one of these keep (or get) a connection to the grid: the
active ones, the suspended ones (they follow the ledger until reinstated) and those admitted
from a later slot. Removed households and rotated-away keys are dropped."""
OPERATOR_NONCE_KINDS = (0, 1, 3)
"""The operator's governance records use nonces ``4 * s + k`` with ``k`` one of these: its
feeder readings use ``4 * s + 2`` (``NONCE_FEEDER``), so the two never collide, and both stay on
the slot scale, inside the one anti-replay window the engine keeps per signer (a nonce far above
the feeder's, such as milliseconds since 1970, would push every later feeder reading below the
window: ``replayed_nonce``)."""


@dataclass(frozen=True, slots=True)
class GovernanceShadow:
    """The engine state governance reads, as of one applied batch (see the module docstring).

    ``state`` is a :class:`~market.state.State` holding copies (no books, no balances): never
    mutated once built, so :func:`~market.state.member_term`, :func:`~market.state.config_at`
    and :func:`~market.state.latest_term` may read it from the trio thread; :func:`dry_run`
    applies a record to a further copy."""

    state: State
    records: int
    """How many governance records it holds (a change detector)."""
    hashes: frozenset[bytes]
    """:func:`~market.models.record_hash` of each committed governance record."""


def governance_shadow(state: State, previous: GovernanceShadow | None = None) -> GovernanceShadow:
    """Copy what governance reads of the live ``state`` (call only where no worker applies:
    the driver's task between batches, or before the node runs). The governance history is
    copied again only when it changed since ``previous`` (a new record, or another state
    object: a snapshot was installed)."""
    gov = state.governance
    if (
        previous is not None
        and previous.records == len(gov.records)
        and previous.state.config is state.config
        and previous.state.members.keys() == state.members.keys()
    ):
        governance, hashes = previous.state.governance, previous.hashes
    else:
        governance = gov.copy()
        hashes = frozenset(record_hash(r) for r in gov.records)
    operator = state.config.operator
    nonces = {}
    window = state.nonces.get(operator)
    if window is not None:
        nonces[operator] = NonceWindow(window.highest, set(window.recent))
    shadow = State(
        config=state.config,
        members=dict(state.members),
        nonces=nonces,
        pending_readings={slot: dict(p) for slot, p in state.pending_readings.items()},
        baselines=dict(state.baselines),
        closed_through=state.closed_through,
        settled_through=state.settled_through,
        height=state.height,
        head_hash=state.head_hash,
        governance=governance,
    )
    return GovernanceShadow(shadow, len(gov.records), hashes)


def dry_run(shadow: GovernanceShadow, record: GovernanceRecord) -> list[Event]:
    """What the engine would answer to ``record`` now: ``apply`` on a copy of the shadow (the
    live books are not in it: a dry run withdraws no order). Cheap: the governance history and
    the members are copied, nothing else."""
    base = shadow.state
    window = base.nonces.get(base.config.operator)
    trial = State(
        config=base.config,
        members=dict(base.members),
        nonces={} if window is None else {
            base.config.operator: NonceWindow(window.highest, set(window.recent))
        },
        pending_readings=base.pending_readings,
        baselines=base.baselines,
        closed_through=base.closed_through,
        settled_through=base.settled_through,
        governance=base.governance.copy(),
    )  # fmt: skip
    _, events = apply(trial, record)
    return events


def connected_members(shadow: GovernanceShadow) -> list[str]:
    """Every DID that should hold a connection to the grid (:data:`CONNECTED_STATUSES`): by
    its latest terms, or by its terms in the first slot not settled yet. A household removed
    (or a key rotated away) from slot ``s`` stays connected until slot ``s - 1`` has settled,
    so its readings up to that slot, the last it is settled for, still reach the grid."""
    state = shadow.state
    unsettled = 0 if state.settled_through is None else state.settled_through + 1

    def connected(did: str) -> bool:
        if latest_term(state, did).status in CONNECTED_STATUSES:
            return True
        term = member_term(state, did, unsettled)
        return term is not None and term.status in CONNECTED_STATUSES

    return sorted(d for d in state.members if connected(d))


def _terms(state: State, did: str) -> list[Term]:
    terms = state.governance.terms.get(did)
    return list(terms) if terms is not None else [member_term(state, did, 0)]  # type: ignore[list-item]


def _term_json(term: Term) -> dict[str, Any]:
    return {"from_slot": term.from_slot, "status": term.status.value, "role": term.role.value,
            "meter_serial": term.meter_serial, "max_power_w": term.max_power_w}  # fmt: skip


def members_document(shadow: GovernanceShadow, slot: int) -> dict[str, Any]:
    """``GET /members``: every household ever admitted, its standing in ``slot`` (the open
    slot) and since when it holds it, and the changes scheduled after ``slot``."""
    state = shadow.state
    gov = state.governance
    out = []
    for did in sorted(state.members):
        now = member_term(state, did, slot)
        assert now is not None
        later = [t for t in _terms(state, did) if t.from_slot > slot]
        entry: dict[str, Any] = {
            "did": did, "role": now.role.value, "meter_serial": now.meter_serial,
            "max_power_w": now.max_power_w, "status": now.status.value,
            "since_slot": now.from_slot, "scheduled": [_term_json(t) for t in later],
            "genesis": did not in gov.terms or gov.terms[did][0].status != MemberStatus.PENDING,
        }  # fmt: skip
        if did in gov.predecessor:
            entry["replaces"] = gov.predecessor[did]
        out.append(entry)
    return {"slot": slot, "closed_through": state.closed_through, "members": out}


def rules_document(shadow: GovernanceShadow, slot: int) -> dict[str, Any]:
    """``GET /rules``: the rules in force in ``slot`` (the open slot), its price band, and the
    whole history ``[(from_slot, rules)]`` (genesis rules from slot 0)."""
    state = shadow.state
    config = config_at(state, slot)
    band = config.tariffs_at(slot)
    history = [
        {"from_slot": from_slot, "rules": rules.to_json(), "rules_hash": rules.rules_hash()}
        for from_slot, rules in state.governance.rules_history(state.config)
    ]
    return {
        "slot": slot,
        "rules": config.to_json(),
        "rules_hash": config.rules_hash(),
        "band": {"feed_in_tariff": band.feed_in, "retail_price": band.retail},
        "fees": {"grid_fee": band.grid_fee, "local_fee": band.local_fee},
        "history": history,
    }


def free_operator_nonce(
    shadow: GovernanceShadow, slot: int, reserved: set[int] | frozenset[int] = frozenset()
) -> int | None:
    """The smallest nonce the operator may sign a governance record with now: ``4 * s + k``
    (:data:`OPERATOR_NONCE_KINDS`) from the current slot ``slot`` on, unused, not ``reserved``
    (handed out and not committed yet), above the operator's anti-replay window. None when the
    next free one is so far ahead that the operator's next feeder readings would fall out of
    the window (too many governance records at once: try again a few slots later)."""
    config = shadow.state.config
    window = shadow.state.nonces.get(config.operator, NonceWindow())
    floor = max(4 * slot, window.highest - config.nonce_window + 1, 0)
    ceiling = 4 * slot + config.nonce_window // 2
    nonce = floor
    while nonce <= ceiling:
        if (
            nonce % 4 in OPERATOR_NONCE_KINDS
            and nonce not in window.recent
            and (nonce not in reserved)
        ):
            return nonce
        nonce += 1
    return None


def governance_outcome(
    record: GovernanceRecord, events: list[Event]
) -> tuple[bool, dict[str, Any]]:
    """``(accepted, answer)`` for the API from the engine's events for ``record`` (one
    :class:`GovernanceAccepted` or :class:`Rejected`)."""
    for event in events:
        if isinstance(event, GovernanceAccepted):
            return True, record_summary(record, len(event.withdrawn))
        if isinstance(event, Rejected):
            return False, {"reason": event.reason.value, "detail": event.detail}
    return False, {"reason": "unknown", "detail": "the engine gave no verdict"}


def record_summary(record: GovernanceRecord, withdrawn: int | None = None) -> dict[str, Any]:
    """What a committed governance record changed, in a few fields."""
    out: dict[str, Any] = {
        "type": record.type,
        "from_slot": record.from_slot,
        "nonce": record.nonce,
        "record_hash": record_hash(record).hex(),
    }
    if isinstance(record, MemberChange):
        out["household"] = record.household
    if isinstance(record, RotateKey):
        out["new_household"] = record.new_household
    if withdrawn is not None:
        out["withdrawn_orders"] = withdrawn
    return out


def metering_section(
    config: MarketConfig, silent_slots: int | None, sell_limit_wh: int | None = None
) -> dict[str, Any]:
    """The status document's ``metering``: this household's meter silence, whether the engine
    refuses its new orders for it (``meter_silent``: rules 2, ``silent_slots`` at least
    ``max_silent_slots``) and what its delivery record lets it offer per slot
    (``sell_limit_wh``; docs/ledger.md, "Unmeasured slots")."""
    refused = (
        config.rules >= 2 and silent_slots is not None and silent_slots >= config.max_silent_slots
    )
    return {
        "silent_slots": silent_slots,
        "max_silent_slots": config.max_silent_slots,
        "rules": config.rules,
        "orders_refused": refused,
        "sell_limit_wh": sell_limit_wh,
    }


def censorship_section(driver: ConsensusDriver) -> dict[str, Any] | None:
    """The status document's ``censorship`` (docs/node.md, "Censorship alerts"): the
    watch's last slot-boundary report (households suspected, their overdue and uncommitted
    records, the oldest one's age in slots, the leader suspected, this household's own
    standing) and the distrust part (nodes the Raft core distrusts now with the ticks left,
    distrusts so far, the last one). None when the node runs no watch. Reads the driver's
    published view and the policy's plain fields: safe from any task or thread."""
    view = driver.view
    if view.censorship is None:
        return None
    policy = driver.distrust_policy
    doc = view.censorship.to_json()
    doc["distrust"] = {
        "active": dict(view.distrusted), "count": view.stats.distrusts,
        "last_slot": policy.last_slot, "last_leader": policy.last_target,
        "persist_slots": policy.persist_slots, "min_interval_slots": policy.min_interval_slots,
        "distrust_slots": policy.distrust_slots,
    }  # fmt: skip
    return doc


def clock_section(driver: ConsensusDriver) -> dict[str, Any] | None:
    """The status document's ``clock`` (docs/node.md, "Clocks"): this node's clock against the
    grid's median (``offset`` seconds ahead, ``error`` bound, ``peers_sampled``), whether it is
    ``skewed`` (beyond ``max_skew``), each sampled peer, the peers whose clock disagrees, early
    gate closures seen (in all and by leader), leadership handovers, held deadlines and
    distrusts for early closures. None when the node runs no clock watch. Reads the driver's
    published view: safe from any task or thread."""
    report = driver.view.clock
    return None if report is None else report.to_json()


def status_document(
    driver: ConsensusDriver,
    *,
    peers_up: Mapping[str, bool] | None = None,
    peers_indirect: Collection[str] = (),
    invalid_messages: Mapping[str, int] | None = None,
    meter_read_failures: int = 0,
    last_reading: MeterReading | None = None,
    last_reading_at: str | None = None,
    silent_slots: int | None = None,
    sell_limit_wh: int | None = None,
) -> dict[str, Any]:
    """The status of one node: consensus, peers, ledger, rejected gossip, meter health.

    ``silent_slots``: settled slots in a row without a reading of this household's meter, from
    the node's published engine snapshot (None: not known to the caller). Safe from any task or
    thread: it reads only the driver's published view, the immutable market rules and the
    arguments."""
    view = driver.view
    st, stats = view.raft, view.stats
    peers = dict(peers_up or {})
    up = sum(1 for ok in peers.values() if ok)
    # a large grid's member this node does not dial (NetSettings.full_mesh_members) is reached
    # through the others: not connected, yet not down
    indirect = {did for did, ok in peers.items() if not ok and did in peers_indirect}
    return {
        "node": st.id,
        "grid": driver.replica.config.grid,
        "raft": {
            "role": st.role,
            "term": st.term,
            "leader": st.leader,
            "leader_changes": stats.leader_changes,
            "commit_index": st.commit,
            "applied_index": view.applied_index,
            "last_index": st.last_index,
            "voters": list(st.voters),
            "learners": list(st.learners),
        },
        "peers": [
            {"id": did, "up": ok, **({"indirect": True} if did in indirect else {})}
            for did, ok in sorted(peers.items())
        ],
        # This node counts itself as up.
        "members": {
            "up": up + 1,
            "down": len(peers) - up - len(indirect),
            "indirect": len(indirect),
        },
        "last_reading": (
            None
            if last_reading is None
            else {
                "slot": last_reading.slot,
                "at": last_reading_at,
                "import_wh": last_reading.import_wh,
                "export_wh": last_reading.export_wh,
            }
        ),
        "ledger": view.ledger(),
        "metering": metering_section(driver.replica.config, silent_slots, sell_limit_wh),
        "invalid_messages": dict(invalid_messages or {}),
        "meter_read_failures": meter_read_failures,
        "driver": {
            "proposals": stats.proposals,
            "applied_entries": stats.applied_entries,
            "dropped_inbound": stats.dropped_inbound,
            "snapshots": stats.snapshots,
        },
        "censorship": censorship_section(driver),
        "clock": clock_section(driver),
    }
