"""Profiles as data: every shipped profile loads, plans into few requests, and round-trips
through the simulator; a user's own TOML file works without Python; bad files are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from meter.plan import plan_reads
from meter.profile import ProfileError, available_profiles, load_profile
from meter.reader import MeterConfig, MeterReader
from meter.sim import HouseholdConfig, MeterSimulator
from meter.transport import TcpEndpoint
from tests.meter.conftest import HOST, START, f32

FIXED = ["sdm630", "sdm120", "sdm72", "em24_ethernet", "em24_rs485", "em340"]


def test_shipped_profiles() -> None:
    assert set(available_profiles()) >= {*FIXED, "sunspec"}
    for name in FIXED:
        p = load_profile(name)
        assert {"import_energy", "export_energy", "power", "serial"} <= set(p.fields)
        assert p.fields["import_energy"].counter and p.fields["export_energy"].counter
        assert not p.fields["power"].counter
        assert p.rated_power_w > 0
        blocks = plan_reads(p.fields.values(), max_registers=p.max_registers, max_gap=p.max_gap)
        assert all(b.count <= 125 for b in blocks)
        assert len(blocks) <= 3, (name, blocks)
    sunspec = load_profile("sunspec")
    assert sunspec.is_sunspec and sunspec.sunspec is not None
    assert sunspec.sunspec.base_addresses == (40000, 0, 50000)
    assert {m for f in sunspec.sunspec.families for m in f.models} == {
        201, 202, 203, 204, 211, 212, 213, 214}


def test_vendor_addresses() -> None:
    sdm = load_profile("sdm630").fields
    assert (sdm["power"].address, sdm["import_energy"].address,
            sdm["export_energy"].address, sdm["frequency"].address) == (0x34, 0x48, 0x4A, 0x46)
    assert (sdm["serial"].address, sdm["serial"].function) == (0xFC00, "holding")
    e1, rs = load_profile("em24_ethernet").fields, load_profile("em24_rs485").fields
    assert (e1["import_energy"].address, e1["export_energy"].address) == (0x34, 0x4E)
    assert (rs["import_energy"].address, rs["export_energy"].address) == (0x42, 0x5C)
    assert e1["frequency"].address == 0x33 and rs["frequency"].address == 0x37
    assert e1["import_energy"].word_order == "little"
    ss = load_profile("sunspec").resolve_sunspec(203, 40070, 40002).fields
    assert (ss["power"].address, ss["power_sf"].address, ss["export_energy"].address,
            ss["import_energy"].address, ss["energy_sf"].address, ss["serial"].address) == (
        40088, 40092, 40108, 40116, 40124, 40052)
    plan = plan_reads(ss.values())
    assert len(plan) == 1  # SN at 40052 .. TotWh_SF at 40124: one request of 73 registers


@pytest.mark.parametrize("profile", FIXED)
async def test_every_profile_round_trips_through_the_simulator(profile: str) -> None:
    configs = [HouseholdConfig(index=i, device_id=i + 1, profile=profile, pv_kwp=pv,
                               initial_import_wh=2_345_678.0, initial_export_wh=345_678.0)
               for i, pv in enumerate((0.0, 8.0))]
    sim = MeterSimulator(configs, seed=4, speed=0, host=HOST, start=START)
    sim.advance(600)
    with sim:
        reader = MeterReader([MeterConfig(f"hh{c.device_id}", profile,
                                          TcpEndpoint(HOST, sim.ports[0]), c.device_id)
                              for c in configs], timeout_s=0.5, clock=lambda: sim.sim_time)
        try:
            with trio.fail_after(10):
                results = await reader.poll_all()
        finally:
            reader.close()
    for c in configs:
        sample, truth = results[f"hh{c.device_id}"].sample, sim.state(c.device_id)
        assert sample is not None, results[f"hh{c.device_id}"].error
        if profile.startswith("em"):  # int32 x 0.1 kWh, x 0.1 W
            assert sample.import_wh == round(truth.import_wh / 100) * 100
            assert sample.power_w == pytest.approx(truth.power_w, abs=0.05)
            assert sample.serial == f"SIM{truth.serial}"[:14]
        else:
            assert sample.import_wh == round(f32(truth.import_wh / 1000) * 1000)
            assert sample.power_w == f32(truth.power_w)
            assert sample.serial == str(truth.serial)
    powers = [results[f"hh{c.device_id}"].sample.power_w for c in configs]  # type: ignore[union-attr]
    assert powers[0] > 0 > powers[1]  # at 12:40, no PV imports and 8 kWp exports


async def test_user_profile_file_without_python(tmp_path: Path) -> None:
    """A user describes a meter in TOML; the simulator serves it and the reader reads it."""
    path = tmp_path / "acme_m1.toml"
    path.write_text('''
[meter]
name = "acme_m1"
manufacturer = "ACME"
rated_power_w = 20000

[fields.serial]
address = 100
function = "holding"
type = "uint32"
word_order = "little"

[fields.power]
address = 10
type = "int32"
scale = 0.01
unit = "kW"
min = -20000
max = 20000

[fields.import_energy]
address = 20
type = "uint32"
unit = "Wh"
counter = true

[fields.export_energy]
address = 22
type = "uint32"
unit = "Wh"
counter = true

[fields.frequency]
address = 30
type = "uint16"
scale = 0.01
unit = "Hz"
min = 45
max = 65
''')
    config = HouseholdConfig(index=0, device_id=9, profile=str(path), pv_kwp=6.0,
                             initial_import_wh=1000.0, initial_export_wh=50.0)
    sim = MeterSimulator([config], seed=1, speed=0, host=HOST, start=START)
    sim.advance(300)
    with sim:
        reader = MeterReader([MeterConfig("acme", str(path), TcpEndpoint(HOST, sim.ports[0]), 9)],
                             timeout_s=0.5)
        try:
            with trio.fail_after(10):
                result = await reader.poll("acme")
        finally:
            reader.close()
    truth = sim.state(9)
    assert result.sample is not None, result.error
    assert result.sample.import_wh == round(truth.import_wh)
    assert result.sample.export_wh == round(truth.export_wh)
    assert result.sample.power_w == pytest.approx(truth.power_w, abs=10.0)  # 0.01 kW steps
    assert result.sample.frequency_hz == pytest.approx(truth.frequency_hz, abs=0.01)
    assert result.sample.serial == str(truth.serial)


@pytest.mark.parametrize(("body", "message"), [
    ("[fields.power]\naddress = 1\n", "lacks required fields"),
    ("[fields.power]\naddress = 1\ntype = \"int128\"\n", "unknown type"),
    ("[fields.power]\naddress = 1\nunit = \"furlong\"\n", "unknown unit"),
    ("[fields.power]\naddress = 1\nscale_factor = \"nope\"\n", "unknown scale factor"),
    ("[fields.power]\naddress = 70000\n", "address out of range"),
    ("[fields.power]\naddress = 1\nfunction = \"coil\"\n", "input or holding"),
    ("[fields.power]\naddress = 1\nadress = 2\n", "unknown keys"),
    ("[fields.serial]\naddress = 1\ntype = \"string\"\n", "positive length"),
    ("[fields.power\n", "Expected"),
])
def test_bad_profiles_are_rejected(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[meter]\nname = "bad"\n' + body)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_unknown_profile_name() -> None:
    with pytest.raises(ProfileError, match=r"shipped: .*sdm630"):
        load_profile("sdm999")
