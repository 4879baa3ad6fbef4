"""A real Mosquitto started with the configuration ``selfheal broker init`` wrote: anonymous and wrong
passwords refused, each node confined to its own topics, the fleet working with its own credentials
(plain and over TLS with the generated CA), and the password never in a log line, the API or /metrics."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import httpx
import pytest
import structlog

from agent.app import AgentApp
from controller.app import running_controller
from selfheal import wire
from selfheal.broker_setup import BrokerFiles, add_node, init_broker, make_ca, make_server_cert
from selfheal.config import AgentConfig, Config, ControllerConfig, LogConfig, MqttConfig, SecurityConfig, UnitConfig
from selfheal.errors import ConfigError
from selfheal.keys import write_key
from selfheal.logs import configure_logging
from selfheal.mqtt import MqttLink, tls_context
from tests.conftest import Broker, eventually, free_port

pytestmark = pytest.mark.integration

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
NODES = ["node-a", "node-b"]


@dataclass
class Setup:
    files: BrokerFiles
    broker: Broker

    def password(self, user: str) -> str:
        return self.files.credentials[user].read_text().strip()

    def mqtt(self, user: str, **extra: object) -> MqttConfig:
        fields: dict[str, object] = {
            "url": self.files.url, "username": user, "password_file": str(self.files.credentials[user]),
            "tls_ca": str(self.files.tls_ca) if self.files.tls_ca else None, "keepalive": 5.0,
            "reconnect_max": 0.5, **extra}
        return MqttConfig(**fields)  # type: ignore[arg-type]

    def client(self, user: str | None, password: str | None = None, *,
               context: ssl.SSLContext | None = None) -> aiomqtt.Client:
        if context is None and self.files.tls_ca is not None:
            context = client_context(self.files.tls_ca)
        return aiomqtt.Client(self.broker.host, self.broker.port, identifier=f"t-{uuid.uuid4().hex[:10]}",
                              username=user, password=password if password is not None or user is None
                              else self.password(user), tls_context=context, timeout=5,
                              protocol=aiomqtt.ProtocolVersion.V311)


def client_context(ca: Path | None) -> ssl.SSLContext:
    """selfheal's own client context (its sockets close when a handshake fails)."""
    return tls_context(MqttConfig(url="mqtts://127.0.0.1:8883", tls_ca=str(ca) if ca else None))


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A directory the broker's user can reach: started as root, Mosquitto drops to ``mosquitto``
    (pytest's own tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="selfheal-broker-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(directory: Path, *, tls: bool = False, **options: object) -> Setup:
    port = free_port()
    files = init_broker(directory / "broker", listen=f"127.0.0.1:{port}", nodes=NODES, tls=tls,
                        **options)  # type: ignore[arg-type]
    broker = Broker("127.0.0.1", port, None, files.conf)  # type: ignore[arg-type]
    broker.start()
    return Setup(files, broker)


@pytest.fixture
def plain(broker_dir: Path) -> Iterator[Setup]:
    setup = start(broker_dir)
    yield setup
    setup.broker.stop()


@pytest.fixture
def secured(broker_dir: Path) -> Iterator[Setup]:
    setup = start(broker_dir, tls=True)
    yield setup
    setup.broker.stop()


class Inbox:
    """A subscribed client's messages."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.task: asyncio.Task[None] | None = None

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.messages]


@asynccontextmanager
async def listening(client: aiomqtt.Client, filters: list[str]) -> AsyncIterator[Inbox]:
    inbox = Inbox()
    async with client:
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=1)

        async def read() -> None:
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                inbox.messages.append((str(message.topic), payload))

        inbox.task = asyncio.create_task(read())
        try:
            yield inbox
        finally:
            inbox.task.cancel()
            with suppress(asyncio.CancelledError):
                await inbox.task


async def refused(client: aiomqtt.Client) -> str:
    with pytest.raises(aiomqtt.MqttError) as info:
        async with client:
            pass
    return str(info.value)


# --- who may connect --------------------------------------------------------------------------------


async def test_anonymous_and_wrong_passwords_are_refused(plain: Setup) -> None:
    assert "authori" in (await refused(plain.client(None))).lower()
    await refused(plain.client("node-a", "not-the-password"))
    await refused(plain.client("node-a", plain.password("node-b")))  # another node's password
    await refused(plain.client("nobody", "x"))
    async with plain.client("node-a"):
        pass


# --- what each identity may do ----------------------------------------------------------------------


async def test_a_node_cannot_publish_another_nodes_topics(plain: Setup) -> None:
    channels: tuple[wire.NodeChannel, ...] = ("status", "report", "digests", "events")
    filters = [f"{wire.PREFIX}/p/+/nodes/+/{c}" for c in channels]
    real = plain.client("controller")  # one connection per user: the broker's client id is the user name
    async with listening(real, filters) as controller, \
            listening(plain.client("node-b"), [wire.CONTROLLER_STATUS_TOPIC,
                                               wire.node_topic("node-b", "commands")]) as node_b:
        async with plain.client("node-a") as attacker:
            for channel in channels:
                await attacker.publish(wire.node_topic("node-b", channel), b"forged", qos=1, retain=True)
            # Forged commands, for itself and for node-b, and a forged controller status.
            await attacker.publish(wire.node_topic("node-a", "commands"), b"forged", qos=1)
            await attacker.publish(wire.node_topic("node-b", "commands"), b"forged", qos=1)
            await attacker.publish(wire.CONTROLLER_STATUS_TOPIC, b"forged", qos=1, retain=True)
            # Same connection, QoS 1, so once these arrive everything before them was dealt with.
            for channel in channels:
                await attacker.publish(wire.node_topic("node-a", channel), b"own", qos=1)
        await real.publish(wire.node_topic("node-b", "commands"), b"real", qos=1)
        await real.publish(wire.CONTROLLER_STATUS_TOPIC, b"real", qos=1, retain=True)

        await eventually(lambda: len(controller.messages) >= 4, what="node-a's own messages")
        await eventually(lambda: len(node_b.messages) >= 2, what="the controller's messages")
        assert sorted(controller.topics()) == sorted(wire.node_topic("node-a", c) for c in channels)
        assert all(payload == b"own" for _, payload in controller.messages)
        assert node_b.messages == [(wire.node_topic("node-b", "commands"), b"real"),
                                   (wire.CONTROLLER_STATUS_TOPIC, b"real")]
    # Nothing forged was retained either: a late subscriber sees only the controller's own status.
    async with listening(plain.client("controller"), filters) as late, \
            listening(plain.client("node-b"), [wire.CONTROLLER_STATUS_TOPIC]) as late_b:
        await eventually(lambda: bool(late_b.messages), what="retained controller status")
        assert late_b.messages == [(wire.CONTROLLER_STATUS_TOPIC, b"real")]
        assert late.messages == []


async def test_a_node_cannot_take_over_another_nodes_session(plain: Setup) -> None:
    """A takeover by client id would disconnect node-a (which then fences its movable units): the broker
    uses the user name as the client id, so node-b's login claiming node-a's client id stays node-b."""
    victim = aiomqtt.Client(plain.broker.host, plain.broker.port, identifier="selfheal-agent-node-a",
                            username="node-a", password=plain.password("node-a"), timeout=5,
                            protocol=aiomqtt.ProtocolVersion.V311)
    own = wire.node_topic("node-a", "commands")
    async with listening(victim, [own]) as node_a:
        thief = aiomqtt.Client(plain.broker.host, plain.broker.port, identifier="selfheal-agent-node-a",
                               username="node-b", password=plain.password("node-b"), timeout=5,
                               protocol=aiomqtt.ProtocolVersion.V311)
        async with thief:
            pass
        async with plain.client("controller") as controller:
            await controller.publish(own, b"still here", qos=1)
        await eventually(lambda: bool(node_a.messages), what="node-a still connected and subscribed")
        assert node_a.task is not None
        assert not node_a.task.done(), "node-a's connection was taken over"


async def test_a_node_cannot_read_another_nodes_commands(plain: Setup) -> None:
    async with listening(plain.client("node-a"), [wire.node_topic("node-b", "commands"), f"{wire.PREFIX}/#",
                                                  wire.node_topic("node-a", "commands")]) as spy:
        async with plain.client("node-b") as node_b:
            await node_b.publish(wire.node_topic("node-b", "status"), b"b-status", qos=1, retain=True)
            await node_b.publish(wire.node_topic("node-b", "report"), b"b-report", qos=1)
        async with plain.client("controller") as controller:
            await controller.publish(wire.node_topic("node-b", "commands"), b"for-b", qos=1)
            await controller.publish(wire.node_topic("node-a", "commands"), b"for-a", qos=1)
        await eventually(lambda: (wire.node_topic("node-a", "commands"), b"for-a") in spy.messages,
                         what="node-a's own command")
        assert all(payload == b"for-a" for _, payload in spy.messages), spy.messages


async def test_a_node_added_later_gets_in_after_a_reload(plain: Setup) -> None:
    await refused(plain.client("node-c", "x"))
    path, changed = add_node(plain.files.directory, "node-c")
    assert changed
    os.kill(plain.broker.process.pid, signal.SIGHUP)
    password = path.read_text().strip()

    async def gets_in() -> bool:
        try:
            async with plain.client("node-c", password):
                return True
        except aiomqtt.MqttError:
            return False
    await eventually(gets_in, what="node-c admitted after SIGHUP")
    async with listening(plain.client("controller"), [f"{wire.PREFIX}/p/+/nodes/+/status"]) as controller:
        async with plain.client("node-c", password) as node_c:
            await node_c.publish(wire.node_topic("node-a", "status"), b"forged", qos=1)
            await node_c.publish(wire.node_topic("node-c", "status"), b"own", qos=1)
        await eventually(lambda: bool(controller.messages), what="node-c's status")
        assert controller.messages == [(wire.node_topic("node-c", "status"), b"own")]


# --- the fleet with its own credentials -----------------------------------------------------------


@asynccontextmanager
async def running_agent(config: Config) -> AsyncIterator[AgentApp]:
    app = await AgentApp.open(config)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(app.run(stop=stop, ready=ready), name=f"agent-{config.agent.node_id}")
    try:
        await eventually(lambda: ready.is_set() or task.done(), what="agent ready")
        if task.done():
            task.result()
        yield app
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        app.close()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line (structlog and the libraries' stdlib logging, paho's included) at debug."""
    out = io.StringIO()
    configure_logging(LogConfig(level="debug", format="json"), stream=out)
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.DEBUG)
    yield out
    root.removeHandler(handler)
    root.setLevel(previous)
    structlog.reset_defaults()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_the_fleet_heals_with_its_own_credentials(broker_dir: Path, tmp_path: Path, tls: bool,
                                                        captured_logs: io.StringIO) -> None:
    setup = start(broker_dir, tls=tls)
    try:
        node = "node-a"
        write_key(tmp_path / "keys", node)
        security = SecurityConfig(key_dir=str(tmp_path / "keys"))
        controller_config = Config(
            mqtt=setup.mqtt("controller"), security=security,
            controller=ControllerConfig(listen=f"127.0.0.1:{free_port()}", state_dir=str(tmp_path / "state"),
                                        offline_after=60.0, ack_timeout=5.0))
        agent_config = Config(
            mqtt=setup.mqtt(node), security=security,
            agent=AgentConfig(node_id=node, interval=0.2, state_dir=str(tmp_path / node), listen="127.0.0.1:0",
                              units=[UnitConfig(name="web", command=SLEEPER, stop_grace=2)]))
        async with running_controller(controller_config) as controller, running_agent(agent_config) as agent:
            await eventually(lambda: (s := controller.fleet.snapshot(node)) is not None and s.online,
                             what="node-a online at the controller")
            unit = agent.supervisor.entries["web"].unit
            await eventually(lambda: controller.fleet.unit(node, "web") is not None, what="unit reported")
            old_pid = unit.pid
            assert old_pid is not None
            os.kill(old_pid, signal.SIGKILL)  # the controller answers with a signed restart through the broker
            await eventually(lambda: unit.pid not in (None, old_pid), timeout=30, what="the unit restarted")
            async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
                exposed = (await http.get("/metrics")).text + (await http.get("/api/v1/nodes")).text
        assert node in exposed
        for user in ("controller", node):
            secret = setup.password(user)
            assert secret not in exposed
            assert secret not in captured_logs.getvalue()
    finally:
        setup.broker.stop()


