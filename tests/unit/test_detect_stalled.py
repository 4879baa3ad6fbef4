"""Stall and start-timeout detection (table-driven), scheduled jobs that completed, and the node clock the
detectors use."""

from __future__ import annotations

from typing import Any

import pytest

from detectors.model import NodeSnapshot, ReportSample
from detectors.units import (
    detect_unit_exited,
    detect_unit_stalled,
    detect_unit_start_timeout,
    detect_units,
    node_clock,
    stall_deadline,
    start_deadline,
)
from selfheal.wire import HostMetrics, Report, UnitProgress, UnitReport

NODE = "node-a"
NOW = 1_700_000_000.0
PROGRESS = UnitProgress(done=2, total=5, stage="holding")


def unit(**fields: Any) -> UnitReport:
    """A unit as an agent from before ``start_timeout`` reports it (``progress_at`` never before the run's start)."""
    base: dict[str, Any] = {"name": "etl", "kind": "spark", "state": "running", "pid": 42, "started_at": NOW - 100,
                            "progress": PROGRESS, "progress_at": NOW - 30, "stall_after": 20.0}
    return UnitReport(**{**base, **fields})


def job(**fields: Any) -> UnitReport:
    """A unit as today's agent reports it: a start limit, and ``progress_at`` None until the run's first progress."""
    return unit(**{"start_timeout": 60.0, **fields})


@pytest.mark.parametrize(("case", "fields", "stalled"), [
    ("frozen longer than stall_after since it last moved", {}, True),
    ("moved recently", {"progress_at": NOW - 5}, False),
    ("no progress in this run yet: starting, not stalled", {"progress_at": None}, False),
    ("the progress of an earlier run is not this run's", {"progress_at": NOW - 150}, False),
    ("first progress long after the start, frozen since for less than stall_after", {"progress_at": NOW - 15}, False),
    ("a zombie: its exit is coming", {"proc_status": "zombie"}, False),
    ("no stall_after, only a start limit", {"stall_after": None}, False),
])
def test_a_stall_counts_from_the_runs_first_progress(case: str, fields: dict[str, Any], stalled: bool) -> None:
    finding = detect_unit_stalled(NODE, job(**fields), NOW)
    assert (finding is not None) == stalled, case


@pytest.mark.parametrize(("case", "fields", "timed_out"), [
    ("no progress for longer than start_timeout", {}, True),
    ("no progress for exactly start_timeout", {"started_at": NOW - 60}, False),
    ("started recently", {"started_at": NOW - 30}, False),
    ("progressed in this run (then a stall is the question)", {"progress_at": NOW - 90}, False),
    ("only an earlier run's progress", {"progress_at": NOW - 150}, True),
    ("a start limit without stall_after", {"stall_after": None}, True),
    ("an agent without start limits", {"start_timeout": None}, False),
    ("not running: completed", {"state": "completed", "pid": None}, False),
    ("not running: exited", {"state": "exited", "pid": None, "exit_code": 1}, False),
    ("starting", {"state": "starting"}, False),
    ("process gone (no pid)", {"pid": None}, False),
    ("a zombie: its exit is coming", {"proc_status": "zombie"}, False),
    ("no start time known", {"started_at": 0.0}, False),
])
def test_detect_unit_start_timeout(case: str, fields: dict[str, Any], timed_out: bool) -> None:
    finding = detect_unit_start_timeout(NODE, job(**{"progress_at": None, **fields}), NOW)
    assert (finding is not None) == timed_out, case


def test_a_start_timeout_finding_says_how_long_the_run_waited() -> None:
    finding = detect_unit_start_timeout(NODE, job(progress_at=None, progress=None), NOW)
    assert finding is not None
    assert (finding.kind, finding.key, finding.severity) == ("unit_start_timeout", "unit_start_timeout/node-a/etl",
                                                             "critical")
    assert finding.summary == ("unit etl on node-a has reported no progress in the 100s since it started "
                               "(start_timeout 60s)")
    assert finding.evidence == {"waited_s": 100.0, "start_timeout_s": 60.0, "pid": 42, "proc_status": "",
                                "restarts": 0}


def test_a_run_is_first_starting_then_progressing_and_never_both() -> None:
    """A slow start (first progress after longer than stall_after) is neither stalled nor timed out."""
    started = NOW - 100
    waiting = job(started_at=started, progress_at=None)
    assert (start_deadline(waiting), stall_deadline(waiting)) == (started + 60, None)
    assert detect_units(snapshot((waiting,), report_ts=started + 45, last_seen=started + 45), started + 45) == []
    moved = job(started_at=started, progress_at=started + 45)  # first progress at +45, past stall_after (20)
    assert (start_deadline(moved), stall_deadline(moved)) == (None, started + 65)
    assert detect_units(snapshot((moved,), report_ts=started + 50, last_seen=started + 50), started + 50) == []
    assert [f.kind for f in detect_units(snapshot((waiting,), report_ts=started + 61, last_seen=started + 61),
                                         started + 61)] == ["unit_start_timeout"]
    assert [f.kind for f in detect_units(snapshot((moved,), report_ts=started + 66, last_seen=started + 66),
                                         started + 66)] == ["unit_stalled"]


