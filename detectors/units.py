"""Unit detectors: a unit that exited (or could not start), and a probe failing N times in a row."""

from __future__ import annotations

import signal

from detectors.model import Finding, NodeSnapshot
from selfheal.wire import UnitReport


def detect_unit_exited(node: str, unit: UnitReport) -> Finding | None:
    """A unit that is not running and that nobody stopped on purpose."""
    if unit.state not in ("exited", "failed"):
        return None
    if unit.exit_signal is not None:
        try:
            how = f"killed by {signal.Signals(unit.exit_signal).name}"
        except ValueError:
            how = f"killed by signal {unit.exit_signal}"
    elif unit.exit_code is not None:
        how = f"exited with code {unit.exit_code}"
    else:
        how = "could not be started"
    return Finding(
        kind="unit_exited", node=node, unit=unit.name, severity="critical",
        summary=f"unit {unit.name} on {node} {how}",
        evidence={"state": unit.state, "exit_code": unit.exit_code, "exit_signal": unit.exit_signal,
                  "pid": unit.pid, "restarts": unit.restarts},
    )


def detect_probe_failing(node: str, unit: UnitReport) -> Finding | None:
    """A running unit whose probe failed ``failures_threshold`` times in a row."""
    probe = unit.probe
    if unit.state != "running" or probe is None:
        return None
    if probe.consecutive_failures < probe.failures_threshold:
        return None
    return Finding(
        kind="probe_failing", node=node, unit=unit.name, severity="critical",
        summary=(f"{probe.kind} probe of {unit.name} on {node} failed "
                 f"{probe.consecutive_failures} times in a row: {probe.last_error or 'unhealthy'}"),
        evidence={"probe": probe.kind, "consecutive_failures": probe.consecutive_failures,
                  "threshold": probe.failures_threshold, "last_error": probe.last_error,
                  "proc_status": unit.proc_status, "pid": unit.pid},
    )


def detect_units(snapshot: NodeSnapshot) -> list[Finding]:
    findings: list[Finding] = []
    for unit in snapshot.units:
        finding = detect_unit_exited(snapshot.node, unit) or detect_probe_failing(snapshot.node, unit)
        if finding is not None:
            findings.append(finding)
    return findings
