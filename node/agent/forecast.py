"""The learning forecaster: a household's net export per slot, by time of day and day type, with a
clear-sky PV shape from the household's location (docs/node.md, "The agent's forecast").

Sans-I/O apart from :func:`save_forecaster` / :func:`load_forecaster` (one small JSON file).
Floats are fine here (the agent is not the replicated state machine); every forecast handed out
is an integer number of Wh.

**Model.** The trading meter measures only the net export (PV minus load), so the net is
modelled directly, with the clear-sky irradiance of the slot as a regressor::

    net(t) = level[tod] + offset[day type][tod] + capacity x clear_sky(t) + persistence

- ``clear_sky(t)``: Haurwitz clear-sky irradiance / 1000 W/m² averaged over the slot, from the
  sun's elevation at the slot's UTC time and the configured latitude/longitude (declination,
  equation of time, hour angle); 0 at night, largest near solar noon. 0 without a location.
- ``capacity``: Wh per slot at ``clear_sky = 1`` (kWp x performance x mean cloudiness), learned
  by normalised least mean squares on the residuals of sunny slots, never negative. As the
  seasons move the clear-sky curve, the forecast follows at once; the per-slot averages only
  learn what the curve does not explain.
- ``level[tod]``: exponentially weighted average per slot of the day of the net minus the PV
  term, learned from every day; ``offset[day type][tod]`` the Saturday's and Sunday's
  difference from it (weekdays: 0). Updates use the residual clipped to the slot's recent
  mean absolute residual (a Huber step): a rare spike (a kettle, an oven) moves the average
  little, so it tracks the typical slot (what minimises the absolute error, and the money).
- ``persistence``: the last metered slot's residual carried forward, ``phi ** lag`` times (for
  sunny slots scaled by the ratio of clear-sky values: a clear-sky index persistence, passing
  clouds), with ``phi`` in [0, 0.95] learned separately for sunny and dark slots from
  consecutive residuals (0 for uncorrelated noise).

A slot of the day never seen yet is forecast as the most recent metered slot (persistence),
as the previous agent did; ``None`` before any observation.

**Accuracy.** :meth:`LearningForecaster.issue` is the forecast an order is based on; it is
remembered, and when the slot is metered its absolute error joins a rolling window (the last
672 slots): :meth:`LearningForecaster.accuracy` gives the mean absolute error over the last 96
and 672 of them.

**Persistence.** :meth:`LearningForecaster.to_json` / :meth:`LearningForecaster.from_json`
(validated: types, lengths, finite bounded numbers; a mismatching slot length is refused);
:func:`save_forecaster` writes it atomically (temporary file, fsync, rename), bounded
(about 100 KB at 1440 buckets); :func:`load_forecaster` returns a fresh forecaster and the
reason when the file is missing, too large, corrupt or hostile.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1
"""Version of the persisted JSON document."""
FORECAST_FILE = "forecast.json"
"""The file name in the node's data directory."""
MAX_BUCKETS = 1440
"""At most this many times of day (one-minute resolution): bounds memory and the file."""
MAX_FILE_BYTES = 512_000
"""A larger forecast file is ignored unread."""
MAX_ABS = 1e9
"""Largest magnitude any persisted number may have (Wh)."""
WINDOWS = (96, 672)
"""The accuracy windows (slots): a day and a week of 15-minute slots."""
MAX_ISSUED = 256
"""Forecasts remembered for their error (older ones are dropped)."""
DAY_TYPES = ("weekday", "saturday", "sunday")
SUN = 0.05
"""Clear-sky value above which a slot counts as sunny (persistence, capacity learning)."""
MAX_LAG = 8
"""A residual older than this many slots is not carried forward."""


class ForecastFileError(ValueError):
    """A persisted forecast that cannot be used (corrupt, hostile, or for another slot length)."""


# -- solar geometry ---------------------------------------------------------------------------


