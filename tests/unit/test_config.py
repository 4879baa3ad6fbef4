"""The typed config: defaults, key-path errors, env overrides, semantic checks, ``selfheal config check``."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfheal.cli import main
from selfheal.config import Config, load_config
from selfheal.errors import EXIT_CONFIG, EXIT_OK, ConfigError

UNIT = '[[agent.units]]\nname = "web"\ncommand = ["python3", "-m", "http.server"]\n'


def write(tmp_path: Path, text: str, name: str = "selfheal.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, *, role: str = "any", env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {}, role=role)  # type: ignore[arg-type]
    return info.value


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_load_without_a_file() -> None:
    config = load_config(None, env={})
    assert config == Config()
    assert config.mqtt.url == "mqtt://127.0.0.1:1883"
    assert config.controller.listen == "127.0.0.1:8080"
    assert config.controller.offline_after == 5.0
    assert config.agent.interval == 1.0
    assert config.agent.units == []
    assert config.mqtt.host_port() == ("127.0.0.1", 1883)


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == Config()


def test_a_full_unit_with_a_probe_loads(tmp_path: Path) -> None:
    path = write(tmp_path, '[agent]\nnode_id = "node-a"\ninterval = 0.5\n' + UNIT
                 + '[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:8000/"\nfailures = 2\n')
    config = load_config(path, env={}, role="agent")
    assert config.agent.node_id == "node-a"
    assert config.agent.interval == 0.5
    (unit,) = config.agent.units
    assert unit.name == "web"
    assert unit.command == ["python3", "-m", "http.server"]
    assert unit.probe is not None
    assert unit.probe.kind == "http"
    assert unit.probe.failures == 2


def test_an_integer_is_accepted_for_a_float_duration(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[agent]\ninterval = 2\n"), env={}).agent.interval == 2.0


# --- key-path errors ----------------------------------------------------------------------------


def test_an_unknown_key_names_its_full_key_path_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[agent]\nintervall = 1\n")
    error = config_error(path)
    assert error.source == str(path)
    assert error.path == "agent.intervall"
    assert "agent.intervall" in str(error)
    assert str(path) in str(error)


def test_an_unknown_top_level_section_names_itself(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, "[agnet]\nnode_id = 'x'\n"))
    assert error.path == "agnet"
    assert "agnet" in str(error)


def test_a_wrong_enum_value_names_the_nested_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, UNIT + '[agent.units.probe]\nkind = "grpc"\ntarget = "x"\n')
    error = config_error(path)
    assert error.path == "agent.units[0].probe.kind"
    assert str(error).startswith(f"{path}: agent.units[0].probe.kind: ")
    assert "grpc" in str(error)


def test_a_wrong_type_names_the_key_and_the_types(tmp_path: Path) -> None:
    path = write(tmp_path, '[agent]\ninterval = "fast"\n')
    error = config_error(path)
    assert error.path == "agent.interval"
    assert str(path) in str(error)
    assert "float" in str(error)
    assert "str" in str(error)


def test_a_table_where_a_list_belongs_is_a_type_error(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, "[agent]\nunits = 3\n"))
    assert error.path == "agent.units"
    assert "array" in str(error)


# --- environment overrides ----------------------------------------------------------------------


def test_env_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nurl = "mqtt://10.0.0.1:1883"\n[agent]\ninterval = 3.0\n')
    config = load_config(path, env={"SELFHEAL_MQTT__URL": "embedded", "SELFHEAL_AGENT__INTERVAL": "0.25",
                                    "UNRELATED": "1", "SELFHEAL_NOSEP": "x"})
    assert config.mqtt.url == "embedded"
    assert config.agent.interval == 0.25
    assert config.mqtt.host_port() == ("127.0.0.1", 1883)


def test_env_overrides_apply_without_a_file() -> None:
    config = load_config(None, env={"SELFHEAL_MQTT__URL": "mqtt://broker.example:1884"})
    assert config.mqtt.host_port() == ("broker.example", 1884)


def test_a_bad_env_value_names_the_key_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"SELFHEAL_AGENT__INTERVAL": "fast"})
    assert info.value.path == "agent.interval"


def test_an_env_override_of_an_unknown_key_is_an_error(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, ""), env={"SELFHEAL_AGENT__INTERVALL": "1"})
    assert "intervall" in str(error)


def test_the_process_environment_is_not_read_when_env_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFHEAL_AGENT__INTERVAL", "9")
    assert load_config(None, env={}).agent.interval == 1.0
    assert load_config(None).agent.interval == 9.0


# --- semantic checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("node_id", ["node-a", "0", "a" * 63, "n1-2-3"])
def test_valid_node_ids(tmp_path: Path, node_id: str) -> None:
    config = load_config(write(tmp_path, f'[agent]\nnode_id = "{node_id}"\n'), env={}, role="agent")
    assert config.agent.node_id == node_id


@pytest.mark.parametrize("node_id", ["Node-A", "-node", "node_a", "node.a", "a" * 64, "node/a", "node a"])
def test_invalid_node_ids_are_rejected(tmp_path: Path, node_id: str) -> None:
    error = config_error(write(tmp_path, f'[agent]\nnode_id = "{node_id}"\n'))
    assert error.path == "agent.node_id"
    assert repr(node_id) in str(error)


def test_an_agent_needs_a_node_id(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(path, env={}, role="controller").agent.node_id == ""
    error = config_error(path, role="agent")
    assert error.path == "agent.node_id"
    assert "required" in str(error)


def test_duplicate_unit_names_are_rejected(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, UNIT + UNIT))
    assert error.path == "agent.units[1].name"
    assert "duplicate unit name 'web'" in str(error)


@pytest.mark.parametrize("kind", ["systemd", "docker"])
def test_systemd_and_docker_units_need_their_own_table(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, f'[[agent.units]]\nname = "web"\nkind = "{kind}"\n')
    error = config_error(path)
    assert error.path == f"agent.units[0].{kind}"
    assert str(path) in str(error)
    assert f"a {kind} unit needs [{kind}]" in str(error)


def test_an_unknown_unit_kind_is_a_type_error(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, UNIT + 'kind = "vm"\n'))
    assert error.path == "agent.units[0].kind"


def test_a_process_unit_needs_a_command(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, '[[agent.units]]\nname = "web"\n'))
    assert error.path == "agent.units[0].command"


def test_an_exec_probe_target_must_be_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, UNIT + '[agent.units.probe]\nkind = "exec"\ntarget = "true"\n')
    error = config_error(path)
    assert error.path == "agent.units[0].probe.target"
    assert "argv list" in str(error)
    assert str(path) in str(error)


def test_an_exec_probe_target_list_loads(tmp_path: Path) -> None:
    path = write(tmp_path, UNIT + '[agent.units.probe]\nkind = "exec"\ntarget = ["true"]\n')
    probe = load_config(path, env={}).agent.units[0].probe
    assert probe is not None
    assert probe.target == ["true"]


def test_an_http_probe_target_must_be_a_string_url(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, UNIT + '[agent.units.probe]\nkind = "http"\ntarget = ["x"]\n'))
    assert error.path == "agent.units[0].probe.target"
    error = config_error(write(tmp_path, UNIT + '[agent.units.probe]\nkind = "http"\ntarget = "ftp://x/"\n'))
    assert error.path == "agent.units[0].probe.target"


def test_a_tcp_probe_target_host_port_loads(tmp_path: Path) -> None:
    path = write(tmp_path, UNIT + '[agent.units.probe]\nkind = "tcp"\ntarget = "127.0.0.1:5432"\n')
    probe = load_config(path, env={}).agent.units[0].probe
    assert probe is not None
    assert probe.target == "127.0.0.1:5432"


@pytest.mark.parametrize("target", ["no-port", "host:", "host:http", "host:70000"])
def test_a_tcp_probe_target_must_be_host_port(tmp_path: Path, target: str) -> None:
    path = write(tmp_path, UNIT + f'[agent.units.probe]\nkind = "tcp"\ntarget = "{target}"\n')
    error = config_error(path)
    assert error.path == "agent.units[0].probe.target"
    assert "HOST:PORT" in str(error)


def test_a_bad_tcp_probe_target_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, UNIT + '[agent.units.probe]\nkind = "tcp"\ntarget = "no-port"\n')
    error = config_error(path)
    assert error.source == str(path), "the error must name the file, like every other config error"
    assert str(error).startswith(f"{path}: agent.units[0].probe.target: ")


def test_a_bad_listen_address_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[controller]\nlisten = "nope"\n')
    error = config_error(path)
    assert error.path == "controller.listen"
    assert str(path) in str(error)


def test_a_non_mqtt_url_is_rejected(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, '[mqtt]\nurl = "http://broker:1883"\n'))
    assert error.path == "mqtt.url"


@pytest.mark.parametrize(("text", "key"), [
    ("[agent]\ninterval = 0\n", "agent.interval"),
    ("[controller]\noffline_after = -1\n", "controller.offline_after"),
    ("[mqtt]\nkeepalive = 0\n", "mqtt.keepalive"),
])
def test_non_positive_durations_are_rejected(tmp_path: Path, text: str, key: str) -> None:
    assert config_error(write(tmp_path, text)).path == key


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    error = config_error(path)
    assert error.source == str(path)
    assert "file not found" in str(error)


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[agent]\nnode_id = \n")
    error = config_error(path)
    assert error.source == str(path)
    assert "not valid TOML" in str(error)
    assert "line 2" in str(error)


# --- selfheal config check ------------------------------------------------------------------------


def test_config_check_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[agent]\nnode_id = "node-a"\n' + UNIT)
    assert main(["config", "check", str(path)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert f"{path}: ok (1 unit(s)" in out
    assert err == ""


def test_config_check_reports_a_wrong_type_with_its_key_path(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, UNIT + '[agent.units.probe]\nkind = "grpc"\ntarget = "x"\n')
    assert main(["config", "check", str(path)]) == EXIT_CONFIG == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert "config error" in err
    assert "agent.units[0].probe.kind" in err
    assert str(path) in err


def test_config_check_reports_an_unknown_key_with_its_key_path(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[agent]\nintervall = 1\n")
    assert main(["config", "check", str(path)]) == 78
    assert "agent.intervall" in capsys.readouterr().err


def test_config_check_with_role_agent_requires_a_node_id(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, UNIT)
    assert main(["config", "check", str(path), "--role", "agent"]) == 78
    assert "agent.node_id" in capsys.readouterr().err


def test_config_check_validates_listed_rulebooks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    book = write(tmp_path, "version: 1\nrules:\n  - name: r\n    kind: unit_exited\n    action: reboot\n",
                 name="rules.yaml")
    path = write(tmp_path, f'[controller]\nrulebooks = ["{book}"]\n')
    assert main(["config", "check", str(path)]) != EXIT_OK
    err = capsys.readouterr().err
    assert str(book) in err
    assert "action" in err


def test_the_agent_key_can_come_from_the_environment(tmp_path: Path) -> None:
    from selfheal.keys import read_own_key, write_key  # noqa: PLC0415 - keeps this test's imports local

    write_key(tmp_path, "node-a")
    from_file = read_own_key(tmp_path, "node-a", env={})
    assert from_file is not None
    assert read_own_key(tmp_path, "node-a", env={"SELFHEAL_COMMAND_KEY": "ab" * 32}) == bytes.fromhex("ab" * 32)
    with pytest.raises(ConfigError, match=r"\$SELFHEAL_COMMAND_KEY.*not hex"):
        read_own_key(tmp_path, "node-a", env={"SELFHEAL_COMMAND_KEY": "zz"})
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        read_own_key(tmp_path, "node-a", env={"SELFHEAL_COMMAND_KEY": "abcd"})
