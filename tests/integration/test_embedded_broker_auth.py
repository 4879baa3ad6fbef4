"""The embedded broker (amqtt) with a password file: identities and per-node topics, attacked for real.

Each test starts ``embedded_broker`` on a free port with the files ``init_broker`` wrote and talks to
it with real aiomqtt clients. Where a forged message must *not* arrive, a legitimate marker published
after it is awaited instead of sleeping: MQTT keeps one publisher's order, and the broker handles
one publisher's packets in order, so once the marker is in, the forgery would have been too.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest
import structlog.testing

from agent.app import AgentApp
from controller.app import running_controller
from controller.broker import LIMITATIONS, BrokerGuard, embedded_broker
from selfheal import wire
from selfheal.broker_setup import BrokerFiles, init_broker
from selfheal.config import AgentConfig, Config, ControllerConfig, MqttConfig, SecurityConfig, UnitConfig
from selfheal.keys import write_key
from tests.conftest import eventually, free_port

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
NODES = ["node-a", "node-b"]


class Fixture:
    def __init__(self, files: BrokerFiles, port: int, guard: BrokerGuard) -> None:
        self.files, self.port, self.guard = files, port, guard

    def password(self, user: str) -> str:
        return self.files.credentials[user].read_text().strip()

    @asynccontextmanager
    async def client(self, user: str | None, *, password: str | None = None, client_id: str | None = None,
                     will: aiomqtt.Will | None = None, clean: bool = True) -> AsyncIterator[aiomqtt.Client]:
        if user is not None and password is None:
            password = self.password(user)
        if client_id is None:
            client_id = f"selfheal-agent-{user}" if user in NODES else f"selfheal-controller-test-{user}"
        async with aiomqtt.Client(HOST, self.port, identifier=client_id, username=user, password=password,
                                  will=will, clean_session=clean, protocol=aiomqtt.ProtocolVersion.V311,
                                  timeout=5) as client:
            yield client


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Fixture]:
    port = free_port()
    files = init_broker(tmp_path / "broker", listen=f"{HOST}:{port}", nodes=NODES, broker_user=None)
    async with embedded_broker(HOST, port, password_file=str(files.passwords)) as guard:
        yield Fixture(files, port, guard)


async def _next(client: aiomqtt.Client, timeout: float = 10.0) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        return await anext(aiter(client.messages))


async def _until(client: aiomqtt.Client, topic: str, payload: bytes, timeout: float = 10.0) -> list[aiomqtt.Message]:
    """Every message up to and including the marker (``topic``, ``payload``)."""
    seen: list[aiomqtt.Message] = []
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            seen.append(message)
            if str(message.topic) == topic and bytes(message.payload) == payload:
                return seen
    raise AssertionError("message stream ended")


def _granted(result: object) -> list[int]:
    return [int(getattr(code, "value", code)) for code in result]  # type: ignore[attr-defined]


async def test_anonymous_and_wrong_passwords_are_refused(broker: Fixture) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with broker.client(None, client_id="anon"):
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with broker.client("node-a", password="not-the-password"):  # noqa: S106 - wrong on purpose
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with broker.client("mallory", password=broker.password("node-a"), client_id="mallory"):
            pass
    with pytest.raises(aiomqtt.MqttError):  # one node's password is not another's
        async with broker.client("node-b", password=broker.password("node-a")):
            pass
    async with broker.client("node-a"):
        pass
    assert broker.guard.refused["anonymous"] == 1
    assert broker.guard.refused["bad_credentials"] == 3


async def test_a_node_reaches_the_controller_on_its_own_topics(broker: Fixture) -> None:
    async with broker.client("controller") as ctl, broker.client("node-a") as node_a:
        for channel in ("status", "report", "digests", "events"):
            assert _granted(await ctl.subscribe(f"{wire.PREFIX}/p/+/nodes/+/{channel}", qos=1)) == [1]
        topic = wire.node_topic("node-a", "report")
        await node_a.publish(topic, b"report-1", qos=1)
        message = await _next(ctl)
        assert (str(message.topic), bytes(message.payload)) == (topic, b"report-1")


async def test_a_node_cannot_publish_as_another_node(broker: Fixture) -> None:
    async with broker.client("controller") as ctl, broker.client("node-a") as node_a, \
            broker.client("node-b") as node_b:
        await ctl.subscribe(f"{wire.PREFIX}/p/+/nodes/+/report", qos=1)
        await ctl.subscribe(f"{wire.PREFIX}/p/+/nodes/+/status", qos=1)
        forged = [wire.node_topic("node-b", channel) for channel in ("report", "status", "events", "digests")]
        forged += [f"{wire.PREFIX}/p/{wire.bucket_of('node-a')}/nodes/node-b/report",  # node-b in node-a's bucket
                   wire.node_topic("node-b", "commands"), wire.CONTROLLER_STATUS_TOPIC]
        for topic in forged:
            await node_a.publish(topic, b"forged", qos=1, retain=topic.endswith("/status"))
        await node_a.publish(wire.node_topic("node-a", "report"), b"marker-a", qos=1)
        seen = await _until(ctl, wire.node_topic("node-a", "report"), b"marker-a")
        assert [bytes(m.payload) for m in seen] == [b"marker-a"]
        await node_b.publish(wire.node_topic("node-b", "report"), b"marker-b", qos=1)
        seen = await _until(ctl, wire.node_topic("node-b", "report"), b"marker-b")
        assert [bytes(m.payload) for m in seen] == [b"marker-b"]
    # Nor did a forged retained status stay behind for the next controller.
    async with broker.client("node-b") as node_b, broker.client("controller") as late:
        await node_b.publish(wire.node_topic("node-b", "status"), b"online-b", qos=1, retain=True)
        await late.subscribe(f"{wire.PREFIX}/p/+/nodes/+/status", qos=1)
        seen = await _until(late, wire.node_topic("node-b", "status"), b"online-b")
        assert [bytes(m.payload) for m in seen] == [b"online-b"]
    assert broker.guard.denied["publish"] == len(forged)


async def test_a_node_cannot_read_another_nodes_commands(broker: Fixture) -> None:
    async with broker.client("controller") as ctl, broker.client("node-a") as node_a:
        for topic_filter in (wire.node_topic("node-b", "commands"), f"{wire.PREFIX}/p/+/nodes/+/commands",
                             f"{wire.PREFIX}/#", "#", f"{wire.PREFIX}/p/+/nodes/+/report"):
            assert _granted(await node_a.subscribe(topic_filter, qos=1)) == [128], topic_filter
        assert _granted(await node_a.subscribe(wire.node_topic("node-a", "commands"), qos=1)) == [1]
        await ctl.publish(wire.node_topic("node-b", "commands"), b"for-b", qos=1)
        await ctl.publish(wire.node_topic("node-a", "commands"), b"for-a", qos=1)
        seen = await _until(node_a, wire.node_topic("node-a", "commands"), b"for-a")
        assert [bytes(m.payload) for m in seen] == [b"for-a"]
        # The controller may not speak as a node either.
        assert _granted(await ctl.subscribe(wire.node_topic("node-a", "commands"), qos=1)) == [128]


async def test_a_last_will_only_goes_to_the_nodes_own_status(broker: Fixture) -> None:
    forged = aiomqtt.Will(wire.node_topic("node-b", "status"), b"offline-forged", qos=1, retain=True)
    with pytest.raises(aiomqtt.MqttError):
        async with broker.client("node-a", will=forged):
            pass
    own = aiomqtt.Will(wire.node_topic("node-a", "status"), b"offline-a", qos=1, retain=True)
    async with broker.client("node-a", will=own):
        pass
    assert broker.guard.refused["will_topic"] == 1


async def test_a_node_cannot_take_another_nodes_client_id(broker: Fixture) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with broker.client("node-a", client_id="selfheal-agent-node-b"):
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with broker.client("node-a", client_id="selfheal-controller-x"):
            pass
    assert broker.guard.refused["client_id"] == 2


async def test_a_stranger_cannot_hijack_a_connected_nodes_session(broker: Fixture) -> None:
    """amqtt touches the session of a CONNECT's client id before it authenticates; the guard does not."""
    will = aiomqtt.Will(wire.node_topic("node-a", "status"), b"offline-forged", qos=1, retain=True)
    async with broker.client("controller") as ctl, broker.client("node-a") as node_a:
        await ctl.subscribe(f"{wire.PREFIX}/p/+/nodes/+/status", qos=1)
        await node_a.subscribe(wire.node_topic("node-a", "commands"), qos=1)
        for clean in (False, True):
            with pytest.raises(aiomqtt.MqttError):
                async with broker.client(None, client_id="selfheal-agent-node-a", will=will, clean=clean):
                    pass
        # node-a still has its subscription and its connection ...
        await ctl.publish(wire.node_topic("node-a", "commands"), b"still-there", qos=1)
        assert bytes((await _next(node_a)).payload) == b"still-there"
        # ... and no forged will was published in its name.
        await node_a.publish(wire.node_topic("node-a", "status"), b"online-a", qos=1, retain=True)
        seen = await _until(ctl, wire.node_topic("node-a", "status"), b"online-a")
        assert [bytes(m.payload) for m in seen] == [b"online-a"]


