"""The nemesis plan is pure data drawn from a seed (node/testing/nemesis.py).

Same seed, same plan; faults bounded in time; a step never impairs a majority of the voters
unless an outage was asked for; a wipe only ever hits a learner; ``cover`` uses every kind.
The newer kinds (partition, loss, disk_full, torn_page) keep these bounds, are opt-in (the
default plans are unchanged), and never cut a voter's Raft log. ``skew`` restarts one node (the
leader as often as not) with its clock 60-300 s off, either way, long enough to be seen skewed.
``jump`` steps a running node's clock as far; it is in the soak's mix (``extended``) and keeps
the voter bound there beside every other kind, while the CI runs' plans, drawn from their own
kinds, are unchanged.
"""

from __future__ import annotations

import json

import pytest

from node.testing.nemesis import (
    DEFAULT_KINDS,
    EXTENDED_KINDS,
    LEADER,
    NETWORK_KINDS,
    SKEW_MAX_S,
    SKEW_MIN_S,
    STORAGE_KINDS,
    TORN_FILES_LEARNER,
    TORN_FILES_VOTER,
    Kind,
    NemesisError,
    Plan,
    Step,
    Timing,
    impaired_voters,
    main,
    make_plan,
    sole_voter_jump_plan,
)

SHAPES = ((4, 3), (5, 3), (5, 5), (7, 5), (3, 1))


def plans(seed_count: int) -> list[Plan]:
    out = []
    for seed in range(seed_count):
        for nodes, voters in SHAPES:
            kinds = (
                DEFAULT_KINDS
                if nodes > voters
                else tuple(k for k in DEFAULT_KINDS if k is not Kind.WIPE)
            )
            out.append(make_plan(seed, 600, nodes=nodes, voters=voters, kinds=kinds,
                                 cover=seed % 2 == 0))  # fmt: skip
    return out


def test_same_seed_same_plan_and_seeds_differ() -> None:
    a = make_plan(7, 300)
    assert a == make_plan(7, 300)
    assert a.to_json() == make_plan(7, 300).to_json()
    assert len({make_plan(s, 300).to_json() for s in range(20)}) == 20
    # the JSON is the whole plan: it names every fault, target and duration
    doc = json.loads(a.to_json())
    assert doc["seed"] == 7 and len(doc["steps"]) == len(a.steps)
    assert doc["steps"][0]["faults"][0]["kind"] == a.steps[0].faults[0].kind.value


def test_faults_are_bounded(seed_count: int) -> None:
    timing = Timing()
    slot = timing.slot_seconds
    for plan in plans(seed_count):
        budget = sum(s.length_s + timing.recovery_allowance_s for s in plan.steps)
        assert plan.steps
        assert budget <= plan.duration_s or len(plan.steps) <= len(plan.kinds), plan.seed
        for step in plan.steps:
            assert 2.0 <= step.gap_s <= 1.5 * slot
            assert 1 <= len(step.faults) <= 2
            targets = [x for f in step.faults for x in f.targets]
            assert len(targets) == len(set(targets)), step  # distinct households
            for f in step.faults:
                assert f.kind in plan.kinds
                assert 1.0 <= f.duration_s <= 3 * slot, f
                if f.kind is Kind.PAUSE:
                    # longer than the longest election timeout: the others elect a new leader
                    assert f.duration_s > timing.election_timeout_max_s + 0.9
                if f.kind is Kind.KILL_WRITE:
                    assert 0.0 <= f.offset_s <= 1.0
                for x in f.targets:
                    assert x == LEADER or x in plan.voter_names + plan.learner_names


def test_never_a_majority_of_voters_at_once_unless_intended(seed_count: int) -> None:
    for plan in plans(seed_count):
        minority = (plan.voters - 1) // 2
        for step in plan.steps:
            assert impaired_voters(step, plan.voter_names) <= minority, (plan.seed, step)
            assert all(f.kind is not Kind.OUTAGE for f in step.faults)
    # an outage is only there when asked for, and then it is a majority, leader included
    outages = 0
    for seed in range(seed_count):
        plan = make_plan(seed, 600, nodes=5, voters=5, kinds=(Kind.OUTAGE, Kind.KILL))
        for step in plan.steps:
            for f in step.faults:
                if f.kind is Kind.OUTAGE:
                    outages += 1
                    assert len(step.faults) == 1
                    assert LEADER in f.targets and len(f.targets) == 3
    assert outages > 0


def test_wipe_only_hits_learners(seed_count: int) -> None:
    wipes = 0
    for plan in plans(seed_count):
        for step in plan.steps:
            for f in step.faults:
                if f.kind is Kind.WIPE:
                    wipes += 1
                    assert set(f.targets) <= set(plan.learner_names), f
    assert wipes > 0
    with pytest.raises(NemesisError, match="learner"):
        make_plan(1, 60, nodes=3, voters=3, kinds=(Kind.WIPE,))


