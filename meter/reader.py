"""The polling reader: trio-facing, robust, and honest about every fault.

:class:`MeterReader` polls any number of meters over Modbus TCP and RTU. Each poll reads a
meter's planned blocks in one worker-thread call (``trio.to_thread.run_sync``), so the trio
loop never blocks on pymodbus; meters are polled in parallel, meters sharing a serial bus share
one link and are serialised by it. Failed attempts are retried with exponential back-off.

Every poll returns a :class:`PollResult` holding a :class:`~meter.sample.MeterSample` *or* a
typed :class:`~meter.events.MeterError`, plus any :class:`~meter.events.MeterEvent`. Nothing is
raised out of :meth:`MeterReader.poll`, and no value that failed a check reaches a sample:
NaN/inf/not-implemented/out-of-limit values, exception responses, counters going backwards or
jumping beyond rated power x elapsed time are all rejected and counted in :attr:`stats`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from meter import sunspec
from meter.events import (
    MeterError,
    MeterEvent,
    MeterExceptionResponse,
    MeterProtocolError,
    MeterTimeout,
    MeterUnreachable,
)
from meter.guard import CounterGuard
from meter.plan import ReadBlock, plan_reads
from meter.profile import Profile, load_profile
from meter.sample import MeterSample, decode_sample
from meter.transport import Endpoint, ModbusLink, SerialEndpoint

RETRYABLE = (MeterTimeout, MeterUnreachable, MeterProtocolError)
BUSY_CODES = (5, 6)  # acknowledge, device busy: worth retrying


@dataclass(frozen=True)
class MeterConfig:
    """Where a meter is and what it is."""

    name: str
    profile: Profile | str
    endpoint: Endpoint
    device_id: int = 1


@dataclass
class MeterStats:
    """Counters for one meter, for metrics and the operator."""

    polls: int = 0
    samples: int = 0
    attempts: int = 0
    retries: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    online: bool | None = None
    last_error: MeterError | None = None
    last_sample: MeterSample | None = None


@dataclass(frozen=True)
class PollResult:
    """The outcome of one poll: a sample or an error, and any events."""

    meter: str
    sample: MeterSample | None
    error: MeterError | None
    events: tuple[MeterEvent, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the poll produced a sample."""
        return self.sample is not None


@dataclass
class _Meter:
    config: MeterConfig
    profile: Profile
    link: ModbusLink
    guard: CounterGuard
    resolved: Profile | None = None
    blocks: list[ReadBlock] = field(default_factory=list)
    stats: MeterStats = field(default_factory=MeterStats)
    lock: trio.Lock = field(default_factory=trio.Lock)


