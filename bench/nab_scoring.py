"""The Numenta Anomaly Benchmark scorer, re-implemented: pure functions of scores, timestamps and windows.

This follows NAB v1.1 (``nab/sweeper.py``, ``nab/runner.py``) so that our
figures can stand beside the published scoreboard:

- **probation**: the first ``min(floor(0.15 * rows), 0.15 * 5000)`` rows of a
  file (at most 750) are not scored; a window lying wholly inside it does not
  count.
- **window weights**: a detection at row ``i`` of a window ``[L, R]`` of width
  ``w`` is worth ``sigmoid_s(-(R - i + 1) / w) * tp / sigmoid_s(-1)`` — about
  ``tp`` at the left edge, falling towards 0 at the right edge — where
  ``sigmoid_s(x) = 2 / (1 + e^(5x)) - 1`` (and ``-1`` beyond ``x > 3``).
- **false positives**: a detection before the first window costs ``fp``; after a
  window it costs ``fp * sigmoid_s(|R_prev - i| / (w_prev - 1))`` — nearly
  nothing just after the window, the full ``fp`` three widths later.
- **earliest detection per window**: a window scores the weight of its best
  (earliest) detected row once; an undetected window costs ``fn``.
- **profiles**: standard (tp 1, fp 0.11, fn 1), reward_low_FP_rate (fp 0.22),
  reward_low_FN_rate (fn 2).
- **threshold optimisation**: a row is a detection when its score is ``>=`` the
  threshold; the corpus score is the best over every distinct score (and
  "detect nothing"), ties going to the higher threshold.
- **normalisation**: ``100 * (raw - null) / (perfect - null)`` where *perfect*
  is ``tp`` per labelled window and *null* the raw score of a detector that
  never fires (``-fn`` per scorable window).

Everything works on numpy arrays so a whole-corpus sweep takes milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

PROBATION_PERCENT = 0.15
NOTHING_THRESHOLD = 1.1
"""NAB's starting threshold: above any score, i.e. no detections at all."""


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    tp: float
    fp: float
    fn: float