def test_cover_uses_every_kind_even_in_a_short_run() -> None:
    for seed in range(30):
        plan = make_plan(seed, 1, cover=True)
        assert set(plan.counts()) == {k.value for k in DEFAULT_KINDS}, seed
        assert len(plan.steps) == len(DEFAULT_KINDS)
    assert len(make_plan(1, 1).steps) == 1


def test_impossible_plans_are_refused() -> None:
    with pytest.raises(NemesisError):
        make_plan(1, 60, nodes=2, voters=3)
    with pytest.raises(NemesisError):
        make_plan(1, 0)
    with pytest.raises(NemesisError, match="majority"):
        make_plan(1, 60, nodes=2, voters=2, kinds=(Kind.PAUSE,))  # no voter may be paused
    with pytest.raises(ValueError):
        make_plan(1, 60, kinds=("flood",))  # type: ignore[arg-type]


def test_the_cli_prints_the_plan_it_would_replay(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "5", "--duration", "90", "--cover", "--plan"]) == 0
    printed = capsys.readouterr().out.strip()
    plan = make_plan(5, 90, cover=True)
    assert printed == plan.to_json()
    assert plan.replay_command() == (
        "python -m node.testing.nemesis --seed 5 --duration 90 --nodes 4 --voters 3 "
        "--kinds kill,kill_write,pause,wipe,meter --cover"
    )
    assert main(["--kinds", "flood", "--plan"]) == 2
    assert main(["--seed", "5", "--kinds", "skew", "--plan"]) == 0
    assert json.loads(capsys.readouterr().out)["kinds"] == ["skew"]
    assert main(["--seed", "5", "--kinds", "extended", "--plan"]) == 0
    assert {"skew", "jump"} <= set(json.loads(capsys.readouterr().out)["kinds"])


def test_the_default_plans_do_not_change_with_the_newer_kinds() -> None:
    # the newer kinds are opt-in: a default plan draws as before and its JSON has no new keys
    plan = make_plan(2, 60, cover=True)
    assert plan.counts() == {"kill": 1, "kill_write": 1, "pause": 1, "wipe": 1, "meter": 1}
    assert not plan.needs_netlab and plan.disk_targets == ()
    assert all(set(f) == {"kind", "targets", "duration_s", "offset_s"}
               for s in json.loads(plan.to_json())["steps"] for f in s["faults"])  # fmt: skip


def test_newer_kinds_are_bounded_and_keep_a_voter_majority(seed_count: int) -> None:
    timing = Timing()
    slot = timing.slot_seconds
    seen: dict[Kind, int] = {}
    torn_files: set[tuple[str, str]] = set()
    for seed in range(seed_count):
        for nodes, voters in SHAPES:
            # no wipe without a learner; no pause where no voter may be impaired
            kinds = tuple(k for k in EXTENDED_KINDS
                          if not (k is Kind.WIPE and nodes == voters)
                          and not (k is Kind.PAUSE and voters < 3))  # fmt: skip
            plan = make_plan(seed, 600, nodes=nodes, voters=voters, kinds=kinds, cover=True)
            minority = (voters - 1) // 2
            assert set(plan.counts()) == {k.value for k in kinds}, (seed, nodes, voters)
            everyone = set(plan.voter_names + plan.learner_names)
            for step in plan.steps:
                assert impaired_voters(step, plan.voter_names) <= minority, (seed, step)
                for f in step.faults:
                    seen[f.kind] = seen.get(f.kind, 0) + 1
                    assert 1.0 <= f.duration_s <= 3 * slot, f
                    named = [x for x in f.targets if x != LEADER]
                    assert set(named) <= everyone
                    if f.kind is Kind.PARTITION:
                        # a minority side: never every household, at most `minority` voters
                        assert 1 <= len(f.targets) < nodes
                        assert f.duration_s > timing.election_timeout_max_s
                    elif f.kind is Kind.LOSS:
                        assert len(f.targets) == 2 and len(set(f.targets)) == 2
                        assert f.percent in (30, 50, 70, 100)
                    elif f.kind is Kind.DISK_FULL:
                        assert LEADER not in f.targets  # its tmpfs is mounted before the start
                        assert set(f.targets) <= set(plan.disk_targets)
                        assert f.duration_s >= slot  # a settlement is written meanwhile
                    elif f.kind is Kind.TORN_PAGE:
                        assert 0 <= f.cut_bytes < 4096
                        (target,) = f.targets
                        kind = "learner" if target in plan.learner_names else "voter"
                        torn_files.add((kind, f.file))
                        if kind == "voter":
                            # a voter's Raft log is never cut: its acknowledged entries stay
                            assert f.file in TORN_FILES_VOTER, f
                        else:
                            assert f.file in TORN_FILES_LEARNER
            assert plan.needs_netlab
    assert all(seen.get(k, 0) > 0 for k in NETWORK_KINDS + STORAGE_KINDS), seen
    assert {("learner", "raft.db"), ("learner", "raft.db-wal")} <= torn_files
    assert not {("voter", "raft.db"), ("voter", "raft.db-wal")} & torn_files


