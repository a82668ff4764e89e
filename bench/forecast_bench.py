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

    python -m bench.forecast_bench [--days 365] [--households 6] [--seed 1]
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
from market.events import Rejected, SlotSettled
from market.schedule import Schedule
from market.signing import Signer
from market.state import sell_limit_wh
from meter.sample import MeterSample
from meter.sim.household import HouseholdConfig, SimulatedHousehold, make_households
from meter.sim.solar import Clouds
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


@dataclass
class Household:
    """One simulated household: its config and its counters at each slot end (Wh)."""

    config: HouseholdConfig
    imports: list[int] = field(default_factory=list)
    exports: list[int] = field(default_factory=list)

    @property
    def has_pv(self) -> bool:
        """True if the household has PV."""
        return self.config.pv_kwp > 0

    def net(self, k: int) -> int:
        """Net export in slot ``k`` (counter deltas)."""
        return (self.exports[k + 1] - self.exports[k]) - (self.imports[k + 1] - self.imports[k])


def simulate(households: int, days: int, seed: int) -> list[Household]:
    """The households' counters at every slot boundary over ``days`` days."""
    configs = [replace(c, battery_kwh=0.0) for c in make_households(households, seed)]
    clouds = Clouds(seed)
    out = []
    steps = round(SLOT_SECONDS / STEP_S)
    for c in configs:
        sim = SimulatedHousehold(c, seed, START, LATITUDE, clouds)
        home = Household(c, [int(sim.state.import_wh)], [int(sim.state.export_wh)])
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


def run_grid(homes: list[Household], agent: str, seed: int) -> AgentResult:
    """Every slot through the engine with every household's agent of kind ``agent``."""
    operator = Signer.from_seed(b"forecast-bench-operator-" + bytes([seed % 256]) * 8)
    config = MarketConfig(grid="forecast-bench", operator=operator.did, feed_in_tariff=FEED_IN,
                          retail_price=RETAIL, slot_seconds=SLOT_SECONDS)  # fmt: skip
    schedule = Schedule(SLOT_SECONDS, 300, 120)
    state = State.initial(config)
    first = int(START.replace(tzinfo=dt.UTC).timestamp()) // SLOT_SECONDS
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
    accounts = {household_account(t.did): i for i, t in enumerate(traders)}
    pending: dict[int, list[Any]] = {}
    issued: list[dict[int, int]] = [{} for _ in homes]

    def sample(i: int, k: int) -> MeterSample:
        return MeterSample(meter="main", serial=traders[i].meter_serial, time=0.0,
                           import_wh=homes[i].imports[k], export_wh=homes[i].exports[k],
                           power_w=0.0, voltage_v=230.0, frequency_hz=50.0)  # fmt: skip

    for i, trader in enumerate(traders):  # the boundary before the first slot
        trader.boundary[first - 1] = sample(i, 0)
    for k in range(slots):
        slot = first + k
        for order in pending.pop(slot, []):
            state = _apply(state, order)
        state = _apply(state, CloseGate(slot=slot))
        for i, trader in enumerate(traders):
            state = _apply(state, trader.slot_ended(slot, sample(i, k + 1)))
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
        if k + 2 < slots:
            for i, trader in enumerate(traders):
                forecast = trader.forecaster.predict(target)
                if forecast is not None:
                    issued[i][target] = forecast
                order = trader.order_for(target, sell_limit_wh(state, trader.did))
                if order is not None:
                    pending.setdefault(target, []).append(order)
    return AgentResult(errors, money)


def _apply(state: State, command: Any) -> State:
    state, events = engine_apply(state, command)
    for ev in events:
        if isinstance(ev, Rejected):
            raise RuntimeError(f"command rejected: {ev}")
    return state


def grid_only_money(home: Household) -> int:
    """What the household's net costs without the market, slot by slot (negative: paid)."""
    total = 0
    for k in range(len(home.imports) - 1):
        net = home.net(k)
        total += money_for(net, FEED_IN) if net >= 0 else -money_for(-net, RETAIL)
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
    args = parser.parse_args(argv)
    if not 1 <= args.days <= 3660 or not 1 <= args.households <= 64:
        parser.error("--days in 1..3660, --households in 1..64")
    report(run(args.days, args.households, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
