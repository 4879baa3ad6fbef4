"""The streaming detector protocol and the input guard every built detector sits behind.

A detector sees one (node, metric) series: ``update(ts, value)`` once per
sample, strictly in time order, and answers a score in ``[0, 1]`` — higher is
more anomalous. It keeps bounded state, reads no clock (``ts`` is the sample's
time, seconds) and never looks ahead. ``evidence()`` explains the last score
with a few numbers the controller copies into a finding.
"""

from __future__ import annotations

import math
from typing import Protocol

from detectors.anomaly.state import DetectorState, OrderedInputState, expect, inner_state, load_inner

Evidence = dict[str, float | str]


class StreamingDetector(Protocol):
    """One (node, metric) series in, one score per sample out."""

    def update(self, ts: float, value: float) -> float:
        """Take the sample at ``ts`` (seconds) and return its score in ``[0, 1]``."""
        ...

    def evidence(self) -> Evidence:
        """Numbers behind the last score (e.g. ``z``, ``median``, ``eta_s``); empty before any sample."""
        ...


def squash_z(z: float, half: float = 3.0) -> float:
    """Map a non-negative deviation ``z`` to ``[0, 1)``: 0.5 at ``half``, 0.75 at ``3 * half``.

    Monotone, so NAB's threshold sweep is unaffected; it only gives raw scores a
    bounded, readable scale.
    """
    if not z > 0.0:
        return 0.0
    if math.isinf(z):
        return 1.0
    return z / (z + half)


class OrderedInput:
    """Drop samples a detector must not see: non-finite values and times not after the last one.

    A dropped sample scores 0 (it is no evidence of anything) and leaves the
    inner detector untouched, so a duplicated or reordered report cannot skew
    its state. ``dropped`` counts them for the caller's metrics.
    """

    __slots__ = ("_inner", "_last_ts", "dropped")

    def __init__(self, inner: StreamingDetector) -> None:
        self._inner = inner
        self._last_ts = -math.inf
        self.dropped = 0

    def update(self, ts: float, value: float) -> float:
        if not (math.isfinite(ts) and math.isfinite(value)) or ts <= self._last_ts:
            self.dropped += 1
            return 0.0
        self._last_ts = ts
        score = self._inner.update(ts, value)
        return min(1.0, max(0.0, score))

    def evidence(self) -> Evidence:
        return self._inner.evidence()

    def to_state(self) -> OrderedInputState:
        return OrderedInputState(inner=inner_state(self._inner), last_ts=self._last_ts, dropped=self.dropped)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, OrderedInputState)
        if saved.dropped < 0:
            raise ValueError("dropped must be >= 0")
        load_inner(self._inner, saved.inner)
        self._last_ts, self.dropped = saved.last_ts, saved.dropped
