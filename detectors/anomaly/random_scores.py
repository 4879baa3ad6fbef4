"""The random detector: a seeded uniform score per sample, the "no skill" reference.

Anything that does not clearly beat it on NAB has learnt nothing. Seeded, so a
run is repeatable; it never reads the sample.
"""

from __future__ import annotations

import random

from detectors.anomaly.model import Evidence


class RandomDetector:
    """Uniform ``[0, 1)`` scores from its own ``random.Random(seed)``."""

    __slots__ = ("_rng",)

    def __init__(self, seed: int = 42) -> None:
        self._rng = random.Random(seed)  # noqa: S311 - a benchmark baseline, not cryptography

    def update(self, ts: float, value: float) -> float:
        return self._rng.random()

    def evidence(self) -> Evidence:
        return {}