class MeterReader:
    """Polls meters over Modbus; see the module docstring for the guarantees.

    ``clock`` is the meters' time base in seconds (monotonic) used for the counter-rise check
    (rated power x elapsed time); against a simulator running ``speed`` times faster than real
    time, pass a clock that runs as fast (e.g. the simulator's ``sim_time``). Latency is always
    measured in real time.
    """

    def __init__(
        self,
        meters: list[MeterConfig],
        *,
        timeout_s: float = 1.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        backoff_max_s: float = 1.0,
        slow_s: float = 0.5,
        rebaseline_after: int = 3,
        max_resolution_wh: int = 1,
        max_threads: int = 64,
        share_tcp_connections: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_event: Callable[[MeterEvent], None] | None = None,
        event_history: int = 1000,
    ) -> None:
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.slow_s = slow_s
        self.clock = clock
        self.wall_clock = wall_clock
        self.on_event = on_event
        self.share_tcp_connections = share_tcp_connections
        self.events: collections.deque[MeterEvent] = collections.deque(maxlen=event_history)
        self._limiter = trio.CapacityLimiter(max_threads)
        self._links: dict[Endpoint, ModbusLink] = {}
        self._meters: dict[str, _Meter] = {}
        for config in meters:
            if config.name in self._meters:
                raise ValueError(f"duplicate meter name {config.name!r}")
            profile = (config.profile if isinstance(config.profile, Profile)
                       else load_profile(config.profile))
            self._meters[config.name] = _Meter(
                config=config,
                profile=profile,
                link=self._link(config.endpoint),
                guard=CounterGuard(config.name, profile.rated_power_w,
                                   rebaseline_after=rebaseline_after,
                                   max_resolution_wh=max_resolution_wh),
            )

    def _link(self, endpoint: Endpoint) -> ModbusLink:
        # One link per serial bus (RTU is half-duplex); by default one connection per TCP
        # meter so meters behind one gateway are polled in parallel. Gateways that allow few
        # connections get one shared connection per host:port (share_tcp_connections=True).
        if isinstance(endpoint, SerialEndpoint) or self.share_tcp_connections:
            if endpoint not in self._links:
                self._links[endpoint] = ModbusLink(endpoint, self.timeout_s)
            return self._links[endpoint]
        return ModbusLink(endpoint, self.timeout_s)

    @property
    def names(self) -> list[str]:
        """The configured meter names."""
        return list(self._meters)

    @property
    def stats(self) -> dict[str, MeterStats]:
        """Per-meter counters."""
        return {name: m.stats for name, m in self._meters.items()}

    def profile_of(self, name: str) -> Profile:
        """The meter's profile (resolved to absolute addresses once a SunSpec scan ran)."""
        m = self._meters[name]
        return m.resolved or m.profile

    def _emit(self, m: _Meter, events: list[MeterEvent]) -> None:
        for event in events:
            m.stats.events[event.kind] += 1
            self.events.append(event)
            if self.on_event is not None:
                self.on_event(event)

    def _read_all(self, m: _Meter) -> tuple[Profile, list[ReadBlock], list[list[int]]]:
        """Blocking: resolve the profile if needed, then read every block (worker thread)."""
        name, device_id = m.config.name, m.config.device_id
        if m.resolved is None:
            resolved = (sunspec.resolve(m.link, name, device_id, m.profile)
                        if m.profile.is_sunspec else m.profile)
            m.blocks = plan_reads(resolved.fields.values(), max_registers=resolved.max_registers,
                                  max_gap=resolved.max_gap)
            m.resolved = resolved
        responses = [m.link.read(name, b.function, b.address, b.count, device_id)
                     for b in m.blocks]
        return m.resolved, m.blocks, responses

    async def poll(self, name: str) -> PollResult:
        """Poll one meter (with retries); never raises a :class:`MeterError`.

        Concurrent polls of the same meter queue up: one meter is read by one poll at a time.
        """
        m = self._meters[name]
        async with m.lock:
            return await self._poll(name, m)

    async def _poll(self, name: str, m: _Meter) -> PollResult:
        m.stats.polls += 1
        events: list[MeterEvent] = []
        error: MeterError | None = None
        sample: MeterSample | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                m.stats.retries += 1
                await trio.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s))
            m.stats.attempts += 1
            started = time.perf_counter()
            try:
                profile, blocks, responses = await trio.to_thread.run_sync(
                    self._read_all, m, limiter=self._limiter)
            except MeterError as exc:
                error = exc
                if isinstance(exc, RETRYABLE) or (
                    isinstance(exc, MeterExceptionResponse) and exc.context.get("code")
                    in BUSY_CODES
                ):
                    continue
                break
            latency = time.perf_counter() - started
            now, wall = self.clock(), self.wall_clock()
            try:
                decoded = decode_sample(name, profile, blocks, responses)
            except MeterError as exc:
                error = exc
                break
            sample, guard_events, error = m.guard.feed(decoded, now, wall, latency)
            events.extend(guard_events)
            if latency > self.slow_s:
                events.append(MeterEvent(name, "slow_response",
                                         f"poll took {latency:.3f} s", wall,
                                         {"latency_s": latency}))
            break
        wall = self.wall_clock()
        reachable = sample is not None or not isinstance(error, RETRYABLE)
        if sample is not None:
            m.stats.samples += 1
            m.stats.last_sample = sample
        if error is not None:
            m.stats.errors[error.kind] += 1
            m.stats.last_error = error
            events.append(MeterEvent(name, "rejected", str(error), wall,
                                     {"error": error.kind, **error.context}))
        if reachable and m.stats.online is False:
            events.append(MeterEvent(name, "online", "meter answers again", wall, {}))
        elif not reachable and m.stats.online is not False:
            events.append(MeterEvent(name, "offline", f"meter does not answer: {error}", wall,
                                     {"error": error.kind if error else ""}))
            if m.profile.is_sunspec:
                m.resolved = None  # rescan when it comes back: it may be another device
        m.stats.online = reachable
        self._emit(m, events)
        return PollResult(name, sample, error, tuple(events))

    async def poll_all(self, names: Sequence[str] | None = None) -> dict[str, PollResult]:
        """Poll every meter (or those named) in parallel; one result per meter."""
        results: dict[str, PollResult] = {}
        chosen = list(self._meters) if names is None else [n for n in self._meters if n in names]

        async def one(name: str) -> None:
            results[name] = await self.poll(name)

        async with trio.open_nursery() as nursery:
            for name in chosen:
                nursery.start_soon(one, name)
        return {name: results[name] for name in chosen}

    async def run(self, interval_s: float, send: trio.MemorySendChannel[PollResult]) -> None:
        """Poll every meter every ``interval_s`` seconds and send each result, forever."""
        async with send:
            while True:
                deadline = trio.current_time() + interval_s
                for result in (await self.poll_all()).values():
                    await send.send(result)
                await trio.sleep_until(deadline)

    def close(self) -> None:
        """Close every connection."""
        for m in self._meters.values():
            m.link.close()
