"""The random detector: a seeded uniform score per sample, the "no skill" reference.

Anything that does not clearly beat it on NAB has learnt nothing. Seeded, so a
run is repeatable; it never reads the sample.
"""

from __future__ import annotations

import random

from detectors.anomaly.model import Evidence
from detectors.anomaly.state import DetectorState, RandomState, check_length, expect

RNG_VERSION = 3
RNG_WORDS = 625
"""``random.Random.getstate()``: version 3, 624 state words and the position in them."""


class RandomDetector:
    """Uniform ``[0, 1)`` scores from its own ``random.Random(seed)``."""

    __slots__ = ("_rng",)

    def __init__(self, seed: int = 42) -> None:
        self._rng = random.Random(seed)  # noqa: S311 - a benchmark baseline, not cryptography

    def update(self, ts: float, value: float) -> float:
        return self._rng.random()

    def evidence(self) -> Evidence:
        return {}

    def to_state(self) -> RandomState:
        version, words, gauss_next = self._rng.getstate()
        if version != RNG_VERSION:
            raise TypeError(f"random.Random state version {version}, expected {RNG_VERSION}")
        return RandomState(words=list(words), gauss_next=gauss_next)

    def load_state(self, state: DetectorState) -> None:
        saved = expect(state, RandomState)
        check_length("words", saved.words, exactly=RNG_WORDS)
        try:
            self._rng.setstate((RNG_VERSION, tuple(saved.words), saved.gauss_next))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"not a Mersenne Twister state: {exc}") from None
