"""The broker's side of selfheal's trust boundary, written by selfheal.

A broker that lets anyone publish lets anyone steer the fleet, so
``selfheal broker init`` writes a Mosquitto configuration that refuses
anonymous clients and confines each identity to its own topics: a password
file in Mosquitto 2's hashed format, an ACL file, one random password per
user, and (with TLS) a CA and a server certificate. The helpers below are
pure (they build text); only :func:`init_broker` and :func:`add_node` touch
the file system.

Password lines match ``mosquitto_passwd``: ``user:$7$<iterations>$<salt>$<hash>``
with PBKDF2-HMAC-SHA512, a 12-byte salt, a 64-byte hash and standard base64.
:func:`verify_password` also accepts the ``$6$`` (salted SHA-512) lines
Mosquitto 1.x wrote.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from selfheal.config_checks import NODE_ID_RE, split_host_port
from selfheal.errors import ConfigError, SelfhealError
from selfheal.wire import (
    CONTROLLER_STATUS_TOPIC,
    CONTROLLERS_STATUS_FILTER,
    MAX_PAYLOAD,
    PREFIX,
    NodeChannel,
    node_topic,
)

PBKDF2_ITERATIONS = 101
"""Mosquitto 2's default iteration count for ``$7$`` password hashes."""
SALT_BYTES = 12
HASH_BYTES = 64


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The ``$7$...`` hash Mosquitto 2 stores for ``password`` (the part after ``user:``)."""
    if iterations < 1:
        raise ValueError("iterations must be positive")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, HASH_BYTES)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def verify_password(line_hash: str, password: str) -> bool:
    """Whether ``password`` matches a stored hash (``$7$`` PBKDF2 or ``$6$`` salted SHA-512).

    ``line_hash`` is the part after ``user:``; a whole ``user:hash`` line is accepted too.
    Anything malformed verifies as False (never raises).
    """
    if not line_hash.startswith("$") and ":" in line_hash:
        line_hash = line_hash.split(":", 1)[1]
    parts = line_hash.strip().split("$")
    try:
        secret = password.encode("utf-8")
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            iterations = int(parts[2])
            if not 1 <= iterations <= 10_000_000:
                return False
            salt = base64.b64decode(parts[3], validate=True)
            expected = base64.b64decode(parts[4], validate=True)
            if not expected:
                return False
            actual = hashlib.pbkdf2_hmac("sha512", secret, salt, iterations, len(expected))
        elif len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            salt = base64.b64decode(parts[2], validate=True)
            expected = base64.b64decode(parts[3], validate=True)
            actual = hashlib.sha512(secret + salt).digest()
        else:
            return False
    except (ValueError, binascii.Error, UnicodeError):
        return False
    return hmac.compare_digest(actual, expected)


def parse_password_file(text: str) -> dict[str, str]:
    """``user → hash`` of a Mosquitto password file; blank lines and ``#`` comments skipped.

    ``ValueError`` names the line number of a malformed or duplicate line (never its content).
    """
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed.startswith(("$7$", "$6$")):
            raise ValueError(f"line {number} is not user:$7$... (Mosquitto's hashed format)")
        if user in users:
            raise ValueError(f"line {number}: user {user!r} appears twice")
        users[user] = hashed
    return users


# --- what the broker enforces (pure) -------------------------------------------------------------

CONTROLLER_USER = "controller"
"""The controller's broker identity; no node may take this name."""
NODE_CHANNELS: tuple[NodeChannel, ...] = ("status", "report", "digests", "events")
"""What a node publishes (its last will is its ``status``); it reads only its ``commands``."""
MIN_QUEUED = 10_000
PACKET_HEADROOM = 16 * 1024
"""Bytes above the wire's payload cap a packet may take (topic, header, properties)."""


def check_node_name(node: str) -> None:
    """A node id that can be a broker user: ``[a-z0-9][a-z0-9-]{0,62}``, never ``controller``."""
    if not NODE_ID_RE.match(node):
        raise ConfigError(f"{node!r} is not a node id ([a-z0-9][a-z0-9-]{{0,62}})", path="node")
    if node == CONTROLLER_USER:
        raise ConfigError(f"{CONTROLLER_USER!r} is the controller's user, not a node id", path="node")


def max_queued(nodes: int) -> int:
    """Messages Mosquitto may queue per client: well above the fleet, so every node's retained status
    reaches a (re)starting controller in one burst."""
    return max(MIN_QUEUED, 4 * nodes)


