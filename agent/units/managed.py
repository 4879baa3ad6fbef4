"""Units that another manager runs: what kinds ``systemd`` and ``docker`` share.

A ``systemd`` unit is run by systemd, a ``docker`` unit by the container
engine; the agent neither spawns nor reaps their processes. It looks at what
the manager says about the unit (a short poll: ``systemctl show``, a
container inspect) and turns each look into an ``Observation``: which *run*
is current (systemd's main-process start, the container id and its start
time), whether it is alive, and how the last one ended in the manager's own
words. ``RunTracker`` compares looks — pure, no I/O, no clock reads — and
says what happened between them:

- a new run that is alive: ``UnitStarted`` (a restart when an earlier run
  was seen);
- the run it watched is over: ``UnitExited`` with the exit code or signal
  and the manager's ``reason`` (``watchdog``, ``oom-killed``...), ``expected``
  when the agent itself stopped or restarted it;
- the manager restarting the unit on its own (systemd's ``Restart=``, a
  restart policy, an orchestrator replacing the container): the new run is
  counted as a restart and announced, and no crash is reported — the unit
  healed without help. Only when the manager gives up does the exit go out.

``ManagedUnit`` is the ``Unit`` both kinds build on: the poll loop, the
start/stop/restart bookkeeping and the report. Its looks and actions are the
kind's (``look`` and ``act``), and they run off the event loop.

Such units outlive the agent: stopping the agent (or its crash, or a
watchdog restart) leaves them running, and the next agent adopts the run it
finds (see ``agent.supervisor``). ``kill`` is therefore a no-op.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Literal

from agent.units.base import UnitContext, UnitState
from selfheal.config import UnitConfig
from selfheal.errors import UnitError
from selfheal.logs import RateLimiter, get_logger
from selfheal.wire import EventBody, ProbeChanged, ProbeState, UnitExited, UnitReport, UnitStarted

Action = Literal["start", "stop", "restart"]
_FAILED: dict[Action, str] = {"start": "unit.start_failed", "stop": "unit.stop_failed",
                              "restart": "unit.restart_failed"}


@dataclass(frozen=True, slots=True)
class Usage:
    """Resource use of the whole unit (its cgroup), as its manager counts it."""

    cpu_ns: int | None
    """CPU time used since the run started, nanoseconds (None: not accounted)."""
    memory_bytes: int | None
    """Memory in use now, bytes (None: not accounted)."""
    at: float
    """Loop-clock time of the sample: CPU percent is the CPU time between two samples over their distance."""


@dataclass(slots=True)
class UsageMeter:
    """CPU percent from two samples' CPU time (100 = one core busy) and the latest memory in use."""

    last: Usage | None = None
    cpu_percent: float = 0.0
    memory_bytes: int = 0

    def add(self, usage: Usage | None) -> None:
        if usage is None:
            self.last, self.cpu_percent, self.memory_bytes = None, 0.0, 0
            return
        self.memory_bytes = usage.memory_bytes or 0
        prev = self.last
        if prev is not None and usage.at == prev.at:
            return  # the same sample as last time (a kind may sample less often than it looks)
        self.last = usage
        if (prev is None or usage.cpu_ns is None or prev.cpu_ns is None or usage.cpu_ns < prev.cpu_ns
                or usage.at < prev.at):
            self.cpu_percent = 0.0  # a first sample, not accounted, or a new run counting afresh
            return
        self.cpu_percent = round((usage.cpu_ns - prev.cpu_ns) / 1e9 / (usage.at - prev.at) * 100.0, 2)


