"""The battery planner: when to charge and discharge a home battery over the coming slots.

Pure and integer-only (sans-I/O: the node reads the battery and writes its setpoint). Energy is
in Wh, prices in minor units per kWh, so money is ``price x Wh`` (thousandths of a minor unit).

**Prices per slot.** A Wh the household imports in slot ``t`` costs ``buy_t``: the expected
local clearing price plus the local fee when neighbours are expected to sell (recent clearings
traded), capped at the retail price plus the grid fee, which is also the price when no local
trade is expected. A Wh it exports earns ``sell_t``: the expected local clearing price if that
is above the feed-in tariff, else the feed-in tariff; never more than ``buy_t``. The expected
clearing price of a slot is where recent clearings sat inside their price band (the median
share of the way from feed-in tariff to retail price), placed into that slot's band: a rules
change or a time-of-use period the node already knows moves it
(:func:`expected_local_price`).

**Plan** (:func:`plan_battery`). A dynamic programme over state-of-charge levels (a grid of
``levels`` steps anchored at the current state of charge) and the horizon's slots: in each slot
the battery may move to any level its charge and discharge limits reach, never charging above
the ceiling nor discharging below the floor (a battery outside its bounds may only move back
towards them). Charging ``d`` stored Wh takes ``ceil(d x 1000 / efficiency_permille)`` Wh
from the AC side (the whole round-trip loss is charged on the way in, as the simulator does);
discharging gives the stored Wh. The household's net export after the battery,
``forecast - battery``, is valued at ``sell_t`` (export) or ``buy_t`` (import); energy left at
the horizon's end is worth ``terminal_price`` per kWh (the agent passes the feed-in tariff: what
it is surely worth; default the lowest ``sell_t``). The plan maximises the money; among equal
plans it moves the least energy. So it charges when cheap local surplus is expected and the
energy will later avoid a dearer import or sell for more (the round-trip loss included), and
discharges when neighbours are expected to pay more than the feed-in tariff.

**The agent** (:class:`BatteryAgent`): at each slot boundary the node reads the battery and asks
:meth:`BatteryAgent.decide` for the setpoint of the slot now delivering (the energy committed
when that slot's order was placed, re-checked against the state of charge just read) and the
battery energy of the slot whose order is placed next (the first step of a new plan, from the
state of charge projected past the committed slots). The order then covers the forecast net
export minus that energy (``Trader.order_for(..., battery_wh=...)``): a bid to charge from the
neighbours' surplus, or an offer of the discharge.

**Prices of the battery's part** (:meth:`BatteryAgent._price`, :func:`battery_offer_price`,
:func:`battery_bid_price`). Offered at the household's own PV price, a discharge ties with the
neighbours' PV offers and, later in the log, loses the tie (time priority): the energy then
goes to the grid at the feed-in tariff. So the battery's part carries its own economics
(:class:`BatteryOrder`): a discharge exported beyond the own deficit has a *floor*, the higher
of the feed-in tariff and what the stored energy cost per kWh (its charges over the round-trip
efficiency, :meth:`BatteryAgent.cost_floor`); a charge imported beyond the own surplus has a
*cap*, the plan's break-even price against the best plan without it, less the local fee. When
the floor is above what a Wh is expected to earn, or the cap below the feed-in tariff, the
agent commits the plan without that trade. The price within those bounds depends on the mechanism
(``market/auction.py``): under ``uniform`` and ``pay_as_bid`` the discharge asks one unit
below the default PV offer (filled first, and no lower than needed: a marginal ask sets the
price) and the charge bids the PV offer's price (it crosses them without raising the price it
sets as the marginal bid); under ``mcafee`` both are truthful (floor and cap), the dominant
strategy of a trade-reduction auction. ``node/agent/strategy.py`` (:func:`plan_battery_order`)
builds the order: a curve when the battery's and the household's parts are priced apart.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from market.settlement import Tariffs
from meter.battery import BatteryStatus

RECENT_CLEARINGS = 16
"""How many recent clearings the expected local price is taken from."""


@dataclass(frozen=True, slots=True)
class BatteryState:
    """What the planner knows of the battery: stored energy and limits, per slot (integers)."""

    soc_wh: int
    soc_min_wh: int
    soc_max_wh: int
    max_charge_wh: int
    """Most AC energy it can take in one slot."""
    max_discharge_wh: int
    """Most energy it can give in one slot."""
    efficiency_permille: int = 900

    def __post_init__(self) -> None:
        if not 0 <= self.soc_min_wh < self.soc_max_wh:
            raise ValueError(f"battery: need 0 <= soc_min_wh < soc_max_wh, not "
                             f"{self.soc_min_wh}, {self.soc_max_wh}")  # fmt: skip
        if self.soc_wh < 0 or self.max_charge_wh < 0 or self.max_discharge_wh < 0:
            raise ValueError("battery: negative state of charge or limit")
        if not 0 < self.efficiency_permille <= 1000:
            raise ValueError("battery: efficiency_permille must be in 1..1000")

    @classmethod
    def from_status(cls, status: BatteryStatus, slot_seconds: float,
                    efficiency_permille: int) -> BatteryState:  # fmt: skip
        """The planner's view of a validated read, for slots of ``slot_seconds`` (battery
        time)."""
        return cls(
            status.soc_wh,
            status.soc_min_wh,
            status.soc_max_wh,
            int(status.max_charge_w * slot_seconds // 3600),
            int(status.max_discharge_w * slot_seconds // 3600),
            efficiency_permille,
        )

    def charge_input_wh(self, stored_wh: int) -> int:
        """AC energy needed to store ``stored_wh`` (> 0)."""
        return -(-stored_wh * 1000 // self.efficiency_permille)

    def stored_by_wh(self, input_wh: int) -> int:
        """Stored energy ``input_wh`` of AC charging adds (rounded down)."""
        return input_wh * self.efficiency_permille // 1000

    def feasible(self, battery_wh: int) -> int:
        """``battery_wh`` (AC, positive = charge) cut to what the limits and the state of
        charge allow in one slot."""
        if battery_wh > 0:
            room = max(0, self.soc_max_wh - self.soc_wh)
            most = min(self.max_charge_wh, room * 1000 // self.efficiency_permille)
            return min(battery_wh, most)
        if battery_wh < 0:
            avail = max(0, self.soc_wh - self.soc_min_wh)
            return -min(-battery_wh, self.max_discharge_wh, avail)
        return 0

    def after(self, battery_wh: int) -> int:
        """The state of charge after ``feasible(battery_wh)``."""
        b = self.feasible(battery_wh)
        return self.soc_wh + (self.stored_by_wh(b) if b > 0 else b)


@dataclass(frozen=True, slots=True)
class SlotOutlook:
    """One coming slot as the planner sees it."""

    slot: int
    net_export_wh: int
    """Forecast net export without the battery (negative: a deficit)."""
    buy_price: int
    """What a Wh imported in the slot costs, per kWh (fees included)."""
    sell_price: int
    """What a Wh exported earns, per kWh (at most ``buy_price``)."""


@dataclass(frozen=True, slots=True)
class PlanStep:
    """The battery in one slot of a plan."""

    slot: int
    battery_wh: int
    """AC energy into the battery (negative: out of it)."""
    soc_wh: int
    """Stored energy at the slot's end."""
    net_export_wh: int
    """The household's forecast net export with the battery."""