def test_skew_is_minutes_either_way_on_one_node_and_keeps_a_voter_majority(
    seed_count: int,
) -> None:
    timing = Timing()
    slot = timing.slot_seconds
    signs: set[int] = set()
    targets: dict[str, int] = {}
    for seed in range(seed_count):
        for nodes, voters in SHAPES:
            plan = make_plan(seed, 600, nodes=nodes, voters=voters, kinds=(Kind.SKEW, Kind.KILL),
                             cover=True)  # fmt: skip
            minority = (voters - 1) // 2
            assert not plan.needs_netlab and plan.disk_targets == ()
            for step in plan.steps:
                assert impaired_voters(step, plan.voter_names) <= minority, (seed, step)
                for f in step.faults:
                    doc = f.to_json()
                    if f.kind is not Kind.SKEW:
                        assert "skew_s" not in doc
                        continue
                    (target,) = f.targets
                    kind = ("leader" if target == LEADER else
                            "voter" if target in plan.voter_names else "learner")  # fmt: skip
                    targets[kind] = targets.get(kind, 0) + 1
                    if minority == 0:  # no voter may be impaired: a learner only
                        assert kind == "learner", (seed, nodes, voters, f)
                    # minutes, ahead or behind: far beyond the 5 s bound
                    assert SKEW_MIN_S <= abs(f.skew_s) <= SKEW_MAX_S, f
                    signs.add(1 if f.skew_s > 0 else -1)
                    assert doc["skew_s"] == f.skew_s
                    # long enough to restart, sample the peers' clocks and be seen skewed
                    assert 2 * slot <= f.duration_s <= 3 * slot, f
    assert signs == {1, -1}
    assert targets.get("leader", 0) > 0 and targets.get("voter", 0) > 0, targets
    assert targets.get("learner", 0) > 0, targets
    # the leader is drawn as often as any other voter put together, give or take
    assert targets["leader"] >= targets["voter"] // 2, targets


def test_skew_joins_the_extended_kinds_and_leaves_the_others_unchanged() -> None:
    assert Kind.SKEW in EXTENDED_KINDS and Kind.OUTAGE not in EXTENDED_KINDS
    assert Kind.SKEW not in DEFAULT_KINDS
    # a plan without skew (and jump) has no skew field (its JSON, the plan's fingerprint, is
    # as before)
    kinds = tuple(k for k in EXTENDED_KINDS if k not in (Kind.SKEW, Kind.JUMP))
    plan = make_plan(4, 240, nodes=5, kinds=kinds, cover=True)
    assert all("skew_s" not in f for s in json.loads(plan.to_json())["steps"]
               for f in s["faults"])  # fmt: skip
    assert make_plan(4, 240, nodes=5, kinds=EXTENDED_KINDS, cover=True).counts()["skew"] >= 1


def test_jump_joins_the_soaks_mix_minutes_either_way_on_one_running_node(
    seed_count: int,
) -> None:
    """``jump`` (a running node's clock stepped through its faults file) is in the soak's mix,
    not in the default plans; a plan of the kinds before it, named, is drawn as before."""
    assert Kind.JUMP in EXTENDED_KINDS and Kind.JUMP not in DEFAULT_KINDS
    assert EXTENDED_KINDS[-1] is Kind.JUMP  # appended: the earlier kinds keep their order
    assert make_plan(7, 480, nodes=5, kinds=EXTENDED_KINDS, cover=True).needs_faults_files
    before = tuple(k for k in EXTENDED_KINDS if k is not Kind.JUMP)
    assert not make_plan(4, 240, nodes=5, kinds=before, cover=True).needs_faults_files
    slot = Timing().slot_seconds
    signs: set[int] = set()
    targets: dict[str, int] = {}
    for seed in range(seed_count):
        for nodes, voters in SHAPES:
            plan = make_plan(seed, 600, nodes=nodes, voters=voters, kinds=(Kind.JUMP, Kind.KILL),
                             cover=True)  # fmt: skip
            minority = (voters - 1) // 2
            assert plan.needs_faults_files and not plan.needs_netlab
            for step in plan.steps:
                assert impaired_voters(step, plan.voter_names) <= minority, (seed, step)
                for f in step.faults:
                    if f.kind is not Kind.JUMP:
                        continue
                    (target,) = f.targets
                    kind = ("leader" if target == LEADER else
                            "voter" if target in plan.voter_names else "learner")  # fmt: skip
                    targets[kind] = targets.get(kind, 0) + 1
                    if minority == 0:
                        assert kind == "learner", (seed, nodes, voters, f)
                    assert SKEW_MIN_S <= abs(f.skew_s) <= SKEW_MAX_S, f
                    assert f.to_json()["skew_s"] == f.skew_s
                    signs.add(1 if f.skew_s > 0 else -1)
                    # held at least until seen and handed over (the runner waits for both)
                    assert 0.5 * slot <= f.duration_s <= 1.5 * slot, f
    assert signs == {1, -1}
    assert targets.get("leader", 0) >= targets.get("voter", 0) // 2 > 0, targets
    assert targets.get("learner", 0) > 0, targets
    plan = make_plan(2, 10, nodes=3, voters=3, kinds=(Kind.JUMP,), cover=True)
    assert "--kinds jump" in plan.replay_command()


