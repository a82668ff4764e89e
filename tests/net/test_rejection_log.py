"""The rate limit of gossip rejection log lines (node/net/rejection_log.py), on a fake clock."""

from __future__ import annotations

import pytest

from node.net.rejection_log import RejectionLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_rejection_is_logged_then_one_per_interval_with_the_count_left_out() -> None:
    clock = Clock()
    limit = RejectionLog(interval=60, clock=clock)
    assert limit.admit("replayed", "peerA") == 0
    assert [limit.admit("replayed", "peerA") for _ in range(5)] == [None] * 5
    clock.now += 59.9
    assert limit.admit("replayed", "peerA") is None
    clock.now += 0.1
    assert limit.admit("replayed", "peerA") == 6  # the six left out since the first line
    assert limit.admit("replayed", "peerA") is None
    clock.now += 60
    assert limit.admit("replayed", "peerA") == 1


def test_each_reason_and_forwarder_has_its_own_limit() -> None:
    limit = RejectionLog(interval=60, clock=Clock())
    assert limit.admit("replayed", "peerA") == 0
    assert limit.admit("slot_closed", "peerA") == 0
    assert limit.admit("replayed", "peerB") == 0
    assert limit.admit("replayed", "peerA") is None


def test_keys_are_bounded_and_a_forgotten_key_is_logged_again() -> None:
    limit = RejectionLog(interval=60, max_keys=3, clock=Clock())
    for peer in ("a", "b", "c"):
        assert limit.admit("malformed", peer) == 0
    assert limit.admit("malformed", "d") == 0  # "a", the oldest, is forgotten
    assert len(limit._entries) == 3
    assert limit.admit("malformed", "b") is None
    assert limit.admit("malformed", "a") == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        RejectionLog(interval=-1)
    with pytest.raises(ValueError, match="max_keys"):
        RejectionLog(max_keys=0)
