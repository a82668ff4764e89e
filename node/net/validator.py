"""Gossip validation, counting and sender penalties (no libp2p here: pure and unit-testable).

gossipsub calls the topic validator before a message is delivered locally or forwarded; a
rejected message goes nowhere. :class:`GossipValidator` checks, in this order (the first failure
is the reason counted):

1. ``non_member_peer``: the origin peer (``msg.from_id``, authenticated by libp2p's message
   signature) or the forwarding peer is not a member household;
2. ``rate_limited``: the origin exceeds its token bucket (messages per second, burst);
3. ``oversized`` / ``malformed`` / ``wrong_topic``: strict batch decoding (:mod:`node.net.wire`);
4. per record: ``wrong_grid``; ``not_member`` (author not in the genesis); ``author_mismatch``
   (author is not the origin peer: a household gossips only its own records, which ties the
   record's signature to the authenticated sender); ``bad_signature``; ``replayed`` (nonce seen
   before or below the author's window, also within the batch); then the node's slot policy
   (e.g. ``slot_closed``).

A batch is accepted or rejected as a whole; nonces are consumed only when it is accepted.
Every rejection is counted per reason and per forwarding peer, and adds a weighted penalty to
the forwarder (honest nodes never forward an invalid message, so the forwarder is the culprit).
A forwarder whose penalty crosses the threshold is banned for a while (the node disconnects and
blacklists it).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from market.errors import Rejection
from market.models import SignedRecord
from market.state import NonceWindow
from node.net.wire import TopicKind, WireError, decode_batch

REASON_WEIGHTS: dict[str, float] = {
    "non_member_peer": 10.0,
    "rate_limited": 1.0,
    "oversized": 5.0,
    "malformed": 5.0,
    "wrong_topic": 5.0,
    "wrong_grid": 5.0,
    "not_member": 5.0,
    "author_mismatch": 5.0,
    "bad_signature": 10.0,
    # an honest node can race gate closure or re-send after a restart: light penalties
    "replayed": 1.0,
    "slot_closed": 0.5,
    "slot_not_open": 0.5,
    "slot_too_far": 2.0,
}
"""Penalty points per rejection reason."""

SlotPolicy = Callable[[SignedRecord], str | None]
"""The node's time check for a record: None if acceptable, else a rejection reason."""


