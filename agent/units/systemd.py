"""Unit kind ``systemd``: a systemd service the agent watches and heals through ``systemctl``.

The unit is a service name (``systemd.unit``). Every ``systemd.poll``
seconds (0.5 by default) the agent runs ``systemctl show`` for the service's
``ActiveState``, ``SubState``, ``MainPID``, ``Result``, ``ExecMainCode`` /
``ExecMainStatus``, ``NRestarts`` and resource use, and turns it into an
``Observation`` (``observe_service``, pure, tested on captured output):

- a run is one start of the service's main process (``ExecMainStartTimestamp
  Monotonic`` and ``ExecMainPID``), alive while the service is ``active``,
  ``reloading``, ``deactivating`` or ``activating``;
- its end carries systemd's own verdict: the exit code (``ExecMainCode`` 1,
  ``CLD_EXITED``) or the signal (2 ``CLD_KILLED``, 3 ``CLD_DUMPED``) in
  ``exit_code`` / ``exit_signal``, and ``Result`` (``exit-code``, ``signal``,
  ``core-dump``, ``watchdog``, ``timeout``, ``oom-kill``...) as the event's
  ``reason`` and, in words, the report's ``error``;
- ``activating (auto-restart)`` is systemd restarting the service itself
  (``Restart=``): a restart, not a crash, unless systemd gives up;
- a service systemd does not know (``LoadState=not-found``) is ``failed``.

``start``, ``stop`` and ``restart`` run ``systemctl --no-ask-password VERB
UNIT``: systemd does the work, on the system bus, so an unprivileged agent is
authorised by polkit (the agent's rule allows exactly its configured units)
and is told so when it is not — the refusal becomes the command's failure.
systemctl waits for the job; after ``systemd.job_timeout`` seconds the agent
stops waiting (the job goes on in systemd) and the looks say how it ends.
``stop_grace`` does not apply: the service's ``TimeoutStopSec=`` does.
Stopping the agent leaves the service running.

The CPU and memory of the service's cgroup (``CPUUsageNSec``,
``MemoryCurrent``, when systemd accounts them) go into the unit's report.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping
from contextlib import suppress

from agent.units.base import UnitContext
from agent.units.managed import Action, ManagedUnit, Observation, Usage
from selfheal.config import UnitConfig
from selfheal.config_checks import systemd_service
from selfheal.errors import UnitError

PROPERTIES = (
    "Id", "LoadState", "ActiveState", "SubState", "MainPID", "ExecMainPID", "ExecMainStartTimestampMonotonic",
    "ExecMainCode", "ExecMainStatus", "Result", "NRestarts", "MemoryCurrent", "CPUUsageNSec", "StatusText",
)
"""What one look asks ``systemctl show`` for."""
SHOW_TIMEOUT = 10.0
"""Seconds one ``systemctl show`` may take (a busy system bus is slow, never this slow)."""
MAX_ERROR_CHARS = 300
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3
NOT_SET = 2**64 - 1
"""systemd's "infinity"/unset for a 64-bit counter (``[not set]`` in newer output)."""
LIVE_STATES = ("active", "reloading", "deactivating", "activating", "refreshing")
RESULTS = {
    "exit-code": "exited with a non-zero code",
    "signal": "killed by a signal",
    "core-dump": "dumped core",
    "watchdog": "stopped sending watchdog keep-alives (WatchdogSec=) and was killed",
    "timeout": "timed out (TimeoutStartSec=/TimeoutStopSec=/RuntimeMaxSec=)",
    "oom-kill": "killed by the OOM killer",
    "start-limit-hit": "was started too often (StartLimitBurst=) and is refused until reset-failed",
    "resources": "could not be set up (resources: a missing directory, user or file)",
    "protocol": "broke the service protocol (no PID file, or READY=1 without a main process)",
    "exec-condition": "did not pass ExecCondition=",
    "condition": "did not meet a Condition*= setting",
}
"""systemd's ``Result`` values (systemd.exec(5), org.freedesktop.systemd1(5)), in words."""
_COULD_NOT_RUN = frozenset({"resources", "start-limit-hit", "protocol", "exec-condition", "condition"})


def parse_show(text: str) -> dict[str, str]:
    """``systemctl show`` output (``Key=Value`` lines) as a dict; a value may itself hold ``=``."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            props[key] = value
    return props


def counter(value: str | None) -> int | None:
    """A 64-bit counter property, None when unset (``[not set]``, ``infinity``, 2^64-1, empty)."""
    if value is None or not value.isdigit():
        return None
    number = int(value)
    return None if number >= NOT_SET else number


def describe_exit(result: str, code: int | None, sig: int | None) -> str:
    """How a run ended, in words for the report: systemd's verdict and the status it saw."""
    parts = []
    if result and result != "success":
        parts.append(f"{RESULTS.get(result, result)} (Result={result})")
    if sig is not None:
        try:
            parts.append(f"signal {signal.Signals(sig).name}")
        except ValueError:
            parts.append(f"signal {sig}")
    elif code is not None and code != 0:
        parts.append(f"exit code {code}" + (" (systemd could not execute it)" if 200 <= code <= 243 else ""))
    return "systemd: " + ", ".join(parts) if parts else ""


