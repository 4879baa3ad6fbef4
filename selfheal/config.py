"""The one typed configuration object, loaded at the edge and passed down.

One TOML file per process (``--config PATH``), overridable by environment
variables ``SELFHEAL_<SECTION>__<KEY>`` (double underscore between levels,
e.g. ``SELFHEAL_MQTT__URL=embedded``; values are parsed as TOML values when
they parse, else taken as strings). Every struct is frozen and rejects unknown
keys, so a typo is an error that names its key path, not a silently ignored
setting. Durations are seconds (floats).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from selfheal.errors import ConfigError

DEFAULT_PATH = Path("/etc/selfheal/selfheal.toml")
ENV_PREFIX = "SELFHEAL_"
NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class MqttConfig(_Section, frozen=True, kw_only=True):
    url: str = "mqtt://127.0.0.1:1883"
    """``mqtt://host:port`` of the broker, or ``embedded`` (the controller runs amqtt in-process)."""
    keepalive: float = 10.0
    """Seconds between MQTT keep-alives; the broker publishes a last will after 1.5x this."""
    reconnect_max: float = 5.0
    """Upper bound, seconds, of the backoff between reconnect attempts."""
    embedded_listen: str = "127.0.0.1:1883"
    """Where the embedded broker listens when ``url = "embedded"``."""

    def host_port(self) -> tuple[str, int]:
        """The broker address clients connect to."""
        if self.url == "embedded":
            return split_host_port(self.embedded_listen, what="mqtt.embedded_listen")
        if not self.url.startswith("mqtt://"):
            raise ConfigError("must be mqtt://HOST:PORT or 'embedded'", path="mqtt.url")
        return split_host_port(self.url.removeprefix("mqtt://").rstrip("/"), what="mqtt.url")


class ProbeConfig(_Section, frozen=True, kw_only=True):
    kind: Literal["http", "tcp", "exec"]
    """``http``: GET ``target`` expects 2xx/3xx; ``tcp``: connect to ``host:port``; ``exec``: argv exits 0."""
    target: str | list[str]
    """URL (http), ``host:port`` (tcp) or an argv list (exec)."""
    interval: float = 1.0
    """Seconds between probes."""
    timeout: float = 0.5
    """Seconds before a probe counts as failed."""
    failures: int = 3
    """Consecutive failures before the unit is reported unhealthy."""
    start_period: float = 2.0
    """Seconds after a (re)start during which failures are not counted."""


class UnitConfig(_Section, frozen=True, kw_only=True):
    name: str
    """Unit name, unique on the node."""
    kind: Literal["process", "systemd", "docker", "spark"] = "process"
    """How the unit is started and watched; this release implements ``process``."""
    command: list[str] = msgspec.field(default_factory=list)
    """argv of the process (kind ``process``)."""
    env: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra environment variables for the unit."""
    cwd: str | None = None
    """Working directory; default the agent's state dir."""
    stop_grace: float = 5.0
    """Seconds between SIGTERM and SIGKILL when stopping."""
    autostart: bool = True
    """Start with the agent. ``false`` keeps a standby copy: stopped until a migration starts it here."""
    probe: ProbeConfig | None = None
    """Health probe; without one, "running" is healthy."""


class DatasetConfig(_Section, frozen=True, kw_only=True):
    name: str
    path: str


class AgentConfig(_Section, frozen=True, kw_only=True):
    node_id: str = ""
    """This node's id, ``[a-z0-9][a-z0-9-]{0,62}``; required to run an agent."""
    interval: float = 1.0
    """Seconds between reports."""
    state_dir: str = "/var/lib/selfheal-agent"
    """Session counter, command ledger and unit logs live here."""
    listen: str = "0.0.0.0:8731"
    """The agent's own HTTP address (peers, /metrics); port 0 picks a free port."""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    """Node labels announced to the controller (``group`` groups nodes for the disruption budget)."""
    units: list[UnitConfig] = msgspec.field(default_factory=list)
    datasets: list[DatasetConfig] = msgspec.field(default_factory=list)


class NotifyConfig(_Section, frozen=True, kw_only=True):
    kind: Literal["slack", "mattermost", "teams", "discord", "googlechat", "alertmanager"]
    url: str
    """Webhook URL: a secret, never logged or returned by the API."""


class BudgetConfig(_Section, frozen=True, kw_only=True):
    max_concurrent: int = 5
    """Disruptive plans (restart, stop, migrate, resync) running at once, fleet-wide."""
    max_node_share: float = 0.34
    """Share of a group's nodes under remediation at once; at least one node is always allowed."""
    max_replica_share: float = 0.5
    """Share of a unit's replicas (same unit name on several nodes) under remediation at once; at least one."""
    group_label: str = "group"
    """Node label (``agent.labels``) that groups nodes for ``max_node_share``."""


class ControllerConfig(_Section, frozen=True, kw_only=True):
    listen: str = "127.0.0.1:8080"
    """HTTP API and status page address; port 0 picks a free port."""
    state_dir: str = "/var/lib/selfheal"
    """SQLite database (WAL) lives here."""
    rulebooks: list[str] = msgspec.field(default_factory=list)
    """Extra rulebook YAML files; the built-in default rulebook is used when empty."""
    offline_after: float = 5.0
    """Seconds without a report before a node that still says online is treated as offline."""
    command_ttl: float = 15.0
    """Seconds a command stays valid; agents reject it after that."""
    ack_timeout: float = 10.0
    """Seconds to wait for an agent's ack before the step counts as failed."""
    history: int = 120
    """Reports kept per node (bounded history for detectors and the API)."""
    max_nodes: int = 10000
    """Nodes tracked at most; the longest-unseen offline node is evicted beyond it."""
    notify: list[NotifyConfig] = msgspec.field(default_factory=list)
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    """The fleet disruption budget."""
    public_url: str = ""
    """Base URL of the status page as people reach it, for links in notifications (default: the listen address)."""


