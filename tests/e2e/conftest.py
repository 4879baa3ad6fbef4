"""End-to-end harness: ``selfheal controller`` and ``selfheal agent`` as real processes.

Each test gets its own Mosquitto, state dirs, keys and free ports; it reads
the controller's HTTP API like an operator would. Unit processes of agents
that a test kills hard are cleaned up at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from selfheal.keys import write_key
from tests.conftest import Broker, eventually_sync, free_port, start_mosquitto

SELFHEAL = [sys.executable, "-m", "selfheal"]


@dataclass
class Cluster:
    root: Path
    broker: Broker
    api_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    unit_pids: set[int] = field(default_factory=set)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def write_controller(self, extra: str = "") -> Path:
        path = self.root / "controller.toml"
        path.write_text(
            f'[mqtt]\nurl = "{self.broker.url}"\nkeepalive = 2.0\nreconnect_max = 1.0\n'
            f'[controller]\nlisten = "127.0.0.1:{self.api_port}"\nstate_dir = "{self.root / "controller"}"\n'
            f"offline_after = 4.0\n{extra}"
            f'[security]\nkey_dir = "{self.root / "keys"}"\napi_token_file = "{self.token_file}"\n')
        self.token_file.write_text("e2e-token-" + self.root.name + "\n")
        return path

    @property
    def token_file(self) -> Path:
        return self.root / "api.token"

    def cli(self, *args: str, token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run a ``selfheal`` client command against this cluster's controller."""
        token = token_file or self.token_file
        return subprocess.run([*SELFHEAL, *args, "--url", self.api, "--token-file", str(token)],
                              capture_output=True, text=True, timeout=30, check=False)

    def plans(self, incident_id: int) -> list[dict[str, Any]]:
        return list(self.get(f"/api/v1/incidents/{incident_id}")["plans"])

    def audit(self, incident_id: int) -> list[dict[str, Any]]:
        return list(self.get(f"/api/v1/incidents/{incident_id}")["timeline"])

    def write_agent(self, node: str, units: str, *, interval: float = 0.5) -> Path:
        write_key(self.root / "keys", node)
        path = self.root / f"{node}.toml"
        path.write_text(
            f'[mqtt]\nurl = "{self.broker.url}"\nkeepalive = 1.0\nreconnect_max = 1.0\n'
            f'[agent]\nnode_id = "{node}"\ninterval = {interval}\nstate_dir = "{self.root / node}"\n'
            f'listen = "127.0.0.1:0"\nfallback_after = 60.0\n{units}'
            f'[security]\nkey_dir = "{self.root / "keys"}"\n')
        return path

    def http_unit(self, name: str = "web", *, failures: int = 3, interval: float = 0.5) -> str:
        port = free_port()
        return (f'[[agent.units]]\nname = "{name}"\nkind = "process"\n'
                f'command = [{json.dumps(sys.executable)}, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]\n'
                f"stop_grace = 2.0\n"
                f'[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:{port}/"\n'
                f"interval = {interval}\ntimeout = 0.5\nfailures = {failures}\nstart_period = 1.0\n")

    def start(self, name: str, role: str, config: Path, *, prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """``prefix``: a command that execs the process, e.g. ``ip netns exec NS`` to run it in a network namespace."""
        log = (self.root / f"{name}.log").open("ab")
        env = {**os.environ, "SELFHEAL_LOG__FORMAT": "json", "SELFHEAL_LOG__LEVEL": "debug"}
        proc = subprocess.Popen([*prefix, *SELFHEAL, role, "--config", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        log.close()
        self.procs[name] = proc
        return proc

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(self.api + path, params=params, timeout=5)
        response.raise_for_status()
        return response.json()

    def get_text(self, path: str) -> str:
        response = httpx.get(self.api + path, timeout=5)
        response.raise_for_status()
        return response.text

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            try:
                return httpx.get(self.api + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        eventually_sync(ready, timeout=timeout, what="controller ready")

    def unit(self, node: str, name: str = "web") -> dict[str, Any] | None:
        for unit in self.get("/api/v1/units")["items"]:
            if unit["node"] == node and unit["name"] == name:
                if unit["pid"]:
                    self.unit_pids.add(unit["pid"])
                return dict(unit)
        return None

    def wait_healthy(self, node: str, name: str = "web", *, restarts_above: int = -1,
                     timeout: float = 40) -> dict[str, Any]:
        def healthy() -> bool:
            u = self.unit(node, name)
            return bool(u and u["state"] == "running" and u["healthy"] is not False and u["restarts"] > restarts_above)
        eventually_sync(healthy, timeout=timeout, what=f"{node}/{name} healthy")
        unit = self.unit(node, name)
        assert unit is not None
        return unit

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:])
                         for p in sorted(self.root.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(25)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.unit_pids:  # units of agents a test killed hard
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    broker = start_mosquitto(tmp_path)
    cluster = Cluster(root=tmp_path, broker=broker)
    yield cluster
    cluster.stop_all()
    broker.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(cluster.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
