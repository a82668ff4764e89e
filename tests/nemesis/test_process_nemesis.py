"""The nemesis over real node processes (issue 16): a bounded seeded run, and the soak.

A grid of four ``microgrid node run`` processes (three voters, one learner) over the meter
simulator plays a seeded plan using every fault kind once (``cover``): SIGKILL and restart (the
leader included, also just after a settle time, while the ledgers write a block), SIGSTOP of a
voter for longer than the election timeout, a learner's data directory deleted before its
restart, a meter that stops answering. Then every ledger must verify, all agree block by block
with equal heads, every head a node reported during the run must be in every ledger, each
node's last report must be its ledger's, and money and energy must be conserved.

A failure prints the seed, the table and the replay commands. Replay the CI run with
``NEMESIS_SEED=<seed> pytest tests/nemesis -k bounded`` or the printed ``python -m`` command.
``pytest tests/nemesis --soak`` runs the nemesis for an hour (``NEMESIS_SOAK_SECONDS``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from node.testing.nemesis import NemesisResult, Plan, make_plan, run_plan

pytestmark = pytest.mark.slow

CI_SEED = int(os.environ.get("NEMESIS_SEED", "2"))
CI_DURATION_S = 60.0
"""Budget for the CI plan: with ``cover`` it still uses every kind (five steps, about two
minutes of wall time on a loaded two-core machine)."""
CI_WALL_LIMIT_S = 420
SOAK_SECONDS = float(os.environ.get("NEMESIS_SOAK_SECONDS", "3600"))


async def play(plan: Plan, directory: Path, wall_limit: float) -> NemesisResult:
    """Run ``plan`` bounded in wall time; a timeout fails with the seed and the replay."""
    lines: list[str] = []
    try:
        with trio.fail_after(wall_limit):
            result = await run_plan(plan, directory, out=lines.append)
    except trio.TooSlowError:
        pytest.fail(
            f"nemesis seed {plan.seed} took over {wall_limit:.0f} s; events:\n"
            + "\n".join(lines)
            + f"\nreplay: NEMESIS_SEED={plan.seed} pytest tests/nemesis -k bounded, or "
            f"{plan.replay_command()}"
        )
    print("\n".join(result.events))
    print(result.table())
    return result


def check(result: NemesisResult) -> None:
    """The run passed every check; else fail with the table (seed and replay included)."""
    assert result.ok, (
        f"{result.table()}\nreplay in pytest: NEMESIS_SEED={result.plan.seed} "
        "pytest tests/nemesis -k bounded"
    )
    assert result.divergences == 0 and result.lost_records == 0
    # every fault of the plan was injected, the grid recovered from each, and it kept settling
    assert result.faults == result.plan.counts(), (result.faults, result.skipped)
    assert len(result.recoveries) == len(result.plan.steps)
    assert all(r.seconds is not None for r in result.recoveries)
    assert result.height - result.start_height >= len(result.plan.steps)
    assert result.observed_heads >= result.height - result.start_height


async def test_bounded_seeded_nemesis_over_real_processes(tmp_path: Path) -> None:
    plan = make_plan(CI_SEED, CI_DURATION_S, nodes=4, voters=3, cover=True)
    result = await play(plan, tmp_path / "grid", CI_WALL_LIMIT_S)
    check(result)
    kinds = {k for r in result.recoveries for k in r.kinds}
    assert {"kill", "kill_write", "pause", "wipe", "meter"} <= kinds


@pytest.mark.soak
async def test_soak_nemesis_over_real_processes(tmp_path: Path, soak: bool) -> None:
    if not soak:
        pytest.skip("an hour of faults: run with --soak (NEMESIS_SOAK_SECONDS to shorten)")
    seed = int(os.environ.get("NEMESIS_SEED", "1"))
    plan = make_plan(seed, SOAK_SECONDS, nodes=5, voters=3, cover=True)
    result = await play(plan, tmp_path / "grid", SOAK_SECONDS * 2 + 600)
    check(result)
