"""Live per-host multivariate watching: one IsolationForest per (model, node) over the host's metric vector.

The univariate watches (``watch.py``) judge each metric alone. This one
judges the host's vector — e.g. ``(cpu_percent, load1, mem_percent,
swap_percent, disk_max_percent)`` — so it can flag a combination the host
never showed (this much memory at this little CPU) while every metric alone is
in its usual range. The model is ``multivariate.HostVectorDetector``.

The work is split so the event loop never fits or scores a forest:

- ``observe(report)`` (on the loop, cheap): averages the host's reports into
  one vector per ``step`` seconds, keeps each finished vector for the next fit
  and queues it for scoring.
- ``take_work()`` (on the loop): the jobs due now — queued vectors to score
  with the host's current model, and refits (a host with ``min_samples``
  vectors and no model, or a model older than ``refit_every``). Jobs carry
  copies, so they are safe to hand to another thread.
- ``run_jobs(jobs)`` (pure CPU: run it in a thread): scores, then fits.
- ``apply(results)`` (on the loop): installs new models and feeds the scores
  to each host's alert policy.

A vector is scored by a model fitted before it arrived (no look-ahead). The
alert policy and a per-host budget work as for the univariate watches; while
the policy holds, ``findings(node)`` returns a ``host_anomaly`` finding with
the score, the vector, the host's typical vector (per-feature medians of the
training set) and the last scores. Pure and bounded: no I/O, no clock; at
most ``max_hosts`` hosts (longest idle evicted first), ``history`` vectors and
one forest each.

``to_state``/``load_state`` keep the hosts' vectors, step sums and alert
state across a controller restart as plain data (``state.py``). Forests are
not saved (a fitted scikit-learn model can only be stored by pickling it):
a restored host has its vectors and no model, so the first ``take_work``
refits it from the saved vectors, and scoring resumes with that model.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from detectors.anomaly.multivariate import HostModel, HostVectorDetector, fit_host_model, score_host_vectors
from detectors.anomaly.policy import AlertPolicy, AlertPolicySpec, HostAlertBudget
from detectors.anomaly.state import HostState, check_length
from detectors.model import Finding, Observation, Severity
from detectors.thresholds import read_host_metric

MAX_HOSTS = 1000
PENDING = 256
"""Finished vectors queued for scoring per host (oldest dropped beyond: scoring fell that far behind)."""
WINDOW = 30
"""Recent (ts, score) pairs kept per host as a finding's evidence."""
DEFAULT_FEATURES = ("cpu_percent", "load1", "mem_percent", "swap_percent", "disk_max_percent")


@dataclass(frozen=True, slots=True)
class HostModelSpec:
    name: str
    features: tuple[str, ...] = DEFAULT_FEATURES
    """Fields of the report's host metrics (``wire.HostMetrics``, or ``disk_max_percent``)."""
    step: float = 60.0
    """Seconds averaged into one vector (0: every report is a vector)."""
    history: int = 2048
    """Vectors kept for the next fit."""
    min_samples: int = 256
    """Vectors needed before the first fit."""
    refit_every: float = 6 * 3600.0
    """Seconds (of report time) between fits."""
    trees: int = 50
    max_samples: int = 128
    """Vectors each tree is grown on."""
    policy: AlertPolicySpec = field(default_factory=lambda: AlertPolicySpec(threshold=0.98, persistence=3, window=3))
    """Stranger than 98 % of the training vectors, 3 vectors in a row (the forest's rank tops out just below 1)."""
    severity: Severity = "warning"

    def __post_init__(self) -> None:
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError("features must be a non-empty list without repeats")
        if self.step < 0 or self.trees < 1 or self.max_samples < 2:
            raise ValueError("need step >= 0, trees >= 1 and max_samples >= 2")
        HostVectorDetector(self.features, history=self.history, refit_every=self.refit_every,
                           min_samples=self.min_samples)  # its own checks


@dataclass(frozen=True, slots=True)
class ScoreJob:
    key: tuple[str, str]
    model: HostModel
    vectors: tuple[tuple[float, tuple[float, ...]], ...]
    """(end of step, vector), in time order."""


@dataclass(frozen=True, slots=True)
class FitJob:
    key: tuple[str, str]
    samples: tuple[tuple[float, ...], ...]
    features: tuple[str, ...]
    fitted_at: float
    trees: int
    max_samples: int


@dataclass(frozen=True, slots=True)
class Scored:
    key: tuple[str, str]
    scores: tuple[tuple[float, tuple[float, ...], float], ...]
    """(ts, vector, score)."""


@dataclass(frozen=True, slots=True)
class Fitted:
    key: tuple[str, str]
    model: HostModel
    typical: tuple[float, ...]
    """Per-feature median of the training vectors."""


