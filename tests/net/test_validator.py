"""Unit tests of the gossip wire format and validator (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from market.models import CloseGate, FeederReading, MeterReading, Order, Side
from market.signing import Signer
from node.net.host import default_slot_policy
from node.net.validator import GossipValidator, PenaltyBox, TokenBucket
from node.net.wire import (
    MAX_GOSSIP_BYTES,
    TopicKind,
    WireError,
    decode_batch,
    encode_batch,
    encode_uvarint,
    read_uvarint,
    topic_name,
)
from node.setup.genesis import load_genesis
from node.setup.keyfile import NodeIdentity
from node.testing.harness import make_grid

A = NodeIdentity.from_seed(b"a" * 32)
B = NodeIdentity.from_seed(b"b" * 32)
OUT = Signer.from_seed(b"z" * 32)
MEMBERS = {str(A.peer_id): A.did, str(B.peer_id): B.did}


def order(
    nonce: int, signer: Signer = A.signer, household: str | None = None, **kw: object
) -> Order:
    fields = dict(grid="g", nonce=nonce, id=f"o{nonce}", household=household or signer.did,
                  side=Side.BUY, slot=5, quantity_wh=100, price=10)  # fmt: skip
    fields.update(kw)
    return Order(**fields).signed_by(signer)  # type: ignore[arg-type]


def validator(**kw: object) -> GossipValidator:
    return GossipValidator("g", MEMBERS, clock=lambda: 0.0, **kw)  # type: ignore[arg-type]


def test_batch_round_trip_and_strictness() -> None:
    records = [order(1), order(2)]
    data = encode_batch(records, batch_seq=7)
    assert decode_batch(data, TopicKind.ORDERS) == records
    assert topic_name("g", TopicKind.READINGS) == "/microgrid/g/readings/1"
    with pytest.raises(WireError) as exc:
        decode_batch(data + b"\x00", TopicKind.ORDERS)
    assert exc.value.reason == "malformed"
    with pytest.raises(WireError) as exc:
        decode_batch(data, TopicKind.READINGS)
    assert exc.value.reason == "wrong_topic"
    with pytest.raises(WireError) as exc:
        decode_batch(b"\x01" + b"\x00" * (MAX_GOSSIP_BYTES + 1), TopicKind.ORDERS)
    assert exc.value.reason == "oversized"
    with pytest.raises(WireError, match="non-minimal"):
        read_uvarint(b"\x80\x00", 0)
    assert read_uvarint(encode_uvarint(300), 0) == (300, 2)
    # a system command is not gossip
    with pytest.raises(WireError) as exc:
        raw = b'{"slot":1,"type":"close_gate"}'
        assert raw == __import__("market.models").models.encode_command(CloseGate(slot=1))
        decode_batch(b"\x01\x00\x01" + encode_uvarint(len(raw)) + raw, TopicKind.ORDERS)
    assert exc.value.reason == "wrong_topic"
    # non-canonical record bytes (extra whitespace) are refused
    raw = __import__("market.models").models.encode_command(order(3)).replace(b",", b", ", 1)
    with pytest.raises(WireError, match="canonical"):
        decode_batch(b"\x01\x00\x01" + encode_uvarint(len(raw)) + raw, TopicKind.ORDERS)


def test_validator_accepts_then_rejects_each_reason() -> None:
    v = validator()
    a, b = str(A.peer_id), str(B.peer_id)
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(1), order(2)])).ok
    cases = {
        "non_member_peer": (str(NodeIdentity.from_seed(b"q" * 32).peer_id), a,
                            encode_batch([order(3)])),
        "malformed": (a, b, b"\x01garbage"),
        "oversized": (a, b, b"\x01" + b"x" * MAX_GOSSIP_BYTES),
        "wrong_grid": (a, b, encode_batch([order(4, grid="h")])),
        "not_member": (a, b, encode_batch([order(5, signer=OUT)])),
        "author_mismatch": (b, a, encode_batch([order(6)])),
        "bad_signature": (a, b, encode_batch([order(7, signer=OUT, household=A.did)])),
        "replayed": (a, b, encode_batch([order(1)])),
    }  # fmt: skip
    for reason, (origin, forwarder, data) in cases.items():
        verdict = v.validate(TopicKind.ORDERS, origin, forwarder, data)
        assert not verdict.ok and verdict.reason == reason, (reason, verdict)
    assert dict(v.rejected) == {r: 1 for r in cases}
    assert v.accepted == 1
    # duplicate nonce inside one batch; a rejected batch consumes no nonce
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(8), order(8)])).reason == (
        "replayed"
    )
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(8)])).ok


def test_slot_policy_and_readings() -> None:
    v = validator(slot_policy=lambda r: "slot_closed" if r.slot < 10 else None)
    a = str(A.peer_id)
    assert v.validate(TopicKind.ORDERS, a, a, encode_batch([order(1)])).reason == "slot_closed"
    assert v.validate(TopicKind.ORDERS, a, a, encode_batch([order(1, slot=11)])).ok
    reading = MeterReading(grid="g", nonce=2, household=A.did, meter_serial="m", slot=12,
                           import_wh=1, export_wh=0).signed_by(A.signer)  # fmt: skip
    assert v.validate(TopicKind.READINGS, a, a, encode_batch([reading])).ok


def test_rate_limit_and_ban() -> None:
    now = [0.0]
    box = PenaltyBox(threshold=10, ban_seconds=5, clock=lambda: now[0])
    banned: list[str] = []
    v = GossipValidator("g", MEMBERS, rate_per_origin=1, burst_per_origin=2, penalties=box,
                        clock=lambda: now[0], on_ban=banned.append)  # fmt: skip
    a, b = str(A.peer_id), str(B.peer_id)
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(1)])).ok
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(2)])).ok
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(3)])).reason == "rate_limited"
    now[0] = 1.0
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(3)])).ok
    for _ in range(2):
        v.validate(TopicKind.READINGS, b, b, b"junk")  # malformed: 5 points each
    assert banned == [b] and box.is_banned(b)
    now[0] = 7.0
    assert box.is_banned(b)  # until the host collects it and lifts its blacklist
    assert box.expired() == [b] and box.expired() == []
    assert not box.is_banned(b)


def test_token_bucket_refills() -> None:
    bucket = TokenBucket(rate=2, burst=2)
    assert bucket.take(0) and bucket.take(0) and not bucket.take(0)
    assert bucket.take(0.5) and not bucket.take(0.5)


def test_default_slot_policy_bounds_orders_by_gate_and_horizon_and_readings_by_slot_end(
    tmp_path: Path,
) -> None:
    """Orders are gossiped from their gate's opening horizon until the gate closes; readings
    only once their slot has ended."""
    _, _, path = make_grid(tmp_path, 2, slot_seconds=900)
    genesis = load_genesis(path)
    schedule, horizon = genesis.schedule, genesis.market.slot_horizon
    now = [float(schedule.start(1000))]
    policy = default_slot_policy(genesis, clock=lambda: now[0])
    last_closed = schedule.last_due_gate(now[0])
    assert policy(order(1, slot=last_closed + 1)) is None
    assert policy(order(1, slot=last_closed)) == "slot_closed"
    assert policy(order(1, slot=last_closed + horizon)) is None
    assert policy(order(1, slot=last_closed + horizon + 1)) == "slot_too_far"
    reading = MeterReading(grid="g", nonce=1, household=A.did, meter_serial="m", slot=1000,
                           import_wh=0, export_wh=0).signed_by(A.signer)  # fmt: skip
    assert policy(reading) == "slot_not_open"
    now[0] = float(schedule.end(1000))
    assert policy(reading) is None


def test_culprits_author_for_signed_content_forwarder_for_checkable_bytes() -> None:
    """Equivocation and replays are the author's (if it provably sent the message now);
    malformed bytes and bad signatures are the forwarder's; we never penalise ourselves."""
    v = validator(local_peer="me")
    a, b = str(A.peer_id), str(B.peer_id)
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(1)]), seqno=10).ok
    # same nonce, different content, relayed by honest b: the author a is penalised
    eq = v.validate(TopicKind.ORDERS, a, b, encode_batch([order(1, price=11)]), seqno=11)
    assert eq.reason == "equivocation" and eq.culprit == a
    # same nonce inside one batch with different content: equivocation too
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(2), order(2, price=12)]),
                      seqno=12).reason == "equivocation"  # fmt: skip
    # a replay in a message newer than any seen from a: the author
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(1)], 5), seqno=13).culprit == a
    # an old message of a (seqno not above the newest) relayed by b: nobody is penalised
    old = v.validate(TopicKind.ORDERS, a, b, encode_batch([order(1)], 6), seqno=3)
    assert old.reason == "replayed" and old.culprit == "" and v.unattributed["replayed"] == 1
    # ...unless it came straight from the author
    assert v.validate(TopicKind.ORDERS, a, a, encode_batch([order(1)], 7), seqno=3).culprit == a
    # checkable bytes: the forwarder
    assert v.validate(TopicKind.ORDERS, a, b, b"\x01junk", seqno=20).culprit == b
    bad = encode_batch([order(9, signer=OUT, household=A.did)])
    assert v.validate(TopicKind.ORDERS, a, b, bad, seqno=21).culprit == b
    assert not any(c == b for c, r in v.penalised if r in ("equivocation", "replayed"))
    # our own publications are never penalised
    local = validator(local_peer=a)
    assert local.validate(TopicKind.ORDERS, a, a, b"\x01junk").culprit == ""
    assert local.penalties.score(a) == 0


