"""A unit an agent that was SIGKILLed left running is stopped by the next agent, not started twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from selfheal.keys import write_key
from tests.conftest import Broker, eventually_sync, free_port

pytestmark = pytest.mark.integration


def write_agent(root: Path, broker: Broker, node: str, port: int) -> Path:
    write_key(root / "keys", node)
    path = root / f"{node}.toml"
    path.write_text(
        f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 1.0\nreconnect_max = 1.0\n'
        f'[agent]\nnode_id = "{node}"\ninterval = 0.5\nstate_dir = "{root / node}"\nlisten = "127.0.0.1:0"\n'
        f'[[agent.units]]\nname = "web"\nkind = "process"\n'
        f'command = [{json.dumps(sys.executable)}, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]\n'
        f"stop_grace = 2.0\n"
        f'[security]\nkey_dir = "{root / "keys"}"\n')
    return path


def serves(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # not ours to reap
    except psutil.NoSuchProcess:
        return True


def recorded_pid(record: Path) -> int | None:
    try:
        return int(json.loads(record.read_text())["pid"])
    except (FileNotFoundError, ValueError, KeyError):
        return None  # not written yet, or caught mid-replace


class Agents:
    """Agent processes of one test, and every unit pid seen, all cleaned up at the end."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.procs: list[subprocess.Popen[bytes]] = []
        self.unit_pids: set[int] = set()

    def start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "SELFHEAL_LOG__FORMAT": "json", "SELFHEAL_LOG__LEVEL": "debug"}
        with self.log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "selfheal", "agent", "--config", str(self.config)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(25)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.unit_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if not gone(pid):
                    os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def agents(tmp_path: Path, mosquitto: Broker) -> Iterator[tuple[Agents, Path, int]]:
    port = free_port()
    agents = Agents(write_agent(tmp_path, mosquitto, "node-leftover", port), tmp_path / "agent.log")
    try:
        yield agents, tmp_path / "node-leftover" / "units" / "web.json", port
    finally:
        agents.close()
        if agents.log.exists():  # pytest shows it when the test failed
            print(agents.log.read_text(errors="replace")[-6000:])


def test_a_unit_left_behind_by_a_killed_agent_is_stopped_before_it_starts_again(
        agents: tuple[Agents, Path, int]) -> None:
    runner, record, port = agents
    first = runner.start()
    eventually_sync(lambda: serves(port), what="the unit serving")
    eventually_sync(lambda: recorded_pid(record) is not None, what="the unit's record")
    old = recorded_pid(record)
    assert old is not None
    runner.unit_pids.add(old)
    assert psutil.Process(old).cmdline()[1:3] == ["-m", "http.server"]

    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # The orphan serves on, unsupervised; its record outlived the agent.
    assert not gone(old)
    assert serves(port)
    assert recorded_pid(record) == old

    runner.start()

    def replaced() -> bool:
        pid = recorded_pid(record)
        if pid is not None and pid != old:
            runner.unit_pids.add(pid)
        return gone(old) and pid is not None and pid != old and not gone(pid) and serves(port)

    eventually_sync(replaced, what="the leftover stopped and a new unit serving")
    new = recorded_pid(record)
    assert new is not None
    assert psutil.Process(new).cmdline()[1:3] == ["-m", "http.server"]
    reaped = [json.loads(line) for line in runner.log.read_text().splitlines()
              if '"unit.leftover_reaped"' in line]
    assert [(entry["pid"], entry["unit"], entry["signal"]) for entry in reaped] == [(old, "web", "SIGTERM")]
    # One copy: no second one failed on the port.
    assert "address already in use" not in (record.parents[1] / "logs" / "web.log").read_text().lower()

    # A clean stop takes the record away with the unit.
    runner.close()
    assert gone(new)
    assert not record.exists()
