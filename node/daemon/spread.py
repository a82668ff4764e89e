"""When a household publishes its reading and its next order after a slot ends (issue 19).

Every household's slot ends at the same instant. Publishing every reading and every order then
makes the whole grid's gossip, validation and Raft work of a round land in the same few
seconds: with 50 households on a two-core machine the CPUs stayed saturated for 17-21 s after
each boundary, and the settlement proposed at the reading deadline waited in that queue. Meters
report at spread-out times in metering systems for the same reason.

So each household publishes at its own offset, the same every slot: a fraction in [0, 1)
derived from its DID (uniform over households, stable across restarts, no clock or random
source). The meter is still read at the boundary (the counters belong to the slot end); only
the publication waits:

- the **reading** within the first quarter of the settle delay after ``read_delay``: three
  quarters of the delay remain for it to commit before the settlement is proposed;
- the **order** for the slot whose gate is open at the boundary from a quarter of the settle
  delay after the reading deadline (out of the readings' and the settlement's way), within a
  quarter slot, ending at least half the remaining time before that slot's gate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from market.schedule import Schedule

READING_SHARE = 0.25
"""Readings spread over this share of the settle delay."""
ORDER_SLOT_SHARE = 0.25
"""Orders spread over at most this share of a slot."""
ORDER_AFTER_SETTLE = 1.25
"""Orders start this many settle delays after the slot end (after the reading deadline)."""
ORDER_MIN_LEAD_SECONDS = 2.0
"""An order placed outside the spread (at start-up, or once the meter first answers) goes to
the next slot when the open slot's gate is closer than this (at most a quarter slot): it must
reach every voter, and be proposed, before the gate closes; one that arrives later is refused
there as ``slot_closed``, counted as invalid gossip and held against its household."""


def spread_fraction(did: str) -> float:
    """This household's offset in [0, 1): the first 8 bytes of SHA-256 of its DID."""
    digest = hashlib.sha256(did.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def order_slot_at(schedule: Schedule, now: float) -> int:
    """The slot an order placed at ``now`` is for: the open slot, or the next one when the open
    slot's gate closes within :data:`ORDER_MIN_LEAD_SECONDS`."""
    slot = schedule.open_slot(now)
    lead = min(ORDER_MIN_LEAD_SECONDS, schedule.slot_seconds / 4)
    return slot + 1 if schedule.gate_time(slot) - now < lead else slot


@dataclass(frozen=True, slots=True)
class Publication:
    """When to publish after the boundary ``end`` (wall-clock seconds)."""

    reading_at: float
    order_at: float
    order_slot: int
    """The slot the order is for: the one open at the boundary."""


def publication_times(
    schedule: Schedule, end: float, read_delay: float, fraction: float, spread: bool = True
) -> Publication:
    """The wall times at which a household with offset ``fraction`` publishes its reading and
    order after the slot boundary ``end`` (``spread`` False: both at ``end + read_delay``)."""
    first = end + read_delay
    order_slot = schedule.open_slot(first)
    if not spread:
        return Publication(first, first, order_slot)
    reading_at = first + fraction * READING_SHARE * schedule.settle_delay_seconds
    order_from = end + ORDER_AFTER_SETTLE * schedule.settle_delay_seconds
    gate = schedule.gate_time(order_slot)
    window = min(ORDER_SLOT_SHARE * schedule.slot_seconds, (gate - order_from) / 2)
    if window <= 0:  # a schedule with hardly any time before the gate: as soon as possible
        return Publication(reading_at, first, order_slot)
    return Publication(reading_at, max(first, order_from + fraction * window), order_slot)
