"""Seasonal baseline: compare a value with the same time of day (or week) in earlier periods.

A cycle — nightly batch jobs, daytime traffic, a weekly ETL — makes a normal
peak look like a breakout to a detector without memory of the cycle, and
hides a quiet night that should have been busy. This stage splits the period
(``period`` seconds, e.g. a week) into ``bins`` slots, remembers the mean of
each slot for the last ``keep`` periods, and feeds its detector the residual
``value - median(same slot in earlier periods)``. Until a slot has
``min_periods`` periods of history it stays silent (score 0): the baseline
starts once enough history exists, not before.

State: ``bins * keep`` floats (168 x 4 for a week of hourly slots), whatever
the sampling rate. Slots are aligned to the epoch (UTC).
"""

from __future__ import annotations

import statistics
from array import array

from detectors.anomaly.model import Evidence, StreamingDetector
from detectors.anomaly.state import DetectorState, SeasonalResidualState, check_length, expect, inner_state, load_inner


class SeasonalResidual:
    """The inner detector sees ``value`` minus the median of its slot over the last ``keep`` periods."""

    __slots__ = (
        "_expected",
        "_inner",
        "_means",
        "_slot",
        "_slot_count",
        "_slot_sum",
        "_written",
        "bins",
        "keep",
        "min_periods",
        "period",
    )

    def __init__(self, inner: StreamingDetector, *, period: float = 7 * 86400.0, bins: int = 168, keep: int = 4,
                 min_periods: int = 2) -> None:
        if period <= 0 or bins < 1 or keep < 1 or not 1 <= min_periods <= keep:
            raise ValueError("need period > 0, bins >= 1 and 1 <= min_periods <= keep")
        self._inner = inner
        self.period = period
        self.bins = bins
        self.keep = keep
        self.min_periods = min_periods
        # Slot i's last `keep` means are a ring at _means[i*keep:(i+1)*keep]; _written[i] counts means stored.
        # Flat arrays: one deque per slot cost ~600 bytes each, 120 KB for a week of hourly slots.
        self._means = array("d", bytes(8 * bins * keep))
        self._written = array("L", bytes(array("L").itemsize * bins))
        self._slot: int | None = None
        self._slot_sum = 0.0
        self._slot_count = 0
        self._expected = float("nan")

    def update(self, ts: float, value: float) -> float:
        slot = int((ts % self.period) / self.period * self.bins) % self.bins
        if slot != self._slot:
            if self._slot is not None and self._slot_count:
                self._store(self._slot, self._slot_sum / self._slot_count)
            self._slot, self._slot_sum, self._slot_count = slot, 0.0, 0
        held = min(self._written[slot], self.keep)
        score = 0.0
        if held >= self.min_periods:
            start = slot * self.keep
            self._expected = statistics.median(self._means[start:start + held])
            score = self._inner.update(ts, value - self._expected)
        self._slot_sum += value
        self._slot_count += 1
        return score

    def _store(self, slot: int, mean: float) -> None:
        self._means[slot * self.keep + self._written[slot] % self.keep] = mean
        self._written[slot] += 1

    def evidence(self) -> Evidence:
        inner = self._inner.evidence()
        return {**inner, "expected": self._expected} if inner else {}

    def to_state(self) -> SeasonalResidualState:
        return SeasonalResidualState(inner=inner_state(self._inner), means=self._means.tolist(),
                                     written=self._written.tolist(), slot=self._slot, slot_sum=self._slot_sum,
                                     slot_count=self._slot_count, expected=self._expected)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, SeasonalResidualState)
        check_length("means", saved.means, exactly=self.bins * self.keep)
        check_length("written", saved.written, exactly=self.bins)
        if (saved.slot is not None and not 0 <= saved.slot < self.bins) or saved.slot_count < 0:
            raise ValueError("slot out of range")
        try:
            written = array("L", saved.written)
        except OverflowError:
            raise ValueError("written counts must be >= 0") from None
        load_inner(self._inner, saved.inner)
        self._means, self._written = array("d", saved.means), written
        self._slot, self._slot_sum, self._slot_count = saved.slot, saved.slot_sum, saved.slot_count
        self._expected = saved.expected
