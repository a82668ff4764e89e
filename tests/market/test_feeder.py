"""The feeder-meter check: FeederReading in the engine, the check at settlement, snapshots."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from market import (
    CloseGate,
    FeederCheck,
    FeederReading,
    FeederReadingAccepted,
    FeederStatus,
    MarketConfig,
    RejectReason,
    SettleSlot,
    SlotSettled,
    State,
    apply,
)
from market.bounds import MAX_COUNTER_WH, MAX_POWER_W
from market.encoding import canonical_bytes, sha256
from market.snapshot import SnapshotError, config_from_json, dump_state, load_state, state_digest
from node.setup.genesis import GenesisFormatError, create_genesis, parse_genesis
from node.tools import market_sim
from tests.market.world import GRID, World, signer

SERIAL = "FEEDER 0001"


class Meters:
    """Cumulative counters of the households' meters and the feeder, advanced per slot."""

    def __init__(self, w: World, names: list[str]) -> None:
        self.w = w
        self.counters = {n: [0, 0] for n in names}
        self.feeder_counters = [5_000_000, 1_000_000]

    def readings(self, slot: int, flows: dict[str, tuple[int, int]], skip: tuple[str, ...] = ()):
        out = []
        for name, (imp, exp) in flows.items():
            c = self.counters[name]
            c[0] += imp
            c[1] += exp
            if name not in skip:
                out.append(self.w.reading(name, slot, c[0], c[1]))
        return out

    def feeder(self, slot: int, imp: int, exp: int) -> FeederReading:
        self.feeder_counters[0] += imp
        self.feeder_counters[1] += exp
        return self.w.feeder(slot, *self.feeder_counters)


def settled(events: list) -> SlotSettled:
    (ev,) = [e for e in events if isinstance(e, SlotSettled)]
    return ev


@pytest.fixture
def grid() -> tuple[World, Meters]:
    """Two households (a consumer, a producer) in a grid with a feeder meter; slot 1 is every
    meter's baseline (settled already: its check has no baseline)."""
    w = World(feeder_serial=SERIAL)
    w.register("a")
    w.register("b")
    m = Meters(w, ["a", "b"])
    w.close(1)
    for r in m.readings(1, {"a": (0, 0), "b": (0, 0)}):
        w.ok(r)
    w.ok(m.feeder(1, 0, 0))
    check = settled(w.settle(1)).feeder
    assert check is not None and check.status is FeederStatus.NO_FEEDER_READING
    w.close(2)
    return w, m


def slot2(w: World, m: Meters, *, b_export: int, feeder_export: int, skip=()) -> FeederCheck:
    """Slot 2: a imports 1,000 Wh, b reports ``b_export``; the feeder exports
    ``feeder_export`` upstream."""
    for r in m.readings(2, {"a": (1000, 0), "b": (0, b_export)}, skip):
        w.ok(r)
    w.ok(m.feeder(2, 0, feeder_export))
    ev = settled(w.settle(2))
    assert ev.feeder is not None and ev.block.feeder == ev.feeder.hash
    return ev.feeder


# --- the check -----------------------------------------------------------------------------------


def test_honest_slot_with_line_losses_is_ok(grid) -> None:
    w, m = grid
    # households: net import 1000 - 3000 = -2000 Wh, moved 4000 Wh; the feeder loses 2 %
    check = slot2(w, m, b_export=3000, feeder_export=1920)
    assert check.status is FeederStatus.OK
    assert check.feeder_net_wh == -1920
    assert check.households_net_wh == -2000
    assert check.difference_wh == 80
    assert check.allowed_loss_wh == 100 + 50 * 4000 // 1000 == 300
    reading = w.state.feeder_baseline
    assert reading is not None and reading.slot == 2
    assert (check.meter_serial, check.import_wh, check.export_wh, check.nonce) == (
        SERIAL,
        reading.import_wh,
        reading.export_wh,
        2 * 4 + 2,
    )
    assert check.signature == reading.signature


