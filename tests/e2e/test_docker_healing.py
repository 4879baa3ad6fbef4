"""End to end with a real container engine: a controller and an agent (real processes) heal containers of
kind ``docker`` — killed, hung, and replaced under their name — through Podman's Docker API
(``tests.podman_support``)."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import eventually_sync, free_port
from tests.e2e.conftest import Cluster
from tests.podman_support import PodmanEngine

pytestmark = pytest.mark.e2e


@pytest.fixture
def container(podman_engine: PodmanEngine) -> Iterator[str]:
    """A unique container name, removed after the test (agents leave their containers running).

    Tests ask for it before ``cluster``, so the agent has stopped (and cannot heal it) when it is removed."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    yield name
    podman_engine.remove(name)


def httpd(port: int) -> list[str]:
    return ["httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"]


def docker_unit(engine: PodmanEngine, container: str, port: int, *, create: bool) -> str:
    """A docker unit with an http probe; ``create``: the agent creates it from the image (else it adopts)."""
    unit = '[[agent.units]]\nname = "web"\nkind = "docker"\nstop_grace = 1.0\n'
    if create:
        unit += f"command = {json.dumps(httpd(port))}\n"
    unit += f'[agent.units.docker]\ncontainer = "{container}"\nurl = "{engine.url}"\npoll = 0.25\n'
    if create:
        unit += (f'image = "{engine.image}"\nnetwork = "host"\n'
                 "ulimits = { nofile = [1024, 1024], nproc = [1024, 1024] }\n")
    return unit + (f'[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:{port}/index.html"\n'
                   "interval = 0.5\ntimeout = 0.5\nfailures = 3\nstart_period = 1.0\n")


def incidents(cluster: Cluster, node: str, kind: str, state: str) -> list[dict[str, object]]:
    return [i for i in cluster.get("/api/v1/incidents", state=state)["items"]
            if i["node"] == node and i["kind"] == kind]


def test_a_killed_container_is_restarted_and_its_incident_resolved(
        podman_engine: PodmanEngine, container: str, cluster: Cluster) -> None:
    port = free_port()
    cluster.start("controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    cluster.start("node-a", "agent", cluster.write_agent("node-a", docker_unit(podman_engine, container, port,
                                                                               create=True)))
    before = cluster.wait_healthy("node-a")
    # (A unit known only from its start event reads as kind "process" until the first report.)
    eventually_sync(lambda: (cluster.unit("node-a") or {}).get("kind") == "docker", timeout=10, what="kind docker")
    attrs = podman_engine.inspect(container)
    assert attrs is not None
    assert attrs["State"]["Pid"] == before["pid"]
    assert attrs["Config"]["Labels"]["selfheal.node"] == "node-a"

    podman_engine.cli("kill", "--signal", "KILL", container)
    after = cluster.wait_healthy("node-a", restarts_above=before["restarts"])
    assert after["pid"] != before["pid"]
    moved = podman_engine.inspect(container)
    assert moved is not None
    assert (moved["Id"], moved["State"]["Pid"]) == (attrs["Id"], after["pid"])  # restarted, not recreated

    eventually_sync(lambda: bool(incidents(cluster, "node-a", "unit_exited", "resolved")), timeout=30,
                    what="incident resolved")
    incident = incidents(cluster, "node-a", "unit_exited", "resolved")[0]
    assert "SIGKILL" in str(incident["summary"])
    detail = cluster.get(f"/api/v1/incidents/{incident['id']}")
    assert detail["plans"][0]["state"] == "succeeded"


def test_a_hung_container_fails_its_probe_and_is_restarted(
        podman_engine: PodmanEngine, container: str, cluster: Cluster) -> None:
    port = free_port()
    hung = podman_engine.run(container, httpd(port))  # created by someone else: the agent adopts it
    cluster.start("controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    cluster.start("node-b", "agent", cluster.write_agent("node-b", docker_unit(podman_engine, container, port,
                                                                               create=False)))
    before = cluster.wait_healthy("node-b")
    assert before["pid"] == hung["State"]["Pid"]

    os.kill(before["pid"], signal.SIGSTOP)
    cluster.wait_healthy("node-b", restarts_above=before["restarts"], timeout=0.5 * 3 + 30)
    eventually_sync(lambda: bool(incidents(cluster, "node-b", "probe_failing", "resolved")), timeout=30,
                    what="probe incident resolved")
    with pytest.raises(ProcessLookupError):
        os.kill(before["pid"], 0)  # the hung process is gone, not left stopped behind
    after = podman_engine.inspect(container)
    assert after is not None
    assert (after["Id"], after["State"]["Status"]) == (hung["Id"], "running")


def test_a_container_recreated_by_its_orchestrator_is_followed_by_name(
        podman_engine: PodmanEngine, container: str, cluster: Cluster) -> None:
    port = free_port()
    first = podman_engine.run(container, httpd(port))
    # Only notify: healing the old container's exit would race the orchestrator's removal of it (two
    # supervisors of one container); what is tested here is that the agent follows the name.
    rules = cluster.root / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  - name: tell-exited\n    match: {kind: unit_exited}\n"
                     "    ladder: [{action: notify}]\n    verify: {kind: cleared}\n")
    cluster.start("controller", "controller", cluster.write_controller(f'rulebooks = ["{rules}"]\n'))
    cluster.wait_ready()
    cluster.start("node-c", "agent", cluster.write_agent("node-c", docker_unit(podman_engine, container, port,
                                                                               create=False)))
    before = cluster.wait_healthy("node-c")

    podman_engine.remove(container)  # a redeploy: the old container goes, a new one takes its name
    second = podman_engine.run(container, httpd(port))
    assert second["Id"] != first["Id"]
    after = cluster.wait_healthy("node-c", restarts_above=before["restarts"])
    assert after["pid"] == second["State"]["Pid"]
    # The gap was an exit; with the new container running, it is over.
    eventually_sync(lambda: not incidents(cluster, "node-c", "unit_exited", "open"), timeout=30,
                    what="no open incident")
    final = podman_engine.inspect(container)
    assert final is not None
    assert final["Id"] == second["Id"]
