"""The unit supervisor: owns every unit of the node and its probe, start to shutdown.

``Supervisor.run`` starts all units (a unit that cannot start is reported as
``failed``, never fatal), runs one watcher per unit and one probe runner per
probe in its task group, and on stop stops every unit (SIGTERM, then SIGKILL
after the unit's grace) before returning — except units that another manager
runs (kinds ``docker`` and ``systemd``), which outlive the agent. Unit kinds come from an explicit
registry ``kind -> factory`` passed in by the composition root.

A unit with ``every`` is wrapped in a ``ScheduledUnit`` (``agent.units.schedule``)
whatever its kind. A unit with a ``progress_file`` gets a ``ProgressWatcher``
task; its progress, the time it last moved in the current run, ``stall_after``
and the ``start_timeout`` in force go into the unit's report, for the
controller's stall and start detectors (``agent.progress``).

The supervisor never restarts a crashed unit on its own: the controller
decides, and asks through ``restart`` (a ``restart_unit`` command) — or, while
no controller listens, the agent's fallback does (``agent.fallback``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import msgspec

from agent.probes import ProbeRunner
from agent.progress import ProgressTracker, ProgressWatcher, progress_path
from agent.units.base import Unit, UnitContext, UnitFactory
from agent.units.process import ProcessUnit
from agent.units.schedule import ScheduledUnit
from selfheal.config import ProbeConfig, UnitConfig
from selfheal.errors import UnitError
from selfheal.logs import get_logger
from selfheal.wire import ProbeState, UnitReport


def _spark(config: UnitConfig, ctx: UnitContext) -> Unit:
    from agent.units.spark import SparkUnit  # noqa: PLC0415 - loaded only on a node with a spark unit

    return SparkUnit(config, ctx)


def _docker(config: UnitConfig, ctx: UnitContext) -> Unit:
    from agent.units.docker import DockerUnit  # noqa: PLC0415 - loaded only on a node with a docker unit

    return DockerUnit(config, ctx)


def _systemd(config: UnitConfig, ctx: UnitContext) -> Unit:
    from agent.units.systemd import SystemdUnit  # noqa: PLC0415 - loaded only on a node with a systemd unit

    return SystemdUnit(config, ctx)


DEFAULT_KINDS: Mapping[str, UnitFactory] = {"process": ProcessUnit, "spark": _spark, "docker": _docker,
                                             "systemd": _systemd}
"""Each kind's module loads when a unit of that kind is built (spark brings httpx, docker its executor)."""
OUTLIVE_AGENT = frozenset({"docker", "systemd"})
"""Kinds whose units another manager runs (the container engine, systemd): the agent's own shutdown leaves
them running — an agent upgrade or a watchdog restart must not take the services down with it."""


@dataclass(slots=True)
class Supervised:
    unit: Unit
    probe: ProbeRunner | None
    config: UnitConfig
    progress: ProgressWatcher | None = None
    """Reads the unit's progress file, when it has one."""
    tracker: ProgressTracker | None = None
    """Progress the unit kind reports itself (Spark's task counts) when there is no progress file."""