Job = ScoreJob | FitJob
Result = Scored | Fitted


def run_jobs(jobs: Sequence[Job]) -> list[Result]:
    """Score every queued vector, then fit: CPU work for a worker thread (pure: reads only the jobs)."""
    out: list[Result] = []
    for job in jobs:
        if isinstance(job, ScoreJob):
            scores = score_host_vectors(job.model, [vector for _, vector in job.vectors])
            out.append(Scored(job.key, tuple((ts, v, s) for (ts, v), s in zip(job.vectors, scores, strict=True))))
    for job in jobs:
        if isinstance(job, FitJob):
            model = fit_host_model(job.samples, features=job.features, fitted_at=job.fitted_at, trees=job.trees,
                                   max_samples=job.max_samples)
            typical = tuple(statistics.median(column) for column in zip(*job.samples, strict=True))
            out.append(Fitted(job.key, model, typical))
    return out


@dataclass
class _Host:
    detector: HostVectorDetector
    policy: AlertPolicy
    index: int | None = None
    sums: list[float] = field(default_factory=list)
    count: int = 0
    last_ts: float = -math.inf
    pending: deque[tuple[float, tuple[float, ...]]] = field(default_factory=lambda: deque(maxlen=PENDING))
    fitting: bool = False
    typical: tuple[float, ...] = ()
    raised: bool = False
    admitted: bool = False
    last: tuple[float, tuple[float, ...], float] | None = None
    window: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))


