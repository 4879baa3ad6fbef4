"""The controller's Prometheus metrics, on a registry of its own (no global state).

Names follow Prometheus conventions: ``selfheal_`` prefix, base units,
``_total`` for counters. Gauges about the fleet are computed at scrape time by
a collector over the live state, so they can never drift from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter("selfheal_messages_received_total", "MQTT messages accepted, by channel",
                                ["channel"], registry=self.registry)
        self.rejected = Counter("selfheal_messages_rejected_total",
                                "MQTT messages dropped at the edge, by reason", ["reason"],
                                registry=self.registry)
        self.incidents = Counter("selfheal_incidents_opened_total", "Incidents opened, by finding kind",
                                 ["kind"], registry=self.registry)
        self.remediations = Counter("selfheal_remediations_total", "Remediation plans finished, by outcome",
                                    ["action", "outcome"], registry=self.registry)
        self.time_to_heal = Histogram(
            "selfheal_time_to_recover_seconds", "From incident opened to verified healthy",
            ["kind"], buckets=(0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300), registry=self.registry)
        self.guard_holds = Counter("selfheal_guard_blocks_total", "Plans held or refused by a guard",
                                   ["guard"], registry=self.registry)
        self.commands_unsent = Counter("selfheal_commands_unsent_total",
                                       "Commands not sent, by reason (e.g. no signing key)", ["reason"],
                                       registry=self.registry)

    def add_fleet_collector(self, read: Callable[[], tuple[dict[str, int], int]]) -> None:
        """``read`` returns ({node state: count}, open incidents)."""
        self.registry.register(_FleetCollector(read))


    def add_stats_collector(self, read: Callable[[], list[dict[str, object]]]) -> None:
        """``read`` returns the engine's outcome statistics per (finding kind, action)."""
        self.registry.register(_StatsCollector(read))


class _StatsCollector(Collector):
    def __init__(self, read: Callable[[], list[dict[str, object]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rate = GaugeMetricFamily("selfheal_remediation_success_ratio",
                                 "Share of finished plans that succeeded, per finding kind and action",
                                 labels=["kind", "action"])
        median = GaugeMetricFamily("selfheal_remediation_recover_median_seconds",
                                   "Median time from incident opened to verified recovery, per kind and action",
                                   labels=["kind", "action"])
        for row in self._read():
            labels = [str(row["kind"]), str(row["action"])]
            if isinstance(row.get("success_rate"), float | int):
                rate.add_metric(labels, float(row["success_rate"]))  # type: ignore[arg-type]
            if isinstance(row.get("median_recover_s"), float | int):
                median.add_metric(labels, float(row["median_recover_s"]))  # type: ignore[arg-type]
        yield rate
        yield median


class _FleetCollector(Collector):
    def __init__(self, read: Callable[[], tuple[dict[str, int], int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nodes, open_incidents = self._read()
        family = GaugeMetricFamily("selfheal_nodes", "Known nodes by presence state", labels=["state"])
        for state in ("online", "offline"):
            family.add_metric([state], nodes.get(state, 0))
        yield family
        yield GaugeMetricFamily("selfheal_incidents_open", "Incidents not yet resolved", value=open_incidents)
