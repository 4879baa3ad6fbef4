"""Unit detectors: a unit that exited (or could not start), a probe failing N times in a row, a job
whose progress stopped moving while its process lives on (stalled), and one that has reported no progress
at all since its run started (start timeout).

A job is stalled only once it has progressed in its current run: until its
first progress it is starting, however slowly, and ``start_timeout`` — kept
apart from ``stall_after`` and more generous — is its limit. Restarting a
job that is only slow to start (a JVM on a busy host) makes it slower still.

A scheduled batch job (``every``) that finished its run with exit code 0 is
``completed``, not exited: nothing to heal. Until its next report says so,
the controller may know it only from the exit event; an exit 0 of a unit
known to be scheduled is therefore not a crash either. Services keep the old
rule: any exit nobody asked for is one.
"""

from __future__ import annotations

from detectors.model import Finding, NodeSnapshot
from selfheal.wire import UnitReport, crash_of


def detect_unit_exited(node: str, unit: UnitReport) -> Finding | None:
    """A unit that is not running and that nobody stopped on purpose."""
    how = crash_of(unit)
    if how is None:
        return None
    return Finding(
        kind="unit_exited", node=node, unit=unit.name, severity="critical",
        summary=f"unit {unit.name} on {node} {how}",
        evidence={"state": unit.state, "exit_code": unit.exit_code, "exit_signal": unit.exit_signal,
                  "pid": unit.pid, "restarts": unit.restarts, **({"error": unit.error} if unit.error else {})},
    )


def detect_probe_failing(node: str, unit: UnitReport) -> Finding | None:
    """A running unit whose probe failed ``failures_threshold`` times in a row during this run.

    A verdict reached before the current run started (e.g. a standby copy probed while it was stopped)
    says nothing about this run."""
    probe = unit.probe
    if unit.state != "running" or probe is None or probe.checked_at < unit.started_at:
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


def detect_unit_stalled(node: str, unit: UnitReport, node_now: float) -> Finding | None:
    """A running unit with ``stall_after`` whose progress, once it moved in this run, has not moved for
    longer than that.

    ``node_now`` is the node's own clock now (see ``node_clock``): ``progress_at`` comes from the
    agent's clock, so comparing it with the node's clock keeps clock skew out of the verdict.
    """
    deadline = stall_deadline(unit)
    if deadline is None or node_now <= deadline or unit.stall_after is None:
        return None
    still = node_now - (deadline - unit.stall_after)
    progress = unit.progress
    where = "no progress reported"
    if progress is not None:
        total = f"/{progress.total:g}" if progress.total is not None else ""
        where = f"at {progress.done:g}{total}" + (f" ({progress.stage})" if progress.stage else "")
    return Finding(
        kind="unit_stalled", node=node, unit=unit.name, severity="critical",
        summary=(f"unit {unit.name} on {node} made no progress for {still:.0f}s "
                 f"(stall_after {unit.stall_after:g}s), {where}"),
        evidence={"stalled_for_s": round(still, 1), "stall_after_s": unit.stall_after, "pid": unit.pid,
                  "proc_status": unit.proc_status, "restarts": unit.restarts,
                  "done": progress.done if progress else None, "total": progress.total if progress else None,
                  "stage": progress.stage if progress else None},
    )


def detect_unit_start_timeout(node: str, unit: UnitReport, node_now: float) -> Finding | None:
    """A running unit with ``start_timeout`` that has reported no progress in this run for longer than that.

    ``node_now`` is the node's clock, as for ``detect_unit_stalled``."""
    deadline = start_deadline(unit)
    if deadline is None or node_now <= deadline or unit.start_timeout is None:
        return None
    waited = node_now - unit.started_at
    return Finding(
        kind="unit_start_timeout", node=node, unit=unit.name, severity="critical",
        summary=(f"unit {unit.name} on {node} has reported no progress in the {waited:.0f}s since it started "
                 f"(start_timeout {unit.start_timeout:g}s)"),
        evidence={"waited_s": round(waited, 1), "start_timeout_s": unit.start_timeout, "pid": unit.pid,
                  "proc_status": unit.proc_status, "restarts": unit.restarts},
    )


def stall_deadline(unit: UnitReport) -> float | None:
    """The node-clock time after which ``detect_unit_stalled`` fires for ``unit`` if nothing changes
    (None: it cannot stall as it stands)."""
    if not _alive(unit) or unit.stall_after is None:
        return None
    if unit.start_timeout is None:  # an agent from before start_timeout: stalls count from the run's start
        moved_at = max(unit.progress_at or 0.0, unit.started_at)
        return moved_at + unit.stall_after if moved_at > 0 else None  # never started as far as we know
    progressed_at = _moved_at(unit)
    if progressed_at is None:
        return None  # still starting: start_deadline's turn
    return progressed_at + unit.stall_after


def start_deadline(unit: UnitReport) -> float | None:
    """The node-clock time after which ``detect_unit_start_timeout`` fires for ``unit`` if nothing changes
    (None: it has progressed in this run, has no start limit, or is not running)."""
    if not _alive(unit) or unit.start_timeout is None or unit.started_at <= 0 or _moved_at(unit) is not None:
        return None
    return unit.started_at + unit.start_timeout


def _alive(unit: UnitReport) -> bool:
    """Running with a live process: the only state in which a job can stall or hang on its start (a zombie
    is exiting: its exit is the finding that follows)."""
    return unit.state == "running" and unit.pid is not None and unit.proc_status != "zombie"


def _moved_at(unit: UnitReport) -> float | None:
    """When the current run's progress last moved; None before its first progress (a time before the run's
    start is about an earlier run)."""
    at = unit.progress_at
    return at if at is not None and at >= unit.started_at else None


def node_clock(snapshot: NodeSnapshot, now: float) -> float:
    """The node's clock at ``now``: its last report's timestamp plus the time since it was last heard."""
    if not snapshot.reports:
        return now
    return snapshot.reports[-1].ts + max(0.0, now - snapshot.last_seen)


def detect_units(snapshot: NodeSnapshot, now: float) -> list[Finding]:
    findings: list[Finding] = []
    node_now = node_clock(snapshot, now)
    for unit in snapshot.units:
        finding = (detect_unit_exited(snapshot.node, unit) or detect_probe_failing(snapshot.node, unit)
                   or detect_unit_stalled(snapshot.node, unit, node_now)
                   or detect_unit_start_timeout(snapshot.node, unit, node_now))
        if finding is not None:
            findings.append(finding)
    return findings
