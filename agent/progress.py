"""Unit progress: what a unit's job says about how far it has come, and when that last moved.

Two halves, like the probes. ``ProgressTracker`` is pure: fed each observed
progress with the start time of the run it belongs to and the wall time, it
keeps ``moved_at`` — when (done, total, stage) last changed during the
current run, None until the run's first progress. The controller's detectors
compare that with ``stall_after`` once the run has progressed, and the run's
start with ``start_timeout`` until then: a job slow to start is not stalled.
A heartbeat that rewrites the same numbers is not movement.

``ProgressWatcher`` is the edge: it reads the unit's progress file in a
thread every ``POLL`` seconds and feeds the tracker. A missing or garbled
file is "no progress yet", never an error: the job may not have written it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from agent.workload import work_dir
from selfheal.clocks import Clock
from selfheal.config import UnitConfig
from selfheal.progress import read_progress
from selfheal.wire import UnitProgress

POLL = 0.5
"""Seconds between reads of a progress file."""


def progress_path(config: UnitConfig, state_dir: Path) -> Path | None:
    """The unit's progress file, relative paths taken from its working directory (``agent.workload.work_dir``)."""
    if config.progress_file is None:
        return None
    return work_dir(config, state_dir) / config.progress_file


class ProgressTracker:
    """Pure: the latest progress of a unit and the wall time it last moved during the current run."""

    def __init__(self) -> None:
        self.current: UnitProgress | None = None
        self.moved_at: float | None = None
        """None until the current run's first progress."""
        self._run: float | None = None
        self._last: tuple[float, float | None, str] | None = None

    def observe(self, progress: UnitProgress | None, *, run_started: float, now: float) -> None:
        """Take one observation of the run that started at ``run_started`` (wall), made at ``now``.

        ``progress.updated_at`` (the job's own clock, the same host's) tells a file this run wrote from one
        left by the previous run."""
        key = None if progress is None else (progress.done, progress.total, progress.stage)
        if run_started != self._run:
            # A new run, with no progress yet: what the file says now is its starting point (a previous
            # run's last word), unless this run wrote it already.
            self._run = run_started
            self._last = key
            written = progress is not None and progress.updated_at >= run_started > 0
            self.moved_at = max(now, run_started) if written else None
        elif key is not None and key != self._last:
            self._last = key
            self.moved_at = max(now, run_started)
        if progress is not None:
            self.current = progress

    def moved_in(self, run_started: float) -> float | None:
        """``moved_at`` if it is about the run that started at ``run_started``: a report may name a new run
        before the watcher has read the file for it."""
        return self.moved_at if run_started == self._run else None


class ProgressWatcher:
    """Reads one unit's progress file on an interval and keeps its tracker current."""

    def __init__(self, path: Path, *, run_started: Callable[[], float], clock: Clock) -> None:
        self.path = path
        self.tracker = ProgressTracker()
        self._run_started = run_started
        self._clock = clock

    async def poll(self) -> None:
        """One read (off the loop) and observation."""
        progress = await asyncio.to_thread(read_progress, self.path)
        self.tracker.observe(progress, run_started=self._run_started(), now=self._clock.wall())

    async def run(self, *, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.poll()
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL)
