"""Counter plausibility across polls: a sans-I/O state machine per meter.

:class:`CounterGuard` takes each decoded poll with the time it was taken and either accepts it
(returning the sample and any events) or rejects it with a typed error. It never lets through
a counter that went backwards or rose faster than the meter's rated power allows since the last
accepted sample. A changed serial number means the meter was replaced: the counters start a new
*epoch* (baseline) and a ``serial_changed`` event is reported. A counter that *restarted*
(went backwards: a reset register, a replaced battery-backed memory, a wrapped register) and
then stays consistent for ``rebaseline_after`` polls also starts a new epoch, with a
``counter_rebaselined`` event; until then every such poll is rejected. A counter that *jumped*
forward faster than the rated power allows never becomes a baseline, however long it stays
there: signing it would bill (or pay) the household for energy no one moved. Every such poll
is rejected (``CounterJump``), and a ``counter_jump_persists`` event is reported once per
``rebaseline_after`` consistent polls so the operator replaces or resets the meter. Consumers
never subtract counters across epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meter.events import CounterBackwards, CounterJump, MeterError, MeterEvent
from meter.sample import Decoded, MeterSample

COUNTERS = ("import_energy", "export_energy")
FeedResult = tuple[MeterSample | None, list[MeterEvent], MeterError | None]


@dataclass
class _Accepted:
    serial: str
    counters: dict[str, int]
    time: float


@dataclass
class CounterGuard:
    """Per-meter counter checks; feed it every decoded poll in time order."""

    meter: str
    rated_power_w: int
    rebaseline_after: int = 3
    max_resolution_wh: int = 1
    slack_wh: int = 1
    epoch: int = 0
    last: _Accepted | None = None
    _pending: list[tuple[Decoded, float]] = field(default_factory=list)
    _low_res_reported: set[str] = field(default_factory=set)
    _jumps: int = 0
    """Polls in a row rejected as a forward jump."""

    def allowed_rise(self, elapsed_s: float, resolution_wh: int) -> int:
        """Most a counter may rise in ``elapsed_s`` at rated power, plus quantisation slack."""
        return int(self.rated_power_w * max(elapsed_s, 0.0) / 3600) + resolution_wh + self.slack_wh

    def _check(self, prev: dict[str, int], prev_time: float, decoded: Decoded,
               now: float) -> MeterError | None:
        for name in COUNTERS:
            old, new = prev[name], decoded.counters[name]
            if new < old:
                return CounterBackwards(
                    self.meter, f"{name} went backwards from {old} Wh to {new} Wh",
                    field=name, previous_wh=old, value_wh=new, epoch=self.epoch,
                )
            limit = self.allowed_rise(now - prev_time, decoded.resolution.get(name, 1))
            if new - old > limit:
                return CounterJump(
                    self.meter, f"{name} rose {new - old} Wh in {now - prev_time:.1f} s "
                    f"(at most {limit} Wh at {self.rated_power_w} W)",
                    field=name, previous_wh=old, value_wh=new, allowed_wh=limit,
                    elapsed_s=now - prev_time, epoch=self.epoch,
                )
        return None

    def _pending_consistent(self) -> bool:
        for (a, ta), (b, tb) in zip(self._pending, self._pending[1:], strict=False):
            if a.serial != b.serial:
                return False
            if self._check(a.counters, ta, b, tb) is not None:
                return False
        return True

    def feed(self, decoded: Decoded, now: float, wall_time: float,
             latency_s: float = 0.0) -> FeedResult:
        """Check one decoded poll taken at monotonic time ``now``.

        Returns ``(sample, events, error)``: exactly one of ``sample`` and ``error`` is set.
        """
        events: list[MeterEvent] = []
        if self.last is not None and decoded.serial != self.last.serial:
            events.append(MeterEvent(
                self.meter, "serial_changed",
                f"serial changed from {self.last.serial} to {decoded.serial}: new baseline",
                wall_time,
                {"old_serial": self.last.serial, "new_serial": decoded.serial,
                 "old_counters": dict(self.last.counters), "new_counters": dict(decoded.counters),
                 "epoch": self.epoch + 1},
            ))
            self.epoch += 1
            self._pending.clear()
            self._jumps = 0
        elif self.last is not None:
            error = self._check(self.last.counters, self.last.time, decoded, now)
            if isinstance(error, CounterJump):
                # never a new baseline (see the module docstring); say so when it persists
                self._jumps += 1
                if self._jumps % self.rebaseline_after == 0:
                    events.append(MeterEvent(
                        self.meter, "counter_jump_persists",
                        f"{error.message} for {self._jumps} polls: the meter needs attention "
                        "(its readings are not signed until it is back in range or replaced)",
                        wall_time,
                        {"counters": dict(decoded.counters),
                         "last_accepted": dict(self.last.counters), "polls": self._jumps},
                    ))
                self._pending.clear()
                return None, events, error
            self._jumps = 0
            if error is not None:
                self._pending.append((decoded, now))
                if len(self._pending) >= self.rebaseline_after and self._pending_consistent():
                    events.append(MeterEvent(
                        self.meter, "counter_rebaselined",
                        f"counters stayed consistent for {len(self._pending)} polls after "
                        f"'{error.message}': new baseline", wall_time,
                        {"old_counters": dict(self.last.counters),
                         "new_counters": dict(decoded.counters), "epoch": self.epoch + 1},
                    ))
                    self.epoch += 1
                    self._pending.clear()
                else:
                    if len(self._pending) >= self.rebaseline_after:
                        self._pending.pop(0)
                    return None, events, error
            else:
                self._pending.clear()
        for name in COUNTERS:
            res = decoded.resolution.get(name, 1)
            key = f"{self.epoch}:{name}"
            if res > self.max_resolution_wh and key not in self._low_res_reported:
                self._low_res_reported.add(key)
                events.append(MeterEvent(
                    self.meter, "low_resolution",
                    f"{name} register resolution is {res} Wh at {decoded.counters[name]} Wh",
                    wall_time, {"field": name, "resolution_wh": res,
                                "value_wh": decoded.counters[name]},
                ))
        self.last = _Accepted(decoded.serial, dict(decoded.counters), now)
        v = decoded.values
        sample = MeterSample(
            meter=self.meter,
            serial=decoded.serial,
            time=wall_time,
            import_wh=decoded.counters["import_energy"],
            export_wh=decoded.counters["export_energy"],
            power_w=float(v["power"]),  # type: ignore[arg-type]
            voltage_v=_opt(v.get("voltage")),
            frequency_hz=_opt(v.get("frequency")),
            import_resolution_wh=decoded.resolution.get("import_energy", 1),
            export_resolution_wh=decoded.resolution.get("export_energy", 1),
            epoch=self.epoch,
            latency_s=latency_s,
            values=dict(v),
        )
        return sample, events, None


def _opt(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None