def test_rate_limit_is_checked_after_the_records_so_replays_cannot_drain_it() -> None:
    now = [0.0]
    v = GossipValidator("g", MEMBERS, rate_per_origin=1, burst_per_origin=1,
                        clock=lambda: now[0])  # fmt: skip
    a, b = str(A.peer_id), str(B.peer_id)
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(1)]), seqno=1).ok
    now[0] = 1.0
    for i in range(5):  # old messages re-sent by b: replayed, the bucket untouched
        assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(1)], i + 1),
                          seqno=1).reason == "replayed"  # fmt: skip
    assert v.validate(TopicKind.ORDERS, a, b, encode_batch([order(2)]), seqno=2).ok
    over = v.validate(TopicKind.ORDERS, a, b, encode_batch([order(3)]), seqno=3)
    assert over.reason == "rate_limited" and over.culprit == a


OPERATOR = Signer.from_seed(b"o" * 32)


def feeder(nonce: int = 4 * 12 + 2, signer: Signer = OPERATOR, operator: str | None = None,
           **kw: object) -> FeederReading:  # fmt: skip
    fields = dict(grid="g", nonce=nonce, operator=operator or signer.did, meter_serial="F1",
                  slot=(nonce - 2) // 4, import_wh=1_000, export_wh=10)  # fmt: skip
    fields.update(kw)
    return FeederReading(**fields).signed_by(signer)  # type: ignore[arg-type]


def test_feeder_readings_ride_the_readings_topic_only() -> None:
    data = encode_batch([feeder()])
    assert decode_batch(data, TopicKind.READINGS) == [feeder()]
    with pytest.raises(WireError) as exc:
        decode_batch(data, TopicKind.ORDERS)
    assert exc.value.reason == "wrong_topic"


def test_feeder_reading_by_the_operator_is_accepted_from_any_member_origin() -> None:
    """The operator is not a member peer: its signature proves authorship, so the author==origin
    rule does not apply; its nonces have a window of their own."""
    v = validator(operator=OPERATOR.did)
    a, b = str(A.peer_id), str(B.peer_id)
    first = v.validate(TopicKind.READINGS, a, a, encode_batch([feeder(50)]))
    assert first.ok and first.records == (feeder(50),)
    # published by another member and relayed: fine too
    assert v.validate(TopicKind.READINGS, b, a, encode_batch([feeder(54)])).ok
    # a household reading and a feeder reading in one batch from a: each by its own rule
    reading = MeterReading(grid="g", nonce=49, household=A.did, meter_serial="m", slot=12,
                           import_wh=1, export_wh=0).signed_by(A.signer)  # fmt: skip
    assert v.validate(TopicKind.READINGS, a, b, encode_batch([reading, feeder(58)])).ok
    # the operator's window is per operator: the same nonce again is a replay, whoever sends it
    again = v.validate(TopicKind.READINGS, b, b, encode_batch([feeder(54)]))
    assert again.reason == "replayed" and again.culprit == b
    # ... and a household nonce equal to an operator nonce is unaffected
    mine = MeterReading(grid="g", nonce=50, household=A.did, meter_serial="m", slot=12,
                        import_wh=1, export_wh=0).signed_by(A.signer)  # fmt: skip
    assert v.validate(TopicKind.READINGS, a, a, encode_batch([mine])).ok
    assert set(v.nonces) == {A.did, OPERATOR.did}
    # the operator signing different counters under a used nonce: equivocation
    eq = v.validate(TopicKind.READINGS, a, b, encode_batch([feeder(58, import_wh=2_000)]))
    assert eq.reason == "equivocation"
    # far below the operator's window: replayed
    v2 = validator(operator=OPERATOR.did, nonce_window=8)
    assert v2.validate(TopicKind.READINGS, a, a, encode_batch([feeder(102)])).ok
    assert v2.validate(TopicKind.READINGS, a, a, encode_batch([feeder(50)])).reason == "replayed"


def test_feeder_reading_rejections() -> None:
    v = validator(operator=OPERATOR.did)
    a, b = str(A.peer_id), str(B.peer_id)
    cases = {
        # signed by a member household that claims to be the operator in the record
        "not_operator": encode_batch([feeder(signer=A.signer)]),
        # signed by an outsider in its own name
        "bad_signature": encode_batch([feeder(signer=OUT, operator=OPERATOR.did)]),
        "wrong_grid": encode_batch([feeder(grid="h")]),
    }
    for reason, data in cases.items():
        verdict = v.validate(TopicKind.READINGS, a, b, data)
        assert not verdict.ok and verdict.reason == reason, (reason, verdict)
        assert verdict.culprit == b  # deterministic checks: the forwarder's
    # a feeder reading not signed by the operator is refused even from an otherwise valid
    # origin, and a non-member origin is still refused first
    outsider = str(NodeIdentity.from_seed(b"q" * 32).peer_id)
    assert v.validate(TopicKind.READINGS, outsider, a,
                      encode_batch([feeder()])).reason == "non_member_peer"  # fmt: skip
    # a validator that knows no operator refuses every feeder reading
    assert validator().validate(TopicKind.READINGS, a, a,
                                encode_batch([feeder()])).reason == "not_operator"  # fmt: skip
    # nothing above consumed a nonce: the genuine record is still accepted
    assert v.validate(TopicKind.READINGS, a, a, encode_batch([feeder()])).ok


def test_default_slot_policy_refuses_feeder_readings_before_their_slot_ends(
    tmp_path: Path,
) -> None:
    _, _, path = make_grid(tmp_path, 2, slot_seconds=900)
    genesis = load_genesis(path)
    now = [float(genesis.schedule.start(1000))]
    policy = default_slot_policy(genesis, clock=lambda: now[0])
    record = feeder(1000 * 4 + 2)
    assert policy(record) == "slot_not_open"
    now[0] = float(genesis.schedule.end(1000))
    assert policy(record) is None


def test_signatures_are_remembered_within_the_nonce_window_only() -> None:
    """The equivocation check keeps an author's signatures for the nonces inside its window
    (older ones are refused as replays anyway): memory stays bounded however long the grid
    runs, and equivocation inside the window is still caught."""
    v = validator(nonce_window=16, rate_per_origin=1e9, burst_per_origin=1e9)
    a = str(A.peer_id)
    for i, nonce in enumerate(range(0, 400, 2)):  # two nonces in four per slot, as households
        assert v.validate(TopicKind.ORDERS, a, a, encode_batch([order(nonce)]), seqno=i + 1).ok
    remembered = v.signatures[A.did]
    assert set(remembered) == {n for n in range(0, 400, 2) if n > 398 - 16}
    eq = v.validate(TopicKind.ORDERS, a, a, encode_batch([order(390, price=11)]), seqno=999)
    assert eq.reason == "equivocation"
    old = v.validate(TopicKind.ORDERS, a, a, encode_batch([order(300, price=11)]), seqno=1000)
    assert old.reason == "replayed"
