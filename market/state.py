"""The replicated state machine: ``apply(state, command) -> (state, events)``.

Every node feeds the same committed commands, in log order, into :func:`apply` and so holds the
same state and writes the same blocks. The engine reads nothing but its arguments: no clock (gate
closure and settlement are commands the Raft leader proposes), no randomness, no floats.

``apply`` updates ``state`` in place and returns it (copying a large book per command would make
replay quadratic). Every command is fully validated before anything changes, so a rejected
command leaves the state exactly as it was and yields a single :class:`~market.events.Rejected`.

Readings must be physically plausible: between two readings of one meter, neither counter may
rise by more than the household's registered ``max_power_w`` over the slots between them (see
:func:`plausible_rise_wh`), so settlement never sees energy a meter cannot have measured.

In a grid with a feeder meter (``MarketConfig.feeder_serial``), the operator signs a
:class:`~market.models.FeederReading` per slot, checked like a household's reading (against
``feeder_max_power_w``); settlement compares the feeder's net import with the households'
(:mod:`market.feeder`) and hashes the outcome into the block header.

Slot sequencing: gates close strictly one slot after another (``CloseGate(s)`` needs
``s == closed_through + 1`` once the first gate has closed) and slots settle in the same order,
never ahead of their gate. Orders are accepted for open slots up to ``slot_horizon`` ahead (any
open slot before the first gate has closed); readings for slots whose gate closed and that are
not settled yet.

Curve orders (:attr:`~market.models.Order.steps`) are admitted with a plain order's rules and
reasons: the total (``quantity_wh``) within ``max_order_wh`` and, for offers, the household's
sell limit; every step's quantity positive (``invalid_quantity``) and every step's price in the
slot's band (``price_out_of_band``). A rules change that narrows the band withdraws a resting
curve order if any of its steps leaves it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from market.accounting import (
    ASSETS,
    Block,
    Posting,
    Transaction,
    household_account,
    roots,
    state_hash,
)
from market.auction import Clearing, clear
from market.bounds import DEFAULT_MAX_POWER_W, MAX_SLOT, READING_SLACK_WH
from market.config import (
    DEFAULT_FEEDER_LOSS_PERMILLE,
    DEFAULT_FEEDER_MAX_POWER_W,
    DEFAULT_FEEDER_TOLERANCE_WH,
    DEFAULT_MAX_SILENT_SLOTS,
    DEFAULT_REPUTATION_WINDOW_SLOTS,
    DEFAULT_SELL_FLOOR_PERMILLE,
    MAX_SILENT_SLOTS,
    RULES,
    MarketConfig,
    MarketConfigError,
)
from market.did import IdentityError, public_key_from_did, verify_signature
from market.errors import Rejection, RejectReason
from market.events import (
    Event,
    FeederReadingAccepted,
    GateClosed,
    GovernanceAccepted,
    HouseholdRegistered,
    OrderAccepted,
    OrderCancelled,
    ReadingAccepted,
    Rejected,
    SlotSettled,
)
from market.feeder import FeederCheck, HouseholdFlow, feeder_check
from market.governance import Governance, MemberStatus, Term
from market.models import (
    GOVERNANCE_RECORDS,
    AddMember,
    CancelOrder,
    ChangeRole,
    ChangeRules,
    CloseGate,
    Command,
    FeederReading,
    GovernanceRecord,
    MemberChange,
    MemberRegistration,
    MemberRole,
    MeterReading,
    Order,
    ReinstateMember,
    RemoveMember,
    ReplaceMeter,
    RotateKey,
    SettleSlot,
    Side,
    SignedRecord,
    SuspendMember,
    Trade,
    curve_problem,
    record_hash,
)
from market.settlement import Gap, HouseholdSettlement, Metered, settle_slot


def plausible_rise_wh(max_power_w: int, slot_seconds: int, slots: int) -> int:
    """Most a meter counter may rise over ``slots`` slots at ``max_power_w``: the energy at that
    power, rounded down to whole Wh, plus :data:`~market.bounds.READING_SLACK_WH` once for the
    quantisation of the two counter values compared."""
    return max_power_w * slot_seconds * slots // 3600 + READING_SLACK_WH


@dataclass(slots=True)
class NonceWindow:
    """Anti-replay window of one signer: each nonce once, none far below the highest."""

    highest: int = -1
    recent: set[int] = field(default_factory=set)

    def check(self, nonce: int, window: int) -> None:
        """Raise :class:`Rejection` unless ``nonce`` is fresh."""
        if nonce < 0 or nonce <= self.highest - window or nonce in self.recent:
            raise Rejection(
                RejectReason.REPLAYED_NONCE, f"nonce {nonce} already used or below the window"
            )

    def consume(self, nonce: int, window: int) -> None:
        """Record ``nonce`` as used; forget the nonces the window refuses anyway
        (:data:`NONCE_TRIM_STEP`)."""
        previous = self.highest
        self.recent.add(nonce)
        if nonce > previous:
            self.highest = nonce
            cut = _trim_cut(nonce, window)
            if cut > _trim_cut(previous, window) and min(self.recent) <= cut:
                self.recent = {n for n in self.recent if n > cut}


NONCE_TRIM_STEP = 64
""":meth:`NonceWindow.consume` drops the nonces at or below the window's floor (``highest -
nonce_window``: :meth:`NonceWindow.check` refuses them whatever the set holds) each time that
floor crosses a multiple of this step. A set then holds at most the nonces used within
``nonce_window + 64`` (64 nonces are 16 slots at four per slot), and the trim, one pass over the
set, runs once per 16 slots per author. Before, the set was pruned only once it held ``2 *
nonce_window`` nonces, after about 1,000 slots at two records per slot: up to 200 kB per author
in every node, 10 MB at 50 households (issue 19). Verdicts are the same (``nonce_window`` is
fixed at genesis), and the set is still a function of the log alone, so every replica and
every snapshot of it holds the same nonces."""


def _trim_cut(highest: int, window: int) -> int:
    """The window's floor rounded down to a multiple of :data:`NONCE_TRIM_STEP`."""
    return (highest - window) // NONCE_TRIM_STEP * NONCE_TRIM_STEP


