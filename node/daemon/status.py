"""The node's status document (``GET /status``), as the dashboard and ``microgrid status`` read it.

One function assembles it from the parts' own counters, so the document's shape lives in one
place (documented in docs/dashboard.md, "Status API the dashboard reads"). Consensus and ledger
come from one :class:`~node.daemon.consensus.ConsensusView`, the driver's published picture:
never from the live core, storage or engine, which the driver's worker threads update (so the
applied index, the commit index and the ledger's height always belong together). What it shows
of the engine beyond that (this household's meter silence) comes from the node's published
``EngineSnapshot``, passed in by the caller; the market rules are immutable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from market import MarketConfig, MeterReading
from node.daemon.consensus import ConsensusDriver


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


def status_document(
    driver: ConsensusDriver,
    *,
    peers_up: Mapping[str, bool] | None = None,
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
        "peers": [{"id": did, "up": ok} for did, ok in sorted(peers.items())],
        # This node counts itself as up.
        "members": {"up": up + 1, "down": len(peers) - up},
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
    }
