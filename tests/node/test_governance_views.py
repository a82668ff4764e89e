"""Governance on the node without a network: the agent prices inside the band of the rules in
force in each slot, the governance shadow's dry run answers as the engine does, the members and
rules documents, and the operator's nonces never meet the feeder's."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from market import Side
from market.models import (
    AddMember,
    ChangeRules,
    MemberRole,
    RemoveMember,
    SuspendMember,
    TimeOfUsePeriod,
)
from market.schedule import Schedule
from market.state import config_at, member_term
from node.agent.strategy import Strategy, plan_order
from node.agent.trader import Trader
from node.daemon.status import (
    OPERATOR_NONCE_KINDS,
    connected_members,
    dry_run,
    free_operator_nonce,
    governance_outcome,
    governance_shadow,
    members_document,
    rules_document,
)
from tests.market.world import World, signer


def _world_with_rules_change() -> tuple[World, int]:
    """A grid (band 8..32) whose rules narrow the band to 12..20 from slot 5, and give slot
    6's time of day (with 1-slot days: every slot) a time-of-use band."""
    w = World()
    w.register("a", role=MemberRole.VOTER)
    w.close(1)
    w.ok(w.govern(ChangeRules, 5, feed_in_tariff=12, retail_price=20))
    return w, 5


def test_the_agent_never_prices_outside_the_band_of_the_slot_after_a_rules_change() -> None:
    w, from_slot = _world_with_rules_change()
    trader = Trader(signer("a"), w.config, Schedule(slot_seconds=4), "M-a")
    trader.forecaster.observe(0, 1000)  # a surplus: it sells
    before = trader.order_for(4, band=config_at(w.state, 4).tariffs_at(4))
    after = trader.order_for(from_slot, band=config_at(w.state, from_slot).tariffs_at(from_slot))
    assert before is not None and after is not None
    assert before.side == after.side == Side.SELL
    assert 8 <= before.price <= 32 and before.price == 8 + 6  # genesis band, a quarter up
    assert 12 <= after.price <= 20 and after.price == 12 + 2
    # the engine accepts what the agent signed for the new band
    w.ok(after)


@given(
    st.integers(-(10**6), 10**6),
    st.one_of(st.none(), st.integers(0, 100)),
    st.one_of(st.none(), st.integers(0, 100)),
    st.integers(0, 50),
    st.integers(0, 50),
)
def test_plans_stay_in_any_band(net: int, floor, cap, lo: int, width: int) -> None:
    from market.settlement import Tariffs

    band = Tariffs(lo, lo + width)
    plan = plan_order(3, net, Strategy(floor, cap), World().config, band=band)
    if plan is not None:
        assert band.feed_in <= plan.price <= band.retail


def test_dry_run_answers_as_the_engine_and_leaves_the_shadow_alone() -> None:
    w = World()
    w.register("a", role=MemberRole.VOTER)
    w.close(3)
    shadow = governance_shadow(w.state)
    newcomer = signer("newcomer").did
    late = w.govern(AddMember, 2, household=newcomer, meter_serial="M-new", role="learner")
    ok, answer = governance_outcome(late, dry_run(shadow, late))
    assert not ok and answer["reason"] == "effective_slot_closed"
    good = w.govern(AddMember, 6, household=newcomer, meter_serial="M-new", role="learner")
    assert governance_outcome(good, dry_run(shadow, good))[0]
    assert governance_outcome(good, dry_run(shadow, good))[0]  # the shadow did not change
    last_voter = w.govern(RemoveMember, 6, household="a")
    assert governance_outcome(last_voter, dry_run(shadow, last_voter))[1]["reason"] == (
        "no_voters_left"
    )
    ghost = w.govern(SuspendMember, 6, household=signer("ghost").did)
    assert governance_outcome(ghost, dry_run(shadow, ghost))[1]["reason"] == "unknown_household"
    w.ok(good)  # committed: the next shadow knows it (a new copy of the history)
    after = governance_shadow(w.state, shadow)
    assert after.records == 1 and after.state.governance is not shadow.state.governance
    replay = governance_outcome(good, dry_run(after, good))
    assert replay[1]["reason"] == "replayed_nonce"
    assert governance_shadow(w.state, after).state.governance is after.state.governance


def test_members_and_rules_documents() -> None:
    w = World()
    a = w.register("a", role=MemberRole.VOTER)
    b = w.register("b")
    w.close(1)
    newcomer = signer("newcomer").did
    w.ok(w.govern(AddMember, 4, household=newcomer, meter_serial="M-new", role="learner"))
    w.ok(w.govern(SuspendMember, 3, household="b"))
    w.ok(w.govern(RemoveMember, 5, household="b"))
    tou = (TimeOfUsePeriod(start_minute=0, feed_in_tariff=9, retail_price=25),)
    w.ok(w.govern(ChangeRules, 4, mechanism="pay_as_bid", time_of_use=tou))
    shadow = governance_shadow(w.state)
    doc = members_document(shadow, 3)
    by = {m["did"]: m for m in doc["members"]}
    assert by[a.did]["status"] == "active" and by[a.did]["since_slot"] == 0
    assert by[b.did]["status"] == "suspended" and by[b.did]["since_slot"] == 3
    assert [t["status"] for t in by[b.did]["scheduled"]] == ["removed"]
    assert by[newcomer]["status"] == "pending" and not by[newcomer]["genesis"]
    assert by[newcomer]["scheduled"][0]["from_slot"] == 4
    assert members_document(shadow, 4)["members"][2]["status"] in {"active", "removed"}
    assert member_term(shadow.state, newcomer, 4).active  # type: ignore[union-attr]
    # the newcomer (pending) gets a connection; b, suspended (still connected: it may be
    # reinstated) from slot 3 and removed from slot 5, keeps one until slot 4 has settled
    assert set(connected_members(shadow)) == {a.did, b.did, newcomer}
    w.settle(1)
    for slot in (2, 3, 4):
        assert b.did in connected_members(governance_shadow(w.state))
        w.close(slot)
        w.settle(slot)
    assert set(connected_members(governance_shadow(w.state))) == {a.did, newcomer}
    rules = rules_document(shadow, 4)
    assert rules["rules"]["mechanism"] == "pay_as_bid" and rules["band"] == {
        "feed_in_tariff": 9,
        "retail_price": 25,
    }
    assert [h["from_slot"] for h in rules["history"]] == [0, 4]
    assert rules_document(shadow, 3)["band"] == {"feed_in_tariff": 8, "retail_price": 32}


def test_operator_nonces_never_meet_the_feeder_and_stay_in_its_window() -> None:
    w = World(feeder_serial="FEEDER-1")
    w.register("a", role=MemberRole.VOTER)
    slot = 1000
    w.close(slot - 1)
    w.ok(w.feeder(slot - 1, 100, 0))  # nonce 4 * 999 + 2
    shadow = governance_shadow(w.state)
    taken: set[int] = set()
    for _ in range(10):
        nonce = free_operator_nonce(shadow, slot, taken)
        assert nonce is not None and nonce % 4 in OPERATOR_NONCE_KINDS and nonce >= 4 * slot
        taken.add(nonce)
    assert len(taken) == 10
    # a governance record on such a nonce, then the feeder's next readings are still fresh
    record = w.govern(ChangeRules, slot + 2, retail_price=40)
    record = record.model_copy(update={"nonce": max(taken)}).signed_by(w.operator)
    w.ok(record)
    w.close(slot)
    w.ok(w.feeder(slot, 200, 0))
