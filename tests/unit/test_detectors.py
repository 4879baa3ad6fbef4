"""Pure detectors: unit exits, failing probes, presence, thresholds and the registry."""

from __future__ import annotations

import signal

import pytest

from detectors.model import DetectorSettings, Finding, NodeSnapshot, ReportSample, Threshold
from detectors.presence import detect_node_offline, is_offline
from detectors.registry import detect_node
from detectors.thresholds import detect_threshold, detect_thresholds
from detectors.units import detect_probe_failing, detect_unit_exited, detect_units
from selfheal.wire import DiskUsage, HostMetrics, ProbeState, Report, UnitReport

NODE = "node-a"
NOW = 1_700_000_000.0


def host(*, cpu: float = 10.0, mem: float = 40.0, disks: tuple[float, ...] = (50.0,)) -> HostMetrics:
    return HostMetrics(cpu_percent=cpu, load1=0.1, load5=0.1, load15=0.1, mem_total_bytes=1 << 30,
                       mem_available_bytes=1 << 29, mem_percent=mem, swap_percent=0.0,
                       disks=[DiskUsage(mount=f"/d{i}", total_bytes=100, used_bytes=int(p), percent=p)
                              for i, p in enumerate(disks)])


def unit(name: str = "web", state: str = "running", **fields: object) -> UnitReport:
    return UnitReport(name=name, kind="process", state=state, pid=fields.pop("pid", 42), **fields)  # type: ignore[arg-type]


def probe(failures: int, threshold: int = 3, *, error: str = "connection refused") -> ProbeState:
    return ProbeState(kind="http", healthy=failures < threshold, consecutive_failures=failures,
                      failures_threshold=threshold, last_error=error)


def report(seq: int, *, units: tuple[UnitReport, ...] = (), **host_fields: object) -> Report:
    return Report(node=NODE, session=1, seq=seq, ts=NOW - 100 + seq, host=host(**host_fields),  # type: ignore[arg-type]
                  units=list(units))


def snapshot(*, online: bool = True, last_seen: float = NOW, units: tuple[UnitReport, ...] = (),
             reports: tuple[Report, ...] = ()) -> NodeSnapshot:
    return NodeSnapshot(node=NODE, online=online, last_seen=last_seen, units=units,
                        reports=tuple(ReportSample.of(r) for r in reports))


# --- unit_exited --------------------------------------------------------------------------------


def test_a_unit_killed_by_a_signal() -> None:
    finding = detect_unit_exited(NODE, unit(state="exited", exit_signal=int(signal.SIGKILL), restarts=2))
    assert finding is not None
    assert (finding.kind, finding.node, finding.unit, finding.severity) == ("unit_exited", NODE, "web", "critical")
    assert finding.summary == "unit web on node-a killed by SIGKILL"
    assert finding.evidence == {"state": "exited", "exit_code": None, "exit_signal": 9, "pid": 42, "restarts": 2}
    assert finding.key == "unit_exited/node-a/web"


def test_a_unit_killed_by_an_unknown_signal_number() -> None:
    finding = detect_unit_exited(NODE, unit(state="exited", exit_signal=200))
    assert finding is not None
    assert finding.summary.endswith("killed by signal 200")


def test_a_unit_that_exited_with_a_code() -> None:
    finding = detect_unit_exited(NODE, unit(state="exited", exit_code=3))
    assert finding is not None
    assert finding.summary == "unit web on node-a exited with code 3"
    assert finding.evidence["exit_code"] == 3


def test_a_unit_that_exited_cleanly_is_still_a_finding() -> None:
    finding = detect_unit_exited(NODE, unit(state="exited", exit_code=0))
    assert finding is not None
    assert "exited with code 0" in finding.summary


def test_a_unit_that_failed_to_start() -> None:
    finding = detect_unit_exited(NODE, unit(state="failed", pid=None))
    assert finding is not None
    assert finding.summary == "unit web on node-a could not be started"
    assert finding.evidence["state"] == "failed"


@pytest.mark.parametrize("state", ["stopped", "running", "starting"])
def test_a_unit_stopped_on_purpose_or_alive_is_not_a_finding(state: str) -> None:
    assert detect_unit_exited(NODE, unit(state=state, exit_code=0, exit_signal=15)) is None


# --- probe_failing ------------------------------------------------------------------------------


def test_a_probe_at_its_failure_threshold_is_a_finding() -> None:
    finding = detect_probe_failing(NODE, unit(probe=probe(3), proc_status="stopped"))
    assert finding is not None
    assert (finding.kind, finding.unit, finding.severity) == ("probe_failing", "web", "critical")
    assert finding.summary == "http probe of web on node-a failed 3 times in a row: connection refused"
    assert finding.evidence["consecutive_failures"] == 3
    assert finding.evidence["threshold"] == 3
    assert finding.evidence["proc_status"] == "stopped"


