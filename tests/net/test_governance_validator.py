"""Governance records on gossip and a member list that changes at runtime: the wire format and
the validator alone (no network; tests/net/test_membership_gate.py runs real hosts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from market.models import (
    GOVERNANCE_RECORDS,
    AddMember,
    ChangeRules,
    MemberRole,
    Order,
    RemoveMember,
    RotateKey,
    Side,
)
from market.signing import Signer
from node.net.host import NetNode, default_slot_policy
from node.net.validator import GossipValidator
from node.net.wire import TOPIC_RECORDS, TopicKind, WireError, decode_batch, encode_batch
from node.setup.genesis import load_genesis
from node.setup.keyfile import NodeIdentity
from node.testing.harness import make_grid

A = NodeIdentity.from_seed(b"a" * 32)
B = NodeIdentity.from_seed(b"b" * 32)
C = NodeIdentity.from_seed(b"c" * 32)
OPERATOR = Signer.from_seed(b"o" * 32)
NEWCOMER = NodeIdentity.from_seed(b"n" * 32)


def members(*idents: NodeIdentity) -> dict[str, str]:
    """The validator's member map of ``idents``."""
    return {str(i.peer_id): i.did for i in idents}


def add_member(nonce: int, signer: Signer = OPERATOR, operator: str | None = None,
               **kw: object) -> AddMember:  # fmt: skip
    fields = dict(grid="g", nonce=nonce, operator=operator or signer.did, from_slot=7,
                  household=NEWCOMER.did, meter_serial="M9", role=MemberRole.LEARNER)  # fmt: skip
    fields.update(kw)
    return AddMember(**fields).signed_by(signer)  # type: ignore[arg-type]


def order(nonce: int, ident: NodeIdentity = A) -> Order:
    return Order(grid="g", nonce=nonce, id=f"o{nonce}", household=ident.did, side=Side.BUY,
                 slot=5, quantity_wh=100, price=10).signed_by(ident.signer)  # fmt: skip