# --- TLS ------------------------------------------------------------------------------------------


async def test_tls_verifies_the_broker_against_the_generated_ca(secured: Setup, tmp_path: Path) -> None:
    assert secured.files.url.startswith("mqtts://")
    link = MqttLink.from_config(secured.mqtt("node-a"), client_id="tls-ok")
    stop = asyncio.Event()

    async def subscribe(link: MqttLink) -> None:
        await link.subscribe(wire.CONTROLLER_STATUS_TOPIC)

    received: list[bytes] = []

    async def handle(_topic: str, payload: bytes) -> None:
        received.append(payload)

    task = asyncio.create_task(link.run(stop=stop, handle=handle, on_connect=subscribe))
    try:
        await eventually(link.connected.is_set, what="TLS connection")
        async with secured.client("controller") as controller:
            await controller.publish(wire.CONTROLLER_STATUS_TOPIC, b"over-tls", qos=1)
        await eventually(lambda: received == [b"over-tls"], what="a message over TLS")
    finally:
        stop.set()
        await task

    # Plain MQTT to the TLS listener, and TLS with the wrong CA, get nowhere.
    wrong_ca = tmp_path / "other-ca.pem"
    wrong_ca.write_bytes(make_ca("not the broker's CA")[0])
    await refused(secured.client("node-a", context=client_context(wrong_ca)))
    await refused(secured.client("node-a", context=client_context(None)))  # the system's CAs
    await refused(aiomqtt.Client(secured.broker.host, secured.broker.port, username="node-a",
                                 password=secured.password("node-a"), timeout=3))  # no TLS at all
    wrong = MqttLink.from_config(secured.mqtt("node-a", tls_ca=str(wrong_ca)), client_id="tls-wrong-ca")
    assert "CERTIFICATE_VERIFY_FAILED" in await never_connects(wrong)
    insecure = MqttLink.from_config(secured.mqtt("node-a", tls_ca=str(wrong_ca), tls_insecure=True),
                                    client_id="tls-insecure-wrong-ca")
    assert "CERTIFICATE_VERIFY_FAILED" in await never_connects(insecure)  # insecure skips the name only


