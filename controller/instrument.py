"""Timing for the parts the metrics need to see from outside: plan execution and the anomaly watch.

Thin subclasses, so the dispatcher and the detectors stay free of metrics code:
``MeteredDispatcher`` observes each plan's run time in
``selfheal_remediation_duration_seconds{action, outcome}``; ``MeteredWatch``
counts the reports fed to the anomaly watch and the time they took
(``selfheal_detector_samples_total`` / ``selfheal_detector_seconds_total``,
``detector="anomaly"``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from controller.dispatcher import Dispatcher, PlanOutcome
from controller.metrics import ControllerMetrics
from controller.store import Incident
from detectors.anomaly.watch import AnomalyWatch, WatchSpec
from detectors.model import Observation
from remediations.plans import Plan


class MeteredDispatcher(Dispatcher):
    def __init__(self, *, metrics: ControllerMetrics, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics = metrics

    async def execute(self, plan: Plan, incident: Incident, **kwargs: Any) -> PlanOutcome:
        started = self.clock.monotonic()
        outcome = "crashed"
        try:
            result = await super().execute(plan, incident, **kwargs)
            outcome = result.outcome
            return result
        finally:
            self.metrics.remediation_duration.labels(plan.action, outcome).observe(
                max(0.0, self.clock.monotonic() - started))


class MeteredWatch(AnomalyWatch):
    def __init__(self, specs: Sequence[WatchSpec], *, metrics: ControllerMetrics, **kwargs: Any) -> None:
        super().__init__(specs, **kwargs)
        self._samples = metrics.detector_samples.labels("anomaly")
        self._seconds = metrics.detector_seconds.labels("anomaly")

    def observe(self, report: Observation) -> None:
        started = time.perf_counter()  # CPU-bound cost, not a deadline: a plain performance counter
        try:
            super().observe(report)
        finally:
            self._samples.inc()
            self._seconds.inc(time.perf_counter() - started)
