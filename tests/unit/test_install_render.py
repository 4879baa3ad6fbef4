"""Rendering units and the polkit rule for a venv, and the pure helpers of the service lifecycle."""

from __future__ import annotations

import pytest

from selfheal.config import AgentConfig, Config, DatasetConfig, LogConfig, MqttConfig, SystemdConfig, UnitConfig
from selfheal.install import Layout, agent_writable, render_polkit, render_unit, systemd_units, under_home
from selfheal.sdnotify import watchdog_period
from selfheal.service import ReloadOutcome, changed_keys

TEMPLATE = """\
[Service]
ExecStart=/opt/selfheal/venv/bin/selfheal agent --config /etc/selfheal/agent.toml
ProtectSystem=strict
ProtectHome=yes
"""


def test_render_unit_for_a_venv_outside_home() -> None:
    layout = Layout(executable="/opt/sh/venv/bin/selfheal", read_paths=("/opt/sh/venv", "/usr"))
    text = render_unit(TEMPLATE, layout)
    assert "ExecStart=/opt/sh/venv/bin/selfheal agent --config /etc/selfheal/agent.toml" in text
    assert "ProtectHome=yes" in text
    assert "ReadWritePaths" not in text


def test_render_unit_under_home_binds_only_what_it_needs() -> None:
    layout = Layout(executable="/home/ops/venv/bin/selfheal", read_paths=("/home/ops/venv", "/root/.pyenv/v", "/usr"))
    text = render_unit(TEMPLATE, layout, writable=["/srv/models", "/home/ops/data set"])
    lines = text.splitlines()
    assert "ProtectHome=yes" not in lines
    assert "ProtectHome=tmpfs" in lines
    assert "BindReadOnlyPaths=/home/ops/venv" in lines
    assert "BindReadOnlyPaths=/root/.pyenv/v" in lines
    assert "BindReadOnlyPaths=/usr" not in lines
    assert 'BindPaths=-"/home/ops/data set"' in lines
    assert 'ReadWritePaths=-/srv/models -"/home/ops/data set"' in lines


def test_render_unit_under_tmp_binds_it_into_the_private_tmp() -> None:
    """A CI clone under /tmp: PrivateTmp=yes would hide the venv from the service."""
    layout = Layout(executable="/tmp/ci/.venv/bin/selfheal", read_paths=("/tmp/ci", "/root/.pyenv/v"))
    text = render_unit(TEMPLATE + "PrivateTmp=yes\n", layout, writable=["/var/tmp/data"])
    lines = text.splitlines()
    assert "PrivateTmp=yes" in lines
    assert "BindReadOnlyPaths=/tmp/ci" in lines
    assert "BindPaths=-/var/tmp/data" in lines
    assert lines.index("PrivateTmp=yes") < lines.index("BindReadOnlyPaths=/tmp/ci")


def test_under_home() -> None:
    assert under_home("/root")
    assert under_home("/home/x")
    assert under_home("/run/user/1000/v")
    assert not under_home("/rooted")
    assert not under_home("/opt/home")


def test_agent_writable_paths_come_from_the_config() -> None:
    config = Config(agent=AgentConfig(
        node_id="n1", state_dir="/data/agent/",
        datasets=[DatasetConfig(name="model", path="/srv/models/current")],
        units=[UnitConfig(name="etl", command=["x"], cwd="/srv/etl"),
               UnitConfig(name="rel", command=["x"], cwd="rel")]))
    assert agent_writable(config) == ["/srv/models/current", "/srv/etl", "/data/agent"]
    assert agent_writable(Config(agent=AgentConfig(node_id="n1"))) == []


def test_polkit_rule_lists_exactly_the_systemd_units() -> None:
    template = 'polkit.addRule(function (action, subject) {\n    var units = [];\n    return 1;\n});\n'
    rendered = render_polkit(template, ["nginx.service", 'we"ird.service'])
    assert '    var units = ["nginx.service", "we\\"ird.service"];' in rendered.splitlines()
    assert render_polkit(template, []) == template


def test_systemd_units_are_the_units_of_kind_systemd() -> None:
    config = Config(agent=AgentConfig(node_id="n1", units=[
        UnitConfig(name="web", command=["x"]),
        UnitConfig(name="db", kind="systemd", systemd=SystemdConfig(unit="postgresql")),
        UnitConfig(name="cache", kind="systemd", systemd=SystemdConfig(unit="redis@main.service"))]))
    assert systemd_units(config) == ["postgresql.service", "redis@main.service"]
    assert systemd_units(Config(agent=AgentConfig(node_id="n1", units=[UnitConfig(name="web", command=["x"])]))) == []


def test_changed_keys_names_paths_never_values() -> None:
    old = Config(mqtt=MqttConfig(url="mqtt://a:1"), agent=AgentConfig(node_id="n1", units=[
        UnitConfig(name="a", command=["x"]), UnitConfig(name="b", command=["y"])]))
    new = Config(mqtt=MqttConfig(url="mqtt://b:1"), log=LogConfig(level="debug"), agent=AgentConfig(
        node_id="n1", units=[UnitConfig(name="a", command=["x"]), UnitConfig(name="b", command=["z"])]))
    assert changed_keys(old, new) == ["mqtt.url", "agent.units[1].command[0]", "log.level"]
    shorter = Config(mqtt=old.mqtt, agent=AgentConfig(node_id="n1", units=old.agent.units[:1]))
    assert changed_keys(old, shorter) == ["agent.units"]
    assert changed_keys(old, old) == []


def test_reload_outcome_summary() -> None:
    assert ReloadOutcome(ok=True).summary() == "config reloaded: no change"
    assert ReloadOutcome(ok=True, changed=("log.level", "mqtt.url"), applied=("log",), restart=("mqtt.url",)
                         ).summary() == "config reloaded: applied log; restart needed for mqtt.url"
    assert ReloadOutcome(ok=False, error="x: bad").summary() == (
        "config reload failed, still running the previous config: x: bad")


@pytest.mark.parametrize(("env", "pid", "period"), [
    ({}, 1, None),
    ({"WATCHDOG_USEC": "30000000"}, 1, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, 1, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "2"}, 1, None),
    ({"WATCHDOG_USEC": "0"}, 1, None),
    ({"WATCHDOG_USEC": "soon"}, 1, None),
])
def test_watchdog_period(env: dict[str, str], pid: int, period: float | None) -> None:
    assert watchdog_period(env, pid=pid) == period
