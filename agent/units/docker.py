"""Unit kind ``docker``: a container the agent watches and heals through the Docker API.

The unit is a container *name* (``docker.container``). Every ``docker.poll``
seconds (0.5 by default) the agent inspects that name: the container's state
(running, paused, restarting, exited, dead, gone), main pid, exit code, OOM
kill, health status and restart count, and every ``docker.stats_interval``
seconds its CPU and memory use, which go into the unit's report
(``cpu_percent``, ``rss_bytes``: the whole container's cgroup). Because it is
the name that is looked up each time, a container that its orchestrator
removed and recreated (compose ``up``, a redeploy: same name, new id) is
simply the unit's next run.

An exit is reported as ``UnitExited``: exit status ``128+N`` as signal N (the
engines' convention, 137 for SIGKILL), ``reason = "oom-killed"`` when the
kernel's OOM killer ended it. A container's own ``HEALTHCHECK`` becomes the
unit's probe (kind ``docker-health``) when the unit has no ``probe`` of its
own, so an unhealthy container is a ``probe_failing`` finding like any other.
A container the engine restarts by its restart policy healed itself: that is
a restart in the report, not a crash (see ``agent.units.managed``) — give
selfheal-managed containers no restart policy if selfheal should decide.

``restart`` is the engine's restart (SIGTERM, SIGKILL after ``stop_grace``; a
paused container is unpaused first). When no container has the name, ``start``
and ``restart`` create it from ``docker.image`` if that is set (with the
unit's ``command`` and ``env`` and the ``docker.*`` create options, labelled
``selfheal.unit``). Otherwise the container is someone else's to create: they
wait up to ``REAPPEAR_WAIT`` seconds for it (a redeploy removes the old
container before it creates the new one; a new container that is already
running is the fresh run a restart asks for), then fail. Stopping the agent
leaves containers running.

The SDK (the ``docker`` package, selfheal's ``docker`` extra) is blocking and
imported only when a docker unit runs: each unit makes its calls on its own
thread, one at a time, so a hung engine stalls that unit's looks and nothing
else of the agent. Access to the Docker API is root-equivalent; the docs
recommend a socket proxy that allows only the container endpoints.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.units.base import UnitContext
from agent.units.managed import Action, ManagedUnit, Observation, Usage
from selfheal.config import DockerConfig, UnitConfig
from selfheal.errors import UnitError
from selfheal.wire import ProbeState

if TYPE_CHECKING:
    from docker import DockerClient

T = TypeVar("T")

NO_SDK = ("the docker SDK is not installed in the agent's environment: install selfheal with its `docker` "
          "extra (pip install 'selfheal[docker]')")
HEALTH_PROBE = "docker-health"
DEFAULT_HEALTH_RETRIES = 3
"""Docker's default ``--health-retries``: failures in a row before a container is unhealthy."""
MAX_ERROR_CHARS = 200
REAPPEAR_WAIT = 5.0
"""Seconds a start or restart waits for a container that is someone else's to create (no ``docker.image``)
to appear under its name: an orchestrator's redeploy removes the old one before it creates the new."""
_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_time(value: object) -> float | None:
    """Epoch seconds of an engine timestamp (``2026-01-02T03:04:05.123456789Z``); None when unset."""
    if not isinstance(value, str) or value.startswith("0001-"):
        return None
    match = _TIME_RE.match(value)
    if match is None:
        return None
    base, fraction, zone = match.groups()
    stamp = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone)).timestamp()
    return stamp + (int(fraction[:9].ljust(9, "0")) / 1e9 if fraction else 0.0)


def split_exit(status: int) -> tuple[int | None, int | None]:
    """(exit code, signal) of a container's exit status: ``128+N`` is signal N, as the engines report it."""
    if 128 < status <= 128 + 64:
        return None, status - 128
    return status, None