class HostVectorWatch:
    def __init__(self, specs: Sequence[HostModelSpec], *, max_hosts: int = MAX_HOSTS,
                 host_budget: tuple[int, float] = (3, 3600.0)) -> None:
        if max_hosts < 1:
            raise ValueError("max_hosts must be >= 1")
        self.specs = {spec.name: spec for spec in specs}
        self.max_hosts = max_hosts
        self.host_budget = host_budget
        self._hosts: OrderedDict[tuple[str, str], _Host] = OrderedDict()
        self._budgets: dict[str, HostAlertBudget] = {}
        self.vectors = 0
        """Finished vectors (one per step per host)."""
        self.fits = 0

    def observe(self, report: Observation) -> None:
        for spec in self.specs.values():
            values = [read_host_metric(report.host, name) for name in spec.features]
            if any(v is None or not math.isfinite(v) for v in values):
                continue
            self._feed(spec, report.node, report.ts, [float(v) for v in values if v is not None])

    def _feed(self, spec: HostModelSpec, node: str, ts: float, values: list[float]) -> None:
        key = (spec.name, node)
        host = self._hosts.get(key)
        if host is None:
            while len(self._hosts) >= self.max_hosts:
                self._hosts.popitem(last=False)
            host = self._hosts[key] = _Host(
                HostVectorDetector(spec.features, history=spec.history, refit_every=spec.refit_every,
                                   min_samples=spec.min_samples), AlertPolicy(spec.policy))
        self._hosts.move_to_end(key)
        if ts <= host.last_ts:
            return  # a replayed or reordered report
        host.last_ts = ts
        if spec.step <= 0:
            self._finish(host, ts, tuple(values))
            return
        index = math.floor(ts / spec.step)
        if host.index is not None and index != host.index and host.count:
            self._finish(host, (host.index + 1) * spec.step, tuple(s / host.count for s in host.sums))
            host.count = 0
        if host.count == 0:
            host.sums = [0.0] * len(values)
        host.index = index
        host.sums = [s + v for s, v in zip(host.sums, values, strict=True)]
        host.count += 1

    def _finish(self, host: _Host, ts: float, vector: tuple[float, ...]) -> None:
        if host.detector.keep(ts, vector) is not None:
            self.vectors += 1
            if host.detector.model is not None:
                host.pending.append((ts, vector))

    def take_work(self) -> list[Job]:
        """Jobs due now; hosts with a fit in flight get no second one."""
        jobs: list[Job] = []
        for key, host in self._hosts.items():
            model = host.detector.model
            if host.pending and model is not None:
                jobs.append(ScoreJob(key, model, tuple(host.pending)))
                host.pending.clear()
            if not host.fitting and host.detector.refit_due(host.last_ts):
                spec = self.specs[key[0]]
                host.fitting = True
                jobs.append(FitJob(key, tuple(host.detector.training_set()), spec.features, host.last_ts,
                                   spec.trees, spec.max_samples))
        return jobs

    def apply(self, results: Sequence[Result]) -> None:
        """Install fitted models and feed scores to the alert policies (results of forgotten hosts are dropped)."""
        for result in results:
            host = self._hosts.get(result.key)
            if host is None:
                continue
            if isinstance(result, Fitted):
                host.detector.install(result.model)
                host.typical, host.fitting = result.typical, False
                self.fits += 1
                continue
            for ts, vector, score in result.scores:
                verdict = host.policy.observe(ts, score)
                host.window.append((ts, score))
                host.last = (ts, vector, score)
                if verdict.onset:
                    budget = self._budgets.setdefault(result.key[1], HostAlertBudget(*self.host_budget))
                    host.admitted = budget.admit(ts)
                host.raised = verdict.raised and host.admitted

    def abandon(self, jobs: Sequence[Job]) -> None:
        """Fits that failed: allow the next attempt."""
        for job in jobs:
            host = self._hosts.get(job.key)
            if isinstance(job, FitJob) and host is not None:
                host.fitting = False

    def findings(self, node: str) -> list[Finding]:
        out = []
        for name, spec in self.specs.items():
            host = self._hosts.get((name, node))
            if host is None or not host.raised or host.last is None or host.detector.model is None:
                continue
            _, vector, _ = host.last
            model = host.detector.model
            out.append(Finding(
                kind="host_anomaly", node=node, unit=None, severity=spec.severity,
                summary=f"metrics of node {node} form an unusual combination ({name}: score "
                        f"{host.policy.peak:.3f})",
                evidence={"model": name, "score": round(host.policy.peak, 4),
                          "vector": dict(zip(spec.features, vector, strict=True)),
                          "typical": dict(zip(spec.features, host.typical, strict=True)),
                          "fitted_at": model.fitted_at, "training_vectors": len(model.training_scores),
                          "window": [{"ts": ts, "score": round(s, 4)} for ts, s in host.window]},
                scope=name))
        return out

    def spec_fingerprints(self) -> dict[str, str]:
        """What a host's state depends on, per model: a changed spec starts its hosts afresh."""
        return {name: json.dumps(asdict(spec), sort_keys=True, default=str) for name, spec in self.specs.items()}

    def to_state(self) -> list[HostState]:
        return [HostState(model=name, node=node, vectors=host.detector.to_state(), index=host.index,
                          sums=list(host.sums), count=host.count, last_ts=host.last_ts, typical=list(host.typical),
                          policy=host.policy.to_state(), raised=host.raised, admitted=host.admitted,
                          last=None if host.last is None else (host.last[0], list(host.last[1]), host.last[2]),
                          window=list(host.window))
                for (name, node), host in self._hosts.items()]

    def load_state(self, hosts: Sequence[HostState], specs: Mapping[str, str]) -> tuple[int, int]:
        """Adopt saved hosts whose model still exists with the same spec (``specs``: the fingerprints they
        were saved under): ``(adopted, dropped)``. ``ValueError`` if one does not fit its spec; then nothing
        is adopted."""
        current = self.spec_fingerprints()
        built: list[tuple[tuple[str, str], _Host]] = []
        dropped = 0
        for saved in hosts:
            spec = self.specs.get(saved.model)
            if (spec is None or specs.get(saved.model) != current[saved.model]
                    or len(built) + len(self._hosts) >= self.max_hosts):
                dropped += 1
                continue
            try:
                built.append(((saved.model, saved.node), _rebuild_host(spec, saved)))
            except ValueError as exc:
                raise ValueError(f"host {saved.model}/{saved.node}: {exc}") from None
        self._hosts.update(built)
        return len(built), dropped

    def forget(self, node: str) -> None:
        for name in self.specs:
            self._hosts.pop((name, node), None)
        self._budgets.pop(node, None)

    def __len__(self) -> int:
        return len(self._hosts)


def _rebuild_host(spec: HostModelSpec, saved: HostState) -> _Host:
    """A host built from its spec, then given the saved numbers (``ValueError`` if they do not fit)."""
    width = len(spec.features)
    for what, values in (("sums", saved.sums), ("typical", saved.typical)):
        if len(values) not in (0, width):
            raise ValueError(f"{what}: {len(values)} values for {width} features")
    if saved.count < 0 or (saved.count > 0 and (saved.index is None or len(saved.sums) != width)):
        raise ValueError("step sums without a step")
    if saved.last is not None:
        check_length("last vector", saved.last[1], exactly=width)
    check_length("window", saved.window, at_most=WINDOW)
    detector = HostVectorDetector(spec.features, history=spec.history, refit_every=spec.refit_every,
                                  min_samples=spec.min_samples)
    detector.load_state(saved.vectors)
    policy = AlertPolicy(spec.policy)
    policy.load_state(saved.policy)
    return _Host(detector, policy, index=saved.index, sums=list(saved.sums), count=saved.count,
                 last_ts=saved.last_ts, typical=tuple(saved.typical), raised=saved.raised, admitted=saved.admitted,
                 last=None if saved.last is None else (saved.last[0], tuple(saved.last[1]), saved.last[2]),
                 window=deque(saved.window, maxlen=WINDOW))
