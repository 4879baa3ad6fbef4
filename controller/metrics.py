"""The controller's Prometheus metrics, on a registry of its own (no global state).

Names follow Prometheus conventions: ``selfheal_`` prefix, base units,
``_total`` for counters. Gauges about the fleet are read at scrape time by
collectors from the counts ``controller.fleet_index`` keeps up to date as
messages are applied (held to a from-scratch recount by its tests), so a
scrape costs the same at 10 nodes as at 10,000 and never walks the fleet.

Label values come from fixed sets (channels, reasons, states, finding kinds,
actions) or from configuration (PromQL entries, destination kinds), never from
what a message says, with one exception: dataset names, which nodes report.
Those are taken only from the fleet's state (nodes the controller accepts:
with keys configured, signed traffic only) and at most ``MAX_DATASET_SERIES``
of them are exported — the most replicated first — the rest counted in
``selfheal_datasets_unexported``, so no sender can grow the series without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from selfheal.inbox import LABELS as INBOX_LABELS
from selfheal.inbox import InboxStats

MAX_DATASET_SERIES = 200
"""Datasets exported per dataset gauge (one agent holds at most 200)."""


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
        self.peer_failures = Counter("selfheal_peer_requests_failed_total",
                                     "Requests to another controller (fleet view, forwarded calls) that got no answer",
                                     ["peer"], registry=self.registry)
        self.local_actions = Counter("selfheal_local_actions_adopted_total",
                                     "Actions agents took alone while no controller listened, adopted into incidents",
                                     ["action", "status"], registry=self.registry)
        self.commands_unsent = Counter("selfheal_commands_unsent_total",
                                       "Commands not sent, by reason (e.g. no signing key)", ["reason"],
                                       registry=self.registry)
        self.webhook_deliveries = Counter(
            "selfheal_webhook_deliveries_total",
            "Chat webhook messages by destination kind and final outcome (sent, rejected, failed)",
            ["destination_kind", "outcome"], registry=self.registry)
        self.notifications_dropped = Counter(
            "selfheal_notifications_dropped_total",
            "Notifications dropped because the notification queue was full (the engine never waits for chat)",
            registry=self.registry)
        self.state_rejected = Counter(
            "selfheal_state_files_rejected_total",
            "State files set aside unread or unused at start, by reason (legacy_pickle, unusable, other_code)",
            ["reason"], registry=self.registry)
        self.api_refused = Counter(
            "selfheal_api_requests_refused_total",
            "HTTP requests refused before their body was read, by reason (unauthorized, forbidden, too_large)",
            ["reason"], registry=self.registry)
        self.remediation_duration = Histogram(
            "selfheal_remediation_duration_seconds", "Plan execution time (commands, acks, verification), "
            "by action and outcome", ["action", "outcome"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=self.registry)
        self.detector_samples = Counter("selfheal_detector_samples_total",
                                        "Reports fed to a detector family (anomaly watch)", ["detector"],
                                        registry=self.registry)
        self.detector_seconds = Counter("selfheal_detector_seconds_total",
                                        "CPU-bound time spent in a detector family", ["detector"],
                                        registry=self.registry)
        self.alerts_received = Counter(
            "selfheal_alerts_received_total",
            "Alertmanager webhook payloads on POST /api/v1/alerts, by outcome (accepted, malformed, unauthorized)",
            ["outcome"], registry=self.registry)
        self.promql_evaluations = Counter("selfheal_promql_evaluations_total",
                                          "PromQL finding-source evaluations, by entry and outcome (ok, error)",
                                          ["query", "outcome"], registry=self.registry)
        self.promql_seconds = Histogram("selfheal_promql_evaluation_seconds", "PromQL query time, by entry",
                                        ["query"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                        registry=self.registry)
        self.store_write_errors = Counter(
            "selfheal_store_write_errors_total", "State store writes SQLite refused, none of them kept, by reason "
            "(disk_full, io_error, busy, other): the controller did nothing it could not record",
            ["reason"], registry=self.registry)
        for reason in ("disk_full", "io_error", "busy", "other"):  # selfheal.write_failures.REASONS
            self.store_write_errors.labels(reason)
        for outcome in ("accepted", "malformed", "unauthorized"):
            self.alerts_received.labels(outcome)  # exported at 0 from the start, so rate() sees the first one
        self.registry.register(_TaskCollector())

    def add_state_collector(self, read: Callable[[], tuple[dict[str, int], dict[str, int], int]]) -> None:
        """``read`` returns ({unit state: count}, {finding kind: current findings}, external alerts held)."""
        self.registry.register(_StateCollector(read))

    def add_fleet_collector(self, read: Callable[[], tuple[dict[str, int], int]]) -> None:
        """``read`` returns ({node state: count}, open incidents)."""
        self.registry.register(_FleetCollector(read))


    def add_history_collector(self, read: Callable[[], int]) -> None:
        """``read`` returns the bytes of report history the fleet holds (``Fleet.history_bytes``)."""
        self.registry.register(_GaugeCollector(
            "selfheal_report_history_bytes", "Report history kept for detectors, every node's together "
            "(each node at most controller.node_state_bytes)", read))

    def add_inbox_collector(self, read: Callable[[], InboxStats]) -> None:
        """``read`` returns the MQTT inbox's counts (``selfheal.inbox.InboxStats``)."""
        self.registry.register(_InboxCollector(read))

    def add_dataset_collector(self, read: Callable[[], list[dict[str, Any]]]) -> None:
        """``read`` returns ``controller.datasets.describe_datasets``' view."""
        self.registry.register(_DatasetCollector(read))

    def add_stats_collector(self, read: Callable[[], list[dict[str, object]]]) -> None:
        """``read`` returns the engine's outcome statistics per (finding kind, action)."""
        self.registry.register(_StatsCollector(read))


