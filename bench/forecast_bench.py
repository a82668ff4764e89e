"""Forecast benchmark (issue 18): the previous agent against the learning forecaster over a
simulated year, in one run.

The households are the meter simulator's own models (``meter.sim.household``: H25 load with
lognormal noise and evening cooking spikes, clear-sky PV under a seeded cloud random walk,
latitude 52.5°, simulated time = UTC, so longitude 0), stepped directly (no Modbus) from
2025-01-01 00:00 UTC; batteries are left out (this measures the forecast). Each household's
counters at every slot end become its signed readings.

Two grids run on the real contract engine (``market.apply``), slot by slot, with the same
households and counters: in one every household's agent is the previous one
(``node.agent.strategy.Forecaster``), in the other the learning one
(``node.agent.forecast.LearningForecaster`` with the simulator's location). Each agent is a
real :class:`node.agent.trader.Trader`: it learns from its slot-end readings and, as a node
does, signs the order for the open slot (two slots after the one just read, at the offer limit
the engine's delivery record allows). The engine clears and settles.

Printed per household and overall: the forecast's mean absolute error per slot (the forecast
the order was based on) for both agents and the ratio new/old; each household's money against
grid-only (every Wh of its net at the feed-in tariff or retail price, slot by slot) for both
agents, and the difference. ``--days N`` shortens the year (CI runs 14 days:
``tests/node/test_forecast_bench.py``).

**Batteries** (``--battery-days N``, default 0: skipped). Three more grids of learning agents
under an evening peak tariff (:data:`PEAK_TIME_OF_USE`: retail 32, 48 from 17:00 to 21:00),
the households the simulator gives a battery (``make_households``) run it: ``none`` leaves the
batteries out (the baseline), ``plain`` plans them (``node.agent.battery.BatteryAgent``, as a
node does) and orders the battery's energy at the household's own limit prices (before the
battery-aware prices), ``aware`` orders it at the battery-aware prices
(:class:`~node.agent.battery.BatteryOrder`). The battery is modelled per slot with the
planner's own integer rules (``BatteryState``: limits, floor and ceiling, the round-trip loss
on the way in); a slot without a commitment runs self-consumption (charge from the own
surplus, cover the own deficit). Its energy moves the trading meter's counters. Printed per
battery household: grid-only money under the peak tariff and the savings against it for the
three runs.

    python -m bench.forecast_bench [--days 365] [--households 6] [--seed 1]
        [--battery-days 0] [--battery-from 0] [--skip-forecast]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from market import CloseGate, MarketConfig, MemberRegistration, MemberRole, SettleSlot, State
from market import apply as engine_apply
from market.accounting import MONEY, household_account, money_for
from market.errors import RejectReason
from market.events import GateClosed, Rejected, SlotSettled
from market.schedule import Schedule
from market.signing import Signer
from market.state import sell_limit_wh
from meter.battery import BatteryStatus
from meter.sample import MeterSample
from meter.sim.battery import BatteryConfig
from meter.sim.household import HouseholdConfig, SimulatedHousehold, make_households
from meter.sim.solar import Clouds
from node.agent.battery import BatteryAgent, BatteryState
from node.agent.strategy import Forecaster
from node.agent.trader import Trader

START = dt.datetime(2025, 1, 1, 0, 0)
"""Simulated time 0 (read as UTC: the simulator's clock is solar time at longitude 0)."""
LATITUDE = 52.5
LONGITUDE = 0.0
SLOT_SECONDS = 900
STEP_S = 180.0
"""Simulator step (power constant within it); 5 steps per slot."""
FEED_IN, RETAIL = 8, 32
AGENTS = ("previous", "learning")
PEAK_RETAIL = 48
PEAK_TIME_OF_USE = (
    (0, FEED_IN, RETAIL),
    (17 * 60, FEED_IN, PEAK_RETAIL),
    (21 * 60, FEED_IN, RETAIL),
)
"""The battery runs' tariffs: an evening peak (what a battery shifts energy into)."""
PRICINGS = ("none", "plain", "aware")


@dataclass
class Household:
    """One simulated household: its config and its counters at each slot end (Wh)."""

    config: HouseholdConfig
    imports: list[int] = field(default_factory=list)
    exports: list[int] = field(default_factory=list)
    battery: BatteryConfig | None = None
    """The battery the simulator gives it (left out of ``imports``/``exports``: the battery
    runs model it per slot)."""
    first_slot: int = int(START.replace(tzinfo=dt.UTC).timestamp()) // SLOT_SECONDS
    """The slot its first counters end."""

    @property
    def has_pv(self) -> bool:
        """True if the household has PV."""
        return self.config.pv_kwp > 0

    def net(self, k: int) -> int:
        """Net export in slot ``k`` (counter deltas)."""
        return (self.exports[k + 1] - self.exports[k]) - (self.imports[k + 1] - self.imports[k])


def simulate(households: int, days: int, seed: int, start_day: int = 0) -> list[Household]:
    """The households' counters at every slot boundary over ``days`` days from ``start_day``
    days after :data:`START`."""
    begin = START + dt.timedelta(days=start_day)
    first = int(begin.replace(tzinfo=dt.UTC).timestamp()) // SLOT_SECONDS
    made = make_households(households, seed)
    configs = [replace(c, battery_kwh=0.0) for c in made]
    clouds = Clouds(seed)
    out = []
    steps = round(SLOT_SECONDS / STEP_S)
    for c, original in zip(configs, made, strict=True):
        sim = SimulatedHousehold(c, seed, begin, LATITUDE, clouds)
        home = Household(c, [int(sim.state.import_wh)], [int(sim.state.export_wh)],
                         original.battery_config(), first)  # fmt: skip
        for _ in range(days * 86_400 // SLOT_SECONDS):
            for _ in range(steps):
                sim.step(STEP_S)
            home.imports.append(int(sim.state.import_wh))
            home.exports.append(int(sim.state.export_wh))
        out.append(home)
    return out


@dataclass
class AgentResult:
    """One agent's figures per household."""

    abs_errors: list[list[int]]
    money: list[int]
    """Minor units received (negative: paid) under the market, per household."""
    refused: list[int] = field(default_factory=list)
    """Offers the engine refused per household (``over_sell_limit``: its delivery record fell
    between the order's signing and its slot)."""


@dataclass
class SimBattery:
    """A battery behind one household's trading meter in a battery run, per slot (integers):
    its planning agent, its stored energy, and the meter's counters with its flow."""

    config: BatteryConfig
    agent: BatteryAgent
    soc_wh: int
    imports: list[int]
    exports: list[int]
    moved: list[int] = field(default_factory=list)
    """AC energy per slot (positive: charged)."""

    @classmethod
    def of(cls, home: Household, config: BatteryConfig) -> SimBattery:
        """The battery of ``home`` at its initial charge, its counters at the first boundary."""
        agent = BatteryAgent(slot_seconds=SLOT_SECONDS,
                             efficiency_permille=config.efficiency_permille)  # fmt: skip
        soc = config.capacity_wh * config.initial_soc_permille // 1000
        return cls(config, agent, soc, [home.imports[0]], [home.exports[0]])

    def status(self) -> BatteryStatus:
        """What the node would read (the state of charge in permille, as SunSpec gives it)."""
        c = self.config
        return BatteryStatus("battery", str(c.serial), c.capacity_wh,
                             self.soc_wh * 1000 // c.capacity_wh, c.soc_min_permille,
                             c.soc_max_permille, c.max_charge_w, c.max_discharge_w, None,
                             True, 0.0)  # fmt: skip

    def run_slot(self, home: Household, k: int, setpoint_wh: int | None) -> None:
        """Slot ``k`` with ``setpoint_wh`` (None: self-consumption): the battery moves, the
        meter's counters take its flow."""
        c = self.config
        state = BatteryState(self.soc_wh, -(-c.capacity_wh * c.soc_min_permille // 1000),
                             c.capacity_wh * c.soc_max_permille // 1000,
                             c.max_charge_w * SLOT_SECONDS // 3600,
                             c.max_discharge_w * SLOT_SECONDS // 3600,
                             c.efficiency_permille)  # fmt: skip
        imported = home.imports[k + 1] - home.imports[k]
        exported = home.exports[k + 1] - home.exports[k]
        b = state.feasible(exported - imported if setpoint_wh is None else setpoint_wh)
        self.soc_wh = state.after(b)
        if b > 0:  # charging: first from what it would export
            taken = min(exported, b)
            exported, imported = exported - taken, imported + b - taken
        elif b < 0:  # discharging: first into its own load
            given = min(imported, -b)
            imported, exported = imported - given, exported - b - given
        self.imports.append(self.imports[-1] + imported)
        self.exports.append(self.exports[-1] + exported)
        self.moved.append(b)


def run_grid(homes: list[Household], agent: str, seed: int,
             pricing: str | None = None) -> AgentResult:  # fmt: skip
    """Every slot through the engine with every household's agent of kind ``agent``;
    ``pricing`` (one of :data:`PRICINGS`): a battery run under the peak tariff."""
    operator = Signer.from_seed(b"forecast-bench-operator-" + bytes([seed % 256]) * 8)
    config = MarketConfig(grid="forecast-bench", operator=operator.did, feed_in_tariff=FEED_IN,
                          retail_price=RETAIL, slot_seconds=SLOT_SECONDS,
                          time_of_use=() if pricing is None else PEAK_TIME_OF_USE)  # fmt: skip
    schedule = Schedule(SLOT_SECONDS, 300, 120)
    state = State.initial(config)
    first = homes[0].first_slot
    traders = []
    for i in range(len(homes)):
        signer = Signer.from_seed(f"forecast-bench-{seed}-{i}".encode().ljust(32, b".")[:32])
        serial = f"FB{seed:03d}{i:04d}"
        trader = Trader(signer, config, schedule, serial, location=(LATITUDE, LONGITUDE))
        if agent == "previous":
            trader.forecaster = Forecaster(slots_per_day=86_400 // SLOT_SECONDS)  # type: ignore[assignment]
        traders.append(trader)
        state = _apply(state, MemberRegistration(
            grid=config.grid, operator=operator.did, household=signer.did, meter_serial=serial,
            role=MemberRole.VOTER if i < 3 else MemberRole.LEARNER, nonce=i + 1,
        ).signed_by(operator))  # fmt: skip
    slots = len(homes[0].imports) - 1
    errors: list[list[int]] = [[] for _ in homes]
    money = [0] * len(homes)
    refused = [0] * len(homes)
    accounts = {household_account(t.did): i for i, t in enumerate(traders)}
    pending: dict[int, list[Any]] = {}
    issued: list[dict[int, int]] = [{} for _ in homes]

    batteries: dict[int, SimBattery] = {}
    if pricing in ("plain", "aware"):
        batteries = {i: SimBattery.of(h, h.battery) for i, h in enumerate(homes) if h.battery}

    def sample(i: int, k: int) -> MeterSample:
        meter = batteries.get(i) or homes[i]
        return MeterSample(meter="main", serial=traders[i].meter_serial, time=0.0,
                           import_wh=meter.imports[k], export_wh=meter.exports[k],
                           power_w=0.0, voltage_v=230.0, frequency_hz=50.0)  # fmt: skip

    for i, trader in enumerate(traders):  # the boundary before the first slot
        trader.boundary[first - 1] = sample(i, 0)
    for i, battery in batteries.items():  # no commitment yet: self-consumption
        battery.run_slot(homes[i], 0, None)
    for k in range(slots):
        slot = first + k
        for order in pending.pop(slot, []):
            state, events = engine_apply(state, order)
            for ev in events:  # the delivery record fell since the order was signed
                if isinstance(ev, Rejected) and ev.reason is RejectReason.OVER_SELL_LIMIT:
                    refused[accounts[household_account(order.household)]] += 1
                elif isinstance(ev, Rejected):
                    raise RuntimeError(f"order rejected: {ev}")
        state, events = engine_apply(state, CloseGate(slot=slot))
        for ev in events:
            if isinstance(ev, Rejected):
                raise RuntimeError(f"gate closing rejected: {ev}")
            if isinstance(ev, GateClosed):
                for battery in batteries.values():
                    c = ev.clearing
                    battery.agent.observe_clearing(slot, c.price, c.volume_wh,
                                                   config.tariffs_at(slot))  # fmt: skip
        for i, trader in enumerate(traders):
            moved = batteries[i].moved[k] if i in batteries else 0
            state = _apply(state, trader.slot_ended(slot, sample(i, k + 1), battery_wh=moved))
            forecast = issued[i].pop(slot, None)
            if forecast is not None:
                errors[i].append(abs(homes[i].net(k) - forecast))
        state, events = engine_apply(state, SettleSlot(slot=slot))
        for ev in events:
            if isinstance(ev, Rejected):
                raise RuntimeError(f"settlement rejected: {ev}")
            if isinstance(ev, SlotSettled):
                for tx in ev.transactions:
                    for p in tx.postings:
                        if p.asset == MONEY and p.account in accounts:
                            money[accounts[p.account]] += p.amount
        target = slot + 2  # the open slot just after this slot's end
        for i, battery in batteries.items():  # the node's battery step at this slot's end
            if k + 1 < slots:
                decision = battery.agent.decide(
                    battery.status(), slot + 1, target if k + 2 < slots else None,
                    traders[i].forecaster.predict, config.tariffs_at,
                )  # fmt: skip
                battery.run_slot(homes[i], k + 1, decision.setpoint_wh)
        if k + 2 < slots:
            for i, trader in enumerate(traders):
                forecast = trader.forecaster.predict(target)
                if forecast is not None:
                    issued[i][target] = forecast
                part: Any = 0
                if i in batteries:
                    part = batteries[i].agent.order_energy(target)
                    part = part if pricing == "aware" else part.battery_wh
                order = trader.order_for(target, sell_limit_wh(state, trader.did),
                                         config.tariffs_at(target), part)  # fmt: skip
                if order is not None:
                    pending.setdefault(target, []).append(order)
    return AgentResult(errors, money, refused)


def _apply(state: State, command: Any) -> State:
    state, events = engine_apply(state, command)
    for ev in events:
        if isinstance(ev, Rejected):
            raise RuntimeError(f"command rejected: {ev}")
    return state


def grid_only_money(home: Household, time_of_use: tuple[tuple[int, int, int], ...] = ()) -> int:
    """What the household's net (without a battery) costs without the market, slot by slot
    (negative: paid), under the flat tariffs or ``time_of_use``."""
    config = MarketConfig(grid="g", operator="o", feed_in_tariff=FEED_IN, retail_price=RETAIL,
                          slot_seconds=SLOT_SECONDS, time_of_use=time_of_use)  # fmt: skip
    first = home.first_slot
    total = 0
    for k in range(len(home.imports) - 1):
        net, band = home.net(k), config.tariffs_at(first + k)
        total += money_for(net, band.feed_in) if net >= 0 else -money_for(-net, band.retail)
    return total


def mae(values: list[int]) -> float:
    """Mean of ``values`` (0.0 when empty)."""
    return sum(values) / len(values) if values else 0.0


@dataclass
class BenchResult:
    """Everything the benchmark prints (and the CI test checks)."""

    homes: list[Household]
    results: dict[str, AgentResult]
    grid_only: list[int]
    seconds: float

    def mae(self, agent: str, which: Callable[[Household], bool] = lambda h: True) -> float:
        """Mean absolute error per slot of ``agent`` over the households ``which`` selects."""
        errs = [e for h, es in zip(self.homes, self.results[agent].abs_errors, strict=True)
                if which(h) for e in es]  # fmt: skip
        return mae(errs)


def run(days: int = 365, households: int = 6, seed: int = 1) -> BenchResult:
    """Simulate, run both grids, and collect the figures."""
    start = time.monotonic()
    homes = simulate(households, days, seed)
    results = {agent: run_grid(homes, agent, seed) for agent in AGENTS}
    return BenchResult(homes, results, [grid_only_money(h) for h in homes],
                       time.monotonic() - start)  # fmt: skip


@dataclass
class BatteryBenchResult:
    """The battery runs: money per household for each of :data:`PRICINGS`, grid-only money
    under the peak tariff."""

    homes: list[Household]
    money: dict[str, list[int]]
    grid_only: list[int]
    seconds: float
    refused: dict[str, int] = field(default_factory=dict)
    """Offers refused over the sell limit, per run."""

    def saved(self, pricing: str, i: int) -> int:
        """Household ``i``'s money against grid-only in the ``pricing`` run."""
        return self.money[pricing][i] - self.grid_only[i]


def run_batteries(days: int, households: int = 6, seed: int = 1,
                  start_day: int = 0) -> BatteryBenchResult:  # fmt: skip
    """Simulate (``days`` from ``start_day``) and run the three battery grids (learning
    agents, peak tariff)."""
    start = time.monotonic()
    homes = simulate(households, days, seed, start_day)
    results = {p: run_grid(homes, "learning", seed, p) for p in PRICINGS}
    return BatteryBenchResult(homes, {p: r.money for p, r in results.items()},
                              [grid_only_money(h, PEAK_TIME_OF_USE) for h in homes],
                              time.monotonic() - start,
                              {p: sum(r.refused) for p, r in results.items()})  # fmt: skip


def report_batteries(r: BatteryBenchResult, out: Any = sys.stdout) -> None:
    """Print the battery households' savings against grid-only (peak tariff)."""
    slots = len(r.homes[0].imports) - 1
    print(f"batteries (peak tariff: retail {RETAIL}, {PEAK_RETAIL} from 17:00 to 21:00; "
          f"{slots} slots; savings against grid-only):", file=out)  # fmt: skip
    print(f"{'home':>4} {'PV kWp':>6} {'kWh':>5} {'kW':>4} | {'grid-only':>9} "
          + " ".join(f"{p:>9}" for p in PRICINGS), file=out)  # fmt: skip
    rows = [i for i, h in enumerate(r.homes) if h.battery is not None]
    for i in rows:
        h, b = r.homes[i], r.homes[i].battery
        assert b is not None
        print(f"{i:>4} {h.config.pv_kwp:>6.1f} {b.capacity_wh / 1000:>5.1f} "
              f"{b.max_charge_w / 1000:>4.1f} | {r.grid_only[i] / 100:>9.2f} "
              + " ".join(f"{r.saved(p, i) / 100:>9.2f}" for p in PRICINGS), file=out)  # fmt: skip
    others = [i for i in range(len(r.homes)) if i not in rows]
    print("battery households: " + ", ".join(
        f"{p} {sum(r.saved(p, i) for i in rows) / 100:.2f}" for p in PRICINGS)
        + "; the others: " + ", ".join(
        f"{p} {sum(r.saved(p, i) for i in others) / 100:.2f}" for p in PRICINGS)
        + f"; offers refused over the sell limit: {r.refused} ({r.seconds:.1f} s)",
        file=out)  # fmt: skip


def _ratio(new: float, old: float) -> str:
    return f"{new / old:.2f}" if old else "-"


def report(r: BenchResult, out: Any = sys.stdout) -> None:
    """Print the per-household table and the totals."""
    old, new = (r.results[a] for a in AGENTS)
    print(f"{'home':>4} {'PV kWp':>6} {'kWh/yr':>6} | {'MAE old':>7} {'MAE new':>7} "
          f"{'new/old':>7} | {'grid-only':>9} {'saved old':>9} {'saved new':>9} "
          f"{'new-old':>8}", file=out)  # fmt: skip
    for i, h in enumerate(r.homes):
        m_old, m_new = mae(old.abs_errors[i]), mae(new.abs_errors[i])
        s_old, s_new = old.money[i] - r.grid_only[i], new.money[i] - r.grid_only[i]
        print(f"{i:>4} {h.config.pv_kwp:>6.1f} {h.config.annual_kwh:>6.0f} | {m_old:>7.1f} "
              f"{m_new:>7.1f} {_ratio(m_new, m_old):>7} | {r.grid_only[i] / 100:>9.2f} "
              f"{s_old / 100:>9.2f} {s_new / 100:>9.2f} {(s_new - s_old) / 100:>8.2f}",
              file=out)  # fmt: skip
    for label, which in (("PV households", lambda h: h.has_pv),
                         ("households without PV", lambda h: not h.has_pv),
                         ("all households", lambda h: True)):  # fmt: skip
        m_old, m_new = r.mae("previous", which), r.mae("learning", which)
        idx = [i for i, h in enumerate(r.homes) if which(h)]
        s_old = sum(old.money[i] - r.grid_only[i] for i in idx)
        s_new = sum(new.money[i] - r.grid_only[i] for i in idx)
        print(f"{label}: MAE {m_old:.1f} -> {m_new:.1f} Wh per slot (ratio "
              f"{_ratio(m_new, m_old)}); saved against grid-only {s_old / 100:.2f} -> "
              f"{s_new / 100:.2f} (ratio {_ratio(s_new, s_old)})", file=out)  # fmt: skip
    print(f"({len(r.homes)} households, {len(r.homes[0].imports) - 1} slots, money in currency "
          f"units of 100 minor; {r.seconds:.1f} s)", file=out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--households", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--battery-days", type=int, default=0,
                        help="days of the battery runs (0: skip them)")  # fmt: skip
    parser.add_argument("--battery-from", type=int, default=0,
                        help="first day of the battery runs (days after 1 January)")  # fmt: skip
    parser.add_argument("--skip-forecast", action="store_true",
                        help="only the battery runs")  # fmt: skip
    args = parser.parse_args(argv)
    if not 1 <= args.days <= 3660 or not 1 <= args.households <= 64:
        parser.error("--days in 1..3660, --households in 1..64")
    if not 0 <= args.battery_days <= 3660 or not 0 <= args.battery_from <= 3660:
        parser.error("--battery-days and --battery-from in 0..3660")
    if not args.skip_forecast:
        report(run(args.days, args.households, args.seed))
    if args.battery_days:
        report_batteries(run_batteries(args.battery_days, args.households, args.seed,
                                       args.battery_from))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
