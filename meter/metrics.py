"""Prometheus view of a :class:`~meter.reader.MeterReader`'s counters.

:class:`MeterCollector` reads ``reader.stats`` at scrape time, so the reader itself has no
metrics dependency and the node registers the collector on its own registry::

    registry.register(MeterCollector(reader))

Labels are bounded: meter names come from the node's configuration, error and event kinds
from :mod:`meter.events`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meter.reader import MeterReader


class MeterCollector(Collector):
    """Exports polls, samples, retries, errors and events per meter, and whether it answers."""

    def __init__(self, reader: MeterReader) -> None:
        self.reader = reader

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from the reader's current counters."""
        polls = CounterMetricFamily("microgrid_meter_polls", "Meter polls", labels=["meter"])
        samples = CounterMetricFamily("microgrid_meter_samples",
                                      "Polls that produced an accepted sample", labels=["meter"])
        retries = CounterMetricFamily("microgrid_meter_retries", "Retried attempts",
                                      labels=["meter"])
        errors = CounterMetricFamily("microgrid_meter_errors", "Polls rejected, by error kind",
                                     labels=["meter", "kind"])
        events = CounterMetricFamily("microgrid_meter_events", "Meter events, by kind",
                                     labels=["meter", "kind"])
        online = GaugeMetricFamily("microgrid_meter_online",
                                   "1 if the meter answered its last poll", labels=["meter"])
        latency = GaugeMetricFamily("microgrid_meter_latency_seconds",
                                    "Round trip of the last accepted poll", labels=["meter"])
        epoch = GaugeMetricFamily("microgrid_meter_epoch", "Counter baseline (epoch) in use",
                                  labels=["meter"])
        for name, s in self.reader.stats.items():
            polls.add_metric([name], s.polls)
            samples.add_metric([name], s.samples)
            retries.add_metric([name], s.retries)
            for kind, n in sorted(s.errors.items()):
                errors.add_metric([name, kind], n)
            for kind, n in sorted(s.events.items()):
                events.add_metric([name, kind], n)
            online.add_metric([name], 1.0 if s.online else 0.0)
            if s.last_sample is not None:
                latency.add_metric([name], s.last_sample.latency_s)
                epoch.add_metric([name], s.last_sample.epoch)
        yield from (polls, samples, retries, errors, events, online, latency, epoch)