def test_a_probe_beyond_its_threshold_is_a_finding() -> None:
    finding = detect_probe_failing(NODE, unit(probe=probe(7, error="")))
    assert finding is not None
    assert finding.summary.endswith("7 times in a row: unhealthy")


@pytest.mark.parametrize("failures", [0, 1, 2])
def test_a_probe_below_its_threshold_is_not_a_finding(failures: int) -> None:
    assert detect_probe_failing(NODE, unit(probe=probe(failures))) is None


@pytest.mark.parametrize("state", ["exited", "stopped", "starting", "failed"])
def test_a_failing_probe_of_a_unit_that_is_not_running_is_not_a_probe_finding(state: str) -> None:
    assert detect_probe_failing(NODE, unit(state=state, probe=probe(5))) is None


def test_a_unit_without_a_probe_has_no_probe_finding() -> None:
    assert detect_probe_failing(NODE, unit()) is None


def test_detect_units_gives_one_finding_per_unhealthy_unit() -> None:
    units = (unit("a", state="exited", exit_code=1), unit("b", probe=probe(3)), unit("c", probe=probe(1)),
             unit("d", state="stopped"))
    findings = detect_units(snapshot(units=units), NOW)
    assert [(f.kind, f.unit) for f in findings] == [("unit_exited", "a"), ("probe_failing", "b")]


# --- presence -----------------------------------------------------------------------------------


def test_a_node_that_announced_offline_is_offline_at_once() -> None:
    finding = detect_node_offline(snapshot(online=False, last_seen=NOW - 0.5), NOW, offline_after=5.0)
    assert finding is not None
    assert (finding.kind, finding.unit, finding.severity) == ("node_offline", None, "critical")
    assert finding.summary == "node node-a is offline: its agent went offline"
    assert finding.evidence == {"last_seen": NOW - 0.5, "silent_for_s": 0.5, "announced_offline": True}
    assert finding.key == "node_offline/node-a/-"


def test_a_node_silent_longer_than_offline_after_is_offline() -> None:
    finding = detect_node_offline(snapshot(last_seen=NOW - 7.25), NOW, offline_after=5.0)
    assert finding is not None
    assert finding.summary == "node node-a is offline: silent for 7.2s"
    assert finding.evidence["silent_for_s"] == 7.25
    assert finding.evidence["announced_offline"] is False


@pytest.mark.parametrize("silent", [0.0, 1.0, 5.0])
def test_an_online_recent_node_is_not_offline(silent: float) -> None:
    assert detect_node_offline(snapshot(last_seen=NOW - silent), NOW, offline_after=5.0) is None
    assert not is_offline(snapshot(last_seen=NOW - silent), NOW, 5.0)


def test_is_offline_follows_the_detector() -> None:
    assert is_offline(snapshot(last_seen=NOW - 5.01), NOW, 5.0)
    assert is_offline(snapshot(online=False), NOW, 5.0)


# --- thresholds ---------------------------------------------------------------------------------


CPU = Threshold(name="cpu-hot", metric="host.cpu_percent", above=90.0, samples=3, severity="critical")


def test_n_consecutive_host_samples_above_the_limit_are_a_finding() -> None:
    reports = [report(1, cpu=10), report(2, cpu=95), report(3, cpu=96), report(4, cpu=97.5)]
    (finding,) = detect_threshold(NODE, reports, CPU)
    assert (finding.kind, finding.node, finding.unit, finding.severity) == (
        "metric_threshold", NODE, None, "critical")
    assert finding.summary == "host.cpu_percent of node node-a above 90 for 3 samples (last 97.5)"
    assert finding.evidence == {"threshold": "cpu-hot", "metric": "host.cpu_percent", "above": 90.0,
                                "window": [95.0, 96.0, 97.5], "window_ts": [r.ts for r in reports[1:]]}


def test_one_sample_below_the_limit_in_the_window_is_no_finding() -> None:
    assert detect_threshold(NODE, [report(1, cpu=95), report(2, cpu=89), report(3, cpu=96)], CPU) == []


def test_a_sample_equal_to_the_limit_is_not_above_it() -> None:
    assert detect_threshold(NODE, [report(1, cpu=95), report(2, cpu=90), report(3, cpu=96)], CPU) == []


def test_only_the_last_n_samples_count() -> None:
    reports = [report(1, cpu=99), report(2, cpu=99), report(3, cpu=99), report(4, cpu=50)]
    assert detect_threshold(NODE, reports, CPU) == []


def test_fewer_samples_than_n_is_no_finding() -> None:
    assert detect_threshold(NODE, [report(1, cpu=99), report(2, cpu=99)], CPU) == []
    assert detect_threshold(NODE, [], CPU) == []


