"""Feeding a real ledger slot by slot through the contract engine and the ledger store.

Unlike ``market_sim.run`` (one call, one run), a :class:`Feeder` keeps the engine state and the
store open, so a test can append slots to a ledger while a dashboard is reading it, and can
produce the situations the alerts are about through the real engine: a slot whose orders do not
cross, gates that close while settlement lags behind. A :class:`FeederGrid` is the same with a
feeder meter, its commands those of :func:`tests.ledger.feeder_grid.feeder_commands`.
"""

from __future__ import annotations

import dataclasses

from market import (
    CloseGate,
    Command,
    FeederReading,
    Order,
    Rejected,
    Side,
    State,
    apply,
)
from market.schedule import Schedule
from node.ledger import LedgerStore
from node.tools import market_sim
from tests.ledger.feeder_grid import FEEDER_SERIAL, feeder_commands


class Feeder:
    """A simulated microgrid writing into the ledger at ``db``."""

    def __init__(
        self,
        db: str,
        households: int = 6,
        seed: int = 1,
        first_slot: int = 0,
        feeder_serial: str | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        """``first_slot``: the first slot traded (slots are Unix time / slot length in a running
        grid; the simulation's day profile repeats every 96 slots). ``feeder_serial``: the
        genesis names a feeder meter (see :class:`FeederGrid`). ``schedule``: recorded in
        meta as a node does (``LedgerStore.record_schedule``); None leaves the ledger without
        one, like a ledger of an older node."""
        self.sim = market_sim.build(households, seed)
        if feeder_serial is not None:
            self.sim.config = dataclasses.replace(self.sim.config, feeder_serial=feeder_serial)
        self.state = State.initial(self.sim.config)
        self.store = LedgerStore(db)
        self.store.init_genesis(self.sim.config)
        if schedule is not None:
            self.store.record_schedule(schedule)
        self.index = 0
        self.next_slot = first_slot
        self.pending_settlements: list[list[Command]] = []
        self._apply(market_sim.registrations(self.sim))

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    def _apply(self, commands: list[Command]) -> None:
        for command in commands:
            self.index += 1
            self.state, events = apply(self.state, command)
            rejected = [e for e in events if isinstance(e, Rejected)]
            assert not rejected, rejected
            self.store.record(events, applied_index=self.index)

    def _settle_pending(self) -> None:
        for settling in self.pending_settlements:
            self._apply(settling)
        self.pending_settlements.clear()

    def advance(self, slots: int = 1) -> int:
        """Trade and settle ``slots`` more slots; returns the last slot settled."""
        self._settle_pending()
        for _ in range(slots):
            trading, settling = market_sim.slot_commands(self.sim, self.next_slot)
            self._apply(trading)
            self._apply(settling)
            self.next_slot += 1
        return self.next_slot - 1

    def advance_uncleared(self) -> int:
        """One slot whose bids (at the feed-in tariff) never reach the asks (at retail)."""
        self._settle_pending()
        slot = self.next_slot
        trading, settling = market_sim.slot_commands(self.sim, slot)
        cfg = self.sim.config
        signers = {h.signer.did: h for h in self.sim.households}
        orders = [c for c in trading if isinstance(c, Order)]
        sides = {o.side for o in orders}
        out: list[Command] = []
        for o in orders:
            price = cfg.feed_in_tariff if o.side == Side.BUY else cfg.retail_price
            out.append(o.model_copy(update={"price": price}).signed_by(signers[o.household].signer))
        for side in (Side.SELL, Side.BUY):
            if side in sides:
                continue
            busy = {o.household for o in out if isinstance(o, Order)}
            free = [h for h in self.sim.households if h.signer.did not in busy]
            if free:
                home = free[0]
            else:  # every household is on the other side: turn the last one around
                taken = out.pop()
                assert isinstance(taken, Order)
                home = signers[taken.household]
            out.append(
                Order(
                    grid=cfg.grid,
                    id=f"{slot}-extra-{side}",
                    household=home.signer.did,
                    side=side,
                    slot=slot,
                    quantity_wh=400,
                    price=cfg.retail_price if side == Side.SELL else cfg.feed_in_tariff,
                    nonce=home.next_nonce(),
                ).signed_by(home.signer)
            )
        out.append(CloseGate(slot=slot))
        self._apply(out)
        self._apply(settling)
        self.next_slot += 1
        return slot

    def close_gates_only(self, slots: int) -> int:
        """Close ``slots`` more gates without settling them (settlement falls behind)."""
        for _ in range(slots):
            trading, settling = market_sim.slot_commands(self.sim, self.next_slot)
            self._apply(trading)
            self.pending_settlements.append(settling)
            self.next_slot += 1
        return self.next_slot - 1


class FeederGrid(Feeder):
    """A :class:`Feeder` whose grid has a feeder meter (``FEEDER_SERIAL`` in the genesis): each
    slot's commands are :func:`tests.ledger.feeder_grid.feeder_commands`' (the same simulation,
    with the operator's signed feeder reading before the settlement), so the engine computes the
    feeder check and the store writes its ``feeder_checks`` row with the block.

    The feeder measures the households' net import plus 2 % line losses of the energy they
    moved; ``tamper`` adds Wh to the feeder's net over a slot (a slot that does not add up:
    the reading is re-signed by the operator), and slots in ``skip`` get no feeder reading.
    Only :meth:`advance` feeds it (no uncleared slots or lagging settlement).
    """

    def __init__(
        self,
        db: str,
        households: int = 6,
        seed: int = 1,
        first_slot: int = 0,
        tamper: dict[int, int] | None = None,
        skip: set[int] | None = None,
    ) -> None:
        """Like :class:`Feeder`, with ``feeder_serial`` in the genesis."""
        self.households = households
        self.seed = seed
        self.first_slot = first_slot
        self.tamper = tamper or {}
        self.skip = frozenset(skip or ())
        self.extra_import_wh = self.extra_export_wh = 0
        """What ``tamper`` added to the feeder meter's counters so far."""
        super().__init__(db, households, seed, first_slot, feeder_serial=FEEDER_SERIAL)

    def advance(self, slots: int = 1) -> int:
        """Trade, read the feeder and settle ``slots`` more slots; returns the last slot."""
        end = self.next_slot + slots
        _, commands = feeder_commands(
            self.households,
            end - self.first_slot,
            self.seed,
            first_slot=self.first_slot,
            missing_feeder=self.skip,
        )  # the whole run again (deterministic): the prefix is what was applied already
        new = [c for c in commands if self.next_slot <= getattr(c, "slot", -1) < end]
        self._apply([self._tampered(c) if isinstance(c, FeederReading) else c for c in new])
        self.next_slot = end
        return end - 1

    def _tampered(self, reading: FeederReading) -> FeederReading:
        """``reading`` with what ``tamper`` added up to its slot (its counters rise by the
        slot's tamper, so later slots' nets are untouched), re-signed by the operator."""
        extra = self.tamper.get(reading.slot, 0)
        self.extra_import_wh += max(extra, 0)
        self.extra_export_wh += max(-extra, 0)
        if not (self.extra_import_wh or self.extra_export_wh):
            return reading
        return reading.model_copy(
            update={
                "import_wh": reading.import_wh + self.extra_import_wh,
                "export_wh": reading.export_wh + self.extra_export_wh,
            }
        ).signed_by(self.sim.operator)

    def advance_uncleared(self) -> int:
        """Not for a feeder grid (its slots come from ``feeder_commands``)."""
        raise NotImplementedError("FeederGrid only advances")

    def close_gates_only(self, slots: int) -> int:
        """Not for a feeder grid (its slots come from ``feeder_commands``)."""
        raise NotImplementedError("FeederGrid only advances")
