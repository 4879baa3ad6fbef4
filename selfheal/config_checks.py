"""Validation of a loaded configuration: every rule its types cannot express.

``selfheal.config`` parses and types the file; ``check_config`` then checks
what a type cannot (ranges, names, combinations of keys, each unit kind's own
table). Each failure raises ``ConfigError`` naming the key path, e.g.
``agent.units[2].docker.ports``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from selfheal import wire
from selfheal.errors import ConfigError

if TYPE_CHECKING:
    from selfheal.config import AgentConfig, Config, ControllerConfig, NotifyConfig, UnitConfig

NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CONTROLLER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def split_host_port(value: str, *, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{value!r} is not HOST:PORT", path=what)
    return host.strip("[]") or "127.0.0.1", int(port)


def check_config(config: Config, source: str, role: str) -> None:
    """Every rule of ``config`` that its types cannot express; ``ConfigError`` names the key path."""
    _check_core(config, source, role)
    _check_identities(config, source, files=role != "client")
    _check_notify(config.controller.notify, source)
    _check_promql(config.controller, source)
    _check_store(config.store.url, source)


def _check_leases(config: Config, fail: Callable[[str, str], None]) -> None:
    controller = config.controller
    if controller.lease_renew <= 0:
        fail("must be > 0", "controller.lease_renew")
    if controller.lease_ttl <= 2 * controller.lease_renew:
        fail(f"must exceed twice controller.lease_renew ({controller.lease_renew:g} s): a controller stops "
             "acting lease_renew before its lease could run out, and must still renew in between",
             "controller.lease_ttl")
    if not CONTROLLER_ID_RE.match(controller.id):
        fail(f"{controller.id!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,62}} (it is an MQTT topic level)",
             "controller.id")


def _check_core(config: Config, source: str, role: str) -> None:
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
    if config.controller.node_state_bytes < 4096:
        fail("must be >= 4096 bytes", "controller.node_state_bytes")
    if config.controller.fence_floor < 0:
        fail("must be >= 0 seconds", "controller.fence_floor")
    _check_leases(config, fail)
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
    _check_fallback(agent, fail)
    _check_wire_caps(agent, fail)
    seen: set[str] = set()
    for i, unit in enumerate(agent.units):
        at = f"agent.units[{i}]"
        _check_name(unit.name, NODE_ID_RE, seen, "unit", f"{at}.name", fail=fail)
        _check_unit(unit, at, fail)
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
    _check_datasets(agent, fail)


def _check_fallback(agent: AgentConfig, fail: Callable[[str, str], None]) -> None:
    """The agent-local fallback's settings (``agent.fallback``)."""
    if agent.fallback_after is not None and agent.fallback_after <= 0:
        fail("must be > 0 seconds (leave it out for the default; fallback = false turns it off)",
             "agent.fallback_after")
    if agent.fallback_max_restarts < 1:
        fail("must be >= 1 (fallback = false turns local restarts off)", "agent.fallback_max_restarts")
    if agent.fallback_window <= 0:
        fail("must be > 0 seconds", "agent.fallback_window")


def _check_wire_caps(agent: AgentConfig, fail: Callable[[str, str], None]) -> None:
    """What the controller's decoder caps (``wire.MAX_UNITS``...): an agent beyond would have its reports refused."""
    if len(agent.units) > wire.MAX_UNITS:
        fail(f"at most {wire.MAX_UNITS} units per agent (the controller refuses longer reports)", "agent.units")
    if len(agent.labels) > wire.MAX_LABELS:
        fail(f"at most {wire.MAX_LABELS} labels per agent", "agent.labels")
    for key, value in agent.labels.items():
        if not 0 < len(key) <= 64 or len(value) > 256:
            fail(f"label {key[:64]!r}: names are 1-64 characters, values at most 256", "agent.labels")


def _check_name(name: str, pattern: re.Pattern[str], seen: set[str], what: str, at: str,
                *, fail: Callable[[str, str], None]) -> None:
    """``name`` matches ``pattern`` and is not in ``seen`` (then it is)."""
    if not pattern.match(name):
        fail(f"{name!r} must match {pattern.pattern.removeprefix('^').removesuffix('$')}", at)
    if name in seen:
        fail(f"duplicate {what} name {name!r}", at)
    seen.add(name)


