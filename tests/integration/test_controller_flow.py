"""The controller's whole loop against a real Mosquitto, with a scripted agent on the other side.

The scripted agent speaks the wire protocol by hand, so these tests pin the
controller's side of the contract: incident opened from a unit exit, a signed
command with an idempotency key, verification on the agent's events, and the
bad-input paths (rejected, counted, loop keeps going).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import httpx
import pytest

from controller.app import Controller, running_controller
from selfheal import wire
from selfheal.config import load_config
from selfheal.keys import read_key, write_key
from tests.conftest import Broker, eventually, free_port
from tests.node_messages import signed

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, broker: Broker, **controller: str) -> Path:
    extra = "".join(f"{k} = {v}\n" for k, v in controller.items())
    path = tmp_path / "controller.toml"
    path.write_text(
        f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 2.0\n'
        f'[controller]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "{tmp_path / "state"}"\n'
        f"ack_timeout = 3.0\n{extra}"
        f'[security]\nkey_dir = "{tmp_path / "keys"}"\n')
    return path


def _host() -> wire.HostMetrics:
    return wire.HostMetrics(cpu_percent=1, load1=0, load5=0, load15=0, mem_total_bytes=1, mem_available_bytes=1,
                            mem_percent=1, swap_percent=0)


class ScriptedAgent:
    """Speaks for ``node``; signs what it sends with ``key``, as a real agent does (unsigned without one: for a
    controller with no keys)."""

    def __init__(self, client: aiomqtt.Client, node: str, key: bytes | None = None) -> None:
        self.client, self.node, self.session, self.seq, self.key = client, node, 1, 0, key

    async def send(self, channel: wire.NodeChannel, message: wire.SignedNodeMessage, *, retain: bool = False) -> None:
        await self.client.publish(wire.node_topic(self.node, channel), signed(message, channel, self.key), qos=1,
                                  retain=retain)

    async def birth(self) -> None:
        await self.send("status", wire.NodeStatus(node=self.node, state="online", session=self.session,
                                                  units=["web"], ts=time.time()), retain=True)

    async def report(self, unit: wire.UnitReport) -> None:
        self.seq += 1
        await self.send("report", wire.Report(node=self.node, session=self.session, seq=self.seq, ts=time.time(),
                                              host=_host(), units=[unit]))

    async def event(self, body: wire.EventBody) -> None:
        await self.send("events", wire.Event(node=self.node, session=self.session, ts=time.time(), body=body))


@pytest.fixture
async def mqtt_client(mosquitto: Broker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        yield client


def _running(pid: int, restarts: int = 0, healthy: bool = True) -> wire.UnitReport:
    probe = wire.ProbeState(kind="http", healthy=healthy, consecutive_failures=0 if healthy else 3,
                            failures_threshold=3)
    return wire.UnitReport(name="web", kind="process", state="running", pid=pid, restarts=restarts, probe=probe)


async def _api(controller: Controller, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
        return await http.get(path)


async def test_unit_exit_is_restarted_with_a_signed_command_and_verified(
        tmp_path: Path, mosquitto: Broker, mqtt_client: aiomqtt.Client) -> None:
    node = "flow-exit"
    write_key(tmp_path / "keys", node)
    key = read_key(tmp_path / "keys", node)
    assert key is not None
    config = load_config(_config(tmp_path, mosquitto, offline_after="60.0"))
    agent = ScriptedAgent(mqtt_client, node, key)
    await mqtt_client.subscribe(wire.node_topic(node, "commands"), qos=1)
    async with running_controller(config) as controller:
        await agent.birth()
        await agent.report(_running(pid=100))
        await eventually(lambda: controller.fleet.unit(node, "web") is not None, what="unit known")
        await agent.event(wire.UnitExited(unit="web", pid=100, exit_signal=9))

        async with asyncio.timeout(15):
            async for message in mqtt_client.messages:
                command = wire.decode_node_message(str(message.topic), bytes(message.payload))  # type: ignore[arg-type]
                break
        assert isinstance(command, wire.Command)
        assert wire.verify_command(command, key)
        assert command.step == wire.RestartUnit(unit="web")
        assert command.expires_at > time.time()

        incidents = [i for i in (await _api(controller, "/api/v1/incidents?state=open")).json()["items"]
                     if i["node"] == node]  # the session's broker holds other tests' retained nodes too
        assert [(i["kind"], i["node"], i["unit"]) for i in incidents] == [("unit_exited", node, "web")]

        await agent.event(wire.CommandResult(command_id=command.id, key=command.key, status="done"))
        await agent.event(wire.UnitStarted(unit="web", pid=101, restarts=1))
        await agent.event(wire.ProbeChanged(unit="web", probe=_running(101, 1).probe))  # type: ignore[arg-type]

        async def resolved() -> bool:
            return (await _api(controller, f"/api/v1/incidents/{incidents[0]['id']}")).json()["state"] == "resolved"
        await eventually(resolved, what="incident resolved")
        detail = (await _api(controller, f"/api/v1/incidents/{incidents[0]['id']}")).json()
        kinds = [e["kind"] for e in detail["timeline"]]
        assert kinds[0] == "opened"
        for expected in ("plan_proposed", "plan_running", "rechecked", "command_sent", "command_result", "verifying",
                         "plan_succeeded", "resolved"):
            assert expected in kinds
        assert detail["plans"][0]["state"] == "succeeded"


async def test_no_key_means_no_command_and_the_incident_says_why(
        tmp_path: Path, mosquitto: Broker, mqtt_client: aiomqtt.Client) -> None:
    node = "flow-nokey"
    config = load_config(_config(tmp_path, mosquitto))
    agent = ScriptedAgent(mqtt_client, node)
    async with running_controller(config) as controller:
        await agent.birth()
        await agent.report(_running(pid=100))
        await eventually(lambda: controller.fleet.unit(node, "web") is not None, what="unit known")
        await agent.event(wire.UnitExited(unit="web", pid=100, exit_code=1))

        async def said_why() -> bool:
            items = [i for i in (await _api(controller, "/api/v1/incidents?state=open")).json()["items"]
                     if i["node"] == node]
            if not items:
                return False
            detail = (await _api(controller, f"/api/v1/incidents/{items[0]['id']}")).json()
            return any("no signing key" in str(e["data"]) for e in detail["timeline"])
        await eventually(said_why, what="timeline explains the missing key")


async def test_bad_messages_are_counted_and_the_loop_keeps_going(
        tmp_path: Path, mosquitto: Broker, mqtt_client: aiomqtt.Client) -> None:
    node = "flow-bad"
    config = load_config(_config(tmp_path, mosquitto))
    agent = ScriptedAgent(mqtt_client, node)
    async with running_controller(config) as controller:
        topic = wire.node_topic(node, "report")
        await mqtt_client.publish(topic, b"{not json", qos=1)
        await mqtt_client.publish(topic, b'{"v": 2, "node": "flow-bad"}', qos=1)
        await mqtt_client.publish(topic, b"x" * (wire.MAX_PAYLOAD + 1), qos=1)
        spoofed = wire.NodeStatus(node="someone-else", state="online", session=1)
        await mqtt_client.publish(wire.node_topic(node, "status"), wire.encode(spoofed), qos=1)
        await mqtt_client.publish(f"selfheal/v1/p/0/nodes/{node}/status", wire.encode(spoofed), qos=1)

        def counted() -> bool:
            rejected = controller.metrics.rejected
            return all(rejected.labels(r)._value.get() >= n
                       for r, n in (("malformed", 2), ("oversized", 1), ("spoofed", 2)))
        await eventually(counted, what="rejections counted")
        await agent.birth()
        await eventually(lambda: node in controller.fleet.nodes, what="good message still accepted")
        metrics = (await _api(controller, "/metrics")).text
        assert 'selfheal_messages_rejected_total{reason="malformed"}' in metrics


async def test_the_controller_rides_out_a_broker_restart(tmp_path: Path, own_mosquitto: Broker) -> None:
    node = "flow-outage"
    config = load_config(_config(tmp_path, own_mosquitto))
    async with running_controller(config) as controller:
        assert (await _api(controller, "/readyz")).status_code == 200
        own_mosquitto.stop()
        await eventually(lambda: not controller.link.connected.is_set(), what="disconnect noticed")
        response = await _api(controller, "/readyz")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert (await _api(controller, "/healthz")).status_code == 200  # alive, just not ready

        own_mosquitto.start()
        await eventually(controller.link.connected.is_set, timeout=30, what="reconnected")
        async with aiomqtt.Client(own_mosquitto.host, own_mosquitto.port,
                                  protocol=aiomqtt.ProtocolVersion.V311) as client:
            await ScriptedAgent(client, node).birth()
        await eventually(lambda: node in controller.fleet.nodes, what="messages flow again after the outage")
        assert (await _api(controller, "/readyz")).status_code == 200
