"""Clock discipline (issue 16): how far this node's wall clock is off the grid's, and what follows.

Slots come from wall clocks (:mod:`market.schedule`): a follower judges gossip by its own clock
(a reading before its slot ended, an order after its gate closed: refused), and the Raft leader
proposes ``CloseGate``/``SettleSlot`` when *its* clock says they are due. A leader whose clock
runs ahead would close every household's gate early. This module is pure (no clock is read in
here: every time is an argument, ``at``/``now`` are monotonic seconds of the caller):

- :class:`TimeSample`: one NTP-style exchange with a peer (``t0`` our send, ``t1`` the peer's
  receive, ``t2`` the peer's send, ``t3`` our receive, all wall-clock seconds). Our clock's
  offset from the peer's is ``((t0 - t1) + (t3 - t2)) / 2`` (positive: we are ahead) and its
  error at most half the round trip (``delay / 2``), whatever the asymmetry of the two legs,
  as long as the peer reported its own clock truthfully.
- :class:`ClockEstimator`: the last few samples per peer; per peer the one of least delay (the
  most precise, NTP's clock filter), each carried forward to now by how much our wall clock
  moved against our monotonic clock since it was taken (a step of our own clock, an NTP slew:
  seen at the next assessment, not at the next sample), then the *median* over every member's
  clock, this node's own (offset 0) included, and the most this clock can be ahead of that
  median given every sample's error (:func:`median_ahead_bound`: the leader's deadline shift). A
  minority of wrong or lying clocks cannot move the median out of the range of the honest ones;
  with this node counted, an honest node of a grid of three in which one clock is minutes off
  finds itself on time (median of ``{0, 0, -d}`` is 0), while the skewed node finds itself ``d``
  ahead (``{0, d, d}``). With only one peer neither can tell whose clock is wrong (the median is
  halfway, the error bound covers both): the disagreement is reported, no one is called skewed.
- :class:`ClockWatch`: the policy. ``skewed`` once the estimate is beyond ``max_skew`` even
  allowing for its error (and no longer once it is within ``max_skew`` allowing for it: the gap
  between the two is a hysteresis); while skewed a leader proposes no gate closure or settlement
  and hands leadership to the most caught-up voter whose clock agrees with the median (at most
  once per ``transfer_every`` seconds: one slot; a handover that did not take, to a voter that
  is down, is followed by one to the next such voter). A sole voter has no one to hand over to:
  skewed (its learners' clocks, two or more, outvote its own) it holds every gate closure and
  settlement until its clock is right again. While not skewed the leader judges deadlines by
  ``wall_clock - ahead`` (the peers' median clock, conservatively: ``ahead`` is the most this
  clock can be ahead of the median given every sample's error, so never earlier than it, at most
  twice the largest error around the median later; a sole voter by its own clock). A follower
  that applies a ``CloseGate`` earlier than its own (corrected) clock allows by more than
  ``max_skew`` counts it against the leader; ``distrust_after`` of them from one leader make a
  voter distrust it (the Raft ``distrust`` the censorship watch uses; at most once per
  ``distrust_every_slots``).

Why 5 s. The bound must be far below the gate lead (default 300 s: orders for a slot are
refused once its gate closes, so a leader early by the bound takes that much off the last
minutes households have to trade) and below the settle delay (default 120 s: the meter readings
of a slot, taken at its end by each household's clock, must reach the leader before it settles
the slot), yet above what NTP-synchronised machines on a LAN or the internet disagree by (well
under a second) plus the estimate's error (half a round trip, capped at ``max_delay / 2`` =
1 s). 5 s is 1.7 % of the default gate lead and 4 % of the settle delay: a clock within it
changes nothing a household can notice; one beyond it has lost synchronisation (a dead RTC
battery, no NTP) and may drift further. Grids with short slots (tests, demos) set a smaller
bound (``clock_max_skew_seconds``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_DELAY = 2.0
"""Samples whose round trip (minus the peer's processing) exceeds this are too imprecise."""
MAX_AGE = 300.0
"""Samples older than this (monotonic seconds) are forgotten: clocks drift, peers go."""
PER_PEER = 8
"""Samples kept per peer (the least-delay one of them counts)."""
MAX_PEERS = 1024
"""Peers tracked at most (a grid is a feeder of tens of households)."""
MAX_ABS_TIME = 1e12
"""Wall-clock seconds beyond this (year 33 658) are not a clock reading."""


class SampleError(ValueError):
    """A time sample that cannot be right; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class TimeSample:
    """One request/response with ``peer``: ``t0``/``t3`` by our wall clock (request sent,
    response received), ``t1``/``t2`` by the peer's (request received, response sent); ``at``:
    our monotonic time at ``t3`` (for aging only)."""

    peer: str
    t0: float
    t1: float
    t2: float
    t3: float
    at: float

    @property
    def offset(self) -> float:
        """Our clock minus the peer's (positive: ours is ahead)."""
        return ((self.t0 - self.t1) + (self.t3 - self.t2)) / 2

    @property
    def delay(self) -> float:
        """The round trip without the peer's processing time."""
        return (self.t3 - self.t0) - (self.t2 - self.t1)

    @property
    def error(self) -> float:
        """Bound on ``|offset - true offset|``: half the round trip, however asymmetric."""
        return self.delay / 2

    def check(self, max_delay: float = MAX_DELAY) -> None:
        """Raise :class:`SampleError` unless the sample is consistent: finite times in range,
        ``t0 <= t3``, ``t1 <= t2`` and a round trip of ``0..max_delay`` seconds."""
        values = (self.t0, self.t1, self.t2, self.t3, self.at)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise SampleError("not_finite", f"times {values}")
        if not all(abs(v) <= MAX_ABS_TIME for v in values[:4]):
            raise SampleError("out_of_range", f"times {values[:4]}")
        if self.t3 < self.t0:
            raise SampleError("backwards", f"our clock went back {self.t0 - self.t3:.3f} s")
        if self.t2 < self.t1:
            raise SampleError("backwards", f"the peer's clock went back {self.t1 - self.t2:.3f} s")
        delay = self.delay
        if delay < 0:
            raise SampleError("impossible", f"the peer held the request {-delay:.3f} s longer "
                                            "than the round trip")  # fmt: skip
        if delay > max_delay:
            raise SampleError("too_slow", f"round trip {delay:.3f} s > {max_delay} s")


@dataclass(frozen=True, slots=True)
class PeerOffset:
    """One peer's clock as seen from here: the least-delay recent sample."""

    peer: str
    offset: float
    """Our clock minus the peer's."""
    error: float
    samples: int

    def to_json(self) -> dict[str, object]:
        """For the status document."""
        return {"peer": self.peer, "offset": round(self.offset, 4),
                "error": round(self.error, 4), "samples": self.samples}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ClockEstimate:
    """This node's clock against the grid's median clock."""

    offset: float | None
    """Our clock minus the median of every sampled clock and ours (None: no peer sampled)."""
    error: float
    """Bound on the estimate's error (from the sample delays around the median)."""
    peers: tuple[PeerOffset, ...] = ()
    """Each sampled peer's clock, by peer id."""
    ahead: float | None = None
    """The most our clock can be ahead of the grid's median clock, given every sample's error
    (:func:`median_ahead_bound`): what a leader subtracts from its clock to judge deadlines
    (None: no peer sampled)."""

    @property
    def sampled(self) -> int:
        """Peers with a recent sample."""
        return len(self.peers)

    def disagreeing(self, bound: float) -> tuple[PeerOffset, ...]:
        """Peers whose clock is off the median by more than ``bound`` (allowing for errors):
        their offset from the median is ``self.offset - peer.offset``."""
        if self.offset is None:
            return ()
        return tuple(p for p in self.peers
                     if abs(self.offset - p.offset) - p.error - self.error > bound)  # fmt: skip


STEP_SLACK = 0.5
"""Seconds by which two samples of one peer may disagree beyond their error bounds before the
peer's clock counts as stepped between them."""


def _stepped(old: TimeSample, new: TimeSample) -> bool:
    """Whether the peer's clock moved between two samples of it: their offsets, ``old``'s
    carried forward over this node's own clock's moves since (wall minus monotonic), differ by
    more than both errors and :data:`STEP_SLACK`."""
    carried = old.offset + (new.t3 - new.at) - (old.t3 - old.at)
    return abs(new.offset - carried) > old.error + new.error + STEP_SLACK


def median_clock(offsets: list[tuple[float, float]]) -> tuple[float, float]:
    """``(offset, error)`` of the median of ``(offset, error)`` pairs (non-empty).

    Odd count: the middle one. Even: halfway between the two middle ones, the error covering
    both (half their distance plus the larger error).
    """
    if not offsets:
        raise ValueError("no clocks")
    ordered = sorted(offsets)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    (a, ea), (b, eb) = ordered[mid - 1], ordered[mid]
    return (a + b) / 2, (b - a) / 2 + max(ea, eb)


def median_ahead_bound(offsets: list[tuple[float, float]]) -> float:
    """The most our clock can be ahead of the median clock, from ``(offset, error)`` pairs
    (non-empty; ours ``(0.0, 0.0)`` among them): each clock's true offset lies within
    ``offset +- error``, so the ``k``-th smallest true offset is at most the ``k``-th smallest
    ``offset + error``, and that bound is reached when every clock is at the top of its range.
    With an odd count the median clock is the middle one; with an even count the later of the
    two middle clocks counts (a leader is never early by either, as :func:`median_clock`'s
    error covers both).

    Tighter than ``offset + error`` of :func:`median_clock` when the middle sample is an
    imprecise one (one slow round trip then no longer delays every deadline by its error), and
    never below the true median's offset, which that one can be: the clock in the middle by
    offset need not be the one in the middle by upper bound (``(0, 0)``, ``(-0.5, 1.0)``,
    ``(0.1, 0)``: the middle is ours at 0, yet the second clock may be at +0.5, making the median
    +0.1)."""
    if not offsets:
        raise ValueError("no clocks")
    tops = sorted(offset + error for offset, error in offsets)
    return tops[len(tops) // 2]


@dataclass
class ClockEstimator:
    """Samples in, an offset estimate with an error bound out (see the module docstring)."""

    max_delay: float = MAX_DELAY
    max_age: float = MAX_AGE
    per_peer: int = PER_PEER
    max_peers: int = MAX_PEERS
    samples: dict[str, list[TimeSample]] = field(default_factory=dict)

    def add(self, sample: TimeSample) -> None:
        """Keep a sample (raises :class:`SampleError` for an inconsistent one, keeping none).
        Beyond ``max_peers`` peers a new peer replaces the one sampled longest ago."""
        sample.check(self.max_delay)
        kept = self.samples.get(sample.peer)
        if kept is None:
            if len(self.samples) >= self.max_peers:
                stalest = min(self.samples, key=lambda p: self.samples[p][-1].at)
                del self.samples[stalest]
            kept = self.samples[sample.peer] = []
        if any(_stepped(old, sample) for old in kept):
            kept.clear()  # the peer's clock was stepped (set right, or wrong): old samples lie
        kept.append(sample)
        del kept[: -self.per_peer]

    def forget(self, peer: str) -> None:
        """Drop a peer's samples (it left the grid)."""
        self.samples.pop(peer, None)

    def peer_offsets(self, now: float, local: float | None = None) -> tuple[PeerOffset, ...]:
        """Each peer's least-delay sample of the last ``max_age`` seconds (older ones dropped).

        ``local``: our wall clock at monotonic ``now``. A sample's offset is then carried
        forward by how far our wall clock moved against the monotonic one since the sample
        (``(local - now) - (t3 - at)``): our own clock stepping shows at once."""
        out = []
        for peer in sorted(self.samples):
            recent = [s for s in self.samples[peer] if now - s.at <= self.max_age]
            if not recent:
                del self.samples[peer]
                continue
            self.samples[peer] = recent
            best = min(recent, key=lambda s: s.delay)
            moved = 0.0 if local is None else (local - now) - (best.t3 - best.at)
            out.append(PeerOffset(peer, best.offset + moved, best.error, len(recent)))
        return tuple(out)

    def estimate(self, now: float, local: float | None = None) -> ClockEstimate:
        """Our clock against the median of ours and every recently sampled peer's (``local``:
        our wall clock at ``now``, see :meth:`peer_offsets`)."""
        peers = self.peer_offsets(now, local)
        if not peers:
            return ClockEstimate(None, 0.0)
        clocks = [(0.0, 0.0), *((p.offset, p.error) for p in peers)]
        offset, error = median_clock(clocks)
        return ClockEstimate(offset, error, peers, median_ahead_bound(clocks))


@dataclass(frozen=True, slots=True)
class ClockReport:
    """What :meth:`ClockWatch.assess` found: the estimate, the verdict and the counters."""

    estimate: ClockEstimate
    skewed: bool
    max_skew: float
    disagreeing: tuple[PeerOffset, ...]
    early_gate_closures: int
    early_by_leader: tuple[tuple[str, int], ...]
    transfers: int
    held: int
    """Times the leader held back due gate closures or settlements (skewed or unsampled)."""
    distrusts: int

    def to_json(self) -> dict[str, object]:
        """The status document's ``clock`` section (docs/node.md, "Clocks")."""
        est = self.estimate
        return {
            "offset": None if est.offset is None else round(est.offset, 4),
            "error": round(est.error, 4), "peers_sampled": est.sampled, "skewed": self.skewed,
            "max_skew": self.max_skew, "peers": [p.to_json() for p in est.peers],
            "disagreeing": [p.peer for p in self.disagreeing],
            "early_gate_closures": self.early_gate_closures,
            "early_by_leader": dict(self.early_by_leader), "transfers": self.transfers,
            "held": self.held, "distrusts": self.distrusts,
        }  # fmt: skip


EMPTY_ESTIMATE = ClockEstimate(None, 0.0)


@dataclass
class ClockWatch:
    """The clock policy of one node (pure: every time is an argument; monotonic ``now``)."""

    max_skew: float = 5.0
    """Seconds this node's clock may be off the grid's median before it is ``skewed``."""
    transfer_every: float = 900.0
    """Monotonic seconds between two leadership handovers (the driver sets one slot)."""
    unsampled_hold: float = 30.0
    """Longest a leader with peers but no clock sample holds deadlines back (then it trusts
    its own clock, and says so): the first samples arrive within a round trip of connecting."""
    distrust_after: int = 2
    """Early gate closures by one leader that make a voter distrust it (0: never)."""
    distrust_every: float = 7200.0
    """Monotonic seconds between two distrusts for early closures (the driver sets 8 slots)."""
    estimator: ClockEstimator = field(default_factory=ClockEstimator)
    skewed: bool = False
    early_gate_closures: int = 0
    early_by_leader: dict[str, int] = field(default_factory=dict)
    transfers: int = 0
    held: int = 0
    distrusts: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    """Samples refused, by :class:`SampleError` reason."""
    last_transfer: float | None = None
    last_distrust: float | None = None
    unsampled_since: float | None = None
    estimate: ClockEstimate = EMPTY_ESTIMATE
    """The estimate of the last :meth:`assess`."""
    _unforgiven: dict[str, int] = field(default_factory=dict)
    """Early closures per leader since its last distrust here."""
    _tried: list[str] = field(default_factory=list)
    """Voters handed leadership to while this node stayed skewed (cleared once it is not)."""
    _proposed: str | None = None
    """The last :meth:`transfer_target` (what :meth:`may_transfer` records as tried)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_skew) or self.max_skew <= 0:
            raise ValueError(f"max_skew must be a positive number of seconds, not {self.max_skew}")

    def add(self, sample: TimeSample) -> bool:
        """Feed one sample; False (counted by reason) if it was refused."""
        try:
            self.estimator.add(sample)
        except SampleError as exc:
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            return False
        return True

    def sample(self, peer: str, t0: float, t1: float, t2: float, t3: float, at: float) -> bool:
        """:meth:`add` of ``TimeSample(peer, t0, t1, t2, t3, at)`` (the time sampler's
        callback)."""
        return self.add(TimeSample(peer, t0, t1, t2, t3, at))

    def assess(self, now: float, local: float | None = None) -> ClockEstimate:
        """Re-estimate at monotonic ``now`` (``local``: our wall clock then) and update
        ``skewed``: set when ``|offset| - error > max_skew``, cleared when ``|offset| + error
        <= max_skew`` or when no peer is sampled any more."""
        est = self.estimate = self.estimator.estimate(now, local)
        if est.offset is None:
            self.skewed = False
        elif abs(est.offset) - est.error > self.max_skew:
            self.skewed = True
        elif abs(est.offset) + est.error <= self.max_skew:
            self.skewed = False
        if not self.skewed:
            self._tried.clear()
        return est

    def report(self) -> ClockReport:
        """The last assessment with the counters (an immutable copy)."""
        return ClockReport(
            self.estimate, self.skewed, self.max_skew, self.estimate.disagreeing(self.max_skew),
            self.early_gate_closures, tuple(sorted(self.early_by_leader.items())),
            self.transfers, self.held, self.distrusts,
        )  # fmt: skip

    def deadline_time(self, local: float, now: float, *, alone: bool) -> float | None:
        """The wall time by which a leader judges due gate closures and settlements, or None
        to hold them back. ``local``: this node's wall clock; ``alone``: no other voter in
        the Raft group (no quorum to wait for: its learners may all be down).

        Skewed: None, ``alone`` or not: a sole voter whose clock the median of its own and its
        learners' clocks finds off (two learners or more sampled) has no one to hand over to,
        so it holds every gate closure and settlement until its clock is right again (the
        samples it took before its own clock stepped are carried over the step, for up to
        ``MAX_AGE``). Otherwise ``alone``: the local clock (no unsampled hold; one learner's
        clock cannot outvote it). No sample yet while there are other voters: None for up to
        ``unsampled_hold`` seconds, then the local clock. Otherwise ``local - ahead``
        (:func:`median_ahead_bound`): the grid's median clock, never ahead of it, and later
        than it by at most the largest error of the samples around the median, twice (each
        within ``max_delay / 2``)."""
        est = self.estimate
        if alone:
            return None if self.skewed else local
        if est.offset is None:
            if self.unsampled_since is None:
                self.unsampled_since = now
            if now - self.unsampled_since < self.unsampled_hold:
                return None
            return local
        self.unsampled_since = None
        if self.skewed:
            return None
        ahead = est.ahead if est.ahead is not None else est.offset + est.error
        return local - ahead

    def note_held(self) -> None:
        """The leader held back a due gate closure or settlement."""
        self.held += 1

    def may_transfer(self, now: float) -> bool:
        """A skewed leader may hand leadership away now (at most once per ``transfer_every``);
        True records the handover (to the last :meth:`transfer_target`, which the next ones
        then pass over: see there)."""
        if not self.skewed:
            return False
        if self.last_transfer is not None and now - self.last_transfer < self.transfer_every:
            return False
        self.last_transfer = now
        self.transfers += 1
        if self._proposed is not None:
            self._tried.append(self._proposed)
        return True

    def gate_closed(self, gate_time: float, local: float, leader: str | None) -> bool:
        """A ``CloseGate`` whose gate time is ``gate_time`` was applied at ``local`` (this node's
        wall clock) under ``leader``: True (counted against the leader) if that is earlier than
        the grid's median clock allows by more than ``max_skew``. Not judged while this node is
        skewed itself or has no peer sample (its clock cannot tell)."""
        est = self.estimate
        if self.skewed or est.offset is None:
            return False  # no peer to compare with yet: a clock behind would blame everyone
        grid_now = local - est.offset + est.error
        if grid_now >= gate_time - self.max_skew:
            return False
        self.early_gate_closures += 1
        if leader is not None:
            if leader not in self.early_by_leader and len(self.early_by_leader) >= MAX_PEERS:
                self.early_by_leader.pop(next(iter(self.early_by_leader)))
            self.early_by_leader[leader] = self.early_by_leader.get(leader, 0) + 1
            self._unforgiven[leader] = self._unforgiven.get(leader, 0) + 1
            if len(self._unforgiven) > MAX_PEERS:
                self._unforgiven.pop(next(iter(self._unforgiven)))
        return True

    def distrust_target(self, leader: str | None, now: float, *, me: str, leading: bool,
                        voter: bool) -> str | None:  # fmt: skip
        """The leader to distrust for early gate closures now, or None: it closed at least
        ``distrust_after`` gates early (seen here), this node is a voter and does not lead, and
        no such distrust happened within ``distrust_every`` seconds. True ones are recorded
        (and the leader's count starts over)."""
        if self.distrust_after <= 0 or leader is None or leader == me or leading or not voter:
            return None
        if self._unforgiven.get(leader, 0) < self.distrust_after:
            return None
        if self.last_distrust is not None and now - self.last_distrust < self.distrust_every:
            return None
        self.last_distrust = now
        self.distrusts += 1
        self._unforgiven[leader] = 0
        return leader

    def transfer_target(self, me: str, voters: tuple[str, ...],
                        matches: dict[str, int]) -> str | None:  # fmt: skip
        """The voter to hand leadership to: the most caught-up (highest ``matches``) voter other
        than ``me`` whose clock agrees with the median (ties: the smallest id), passing over
        the voters already handed to while this node stayed skewed (a handover to a voter that
        is down or stopped times out and leaves this node leading; a skewed leader proposes
        nothing, so the down voter would stay the most caught-up and be picked again each time):
        once every candidate was tried, the round starts over. None if there is none."""
        disagreeing = {p.peer for p in self.estimate.disagreeing(self.max_skew)}
        candidates = sorted((v for v in voters if v != me and v not in disagreeing),
                            key=lambda v: (-matches.get(v, 0), v))  # fmt: skip
        untried = [v for v in candidates if v not in self._tried]
        if candidates and not untried:
            self._tried.clear()
            untried = candidates
        self._proposed = untried[0] if untried else None
        return self._proposed


def offset_clock(clock: Callable[[], float], offset: float) -> Callable[[], float]:
    """``clock`` shifted by ``offset`` seconds (tests and drills only: see
    ``clock_offset_seconds`` in :mod:`node.setup.config`)."""
    if not math.isfinite(offset):
        raise ValueError(f"clock offset must be finite, not {offset}")
    return lambda: clock() + offset
