"""The operator's governance records: members join, leave, rotate keys and swap meters, and the
rules change, each from a future slot, identically on every replica."""

from __future__ import annotations

import pytest

from market import MemberRole, Rejected, apply
from market.accounting import ENERGY, MONEY, household_account
from market.errors import RejectReason
from market.events import GovernanceAccepted, SlotSettled
from market.models import (
    AddMember,
    ChangeRole,
    ChangeRules,
    CloseGate,
    ReinstateMember,
    RemoveMember,
    ReplaceMeter,
    RotateKey,
    SettleSlot,
    SuspendMember,
    TimeOfUsePeriod,
)
from market.snapshot import dump_state, load_state, state_digest
from market.state import config_at, member_term

from .world import World, signer


def _grid() -> World:
    w = World()
    w.register("voter", role=MemberRole.VOTER)
    w.register("alice")
    w.register("bob")
    return w


def _settled(events: list) -> SlotSettled:
    (ev,) = [e for e in events if isinstance(e, SlotSettled)]
    return ev


def _balance(w: World, name_or_did: str, asset: str = MONEY) -> int:
    did = w.homes[name_or_did].did if name_or_did in w.homes else name_or_did
    return w.state.balances.get((household_account(did), asset), 0)


def total(w: World, asset: str) -> int:
    return sum(v for (_, a), v in w.state.balances.items() if a == asset)


# --- adding a household ---------------------------------------------------------------------


def test_an_added_household_trades_from_its_first_slot_and_not_before() -> None:
    w = _grid()
    carol = signer("carol")
    w.homes["carol"] = carol
    w.close(1)
    (ev,) = w.ok(w.govern(AddMember, 4, household=carol.did, meter_serial="M-carol",
                          role=MemberRole.LEARNER))  # fmt: skip
    assert isinstance(ev, GovernanceAccepted)
    early = w.rejected(w.order("carol", "buy", 100, 20, slot=3))
    assert early.reason == RejectReason.NOT_ACTIVE
    w.ok(w.order("carol", "buy", 100, 20, slot=4))
    w.ok(w.order("alice", "sell", 100, 10, slot=4))
    for slot in (2, 3):
        w.close(slot)
    w.close(4)
    w.ok(w.reading("alice", 4, 0, 1000))
    w.ok(w.reading("carol", 4, 500, 0))
    for slot in (1, 2, 3):
        settled = _settled(w.settle(slot))
        assert carol.did not in {s.household for s in settled.settlements}
    settled = _settled(w.settle(4))
    assert carol.did in {s.household for s in settled.settlements}
    assert [t.buyer for t in settled.trades] == [carol.did]


def test_governance_records_are_refused_with_a_typed_reason_and_change_nothing() -> None:
    w = _grid()
    w.close(1)
    w.close(2)
    past = w.rejected(w.govern(RemoveMember, 2, household="alice"))
    assert past.reason == RejectReason.EFFECTIVE_SLOT_CLOSED
    forged = w.govern(RemoveMember, 5, household="alice").signed_by(w.homes["bob"])
    assert w.rejected(forged).reason == RejectReason.BAD_SIGNATURE
    not_operator = RemoveMember(grid="test-grid", operator=w.homes["bob"].did, nonce=1,
                                household=w.homes["alice"].did, from_slot=5
                                ).signed_by(w.homes["bob"])  # fmt: skip
    assert w.rejected(not_operator).reason == RejectReason.NOT_OPERATOR
    stranger = signer("stranger").did
    assert w.rejected(w.govern(RemoveMember, 5, household=stranger)).reason == (
        RejectReason.UNKNOWN_HOUSEHOLD
    )
    last_voter = w.rejected(w.govern(RemoveMember, 5, household="voter"))
    assert last_voter.reason == RejectReason.NO_VOTERS_LEFT
    demoted = w.rejected(w.govern(ChangeRole, 5, household="voter", role=MemberRole.LEARNER))
    assert demoted.reason == RejectReason.NO_VOTERS_LEFT
    closed_rules = w.rejected(w.govern(ChangeRules, 1, retail_price=40))
    assert closed_rules.reason == RejectReason.EFFECTIVE_SLOT_CLOSED
    bad_band = w.rejected(w.govern(ChangeRules, 5, feed_in_tariff=40))
    assert bad_band.reason == RejectReason.INVALID_CHANGE
    again = w.rejected(w.govern(AddMember, 5, household=w.homes["bob"].did, meter_serial="X",
                                role=MemberRole.LEARNER))  # fmt: skip
    assert again.reason == RejectReason.INVALID_CHANGE
    taken = w.rejected(w.govern(AddMember, 5, household=signer("dave").did,
                                meter_serial="M-bob", role=MemberRole.LEARNER))  # fmt: skip
    assert taken.reason == RejectReason.INVALID_CHANGE
    assert w.rejected(w.govern(ReinstateMember, 5, household="alice")).reason == (
        RejectReason.INVALID_CHANGE
    )


