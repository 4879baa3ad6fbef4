"""Training's pure rules: when a model is refused, how it is scored, and that a resumed forest is the same."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier  # type: ignore[import-untyped]

from workloads.train import decide, score_model


@pytest.mark.parametrize(("score", "current", "margin", "publish"), [
    (0.80, None, 0.02, True),    # nothing to compare with
    (0.90, 0.85, 0.02, True),    # better
    (0.85, 0.85, 0.02, True),    # as good
    (0.84, 0.85, 0.02, True),    # worse, within the margin
    (0.83, 0.85, 0.02, True),    # exactly the margin worse (refused only beyond it)
    (0.82, 0.85, 0.02, False),   # worse by more than the margin
    (0.50, 0.95, 0.10, False),
    (0.85, 0.85, 0.0, True),
    (0.8499, 0.85, 0.0, False),  # a zero margin refuses anything worse
])
def test_decide_refuses_a_model_worse_than_current_by_more_than_the_margin(
        score: float, current: float | None, margin: float, publish: bool) -> None:
    decision = decide(score, current, margin)
    assert decision.publish is publish
    if not publish:
        assert "worse than the current model's" in decision.reason


def data(seed: int = 0, rows: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(0, 0.5, rows) > 0).astype(int)
    return x, y


def test_score_model_is_roc_auc_or_accuracy_for_a_one_class_set() -> None:
    x, y = data()
    model = RandomForestClassifier(n_estimators=10, random_state=0).fit(x[:150], y[:150])
    metric, value = score_model(model, x[150:], y[150:])
    assert metric == "roc_auc"
    assert 0.8 < value <= 1.0
    ones = y[150:] == 1
    metric, value = score_model(model, x[150:][ones], y[150:][ones])
    assert metric == "accuracy"
    assert 0.0 <= value <= 1.0
    never_failed = RandomForestClassifier(n_estimators=2, random_state=0).fit(x, np.zeros(len(x), dtype=int))
    assert score_model(never_failed, x, y) == ("roc_auc", 0.5)


def test_a_forest_grown_in_steps_is_the_forest_grown_at_once() -> None:
    """What makes resuming from a checkpoint safe: the same seed grows the same trees."""
    x, y = data(1)
    whole = RandomForestClassifier(n_estimators=30, max_depth=4, random_state=7).fit(x, y)
    stepped = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=7, warm_start=True).fit(x, y)
    for n in (20, 30):
        stepped.set_params(n_estimators=n)
        stepped.fit(x, y)
    np.testing.assert_array_equal(whole.predict_proba(x), stepped.predict_proba(x))
