"""Gossip validation, counting and penalties by culprit (no libp2p here: pure and unit-testable).

gossipsub calls the topic validator before a message is delivered locally or forwarded; a
rejected message goes nowhere. libp2p has already checked the message signature of the origin
(``msg.from_id``, strict signing), so the origin of every message reaching us is authenticated:
only the origin can produce a message with new content under its id. :class:`GossipValidator`
checks, in this order (the first failure is the reason counted):

1. ``non_member_peer``: the origin or the forwarding peer is not a member household (the
   *current* list: :meth:`GossipValidator.set_members` replaces it at runtime);
2. ``oversized`` / ``malformed`` / ``wrong_topic``: strict batch decoding (:mod:`node.net.wire`);
3. per record: ``wrong_grid``; ``not_member`` (author not a current member); ``author_mismatch``
   (author is not the origin peer: a household gossips only its own records, which ties the
   record's signature to the authenticated sender); ``bad_signature``; ``equivocation`` (the
   author signed a *different* record with a nonce it already used); ``replayed`` (the same
   record again, or a nonce below the author's window, also within the batch); then the node's
   slot policy (``slot_closed``, ``slot_not_open``, ``slot_too_far``).
   A :class:`~market.models.FeederReading` is authored by the genesis operator, who is not a
   member peer: instead of ``not_member`` and ``author_mismatch`` it must name the genesis
   operator (``not_operator``) and carry the operator's valid signature, and it may come from
   any member origin (the node holding the operator key, or a relay); the signature proves
   authorship. Its nonces use the operator's own window, like any author's. The operator's
   governance records (:data:`market.models.GOVERNANCE_RECORDS`, topic ``governance``) follow
   the same rule: operator author, operator signature, any member origin, the operator's
   nonce window (shared with its feeder readings, as in the engine);
4. ``rate_limited``: the origin exceeds its token bucket (messages per second, burst). Checked
   last, so only fresh records the author signed draw on its bucket: re-sent old messages of a
   household cannot drain it.

A batch is accepted or rejected as a whole; nonces are consumed only when it is accepted.

**Culprits.** Every rejection is counted per reason and per forwarding peer, and adds the
reason's weight (:data:`REASON_WEIGHTS`) to the *culprit* (:data:`REASON_CULPRIT`):

========================  ==========  ====================================================
reason                    culprit     why
========================  ==========  ====================================================
non_member_peer           forwarder   an honest forwarder checks membership first
oversized, malformed,     forwarder   deterministic checks of the bytes: an honest
wrong_topic, wrong_grid,              forwarder runs the same validator before forwarding
not_member,                           and never forwards such a message
author_mismatch,
not_operator,
bad_signature
equivocation              author      two different records with one nonce, both signed by
                                      the author: proof, whoever relayed them (each copy was
                                      valid where it was first accepted)
replayed, rate_limited,   author (*)  the author's signed content or sending rate; an
slot_closed,                          honest forwarder may have accepted the message
slot_not_open,                        earlier (its nonce window, bucket and clock differ)
slot_too_far
========================  ==========  ====================================================

(*) only when the author provably sent this message now: it came straight from the author
(forwarder = origin), or its pubsub seqno is above every seqno this node has seen from that
origin (a household's seqno counter only grows; the seqno is covered by the origin's
signature). Otherwise it may be an old message of the author re-sent by someone else: it is
rejected and counted, and nobody is penalised. The author's neighbours receive its messages
first-hand, so a misbehaving author is still penalised where it is connected. The local node is
never penalised (its own publications are validated too). A culprit whose points cross the
threshold is banned for a while (the host disconnects and blacklists it).

**Membership at runtime.** The member list follows the replicated governance log
(:meth:`GossipValidator.set_members`), and nodes apply a removal at slightly different times:
an honest member that has not applied it yet still relays the removed household's gossip. So
for ``member_grace`` seconds after a peer or DID left the list, a ``non_member_peer`` or
``not_member`` rejection about it is counted but penalises nobody (``unattributed``).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from market.errors import Rejection
from market.models import FeederReading, GovernanceRecord, SignedRecord
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
    "not_operator": 5.0,
    "bad_signature": 10.0,
    "equivocation": 10.0,
    # an honest node can race gate closure or re-send after a restart: light penalties
    "replayed": 1.0,
    "slot_closed": 0.5,
    "slot_not_open": 0.5,
    "slot_too_far": 2.0,
}
"""Penalty points per rejection reason."""

FORWARDER, AUTHOR = "forwarder", "author"
REASON_CULPRIT: dict[str, str] = {
    "non_member_peer": FORWARDER,
    "oversized": FORWARDER,
    "malformed": FORWARDER,
    "wrong_topic": FORWARDER,
    "wrong_grid": FORWARDER,
    "not_member": FORWARDER,
    "author_mismatch": FORWARDER,
    "not_operator": FORWARDER,
    "bad_signature": FORWARDER,
    "equivocation": AUTHOR,
    "replayed": AUTHOR,
    "rate_limited": AUTHOR,
    "slot_closed": AUTHOR,
    "slot_not_open": AUTHOR,
    "slot_too_far": AUTHOR,
}
"""Who is penalised for each rejection reason (the module docstring has the table); reasons
not listed (e.g. a slot policy's own) are the author's."""


class PeerFault(Exception):
    """A peer's bytes broke a protocol; raised by our stream handlers after they reset the
    stream, so the host counts ``reason`` for the peer under ``protocol`` and penalises it."""

    def __init__(self, protocol: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{protocol}: {reason}: {detail}" if detail else f"{protocol}: {reason}")
        self.protocol = protocol
        self.reason = reason
        self.detail = detail


SlotPolicy = Callable[[SignedRecord], str | None]
"""The node's time check for a record: None if acceptable, else a rejection reason."""


@dataclass
class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst``."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens at time ``now``; False (taking none) if there are fewer."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= amount:
            self.tokens -= amount
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


SIGNATURE_DIGEST_BYTES = 16
""":attr:`GossipValidator.signatures` keeps a BLAKE2b digest of this many bytes of each
signature (49 bytes as a ``bytes``), not the signature text (128 hex characters, 177 bytes):
what the equivocation check asks is only "the same signature or another one" (Ed25519
signatures are deterministic). 128 bits: an author cannot find two of its own records whose
signatures collide, which is what would hide an equivocation from gossip (the engine still
refuses the second record as replayed)."""

SEQNO_CONTENT_KEPT = 1024
"""How many recent gossip messages :class:`SeqnoContent` remembers (a digest of the content of
each ``(origin, seqno)``). gossipsub's own check (py-libp2p 0.8.1 ``_check_equivocation``) keeps
up to 1,000 *whole* messages: protobuf objects whose memory is outside Python's allocator (and
each keeps the arena of the RPC it came in alive), held long after the message cache let go of
them. 1,024 is at least what gossipsub's check kept (500 to 1,000), at about 150 bytes each
instead of a whole message: about 150 kB."""


def signature_digest(signature: str) -> bytes:
    """What :attr:`GossipValidator.signatures` keeps of a signature
    (:data:`SIGNATURE_DIGEST_BYTES`)."""
    return hashlib.blake2b(signature.encode(), digest_size=SIGNATURE_DIGEST_BYTES).digest()


class SeqnoContent:
    """A bounded equivocation check of gossip messages: one ``(origin, seqno)`` must always
    carry the same topics and data. Keeps a digest per key, the newest ``size`` keys."""

    def __init__(self, size: int = SEQNO_CONTENT_KEPT) -> None:
        if size < 1:
            raise ValueError(f"SeqnoContent size must be positive, not {size}")
        self.size = size
        self._seen: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, origin: bytes, seqno: bytes, topics: Iterable[str], data: bytes) -> bool:
        """False if ``(origin, seqno)`` was seen with other topics or data; else remember it
        (the first content seen stays) and return True. Never raises on odd input."""
        key = hashlib.blake2b(len(origin).to_bytes(4, "big") + origin + seqno,
                              digest_size=16).digest()  # fmt: skip
        names = [t.encode("utf-8", "surrogatepass") for t in topics]
        content = hashlib.blake2b(len(names).to_bytes(4, "big"), digest_size=16)
        for raw in names:
            content.update(len(raw).to_bytes(4, "big") + raw)
        content.update(data)
        digest = content.digest()
        earlier = self._seen.get(key)
        if earlier is not None:
            return earlier == digest
        self._seen[key] = digest
        while len(self._seen) > self.size:
            del self._seen[next(iter(self._seen))]
        return True


