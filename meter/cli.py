"""``microgrid meter ...`` and ``microgrid meter-sim``: check a meter's wiring, run the simulator.

``microgrid meter test --profile sdm630 --host H --port P [--device-id N]`` (or
``--serial /dev/ttyUSB0 --baud 9600``) does one real read and prints the decoded fields, so a
household can check its meter before it trades. ``microgrid meter profiles`` lists the shipped
profiles. ``microgrid meter-sim --households N --port P [--speed X] [--seed S]`` serves
simulated households over Modbus TCP (and RTU with ``--serial``); faults can be set at start
(``--fault 3:nan``) and at run time by typing ``fault 3 slow 2``, ``clear 3``, ``clear``,
``state 3`` or ``quit`` on its standard input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
from typing import Any

import trio

from meter.profile import ProfileError, available_profiles, load_profile
from meter.reader import MeterConfig, MeterReader, PollResult
from meter.sim.faults import FAULT_KINDS, parse_fault
from meter.sim.feeder import DEFAULT_FEEDER_DEVICE, DEFAULT_FEEDER_LOSS
from meter.sim.server import DEFAULT_START, MeterSimulator
from meter.transport import Endpoint, SerialEndpoint, TcpEndpoint


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``meter`` and ``meter-sim`` commands to the ``microgrid`` CLI."""
    meter = subparsers.add_parser("meter", help="Modbus meters: check wiring, list profiles")
    sub = meter.add_subparsers(dest="meter_command", metavar="SUBCOMMAND")
    sub.required = True

    test = sub.add_parser("test", help="read a meter once and print the decoded fields")
    test.add_argument("--profile", required=True,
                      help=f"profile name ({', '.join(available_profiles())}) or a .toml path")
    where = test.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", help="Modbus TCP host (meter or gateway)")
    where.add_argument("--serial", metavar="DEVICE", help="serial device for Modbus RTU")
    test.add_argument("--port", type=int, default=502, help="Modbus TCP port (default 502)")
    test.add_argument("--device-id", type=int, default=1, help="Modbus device (unit) id")
    test.add_argument("--baud", type=int, default=9600, help="RTU baud rate (default 9600)")
    test.add_argument("--parity", choices="NEO", default="N", help="RTU parity (default N)")
    test.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    test.add_argument("--timeout", type=float, default=2.0, help="seconds per attempt")
    test.add_argument("--json", action="store_true", help="print the sample as JSON")
    test.set_defaults(func=cmd_test)

    profiles = sub.add_parser("profiles", help="list the shipped meter profiles")
    profiles.set_defaults(func=cmd_profiles)

    sim = subparsers.add_parser("meter-sim", help="serve simulated household meters over Modbus")
    sim.add_argument("--households", type=int, default=6, help="number of households (1-247)")
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sim.add_argument("--port", type=int, default=5020, help="TCP port (0: any free port)")
    sim.add_argument("--port-per-household", action="store_true",
                     help="one TCP port per household (PORT, PORT+1, ...) instead of device ids")
    sim.add_argument("--no-tcp", action="store_true", help="serve RTU only")
    sim.add_argument("--serial", metavar="DEVICE", help="also serve Modbus RTU on this device")
    sim.add_argument("--baud", type=int, default=9600, help="RTU baud rate")
    sim.add_argument("--speed", type=float, default=60.0,
                     help="simulated seconds per real second (default 60)")
    sim.add_argument("--seed", type=int, default=1, help="same seed, same run")
    sim.add_argument("--start", type=dt.datetime.fromisoformat, default=DEFAULT_START,
                     help="simulated start time (default 2025-06-21T06:00)")
    sim.add_argument("--latitude", type=float, default=52.5, help="latitude for the PV model")
    sim.add_argument("--profiles", help="comma-separated profiles to cycle through "
                     "(default: SDM630, every fourth household SunSpec)")
    sim.add_argument("--fault", action="append", default=[], metavar="DEV:KIND[=VALUE]",
                     help=f"fault at start ({', '.join(FAULT_KINDS)}); repeatable")
    sim.add_argument("--feeder", action="store_true",
                     help="also serve a feeder meter (the operator's meter at the transformer): "
                     "the households' net flow plus line losses")
    sim.add_argument("--feeder-device", type=int, default=DEFAULT_FEEDER_DEVICE,
                     help=f"the feeder meter's device id (default {DEFAULT_FEEDER_DEVICE})")
    sim.add_argument("--feeder-loss", type=float, default=DEFAULT_FEEDER_LOSS,
                     help="line losses as a share of the energy the households move "
                     f"(default {DEFAULT_FEEDER_LOSS})")
    sim.add_argument("--feeder-profile", default="sdm630",
                     help="the feeder meter's profile (default sdm630)")
    sim.add_argument("--duration", type=float, default=0.0,
                     help="stop after this many real seconds (default: run until Ctrl-C)")
    sim.add_argument("--status-every", type=float, default=10.0,
                     help="print a status line every this many real seconds (0: never)")
    sim.set_defaults(func=cmd_sim)


def _endpoint(args: argparse.Namespace) -> Endpoint:
    if args.serial:
        return SerialEndpoint(args.serial, baudrate=args.baud, parity=args.parity,
                              stopbits=args.stopbits)
    return TcpEndpoint(args.host, args.port)


