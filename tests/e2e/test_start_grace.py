"""Start grace for jobs, with real controller and agent processes and the built-in rulebook.

Two jobs start side by side with a 1.5 s ``stall_after``. ``slow`` reports
its first progress only when the test opens its gate, long after
``stall_after`` (a JVM slow to start on a busy host): it must not be touched.
``stuck`` never reports any progress: after its 3 s ``start_timeout`` it is
``unit_start_timeout``, restarted once by ``restart-unstarted-unit``, and
when the new run does no better a human is paged.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tests.conftest import eventually_sync
from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.e2e

SLOW = """
import json, os, sys, time
gate, path = sys.argv[1], os.environ["SELFHEAL_PROGRESS_FILE"]
while not os.path.exists(gate):
    time.sleep(0.05)
for done in (1, 2, 3):
    with open(path + ".tmp", "w") as f:
        json.dump({"done": done, "total": 3, "stage": "working", "updated_at": time.time()}, f)
    os.replace(path + ".tmp", path)
    time.sleep(0.2)
"""


def incidents(cluster: Cluster, unit: str) -> list[dict[str, Any]]:
    return [i for i in cluster.get("/api/v1/incidents")["items"] if (i["node"], i["unit"]) == ("node-g", unit)]


def test_a_slow_start_is_left_alone_and_a_job_that_never_starts_is_restarted_once_then_escalated(
        cluster: Cluster) -> None:
    gate = cluster.root / "gate"
    slow = [sys.executable, "-c", SLOW, str(gate)]
    units = (f'[[agent.units]]\nname = "slow"\nkind = "process"\ncommand = {json.dumps(slow)}\nevery = 3600.0\n'
             f'progress_file = "slow.json"\nstall_after = 1.5\nstart_timeout = 60.0\nstop_grace = 1.0\n'
             f'[[agent.units]]\nname = "stuck"\nkind = "process"\ncommand = ["sleep", "3600"]\nevery = 3600.0\n'
             f'progress_file = "stuck.json"\nstall_after = 1.5\nstart_timeout = 3.0\nstop_grace = 1.0\n')
    cluster.start("controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    cluster.start("node-g", "agent", cluster.write_agent("node-g", units))

    # stuck's finding proves the detectors ran on the node more than 3 s into both runs: twice slow's
    # stall_after, counted from the start as it used to be.
    eventually_sync(lambda: bool(incidents(cluster, "stuck")), timeout=60, what="stuck's start timeout")
    (timed_out,) = incidents(cluster, "stuck")
    assert timed_out["kind"] == "unit_start_timeout"
    assert "has reported no progress in the" in timed_out["summary"]
    assert "(start_timeout 3s)" in timed_out["summary"]
    waiting = cluster.unit("node-g", "slow")
    assert waiting is not None
    assert (waiting["state"], waiting["restarts"]) == ("running", 0)
    assert incidents(cluster, "slow") == []

    gate.touch()  # its first progress, long after stall_after
    eventually_sync(lambda: (cluster.unit("node-g", "slow") or {}).get("state") == "completed", timeout=60,
                    what="slow's run to complete")
    done = cluster.unit("node-g", "slow")
    assert done is not None
    assert done["restarts"] == 0
    assert incidents(cluster, "slow") == []

    eventually_sync(lambda: cluster.get(f"/api/v1/incidents/{timed_out['id']}")["state"] == "failed", timeout=60,
                    what="stuck left to a human")
    plans = cluster.plans(timed_out["id"])
    assert [(p["rule"], p["action"]) for p in plans] == [("restart-unstarted-unit", "restart_unit"),
                                                         ("restart-unstarted-unit", "notify")]
    assert plans[-1]["state"] == "escalated"
    stuck = cluster.unit("node-g", "stuck")
    assert stuck is not None
    assert stuck["restarts"] == 1
