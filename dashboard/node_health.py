"""Per household and per node, from the nodes' ``/status`` (issue 18): how well each household's
agent forecasts its net export, against the naive persistence forecast, and how far each node's
clock is off the grid's median.

The status documents are hostile input, validated by :mod:`dashboard.node_client`
(:class:`~dashboard.node_client.ForecastAccuracy`, :class:`~dashboard.node_client.ClockStatus`);
here they are only matched to the ledger's households and turned into table rows and alerts.

**Forecast.** The agent reports the mean absolute error (MAE) of the forecasts its orders were
based on over the last 96 metered slots that had one (node/agent/forecast.py). The baseline is
the naive persistence forecast, "the next slot's net export is this slot's", whose MAE this
module computes from the ledger: ``|net(s) − net(s − 1)|`` over the household's newest 96 pairs
of consecutive measured slots (``net = export_wh − import_wh`` of its ``settlements``). The
skill is ``1 − MAE / persistence MAE``: above 0 the agent beats persistence.

**Clocks.** Each polled node reports its own clock's offset from the grid's median (the median
over its sampled peers' clocks and its own: node/daemon/clock.py), the error bound and whether
it is ``skewed`` (beyond ``max_skew`` even allowing for the error). A peer a polled node sampled
but the dashboard does not poll is shown as that node sees it: its offset from the median is
the node's offset minus the node's offset from the peer, skewed when the node lists it as
disagreeing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from dashboard.node_client import NodePoll
from node.ledger import schema as t

FORECAST_WINDOW = 96
"""Slots of the forecast comparison (the agent's ``last_96``)."""


@dataclass(frozen=True, slots=True)
class Persistence:
    """The naive persistence forecast's error for one household, from the ledger."""

    mae_wh: int | None
    """Mean absolute error per slot (Wh, rounded half up); None without a pair of slots."""
    samples: int


def persistence_errors(engine: Engine, window: int = FORECAST_WINDOW) -> dict[str, Persistence]:
    """Per household, the persistence forecast's MAE over its newest ``window`` pairs of
    consecutive measured slots among the newest ``4 × window`` settled slots (one query)."""
    s = t.settlements.c
    with engine.connect() as conn:
        newest = conn.execute(select(func.max(s.slot))).scalar()
        if newest is None:
            return {}
        q = (
            select(s.household, s.slot, s.import_wh, s.export_wh)
            .where(s.measured, s.slot > int(newest) - 4 * window)
            .order_by(s.household, s.slot)
        )
        rows = conn.execute(q).all()
    errors: dict[str, list[int]] = {}
    previous: tuple[str, int, int] | None = None
    for r in rows:
        did, slot, net = str(r.household), int(r.slot), int(r.export_wh) - int(r.import_wh)
        errors.setdefault(did, [])
        if previous is not None and previous[0] == did and previous[1] == slot - 1:
            errors[did].append(abs(net - previous[2]))
        previous = (did, slot, net)
    out = {}
    for did, errs in errors.items():
        recent = errs[-window:]
        mae = (2 * sum(recent) + len(recent)) // (2 * len(recent)) if recent else None
        out[did] = Persistence(mae, len(recent))
    return out


def member_labels(engine: Engine) -> list[dict[str, Any]]:
    """The ledger's households (``households`` rows) as ``household``, ``short``, ``meter``."""
    h = t.households.c
    with engine.connect() as conn:
        rows = conn.execute(select(h.did, h.meter_serial).order_by(h.did).limit(10_000)).all()
    return [
        {"household": str(r.did), "short": _short(str(r.did)), "meter": str(r.meter_serial)[:64]}
        for r in rows
    ]


def _status_of(poll: NodePoll) -> str:
    if not poll.status.reachable:
        return f"no data: unreachable ({(poll.status.error or '?')[:120]})"
    return "ok"


def forecast_rows(
    households: list[dict[str, Any]],
    polls: list[NodePoll],
    persistence: dict[str, Persistence],
) -> list[dict[str, Any]]:
    """One row per household of the ledger (``households``: dicts with ``household``,
    ``short``), then one per polled node that answers for no household of the ledger: its
    agent's MAE over the last 96 and 672 forecast slots, the persistence MAE from the ledger,
    the skill, and ``status`` (``ok``, or ``no data: …``: no status API for it, unreachable, no
    forecast yet)."""
    by_did: dict[str, NodePoll] = {}
    unknown: list[NodePoll] = []
    for poll in polls:
        did = poll.known_node
        if did is None or did in by_did:
            unknown.append(poll)
        else:
            by_did[did] = poll
    members = {h["household"] for h in households}
    rows = []
    for h in households:
        did = h["household"]
        rows.append(_forecast_row(did, h.get("short"), by_did.get(did), persistence.get(did)))
    for did, poll in by_did.items():
        if did not in members:
            row = _forecast_row(did, None, poll, None)
            row["status"] = f"not a household of this ledger; {row['status']}"
            rows.append(row)
    for poll in unknown:
        row = _forecast_row(poll.known_node, None, poll, None)
        if poll.known_node is not None:  # a second API answering as the same node
            row["status"] = f"answers as the same node as {by_did[poll.known_node].url}; ignored"
            row.update(dict.fromkeys(FORECAST_FIGURES))
        rows.append(row)
    return rows


FORECAST_FIGURES = (
    "mae_96_wh", "samples_96", "mae_672_wh", "samples_672", "observed_slots", "skill_permille",
)  # fmt: skip
"""The figures of a forecast row taken from the node's report."""


def _forecast_row(
    did: str | None, short: str | None, poll: NodePoll | None, base: Persistence | None
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "household": did,
        "short": short or (None if did is None else _short(did)),
        "node_api": None if poll is None else poll.url,
        "mae_96_wh": None,
        "samples_96": None,
        "mae_672_wh": None,
        "samples_672": None,
        "observed_slots": None,
        "persistence_mae_wh": None if base is None else base.mae_wh,
        "persistence_samples": None if base is None else base.samples,
        "skill_permille": None,
    }
    if poll is None:
        row["status"] = "no data: no status API for this household (--node-api)"
        return row
    status = _status_of(poll)
    forecast = poll.status.forecast if poll.status.reachable else None
    if status == "ok" and (forecast is None or forecast.mae(96) is None):
        status = "no data: no forecast yet"
    row["status"] = status
    if forecast is not None:
        row.update(
            mae_96_wh=forecast.mae(96),
            samples_96=forecast.samples.get(96),
            mae_672_wh=forecast.mae(672),
            samples_672=forecast.samples.get(672),
            observed_slots=forecast.observed,
        )
        mae, pers = forecast.mae(96), row["persistence_mae_wh"]
        if mae is not None and pers:
            row["skill_permille"] = 1000 - (2000 * mae + pers) // (2 * pers)
    return row


def _short(did: str) -> str:
    tail = did.rsplit(":", 1)[-1]
    return f"…{tail[-8:]}" if len(tail) > 8 else tail


def clock_rows(polls: list[NodePoll], households: dict[str, str]) -> list[dict[str, Any]]:
    """One row per polled node (its own report), then one per peer a reachable polled node
    sampled that the dashboard does not poll (as that node sees it). ``households``: DID to
    its short label, for the ledger's households. Offsets are seconds ahead of the grid's
    median (negative: behind)."""
    rows: list[dict[str, Any]] = []
    polled = {p.known_node for p in polls if p.known_node}
    seen: set[str] = set()
    for poll in polls:
        did = poll.known_node
        row: dict[str, Any] = {
            "node": did,
            "short": None if did is None else households.get(did, _short(did)),
            "member": did in households if did else None,
            "node_api": poll.url,
            "source": "own report",
            "offset_s": None,
            "error_s": None,
            "max_skew_s": None,
            "peers_sampled": None,
            "skewed": None,
        }
        clock = poll.status.clock if poll.status.reachable else None
        if not poll.status.reachable:
            row["status"] = _status_of(poll)
        elif clock is None:
            row["status"] = "no data: the node reports no clock"
        else:
            row.update(
                offset_s=clock.offset,
                error_s=clock.error,
                max_skew_s=clock.max_skew,
                peers_sampled=clock.peers_sampled,
                skewed=clock.skewed,
            )
            row["status"] = (
                "no data: no peer sampled yet"
                if clock.offset is None
                else ("SKEWED" if clock.skewed else "ok")
            )
        rows.append(row)
    for poll in polls:
        clock = poll.status.clock if poll.status.reachable else None
        if clock is None or clock.offset is None:
            continue
        for peer in clock.peers:
            if peer.peer in polled or peer.peer in seen:
                continue
            seen.add(peer.peer)
            skewed = peer.peer in clock.disagreeing
            rows.append(
                {
                    "node": peer.peer,
                    "short": households.get(peer.peer, _short(peer.peer)),
                    "member": peer.peer in households,
                    "node_api": None,
                    "source": f"as seen by {poll.known_node or poll.url}",
                    "offset_s": round(clock.offset - peer.offset, 4),
                    "error_s": round(clock.error + peer.error, 4),
                    "max_skew_s": clock.max_skew,
                    "peers_sampled": None,
                    "skewed": skewed,
                    "status": "SKEWED" if skewed else "ok",
                }
            )
    return rows


def _seconds(value: float) -> str:
    return f"{abs(value):.1f} s {'ahead of' if value >= 0 else 'behind'}"


def clock_alerts(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A ``clock_skewed`` alert per skewed clock of :func:`clock_rows`."""
    alerts = []
    for r in rows:
        if r["skewed"] is not True:
            continue
        who = r["node"] or r["node_api"]
        offset = r["offset_s"]
        where = "" if offset is None else f" {_seconds(offset)} the grid's median"
        detail = []
        if r["error_s"] is not None:
            detail.append(f"± {r['error_s']:.2f} s")
        if r["max_skew_s"] is not None:
            detail.append(f"bound {r['max_skew_s']:g} s")
        if r["source"] != "own report":
            detail.append(r["source"])
        details = f" ({', '.join(detail)})" if detail else ""
        alerts.append(
            {
                "level": "danger",
                "code": "clock_skewed",
                "message": f"Clock of node {who} is skewed:{where}{details}. As leader it holds "
                "gate closures back and hands leadership on; fix its time synchronisation (NTP)",
            }
        )
    return alerts


def unreachable_alerts(polls: list[NodePoll]) -> list[dict[str, str]]:
    """A ``node_unreachable`` notice per household node (``--node-api``) whose last poll
    failed."""
    return [
        {
            "level": "secondary",
            "code": "node_unreachable",
            "message": f"Node status API {p.url}"
            + (f" ({p.known_node})" if p.known_node else "")
            + f" unreachable: {(p.status.error or '?')[:120]}; its forecast and clock show no data",
        }
        for p in polls
        if not p.status.reachable
    ]


def csv_rows(forecasts: list[dict[str, Any]], clocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The section's CSV: one row per :func:`forecast_rows` row with its node's own clock
    report (``clock_*``), full DIDs."""
    own = {c["node"]: c for c in clocks if c["source"] == "own report" and c["node"]}
    out = []
    for f in forecasts:
        clock = own.get(f["household"]) if f["household"] else None
        row = {k: v for k, v in f.items() if k != "short"}
        row.update(
            clock_offset_s=None if clock is None else clock["offset_s"],
            clock_error_s=None if clock is None else clock["error_s"],
            clock_max_skew_s=None if clock is None else clock["max_skew_s"],
            clock_skewed=None if clock is None else clock["skewed"],
            clock_status="no data" if clock is None else clock["status"],
        )
        out.append(row)
    return out