@dataclass
class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst``."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> bool:
        """Take one token at time ``now``; False if the bucket is empty."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class PenaltyBox:
    """Penalty points per peer, decaying linearly; a peer over ``threshold`` is banned."""

    threshold: float = 50.0
    decay_per_second: float = 1.0
    ban_seconds: float = 30.0
    clock: Callable[[], float] = time.monotonic
    points: dict[str, float] = field(default_factory=dict)
    stamps: dict[str, float] = field(default_factory=dict)
    banned_until: dict[str, float] = field(default_factory=dict)

    def add(self, peer: str, weight: float) -> bool:
        """Add ``weight`` points to ``peer``; True if this newly bans it."""
        now = self.clock()
        if self.is_banned(peer):
            return False
        decayed = self.points.get(peer, 0.0) - (now - self.stamps.get(peer, now)) * (
            self.decay_per_second
        )
        score = max(0.0, decayed) + weight
        self.points[peer], self.stamps[peer] = score, now
        if score >= self.threshold:
            self.banned_until[peer] = now + self.ban_seconds
            self.points[peer] = 0.0
            return True
        return False

    def is_banned(self, peer: str) -> bool:
        """True until :meth:`expired` has collected the peer's ended ban.

        The host lifts its pubsub blacklist when it collects the ban; the peer must count as
        banned until then, or a redial in between would meet the blacklist and get a
        connection without a pubsub stream.
        """
        return peer in self.banned_until

    def expired(self) -> list[str]:
        """Peers whose ban has ended (removed from the box)."""
        now = self.clock()
        done = [p for p, until in self.banned_until.items() if now >= until]
        for p in done:
            del self.banned_until[p]
        return done

    def score(self, peer: str) -> float:
        """Current (decayed) penalty points of ``peer``."""
        now = self.clock()
        decayed = self.points.get(peer, 0.0) - (now - self.stamps.get(peer, now)) * (
            self.decay_per_second
        )
        return max(0.0, decayed)


@dataclass(frozen=True)
class Verdict:
    """The outcome of validating one gossip message."""

    ok: bool
    reason: str = ""
    detail: str = ""
    records: tuple[SignedRecord, ...] = ()


class GossipValidator:
    """Validates gossip batches of one grid against its member list.

    ``members`` maps a member's peer id *string* (base58) to its DID. ``slot_policy`` is the
    node's clock-dependent check. ``on_reject(reason, forwarder)`` and ``on_ban(forwarder)`` are
    hooks for metrics and for the host (disconnect and blacklist).
    """

    def __init__(
        self,
        grid: str,
        members: Mapping[str, str],
        *,
        nonce_window: int = 1024,
        slot_policy: SlotPolicy | None = None,
        rate_per_origin: float = 20.0,
        burst_per_origin: float = 100.0,
        penalties: PenaltyBox | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_reject: Callable[[str, str], None] | None = None,
        on_ban: Callable[[str], None] | None = None,
    ) -> None:
        self.grid = grid
        self.members = dict(members)
        self.member_dids = set(self.members.values())
        self.nonce_window = nonce_window
        self.slot_policy = slot_policy
        self.rate_per_origin = rate_per_origin
        self.burst_per_origin = burst_per_origin
        self.penalties = penalties or PenaltyBox()
        self.clock = clock
        self.on_reject = on_reject
        self.on_ban = on_ban
        self.nonces: dict[str, NonceWindow] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.rejected_by_peer: Counter[tuple[str, str]] = Counter()

    def validate(self, kind: TopicKind, origin: str, forwarder: str, data: bytes) -> Verdict:
        """Check one message; ``origin``/``forwarder`` are peer id strings.

        Never raises on bad input. Records the outcome (counters, nonces, penalties).
        """
        verdict = self._check(kind, origin, forwarder, data)
        if verdict.ok:
            for record in verdict.records:
                window = self.nonces.setdefault(record.author, NonceWindow())
                window.consume(record.nonce, self.nonce_window)
            self.accepted += 1
            return verdict
        self.rejected[verdict.reason] += 1
        self.rejected_by_peer[(forwarder, verdict.reason)] += 1
        if self.on_reject is not None:
            self.on_reject(verdict.reason, forwarder)
        weight = REASON_WEIGHTS.get(verdict.reason, 5.0)
        if self.penalties.add(forwarder, weight) and self.on_ban is not None:
            self.on_ban(forwarder)
        return verdict

    def _check(self, kind: TopicKind, origin: str, forwarder: str, data: bytes) -> Verdict:
        origin_did = self.members.get(origin)
        if origin_did is None:
            return Verdict(False, "non_member_peer", f"origin {origin} is not a member")
        if forwarder not in self.members:
            return Verdict(False, "non_member_peer", f"forwarder {forwarder} is not a member")
        bucket = self.buckets.get(origin)
        if bucket is None:
            bucket = self.buckets[origin] = TokenBucket(self.rate_per_origin, self.burst_per_origin)
        if not bucket.take(self.clock()):
            return Verdict(False, "rate_limited", f"origin {origin} exceeds its message rate")
        try:
            records = decode_batch(data, kind)
        except WireError as exc:
            return Verdict(False, exc.reason, exc.detail)
        seen: set[tuple[str, int]] = set()
        for i, record in enumerate(records):
            author = record.author
            if record.grid != self.grid:
                return Verdict(False, "wrong_grid", f"record {i} is for grid {record.grid!r}")
            if author not in self.member_dids:
                return Verdict(False, "not_member", f"record {i} author {author} is not a member")
            if author != origin_did:
                return Verdict(
                    False, "author_mismatch", f"record {i} by {author} sent by {origin_did}"
                )
            if not record.verify(author):
                return Verdict(False, "bad_signature", f"record {i} signature does not verify")
            key = (author, record.nonce)
            window = self.nonces.get(author)
            if key in seen or not _fresh(window, record.nonce, self.nonce_window):
                return Verdict(False, "replayed", f"record {i} nonce {record.nonce} replayed")
            seen.add(key)
            if self.slot_policy is not None:
                reason = self.slot_policy(record)
                if reason is not None:
                    return Verdict(False, reason, f"record {i} refused by slot policy")
        return Verdict(True, records=tuple(records))


def _fresh(window: NonceWindow | None, nonce: int, size: int) -> bool:
    """The engine's own anti-replay rule (``NonceWindow.check``) as a boolean."""
    try:
        (window or NonceWindow()).check(nonce, size)
    except Rejection:
        return False
    return True
