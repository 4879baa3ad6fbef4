"""Scheduled batch jobs: a unit with ``every = S`` runs, exits, and runs again.

``ScheduledUnit`` wraps a unit of any kind (``process``, ``spark``) built by
that kind's factory. The wrapped unit starts, watches and stops each run as
usual; the wrapper decides when runs start and what an exit means:

- a run that exits 0 on its own is a success: the unit is ``completed`` (not
  ``exited``: nothing crashed) and its ``UnitExited`` event says
  ``expected``, so nobody heals it. The next run starts at the first multiple
  of ``every`` after the previous run's start that is not before its end
  (``next_run_at``): the schedule keeps its phase, and a run that overran
  skips the ticks it missed instead of starting twice in a row.
- a run that fails (non-zero exit, killed by a signal) is ``exited`` like a
  crashed service, and the schedule waits: the controller decides (restart,
  escalate). Retrying on the schedule would bypass its ladders and attempt
  limits, and a job that fails the same way every time must reach a human.
- a controller ``restart``/``start`` runs the job now and resumes the
  schedule; ``stop`` suspends it until the next ``start``.

The first run starts with the agent (or with the controller's ``start`` for a
standby copy). Times for the schedule use the loop clock; ``next_run_at`` in
reports is wall time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from contextlib import suppress

import msgspec

from agent.units.base import Unit, UnitContext, UnitFactory, UnitState
from selfheal.config import UnitConfig
from selfheal.errors import UnitError
from selfheal.logs import get_logger
from selfheal.wire import EventBody, UnitExited, UnitReport, UnitStarted


def next_run_at(started: float, ended: float, every: float) -> float:
    """The first ``started + k * every`` (k >= 1) that is not before ``ended``."""
    if every <= 0:
        raise ValueError("every must be > 0")
    ticks = max(1, math.ceil((ended - started) / every - 1e-9))
    return started + ticks * every


class ScheduledUnit:
    """A unit run every ``config.every`` seconds; see the module docstring."""

    def __init__(self, factory: UnitFactory, config: UnitConfig, ctx: UnitContext) -> None:
        if config.every is None:
            raise UnitError(f"unit {config.name!r}: a scheduled unit needs 'every'")
        self.every = config.every
        self.ctx = ctx
        self.inner: Unit = factory(config, dataclasses.replace(ctx, emit=self._relay))
        self.runs = 0
        self._run_started: float | None = None
        self._due: float | None = None
        self._suspended = True  # until the first start
        self._closed = False
        self._wake = asyncio.Event()
        self.log = get_logger("agent.unit", node=ctx.node_id, unit=config.name)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def state(self) -> UnitState:
        state = self.inner.state
        if state == "exited" and self._succeeded():
            return "completed"
        return state

    @property
    def pid(self) -> int | None:
        return self.inner.pid

    async def start(self) -> None:
        self._resume()
        await self.inner.start()

    async def stop(self, grace: float | None = None) -> None:
        self._suspend()
        await self.inner.stop(grace)

    async def restart(self) -> None:
        self._resume()
        await self.inner.restart()

    async def watch(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.inner.watch(), name=f"unit-run-{self.name}")
            await self._timer()

    def kill(self) -> None:
        self.inner.kill()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.inner.close()

    def report(self) -> UnitReport:
        report = self.inner.report()
        next_wall = None
        if self._due is not None and not self._suspended:
            next_wall = self.ctx.clock.wall() + max(0.0, self._due - self.ctx.clock.monotonic())
        return msgspec.structs.replace(report, state=self.state, every=self.every, next_run_at=next_wall,
                                       runs=self.runs)

    def _succeeded(self) -> bool:
        report = self.inner.report()
        return report.exit_code == 0 and report.exit_signal is None

    def _resume(self) -> None:
        self._suspended = False
        self._due = None
        self._wake.set()

    def _suspend(self) -> None:
        self._suspended = True
        self._due = None
        self._wake.set()

    def _relay(self, body: EventBody) -> None:
        """Events of the wrapped unit: note runs starting and ending, pass them on."""
        now = self.ctx.clock.monotonic()
        if isinstance(body, UnitStarted):
            self._run_started = now
            self._due = None
        elif isinstance(body, UnitExited) and not body.expected:
            if body.exit_code == 0 and body.exit_signal is None:
                self.runs += 1
                started = self._run_started if self._run_started is not None else now
                self._due = next_run_at(started, now, self.every)
                self.log.info("unit.run_completed", runs=self.runs,
                              next_in_s=round(self._due - now, 3))
                # A finished run is expected: the controller must not heal it (it would re-run it now).
                body = msgspec.structs.replace(body, expected=True)
            else:
                self._suspend()  # a failed run waits for the controller's decision
        self._wake.set()
        self.ctx.emit(body)

    async def _timer(self) -> None:
        """Start each run when it is due; returns once ``close`` was called."""
        while not self._closed:
            self._wake.clear()
            due = self._due
            if due is None or self._suspended:
                await self._wake.wait()
                continue
            delay = due - self.ctx.clock.monotonic()
            if delay > 0:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            self._due = None
            try:
                await self.inner.start()
            except UnitError as exc:
                # Reported as failed; the controller sees it and decides, as for any start that fails.
                self._suspend()
                self.log.warning("unit.scheduled_start_failed", error=str(exc))