def test_household_inflating_its_export_within_its_rated_power_is_a_mismatch(grid) -> None:
    w, m = grid
    # b really exported 3000 Wh (the feeder saw -1920 net), but its meter claims 5000 Wh: well
    # within its 50 kW connection (12,600 Wh per slot), so the reading itself is accepted.
    check = slot2(w, m, b_export=5000, feeder_export=1920)
    assert check.status is FeederStatus.MISMATCH
    assert check.households_net_wh == -4000
    assert check.difference_wh == 2080
    assert check.allowed_loss_wh == 100 + 50 * 6000 // 1000
    # the block still settles the slot with what the meters said: the check only records it
    assert w.state.height == 2


@pytest.mark.parametrize(
    ("feeder_export", "status"),
    [
        (2000 - 300, FeederStatus.OK),  # losses exactly the allowed 300 Wh
        (2000 - 301, FeederStatus.MISMATCH),  # one Wh more
        (2000 + 100, FeederStatus.OK),  # the feeder saw 100 Wh more export: the tolerance
        (2000 + 101, FeederStatus.MISMATCH),
        (2000, FeederStatus.OK),  # lossless
    ],
)
def test_the_loss_band_is_inclusive_on_both_sides(grid, feeder_export, status) -> None:
    w, m = grid
    assert slot2(w, m, b_export=3000, feeder_export=feeder_export).status is status


def test_an_unmeasured_household_makes_the_check_incomplete(grid) -> None:
    w, m = grid
    check = slot2(w, m, b_export=3000, feeder_export=1920, skip=("b",))
    assert check.status is FeederStatus.HOUSEHOLDS_UNMEASURED
    assert check.import_wh is not None  # the feeder reading is recorded...
    assert check.feeder_net_wh is None and check.allowed_loss_wh is None  # ...no numbers


def test_a_missing_feeder_reading_is_recorded_and_the_next_slot_rebaselines(grid) -> None:
    w, m = grid
    for r in m.readings(2, {"a": (1000, 0), "b": (0, 3000)}):
        w.ok(r)
    m.feeder_counters[1] += 1920  # the feeder metered, but its reading never arrived
    check = settled(w.settle(2)).feeder
    assert check == FeederCheck(2, FeederStatus.NO_FEEDER_READING)
    assert w.state.feeder_baseline is not None and w.state.feeder_baseline.slot == 1
    # slot 3: a reading, but the baseline is of slot 1, not 2: still no comparison
    w.close(3)
    for r in m.readings(3, {"a": (500, 0), "b": (0, 0)}):
        w.ok(r)
    w.ok(m.feeder(3, 510, 0))
    assert settled(w.settle(3)).feeder.status is FeederStatus.NO_FEEDER_READING
    # slot 4 differences against slot 3's reading
    w.close(4)
    for r in m.readings(4, {"a": (500, 0), "b": (0, 0)}):
        w.ok(r)
    w.ok(m.feeder(4, 510, 0))
    check = settled(w.settle(4)).feeder
    assert (check.status, check.feeder_net_wh, check.difference_wh) == (FeederStatus.OK, 510, 10)


def test_grid_without_feeder_records_no_check_and_hashes_blocks_as_before() -> None:
    # Head and full-state digest of this run, computed with the code before the feeder check
    # existed (commit e1e3648): a grid without a feeder keeps every hash (under the rules of
    # that time, rules 1: a genesis without the ``rules`` field).
    state = market_sim.run(households=4, slots=12, seed=3, rules=1)
    assert state.height == 12
    assert state.head_hash == "c000df4fb6e910627201dcd3218b087d4018a4a93284a4c9ba273f03797a0aa5"
    assert state.config.genesis_hash() == (
        "43b0a1257ea52b3fa870cfd2e7b9fa55ad79756c53549dfbcf527e41f6f27c3e"
    )
    assert state_digest(state) == (
        "cbc8f83179b42399c45e2ad4edc9482d279272daa6ac6e47de8f528e3fb7548e"
    )
    w = World()
    w.register("a")
    w.close(1)
    w.ok(w.reading("a", 1, 0, 0))
    ev = settled(w.settle(1))
    assert ev.feeder is None and ev.block.feeder is None
    assert "feeder" not in ev.block.to_json()
    assert "feeder_serial" not in w.config.to_json()


