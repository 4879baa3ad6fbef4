"""Kind ``docker``: container inspects (captured from Podman's Docker API, tests/unit/data/docker_inspect)
as observations, health checks as probes, stats as usage, the create spec, and a ``DockerUnit`` driven
through a fake SDK client: the state it reports, and the calls it makes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.units.base import UnitContext
from agent.units.docker import (
    HEALTH_PROBE,
    DockerUnit,
    container_spec,
    health_probe,
    observe_container,
    parse_time,
    split_exit,
    usage_from_stats,
)
from agent.units.managed import Usage
from selfheal.clocks import ManualClock
from selfheal.config import DockerConfig, ProbeConfig, UnitConfig
from selfheal.errors import UnitError
from selfheal.wire import EventBody, ProbeChanged, UnitExited, UnitStarted

DATA = Path(__file__).parent / "data" / "docker_inspect"


def captured(name: str) -> dict[str, Any]:
    return dict(json.loads((DATA / f"{name}.json").read_text(encoding="utf-8")))


def test_engine_times_keep_their_nanoseconds_and_the_zero_time_is_unset() -> None:
    assert parse_time("2026-11-27T14:10:52.957600627Z") == pytest.approx(1795788652.957600627)
    assert parse_time("2026-11-27T15:10:52+01:00") == parse_time("2026-11-27T14:10:52Z")
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time("yesterday") is None
    assert parse_time(None) is None


@pytest.mark.parametrize(("status", "split"), [(0, (0, None)), (3, (3, None)), (137, (None, 9)),
                                               (143, (None, 15)), (128, (128, None)), (255, (255, None))])
def test_an_exit_status_above_128_is_a_signal(status: int, split: tuple[int | None, int | None]) -> None:
    assert split_exit(status) == split


def test_a_running_container() -> None:
    attrs = captured("running")
    obs = observe_container(attrs, name="cap-run", usage=Usage(cpu_ns=5, memory_bytes=6, at=1.0))
    assert (obs.live, obs.state, obs.pid, obs.detail, obs.probe) == (True, "running", attrs["State"]["Pid"], "",
                                                                    None)
    assert obs.run == f"{attrs['Id'][:12]}@{attrs['State']['StartedAt']}"
    assert obs.started_at == parse_time(attrs["State"]["StartedAt"])
    assert obs.usage == Usage(cpu_ns=5, memory_bytes=6, at=1.0)


def test_a_killed_container_ended_by_sigkill() -> None:
    obs = observe_container(captured("exited-sigkill"), name="cap-kill")
    assert (obs.live, obs.state, obs.exit_code, obs.exit_signal, obs.reason, obs.pid) == (
        False, "exited", None, 9, "", None)


def test_an_exit_code() -> None:
    obs = observe_container(captured("exited-code-3"), name="cap-exit")
    assert (obs.state, obs.exit_code, obs.exit_signal) == ("exited", 3, None)


def test_a_paused_container_is_running_and_says_paused() -> None:
    obs = observe_container(captured("paused"), name="cap-pause")
    assert (obs.live, obs.state, obs.detail) == (True, "running", "paused")


def test_a_created_container_never_ran() -> None:
    obs = observe_container(captured("created"), name="cap-created")
    assert (obs.run, obs.live, obs.state) == (None, False, "stopped")


def test_no_container_with_the_name() -> None:
    obs = observe_container(None, name="web")
    assert (obs.run, obs.state, obs.error) == (None, "stopped", "no container named 'web'")


def test_an_oom_kill_is_the_reason() -> None:
    attrs = captured("exited-sigkill")
    attrs["State"] = {**attrs["State"], "OOMKilled": True}
    obs = observe_container(attrs, name="cap-kill")
    assert (obs.state, obs.exit_signal, obs.reason) == ("exited", 9, "oom-killed")
    assert "OOM killer" in obs.error


def test_an_engine_error_is_a_failure_to_run() -> None:
    attrs = captured("exited-code-3")
    attrs["State"] = {**attrs["State"], "ExitCode": 127, "Error": 'exec: "nope": executable file not found'}
    obs = observe_container(attrs, name="cap-exit")
    assert (obs.state, obs.exit_code, obs.error) == ("failed", 127, 'exec: "nope": executable file not found')


def test_restarting_under_a_restart_policy_is_the_engine_restarting_it() -> None:
    attrs = captured("exited-code-3")
    attrs["State"] = {**attrs["State"], "Status": "restarting", "Restarting": True, "Running": True}
    obs = observe_container(attrs, name="cap-exit")
    assert (obs.live, obs.restarting, obs.exit_code) == (False, True, 3)


def test_health_checks_become_a_probe_only_once_they_have_a_verdict() -> None:
    assert health_probe(captured("health-starting")) is None
    assert health_probe(captured("running")) is None  # no HEALTHCHECK
    healthy = health_probe(captured("healthy"))
    assert healthy is not None
    assert (healthy.kind, healthy.healthy, healthy.consecutive_failures, healthy.failures_threshold) == (
        HEALTH_PROBE, True, 0, 2)
    unhealthy = health_probe(captured("unhealthy"))
    assert unhealthy is not None
    assert (unhealthy.healthy, unhealthy.consecutive_failures, unhealthy.last_error) == (False, 2, "no /tmp/ok")
    assert unhealthy.checked_at == parse_time("2026-11-27T14:27:04.131621463Z")


def test_a_units_own_probe_wins_over_the_containers_health_check() -> None:
    assert observe_container(captured("unhealthy"), name="h", engine_health=False).probe is None
    assert observe_container(captured("unhealthy"), name="h").probe is not None


def test_usage_from_stats_leaves_out_the_page_cache() -> None:
    stats = {"cpu_stats": {"cpu_usage": {"total_usage": 35995311}}, "memory_stats": {
        "usage": 10_000_000, "stats": {"inactive_file": 4_000_000}}}
    assert usage_from_stats(stats, 3.0) == Usage(cpu_ns=35995311, memory_bytes=6_000_000, at=3.0)
    assert usage_from_stats({"memory_stats": {"usage": 430080, "limit": 25276063744}}, 4.0) == Usage(
        cpu_ns=None, memory_bytes=430080, at=4.0)  # Podman: no breakdown


def docker_unit_config(**docker: Any) -> UnitConfig:
    return UnitConfig(name="web", kind="docker", command=["httpd", "-f"], env={"A": "1"}, stop_grace=2.5,
                      docker=DockerConfig(container="web", **docker))


def test_the_create_spec_of_a_unit_with_an_image() -> None:
    config = docker_unit_config(image="busybox:1", network="host", ports={"80": "127.0.0.1:8080", "53/udp": "53"},
                                volumes=["/srv:/data:ro"], ulimits={"nofile": [1024, 2048]}, labels={"a": "b"},
                                user="1000")
    assert config.docker is not None
    spec = container_spec(config, config.docker, "node-a")
    assert (spec.image, spec.name, spec.command, spec.environment, spec.user) == (
        "busybox:1", "web", ["httpd", "-f"], {"A": "1"}, "1000")
    assert spec.labels == {"a": "b", "selfheal.unit": "web", "selfheal.node": "node-a"}
    assert spec.ports == ["80/tcp", "53/udp"]
    assert spec.host_config == {
        "port_bindings": {"80/tcp": ("127.0.0.1", 8080), "53/udp": 53}, "binds": ["/srv:/data:ro"],
        "ulimits": [{"name": "nofile", "soft": 1024, "hard": 2048}], "network_mode": "host"}


def test_without_an_image_there_is_nothing_to_create() -> None:
    config = docker_unit_config()
    assert config.docker is not None
    with pytest.raises(UnitError, match="no container named 'web'"):
        container_spec(config, config.docker, "node-a")


class FakeApi:
    """The few ``docker.APIClient`` calls the unit makes, over a dict of containers by name."""

    def __init__(self) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, ...]] = []

    def inspect_container(self, name: str) -> dict[str, Any]:
        import docker.errors  # noqa: PLC0415

        if name not in self.containers:
            raise docker.errors.NotFound("no such container")
        return self.containers[name]

    def stats(self, cid: str, *, stream: bool, one_shot: bool) -> dict[str, Any]:
        self.calls.append(("stats", cid))
        return {"cpu_stats": {"cpu_usage": {"total_usage": 10**9}}, "memory_stats": {"usage": 2**20}}

    def restart(self, cid: str, *, timeout: int) -> None:
        self.calls.append(("restart", cid, str(timeout)))
        self._set("running", pid=4321, started="2026-11-27T15:00:00Z")

    def stop(self, cid: str, *, timeout: int) -> None:
        self.calls.append(("stop", cid, str(timeout)))
        self._set("exited", exit_code=143)

    def start(self, cid: str) -> None:
        self.calls.append(("start", cid))
        self._set("running", pid=999, started="2026-11-27T16:00:00Z")

    def unpause(self, cid: str) -> None:
        self.calls.append(("unpause", cid))
        self._set("running", pid=self.containers["web"]["State"]["Pid"])

    def _set(self, status: str, *, pid: int = 0, started: str | None = None, exit_code: int = 0) -> None:
        state = self.containers["web"]["State"]
        state.update(Status=status, Running=status == "running", Paused=False, ExitCode=exit_code, Pid=pid)
        if started:
            state["StartedAt"] = started


class FakeClient:
    def __init__(self, api: FakeApi) -> None:
        self.api = api

    def close(self) -> None:
        pass


def fake_unit(api: FakeApi, config: UnitConfig | None = None) -> tuple[DockerUnit, list[EventBody]]:
    events: list[EventBody] = []
    ctx = UnitContext(node_id="node-a", state_dir=Path("/nonexistent"), emit=events.append, clock=ManualClock())
    unit = DockerUnit(config or docker_unit_config(stats_interval=1.0), ctx)
    unit._client = FakeClient(api)  # type: ignore[assignment]  # what _connect would have made
    return unit, events


async def test_a_docker_unit_reports_what_the_engine_says_and_acts_on_it() -> None:
    api = FakeApi()
    api.containers["web"] = captured("running")
    unit, events = fake_unit(api)
    running_pid = api.containers["web"]["State"]["Pid"]
    try:
        await unit._refresh()
        report = unit.report()
        assert (report.state, report.pid, report.rss_bytes, report.kind) == ("running", running_pid, 2**20, "docker")
        assert events == [UnitStarted(unit="web", pid=running_pid, restarts=0)]

        api.containers["web"]["State"].update(Status="exited", Running=False, Pid=0, ExitCode=137)
        await unit._refresh()
        assert events[-1] == UnitExited(unit="web", pid=running_pid, exit_signal=9)
        assert (unit.state, unit.report().rss_bytes) == ("exited", 0)

        await unit.restart()
        cid = api.containers["web"]["Id"]
        assert ("restart", cid, "3") in api.calls  # stop_grace 2.5 s, rounded up
        assert events[-1] == UnitStarted(unit="web", pid=4321, restarts=1)

        await unit.stop()
        assert ("stop", cid, "3") in api.calls
        assert events[-1] == UnitExited(unit="web", pid=4321, exit_signal=15, expected=True)
        assert unit.state == "stopped"
    finally:
        unit.release()


async def test_a_paused_container_is_unpaused_before_its_restart() -> None:
    api = FakeApi()
    api.containers["web"] = captured("paused")
    unit, _events = fake_unit(api)
    try:
        await unit.restart()
        cid = api.containers["web"]["Id"]
        assert [call[:2] for call in api.calls if call[0] != "stats"] == [("unpause", cid), ("restart", cid)]
    finally:
        unit.release()


async def test_an_unhealthy_container_emits_a_probe_change_once() -> None:
    api = FakeApi()
    api.containers["web"] = captured("healthy")
    unit, events = fake_unit(api)
    try:
        await unit._refresh()
        api.containers["web"] = captured("unhealthy")
        await unit._refresh()
        await unit._refresh()
        changes = [event for event in events if isinstance(event, ProbeChanged)]
        assert [change.probe.healthy for change in changes] == [True, False]
        assert unit.report().probe == changes[-1].probe
    finally:
        unit.release()


async def test_a_unit_with_its_own_probe_ignores_the_health_check() -> None:
    api = FakeApi()
    api.containers["web"] = captured("unhealthy")
    probe = ProbeConfig(kind="tcp", target="127.0.0.1:80")
    config = UnitConfig(name="web", kind="docker", probe=probe, docker=DockerConfig(container="web"))
    unit, events = fake_unit(api, config)
    try:
        await unit._refresh()
        assert unit.report().probe is None
        assert not any(isinstance(event, ProbeChanged) for event in events)
    finally:
        unit.release()


async def test_the_agent_stopping_refuses_further_calls() -> None:
    api = FakeApi()
    api.containers["web"] = captured("running")
    unit, _events = fake_unit(api)
    unit.release()
    await asyncio.sleep(0)
    with pytest.raises(UnitError, match="the agent is stopping"):
        await unit.start()


async def test_an_answer_not_shaped_as_the_api_says_is_a_failed_look_not_a_crash() -> None:
    api = FakeApi()
    api.containers["web"] = {"State": {"Status": "running", "Running": True, "Pid": 5}}  # no "Id"
    unit, events = fake_unit(api)
    try:
        await unit._refresh()
        assert "unexpected answer from the container engine" in unit.report().error
        assert events == []
    finally:
        unit.release()
        unit.release()  # twice is harmless