async def never_connects(link: MqttLink, attempts: int = 2) -> str:
    """Run ``link`` until it failed ``attempts`` times; the errors it logged."""
    errors: list[str] = []
    original = link.log

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(original, name)

        def warning(self, event: str, **kw: object) -> None:
            errors.append(str(kw.get("error")))

    link.log = Spy()
    stop = asyncio.Event()

    async def nothing(*_: object) -> None:
        return None

    task = asyncio.create_task(link.run(stop=stop, handle=nothing, on_connect=nothing))
    try:
        await eventually(lambda: len(errors) >= attempts, what="failed connection attempts")
        assert link.connects == 0
    finally:
        stop.set()
        await task
    return " ".join(errors)


async def test_the_host_name_is_checked_unless_tls_insecure(broker_dir: Path, tmp_path: Path) -> None:
    ca, ca_key = make_ca("operator CA")
    cert, key = make_server_cert(ca, ca_key, ["broker.elsewhere.example"])
    for name, data in (("ca.pem", ca), ("server.pem", cert), ("server.key", key)):
        (broker_dir / name).write_bytes(data)
    (broker_dir / "server.key").chmod(0o644)  # the broker's user reads it (a test key)
    setup = start(broker_dir, server_cert=broker_dir / "server.pem", server_key=broker_dir / "server.key",
                  ca_cert=broker_dir / "ca.pem")
    try:
        assert setup.files.tls_ca == broker_dir / "ca.pem"
        mismatch = MqttLink.from_config(setup.mqtt("node-a"), client_id="tls-name")
        assert "CERTIFICATE_VERIFY_FAILED" in await never_connects(mismatch)
        insecure = MqttLink.from_config(setup.mqtt("node-a", tls_insecure=True), client_id="tls-insecure")
        stop = asyncio.Event()

        async def nothing(*_: object) -> None:
            return None

        task = asyncio.create_task(insecure.run(stop=stop, handle=nothing, on_connect=nothing))
        await eventually(insecure.connected.is_set, what="connected without the name check")
        stop.set()
        await task
    finally:
        setup.broker.stop()


