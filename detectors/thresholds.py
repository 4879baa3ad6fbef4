"""Threshold detector: a metric over a limit for N consecutive samples."""

from __future__ import annotations

from collections.abc import Sequence

from detectors.model import Finding, HostSample, NodeSnapshot, Observation, Threshold, UnitSample
from selfheal.wire import HostMetrics, UnitReport


def read_host_metric(host: HostMetrics | HostSample, field: str) -> float | None:
    if field == "disk_max_percent" and isinstance(host, HostMetrics):
        return max((d.percent for d in host.disks), default=None)
    value = getattr(host, field, None)
    return float(value) if isinstance(value, int | float) else None


def read_unit_metric(unit: UnitReport | UnitSample, field: str) -> float | None:
    value = getattr(unit, field, None)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def detect_threshold(node: str, reports: Sequence[Observation], rule: Threshold) -> list[Finding]:
    """Findings for the host, or for each unit, whose last ``rule.samples`` values all exceed the limit."""
    if len(reports) < rule.samples:
        return []
    window = reports[-rule.samples:]
    scope, _, field = rule.metric.partition(".")
    series: dict[str | None, list[float]] = {}
    if scope == "host":
        host_values = [read_host_metric(r.host, field) for r in window]
        series[None] = [v for v in host_values if v is not None]
    elif scope == "unit":
        for report in window:
            for unit in report.units:
                value = read_unit_metric(unit, field)
                if value is not None:
                    series.setdefault(unit.name, []).append(value)
    findings = []
    for unit_name, values in series.items():
        if len(values) == rule.samples and all(v > rule.above for v in values):
            what = f"unit {unit_name} on {node}" if unit_name else f"node {node}"
            findings.append(Finding(
                kind="metric_threshold", node=node, unit=unit_name, severity=rule.severity,
                summary=f"{rule.metric} of {what} above {rule.above:g} for {rule.samples} samples "
                        f"(last {values[-1]:g})",
                evidence={"threshold": rule.name, "metric": rule.metric, "above": rule.above,
                          "window": values, "window_ts": [r.ts for r in window]},
            ))
    return findings


def detect_thresholds(snapshot: NodeSnapshot, rules: Sequence[Threshold]) -> list[Finding]:
    findings: list[Finding] = []
    for rule in rules:
        findings.extend(detect_threshold(snapshot.node, snapshot.reports, rule))
    return findings