def solar_elevation_sin(latitude: float, longitude: float, t: float) -> float:
    """Sine of the sun's elevation at Unix time ``t`` (UTC) seen from ``latitude``/``longitude``
    (degrees, east positive): declination and equation of time (Spencer's series), apparent
    solar time from UTC plus four minutes per degree of longitude. Negative at night."""
    day, sod = divmod(t, 86_400.0)
    date = dt.date(1970, 1, 1) + dt.timedelta(days=int(day))
    gamma = 2 * math.pi / 365 * (date.timetuple().tm_yday - 1 + (sod / 3600 - 12) / 24)
    decl = (0.006918 - 0.399912 * math.cos(gamma) + 0.070257 * math.sin(gamma)
            - 0.006758 * math.cos(2 * gamma) + 0.000907 * math.sin(2 * gamma)
            - 0.002697 * math.cos(3 * gamma) + 0.00148 * math.sin(3 * gamma))  # fmt: skip
    eot_min = 229.18 * (0.000075 + 0.001868 * math.cos(gamma) - 0.032077 * math.sin(gamma)
                        - 0.014615 * math.cos(2 * gamma)
                        - 0.040849 * math.sin(2 * gamma))  # fmt: skip
    solar_min = sod / 60 + eot_min + 4 * longitude
    hour_angle = math.radians(solar_min / 4 - 180)
    lat = math.radians(latitude)
    return math.sin(lat) * math.sin(decl) + math.cos(lat) * math.cos(decl) * math.cos(hour_angle)


def clear_sky(latitude: float, longitude: float, t: float) -> float:
    """Clear-sky global horizontal irradiance at ``t`` in kW/m² (Haurwitz; 0 at night)."""
    s = solar_elevation_sin(latitude, longitude, t)
    if s <= 0.01:
        return 0.0
    return 1.098 * s * math.exp(-0.057 / s)


def slot_clear_sky(latitude: float, longitude: float, start: float, seconds: float) -> float:
    """The mean clear-sky irradiance (kW/m²) over a slot from ``start`` lasting ``seconds``
    (Simpson's rule on start, middle and end)."""
    a = clear_sky(latitude, longitude, start)
    m = clear_sky(latitude, longitude, start + seconds / 2)
    b = clear_sky(latitude, longitude, start + seconds)
    return (a + 4 * m + b) / 6


