"""A deterministic market simulation: households, orders, readings and settlement over a day.

This drives the real contract engine and, optionally, the real ledger store; only the meters
and the network are simulated. It is ``microgrid simulate`` and the input of many tests. The
household profiles here are deliberately simple (seeded PV bell curve with clouds, a load with
morning and evening peaks); the Modbus meter simulator in ``meter/`` has the realistic ones.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from market import (
    CloseGate,
    Command,
    GateClosed,
    MarketConfig,
    MemberRegistration,
    MemberRole,
    MeterReading,
    Order,
    Rejected,
    SettleSlot,
    Side,
    SlotSettled,
    State,
    apply,
)
from market.encoding import sha256
from market.signing import Signer
from market.state import RULES

SLOT_HOURS = 0.25


@dataclass
class MarketSimHousehold:
    """One simulated household: its key, meter, and energy profile parameters."""

    index: int
    signer: Signer
    meter_serial: str
    pv_peak_w: int
    base_load_w: int
    bid_markup: int
    ask_markdown: int
    import_wh: int = 0
    export_wh: int = 0
    nonce: int = 0

    def next_nonce(self) -> int:
        """A fresh nonce for the next signed record."""
        self.nonce += 1
        return self.nonce


@dataclass
class MarketSimulation:
    """A simulated microgrid: operator, households and the market rules."""

    config: MarketConfig
    operator: Signer
    households: list[MarketSimHousehold]
    rng: random.Random
    operator_nonce: int = 0
    slot_log: list[Any] = field(default_factory=list)


def build(
    households: int = 6,
    seed: int = 1,
    mechanism: str = "uniform",
    grid: str = "demo-grid",
    rules: int = RULES,
) -> MarketSimulation:
    """A simulation of ``households`` households; the same seed gives the same run. ``rules``
    picks the settlement rules (:data:`market.state.RULES`; 1 replays grids created before)."""
    rng = random.Random(seed)
    operator = Signer.from_seed(sha256(f"operator/{grid}/{seed}".encode()))
    config = MarketConfig(
        grid=grid,
        operator=operator.did,
        feed_in_tariff=8,
        retail_price=32,
        mechanism=mechanism,
        rules=rules,
        # its households offer their PV forecast without an agent that watches their delivery
        # record, so the record does not limit them (sell_floor_permille 1000; inert in rules 1)
        **({"sell_floor_permille": 1000} if rules >= 2 else {}),  # type: ignore[arg-type]
    )
    homes = []
    for i in range(households):
        signer = Signer.from_seed(sha256(f"household/{grid}/{seed}/{i}".encode()))
        has_pv = i % 3 != 2  # two in three households have PV
        homes.append(
            MarketSimHousehold(
                index=i,
                signer=signer,
                meter_serial=f"SIM{seed:03d}{i:04d}",
                pv_peak_w=rng.randrange(3000, 9000) if has_pv else 0,
                base_load_w=rng.randrange(250, 700),
                bid_markup=rng.randrange(0, 10),
                ask_markdown=rng.randrange(0, 10),
            )
        )
    return MarketSimulation(config, operator, homes, rng)


def _pv_w(home: MarketSimHousehold, slot: int, cloud: float) -> int:
    hour = (slot % 96) * SLOT_HOURS + SLOT_HOURS / 2
    sun = math.sin(math.pi * (hour - 6) / 13) if 6 <= hour <= 19 else 0.0
    return int(home.pv_peak_w * max(sun, 0.0) ** 1.5 * cloud)


def _load_w(home: MarketSimHousehold, slot: int, rng: random.Random) -> int:
    hour = (slot % 96) * SLOT_HOURS
    peak = (
        1.0
        + 1.2 * math.exp(-(((hour - 7.5) / 1.2) ** 2))
        + 2.0 * math.exp(-(((hour - 19) / 2) ** 2))
    )
    return int(home.base_load_w * peak * rng.uniform(0.7, 1.4))


def registrations(sim: MarketSimulation) -> list[Command]:
    """The operator's signed registrations of every household."""
    out: list[Command] = []
    for home in sim.households:
        sim.operator_nonce += 1
        role = MemberRole.VOTER if home.index < 3 else MemberRole.LEARNER
        out.append(
            MemberRegistration(
                grid=sim.config.grid,
                operator=sim.operator.did,
                household=home.signer.did,
                meter_serial=home.meter_serial,
                role=role,
                nonce=sim.operator_nonce,
            ).signed_by(sim.operator)
        )
    return out


