"""Scheduled batch jobs: when the next run is due, and what the wrapper makes of each run's end.

The wrapped unit is a fake that starts and ends runs on command, so these
tests need no processes; the schedule itself runs on the real loop clock with
short periods.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.units.base import UnitContext, UnitState
from agent.units.schedule import ScheduledUnit, next_run_at
from selfheal.clocks import SystemClock
from selfheal.config import UnitConfig
from selfheal.errors import UnitError
from selfheal.wire import EventBody, UnitExited, UnitReport, UnitStarted
from tests.conftest import eventually


@pytest.mark.parametrize(("started", "ended", "every", "expected"), [
    (100.0, 101.0, 10.0, 110.0),   # a short run: the next one at the next tick
    (100.0, 110.0, 10.0, 110.0),   # ended right on the tick
    (100.0, 110.5, 10.0, 120.0),   # overran one tick: that tick is skipped, not run late
    (100.0, 135.0, 10.0, 140.0),   # overran three
    (100.0, 100.0, 0.5, 100.5),    # ended at once
    (100.0, 99.0, 10.0, 110.0),    # a clock that went back never brings a run forward
])
def test_next_run_at(started: float, ended: float, every: float, expected: float) -> None:
    assert next_run_at(started, ended, every) == pytest.approx(expected)


def test_next_run_at_needs_a_period() -> None:
    with pytest.raises(ValueError, match="every"):
        next_run_at(0.0, 1.0, 0.0)


class FakeRun:
    """A unit kind whose runs the test ends by hand."""

    kind = "process"

    def __init__(self, config: UnitConfig, ctx: UnitContext) -> None:
        self.config = config
        self.ctx = ctx
        self._state: UnitState = "stopped"
        self.starts = 0
        self.restarts = 0
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.fail_start = False
        self._closed = asyncio.Event()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> UnitState:
        return self._state

    @property
    def pid(self) -> int | None:
        return 1000 + self.starts if self._state == "running" else None

    async def start(self) -> None:
        if self._state == "running":
            return
        if self.fail_start:
            self._state = "failed"
            raise UnitError("cannot start")
        self.starts += 1
        self._state = "running"
        self.exit_code = self.exit_signal = None
        self.ctx.emit(UnitStarted(unit=self.name, pid=1000 + self.starts, restarts=self.restarts))

    async def stop(self, grace: float | None = None) -> None:
        if self._state == "running":
            self._end(expected=True, code=None, sig=15)

    async def restart(self) -> None:
        await self.stop()
        self.restarts += 1
        await self.start()

    async def watch(self) -> None:
        await self._closed.wait()

    def kill(self) -> None:
        pass

    def close(self) -> None:
        self._closed.set()

    def report(self) -> UnitReport:
        return UnitReport(name=self.name, kind=self.kind, state=self._state, pid=self.pid, restarts=self.restarts,
                          exit_code=self.exit_code, exit_signal=self.exit_signal)

    def finish(self, code: int | None = 0, sig: int | None = None) -> None:
        """The current run ends on its own."""
        self._end(expected=False, code=code, sig=sig)

    def _end(self, *, expected: bool, code: int | None, sig: int | None) -> None:
        pid = 1000 + self.starts
        self._state = "stopped" if expected else "exited"
        self.exit_code, self.exit_signal = code, sig
        self.ctx.emit(UnitExited(unit=self.name, pid=pid, exit_code=code, exit_signal=sig, expected=expected))


@asynccontextmanager
async def scheduled(tmp_path: Path, every: float) -> AsyncIterator[tuple[ScheduledUnit, FakeRun, list[EventBody]]]:
    events: list[EventBody] = []
    ctx = UnitContext(node_id="node-a", state_dir=tmp_path, emit=events.append, clock=SystemClock())
    unit = ScheduledUnit(FakeRun, UnitConfig(name="job", command=["x"], every=every), ctx)
    inner = unit.inner
    assert isinstance(inner, FakeRun)
    watcher = asyncio.create_task(unit.watch())
    try:
        yield unit, inner, events
    finally:
        unit.close()
        await asyncio.wait_for(watcher, 5)


def exits(events: list[EventBody]) -> list[UnitExited]:
    return [e for e in events if isinstance(e, UnitExited)]


async def test_a_run_that_exits_0_is_completed_expected_and_runs_again_on_schedule(tmp_path: Path) -> None:
    async with scheduled(tmp_path, every=0.3) as (unit, inner, events):
        await unit.start()
        assert unit.state == "running"
        inner.finish(0)
        assert unit.state == "completed"
        (ended,) = exits(events)
        assert ended.expected  # nobody heals a finished run
        report = unit.report()
        assert (report.state, report.runs, report.every) == ("completed", 1, 0.3)
        assert report.next_run_at is not None
        await eventually(lambda: inner.starts == 2, timeout=5, what="the next scheduled run")
        assert unit.state == "running"
        assert unit.report().next_run_at is None  # nothing due while a run goes on
        assert inner.restarts == 0  # a scheduled run is not a restart


async def test_a_failed_run_is_exited_and_waits_for_the_controller(tmp_path: Path) -> None:
    async with scheduled(tmp_path, every=0.1) as (unit, inner, events):
        await unit.start()
        inner.finish(3)
        assert unit.state == "exited"
        (ended,) = exits(events)
        assert (ended.expected, ended.exit_code) == (False, 3)
        assert unit.report().next_run_at is None
        await asyncio.sleep(0.4)  # four periods: the schedule must not retry behind the controller's back
        assert inner.starts == 1
        await unit.restart()  # the controller's restart runs it now and resumes the schedule
        assert (inner.starts, inner.restarts, unit.state) == (2, 1, "running")
        inner.finish(0)
        await eventually(lambda: inner.starts == 3, timeout=5, what="the schedule resumed")


async def test_a_killed_run_is_a_crash_too(tmp_path: Path) -> None:
    async with scheduled(tmp_path, every=0.1) as (unit, inner, events):
        await unit.start()
        inner.finish(None, 9)
        assert unit.state == "exited"
        assert not exits(events)[0].expected


async def test_stop_suspends_the_schedule_and_start_resumes_it(tmp_path: Path) -> None:
    async with scheduled(tmp_path, every=0.1) as (unit, inner, _events):
        await unit.start()
        inner.finish(0)
        await unit.stop()
        assert unit.report().next_run_at is None
        await asyncio.sleep(0.3)
        assert inner.starts == 1
        await unit.start()
        assert inner.starts == 2


async def test_a_scheduled_start_that_fails_is_reported_and_not_retried(tmp_path: Path) -> None:
    async with scheduled(tmp_path, every=0.1) as (unit, inner, _events):
        await unit.start()
        inner.fail_start = True
        inner.finish(0)
        await eventually(lambda: unit.state == "failed", timeout=5, what="the failed scheduled start")
        await asyncio.sleep(0.3)
        assert inner.starts == 1
        assert unit.report().next_run_at is None


def test_a_scheduled_unit_needs_every(tmp_path: Path) -> None:
    ctx = UnitContext(node_id="node-a", state_dir=tmp_path, emit=lambda _: None, clock=SystemClock())
    with pytest.raises(UnitError, match="every"):
        ScheduledUnit(FakeRun, UnitConfig(name="job", command=["x"]), ctx)