PROFILES: dict[str, Profile] = {
    "standard": Profile("standard", tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP_rate": Profile("reward_low_FP_rate", tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN_rate": Profile("reward_low_FN_rate", tp=1.0, fp=0.11, fn=2.0),
}


def probation_rows(rows: int, percent: float = PROBATION_PERCENT) -> int:
    """Rows at the start of a file that are never scored."""
    return int(min(math.floor(percent * rows), percent * 5000))


def scale_sigmoid(position: float) -> float:
    """NAB's scaled sigmoid: ~1 at -1 (window start), 0 at 0 (window end), -1 from 3 on."""
    if position > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


MAX_TP = scale_sigmoid(-1.0)


@dataclass(frozen=True, slots=True)
class FileRows:
    """One file's scorable rows (probation removed), ready to be weighted by any profile."""

    name: str
    scores: FloatArray
    in_window: npt.NDArray[np.bool_]
    weight: FloatArray
    """Unweighted sweep value of each row: positive in windows, ``<= 0`` outside."""
    window: IntArray
    """Window number within the file for rows in a window, else -1."""
    windows: int
    """Windows with at least one scorable row."""
    labelled_windows: int
    """All windows of the file, as the label file lists them (the "perfect" count)."""


def locate_windows(timestamps: FloatArray, windows: Sequence[tuple[float, float]]) -> list[tuple[int, int]]:
    """Row index ranges ``[left, right]`` (inclusive) of each window; empty windows are dropped."""
    spans = []
    for start, end in windows:
        left = int(np.searchsorted(timestamps, start, side="left"))
        right = int(np.searchsorted(timestamps, end, side="right")) - 1
        if right >= left:
            spans.append((left, right))
    return spans


def sweep_file(name: str, timestamps: npt.ArrayLike, scores: npt.ArrayLike,
               windows: Sequence[tuple[float, float]]) -> FileRows:
    """Each row's window membership and unweighted sweep value (``Sweeper.calcSweepScore``)."""
    timestamps = np.asarray(timestamps, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    rows = len(timestamps)
    if len(scores) != rows:
        raise ValueError(f"{name}: {len(scores)} scores for {rows} rows")
    weight = np.full(rows, -1.0)
    window = np.full(rows, -1, dtype=np.int64)
    spans = locate_windows(timestamps, windows)
    for number, (left, right) in enumerate(spans):
        width = right - left + 1
        index = np.arange(left, right + 1)
        position = -(right - index + 1) / width
        weight[left:right + 1] = [scale_sigmoid(p) for p in position]
        window[left:right + 1] = number
        after_end = spans[number + 1][0] if number + 1 < len(spans) else rows
        # NAB divides by (width - 1); a one-row window would divide by zero there, so count it as 1.
        past = np.abs(right - np.arange(right + 1, after_end)) / max(width - 1, 1)
        weight[right + 1:after_end] = [scale_sigmoid(p) for p in past]
    start = probation_rows(rows)
    scorable_windows = window[start:]
    return FileRows(
        name=name, scores=np.asarray(scores[start:], dtype=np.float64), in_window=scorable_windows >= 0,
        weight=weight[start:], window=scorable_windows,
        windows=len(set(scorable_windows[scorable_windows >= 0].tolist())), labelled_windows=len(windows),
    )


@dataclass(frozen=True, slots=True)
class Sweep:
    """The raw score at every candidate threshold, thresholds descending."""

    thresholds: FloatArray
    scores: FloatArray

    def best(self) -> tuple[float, float]:
        """``(threshold, raw score)`` of the best threshold; ties go to the higher threshold."""
        index = int(np.argmax(self.scores))
        return float(self.thresholds[index]), float(self.scores[index])


def _concatenate(files: Sequence[FileRows], profile: Profile) -> tuple[FloatArray, FloatArray, IntArray, int]:
    scores, values, windows = [], [], []
    offset = 0
    for rows in files:
        scores.append(rows.scores)
        values.append(np.where(rows.in_window, rows.weight * profile.tp / MAX_TP, rows.weight * profile.fp))
        windows.append(np.where(rows.window >= 0, rows.window + offset, -1))
        offset += int(rows.window.max(initial=-1)) + 1
    total_windows = sum(rows.windows for rows in files)
    if not files:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64), 0
    return np.concatenate(scores), np.concatenate(values), np.concatenate(windows), total_windows


def sweep_thresholds(files: Sequence[FileRows], profile: Profile) -> Sweep:
    """Raw score of the files taken together at every distinct threshold (``calcScoreByThreshold``)."""
    scores, values, windows, total_windows = _concatenate(files, profile)
    nothing = -profile.fn * total_windows
    if len(scores) == 0:
        return Sweep(np.array([NOTHING_THRESHOLD]), np.array([nothing]))
    if not np.all((scores >= 0.0) & (scores <= 1.0)):
        raise ValueError("NAB scores must lie in [0, 1]")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_values, sorted_windows = scores[order], values[order], windows[order]
    outside = sorted_windows < 0
    gain = np.where(outside, sorted_values, 0.0)
    # A window's credit is the best (earliest) detected row: per window, the running maximum of its
    # rows' values in threshold order; each row adds what it raises that maximum by, and the first
    # detected row also cancels the window's false-negative cost.
    inside = np.flatnonzero(~outside)
    if len(inside):
        by_window = inside[np.lexsort((inside, sorted_windows[inside]))]
        group = sorted_windows[by_window]
        group_rank = np.cumsum(np.r_[True, group[1:] != group[:-1]])
        # values are in [0, tp]; lifting each window by 2 * tp * rank keeps the running maximum per window
        lift = 2.0 * (profile.tp + 1.0) * group_rank
        running = np.maximum.accumulate(sorted_values[by_window] + lift) - lift
        first = np.r_[True, group[1:] != group[:-1]]
        previous = np.r_[0.0, running[:-1]]
        gain[by_window] = np.where(first, running + profile.fn, running - previous)
    totals = nothing + np.cumsum(gain)
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    thresholds = np.r_[NOTHING_THRESHOLD, sorted_scores[last_of_tie]]
    raw = np.r_[nothing, totals[last_of_tie]]
    return Sweep(thresholds, raw)


def score_at_threshold(files: Sequence[FileRows], profile: Profile, threshold: float) -> float:
    """Raw score of the files with detections at ``score >= threshold`` (``scoreDataSet``)."""
    total = 0.0
    for rows in files:
        detected = rows.scores >= threshold
        false_positives = detected & ~rows.in_window
        total += float(np.sum(rows.weight[false_positives])) * profile.fp
        for number in range(int(rows.window.max(initial=-1)) + 1):
            hits = detected & (rows.window == number)
            if not np.any(rows.window == number):
                continue
            if np.any(hits):
                total += float(np.max(rows.weight[hits])) * profile.tp / MAX_TP
            else:
                total -= profile.fn
    return total


def null_score(files: Sequence[FileRows], profile: Profile) -> float:
    """Raw score of a detector that never fires: every scorable window missed."""
    return -profile.fn * sum(rows.windows for rows in files)


def perfect_score(files: Sequence[FileRows], profile: Profile) -> float:
    """Raw score of a detector that hits every labelled window at its first row."""
    return profile.tp * sum(rows.labelled_windows for rows in files)


def normalise(raw: float, files: Sequence[FileRows], profile: Profile) -> float:
    """The NAB score: 0 for the null detector, 100 for the perfect one."""
    null, perfect = null_score(files, profile), perfect_score(files, profile)
    if perfect == null:
        return 0.0
    return 100.0 * (raw - null) / (perfect - null)


@dataclass(frozen=True, slots=True)
class Result:
    """One detector under one profile."""

    threshold: float
    optimised: float
    """NAB score with the threshold optimised on the whole corpus (the scoreboard's number)."""
    honest: float
    """NAB score of the corpus when each half is scored at the threshold chosen on the other half."""
    half_a: float
    """Half A scored at the threshold chosen on half B (normalised over half A)."""
    half_b: float
    """Half B scored at the threshold chosen on half A (normalised over half B)."""


def score_corpus(files: Sequence[FileRows], half_a: Sequence[FileRows], half_b: Sequence[FileRows],
                 profile: Profile) -> Result:
    """Optimised and honest (two-fold: choose on one half, score the other) NAB scores."""
    threshold, raw = sweep_thresholds(files, profile).best()
    threshold_a, _ = sweep_thresholds(half_a, profile).best()
    threshold_b, _ = sweep_thresholds(half_b, profile).best()
    raw_a = score_at_threshold(half_a, profile, threshold_b)
    raw_b = score_at_threshold(half_b, profile, threshold_a)
    return Result(
        threshold=threshold, optimised=normalise(raw, files, profile),
        honest=normalise(raw_a + raw_b, [*half_a, *half_b], profile),
        half_a=normalise(raw_a, half_a, profile), half_b=normalise(raw_b, half_b, profile),
    )