def controller_acl() -> str:
    """The controller reads every node's traffic and writes commands and its own status."""
    lines = [f"# the controller: reads every node's {', '.join(NODE_CHANNELS)}; sends commands",
             f"user {CONTROLLER_USER}"]
    lines += [f"topic read {PREFIX}/p/+/nodes/+/{channel}" for channel in NODE_CHANNELS]
    lines += [f"topic write {PREFIX}/p/+/nodes/+/commands", f"topic write {CONTROLLER_STATUS_TOPIC}",
              f"topic write {CONTROLLERS_STATUS_FILTER}"]
    return "\n".join(lines) + "\n"


def node_acl(node: str) -> str:
    """A node writes only its own topics (bucket included) and reads only its commands and the
    controller's status."""
    check_node_name(node)
    lines = [f"# node {node}", f"user {node}"]
    lines += [f"topic write {node_topic(node, channel)}" for channel in NODE_CHANNELS]
    lines += [f"topic read {node_topic(node, 'commands')}", f"topic read {CONTROLLER_STATUS_TOPIC}",
              f"topic read {CONTROLLERS_STATUS_FILTER}"]
    return "\n".join(lines) + "\n"


ACL_HEADER = """\
# Written by `selfheal broker init`; `selfheal broker add-node NAME DIR` appends a node.
# Mosquitto denies everything not granted here (an acl_file is set): a user's lines follow its
# `user` line. Reload with SIGHUP after a change.
"""


def render_acl(nodes: Iterable[str]) -> str:
    return ACL_HEADER + "\n" + controller_acl() + "".join("\n" + node_acl(node) for node in nodes)


def render_emqx_acl(nodes: Iterable[str]) -> str:
    """The same rules for EMQX's file authorizer (``acl.conf``, Erlang terms; first match wins)."""
    def quoted(topics: Iterable[str]) -> str:
        return ", ".join(f'"{topic}"' for topic in topics)

    wildcard = [f"{PREFIX}/p/+/nodes/+/{channel}" for channel in NODE_CHANNELS]
    out = ["%% Written by `selfheal broker init` for EMQX's file authorizer (authorization.sources, type = file);",
           "%% set authorization.no_match = deny. Regenerated by `selfheal broker add-node`.",
           f'{{allow, {{username, "{CONTROLLER_USER}"}}, subscribe, [{quoted(wildcard)}]}}.',
           f'{{allow, {{username, "{CONTROLLER_USER}"}}, publish, '
           f'[{quoted([f"{PREFIX}/p/+/nodes/+/commands", CONTROLLER_STATUS_TOPIC, CONTROLLERS_STATUS_FILTER])}]}}.']
    for node in nodes:
        check_node_name(node)
        own = [node_topic(node, channel) for channel in NODE_CHANNELS]
        out.append(f'{{allow, {{username, "{node}"}}, publish, [{quoted(own)}]}}.')
        out.append(f'{{allow, {{username, "{node}"}}, subscribe, '
                   f'[{quoted([node_topic(node, "commands"), CONTROLLER_STATUS_TOPIC, CONTROLLERS_STATUS_FILTER])}]}}.')
    out.append("{deny, all}.")
    return "\n".join(out) + "\n"


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """The broker's TLS files (absolute paths); ``cafile`` only when it is known."""

    certfile: Path
    keyfile: Path
    cafile: Path | None = None


