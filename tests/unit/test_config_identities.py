"""``[mqtt]`` broker identities: the password file and TLS files are checked at load (and by
``selfheal config check``), each failure naming its key path and never a file's content."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfheal.broker_setup import hash_password, make_ca, make_server_cert
from selfheal.cli import main
from selfheal.config import load_config
from selfheal.errors import EXIT_CONFIG, EXIT_OK, ConfigError

SECRET = "s3cret-never-shown-Zq9"  # noqa: S105 - a test value that must never show


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def mqtt(tmp_path: Path, lines: str, url: str = "mqtt://127.0.0.1:1883") -> Path:
    return write(tmp_path / "selfheal.toml", f'[mqtt]\nurl = "{url}"\n{lines}')


def error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return info.value


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca, ca_key = make_ca("test CA")
    cert, key = make_server_cert(ca, ca_key, ["localhost"])
    other_ca, _ = make_ca("another CA")
    _, other_key = make_server_cert(other_ca, make_ca("x")[1], ["localhost"])
    return {"ca": write(tmp_path / "ca.pem", ca), "cert": write(tmp_path / "cert.pem", cert),
            "key": write(tmp_path / "key.pem", key), "other_key": write(tmp_path / "other.key", other_key)}


def test_a_readable_password_file_loads(tmp_path: Path) -> None:
    secret = write(tmp_path / "pw", SECRET + "\n")
    config = load_config(mqtt(tmp_path, f'username = "node-a"\npassword_file = "{secret}"\n'), env={})
    assert config.mqtt.username == "node-a"
    assert SECRET not in repr(config)
    assert SECRET not in repr(config.mqtt)


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "blank"])
def test_an_unusable_password_file_names_its_key(tmp_path: Path, case: str) -> None:
    target = tmp_path / "pw"
    if case == "directory":
        target.mkdir()
    elif case == "empty":
        write(target, "")
    elif case == "blank":
        write(target, "  \n\n")
    exc = error(mqtt(tmp_path, f'username = "node-a"\npassword_file = "{target}"\n'))
    assert exc.path == "mqtt.password_file"
    assert str(target) in str(exc)


def test_password_file_content_never_in_the_error(tmp_path: Path) -> None:
    target = write(tmp_path / "pw", b"\xff\xfe" + SECRET.encode())
    exc = error(mqtt(tmp_path, f'username = "node-a"\npassword_file = "{target}"\n'))
    assert exc.path == "mqtt.password_file"
    assert SECRET not in str(exc)


def test_tls_files_that_load_pass(tmp_path: Path, pki: dict[str, Path]) -> None:
    config = load_config(mqtt(tmp_path, f'tls_ca = "{pki["ca"]}"\ntls_cert = "{pki["cert"]}"\n'
                                        f'tls_key = "{pki["key"]}"\n', url="mqtts://localhost:8883"), env={})
    assert config.mqtt.tls


@pytest.mark.parametrize(("key", "case"), [("tls_ca", "missing"), ("tls_ca", "garbage"),
                                           ("tls_cert", "missing"), ("tls_cert", "garbage"),
                                           ("tls_key", "missing"), ("tls_key", "garbage"),
                                           ("tls_key", "mismatch")])
def test_a_bad_tls_file_names_its_key(tmp_path: Path, pki: dict[str, Path], key: str, case: str) -> None:
    files = {"tls_ca": pki["ca"], "tls_cert": pki["cert"], "tls_key": pki["key"]}
    if case == "missing":
        files[key] = tmp_path / "nowhere.pem"
    elif case == "garbage":
        files[key] = write(tmp_path / "garbage.pem", "-----BEGIN CERTIFICATE-----\nnope\n")
    else:
        files[key] = pki["other_key"]
    lines = "".join(f'{name} = "{value}"\n' for name, value in files.items())
    exc = error(mqtt(tmp_path, lines, url="mqtts://localhost:8883"))
    assert exc.path == f"mqtt.{key}"


def test_embedded_password_file_must_hold_hashed_lines(tmp_path: Path) -> None:
    good = write(tmp_path / "passwords", f"controller:{hash_password('x')}\n")
    load_config(mqtt(tmp_path, f'embedded_password_file = "{good}"\n', url="embedded"), env={})
    plain = write(tmp_path / "plain", f"controller:{SECRET}\n")
    exc = error(mqtt(tmp_path, f'embedded_password_file = "{plain}"\n', url="embedded"))
    assert exc.path == "mqtt.embedded_password_file"
    assert "line 1" in str(exc)
    assert SECRET not in str(exc)
    empty = write(tmp_path / "empty", "# nobody\n")
    assert error(mqtt(tmp_path, f'embedded_password_file = "{empty}"\n', url="embedded")).path == \
        "mqtt.embedded_password_file"


def test_config_check_reports_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = mqtt(tmp_path, f'username = "node-a"\npassword_file = "{tmp_path / "missing"}"\n')
    assert main(["config", "check", str(path)]) == EXIT_CONFIG
    assert "mqtt.password_file" in capsys.readouterr().err
    write(tmp_path / "missing", SECRET)
    assert main(["config", "check", str(path)]) == EXIT_OK
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err


def test_a_client_command_does_not_open_the_daemons_secrets(tmp_path: Path) -> None:
    """``selfheal status --config`` needs the API address only: an operator who may not read the
    broker password (0600, the daemon's) can still use the config; the daemon itself cannot start."""
    path = mqtt(tmp_path, f'username = "node-a"\npassword_file = "{tmp_path / "missing.password"}"\n')
    assert load_config(path, role="client").mqtt.username == "node-a"
    assert error(path).path == "mqtt.password_file"
