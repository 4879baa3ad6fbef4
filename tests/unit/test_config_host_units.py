"""Config of the unit kinds another manager runs: ``docker`` (``[agent.units.docker]``) and ``systemd``
(``[agent.units.systemd]``); each key error names its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfheal.config import Config, DockerConfig, SystemdConfig, load_config
from selfheal.config_checks import systemd_service
from selfheal.errors import ConfigError

DOCKER = '[[agent.units]]\nname = "web"\nkind = "docker"\n'
SYSTEMD = '[[agent.units]]\nname = "predict"\nkind = "systemd"\n'


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "selfheal.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env={})


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def test_a_docker_unit_that_follows_a_container_someone_else_creates(tmp_path: Path) -> None:
    (unit,) = load(tmp_path, DOCKER + '[agent.units.docker]\ncontainer = "shop_web_1"\n'
                   'url = "tcp://127.0.0.1:2375"\n').agent.units
    assert unit.kind == "docker"
    assert unit.docker == DockerConfig(container="shop_web_1", url="tcp://127.0.0.1:2375")
    assert (unit.docker.poll, unit.docker.stats_interval, unit.docker.image) == (0.5, 5.0, None)


def test_a_docker_unit_the_agent_creates_from_an_image(tmp_path: Path) -> None:
    (unit,) = load(tmp_path, DOCKER + 'command = ["httpd", "-f", "-p", "8080"]\nenv = {MODE = "prod"}\n'
                   '[agent.units.docker]\ncontainer = "web"\nimage = "localhost/busybox:test"\nnetwork = "host"\n'
                   'ports = {"80/tcp" = "127.0.0.1:8080"}\nvolumes = ["/srv/models:/models:ro"]\n'
                   'ulimits = {nofile = [1024, 1024], nproc = [512, 1024]}\nlabels = {team = "ml"}\n'
                   'user = "1000:1000"\n').agent.units
    assert unit.docker is not None
    assert unit.docker.ulimits == {"nofile": [1024, 1024], "nproc": [512, 1024]}
    assert unit.docker.ports == {"80/tcp": "127.0.0.1:8080"}


def test_a_systemd_unit_names_its_service(tmp_path: Path) -> None:
    (unit,) = load(tmp_path, SYSTEMD + '[agent.units.systemd]\nunit = "predict.service"\njob_timeout = 5.0\n'
                   ).agent.units
    assert unit.systemd == SystemdConfig(unit="predict.service", job_timeout=5.0)


@pytest.mark.parametrize(("name", "full"), [
    ("predict", "predict.service"), ("predict.service", "predict.service"),
    ("worker@3", "worker@3.service"), ("worker@a.b.service", "worker@a.b.service"), ("backup.timer", "backup.timer"),
])
def test_a_bare_service_name_gets_its_suffix_as_systemctl_would(name: str, full: str) -> None:
    assert systemd_service(name) == full


@pytest.mark.parametrize(("text", "path", "message"), [
    (DOCKER, "agent.units[0].docker", "needs [docker]"),
    (DOCKER + 'command = ["x"]\n[agent.units.docker]\ncontainer = "web"\n', "agent.units[0].command",
     "set docker.image"),
    (DOCKER + '[agent.units.docker]\ncontainer = "web"\nnetwork = "host"\n', "agent.units[0].docker.network",
     "set docker.image"),
    (DOCKER + 'cwd = "/srv"\n[agent.units.docker]\ncontainer = "web"\n', "agent.units[0].cwd", "WORKDIR"),
    (DOCKER + '[agent.units.docker]\ncontainer = "-rm"\n', "agent.units[0].docker.container", "not a container name"),
    (DOCKER + '[agent.units.docker]\ncontainer = "web"\nurl = "/var/run/docker.sock"\n',
     "agent.units[0].docker.url", "unix:///"),
    (DOCKER + '[agent.units.docker]\ncontainer = "web"\npoll = 0\n', "agent.units[0].docker", "must be > 0"),
    (DOCKER + '[agent.units.docker]\ncontainer = "web"\nstats_interval = -1\n',
     "agent.units[0].docker.stats_interval", ">= 0"),
    (DOCKER + '[agent.units.docker]\ncontainer = "web"\nimage = "i"\nulimits = {nofile = [2048, 1024]}\n',
     "agent.units[0].docker.ulimits.nofile", "soft <= hard"),
    (DOCKER + '[agent.units.docker]\ncontainer = "web"\nimage = "i"\nvolumes = ["data"]\n',
     "agent.units[0].docker.volumes", "not SOURCE:/container/path"),
    (DOCKER + '[agent.units.docker]\ncontainer = "web"\nimage = "i"\nports = {"http" = "80"}\n',
     "agent.units[0].docker.ports", "container port"),
    (DOCKER + '[agent.units.docker]\ncontainer = "web"\nimage = "i"\nports = {"80" = "0.0.0.0:x"}\n',
     "agent.units[0].docker.ports.80", "host PORT"),
    (DOCKER + '[agent.units.docker]\ncontainer = "web"\ncolour = "blue"\n', "agent.units[0].docker.colour",
     "unknown key"),
    (SYSTEMD, "agent.units[0].systemd", "needs [systemd]"),
    (SYSTEMD + '[agent.units.systemd]\nunit = "backup.timer"\n', "agent.units[0].systemd.unit", "service name"),
    (SYSTEMD + '[agent.units.systemd]\nunit = "--force.service"\n', "agent.units[0].systemd.unit", "service name"),
    (SYSTEMD + '[agent.units.systemd]\nunit = "a b"\n', "agent.units[0].systemd.unit", "service name"),
    (SYSTEMD + '[agent.units.systemd]\nunit = "p"\npoll = 0\n', "agent.units[0].systemd.poll", "> 0"),
    (SYSTEMD + '[agent.units.systemd]\nunit = "p"\njob_timeout = -1\n', "agent.units[0].systemd.job_timeout",
     "> 0"),
    (SYSTEMD + 'command = ["x"]\n[agent.units.systemd]\nunit = "p"\n', "agent.units[0].command", "unit file"),
    ('[[agent.units]]\nname = "web"\ncommand = ["x"]\n[agent.units.docker]\ncontainer = "web"\n',
     "agent.units[0].docker", "only a docker unit"),
    (DOCKER + '[agent.units.docker]\ncontainer = "web"\n[agent.units.systemd]\nunit = "p"\n',
     "agent.units[0].systemd", "only a systemd unit"),
])
def test_bad_host_unit_keys_name_their_path(tmp_path: Path, text: str, path: str, message: str) -> None:
    err = error(tmp_path, text)
    assert err.path == path
    assert message in str(err)
