"""Exhaustion forecast: will this metric reach its limit within the horizon? (Prometheus' predict_linear.)

A disk that fills at a steady rate, a leak that grows RSS towards the memory
limit, a queue that never drains: each is harmless now and an outage later.
This detector fits a least-squares line to the samples of the last ``window``
seconds and computes ``eta``, the seconds until the line reaches ``limit``
(``direction="above"``, e.g. disk percent towards 100) or falls to it
(``"below"``, e.g. free bytes towards 0). The score is
``horizon / (horizon + eta)``: 1 at or past the limit, 0.5 exactly when the
limit is ``horizon`` seconds away, towards 0 when it is far or never.
So a policy threshold of 0.5 means "exhausted within ``horizon``" —
``predict_linear(metric[window], horizon) >= limit``.

No forecast before the samples span ``min_span`` seconds: two points a second
apart are no trend. State: at most ``max_samples`` pairs (resample fast series).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from detectors.anomaly.model import Evidence
from detectors.anomaly.state import DetectorState, ExhaustionForecastState, check_length, expect


class ExhaustionForecast:
    """Score by the linear-trend time to reach ``limit``, relative to ``horizon``."""

    __slots__ = ("_evidence", "_samples", "direction", "horizon", "limit", "max_samples", "min_span", "window")

    def __init__(self, limit: float, *, horizon: float = 6 * 3600.0, window: float = 3600.0,
                 direction: Literal["above", "below"] = "above", min_span: float | None = None,
                 max_samples: int = 512) -> None:
        if horizon <= 0 or window <= 0 or max_samples < 2:
            raise ValueError("horizon and window must be positive, max_samples >= 2")
        self.limit = limit
        self.horizon = horizon
        self.window = window
        self.direction = direction
        self.min_span = window / 2 if min_span is None else min_span
        self.max_samples = max_samples
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._evidence: Evidence = {}

    def update(self, ts: float, value: float) -> float:
        samples = self._samples
        samples.append((ts, value))
        while samples[0][0] <= ts - self.window:
            samples.popleft()
        if len(samples) < 2 or ts - samples[0][0] < self.min_span:
            return 0.0
        slope, now_value = fit_line(samples, ts)
        sign = 1.0 if self.direction == "above" else -1.0
        gap = sign * (self.limit - now_value)   # how far the trend still is from the limit
        rate = sign * slope                     # how fast it closes the gap
        if gap <= 0.0:
            eta = 0.0
        elif rate > 0.0:
            eta = gap / rate
        else:
            eta = math.inf
        self._evidence = {"eta_s": eta, "slope_per_s": slope, "fitted": now_value, "limit": self.limit,
                          "predicted": now_value + slope * self.horizon}
        return 0.0 if math.isinf(eta) else self.horizon / (self.horizon + eta)

    def evidence(self) -> Evidence:
        return dict(self._evidence)

    def to_state(self) -> ExhaustionForecastState:
        return ExhaustionForecastState(samples=list(self._samples), evidence=dict(self._evidence))

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, ExhaustionForecastState)
        check_length("samples", saved.samples, at_most=self.max_samples)
        self._samples = deque(saved.samples, maxlen=self.max_samples)
        self._evidence = dict(saved.evidence)


def fit_line(samples: deque[tuple[float, float]], at: float) -> tuple[float, float]:
    """Least-squares ``(slope per second, fitted value at ``at``)`` of ``(ts, value)`` pairs."""
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread <= 0.0:
        return 0.0, mean_v
    slope = sum((t - mean_t) * (v - mean_v) for t, v in samples) / spread
    return slope, mean_v + slope * (at - mean_t)