def render_conf(directory: Path, *, host: str, port: int, nodes: int, tls: ListenerTls | None,
                broker_user: str | None = "mosquitto") -> str:
    """``mosquitto.conf`` for ``mosquitto -c``: absolute paths, every setting commented."""
    d = directory.resolve()
    out = [
        "# Mosquitto configuration written by `selfheal broker init`. Run: mosquitto -c " + str(d / "mosquitto.conf"),
        "# Reload the password and ACL files after `selfheal broker add-node` with SIGHUP.",
        "",
        "# One set of security settings for every listener.",
        "per_listener_settings false",
        "# Every client needs a user and password: an anonymous client could steer the fleet.",
        "allow_anonymous false",
        "# Users and their PBKDF2-SHA512 password hashes (mosquitto_passwd's format).",
        f"password_file {d / 'passwords'}",
        "# What each user may publish and read; anything not granted there is denied.",
        f"acl_file {d / 'acl'}",
        "",
    ]
    if broker_user:
        out += ["# Started as root, Mosquitto drops to this user, which must be able to read the password file,",
                "# the ACL and the server key (`selfheal broker init` run as root gives them its group).",
                f"user {broker_user}", ""]
    out += [
        "# Nothing on disk: agents republish their retained status when they reconnect, so a restarted",
        "# broker holds no stale retained state.",
        "persistence false",
        "",
        "# Fleet-size settings. Messages queued per client beyond those in flight: at least 4 per node,",
        "# so every node's retained status reaches a (re)starting controller in one burst.",
        f"max_queued_messages {max_queued(nodes)}",
        "# QoS 1 messages in flight per client before the broker waits for acknowledgements.",
        "max_inflight_messages 100",
        f"# Largest packet accepted: the wire's {MAX_PAYLOAD} byte payload cap plus topic and header room;",
        "# a client sending more is disconnected.",
        f"max_packet_size {MAX_PAYLOAD + PACKET_HEADROOM}",
        "# Small messages go out at once (no Nagle delay).",
        "set_tcp_nodelay true",
        "",
        f"# The listener: port {port} on {host}" + (", TLS only." if tls else ", plain TCP (use --tls off loopback)."),
        f"listener {port} {host}",
        "# The client id is the user name: one node's login cannot take over another node's session",
        "# (a takeover disconnects the node, which then fences its movable units). A listener setting.",
        "use_username_as_clientid true",
    ]
    if tls is not None:
        out += ["# The broker's certificate chain and key (clients verify it against the CA).",
                f"certfile {tls.certfile}", f"keyfile {tls.keyfile}"]
        if tls.cafile is not None:
            out += ["# The CA; clients need no certificate of their own (their password is their identity).",
                    f"cafile {tls.cafile}", "require_certificate false"]
        out += ["# TLS 1.2 at least.", "tls_version tlsv1.2"]
    return "\n".join(out) + "\n"


def client_section(*, url: str, user: str, password_file: Path | str, tls_ca: Path | str | None) -> str:
    """The ``[mqtt]`` lines of one process (agent: its node id; controller: ``controller``)."""
    lines = ["[mqtt]", f'url = "{url}"', f'username = "{user}"', f'password_file = "{password_file}"']
    if tls_ca is not None:
        lines.append(f'tls_ca = "{tls_ca}"')
    return "\n".join(lines) + "\n"


# --- the files (edge) ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """What ``init_broker`` wrote (absolute paths). ``credentials``: user → password file."""

    directory: Path
    conf: Path
    passwords: Path
    acl: Path
    credentials: dict[str, Path]
    url: str
    """What clients put in ``mqtt.url``."""
    tls_ca: Path | None = None
    """What clients put in ``mqtt.tls_ca`` (None: plain, or the system's CAs verify the broker)."""
    server_cert: Path | None = None
    server_key: Path | None = None
    ca_key: Path | None = None
    generated: list[Path] = field(default_factory=list)

    def __repr__(self) -> str:  # paths only, but keep it short
        return f"BrokerFiles(directory={str(self.directory)!r}, url={self.url!r}, users={sorted(self.credentials)})"

    def section(self, user: str) -> str:
        """The ``[mqtt]`` section for ``user`` (whose password file must be copied to its host)."""
        return client_section(url=self.url, user=user, password_file=self.credentials[user], tls_ca=self.tls_ca)


