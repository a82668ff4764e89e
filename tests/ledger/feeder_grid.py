"""A simulated microgrid with a feeder meter: the simulation's households, plus the operator's
signed feeder readings (the households' net flow plus 2 % line losses), in log order."""

from __future__ import annotations

from dataclasses import replace

from market import Command, FeederReading, MeterReading, SettleSlot
from market.state import MarketConfig
from node.tools import market_sim
from tests.node.test_replica import as_log

FEEDER_SERIAL = "FEEDER-SIM-1"


def feeder_commands(
    households: int,
    slots: int,
    seed: int,
    *,
    first_slot: int = 40,
    missing_feeder: frozenset[int] = frozenset(),
    loss_permille: int = 20,
) -> tuple[MarketConfig, list[Command]]:
    """Registrations, then per slot the orders, gate, readings, the feeder reading (except for
    slots in ``missing_feeder``) and the settlement. The feeder meters the households' net
    import plus ``loss_permille`` of the energy they moved (the grid allows 50)."""
    sim = market_sim.build(households, seed)
    sim.config = replace(sim.config, feeder_serial=FEEDER_SERIAL)
    out: list[Command] = list(market_sim.registrations(sim))
    counters = [10_000_000, 2_000_000]
    previous = {h.signer.did: (h.import_wh, h.export_wh) for h in sim.households}
    for slot in range(first_slot, first_slot + slots):
        trading, settling = market_sim.slot_commands(sim, slot)
        out += trading
        net = moved = 0
        for r in settling:
            if isinstance(r, MeterReading):
                before = previous[r.household]
                imp, exp = r.import_wh - before[0], r.export_wh - before[1]
                net += imp - exp
                moved += imp + exp
                previous[r.household] = (r.import_wh, r.export_wh)
        feeder_net = net + moved * loss_permille // 1000
        counters[0] += max(feeder_net, 0)
        counters[1] += max(-feeder_net, 0)
        settle = settling.pop()
        assert isinstance(settle, SettleSlot)
        out += settling
        if slot not in missing_feeder:
            out.append(
                FeederReading(
                    grid=sim.config.grid,
                    operator=sim.operator.did,
                    meter_serial=FEEDER_SERIAL,
                    slot=slot,
                    import_wh=counters[0],
                    export_wh=counters[1],
                    nonce=slot * 4 + 2,
                ).signed_by(sim.operator)
            )
        out.append(settle)
    return sim.config, out


def feeder_log_entries(
    households: int, slots: int, seed: int, **kwargs: object
) -> tuple[MarketConfig, list[tuple[int, bytes]]]:
    """The commands as a committed log (:func:`tests.node.test_replica.as_log`)."""
    config, commands = feeder_commands(households, slots, seed, **kwargs)  # type: ignore[arg-type]
    return config, as_log(commands, seed)