class Supervisor:
    """All units of one node; see the module docstring."""

    def __init__(self, units: Sequence[UnitConfig], ctx: UnitContext, *,
                 kinds: Mapping[str, UnitFactory], fence_after: Mapping[str, float] | None = None) -> None:
        self.ctx = ctx
        self.fence_after = dict(fence_after or {})
        """Movable singletons: unit → seconds after the node was last heard by which it is surely stopped."""
        self.fenced: set[str] = set()
        """Units this agent stopped itself after losing contact (``agent.fencing``); they wait for start_unit."""
        self.entries: dict[str, Supervised] = {}
        for config in units:
            factory = kinds.get(config.kind)
            if factory is None:
                raise UnitError(f"unit {config.name!r}: kind {config.kind!r} is not available "
                                f"(have: {', '.join(sorted(kinds))})")
            unit = ScheduledUnit(factory, config, ctx) if config.every is not None else factory(config, ctx)
            probe = None
            if config.probe is not None:
                probe = ProbeRunner(config.name, config.probe, emit=ctx.emit, clock=ctx.clock,
                                    node_id=ctx.node_id, active=partial(_alive, unit), user=config.user)
            entry = Supervised(unit, probe, config)
            path = progress_path(config, ctx.state_dir)
            if path is not None:
                entry.progress = ProgressWatcher(path, run_started=_run_started(unit), clock=ctx.clock)
            else:
                entry.tracker = ProgressTracker()
            self.entries[config.name] = entry
        self.stopping = False
        self.log = get_logger("agent.supervisor", node=ctx.node_id)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    async def run(self, *, stop: asyncio.Event, started: asyncio.Event | None = None,
                  out_of_contact: float = 0.0) -> None:
        probes_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                for name, entry in self.entries.items():
                    tg.create_task(entry.unit.watch(), name=f"unit-watch-{name}")
                    if entry.probe is not None:
                        tg.create_task(entry.probe.run(stop=probes_stop), name=f"probe-{name}")
                    if entry.progress is not None:
                        tg.create_task(entry.progress.run(stop=probes_stop), name=f"progress-{name}")
                await self.start_all(out_of_contact)
                if started is not None:
                    started.set()
                await stop.wait()
                probes_stop.set()
                await self.stop_all()
                for entry in self.entries.values():
                    entry.unit.close()
        finally:
            # Torn down abnormally (cancelled, a watcher failed): leave no orphans behind.
            for entry in self.entries.values():
                entry.unit.kill()

    async def start_all(self, out_of_contact: float = 0.0) -> None:
        """Start every unit that should run here; ``out_of_contact``: seconds since the broker was last had."""
        for name, entry in self.entries.items():
            wanted = await asyncio.to_thread(self._read_desired, name)
            if wanted == "fenced":
                self.fenced.add(name)
                continue
            if wanted == "stopped" or (wanted is None and not entry.config.autostart):
                # Stopped by the controller (e.g. migrated away), or a standby copy: starting it here
                # could run a second copy of a singleton; it waits for a start_unit command.
                continue
            limit = entry.config.stop_after_disconnect
            if limit is not None and out_of_contact >= limit:  # it would start: fence it instead
                await self.fence(name, f"the agent was out of contact for {out_of_contact:.1f}s "
                                       f"(stop_after_disconnect = {limit:g}s): another node may run it now")
                continue
            # A unit that cannot start is reported as failed; the controller sees it and decides.
            with suppress(UnitError):
                await self._start(name)

    async def stop_all(self) -> None:
        """Stop every unit the agent runs itself at once (each within its own grace), never raising."""
        self.stopping = True
        own = {name: entry for name, entry in self.entries.items() if entry.config.kind not in OUTLIVE_AGENT}
        results = await asyncio.gather(*(entry.unit.stop() for entry in own.values()), return_exceptions=True)
        for name, result in zip(own, results, strict=True):
            if isinstance(result, BaseException):
                self.log.error("unit.stop_failed", unit=name, error=str(result))

    async def restart(self, name: str) -> Unit:
        """Restart one unit; ``UnitError`` when it is unknown, the agent is stopping or it cannot start."""
        entry = self._entry(name)
        if self.stopping:
            raise UnitError(f"unit {name!r}: the agent is stopping")
        await asyncio.to_thread(self._write_desired, name, "started")
        self.fenced.discard(name)
        await entry.unit.restart()
        if entry.probe is not None:
            entry.probe.unit_started()
        return entry.unit

    async def fence(self, name: str, reason: str) -> None:
        """Stop a movable singleton on this agent's own decision; it stays stopped until start_unit."""
        entry = self._entry(name)
        self.log.warning("unit.fenced", unit=name, reason=reason)
        await asyncio.to_thread(self._write_desired, name, "fenced")
        self.fenced.add(name)
        await entry.unit.stop()

    def is_running(self, name: str) -> bool:
        return _alive(self._entry(name).unit)

    async def stop(self, name: str) -> Unit:
        """Stop one unit on the controller's command (an expected exit: nobody heals it).

        The decision outlives this agent: after a restart the unit stays stopped until a start_unit
        command, whatever ``autostart`` says — so a unit migrated away never comes back as a second copy."""
        entry = self._entry(name)
        await asyncio.to_thread(self._write_desired, name, "stopped")
        self.fenced.discard(name)
        await entry.unit.stop()
        return entry.unit

    async def start(self, name: str) -> Unit:
        """Start one unit on the controller's command (e.g. the standby copy of a migration)."""
        if self.stopping:
            raise UnitError(f"unit {name!r}: the agent is stopping")
        entry = self._entry(name)
        await asyncio.to_thread(self._write_desired, name, "started")
        self.fenced.discard(name)
        await self._start(name)
        return entry.unit

    def _desired_path(self, name: str) -> Path:
        return self.ctx.state_dir / "units" / f"{name}.desired"

    def _read_desired(self, name: str) -> str | None:
        """The last word on this unit (``started``/``stopped`` by the controller, ``fenced``), or None."""
        try:
            text = self._desired_path(name).read_text(encoding="ascii").strip()
        except OSError:
            return None
        return text if text in ("started", "stopped", "fenced") else None

    def _write_desired(self, name: str, state: str) -> None:
        path = self._desired_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(state + "\n", encoding="ascii")
        tmp.replace(path)

    def reports(self) -> list[UnitReport]:
        """Each unit's state with its probe state (process metrics are the caller's to add)."""
        out = []
        for entry in self.entries.values():
            report = entry.unit.report()
            if entry.probe is not None and entry.config.probe is not None:
                alive = _alive(entry.unit)
                report = msgspec.structs.replace(report, probe=_this_run(
                    entry.probe.state if alive else None, entry.config.probe, report.started_at,
                    why="pending" if alive else "not running"))
            if entry.config.name in self.fence_after:
                report = msgspec.structs.replace(report, fence_after=self.fence_after[entry.config.name],
                                                 fenced=entry.config.name in self.fenced)
            out.append(self._with_progress(entry, report))
        return out

    def _with_progress(self, entry: Supervised, report: UnitReport) -> UnitReport:
        """The report with the unit's progress, when it last moved in this run, and its stall and start limits."""
        tracker = entry.progress.tracker if entry.progress is not None else entry.tracker
        if tracker is None:
            return report
        if entry.progress is None:
            tracker.observe(report.progress, run_started=report.started_at, now=self.ctx.clock.wall())
        start_timeout = entry.config.start_limit
        if tracker.current is None and entry.config.stall_after is None and start_timeout is None:
            return report
        return msgspec.structs.replace(report, progress=tracker.current,
                                       progress_at=tracker.moved_in(report.started_at),
                                       stall_after=entry.config.stall_after, start_timeout=start_timeout)

    async def _start(self, name: str) -> None:
        entry = self._entry(name)
        await entry.unit.start()
        if entry.probe is not None:
            entry.probe.unit_started()

    def _entry(self, name: str) -> Supervised:
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(self.entries) or "none"
            raise UnitError(f"unknown unit {name!r} on node {self.ctx.node_id!r} (units: {known})")
        return entry


def _this_run(state: ProbeState | None, config: ProbeConfig, started_at: float, *, why: str) -> ProbeState:
    """The probe's verdict on the current run; else unhealthy with no failures (``why``: pending, not
    running): a verdict from before the run started — or none at all — must not pass a verification, and
    the controller must know the unit has a probe to wait for when it starts."""
    if state is not None and state.checked_at >= started_at:
        return state
    return ProbeState(kind=config.kind, healthy=False, consecutive_failures=0, failures_threshold=config.failures,
                      last_error=why)


def _alive(unit: Unit) -> bool:
    return unit.state in ("starting", "running")


def _run_started(unit: Unit) -> Callable[[], float]:
    """When the unit's current (or last) run started, wall time: a new value means a new run."""
    return lambda: unit.report().started_at