def test_disk_max_percent_reads_the_fullest_disk() -> None:
    rule = Threshold(name="disk", metric="host.disk_max_percent", above=95.0, samples=2)
    (finding,) = detect_threshold(NODE, [report(1, disks=(10.0, 96.0)), report(2, disks=(99.0, 20.0))], rule)
    assert finding.evidence["window"] == [96.0, 99.0]
    assert finding.severity == "warning"
    assert detect_threshold(NODE, [report(1, disks=(10.0, 96.0)), report(2, disks=(94.0, 20.0))], rule) == []


def test_disk_max_percent_without_disks_is_no_finding() -> None:
    rule = Threshold(name="disk", metric="host.disk_max_percent", above=0.0, samples=1)
    assert detect_threshold(NODE, [report(1, disks=())], rule) == []


def test_a_unit_threshold_is_checked_per_unit() -> None:
    rule = Threshold(name="rss", metric="unit.rss_bytes", above=1000, samples=2)
    reports = [report(1, units=(unit("a", rss_bytes=2000), unit("b", rss_bytes=5000))),
               report(2, units=(unit("a", rss_bytes=3000), unit("b", rss_bytes=10)))]
    (finding,) = detect_threshold(NODE, reports, rule)
    assert finding.unit == "a"
    assert finding.key == "metric_threshold/node-a/a"
    assert finding.summary == "unit.rss_bytes of unit a on node-a above 1000 for 2 samples (last 3000)"
    assert finding.evidence["window"] == [2000.0, 3000.0]


def test_a_unit_missing_from_part_of_the_window_is_no_finding() -> None:
    rule = Threshold(name="rss", metric="unit.rss_bytes", above=1000, samples=2)
    reports = [report(1, units=()), report(2, units=(unit("a", rss_bytes=3000),))]
    assert detect_threshold(NODE, reports, rule) == []


def test_an_unknown_metric_field_is_no_finding() -> None:
    rule = Threshold(name="x", metric="host.no_such_field", above=-1, samples=1)
    assert detect_threshold(NODE, [report(1)], rule) == []


def test_detect_thresholds_runs_every_rule() -> None:
    mem = Threshold(name="mem", metric="host.mem_percent", above=90.0, samples=1)
    snap = snapshot(reports=(report(1, cpu=99, mem=99), report(2, cpu=99, mem=99), report(3, cpu=99, mem=99)))
    assert sorted(f.evidence["threshold"] for f in detect_thresholds(snap, [CPU, mem])) == ["cpu-hot", "mem"]


# --- registry -----------------------------------------------------------------------------------


SETTINGS = DetectorSettings(offline_after=5.0, thresholds=(CPU,))
HOT = (report(1, cpu=99), report(2, cpu=99), report(3, cpu=99))


def test_the_registry_combines_unit_and_threshold_findings() -> None:
    snap = snapshot(units=(unit("a", state="exited", exit_code=1), unit("b", probe=probe(3))), reports=HOT)
    kinds = [(f.kind, f.unit) for f in detect_node(snap, NOW, SETTINGS)]
    assert kinds == [("unit_exited", "a"), ("probe_failing", "b"), ("metric_threshold", None)]


def test_the_registry_suppresses_unit_findings_for_an_offline_node() -> None:
    snap = snapshot(online=False, units=(unit("a", state="exited", exit_code=1),), reports=HOT)
    findings = detect_node(snap, NOW, SETTINGS)
    assert [f.kind for f in findings] == ["node_offline"]


def test_the_registry_suppresses_unit_findings_for_a_silent_node() -> None:
    snap = snapshot(last_seen=NOW - 60, units=(unit("a", probe=probe(9)),), reports=HOT)
    (finding,) = detect_node(snap, NOW, SETTINGS)
    assert finding.kind == "node_offline"


def test_a_healthy_node_has_no_findings() -> None:
    snap = snapshot(units=(unit("a", probe=probe(0)), unit("b", state="stopped")), reports=(report(1),))
    assert detect_node(snap, NOW, SETTINGS) == []


def test_findings_are_frozen_values() -> None:
    finding = Finding(kind="unit_exited", node=NODE, unit="a", severity="critical", summary="s")
    with pytest.raises(AttributeError):
        finding.kind = "other"  # type: ignore[misc]
    assert finding == Finding(kind="unit_exited", node=NODE, unit="a", severity="critical", summary="s")


def test_a_node_known_only_from_a_retained_digest_is_not_offline_yet() -> None:
    from detectors.model import NodeSnapshot  # noqa: PLC0415 - local to this regression test
    from detectors.presence import detect_node_offline  # noqa: PLC0415

    assert detect_node_offline(NodeSnapshot(node="n", online=False, last_seen=0.0), 100.0, 5.0) is None
    assert detect_node_offline(NodeSnapshot(node="n", online=False, last_seen=99.0), 100.0, 5.0) is not None
