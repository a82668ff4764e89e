"""The nemesis plan is pure data drawn from a seed (node/testing/nemesis.py).

Same seed, same plan; faults bounded in time; a step never impairs a majority of the voters
unless an outage was asked for; a wipe only ever hits a learner; ``cover`` uses every kind.
"""

from __future__ import annotations

import json

import pytest

from node.testing.nemesis import (
    DEFAULT_KINDS,
    LEADER,
    Kind,
    NemesisError,
    Plan,
    Timing,
    impaired_voters,
    main,
    make_plan,
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
        make_plan(1, 60, kinds=("partition",))  # type: ignore[arg-type]


def test_the_cli_prints_the_plan_it_would_replay(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "5", "--duration", "90", "--cover", "--plan"]) == 0
    printed = capsys.readouterr().out.strip()
    plan = make_plan(5, 90, cover=True)
    assert printed == plan.to_json()
    assert plan.replay_command() == (
        "python -m node.testing.nemesis --seed 5 --duration 90 --nodes 4 --voters 3 "
        "--kinds kill,kill_write,pause,wipe,meter --cover"
    )
    assert main(["--kinds", "partition", "--plan"]) == 2
