"""The node keeps its forecast across restarts and ignores a corrupt forecast file
(node/daemon/household_node.py; docs/node.md, "The agent's forecast")."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from meter.sim import MeterSimulator
from node.agent.forecast import FORECAST_FILE, LearningForecaster, save_forecaster
from node.daemon.household_node import HouseholdNode
from node.setup.config import AgentSetting
from tests.node.test_household import make_grid, sim  # noqa: F401 - the fixture

SLOT = 2_000_000


async def test_the_node_restores_its_forecast_and_survives_a_corrupt_file(
    tmp_path: Path,
    sim: MeterSimulator,  # noqa: F811
) -> None:
    grid = await make_grid(tmp_path, sim)
    config = replace(grid.config, agent=AgentSetting(52.5, 13.4))
    path = config.data_dir / FORECAST_FILE
    config.data_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'{"format": 1, "level": [')  # torn or hostile: ignored, no crash
    node = HouseholdNode(config, grid.identity, grid.genesis)
    try:
        assert node.trader.forecaster.observed == 0
        # an accelerated demo meter: no clear-sky term (its days are not the sun's)
        assert node.trader.location is None or config.meter_time_scale == 1.0
        assert node.status(missing_blocks=[])["agent"]["forecast"]["samples"]["last_96"] == 0
    finally:
        node.reader.close()
        node.store.close()
        node.raft_storage.close()
    learned = LearningForecaster(grid.genesis.schedule.slot_seconds)
    learned.observe(SLOT, -432)
    learned.issue(SLOT + 1)
    learned.observe(SLOT + 1, -400)
    save_forecaster(learned, path)
    again = HouseholdNode(grid.config, grid.identity, grid.genesis)
    try:
        assert again.trader.forecaster.observed == 2
        assert again.trader.forecaster.predict(SLOT) == learned.predict(SLOT)
        forecast = again.status(missing_blocks=[])["agent"]["forecast"]
        assert forecast["mae_wh"]["last_96"] == 32 and forecast["samples"]["last_96"] == 1
    finally:
        again.reader.close()
        again.store.close()
        again.raft_storage.close()