def test_a_jump_of_the_leader_shares_its_step_with_no_other_impaired_voter(
    seed_count: int,
) -> None:
    """In the soak's mix a jump can share its step with another fault (a wipe, a skew, a
    kill...), yet a jump of a voter (the leader as often as not) counts as its impaired voter:
    in a grid of three voters the voters it can hand over to are never hit in the same step,
    and in a grid of five at most one other is (the jumped leader then hands over to another
    voter if its first choice is down: node/daemon/clock.py ``transfer_target``)."""
    mixed = 0
    for seed in range(seed_count * 2):
        for nodes, voters in ((5, 3), (7, 5)):
            plan = make_plan(seed, 480, nodes=nodes, voters=voters, kinds=EXTENDED_KINDS,
                             cover=True)  # fmt: skip
            minority = (voters - 1) // 2
            for step in plan.steps:
                jumps = [f for f in step.faults if f.kind is Kind.JUMP]
                if not jumps:
                    continue
                assert impaired_voters(step, plan.voter_names) <= minority, (seed, step)
                if len(step.faults) > 1:
                    mixed += 1
                hits_voter = any(x == LEADER or x in plan.voter_names
                                 for f in jumps for x in f.targets)  # fmt: skip
                if hits_voter and voters == 3:
                    others = [f for f in step.faults if f not in jumps]
                    assert impaired_voters(Step(0, tuple(others)), plan.voter_names) == 0, step
    assert mixed > 0


def test_a_sole_voters_jump_is_its_own_plan(capsys: pytest.CaptureFixture[str]) -> None:
    """One voter and learners, one step: the voter's running clock minutes ahead for a slot
    (``--sole-voter-jump``); make_plan never draws it (no voter of one may be impaired)."""
    plan = sole_voter_jump_plan(1)
    assert plan == sole_voter_jump_plan(1) and plan.to_json() != sole_voter_jump_plan(2).to_json()
    assert (plan.nodes, plan.voters, plan.voter_names) == (3, 1, ("h1",))
    [step] = plan.steps
    [fault] = step.faults
    assert fault.kind is Kind.JUMP and fault.targets == (LEADER,)
    assert SKEW_MIN_S <= fault.skew_s <= SKEW_MAX_S  # ahead: its gates would fall due at once
    assert fault.duration_s == Timing().slot_seconds  # a gate time and a settle time pass
    assert plan.needs_faults_files and json.loads(plan.to_json())["sole_voter_jump"] is True
    assert "sole_voter_jump" not in make_plan(2, 10, nodes=3, voters=3, kinds=(Kind.JUMP,),
                                              cover=True).to_json()  # fmt: skip
    replay = "python -m node.testing.nemesis --sole-voter-jump --seed 1 --nodes 3"
    assert plan.replay_command() == replay
    assert sole_voter_jump_plan(1, nodes=4).learner_names == ("h2", "h3", "h4")
    with pytest.raises(NemesisError):
        sole_voter_jump_plan(1, nodes=2)  # one learner cannot outvote the voter's clock
    assert main(["--sole-voter-jump", "--seed", "1", "--plan"]) == 0
    assert capsys.readouterr().out.strip() == plan.to_json()
    # make_plan keeps a sole voter out of every fault that impairs it
    for seed in range(20):
        drawn = make_plan(seed, 120, nodes=3, voters=1, kinds=(Kind.JUMP,), cover=True)
        assert all(f.targets != (LEADER,) and "h1" not in f.targets
                   for s in drawn.steps for f in s.faults)  # fmt: skip