def check_location(latitude: float, longitude: float) -> None:
    """Raise ValueError unless latitude is in [-90, 90] and longitude in [-180, 180]."""
    for name, value, bound in (("latitude", latitude, 90.0), ("longitude", longitude, 180.0)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number")
        if not math.isfinite(value) or abs(value) > bound:
            raise ValueError(f"{name} must be within ±{bound:g} degrees, not {value}")


# -- the forecaster -------------------------------------------------------------------------


@dataclass
class _Phi:
    """Online regression of a residual on the previous one (through the origin)."""

    cov: float = 0.0
    var: float = 0.0

    def learn(self, y: float, x: float, rate: float = 0.02) -> None:
        self.cov += rate * (y * x - self.cov)
        self.var += rate * (x * x - self.var)

    @property
    def value(self) -> float:
        return 0.0 if self.var <= 1e-9 else min(0.95, max(0.0, self.cov / self.var))


@dataclass
class LearningForecaster:
    """Net export per slot (Wh), learned per time of day and day type with a clear-sky PV
    term (see the module docstring). ``observe`` what the meter measured, ``predict`` (or
    ``issue``, which also records the forecast for the accuracy figures)."""

    slot_seconds: int
    latitude: float | None = None
    longitude: float | None = None
    level_weight: float = 0.2
    """Weight of a new day in a time of day's average."""
    offset_weight: float = 1 / 3
    """Weight of a new Saturday/Sunday in its difference from the average."""
    capacity_rate: float = 0.003
    """Step of the normalised least-mean-squares update of the PV capacity."""
    buckets: int = field(init=False)
    level: list[float | None] = field(init=False)
    offset: list[list[float | None]] = field(init=False)
    spread: list[float | None] = field(init=False)
    seen: list[int] = field(init=False)
    """Per time of day: days learned (capped at 255): the first days form a plain mean."""
    """Per time of day: recent mean absolute residual (the Huber clip)."""
    capacity: float = 0.0
    cs2: float = 0.0
    """Recent mean square of the clear-sky value of sunny slots (normalises the update)."""
    phi_sun: _Phi = field(default_factory=_Phi)
    phi_dark: _Phi = field(default_factory=_Phi)
    last: int | None = None
    """The most recent metered net export (the fallback forecast)."""
    last_slot: int | None = None
    last_resid: float | None = None
    last_cs: float = 0.0
    observed: int = 0
    """Slots learned from since the state began (persisted)."""
    errors: collections.deque[int] = field(
        default_factory=lambda: collections.deque(maxlen=WINDOWS[-1])
    )
    issued: dict[int, int] = field(default_factory=dict)
    _summary: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if (
            isinstance(self.slot_seconds, bool)
            or not isinstance(self.slot_seconds, int)
            or (self.slot_seconds <= 0)
        ):
            raise ValueError("slot_seconds must be a positive integer")
        if (self.latitude is None) != (self.longitude is None):
            raise ValueError("latitude and longitude go together")
        if self.latitude is not None and self.longitude is not None:
            check_location(self.latitude, self.longitude)
        self.buckets = max(1, min(MAX_BUCKETS, 86_400 // self.slot_seconds))
        self.level = [None] * self.buckets
        self.offset = [[None] * self.buckets for _ in DAY_TYPES[1:]]
        self.spread = [None] * self.buckets
        self.seen = [0] * self.buckets
        self._publish()

    # -- calendar and geometry --

    @property
    def located(self) -> bool:
        """True when a location is configured (the clear-sky term is on)."""
        return self.latitude is not None

    def _local(self, slot: int) -> int:
        """Seconds of the slot's start on a clock shifted by the longitude's whole hours (local
        mean time, roughly: day boundaries near midnight)."""
        shift = 0 if self.longitude is None else round(self.longitude / 15) * 3600
        return slot * self.slot_seconds + shift

    def bucket(self, slot: int) -> int:
        """The slot's time of day (0 .. buckets - 1)."""
        return (self._local(slot) % 86_400) * self.buckets // 86_400

    def day_type(self, slot: int) -> int:
        """0 weekday, 1 Saturday, 2 Sunday (1970-01-01 was a Thursday)."""
        weekday = (self._local(slot) // 86_400 + 3) % 7
        return 1 if weekday == 5 else 2 if weekday == 6 else 0

    def clear_sky(self, slot: int) -> float:
        """The slot's mean clear-sky irradiance (kW/m²; 0 without a location)."""
        if self.latitude is None or self.longitude is None:
            return 0.0
        start = slot * self.slot_seconds
        return slot_clear_sky(self.latitude, self.longitude, start, self.slot_seconds)

    def _offset(self, kind: int, b: int) -> float:
        return 0.0 if kind == 0 else self.offset[kind - 1][b] or 0.0

    # -- forecasting --

    def _persistence(self, slot: int, cs: float) -> float:
        if self.last_slot is None or self.last_resid is None:
            return 0.0
        lag = slot - self.last_slot
        if not 0 < lag <= MAX_LAG:
            return 0.0
        if cs > SUN and self.last_cs > SUN:
            return self.phi_sun.value**lag * self.last_resid * min(3.0, cs / self.last_cs)
        if cs <= SUN and self.last_cs <= SUN:
            return self.phi_dark.value**lag * self.last_resid
        return 0.0

    def _base(self, slot: int, cs: float) -> float | None:
        level = self.level[self.bucket(slot)]
        if level is None:
            return None
        return level + self._offset(self.day_type(slot), self.bucket(slot)) + self.capacity * cs

    def predict(self, slot: int) -> int | None:
        """Forecast net export of ``slot`` in Wh (None before any observation)."""
        cs = self.clear_sky(slot)
        base = self._base(slot, cs)
        if base is None:
            return self.last
        value = base + self._persistence(slot, cs)
        return round(max(-MAX_ABS, min(MAX_ABS, value)))

    def issue(self, slot: int) -> int | None:
        """:meth:`predict`, remembered: its error is counted once ``slot`` is metered."""
        value = self.predict(slot)
        if value is not None:
            self.issued[slot] = value
            if len(self.issued) > MAX_ISSUED:
                for old in sorted(self.issued)[: len(self.issued) - MAX_ISSUED]:
                    del self.issued[old]
        return value

    # -- learning --

    def observe(self, slot: int, net_export_wh: int) -> None:
        """Learn the net export the meter measured in ``slot``."""
        net = float(net_export_wh)
        b, kind = self.bucket(slot), self.day_type(slot)
        cs = self.clear_sky(slot)
        y = net - self.capacity * cs  # what the averages learn
        resid: float | None = None
        level = self.level[b]
        if level is None:
            self.level[b] = y - self._offset(kind, b)
        elif kind and self.offset[kind - 1][b] is None:
            self.offset[kind - 1][b] = y - level
        else:
            e = y - level - self._offset(kind, b)
            resid = e
            spread = self.spread[b]
            clip = abs(e) if spread is None else max(1.0, 1.5 * spread)
            step = max(-clip, min(clip, e))
            self.spread[b] = abs(e) if spread is None else spread + 0.1 * (abs(e) - spread)
            if kind:
                off = self.offset[kind - 1][b] or 0.0
                self.offset[kind - 1][b] = off + self.offset_weight * step
                step *= 1 - self.offset_weight
            self.seen[b] = min(255, self.seen[b] + 1)
            self.level[b] = level + max(self.level_weight, 1 / (self.seen[b] + 1)) * step
            if cs > SUN:
                self.cs2 += 0.02 * (cs * cs - self.cs2)
                grad = self.capacity_rate * step * cs / max(self.cs2, 0.01)
                self.capacity = max(0.0, min(MAX_ABS, self.capacity + grad))
            # persistence: this residual against the previous slot's
            if self.last_slot == slot - 1 and self.last_resid is not None:
                if cs > SUN and self.last_cs > SUN:
                    self.phi_sun.learn(e, self.last_resid * min(3.0, cs / self.last_cs))
                elif cs <= SUN and self.last_cs <= SUN:
                    self.phi_dark.learn(e, self.last_resid)
        self.last_slot, self.last_resid, self.last_cs = slot, resid, cs
        self.last = net_export_wh
        self.observed += 1
        forecast = self.issued.pop(slot, None)
        if forecast is not None:
            self.errors.append(min(abs(net_export_wh - forecast), int(MAX_ABS)))
        for old in [s for s in self.issued if s <= slot]:
            del self.issued[old]
        self._publish()

    # -- accuracy --

    def _publish(self) -> None:
        errors = list(self.errors)
        mae: dict[str, int | None] = {}
        samples: dict[str, int] = {}
        for window in WINDOWS:
            recent = errors[-window:]
            mae[f"last_{window}"] = round(sum(recent) / len(recent)) if recent else None
            samples[f"last_{window}"] = len(recent)
        # replaced whole: a reader on another thread (the metrics scrape) sees one or the other
        self._summary = {
            "mae_wh": mae,
            "samples": samples,
            "observed": self.observed,
            "located": self.located,
            "capacity_wh": round(self.capacity),
            "time_slots_learned": sum(v is not None for v in self.level),
        }

    def accuracy(self) -> dict[str, Any]:
        """The status document's ``agent.forecast``: ``mae_wh`` and ``samples`` over the last
        96 and 672 metered slots that had an issued forecast (None/0 before any), ``observed``
        (slots learned from), ``located`` (clear-sky term on), ``capacity_wh`` (learned PV Wh per
        slot at 1 kW/m²), ``time_slots_learned``."""
        return dict(self._summary)

    # -- persistence --

    def to_json(self) -> dict[str, Any]:
        """The learned state as a JSON-able document (:meth:`from_json` reads it back)."""

        def num(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {
            "format": FORMAT,
            "slot_seconds": self.slot_seconds,
            "buckets": self.buckets,
            "latitude": self.latitude,
            "longitude": self.longitude,
            "level": [num(x) for x in self.level],
            "offset": [[num(x) for x in row] for row in self.offset],
            "spread": [num(x) for x in self.spread],
            "capacity": num(self.capacity),
            "cs2": num(self.cs2),
            "phi": [[num(p.cov), num(p.var)] for p in (self.phi_sun, self.phi_dark)],
            "last": self.last,
            "last_slot": self.last_slot,
            "last_resid": num(self.last_resid),
            "last_cs": num(self.last_cs),
            "observed": self.observed,
            "errors": list(self.errors),
            "issued": [[s, v] for s, v in sorted(self.issued.items())],
        }

    @classmethod
    def from_json(
        cls,
        doc: Any,
        slot_seconds: int,
        latitude: float | None = None,
        longitude: float | None = None,
    ) -> LearningForecaster:
        """A forecaster for ``slot_seconds`` (and the location configured now) from a
        :meth:`to_json` document; raises :class:`ForecastFileError` naming what is wrong. A
        document of another slot length or format is refused; one learned at another location
        keeps its averages but relearns the PV capacity."""
        f = cls(slot_seconds, latitude, longitude)
        if not isinstance(doc, dict):
            raise ForecastFileError("not a JSON object")
        if doc.get("format") != FORMAT:
            raise ForecastFileError(f"format {doc.get('format')!r} is not {FORMAT}")
        if _int(doc, "slot_seconds") != slot_seconds or _int(doc, "buckets") != f.buckets:
            raise ForecastFileError("learned for another slot length")
        f.level = _floats(doc.get("level"), f.buckets, "level")
        offset = doc.get("offset")
        if not isinstance(offset, list) or len(offset) != len(DAY_TYPES) - 1:
            raise ForecastFileError("offset: not a list of two rows")
        f.offset = [_floats(row, f.buckets, "offset") for row in offset]
        f.spread = _floats(doc.get("spread"), f.buckets, "spread")
        if any(s is not None and s < 0 for s in f.spread):
            raise ForecastFileError("spread: negative")
        same_place = (doc.get("latitude"), doc.get("longitude")) == (latitude, longitude)
        if same_place:
            f.capacity = _float(doc.get("capacity"), "capacity", low=0.0)
            f.cs2 = _float(doc.get("cs2"), "cs2", low=0.0)
        phi = doc.get("phi")
        if not isinstance(phi, list) or len(phi) != 2:
            raise ForecastFileError("phi: not a list of two pairs")
        for target, pair in zip((f.phi_sun, f.phi_dark), phi, strict=True):
            if not isinstance(pair, list) or len(pair) != 2:
                raise ForecastFileError("phi: not a pair")
            target.cov = _float(pair[0], "phi")
            target.var = _float(pair[1], "phi", low=0.0)
        f.last = _opt_int(doc.get("last"), "last")
        f.last_slot = _opt_int(doc.get("last_slot"), "last_slot", low=0)
        resid = doc.get("last_resid")
        f.last_resid = None if resid is None else _float(resid, "last_resid")
        f.last_cs = _float(doc.get("last_cs"), "last_cs", low=0.0) if same_place else 0.0
        observed = _opt_int(doc.get("observed"), "observed", low=0)
        f.observed = observed or 0
        errors = doc.get("errors")
        if not isinstance(errors, list) or len(errors) > WINDOWS[-1]:
            raise ForecastFileError("errors: not a list of at most 672")
        f.errors.extend(_opt_int(e, "errors", low=0) or 0 for e in errors)
        issued = doc.get("issued")
        if not isinstance(issued, list) or len(issued) > MAX_ISSUED:
            raise ForecastFileError(f"issued: not a list of at most {MAX_ISSUED}")
        for item in issued:
            if not isinstance(item, list) or len(item) != 2:
                raise ForecastFileError("issued: not a [slot, Wh] pair")
            slot, value = _opt_int(item[0], "issued", low=0), _opt_int(item[1], "issued")
            if slot is None or value is None:
                raise ForecastFileError("issued: null")
            f.issued[slot] = value
        f._publish()
        return f


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if type(value) is not int:
        raise ForecastFileError(f"{key}: not an integer")
    return value


def _opt_int(value: Any, what: str, low: float = -MAX_ABS) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not low <= value <= MAX_ABS * 1e3:
        raise ForecastFileError(f"{what}: not an integer in range")
    return value


def _float(value: Any, what: str, low: float = -MAX_ABS) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ForecastFileError(f"{what}: not a number")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= MAX_ABS:
        raise ForecastFileError(f"{what}: {value} out of range")
    return value


def _floats(value: Any, length: int, what: str) -> list[float | None]:
    if not isinstance(value, list) or len(value) != length:
        raise ForecastFileError(f"{what}: not a list of {length}")
    return [None if v is None else _float(v, what) for v in value]


def save_forecaster(forecaster: LearningForecaster, path: Path) -> None:
    """Write the forecaster's state to ``path`` atomically (:func:`write_forecast`)."""
    write_forecast(forecaster.to_json(), path)


def write_forecast(doc: dict[str, Any], path: Path) -> None:
    """Write a :meth:`LearningForecaster.to_json` document to ``path`` atomically: a temporary
    file beside it, fsynced, renamed over the old one, and the directory fsynced. (Take the
    document on the forecaster's thread; the write may run in a worker thread.)"""
    data = json.dumps(doc, separators=(",", ":")).encode()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # some filesystems refuse a directory fsync
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_forecaster(
    path: Path,
    slot_seconds: int,
    latitude: float | None = None,
    longitude: float | None = None,
) -> tuple[LearningForecaster, str | None]:
    """The forecaster persisted at ``path``, or a fresh one and why the file was not used (None:
    loaded, or no file yet). Never raises for the file's content: a file that is too large,
    not UTF-8 JSON, or fails validation is ignored."""
    fresh = LearningForecaster(slot_seconds, latitude, longitude)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return fresh, None
    except OSError as exc:
        return fresh, f"cannot read {path}: {exc.strerror or exc}"
    if len(data) > MAX_FILE_BYTES:
        return fresh, f"{path}: larger than {MAX_FILE_BYTES} bytes"
    try:
        doc = json.loads(data.decode("utf-8"))
        return LearningForecaster.from_json(doc, slot_seconds, latitude, longitude), None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, ours
        return fresh, f"{path}: {exc}"


class ForecastCollector:
    """Prometheus gauges of a forecaster's accuracy, read at scrape time (duck-typed collector:
    the registry calls :meth:`collect`; prometheus is imported only then)."""

    def __init__(self, forecaster: Any) -> None:
        self._forecaster = forecaster
        """A zero-argument callable returning the current :class:`LearningForecaster`."""

    def collect(self) -> Iterator[Any]:
        """``microgrid_forecast_mae_wh{window}`` and ``microgrid_forecast_samples{window}``."""
        from prometheus_client.core import GaugeMetricFamily

        summary = self._forecaster().accuracy()
        mae = GaugeMetricFamily("microgrid_forecast_mae_wh",
                                "Mean absolute error of the agent's forecasts per slot (Wh) over "
                                "the last <window> metered slots", labels=["window"])  # fmt: skip
        samples = GaugeMetricFamily("microgrid_forecast_samples",
                                    "Forecast errors in the window", labels=["window"])  # fmt: skip
        for window in WINDOWS:
            key = f"last_{window}"
            value = summary["mae_wh"][key]
            if value is not None:
                mae.add_metric([str(window)], value)
            samples.add_metric([str(window)], summary["samples"][key])
        yield mae
        yield samples
