"""Score calibration: judge a detector's raw score against the detector's own recent history.

Raw scores mean different things on different series — a z of 6 is routine
for a bursty queue and unheard of for a thermostat. Two calibrations:

- ``TailCalibrated`` maps a raw score to ``1 - p``, where ``p`` is its tail
  probability among the last ``history`` raw scores (rank-based, no
  distribution assumed). A score of 0.999 means "higher than all but 0.1 % of
  what this series produced lately". Silent until ``min_history`` scores exist.
- ``PeakGate`` passes a score only when it beats every score of the last
  ``hold`` seconds, else 0. A sustained condition then reports its onset (and
  any escalation), not every sample of it — each repeated sample would be
  another alarm, and here an alarm can be a restart. On NAB this is worth a few
  points on every profile.
- ``WarmUp`` keeps a detector quiet for its first ``seconds`` of history.
"""

from __future__ import annotations

from collections import deque

from detectors.anomaly.model import Evidence, StreamingDetector
from detectors.anomaly.rolling import RollingWindow
from detectors.anomaly.state import (
    DetectorState,
    PeakGateState,
    TailCalibratedState,
    WarmUpState,
    check_length,
    expect,
    inner_state,
    load_inner,
)


class TailCalibrated:
    """``1 - tail probability`` of the inner raw score among its last ``history`` scores."""

    __slots__ = ("_history", "_inner", "_raw", "min_history")

    def __init__(self, inner: StreamingDetector, *, history: int = 2048, min_history: int = 100) -> None:
        if min_history < 1 or history < min_history:
            raise ValueError("need 1 <= min_history <= history")
        self._inner = inner
        self._history = RollingWindow(float("inf"), history)
        self.min_history = min_history
        self._raw = 0.0

    def update(self, ts: float, value: float) -> float:
        raw = self._inner.update(ts, value)
        held = len(self._history)
        score = 0.0
        if held >= self.min_history:
            score = 1.0 - (1 + self._history.rank_above(raw)) / (1 + held)
        self._history.add(ts, raw)
        self._raw = raw
        return score

    def evidence(self) -> Evidence:
        return {**self._inner.evidence(), "raw_score": self._raw}

    def to_state(self) -> TailCalibratedState:
        return TailCalibratedState(inner=inner_state(self._inner), history=self._history.to_state(), raw=self._raw)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, TailCalibratedState)
        load_inner(self._inner, saved.inner)
        self._history.load_state(saved.history)
        self._raw = saved.raw


class WarmUp:
    """Score 0 until the inner detector has seen ``seconds`` of the series (it learns meanwhile).

    A fresh stream — a new node, a new unit, every stream after a controller
    restart — would otherwise score its second sample as a breakout of a
    range of one sample.
    """

    __slots__ = ("_first_ts", "_inner", "seconds")

    def __init__(self, inner: StreamingDetector, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._inner = inner
        self.seconds = seconds
        self._first_ts: float | None = None

    def update(self, ts: float, value: float) -> float:
        if self._first_ts is None:
            self._first_ts = ts
        score = self._inner.update(ts, value)
        return score if ts - self._first_ts >= self.seconds else 0.0

    def evidence(self) -> Evidence:
        return self._inner.evidence()

    def to_state(self) -> WarmUpState:
        return WarmUpState(inner=inner_state(self._inner), first_ts=self._first_ts)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, WarmUpState)
        load_inner(self._inner, saved.inner)
        self._first_ts = saved.first_ts


class PeakGate:
    """Pass a score only when it is above every score of the last ``hold`` seconds, else 0."""

    __slots__ = ("_inner", "_peaks", "hold", "max_entries")

    def __init__(self, inner: StreamingDetector, hold: float = 6 * 3600.0, *, max_entries: int = 4096) -> None:
        if hold <= 0 or max_entries < 1:
            raise ValueError("hold must be positive and max_entries >= 1")
        self._inner = inner
        self.hold = hold
        self.max_entries = max_entries
        # Scores of the last `hold` seconds that no later score has beaten, oldest (and highest) first.
        self._peaks: deque[tuple[float, float]] = deque()

    def update(self, ts: float, value: float) -> float:
        score = self._inner.update(ts, value)
        peaks = self._peaks
        while peaks and peaks[0][0] <= ts - self.hold:
            peaks.popleft()
        previous = peaks[0][1] if peaks else 0.0
        while peaks and peaks[-1][1] <= score:
            peaks.pop()
        peaks.append((ts, score))
        if len(peaks) > self.max_entries:
            peaks.popleft()
        return score if score > previous else 0.0

    def evidence(self) -> Evidence:
        return self._inner.evidence()

    def to_state(self) -> PeakGateState:
        return PeakGateState(inner=inner_state(self._inner), peaks=list(self._peaks))

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, PeakGateState)
        check_length("peaks", saved.peaks, at_most=self.max_entries)
        load_inner(self._inner, saved.inner)
        self._peaks = deque(saved.peaks)
