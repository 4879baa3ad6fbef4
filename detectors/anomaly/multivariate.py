"""Per-host multivariate detector: an IsolationForest over the host's metric vector.

Some failures show only in combination — CPU normal, memory normal, but this
much memory at this little CPU never happened before. An IsolationForest
(scikit-learn) isolates such points with few random splits. The work is split
so the caller chooses the thread:

- ``fit_host_model(samples)`` — CPU work (tens of milliseconds), to run off
  the event loop (``asyncio.to_thread``) when ``HostVectorDetector.refit_due(now)``
  says so, then ``install``. The data is whitened first (``whitening``). In
  the controller, ``host_watch.py`` queues this work and
  ``controller/host_models.py`` runs it in a thread.
- ``score_host_vector(model, vector)`` — a few milliseconds per call, batch
  them; the score is calibrated as the fraction of the training vectors that
  were less anomalous, so 0.99 means "stranger than 99 % of what this host did
  in the training window". A forest cannot tell apart two points beyond the
  edge of its training data (both land in the outermost leaf), so that rank
  tops out below 1; a vector farther from the centre, in whitened
  coordinates, than every training vector (a new multivariate extreme, the
  analogue of the running-extremes rule that does well on NAB) scores 1.

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


@dataclass(frozen=True, slots=True)
class HostModel:
    """A fitted forest, the whitening it was fitted in, and the sorted anomaly scores of its training vectors."""

    forest: Any
    features: tuple[str, ...]
    training_scores: tuple[float, ...]
    fitted_at: float
    centre: Any = None
    """Mean training vector (numpy array); None: vectors are used as they are."""
    whiten: Any = None
    """Matrix turning a centred vector into uncorrelated unit-variance coordinates (numpy array)."""
    reach: float = math.inf
    """Largest whitened distance from the centre among the training vectors (Mahalanobis distance)."""

    def transform(self, matrix: Any) -> Any:
        return matrix if self.centre is None else (matrix - self.centre) @ self.whiten


def whitening(matrix: Any) -> tuple[Any, Any]:
    """Centre and whitening matrix of ``matrix`` (PCA: rotate to the principal axes, scale each to unit variance).

    A forest splits along axes, so a point off the diagonal of two correlated
    metrics — each value in range, the pair never seen — takes many splits to
    isolate in raw coordinates. Along the principal axes it lies far out on
    the minor one and is isolated at once. Directions with (almost) no
    variance are floored at a millionth of the largest, so a constant metric
    that moves scores high without dividing by zero.
    """
    centre = matrix.mean(axis=0)
    covariance = np.atleast_2d(np.cov(matrix - centre, rowvar=False))
    variances, axes = np.linalg.eigh(covariance)
    floor = max(float(variances.max()), 1e-300) * 1e-6
    return centre, axes / np.sqrt(np.maximum(variances, floor))


def fit_host_model(samples: Sequence[Sequence[float]], *, features: Sequence[str], fitted_at: float,
                   trees: int = 100, max_samples: int = 256, seed: int = 0, whiten: bool = True) -> HostModel:
    """Fit a forest to ``samples`` (rows of ``len(features)`` finite numbers), whitened first. Pure, CPU-bound."""
    matrix = np.asarray(samples, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(features) or len(matrix) < 2:
        raise ValueError(f"need at least 2 rows of {len(features)} values, got shape {matrix.shape}")
    centre, rotation = whitening(matrix) if whiten else (None, None)
    if centre is not None:
        matrix = (matrix - centre) @ rotation
    forest = IsolationForest(n_estimators=trees, max_samples=min(max_samples, len(matrix)), random_state=seed)
    forest.fit(matrix)
    training = sorted((-forest.score_samples(matrix)).tolist())
    reach = float(np.sqrt((matrix ** 2).sum(axis=1)).max()) if centre is not None else math.inf
    return HostModel(forest=forest, features=tuple(features), training_scores=tuple(training),
                     fitted_at=fitted_at, centre=centre, whiten=rotation, reach=reach)


def score_host_vectors(model: HostModel, vectors: Sequence[Sequence[float]]) -> list[float]:
    """Calibrated scores in ``[0, 1]`` of several vectors at once (same result as one by one)."""
    matrix = model.transform(np.asarray(vectors, dtype=np.float64))
    raw = (-model.forest.score_samples(matrix)).tolist()
    beyond = (np.sqrt((matrix ** 2).sum(axis=1)) > model.reach).tolist()
    total = len(model.training_scores)
    return [1.0 if out else bisect.bisect_left(model.training_scores, value) / total
            for value, out in zip(raw, beyond, strict=True)]


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

    def install(self, model: HostModel) -> None:
        if model.features != self.features:
            raise ValueError(f"model for {model.features}, detector for {self.features}")
        self.model = model
