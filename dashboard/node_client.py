"""Client of a node's local HTTP status API (issue 6), tolerant of what it gets.

The dashboard asks ``GET {api}/status`` for a JSON document (fields in docs/dashboard.md) with
a short timeout. Everything it gets is normalised into :class:`NodeStatus`; missing fields stay
``None`` and an unreachable or broken API yields ``reachable=False`` with the reason, so every
view keeps working from the ledger database alone.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

STATUS_PATH = "/status"


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One poll of the status API, normalised."""

    reachable: bool
    error: str | None = None
    fetched_at: float = 0.0
    node: str | None = None
    role: str | None = None
    term: int | None = None
    leader: str | None = None
    leader_changes: int | None = None
    peers: int | None = None
    members_up: int | None = None
    members_down: int | None = None
    commit_index: int | None = None
    applied_index: int | None = None
    last_index: int | None = None
    commit_lag: int | None = None
    """Entries in the leader's log not yet committed (last_index − commit_index)."""
    apply_lag: int | None = None
    """Committed entries not yet applied to the ledger (commit_index − applied_index)."""
    ledger_height: int | None = None
    head_hash: str | None = None
    last_reading_slot: int | None = None
    last_reading_at: str | None = None
    invalid_messages: dict[str, int] = field(default_factory=dict)
    meter_read_failures: int | None = None
    slot_seconds: int | None = None
    """The grid's slot length, when the node reports it (positive integers only)."""
    censored: tuple[Censored, ...] = ()
    """Households the node's censorship watch suspects the leader of censoring."""
    censored_by: str | None = None
    """The leader the node's censorship watch suspects (None: none)."""
    own_censored: bool = False
    """The node's own household's records are not committed while others' are."""
    forecast: ForecastAccuracy | None = None
    """The agent's forecast accuracy (``agent.forecast``; None: not reported or malformed)."""
    clock: ClockStatus | None = None
    """The node's clock against the grid's median (``clock``; None: not reported or
    malformed)."""

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for CSV and tables)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Censored:
    """One household the node's censorship watch suspects (``/status`` ``censorship``)."""

    household: str
    oldest_age_slots: int | None
    classes: tuple[str, ...]


MAX_CENSORED = 64
"""Suspected households kept from one status document (the rest are dropped)."""

MAX_WH = 10**12
"""Largest forecast error (Wh) taken from a status document."""
MAX_SAMPLES = 10**6
"""Largest sample or slot count taken from a status document."""
MAX_SECONDS = 1e9
"""Largest clock offset, error or bound (seconds) taken from a status document."""
MAX_CLOCK_PEERS = 256
"""Peers kept from one node's ``clock.peers`` (the rest are dropped)."""
FORECAST_WINDOWS = (96, 672)
"""The accuracy windows the agent reports (``mae_wh.last_96``, ``mae_wh.last_672``)."""


@dataclass(frozen=True, slots=True)
class ForecastAccuracy:
    """A node's ``agent.forecast`` (node/agent/forecast.py), validated: the mean absolute
    error of its forecasts of net export per slot (Wh) over the last 96 and 672 metered slots
    that had one, and how many such slots there were. A malformed field is None."""

    mae_wh: dict[int, int | None]
    """By window (96, 672): the mean absolute error, None before any forecast was metered."""
    samples: dict[int, int | None]
    observed: int | None = None
    """Slots the forecaster learned from."""
    located: bool | None = None
    capacity_wh: int | None = None
    time_slots_learned: int | None = None

    def mae(self, window: int = FORECAST_WINDOWS[0]) -> int | None:
        """The error over ``window`` slots, None when it has none (or a malformed one)."""
        value = self.mae_wh.get(window)
        samples = self.samples.get(window)
        return value if value is not None and samples != 0 else None


@dataclass(frozen=True, slots=True)
class PeerClock:
    """One peer's clock as a node sees it (``clock.peers``)."""

    peer: str
    offset: float
    """The node's clock minus the peer's (seconds)."""
    error: float


@dataclass(frozen=True, slots=True)
class ClockStatus:
    """A node's ``clock`` (node/daemon/clock.py), validated."""

    offset: float | None
    """Seconds the node's clock is ahead of the grid's median (None: no peer sampled yet)."""
    error: float
    skewed: bool
    max_skew: float | None
    peers_sampled: int | None
    peers: tuple[PeerClock, ...] = ()
    disagreeing: tuple[str, ...] = ()
    """Peers whose clock the node finds off the median beyond ``max_skew``."""