@dataclass(frozen=True, slots=True)
class Member:
    """A registered household."""

    meter_serial: str
    role: MemberRole
    max_power_w: int = DEFAULT_MAX_POWER_W


@dataclass(slots=True)
class Reputation:
    """Delivery reliability of a household, accumulated over settled slots."""

    sold_wh: int = 0
    delivered_wh: int = 0
    bought_wh: int = 0
    consumed_wh: int = 0
    slots: int = 0
    missed_readings: int = 0
    silent_slots: int = 0
    """Settled slots in a row without a reading of this household (0 once a reading arrives)."""
    recent_sold_wh: int = 0
    """Energy sold, over the reputation window (each settled slot keeps ``(W - 1) / W`` of the
    previous value, rounded down, and adds the slot's)."""
    recent_delivered_wh: int = 0
    """Energy delivered against sales, over the same window."""

    @property
    def recent_score_permille(self) -> int:
        """Sales honoured over the window, in permille (1000 with none: a newcomer)."""
        return delivery_score_permille(self.recent_sold_wh, self.recent_delivered_wh)

    @property
    def score_permille(self) -> int:
        """Share of contracted energy honoured, in permille (1000 with no contracts yet)."""
        contracted = self.sold_wh + self.bought_wh
        if contracted == 0:
            return 1000
        return (self.delivered_wh + self.consumed_wh) * 1000 // contracted


def window_add(total: int, add: int, window: int) -> int:
    """``total`` over an exponentially weighted window of ``window`` slots after one more slot
    adds ``add``: it keeps ``(window - 1) / window`` of the old total, rounded down."""
    return total * (window - 1) // window + add


