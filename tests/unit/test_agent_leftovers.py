"""Leftover records: only a process whose pid *and* create_time match is ever signalled.

``os.killpg`` is replaced by a recorder, so a wrong decision shows up as an
assertion, never as a signal to the test run's own process group.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import structlog
from structlog.testing import capture_logs

from agent.units import leftovers
from selfheal.errors import UnitError


@pytest.fixture
def killpg(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, signal.Signals]]:
    sent: list[tuple[int, signal.Signals]] = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: sent.append((pgid, sig)))
    return sent


def write_record(state_dir: Path, data: bytes) -> Path:
    path = leftovers.record_path(state_dir, "web")
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


async def reap(state_dir: Path) -> int | None:
    log = structlog.get_logger("test").bind(unit="web")
    return await leftovers.reap(state_dir, "web", grace=0.1, kill_wait=0.1, log=log)


async def test_a_recycled_pid_is_not_signalled(tmp_path: Path, killpg: list[tuple[int, signal.Signals]]) -> None:
    # The pid exists, but the process holding it now was created at another time: not ours.
    create_time = psutil.Process(os.getpid()).create_time()
    path = write_record(tmp_path, f'{{"pid": {os.getpid()}, "create_time": {create_time - 1000.0}}}'.encode())
    with capture_logs() as logs:
        assert await reap(tmp_path) is None
    assert killpg == []
    assert not path.exists()
    assert [(e["event"], e["pid"]) for e in logs] == [("unit.leftover_record_stale", os.getpid())]


async def test_a_matching_record_is_stopped_like_a_unit(tmp_path: Path,
                                                        killpg: list[tuple[int, signal.Signals]]) -> None:
    # The same record with the right create_time: SIGTERM + SIGCONT, then SIGKILL after the grace
    # (recorded only, so this process "survives" and the reap reports it).
    pid = os.getpid()
    path = write_record(tmp_path, f'{{"pid": {pid}, "create_time": {psutil.Process(pid).create_time()}}}'.encode())
    with pytest.raises(UnitError, match=f"leftover pid {pid} .* survived SIGKILL"):
        await reap(tmp_path)
    assert killpg == [(pid, signal.SIGTERM), (pid, signal.SIGCONT), (pid, signal.SIGKILL)]
    assert path.exists()  # kept: the next start tries again


@pytest.mark.parametrize("data", [
    b"{not json", b"", b"[]", b'{"pid": "12", "create_time": 1.0}', b'{"pid": 0, "create_time": 1.0}',
    b'{"pid": 1, "create_time": 1.0}', b'{"pid": 12}', b"\xff\xfe",
])
async def test_a_garbled_record_is_dropped_with_a_warning(tmp_path: Path, data: bytes,
                                                          killpg: list[tuple[int, signal.Signals]]) -> None:
    path = write_record(tmp_path, data)
    with capture_logs() as logs:
        assert await reap(tmp_path) is None
    assert killpg == []
    assert not path.exists()
    assert [(e["event"], e["log_level"]) for e in logs] == [("unit.leftover_record_unreadable", "warning")]


async def test_no_record_no_leftover(tmp_path: Path, killpg: list[tuple[int, signal.Signals]]) -> None:
    with capture_logs() as logs:
        assert await reap(tmp_path) is None
    assert (killpg, logs) == ([], [])


def test_only_a_child_of_this_process_is_remembered(tmp_path: Path) -> None:
    # This process is nobody's child here: recording it could name a reused pid.
    assert leftovers.remember(tmp_path, "web", os.getpid()) is False
    assert not leftovers.record_path(tmp_path, "web").exists()
