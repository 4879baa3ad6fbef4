"""The daemon's side of systemd's service protocol, shared by the agent and the controller.

``Service`` is one long-lived part (``run(*, stop)``, a named task in the
daemon's task group) plus two calls the daemon makes, ``ready()`` and
``stopping()``:

- **Readiness.** ``ready()`` sends ``READY=1`` with a ``STATUS=`` line. Until
  then each tick sends ``EXTEND_TIMEOUT_USEC`` while the health checks pass,
  so a start that waits for an unreachable broker is not killed by
  ``TimeoutStartSec=`` (killing it would kill the agent's units too), while a
  wedged start still is.
- **Status.** Each tick ``describe()`` says what the daemon is doing; the line
  goes out when it changes. The outcome of the last reload stays on it.
- **Watchdog.** ``WATCHDOG=1`` every ``WATCHDOG_USEC/2``, sent by this task on
  the event loop and only when every health check passes. A blocked or
  wedged loop cannot run the task, so the pings stop and systemd restarts the
  daemon — a pinger thread would go on pinging for a dead loop.
- **Reload.** SIGHUP sends ``RELOADING=1``, re-reads and validates the config
  file in a thread, then ``READY=1``. A bad file keeps the running config; the
  error goes to the log and the status line. A good one applies ``log`` at
  once, hands the new config to the daemon's ``apply`` (which applies what it
  can change live and returns those key prefixes) and names every other
  changed key as needing a restart.
- ``stopping()`` sends ``STOPPING=1``.

Only a daemon started from a config file (``source``) handles SIGHUP; tests
and the demo that run several daemons in one process pass none. With
``$SELFHEAL_DEBUG_LOOP_STALL`` set to seconds, SIGUSR2 blocks the event loop
that long (threads keep running): a fault-injection hook for the watchdog
tests, a stand-in for a wedged loop that SIGSTOP cannot be, since SIGSTOP
stops threads too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from selfheal.config import Config, load_config
from selfheal.errors import ConfigError
from selfheal.logs import configure_logging, get_logger
from selfheal.sdnotify import Notifier, watchdog_period

HealthCheck = Callable[[], str | None]
"""Returns what is wrong, or None when healthy. Called on the event loop: it must not block."""

Apply = Callable[[Config, Sequence[str]], Awaitable[Sequence[str]]]
"""``apply(new, changed_keys)`` applies what can change live and returns the key prefixes it applied.
It raises ``ConfigError`` (before changing anything) when the new config cannot be applied."""

STATUS_TICK = 2.0
"""Seconds between status (and start-timeout extension) rounds when there is no watchdog."""
DEBUG_STALL_ENV = "SELFHEAL_DEBUG_LOOP_STALL"
LIVE_ALWAYS = ("log",)
"""Key prefixes every daemon applies live."""


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    changed: tuple[str, ...] = ()
    applied: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    error: str = ""

    def summary(self) -> str:
        if not self.ok:
            return f"config reload failed, still running the previous config: {self.error}"
        if not self.changed and not self.applied:
            return "config reloaded: no change"
        parts = [f"config reloaded: applied {', '.join(self.applied)}" if self.applied else "config reloaded"]
        if self.restart:
            parts.append(f"restart needed for {', '.join(self.restart)}")
        return "; ".join(parts)


class Service:
    def __init__(self, name: str, config: Config, *, role: Literal["agent", "controller"],
                 source: Path | None = None, describe: Callable[[], str] | None = None,
                 checks: Sequence[HealthCheck] = (), apply: Apply | None = None,
                 notifier: Notifier | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.config = config
        self.role = role
        self.source = source
        self.describe = describe or (lambda: "running")
        self.checks = list(checks)
        self.apply = apply
        self.notifier = notifier or Notifier.from_env(env)
        self.env = dict(os.environ if env is None else env)
        self.watchdog = watchdog_period(self.env)
        self.is_ready = False
        self.last_reload: ReloadOutcome | None = None
        self.reloads = 0
        self.pings = 0
        self._status = ""
        self._problem: str | None = None
        self._reload_wanted = asyncio.Event()
        self.log = get_logger("service", service=name)

    # --- what the daemon calls ---------------------------------------------------------------

    def ready(self) -> None:
        self.is_ready = True
        self._status = self._status_line()
        self.notifier.ready(self._status)

    def stopping(self) -> None:
        self.notifier.stopping(f"stopping: {self.name}")

    def request_reload(self) -> None:
        """What SIGHUP does; reloads asked for while one runs are folded into one more."""
        self._reload_wanted.set()

    # --- the long-lived part -------------------------------------------------------------------

    async def run(self, *, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        handled = self._install_signals(loop)
        tick = self.watchdog or STATUS_TICK
        if self.notifier.enabled:
            self.log.info("service.notify", watchdog_ping_s=self.watchdog, reload_on_sighup=self.source is not None)
        try:
            while not stop.is_set():
                self._round(tick)
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._reload_wanted.wait())]
                try:
                    await asyncio.wait(waiters, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
                if self._reload_wanted.is_set() and not stop.is_set():
                    self._reload_wanted.clear()
                    await self.reload()
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)

    def _round(self, tick: float) -> None:
        problem = self._health()
        if problem != self._problem:
            if problem is None:
                self.log.info("service.healthy_again")
            else:
                self.log.warning("service.unhealthy", problem=problem,
                                 effect="no watchdog pings" if self.watchdog else "none without a watchdog")
            self._problem = problem
        if not self.notifier.enabled:
            return
        if problem is None and self.watchdog is not None and self.notifier.watchdog():
            self.pings += 1
        if problem is None and not self.is_ready:
            self.notifier.extend_timeout(tick * 3)
        status = self._status_line()
        if status != self._status:
            self._status = status
            self.notifier.status(status)

    def _health(self) -> str | None:
        for check in self.checks:
            try:
                problem = check()
            except Exception as exc:  # noqa: BLE001 - a broken check is itself a problem, never a crash
                problem = f"health check {getattr(check, '__name__', check)!r} failed: {exc}"
            if problem:
                return problem
        return None

    def _status_line(self) -> str:
        line = self.describe() if self._problem is None else f"unhealthy: {self._problem}"
        if self.last_reload is not None and (not self.last_reload.ok or self.last_reload.restart):
            line += f"; {self.last_reload.summary()}"
        return line

    # --- reload --------------------------------------------------------------------------------

    async def reload(self) -> ReloadOutcome:
        """Re-read the config file; keep the old one if the new one is bad; say what applied."""
        self.reloads += 1
        self.notifier.reloading(f"reloading {self.source}")
        self.log.info("config.reloading", source=str(self.source))
        outcome = await self._reload()
        self.last_reload = outcome
        if outcome.ok:
            self.log.info("config.reloaded", changed=list(outcome.changed), applied=list(outcome.applied),
                          restart_needed=list(outcome.restart))
        else:
            self.log.error("config.reload_failed", source=str(self.source), error=outcome.error,
                           effect="still running the previous config")
        self._status = self._status_line()
        line = self._status if outcome.restart or not outcome.ok else f"{self._status}; {outcome.summary()}"
        self.notifier.ready(line)
        return outcome

    async def _reload(self) -> ReloadOutcome:
        if self.source is None:
            return ReloadOutcome(ok=False, error="started without a config file; nothing to re-read")
        try:
            new = await asyncio.to_thread(load_config, self.source, env=self.env, role=self.role)
        except ConfigError as exc:
            return ReloadOutcome(ok=False, error=str(exc))
        changed = changed_keys(self.config, new)
        try:
            applied = list(await self.apply(new, changed)) if self.apply is not None else []
        except ConfigError as exc:
            return ReloadOutcome(ok=False, changed=tuple(changed), error=str(exc))
        if any(_under(key, ("log",)) for key in changed):
            configure_logging(new.log)
            applied.insert(0, "log")
        live = (*LIVE_ALWAYS, *applied)
        restart = tuple(key for key in changed if not _under(key, live))
        self.config = new
        return ReloadOutcome(ok=True, changed=tuple(changed), applied=tuple(dict.fromkeys(applied)), restart=restart)

    # --- signals -------------------------------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        handled: list[int] = []
        if self.source is not None:
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            handled.append(signal.SIGHUP)
        stall = self.env.get(DEBUG_STALL_ENV, "")
        if stall:
            seconds = float(stall)
            self.log.warning("service.debug_stall_hook", signal="SIGUSR2", seconds=seconds)
            loop.add_signal_handler(signal.SIGUSR2, _stall_loop, seconds, self.log)
            handled.append(signal.SIGUSR2)
        return handled


def _stall_loop(seconds: float, log: Any) -> None:
    log.warning("service.debug_stall", seconds=seconds)
    time.sleep(seconds)  # blocking on purpose: this is the wedged loop the watchdog must notice


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted key paths whose values differ (``agent.units[0].command``, ``mqtt.url``); never the values."""
    out: list[str] = []
    _diff(msgspec.to_builtins(old), msgspec.to_builtins(new), "", out)
    return out


def _diff(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in dict.fromkeys([*old, *new]):
            _diff(old.get(key), new.get(key), f"{path}.{key}" if path else str(key), out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, f"{path}[{i}]", out)
    elif old != new:
        out.append(path)


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith((f"{p}.", f"{p}[")) for p in prefixes)
