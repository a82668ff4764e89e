"""A small grid whose members and rules change while it runs, as a committed log.

Genesis: a voter and two learners (alice, bob). Then, by the operator's signed records: carol
joins from slot 3; the rules change from slot 3 (retail 30, pay-as-bid, grid fees of 5 per kWh
bought locally and 10 per kWh imported from the grid), taking bob's resting
bid at 31 out of slot 3's book; bob's meter is swapped from slot 4; alice's key is rotated
(countersigned) from slot 5; bob becomes a voter from slot 6; carol is suspended from slot 6
and reinstated from slot 8 (her first reading after is trued up at slot 8's time-of-use
tariffs); time-of-use tariffs hold from slot 7; the genesis voter leaves from slot 9.
"""

from __future__ import annotations

from market import CloseGate, Command, MemberRegistration, MemberRole, Rejected, SettleSlot
from market.models import (
    AddMember,
    ChangeRole,
    ChangeRules,
    ReinstateMember,
    RemoveMember,
    ReplaceMeter,
    RotateKey,
    SuspendMember,
    TimeOfUsePeriod,
)
from market.state import MarketConfig, State
from tests.market.world import GRID, World, signer
from tests.node.test_replica import as_log

SLOTS = 10
RECORD_TYPES = [
    "add_member", "change_rules", "replace_meter", "rotate_key", "change_role",
    "suspend_member", "reinstate_member", "change_rules", "remove_member",
]  # fmt: skip


def governance_commands() -> tuple[World, list[Command]]:
    """The world (its operator and household keys) and the grid's commands in log order."""
    w = World()
    out: list[Command] = []
    for name, role in (("voter", MemberRole.VOTER), ("alice", MemberRole.LEARNER),
                       ("bob", MemberRole.LEARNER)):  # fmt: skip
        home = signer(name)
        w.homes[name] = home
        out.append(
            MemberRegistration(
                grid=GRID, operator=w.operator.did, household=home.did,
                meter_serial=f"M-{name}", role=role, nonce=w.nonce(w.operator.did),
            ).signed_by(w.operator)
        )  # fmt: skip
    carol, alice2 = signer("carol"), signer("alice-2")
    w.homes.update({"carol": carol, "alice-2": alice2})
    out.append(w.order("bob", "buy", 100, 31, slot=3))  # withdrawn by the rules change
    periods = (TimeOfUsePeriod(start_minute=0, feed_in_tariff=8, retail_price=30),
               TimeOfUsePeriod(start_minute=120, feed_in_tariff=6, retail_price=35))  # fmt: skip
    out += [
        w.govern(AddMember, 3, household=carol.did, meter_serial="M-carol",
                 role=MemberRole.LEARNER),
        w.govern(ChangeRules, 3, retail_price=30, mechanism="pay_as_bid", local_fee=5,
                 grid_fee=10),
        w.govern(ReplaceMeter, 4, household="bob", meter_serial="M-bob-2", old_import_wh=350,
                 old_export_wh=700, new_import_wh=50, new_export_wh=0),
        w.govern(RotateKey, 5, household="alice",
                 new_household=alice2.did).countersigned_by(w.homes["alice"]),
        w.govern(ChangeRole, 6, household="bob", role=MemberRole.VOTER),
        w.govern(SuspendMember, 6, household=carol.did),
        w.govern(ReinstateMember, 8, household=carol.did),
        w.govern(ChangeRules, 7, time_of_use=periods),
        w.govern(RemoveMember, 9, household="voter"),
    ]  # fmt: skip
    for slot in range(1, SLOTS + 1):
        seller = "alice" if slot < 5 else "alice-2"
        out.append(w.order(seller, "sell", 300, 9, slot=slot))
        carol_in = slot >= 3 and slot not in (6, 7)
        if carol_in:
            out.append(w.order("carol", "buy", 200, 29, slot=slot))
        out.append(CloseGate(slot=slot))
        out.append(w.reading(seller, slot, 0, 300 * slot, serial="M-alice"))
        if carol_in:
            out.append(w.reading("carol", slot, 200 * slot, 0))
        if slot < 4:
            out.append(w.reading("bob", slot, 100 * slot, 200 * slot))
        else:  # the new meter started at 50 / 0 at the swap
            out.append(w.reading("bob", slot, 50 + 100 * (slot - 3), 200 * (slot - 3),
                                 serial="M-bob-2"))  # fmt: skip
        if slot < 9:
            out.append(w.reading("voter", slot, 50 * slot, 0))
        out.append(SettleSlot(slot=slot))
    return w, out


def governance_log() -> tuple[World, MarketConfig, list[tuple[int, bytes]]]:
    """The commands as a committed log (:func:`tests.node.test_replica.as_log`), after
    checking that the engine accepts every one of them."""
    w, commands = governance_commands()
    state = State.initial(w.config)
    from market import apply

    for cmd in commands:
        state, events = apply(state, cmd)
        rejected = [e for e in events if isinstance(e, Rejected)]
        assert not rejected, (cmd, rejected)
    assert state.height == SLOTS
    return w, w.config, as_log(commands, 3)
