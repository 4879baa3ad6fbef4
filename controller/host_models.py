"""Fit and score the per-host IsolationForests off the event loop.

The pure side (``detectors/anomaly/host_watch.py``) is fed by the engine
with every report, through the anomaly watch, and only queues work. This task
wakes every ``interval`` seconds, takes the queued work (scoring of finished
vectors, due refits) on the loop, runs it in a worker thread
(``asyncio.to_thread``: a fit takes tens of milliseconds, a scoring call a
few, either would stall the loop) and applies the results on the loop again.
One batch is in flight at a time, so at most one worker thread is busy.

The watch is looked up through ``current()`` on every round, so a rulebook
reload that rebuilds the anomaly watch (and its host models) is followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from detectors.anomaly.host_watch import Fitted, HostModelSpec, HostVectorWatch, run_jobs
from detectors.anomaly.policy import AlertPolicySpec
from detectors.anomaly.watch import AnomalyWatch
from rules.model import Rulebook
from selfheal.logs import get_logger

log = get_logger("controller.host_models")


def build_host_watch(rulebook: Rulebook) -> HostVectorWatch | None:
    """The rulebook's ``host_models`` as one watch (None without any); bad values raise ``ValueError``."""
    if not rulebook.host_models:
        return None
    return HostVectorWatch([
        HostModelSpec(name=m.name, features=m.features, step=m.step, history=m.history, min_samples=m.min_samples,
                      refit_every=m.refit_every, trees=m.trees, max_samples=m.max_samples, severity=m.severity,
                      policy=AlertPolicySpec(threshold=m.threshold, persistence=m.persistence, window=m.window,
                                             hold=m.hold))
        for m in rulebook.host_models])


async def run_host_models(current: Callable[[], AnomalyWatch | None], *, stop: asyncio.Event,
                          interval: float = 1.0, scored: Callable[[set[str]], Awaitable[None]] | None = None) -> None:
    """Until ``stop``: every ``interval`` seconds, fit and score the host models of ``current()`` in a thread.

    ``scored`` is told the nodes a round scored: their findings may have changed with no message from them
    (the engine looks again only at nodes that changed)."""
    while not stop.is_set():
        watch = current()
        hosts = watch.hosts if watch is not None else None
        if hosts is not None:
            nodes = await run_round(hosts)
            if nodes and scored is not None:
                await scored(nodes)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def run_round(hosts: HostVectorWatch) -> set[str]:
    """One round: take the due jobs, run them in a thread, apply what came back; the nodes it concerned."""
    jobs = hosts.take_work()
    if not jobs:
        return set()
    started = time.perf_counter()  # CPU cost for the log line, not a deadline
    try:
        results = await asyncio.to_thread(run_jobs, jobs)
    except Exception as exc:  # noqa: BLE001 - a bad fit (degenerate training set) must not stop the controller
        hosts.abandon(jobs)
        log.warning("host_models.failed", jobs=len(jobs), error=str(exc)[:300])
        return set()
    hosts.apply(results)
    fits = sum(1 for r in results if isinstance(r, Fitted))
    if fits:
        log.info("host_models.fitted", fits=fits, jobs=len(jobs), seconds=round(time.perf_counter() - started, 3))
    return {result.key[1] for result in results}