def _strict_int(value: Any, lo: int, hi: int) -> int | None:
    """An integer (not a bool, not a float) in ``[lo, hi]``, else None."""
    if type(value) is int and lo <= value <= hi:
        return value
    return None


def _finite(value: Any, lo: float, hi: float) -> float | None:
    """A finite number (not a bool) in ``[lo, hi]`` as a float, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) and lo <= number <= hi else None


def _forecast(agent: Any) -> ForecastAccuracy | None:
    """``agent.forecast``, validated (None when it is not an object)."""
    doc = agent.get("forecast") if isinstance(agent, dict) else None
    if not isinstance(doc, dict):
        return None
    mae = doc.get("mae_wh") if isinstance(doc.get("mae_wh"), dict) else {}
    samples = doc.get("samples") if isinstance(doc.get("samples"), dict) else {}
    located = doc.get("located")
    return ForecastAccuracy(
        mae_wh={w: _strict_int(mae.get(f"last_{w}"), 0, MAX_WH) for w in FORECAST_WINDOWS},
        samples={w: _strict_int(samples.get(f"last_{w}"), 0, w) for w in FORECAST_WINDOWS},
        observed=_strict_int(doc.get("observed"), 0, MAX_WH),
        located=located if isinstance(located, bool) else None,
        capacity_wh=_strict_int(doc.get("capacity_wh"), 0, MAX_WH),
        time_slots_learned=_strict_int(doc.get("time_slots_learned"), 0, MAX_SAMPLES),
    )


def _clock(doc: Any) -> ClockStatus | None:
    """``clock``, validated (None when it is not an object or its verdict is not a bool)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("skewed"), bool):
        return None
    peers: list[PeerClock] = []
    raw = doc.get("peers")
    for entry in raw[:MAX_CLOCK_PEERS] if isinstance(raw, list) else ():
        if not isinstance(entry, dict) or not _short_text(entry.get("peer")):
            continue
        offset = _finite(entry.get("offset"), -MAX_SECONDS, MAX_SECONDS)
        error = _finite(entry.get("error"), 0.0, MAX_SECONDS)
        if offset is not None and error is not None:
            peers.append(PeerClock(entry["peer"], offset, error))
    disagreeing = doc.get("disagreeing")
    max_skew = _finite(doc.get("max_skew"), 0.0, MAX_SECONDS)
    return ClockStatus(
        offset=_finite(doc.get("offset"), -MAX_SECONDS, MAX_SECONDS),
        error=_finite(doc.get("error"), 0.0, MAX_SECONDS) or 0.0,
        skewed=doc["skewed"],
        max_skew=max_skew if max_skew else None,
        peers_sampled=_strict_int(doc.get("peers_sampled"), 0, MAX_SAMPLES),
        peers=tuple(peers),
        disagreeing=tuple(
            p for p in disagreeing[:MAX_CLOCK_PEERS] if _short_text(p)
        ) if isinstance(disagreeing, list) else (),
    )  # fmt: skip


def _censorship(doc: Any) -> tuple[tuple[Censored, ...], str | None, bool]:
    """The ``censorship`` section, validated: well-formed entries only, bounded."""
    if not isinstance(doc, dict):
        return (), None, False
    entries = doc.get("suspected")
    out: list[Censored] = []
    for entry in entries[:MAX_CENSORED] if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or not _short_text(entry.get("household")):
            continue
        classes = entry.get("classes")
        out.append(
            Censored(
                entry["household"],
                _int(entry.get("oldest_age_slots")),
                tuple(c for c in classes[:8] if _short_text(c))
                if isinstance(classes, list)
                else (),
            )
        )
    leader = doc.get("suspected_leader")
    own = doc.get("own")
    own_censored = isinstance(own, dict) and own.get("suspected") is True
    return tuple(out), leader if _short_text(leader) else None, own_censored


def _short_text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 256


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
        return None