def test_a_new_voter_may_replace_the_last_one() -> None:
    w = _grid()
    w.ok(w.govern(ChangeRole, 3, household="alice", role=MemberRole.VOTER))
    w.ok(w.govern(RemoveMember, 3, household="voter"))
    assert member_term(w.state, w.homes["alice"].did, 3).role == MemberRole.VOTER  # type: ignore[union-attr]


# --- removing and suspending ------------------------------------------------------------------


def test_a_removed_household_is_settled_through_its_final_reading_and_then_refused() -> None:
    w = _grid()
    w.close(1)
    w.ok(w.reading("alice", 1, 1000, 0))
    w.settle(1)
    w.ok(w.order("alice", "buy", 100, 20, slot=3))
    (ev,) = w.ok(w.govern(RemoveMember, 3, household="alice"))
    assert [o.slot for o in ev.withdrawn] == [3]
    assert w.state.books.get(3, {}) == {}
    assert w.rejected(w.order("alice", "buy", 100, 20, slot=4)).reason == RejectReason.NOT_ACTIVE
    w.close(2)
    w.ok(w.reading("alice", 2, 1400, 0))  # the final reading: slot 2 is its last
    owed = _settled(w.settle(2))
    assert {s.household: s.import_wh for s in owed.settlements}[w.homes["alice"].did] == 400
    balance = _balance(w, "alice")
    assert balance < 0
    w.close(3)
    late = w.rejected(w.reading("alice", 3, 1500, 0))
    assert late.reason == RejectReason.NOT_ACTIVE
    after = _settled(w.settle(3))
    assert w.homes["alice"].did not in {s.household for s in after.settlements}
    assert _balance(w, "alice") == balance  # the balance stays in the ledger


def test_a_suspended_household_is_trued_up_with_the_grid_when_reinstated() -> None:
    w = _grid()
    w.close(1)
    w.ok(w.reading("alice", 1, 1000, 0))
    w.settle(1)
    w.ok(w.govern(SuspendMember, 2, household="alice"))
    w.ok(w.govern(ReinstateMember, 4, household="alice"))
    for slot in (2, 3):
        w.close(slot)
        assert w.rejected(w.reading("alice", slot, 1000, 0)).reason == RejectReason.NOT_ACTIVE
        w.settle(slot)
    w.close(4)
    w.ok(w.reading("alice", 4, 1900, 0))
    settled = _settled(w.settle(4))
    true_ups = [t for t in settled.transactions if t.kind == "true_up"]
    assert len(true_ups) == 1  # the 900 Wh counted while suspended are settled with the grid
    account = household_account(w.homes["alice"].did)
    energy = sum(
        p.amount for t in true_ups for p in t.postings if p.asset == ENERGY and p.account == account
    )
    assert abs(energy) == 900


# --- keys and meters ----------------------------------------------------------------------------


