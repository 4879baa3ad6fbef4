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