def test_feeder_hash_covers_every_field_of_the_check() -> None:
    check = FeederCheck(7, FeederStatus.OK, SERIAL, 10, 20, 30, "ab", -5, -7, 2, 100)
    assert check.hash == sha256(canonical_bytes("feeder_check", check.to_json())).hex()
    assert set(check.to_json()) == {
        "status", "meter_serial", "import_wh", "export_wh", "nonce", "signature",
        "feeder_net_wh", "households_net_wh", "difference_wh", "allowed_loss_wh",
    }  # fmt: skip
    hashes = {check.hash}
    for i, name in enumerate(check.to_json()):
        changed = dict(check.to_json(), **{name: None if i else "mismatch"})
        changed["status"] = FeederStatus(changed["status"])
        hashes.add(FeederCheck(7, **changed).hash)
    assert len(hashes) == 11


# --- rejections --------------------------------------------------------------------------------


def test_every_feeder_reading_rejection(grid) -> None:
    w, m = grid
    base = m.feeder_counters
    other = signer("not-the-operator")

    def reason(reading: FeederReading) -> RejectReason:
        return w.rejected(reading).reason

    wrong_grid = w.feeder(2, *base).model_copy(update={"grid": "other-grid"})
    assert reason(wrong_grid.signed_by(w.operator)) is RejectReason.WRONG_GRID
    assert reason(w.feeder(2, *base, signer=other)) is RejectReason.NOT_OPERATOR
    forged = w.feeder(2, *base).model_copy(
        update={"signature": w.feeder(2, *base, signer=other).signature}
    )
    assert reason(forged) is RejectReason.BAD_SIGNATURE
    assert reason(w.feeder(2, *base, serial="FEEDER 0002")) is RejectReason.UNKNOWN_METER
    assert reason(w.feeder(3, *base)) is RejectReason.SLOT_NOT_CLOSED
    assert reason(w.feeder(1, *base, nonce=99)) is RejectReason.SLOT_SETTLED
    assert reason(w.feeder(2, base[0] - 1, base[1])) is RejectReason.COUNTER_REGRESSION
    # 1 MW over 900 s is 250,000 Wh, plus 100 Wh of slack
    assert reason(w.feeder(2, base[0] + 250_101, base[1])) is RejectReason.IMPLAUSIBLE_READING
    w.ok(w.feeder(2, base[0] + 250_100, base[1]))
    # the same reading again: its nonce is spent; another one for the slot: a duplicate
    assert reason(w.feeder(2, base[0] + 250_100, base[1])) is RejectReason.REPLAYED_NONCE
    assert reason(w.feeder(2, *base, nonce=11)) is RejectReason.DUPLICATE_READING


def test_feeder_reading_rejected_before_any_gate_and_in_a_grid_without_feeder() -> None:
    w = World(feeder_serial=SERIAL)
    assert w.rejected(w.feeder(0, 0, 0)).reason is RejectReason.SLOT_NOT_CLOSED
    plain = World()
    plain.register("a")
    plain.close(1)
    assert plain.rejected(plain.feeder(1, 0, 0)).reason is RejectReason.UNKNOWN_METER


def test_a_later_pending_reading_bounds_an_earlier_one(grid) -> None:
    """Feeder readings may arrive out of order: each is checked against all known ones."""
    w, m = grid
    w.close(3)
    base = m.feeder_counters
    w.ok(w.feeder(3, base[0] + 1000, base[1]))
    assert w.rejected(w.feeder(2, base[0] + 1001, base[1])).reason is (
        RejectReason.COUNTER_REGRESSION
    )
    events = w.ok(w.feeder(2, base[0] + 400, base[1]))
    assert events == [FeederReadingAccepted(w.state.pending_feeder[2])]


# --- determinism and snapshots ----------------------------------------------------------------


def feeder_log(w: World, m: Meters, slots: range) -> list:
    """Commands of several slots, feeder readings arriving a slot late (two pending at once)."""
    commands: list = []
    for slot in slots:
        commands.append(w.order("a", "buy", 800, 20, slot=slot))
        commands.append(w.order("b", "sell", 900, 10, slot=slot))
    for slot in slots:
        commands.append(CloseGate(slot=slot))
        commands += m.readings(slot, {"a": (800 + slot, 0), "b": (0, 1500 - slot)})
        commands.append(m.feeder(slot, 0, 1500 - slot - 800 - slot - 30))
        if slot > slots[0]:
            commands.append(SettleSlot(slot=slot - 1))
    commands.append(SettleSlot(slot=slots[-1]))
    return commands


