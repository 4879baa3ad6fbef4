"""The live anomaly watch: per (watch, node, unit) streams fed by reports, findings with evidence, bounds."""

from __future__ import annotations

import msgspec
import pytest

from controller.app import build_watch
from detectors.anomaly.policy import AlertPolicySpec
from detectors.anomaly.watch import AnomalyWatch, WatchSpec
from rules.loader import load_default_rulebook, parse_rulebook
from selfheal import wire
from selfheal.errors import RulebookError

LIMIT = 1000.0


def report(node: str, ts: float, seq: int, *, rss: dict[str, int], disk: float = 10.0) -> wire.Report:
    host = wire.HostMetrics(cpu_percent=1, load1=0, load5=0, load15=0, mem_total_bytes=1, mem_available_bytes=1,
                            mem_percent=1, swap_percent=0,
                            disks=[wire.DiskUsage(mount="/", total_bytes=100, used_bytes=int(disk), percent=disk)])
    units = [wire.UnitReport(name=name, kind="process", state="running", rss_bytes=value)
             for name, value in rss.items()]
    return wire.Report(node=node, session=1, seq=seq, ts=ts, host=host, units=units)


def leak_watch(**policy: float) -> AnomalyWatch:
    spec = WatchSpec(name="leak", metric="unit.rss_bytes",
                     detector={"kind": "forecast", "limit": LIMIT, "horizon": 60, "window": 20, "min_span": 5},
                     policy=AlertPolicySpec(threshold=0.5, persistence=2, window=3, hold=10, **policy))
    return AnomalyWatch([spec])


def test_a_rising_unit_is_found_with_its_window_and_a_flat_one_is_not() -> None:
    watch = leak_watch()
    for i in range(30):
        watch.observe(report("n1", 100.0 + i, i, rss={"leaky": 100 + 20 * i, "flat": 300 + (i % 3)}))
    findings = watch.findings("n1")
    assert [(f.kind, f.unit) for f in findings] == [("metric_anomaly", "leaky")]
    evidence = findings[0].evidence
    assert evidence["watch"] == "leak"
    assert 0.5 <= evidence["score"] <= 1.0
    assert len(evidence["window"]) == 30
    assert evidence["window"][-1]["value"] == 680.0
    assert watch.findings("other-node") == []


def test_the_alert_holds_then_clears_when_the_trend_stops() -> None:
    watch = leak_watch()
    for i in range(30):
        watch.observe(report("n1", 100.0 + i, i, rss={"leaky": 100 + 20 * i}))
    assert watch.findings("n1")
    for i in range(30, 90):
        watch.observe(report("n1", 100.0 + i, i, rss={"leaky": 680}))
    assert watch.findings("n1") == []


def test_streams_are_bounded_and_a_host_budget_limits_new_alerts() -> None:
    watch = AnomalyWatch([WatchSpec(name="leak", metric="unit.rss_bytes",
                                    detector={"kind": "forecast", "limit": LIMIT, "horizon": 60, "window": 20,
                                              "min_span": 5})],
                         max_streams=8, host_budget=(2, 3600.0))
    for i in range(30):
        watch.observe(report("n1", 100.0 + i, i, rss={f"u{j}": 100 + 20 * i for j in range(8)}))
    assert len(watch.findings("n1")) == 2  # eight streams rose; the host's budget admitted two new alerts
    watch.observe(report("n2", 200.0, 0, rss={"late": 1}))
    assert len(watch._streams) == 8  # bounded: the longest idle stream made room


def test_a_bad_detector_spec_names_the_watch() -> None:
    with pytest.raises(ValueError, match=r"anomaly watch 'leak': detector: .*limit"):
        AnomalyWatch([WatchSpec(name="leak", metric="unit.rss_bytes", detector={"kind": "forecast"})])
    book = parse_rulebook("version: 1\nanomalies:\n  - {name: w, metric: host.cpu_percent, "
                          "detector: {kind: nonsense}}\nrules: []\n", source="r.yaml")
    with pytest.raises(RulebookError, match="anomaly watch 'w'"):
        build_watch(book)


def test_the_rulebook_schema_checks_anomaly_watches() -> None:
    with pytest.raises(RulebookError, match=r"anomaly 'w' \(anomalies\[0\]\): metric"):
        parse_rulebook("version: 1\nanomalies:\n  - {name: w, metric: host.nope, detector: {kind: fused}}\n"
                       "rules: []\n", source="r.yaml")
    with pytest.raises(RulebookError, match="persistence 3 exceeds window 2"):
        parse_rulebook("version: 1\nanomalies:\n  - {name: w, metric: host.cpu_percent, detector: {kind: fused}, "
                       "policy: {persistence: 3, window: 2}}\nrules: []\n", source="r.yaml")