UNIT_KINDS = ("process", "spark", "docker", "systemd")
"""Unit kinds this release implements."""


def _check_unit(unit: UnitConfig, at: str, fail: Callable[[str, str], None]) -> None:
    """One unit's kind-specific keys, schedule and progress (the probe is checked by ``_check_core``)."""
    if unit.kind not in UNIT_KINDS:
        fail(f"unit kind {unit.kind!r} is not available in this release (only {', '.join(map(repr, UNIT_KINDS))})",
             f"{at}.kind")
    spark = unit.spark
    if unit.kind == "process" and not unit.command:
        fail("a process unit needs a non-empty command", f"{at}.command")
    _check_kind_tables(unit, at, fail)
    if unit.kind == "spark":
        application = spark.application if spark is not None else None
        if bool(application) == bool(unit.command):
            fail("a spark unit needs either spark.application (spark-submit) or command (the driver), "
                 "not both", f"{at}.command")
        if spark is not None:
            if not spark.master.strip():
                fail("must be a Spark master URL such as local[*] or spark://host:7077", f"{at}.spark.master")
            if not 0 <= spark.ui_port <= 65535:
                fail("must be a port, 0 picks a free one", f"{at}.spark.ui_port")
    if unit.stop_grace < 0:
        fail("must be >= 0", f"{at}.stop_grace")
    if unit.user is not None:
        if not unit.user.strip():
            fail("must be a user name or uid (or left out)", f"{at}.user")
        if unit.kind not in ("process", "spark"):
            fail(f"a {unit.kind} unit runs as its manager says; user is for process and spark units",
                 f"{at}.user")
    if unit.stop_after_disconnect is not None:
        if unit.stop_after_disconnect <= 0:
            fail("must be > 0 seconds (leave it out for a unit that stays put)", f"{at}.stop_after_disconnect")
        if unit.kind not in ("process", "spark"):
            fail(f"a {unit.kind} unit outlives its agent, so it cannot be fenced by one; only process and "
                 "spark units can be movable singletons", f"{at}.stop_after_disconnect")
    if unit.every is not None and unit.every <= 0:
        fail("must be > 0 seconds (leave it out for a long-running service)", f"{at}.every")
    if unit.progress_file is not None and not unit.progress_file.strip():
        fail("must be a path (or left out)", f"{at}.progress_file")
    # Both limits read the unit's progress: a progress file, or a Spark unit's task counts.
    ui_off = spark is not None and spark.conf.get("spark.ui.enabled", "").strip().lower() == "false"
    for key, value in (("stall_after", unit.stall_after), ("start_timeout", unit.start_timeout)):
        if value is None:
            continue
        if value <= 0:
            fail("must be > 0 seconds", f"{at}.{key}")
        if unit.progress_file is None and unit.kind != "spark":
            fail("needs progress_file: without progress there is nothing to wait for", f"{at}.{key}")
        if unit.progress_file is None and ui_off:
            fail("needs progress_file: with spark.ui.enabled = false Spark's task counts are not read",
                 f"{at}.{key}")


SYSTEMD_SERVICE_RE = re.compile(r"^(?!-)[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.service$")
"""A service name as systemd spells it (``name.service``, ``name@instance.service``; never an option)."""
_SYSTEMD_SUFFIXES = (".service", ".socket", ".target", ".device", ".mount", ".automount", ".swap", ".timer",
                     ".path", ".slice", ".scope")
CONTAINER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
"""A container name as Docker accepts it."""


def systemd_service(name: str) -> str:
    """The full service name of ``systemd.unit``: ``.service`` added to a bare name, as systemctl does."""
    return name if name.endswith(_SYSTEMD_SUFFIXES) else f"{name}.service"