def delivery_score_permille(sold_wh: int, delivered_wh: int) -> int:
    """The share of sales delivered, in permille (1000 with no sales: a newcomer)."""
    if sold_wh == 0:
        return 1000
    return min(1000, delivered_wh * 1000 // sold_wh)


def offer_share_permille(config: MarketConfig, score_permille: int) -> int:
    """The share of its meter's capacity per slot a household with ``score_permille`` may offer
    (:func:`sell_limit_wh`)."""
    return max(score_permille, config.sell_floor_permille)


@dataclass(slots=True)
class State:
    """Everything the contract engine knows. Build with :meth:`State.initial`."""

    config: MarketConfig
    members: dict[str, Member] = field(default_factory=dict)
    nonces: dict[str, NonceWindow] = field(default_factory=dict)
    books: dict[int, dict[str, Order]] = field(default_factory=dict)
    """Open slots' orders by id, in log order (dicts keep insertion order)."""
    cleared: dict[int, tuple] = field(default_factory=dict)
    """Closed, unsettled slots: their enriched trades."""
    closed_books: dict[int, tuple[Order, ...]] = field(default_factory=dict)
    """Closed, unsettled slots: the books they cleared, in log order. Settlement does not need
    them; a node that installs a snapshot does, to write those gate closures to its ledger."""
    pending_readings: dict[int, dict[str, MeterReading]] = field(default_factory=dict)
    baselines: dict[str, MeterReading] = field(default_factory=dict)
    """The last reading each household's settlement used."""
    pending_feeder: dict[int, FeederReading] = field(default_factory=dict)
    """Closed, unsettled slots: the feeder reading accepted for each."""
    feeder_baseline: FeederReading | None = None
    """The last feeder reading a settlement used."""
    closed_through: int | None = None
    settled_through: int | None = None
    balances: dict[tuple[str, str], int] = field(default_factory=dict)
    reputation: dict[str, Reputation] = field(default_factory=dict)
    height: int = 0
    head_hash: str = ""
    governance: Governance = field(default_factory=Governance)
    """The operator's committed membership and rules changes (:mod:`market.governance`)."""

    @classmethod
    def initial(cls, config: MarketConfig) -> State:
        """The state before any command: no members, empty ledger."""
        return cls(config=config, head_hash=config.genesis_hash())

    def copy(self) -> State:
        """A deep, independent copy (for tests and what-if evaluation)."""
        return copy.deepcopy(self)


def apply(state: State, command: Command) -> tuple[State, list[Event]]:
    """Apply one committed command. Returns the (same, updated) state and what happened."""
    try:
        if isinstance(command, Order):
            events = _submit_order(state, command)
        elif isinstance(command, CancelOrder):
            events = _cancel_order(state, command)
        elif isinstance(command, MeterReading):
            events = _submit_reading(state, command)
        elif isinstance(command, FeederReading):
            events = _submit_feeder_reading(state, command)
        elif isinstance(command, MemberRegistration):
            events = _register(state, command)
        elif isinstance(command, GOVERNANCE_RECORDS):
            events = _govern(state, command)
        elif isinstance(command, CloseGate):
            events = _close_gate(state, command.slot)
        elif isinstance(command, SettleSlot):
            events = _settle(state, command.slot)
        else:
            raise TypeError(f"not a command: {type(command).__name__}")
    except Rejection as rejection:
        author = command.author if isinstance(command, SignedRecord) else None
        kind = getattr(command, "type", type(command).__name__)
        return state, [Rejected(rejection.reason, rejection.detail, kind, author)]
    return state, events


# --- signed records ---------------------------------------------------------------------------


def _authenticate(state: State, record: SignedRecord) -> None:
    """Grid, membership, signature and replay checks common to every signed record."""
    if record.grid != state.config.grid:
        raise Rejection(RejectReason.WRONG_GRID, f"record is for grid {record.grid!r}")
    author = record.author
    if isinstance(record, (MemberRegistration, FeederReading, *GOVERNANCE_RECORDS)):
        if author != state.config.operator:
            raise Rejection(RejectReason.NOT_OPERATOR, f"{author} is not the grid operator")
    elif author not in state.members:
        raise Rejection(RejectReason.UNKNOWN_HOUSEHOLD, f"{author} is not a member")
    if not record.verify(author):
        raise Rejection(RejectReason.BAD_SIGNATURE, f"{record.KIND} signature does not verify")
    state.nonces.get(author, NonceWindow()).check(record.nonce, state.config.nonce_window)


def _consume_nonce(state: State, record: SignedRecord) -> None:
    window = state.nonces.setdefault(record.author, NonceWindow())
    window.consume(record.nonce, state.config.nonce_window)


def _register(state: State, reg: MemberRegistration) -> list[Event]:
    _authenticate(state, reg)
    try:
        public_key_from_did(reg.household)
    except IdentityError as exc:
        raise Rejection(RejectReason.INVALID_HOUSEHOLD_ID, str(exc)) from None
    if not reg.meter_serial:
        raise Rejection(RejectReason.UNKNOWN_METER, "registration names no meter serial")
    if reg.household in state.governance.terms:
        raise Rejection(
            RejectReason.INVALID_CHANGE,
            "the household's terms are governed by the operator's records: change its meter "
            "or role with replace_meter or change_role",
        )
    _consume_nonce(state, reg)
    previous = state.members.get(reg.household)
    state.members[reg.household] = Member(reg.meter_serial, reg.role, reg.max_power_w)
    state.reputation.setdefault(reg.household, Reputation())
    if previous is not None and previous.meter_serial != reg.meter_serial:
        # A replaced meter starts a new counter baseline.
        state.baselines.pop(reg.household, None)
    return [HouseholdRegistered(reg)]


# --- governance: membership and rules that change from a slot ------------------------------------


class _Counters(NamedTuple):
    """Counters of a meter known without a signed reading: the final counters of a swapped-out
    meter (at the end of the swap's slot's start) or a new meter's first counters."""

    meter_serial: str
    slot: int
    import_wh: int
    export_wh: int


def config_at(state: State, slot: int) -> MarketConfig:
    """The market rules in force in ``slot`` (the genesis rules until an operator's
    :class:`~market.models.ChangeRules` from that slot or earlier)."""
    return state.governance.config_at(state.config, slot)


def member_term(state: State, did: str, slot: int) -> Term | None:
    """The household's standing in ``slot``: its status, role and meter (None: never a
    member)."""
    term = state.governance.term_at(did, slot)
    if term is not None:
        return term
    member = state.members.get(did)
    if member is None:
        return None
    return Term(0, MemberStatus.ACTIVE, member.role, member.meter_serial, member.max_power_w)


def latest_term(state: State, did: str) -> Term:
    """The household's standing once every scheduled change is in force (``did`` must be a
    member)."""
    term = state.governance.last_term(did)
    return term if term is not None else member_term(state, did, 0)  # type: ignore[return-value]


def _require_active(state: State, did: str, slot: int) -> Term:
    term = member_term(state, did, slot)
    if term is None:
        raise Rejection(RejectReason.UNKNOWN_HOUSEHOLD, f"{did} is not a member")
    if not term.active:
        raise Rejection(RejectReason.NOT_ACTIVE, f"the household is {term.status} in slot {slot}")
    return term


def _swap_counters(state: State, did: str, serial: str) -> list[_Counters]:
    """What the household's meter swaps say of meter ``serial``: its first counters (a new
    meter, at the end of the slot before the swap) and its final ones (an old meter, in the
    swap's slot)."""
    gov = state.governance
    known = []
    for sw in gov.swaps_between(did, -1, MAX_SLOT):
        if sw.meter_serial == serial:
            known.append(_Counters(serial, sw.from_slot - 1, sw.new_import_wh, sw.new_export_wh))
        old = gov.term_at(sw.household, sw.from_slot - 1)
        old_serial = (
            old.meter_serial if old is not None else state.members[sw.household].meter_serial
        )
        if old_serial == serial and sw.from_slot > 0:
            known.append(_Counters(serial, sw.from_slot, sw.old_import_wh, sw.old_export_wh))
    return known


def _moved_since(
    state: State, did: str, base: MeterReading, reading: MeterReading
) -> tuple[int, int] | None:
    """What the household's meters counted from ``base`` to ``reading``: the difference of one
    meter's counters, or across meter swaps the old meter's rise to its final counters plus the
    new meter's rise from its first ones. None when no swap links the two meters."""
    if base.meter_serial == reading.meter_serial:
        return reading.import_wh - base.import_wh, reading.export_wh - base.export_wh
    serial, imp, exp = base.meter_serial, base.import_wh, base.export_wh
    moved_import = moved_export = 0
    for sw in state.governance.swaps_between(did, base.slot, reading.slot):
        moved_import += sw.old_import_wh - imp
        moved_export += sw.old_export_wh - exp
        serial, imp, exp = sw.meter_serial, sw.new_import_wh, sw.new_export_wh
    if serial != reading.meter_serial:
        return None
    moved_import += reading.import_wh - imp
    moved_export += reading.export_wh - exp
    if moved_import < 0 or moved_export < 0:
        return None  # the new meter restarted: its counters give no usable movement
    return moved_import, moved_export


def _rotate_key(state: State, rotation: RotateKey, slot: int) -> Transaction:
    """Move a household's balances, counter baseline and delivery record to its new DID at the
    first settlement in force under it; the balance transfer is the returned transaction."""
    old, new = rotation.household, rotation.new_household
    postings = []
    for asset in ASSETS:
        amount = state.balances.get((household_account(old), asset), 0)
        if amount:
            postings.append(Posting(household_account(old), asset, -amount))
            postings.append(Posting(household_account(new), asset, amount))
    base = state.baselines.pop(old, None)
    if base is not None:
        state.baselines[new] = base
    if old in state.reputation:
        state.reputation[new] = replace(state.reputation[old])
    return Transaction("key_rotation", slot, f"{old}>{new}", tuple(postings))


def _govern(state: State, record: GovernanceRecord) -> list[Event]:
    """An operator's membership or rules change: validated completely, then folded into the
    governance history; the resting orders it invalidates leave the books."""
    _authenticate(state, record)
    first_open = 0 if state.closed_through is None else state.closed_through + 1
    if record.from_slot < first_open:
        raise Rejection(
            RejectReason.EFFECTIVE_SLOT_CLOSED,
            f"slot {record.from_slot} is closed: changes take effect from slot {first_open} on",
        )
    genesis_term = None
    if isinstance(record, MemberChange):
        _check_member_change(state, record)
        genesis_term = member_term(state, record.household, 0)
    tentative = state.governance.copy()
    tentative.add(record, genesis_term)
    if isinstance(record, ChangeRules):
        _check_rules(state, record, tentative)
    else:
        _check_voters(state, record, tentative, first_open)
    withdrawn = _withdrawn_orders(state, record, tentative)
    _consume_nonce(state, record)
    state.governance.add(record, genesis_term)
    if isinstance(record, AddMember):
        state.members[record.household] = Member(
            record.meter_serial, record.role, record.max_power_w
        )
        state.reputation.setdefault(record.household, Reputation())
    elif isinstance(record, RotateKey):
        term = latest_term(state, record.new_household)
        state.members[record.new_household] = Member(term.meter_serial, term.role, term.max_power_w)
    for order in withdrawn:
        del state.books[order.slot][order.id]
    return [GovernanceAccepted(record, tuple(withdrawn))]


_ALLOWED_FROM: dict[type, frozenset[MemberStatus]] = {
    RemoveMember: frozenset({MemberStatus.ACTIVE, MemberStatus.SUSPENDED}),
    SuspendMember: frozenset({MemberStatus.ACTIVE}),
    ReinstateMember: frozenset({MemberStatus.SUSPENDED}),
    ChangeRole: frozenset({MemberStatus.ACTIVE, MemberStatus.SUSPENDED}),
    RotateKey: frozenset({MemberStatus.ACTIVE, MemberStatus.SUSPENDED}),
    ReplaceMeter: frozenset({MemberStatus.ACTIVE, MemberStatus.SUSPENDED}),
}


def _check_member_change(state: State, record: MemberChange) -> None:
    did = record.household
    if isinstance(record, AddMember):
        _check_new_did(state, did)
        _check_serial_free(state, record.meter_serial)
        return
    if did not in state.members:
        raise Rejection(RejectReason.UNKNOWN_HOUSEHOLD, f"{did} is not a member")
    last = latest_term(state, did)
    scheduled = state.governance.last_change_slot(did)
    if record.from_slot < scheduled:
        raise Rejection(
            RejectReason.INVALID_CHANGE,
            f"a change of this household from slot {scheduled} is already scheduled",
        )
    if last.status not in _ALLOWED_FROM[type(record)]:
        raise Rejection(
            RejectReason.INVALID_CHANGE, f"cannot {record.type} a household that is {last.status}"
        )
    if isinstance(record, ChangeRole) and record.role == last.role:
        raise Rejection(RejectReason.INVALID_CHANGE, f"the household is already a {record.role}")
    if isinstance(record, RotateKey):
        _check_new_did(state, record.new_household)
        if record.household_signature and not verify_signature(
            did, record.signing_bytes(), record.household_signature
        ):
            raise Rejection(
                RejectReason.BAD_SIGNATURE, "the old key's hand-over signature does not verify"
            )
    if isinstance(record, ReplaceMeter):
        if record.meter_serial == last.meter_serial:
            raise Rejection(RejectReason.INVALID_CHANGE, "the new meter is the registered one")
        _check_serial_free(state, record.meter_serial)
        final = _Counters(
            last.meter_serial, record.from_slot, record.old_import_wh, record.old_export_wh
        )
        lineage = state.governance.lineage(did)
        known: list[MeterReading | _Counters] = [
            r
            for d in lineage
            for r in (state.baselines.get(d), *(p.get(d) for p in state.pending_readings.values()))
            if r is not None and r.meter_serial == last.meter_serial
        ]
        swaps = _swap_counters(state, did, last.meter_serial)
        known.extend(c for c in swaps if c.slot < final.slot)
        _check_counters(final, known, last.max_power_w, state.config.slot_seconds)


def _check_new_did(state: State, did: str) -> None:
    try:
        public_key_from_did(did)
    except IdentityError as exc:
        raise Rejection(RejectReason.INVALID_HOUSEHOLD_ID, str(exc)) from None
    if did in state.members:
        raise Rejection(RejectReason.INVALID_CHANGE, f"{did} is or was a member already")


def _check_serial_free(state: State, serial: str) -> None:
    if serial == state.config.feeder_serial or any(
        latest_term(state, d).meter_serial == serial
        for d in state.members
        if latest_term(state, d).status not in (MemberStatus.REMOVED, MemberStatus.ROTATED)
    ):
        raise Rejection(RejectReason.INVALID_CHANGE, f"meter {serial!r} is another member's")


def _check_rules(state: State, record: ChangeRules, tentative: Governance) -> None:
    if not record.changes():
        raise Rejection(RejectReason.INVALID_CHANGE, "the rules change names no rule")
    for slot in sorted({s for s, _, _ in tentative.rules_changes if s >= record.from_slot}):
        try:
            tentative.config_at(state.config, slot)
        except MarketConfigError as exc:
            raise Rejection(RejectReason.INVALID_CHANGE, f"rules from slot {slot}: {exc}") from None


def _check_voters(
    state: State, record: GovernanceRecord, tentative: Governance, first_open: int
) -> None:
    """Every slot from the first open one on keeps at least one active voter (in a grid that
    has one: a test grid of learners only is left as it is)."""
    dids = [*state.members, *([record.new_household] if isinstance(record, RotateKey) else [])]

    def voters(governance: Governance, slot: int) -> int:
        count = 0
        for did in dids:
            term = governance.term_at(did, slot)
            if term is None:
                term = member_term(state, did, slot)
            if term is not None and term.active and term.role == MemberRole.VOTER:
                count += 1
        return count

    boundaries = {first_open} | {
        t.from_slot for d in dids for t in tentative.terms.get(d, ()) if t.from_slot > first_open
    }
    for slot in sorted(boundaries):
        if voters(tentative, slot) == 0 and voters(state.governance, slot) > 0:
            raise Rejection(
                RejectReason.NO_VOTERS_LEFT, f"the grid would have no active voter in slot {slot}"
            )


def _withdrawn_orders(state: State, record: GovernanceRecord, tentative: Governance) -> list[Order]:
    """Resting orders the record invalidates, in book order: a household's that is no longer
    active in their slot, or priced outside their slot's new band (a curve order: any of its
    steps)."""
    withdrawn = []
    for slot, book in state.books.items():
        if slot < record.from_slot:
            continue
        if isinstance(record, ChangeRules):
            band = tentative.config_at(state.config, slot).tariffs_at(slot)
            withdrawn.extend(
                o for o in book.values()
                if not all(band.feed_in <= p <= band.retail for _, p in o.curve)
            )  # fmt: skip
        elif isinstance(record, (RemoveMember, SuspendMember, RotateKey)):
            withdrawn.extend(o for o in book.values() if o.household == record.household)
    return withdrawn


def _submit_order(state: State, order: Order) -> list[Event]:
    _authenticate(state, order)
    _require_active(state, order.household, order.slot)
    cfg = state.config
    problem = curve_problem(order.side, order.quantity_wh, order.price, order.steps)
    if problem is not None:  # decoding refuses it already: only a record built unchecked
        raise Rejection(RejectReason.MALFORMED, problem)
    if not 0 < order.quantity_wh <= cfg.max_order_wh:
        raise Rejection(
            RejectReason.INVALID_QUANTITY,
            f"quantity {order.quantity_wh} Wh outside 1..{cfg.max_order_wh}",
        )
    for i, (quantity, _) in enumerate(order.steps):
        if quantity <= 0:
            raise Rejection(
                RejectReason.INVALID_QUANTITY,
                f"step {i} quantity {quantity} Wh outside 1..{cfg.max_order_wh}",
            )
    band = config_at(state, order.slot).tariffs_at(order.slot)
    if not band.feed_in <= order.price <= band.retail:
        raise Rejection(
            RejectReason.PRICE_OUT_OF_BAND,
            f"price {order.price} outside [{band.feed_in}, {band.retail}] in slot {order.slot}",
        )
    for i, (_, price) in enumerate(order.steps):
        if not band.feed_in <= price <= band.retail:
            raise Rejection(
                RejectReason.PRICE_OUT_OF_BAND,
                f"step {i} price {price} outside [{band.feed_in}, {band.retail}] in slot "
                f"{order.slot}",
            )
    if state.closed_through is not None:
        if order.slot <= state.closed_through:
            raise Rejection(RejectReason.GATE_CLOSED, f"gate of slot {order.slot} is closed")
        if order.slot > state.closed_through + cfg.slot_horizon:
            raise Rejection(
                RejectReason.SLOT_TOO_FAR, f"slot {order.slot} is beyond the order horizon"
            )
    if cfg.rules >= 2:
        rep = state.reputation.get(order.household)
        if rep is not None and rep.silent_slots >= cfg.max_silent_slots:
            raise Rejection(
                RejectReason.METER_SILENT,
                f"no meter reading for {rep.silent_slots} settled slots: orders are refused "
                "until the meter reports again",
            )
    book = state.books.get(order.slot, {})
    if order.id in book:
        raise Rejection(RejectReason.DUPLICATE_ORDER, f"order id {order.id!r} already in book")
    mine = [o for o in book.values() if o.household == order.household]  # one pass over the book
    for resting in mine:
        if resting.side != order.side:
            raise Rejection(
                RejectReason.CONFLICTING_SIDE,
                f"household already has a {resting.side} order in slot {order.slot}",
            )
    if cfg.rules >= 2 and order.side == Side.SELL:
        limit = sell_limit_wh(state, order.household)
        offered = sum(o.quantity_wh for o in mine) + order.quantity_wh
        if offered > limit:
            rep = state.reputation.get(order.household, Reputation())
            raise Rejection(
                RejectReason.OVER_SELL_LIMIT,
                f"offers of {offered} Wh in slot {order.slot} exceed the {limit} Wh its "
                f"delivery record allows ({rep.recent_score_permille} permille of sales "
                "delivered recently)",
            )
    _consume_nonce(state, order)
    state.books.setdefault(order.slot, {})[order.id] = order
    return [OrderAccepted(order)]


def _cancel_order(state: State, cancel: CancelOrder) -> list[Event]:
    _authenticate(state, cancel)
    for book in state.books.values():
        order = book.get(cancel.order_id)
        if order is not None and order.household == cancel.household:
            break
    else:
        raise Rejection(
            RejectReason.UNKNOWN_ORDER, f"no open order {cancel.order_id!r} of this household"
        )
    _consume_nonce(state, cancel)
    del book[cancel.order_id]
    return [OrderCancelled(cancel, order)]


def _submit_reading(state: State, reading: MeterReading) -> list[Event]:
    _authenticate(state, reading)
    term = _require_active(state, reading.household, reading.slot)
    if reading.meter_serial != term.meter_serial:
        raise Rejection(
            RejectReason.UNKNOWN_METER,
            f"meter {reading.meter_serial!r} is not the registered {term.meter_serial!r} "
            f"in slot {reading.slot}",
        )
    _check_reading_slot(state, reading.slot)
    if reading.import_wh < 0 or reading.export_wh < 0:
        raise Rejection(RejectReason.INVALID_COUNTER, "meter counters must be non-negative")
    pending = state.pending_readings.get(reading.slot, {})
    if reading.household in pending:
        raise Rejection(RejectReason.DUPLICATE_READING, f"slot {reading.slot} already read")
    _check_monotonic(state, reading)
    _consume_nonce(state, reading)
    state.pending_readings.setdefault(reading.slot, {})[reading.household] = reading
    rep = state.reputation.get(reading.household)
    if rep is not None:
        rep.silent_slots = 0  # the meter reports again: its orders are accepted at once
    return [ReadingAccepted(reading)]


def _check_reading_slot(state: State, slot: int) -> None:
    """A reading (a household's or the feeder's) is for a slot whose gate closed and which has
    not settled yet."""
    if state.closed_through is None or slot > state.closed_through:
        raise Rejection(RejectReason.SLOT_NOT_CLOSED, f"gate of slot {slot} not closed")
    if state.settled_through is not None and slot <= state.settled_through:
        raise Rejection(RejectReason.SLOT_SETTLED, f"slot {slot} is already settled")


def _check_monotonic(state: State, reading: MeterReading) -> None:
    """Counters of one meter never go backwards across slots (pending or settled), and never
    rise faster than the household's registered power allows.

    The reading is compared with every other known reading of the same meter (the baseline and
    the pending ones, earlier or later slots): between two readings ``d`` slots apart, each
    counter may rise by at most :func:`plausible_rise_wh` ``(max_power_w, slot_seconds, d)``.
    So any two readings settlement differences were checked against each other.
    """
    lineage = state.governance.lineage(reading.household)
    base = next((b for d in lineage if (b := state.baselines.get(d)) is not None), None)
    if base is not None and base.meter_serial != reading.meter_serial:
        base = None
    pending = [
        r
        for p in state.pending_readings.values()
        for d in lineage
        if (r := p.get(d)) is not None and r.meter_serial == reading.meter_serial
    ]
    max_power_w = member_term(state, reading.household, reading.slot).max_power_w
    slot_seconds = state.config.slot_seconds
    if state.config.rules >= 2 and base is not None:
        if any(is_restart(base, r, max_power_w, slot_seconds) for r in pending):
            base = None  # a pending restart supersedes the old epoch's baseline
        elif is_restart(base, reading, max_power_w, slot_seconds):
            if pending:
                raise Rejection(
                    RejectReason.COUNTER_REGRESSION,
                    f"counters below those of slot {base.slot}: a meter restart is accepted "
                    "only as the next reading after the settled one",
                )
            return  # a restart: checked from zero by is_restart
    known: list[MeterReading | _Counters] = [r for r in (base, *pending) if r is not None]
    known.extend(_swap_counters(state, reading.household, reading.meter_serial))
    _check_counters(reading, known, max_power_w, slot_seconds)


def sell_limit_wh(state: State, household: str) -> int:
    """The most ``household`` may offer in one slot (rules 2): what its meter can export in a
    slot at its rated power, scaled by the share of its recent sales it delivered, and never
    below the grid's floor share of it."""
    cfg = state.config
    capacity = plausible_rise_wh(latest_term(state, household).max_power_w, cfg.slot_seconds, 1)
    rep = state.reputation.get(household)
    score = 1000 if rep is None else rep.recent_score_permille
    return capacity * offer_share_permille(cfg, score) // 1000


def is_restart(
    base: MeterReading, reading: MeterReading, max_power_w: int, slot_seconds: int
) -> bool:
    """True if ``reading`` is a restart of the meter's registers after ``base``: a later slot,
    *both* counters below ``base``'s (a reset, a replaced memory, a wrapped register), and no
    higher than the meter could have counted from zero since ``base``. (A reading with one
    counter below is a fault: ``counter_regression``.)"""
    if reading.slot <= base.slot:
        return False
    if reading.import_wh >= base.import_wh or reading.export_wh >= base.export_wh:
        return False
    limit = plausible_rise_wh(max_power_w, slot_seconds, reading.slot - base.slot)
    return reading.import_wh <= limit and reading.export_wh <= limit


def _check_counters(
    reading: MeterReading | FeederReading | _Counters,
    known: Sequence[MeterReading | FeederReading | _Counters],
    max_power_w: int,
    slot_seconds: int,
) -> None:
    """Compare ``reading`` with every ``known`` reading of the same meter: no counter below an
    earlier one or above a later one (``counter_regression``), no rise beyond
    :func:`plausible_rise_wh` between the two (``implausible_reading``)."""
    for other in known:
        earlier = other.slot < reading.slot
        if earlier and (other.import_wh > reading.import_wh or other.export_wh > reading.export_wh):
            raise Rejection(
                RejectReason.COUNTER_REGRESSION,
                f"counters below those of slot {other.slot} "
                f"({reading.import_wh}/{reading.export_wh} < {other.import_wh}/{other.export_wh})",
            )
        if not earlier and (
            other.import_wh < reading.import_wh or other.export_wh < reading.export_wh
        ):
            raise Rejection(
                RejectReason.COUNTER_REGRESSION,
                f"counters above those of later slot {other.slot}",
            )
        first, last = (other, reading) if earlier else (reading, other)
        slots = last.slot - first.slot
        limit = plausible_rise_wh(max_power_w, slot_seconds, slots)
        for name in ("import_wh", "export_wh"):
            rise = getattr(last, name) - getattr(first, name)
            if rise > limit:
                raise Rejection(
                    RejectReason.IMPLAUSIBLE_READING,
                    f"{name} rose {rise} Wh from slot {first.slot} to {last.slot}: at most "
                    f"{limit} Wh at {max_power_w} W over {slots} x "
                    f"{slot_seconds} s (+{READING_SLACK_WH} Wh)",
                )


def _submit_feeder_reading(state: State, reading: FeederReading) -> list[Event]:
    """The operator's feeder-meter reading of a closed, unsettled slot (one per slot)."""
    _authenticate(state, reading)
    cfg = state.config
    if not cfg.has_feeder:
        raise Rejection(RejectReason.UNKNOWN_METER, "this grid has no feeder meter")
    if reading.meter_serial != cfg.feeder_serial:
        raise Rejection(
            RejectReason.UNKNOWN_METER,
            f"meter {reading.meter_serial!r} is not the feeder meter {cfg.feeder_serial!r}",
        )
    _check_reading_slot(state, reading.slot)
    if reading.slot in state.pending_feeder:
        raise Rejection(
            RejectReason.DUPLICATE_READING, f"feeder of slot {reading.slot} already read"
        )
    known = [
        r
        for r in (state.feeder_baseline, *state.pending_feeder.values())
        if r is not None and r.meter_serial == reading.meter_serial
    ]
    _check_counters(reading, known, cfg.feeder_max_power_w, cfg.slot_seconds)
    _consume_nonce(state, reading)
    state.pending_feeder[reading.slot] = reading
    return [FeederReadingAccepted(reading)]


# --- leader-proposed system commands ------------------------------------------------------------


def clear_book(
    config: MarketConfig, slot: int, orders: Sequence[Order]
) -> tuple[Clearing, tuple[Trade, ...]]:
    """Clear one slot's book (in log order) as the gate closure does: the clearing, and its
    trades with slot, buyer and seller filled in. Block sync and snapshot installs use it to
    recompute a gate closure they did not apply."""
    clearing = clear(orders, config.mechanism, config.k)
    owner = {o.id: o.household for o in orders}
    trades = tuple(
        t._replace(slot=slot, buyer=owner[t.buy_id], seller=owner[t.sell_id])
        for t in clearing.trades
    )
    return clearing, trades


def _close_gate(state: State, slot: int) -> list[Event]:
    if state.closed_through is not None and slot != state.closed_through + 1:
        raise Rejection(
            RejectReason.OUT_OF_SEQUENCE,
            f"next gate to close is slot {state.closed_through + 1}, not {slot}",
        )
    if state.closed_through is None:
        # Orders for slots before the first gate can never clear: drop them with the gate.
        for stale in [s for s in state.books if s < slot]:
            del state.books[stale]
        state.settled_through = slot - 1
    book = state.books.pop(slot, {})
    orders = tuple(book.values())
    clearing, trades = clear_book(config_at(state, slot), slot, orders)
    state.closed_through = slot
    state.cleared[slot] = trades
    state.closed_books[slot] = orders
    return [GateClosed(slot, clearing, orders, trades)]


def _settle(state: State, slot: int) -> list[Event]:
    if state.settled_through is None or state.closed_through is None:
        raise Rejection(RejectReason.SLOT_NOT_CLOSED, "no gate has closed yet")
    if slot <= state.settled_through:
        raise Rejection(RejectReason.SLOT_SETTLED, f"slot {slot} is already settled")
    if slot != state.settled_through + 1:
        raise Rejection(
            RejectReason.OUT_OF_SEQUENCE,
            f"next slot to settle is {state.settled_through + 1}, not {slot}",
        )
    if slot > state.closed_through:
        raise Rejection(RejectReason.SLOT_NOT_CLOSED, f"gate of slot {slot} is not closed")

    rotations = [
        _rotate_key(state, rot, slot)
        for rot in state.governance.rotations
        if state.settled_through < rot.from_slot <= slot
    ]
    trades = state.cleared.pop(slot, ())
    state.closed_books.pop(slot, None)
    readings = state.pending_readings.pop(slot, {})
    config = config_at(state, slot)
    households = sorted(d for d in state.members if member_term(state, d, slot).active)
    metered: dict[str, Metered] = {}
    gaps: dict[str, Gap] = {}
    used: list[MeterReading] = []
    for did in households:
        reading = readings.get(did)
        if reading is None:
            continue
        base = state.baselines.get(did)
        moved = None if base is None else _moved_since(state, did, base, reading)
        if base is not None and moved is not None:
            moved_import, moved_export = moved
            if moved_import < 0 or moved_export < 0:
                # accepted only as a restart (rules 2): counted from zero, and what the meter
                # counted between the settled reading and the restart is estimated as zero
                gaps[did] = Gap(slot - base.slot, reading.import_wh, reading.export_wh)
            elif base.slot == slot - 1:
                metered[did] = Metered(moved_import, moved_export)
            elif state.config.rules >= 2:
                gaps[did] = Gap(slot - base.slot, moved_import, moved_export)
        state.baselines[did] = reading
        used.append(reading)

    transactions, settlements = settle_slot(
        slot, trades, households, metered, config.tariffs_at(slot), gaps
    )
    transactions = [*rotations, *transactions]
    feeder = _feeder_check(state, slot, settlements)
    for tx in transactions:
        for p in tx.postings:
            key = (p.account, p.asset)
            state.balances[key] = state.balances.get(key, 0) + p.amount
    reading_later = {did for p in state.pending_readings.values() for did in p}
    for s in settlements:
        rep = state.reputation.setdefault(s.household, Reputation())
        _update_reputation(
            rep, s, readings, reading_later, state.config.rules,
            state.config.reputation_window_slots,
        )  # fmt: skip

    height = state.height + 1
    tx_root, trade_root, reading_root = roots(
        transactions, (t.encode() for t in trades), (reading_leaf(r) for r in used)
    )
    block = Block(
        height=height,
        slot=slot,
        prev_hash=state.head_hash,
        tx_root=tx_root,
        trade_root=trade_root,
        reading_root=reading_root,
        state_hash=state_hash(height, state.balances),
        tx_count=len(transactions),
        feeder=None if feeder is None else feeder.hash,
        rules=None if config is state.config else config.rules_hash(),
    )
    state.height = height
    state.head_hash = block.hash
    state.settled_through = slot
    reputation = tuple((did, replace(state.reputation[did])) for did in households)
    return [
        SlotSettled(
            slot,
            block,
            tuple(transactions),
            tuple(settlements),
            tuple(used),
            trades,
            reputation,
            feeder,
        )
    ]


def _feeder_check(
    state: State, slot: int, settlements: Sequence[HouseholdSettlement]
) -> FeederCheck | None:
    """The feeder check of ``slot`` (None without a feeder meter); the reading it used becomes
    the feeder baseline."""
    cfg = state.config
    if not cfg.has_feeder:
        return None
    reading = state.pending_feeder.pop(slot, None)
    check = feeder_check(
        slot,
        reading,
        state.feeder_baseline,
        (HouseholdFlow(s.measured, s.import_wh, s.export_wh) for s in settlements),
        loss_permille=cfg.feeder_loss_permille,
        tolerance_wh=cfg.feeder_tolerance_wh,
    )
    if reading is not None:
        state.feeder_baseline = reading
    return check


def reading_leaf(reading: MeterReading) -> bytes:
    """The Merkle leaf of a reading in its block (hash of the signed record)."""
    return record_hash(reading)


def _update_reputation(
    rep: Reputation,
    s: HouseholdSettlement,
    readings: dict[str, MeterReading],
    reading_later: set[str],
    rules: int,
    window: int,
) -> None:
    """Count the slot in ``rep``; ``reading_later`` are the households with a reading accepted
    for a later, unsettled slot (their meter is not silent)."""
    rep.slots += 1
    if rules >= 2:
        rep.recent_sold_wh = window_add(rep.recent_sold_wh, s.sold_wh, window)
        rep.recent_delivered_wh = window_add(rep.recent_delivered_wh, s.delivered_wh, window)
    rep.sold_wh += s.sold_wh
    rep.bought_wh += s.bought_wh
    rep.delivered_wh += s.delivered_wh
    rep.consumed_wh += s.consumed_wh
    if rules < 2 or s.household in readings or s.household in reading_later:
        rep.silent_slots = 0
    else:
        rep.silent_slots = min(rep.silent_slots + 1, MAX_SILENT_SLOTS)
    if s.household not in readings:
        rep.missed_readings += 1


__all__ = [
    "DEFAULT_FEEDER_LOSS_PERMILLE",
    "DEFAULT_FEEDER_MAX_POWER_W",
    "DEFAULT_FEEDER_TOLERANCE_WH",
    "DEFAULT_MAX_SILENT_SLOTS",
    "DEFAULT_REPUTATION_WINDOW_SLOTS",
    "DEFAULT_SELL_FLOOR_PERMILLE",
    "NONCE_TRIM_STEP",
    "RULES",
    "MarketConfig",
    "MarketConfigError",
    "Member",
    "NonceWindow",
    "Reputation",
    "Side",
    "State",
    "apply",
    "config_at",
    "delivery_score_permille",
    "is_restart",
    "latest_term",
    "member_term",
    "offer_share_permille",
    "plausible_rise_wh",
    "reading_leaf",
    "sell_limit_wh",
    "window_add",
]