def normalise(doc: Any, fetched_at: float | None = None) -> NodeStatus:
    """Map a status document onto :class:`NodeStatus`; unknown shapes give ``None`` fields.

    Accepts nested (``{"raft": {...}, "ledger": {...}}``) and flat field spellings.
    """
    now = time.time() if fetched_at is None else fetched_at
    if not isinstance(doc, dict):
        return NodeStatus(False, "status document is not a JSON object", now)
    raft = doc.get("raft") if isinstance(doc.get("raft"), dict) else doc
    ledger = doc.get("ledger") if isinstance(doc.get("ledger"), dict) else {}
    members = doc.get("members") if isinstance(doc.get("members"), dict) else {}
    peers_raw = doc.get("peers")
    peers = len(peers_raw) if isinstance(peers_raw, list) else _int(peers_raw)
    up = _int(members.get("up", doc.get("members_up")))
    down = _int(members.get("down", doc.get("members_down")))
    if up is None and isinstance(peers_raw, list):
        flags = [p.get("up") for p in peers_raw if isinstance(p, dict) and "up" in p]
        if flags:
            up = sum(1 for f in flags if f)
            down = len(flags) - up
    commit = _int(raft.get("commit_index"))
    applied = _int(raft.get("applied_index", doc.get("applied_index")))
    last = _int(raft.get("last_index"))
    commit_lag = _int(raft.get("commit_lag", doc.get("commit_lag")))
    if commit_lag is None and commit is not None and last is not None:
        commit_lag = max(last - commit, 0)
    apply_lag = _int(raft.get("apply_lag", doc.get("apply_lag")))
    if apply_lag is None and commit is not None and applied is not None:
        apply_lag = max(commit - applied, 0)
    reading = doc.get("last_reading")
    reading_slot = _int(reading.get("slot")) if isinstance(reading, dict) else _int(reading)
    reading_at = reading.get("at") if isinstance(reading, dict) else None
    invalid_raw = doc.get("invalid_messages", {})
    invalid = (
        {str(k): v for k, v in invalid_raw.items() if _int(v) is not None}
        if isinstance(invalid_raw, dict)
        else {}
    )
    leader = raft.get("leader", doc.get("leader"))
    slot_seconds = _int(doc.get("slot_seconds"))
    censored, censored_by, own_censored = _censorship(doc.get("censorship"))
    node = doc.get("node") or doc.get("id")
    role = raft.get("role", doc.get("role"))
    head_hash = ledger.get("head_hash", doc.get("head_hash"))
    return NodeStatus(
        reachable=True,
        fetched_at=now,
        node=node if _short_text(node) else None,
        role=role if _short_text(role) else None,
        term=_int(raft.get("term", doc.get("term"))),
        leader=leader if isinstance(leader, str) and leader else None,
        leader_changes=_int(raft.get("leader_changes", doc.get("leader_changes"))),
        peers=peers,
        members_up=up,
        members_down=down,
        commit_index=commit,
        applied_index=applied,
        last_index=last,
        commit_lag=commit_lag,
        apply_lag=apply_lag,
        ledger_height=_int(ledger.get("height", doc.get("ledger_height"))),
        head_hash=head_hash if _short_text(head_hash) else None,
        last_reading_slot=reading_slot,
        last_reading_at=reading_at if isinstance(reading_at, str) else None,
        invalid_messages={k: int(v) for k, v in invalid.items()},
        meter_read_failures=_int(doc.get("meter_read_failures")),
        slot_seconds=slot_seconds if slot_seconds is not None and slot_seconds > 0 else None,
        censored=censored,
        censored_by=censored_by,
        own_censored=own_censored,
        forecast=_forecast(doc.get("agent")),
        clock=_clock(doc.get("clock")),
    )


def fetch_status(base_url: str, timeout: float = 1.5) -> NodeStatus:
    """Poll ``{base_url}/status`` once; never raises."""
    url = base_url.rstrip("/") + STATUS_PATH
    now = time.time()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(1_000_000)
        return normalise(json.loads(body.decode("utf-8")), now)
    except urllib.error.HTTPError as exc:
        return NodeStatus(False, f"HTTP {exc.code} from {url}", now)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return NodeStatus(False, f"cannot reach {url}: {reason}", now)
    except (ValueError, RecursionError) as exc:  # not UTF-8 JSON, nested too deep, huge ints
        return NodeStatus(False, f"{url} did not return JSON: {str(exc)[:100]}", now)