class SecurityConfig(_Section, frozen=True, kw_only=True):
    key_dir: str = "/etc/selfheal/keys"
    """``<node_id>.key`` files holding hex HMAC keys that sign commands to that node."""
    api_token_file: str = "/etc/selfheal/api.token"  # noqa: S105 - a path, not a secret
    """Bearer token for mutating API endpoints."""


class LogConfig(_Section, frozen=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: key=value on a terminal, JSON otherwise."""


class Config(_Section, frozen=True, kw_only=True):
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    controller: ControllerConfig = msgspec.field(default_factory=ControllerConfig)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)


def split_host_port(value: str, *, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{value!r} is not HOST:PORT", path=what)
    return host.strip("[]") or "127.0.0.1", int(port)


def load_config(path: Path | str | None = None, *, env: Mapping[str, str] | None = None,
                role: Literal["agent", "controller", "any"] = "any") -> Config:
    """Read, merge and validate a config; raises ``ConfigError`` naming the key path."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("file not found", source=source) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", source=source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", source=source) from None
    _apply_env(raw, os.environ if env is None else env)
    try:
        config = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        path = where.rstrip("`").lstrip(".")
        unknown = _UNKNOWN_FIELD.match(message)
        if unknown:  # name the offending key itself, not just the table holding it
            path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            message = "unknown key"
        raise ConfigError(message, source=source, path=path) from None
    try:
        _check(config, source, role)
    except ConfigError as exc:
        if exc.source:
            raise
        raise ConfigError(str(exc).split(": ", 1)[-1] if exc.path else str(exc), source=source,
                          path=exc.path) from None
    return config


_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `([^`]*)`$")


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = name.removeprefix(ENV_PREFIX).lower().split("__")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot override a non-table with {name}", path=".".join(keys))
        try:
            node[keys[-1]] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            node[keys[-1]] = value


def _check(config: Config, source: str, role: str) -> None:
    def fail(message: str, path: str) -> None:
        raise ConfigError(message, source=source, path=path)

    config.mqtt.host_port()
    split_host_port(config.controller.listen, what="controller.listen")
    split_host_port(config.agent.listen, what="agent.listen")
    for name in ("keepalive", "reconnect_max"):
        if getattr(config.mqtt, name) <= 0:
            fail("must be > 0", f"mqtt.{name}")
    for name in ("offline_after", "command_ttl", "ack_timeout"):
        if getattr(config.controller, name) <= 0:
            fail("must be > 0", f"controller.{name}")
    if config.controller.history < 1 or config.controller.max_nodes < 1:
        fail("must be >= 1", "controller.history")
    budget = config.controller.budget
    if budget.max_concurrent < 1:
        fail("must be >= 1", "controller.budget.max_concurrent")
    for name in ("max_node_share", "max_replica_share"):
        if not 0 < getattr(budget, name) <= 1:
            fail("must be in (0, 1]", f"controller.budget.{name}")
    agent = config.agent
    if role == "agent" and not agent.node_id:
        fail("required to run an agent", "agent.node_id")
    if agent.node_id and not NODE_ID_RE.match(agent.node_id):
        fail(f"{agent.node_id!r} must match [a-z0-9][a-z0-9-]{{0,62}}", "agent.node_id")
    if agent.interval <= 0:
        fail("must be > 0", "agent.interval")
    seen: set[str] = set()
    for i, unit in enumerate(agent.units):
        at = f"agent.units[{i}]"
        if not NODE_ID_RE.match(unit.name):
            fail(f"{unit.name!r} must match [a-z0-9][a-z0-9-]{{0,62}}", f"{at}.name")
        if unit.name in seen:
            fail(f"duplicate unit name {unit.name!r}", f"{at}.name")
        seen.add(unit.name)
        if unit.kind != "process":
            fail(f"unit kind {unit.kind!r} is not available in this release (only 'process')", f"{at}.kind")
        if not unit.command:
            fail("a process unit needs a non-empty command", f"{at}.command")
        if unit.stop_grace < 0:
            fail("must be >= 0", f"{at}.stop_grace")
        probe = unit.probe
        if probe is None:
            continue
        if probe.interval <= 0 or probe.timeout <= 0 or probe.failures < 1:
            fail("interval and timeout must be > 0, failures >= 1", f"{at}.probe")
        if probe.kind == "exec" and not (isinstance(probe.target, list) and probe.target):
            fail("an exec probe's target is a non-empty argv list", f"{at}.probe.target")
        if probe.kind != "exec" and not isinstance(probe.target, str):
            fail(f"a {probe.kind} probe's target is a string", f"{at}.probe.target")
        if probe.kind == "http" and not str(probe.target).startswith(("http://", "https://")):
            fail("an http probe's target is an http:// or https:// URL", f"{at}.probe.target")
        if probe.kind == "tcp":
            split_host_port(str(probe.target), what=f"{at}.probe.target")


def render_defaults() -> str:
    """The defaults as TOML-ish text, for ``selfheal config check --defaults``."""
    return msgspec.json.format(msgspec.json.encode(Config()).decode(), indent=2)