def test_a_rotated_key_carries_the_balance_meter_and_record_to_the_new_did() -> None:
    w = _grid()
    w.close(1)
    w.ok(w.reading("alice", 1, 1000, 0))
    w.settle(1)
    w.close(2)
    w.ok(w.reading("alice", 2, 1500, 0))
    w.settle(2)
    old_balance = _balance(w, "alice")
    new = signer("alice-2")
    rotation = w.govern(RotateKey, 4, household="alice", new_household=new.did)
    bad = rotation.model_copy(update={"household_signature": "00" * 64})
    assert w.rejected(bad).reason == RejectReason.BAD_SIGNATURE
    w.ok(rotation.countersigned_by(w.homes["alice"]))
    w.homes["alice-2"] = new
    assert w.rejected(w.order("alice", "buy", 10, 20, slot=4)).reason == RejectReason.NOT_ACTIVE
    w.ok(w.order("alice-2", "buy", 10, 20, slot=4))
    w.close(3)
    w.ok(w.reading("alice", 3, 1600, 0))
    w.settle(3)
    before = total(w, MONEY), total(w, ENERGY)
    w.close(4)
    assert w.rejected(w.reading("alice", 4, 1700, 0)).reason == RejectReason.NOT_ACTIVE
    w.ok(w.reading("alice-2", 4, 1700, 0, serial="M-alice"))
    settled = _settled(w.settle(4))
    rotations = [t for t in settled.transactions if t.kind == "key_rotation"]
    assert len(rotations) == 1 and rotations[0].is_balanced()
    assert _balance(w, "alice") == 0
    by_did = {s.household: s for s in settled.settlements}
    assert by_did[new.did].import_wh == 100  # measured against the old key's last reading
    assert w.homes["alice"].did not in by_did
    assert (total(w, MONEY), total(w, ENERGY)) == before
    assert _balance(w, "alice-2") < old_balance  # carried over, then charged for slots 3-4


def test_a_lost_key_is_rotated_by_the_operator_alone() -> None:
    w = _grid()
    new = signer("alice-new")
    w.ok(w.govern(RotateKey, 2, household="alice", new_household=new.did))
    assert member_term(w.state, new.did, 2).active  # type: ignore[union-attr]
    assert not member_term(w.state, w.homes["alice"].did, 2).active  # type: ignore[union-attr]


@pytest.mark.parametrize("missing", [(), (3,), (3, 4)])
def test_a_meter_swap_neither_loses_nor_double_counts_energy(missing: tuple[int, ...]) -> None:
    """The old meter reads 1000 at the end of slot 2 and 1300 at the swap in slot 3; the new
    one starts at 50 and reads 250 at the end of slot 3, 650 at the end of slot 4: 300 + 200
    + 400 Wh over slots 3 and 4, whichever readings are missing in between."""
    w = _grid()
    for slot, imp in ((1, 900), (2, 1000)):
        w.close(slot)
        w.ok(w.reading("alice", slot, imp, 0))
        w.settle(slot)
    swap = w.govern(ReplaceMeter, 3, household="alice", meter_serial="M-alice-2",
                    old_import_wh=1300, old_export_wh=0, new_import_wh=50)  # fmt: skip
    w.ok(swap)
    w.close(3)
    stale = w.rejected(w.reading("alice", 3, 1300, 0))
    assert stale.reason == RejectReason.UNKNOWN_METER
    below = w.rejected(w.reading("alice", 3, 40, 0, serial="M-alice-2"))
    assert below.reason == RejectReason.COUNTER_REGRESSION
    counted = 0
    for slot, imp in ((3, 250), (4, 650), (5, 700)):
        if slot != 3:
            w.close(slot)
        if slot not in missing:
            w.ok(w.reading("alice", slot, imp, 0, serial="M-alice-2"))
        settled = _settled(w.settle(slot))
        mine = {s.household: s for s in settled.settlements}[w.homes["alice"].did]
        counted += mine.import_wh
        for tx in settled.transactions:
            if tx.kind == "true_up":
                account = household_account(w.homes["alice"].did)
                counted += sum(
                    p.amount for p in tx.postings if p.asset == ENERGY and p.account == account
                )
    assert counted == 300 + 200 + 400 + 50