def test_the_default_rulebook_watches_disks_and_memory_and_reports_anomalies() -> None:
    book = load_default_rulebook()
    assert {a.name for a in book.anomalies} == {"disk-filling", "memory-filling"}
    assert build_watch(book) is not None
    rule = book.rule_for("metric_anomaly", "warning")
    assert rule is not None
    assert [r.action for r in rule.ladder] == ["notify"]


def test_a_disk_filling_up_is_forecast_before_it_is_full() -> None:
    watch = build_watch(load_default_rulebook())
    assert watch is not None
    for i in range(400):  # 0.05 %/s: from 40 % it would reach 95 % in ~18 min, inside the 6 h horizon
        watch.observe(report("n1", 1000.0 + i * 5, i, rss={}, disk=40 + 0.25 * i * 0.2))
    findings = [f for f in watch.findings("n1") if f.evidence["watch"] == "disk-filling"]
    assert findings
    assert findings[0].unit is None
    assert max(s["value"] for s in findings[0].evidence["window"]) < 95


def test_a_fused_watch_finds_a_unit_that_breaks_out_after_weeks_of_history() -> None:
    # 1 s-style reports resampled to minutes; 20 days of a steady unit, then its memory jumps by half its range.
    spec = WatchSpec(name="unit-memory", metric="unit.rss_bytes", detector={"kind": "fused", "step": 60},
                     policy=AlertPolicySpec())
    watch = AnomalyWatch([spec])
    start, seq = 1_700_000_000.0, 0
    for minute in range(20 * 1440):
        seq += 1
        watch.observe(report("n1", start + minute * 60.0, seq, rss={"svc": 500 + (minute * 7919) % 100}))
    assert watch.findings("n1") == []
    for minute in range(20 * 1440, 20 * 1440 + 5):
        seq += 1
        watch.observe(report("n1", start + minute * 60.0, seq, rss={"svc": 650}))
    [finding] = watch.findings("n1")
    assert finding.unit == "svc"
    detector = finding.evidence["detector"]  # as it stood at the alert's peak, not at the latest sample
    assert detector["part"] == "level"
    assert detector["history_s"] >= 19 * 86400
    assert detector["excess"] > 0
    assert finding.evidence["detector_now"]["part"] == "mean"  # now only the 6 h mean still climbs


def fused_watch(threshold: float = 0.006) -> AnomalyWatch:
    return AnomalyWatch([WatchSpec(name="unit-memory", metric="unit.rss_bytes", detector={"kind": "fused"},
                                   policy=AlertPolicySpec(threshold=threshold))])


def feed_days(watch: AnomalyWatch, days: float, start_seq: int = 0) -> int:
    seq = start_seq
    for step in range(start_seq, start_seq + int(days * 288)):
        seq += 1
        watch.observe(report("n1", 1_700_000_000.0 + step * 300.0, seq, rss={"svc": 500 + (step * 7919) % 100}))
    return seq


def test_a_restored_watch_carries_on_exactly_where_the_saved_one_was() -> None:
    before = fused_watch()
    seq = feed_days(before, 10)
    restored = fused_watch()
    assert restored.restore(before.snapshot("code-1"), "code-1") == (1, 0)
    key = ("unit-memory", "n1", "svc")
    for step in range(seq, seq + 50):
        sample = report("n1", 1_700_000_000.0 + step * 300.0, step + 1, rss={"svc": 700 if step % 7 == 0 else 520})
        before.observe(sample)
        restored.observe(sample)
        assert restored._streams[key].window[-1] == before._streams[key].window[-1]
    assert [f.summary for f in restored.findings("n1")] == [f.summary for f in before.findings("n1")]


def test_streams_of_a_changed_watch_start_afresh_and_other_code_is_refused() -> None:
    before = fused_watch()
    feed_days(before, 1)
    saved = before.snapshot("code-1")
    assert fused_watch(threshold=0.05).restore(saved, "code-1") == (0, 1)  # the policy changed
    with pytest.raises(ValueError, match="other detector code"):
        fused_watch().restore(saved, "code-2")
    with pytest.raises(ValueError, match="unreadable"):
        fused_watch().restore(saved[: len(saved) // 2], "code-1")
    with pytest.raises(ValueError, match="format"):
        fused_watch().restore(msgspec.msgpack.encode({"format": 99}), "code-1")
