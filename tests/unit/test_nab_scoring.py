"""The NAB scorer on hand-built files: window weights, false positives, probation, sweep, normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.nab_scoring import (
    MAX_TP,
    NOTHING_THRESHOLD,
    PROFILES,
    FileRows,
    normalise,
    probation_rows,
    scale_sigmoid,
    score_at_threshold,
    score_corpus,
    sweep_file,
    sweep_thresholds,
)
from bench.nab_strict import strict_score

STEP = 300.0
STANDARD = PROFILES["standard"]
LOW_FP = PROFILES["reward_low_FP_rate"]
LOW_FN = PROFILES["reward_low_FN_rate"]


def build_file(rows: int, windows: list[tuple[int, int]], alarms: list[int], name: str = "f.csv") -> FileRows:
    """A file of ``rows`` samples 5 min apart, windows as row ranges, score 1 at ``alarms`` and 0 elsewhere."""
    times = np.arange(rows) * STEP
    scores = np.zeros(rows)
    scores[alarms] = 1.0
    return sweep_file(name, times, scores, [(left * STEP, right * STEP) for left, right in windows])


def raw_at_one(rows: FileRows, profile: object = STANDARD) -> float:
    return score_at_threshold([rows], profile, 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rows", "expected"), [(100, 15), (1000, 150), (5000, 750), (22695, 750), (4032, 604)])
def test_probation_is_15_percent_capped_at_750_rows(rows: int, expected: int) -> None:
    assert probation_rows(rows) == expected


def test_scaled_sigmoid_shape() -> None:
    assert scale_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert scale_sigmoid(0.0) == 0.0
    assert scale_sigmoid(3.0) == pytest.approx(2 / (1 + math.exp(15)) - 1)
    assert scale_sigmoid(3.01) == -1.0


def test_an_early_hit_earns_the_full_true_positive_weight() -> None:
    rows = build_file(1000, [(500, 599)], alarms=[500])
    assert raw_at_one(rows) == pytest.approx(1.0)
    assert normalise(raw_at_one(rows), [rows], STANDARD) == pytest.approx(100.0)


def test_a_late_hit_earns_almost_nothing_but_still_beats_a_miss() -> None:
    rows = build_file(1000, [(500, 599)], alarms=[599])
    late = raw_at_one(rows)
    assert late == pytest.approx(scale_sigmoid(-1 / 100) / MAX_TP)
    assert 0.0 < late < 0.03
    assert late > raw_at_one(build_file(1000, [(500, 599)], alarms=[]))


def test_the_earliest_detection_of_a_window_counts_once() -> None:
    both = build_file(1000, [(500, 599)], alarms=[520, 580])
    first = build_file(1000, [(500, 599)], alarms=[520])
    assert raw_at_one(both) == pytest.approx(raw_at_one(first))
    assert raw_at_one(first) == pytest.approx(scale_sigmoid(-80 / 100) / MAX_TP)


def test_a_false_positive_before_the_first_window_costs_the_full_fp_weight() -> None:
    rows = build_file(1000, [(500, 599)], alarms=[300, 500])
    assert raw_at_one(rows) == pytest.approx(1.0 - 0.11)
    assert raw_at_one(rows, LOW_FP) == pytest.approx(1.0 - 0.22)


def test_a_false_positive_just_after_a_window_costs_almost_nothing() -> None:
    just_after = build_file(1000, [(500, 599)], alarms=[500, 600])
    far_after = build_file(1000, [(500, 599)], alarms=[500, 950])
    assert raw_at_one(just_after) == pytest.approx(1.0 + 0.11 * scale_sigmoid(1 / 99))
    assert 1.0 - raw_at_one(just_after) < 0.005
    assert raw_at_one(far_after) == pytest.approx(1.0 - 0.11)  # more than 3 widths past: -1


def test_alarms_only_in_probation_are_not_scored() -> None:
    rows = build_file(1000, [(500, 599)], alarms=[0, 10, 149])
    assert raw_at_one(rows) == pytest.approx(-1.0)
    assert normalise(raw_at_one(rows), [rows], STANDARD) == pytest.approx(0.0)


def test_a_window_inside_probation_is_not_scored() -> None:
    rows = build_file(1000, [(10, 50), (500, 599)], alarms=[500])
    assert rows.windows == 1
    assert rows.labelled_windows == 2
    assert raw_at_one(rows) == pytest.approx(1.0)


def test_a_missed_window_costs_the_fn_weight_of_the_profile() -> None:
    rows = build_file(1000, [(500, 599)], alarms=[])
    assert raw_at_one(rows, STANDARD) == -1.0
    assert raw_at_one(rows, LOW_FN) == -2.0


def test_the_sweep_matches_scoring_at_each_threshold() -> None:
    rng = np.random.default_rng(7)
    files = []
    for index in range(4):
        times = np.arange(800) * STEP
        scores = np.round(rng.random(800), 2)  # ties on purpose
        files.append(sweep_file(f"f{index}", times, scores, [(400 * STEP, 450 * STEP), (600 * STEP, 640 * STEP)]))
    for profile in PROFILES.values():
        sweep = sweep_thresholds(files, profile)
        assert sweep.thresholds[0] == NOTHING_THRESHOLD
        assert np.all(np.diff(sweep.thresholds) < 0)
        for threshold, raw in zip(sweep.thresholds, sweep.scores, strict=True):
            assert raw == pytest.approx(score_at_threshold(files, profile, float(threshold)))


def test_the_best_threshold_and_ties_going_to_the_higher_threshold() -> None:
    times = np.arange(1000) * STEP
    scores = np.zeros(1000)
    scores[500] = 0.9   # early hit
    scores[300] = 0.5   # a false positive before the window
    rows = sweep_file("f", times, scores, [(500 * STEP, 599 * STEP)])
    threshold, raw = sweep_thresholds([rows], STANDARD).best()
    assert threshold == 0.9
    assert raw == pytest.approx(1.0)
    silent = sweep_file("g", times, np.zeros(1000), [])
    assert sweep_thresholds([silent], STANDARD).best() == (NOTHING_THRESHOLD, 0.0)


def test_scores_outside_zero_one_are_refused() -> None:
    rows = sweep_file("f", np.arange(10.0), np.full(10, 1.5), [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep_thresholds([rows], STANDARD)


def test_normalisation_puts_null_at_0_and_perfect_at_100() -> None:
    rows = build_file(1000, [(300, 349), (500, 599)], alarms=[])
    assert normalise(-2.0, [rows], STANDARD) == 0.0
    assert normalise(2.0, [rows], STANDARD) == 100.0
    assert normalise(-4.0, [rows], LOW_FN) == 0.0
    assert normalise(0.0, [rows], LOW_FN) == pytest.approx(100 * 4 / 6)


def test_honest_scoring_applies_each_half_s_threshold_to_the_other_half() -> None:
    times = np.arange(1000) * STEP
    window = [(500 * STEP, 599 * STEP)]
    # Half A's hit sits at 0.8, half B's at 0.6 with a false positive at 0.7 before it.
    a_scores = np.zeros(1000)
    a_scores[500] = 0.8
    b_scores = np.zeros(1000)
    b_scores[500], b_scores[200] = 0.6, 0.7
    half_a = [sweep_file("a", times, a_scores, window)]
    half_b = [sweep_file("b", times, b_scores, window)]
    result = score_corpus([*half_a, *half_b], half_a, half_b, STANDARD)
    assert result.half_b == pytest.approx(0.0)  # A's threshold 0.8 finds nothing in B
    assert result.half_a == pytest.approx(100.0)  # B's threshold 0.6 still catches A's hit
    assert result.honest == pytest.approx(50.0)
    assert result.optimised == pytest.approx(normalise(2.0 - 0.11, [*half_a, *half_b], STANDARD))


def test_strict_scoring_chooses_the_variant_and_threshold_on_the_other_half() -> None:
    times = np.arange(1000) * STEP
    window = [(500 * STEP, 599 * STEP)]

    def half(hit: float, false_alarm: float) -> list[FileRows]:
        scores = np.zeros(1000)
        scores[500], scores[200] = hit, false_alarm
        return [sweep_file("f", times, scores, window)]

    # "lucky" is perfect on half A and fooled on half B; "steady" pays one false alarm on A and is right on B.
    rows = {"steady": (half(0.9, 0.95), half(0.9, 0.5)), "lucky": (half(0.8, 0.0), half(0.4, 0.7))}
    result = strict_score(rows, STANDARD)
    assert (result.chosen_on_a, result.chosen_on_b) == ("lucky", "steady")
    assert result.half_b == pytest.approx(0.0)  # lucky at A's threshold (0.8) finds nothing in B
    assert result.half_a == pytest.approx(normalise(1.0 - 0.11, rows["steady"][0], STANDARD))  # steady at 0.9
    assert result.honest == pytest.approx((result.half_a + result.half_b) / 2)
