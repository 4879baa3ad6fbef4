"""Migration on node loss: the prediction service moves when its node's agent dies, and never runs twice.

Two agents on loopback hold the prediction service, a movable singleton
(``stop_after_disconnect``): node-a runs it, node-b keeps a standby copy
(``autostart = false``) over its own copy of the model directory (the
documented precondition: the data is present on the standby node). Killing
node-a's agent takes the service down with it (it dies with its agent); the
controller sees node-a offline, opens ``unit_lost``, waits until node-a has
been silent for the unit's ``fence_after``, starts the standby on node-b and
verifies it — which then answers predictions. node-a's agent, restarted, finds
it was away too long: it keeps its copy stopped (fenced), so one copy runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import eventually_sync, free_port
from tests.e2e.conftest import Cluster
from tests.workload_data import instance, restored_logging, write_features
from workloads import train

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with restored_logging():
        yield


def serve_unit(models: Path, port: int, *, autostart: bool) -> str:
    command = [sys.executable, "-m", "workloads.serve", "--models", str(models), "--port", str(port)]
    return (f'[[agent.units]]\nname = "predict"\nkind = "process"\n'
            f"command = [{', '.join(json.dumps(c) for c in command)}]\n"
            f"autostart = {'true' if autostart else 'false'}\nstop_grace = 2.0\nstop_after_disconnect = 2.0\n"
            f'[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:{port}/healthz"\n'
            f"interval = 0.5\ntimeout = 1.0\nfailures = 3\nstart_period = 5.0\n")


def incidents(cluster: Cluster, kind: str) -> list[dict[str, Any]]:
    return [i for i in cluster.get("/api/v1/incidents")["items"] if i["kind"] == kind]


@pytest.mark.timeout(300)
def test_killing_a_nodes_agent_migrates_the_prediction_service_and_one_copy_runs(
        cluster: Cluster, tmp_path: Path) -> None:
    features, models_a = tmp_path / "features", tmp_path / "models-a"
    write_features(features)
    assert train.main(["--features", str(features), "--models", str(models_a), "--trees", "20"]) == 0
    models_b = tmp_path / "models-b"
    shutil.copytree(models_a, models_b)
    port_a, port_b = free_port(), free_port()
    cluster.start("controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    config_a = cluster.write_agent("node-a", serve_unit(models_a, port_a, autostart=True))
    agent_a = cluster.start("node-a", "agent", config_a)
    cluster.start("node-b", "agent", cluster.write_agent("node-b", serve_unit(models_b, port_b, autostart=False)))
    eventually_sync(lambda: (cluster.unit("node-a", "predict") or {}).get("healthy") is True, timeout=60,
                    what="node-a's service answers its probe")  # by then node-a has reported it movable
    before = cluster.wait_healthy("node-a", "predict")
    eventually_sync(lambda: (cluster.unit("node-b", "predict") or {}).get("state") == "stopped", timeout=30,
                    what="node-b holds a stopped standby copy")

    agent_a.kill()
    agent_a.wait()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    eventually_sync(lambda: gone(before["pid"]), timeout=10, what="node-a's service died with its agent")

    cluster.wait_healthy("node-b", "predict", timeout=120)
    response = httpx.post(f"http://127.0.0.1:{port_b}/predict",
                          json={"instances": [instance(hot=True), instance(hot=False)]}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == [1, 0]

    eventually_sync(lambda: any(i["state"] == "resolved" for i in incidents(cluster, "unit_lost")), timeout=60,
                    what="unit_lost resolved")
    lost = incidents(cluster, "unit_lost")
    assert [(i["node"], i["unit"]) for i in lost] == [("node-a", "predict")]
    timeline = cluster.audit(lost[0]["id"])
    kinds = [entry["kind"] for entry in timeline]
    assert {"fence_wait", "fenced"} <= set(kinds), kinds
    fence = next(entry for entry in timeline if entry["kind"] == "fence_wait")["data"]
    started = [entry for entry in timeline if entry["kind"] == "command_sent"]
    assert [(c["data"]["node"], c["data"]["step"]) for c in started] == [("node-b", "StartUnit")]
    sent_at = datetime.fromisoformat(started[0]["at"]).timestamp()
    assert sent_at >= fence["fenced_at"] - 0.01  # the standby started only once node-a was surely fenced

    cluster.start("node-a", "agent", config_a)  # back after far longer than stop_after_disconnect
    eventually_sync(lambda: (cluster.unit("node-a", "predict") or {}).get("fenced") is True, timeout=30,
                    what="node-a reports its copy fenced")
    unit_a = cluster.unit("node-a", "predict")
    assert unit_a is not None
    assert unit_a["state"] == "stopped"
    assert unit_a["pid"] is None
    assert cluster.unit("node-b", "predict")["state"] == "running"  # type: ignore[index]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port_a}/healthz", timeout=2)
