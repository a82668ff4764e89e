"""The Raft group follows the grid's replicated membership, one safe change at a time."""

from __future__ import annotations

from market import MemberRole
from market.models import AddMember, ChangeRole, RemoveMember, RotateKey, SuspendMember
from node.daemon.membership import desired_roles, next_conf_change
from node.raft import ConfChange, ConfChangeType, Status
from tests.market.world import World, signer


def _status(
    voters: set[str], learners: set[str], me: str, progress: dict[str, int], last: int = 100
) -> Status:
    return Status(
        id=me, role="leader", term=2, leader=me, commit=last, applied=last, vote=me,
        last_index=last, first_index=1, voters=tuple(sorted(voters)),
        learners=tuple(sorted(learners)),
        progress={p: (m, m + 1, "replicate") for p, m in progress.items()},
    )  # fmt: skip


def _grid() -> tuple[World, str, str, str]:
    w = World()
    a = w.register("a", role=MemberRole.VOTER).did
    b = w.register("b", role=MemberRole.VOTER).did
    c = w.register("c").did
    return w, a, b, c


def _converge(w: World, voters: set[str], learners: set[str], me: str) -> list[ConfChange]:
    """Apply next_conf_change until nothing is left (every learner caught up)."""
    changes = []
    for _ in range(20):
        status = _status(voters, learners, me, dict.fromkeys(voters | learners, 100))
        cc = next_conf_change(desired_roles(w.state), status)
        if cc is None:
            return changes
        changes.append(cc)
        voters.discard(cc.node_id)
        learners.discard(cc.node_id)
        if cc.type == ConfChangeType.ADD_VOTER:
            voters.add(cc.node_id)
        elif cc.type == ConfChangeType.ADD_LEARNER:
            learners.add(cc.node_id)
    raise AssertionError(f"no convergence: {changes}")


def test_the_genesis_membership_needs_no_change() -> None:
    w, a, b, c = _grid()
    assert desired_roles(w.state) == {a: MemberRole.VOTER, b: MemberRole.VOTER,
                                      c: MemberRole.LEARNER}  # fmt: skip
    assert _converge(w, {a, b}, {c}, a) == []


def test_an_added_voter_joins_as_a_learner_and_is_promoted_only_once_caught_up() -> None:
    w, a, b, c = _grid()
    d = signer("d").did
    w.close(1)
    w.ok(w.govern(AddMember, 3, household=d, meter_serial="M-d", role=MemberRole.VOTER))
    cc = next_conf_change(desired_roles(w.state), _status({a, b}, {c}, a, {a: 100, b: 100, c: 100}))
    assert cc == ConfChange(ConfChangeType.ADD_LEARNER, d)  # admitted for a later slot: learns
    w.close(2)  # slot 3 is open now: d is an active voter
    behind = _status({a, b}, {c, d}, a, {a: 100, b: 100, c: 100, d: 10})
    assert next_conf_change(desired_roles(w.state), behind) is None
    caught_up = _status({a, b}, {c, d}, a, {a: 100, b: 100, c: 100, d: 95})
    assert next_conf_change(desired_roles(w.state), caught_up) == ConfChange(
        ConfChangeType.ADD_VOTER, d
    )


def test_a_removed_voter_leaves_after_its_replacement_is_promoted_and_the_leader_goes_last() -> (
    None
):
    w, a, b, c = _grid()
    w.ok(w.govern(ChangeRole, 2, household="c", role=MemberRole.VOTER))
    w.ok(w.govern(RemoveMember, 2, household="a"))
    w.ok(w.govern(SuspendMember, 2, household="b"))
    w.close(1)
    changes = _converge(w, {a, b}, {c}, a)
    assert changes == [
        ConfChange(ConfChangeType.ADD_VOTER, c),
        ConfChange(ConfChangeType.ADD_LEARNER, b),  # suspended: follows the ledger, no vote
        ConfChange(ConfChangeType.REMOVE_NODE, a),  # the leader itself, last
    ]


def test_a_rotated_voter_is_replaced_by_its_new_key() -> None:
    w, a, b, c = _grid()
    new = signer("a-2").did
    w.ok(w.govern(RotateKey, 2, household="a", new_household=new))
    w.close(1)
    changes = _converge(w, {a, b}, {c}, b)
    assert changes == [
        ConfChange(ConfChangeType.ADD_LEARNER, new),
        ConfChange(ConfChangeType.ADD_VOTER, new),
        ConfChange(ConfChangeType.REMOVE_NODE, a),
    ]


def test_raft_peers_the_grid_never_admitted_are_left_alone() -> None:
    w, a, b, c = _grid()
    status = _status({a, b, "n9"}, {c}, a, {a: 100, b: 100, c: 100, "n9": 100})
    assert next_conf_change(desired_roles(w.state), status, known=w.state.members) is None
    assert next_conf_change(desired_roles(w.state), status) == ConfChange(
        ConfChangeType.REMOVE_NODE, "n9"
    )