def test_a_meter_swap_below_the_old_meters_last_reading_is_refused() -> None:
    w = _grid()
    w.close(1)
    w.ok(w.reading("alice", 1, 900, 0))
    swap = w.govern(ReplaceMeter, 3, household="alice", meter_serial="M-new",
                    old_import_wh=800, old_export_wh=0)  # fmt: skip
    assert w.rejected(swap).reason == RejectReason.COUNTER_REGRESSION


# --- rules --------------------------------------------------------------------------------------


def test_a_rules_change_settles_each_slot_under_the_rules_of_that_slot() -> None:
    w = _grid()
    w.ok(w.order("bob", "buy", 100, 31, slot=3))
    (ev,) = w.ok(w.govern(ChangeRules, 3, retail_price=30))
    assert [o.household for o in ev.withdrawn] == [w.homes["bob"].did]  # priced above the cap
    assert w.rejected(w.order("bob", "buy", 100, 31, slot=3)).reason == (
        RejectReason.PRICE_OUT_OF_BAND
    )
    w.ok(w.order("bob", "buy", 100, 31, slot=2))
    blocks = {}
    for slot, imp in ((1, 1000), (2, 2000), (3, 3000)):
        w.close(slot)
        w.ok(w.reading("alice", slot, imp, 0))
        blocks[slot] = _settled(w.settle(slot))
    assert blocks[2].block.rules is None
    assert blocks[3].block.rules == config_at(w.state, 3).rules_hash()
    grid_money = {
        slot: sum(p.amount for t in b.transactions for p in t.postings
                  if p.account == household_account(w.homes["alice"].did) and p.asset == MONEY)
        for slot, b in blocks.items()
    }  # fmt: skip
    assert grid_money[2] == -32  # 1000 Wh at the genesis retail price
    assert grid_money[3] == -30  # 1000 Wh at the new one


def test_time_of_use_periods_set_each_slots_band_and_tariffs() -> None:
    w = _grid()  # 15-minute slots: slot 4 starts at 01:00 UTC, slot 8 at 02:00
    periods = (TimeOfUsePeriod(start_minute=0, feed_in_tariff=5, retail_price=20),
               TimeOfUsePeriod(start_minute=120, feed_in_tariff=10, retail_price=40))  # fmt: skip
    w.ok(w.govern(ChangeRules, 4, time_of_use=periods))
    config = config_at(w.state, 4)
    assert config.tariffs_at(7).retail == 20 and config.tariffs_at(8).retail == 40
    assert config.tariffs_at(96 + 8).retail == 40  # the next day
    assert w.rejected(w.order("bob", "buy", 10, 25, slot=5)).reason == (
        RejectReason.PRICE_OUT_OF_BAND
    )
    w.ok(w.order("bob", "buy", 10, 25, slot=9))
    w.ok(w.govern(ChangeRules, 20, time_of_use=()))
    assert config_at(w.state, 20).tariffs_at(20).retail == 32


def test_grid_fees_go_to_the_network_account_from_their_slot() -> None:
    """From slot 3 a kWh bought locally costs 2 in fees and a kWh imported from the grid 5:
    bob buys 1000 Wh from alice and draws 1500 Wh (500 from the grid), alice delivers."""
    w = _grid()
    w.ok(w.govern(ChangeRules, 3, local_fee=2, grid_fee=5))
    assert config_at(w.state, 2).tariffs_at(2).grid_fee == 0
    assert config_at(w.state, 3).tariffs_at(3).grid_fee == 5
    w.close(1)
    w.settle(1)
    blocks = {}
    for slot in (2, 3):
        w.ok(w.order("alice", "sell", 1000, 10, slot=slot))
        w.ok(w.order("bob", "buy", 1000, 20, slot=slot))
        w.close(slot)
        w.ok(w.reading("alice", slot, 0, 1000 * slot))
        w.ok(w.reading("bob", slot, 1500 * slot, 0))
        blocks[slot] = _settled(w.settle(slot))
    assert [t.kind for t in blocks[2].transactions if t.kind.endswith("_fee")] == []
    fees = {(t.kind, t.ref): t for t in blocks[3].transactions if t.kind.endswith("_fee")}
    bob = w.homes["bob"].did
    assert set(fees) == {("local_fee", bob), ("grid_fee", bob)}
    assert all(t.is_balanced() for t in fees.values())
    assert w.state.balances[("network", MONEY)] == 2 + 3  # 1 kWh x 2; 0.5 kWh x 5, half up
    assert total(w, MONEY) == 0


