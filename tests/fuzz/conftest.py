"""Fuzzing every decoder of untrusted bytes: seeded and bounded in CI, longer with ``--soak``.

Every test in this directory uses :func:`tests.fuzz.strategies.fuzz_settings`, which picks a
hypothesis profile when pytest starts:

- ``microgrid-fuzz`` (default, what CI runs): ``derandomize=True``, so each test draws the same
  ``FUZZ_EXAMPLES`` (200) examples on every run and machine. A failure replays by running the
  same test again; hypothesis also prints the shrunk falsifying input.
- ``microgrid-fuzz-soak`` (``pytest --soak``): ``SOAK_EXAMPLES`` (3000) random examples per test.
  A failure prints the falsifying input and a ``@reproduce_failure(...)`` blob to paste on the
  test, and the seed (``pytest --hypothesis-seed=N``) to replay the whole run.

``--seed-count N`` sets the examples per test directly. Each example has a deadline, so a
decoder that hangs on some input fails the test instead of stalling CI.
"""

from __future__ import annotations

import pytest

from tests.fuzz import strategies


def pytest_configure(config: pytest.Config) -> None:
    strategies.configure(
        soak=bool(config.getoption("--soak", default=False)),
        examples=config.getoption("--seed-count", default=None),
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"fuzz: {strategies.describe()}"
