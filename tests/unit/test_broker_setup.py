"""``selfheal.broker_setup``: Mosquitto-compatible password hashes, the ACL each identity gets, the files
``selfheal broker init`` / ``add-node`` write (modes, idempotence), and the generated certificates.
(That a real Mosquitto accepts them is tests/integration/test_broker_identities.py.)"""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from selfheal.broker_setup import (
    add_node,
    hash_password,
    init_broker,
    make_ca,
    make_server_cert,
    max_queued,
    node_acl,
    parse_password_file,
    render_acl,
    verify_password,
)
from selfheal.cli import main
from selfheal.errors import EXIT_CONFIG, EXIT_OK, ConfigError, SelfhealError
from selfheal.wire import node_topic

# A line `mosquitto_passwd -b -c FILE alice secret` (Mosquitto 2.0.11) wrote.
MOSQUITTO_LINE = ("alice:$7$101$TKWNRgemYhMuIX7B$ZTXqhy3BnJSo09MzDczelT7xRocZQFttzI9HTMBNGO2mKmJXnZFlR1bjNlYFk8xAL3v"
                  "hMjO7utbZZN5OBj9KZA==")


def test_hash_has_mosquittos_shape() -> None:
    line = hash_password("secret")
    empty, kind, iterations, salt, digest = line.split("$")
    assert (empty, kind, iterations) == ("", "7", "101")
    assert len(base64.b64decode(salt, validate=True)) == 12
    assert len(base64.b64decode(digest, validate=True)) == 64
    assert hash_password("secret", salt=b"0" * 12) == hash_password("secret", salt=b"0" * 12)
    assert hash_password("secret") != line  # a fresh salt each time


def test_verifies_a_line_mosquitto_passwd_wrote() -> None:
    _user, _, hashed = MOSQUITTO_LINE.partition(":")
    assert verify_password(hashed, "secret")
    assert verify_password(MOSQUITTO_LINE, "secret")
    assert not verify_password(hashed, "Secret")


def test_verifies_mosquitto_1_sha512_lines() -> None:
    import hashlib  # noqa: PLC0415

    salt = os.urandom(12)
    digest = hashlib.sha512(b"pw" + salt).digest()
    line = f"$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert verify_password(line, "pw")
    assert not verify_password(line, "px")


@pytest.mark.parametrize("junk", ["", "plain", "$7$", "$7$x$a$b", "$7$101$!!$??", "$7$0$AAAA$AAAA", "$5$a$b",
                                  "$7$101$AAAA$", "$6$AAAA"])
def test_junk_hashes_never_verify(junk: str) -> None:
    assert not verify_password(junk, "")


def test_mosquitto_passwd_agrees(tmp_path: Path) -> None:
    """mosquitto_passwd writes lines we verify; our lines have exactly its shape."""
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        pytest.fail("mosquitto_passwd not found: apt-get install -y mosquitto")
    path = tmp_path / "pw"
    subprocess.run([exe, "-b", "-c", str(path), "bob", "hunter2"], check=True, capture_output=True)
    theirs = parse_password_file(path.read_text())["bob"]
    assert verify_password(theirs, "hunter2")
    ours = hash_password("hunter2")
    assert [len(part) for part in theirs.split("$")] == [len(part) for part in ours.split("$")]


def test_parse_password_file_names_lines_not_content() -> None:
    assert parse_password_file(f"# c\n\n{MOSQUITTO_LINE}\n") == {"alice": MOSQUITTO_LINE.partition(":")[2]}
    with pytest.raises(ValueError, match="line 2") as info:
        parse_password_file(f"{MOSQUITTO_LINE}\nbob:plaintextpw\n")
    assert "plaintextpw" not in str(info.value)
    with pytest.raises(ValueError, match="twice"):
        parse_password_file(f"{MOSQUITTO_LINE}\n{MOSQUITTO_LINE}\n")


def test_node_acl_grants_only_its_own_topics() -> None:
    acl = node_acl("node-a")
    writes = {line.removeprefix("topic write ") for line in acl.splitlines() if line.startswith("topic write")}
    reads = {line.removeprefix("topic read ") for line in acl.splitlines() if line.startswith("topic read")}
    assert writes == {node_topic("node-a", c) for c in ("status", "report", "digests", "events")}
    assert reads == {node_topic("node-a", "commands"), "selfheal/v1/controller/status",
                     "selfheal/v1/controllers/+/status"}  # several controllers' presence: read-only, no node's
    assert "+" not in acl.replace("topic read selfheal/v1/controllers/+/status", "")
    assert "#" not in acl.replace("# node", "")
    full = render_acl(["node-a", "node-b"])
    assert full.count("user ") == 3
    assert "topic write selfheal/v1/p/+/nodes/+/commands" in full


@pytest.mark.parametrize("bad", ["Node", "controller", "-x", "a/b", "a+", "", "x" * 64])
def test_bad_node_names_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        init_broker(tmp_path / "b", listen="127.0.0.1:1883", nodes=[bad], broker_user=None)