class StatusHistory:
    """The dashboard's own record of recent polls: lag over time and observed leader changes."""

    def __init__(self, maxlen: int = 720) -> None:
        self._polls: deque[NodeStatus] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.observed_leader_changes = 0
        self._last_leader: tuple[int | None, str | None] | None = None

    def add(self, status: NodeStatus) -> None:
        """Record a poll (only reachable ones count towards leader changes)."""
        with self._lock:
            self._polls.append(status)
            if status.reachable:
                key = (status.term, status.leader)
                if self._last_leader is not None and key != self._last_leader:
                    self.observed_leader_changes += 1
                self._last_leader = key

    def polls(self) -> list[NodeStatus]:
        """Recorded polls, oldest first."""
        with self._lock:
            return list(self._polls)

    def latest(self) -> NodeStatus | None:
        """The newest poll, if any."""
        with self._lock:
            return self._polls[-1] if self._polls else None


def api_alerts(status: NodeStatus | None, configured: bool) -> list[dict[str, str]]:
    """Alerts from the node's status: no leader; an API that cannot be reached; households
    whose records the leader may be censoring (docs/node.md, "Censorship alerts")."""
    if not configured:
        return []
    if status is None or not status.reachable:
        why = status.error if status is not None else "not polled yet"
        return [
            {
                "level": "secondary",
                "code": "api_unreachable",
                "message": f"Node status API unreachable ({why}); showing the ledger only",
            }
        ]
    if status.leader is None:
        return [
            {
                "level": "danger",
                "code": "no_leader",
                "message": f"No Raft leader (term {status.term}, role {status.role})",
            }
        ]
    alerts = []
    if status.own_censored:
        alerts.append(
            {
                "level": "danger",
                "code": "own_records_censored",
                "message": "This household's records are not being committed while others' "
                f"are: the leader {status.censored_by or status.leader} may be censoring it",
            }
        )
    for c in status.censored:
        if c.household == status.node and status.own_censored:
            continue
        age = "" if c.oldest_age_slots is None else f" for {c.oldest_age_slots} slots"
        kinds = f" ({', '.join(c.classes)})" if c.classes else ""
        alerts.append(
            {
                "level": "danger",
                "code": "censorship_suspected",
                "message": f"Records of household {c.household}{kinds} not committed{age} "
                f"while others' are: the leader {status.censored_by or '?'} may be censoring it",
            }
        )
    return alerts


MAX_NODE_APIS = 256
"""Status APIs the dashboard polls at most (``--node-api``, one per household node)."""


@dataclass(frozen=True, slots=True)
class NodePoll:
    """The newest poll of one node's status API, and the node it answered as last time it
    answered (so an unreachable node is still shown against its household)."""

    url: str
    status: NodeStatus
    known_node: str | None
    """``status.node`` of the newest reachable poll (None: never reached, or no ``node``)."""


class NodePolls:
    """The household nodes' status APIs (``--node-api``): each polled once per refresh, all at
    once (one thread each, every poll bounded by its timeout), the newest result kept."""

    def __init__(self, urls: tuple[str, ...] | list[str], timeout: float = 1.5) -> None:
        self.urls = tuple(dict.fromkeys(urls))[:MAX_NODE_APIS]
        self.timeout = timeout
        self._lock = threading.Lock()
        self._latest: dict[str, NodePoll] = {}

    def poll(self, skip: str | None = None) -> list[NodePoll]:
        """Poll every API but ``skip`` (polled elsewhere: ``--api``) now, never raising, and
        return the newest results in :attr:`urls` order."""
        results: dict[str, NodeStatus] = {}
        urls = [u for u in self.urls if u != skip]

        def one(url: str) -> None:
            results[url] = fetch_status(url, timeout=self.timeout)

        threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in urls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.timeout * 4 + 1)
        for url in urls:
            self.record(url, results.get(url) or NodeStatus(False, f"{url}: no answer in time"))
        return self.latest()

    def record(self, url: str, status: NodeStatus) -> None:
        """Keep ``status`` as the newest poll of ``url``."""
        with self._lock:
            old = self._latest.get(url)
            known = status.node if status.reachable and status.node else None
            if known is None and old is not None:
                known = old.known_node
            self._latest[url] = NodePoll(url, status, known)

    def latest(self) -> list[NodePoll]:
        """The newest poll of each API polled so far, in :attr:`urls` order."""
        with self._lock:
            return [self._latest[u] for u in self.urls if u in self._latest]