def _about(index: int, record: SignedRecord) -> str:
    """A rejected record named for the log: kind, place in its batch, author, nonce, slot."""
    slot = getattr(record, "slot", getattr(record, "from_slot", None))
    where = "" if slot is None else f", slot {slot}"
    return f"{record.KIND} (record {index}) by {record.author}, nonce {record.nonce}{where}"


@dataclass(frozen=True)
class Verdict:
    """The outcome of validating one gossip message."""

    ok: bool
    reason: str = ""
    detail: str = ""
    records: tuple[SignedRecord, ...] = ()
    culprit: str = ""
    """The peer penalised for a rejection ("" if nobody: see the module docstring)."""
    subject: str = ""
    """For a membership rejection: the peer id or DID that is not a member."""


class GossipValidator:
    """Validates gossip batches of one grid against its member list.

    ``members`` maps a member's peer id *string* (base58) to its DID. ``slot_policy`` is the
    node's clock-dependent check. ``on_reject(verdict, forwarder)`` (the verdict carries the
    reason, the detail and the culprit) and ``on_ban(peer)`` are hooks for metrics, the log and
    the host (disconnect and blacklist);
    ``local_peer`` (this node) is never penalised. ``operator`` is the genesis operator's DID,
    the only author of feeder readings and governance records (None: every such record is
    ``not_operator``). ``member_grace``: seconds after a member left the list during which a
    membership rejection about it penalises nobody (see the module docstring).
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
        on_reject: Callable[[Verdict, str], None] | None = None,
        on_ban: Callable[[str], None] | None = None,
        local_peer: str | None = None,
        operator: str | None = None,
        member_grace: float = 60.0,
    ) -> None:
        self.grid = grid
        self.operator = operator
        self.members = dict(members)
        self.member_dids = set(self.members.values())
        self.member_grace = member_grace
        self.departed: dict[str, float] = {}
        """Peer id or DID of a recent member -> until when its membership rejections are
        nobody's fault (:meth:`set_members`)."""
        self.nonce_window = nonce_window
        self.slot_policy = slot_policy
        self.rate_per_origin = rate_per_origin
        self.burst_per_origin = burst_per_origin
        self.penalties = penalties or PenaltyBox()
        self.clock = clock
        self.on_reject = on_reject
        self.on_ban = on_ban
        self.local_peer = local_peer
        self.nonces: dict[str, NonceWindow] = {}
        self.signatures: dict[str, dict[int, bytes]] = {}
        """Per author: the digest (:func:`signature_digest`) of the signature of the record
        accepted under each recent nonce (Ed25519 signatures are deterministic, so a different
        signature means different content)."""
        self._highest: dict[str, int] = {}
        """Per author: the highest nonce remembered in :attr:`signatures`."""
        self.seqnos: dict[str, int] = {}
        """Per origin: the highest pubsub seqno seen in a message reaching the validator."""
        self.buckets: dict[str, TokenBucket] = {}
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.rejected_by_peer: Counter[tuple[str, str]] = Counter()
        """(forwarder, reason) -> count."""
        self.penalised: Counter[tuple[str, str]] = Counter()
        """(culprit, reason) -> count."""
        self.unattributed: Counter[str] = Counter()
        """Rejections that penalised nobody (possibly re-sent by a third party), by reason."""

    def set_members(self, members: Mapping[str, str]) -> None:
        """Replace the member list (peer id string -> DID), e.g. after a governance change.

        Peers and DIDs that left get ``member_grace`` seconds during which rejections about
        them penalise nobody (an honest relay may not have applied the change yet); their
        rate buckets are dropped. Nonce windows, signatures and seqnos are kept (a readmitted
        author cannot replay), as are penalties and bans.
        """
        now = self.clock()
        new = dict(members)
        gone = [p for p in self.members if p not in new]
        gone_dids = self.member_dids - set(new.values())
        for key in (*gone, *gone_dids):
            self.departed[key] = now + self.member_grace
        for key in (*new, *new.values()):
            self.departed.pop(key, None)
        for key in [k for k, until in self.departed.items() if until <= now]:
            del self.departed[key]
        for peer in gone:
            self.buckets.pop(peer, None)
        self.members = new
        self.member_dids = set(new.values())

    def _recently_departed(self, key: str) -> bool:
        until = self.departed.get(key)
        return until is not None and self.clock() < until

    def validate(
        self, kind: TopicKind, origin: str, forwarder: str, data: bytes, seqno: int | None = None
    ) -> Verdict:
        """Check one message; ``origin``/``forwarder`` are peer id strings, ``seqno`` the
        message's pubsub seqno (None: the caller vouches the message is new from ``origin``).

        Never raises on bad input. Records the outcome (counters, nonces, penalties).
        """
        try:
            verdict = self._check(kind, origin, forwarder, data)
        except Exception as exc:  # a record model raising on odd input must not escape
            verdict = Verdict(False, "malformed", f"{type(exc).__name__}: {exc}")
        newest = self.seqnos.get(origin)
        newer = seqno is not None and (newest is None or seqno > newest)
        if newer and origin in self.members:
            self.seqnos[origin] = seqno
        fresh = seqno is None or newer
        if verdict.ok:
            for record in verdict.records:
                window = self.nonces.setdefault(record.author, NonceWindow())
                window.consume(record.nonce, self.nonce_window)
                self._remember_signature(record)
            self.accepted += 1
            return verdict
        culprit = self._culprit(verdict.reason, origin, forwarder, fresh)
        if verdict.subject and self._recently_departed(verdict.subject):
            culprit = ""  # a relay may not have applied the removal yet: nobody's fault
        verdict = replace(verdict, culprit=culprit)
        self.rejected[verdict.reason] += 1
        self.rejected_by_peer[(forwarder, verdict.reason)] += 1
        if self.on_reject is not None:
            self.on_reject(verdict, forwarder)
        if not culprit:
            self.unattributed[verdict.reason] += 1
            return verdict
        self.penalised[(culprit, verdict.reason)] += 1
        weight = REASON_WEIGHTS.get(verdict.reason, 5.0)
        if self.penalties.add(culprit, weight) and self.on_ban is not None:
            self.on_ban(culprit)
        return verdict

    def _culprit(self, reason: str, origin: str, forwarder: str, fresh: bool) -> str:
        """The peer to penalise for ``reason`` ("" for nobody): see the module docstring."""
        if REASON_CULPRIT.get(reason, AUTHOR) == FORWARDER:
            culprit = forwarder
        elif reason == "equivocation" or forwarder == origin or fresh:
            culprit = origin
        else:
            culprit = ""
        return "" if culprit == self.local_peer else culprit

    def _remember_signature(self, record: SignedRecord) -> None:
        """Keep the signature under the record's nonce while the nonce is inside the author's
        anti-replay window (below it the record is refused as replayed anyway): at most the
        nonces an author used within one window, whatever the grid's age."""
        seen = self.signatures.setdefault(record.author, {})
        seen[record.nonce] = signature_digest(record.signature)
        floor = max(record.nonce, self._highest.get(record.author, -1)) - self.nonce_window
        self._highest[record.author] = floor + self.nonce_window
        if len(seen) > 1 and next(iter(seen)) <= floor:
            for nonce in [n for n in seen if n <= floor]:
                del seen[nonce]

    def _check(self, kind: TopicKind, origin: str, forwarder: str, data: bytes) -> Verdict:
        origin_did = self.members.get(origin)
        if origin_did is None:
            return Verdict(False, "non_member_peer", f"origin {origin} is not a member",
                           subject=origin)  # fmt: skip
        if forwarder not in self.members:
            return Verdict(False, "non_member_peer", f"forwarder {forwarder} is not a member",
                           subject=forwarder)  # fmt: skip
        try:
            records = decode_batch(data, kind)
        except WireError as exc:
            return Verdict(False, exc.reason, exc.detail)
        seen: dict[tuple[str, int], bytes] = {}
        for i, record in enumerate(records):
            author = record.author
            if record.grid != self.grid:
                return Verdict(False, "wrong_grid", f"record {i} is for grid {record.grid!r}")
            if isinstance(record, FeederReading | GovernanceRecord):
                # the operator's record, relayed by a member: the signature proves authorship
                if self.operator is None or author != self.operator:
                    return Verdict(
                        False, "not_operator", f"record {i} operator {author} is not the grid's"
                    )
            elif author not in self.member_dids:
                return Verdict(False, "not_member", f"record {i} author {author} is not a member",
                               subject=author)  # fmt: skip
            elif author != origin_did:
                return Verdict(
                    False, "author_mismatch", f"record {i} by {author} sent by {origin_did}"
                )
            if not record.verify(author):
                return Verdict(False, "bad_signature", f"record {i} signature does not verify")
            key = (author, record.nonce)
            digest = signature_digest(record.signature)
            earlier = seen.get(key, self.signatures.get(author, {}).get(record.nonce))
            if earlier is not None and earlier != digest:
                return Verdict(False, "equivocation",
                               f"{_about(i, record)}: the nonce was signed twice")  # fmt: skip
            window = self.nonces.get(author)
            if key in seen or not _fresh(window, record.nonce, self.nonce_window):
                return Verdict(False, "replayed", f"{_about(i, record)}: replayed")
            seen[key] = digest
            if self.slot_policy is not None:
                reason = self.slot_policy(record)
                if reason is not None:
                    detail = f"{_about(i, record)}: outside its slot's window by this clock"
                    return Verdict(False, reason, detail)
        bucket = self.buckets.get(origin)
        if bucket is None:
            bucket = self.buckets[origin] = TokenBucket(self.rate_per_origin, self.burst_per_origin)
        if not bucket.take(self.clock()):
            return Verdict(False, "rate_limited", f"origin {origin} exceeds its message rate")
        return Verdict(True, records=tuple(records))


def _fresh(window: NonceWindow | None, nonce: int, size: int) -> bool:
    """The engine's own anti-replay rule (``NonceWindow.check``) as a boolean."""
    try:
        (window or NonceWindow()).check(nonce, size)
    except Rejection:
        return False
    return True
