"""The agent loads only what its config needs, and does not redo unchanging work each interval.

A node with process units, an http and an exec probe and no datasets must not
import the peer API's web stack (Starlette, uvicorn), httpx (a plain
``http://`` probe needs none of it; the CLI's client commands and dataset
repair load it when used), the other unit kinds' modules, rich and pygments
(pulled in by structlog's and httpx's optional extras), the docker SDK, Spark,
numpy, scikit-learn or prometheus_client (imported at the first scrape of
``/metrics``): each is megabytes of resident memory on every node
(``bench/agent.py``). Checked in a fresh interpreter, the way ``selfheal
agent`` starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from agent import collect
from tests.conftest import free_port

NEVER = ("numpy", "sklearn", "fastapi", "docker", "pyspark", "starlette", "uvicorn", "rich", "pygments", "click",
         "httpx", "httpcore", "h11", "anyio", "controller", "detectors", "prometheus_client")

SCRIPT = """
import asyncio, json, sys
from pathlib import Path
import selfheal.cli
from selfheal.config import load_config
from agent.app import AgentApp

async def main():
    app = await AgentApp.open(load_config(Path(sys.argv[1])))
    try:
        probe = app.supervisor.entries["web"].probe
        checked = await probe.check()
        return type(app.http).__name__, checked[0]
    finally:
        await asyncio.to_thread(app.close)

server, healthy = asyncio.run(main())
print(json.dumps({"server": server, "healthy": healthy,
                  "modules": sorted(name for name, module in sys.modules.items() if module is not None)}))
"""


def test_an_agent_without_datasets_loads_no_web_stack_nor_heavy_libraries(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\n\n'
        f'[agent]\nnode_id = "lean"\nstate_dir = {json.dumps(str(tmp_path / "state"))}\nlisten = "127.0.0.1:0"\n\n'
        f'[[agent.units]]\nname = "web"\nkind = "process"\ncommand = ["sleep", "60"]\n\n'
        f'[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:{free_port()}/"\n\n'
        f'[[agent.units]]\nname = "worker"\nkind = "process"\ncommand = ["sleep", "60"]\n\n'
        f'[agent.units.probe]\nkind = "exec"\ntarget = ["true"]\n')
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], capture_output=True, text=True, timeout=60,
                          check=False, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["server"] == "HealthServer"
    assert out["healthy"] is False  # nothing listens there: the check ran, on the short path
    loaded = {name.split(".")[0] for name in out["modules"]}
    assert sorted(loaded & set(NEVER)) == []
    assert {"agent.units.docker", "agent.units.spark", "agent.units.systemd", "agent.peer_api"}.isdisjoint(
        out["modules"])


def test_the_mount_table_is_listed_again_only_after_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    listings: list[int] = []

    def partitions(all: bool = False) -> list[SimpleNamespace]:
        listings.append(1)
        return [SimpleNamespace(mountpoint="/", fstype="ext4"), SimpleNamespace(mountpoint="/", fstype="ext4"),
                SimpleNamespace(mountpoint="/snap/x", fstype="squashfs")]

    monkeypatch.setattr(collect, "_MOUNTS", collect._Mounts())
    monkeypatch.setattr(psutil, "disk_partitions", partitions)
    first = collect.collect_disks(now=100.0)
    assert [d.mount for d in first] == ["/"]
    for now in (101.0, 130.0, 100.0 + collect.MOUNTS_TTL - 0.1):
        assert [d.mount for d in collect.collect_disks(now=now)] == ["/"]
    assert len(listings) == 1
    collect.collect_disks(now=100.0 + collect.MOUNTS_TTL)
    assert len(listings) == 2
    collect.collect_disks(now=5.0)  # a clock that went back (never for monotonic): list again rather than trust it
    assert len(listings) == 3
