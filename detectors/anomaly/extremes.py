"""Extremes detectors: a value beyond everything seen before (or seen recently).

``RunningExtremes`` is the parameter-free baseline: score 1 for a new all-time
maximum or minimum, else 0. It scores about 54 on NAB's standard profile, so a
detector below it has shown no skill.

``DecayingExtremes`` is the working version. It scores *how far* a value
breaks out — the excess over the range divided by the range, ``r / (r + 1)``
— so a breakout by a hair scores near 0 and one by a whole range 0.5: the
alert threshold becomes a margin, and the near-ties that make most of
``RunningExtremes``' false alarms drop out. With ``half_life=0`` the range is
the all-time range (what the shipped ``fused`` detector uses: on NAB,
forgetting cost more in false alarms than it won in detections). With a
positive half-life its high and low marks relax towards a slow moving centre,
so an old spike does not mask a later failure forever. Leaks, runaway CPU, a
disk filling and latency creeping to new highs all end as breakouts. State:
five floats.
"""

from __future__ import annotations

import math

from detectors.anomaly.model import Evidence
from detectors.anomaly.state import DecayingExtremesState, DetectorState, RunningExtremesState, expect


class RunningExtremes:
    """1 when a value exceeds every earlier value or undercuts every earlier value, else 0."""

    __slots__ = ("_high", "_low")

    def __init__(self) -> None:
        self._high = -math.inf
        self._low = math.inf

    def update(self, ts: float, value: float) -> float:
        seen = self._high >= self._low
        score = 1.0 if seen and (value > self._high or value < self._low) else 0.0
        self._high = max(self._high, value)
        self._low = min(self._low, value)
        return score

    def evidence(self) -> Evidence:
        return {"high": self._high, "low": self._low} if self._high >= self._low else {}

    def to_state(self) -> RunningExtremesState:
        return RunningExtremesState(high=self._high, low=self._low)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, RunningExtremesState)
        self._high, self._low = saved.high, saved.low


class DecayingExtremes:
    """Breakout beyond a high/low range that decays towards the centre with ``half_life`` seconds (0: never).

    ``mature`` (seconds, 0: off) weighs a breakout by the history behind the range: the excess ratio is
    multiplied by ``min(1, age / mature)``, where ``age`` is the time since this detector's first sample.
    On a stationary series a new record at the n-th sample has probability about 2/n, so a record on a
    young range is weak evidence and one on a month of history is strong. ``weight`` multiplies the ratio
    as well (the fused detector's seasonal parts count at a fraction). A breakout from a range of zero
    width (a flat series that moves) scores ``weight * min(1, age / mature)``, or 1 without ``mature``.
    """

    __slots__ = ("_centre", "_excess", "_first_ts", "_high", "_last_ts", "_low", "half_life", "mature", "weight")

    def __init__(self, half_life: float = 7 * 86400.0, *, mature: float = 0.0, weight: float = 1.0) -> None:
        if not half_life >= 0:
            raise ValueError("half_life must be >= 0 (0: never forget)")
        if not mature >= 0 or not 0 < weight <= 1:
            raise ValueError("need mature >= 0 and 0 < weight <= 1")
        self.half_life = half_life or math.inf
        self.mature = mature
        self.weight = weight
        self._first_ts = self._last_ts = math.nan
        self._centre = self._high = self._low = math.nan
        self._excess = 0.0

    def update(self, ts: float, value: float) -> float:
        if math.isnan(self._last_ts):
            self._first_ts = self._last_ts = ts
            self._centre, self._high, self._low = value, value, value
            return 0.0
        keep = 0.5 ** ((ts - self._last_ts) / self.half_life)
        self._last_ts = ts
        self._centre += (1.0 - keep) * (value - self._centre)
        if self._high > self._centre:
            self._high = self._centre + (self._high - self._centre) * keep
        if self._low < self._centre:
            self._low = self._centre - (self._centre - self._low) * keep
        span = self._high - self._low
        excess = max(value - self._high, self._low - value, 0.0)
        score = 0.0
        if excess > 0.0:
            credit = self.weight * (min(1.0, (ts - self._first_ts) / self.mature) if self.mature else 1.0)
            if span > 0.0:
                ratio = excess / span * credit
                score = ratio / (ratio + 1.0)
            else:
                score = credit
        self._excess = excess
        self._high = max(self._high, value)
        self._low = min(self._low, value)
        return score

    def evidence(self) -> Evidence:
        if math.isnan(self._last_ts):
            return {}
        return {"high": self._high, "low": self._low, "centre": self._centre, "excess": self._excess,
                "history_s": self._last_ts - self._first_ts}

    def to_state(self) -> DecayingExtremesState:
        return DecayingExtremesState(first_ts=self._first_ts, last_ts=self._last_ts, centre=self._centre,
                                     high=self._high, low=self._low, excess=self._excess)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, DecayingExtremesState)
        self._first_ts, self._last_ts, self._centre = saved.first_ts, saved.last_ts, saved.centre
        self._high, self._low, self._excess = saved.high, saved.low, saved.excess