def test_init_writes_files_with_modes(tmp_path: Path) -> None:
    files = init_broker(tmp_path / "broker", listen="127.0.0.1:18830", nodes=["node-a", "node-b"], broker_user=None)
    assert stat.S_IMODE(files.passwords.stat().st_mode) == 0o600
    assert stat.S_IMODE((files.directory / "credentials").stat().st_mode) == 0o700
    users = parse_password_file(files.passwords.read_text())
    assert set(users) == set(files.credentials) == {"controller", "node-a", "node-b"}
    for user, path in files.credentials.items():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        password = path.read_text().strip()
        assert len(password) >= 40
        assert verify_password(users[user], password)
        assert password not in repr(files)
        assert password not in files.conf.read_text()
    conf = files.conf.read_text()
    for line in ("per_listener_settings false", "allow_anonymous false", f"password_file {files.passwords}",
                 f"acl_file {files.acl}", "listener 18830 127.0.0.1", "max_queued_messages 10000"):
        assert line in conf.splitlines()
    assert not any(line.startswith("user ") for line in conf.splitlines())
    assert files.url == "mqtt://127.0.0.1:18830"
    assert files.tls_ca is None
    with pytest.raises(SelfhealError, match="already"):
        init_broker(tmp_path / "broker", listen="127.0.0.1:18830", nodes=[], broker_user=None)


def test_add_node_is_idempotent_and_rotates(tmp_path: Path) -> None:
    files = init_broker(tmp_path / "b", listen="127.0.0.1:1883", nodes=["node-a"], broker_user=None)
    path, changed = add_node(files.directory, "node-c")
    assert changed
    assert path == files.directory / "credentials" / "node-c.password"
    first = path.read_text()
    again, changed = add_node(files.directory, "node-c")
    assert (again, changed) == (path, False)
    assert path.read_text() == first
    assert files.acl.read_text().count("user node-c") == 1
    _, changed = add_node(files.directory, "node-c", rotate=True)
    assert changed
    assert path.read_text() != first
    users = parse_password_file(files.passwords.read_text())
    assert verify_password(users["node-c"], path.read_text().strip())
    assert verify_password(users["node-a"], files.credentials["node-a"].read_text().strip())
    assert stat.S_IMODE(files.passwords.stat().st_mode) == 0o600
    path.unlink()
    with pytest.raises(SelfhealError, match="--rotate"):
        add_node(files.directory, "node-c")


def test_add_node_raises_the_queue_limit_with_the_fleet(tmp_path: Path) -> None:
    files = init_broker(tmp_path / "b", listen="127.0.0.1:1883", nodes=[], broker_user=None)
    conf = files.conf.read_text().replace("max_queued_messages 10000", "max_queued_messages 4")
    files.conf.write_text(conf)
    add_node(files.directory, "node-a")
    assert f"max_queued_messages {max_queued(1)}" in files.conf.read_text()


def test_generated_certificate_verifies_against_the_ca(tmp_path: Path) -> None:
    files = init_broker(tmp_path / "b", listen="127.0.0.1:8883", nodes=["node-a"], tls=True, broker_user=None,
                        names=["broker.example"])
    assert files.url == "mqtts://127.0.0.1:8883"
    assert files.tls_ca == files.directory / "ca.pem"
    assert files.ca_key is not None
    assert stat.S_IMODE(files.ca_key.stat().st_mode) == 0o600
    assert files.server_key is not None
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    from cryptography import x509  # noqa: PLC0415

    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())  # type: ignore[union-attr]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) >= {"localhost", "broker.example"}
    context = ssl.create_default_context(cafile=str(files.tls_ca))
    context.load_verify_locations(cadata=files.tls_ca.read_text())  # parses
    conf = files.conf.read_text()
    assert f"certfile {files.server_cert}" in conf
    assert f"keyfile {files.server_key}" in conf


def test_operator_ca_signs_the_server_certificate(tmp_path: Path) -> None:
    ca, ca_key = make_ca("operator CA")
    (tmp_path / "ca.pem").write_bytes(ca)
    (tmp_path / "ca.key").write_bytes(ca_key)
    files = init_broker(tmp_path / "b", listen="10.1.2.3:8883", nodes=[], ca_cert=tmp_path / "ca.pem",
                        ca_key=tmp_path / "ca.key", broker_user=None)
    assert files.tls_ca == tmp_path / "ca.pem"
    assert files.ca_key is None
    assert not (files.directory / "ca.key").exists()
    cert, _ = make_server_cert(ca, ca_key, ["x"])
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----")


def test_cli_init_and_add_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "broker"
    assert main(["broker", "init", str(d), "--listen", "127.0.0.1:1883", "--node", "node-a",
                 "--broker-user", ""]) == EXIT_OK
    out = capsys.readouterr().out
    assert 'username = "node-a"' in out
    assert 'username = "controller"' in out
    for path in (d / "credentials").iterdir():
        assert path.read_text().strip() not in out
    assert main(["broker", "add-node", "node-b", str(d)]) == EXIT_OK
    assert "SIGHUP" in capsys.readouterr().out
    assert main(["broker", "add-node", "Bad", str(d)]) == EXIT_CONFIG


def test_emqx_acl_matches_the_mosquitto_rules(tmp_path: Path) -> None:
    files = init_broker(tmp_path / "b", listen="127.0.0.1:1883", nodes=["node-a"], broker_user=None)
    emqx = (files.directory / "emqx-acl.conf").read_text()
    own = ", ".join(f'"{node_topic("node-a", c)}"' for c in ("status", "report", "digests", "events"))
    assert f'{{allow, {{username, "node-a"}}, publish, [{own}]}}.' in emqx
    assert emqx.rstrip().endswith("{deny, all}.")
    add_node(files.directory, "node-b")
    emqx = (files.directory / "emqx-acl.conf").read_text()
    assert '{username, "node-b"}' in emqx
    assert emqx.rstrip().endswith("{deny, all}.")
