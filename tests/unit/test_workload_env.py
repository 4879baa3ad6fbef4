"""What a workload inherits from the agent (agent.workload), how the agent finds its own key (selfheal.keys),
and the agent unit rendered for its key credential and memory bound (selfheal.install)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from agent.progress import progress_path
from agent.workload import ALLOWED_SELFHEAL, Account, is_dropped, resolve_user, unit_environment, work_dir
from selfheal.config import AgentConfig, Config, UnitConfig
from selfheal.errors import ConfigError, UnitError
from selfheal.install import data_dir, render_agent
from selfheal.keys import CREDENTIAL, ENV_KEY, NO_KEY, read_own_key, write_key

AGENT_ENV = {
    "PATH": "/usr/bin:/bin", "HOME": "/var/lib/selfheal-agent", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
    "TZ": "UTC", "JAVA_HOME": "/usr/lib/jvm/java-17", "USER": "selfheal-agent",
    "SELFHEAL_COMMAND_KEY": "ab" * 32, "SELFHEAL_MQTT__PASSWORD_FILE": "/etc/selfheal/mqtt.password",
    "SELFHEAL_API_TOKEN": "t0ken", "SELFHEAL_PROGRESS_FILE": "/inherited/progress.json",
    "CREDENTIALS_DIRECTORY": "/run/credentials/selfheal-agent.service", "NOTIFY_SOCKET": "/run/systemd/notify",
    "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42", "LISTEN_FDS": "1", "LISTEN_PID": "42",
    "INVOCATION_ID": "0123", "JOURNAL_STREAM": "8:1234", "SYSTEMD_EXEC_PID": "42",
    "STATE_DIRECTORY": "/var/lib/selfheal-agent", "RUNTIME_DIRECTORY": "/run/selfheal-agent",
    "MEMORY_PRESSURE_WATCH": "/sys/fs/cgroup/x/memory.pressure",
}


def test_the_agents_secrets_and_service_handles_stay_with_it() -> None:
    env = unit_environment(AGENT_ENV)
    assert not [name for name in env if name.startswith("SELFHEAL_")]
    for name in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                 "INVOCATION_ID", "JOURNAL_STREAM", "SYSTEMD_EXEC_PID", "STATE_DIRECTORY", "RUNTIME_DIRECTORY",
                 "MEMORY_PRESSURE_WATCH"):
        assert name not in env, name
    assert env == {"PATH": "/usr/bin:/bin", "HOME": "/var/lib/selfheal-agent", "LANG": "C.UTF-8",
                   "LC_ALL": "C.UTF-8", "TZ": "UTC", "JAVA_HOME": "/usr/lib/jvm/java-17", "USER": "selfheal-agent"}
    assert ("ab" * 32) not in repr(env)


def test_the_units_own_env_and_what_selfheal_sets_on_purpose_reach_it() -> None:
    env = unit_environment(AGENT_ENV, {"SELFHEAL_ETL_LANDING": "/srv/landing", "PATH": "/opt/x/bin"},
                           extra={"SELFHEAL_PROGRESS_FILE": "/srv/etl/progress.json"})
    assert env["SELFHEAL_ETL_LANDING"] == "/srv/landing"  # the operator wrote it for this unit
    assert env["PATH"] == "/opt/x/bin"
    assert env["SELFHEAL_PROGRESS_FILE"] == "/srv/etl/progress.json"
    assert "SELFHEAL_COMMAND_KEY" not in env
    assert set(ALLOWED_SELFHEAL) == {"SELFHEAL_PROGRESS_FILE"}
    with pytest.raises(ValueError, match="SELFHEAL_COMMAND_KEY"):
        unit_environment(AGENT_ENV, extra={"SELFHEAL_COMMAND_KEY": "x"})


def test_a_unit_with_a_user_gets_that_users_home_and_name() -> None:
    account = Account(name="svc", uid=990, gid=990, groups=(4,), home="/srv/svc")
    env = unit_environment(AGENT_ENV, {"HOME": "/custom"}, account=account)
    assert (env["HOME"], env["USER"], env["LOGNAME"]) == ("/custom", "svc", "svc")  # the unit's env wins
    assert unit_environment(AGENT_ENV, account=account)["HOME"] == "/srv/svc"


def test_is_dropped() -> None:
    assert is_dropped("SELFHEAL_ANYTHING")
    assert is_dropped("CREDENTIALS_DIRECTORY")
    assert not is_dropped("PATH")
    assert not is_dropped("XSELFHEAL_")
    assert not is_dropped("LANGUAGE")


def test_resolve_user() -> None:
    nobody = pwd.getpwnam("nobody")
    account = resolve_user("nobody", euid=0)
    assert (account.name, account.uid, account.gid) == ("nobody", nobody.pw_uid, nobody.pw_gid)
    assert nobody.pw_gid not in account.groups
    assert resolve_user(str(nobody.pw_uid), euid=0).name == "nobody"
    with pytest.raises(UnitError, match="'no-such-user-h5' does not exist"):
        resolve_user("no-such-user-h5", euid=0)
    with pytest.raises(UnitError, match="does not exist"):
        resolve_user("99999999999999999999", euid=0)
    with pytest.raises(UnitError, match="the agent runs as uid 1234, not root"):
        resolve_user("nobody", euid=1234)
    assert resolve_user("nobody", euid=nobody.pw_uid).uid == nobody.pw_uid  # already that user


def test_a_unit_with_a_user_works_in_a_directory_of_its_own(tmp_path: Path) -> None:
    plain = UnitConfig(name="a", command=["x"], progress_file="p.json")
    assert work_dir(plain, tmp_path) == tmp_path
    own = UnitConfig(name="b", command=["x"], user="nobody", progress_file="p.json")
    assert work_dir(own, tmp_path) == tmp_path / "work" / "b"
    assert progress_path(own, tmp_path) == tmp_path / "work" / "b" / "p.json"
    placed = UnitConfig(name="c", command=["x"], user="nobody", cwd="/srv/c")
    assert work_dir(placed, tmp_path) == Path("/srv/c")


# --- the agent's key ---------------------------------------------------------------------------------------


def test_the_agent_reads_its_credential_first(tmp_path: Path) -> None:
    write_key(tmp_path / "keys", "node-a")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / CREDENTIAL).write_text("cd" * 32 + "\n")
    env = {"CREDENTIALS_DIRECTORY": str(credentials), ENV_KEY: "ab" * 32}
    assert read_own_key(tmp_path / "keys", "node-a", env=env) == bytes.fromhex("cd" * 32)
    assert ENV_KEY not in env  # dropped whichever source won


def test_an_empty_credential_falls_back_to_the_file(tmp_path: Path) -> None:
    path = write_key(tmp_path / "keys", "node-a")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    from_file = bytes.fromhex(path.read_text().strip())
    assert read_own_key(tmp_path / "keys", "node-a", env=env) == from_file  # no command.key at all
    (credentials / CREDENTIAL).write_text(NO_KEY)  # SetCredential= default: the file was missing
    assert read_own_key(tmp_path / "keys", "node-a", env=env) == from_file
    (credentials / CREDENTIAL).write_text("zz" * 32)
    with pytest.raises(ConfigError, match="not hex") as caught:
        read_own_key(tmp_path / "keys", "node-a", env=env)
    assert "zz" not in str(caught.value)
    (credentials / CREDENTIAL).write_bytes(b"\xff" * 32)
    with pytest.raises(ConfigError, match="not hex"):
        read_own_key(tmp_path / "keys", "node-a", env=env)


def test_a_key_dir_the_agent_may_not_read_holds_no_key_when_it_has_credentials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered unit: /etc/selfheal/keys is root's and the controller's; no credential means no key."""
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / CREDENTIAL).write_text(NO_KEY)

    read_text = Path.read_text

    def denied(self: Path, encoding: str | None = None) -> str:
        if self.parent.name == "keys":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, encoding=encoding)

    monkeypatch.setattr(Path, "read_text", denied)
    assert read_own_key(tmp_path / "keys", "node-a", env={"CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")}
                        ) is None
    with pytest.raises(ConfigError, match="Permission denied"):
        read_own_key(tmp_path / "keys", "node-a", env={})