def _is_block(event: object) -> bool:
    return isinstance(event, SlotSettled)


def test_two_replicas_write_byte_identical_blocks(grid) -> None:
    w, m = grid
    w.ok(SettleSlot(slot=2))  # no feeder reading for slot 2
    commands = feeder_log(w, m, range(3, 9))
    a, b = w.state.copy(), load_state(dump_state(w.state))
    blocks_a, blocks_b, statuses = [], [], []
    for i, command in enumerate(commands):
        a, ev_a = apply(a, command)
        b, ev_b = apply(b, command)
        if i % 3 == 0:  # rebuild b's dicts in another order
            b.pending_feeder = dict(reversed(list(b.pending_feeder.items())))
        blocks_a += [canonical_bytes("block", e.block.to_json()) for e in ev_a if _is_block(e)]
        blocks_b += [canonical_bytes("block", e.block.to_json()) for e in ev_b if _is_block(e)]
        statuses += [e.feeder.status for e in ev_a if _is_block(e)]
    assert len(blocks_a) == 6 and blocks_a == blocks_b
    assert all(json.loads(blk.split(b"\n", 1)[1])["feeder"] for blk in blocks_a)
    assert state_digest(a) == state_digest(b)
    # slot 3 has no baseline of slot 2 (slot 2 had no feeder reading); slots 4..8 compare
    assert statuses == [FeederStatus.NO_FEEDER_READING] + [FeederStatus.OK] * 5
    assert a.feeder_baseline is not None and a.feeder_baseline.slot == 8


def test_snapshot_round_trip_mid_slot_continues_identically(grid) -> None:
    w, m = grid
    for r in m.readings(2, {"a": (1000, 0), "b": (0, 3000)}):
        w.ok(r)
    w.ok(m.feeder(2, 0, 1920))
    w.close(3)
    w.ok(m.feeder(3, 0, 10))
    data = dump_state(w.state)
    body = json.loads(data.split(b"\n", 1)[1])
    assert set(body["pending_feeder"]) == {"2", "3"}
    assert body["feeder_baseline"]["slot"] == 1
    loaded = load_state(data)
    assert dump_state(loaded) == data
    assert loaded.pending_feeder == w.state.pending_feeder
    assert loaded.feeder_baseline == w.state.feeder_baseline
    _, ev_a = apply(w.state, SettleSlot(slot=2))
    _, ev_b = apply(loaded, SettleSlot(slot=2))
    assert settled(ev_a).block == settled(ev_b).block
    assert settled(ev_b).feeder.status is FeederStatus.OK
    assert dump_state(w.state) == dump_state(loaded)


def _body(state: State) -> dict:
    return json.loads(dump_state(state).split(b"\n", 1)[1])


def _snapshot(body: dict) -> bytes:
    return canonical_bytes("snapshot", body)


def test_snapshot_feeder_fields_are_checked(grid) -> None:
    w, m = grid
    w.ok(m.feeder(2, 0, 100))
    body = _body(w.state)
    for change, match in [
        (lambda b: b.pop("pending_feeder"), "missing"),
        (lambda b: b.pop("feeder_baseline"), "missing"),
        (lambda b: b["pending_feeder"]["2"].update(meter_serial="X"), "feeder meter"),
        (lambda b: b["pending_feeder"]["2"].update(slot=3), "operator's of this slot"),
        (lambda b: b["pending_feeder"].update({"3": b["pending_feeder"].pop("2")}), "slot"),
        (lambda b: b["feeder_baseline"].update(import_wh=-1), "feeder_baseline.import_wh"),
        (lambda b: b["feeder_baseline"].update(operator=signer("x").did), "operator"),
        (lambda b: b.update(feeder_baseline=[]), "feeder_baseline"),
    ]:
        doc = json.loads(json.dumps(body))
        change(doc)
        with pytest.raises(SnapshotError, match=match):
            load_state(_snapshot(doc))
    doc = json.loads(json.dumps(body))
    doc["feeder_baseline"] = None
    doc["pending_feeder"] = {}
    loaded = load_state(_snapshot(doc))
    assert loaded.feeder_baseline is None and loaded.pending_feeder == {}


