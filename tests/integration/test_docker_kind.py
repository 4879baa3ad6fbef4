"""Kind ``docker`` against a real container engine (Podman's Docker API, ``tests.podman_support``): a
container adopted, killed, restarted, paused, replaced under its name, and created from an image."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.units.base import UnitContext
from agent.units.docker import DockerUnit
from selfheal.clocks import SystemClock
from selfheal.config import DockerConfig, UnitConfig
from selfheal.errors import UnitError
from selfheal.wire import EventBody, UnitExited, UnitStarted
from tests.conftest import eventually, free_port
from tests.podman_support import ULIMITS, PodmanEngine

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def watched(engine: PodmanEngine, tmp_path: Path, container: str, command: list[str] | None = None,
                  **docker: object) -> AsyncIterator[tuple[DockerUnit, list[EventBody]]]:
    events: list[EventBody] = []
    ctx = UnitContext(node_id="node-d", state_dir=tmp_path, emit=events.append, clock=SystemClock())
    config = UnitConfig(name="web", kind="docker", stop_grace=1.0, command=command or [],
                        docker=DockerConfig(container=container, url=engine.url, poll=0.2, stats_interval=0.5,
                                            **docker))  # type: ignore[arg-type]
    unit = DockerUnit(config, ctx)
    task = asyncio.create_task(unit.watch())
    try:
        yield unit, events
    finally:
        unit.close()
        await task
        engine.remove(container)


def of(kind: type[EventBody], events: list[EventBody]) -> list[EventBody]:
    return [event for event in events if isinstance(event, kind)]


def httpd(port: int) -> list[str]:
    return ["httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"]


async def test_a_killed_container_is_noticed_at_once_and_restarted(podman_engine: PodmanEngine,
                                                                  tmp_path: Path) -> None:
    name = unique("killed")
    attrs = podman_engine.run(name, ["sleep", "600"])
    async with watched(podman_engine, tmp_path, name) as (unit, events):
        await eventually(lambda: unit.state == "running", timeout=10, what="adopted")
        assert unit.pid == attrs["State"]["Pid"]
        assert events[0] == UnitStarted(unit="web", pid=attrs["State"]["Pid"], restarts=0)
        await eventually(lambda: unit.report().rss_bytes > 0, timeout=10, what="memory use reported")

        os.kill(attrs["State"]["Pid"], signal.SIGKILL)
        await eventually(lambda: bool(of(UnitExited, events)), timeout=5, what="the exit noticed")
        assert of(UnitExited, events) == [UnitExited(unit="web", pid=attrs["State"]["Pid"], exit_signal=9)]
        report = unit.report()
        assert (report.state, report.exit_signal, report.pid, report.rss_bytes) == ("exited", 9, None, 0)

        await unit.restart()
        report = unit.report()
        assert (report.state, report.restarts) == ("running", 1)
        assert report.pid is not None
        assert report.pid != attrs["State"]["Pid"]
        assert of(UnitStarted, events)[-1] == UnitStarted(unit="web", pid=report.pid, restarts=1)


async def test_the_agents_stop_is_expected_and_a_start_brings_it_back(podman_engine: PodmanEngine,
                                                                      tmp_path: Path) -> None:
    name = unique("stopped")
    podman_engine.run(name, ["sleep", "600"])
    async with watched(podman_engine, tmp_path, name) as (unit, events):
        await eventually(lambda: unit.state == "running", timeout=10, what="adopted")
        await unit.stop()
        assert unit.state == "stopped"
        (exit_event,) = of(UnitExited, events)
        assert isinstance(exit_event, UnitExited)
        assert exit_event.expected
        await unit.stop()  # a no-op when not running
        await unit.start()
        assert (unit.state, unit.report().restarts) == ("running", 1)


async def test_a_paused_container_is_reported_and_a_restart_unpauses_it(podman_engine: PodmanEngine,
                                                                       tmp_path: Path) -> None:
    name = unique("paused")
    podman_engine.run(name, ["sleep", "600"])
    async with watched(podman_engine, tmp_path, name) as (unit, _events):
        await eventually(lambda: unit.state == "running", timeout=10, what="adopted")
        podman_engine.cli("pause", name)
        await eventually(lambda: unit.report().proc_status == "paused", timeout=10, what="paused")
        await unit.restart()
        attrs = podman_engine.inspect(name)
        assert attrs is not None
        assert attrs["State"]["Status"] == "running"
        assert (unit.state, unit.report().proc_status, unit.report().restarts) == ("running", "", 1)


async def test_a_container_recreated_under_its_name_is_followed(podman_engine: PodmanEngine,
                                                                tmp_path: Path) -> None:
    name = unique("replaced")
    first = podman_engine.run(name, ["sleep", "600"])
    async with watched(podman_engine, tmp_path, name) as (unit, events):
        await eventually(lambda: unit.state == "running", timeout=10, what="adopted")
        podman_engine.remove(name)  # what an orchestrator's redeploy does: remove...
        second = podman_engine.run(name, ["sleep", "600"])  # ...and create it anew, same name, new id
        assert second["Id"] != first["Id"]
        await eventually(lambda: unit.pid == second["State"]["Pid"], timeout=10, what="the new container followed")
        assert (unit.state, unit.report().restarts) == ("running", 1)
        assert of(UnitStarted, events)[-1] == UnitStarted(unit="web", pid=second["State"]["Pid"], restarts=1)
        await unit.restart()  # and it is the new container that the agent acts on
        attrs = podman_engine.inspect(name)
        assert attrs is not None
        assert attrs["Id"] == second["Id"]
        assert attrs["State"]["Pid"] == unit.pid


async def test_a_unit_with_an_image_creates_its_container(podman_engine: PodmanEngine, tmp_path: Path) -> None:
    name = unique("created")
    port = free_port()
    async with watched(podman_engine, tmp_path, name, httpd(port), image=podman_engine.image, network="host",
                       ulimits=ULIMITS, labels={"team": "ml"}) as (unit, _events):
        await eventually(lambda: bool(unit.report().error), timeout=10, what="no container yet")
        assert (unit.state, unit.report().error) == ("stopped", f"no container named {name!r}")
        await unit.start()
        attrs = podman_engine.inspect(name)
        assert attrs is not None
        assert attrs["Config"]["Labels"]["selfheal.unit"] == "web"
        assert attrs["Config"]["Labels"]["team"] == "ml"
        assert (unit.state, unit.pid) == ("running", attrs["State"]["Pid"])
        podman_engine.remove(name)
        await eventually(lambda: unit.state == "exited", timeout=10, what="the removal noticed")
        await unit.restart()  # gone: created again
        assert unit.state == "running"


async def test_without_an_image_a_missing_container_cannot_be_started(podman_engine: PodmanEngine,
                                                                       tmp_path: Path) -> None:
    name = unique("missing")
    async with watched(podman_engine, tmp_path, name) as (unit, _events):
        with pytest.raises(UnitError, match=r"set docker\.image"):
            await unit.start()
        assert unit.state == "failed"


async def test_an_unreachable_engine_fails_the_start_and_names_the_socket(tmp_path: Path) -> None:
    events: list[EventBody] = []
    ctx = UnitContext(node_id="node-d", state_dir=tmp_path, emit=events.append, clock=SystemClock())
    url = f"unix://{tmp_path}/nothing.sock"
    unit = DockerUnit(UnitConfig(name="web", kind="docker", docker=DockerConfig(container="web", url=url)), ctx)
    with pytest.raises(UnitError, match="cannot reach the container engine at unix://"):
        await unit.start()
    assert (unit.state, events) == ("failed", [])
    unit.release()

