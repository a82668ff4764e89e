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
                 terminal_price: int | None = None) -> BatteryPlan:  # fmt: skip
    """The best charge/discharge plan over ``outlook`` (see the module docstring).

    Every step respects the limits: AC charge at most ``max_charge_wh``, discharge at most
    ``max_discharge_wh``, no charge above ``soc_max_wh``, no discharge below ``soc_min_wh``;
    the state of charge stays within ``[min(soc, soc_min), max(soc, soc_max)]``."""
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
    for o in outlook:
        nxt: dict[int, Score] = {}
        ptr: dict[int, tuple[int, int]] = {}
        for i, (value, moved) in best.items():
            for j, ac in moves[i]:
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
    plan: BatteryPlan | None = None
    last: BatteryDecision | None = None
    status: BatteryStatus | None = None

    def observe_clearing(self, slot: int, price: int, volume_wh: int, band: Tariffs) -> None:
        """Learn a slot's clearing (only clearings that traded say what neighbours pay)."""
        if volume_wh > 0:
            self.clearings.append((slot, price, band))

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

    def order_energy(self, slot: int) -> int:
        """The battery energy the order for ``slot`` must account for (0 if none planned)."""
        return self.committed.get(slot, 0)

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
                plan = plan_battery(
                    _with_soc(state, soc),
                    outlook,
                    levels=self.levels,
                    terminal_price=band(outlook[-1].slot).feed_in,
                )
                battery_wh = plan.steps[0].battery_wh
                self.committed[order_slot] = battery_wh
                self.plan = plan
        for old in [s for s in self.committed if s < delivering]:
            del self.committed[old]
        self.last = BatteryDecision(delivering, setpoint, order_slot, battery_wh, plan)
        return self.last


def _with_soc(state: BatteryState, soc_wh: int) -> BatteryState:
    return BatteryState(max(0, soc_wh), state.soc_min_wh, state.soc_max_wh, state.max_charge_wh,
                        state.max_discharge_wh, state.efficiency_permille)  # fmt: skip
