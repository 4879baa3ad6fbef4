"""Robust rolling z-score: distance from the median in units of MAD, over a time-based window.

``z = |x - median| / (1.4826 * MAD)`` against the samples of the last
``window`` seconds (the current one excluded: no look-ahead). Median and MAD
ignore the outliers they are meant to find, unlike mean and standard
deviation. ``on="diff"`` scores first differences instead of levels — a
sudden step rather than an unusual level. ``recent > 1`` scores the median of
the last ``recent`` samples, which ignores one-sample spikes and catches level
shifts after ``recent / 2`` samples. Where MAD is 0 (a metric that is mostly
constant) the 5-95 % quantile spread stands in, then a tiny fraction of the
median, so a change off a flat line still scores.

State: at most ``max_samples`` values (sorted list + deque).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Literal

from detectors.anomaly.model import Evidence, squash_z
from detectors.anomaly.rolling import RollingWindow
from detectors.anomaly.state import DetectorState, RobustZState, check_length, expect

MAD_TO_SIGMA = 1.4826
"""MAD times this estimates the standard deviation of a normal distribution."""


class RobustZ:
    """Median/MAD z-score of each sample (or step) against the last ``window`` seconds."""

    __slots__ = ("_evidence", "_previous", "_recent", "_window", "min_samples", "on")

    def __init__(self, window: float = 86400.0, *, on: Literal["level", "diff"] = "level", recent: int = 1,
                 min_samples: int = 30, max_samples: int = 2048) -> None:
        if recent < 1 or min_samples < 1:
            raise ValueError("recent and min_samples must be >= 1")
        self._window = RollingWindow(window, max_samples)
        self._recent: deque[tuple[float, float]] = deque(maxlen=recent)
        self._previous = math.nan
        self._evidence: Evidence = {}
        self.on = on
        self.min_samples = min_samples

    def update(self, ts: float, value: float) -> float:
        x = value
        if self.on == "diff":
            previous, self._previous = self._previous, value
            if math.isnan(previous):
                return 0.0
            x = value - previous
        window = self._window
        window.expire(ts)
        self._recent.append((ts, x))
        z = 0.0
        if len(self._recent) == self._recent.maxlen:
            if len(window) >= self.min_samples:
                median, scale = window.median(), self._scale()
                current = statistics.median(v for _, v in self._recent)
                z = abs(current - median) / scale
                self._evidence = {"z": z, "median": median, "scale": scale, "value": current}
            window.add(*self._recent[0])
        return squash_z(z)

    def _scale(self) -> float:
        window = self._window
        scale = MAD_TO_SIGMA * window.mad()
        if scale <= 0.0:
            scale = (window.quantile(0.95) - window.quantile(0.05)) / 3.29
        if scale <= 0.0:
            scale = 1e-9 * max(1.0, abs(window.median()))
        return scale

    def evidence(self) -> Evidence:
        return dict(self._evidence)

    def to_state(self) -> RobustZState:
        return RobustZState(window=self._window.to_state(), recent=list(self._recent), previous=self._previous,
                            evidence=dict(self._evidence))

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, RobustZState)
        check_length("recent", saved.recent, at_most=self._recent.maxlen)
        self._window.load_state(saved.window)
        self._recent = deque(saved.recent, maxlen=self._recent.maxlen)
        self._previous, self._evidence = saved.previous, dict(saved.evidence)