def _print_result(result: PollResult, as_json: bool) -> None:
    s = result.sample
    if as_json:
        payload: dict[str, Any] = {"meter": result.meter, "ok": s is not None,
                                   "error": str(result.error) if result.error else None,
                                   "events": [str(e) for e in result.events]}
        if s is not None:
            payload.update({k: v for k, v in s.__dict__.items() if k != "values"})
            payload["values"] = s.values
        print(json.dumps(payload, indent=2, default=str))
        return
    if s is None:
        print(f"FAILED {result.error}")
        return
    print(f"meter      {result.meter}")
    print(f"serial     {s.serial}")
    print(f"import     {s.import_wh} Wh (resolution {s.import_resolution_wh} Wh)")
    print(f"export     {s.export_wh} Wh (resolution {s.export_resolution_wh} Wh)")
    print(f"power      {s.power_w:.1f} W (positive = import from the grid)")
    if s.voltage_v is not None:
        print(f"voltage    {s.voltage_v:.2f} V")
    if s.frequency_hz is not None:
        print(f"frequency  {s.frequency_hz:.3f} Hz")
    print(f"round trip {s.latency_s * 1000:.1f} ms")
    for name, value in sorted(s.values.items()):
        print(f"  {name:<16} {value}")
    for event in result.events:
        print(f"event      {event}")


def cmd_test(args: argparse.Namespace) -> int:
    """One real read of one meter; exit status 0 only if a plausible sample came back."""
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    endpoint = _endpoint(args)
    reader = MeterReader([MeterConfig(f"{profile.name}@{endpoint}/{args.device_id}", profile,
                                      endpoint, args.device_id)],
                         timeout_s=args.timeout, retries=1)
    try:
        result = trio.run(reader.poll, reader.names[0])
    finally:
        reader.close()
    _print_result(result, args.json)
    return 0 if result.ok else 1


def cmd_profiles(args: argparse.Namespace) -> int:
    """List the shipped profiles."""
    for name in available_profiles():
        p = load_profile(name)
        print(f"{name:<15} {p.manufacturer} {p.model}: {p.description}")
    return 0


def _status(sim: MeterSimulator) -> str:
    states = sim.states()
    imp = sum(1 for s in states.values() if s.power_w > 0)
    exp = sum(1 for s in states.values() if s.power_w < 0)
    net = sum(s.power_w for s in states.values())
    feeder = "" if sim.feeder is None else f" feeder={sim.feeder_state().power_w:.0f} W"
    return (f"{sim.now():%Y-%m-%d %H:%M:%S} households={len(states)} importing={imp} "
            f"exporting={exp} net={net:.0f} W{feeder} requests={sim.requests}")


def _command(sim: MeterSimulator, line: str) -> bool:
    """Apply one stdin command; False means quit."""
    words = line.split()
    if not words:
        return True
    try:
        if words[0] == "quit":
            return False
        if words[0] == "fault" and len(words) >= 3:
            value = float(words[3]) if len(words) > 3 else 0.0
            device_id, kind, _ = parse_fault(f"{words[1]}:{words[2]}")
            sim.set_fault(device_id, kind, value)
            print(f"fault {kind} on device {device_id}", flush=True)
        elif words[0] == "clear":
            sim.clear_faults(int(words[1]) if len(words) > 1 else None)
            print("faults cleared", flush=True)
        elif words[0] == "state" and len(words) == 2:
            print(sim.state(int(words[1])), flush=True)
        elif words[0] == "status":
            print(_status(sim), flush=True)
        else:
            print("commands: fault DEV KIND [VALUE] | clear [DEV] | state DEV | status | quit",
                  flush=True)
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", flush=True)
    return True


def cmd_sim(args: argparse.Namespace) -> int:
    """Run the simulator until Ctrl-C, ``quit`` on stdin, or ``--duration``."""
    try:
        sim = MeterSimulator(
            args.households if not args.profiles else _configs(args),
            seed=args.seed, host=args.host, port=args.port,
            port_per_household=args.port_per_household, serial_device=args.serial,
            serial_baudrate=args.baud, tcp=not args.no_tcp, speed=args.speed, start=args.start,
            latitude=args.latitude, faults=args.fault, feeder=args.feeder,
            feeder_device=args.feeder_device, feeder_loss=args.feeder_loss,
            feeder_profile=args.feeder_profile,
        )
        sim.start()
    except (ValueError, ProfileError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if not _command(sim, line):
                break
        else:
            return  # stdin closed: keep running
        stop.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    where = ", ".join(f"{args.host}:{p}" for p in sim.ports)
    print(f"meter-sim: {len(sim.device_ids)} households, seed {args.seed}, speed {args.speed}x; "
          f"listening on {where or '-'}" + (f"; RTU on {args.serial}" if args.serial else ""),
          flush=True)
    for d in sim.device_ids:
        c = sim.config(d)
        model = f" {c.sunspec_model}" if c.profile == "sunspec" else ""
        print(f"  device {d}: {c.profile}{model}"
              f" serial {c.serial} pv {c.pv_kwp} kWp load {c.annual_kwh:.0f} kWh/a"
              f" battery {c.battery_kwh} kWh", flush=True)
    if sim.feeder is not None:
        f = sim.feeder.config
        print(f"  device {f.device_id}: feeder {f.profile} serial {f.serial} loss {f.loss:g}",
              flush=True)
    for unit, d in sim.batteries.items():
        print(f"  device {unit}: battery inverter of household {d} (SunSpec 124/802)", flush=True)
    started = time.monotonic()
    next_status = started + args.status_every if args.status_every > 0 else float("inf")
    try:
        while not stop.is_set():
            if args.duration and time.monotonic() - started >= args.duration:
                break
            if time.monotonic() >= next_status:
                print(_status(sim), flush=True)
                next_status += args.status_every
            stop.wait(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    print(f"meter-sim: stopped at {_status(sim)}", flush=True)
    return 0


def _configs(args: argparse.Namespace) -> list[Any]:
    from meter.sim.household import make_households

    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    for p in profiles:
        load_profile(p)
    return make_households(args.households, args.seed, profiles)