@dataclass(frozen=True, slots=True)
class Observation:
    """One look at the unit, as its manager describes it."""

    run: str | None
    """Identifies the current (or last) run; None when no run is known (never started, not there)."""
    live: bool
    """The run's processes are up (running, or starting under the manager)."""
    state: UnitState
    """What the unit is: ``running``/``starting`` while live; ``exited`` or ``failed`` (could not run)
    once over; with no run (``run`` None): ``failed`` when the manager cannot run it at all (no such
    service, masked), ``stopped`` when there is nothing to run yet (a container still to be created)."""
    pid: int | None = None
    started_at: float | None = None
    """Wall time the run started, when the manager says; else the time it was first seen."""
    exit_code: int | None = None
    exit_signal: int | None = None
    reason: str = ""
    """The manager's word on how the run ended (systemd's ``Result``: ``watchdog``, ``signal``...)."""
    error: str = ""
    """What is wrong, in words for the report (a missing unit, a run that could not start, an OOM kill)."""
    restarting: bool = False
    """The run ended and the manager restarts the unit itself (``Restart=``, a restart policy)."""
    detail: str = ""
    """A state word beyond ``state`` for the report's ``proc_status`` (``paused``); empty: none."""
    probe: ProbeState | None = None
    """The manager's own health check (a container's HEALTHCHECK), when it has one."""
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Seen:
    """What one observation changed: events to emit and notes to log."""

    events: list[EventBody] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class RunTracker:
    """Follows the runs of one unit across observations; see the module docstring."""

    unit: str
    state: UnitState = "stopped"
    run: str | None = None
    """The run last seen (alive or not)."""
    live: bool = False
    """``run`` was seen alive and its end has not been reported yet."""
    pid: int | None = None
    restarts: int = 0
    """New runs seen after the first: the agent's restarts, and the manager's own."""
    started_at: float = 0.0
    exit_code: int | None = None
    exit_signal: int | None = None
    reason: str = ""
    error: str = ""
    expected_run: str | None = None
    """The run the agent is stopping or restarting: its end is the agent's doing (no other run's is, so a
    run that replaced it — the agent's restart, an orchestrator's — ends unexpectedly)."""
    ended: Literal["no", "yes", "expected"] = "no"
    """Whether a run seen alive has ended since (and whether the agent ended it): until one has, a unit
    that is not running is ``stopped`` (whatever ended before the agent looked is not its business)."""
    start_error: str = ""
    """Why the agent's own last start failed; cleared by the next run."""
    seen: bool = False

    def observe(self, obs: Observation, now: float) -> Seen:
        """Fold one look in; ``now`` is wall time (for a run whose start the manager does not say)."""
        out = Seen()
        first, self.seen = not self.seen, True
        if obs.run is not None and obs.run != self.run:
            self._new_run(obs, now, first, out)
        elif self.live and not obs.live:
            # Over: the same run ended, or it is gone (a container removed, a unit unloaded: run None).
            if obs.restarting:
                out.notes.append(f"its run ended ({_how(obs)}) and its manager restarts it")
            else:
                self._end(obs, out)
        elif self.live and obs.pid is not None:
            self.pid = obs.pid  # a main pid can move (PIDFile=, a reload that re-executes)
        self.state = self._state(obs)
        self.error = self.start_error or obs.error or (obs.reason if self.state in ("exited", "failed") else "")
        return out

    def expect_end(self) -> None:
        """The agent is about to stop or restart the unit."""
        self.expected_run = self.run if self.live else None

    def not_expected(self) -> None:
        """The agent's stop or restart did not happen: an end from now on is not its doing."""
        self.expected_run = None

    def start_failed(self, detail: str) -> None:
        self.start_error = self.error = detail
        self.state = "failed"

    def _new_run(self, obs: Observation, now: float, first: bool, out: Seen) -> None:
        if self.live:
            if self.expected_run is not None and self.run == self.expected_run:
                # The agent's restart: the old run ended between two looks (its exit status is gone).
                out.events.append(UnitExited(unit=self.unit, pid=self.pid or 0, expected=True))
                self.expected_run = None
            else:
                out.notes.append("its manager restarted or replaced it")
        if self.run is not None:
            self.restarts += 1
        self.run = obs.run
        self.live = False
        self.pid = obs.pid
        self.started_at = obs.started_at if obs.started_at is not None else now
        if obs.live:
            self.live = True
            self.start_error = ""
            self.ended = "no"
            self.exit_code = self.exit_signal = None
            self.reason = ""
            out.events.append(UnitStarted(unit=self.unit, pid=obs.pid or 0, restarts=self.restarts))
        elif not first and not obs.restarting:
            # A run began and ended between two looks (a start that failed at once, a quick crash).
            self.start_error = ""
            self._end(obs, out)

    def _end(self, obs: Observation, out: Seen) -> None:
        self.live = False
        expected = self.run is not None and self.run == self.expected_run
        self.ended = "expected" if expected else "yes"
        self.exit_code, self.exit_signal, self.reason = obs.exit_code, obs.exit_signal, obs.reason
        out.events.append(UnitExited(unit=self.unit, pid=self.pid or obs.pid or 0, exit_code=obs.exit_code,
                                     exit_signal=obs.exit_signal, expected=expected, reason=obs.reason))
        self.expected_run = None

    def _state(self, obs: Observation) -> UnitState:
        if self.start_error:
            return "failed"
        if obs.live:
            return obs.state
        if obs.restarting:
            return "starting"
        if obs.run is None and obs.state == "failed":
            return "failed"  # the manager cannot run it at all (no such service, masked)
        if self.ended == "yes":
            return obs.state if obs.state in ("exited", "failed") else "exited"
        return "stopped"


