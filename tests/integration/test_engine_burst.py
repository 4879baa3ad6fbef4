"""A burst: many nodes go dark at once. Every one gets its incident, each with an intact audit chain, though the
engine applies the incidents' effects side by side (their store writes share commits)."""

from __future__ import annotations

import time
from pathlib import Path

import aiomqtt
import pytest

from controller.app import running_controller
from controller.audit import verify_database
from selfheal import wire
from selfheal.config import load_config
from selfheal.keys import read_key, write_key
from tests.conftest import Broker, eventually, free_port
from tests.integration.test_controller_flow import ScriptedAgent, _running

pytestmark = pytest.mark.integration
NODES = 30


async def test_a_rack_going_dark_opens_one_incident_per_node_each_with_its_chain(tmp_path: Path,
                                                                               mosquitto: Broker) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(
        f'[mqtt]\nurl = "{mosquitto.url}"\nkeepalive = 2.0\n'
        f'[controller]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'offline_after = 60.0\n[security]\nkey_dir = "{tmp_path / "keys"}"\n')
    names = [f"rack-{i:02}" for i in range(NODES)]
    for name in names:
        write_key(tmp_path / "keys", name)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V311) as client, \
            running_controller(load_config(path)) as controller:
        agents = [ScriptedAgent(client, name, read_key(tmp_path / "keys", name)) for name in names]
        for agent in agents:
            await agent.birth()
            await agent.report(_running(pid=10))
        await eventually(lambda: all(controller.fleet.unit(n, "web") is not None for n in names), timeout=30,
                         what="every node known")
        for agent in agents:  # the rack loses power: every last will at once
            await agent.send("status", wire.NodeStatus(node=agent.node, state="offline", session=agent.session,
                                                       ts=time.time()), retain=True)
        engine = controller.engine
        assert engine is not None
        await eventually(lambda: len(engine.reconciler.incidents) == NODES
                         and all(i.id is not None for i in engine.reconciler.incidents.values()),
                         timeout=30, what="an incident per node")
        assert {i.symptom.node for i in engine.reconciler.incidents.values()} == set(names)
        for name in names:  # leave the shared broker as found: other tests' controllers would see these nodes
            await client.publish(wire.node_topic(name, "status"), b"", qos=1, retain=True)
    incidents, problems = verify_database(tmp_path / "state" / "selfheal.sqlite3")
    assert incidents == NODES
    assert problems == []
