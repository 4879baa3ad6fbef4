"""Alert policy, host budget, registry validation and the IsolationForest split — pure, time injected."""

from __future__ import annotations

import random

import jsonschema
import pytest

from detectors.anomaly.multivariate import HostVectorDetector, fit_host_model, score_host_vector
from detectors.anomaly.policy import AlertPolicy, AlertPolicySpec, HostAlertBudget
from detectors.anomaly.registry import build_detector, default_registry, spec_json_schema


def run_policy(spec: AlertPolicySpec, scores: list[float], step: float = 60.0) -> list[tuple[bool, bool]]:
    policy = AlertPolicy(spec)
    return [(v.raised, v.onset) for v in (policy.observe(i * step, s) for i, s in enumerate(scores))]


@pytest.mark.parametrize(("spec", "scores", "raised"), [
    (AlertPolicySpec(threshold=0.5, hold=0), [0.1, 0.6, 0.2], [False, True, False]),
    (AlertPolicySpec(threshold=0.5, persistence=2, window=3, hold=0), [0.6, 0.1, 0.6, 0.1, 0.1],
     [False, False, True, False, False]),
    (AlertPolicySpec(threshold=0.5, persistence=3, window=3, hold=0), [0.6, 0.6, 0.1, 0.6], [False] * 4),
    (AlertPolicySpec(threshold=0.5, hold=120), [0.6, 0.0, 0.0, 0.0], [True, True, True, False]),
])
def test_policy_raises_on_n_of_m_and_holds(spec: AlertPolicySpec, scores: list[float], raised: list[bool]) -> None:
    assert [r for r, _ in run_policy(spec, scores)] == raised


def test_onset_is_reported_once_per_episode() -> None:
    verdicts = run_policy(AlertPolicySpec(threshold=0.5, hold=60), [0.9, 0.9, 0.0, 0.0, 0.0, 0.9])
    assert [onset for _, onset in verdicts] == [True, False, False, False, False, True]


@pytest.mark.parametrize("kwargs", [{"threshold": 1.5}, {"persistence": 3, "window": 2}, {"hold": -1.0}])
def test_a_bad_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"threshold|persistence|hold"):
        AlertPolicySpec(**kwargs)  # type: ignore[arg-type]


def test_host_budget_admits_max_alerts_per_period() -> None:
    budget = HostAlertBudget(max_alerts=2, per=3600.0)
    assert [budget.admit(t) for t in (0.0, 10.0, 20.0, 3600.5, 3605.0, 3700.0)] == [
        True, True, False, True, False, True]  # 3600.5: the onset at 0 has aged out; 3700: the one at 10
    assert budget.suppressed == 2


# --- registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "message"), [
    ({"kind": "nope"}, "kind: 'nope'"),
    ({}, "kind: None"),
    ({"kind": "extremes", "half_lif": 3}, "half_lif: unknown key"),
    ({"kind": "extremes", "half_life": -1}, "half_life: -1 is below"),
    ({"kind": "robust_z", "on": "levels"}, "on: 'levels' is not one of"),
    ({"kind": "robust_z", "recent": 2.5}, "recent: 2.5 is not an integer"),
    ({"kind": "robust_z", "window": "1h"}, "window: '1h' is not a number"),
    ({"kind": "robust_z", "window": True}, "window: True is not a number"),
    ({"kind": "forecast"}, "limit: required"),
    ({"kind": "fused", "calibrate": "yes"}, "calibrate: 'yes'"),
])
def test_bad_specs_name_the_key(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_detector(spec)


def test_the_json_schema_agrees_with_the_builder() -> None:
    validator = jsonschema.Draft202012Validator(spec_json_schema())
    good: list[dict[str, object]] = [
        {"kind": "fused"}, {"kind": "forecast", "limit": 95, "step": 60}, {"kind": "robust_z", "on": "diff"}]
    for spec in good:
        validator.validate(spec)
        build_detector(spec)
    bad: list[dict[str, object]] = [
        {"kind": "forecast"}, {"kind": "fused", "half_lif": 1}, {"kind": "extremes", "half_life": -1}]
    for spec in bad:
        assert not validator.is_valid(spec)
    assert len(spec_json_schema()["oneOf"]) == len(default_registry())


def test_a_registry_is_passed_in_not_global() -> None:
    registry = {"only": default_registry()["running_extremes"]}
    assert build_detector({"kind": "only"}, registry).update(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="kind"):
        build_detector({"kind": "fused"}, registry)


# --- multivariate -------------------------------------------------------------------------------


def cluster(n: int, seed: int = 0) -> list[tuple[float, float]]:
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    return [(x, 2 * x + rng.gauss(0, 0.05)) for x in (rng.uniform(0, 1) for _ in range(n))]


def test_isolation_forest_scores_an_unseen_combination_high() -> None:
    model = fit_host_model(cluster(300), features=("cpu", "mem"), fitted_at=0.0, trees=50)
    assert score_host_vector(model, (0.5, 0.0)) > 0.97  # each value is in range; the pair never happened
    assert score_host_vector(model, (0.5, 1.0)) < 0.9
    assert score_host_vector(model, (0.5, 1.0)) == score_host_vector(model, [0.5, 1.0])


def test_host_detector_refits_on_schedule_with_its_own_past_only() -> None:
    detector = HostVectorDetector(("cpu", "mem"), history=400, refit_every=100.0, min_samples=50)
    vectors = cluster(120)
    for ts, vector in enumerate(vectors[:49]):
        assert detector.update(float(ts), vector) == 0.0
    assert not detector.refit_due(49.0)
    detector.update(49.0, vectors[49])
    assert detector.refit_due(50.0)
    training = detector.training_set()
    assert training == [tuple(v) for v in vectors[:50]]
    detector.install(fit_host_model(training, features=("cpu", "mem"), fitted_at=50.0, trees=20))
    assert not detector.refit_due(149.0)
    assert detector.refit_due(150.0)
    assert detector.update(49.0, (0.1, 0.2)) == 0.0  # not after the last sample: dropped
    assert detector.update(51.0, (float("nan"), 0.2)) == 0.0
    assert 0.0 <= detector.update(52.0, (0.5, 0.0)) <= 1.0
    with pytest.raises(ValueError, match="model for"):
        detector.install(fit_host_model(training, features=("a", "b"), fitted_at=0.0, trees=5))


def test_fit_refuses_malformed_samples() -> None:
    with pytest.raises(ValueError, match="at least 2 rows"):
        fit_host_model([(1.0,)], features=("cpu", "mem"), fitted_at=0.0)