# --- the password stays secret --------------------------------------------------------------------


async def test_a_refused_password_is_never_logged(plain: Setup, tmp_path: Path,
                                                  captured_logs: io.StringIO) -> None:
    secret = f"wrong-{uuid.uuid4().hex}"
    (tmp_path / "pw").write_text(secret + "\n")
    config = MqttConfig(url=plain.files.url, username="node-a", password_file=str(tmp_path / "pw"),
                        reconnect_max=0.2)
    link = MqttLink.from_config(config, client_id="bad-auth")
    assert secret not in repr(link)
    assert secret not in str(vars(link).get("log"))
    stop = asyncio.Event()

    async def nothing(*_: object) -> None:
        return None

    task = asyncio.create_task(link.run(stop=stop, handle=nothing, on_connect=nothing))
    await eventually(lambda: captured_logs.getvalue().count("mqtt.disconnected") >= 2, what="refusals logged")
    stop.set()
    await task
    logs = captured_logs.getvalue()
    assert "authori" in logs.lower()  # the reason is there...
    assert "check mqtt.username and mqtt.password_file" in logs
    assert secret not in logs  # ...the password is not
    assert link.connects == 0


def test_an_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    config = MqttConfig(username="node-a", password_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as info:
        MqttLink.from_config(config, client_id="x")
    assert info.value.path == "mqtt.password_file"