def _write(path: Path, text: str | bytes, mode: int, *, gid: int | None = None) -> Path:
    """Write ``path`` atomically with ``mode`` from the start (a secret is never briefly readable);
    ``gid``: its group (root only)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)  # the umask may have narrowed it
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    return path


def _credentials_dir(directory: Path) -> Path:
    creds = directory / "credentials"
    creds.mkdir(mode=0o700, exist_ok=True)
    creds.chmod(0o700)
    return creds


def _new_credential(directory: Path, user: str) -> tuple[Path, str]:
    """A random password for ``user``, written to ``credentials/<user>.password`` (0600); its hash line."""
    password = secrets.token_urlsafe(32)
    path = _write(_credentials_dir(directory) / f"{user}.password", password + "\n", 0o600)
    return path, f"{user}:{hash_password(password)}"


def _broker_group(broker_user: str | None) -> int | None:
    """The group id the broker reads its secret files with, when we are root and it is another user."""
    if os.geteuid() != 0 or not broker_user or broker_user == "root":
        return None
    import pwd  # noqa: PLC0415 - POSIX only

    try:
        return pwd.getpwnam(broker_user).pw_gid
    except KeyError:
        raise ConfigError(f"no user {broker_user!r} on this host (Mosquitto drops to it when started as root)",
                          path="--broker-user") from None


def _connect_host(host: str, names: Sequence[str]) -> str:
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard listener: clients need a real name
        return next(iter(names), None) or socket.getfqdn()
    return host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def init_broker(directory: Path | str, *, listen: str, nodes: Sequence[str], tls: bool = False,
                ca_cert: Path | str | None = None, ca_key: Path | str | None = None,
                server_cert: Path | str | None = None, server_key: Path | str | None = None,
                names: Sequence[str] = (), broker_user: str | None = "mosquitto") -> BrokerFiles:
    """Write a broker's configuration into ``directory`` (created; refused if it holds one already).

    ``listen``: ``HOST:PORT``. ``tls``: a CA and a server certificate for the host (and ``names``) are
    generated, unless ``ca_cert``/``ca_key`` (sign a server certificate with the operator's CA) or
    ``server_cert``/``server_key`` (the operator's own, used as they are) are given. ``broker_user``:
    the user a root-started Mosquitto drops to (None: no ``user`` line); run as root, the password file
    and server key are given its group (mode 0640), else they are 0600.
    """
    host, port = split_host_port(listen, what="--listen")
    if port == 0:
        raise ConfigError("needs a port", path="--listen")
    for node in nodes:
        check_node_name(node)
    if len(set(nodes)) != len(nodes):
        raise ConfigError("a node is named twice", path="--node")
    tls = tls or any(v is not None for v in (ca_cert, ca_key, server_cert, server_key))
    if (server_cert is None) != (server_key is None):
        raise ConfigError("--server-cert and --server-key go together", path="--server-cert")
    if server_cert is None and (ca_cert is None) != (ca_key is None):
        raise ConfigError("--ca-cert and --ca-key go together (or give --server-cert/--server-key)",
                          path="--ca-cert")
    gid = _broker_group(broker_user)
    d = Path(directory).absolute()
    if (d / "mosquitto.conf").exists() or (d / "passwords").exists():
        raise SelfhealError(f"{d} already holds a broker configuration; add nodes with "
                            "`selfheal broker add-node`, or choose an empty directory")
    d.mkdir(parents=True, exist_ok=True)
    connect = _connect_host(host, names)
    files = BrokerFiles(directory=d, conf=d / "mosquitto.conf", passwords=d / "passwords", acl=d / "acl",
                        credentials={}, url=f"{'mqtts' if tls else 'mqtt'}://{_url_host(connect)}:{port}")
    listener: ListenerTls | None = None
    if tls:
        files, listener = _tls_files(files, host=host, names=[connect, *names], ca_cert=ca_cert, ca_key=ca_key,
                                     server_cert=server_cert, server_key=server_key, gid=gid)
    lines = []
    for user in (CONTROLLER_USER, *nodes):
        path, line = _new_credential(d, user)
        files.credentials[user] = path
        lines.append(line)
    _write(files.passwords, "\n".join(lines) + "\n", 0o600 if gid is None else 0o640, gid=gid)
    _write(files.acl, render_acl(nodes), 0o644)
    _write(d / "emqx-acl.conf", render_emqx_acl(nodes), 0o644)
    _write(files.conf, render_conf(d, host=host, port=port, nodes=len(nodes), tls=listener,
                                   broker_user=broker_user), 0o644)
    return files


def add_node(directory: Path | str, node: str, *, rotate: bool = False) -> tuple[Path, bool]:
    """Add ``node`` to the broker configuration in ``directory``: its password file, hash and ACL.

    Idempotent: a node already present with a matching credential is left as it is (``changed`` False);
    ``rotate`` gives it a new password. Returns (its password file, changed).
    """
    check_node_name(node)
    d = Path(directory).absolute()
    passwords, acl, conf = d / "passwords", d / "acl", d / "mosquitto.conf"
    if not passwords.is_file() or not acl.is_file():
        raise SelfhealError(f"{d} holds no broker configuration (run `selfheal broker init` first)")
    try:
        users = parse_password_file(passwords.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SelfhealError(f"{passwords}: {exc}") from None
    acl_text = acl.read_text(encoding="utf-8")
    has_acl = re.search(rf"^user {re.escape(node)}$", acl_text, flags=re.MULTILINE) is not None
    credential = d / "credentials" / f"{node}.password"
    if node in users and not rotate:
        try:
            current = credential.read_text(encoding="utf-8").strip()
        except OSError:
            current = None
        if current is None or not verify_password(users[node], current):
            raise SelfhealError(f"{node} is in {passwords} but {credential} does not match it: "
                                "use --rotate to give it a new password")
        if not has_acl:
            _write(acl, acl_text.rstrip("\n") + "\n\n" + node_acl(node), 0o644)
            return credential, True
        return credential, False
    credential, line = _new_credential(d, node)
    users[node] = line.partition(":")[2]
    stat = passwords.stat()  # keep the mode and group init gave it
    _write(passwords, "".join(f"{user}:{hashed}\n" for user, hashed in users.items()), stat.st_mode & 0o777,
           gid=stat.st_gid if os.geteuid() == 0 else None)
    if not has_acl:
        _write(acl, acl_text.rstrip("\n") + "\n\n" + node_acl(node), 0o644)
    if conf.is_file():
        _raise_queue_limit(conf, nodes=len(users) - (CONTROLLER_USER in users))
    if (d / "emqx-acl.conf").is_file():
        _write(d / "emqx-acl.conf", render_emqx_acl(u for u in users if u != CONTROLLER_USER), 0o644)
    return credential, True


def _raise_queue_limit(conf: Path, *, nodes: int) -> None:
    """Keep ``max_queued_messages`` above the fleet as it grows (a lower value is never lowered)."""
    text = conf.read_text(encoding="utf-8")
    match = re.search(r"^max_queued_messages (\d+)$", text, flags=re.MULTILINE)
    if match is not None and int(match.group(1)) < max_queued(nodes):
        text = text[:match.start(1)] + str(max_queued(nodes)) + text[match.end(1):]
        _write(conf, text, conf.stat().st_mode & 0o777)


# --- TLS (cryptography) --------------------------------------------------------------------------

CA_DAYS = 3650
SERVER_DAYS = 825


def _tls_files(files: BrokerFiles, *, host: str, names: Sequence[str], ca_cert: Path | str | None,
               ca_key: Path | str | None, server_cert: Path | str | None,
               server_key: Path | str | None, gid: int | None) -> tuple[BrokerFiles, ListenerTls]:
    d = files.directory
    generated: list[Path] = []
    if server_cert is not None and server_key is not None:
        cert, key = Path(server_cert).absolute(), Path(server_key).absolute()
        for path in (cert, key):
            if not path.is_file():
                raise ConfigError(f"no such file {str(path)!r}", path="--server-cert")
        ca = Path(ca_cert).absolute() if ca_cert is not None else None
        return replace(files, tls_ca=ca, server_cert=cert, server_key=key), ListenerTls(cert, key, ca)
    if ca_cert is not None and ca_key is not None:
        ca_path = Path(ca_cert).absolute()
        try:
            ca_pem, ca_key_pem = ca_path.read_bytes(), Path(ca_key).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {exc.filename!r}: {exc.strerror}", path="--ca-cert") from None
        own_ca_key = None
    else:
        ca_pem, ca_key_pem = make_ca(f"selfheal broker CA {socket.gethostname()}")
        ca_path = _write(d / "ca.pem", ca_pem, 0o644)
        own_ca_key = _write(d / "ca.key", ca_key_pem, 0o600)
        generated += [ca_path, own_ca_key]
    cert_pem, key_pem = make_server_cert(ca_pem, ca_key_pem, server_names(host, names))
    cert = _write(d / "server.pem", cert_pem, 0o644)
    key = _write(d / "server.key", key_pem, 0o600 if gid is None else 0o640, gid=gid)
    generated += [cert, key]
    files = replace(files, tls_ca=ca_path, server_cert=cert, server_key=key, ca_key=own_ca_key,
                     generated=generated)
    return files, ListenerTls(cert, key, ca_path)


def server_names(host: str, names: Iterable[str]) -> list[str]:
    """The names a server certificate for ``host`` carries: ``host`` (unless a wildcard), ``names``,
    and ``localhost``/``127.0.0.1``/``::1`` for a loopback or wildcard listener."""
    out: list[str] = []

    def add(name: str) -> None:
        if name and name not in out:
            out.append(name)

    wildcard = host in ("0.0.0.0", "::", "")  # noqa: S104
    if not wildcard:
        add(host)
    for name in names:
        add(name)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback or wildcard:
        for name in ("localhost", "127.0.0.1", "::1"):
            add(name)
    if wildcard:
        add(socket.getfqdn())
    return out


def make_ca(common_name: str, *, days: int = CA_DAYS) -> tuple[bytes, bytes]:
    """A self-signed CA (ECDSA P-256): (certificate PEM, private key PEM)."""
    from cryptography import x509  # noqa: PLC0415 - only for --tls
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def make_server_cert(ca_pem: bytes, ca_key_pem: bytes, names: Sequence[str], *,
                     days: int = SERVER_DAYS) -> tuple[bytes, bytes]:
    """A server certificate for ``names`` (DNS names and IP addresses) signed by the CA:
    (certificate PEM, private key PEM)."""
    from cryptography import x509  # noqa: PLC0415 - only for --tls
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    if not names:
        raise ConfigError("a server certificate needs at least one name", path="--san")
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the CA certificate or key does not load: {type(exc).__name__}", path="--ca-key") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError("the CA key must be an EC or RSA key", path="--ca-key")
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))

