"""Max fusion: several detectors on one series, the score of whichever is most alarmed.

Each part watches for a different failure shape (a breakout of the raw value,
of its hourly mean, of its deviation from the weekly cycle); a finding needs
only one of them. Parts must share a scale for the maximum to be fair — the
composites in ``fused.py`` use one detector family, whose score has the same
meaning in every part. ``evidence()`` names the part that set the score.
"""

from __future__ import annotations

from collections.abc import Sequence

from detectors.anomaly.model import Evidence, StreamingDetector
from detectors.anomaly.state import DetectorState, MaxFusionState, check_length, expect, inner_state, load_inner


class MaxFusion:
    """``max`` of the parts' scores; every part sees every sample."""

    __slots__ = ("_leader", "_parts", "names")

    def __init__(self, parts: Sequence[tuple[str, StreamingDetector]]) -> None:
        if not parts:
            raise ValueError("max fusion needs at least one part")
        self.names = tuple(name for name, _ in parts)
        self._parts = tuple(detector for _, detector in parts)
        self._leader = 0

    def update(self, ts: float, value: float) -> float:
        best, leader = -1.0, 0
        for index, part in enumerate(self._parts):
            score = part.update(ts, value)
            if score > best:
                best, leader = score, index
        self._leader = leader
        return best

    def evidence(self) -> Evidence:
        return {**self._parts[self._leader].evidence(), "part": self.names[self._leader]}

    def to_state(self) -> MaxFusionState:
        return MaxFusionState(parts=[inner_state(part) for part in self._parts], leader=self._leader)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, MaxFusionState)
        check_length("parts", saved.parts, exactly=len(self._parts))
        if not 0 <= saved.leader < len(self._parts):
            raise ValueError(f"leader {saved.leader} is not a part")
        for part, part_state in zip(self._parts, saved.parts, strict=True):
            load_inner(part, part_state)
        self._leader = saved.leader