def test_the_deprecated_variable_leaves_os_environ_when_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_KEY, "ab" * 32)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert read_own_key(tmp_path, "node-a") == bytes.fromhex("ab" * 32)
    assert ENV_KEY not in os.environ
    assert read_own_key(tmp_path, "node-a") is None  # gone for good; no file either


# --- the rendered agent unit -----------------------------------------------------------------------------


def _agent_template() -> str:
    return (data_dir() / "selfheal-agent.service").read_text(encoding="utf-8")


def test_the_agent_unit_loads_this_nodes_key_as_a_credential() -> None:
    text = render_agent(_agent_template(), Config(agent=AgentConfig(node_id="node-a")))
    lines = text.splitlines()
    assert "LoadCredential=command.key:/etc/selfheal/keys/node-a.key" in lines
    assert f"SetCredential=command.key:{NO_KEY}" in lines
    assert not [line for line in lines if line.startswith("Environment=") and "KEY" in line]
    assert "MemoryMax=512M" in lines
    assert "TasksMax=4096" in lines
    assert "OOMPolicy=continue" in lines


def test_units_in_the_agents_cgroup_lift_its_memory_bound() -> None:
    config = Config(agent=AgentConfig(node_id="node-a", units=[UnitConfig(name="web", command=["x"])]))
    lines = render_agent(_agent_template(), config).splitlines()
    assert "MemoryMax=infinity" in lines
    assert "MemoryMax=512M" not in lines


def test_the_controller_unit_is_bounded() -> None:
    lines = (data_dir() / "selfheal-controller.service").read_text(encoding="utf-8").splitlines()
    assert "MemoryMax=2G" in lines
    assert "TasksMax=512" in lines
