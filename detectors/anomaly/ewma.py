"""EWMA z-score: distance from an exponentially weighted mean in exponentially weighted standard deviations.

The cheapest adaptive baseline: two floats of state, O(1) per sample. The
weights decay with a time-based ``half_life`` (seconds), so irregular sampling
does not change what "recent" means. Mean and variance are not robust — a big
spike inflates the variance for a while and masks what follows — which is
why the robust median/MAD detector exists; this one is the fallback where
memory per series must be minimal.
"""

from __future__ import annotations

import math

from detectors.anomaly.model import Evidence, squash_z
from detectors.anomaly.state import DetectorState, EwmaZState, expect


class EwmaZ:
    """``|x - mean| / std`` with exponentially weighted mean and variance (before the update)."""

    __slots__ = ("_last_ts", "_mean", "_samples", "_var", "_z", "half_life", "min_samples")

    def __init__(self, half_life: float = 3600.0, *, min_samples: int = 30) -> None:
        if half_life <= 0:
            raise ValueError("half_life must be positive")
        self.half_life = half_life
        self.min_samples = min_samples
        self._last_ts = math.nan
        self._mean = 0.0
        self._var = 0.0
        self._samples = 0
        self._z = 0.0

    def update(self, ts: float, value: float) -> float:
        if self._samples == 0:
            self._last_ts, self._mean, self._samples = ts, value, 1
            return 0.0
        alpha = 1.0 - 0.5 ** ((ts - self._last_ts) / self.half_life)
        self._last_ts = ts
        deviation = value - self._mean
        z = 0.0
        if self._samples >= self.min_samples:
            std = math.sqrt(self._var)
            floor = 1e-9 * max(1.0, abs(self._mean))
            z = abs(deviation) / max(std, floor)
        self._mean += alpha * deviation
        self._var = (1.0 - alpha) * (self._var + alpha * deviation * deviation)
        self._samples += 1
        self._z = z
        return squash_z(z)

    def evidence(self) -> Evidence:
        return {"z": self._z, "mean": self._mean, "std": math.sqrt(self._var)} if self._samples else {}

    def to_state(self) -> EwmaZState:
        return EwmaZState(last_ts=self._last_ts, mean=self._mean, var=self._var, samples=self._samples, z=self._z)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, EwmaZState)
        if saved.samples < 0 or not saved.var >= 0:
            raise ValueError("need samples >= 0 and var >= 0")
        self._last_ts, self._mean, self._var = saved.last_ts, saved.mean, saved.var
        self._samples, self._z = saved.samples, saved.z