@pytest.mark.parametrize(("case", "fields", "stalled"), [
    ("frozen longer than stall_after", {}, True),
    ("frozen exactly stall_after", {"progress_at": NOW - 20}, False),
    ("moved recently", {"progress_at": NOW - 5}, False),
    ("no stall_after configured", {"stall_after": None}, False),
    ("not running: completed", {"state": "completed", "pid": None}, False),
    ("not running: exited", {"state": "exited", "pid": None, "exit_code": 1}, False),
    ("starting", {"state": "starting"}, False),
    ("process gone (no pid)", {"pid": None}, False),
    ("a zombie: its exit is coming", {"proc_status": "zombie"}, False),
    ("never reported progress: measured from the start", {"progress": None, "progress_at": None}, True),
    ("never reported progress, started recently", {"progress": None, "progress_at": None,
                                                   "started_at": NOW - 10}, False),
    ("restarted after the last movement", {"started_at": NOW - 3}, False),
    ("no start time known", {"progress": None, "progress_at": None, "started_at": 0.0}, False),
])
def test_an_older_agents_stalls_count_from_the_runs_start(case: str, fields: dict[str, Any], stalled: bool) -> None:
    finding = detect_unit_stalled(NODE, unit(**fields), NOW)
    assert detect_unit_start_timeout(NODE, unit(**fields), NOW) is None
    assert (finding is not None) == stalled, case


def test_a_stall_finding_says_where_the_job_stopped() -> None:
    finding = detect_unit_stalled(NODE, unit(), NOW)
    assert finding is not None
    assert (finding.kind, finding.node, finding.unit, finding.severity) == ("unit_stalled", NODE, "etl", "critical")
    assert finding.key == "unit_stalled/node-a/etl"
    assert finding.summary == "unit etl on node-a made no progress for 30s (stall_after 20s), at 2/5 (holding)"
    assert finding.evidence == {"stalled_for_s": 30.0, "stall_after_s": 20.0, "pid": 42, "proc_status": "",
                                "restarts": 0, "done": 2, "total": 5, "stage": "holding"}
    silent = detect_unit_stalled(NODE, unit(progress=None, progress_at=None), NOW)
    assert silent is not None
    assert silent.summary.endswith("no progress reported")


def snapshot(units: tuple[UnitReport, ...], *, report_ts: float | None, last_seen: float) -> NodeSnapshot:
    host = HostMetrics(cpu_percent=1, load1=0, load5=0, load15=0, mem_total_bytes=1, mem_available_bytes=1,
                       mem_percent=1, swap_percent=0)
    reports = () if report_ts is None else (ReportSample.of(Report(node=NODE, session=1, seq=1, ts=report_ts,
                                                                   host=host)),)
    return NodeSnapshot(node=NODE, online=True, last_seen=last_seen, units=units, reports=reports)


def test_the_node_clock_keeps_clock_skew_out_of_the_verdict() -> None:
    # The agent's clock runs 100 s behind the controller's: its progress_at is 100 s "old" on arrival.
    agent_now = NOW - 100
    skewed = unit(started_at=agent_now - 60, progress_at=agent_now - 10)
    snap = snapshot((skewed,), report_ts=agent_now, last_seen=NOW)
    assert node_clock(snap, NOW) == agent_now
    assert detect_units(snap, NOW) == []  # 10 s still by the node's clock
    later = NOW + 15  # nothing heard for 15 s more: the node's clock moved on as well
    assert node_clock(snap, later) == agent_now + 15
    assert [f.kind for f in detect_units(snap, later)] == ["unit_stalled"]
    assert node_clock(snapshot((), report_ts=None, last_seen=NOW), NOW + 3) == NOW + 3


@pytest.mark.parametrize(("fields", "crash"), [
    ({"state": "completed", "exit_code": 0, "every": 60.0}, False),
    ({"state": "exited", "exit_code": 0, "every": 60.0}, False),  # the exit event came before the report
    ({"state": "exited", "exit_code": 3, "every": 60.0}, True),
    ({"state": "exited", "exit_code": None, "exit_signal": 9, "every": 60.0}, True),
    ({"state": "exited", "exit_code": 0}, True),  # a service that exits 0 still stopped serving
    ({"state": "failed", "every": 60.0, "error": "Java 17+ not found"}, True),
])
def test_a_completed_scheduled_run_is_not_a_crash(fields: dict[str, Any], crash: bool) -> None:
    report = UnitReport(name="etl", kind="spark", **{"pid": None, **fields})
    assert (detect_unit_exited(NODE, report) is not None) == crash


def test_a_unit_that_could_not_start_says_why() -> None:
    report = UnitReport(name="etl", kind="spark", state="failed", error="Java 17+ not found (no java on PATH)")
    finding = detect_unit_exited(NODE, report)
    assert finding is not None
    assert finding.summary == "unit etl on node-a could not be started: Java 17+ not found (no java on PATH)"
    assert finding.evidence["error"] == "Java 17+ not found (no java on PATH)"
