"""The per-host multivariate watch: vectors per step, fits and scores as jobs, findings with evidence, bounds."""

from __future__ import annotations

import random

import pytest

from controller.app import build_watch
from controller.host_models import build_host_watch
from detectors.anomaly.host_watch import FitJob, HostModelSpec, HostVectorWatch, ScoreJob, run_jobs
from detectors.anomaly.policy import AlertPolicySpec
from detectors.anomaly.watch import AnomalyWatch
from rules.loader import load_default_rulebook, parse_rulebook
from selfheal import wire
from selfheal.errors import RulebookError

FEATURES = ("cpu_percent", "mem_percent")


def report(node: str, ts: float, cpu: float, mem: float) -> wire.Report:
    host = wire.HostMetrics(cpu_percent=cpu, load1=0, load5=0, load15=0, mem_total_bytes=1, mem_available_bytes=1,
                            mem_percent=mem, swap_percent=0)
    return wire.Report(node=node, session=1, seq=int(ts), ts=ts, host=host, units=[])


def normal(rng: random.Random) -> tuple[float, float]:
    """Memory follows CPU (a cache that grows with load): each alone spans 10-80 %."""
    cpu = rng.uniform(10, 80)
    return cpu, cpu + rng.gauss(0, 2)


def spec(**kwargs: object) -> HostModelSpec:
    params: dict[str, object] = {"name": "vec", "features": FEATURES, "step": 0.0, "history": 400,
                                 "min_samples": 200, "refit_every": 1e9,
                                 "policy": AlertPolicySpec(threshold=0.98, persistence=3, window=3, hold=10)}
    return HostModelSpec(**{**params, **kwargs})  # type: ignore[arg-type]


def settle(watch: HostVectorWatch) -> list[object]:
    """What the controller's task does each round, without the thread."""
    jobs = watch.take_work()
    watch.apply(run_jobs(jobs))
    return list(jobs)


def test_an_unseen_combination_raises_a_finding_with_evidence_and_normal_vectors_do_not() -> None:
    rng = random.Random(3)  # noqa: S311 - test data
    watch = HostVectorWatch([spec()])
    for i in range(200):
        watch.observe(report("n1", 1000.0 + i, *normal(rng)))
    jobs = settle(watch)
    assert [type(j) for j in jobs] == [FitJob]  # fitted once there are min_samples vectors
    for i in range(50):  # more of the usual: nothing
        watch.observe(report("n1", 1200.0 + i, *normal(rng)))
    settle(watch)
    assert watch.findings("n1") == []
    for i in range(4):  # CPU at its lowest, memory at its highest: each value is in range, the pair never was
        watch.observe(report("n1", 1250.0 + i, 10.0, 80.0))
    settle(watch)
    findings = watch.findings("n1")
    assert [(f.kind, f.node, f.unit) for f in findings] == [("host_anomaly", "n1", None)]
    evidence = findings[0].evidence
    assert evidence["score"] >= 0.98
    assert evidence["vector"] == {"cpu_percent": 10.0, "mem_percent": 80.0}
    assert abs(evidence["typical"]["cpu_percent"] - evidence["typical"]["mem_percent"]) < 5
    assert evidence["training_vectors"] == 200
    assert len(evidence["window"]) == 30


def test_vectors_are_scored_by_a_model_fitted_before_them() -> None:
    rng = random.Random(4)  # noqa: S311 - test data
    watch = HostVectorWatch([spec(refit_every=10.0)])
    for i in range(200):
        watch.observe(report("n1", 1000.0 + i, *normal(rng)))
    settle(watch)
    for i in range(20):
        watch.observe(report("n1", 1200.0 + i, *normal(rng)))
    jobs = watch.take_work()
    score, fit = jobs
    assert isinstance(score, ScoreJob)
    assert isinstance(fit, FitJob)
    assert score.model.fitted_at == 1199.0 < score.vectors[0][0]  # the old model scores the new vectors
    assert watch.take_work() == []  # a fit in flight is not asked for twice
    watch.apply(run_jobs(jobs))
    assert watch.take_work() == []


def test_reports_are_averaged_into_one_vector_per_step() -> None:
    watch = HostVectorWatch([spec(step=60.0, min_samples=2, history=10)])
    for i in range(180):  # three minutes of 1 s reports
        watch.observe(report("n1", 6000.0 + i, 10.0 + (i % 60), 20.0))
    assert watch.vectors == 2  # the third minute is not finished yet
    jobs = watch.take_work()
    assert isinstance(jobs[0], FitJob)
    assert jobs[0].samples == ((39.5, 20.0), (39.5, 20.0))
    assert jobs[0].fitted_at == 6179.0


def test_hosts_are_bounded_and_forgotten() -> None:
    watch = HostVectorWatch([spec()], max_hosts=2)
    for node in ("a", "b", "c"):
        watch.observe(report(node, 1000.0, 10.0, 10.0))
    assert len(watch) == 2
    watch.forget("c")
    assert len(watch) == 1
    watch.observe(report("b", 999.0, 10.0, 10.0))  # out of order: dropped
    assert watch.vectors == 3


def test_a_failed_fit_can_be_retried() -> None:
    watch = HostVectorWatch([spec(min_samples=2, history=2)])
    for i in range(2):
        watch.observe(report("n1", 1000.0 + i, 10.0, 10.0))
    jobs = watch.take_work()
    assert watch.take_work() == []
    watch.abandon(jobs)
    assert [type(j) for j in watch.take_work()] == [FitJob]


def test_the_anomaly_watch_carries_host_findings() -> None:
    hosts = HostVectorWatch([spec(min_samples=2, history=2)])
    watch = AnomalyWatch([], hosts=hosts)
    watch.observe(report("n1", 1000.0, 10.0, 10.0))
    assert hosts.vectors == 1
    watch.forget("n1")
    assert len(hosts) == 0


def test_rulebook_host_models_build_a_watch() -> None:
    book = parse_rulebook("""version: 1
host_models:
  - name: host-vector
    features: [cpu_percent, mem_percent, disk_max_percent]
    step: 30
    min_samples: 100
    policy: {threshold: 0.99, persistence: 3, window: 5}
rules:
  - {name: r, match: {kind: host_anomaly}, ladder: [{action: notify}]}
""", source="r.yaml")
    hosts = build_host_watch(book)
    assert hosts is not None
    made = hosts.specs["host-vector"]
    assert made.features == ("cpu_percent", "mem_percent", "disk_max_percent")
    assert (made.step, made.min_samples, made.history, made.policy.threshold, made.policy.persistence) == (
        30.0, 100, 2048, 0.99, 3)
    watch = build_watch(book)
    assert watch is not None
    assert watch.hosts is not None
    assert build_host_watch(load_default_rulebook()) is None
    assert load_default_rulebook().rule_for("host_anomaly", "warning") is not None


@pytest.mark.parametrize(("body", "message"), [
    ("  - {name: h, features: [cpu_percent, nope]}", "'nope' is not one of"),
    ("  - {name: h, features: []}", "should be non-empty"),
    ("  - {name: h, min_samples: 50, history: 10}", "min_samples 50 exceeds history 10"),
    ("  - {name: h, policy: {persistence: 3, window: 2}}", "host model 'h': policy: persistence 3 exceeds"),
    ("  - {name: h}\n  - {name: h}", "duplicate host model"),
])
def test_bad_host_models_are_rulebook_errors(body: str, message: str) -> None:
    with pytest.raises(RulebookError, match=message):
        parse_rulebook(f"version: 1\nhost_models:\n{body}\nrules: []\n", source="r.yaml")
