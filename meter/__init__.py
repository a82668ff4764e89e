"""Modbus meters: profiles as data, a robust polling reader, and a meter simulator.

- :mod:`meter.profile` (and ``meter/profiles/*.toml``): register maps as TOML data files.
- :mod:`meter.codec`, :mod:`meter.plan`: register types and read planning (pure).
- :mod:`meter.sample`, :mod:`meter.guard`: decoding and plausibility checks (pure).
- :mod:`meter.transport`, :mod:`meter.sunspec`: blocking pymodbus links and SunSpec scans.
- :mod:`meter.reader`: :class:`~meter.reader.MeterReader`, the trio-facing poller.
- :mod:`meter.battery`: home batteries (SunSpec 124/802): validated reads and setpoints.
- :mod:`meter.events`: typed errors and events; :mod:`meter.metrics`: a Prometheus collector.
- :mod:`meter.sim`: the simulator (households, real pymodbus servers, fault injection).
- :mod:`meter.cli`: ``microgrid meter test|profiles`` and ``microgrid meter-sim``.

Sign convention everywhere: power is positive when the household imports from the grid;
energy counters are integer watt-hours.
"""