async def test_retained_messages_follow_the_read_acl(broker: Fixture) -> None:
    """amqtt replays retained messages of every client's filters to a new connection, unchecked."""
    async with broker.client("controller") as ctl, broker.client("node-b") as node_b:
        await ctl.subscribe(f"{wire.PREFIX}/p/+/nodes/+/status", qos=1)
        await node_b.publish(wire.node_topic("node-b", "status"), b"online-b", qos=1, retain=True)
        await _until(ctl, wire.node_topic("node-b", "status"), b"online-b")
        await ctl.publish(wire.CONTROLLER_STATUS_TOPIC, b"controller-online", qos=1, retain=True)
        async with broker.client("node-a") as node_a:
            await node_a.subscribe(wire.CONTROLLER_STATUS_TOPIC, qos=1)
            seen = await _until(node_a, wire.CONTROLLER_STATUS_TOPIC, b"controller-online")
            assert [str(m.topic) for m in seen] == [wire.CONTROLLER_STATUS_TOPIC]


async def test_the_fleet_works_with_its_own_credentials(tmp_path: Path) -> None:
    port = free_port()
    files = init_broker(tmp_path / "broker", listen=f"{HOST}:{port}", nodes=["node-a"], broker_user=None)
    write_key(tmp_path / "keys", "node-a")
    security = SecurityConfig(key_dir=str(tmp_path / "keys"))
    controller = Config(
        mqtt=MqttConfig(url="embedded", embedded_listen=f"{HOST}:{port}", keepalive=2.0,
                        embedded_password_file=str(files.passwords), username="controller",
                        password_file=str(files.credentials["controller"])),
        controller=ControllerConfig(listen=f"{HOST}:{free_port()}", state_dir=str(tmp_path / "state")),
        security=security)
    agent = Config(
        mqtt=MqttConfig(url=f"mqtt://{HOST}:{port}", keepalive=2.0, reconnect_max=0.5, username="node-a",
                        password_file=str(files.credentials["node-a"])),
        agent=AgentConfig(node_id="node-a", interval=0.2, state_dir=str(tmp_path / "node-a"),
                          listen=f"{HOST}:0",
                          units=[UnitConfig(name="web", command=[sys.executable, "-c",
                                                                 "import time; time.sleep(600)"])]),
        security=security)
    async with running_controller(controller) as ctl:
        app = await AgentApp.open(agent)
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(app.run(stop=stop, ready=ready), name="agent-node-a")
        try:
            await eventually(lambda: "node-a" in ctl.fleet.nodes and ctl.fleet.nodes["node-a"].online
                             and ctl.fleet.unit("node-a", "web") is not None, what="node-a online with its unit")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            app.close()


async def test_what_the_broker_cannot_enforce_is_logged_once_at_start(tmp_path: Path) -> None:
    port = free_port()
    files = init_broker(tmp_path / "broker", listen=f"{HOST}:{port}", nodes=NODES, broker_user=None)
    with structlog.testing.capture_logs() as logs:
        async with embedded_broker(HOST, port, password_file=str(files.passwords)):
            pass
        async with embedded_broker(HOST, port):
            pass
    limits = [entry["limit"] for entry in logs if entry["event"] == "broker.limitation"]
    assert limits == [limit for limit, _, _ in LIMITATIONS] + ["anonymous"]
    started = [entry["auth"] for entry in logs if entry["event"] == "broker.started"]
    assert started == ["password file + per-node ACL", "anonymous"]
    secrets = [path.read_text().strip() for path in files.credentials.values()]
    assert not any(secret in repr(entry) for entry in logs for secret in secrets)
