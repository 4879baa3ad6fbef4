"""Process units and their probes with real child processes (no broker)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.supervisor import DEFAULT_KINDS, Supervisor
from agent.units.base import UnitContext
from selfheal.clocks import SystemClock
from selfheal.config import ProbeConfig, UnitConfig
from selfheal.errors import UnitError
from selfheal.wire import EventBody, ProbeChanged, UnitExited, UnitStarted
from tests.conftest import eventually, free_port

pytestmark = pytest.mark.integration

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
IGNORES_TERM = [sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                " print('sigterm' + ' ignored', flush=True); time.sleep(600)"]


class Recorder:
    def __init__(self) -> None:
        self.events: list[EventBody] = []

    def __call__(self, body: EventBody) -> None:
        self.events.append(body)

    def exited(self) -> list[UnitExited]:
        return [event for event in self.events if isinstance(event, UnitExited)]

    def started(self) -> list[UnitStarted]:
        return [event for event in self.events if isinstance(event, UnitStarted)]

    def verdicts(self) -> list[bool]:
        return [event.probe.healthy for event in self.events if isinstance(event, ProbeChanged)]


@asynccontextmanager
async def supervising(tmp_path: Path, *units: UnitConfig) -> AsyncIterator[tuple[Supervisor, Recorder]]:
    recorder = Recorder()
    ctx = UnitContext(node_id="node-u", state_dir=tmp_path, emit=recorder, clock=SystemClock())
    supervisor = Supervisor(list(units), ctx, kinds=DEFAULT_KINDS)
    stop, started = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(supervisor.run(stop=stop, started=started), name="test-supervisor")
        await asyncio.wait_for(started.wait(), 10)
        try:
            yield supervisor, recorder
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def test_a_killed_unit_is_reported_at_once_with_its_signal(tmp_path: Path) -> None:
    async with supervising(tmp_path, UnitConfig(name="sleeper", command=SLEEPER)) as (sup, rec):
        unit = sup.entries["sleeper"].unit
        pid = unit.pid
        assert pid is not None
        assert unit.report().state == "running"
        assert [(e.unit, e.pid, e.restarts) for e in rec.started()] == [("sleeper", pid, 0)]
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: bool(rec.exited()), timeout=5, interval=0.01, what="UnitExited")
        assert time.monotonic() - killed_at < 1.0
        (exited,) = rec.exited()
        assert exited == UnitExited(unit="sleeper", pid=pid, exit_code=None, exit_signal=9, expected=False)
        assert unit.state == "exited"
        assert unit.pid is None
        report = unit.report()
        assert (report.exit_signal, report.exit_code) == (9, None)
    # Nothing restarts it on its own: the controller decides.
    assert len(rec.started()) == 1


async def test_stop_reaches_a_sigstopped_unit_and_is_expected(tmp_path: Path) -> None:
    async with supervising(tmp_path, UnitConfig(name="frozen", command=SLEEPER)) as (sup, rec):
        unit = sup.entries["frozen"].unit
        pid = unit.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        began = time.monotonic()
        await unit.stop(grace=10)
        assert time.monotonic() - began < 5  # SIGCONT let it act on SIGTERM, no SIGKILL needed
        (exited,) = rec.exited()
        assert exited == UnitExited(unit="frozen", pid=pid, exit_signal=signal.SIGTERM, expected=True)
        assert unit.state == "stopped"


async def test_a_unit_ignoring_sigterm_is_killed_after_its_grace(tmp_path: Path) -> None:
    config = UnitConfig(name="stubborn", command=IGNORES_TERM, stop_grace=0.5)
    async with supervising(tmp_path, config) as (sup, rec):
        log = tmp_path / "logs" / "stubborn.log"
        await eventually(lambda: log.exists() and "sigterm ignored" in log.read_text(),
                         what="unit output in its log")
        began = time.monotonic()
        restarted = await sup.restart("stubborn")
        assert 0.4 < time.monotonic() - began < 5
        exited = rec.exited()
        assert [(e.exit_signal, e.expected) for e in exited] == [(9, True)]
        starts = rec.started()
        assert [e.restarts for e in starts] == [0, 1]
        assert restarted.pid is not None
        assert restarted.pid != exited[0].pid
        assert restarted.report().restarts == 1
        assert log.read_text().count("--- selfheal: starting") == 2


async def test_stop_takes_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 600 & echo $! > {pidfile}; wait"
    async with supervising(tmp_path, UnitConfig(name="parent", command=["sh", "-c", script])) as (sup, _):
        await eventually(lambda: pidfile.exists() and pidfile.read_text().strip() != "", what="child pid")
        child = int(pidfile.read_text())
        await sup.entries["parent"].unit.stop()

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            return False

        await eventually(gone, timeout=5, what="the child to be gone")


async def test_a_unit_that_cannot_start_is_failed_not_fatal(tmp_path: Path) -> None:
    units = (UnitConfig(name="ghost", command=["/nonexistent/selfheal-no-such-binary"]),
             UnitConfig(name="fine", command=SLEEPER))
    async with supervising(tmp_path, *units) as (sup, rec):
        ghost = sup.entries["ghost"].unit
        assert ghost.state == "failed"
        assert ghost.pid is None
        assert sup.entries["fine"].unit.state == "running"
        with pytest.raises(UnitError, match="cannot start"):
            await sup.restart("ghost")
        assert ghost.state == "failed"
        assert [e.unit for e in rec.started()] == ["fine"]
        states = {report.name: report.state for report in sup.reports()}
        assert states == {"ghost": "failed", "fine": "running"}


async def test_restarting_an_unknown_unit_is_a_unit_error(tmp_path: Path) -> None:
    async with supervising(tmp_path, UnitConfig(name="one", command=SLEEPER)) as (sup, _):
        with pytest.raises(UnitError, match="unknown unit 'two'"):
            await sup.restart("two")


async def test_shutdown_stops_every_unit(tmp_path: Path) -> None:
    units = [UnitConfig(name=f"u{i}", command=SLEEPER, stop_grace=2) for i in range(3)]
    async with supervising(tmp_path, *units) as (sup, rec):
        pids = [sup.entries[u.name].unit.pid for u in units]
    assert sorted(e.pid for e in rec.exited()) == sorted(pid for pid in pids if pid is not None)
    assert all(e.expected for e in rec.exited())
    assert {report.state for report in sup.reports()} == {"stopped"}


async def test_a_frozen_http_unit_turns_unhealthy_then_recovers(tmp_path: Path) -> None:
    port = free_port()
    probe = ProbeConfig(kind="http", target=f"http://127.0.0.1:{port}/", interval=0.2, timeout=0.3,
                        failures=3, start_period=10.0)
    config = UnitConfig(name="web", command=[sys.executable, "-m", "http.server", str(port),
                                              "--bind", "127.0.0.1"], probe=probe)
    async with supervising(tmp_path, config) as (sup, rec):
        runner = sup.entries["web"].probe
        assert runner is not None

        await eventually(lambda: rec.verdicts() == [True], what="the first healthy verdict")
        pid = sup.entries["web"].unit.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        await eventually(lambda: rec.verdicts() == [True, False], what="unhealthy after 3 failures")
        state = runner.state
        assert state is not None
        assert state.consecutive_failures == 3
        assert "timeout" in state.last_error
        report = {r.name: r for r in sup.reports()}["web"]
        assert report.probe == state
        os.kill(pid, signal.SIGCONT)
        await eventually(lambda: rec.verdicts() == [True, False, True], what="healthy again")


async def test_after_a_restart_recovery_is_seen_fast(tmp_path: Path) -> None:
    port = free_port()
    probe = ProbeConfig(kind="tcp", target=f"127.0.0.1:{port}", interval=5.0, timeout=0.3, failures=1,
                        start_period=10.0)
    config = UnitConfig(name="svc", command=[sys.executable, "-m", "http.server", str(port),
                                              "--bind", "127.0.0.1"], probe=probe, stop_grace=2)
    async with supervising(tmp_path, config) as (sup, _):
        runner = sup.entries["svc"].probe
        assert runner is not None
        # The first verdict comes at the fast cadence, not after the 5 s interval.
        await eventually(lambda: runner.state is not None and runner.state.healthy, timeout=3,
                         what="first verdict")
        checks = runner.checks
        await sup.restart("svc")
        await eventually(lambda: runner.checks > checks and runner.state is not None and runner.state.healthy,
                         timeout=3, what="a probe soon after the restart")


@pytest.mark.parametrize(("kind", "target", "healthy", "error"), [
    ("exec", ["true"], True, ""),
    ("exec", ["false"], False, "exit code 1"),
    ("exec", ["sleep", "5"], False, "timeout"),
    ("tcp", "127.0.0.1:{closed}", False, "ConnectionRefusedError"),
    ("http", "http://127.0.0.1:{closed}/", False, "ConnectError"),
])
async def test_probe_kinds(kind: str, target: str | list[str], healthy: bool, error: str) -> None:
    from agent.probes import ProbeRunner  # noqa: PLC0415

    if isinstance(target, str):
        target = target.format(closed=free_port())
    config = ProbeConfig(kind=kind, target=target, timeout=0.5)  # type: ignore[arg-type]
    runner = ProbeRunner("x", config, emit=lambda _: None, clock=SystemClock())
    began = time.monotonic()
    ok, detail, latency = await runner.check()
    assert (ok, error in detail) == (healthy, True)
    assert time.monotonic() - began < 2
    assert latency >= 0


async def test_a_unit_the_controller_stopped_stays_stopped_across_an_agent_restart(tmp_path: Path) -> None:
    """A unit migrated away (stopped by command) must not come back as a second copy when its agent
    restarts; a standby started by command must come back even though autostart is false."""
    service = UnitConfig(name="service", command=SLEEPER)
    standby = UnitConfig(name="standby", command=SLEEPER, autostart=False)
    async with supervising(tmp_path, service, standby) as (sup, _):
        assert sup.entries["service"].unit.pid is not None
        assert sup.entries["standby"].unit.pid is None
        await sup.stop("service")
        await sup.start("standby")
    async with supervising(tmp_path, service, standby) as (sup, _):
        assert sup.entries["service"].unit.pid is None  # stays stopped: the controller's last word
        assert sup.entries["standby"].unit.pid is not None  # started by command, so it comes back
        await sup.restart("service")  # a restart command is a start too
    async with supervising(tmp_path, service, standby) as (sup, _):
        assert sup.entries["service"].unit.pid is not None


async def test_a_standby_copy_is_not_probed_until_it_is_started(tmp_path: Path) -> None:
    """A stopped unit has no verdict: its probe would fail by design, and a stale failure must not
    greet the copy when a migration starts it."""
    port = free_port()
    probe = ProbeConfig(kind="http", target=f"http://127.0.0.1:{port}/", interval=0.1, timeout=0.2,
                        failures=2, start_period=10.0)
    standby = UnitConfig(name="web", autostart=False, probe=probe,
                         command=[sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"])
    async with supervising(tmp_path, standby) as (sup, rec):
        await asyncio.sleep(1.0)
        runner = sup.entries["web"].probe
        assert runner is not None
        assert (runner.checks, rec.verdicts()) == (0, [])
        probe = {r.name: r for r in sup.reports()}["web"].probe
        assert probe is not None
        assert (probe.healthy, probe.consecutive_failures, probe.last_error) == (False, 0, "not running")
        await sup.start("web")
        await eventually(lambda: rec.verdicts() == [True], what="healthy once started")
        await sup.stop("web")
        probe = {r.name: r for r in sup.reports()}["web"].probe
        assert probe is not None
        assert probe.last_error == "not running"  # its verdict went with its run
