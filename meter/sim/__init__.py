"""The meter simulator: households with PV, load and battery behind real Modbus servers.

:class:`~meter.sim.server.MeterSimulator` is the in-process entry point (tests, bench);
``microgrid meter-sim`` is the command line one.
"""

from meter.sim.battery import BatteryConfig, SimulatedBattery
from meter.sim.faults import Faults
from meter.sim.feeder import Feeder, FeederConfig
from meter.sim.household import HouseholdConfig, MeterState, SimulatedHousehold, make_households
from meter.sim.server import MeterSimulator

__all__ = [
           "BatteryConfig",
           "Faults",
           "Feeder",
           "FeederConfig",
           "HouseholdConfig",
           "MeterSimulator",
           "MeterState",
           "SimulatedBattery",
           "SimulatedHousehold",
           "make_households",
]
