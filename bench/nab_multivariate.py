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

import statistics
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from bench.nab_corpus import NabFile
from detectors.anomaly.host_watch import FitJob, HostModelSpec, HostVectorWatch, run_jobs
from detectors.anomaly.multivariate import HostModel, HostVectorDetector, fit_host_model, score_host_vectors
from selfheal import wire

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


def measure_host_watch(*, hours: float = 12.0, interval: float = 1.0, seed: int = 1) -> dict[str, float]:
    """What the controller's host model costs, on a synthetic host reporting every ``interval`` seconds.

    The shipped ``HostModelSpec`` defaults except ``step`` (10 s, so that ``hours`` of reports give enough
    vectors for a few fits). Loop side: ``observe`` per report and ``take_work``/``apply`` per round; worker
    side: each fit and each scoring batch, timed alone.
    """
    rng = np.random.default_rng(seed)
    spec = HostModelSpec(name="bench", step=10.0, refit_every=3600.0)
    watch = HostVectorWatch([spec])
    observe = take = 0.0
    fit_seconds: list[float] = []
    score_seconds: list[float] = []
    scored = 0
    reports = int(hours * 3600 / interval)
    for i in range(reports):
        ts = 1.7e9 + i * interval
        cpu = float(rng.uniform(5, 90))
        host = wire.HostMetrics(cpu_percent=cpu, load1=cpu / 25, load5=0, load15=0, mem_total_bytes=1,
                                mem_available_bytes=1, mem_percent=30 + cpu / 3 + float(rng.normal(0, 2)),
                                swap_percent=1.0, disks=[wire.DiskUsage(mount="/", total_bytes=100, used_bytes=40,
                                                                        percent=40 + i * 1e-5)])
        report = wire.Report(node="bench", session=1, seq=i, ts=ts, host=host, units=[])
        started = time.perf_counter()
        watch.observe(report)
        observe += time.perf_counter() - started
        if i % int(1 / interval) == 0:  # the controller's task runs a round every second
            started = time.perf_counter()
            jobs = watch.take_work()
            take += time.perf_counter() - started
            for job in jobs:
                started = time.perf_counter()
                results = run_jobs([job])
                (fit_seconds if isinstance(job, FitJob) else score_seconds).append(time.perf_counter() - started)
                scored += 0 if isinstance(job, FitJob) else len(job.vectors)
                started = time.perf_counter()
                watch.apply(results)
                take += time.perf_counter() - started
    return {"observe_us_per_report": 1e6 * observe / reports, "loop_us_per_report": 1e6 * (observe + take) / reports,
            "fit_ms": 1e3 * statistics.median(fit_seconds) if fit_seconds else float("nan"), "fits": len(fit_seconds),
            "score_ms_per_batch": 1e3 * statistics.median(score_seconds) if score_seconds else float("nan"),
            "vectors_scored": scored, "features": len(spec.features), "history": spec.history}
