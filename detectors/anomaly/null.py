"""The null detector: always the same score, so it never separates anything.

It is NAB's zero point (a detector that never fires scores 0 after
normalisation) and the harness's sanity check: any score of it other than 0
means the scorer is wrong.
"""

from __future__ import annotations

from detectors.anomaly.model import Evidence
from detectors.anomaly.state import DetectorState, NullState, expect


class NullDetector:
    """Scores every sample ``level`` (0.5 by default, as NAB's null detector)."""

    __slots__ = ("level",)

    def __init__(self, level: float = 0.5) -> None:
        self.level = level

    def update(self, ts: float, value: float) -> float:
        return self.level

    def evidence(self) -> Evidence:
        return {}

    def to_state(self) -> NullState:
        return NullState()

    def load_state(self, state: DetectorState) -> None:
        expect(state, NullState)
