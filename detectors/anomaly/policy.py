"""Alert policy: when a stream of anomaly scores becomes a finding — kept apart from the detectors.

A detector says how strange each sample is; whether that is worth a restart
is policy, configured per rule:

- ``threshold``: a sample counts when its score is at least this;
- ``persistence`` of ``window``: at least N of the last M samples must count
  (1 of 1: the first counting sample raises the alert);
- ``hold``: seconds the alert stays raised after the last time N-of-M held,
  so the level-triggered engine sees one steady finding rather than a flicker;
- ``HostAlertBudget``: at most ``max_alerts`` new alerts per host per ``per``
  seconds. A host whose detectors all fire at once has one problem (or a bad
  detector), not twenty; past the budget, onsets are suppressed and counted.

Pure: time comes with each score.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from detectors.anomaly.state import PolicyState, check_length


@dataclass(frozen=True, slots=True)
class AlertPolicySpec:
    threshold: float = 0.006
    """Score at or above which a sample counts: the shipped ``fused`` detector's reward_low_FP threshold
    chosen on NAB half A (0.0062, rounded): a breakout by 0.6 % of the all-time range once the range has
    ``mature`` (60 days) of history, by 6 % at 6 days, by 60 % at 6 hours."""
    persistence: int = 1
    """N: counting samples needed among the last ``window``."""
    window: int = 1
    """M: samples looked at."""
    hold: float = 600.0
    """Seconds an alert stays raised after the last sample that satisfied N-of-M."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must lie in [0, 1]")
        if not 1 <= self.persistence <= self.window:
            raise ValueError("need 1 <= persistence <= window")
        if self.hold < 0:
            raise ValueError("hold must be >= 0")


@dataclass(frozen=True, slots=True)
class Verdict:
    raised: bool
    """The alert is up (a finding should exist)."""
    onset: bool
    """It went up with this sample (a new alert, subject to the host budget)."""


class AlertPolicy:
    """N-of-M persistence with hold, for one (node, metric) score stream."""

    __slots__ = ("_last_hit", "_recent", "_up", "peak", "spec")

    def __init__(self, spec: AlertPolicySpec) -> None:
        self.spec = spec
        self._recent: deque[bool] = deque(maxlen=spec.window)
        self._last_hit = -math.inf
        self._up = False
        self.peak = 0.0
        """Highest score since the alert went up."""

    def observe(self, ts: float, score: float) -> Verdict:
        spec = self.spec
        self._recent.append(score >= spec.threshold)
        if sum(self._recent) >= spec.persistence:
            self._last_hit = ts
        was_up = self._up
        self._up = ts - self._last_hit <= spec.hold
        if self._up:
            self.peak = max(self.peak, score) if was_up else score
        return Verdict(raised=self._up, onset=self._up and not was_up)

    def to_state(self) -> PolicyState:
        return PolicyState(recent=list(self._recent), last_hit=self._last_hit, up=self._up, peak=self.peak)

    def load_state(self, state: PolicyState) -> None:
        check_length("policy window", state.recent, at_most=self.spec.window)
        self._recent = deque(state.recent, maxlen=self.spec.window)
        self._last_hit, self._up, self.peak = state.last_hit, state.up, state.peak


class HostAlertBudget:
    """At most ``max_alerts`` admitted onsets per ``per`` seconds on one host."""

    __slots__ = ("_admitted", "max_alerts", "per", "suppressed")

    def __init__(self, max_alerts: int = 3, per: float = 3600.0) -> None:
        if max_alerts < 1 or per <= 0:
            raise ValueError("max_alerts must be >= 1 and per > 0")
        self.max_alerts = max_alerts
        self.per = per
        self._admitted: deque[float] = deque()
        self.suppressed = 0

    def admit(self, ts: float) -> bool:
        """Record an onset at ``ts``; False (and counted) when the host is over its budget."""
        while self._admitted and self._admitted[0] <= ts - self.per:
            self._admitted.popleft()
        if len(self._admitted) >= self.max_alerts:
            self.suppressed += 1
            return False
        self._admitted.append(ts)
        return True
