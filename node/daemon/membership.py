"""The Raft configuration follows the grid's replicated membership.

The operator's committed governance records decide who is a member and who votes
(:mod:`market.governance`); the Raft group must follow, one single-server change at a time
(the core refuses a second while one is unapplied). This module is pure: the leader's driver asks
:func:`next_conf_change` on each proposal tick and proposes what it returns.

What each household should be in Raft, now (the first open slot):

- a **voter** while it is active and its role is voter;
- a **learner** while it is active as a learner, suspended (it keeps following the ledger), or
  admitted for a later slot (it catches up before it may trade);
- **out** once removed or rotated away (its new DID joins in its place).

The order of changes keeps a quorum reachable: learners are added first, a learner is promoted
only once it has caught up (its match index within ``catch_up_entries`` of the leader's last
index), promotions come before demotions and removals, and the leader changes itself last.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from market.governance import MemberStatus
from market.models import MemberRole
from market.state import State, latest_term, member_term
from node.raft import ConfChange, ConfChangeType, Status

CATCH_UP_ENTRIES = 32
"""A learner is promoted once its log is at most this many entries behind the leader's."""

_FOLLOWING = frozenset({MemberStatus.ACTIVE, MemberStatus.SUSPENDED, MemberStatus.PENDING})


def desired_roles(state: State) -> dict[str, MemberRole]:
    """Each household's Raft role now, by DID (households left out are not in the group)."""
    slot = 0 if state.closed_through is None else state.closed_through + 1
    roles: dict[str, MemberRole] = {}
    for did in sorted(state.members):
        now = member_term(state, did, slot)
        if now is None:
            continue
        if now.active and now.role == MemberRole.VOTER:
            roles[did] = MemberRole.VOTER
        elif now.status in _FOLLOWING or latest_term(state, did).status in _FOLLOWING:
            roles[did] = MemberRole.LEARNER
    return roles


def next_conf_change(
    desired: Mapping[str, MemberRole],
    status: Status,
    catch_up_entries: int = CATCH_UP_ENTRIES,
    known: Collection[str] | None = None,
) -> ConfChange | None:
    """The one change that brings the leader's configuration (``status``) closer to
    ``desired``, or None when it matches (or the next step must wait for a learner to catch
    up). With ``known`` (every DID the engine ever admitted), a Raft peer outside it is left
    alone: the grid's records never spoke of it."""
    voters, learners = set(status.voters), set(status.learners)
    me = status.id
    for did in sorted(desired):
        if did not in voters and did not in learners:
            return ConfChange(ConfChangeType.ADD_LEARNER, did)
    for did in sorted(desired):
        if desired[did] == MemberRole.VOTER and did in learners:
            match = status.progress.get(did, (0, 0, ""))[0]
            if match + catch_up_entries >= status.last_index:
                return ConfChange(ConfChangeType.ADD_VOTER, did)
    changes: list[ConfChange] = []
    for did in sorted(voters | learners):
        if known is not None and did not in known:
            continue
        role = desired.get(did)
        if role is None:
            changes.append(ConfChange(ConfChangeType.REMOVE_NODE, did))
        elif role == MemberRole.LEARNER and did in voters:
            changes.append(ConfChange(ConfChangeType.ADD_LEARNER, did))
    changes.sort(key=lambda cc: cc.node_id == me)  # the leader itself last
    for cc in changes:
        if cc.node_id in voters and len(voters) == 1:
            continue  # never the last voter (the engine refuses such records anyway)
        return cc
    return None


__all__ = ["CATCH_UP_ENTRIES", "desired_roles", "next_conf_change"]
