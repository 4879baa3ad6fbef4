"""Input stages in front of a detector: a rolling mean, and resampling to a fixed step.

``RollingMean`` feeds its detector the mean of the last ``span`` seconds, so a
sustained shift (a level that stays up for an hour) can break out even where
single spikes were higher before. It keeps ``buckets`` partial sums, not the
samples, so its memory does not grow with the sampling rate.

``Resampled`` turns a fast series (agents report every second) into one mean
per ``step`` seconds before the detector sees it, so detectors tuned in
minutes and hours hold the same small state at any report rate and cost a
fraction of a microsecond per raw sample. A bucket is scored when the first
sample after it arrives (its mean is only known then — no look-ahead); the
score is held for the samples in between.
"""

from __future__ import annotations

import math
from array import array

from detectors.anomaly.model import Evidence, StreamingDetector
from detectors.anomaly.state import (
    DetectorState,
    ResampledState,
    RollingMeanState,
    check_length,
    expect,
    inner_state,
    load_inner,
)


class RollingMean:
    """The inner detector sees the mean of the last ``span`` seconds (kept in ``buckets`` sums)."""

    __slots__ = ("_counts", "_first_ts", "_index", "_inner", "_sums", "_width", "buckets", "span")

    def __init__(self, inner: StreamingDetector, span: float, buckets: int = 12) -> None:
        if span <= 0 or buckets < 1:
            raise ValueError("span must be positive and buckets >= 1")
        self._inner = inner
        self.span = span
        self.buckets = buckets
        self._width = span / buckets
        # A ring of bucket sums: slot i holds bucket number _index[i] (a bucket is `span / buckets` seconds).
        self._index = array("q", [-1] * buckets)
        self._sums = array("d", bytes(8 * buckets))
        self._counts = array("d", bytes(8 * buckets))
        self._first_ts = math.nan

    def update(self, ts: float, value: float) -> float:
        if math.isnan(self._first_ts):
            self._first_ts = ts
        index = math.floor(ts / self._width)
        slot = index % self.buckets
        if self._index[slot] != index:
            self._index[slot], self._sums[slot], self._counts[slot] = index, 0.0, 0.0
        self._sums[slot] += value
        self._counts[slot] += 1.0
        if ts - self._first_ts < self.span:
            return 0.0  # not a full span yet: a partial mean would break out by construction
        oldest = index - self.buckets
        total = count = 0.0
        for number, bucket_sum, bucket_count in zip(self._index, self._sums, self._counts, strict=True):
            if number > oldest:
                total += bucket_sum
                count += bucket_count
        return self._inner.update(ts, total / count)

    def evidence(self) -> Evidence:
        return self._inner.evidence()

    def to_state(self) -> RollingMeanState:
        return RollingMeanState(inner=inner_state(self._inner), index=self._index.tolist(), sums=self._sums.tolist(),
                                counts=self._counts.tolist(), first_ts=self._first_ts)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, RollingMeanState)
        for what, values in (("index", saved.index), ("sums", saved.sums), ("counts", saved.counts)):
            check_length(what, values, exactly=self.buckets)
        load_inner(self._inner, saved.inner)
        self._index, self._sums = array("q", saved.index), array("d", saved.sums)
        self._counts, self._first_ts = array("d", saved.counts), saved.first_ts


class Resampled:
    """The inner detector sees one mean per ``step`` seconds, timed at the end of its bucket."""

    __slots__ = ("_count", "_index", "_inner", "_score", "_sum", "step")

    def __init__(self, inner: StreamingDetector, step: float) -> None:
        if step <= 0:
            raise ValueError("step must be positive")
        self._inner = inner
        self.step = step
        self._index: int | None = None
        self._sum = 0.0
        self._count = 0
        self._score = 0.0

    def update(self, ts: float, value: float) -> float:
        index = math.floor(ts / self.step)
        if self._index is not None and index != self._index:
            self._score = self._inner.update((self._index + 1) * self.step, self._sum / self._count)
            self._sum, self._count = 0.0, 0
        self._index = index
        self._sum += value
        self._count += 1
        return self._score

    def evidence(self) -> Evidence:
        return self._inner.evidence()

    def to_state(self) -> ResampledState:
        return ResampledState(inner=inner_state(self._inner), index=self._index, sum=self._sum, count=self._count,
                              score=self._score)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, ResampledState)
        if (saved.index is None) != (saved.count == 0) or saved.count < 0:
            raise ValueError("a bucket index needs a positive count, and no index a count of 0")
        load_inner(self._inner, saved.inner)
        self._index, self._sum, self._count, self._score = saved.index, saved.sum, saved.count, saved.score