def health_probe(attrs: Mapping[str, Any]) -> ProbeState | None:
    """The container's HEALTHCHECK as a probe state; None without one, or before its first verdict."""
    health = (attrs.get("State") or {}).get("Health") or {}
    status = health.get("Status")
    if status not in ("healthy", "unhealthy"):
        return None  # none, or "starting": no verdict yet
    check = (attrs.get("Config") or {}).get("Healthcheck") or {}
    retries = _int(check.get("Retries")) or DEFAULT_HEALTH_RETRIES
    streak = _int(health.get("FailingStreak"))
    log = health.get("Log") or []
    last = log[-1] if isinstance(log, list) and log and isinstance(log[-1], dict) else {}
    failed = _int(last.get("ExitCode")) != 0
    return ProbeState(
        kind=HEALTH_PROBE, healthy=status == "healthy",
        consecutive_failures=max(streak, retries) if status == "unhealthy" else streak,
        failures_threshold=retries,
        last_error=str(last.get("Output") or "").strip()[:MAX_ERROR_CHARS] if failed else "",
        checked_at=parse_time(last.get("End")) or 0.0,
    )


def usage_from_stats(stats: Mapping[str, Any], at: float) -> Usage:
    """CPU time and memory in use from one stats sample (memory without the reclaimable page cache)."""
    cpu = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
    memory = stats.get("memory_stats") or {}
    usage = memory.get("usage")
    detail = memory.get("stats") or {}
    cache = _int(detail.get("inactive_file", detail.get("total_inactive_file", 0)))
    return Usage(cpu_ns=cpu if isinstance(cpu, int) else None,
                 memory_bytes=max(0, usage - cache) if isinstance(usage, int) else None, at=at)


def observe_container(attrs: Mapping[str, Any] | None, *, name: str, engine_health: bool = True,
                      usage: Usage | None = None) -> Observation:
    """One inspect (None: no container has the name) as an ``Observation``; pure."""
    if attrs is None:
        # Not there yet (a unit with an image creates it at start) or gone: nothing ran that could fail;
        # a start that finds nothing to start is what fails.
        return Observation(run=None, live=False, state="stopped", error=f"no container named {name!r}")
    state = attrs.get("State") or {}
    started = state.get("StartedAt")
    started_at = parse_time(started)
    run = f"{str(attrs.get('Id', ''))[:12]}@{started}" if started_at is not None else None
    status = state.get("Status", "")
    pid = _int(state.get("Pid")) or None
    restarting = status == "restarting" or bool(state.get("Restarting"))
    if not restarting and (status in ("running", "paused") or state.get("Running")):
        paused = status == "paused" or bool(state.get("Paused"))
        return Observation(run=run, live=True, state="running", pid=pid, started_at=started_at,
                           detail="paused" if paused else "", probe=health_probe(attrs) if engine_health else None,
                           usage=usage)
    code, sig = split_exit(_int(state.get("ExitCode")))
    oom = bool(state.get("OOMKilled"))
    engine_error = str(state.get("Error") or "")[:MAX_ERROR_CHARS]
    error = "killed by the kernel's OOM killer (out of memory)" if oom else engine_error
    if run is None:
        return Observation(run=None, live=False, state="stopped", error=engine_error)  # created, never started
    return Observation(run=run, live=False, state="failed" if engine_error and not oom else "exited",
                       started_at=started_at, exit_code=code, exit_signal=sig,
                       reason="oom-killed" if oom else "", error=error, restarting=restarting)


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """What the agent creates a container from (``docker.image`` set): arguments of the low-level API."""

    image: str
    name: str
    command: list[str] | None
    environment: dict[str, str]
    labels: dict[str, str]
    user: str | None
    ports: list[str]
    host_config: dict[str, Any] = field(default_factory=dict)
    """Arguments of ``APIClient.create_host_config``."""