@dataclass(frozen=True, slots=True)
class BatteryPlan:
    """A plan over the horizon and its value (price x Wh, terminal value included)."""

    steps: tuple[PlanStep, ...]
    value: int

    def as_list(self) -> list[dict[str, int]]:
        """The status document's view."""
        return [{"slot": s.slot, "battery_wh": s.battery_wh, "soc_wh": s.soc_wh,
                 "net_export_wh": s.net_export_wh} for s in self.steps]  # fmt: skip


def slot_prices(band: Tariffs, expected_local: int | None) -> tuple[int, int]:
    """(buy price, sell price) per kWh of a slot with tariffs ``band`` and the expected local
    clearing price (None: no local trade expected)."""
    grid_buy = band.retail + band.grid_fee
    if expected_local is None:
        return grid_buy, min(band.feed_in, grid_buy)
    buy = min(grid_buy, expected_local + band.local_fee)
    return buy, min(buy, max(band.feed_in, expected_local))


def expected_local_price(recent: Sequence[tuple[int, Tariffs]], band: Tariffs) -> int | None:
    """The expected clearing price in a slot of ``band`` from ``recent`` clearings that traded
    ((price, the band of their slot)): the median position of their prices inside their bands,
    placed into ``band``. None without any."""
    shares = sorted(
        Fraction(1, 2) if b.retail <= b.feed_in
        else Fraction(min(max(p, b.feed_in), b.retail) - b.feed_in, b.retail - b.feed_in)
        for p, b in recent
    )  # fmt: skip
    if not shares:
        return None
    mid = len(shares) // 2
    share = shares[mid] if len(shares) % 2 else (shares[mid - 1] + shares[mid]) / 2
    return band.feed_in + math.floor(share * (band.retail - band.feed_in))