def _how(obs: Observation) -> str:
    if obs.exit_signal is not None:
        return f"signal {obs.exit_signal}"
    if obs.exit_code is not None:
        return f"exit code {obs.exit_code}"
    return obs.reason or "unknown"


class ManagedUnit(ABC):
    """A unit its manager runs; kinds supply ``look`` and ``act`` (see the module docstring)."""

    kind: str

    def __init__(self, config: UnitConfig, ctx: UnitContext, *, poll: float) -> None:
        self.config = config
        self.ctx = ctx
        self.poll = poll
        self.tracker = RunTracker(config.name)
        self.usage = UsageMeter()
        self.detail = ""
        self.probe: ProbeState | None = None
        self._lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._errors = RateLimiter(period=60.0)
        self.log = get_logger("agent.unit", node=ctx.node_id, unit=config.name, kind=self.kind)

    @abstractmethod
    async def look(self) -> Observation:
        """What the manager says now; raises ``UnitError`` when it cannot be asked (it is unreachable)."""

    @abstractmethod
    async def act(self, action: Action, grace: float) -> None:
        """Have the manager start, stop or restart the unit; raises ``UnitError`` with its answer."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> UnitState:
        return self.tracker.state

    @property
    def pid(self) -> int | None:
        return self.tracker.pid if self.tracker.live else None

    async def start(self) -> None:
        await self._control("start", self.config.stop_grace)

    async def stop(self, grace: float | None = None) -> None:
        await self._control("stop", self.config.stop_grace if grace is None else grace)

    async def restart(self) -> None:
        await self._control("restart", self.config.stop_grace)

    def release(self) -> None:  # noqa: B027 - an optional hook: most kinds hold nothing
        """Let go of what the kind holds (a thread, a client) once ``watch`` is over."""

    async def watch(self) -> None:
        try:
            while not self._closed.is_set():
                async with self._lock:
                    await self._refresh()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), self.poll)
        finally:
            self.release()

    def kill(self) -> None:  # noqa: B027 - deliberately nothing, for every kind
        """Nothing to kill: the unit is its manager's, and outlives the agent on purpose."""

    def close(self) -> None:
        self._closed.set()

    def report(self) -> UnitReport:
        tracker = self.tracker
        return UnitReport(
            name=self.name, kind=self.kind, state=tracker.state, pid=self.pid, restarts=tracker.restarts,
            started_at=tracker.started_at, exit_code=tracker.exit_code, exit_signal=tracker.exit_signal,
            error=tracker.error, cpu_percent=self.usage.cpu_percent if tracker.live else 0.0,
            rss_bytes=self.usage.memory_bytes if tracker.live else 0, proc_status=self.detail, probe=self.probe,
        )

    async def _control(self, action: Action, grace: float) -> None:
        async with self._lock:
            if action != "start":
                self.tracker.expect_end()
            failure: UnitError | None = None
            try:
                await self.act(action, grace)
            except UnitError as exc:
                failure = exc
            await self._refresh()  # whatever ended meanwhile, the agent ended (or tried to)
            if failure is None:
                return
            self.tracker.not_expected()
            if action != "stop":
                self.tracker.start_failed(str(failure))
            self.log.error(_FAILED[action], detail=str(failure))
            raise UnitError(f"unit {self.name!r}: {failure}")

    async def _refresh(self) -> None:
        """One look, folded in; events go out, an unreachable manager is logged (rate-limited)."""
        try:
            obs = await self.look()
        except UnitError as exc:
            if self._errors.allow(self.name, "look", self.ctx.clock.monotonic()):
                self.log.warning("unit.look_failed", detail=str(exc))
            self.tracker.error = str(exc)
            return
        seen = self.tracker.observe(obs, self.ctx.clock.wall())
        self.detail = obs.detail
        self.usage.add(obs.usage)
        if obs.probe is not None and (self.probe is None or self.probe.healthy != obs.probe.healthy):
            seen.events.append(ProbeChanged(unit=self.name, probe=obs.probe))
        self.probe = obs.probe
        for note in seen.notes:
            self.log.warning("unit.managed_restart", detail=note, restarts=self.tracker.restarts)
        for event in seen.events:
            if isinstance(event, UnitStarted):
                self.log.info("unit.started", pid=event.pid, restarts=event.restarts)
            elif isinstance(event, UnitExited):
                log = self.log.info if event.expected else self.log.warning
                log("unit.exited", pid=event.pid, exit_code=event.exit_code, exit_signal=event.exit_signal,
                    reason=event.reason, expected=event.expected)
            elif isinstance(event, ProbeChanged):
                self.log.info("probe.changed", kind=event.probe.kind, healthy=event.probe.healthy,
                              error=event.probe.last_error)
            self.ctx.emit(event)