def test_a_rules_record_without_fees_signs_the_bytes_it_signed_before_fees_existed() -> None:
    w = _grid()
    plain = w.govern(ChangeRules, 5, retail_price=30)
    assert "grid_fee" not in plain.unsigned_fields() and "local_fee" not in plain.unsigned_fields()
    with_fee = w.govern(ChangeRules, 5, grid_fee=4)
    assert with_fee.unsigned_fields()["grid_fee"] == 4
    assert w.rejected(with_fee.model_copy(update={"grid_fee": 5})).reason == (
        RejectReason.BAD_SIGNATURE
    )


# --- replication --------------------------------------------------------------------------------


def _life(w: World) -> list[object]:
    """A grid's life with every kind of change, as a command list."""
    carol, alice2 = signer("carol"), signer("alice-2")
    w.homes.update(carol=carol, **{"alice-2": alice2})
    cmds: list[object] = [
        w.govern(AddMember, 2, household=carol.did, meter_serial="M-carol",
                 role=MemberRole.LEARNER),
        w.govern(ChangeRules, 3, retail_price=30, mechanism="pay_as_bid", local_fee=1,
                 grid_fee=3),
        w.govern(ReplaceMeter, 3, household="bob", meter_serial="M-bob-2", old_import_wh=700,
                 old_export_wh=2000),
        w.govern(RotateKey, 4, household="alice", new_household=alice2.did),
        w.govern(ChangeRole, 4, household=carol.did, role=MemberRole.VOTER),
        w.govern(RemoveMember, 5, household="voter"),
    ]  # fmt: skip
    for slot in range(1, 7):
        seller = "alice" if slot < 4 else "alice-2"
        cmds.append(w.order(seller, "sell", 300, 9, slot=slot))
        if slot >= 2:
            cmds.append(w.order("carol", "buy", 200, 29, slot=slot))
        cmds.append(CloseGate(slot=slot))
        cmds.append(w.reading(seller, slot, 0, 300 * slot, serial="M-alice"))
        if slot >= 2:
            cmds.append(w.reading("carol", slot, 200 * slot, 0))
        cmds.append(w.reading("bob", slot, 100 * slot, 200 * slot,
                              serial="M-bob" if slot < 3 else "M-bob-2"))  # fmt: skip
        cmds.append(SettleSlot(slot=slot))
    return cmds


def test_replicas_agree_across_rule_changes_and_a_snapshot_restores_the_same_state() -> None:
    w = _grid()
    commands = _life(w)
    base = _grid().state
    replicas = [base.copy(), base.copy()]
    rejected: list[Rejected] = []
    for i, cmd in enumerate(commands):
        for r in range(2):
            replicas[r], events = apply(replicas[r], cmd)  # type: ignore[arg-type]
            if r == 0:
                rejected += [e for e in events if isinstance(e, Rejected)]
        if i == len(commands) // 2:  # one replica restarts from a snapshot mid-way
            replicas[1] = load_state(dump_state(replicas[1]))
    assert rejected == []
    assert state_digest(replicas[0]) == state_digest(replicas[1])
    assert replicas[0].height == 6
    assert replicas[0].head_hash == replicas[1].head_hash