def test_snapshot_of_a_grid_without_feeder_has_no_feeder_fields() -> None:
    w = World()
    w.register("a")
    body = _body(w.state)
    assert "pending_feeder" not in body and "feeder_baseline" not in body
    body["pending_feeder"] = {}
    with pytest.raises(SnapshotError, match="unexpected"):
        load_state(_snapshot(body))


# --- the rules -------------------------------------------------------------------------------


def config(**fields) -> MarketConfig:
    return MarketConfig(
        grid=GRID, operator=signer("operator").did, feed_in_tariff=8, retail_price=32, **fields
    )


def test_feeder_rules_are_bounded() -> None:
    config(feeder_serial=SERIAL, feeder_max_power_w=MAX_POWER_W, feeder_loss_permille=1000,
           feeder_tolerance_wh=MAX_COUNTER_WH)  # fmt: skip
    config(feeder_max_power_w=0, feeder_loss_permille=0, feeder_tolerance_wh=0)
    for fields in (
        {"feeder_serial": " FEEDER"},
        {"feeder_serial": "F" * 129},
        {"feeder_serial": 7},
        {"feeder_max_power_w": MAX_POWER_W + 1},
        {"feeder_max_power_w": -1},
        {"feeder_loss_permille": 1001},
        {"feeder_loss_permille": True},
        {"feeder_tolerance_wh": MAX_COUNTER_WH + 1},
        {"feeder_tolerance_wh": 1.0},
    ):
        with pytest.raises(ValueError, match="feeder_"):
            config(**fields)


def test_feeder_rules_are_in_the_json_only_with_a_feeder() -> None:
    plain = config(feeder_loss_permille=10)
    assert not any(k.startswith("feeder") for k in plain.to_json())
    assert plain.genesis_hash() == config().genesis_hash()
    with_feeder = config(feeder_serial=SERIAL, feeder_tolerance_wh=7)
    doc = with_feeder.to_json()
    assert doc["feeder_serial"] == SERIAL and doc["feeder_max_power_w"] == 1_000_000
    assert (doc["feeder_loss_permille"], doc["feeder_tolerance_wh"]) == (50, 7)
    assert config_from_json(doc) == with_feeder
    assert with_feeder.genesis_hash() != config().genesis_hash()
    partial = dict(doc)
    del partial["feeder_tolerance_wh"]
    with pytest.raises(SnapshotError, match="feeder"):
        config_from_json(partial)
    with pytest.raises(SnapshotError, match="feeder"):
        config_from_json({**doc, "feeder_serial": ""})


def test_genesis_carries_the_feeder_rules() -> None:
    op = signer("operator")
    assert op.did == config().operator
    market = config(k=Fraction(1, 2), feeder_serial=SERIAL, feeder_loss_permille=30)
    genesis = create_genesis(op, market, [(signer("a").did, "M-a", "voter")])
    parsed = parse_genesis(genesis.to_json_bytes())
    assert parsed.market == market
    doc = json.loads(genesis.to_json_bytes())
    assert doc["market"]["feeder_loss_permille"] == 30
    for change, match in [
        (lambda d: d["market"].pop("feeder_tolerance_wh"), "feeder"),
        (lambda d: d["market"].update(feeder_serial=5), "feeder_serial"),
        (lambda d: d["market"].update(feeder_serial=""), "feeder_serial"),
        (lambda d: d["market"].update(feeder_loss_permille="5"), "feeder_loss_permille"),
        (lambda d: d["market"].update(feeder_max_power_w=MAX_POWER_W + 1), "feeder_max_power_w"),
    ]:
        bad = json.loads(genesis.to_json_bytes())
        change(bad)
        with pytest.raises(GenesisFormatError, match=match):
            parse_genesis(json.dumps(bad).encode())
    plain = create_genesis(op, config(), [(signer("a").did, "M-a", "voter")])
    assert "feeder_serial" not in json.loads(plain.to_json_bytes())["market"]
