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
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from selfheal.config_checks import check_config, split_host_port
from selfheal.errors import ConfigError

DEFAULT_PATH = Path("/etc/selfheal/selfheal.toml")
ENV_PREFIX = "SELFHEAL_"


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class MqttConfig(_Section, frozen=True, kw_only=True):
    url: str = "mqtt://127.0.0.1:1883"
    """``mqtt://host:port`` of the broker, ``mqtts://host:port`` for TLS, or ``embedded`` (the controller
    runs amqtt in-process)."""
    username: str = ""
    """This process's broker identity: the node id for an agent, ``controller`` for the controller;
    empty: connect without credentials (a broker that allows anonymous clients)."""
    password_file: str | None = None
    """File holding this identity's broker password (``selfheal broker init`` writes
    ``credentials/<user>.password``); required with ``username``. A secret: never logged."""
    tls_ca: str | None = None
    """PEM file of the CA that signed the broker's certificate (``mqtts://``); unset: the system's CAs."""
    tls_cert: str | None = None
    """PEM client certificate, for brokers that require one (with ``tls_key``)."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    tls_insecure: bool = False
    """Skip the check that the broker's certificate names its host (the chain is still verified).
    For test setups only."""
    embedded_password_file: str | None = None
    """``url = "embedded"``: a Mosquitto-format password file (``selfheal broker init`` writes
    ``passwords``); with it the embedded broker refuses anonymous clients and lets each node publish
    only its own topics. Unset: anonymous, for a single host only."""
    keepalive: float = 10.0
    """Seconds between MQTT keep-alives; the broker publishes a last will after 1.5x this."""
    reconnect_max: float = 2.0
    """Upper bound, seconds, of the wait between reconnect attempts: a client is back within it of its broker
    answering again."""
    embedded_listen: str = "127.0.0.1:1883"
    """Where the embedded broker listens when ``url = "embedded"``."""

    def host_port(self) -> tuple[str, int]:
        """The broker address clients connect to."""
        if self.url == "embedded":
            return split_host_port(self.embedded_listen, what="mqtt.embedded_listen")
        for scheme in ("mqtt://", "mqtts://"):
            if self.url.startswith(scheme):
                return split_host_port(self.url.removeprefix(scheme).rstrip("/"), what="mqtt.url")
        raise ConfigError("must be mqtt://HOST:PORT, mqtts://HOST:PORT or 'embedded'", path="mqtt.url")

    @property
    def tls(self) -> bool:
        """Whether clients speak TLS to the broker (``mqtts://``)."""
        return self.url.startswith("mqtts://")

    def __repr__(self) -> str:  # only paths here, but keep the shape of a config that holds secrets
        return f"MqttConfig(url={self.url!r}, username={self.username!r}, tls={self.tls})"


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


class SparkConfig(_Section, frozen=True, kw_only=True):
    """How a ``spark`` unit runs its application (``[agent.units.spark]``)."""

    master: str = "local[*]"
    """Spark master URL: ``local[*]``, ``local[N,F]`` (F task attempts), ``spark://host:port``, ``yarn``,
    ``k8s://...``; the driver runs on this node (client deploy mode)."""
    application: str | None = None
    """A ``.py`` or ``.jar`` file submitted with ``spark-submit``. Unset: ``command`` is the driver
    program itself (e.g. ``python -m workloads.etl``), given the master through ``PYSPARK_SUBMIT_ARGS``."""
    args: list[str] = msgspec.field(default_factory=list)
    """Arguments of ``application``."""
    conf: dict[str, str] = msgspec.field(default_factory=dict)
    """Spark properties (``--conf k=v``), e.g. ``spark.task.maxFailures``; Spark's own retries are its own."""
    home: str | None = None
    """SPARK_HOME holding ``bin/spark-submit``; default: the pyspark package of the agent's environment."""
    ui_port: int = 0
    """Port of the driver's UI, whose REST API (``/api/v1``) the agent reads for the application's jobs and
    task failures; 0 picks a free port at each start. ``spark.ui.enabled = "false"`` in ``conf`` turns the
    tracking off (the process and its progress file remain)."""


class DockerConfig(_Section, frozen=True, kw_only=True):
    """Which container a ``docker`` unit is (``[agent.units.docker]``), and how to create it if asked to."""

    container: str
    """Container name. The agent follows the name: a container its orchestrator removed and recreated under
    the same name (a new id) is the same unit."""
    image: str | None = None
    """Unset: the container is someone else's to create (compose, an orchestrator); the agent starts, stops
    and restarts it. Set: when no container has the name, the agent creates it from this image, with the
    unit's ``command`` (the image's command when empty), ``env`` and the options below."""
    url: str | None = None
    """The engine's API: ``unix:///var/run/docker.sock``, or a socket proxy's ``tcp://127.0.0.1:2375``
    (recommended: access to the Docker API is root-equivalent). Default: ``$DOCKER_HOST``, else the
    local socket."""
    poll: float = 0.5
    """Seconds between looks at the container (state, health, pid): how soon an exit is noticed."""
    stats_interval: float = 5.0
    """Seconds between reads of the container's CPU and memory use (0: not read)."""
    timeout: float = 30.0
    """Seconds one API call may take (a stop may take ``stop_grace`` on top)."""
    network: str | None = None
    """With ``image``: network mode of a created container (``host``, ``bridge``, a network's name)."""
    ports: dict[str, str] = msgspec.field(default_factory=dict)
    """With ``image``: container port (``80/tcp``) → host ``PORT`` or ``IP:PORT``."""
    volumes: list[str] = msgspec.field(default_factory=list)
    """With ``image``: bind mounts, ``/host/path:/container/path[:ro]``."""
    ulimits: dict[str, list[int]] = msgspec.field(default_factory=dict)
    """With ``image``: resource limits, name → ``[soft, hard]`` (``nofile = [1024, 1024]``)."""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    """With ``image``: labels of a created container (the agent adds ``selfheal.unit``)."""
    user: str | None = None
    """With ``image``: ``user[:group]`` the container runs as."""


class SystemdConfig(_Section, frozen=True, kw_only=True):
    """Which systemd service a ``systemd`` unit is (``[agent.units.systemd]``)."""

    unit: str
    """The service, e.g. ``predict.service`` (``.service`` is added to a bare name). The agent's polkit
    rule must let its user start, stop and restart exactly the services listed here."""
    poll: float = 0.5
    """Seconds between ``systemctl show`` looks: how soon an exit is noticed."""
    job_timeout: float = 8.0
    """Seconds to wait for a start, stop or restart job. A slower job goes on in systemd, the command is
    answered, and the looks report how it ends (keep it under ``controller.ack_timeout``)."""
    systemctl: str = "systemctl"
    """The ``systemctl`` to run (a name on PATH or an absolute path)."""


DEFAULT_START_TIMEOUT = 600.0
"""Seconds a unit with ``stall_after`` may take from its start to its first progress when ``start_timeout``
is unset: generous, because restarting a job that is only slow to start (a JVM on a busy host) makes it
slower still."""


class UnitConfig(_Section, frozen=True, kw_only=True):
    name: str
    """Unit name, unique on the node."""
    kind: Literal["process", "systemd", "docker", "spark"] = "process"
    """How the unit is started and watched: a child process of the agent, a systemd service, a container,
    a Spark application."""
    command: list[str] = msgspec.field(default_factory=list)
    """argv of the process (kind ``process``; kind ``spark`` without ``spark.application``: the driver;
    kind ``docker`` with ``docker.image``: the command of a container the agent creates)."""
    env: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra environment variables for the unit (kind ``docker``: of a container the agent creates)."""
    cwd: str | None = None
    """Working directory; default the agent's state dir (kinds ``process`` and ``spark``)."""
    stop_grace: float = 5.0
    """Seconds between SIGTERM and SIGKILL when stopping (kind ``systemd``: the service's own
    ``TimeoutStopSec=`` applies instead)."""
    autostart: bool = True
    """Start with the agent. ``false`` keeps a standby copy: stopped until a migration starts it here."""
    probe: ProbeConfig | None = None
    """Health probe; without one, "running" is healthy."""
    every: float | None = None
    """Seconds between runs of a batch job (unset: a long-running service). A run that exits 0 is
    ``completed`` and the next one starts ``every`` seconds after the previous run started (a run still
    going then is never doubled); a run that fails waits for the controller, like a crashed service."""
    progress_file: str | None = None
    """JSON file the workload keeps its progress in (``{"done", "total", "stage", "updated_at"}``);
    relative to ``cwd``. Passed to the unit as ``$SELFHEAL_PROGRESS_FILE``; reported as ``progress``."""
    stall_after: float | None = None
    """Seconds without progress while the process is alive before the unit is ``unit_stalled``, counted from
    the run's first progress (before it, ``start_timeout`` applies: a slow start is not a stall); needs
    ``progress_file`` (or kind ``spark``, whose completed tasks count as progress)."""
    start_timeout: float | None = None
    """Seconds from a run's start to its first progress, while the process is alive, before the unit is
    ``unit_start_timeout``; needs ``progress_file`` (or kind ``spark``). Unset: ``DEFAULT_START_TIMEOUT``,
    or ``stall_after`` if longer, for a unit with ``stall_after``; no limit for one without."""
    spark: SparkConfig | None = None
    """Kind ``spark`` only: master, application, Spark properties."""
    docker: DockerConfig | None = None
    """Kind ``docker`` only (required): the container, and how to create it."""
    systemd: SystemdConfig | None = None
    """Kind ``systemd`` only (required): the service."""
    user: str | None = None
    """Kind ``process`` (and ``spark`` without an application): run the unit as this user (a name or a
    uid; its primary group too); needs an agent running as root. Unset: the agent's own user."""
    stop_after_disconnect: float | None = None
    """Make this a movable singleton (kinds ``process`` and ``spark``): the agent stops it after this many
    seconds without the broker, and it dies with the agent, so the controller may start its standby copy
    on another node once this node has been unreachable long enough (README: Placement and migration)."""

    @property
    def start_limit(self) -> float | None:
        """The ``start_timeout`` in force (see its doc): what the agent reports and the controller applies."""
        if self.start_timeout is not None or self.stall_after is None:
            return self.start_timeout
        return max(DEFAULT_START_TIMEOUT, self.stall_after)


class DatasetConfig(_Section, frozen=True, kw_only=True):
    """A dataset this node holds a replica of (``[[agent.datasets]]``); at most 200 per agent."""

    name: str
    """Dataset name, ``[a-z0-9][a-z0-9-]{0,62}``: the same on every node holding a replica."""
    path: str
    """Absolute path of this node's replica (a directory)."""
    include: list[str] = msgspec.field(default_factory=list)
    """Globs of files to digest, relative to ``path`` (``*`` stays within a directory, ``**`` spans
    directories; a pattern without ``/`` matches a file's name at any depth); empty: every file."""
    exclude: list[str] = msgspec.field(default_factory=list)
    """Globs of files and directories to leave out (same syntax); an excluded directory is not entered."""
    scan_interval: float = 60.0
    """Seconds between incremental scans (unchanged files, by size, mtime and inode, are not re-read)."""
    deep_scan_interval: float = 86400.0
    """Seconds between deep scans, which re-read every file to catch bit rot."""
    read_bandwidth: int = 0
    """Bytes per second the digester (and chunk serving) may read from this dataset; 0: unlimited."""
    chunk_size: int = 4 * 1024 * 1024
    """Bytes per chunk: the unit of hashing, localisation and transfer (4 KiB .. 64 MiB); equal on all
    replicas, or their digests never match."""
    manifest: str | None = None
    """Path of a manifest file holding the published root digest (``blake3:<hex>``): the authority
    when present. Relative paths are taken from ``path``; a manifest inside the dataset is not digested."""


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
    tls_cert: str | None = None
    """PEM certificate the agent's HTTP (dataset chunks for peers) serves HTTPS with (with ``tls_key``);
    unset: plain HTTP. Peers and the controller verify it against ``security.peer_tls_ca``."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    units: list[UnitConfig] = msgspec.field(default_factory=list)
    datasets: list[DatasetConfig] = msgspec.field(default_factory=list)
    fallback: bool = True
    """Restart crashed or hung units here when no controller has been heard for ``fallback_after`` (restarts
    only, with backoff; reported to the controller when it is back). ``false``: units stay down until a
    controller acts."""
    fallback_after: float | None = None
    """Seconds without a controller before the agent acts on its own. Unset: 1.5 times ``mqtt.keepalive`` (when
    the broker gives up on a silent controller) plus three ``interval``s (``agent.fallback.fallback_delay``)."""
    fallback_max_restarts: int = 5
    """Local restarts of one unit within ``fallback_window`` before the agent gives up on it (until a
    controller is back). Between them it waits 2, 4, 8 ... up to 60 seconds."""
    fallback_window: float = 600.0
    """Seconds over which ``fallback_max_restarts`` counts."""


class NotifyConfig(_Section, frozen=True, kw_only=True):
    """One chat destination (``[[controller.notify]]``); grouping and timing follow Alertmanager."""

    kind: Literal["slack", "mattermost", "teams", "discord", "googlechat", "alertmanager"]
    """Payload format: Slack blocks, Mattermost attachments, a Teams Workflows Adaptive Card, Discord
    embeds, Google Chat cardsV2, or Alertmanager's webhook JSON (version 4) for any existing receiver."""
    url: str
    """Webhook URL: a secret, never logged or returned by the API (logs show ``https://host/…``)."""
    name: str = ""
    """Name in logs, audit trail and the Alertmanager ``receiver`` field; default ``<kind>-<index>``."""
    matchers: dict[str, str] = msgspec.field(default_factory=dict)
    """Label → glob; all must match for an incident to be sent here. Labels: ``kind``, ``node``,
    ``unit``, ``severity``, ``rule`` and the node's own labels (``group``...). Empty: everything."""
    group_by: list[str] = msgspec.field(default_factory=lambda: ["kind", "node"])
    """Labels whose values make a group: one message covers every incident of a group."""
    group_wait: float = 5.0
    """Seconds a new group waits for more incidents before its first message."""
    group_interval: float = 60.0
    """Seconds between messages about changes to the same group."""
    repeat_interval: float = 14400.0
    """Seconds before a group with unresolved incidents and no change is sent again (4 h)."""
    rate: float = 20.0
    """Messages per minute to this destination (token bucket refill)."""
    burst: int = 5
    """Messages that may go out at once before ``rate`` applies."""
    timeout: float = 10.0
    """Seconds per HTTP attempt; a timeout is retried."""

    def __repr__(self) -> str:  # the URL is a secret: never in a repr, a log line or an error
        scheme, _, rest = self.url.partition("://")
        return f"NotifyConfig(kind={self.kind!r}, name={self.name!r}, url='{scheme}://{rest.split('/')[0]}/…')"


class BudgetConfig(_Section, frozen=True, kw_only=True):
    max_concurrent: int = 5
    """Disruptive plans (restart, stop, migrate, resync) running at once, fleet-wide."""
    max_node_share: float = 0.34
    """Share of a group's nodes under remediation at once; at least one node is always allowed."""
    max_replica_share: float = 0.5
    """Share of a unit's replicas (same unit name on several nodes) under remediation at once; at least one."""
    group_label: str = "group"
    """Node label (``agent.labels``) that groups nodes for ``max_node_share``."""


class PromQLConfig(_Section, frozen=True, kw_only=True):
    """A PromQL finding source (``[[controller.promql]]``; needs the ``promquery`` extra)."""

    name: str
    """Names the finding's ``alertname`` label and the entry in metrics and logs."""
    url: str
    """The Prometheus server, e.g. ``http://prometheus:9090``."""
    query: str
    """An instant PromQL query; each result series is checked against ``above``."""
    interval: float = 30.0
    """Seconds between evaluations; results older than 3 intervals (Prometheus unreachable) expire."""
    timeout: float = 10.0
    """Seconds one query may take."""
    for_node: str = "instance"
    """Series label naming the node (an ``instance`` label's ``:port`` is stripped)."""
    for_unit: str = ""
    """Series label naming the unit; empty: node-level findings."""
    severity: Literal["info", "warning", "critical"] = "warning"
    above: float = 0.0
    """A series is a finding while its value is above this."""


class AlertsInConfig(_Section, frozen=True, kw_only=True):
    """Inbound alerts (``POST /api/v1/alerts``, Alertmanager's webhook format)."""

    ttl: float = 28800.0
    """Seconds a firing alert holds without being re-sent (default: twice Alertmanager's 4 h repeat_interval)."""
    max_alerts: int = 10000
    """External alerts held at most; the ones closest to expiry are dropped first."""


def default_controller_id() -> str:
    """``<host name>-<pid>``: unique among controllers that run at the same time, new at every start."""
    return f"{socket.gethostname()[:48]}-{os.getpid()}"


class ControllerConfig(_Section, frozen=True, kw_only=True):
    id: str = msgspec.field(default_factory=default_controller_id)
    """This controller's name among those sharing one PostgreSQL store (``[store] url``): its membership
    row and the owner named on its bucket leases (``controller.leases``). Must differ between controllers
    running at the same time; default: host name and process id."""
    lease_ttl: float = 6.0
    """Seconds a bucket lease lasts by the database's clock (several controllers on PostgreSQL): a controller
    that stops renewing loses its buckets to the others this long after its last renewal."""
    lease_renew: float = 2.0
    """Seconds between lease renewals; a controller stops acting on a bucket ``lease_renew`` before its
    lease could run out, so ``lease_ttl`` must exceed twice this."""
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
    node_state_bytes: int = 262144
    """Bytes of report history kept per node at most (what detectors read, not whole reports); the
    oldest samples go first. Bounds the controller's memory against a flood of reports."""
    fence_floor: float = 20.0
    """Seconds a silent node must have been unheard before the standby copy of a movable unit starts
    elsewhere, whatever the node's reports promised: a report may lengthen this wait, never shorten it."""
    max_nodes: int = 10000
    """Nodes tracked at most; the longest-unseen offline node is evicted beyond it."""
    notify: list[NotifyConfig] = msgspec.field(default_factory=list)
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    """The fleet disruption budget."""
    public_url: str = ""
    """Base URL of the status page as people reach it, for links in notifications (default: the listen address)."""
    peer_url: str = ""
    """Base URL other controllers reach this one's API at (several controllers on PostgreSQL: they ask each
    other for their part of the fleet view and forward approvals to a plan's owner). Default: ``public_url``,
    else ``http://`` the listen address with its bound port (a wildcard host replaced by the host name)."""
    promql: list[PromQLConfig] = msgspec.field(default_factory=list)
    """PromQL finding sources."""
    alerts: AlertsInConfig = msgspec.field(default_factory=AlertsInConfig)


class SecurityConfig(_Section, frozen=True, kw_only=True):
    key_dir: str = "/etc/selfheal/keys"
    """``<node_id>.key`` files holding hex HMAC keys that sign commands to that node and everything the node
    sends. Once the controller's directory holds any key, it drops node traffic not signed with its node's
    key (a node without a file is listed as unknown); with none, node traffic is unauthenticated."""
    api_token_file: str = "/etc/selfheal/api.token"  # noqa: S105 - a path, not a secret
    """Bearer token for mutating API endpoints."""
    api_read_token_file: str | None = None
    """Optional bearer token for reads (``/api/v1/*``, the pages, ``/metrics``); the mutating token is
    accepted for reads too. Unset: reads are open (``/healthz`` and ``/readyz`` always are)."""
    peer_tls_ca: str | None = None
    """PEM CA that signed the agents' HTTPS certificates (``agent.tls_cert``): the controller and pulling
    agents verify peers against it. Unset: the system's CAs (only used for ``https://`` peers)."""


class LogConfig(_Section, frozen=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: key=value on a terminal, JSON otherwise."""


class StoreConfig(_Section, frozen=True, kw_only=True):
    """Where the controller keeps its state (``[store]``)."""

    url: str = ""
    """``postgresql://user@host:port/database``: a PostgreSQL store that several controllers share (needs
    the ``postgres`` extra). Empty: SQLite in ``controller.state_dir``, for one controller. May hold a
    password: it is never logged or shown (libpq's ``~/.pgpass`` and ``PG*`` variables work too)."""


class Config(_Section, frozen=True, kw_only=True):
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    controller: ControllerConfig = msgspec.field(default_factory=ControllerConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)


def load_config(path: Path | str | None = None, *, env: Mapping[str, str] | None = None,
                role: Literal["agent", "controller", "any", "client"] = "any") -> Config:
    """Read, merge and validate a config; raises ``ConfigError`` naming the key path.

    ``role="client"``: for commands that only read addresses from it (``selfheal status``...): the files
    the daemons need (broker password, TLS keys) are not opened."""
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
        check_config(config, source, role)
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
