"""SunSpec discovery: find the "SunS" marker and walk the model chain to a meter model.

Blocking (it uses a :class:`~meter.transport.ModbusLink`); the reader runs it in a worker
thread. The marker is looked for at each of the profile's base addresses (40000, 0, 50000 by
default); an exception response or a wrong marker moves on to the next candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

from meter.events import MeterExceptionResponse, SunSpecNotFound
from meter.profile import Profile
from meter.transport import ModbusLink

MARKER = (0x5375, 0x6E53)  # "SunS"
END_ID = 0xFFFF
MAX_MODELS = 64


@dataclass(frozen=True)
class SunSpecModel:
    """One model found in the chain: its ID, length and the address of its ID register."""

    model_id: int
    length: int
    address: int


def scan_models(link: ModbusLink, meter: str, device_id: int,
                base_addresses: tuple[int, ...]) -> tuple[int, list[SunSpecModel]]:
    """Return the base address where "SunS" was found and the chain of models after it."""
    for base in base_addresses:
        try:
            marker = link.read(meter, "holding", base, 2, device_id)
        except MeterExceptionResponse:
            continue
        if tuple(marker) != MARKER:
            continue
        models: list[SunSpecModel] = []
        address = base + 2
        for _ in range(MAX_MODELS):
            model_id, length = link.read(meter, "holding", address, 2, device_id)
            if model_id == END_ID:
                return base, models
            models.append(SunSpecModel(model_id, length, address))
            address += 2 + length
        raise SunSpecNotFound(meter, f"model chain at {base} has no end marker", base=base)
    raise SunSpecNotFound(meter, f"no SunS marker at {list(base_addresses)}",
                          bases=list(base_addresses))


def resolve(link: ModbusLink, meter: str, device_id: int, profile: Profile) -> Profile:
    """Scan the device and return ``profile`` with absolute addresses for its meter model."""
    assert profile.sunspec is not None
    base, models = scan_models(link, meter, device_id, profile.sunspec.base_addresses)
    common = next((m for m in models if m.model_id == 1), None)
    if common is None:
        raise SunSpecNotFound(meter, f"no common model (1) after SunS at {base}", base=base)
    for model in models:
        family = profile.sunspec.family_for(model.model_id)
        if family is not None:
            return profile.resolve_sunspec(model.model_id, model.address, common.address)
    raise SunSpecNotFound(meter, f"no supported meter model at {base}: found "
                          f"{[m.model_id for m in models]}", base=base)