class Clock:
    """A settable clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def validator(clock: Clock | None = None, **kw: object) -> GossipValidator:
    return GossipValidator("g", members(A, B, C), operator=OPERATOR.did,  # type: ignore[arg-type]
                           clock=clock or Clock(), **kw)  # fmt: skip


def test_governance_records_have_a_topic_of_their_own() -> None:
    assert TOPIC_RECORDS[TopicKind.GOVERNANCE] == GOVERNANCE_RECORDS
    # every record kind belongs to exactly one topic
    kinds = [k for records in TOPIC_RECORDS.values() for k in records]
    assert len(kinds) == len(set(kinds))
    data = encode_batch([add_member(1)])
    assert decode_batch(data, TopicKind.GOVERNANCE) == [add_member(1)]
    for other in (TopicKind.ORDERS, TopicKind.READINGS):
        with pytest.raises(WireError) as exc:
            decode_batch(data, other)
        assert exc.value.reason == "wrong_topic"
    with pytest.raises(WireError) as exc:
        decode_batch(encode_batch([order(1)]), TopicKind.GOVERNANCE)
    assert exc.value.reason == "wrong_topic"


def test_operator_governance_is_accepted_from_any_member_origin_and_checked() -> None:
    v = validator()
    a, b = str(A.peer_id), str(B.peer_id)
    rules = ChangeRules(grid="g", nonce=2, operator=OPERATOR.did, from_slot=9,
                        retail_price=31).signed_by(OPERATOR)  # fmt: skip
    removal = RemoveMember(grid="g", nonce=3, operator=OPERATOR.did, from_slot=9,
                           household=C.did).signed_by(OPERATOR)  # fmt: skip
    first = v.validate(TopicKind.GOVERNANCE, a, a, encode_batch([add_member(1), rules]))
    assert first.ok and first.records == (add_member(1), rules)
    assert v.validate(TopicKind.GOVERNANCE, b, a, encode_batch([removal])).ok  # relayed
    # the operator's nonces: a replay, and a different record under a used nonce
    assert v.validate(TopicKind.GOVERNANCE, b, b, encode_batch([add_member(1)])).reason == (
        "replayed"
    )
    eq = v.validate(TopicKind.GOVERNANCE, a, b, encode_batch([add_member(3, from_slot=8)]))
    assert eq.reason == "equivocation"
    # the old key's countersignature is the engine's to check; the operator's is ours
    unsigned = RotateKey(grid="g", nonce=13, operator=OPERATOR.did, from_slot=9, household=A.did,
                         new_household=NEWCOMER.did, signature="ab" * 64)  # fmt: skip
    cases = {
        # a member signs a governance record in its own name
        "not_operator": add_member(10, signer=A.signer),
        # the operator's name, a member's signature (forged)
        "bad_signature": add_member(11, signer=A.signer, operator=OPERATOR.did),
        "wrong_grid": add_member(12, grid="h"),
        "bad_signature ": unsigned,
    }
    for reason, record in cases.items():
        verdict = v.validate(TopicKind.GOVERNANCE, a, b, encode_batch([record]))
        assert verdict.reason == reason.strip() and verdict.culprit == b, (reason, verdict)
    # on the orders topic a genuine record is wrong_topic, penalising the forwarder
    wrong = v.validate(TopicKind.ORDERS, a, b, encode_batch([add_member(20)]))
    assert wrong.reason == "wrong_topic" and wrong.culprit == b
    # a non-member origin is refused first; a validator without an operator refuses them all
    assert v.validate(TopicKind.GOVERNANCE, str(NEWCOMER.peer_id), a,
                      encode_batch([add_member(21)])).reason == "non_member_peer"  # fmt: skip
    no_op = GossipValidator("g", members(A, B), clock=Clock())
    assert no_op.validate(TopicKind.GOVERNANCE, a, a,
                          encode_batch([add_member(22)])).reason == "not_operator"  # fmt: skip
    # nothing refused consumed a nonce
    assert v.validate(TopicKind.GOVERNANCE, a, a, encode_batch([add_member(20)])).ok


def test_set_members_admits_new_peers_and_refuses_departed_ones_with_a_grace() -> None:
    clock = Clock()
    v = validator(clock, member_grace=60.0)
    a, b, c, n = (str(i.peer_id) for i in (A, B, C, NEWCOMER))
    assert v.validate(TopicKind.ORDERS, c, c, encode_batch([order(1, C)])).ok
    # before its admission the newcomer is a non-member, and so are its records
    assert v.validate(TopicKind.ORDERS, n, n,
                      encode_batch([order(1, NEWCOMER)])).reason == "non_member_peer"  # fmt: skip
    assert v.validate(TopicKind.ORDERS, a, a,
                      encode_batch([order(1, NEWCOMER)])).reason == "not_member"  # fmt: skip
    v.set_members(members(A, B, NEWCOMER))
    assert v.validate(TopicKind.ORDERS, n, n, encode_batch([order(2, NEWCOMER)])).ok
    assert NEWCOMER.did in v.member_dids and C.did not in v.member_dids
    # C's gossip relayed by B, which has not applied the removal yet: refused, nobody's fault
    late = v.validate(TopicKind.ORDERS, c, b, encode_batch([order(2, C)]), seqno=5)
    assert late.reason == "non_member_peer" and late.culprit == ""
    assert v.unattributed["non_member_peer"] == 1 and not v.penalties.score(b)
    # C's record inside a member's batch: not_member, also within the grace
    stale = v.validate(TopicKind.ORDERS, a, b, encode_batch([order(3, C)]))
    assert stale.reason == "not_member" and stale.culprit == ""
    # a direct send from C (its connection not closed yet): refused, not penalised
    assert v.validate(TopicKind.ORDERS, c, c, encode_batch([order(4, C)])).culprit == ""
    # once the grace is over, relaying a non-member's gossip is the forwarder's fault again
    clock.now = 61.0
    after = v.validate(TopicKind.ORDERS, c, b, encode_batch([order(5, C)]), seqno=6)
    assert after.reason == "non_member_peer" and after.culprit == b
    # readmitted: C's nonce window was kept, so an old record of it is still a replay
    v.set_members(members(A, B, C))
    assert v.validate(TopicKind.ORDERS, c, c, encode_batch([order(1, C)])).reason == "replayed"
    assert v.validate(TopicKind.ORDERS, c, c, encode_batch([order(6, C)])).ok
    assert not v.departed.get(c)


def test_default_slot_policy_refuses_governance_after_its_from_slot_gate(tmp_path: Path) -> None:
    _, _, path = make_grid(tmp_path, 2, slot_seconds=900)
    genesis = load_genesis(path)
    now = [float(genesis.schedule.gate_time(100)) - 1]
    policy = default_slot_policy(genesis, clock=lambda: now[0])
    record = add_member(1, grid=genesis.grid, from_slot=100)
    assert policy(record) is None
    now[0] += 1
    assert policy(record) == "slot_closed"


def test_update_members_before_run_sets_the_list_budgets_and_labels(tmp_path: Path) -> None:
    specs, outsiders, path = make_grid(tmp_path, 3, outsiders=1)
    genesis = load_genesis(path)
    node = NetNode(NodeIdentity.from_seed(outsiders[0].seed), genesis)  # not in the genesis
    assert node.member_dids == frozenset(genesis.member_dids)
    assert not node.is_member(outsiders[0].did)
    h0 = str(NodeIdentity.from_seed(specs[0].seed).peer_id)
    msgs, _ = node._budgets(h0)
    assert msgs.burst == max(node.settings.peer_msgs_burst, 3 * node.settings.burst_per_origin)
    dids = [specs[0].did, outsiders[0].did, "did:key:not-a-key"]
    node.update_members(dids)  # the malformed DID is left out
    assert node.member_dids == frozenset(dids[:2]) and node.is_member(outsiders[0].did)
    assert not node.is_member(specs[1].did) and node.validator.member_dids == set(dids[:2])
    body = node.metrics.render().decode()
    assert "microgrid_net_members 2.0" in body
    assert node.metrics.peer_label(h0) == h0
    assert node.metrics.peer_label(str(NodeIdentity.from_seed(specs[1].seed).peer_id)) == "other"
    # the budgets follow the member count (never below the configured floor)
    node.settings.peer_msgs_burst = 10.0
    node.update_members([*dids[:2], specs[2].did])
    assert node._budgets(h0)[0].burst == 3 * node.settings.burst_per_origin
    node.update_members(genesis.member_dids)
    assert node.member_dids == frozenset(genesis.member_dids)