def _check_kind_tables(unit: UnitConfig, at: str, fail: Callable[[str, str], None]) -> None:
    """Each kind's own table is there when the kind needs it, and only for that kind."""
    for key in ("spark", "docker", "systemd"):
        if getattr(unit, key) is not None and unit.kind != key:
            fail(f"only a {key} unit has a [{key}] table", f"{at}.{key}")
    if unit.kind == "docker":
        _check_docker(unit, f"{at}.docker", fail)
        if unit.cwd is not None:
            fail("a docker unit runs where its image says (WORKDIR); cwd is for process units", f"{at}.cwd")
    if unit.kind == "systemd":
        systemd = unit.systemd
        if systemd is None:
            fail("a systemd unit needs [systemd] with unit = \"NAME.service\"", f"{at}.systemd")
            return
        if not SYSTEMD_SERVICE_RE.match(systemd_service(systemd.unit)):
            fail(f"{systemd.unit!r} is not a service name such as predict.service", f"{at}.systemd.unit")
        for key in ("poll", "job_timeout"):
            if not getattr(systemd, key) > 0:
                fail("must be > 0 seconds", f"{at}.systemd.{key}")
        if not systemd.systemctl.strip():
            fail("must name the systemctl program", f"{at}.systemd.systemctl")
        for key in ("command", "env", "cwd"):
            if getattr(unit, key):
                fail(f"a systemd unit runs as its unit file says; {key} is for process units", f"{at}.{key}")


def _check_docker(unit: UnitConfig, at: str, fail: Callable[[str, str], None]) -> None:
    docker = unit.docker
    if docker is None:
        fail("a docker unit needs [docker] with container = \"NAME\"", at)
        return
    if not CONTAINER_NAME_RE.match(docker.container):
        fail(f"{docker.container!r} is not a container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)", f"{at}.container")
    if docker.image is not None and not docker.image.strip():
        fail("must name an image (or be left out)", f"{at}.image")
    if docker.url is not None and not docker.url.startswith(("unix://", "tcp://", "http://", "https://", "ssh://")):
        fail("must be unix:///path/docker.sock, tcp://host:port, http(s)://host:port or ssh://host", f"{at}.url")
    if not docker.poll > 0 or not docker.timeout > 0:
        fail("poll and timeout must be > 0 seconds", at)
    if docker.stats_interval < 0:
        fail("must be >= 0 seconds (0: resource use is not read)", f"{at}.stats_interval")
    for name, limits in docker.ulimits.items():
        if len(limits) != 2 or not 0 <= limits[0] <= limits[1]:
            fail("must be [soft, hard] with 0 <= soft <= hard", f"{at}.ulimits.{name}")
    for volume in docker.volumes:
        parts = volume.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/") or \
                (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            fail(f"{volume!r} is not SOURCE:/container/path[:ro|rw]", f"{at}.volumes")
    for port, host in docker.ports.items():
        number, _, proto = port.partition("/")
        if not number.isdigit() or proto not in ("", "tcp", "udp", "sctp"):
            fail(f"{port!r} is not a container port such as 80/tcp", f"{at}.ports")
        if not host.rpartition(":")[2].isdigit():
            fail(f"{host!r} is not a host PORT or IP:PORT", f"{at}.ports.{port}")
    if docker.image is None:
        # Nothing is created, so nothing would take these: say so rather than ignore them.
        creates = {"command": unit.command, "env": unit.env, "docker.network": docker.network,
                   "docker.ports": docker.ports, "docker.volumes": docker.volumes,
                   "docker.ulimits": docker.ulimits, "docker.labels": docker.labels, "docker.user": docker.user}
        for key, value in creates.items():
            if value:
                fail("only applies to a container the agent creates: set docker.image, or configure "
                     "the container where it is created", f"{at.rpartition('.')[0]}.{key}")


def _check_datasets(agent: AgentConfig, fail: Callable[[str, str], None]) -> None:
    """The ``agent.datasets`` part of ``_check_core``."""
    if len(agent.datasets) > 200:
        fail("at most 200 datasets per agent (their digests share one message)", "agent.datasets")
    datasets: set[str] = set()
    for i, dataset in enumerate(agent.datasets):
        at = f"agent.datasets[{i}]"
        _check_name(dataset.name, NODE_ID_RE, datasets, "dataset", f"{at}.name", fail=fail)
        if not Path(dataset.path).is_absolute():
            fail(f"{dataset.path!r} is not an absolute path", f"{at}.path")
        for key in ("include", "exclude"):
            for pattern in getattr(dataset, key):
                if not pattern or pattern.startswith("/") or "\\" in pattern or ".." in pattern.split("/"):
                    fail(f"{pattern!r} must be a non-empty relative glob without '..' or '\\'", f"{at}.{key}")
        for key in ("scan_interval", "deep_scan_interval"):
            if getattr(dataset, key) <= 0:
                fail("must be > 0", f"{at}.{key}")
        if dataset.read_bandwidth < 0:
            fail("must be >= 0 (0: unlimited)", f"{at}.read_bandwidth")
        if not 4096 <= dataset.chunk_size <= 64 * 1024 * 1024:
            fail("must be between 4096 and 67108864 bytes", f"{at}.chunk_size")
        if dataset.manifest is not None and not dataset.manifest.strip():
            fail("must be a path (or left out)", f"{at}.manifest")


