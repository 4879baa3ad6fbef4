"""End to end: real controller and agent processes heal real faults.

Deadlines are generous (a loaded 2-core CI machine); speed is measured by
``bench/mttr.py``, not asserted here.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import eventually_sync
from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.e2e


def _incidents(cluster: Cluster, node: str, kind: str, state: str | None = None) -> list[dict[str, object]]:
    params = {"state": state} if state else {}
    return [i for i in cluster.get("/api/v1/incidents", **params)["items"] if i["node"] == node and i["kind"] == kind]


def test_a_killed_unit_is_restarted_and_its_incident_resolved(cluster: Cluster) -> None:
    cluster.start("controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    cluster.start("node-a", "agent", cluster.write_agent("node-a", cluster.http_unit()))
    before = cluster.wait_healthy("node-a")

    os.kill(before["pid"], signal.SIGKILL)
    after = cluster.wait_healthy("node-a", restarts_above=before["restarts"])
    assert after["pid"] != before["pid"]

    eventually_sync(lambda: bool(_incidents(cluster, "node-a", "unit_exited", "resolved")), timeout=30,
                    what="incident resolved")
    incident = _incidents(cluster, "node-a", "unit_exited", "resolved")[0]
    assert "SIGKILL" in str(incident["summary"])
    detail = cluster.get(f"/api/v1/incidents/{incident['id']}")
    kinds = [entry["kind"] for entry in detail["timeline"]]
    assert kinds[0] == "opened"
    assert kinds.index("plan_succeeded") < kinds.index("resolved")
    assert [k for k in kinds if k != "notice"][-1] == "resolved"  # notices of the resolution may follow
    assert detail["plans"][0]["state"] == "succeeded"


def test_a_hung_unit_fails_its_probe_and_is_restarted(cluster: Cluster) -> None:
    cluster.start("controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    cluster.start("node-b", "agent", cluster.write_agent("node-b", cluster.http_unit(failures=3, interval=0.5)))
    before = cluster.wait_healthy("node-b")

    started = time.monotonic()
    os.kill(before["pid"], signal.SIGSTOP)
    # probe interval x failures = 1.5 s; "a few seconds" more, generous for a loaded CI machine.
    cluster.wait_healthy("node-b", restarts_above=before["restarts"], timeout=0.5 * 3 + 20)
    assert time.monotonic() - started < 0.5 * 3 + 20
    eventually_sync(lambda: bool(_incidents(cluster, "node-b", "probe_failing", "resolved")), timeout=30,
                    what="probe incident resolved")
    with pytest.raises(ProcessLookupError):
        os.kill(before["pid"], 0)  # the hung process is gone, not left stopped behind


def test_a_killed_agent_shows_its_node_offline(cluster: Cluster) -> None:
    cluster.start("controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    agent = cluster.start("node-c", "agent", cluster.write_agent("node-c", cluster.http_unit()))
    cluster.wait_healthy("node-c")

    agent.kill()
    agent.wait()

    def offline() -> bool:
        nodes = {n["id"]: n for n in cluster.get("/api/v1/nodes")["items"]}
        return nodes["node-c"]["state"] == "offline"
    eventually_sync(offline, timeout=30, what="node-c offline")
    eventually_sync(lambda: bool(_incidents(cluster, "node-c", "node_offline", "open")), timeout=15,
                    what="node_offline incident")


def test_controller_restart_mid_incident_keeps_history_and_counts_attempts(cluster: Cluster) -> None:
    crashing = ('[[agent.units]]\nname = "crashy"\nkind = "process"\n'
                'command = ["sh", "-c", "sleep 0.3; exit 3"]\n')
    rules = cluster.root / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  - name: restart-crashy\n    match: {kind: unit_exited}\n"
                     "    ladder: [{action: restart, attempts: 10}]\n    cooldown: 1\n    max_attempts: 4\n"
                     "    verify: {within: 5, stable_for: 1}\n")
    config = cluster.write_controller(f'rulebooks = ["{rules}"]\n')
    controller = cluster.start("controller", "controller", config)
    cluster.wait_ready()
    cluster.start("node-d", "agent", cluster.write_agent("node-d", crashing))

    def attempted() -> bool:
        found = _incidents(cluster, "node-d", "unit_exited")
        return bool(found) and bool(cluster.get(f"/api/v1/incidents/{found[0]['id']}")["plans"])
    eventually_sync(attempted, timeout=30, what="a first restart attempt")
    incident_id = _incidents(cluster, "node-d", "unit_exited")[0]["id"]
    before = cluster.get(f"/api/v1/incidents/{incident_id}")

    controller.send_signal(signal.SIGKILL)
    controller.wait()
    cluster.start("controller", "controller", config)
    cluster.wait_ready()

    after = cluster.get(f"/api/v1/incidents/{incident_id}")
    assert after["timeline"][: len(before["timeline"])] == before["timeline"]
    eventually_sync(lambda: cluster.get(f"/api/v1/incidents/{incident_id}")["state"] == "failed", timeout=60,
                    what="incident marked failed after max attempts")
    final = cluster.get(f"/api/v1/incidents/{incident_id}")
    assert len(final["plans"]) == 4  # attempts before the restart count: no fresh budget
    assert any(e["kind"] == "failed" and "max_attempts" in e["data"]["reason"] for e in final["timeline"])
    # once failed, it is left alone: no fifth attempt
    time.sleep(3)
    assert len(cluster.get(f"/api/v1/incidents/{incident_id}")["plans"]) == 4
