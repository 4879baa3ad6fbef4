"""Agent-local fallback with real processes: Mosquitto, ``selfheal controller``, ``selfheal agent``.

- While the controller is there the agent does nothing on its own: a crash is the controller's to heal
  (one restart, by command).
- The controller killed (its last will says ``offline``): a unit that crashes is restarted by its agent
  after ``fallback_after``. The controller restarted: the agent reports the restart, the controller
  adopts it into an incident for the unit (a ``local_action`` timeline entry, a ``local`` plan) and
  does not restart the unit again — its starts are counted in a file the unit appends to.
- ``fallback = false``: the unit stays down while the controller is away.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from selfheal.keys import write_key
from tests.conftest import eventually_sync
from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.integration

NODE = "node-f"


def agent_toml(cluster: Cluster, units: str, *, fallback: str = "fallback_after = 1.0\n") -> Path:
    write_key(cluster.root / "keys", NODE)
    path = cluster.root / f"{NODE}.toml"
    path.write_text(
        f'[mqtt]\nurl = "{cluster.broker.url}"\nkeepalive = 2.0\nreconnect_max = 1.0\n'
        f'[agent]\nnode_id = "{NODE}"\ninterval = 0.5\nstate_dir = "{cluster.root / NODE}"\n'
        f'listen = "127.0.0.1:0"\n{fallback}{units}'
        f'[security]\nkey_dir = "{cluster.root / "keys"}"\n')
    return path


def counted_unit(starts: Path) -> str:
    """A unit that appends its pid to ``starts`` each time it starts, then sleeps."""
    code = f"import os, time; open({str(starts)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(3600)"
    return (f'[[agent.units]]\nname = "web"\nkind = "process"\nstop_grace = 1.0\n'
            f"command = [{json.dumps(sys.executable)}, \"-c\", {json.dumps(code)}]\n")


def started(starts: Path) -> list[int]:
    return [int(line) for line in starts.read_text().split()] if starts.exists() else []


def crash(cluster: Cluster, starts: Path) -> None:
    pid = started(starts)[-1]
    cluster.unit_pids.add(pid)
    os.kill(pid, signal.SIGKILL)


def log_events(cluster: Cluster, name: str, event: str) -> list[dict[str, Any]]:
    lines = []
    for raw in (cluster.root / f"{name}.log").read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("event") == event:
            lines.append(line)
    return lines


def wait_logged(cluster: Cluster, name: str, event: str, *, count: int = 1, timeout: float = 60) -> None:
    eventually_sync(lambda: len(log_events(cluster, name, event)) >= count, timeout=timeout, interval=0.05,
                    what=f"{name} logging {event}")


def incidents(cluster: Cluster) -> list[dict[str, Any]]:
    return [i for i in cluster.get("/api/v1/incidents")["items"] if i["node"] == NODE]


def wait_resolved(cluster: Cluster, count: int) -> list[dict[str, Any]]:
    """Until ``count`` incidents of the node exist and all are resolved; their details, oldest first."""
    eventually_sync(lambda: len(found := incidents(cluster)) == count and all(i["state"] == "resolved" for i in found),
                    timeout=60, what=f"{count} resolved incident(s) of {NODE}")
    return [cluster.get(f"/api/v1/incidents/{i['id']}") for i in sorted(incidents(cluster), key=lambda i: i["id"])]


def kill_controller(cluster: Cluster) -> None:
    """SIGKILL: the broker publishes its last will (``offline``) after 1.5 keep-alives, and the agent hears it."""
    controller = cluster.procs["controller"]
    controller.send_signal(signal.SIGKILL)
    controller.wait(10)
    wait_logged(cluster, NODE, "agent.controller_offline")


def test_the_agent_restarts_a_crashed_unit_while_the_controller_is_away_and_the_controller_adopts_it(
        cluster: Cluster) -> None:
    starts = cluster.root / "starts"
    controller_config = cluster.write_controller()
    cluster.start("controller", "controller", controller_config)
    cluster.wait_ready()
    cluster.start(NODE, "agent", agent_toml(cluster, counted_unit(starts)))
    cluster.wait_healthy(NODE)
    assert len(started(starts)) == 1

    # The controller is there: a crash is its to heal, by command; the agent's fallback stays out of it.
    crash(cluster, starts)
    [first] = wait_resolved(cluster, 1)
    assert len(started(starts)) == 2
    assert [p["mode"] for p in first["plans"]] == ["auto"]
    assert log_events(cluster, NODE, "fallback.restarted") == []

    kill_controller(cluster)
    crash(cluster, starts)
    wait_logged(cluster, NODE, "fallback.restarted")
    eventually_sync(lambda: len(started(starts)) == 3, what="the local restart")
    [local] = log_events(cluster, NODE, "fallback.restarted")
    assert (local["unit"], local["attempt"], local["reason"], local["status"]) == ("web", 1, "unit_exited", "done")

    cluster.start("controller", "controller", controller_config)
    cluster.wait_ready()
    wait_logged(cluster, NODE, "fallback.reported")
    _, adopted = wait_resolved(cluster, 2)
    assert adopted["kind"] == "unit_exited"
    assert "restarted by its agent while no controller listened" in adopted["summary"]
    entries = [e for e in adopted["timeline"] if e["kind"] == "local_action"]
    assert [(e["data"]["key"], e["data"]["attempt"], e["data"]["status"]) for e in entries] == [
        (local["key"], 1, "done")]
    assert [(p["mode"], p["state"], p["action"]) for p in adopted["plans"]] == [("local", "local", "restart")]
    assert not any(e["kind"] == "command_sent" for e in adopted["timeline"])
    # Resolved means the engine watched the unit stay up for resolve_after: it did not restart it again.
    assert len(started(starts)) == 3
    assert len(log_events(cluster, NODE, "command.result")) == 1  # the first crash's restart, only
    assert len(log_events(cluster, "controller", "local_action.adopted")) == 1
    assert 'selfheal_local_actions_adopted_total{action="restart",status="done"} 1.0' in cluster.get_text("/metrics")


def test_an_online_status_from_before_a_broker_restart_is_no_proof_of_a_controller(cluster: Cluster) -> None:
    """Mosquitto without persistence restarted while the controller is gone: the agent is connected again, but
    no controller said ``online`` on this connection, so a crash is still the agent's to heal."""
    starts = cluster.root / "starts"
    controller_config = cluster.write_controller()
    cluster.start("controller", "controller", controller_config)
    cluster.wait_ready()
    cluster.start(NODE, "agent", agent_toml(cluster, counted_unit(starts)))
    cluster.wait_healthy(NODE)

    cluster.broker.process.kill()  # SIGKILL: no last wills go out (a clean stop sends the controller's)
    cluster.broker.process.wait(10)
    controller = cluster.procs["controller"]
    controller.send_signal(signal.SIGKILL)
    controller.wait(10)
    cluster.broker.start()  # its retained messages are gone, the controller's status with them
    wait_logged(cluster, NODE, "mqtt.connected", count=2)
    assert log_events(cluster, NODE, "agent.controller_offline") == []  # nothing ever said so
    crash(cluster, starts)
    wait_logged(cluster, NODE, "fallback.restarted")
    eventually_sync(lambda: len(started(starts)) == 2, what="the local restart")

    cluster.start("controller", "controller", controller_config)
    cluster.wait_ready()
    [adopted] = wait_resolved(cluster, 1)
    assert [e["data"]["attempt"] for e in adopted["timeline"] if e["kind"] == "local_action"] == [1]
    assert len(started(starts)) == 2


def test_turned_off_the_unit_stays_down_until_the_controller_is_back(cluster: Cluster) -> None:
    starts = cluster.root / "starts"
    controller_config = cluster.write_controller()
    cluster.start("controller", "controller", controller_config)
    cluster.wait_ready()
    cluster.start(NODE, "agent", agent_toml(cluster, counted_unit(starts),
                                            fallback="fallback = false\nfallback_after = 1.0\n"))
    cluster.wait_healthy(NODE)

    kill_controller(cluster)
    crash(cluster, starts)
    wait_logged(cluster, NODE, "fallback.off")  # where a fallback that is on restarts the unit
    cluster.start("controller", "controller", controller_config)
    cluster.wait_ready()
    [healed] = wait_resolved(cluster, 1)
    assert [p["mode"] for p in healed["plans"]] == ["auto"]  # the controller's restart, the only one
    assert len(started(starts)) == 2
    assert log_events(cluster, NODE, "fallback.restarted") == []
