"""The IsolationForest detector on NAB, whose series are univariate: a vector per sample from one metric.

NAB cannot judge a per-host detector over many metrics, so this replays the
same code (``detectors/anomaly/multivariate.py``) over an embedding of each
series — ``(value, step from the previous value, distance from the last hour's
mean)`` — with the controller's schedule: refit every two days (25 trees) on the last week of
vectors, never on the future. Between two refits the model is fixed, so the
vectors of that stretch are scored in one batch; the scores are the ones the
streaming path would give. The cost per sample includes the fits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from bench.nab_corpus import NabFile
from detectors.anomaly.multivariate import HostModel, HostVectorDetector, fit_host_model, score_host_vectors

FEATURES = ("value", "step", "vs_hour_mean")
HOUR = 3600.0


def embed_series(times: Sequence[float], values: Sequence[float]) -> list[tuple[float, float, float]]:
    """Per sample: the value, its step from the previous one, its distance from the mean of the last hour."""
    recent: deque[tuple[float, float]] = deque()
    total, previous, vectors = 0.0, None, []
    for ts, value in zip(times, values, strict=True):
        while recent and recent[0][0] <= ts - HOUR:
            total -= recent.popleft()[1]
        mean = total / len(recent) if recent else value
        vectors.append((value, 0.0 if previous is None else value - previous, value - mean))
        recent.append((ts, value))
        total += value
        previous = value
    return vectors


def replay_file(nab_file: NabFile, *, refit_every: float, history: int, min_samples: int,
                trees: int) -> np.ndarray:
    times = nab_file.timestamps.tolist()
    vectors = embed_series(times, nab_file.values.tolist())
    detector = HostVectorDetector(FEATURES, history=history, refit_every=refit_every, min_samples=min_samples)
    scores = np.zeros(len(times))
    pending: list[int] = []

    def flush(model: HostModel | None) -> None:
        if model is not None and pending:
            scores[pending] = score_host_vectors(model, [vectors[i] for i in pending])
        pending.clear()

    for index, (ts, vector) in enumerate(zip(times, vectors, strict=True)):
        if detector.refit_due(ts):
            flush(detector.model)
            detector.install(fit_host_model(detector.training_set(), features=FEATURES, fitted_at=ts, trees=trees))
        if detector.model is not None:
            pending.append(index)
        detector.keep(ts, vector)
    flush(detector.model)
    return scores


def replay_isolation_forest(files: Sequence[NabFile], *, refit_every: float = 2 * 86400.0, history: int = 2016,
                            min_samples: int = 288, trees: int = 25) -> tuple[dict[str, np.ndarray], float]:
    """Scores per file and the cost in microseconds per sample (fits included)."""
    started = time.perf_counter()
    scores = {f.name: replay_file(f, refit_every=refit_every, history=history, min_samples=min_samples, trees=trees)
              for f in files}
    return scores, 1e6 * (time.perf_counter() - started) / sum(len(f.values) for f in files)