def container_spec(config: UnitConfig, docker: DockerConfig, node_id: str) -> ContainerSpec:
    """The container a unit with ``docker.image`` creates; pure (``docker.*`` keys checked by the config)."""
    if docker.image is None:
        raise UnitError(f"no container named {docker.container!r} (set docker.image to let the agent create it)")
    bindings: dict[str, tuple[str, int] | int] = {}
    for port, host in docker.ports.items():
        address, _, number = host.rpartition(":")
        key = port if "/" in port else f"{port}/tcp"
        bindings[key] = (address.strip("[]"), int(number)) if address else int(number)
    host_config: dict[str, Any] = {
        "port_bindings": bindings, "binds": list(docker.volumes),
        "ulimits": [{"name": name, "soft": soft, "hard": hard} for name, (soft, hard) in docker.ulimits.items()],
    }
    if docker.network is not None:
        host_config["network_mode"] = docker.network
    return ContainerSpec(
        image=docker.image, name=docker.container, command=list(config.command) or None,
        environment=dict(config.env), labels={**docker.labels, "selfheal.unit": config.name, "selfheal.node": node_id},
        user=docker.user, ports=list(bindings), host_config=host_config,
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class DockerUnit(ManagedUnit):
    """A ``docker`` unit; see the module docstring."""

    kind = "docker"

    def __init__(self, config: UnitConfig, ctx: UnitContext) -> None:
        if config.docker is None:
            raise UnitError(f"unit {config.name!r}: a docker unit needs [docker] with container = \"NAME\"")
        self.docker = config.docker
        super().__init__(config, ctx, poll=self.docker.poll)
        self.engine_health = config.probe is None
        self._client: DockerClient | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"docker-{config.name}")
        self._sample: Usage | None = None
        self._stats_due = 0.0

    async def look(self) -> Observation:
        now = self.ctx.clock.monotonic()
        want_stats = self.docker.stats_interval > 0 and now >= self._stats_due
        attrs, stats = await self._call(self._inspect, want_stats)
        if stats is not None:
            self._sample = usage_from_stats(stats, now)
            self._stats_due = now + self.docker.stats_interval
        if attrs is None or not (attrs.get("State") or {}).get("Running"):
            self._sample = None
        return observe_container(attrs, name=self.docker.container, engine_health=self.engine_health,
                                 usage=self._sample)

    async def act(self, action: Action, grace: float) -> None:
        await self._call(self._act, action, math.ceil(grace))

    def release(self) -> None:
        # After whatever call is still running: the client's connections close on the thread that used them.
        with suppress(RuntimeError):  # released already
            self._thread.submit(self._disconnect)
        self._thread.shutdown(wait=False)

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._guarded, fn, *args)
        except RuntimeError:  # the thread was let go: the agent is stopping
            raise UnitError("the agent is stopping") from None

    def _guarded(self, fn: Callable[..., T], *args: object) -> T:
        """Run one blocking SDK call on the unit's thread; whatever the engine answers becomes ``UnitError``."""
        try:
            import docker.errors  # noqa: PLC0415 - an optional extra, imported when a docker unit runs
            import requests  # noqa: PLC0415 - comes with the docker SDK
        except ImportError:
            raise UnitError(NO_SDK) from None
        try:
            return fn(*args)
        except docker.errors.APIError as exc:
            raise UnitError(f"the container engine refused: {_clip(exc.explanation or str(exc))}") from None
        except (docker.errors.DockerException, requests.RequestException) as exc:
            where = self.docker.url or "$DOCKER_HOST or the local socket"
            raise UnitError(f"cannot reach the container engine at {where}: {_clip(str(exc))}") from None
        except (KeyError, TypeError, ValueError) as exc:  # an answer not shaped as the API says: never fatal
            raise UnitError(f"unexpected answer from the container engine: {_clip(repr(exc))}") from None

    def _connect(self) -> DockerClient:
        if self._client is None:
            url = self.docker.url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
            if url.startswith("unix://") and not Path(url.removeprefix("unix://")).exists():
                raise UnitError(f"cannot reach the container engine at {url}: no such socket")
            self._client = self._open(None)
            try:
                # The engine's API version, asked without one (what the SDK's "auto" does, but a client
                # that fails here is closed rather than leaked half-built).
                version = str(self._client.api.version(api_version=False)["ApiVersion"])
            except BaseException:
                self._disconnect()
                raise
            self._client.close()
            self._client = self._open(version)
        return self._client

    def _open(self, version: str | None) -> DockerClient:
        import docker  # noqa: PLC0415 - an optional extra, imported when a docker unit runs
        from docker.constants import DEFAULT_DOCKER_API_VERSION  # noqa: PLC0415 - same

        timeout = math.ceil(self.docker.timeout)
        pinned = version or DEFAULT_DOCKER_API_VERSION  # no request until it is used
        if self.docker.url is not None:
            return docker.DockerClient(base_url=self.docker.url, version=pinned, timeout=timeout)
        return docker.from_env(version=pinned, timeout=timeout)

    def _inspect(self, want_stats: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        import docker.errors  # noqa: PLC0415 - see _guarded

        api = self._connect().api
        try:
            attrs: dict[str, Any] = api.inspect_container(self.docker.container)
        except docker.errors.NotFound:
            return None, None
        if not want_stats or not (attrs.get("State") or {}).get("Running"):
            return attrs, None
        stats: dict[str, Any] | None
        try:
            stats = api.stats(attrs["Id"], stream=False, one_shot=True)
        except docker.errors.InvalidVersion:  # engines before API 1.41 wait for a second sample
            stats = api.stats(attrs["Id"], stream=False)
        except docker.errors.APIError:
            stats = None  # gone since the inspect (a 404, or a 500 from Podman): the next look says so
        return attrs, stats

    def _act(self, action: Action, grace: int) -> None:
        api = self._connect().api
        attrs = self._find()
        if attrs is None and action != "stop":
            if self.docker.image is not None:
                self._create_and_start()
                return
            # Someone else creates it: a redeploy may be between removing it and creating it anew.
            attrs = self._find(wait=REAPPEAR_WAIT)
            if attrs is None:
                raise UnitError(f"no container named {self.docker.container!r} appeared within "
                                f"{REAPPEAR_WAIT:g}s (set docker.image to let the agent create it)")
            if (attrs.get("State") or {}).get("Running"):
                return  # a new container, just started: the fresh run a restart asks for
        if attrs is None:
            return
        cid = attrs["Id"]
        state = attrs.get("State") or {}
        if state.get("Paused") and action != "start":
            api.unpause(cid)  # the engines refuse to stop or restart a paused container
        if action == "stop":
            if state.get("Running"):
                api.stop(cid, timeout=grace)
        elif action == "restart":
            api.restart(cid, timeout=grace)
        elif state.get("Paused"):
            api.unpause(cid)
        elif not state.get("Running"):
            api.start(cid)

    def _find(self, wait: float = 0.0) -> dict[str, Any] | None:
        """The container's inspect, None when no container has the name (after ``wait`` seconds of looking)."""
        import docker.errors  # noqa: PLC0415 - see _guarded

        api = self._connect().api
        deadline = time.monotonic() + wait
        while True:
            try:
                attrs = dict(api.inspect_container(self.docker.container))
            except docker.errors.NotFound:
                attrs = None
            if attrs is not None and (attrs.get("State") or {}).get("Status") not in ("removing", "dead"):
                return attrs  # (one being removed is as good as gone: acting on it races its removal)
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.docker.poll)

    def _create_and_start(self) -> None:
        import docker.errors  # noqa: PLC0415 - see _guarded

        spec = container_spec(self.config, self.docker, self.ctx.node_id)
        api = self._connect().api

        def create() -> str:
            created = api.create_container(
                spec.image, command=spec.command, name=spec.name, environment=spec.environment,
                labels=spec.labels, user=spec.user, ports=spec.ports or None,
                host_config=api.create_host_config(**spec.host_config))
            return str(created["Id"])

        try:
            cid = create()
        except docker.errors.ImageNotFound:
            self.log.info("unit.pulling_image", image=spec.image)
            api.pull(spec.image)
            cid = create()
        self.log.info("unit.container_created", container=spec.name, id=cid[:12], image=spec.image)
        api.start(cid)


def _clip(text: str) -> str:
    return text.strip()[:MAX_ERROR_CHARS]
