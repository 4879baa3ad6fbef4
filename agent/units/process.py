"""Unit kind ``process``: a plain child process the agent starts, watches and stops.

Each run gets its own session (so its own process group): stopping signals
the whole group, the way systemd's ``KillMode=control-group`` does, and
whatever the main process leaves behind when it exits is killed too, so a
restart never finds the old child still holding the port. While a run is
alive its pid is recorded in the state dir: if the agent dies hard, the next
agent stops that leftover before it starts the unit again (see
``agent.units.leftovers``); a movable singleton (``stop_after_disconnect``)
instead dies with the agent (``PR_SET_PDEATHSIG``). Output is
appended to ``<state_dir>/logs/<unit>.log`` (rotated once to ``.log.1`` at
start when it grew past ``LOG_ROTATE_BYTES``).

The run's environment is the agent's without its secrets, plus the unit's
``env`` (``agent.workload.unit_environment``); a unit with a ``user`` runs
with that user's uid, gid and groups (``agent.workload.resolve_user``), and
fails to start, saying why, when the agent cannot switch to it.

``watch`` awaits each run's exit, so an exit is seen the moment it happens and
emitted as ``UnitExited``; ``expected`` says whether the agent caused it. The
agent never restarts a crashed unit by itself: the controller decides.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import subprocess
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

import psutil

from agent.progress import progress_path
from agent.units import leftovers
from agent.units.base import UnitContext, UnitState
from agent.units.leftovers import signal_group
from agent.workload import Account, prepare_work_dir, resolve_user, switch_args, unit_environment, work_dir
from selfheal.clocks import iso
from selfheal.config import UnitConfig
from selfheal.errors import UnitError
from selfheal.logs import get_logger
from selfheal.progress import ENV_VAR as PROGRESS_ENV
from selfheal.wire import UnitExited, UnitReport, UnitStarted

LOG_ROTATE_BYTES = 16 * 1024 * 1024
KILL_WAIT = 10.0
"""Seconds to wait for a SIGKILLed process to be reaped before giving up on it."""


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGKILL when the agent dies (Linux ``PR_SET_PDEATHSIG``).

    A movable singleton must not outlive its agent: the controller may start it elsewhere once the node is
    unreachable. If the agent died between fork and here, exit instead of running an orphan."""
    if _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(127)


