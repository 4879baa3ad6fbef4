"""Per-host multivariate detector: an IsolationForest over the host's metric vector.

Some failures show only in combination — CPU normal, memory normal, but this
much memory at this little CPU never happened before. An IsolationForest
(scikit-learn) isolates such points with few random splits. The work is split
so the caller chooses the thread:

- ``fit_host_model(samples)`` — CPU work (tens of milliseconds), to run off
  the event loop (``asyncio.to_thread``) when ``HostVectorDetector.refit_due(now)``
  says so, then ``install``. In the controller, ``host_watch.py`` queues this
  work and ``controller/host_models.py`` runs it in a thread.
- ``score_host_vector(model, vector)`` — a few milliseconds per call, so
  batch them; the score is calibrated as the fraction of the training vectors
  that were less anomalous, so 0.99 means "stranger than 99 % of what this
  host did in the training window". A forest cannot rank points beyond the
  edge of its training data (they all land in the outermost leaves), so the
  score of a far-out vector tops out just below 1, where the few most
  extreme training vectors are: alert at 0.98 or so, with persistence.

A model is fitted on the host's own recent past only, and it scores vectors
that came after it: no look-ahead. State: ``history`` vectors plus the forest.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.ensemble import IsolationForest  # type: ignore[import-untyped]

from detectors.anomaly.state import HostVectorsState, check_length


@dataclass(frozen=True, slots=True)
class HostModel:
    """A fitted forest and the sorted anomaly scores of its own training vectors."""

    forest: Any
    features: tuple[str, ...]
    training_scores: tuple[float, ...]
    fitted_at: float


def fit_host_model(samples: Sequence[Sequence[float]], *, features: Sequence[str], fitted_at: float,
                   trees: int = 100, max_samples: int = 256, seed: int = 0) -> HostModel:
    """Fit a forest to ``samples`` (rows of ``len(features)`` finite numbers). Pure, CPU-bound."""
    matrix = np.asarray(samples, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(features) or len(matrix) < 2:
        raise ValueError(f"need at least 2 rows of {len(features)} values, got shape {matrix.shape}")
    forest = IsolationForest(n_estimators=trees, max_samples=min(max_samples, len(matrix)), random_state=seed)
    forest.fit(matrix)
    training = sorted((-forest.score_samples(matrix)).tolist())
    return HostModel(forest=forest, features=tuple(features), training_scores=tuple(training),
                     fitted_at=fitted_at)


def score_host_vectors(model: HostModel, vectors: Sequence[Sequence[float]]) -> list[float]:
    """Calibrated scores in ``[0, 1]`` of several vectors at once (same result as one by one)."""
    matrix = np.asarray(vectors, dtype=np.float64)
    raw = (-model.forest.score_samples(matrix)).tolist()
    total = len(model.training_scores)
    return [bisect.bisect_left(model.training_scores, value) / total for value in raw]


def score_host_vector(model: HostModel, vector: Sequence[float]) -> float:
    return score_host_vectors(model, [vector])[0]


class HostVectorDetector:
    """One host's vectors: scored with the current model, kept (bounded) for the next fit."""

    __slots__ = ("_history", "_last_ts", "features", "min_samples", "model", "refit_every")

    def __init__(self, features: Sequence[str], *, history: int = 2048, refit_every: float = 6 * 3600.0,
                 min_samples: int = 256) -> None:
        if min_samples < 2 or history < min_samples or refit_every <= 0:
            raise ValueError("need 2 <= min_samples <= history and refit_every > 0")
        self.features = tuple(features)
        self.min_samples = min_samples
        self.refit_every = refit_every
        self.model: HostModel | None = None
        self._history: deque[tuple[float, ...]] = deque(maxlen=history)
        self._last_ts = -math.inf

    def update(self, ts: float, vector: Sequence[float]) -> float:
        """Score ``vector`` with the current model (0 without one) and keep it for the next fit."""
        row = self.keep(ts, vector)
        if row is None or self.model is None:
            return 0.0
        return score_host_vector(self.model, row)

    def keep(self, ts: float, vector: Sequence[float]) -> tuple[float, ...] | None:
        """Keep ``vector`` for the next fit without scoring it; None (dropped) when out of order or not finite."""
        row = tuple(float(v) for v in vector)
        if ts <= self._last_ts or len(row) != len(self.features) or not all(math.isfinite(v) for v in row):
            return None
        self._last_ts = ts
        self._history.append(row)
        return row

    def refit_due(self, now: float) -> bool:
        """Enough vectors, and no model yet or one older than ``refit_every``."""
        if len(self._history) < self.min_samples:
            return False
        return self.model is None or now - self.model.fitted_at >= self.refit_every

    def training_set(self) -> list[tuple[float, ...]]:
        """A copy of the kept vectors, safe to hand to another thread."""
        return list(self._history)

    def to_state(self) -> HostVectorsState:
        """The kept vectors; the model is left out (it is refitted from them: ``refit_due`` holds at once)."""
        return HostVectorsState(history=[list(row) for row in self._history], last_ts=self._last_ts)

    def load_state(self, state: HostVectorsState) -> None:
        check_length("vectors", state.history, at_most=self._history.maxlen)
        for row in state.history:
            check_length("vector", row, exactly=len(self.features))
            if not all(math.isfinite(v) for v in row):
                raise ValueError("a kept vector is not finite")
        self._history = deque((tuple(row) for row in state.history), maxlen=self._history.maxlen)
        self._last_ts = state.last_ts
        self.model = None

    def install(self, model: HostModel) -> None:
        if model.features != self.features:
            raise ValueError(f"model for {model.features}, detector for {self.features}")
        self.model = model