class _GaugeCollector(Collector):
    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._documentation, value=self._read())


class _TaskCollector(Collector):
    """``selfheal_asyncio_tasks``: the tasks alive on the event loop the scrape runs on.

    ``/metrics`` is an async handler, so the registry is collected on the loop's own thread and
    ``asyncio.all_tasks`` is read there, never from another thread. A task leak (one per message, per
    plan, per connection that never ends) shows as this gauge growing; ``bench/soak.py`` watches it.
    Collected off any loop (a test calling ``generate_latest`` directly) it exports nothing."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        yield GaugeMetricFamily("selfheal_asyncio_tasks", "Tasks alive on the controller's event loop, the "
                                "scrape's own included", value=len(asyncio.all_tasks(loop)))


class _InboxCollector(Collector):
    def __init__(self, read: Callable[[], InboxStats]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._read()
        dropped = CounterMetricFamily(
            "selfheal_mqtt_inbox_dropped", "Incoming MQTT messages that never reached ingest, by channel and "
            "reason: a report superseded by its node's newer one or shed over the report budget, any "
            "message beyond the inbox's hard cap (full) or its node's share (node_full)", labels=["channel", "reason"])
        for channel, reason in INBOX_LABELS:
            dropped.add_metric([channel, reason], stats.by_reason.get((channel, reason), 0))
        yield dropped
        yield CounterMetricFamily("selfheal_mqtt_inbox_dropped_bytes", "Payload bytes of those messages",
                                  value=stats.dropped_bytes)
        yield GaugeMetricFamily("selfheal_mqtt_inbox_bytes", "Incoming MQTT payload bytes waiting to be ingested",
                                value=stats.queued_bytes)
        yield GaugeMetricFamily("selfheal_mqtt_inbox_messages", "Incoming MQTT messages waiting to be ingested",
                                value=stats.queued_messages)


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


class _DatasetCollector(Collector):
    def __init__(self, read: Callable[[], list[dict[str, Any]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        replicas = GaugeMetricFamily("selfheal_dataset_agreement_ratio",
                                     "Share of a dataset's replicas whose root matches the authority",
                                     labels=["dataset"])
        files = GaugeMetricFamily("selfheal_dataset_files_agreement_ratio",
                                  "Share of a dataset's (replica, file) pairs matching the authority",
                                  labels=["dataset"])
        datasets = self._read()
        kept = sorted(datasets, key=lambda d: (-len(d.get("replicas", ())), str(d["name"])))[:MAX_DATASET_SERIES]
        for dataset in sorted(kept, key=lambda d: str(d["name"])):
            agreement = dataset["agreement"]
            if agreement["replicas"] is not None:
                replicas.add_metric([dataset["name"]], float(agreement["replicas"]))
            if agreement["files"] is not None:
                files.add_metric([dataset["name"]], float(agreement["files"]))
        yield replicas
        yield files
        yield GaugeMetricFamily("selfheal_datasets_unexported",
                                f"Datasets known but left out of the dataset gauges (at most {MAX_DATASET_SERIES} "
                                "are exported, the most replicated first)", value=len(datasets) - len(kept))


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


class _StateCollector(Collector):
    UNIT_STATES = ("running", "starting", "stopped", "exited")

    def __init__(self, read: Callable[[], tuple[dict[str, int], dict[str, int], int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        units, findings, external = self._read()
        family = GaugeMetricFamily("selfheal_units", "Known units by state", labels=["state"])
        for state in sorted({*self.UNIT_STATES, *units}):
            family.add_metric([state], units.get(state, 0))
        yield family
        kinds = GaugeMetricFamily("selfheal_findings", "Findings that hold now, by kind", labels=["kind"])
        for kind, count in sorted(findings.items()):
            kinds.add_metric([kind], count)
        yield kinds
        yield GaugeMetricFamily("selfheal_external_alerts", "External alerts held (Alertmanager, PromQL)",
                                value=external)