def slot_commands(sim: MarketSimulation, slot: int) -> tuple[list[Command], list[Command]]:
    """Commands for one slot: (orders + gate closure, readings + settlement).

    Each household forecasts its net energy for the slot and offers at most the forecast
    surplus (or bids for the forecast deficit); what its meter then measures differs from the
    forecast, as in reality.
    """
    cfg = sim.config
    rng = sim.rng
    cloud = rng.uniform(0.35, 1.0)
    trading: list[Command] = []
    actual: list[tuple[MarketSimHousehold, int, int]] = []
    for home in sim.households:
        pv = _pv_w(home, slot, cloud) * SLOT_HOURS
        load = _load_w(home, slot, rng) * SLOT_HOURS
        forecast_net = int((pv - load) * rng.uniform(0.8, 1.1))
        actual.append((home, int(pv), int(load)))
        mid = (cfg.feed_in_tariff + cfg.retail_price) // 2
        if forecast_net > 20:
            side, qty = Side.SELL, int(forecast_net * 0.9)
            price = max(cfg.feed_in_tariff, mid - 4 - home.ask_markdown)
        elif forecast_net < -20:
            side, qty = Side.BUY, -forecast_net
            price = min(cfg.retail_price, mid + 4 + home.bid_markup)
        else:
            continue
        trading.append(
            Order(
                grid=cfg.grid,
                id=f"{slot}-{home.index}",
                household=home.signer.did,
                side=side,
                slot=slot,
                quantity_wh=qty,
                price=price,
                nonce=home.next_nonce(),
            ).signed_by(home.signer)
        )
    trading.append(CloseGate(slot=slot))
    settling: list[Command] = []
    for home, pv_wh, load_wh in actual:
        home.export_wh += max(pv_wh - load_wh, 0)
        home.import_wh += max(load_wh - pv_wh, 0)
        settling.append(
            MeterReading(
                grid=cfg.grid,
                household=home.signer.did,
                meter_serial=home.meter_serial,
                slot=slot,
                import_wh=home.import_wh,
                export_wh=home.export_wh,
                nonce=home.next_nonce(),
            ).signed_by(home.signer)
        )
    settling.append(SettleSlot(slot=slot))
    return trading, settling


def commands(sim: MarketSimulation, slots: int, first_slot: int = 0) -> Iterator[Command]:
    """Every command of a run, in log order."""
    yield from registrations(sim)
    for slot in range(first_slot, first_slot + slots):
        trading, settling = slot_commands(sim, slot)
        yield from trading
        yield from settling


def run(
    households: int,
    slots: int,
    seed: int = 1,
    mechanism: str = "uniform",
    db: str | None = None,
    out: Any = None,
    rules: int = RULES,
) -> State:
    """Run a simulation through the engine (and a ledger store when ``db`` is given)."""
    from node.ledger import LedgerStore

    sim = build(households, seed, mechanism, rules=rules)
    state = State.initial(sim.config)
    store = LedgerStore(db) if db else None
    if store:
        store.init_genesis(sim.config)
    if out:
        print(
            f"{'slot':>4} {'time':>5} {'orders':>6} {'price':>5} {'local Wh':>9} "
            f"{'grid in Wh':>10} {'grid out Wh':>11} {'height':>6}  head",
            file=out,
        )
    clearing = None
    try:
        for index, command in enumerate(commands(sim, slots), start=1):
            state, events = apply(state, command)
            for ev in events:
                if isinstance(ev, Rejected):
                    raise RuntimeError(f"simulation command rejected: {ev}")
                if isinstance(ev, GateClosed):
                    clearing = ev
                if isinstance(ev, SlotSettled) and out and clearing is not None:
                    _print_row(out, ev, clearing)
            if store:
                store.record(events, applied_index=index)
    finally:
        if store:
            store.close()
    return state


def _print_row(out: Any, ev: SlotSettled, gate: GateClosed) -> None:
    grid_in = sum(-s.imbalance_wh for s in ev.settlements if s.imbalance_wh < 0)
    grid_out = sum(s.imbalance_wh for s in ev.settlements if s.imbalance_wh > 0)
    minutes = (ev.slot % 96) * 15
    price = "-" if gate.clearing.price is None else str(gate.clearing.price)
    print(
        f"{ev.slot:>4} {minutes // 60:02d}:{minutes % 60:02d} {len(gate.orders):>6} {price:>5} "
        f"{gate.clearing.volume_wh:>9} {grid_in:>10} {grid_out:>11} {ev.block.height:>6}  "
        f"{ev.block.hash[:16]}",
        file=out,
    )