def observe_service(props: Mapping[str, str], *, unit: str, wall: float, mono: float) -> Observation:
    """One ``systemctl show`` (parsed) as an ``Observation``; pure. ``wall``/``mono``: clocks at the look,
    to date the run from systemd's monotonic start timestamp."""
    load = props.get("LoadState", "")
    active = props.get("ActiveState", "")
    sub = props.get("SubState", "")
    if load not in ("loaded", "") and active in ("inactive", "failed", ""):
        why = {"not-found": "systemd has no such unit", "masked": "the unit is masked",
               "bad-setting": "the unit file has a bad setting", "error": "the unit failed to load"}
        return Observation(run=None, live=False, state="failed",
                           error=f"{unit}: {why.get(load, load)} (LoadState={load})")
    started_us = counter(props.get("ExecMainStartTimestampMonotonic")) or 0
    exec_pid = counter(props.get("ExecMainPID")) or 0
    run = f"{started_us}/{exec_pid}" if started_us else None
    started_at = wall - max(0.0, mono - started_us / 1e6) if started_us else None
    main_pid = counter(props.get("MainPID")) or None
    usage = Usage(cpu_ns=counter(props.get("CPUUsageNSec")), memory_bytes=counter(props.get("MemoryCurrent")),
                  at=mono)
    if active in LIVE_STATES and sub != "auto-restart":
        detail = active if active in ("reloading", "deactivating") else ""
        return Observation(run=run, live=True, state="starting" if active == "activating" else "running",
                           pid=main_pid, started_at=started_at, detail=detail, usage=usage)
    how = props.get("ExecMainCode", "0")
    status = counter(props.get("ExecMainStatus"))
    code = status if how == str(CLD_EXITED) else None
    sig = status if how in (str(CLD_KILLED), str(CLD_DUMPED)) else None
    result = props.get("Result", "")
    if code is None and sig is None and active == "inactive" and result in ("", "success"):
        # systemd unloads an inactive unit nothing refers to at once, and its exit status with it: what
        # is left (Result=success) says the run ended cleanly — exit 0, or stopped on request.
        code = 0
    could_not_run = result in _COULD_NOT_RUN or (code is not None and 200 <= code <= 243) or run is None
    return Observation(
        run=run, live=False, state="failed" if active == "failed" and could_not_run else "exited",
        started_at=started_at, exit_code=code, exit_signal=sig,
        reason=result if result not in ("", "success") else "", error=describe_exit(result, code, sig),
        restarting=sub == "auto-restart",
    )


def systemctl_argv(systemctl: str, action: Action | None, unit: str) -> list[str]:
    """argv of one look (``action`` None) or one job; never asks for a password (it would hang)."""
    if action is None:
        return [systemctl, "show", "--no-pager", f"--property={','.join(PROPERTIES)}", "--", unit]
    return [systemctl, "--no-ask-password", "--no-pager", action, "--", unit]


class SystemdUnit(ManagedUnit):
    """A ``systemd`` unit; see the module docstring."""

    kind = "systemd"

    def __init__(self, config: UnitConfig, ctx: UnitContext) -> None:
        if config.systemd is None:
            raise UnitError(f"unit {config.name!r}: a systemd unit needs [systemd] with unit = \"NAME.service\"")
        self.systemd = config.systemd
        self.service = systemd_service(config.systemd.unit)
        super().__init__(config, ctx, poll=config.systemd.poll)

    async def look(self) -> Observation:
        argv = systemctl_argv(self.systemd.systemctl, None, self.service)
        code, out, err = await self._run(argv, SHOW_TIMEOUT)
        if code is None:
            raise UnitError(f"{argv[0]} show took over {SHOW_TIMEOUT:g}s")
        if code != 0:
            raise UnitError(f"{argv[0]} show {self.service} failed ({code}): {_clip(err or out)}")
        clock = self.ctx.clock
        return observe_service(parse_show(out), unit=self.service, wall=clock.wall(), mono=clock.monotonic())

    async def act(self, action: Action, grace: float) -> None:
        argv = systemctl_argv(self.systemd.systemctl, action, self.service)
        code, out, err = await self._run(argv, self.systemd.job_timeout)
        if code is None:
            # The job goes on in systemd; the looks say how it ends, and the controller verifies.
            self.log.warning("unit.job_pending", action=action, waited_s=self.systemd.job_timeout)
            return
        if code != 0:
            raise UnitError(f"systemctl {action} {self.service} failed ({code}): {_clip(err or out)}")

    async def _run(self, argv: list[str], timeout: float) -> tuple[int | None, str, str]:
        """Run systemctl: (exit code or None after ``timeout``, stdout, stderr); ``UnitError`` if it cannot."""
        env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env)
        except OSError as exc:
            raise UnitError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return None, "", ""
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _clip(text: str) -> str:
    return " ".join(text.split())[:MAX_ERROR_CHARS]