NOTIFY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _check_notify(destinations: list[NotifyConfig], source: str) -> None:
    """Chat destinations; messages never quote a URL (it is a secret)."""
    def fail(message: str, path: str) -> None:
        raise ConfigError(message, source=source, path=path)

    names: set[str] = set()
    for i, notify in enumerate(destinations):
        at = f"controller.notify[{i}]"
        scheme, sep, rest = notify.url.partition("://")
        if scheme not in ("http", "https") or not sep or not rest.split("/")[0]:
            fail("must be an http:// or https:// URL (the value is a secret and is not shown)", f"{at}.url")
        name = notify.name or f"{notify.kind}-{i}"
        _check_name(name, NOTIFY_NAME_RE, names, "destination", f"{at}.name", fail=fail)
        for label, glob in notify.matchers.items():
            if not label or not glob:
                fail("label names and globs must be non-empty", f"{at}.matchers")
        if not notify.group_by or not all(notify.group_by):
            fail("needs at least one label name, none empty", f"{at}.group_by")
        if notify.group_wait < 0:
            fail("must be >= 0", f"{at}.group_wait")
        for key in ("group_interval", "repeat_interval", "rate", "timeout"):
            if getattr(notify, key) <= 0:
                fail("must be > 0", f"{at}.{key}")
        if notify.burst < 1:
            fail("must be >= 1", f"{at}.burst")


def _check_promql(controller: ControllerConfig, source: str) -> None:
    """PromQL sources and inbound alerts."""
    def fail(message: str, path: str) -> None:
        raise ConfigError(message, source=source, path=path)

    names: set[str] = set()
    for i, entry in enumerate(controller.promql):
        at = f"controller.promql[{i}]"
        _check_name(entry.name, NOTIFY_NAME_RE, names, "promql", f"{at}.name", fail=fail)
        scheme, sep, rest = entry.url.partition("://")
        if scheme not in ("http", "https") or not sep or not rest.split("/")[0]:
            fail("must be an http:// or https:// URL", f"{at}.url")
        if not entry.query.strip():
            fail("must not be empty", f"{at}.query")
        if not entry.for_node:
            fail("must name a label", f"{at}.for_node")
        for key in ("interval", "timeout"):
            if not getattr(entry, key) > 0:
                fail("must be > 0", f"{at}.{key}")
    if not controller.alerts.ttl > 0:
        fail("must be > 0", "controller.alerts.ttl")
    if controller.alerts.max_alerts < 1:
        fail("must be >= 1", "controller.alerts.max_alerts")


STORE_SCHEMES = ("postgresql", "postgres")


