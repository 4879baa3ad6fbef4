"""The demo's configs are valid configs: the pipeline layout and the benchmark's web layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfheal.config import load_config
from selfheal.demo_layout import write_configs


@pytest.mark.parametrize("pipeline", [True, False])
def test_every_config_the_demo_writes_loads(tmp_path: Path, pipeline: bool) -> None:
    layout = write_configs(tmp_path, pipeline=pipeline)
    load_config(layout.controller, env={}, role="controller")
    units = {node: [u.name for u in load_config(path, env={}, role="agent").agent.units]
             for node, path in layout.agents.items()}
    if pipeline:
        assert units == {"node-a": ["generate", "etl", "train", "predict"], "node-b": ["predict"], "node-c": []}
        standby = load_config(layout.agents["node-b"], env={}, role="agent").agent.units[0]
        assert not standby.autostart
        assert standby.stop_after_disconnect is not None
    else:
        assert units == {"node-a": ["web"], "node-b": ["web"], "node-c": []}
    assert layout.service == ("predict" if pipeline else "web")


def test_the_demo_broker_requires_each_process_to_log_in_as_itself(tmp_path: Path) -> None:
    from controller.broker import read_password_file  # noqa: PLC0415 - the embedded broker reads the file
    from selfheal.broker_setup import verify_password  # noqa: PLC0415

    layout = write_configs(tmp_path, pipeline=False)
    controller = load_config(layout.controller, env={}, role="controller").mqtt
    assert (controller.url, controller.username) == ("embedded", "controller")
    assert controller.embedded_password_file is not None
    users = read_password_file(controller.embedded_password_file)
    assert sorted(users) == ["controller", *sorted(layout.agents)]
    for node, path in [("controller", layout.controller), *layout.agents.items()]:
        mqtt = load_config(path, env={}, role="controller" if node == "controller" else "agent").mqtt
        assert mqtt.username == node
        assert mqtt.password_file is not None
        assert verify_password(users[node], Path(mqtt.password_file).read_text().strip())


def test_an_external_broker_is_used_as_it_is(tmp_path: Path) -> None:
    layout = write_configs(tmp_path, broker_url="mqtt://127.0.0.1:1883", pipeline=False)
    assert layout.broker is None
    for path in layout.agents.values():
        mqtt = load_config(path, env={}, role="agent").mqtt
        assert (mqtt.url, mqtt.username, mqtt.password_file) == ("mqtt://127.0.0.1:1883", "", None)
