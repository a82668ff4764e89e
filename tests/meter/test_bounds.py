"""The meter's own bounds match the market's (meter imports no market code, so they are copies)."""

from market import bounds
from meter import sample


def test_counter_bound_equals_the_markets() -> None:
    assert sample.MAX_COUNTER_WH == bounds.MAX_COUNTER_WH
