"""Leftovers: unit processes an agent that died hard left running, stopped before the unit starts again.

Each run of a ``process`` unit is its own session, so when the agent is
SIGKILLed, OOM-killed or crashes, the run goes on unsupervised. Starting the
unit again would make a second copy, which for a service fails on its port and
crash-loops while the orphan keeps serving unmonitored. (Under systemd,
``KillMode=control-group`` cleans up too; the agent must be right without it.)

So while a run is alive the agent keeps a record of it,
``<state_dir>/units/<unit>.json`` with its pid and psutil ``create_time()``,
written atomically and removed once the run has exited and its group is gone.
Before a unit starts, ``reap`` reads the record: it names a leftover only if a
process with that pid still exists *with the same create_time*, so a pid the
kernel has since given to another process is never signalled. The leftover's
process group is stopped the way a unit is stopped (SIGTERM + SIGCONT, SIGKILL
after the unit's grace). A missing record means nothing was left; a garbled or
stale one is dropped with a log line, never an error.

Fails safe, never wide: a leftover is not recognised (and left alone) when the
wall clock was stepped between the two agent runs (``create_time`` moves with
it), or when its main process has exited while other members of its group live
on (the record names the main process only).

Everything here blocks (file I/O, psutil reads ``/proc``) except ``reap`` and
``wait_gone``, which run that work in threads.
"""

from __future__ import annotations

import asyncio
import os
import signal
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Any

import msgspec
import psutil

from selfheal.errors import UnitError

POLL = 0.05
"""Seconds between checks whether a signalled leftover is gone."""


class Record(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What identifies one run of a unit across agent restarts."""

    # Above 1: killpg(0) would signal the agent's own group, and 1 is init.
    pid: Annotated[int, msgspec.Meta(gt=1)]
    create_time: float
    """psutil ``create_time()`` of ``pid``: seconds since the epoch."""


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a unit's process group; one that is gone already is left alone."""
    # Gone already (its id may even belong to someone else now): nothing of ours to signal.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def record_path(state_dir: Path, unit: str) -> Path:
    return state_dir / "units" / f"{unit}.json"


def remember(state_dir: Path, unit: str, pid: int) -> bool:
    """Record the run ``pid`` (a child of this process) of ``unit``; False when it is gone already."""
    try:
        proc = psutil.Process(pid)
        create_time = proc.create_time()
        # Not our child: it was reaped already and the pid reused; recording that one would be wrong.
        if proc.ppid() != os.getpid():
            return False
    except psutil.NoSuchProcess:
        return False
    record = Record(pid=pid, create_time=create_time)
    path = record_path(state_dir, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # No fsync: the record has to outlive the agent process, not the machine; after a
    # power loss its processes are gone as well.
    tmp.write_bytes(msgspec.json.encode(record))
    tmp.replace(path)
    return True


def forget(state_dir: Path, unit: str) -> None:
    record_path(state_dir, unit).unlink(missing_ok=True)


def find(state_dir: Path, unit: str, log: Any) -> psutil.Process | None:
    """The leftover run of ``unit`` named by its record, if it still runs; drops a useless record."""
    path = record_path(state_dir, unit)
    try:
        record = msgspec.json.decode(path.read_bytes(), type=Record)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        log.warning("unit.leftover_record_unreadable", path=str(path), error=str(exc))
        _drop(path, log)
        return None
    try:
        proc = psutil.Process(record.pid)
        same = proc.create_time() == record.create_time
    except psutil.NoSuchProcess:
        log.info("unit.leftover_record_stale", pid=record.pid, reason="no such process")
        _drop(path, log)
        return None
    except psutil.Error as exc:
        # Cannot tell whether it is ours: leave it alone, keep the record for a later look.
        log.warning("unit.leftover_unverifiable", pid=record.pid, error=str(exc))
        return None
    if not same:
        log.info("unit.leftover_record_stale", pid=record.pid, reason="pid belongs to another process now")
        _drop(path, log)
        return None
    return proc


async def wait_gone(proc: psutil.Process, timeout: float) -> bool:
    """Whether ``proc`` is gone (or a zombie) within ``timeout`` seconds; polls, it is not our child."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await asyncio.to_thread(_alive, proc):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL)
    return True


async def reap(state_dir: Path, unit: str, *, grace: float, kill_wait: float, log: Any) -> int | None:
    """Stop the leftover run of ``unit``, if any, and drop its record; its pid, or None.

    Raises ``UnitError`` when the leftover survives SIGKILL for ``kill_wait`` seconds
    (its record stays, so the next start tries again).
    """
    proc = await asyncio.to_thread(find, state_dir, unit, log)
    if proc is None:
        return None
    pid = proc.pid
    # SIGCONT after SIGTERM: a SIGSTOPped process cannot act on SIGTERM until it runs again.
    signal_group(pid, signal.SIGTERM)
    signal_group(pid, signal.SIGCONT)
    forced = not await wait_gone(proc, grace)
    if forced:
        signal_group(pid, signal.SIGKILL)
        if not await wait_gone(proc, kill_wait):
            raise UnitError(f"unit {unit!r}: leftover pid {pid} of an earlier agent run survived SIGKILL "
                            f"for {kill_wait}s")
    # Whatever else of its group is left goes with it, as when a unit's main process exits.
    signal_group(pid, signal.SIGKILL)
    await asyncio.to_thread(forget, state_dir, unit)
    log.warning("unit.leftover_reaped", pid=pid, signal="SIGKILL" if forced else "SIGTERM", grace_s=grace)
    return pid


def _alive(proc: psutil.Process) -> bool:
    try:
        # is_running() also compares the create_time, so a reused pid counts as gone.
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _drop(path: Path, log: Any) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("unit.leftover_record_undeletable", path=str(path), error=str(exc))
