"""Read planning: merge a profile's fields into as few Modbus requests as possible.

Fields of the same function (FC03/FC04) whose registers are close together are read in one
request, bridging gaps of at most ``max_gap`` registers, never more than ``max_registers``
(the Modbus limit is 125) per request. The plan is computed once per profile.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meter.profile import FieldSpec, Function

MODBUS_MAX_REGISTERS = 125


@dataclass(frozen=True)
class ReadBlock:
    """One read request and the fields it carries."""

    function: Function
    address: int
    count: int
    fields: tuple[FieldSpec, ...]

    def slice(self, spec: FieldSpec, registers: list[int]) -> list[int]:
        """The registers of ``spec`` out of this block's response."""
        start = spec.address - self.address
        return registers[start : start + spec.count]


def plan_reads(
    fields: Iterable[FieldSpec], *, max_registers: int = MODBUS_MAX_REGISTERS, max_gap: int = 16
) -> list[ReadBlock]:
    """Group ``fields`` into read blocks of at most ``max_registers`` registers each."""
    if not 1 <= max_registers <= MODBUS_MAX_REGISTERS:
        raise ValueError(f"max_registers must be 1..{MODBUS_MAX_REGISTERS}")
    fields = list(fields)
    blocks: list[ReadBlock] = []
    for function in ("holding", "input"):
        specs = sorted((f for f in fields if f.function == function), key=lambda f: f.address)
        current: list[FieldSpec] = []
        start = end = 0
        for spec in specs:
            if spec.count > max_registers:
                raise ValueError(f"field {spec.name} is wider than one request")
            spec_end = spec.address + spec.count
            if current and (
                spec.address - end <= max_gap and max(end, spec_end) - start <= max_registers
            ):
                current.append(spec)
                end = max(end, spec_end)
                continue
            if current:
                blocks.append(ReadBlock(function, start, end - start, tuple(current)))
            current, start, end = [spec], spec.address, spec_end
        if current:
            blocks.append(ReadBlock(function, start, end - start, tuple(current)))
    return blocks
