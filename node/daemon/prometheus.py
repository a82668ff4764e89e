"""Prometheus view of a household node: consensus, ledger, proposer and the node's counters.

:class:`NodeCollector` reads the node's parts at scrape time (like
:class:`meter.metrics.MeterCollector`), so none of them depends on prometheus. The node
registers it, and the meter collector, on the network layer's registry, which serves
everything on one 127.0.0.1 endpoint (``metrics_port``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from node.daemon.consensus import ConsensusView
    from node.daemon.household_node import HouseholdNode
    from node.daemon.http_api import Api


class NodeCollector(Collector):
    """Raft role and indices, ledger height, proposer queues, the node's event counters and its
    local API's counters."""

    def __init__(self, node: HouseholdNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from the node's current state."""
        node = self.node
        # The scrape runs on prometheus's own thread: it reads only what the driver publishes
        # whole on its task (never the live Raft core, replica or engine the trio task steps).
        view = node.driver.view
        st = view.raft
        stats = view.stats
        engine = node.engine_snapshot()
        g = GaugeMetricFamily
        yield g("microgrid_raft_term", "Current Raft term", value=st.term)
        yield g("microgrid_raft_is_leader", "1 if this node leads", value=int(st.role == "leader"))
        yield g("microgrid_raft_commit_index", "Highest committed log index", value=st.commit)
        yield g("microgrid_raft_applied_index", "Highest applied log index",
                value=view.applied_index)  # fmt: skip
        yield CounterMetricFamily("microgrid_raft_leader_changes", "Leaders seen",
                                  value=stats.leader_changes)  # fmt: skip
        yield CounterMetricFamily("microgrid_raft_proposals", "Batches proposed as leader",
                                  value=stats.proposals)  # fmt: skip
        yield CounterMetricFamily("microgrid_raft_inbound_dropped",
                                  "Raft messages dropped: the driver's inbox was full",
                                  value=stats.dropped_inbound)  # fmt: skip
        yield CounterMetricFamily("microgrid_raft_compactions", "Raft log compactions done",
                                  value=stats.snapshots)  # fmt: skip
        yield CounterMetricFamily("microgrid_raft_compactions_postponed",
                                  "Raft log compactions postponed (a membership change pending)",
                                  value=stats.compactions_postponed)  # fmt: skip
        yield CounterMetricFamily("microgrid_raft_compaction_failures",
                                  "Raft log compactions that failed (logged with the traceback)",
                                  value=stats.compaction_failures)  # fmt: skip
        yield CounterMetricFamily("microgrid_raft_unsent",
                                  "Raft messages dropped before the network was up",
                                  value=node.raft_link.unsent)  # fmt: skip
        yield g("microgrid_ledger_height", "Blocks in the ledger", value=engine.height)
        settled = engine.settled_through
        yield g("microgrid_ledger_settled_through", "Last settled slot",
                value=settled if settled is not None else -1)  # fmt: skip
        yield g("microgrid_proposer_pending", "Records waiting to be proposed",
                value=len(node.proposer.pending))  # fmt: skip
        yield g("microgrid_proposer_in_flight", "Records proposed, not yet committed",
                value=len(node.proposer.in_flight))  # fmt: skip
        events = CounterMetricFamily(
            "microgrid_node_events",
            "Node events: records published or refused, meter failures, missed readings, "
            "engine rejections by reason",
            labels=["kind"],
        )
        for kind, count in sorted(node.all_counters().items()):
            events.add_metric([kind], count)
        yield events
        yield from censorship_metrics(view)
        yield from clock_metrics(view)
        yield from api_metrics(node.api)


def censorship_metrics(view: ConsensusView) -> Iterator[Metric]:
    """The censorship watch: records by outcome, alert episodes, households suspected
    now, whether this household is, and the distrusts of a censoring leader (none without a
    watch). Reads the driver's published view only."""
    yield CounterMetricFamily("microgrid_censorship_distrusts",
                              "Leaders this node distrusted for censoring records",
                              value=view.stats.distrusts)  # fmt: skip
    report = view.censorship
    if report is None:
        return
    records = CounterMetricFamily(
        "microgrid_censorship_records",
        "Valid records seen here, by outcome: seen, committed (in time), committed_late, "
        "missed (deadline applied first), expired_late, dropped, aged_out, unknown, forgiven",
        labels=["outcome"],
    )
    for outcome, count in sorted(report.counters.items()):
        if outcome != "alerts":
            records.add_metric([outcome], count)
    yield records
    yield CounterMetricFamily("microgrid_censorship_alerts",
                              "Censorship alert episodes (a household suspected)",
                              value=report.counters.get("alerts", 0))  # fmt: skip
    yield GaugeMetricFamily("microgrid_censorship_suspected_households",
                            "Households whose records the leader is suspected of dropping",
                            value=len(report.suspected))  # fmt: skip
    yield GaugeMetricFamily("microgrid_censorship_own_suspected",
                            "1 if this household's own records are not committed while others' are",
                            value=int(report.own_suspected))  # fmt: skip
    yield GaugeMetricFamily("microgrid_censorship_uncommitted",
                            "Records seen here and not committed yet (missed ones included)",
                            value=report.tracked)  # fmt: skip


def clock_metrics(view: ConsensusView) -> Iterator[Metric]:
    """The clock watch (none without one): this clock's estimated offset from the grid's
    median and its error bound, peers sampled, whether it is skewed, peers whose clock
    disagrees, early gate closures seen, leadership handovers and held deadlines. Reads the
    driver's published view only."""
    report = view.clock
    if report is None:
        return
    est = report.estimate
    g = GaugeMetricFamily
    yield g("microgrid_clock_offset_seconds",
            "This node's wall clock minus the grid's median clock (NaN: no peer sampled)",
            value=float("nan") if est.offset is None else est.offset)  # fmt: skip
    yield g("microgrid_clock_error_seconds", "Error bound of the clock offset estimate",
            value=est.error)  # fmt: skip
    yield g("microgrid_clock_peers_sampled", "Peers whose clock was sampled recently",
            value=est.sampled)  # fmt: skip
    yield g("microgrid_clock_skewed",
            "1 if this node's clock is off the grid's by more than the bound",
            value=int(report.skewed))  # fmt: skip
    yield g("microgrid_clock_max_skew_seconds", "The clock skew bound",
            value=report.max_skew)  # fmt: skip
    yield g("microgrid_clock_peers_disagreeing",
            "Peers whose clock is off the grid's by more than the bound",
            value=len(report.disagreeing))  # fmt: skip
    c = CounterMetricFamily
    yield c("microgrid_clock_early_gate_closures",
            "Gate closures applied earlier than this node's clock allows (by more than the bound)",
            value=report.early_gate_closures)  # fmt: skip
    yield c("microgrid_clock_transfers", "Leadership handovers because this clock was skewed",
            value=report.transfers)  # fmt: skip
    yield c("microgrid_clock_held",
            "Times this leader held back due deadlines (its clock skewed or not yet compared)",
            value=report.held)  # fmt: skip
    yield c("microgrid_clock_distrusts", "Leaders distrusted for closing gates early",
            value=report.distrusts)  # fmt: skip


def api_metrics(api: Api) -> Iterator[Metric]:
    """The local API's counters: responses by status code, refusals and early closes by reason,
    open connections (dicts copied in one step: the trio thread updates them)."""
    responses = CounterMetricFamily("microgrid_api_responses", "Local API responses by status",
                                    labels=["code"])  # fmt: skip
    for code, count in sorted(dict(api.requests).items()):
        responses.add_metric([str(code)], count)
    yield responses
    rejections = CounterMetricFamily(
        "microgrid_api_rejections",
        "Local API requests refused and connections closed early, by reason",
        labels=["reason"],
    )
    for reason, count in sorted(dict(api.rejections).items()):
        rejections.add_metric([reason], count)
    yield rejections
    yield GaugeMetricFamily("microgrid_api_connections", "Local API connections being served",
                            value=api.connections)  # fmt: skip