def _money(net_wh: int, outlook: SlotOutlook) -> int:
    return net_wh * (outlook.sell_price if net_wh >= 0 else outlook.buy_price)


def plan_battery(battery: BatteryState, outlook: Sequence[SlotOutlook], *, levels: int = 40,
                 terminal_price: int | None = None,
                 first: tuple[int, int] | None = None) -> BatteryPlan:  # fmt: skip
    """The best charge/discharge plan over ``outlook`` (see the module docstring).

    Every step respects the limits: AC charge at most ``max_charge_wh``, discharge at most
    ``max_discharge_wh``, no charge above ``soc_max_wh``, no discharge below ``soc_min_wh``;
    the state of charge stays within ``[min(soc, soc_min), max(soc, soc_max)]``. ``first``
    (``(low, high)`` AC Wh, ``low <= 0 <= high``) restricts the first slot's step: the best plan
    *without* a move, the alternative the order's prices are measured against
    (:meth:`BatteryAgent.decide`)."""
    if first is not None and not first[0] <= 0 <= first[1]:
        raise ValueError(f"first must contain 0 (idle), not {first}")
    if not outlook:
        return BatteryPlan((), 0)
    if levels < 1:
        raise ValueError("levels must be positive")
    b = battery
    if terminal_price is None:
        terminal_price = min(o.sell_price for o in outlook)
    low, high = min(b.soc_wh, b.soc_min_wh), max(b.soc_wh, b.soc_max_wh)
    step = max(1, -(-(high - low) // levels))  # at most levels + 2 grid points
    grid = [b.soc_wh - k * step for k in range((b.soc_wh - low) // step, 0, -1)]
    grid += [b.soc_wh + k * step for k in range(0, (high - b.soc_wh) // step + 1)]
    start = grid.index(b.soc_wh)
    # moves[i]: (j, AC energy) for every level j reachable from level i in one slot
    moves: list[list[tuple[int, int]]] = []
    for here in grid:
        reach = []
        for j, there in enumerate(grid):
            d = there - here
            if d > 0 and there <= b.soc_max_wh:
                ac = b.charge_input_wh(d)
                if ac <= b.max_charge_wh:
                    reach.append((j, ac))
            elif d < 0 and there >= b.soc_min_wh and -d <= b.max_discharge_wh:
                reach.append((j, d))
            elif d == 0:
                reach.append((j, 0))
        moves.append(reach)
    # forward DP: best[j] = (value, -energy moved) and back-pointers per slot
    Score = tuple[int, int]
    best: dict[int, Score] = {start: (0, 0)}
    back: list[dict[int, tuple[int, int]]] = []
    for t, o in enumerate(outlook):
        nxt: dict[int, Score] = {}
        ptr: dict[int, tuple[int, int]] = {}
        for i, (value, moved) in best.items():
            for j, ac in moves[i]:
                if t == 0 and first is not None and not first[0] <= ac <= first[1]:
                    continue
                score = (value + _money(o.net_export_wh - ac, o), moved - abs(ac))
                if j not in nxt or score > nxt[j]:
                    nxt[j] = score
                    ptr[j] = (i, ac)
        best = nxt
        back.append(ptr)
    final = max(best, key=lambda j: (best[j][0] + grid[j] * terminal_price, best[j][1], -j))
    value = best[final][0] + grid[final] * terminal_price
    steps: list[PlanStep] = []
    j = final
    for o, ptr in zip(reversed(outlook), reversed(back), strict=True):
        i, ac = ptr[j]
        steps.append(PlanStep(o.slot, ac, grid[j], o.net_export_wh - ac))
        j = i
    return BatteryPlan(tuple(reversed(steps)), value)


@dataclass(frozen=True, slots=True)
class BatteryOrder:
    """The battery's part of the order for one slot: its energy and what it may be priced at
    (the economics; the mechanism-specific price is :func:`battery_offer_price` and
    :func:`battery_bid_price`, chosen when the order is signed, ``node/agent/strategy.py``)."""

    slot: int
    battery_wh: int
    """AC energy planned (positive: charge)."""
    offer_floor: int | None = None
    """With a discharge beyond the household's own deficit: the least price per kWh at which
    selling it is still worth it (the feed-in tariff, the stored energy's cost); None without
    such a discharge."""
    expected_sell: int | None = None
    """With ``offer_floor``: what the plan expects a Wh exported in the slot to earn."""
    bid_cap: int | None = None
    """With a charge beyond the household's own surplus: the most price per kWh (before the
    local fee) at which buying it still pays; None without such a charge."""


def battery_offer_price(floor: int, expected: int, band: Tariffs, mechanism: str,
                        competing: int) -> int | None:  # fmt: skip
    """The price of a battery's discharge offer in a slot of ``band`` (None: do not offer it).

    ``floor``: the least the energy may sell for (:attr:`BatteryOrder.offer_floor`);
    ``expected``: what the plan expects an exported Wh to earn there; ``competing``: the price
    the neighbours' PV surplus is offered at (the default agent's offer,
    :meth:`node.agent.strategy.Strategy.limits`). None when the floor is above what a Wh is
    expected to earn (or above the retail price no buyer may exceed): the energy would not sell
    above its cost, so it stays in the battery.

    - ``mcafee``: the floor, truthfully. A seller that trades receives the price the
      non-trading units set, or the marginal ask, never its own ask unless it is marginal, and
      then it is excluded: asking less than its cost can only sell at a loss, asking more only
      loses trades. So the floor is the dominant ask.
    - ``uniform`` and ``pay_as_bid``: one minor unit below the competing PV offers (never below
      the floor, never above ``expected``). Asks are filled cheapest first, equal prices by
      time priority, so an ask equal to the PV sellers' loses the tie whenever it came later;
      one unit below is filled first. Under ``uniform`` a seller that is not marginal receives
      the clearing price whatever its ask; a marginal one sets the price, ``ask + k (bid -
      ask)``, so it should not ask lower than it needs to win. Under ``pay_as_bid`` it receives
      ``ask + k (bid - ask)`` of its own pair: one unit below costs ``1 - k`` per kWh."""
    if floor > min(expected, band.retail):
        return None
    price = floor if mechanism == "mcafee" else max(floor, min(competing - 1, expected))
    return min(max(price, band.feed_in), band.retail)


def battery_bid_price(cap: int, band: Tariffs, mechanism: str, competing: int) -> int | None:
    """The price of a battery's charge bid in a slot of ``band`` (None: do not bid for it).

    ``cap``: the most a Wh may cost before the local fee (:attr:`BatteryOrder.bid_cap`); it is
    also kept at or below ``retail + grid_fee - local_fee`` (energy bought locally never costs
    more, fees included, than from the grid) and the retail price (the band's top).
    ``competing``: the price the neighbours' PV surplus is offered at. None when no seller
    would take the price (below the feed-in tariff, which every seller gets from the grid).

    - ``mcafee``: the cap, truthfully (a buyer that trades pays the price the non-trading units
      set or the marginal bid, never its own bid unless marginal, and then it is excluded).
    - ``uniform`` and ``pay_as_bid``: the competing PV offers' price (at least one unit above
      the feed-in tariff, at most the cap): a bid at the ask crosses it, so the battery takes
      whatever PV surplus is left after the households that bid more (they value a Wh at the
      retail price, the battery only at what it saves later, so serving them first is the
      efficient order), ahead of the grid's feed-in tariff. Bidding more would not win more
      of that surplus but would raise the price: the marginal bid sets the uniform price
      (``ask + k (bid - ask)``) and each pay-as-bid pair's."""
    top = min(cap, band.retail + band.grid_fee - band.local_fee, band.retail)
    if top < band.feed_in:
        return None
    price = top if mechanism == "mcafee" else min(top, max(competing, band.feed_in + 1))
    return max(price, band.feed_in)


@dataclass(frozen=True, slots=True)
class BatteryDecision:
    """What the node does at a slot boundary."""

    delivering: int
    setpoint_wh: int | None
    """AC energy to move in the delivering slot (None: leave the battery to its own
    self-consumption control)."""
    order_slot: int | None
    battery_wh: int | None
    """AC energy planned for ``order_slot`` (its order covers the forecast minus this)."""
    plan: BatteryPlan | None


@dataclass
class BatteryAgent:
    """The battery's per-slot bookkeeping around :func:`plan_battery` (sans-I/O)."""

    slot_seconds: float
    """Battery-time seconds per market slot (energy per slot = W x this / 3600)."""
    efficiency_permille: int = 900
    horizon_slots: int = 12
    levels: int = 40
    clearings: collections.deque[tuple[int, int, Tariffs]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_CLEARINGS)
    )
    """(slot, price, band) of recent clearings that traded."""
    committed: dict[int, int] = field(default_factory=dict)
    """Per slot, the AC energy planned when its order was placed."""
    soc_at_start: dict[int, int] = field(default_factory=dict)
    """Per slot, the stored energy read at its start."""
    orders: dict[int, BatteryOrder] = field(default_factory=dict)
    """Per slot, the battery's part of its order (energy, offer floor, bid cap)."""
    charge_costs: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    """Per slot with a planned charge: (Wh from the own surplus, what each would have earned
    exported, Wh imported, what each costs), per kWh; the import's cost is corrected by the
    slot's clearing."""
    stored_cost: int = 0
    """What the energy in the battery cost (price x Wh; energy whose cost is unknown, such as
    what it held at the start, counts 0): the stored energy's cost floor per kWh is this over
    the state of charge."""
    costed_through: int | None = None
    plan: BatteryPlan | None = None
    last: BatteryDecision | None = None
    status: BatteryStatus | None = None

    def observe_clearing(self, slot: int, price: int | None, volume_wh: int,
                         band: Tariffs) -> None:  # fmt: skip
        """Learn a slot's clearing (only clearings that traded say what neighbours pay; a
        mechanism without one price, None, says nothing). A planned charge in that slot cost
        the clearing price plus the local fee if that is within its bid's cap, else the grid
        price."""
        if volume_wh <= 0 or price is None:
            return
        self.clearings.append((slot, price, band))
        cost = self.charge_costs.get(slot)
        order = self.orders.get(slot)
        if cost is not None and order is not None and order.bid_cap is not None:
            own, own_price, imported, _ = cost
            grid = band.retail + band.grid_fee
            paid = min(price + band.local_fee, grid) if price <= order.bid_cap else grid
            self.charge_costs[slot] = (own, own_price, imported, paid)

    def cost_floor(self) -> int:
        """What a stored kWh cost (its charge price over the round-trip efficiency; 0 when
        unknown), rounded up."""
        soc = 0 if self.status is None else self.status.soc_wh
        return -(-self.stored_cost // soc) if soc > 0 and self.stored_cost > 0 else 0

    def _account(self, delivering: int) -> None:
        """Move the energy of the slot just delivered into or out of the stored cost."""
        slot = delivering - 1
        if self.costed_through is not None and slot <= self.costed_through:
            return
        self.costed_through = slot
        start, end = self.soc_at_start.get(slot), self.soc_at_start.get(delivering)
        if start is None or end is None:
            return
        cost = self.charge_costs.pop(slot, None)
        if end > start:
            ac = self.battery_energy(slot) or 0
            if cost is not None and cost[0] + cost[2] > 0:
                own, own_price, imported, paid = cost
                self.stored_cost += ac * (own * own_price + imported * paid) // (own + imported)
        elif end < start and start > 0:
            self.stored_cost -= self.stored_cost * (start - end) // start
        self.stored_cost = max(0, self.stored_cost)

    def expected_price(self, band: Tariffs) -> int | None:
        """The expected local clearing price in a slot of ``band``."""
        return expected_local_price([(p, b) for _, p, b in self.clearings], band)

    def outlook(self, slot: int, forecast: int, band: Tariffs) -> SlotOutlook:
        """One slot's outlook from its forecast and tariffs."""
        buy, sell = slot_prices(band, self.expected_price(band))
        return SlotOutlook(slot, forecast, buy, sell)

    def battery_energy(self, slot: int) -> int | None:
        """The AC energy the battery moved in ``slot`` (positive: charged), estimated from the
        state of charge at its start and end (None if either is unknown): the forecaster
        learns the household's net export without it."""
        start, end = self.soc_at_start.get(slot), self.soc_at_start.get(slot + 1)
        if start is None or end is None:
            return None
        d = end - start
        return -(-d * 1000 // self.efficiency_permille) if d > 0 else d

    def order_energy(self, slot: int) -> BatteryOrder:
        """The battery's part of the order for ``slot`` (energy 0 if none planned):
        ``Trader.order_for(..., battery_wh=)`` prices it."""
        order = self.orders.get(slot)
        energy = self.committed.get(slot, 0)
        if order is None or order.battery_wh != energy:
            return BatteryOrder(slot, energy)
        return order

    def setpoint_w(self, battery_wh: int) -> int:
        """The AC power that moves ``battery_wh`` in one slot (rounded toward zero)."""
        w = abs(battery_wh) * 3600 // max(1, math.ceil(self.slot_seconds))
        return w if battery_wh >= 0 else -w

    def decide(
        self,
        status: BatteryStatus,
        delivering: int,
        order_slot: int | None,
        forecast: Callable[[int], int | None],
        band: Callable[[int], Tariffs],
    ) -> BatteryDecision:
        """The setpoint for ``delivering`` (the slot starting now) and the plan from
        ``order_slot`` (the slot whose order is placed next; None: none), from the battery
        just read, the forecast net export (without the battery) and each slot's tariffs."""
        self.status = status
        self.soc_at_start[delivering] = status.soc_wh
        self._account(delivering)
        for old in [s for s in self.soc_at_start if s < delivering - 4]:
            del self.soc_at_start[old]
        state = BatteryState.from_status(status, self.slot_seconds, self.efficiency_permille)
        committed = self.committed.get(delivering)
        setpoint = None if committed is None else state.feasible(committed)
        soc = state.after(setpoint or 0)
        battery_wh: int | None = None
        plan: BatteryPlan | None = None
        if order_slot is not None and order_slot > delivering:
            for slot in range(delivering + 1, order_slot):  # already ordered: committed
                soc = _with_soc(state, soc).after(self.committed.get(slot, 0))
            outlook: list[SlotOutlook] = []
            for slot in range(order_slot, order_slot + self.horizon_slots):
                f = forecast(slot)
                if f is None:
                    break
                outlook.append(self.outlook(slot, f, band(slot)))
            if outlook:
                start = _with_soc(state, soc)
                terminal = band(outlook[-1].slot).feed_in
                plan = plan_battery(start, outlook, levels=self.levels, terminal_price=terminal)
                plan, order = self._price(start, outlook, plan, band(order_slot), terminal)
                battery_wh = plan.steps[0].battery_wh
                self.committed[order_slot] = battery_wh
                self.orders[order_slot] = order
                self.plan = plan
        for book in (self.committed, self.orders, self.charge_costs):
            for old in [s for s in book if s < delivering]:
                del book[old]
        self.last = BatteryDecision(delivering, setpoint, order_slot, battery_wh, plan)
        return self.last

    def _price(self, state: BatteryState, outlook: list[SlotOutlook], plan: BatteryPlan,
               band: Tariffs, terminal: int) -> tuple[BatteryPlan, BatteryOrder]:  # fmt: skip
        """The first step's order economics, and the plan to commit: ``plan``, or the best plan
        without the first step's trade when that trade cannot pay (its floor above what a Wh
        is expected to earn, or no seller below its cap).

        A discharge beyond the forecast deficit exports ``x`` Wh; its floor is the higher of
        the feed-in tariff and the stored energy's cost per kWh (:meth:`cost_floor`); when
        that is above what the plan expects an exported Wh to earn, the best plan whose first
        step at most covers the own deficit is committed instead. (Not the plan's own
        break-even against selling later: the plan expects the same clearing price in every
        slot of a band, so that break-even sits at the expected price itself, above the PV
        offers the discharge must undercut, and the energy would not sell; measured,
        docs/node.md.) A charge importing ``m`` Wh beyond the own surplus has the cap ``buy +
        (value - value_without) / m - local_fee``, the plan's break-even against the best
        plan charging at most from the own surplus."""
        o = outlook[0]
        b, f = plan.steps[0].battery_wh, o.net_export_wh
        x = -b - max(0, -f)
        m = b - max(0, f)

        def without(low: int, high: int) -> BatteryPlan:
            return plan_battery(state, outlook, levels=self.levels, terminal_price=terminal,
                                first=(low, high))  # fmt: skip

        if b < 0 and x > 0:
            floor = max(band.feed_in, self.cost_floor())
            if floor > o.sell_price:  # it would not sell above what it cost: keep it
                alt = without(-max(0, -f), 0)
                return alt, BatteryOrder(o.slot, alt.steps[0].battery_wh)
            return plan, BatteryOrder(o.slot, b, offer_floor=floor, expected_sell=o.sell_price)
        if b > 0 and m > 0:
            alt = without(0, max(0, f))
            cap = o.buy_price + (plan.value - alt.value) // m - band.local_fee
            if battery_bid_price(cap, band, "uniform", band.feed_in) is None:
                b = alt.steps[0].battery_wh
                if b > 0:
                    self.charge_costs[o.slot] = (b, o.sell_price, 0, o.buy_price)
                return alt, BatteryOrder(o.slot, b)
            self.charge_costs[o.slot] = (b - m, o.sell_price, m, o.buy_price)
            return plan, BatteryOrder(o.slot, b, bid_cap=cap)
        if b > 0:  # from the own surplus only: it forgoes that surplus's export
            self.charge_costs[o.slot] = (b, o.sell_price, 0, o.buy_price)
        return plan, BatteryOrder(o.slot, b)


def _with_soc(state: BatteryState, soc_wh: int) -> BatteryState:
    return BatteryState(max(0, soc_wh), state.soc_min_wh, state.soc_max_wh, state.max_charge_wh,
                        state.max_discharge_wh, state.efficiency_permille)  # fmt: skip
