"""What a skewed leader does when there is no right-clock voter to hand over to (issue 16).

Pure tests of node/daemon/clock.py's policy (no processes; tests/nemesis/
test_process_nemesis.py shows the same on real ones, ``sole_voter``):

- a sole voter whose running clock jumps is outvoted by its learners' clocks (two or more):
  it is skewed, and it holds every gate closure and settlement until its clock is right again
  (before, a sole voter always trusted its own clock and would have closed gates minutes early);
  with one learner, or none sampled, it cannot tell and keeps its own clock;
- a skewed leader whose first choice to hand over to is down (the handover times out and it
  still leads) hands over to the next agreeing voter at its next try, not to the same one.
"""

from __future__ import annotations

from node.daemon.clock import ClockWatch, TimeSample

T = 1_750_000_000.0
"""The right wall time at monotonic 0."""


def sample(peer: str, mono: float, ours_ahead: float = 0.0) -> TimeSample:
    """A 2 ms exchange with ``peer`` (a right clock) at monotonic ``mono``, ours then
    ``ours_ahead`` seconds ahead of it."""
    t0 = T + mono + ours_ahead
    t1 = T + mono + 0.001
    return TimeSample(peer, t0, t1, t1, t0 + 0.002, mono)


def test_a_sole_voter_whose_clock_jumps_holds_every_deadline_until_it_is_right() -> None:
    watch = ClockWatch(max_skew=5.0)
    for learner in ("h2", "h3"):
        assert watch.add(sample(learner, 0.0))
    watch.assess(1.0, T + 1.0)
    assert not watch.skewed
    assert watch.deadline_time(T + 1.0, 1.0, alone=True) == T + 1.0
    # its running clock jumps 150 s ahead: the samples taken before are carried over the step
    watch.assess(2.0, T + 152.0)
    assert watch.skewed and watch.estimate.offset is not None
    assert abs(watch.estimate.offset - 150.0) < 0.1
    assert watch.deadline_time(T + 152.0, 2.0, alone=True) is None  # held: no one to hand to
    assert watch.transfer_target("h1", ("h1",), {}) is None
    # new samples of the learners, taken while it is off, agree
    for learner in ("h2", "h3"):
        assert watch.add(sample(learner, 3.0, ours_ahead=150.0))
    watch.assess(4.0, T + 154.0)
    assert watch.deadline_time(T + 154.0, 4.0, alone=True) is None
    # set right: deadlines by its own clock again
    watch.assess(5.0, T + 5.0)
    assert not watch.skewed
    assert watch.deadline_time(T + 5.0, 5.0, alone=True) == T + 5.0


def test_a_sole_voter_with_one_learner_or_none_sampled_keeps_its_own_clock() -> None:
    # two clocks: the median is halfway and its error covers both; no one is called skewed
    watch = ClockWatch(max_skew=5.0)
    watch.add(sample("h2", 0.0))
    watch.assess(2.0, T + 152.0)
    assert not watch.skewed and not watch.report().disagreeing
    assert watch.deadline_time(T + 152.0, 2.0, alone=True) == T + 152.0
    # nothing sampled (its learners down): no unsampled hold either, its own clock rules
    lonely = ClockWatch(max_skew=5.0)
    lonely.assess(0.0, T)
    assert lonely.deadline_time(T, 0.0, alone=True) == T


def test_a_skewed_leader_whose_first_choice_is_down_hands_over_to_the_next_voter() -> None:
    watch = ClockWatch(max_skew=5.0, transfer_every=8.0)
    for peer in ("h2", "h3", "h4", "h5"):
        watch.add(sample(peer, 0.0, ours_ahead=120.0))
    watch.assess(1.0, T + 121.0)
    assert watch.skewed
    voters = ("h1", "h2", "h3", "h4")
    # h3 is the most caught-up; it is down, so the handover times out and h1 still leads.
    # A skewed leader proposes nothing: the matches stay as they were
    matches = {"h2": 40, "h3": 41, "h4": 40}
    assert watch.transfer_target("h1", voters, matches) == "h3"
    assert watch.may_transfer(1.0)
    # within the interval: no second handover, whoever the target
    assert watch.transfer_target("h1", voters, matches) == "h2"
    assert not watch.may_transfer(5.0)
    # one interval on: the next agreeing voter, not h3 again
    assert watch.transfer_target("h1", voters, matches) == "h2"
    assert watch.may_transfer(9.5)
    assert watch.transfer_target("h1", voters, matches) == "h4"
    assert watch.may_transfer(18.0)
    # every candidate tried: the round starts over
    assert watch.transfer_target("h1", voters, matches) == "h3"
    assert watch.transfers == 3
    # its clock right again: the tried ones are forgotten
    watch.assess(20.0, T + 20.0)
    assert not watch.skewed
    assert not watch.may_transfer(30.0)
    assert watch.transfer_target("h1", voters, matches) == "h3"