@dataclass(slots=True, eq=False)
class _Run:
    proc: asyncio.subprocess.Process
    expected: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ProcessUnit:
    """A ``process`` unit; see the module docstring."""

    kind = "process"

    def __init__(self, config: UnitConfig, ctx: UnitContext) -> None:
        self.check_config(config)
        self.config = config
        self.ctx = ctx
        self.restarts = 0
        self.started_at = 0.0
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.error = ""
        self._state: UnitState = "stopped"
        self._run: _Run | None = None
        self._runs: asyncio.Queue[_Run | None] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._account: Account | None = None
        self.log = get_logger("agent.unit", node=ctx.node_id, unit=config.name)

    @staticmethod
    def check_config(config: UnitConfig) -> None:
        """Refuse a config this kind cannot run (``UnitError``); kinds built on this one override it."""
        if not config.command:
            raise UnitError(f"unit {config.name!r}: a process unit needs a command")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> UnitState:
        return self._state

    @property
    def pid(self) -> int | None:
        run = self._run
        return run.proc.pid if run is not None and not run.done.is_set() else None

    async def start(self) -> None:
        async with self._lock:
            await self._start()

    async def stop(self, grace: float | None = None) -> None:
        async with self._lock:
            await self._stop(self.config.stop_grace if grace is None else grace)

    async def restart(self) -> None:
        async with self._lock:
            await self._stop(self.config.stop_grace)
            self.restarts += 1
            await self._start()

    async def watch(self) -> None:
        while True:
            run = await self._runs.get()
            if run is None:
                return
            returncode = await run.proc.wait()
            # Leftovers of the group (children the main process did not take down) go with it;
            # then nothing of the run is left for its record to name.
            signal_group(run.proc.pid, signal.SIGKILL)
            await self._forget()
            self._on_exit(run, returncode)

    def kill(self) -> None:
        run = self._run
        if run is not None and not run.done.is_set() and run.proc.returncode is None:
            run.expected = True
            signal_group(run.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        self._runs.put_nowait(None)

    def report(self) -> UnitReport:
        return UnitReport(
            name=self.name, kind=self.kind, state=self._state, pid=self.pid, restarts=self.restarts,
            started_at=self.started_at, exit_code=self.exit_code, exit_signal=self.exit_signal,
            error=self.error,
        )

    async def prepare(self) -> tuple[list[str], dict[str, str]]:
        """The argv and environment of the next run; raises ``UnitError`` (a detail) when it cannot run.

        Kinds built on this one (``spark``) override it to check prerequisites and build their command.
        """
        account = None
        if self.config.user is not None:
            account = await asyncio.to_thread(resolve_user, self.config.user)
        self._account = account
        extra = {}
        progress = progress_path(self.config, self.ctx.state_dir)
        if progress is not None:
            # In the default working directory of a unit with a user, relative to it: that user may not
            # traverse the agent's state dir on the way to it.
            relative = str(self.config.progress_file)
            own_dir = account is not None and not self.config.cwd and not Path(relative).is_absolute()
            extra[PROGRESS_ENV] = relative if own_dir else str(progress)
        env = unit_environment(os.environ, self.config.env, extra=extra, account=account)
        return list(self.config.command), env

    async def _start(self) -> None:
        if self._run is not None and not self._run.done.is_set():
            return
        self._state = "starting"
        try:
            await leftovers.reap(self.ctx.state_dir, self.name, grace=self.config.stop_grace,
                                 kill_wait=KILL_WAIT, log=self.log)
        except UnitError as exc:
            raise self._failed(str(exc)) from None
        try:
            argv, env = await self.prepare()
        except UnitError as exc:
            raise self._failed(str(exc)) from None
        account = self._account
        cwd = str(work_dir(self.config, self.ctx.state_dir))
        if account is not None and not self.config.cwd:
            try:
                await asyncio.to_thread(prepare_work_dir, Path(cwd), account)
            except (OSError, UnitError) as exc:
                raise self._failed(f"cannot prepare the working directory {cwd!r}: {exc}") from None
        try:
            log_file = await asyncio.to_thread(_open_log, self.ctx.state_dir, self.name, argv,
                                               self.ctx.clock.wall())
        except OSError as exc:
            raise self._failed(f"cannot open the unit log: {exc}") from None
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=cwd, env=env, start_new_session=True,
                **switch_args(account),
                preexec_fn=(partial(_die_with_parent, os.getpid())
                            if self.config.stop_after_disconnect is not None else None),
            )
        except OSError as exc:
            raise self._failed(f"cannot start {argv[0]!r} in {cwd!r}: {exc.strerror or exc}") from None
        finally:
            log_file.close()
        run = _Run(proc)
        self._run = run
        # Recorded before the watcher sees the run, so its exit always removes the record after this wrote it.
        await self._remember(proc.pid)
        self._state = "running"
        self.error = ""
        self.started_at = self.ctx.clock.wall()
        self.exit_code = self.exit_signal = None
        self._runs.put_nowait(run)
        self.log.info("unit.started", pid=proc.pid, restarts=self.restarts)
        self.ctx.emit(UnitStarted(unit=self.name, pid=proc.pid, restarts=self.restarts))

    def _failed(self, detail: str) -> UnitError:
        self._state = "failed"
        self.error = detail
        self.log.error("unit.start_failed", detail=detail)
        return UnitError(f"unit {self.name!r}: {detail}")

    async def _stop(self, grace: float) -> None:
        run = self._run
        if run is None or run.done.is_set():
            return
        if run.proc.returncode is not None:
            # It exited on its own and ``watch`` is winding it up: nothing to signal (its pid may be reused).
            await run.done.wait()
            return
        run.expected = True
        pgid = run.proc.pid
        # SIGCONT after SIGTERM: a SIGSTOPped process cannot act on SIGTERM until it runs again.
        signal_group(pgid, signal.SIGTERM)
        signal_group(pgid, signal.SIGCONT)
        with suppress(TimeoutError):
            await asyncio.wait_for(run.done.wait(), grace)
        if run.done.is_set():
            return
        self.log.warning("unit.stop_timeout", pid=pgid, grace_s=grace, action="SIGKILL")
        signal_group(pgid, signal.SIGKILL)
        try:
            await asyncio.wait_for(run.done.wait(), KILL_WAIT)
        except TimeoutError:
            raise UnitError(f"unit {self.name!r}: pid {pgid} survived SIGKILL for {KILL_WAIT}s") from None

    async def _remember(self, pid: int) -> None:
        try:
            await asyncio.to_thread(leftovers.remember, self.ctx.state_dir, self.name, pid)
        except (OSError, psutil.Error) as exc:
            # The unit runs all the same; only a hard agent death would now leave it behind unnoticed.
            self.log.warning("unit.record_failed", pid=pid, error=str(exc))

    async def _forget(self) -> None:
        try:
            await asyncio.to_thread(leftovers.forget, self.ctx.state_dir, self.name)
        except OSError as exc:
            # Harmless: the next start finds the pid gone (or reused) and drops the record then.
            self.log.warning("unit.record_failed", error=str(exc))

    def _on_exit(self, run: _Run, returncode: int) -> None:
        pid = run.proc.pid
        code, sig = (None, -returncode) if returncode < 0 else (returncode, None)
        if self._run is run:
            self.exit_code, self.exit_signal = code, sig
            self._state = "stopped" if run.expected else "exited"
        log = self.log.info if run.expected else self.log.warning
        log("unit.exited", pid=pid, exit_code=code, exit_signal=sig, expected=run.expected)
        self.ctx.emit(UnitExited(unit=self.name, pid=pid, exit_code=code, exit_signal=sig,
                                 expected=run.expected))
        run.done.set()


def _open_log(state_dir: Path, unit: str, argv: list[str], now: float) -> IO[bytes]:
    directory = state_dir / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{unit}.log"
    try:
        if path.stat().st_size > LOG_ROTATE_BYTES:
            path.replace(path.with_name(f"{unit}.log.1"))
    except FileNotFoundError:
        pass
    log_file = path.open("ab")
    log_file.write(f"--- selfheal: starting {argv!r} at {iso(now)} ---\n".encode())
    log_file.flush()
    return log_file