def _check_store(url: str, source: str) -> None:
    """``[store] url``: empty (SQLite) or a PostgreSQL URL; never quoted back (it may hold a password)."""
    if not url:
        return
    scheme, sep, _ = url.partition("://")
    if scheme not in STORE_SCHEMES or not sep:
        raise ConfigError("must be a postgresql:// URL, or empty for SQLite (the value is not shown: it may "
                          "hold a password)", source=source, path="store.url")


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: fit for a log line or a message."""
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    user, at, host = authority.rpartition("@")
    if at and ":" in user:
        authority = f"{user.split(':', 1)[0]}:***@{host}"
    query = tail.partition("?")
    if "password=" in query[2]:
        tail = query[0] + query[1] + "&".join("password=***" if part.startswith("password=") else part
                                                for part in query[2].split("&"))
    return f"{scheme}{sep}{authority}{slash}{tail}"


def _check_identities(config: Config, source: str, *, files: bool = True) -> None:
    """Broker credentials and TLS files: pairs that go together, schemes that allow them."""
    def fail(message: str, path: str) -> None:
        raise ConfigError(message, source=source, path=path)

    mqtt = config.mqtt
    if mqtt.username and not mqtt.password_file:
        fail("a broker username needs password_file", "mqtt.password_file")
    if mqtt.password_file and not mqtt.username:
        fail("password_file needs a username", "mqtt.username")
    if bool(mqtt.tls_cert) != bool(mqtt.tls_key):
        fail("tls_cert and tls_key go together", "mqtt.tls_cert" if mqtt.tls_key else "mqtt.tls_key")
    for key in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(mqtt, key) and not mqtt.tls:
            fail(f"{key} needs an mqtts:// url", f"mqtt.{key}")
    if mqtt.embedded_password_file and mqtt.url != "embedded":
        fail("only for url = \"embedded\"", "mqtt.embedded_password_file")
    # The files themselves, so a daemon fails at start (exit 78) naming the key, not at its first connect.
    # Messages name paths and reasons, never a file's content. A client command (``selfheal status``) only
    # reads the API address: an operator who may not read the daemon's secrets can still use it.
    agent = config.agent
    if bool(agent.tls_cert) != bool(agent.tls_key):
        fail("tls_cert and tls_key go together", "agent.tls_cert" if agent.tls_key else "agent.tls_key")
    if files:
        _check_identity_files(config, fail)


def _check_identity_files(config: Config, fail: Callable[[str, str], None]) -> None:
    """The files the daemon will open: readable, non-empty, in the expected format."""
    mqtt = config.mqtt
    if mqtt.username and mqtt.password_file:
        _check_secret_file(mqtt.password_file, "mqtt.password_file", fail)
    if mqtt.embedded_password_file and mqtt.url == "embedded":
        _check_password_file(mqtt.embedded_password_file, "mqtt.embedded_password_file", fail)
    if mqtt.tls:
        _check_tls_files(mqtt.tls_ca, mqtt.tls_cert, mqtt.tls_key, "mqtt", fail)


def _check_secret_file(path: str, key: str, fail: Callable[[str, str], None]) -> None:
    """``path`` is a readable, non-empty UTF-8 text file (its content is never shown)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {path!r}: {exc.strerror or type(exc).__name__}", key)
        return
    except UnicodeDecodeError:
        fail(f"{path!r} is not UTF-8 text", key)
        return
    if not text.strip():
        fail(f"{path!r} is empty", key)


def _check_password_file(path: str, key: str, fail: Callable[[str, str], None]) -> None:
    """A Mosquitto password file: ``user:$7$...`` (or ``$6$``) lines, at least one."""
    from selfheal.broker_setup import parse_password_file  # noqa: PLC0415 - only when the key is set

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {path!r}: {exc.strerror or type(exc).__name__}", key)
        return
    except UnicodeDecodeError:
        fail(f"{path!r} is not UTF-8 text", key)
        return
    try:
        users = parse_password_file(text)
    except ValueError as exc:
        fail(f"{path!r}: {exc}", key)
        return
    if not users:
        fail(f"{path!r} holds no users", key)


def _check_tls_files(ca: str | None, cert: str | None, key: str | None, section: str,
                     fail: Callable[[str, str], None]) -> None:
    """PEM files that load: a CA bundle, a certificate with its private key."""
    import ssl  # noqa: PLC0415 - only when TLS is configured

    if ca:
        if not Path(ca).is_file():
            fail(f"no such file {ca!r}", f"{section}.tls_ca")
        try:
            ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            fail(f"{ca!r} is not a PEM CA certificate: {_tls_reason(exc)}", f"{section}.tls_ca")
    if cert and key:
        for value, name in ((cert, "tls_cert"), (key, "tls_key")):
            if not Path(value).is_file():
                fail(f"no such file {value!r}", f"{section}.{name}")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            reason = _tls_reason(exc)
            # Which file is at fault: the key if the certificate alone parses as PEM.
            bad = "tls_key" if _is_pem_cert(cert) else "tls_cert"
            fail(f"{cert!r} and {key!r} do not load as a PEM certificate and its key: {reason}",
                 f"{section}.{bad}")


def _is_pem_cert(path: str) -> bool:
    import ssl  # noqa: PLC0415

    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
        start = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        ssl.PEM_cert_to_DER_cert(text[start:end])
    except (OSError, ValueError):
        return False
    return True


def _tls_reason(exc: BaseException) -> str:
    import ssl  # noqa: PLC0415

    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.__class__.__name__)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
