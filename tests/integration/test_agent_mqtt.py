"""The whole agent against a real Mosquitto: presence, reports, events, signed commands, outages."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import aiomqtt
import pytest

from agent.app import AgentApp
from selfheal import wire
from selfheal.config import AgentConfig, Config, MqttConfig, ProbeConfig, SecurityConfig, UnitConfig
from selfheal.keys import read_key, write_key
from tests.conftest import Broker, eventually, free_port

pytestmark = pytest.mark.integration

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
_ids = itertools.count()


@pytest.fixture(autouse=True)
async def no_controller_status(mosquitto: Broker) -> None:
    """These agents run without a controller: clear the status a controller of another test left retained on
    the shared broker (an ``offline`` makes an agent hold its events until a controller is back)."""
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        await client.publish(wire.CONTROLLER_STATUS_TOPIC, b"", qos=1, retain=True)


def unique_node(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}-{uuid.uuid4().hex[:6]}"


class Observer:
    """A test-side MQTT client that records everything on its filters, reconnecting after outages."""

    def __init__(self, broker: Broker, filters: list[str], *, persistent: bool = False) -> None:
        self.broker = broker
        self.filters = filters
        self.persistent = persistent
        self.client_id = f"observer-{uuid.uuid4().hex[:12]}"
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Observer:
        self._task = asyncio.create_task(self._run(), name=f"observer-{self.client_id}")
        await asyncio.wait_for(self.connected.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        # aiomqtt's clean disconnect waits for its DISCONNECT to be written with no bound; a test must not
        # hang in its observer's teardown (the loop's shutdown cancels what is left), so say where it waited.
        done, _ = await asyncio.wait({self._task}, timeout=10)
        if not done:
            print(f"observer {self.client_id}: disconnect still pending after 10 s:", file=sys.stderr)
            self._task.print_stack(file=sys.stderr)
            self._task.cancel()
            return
        with suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(self.broker.host, self.broker.port, identifier=self.client_id,
                                          clean_session=not self.persistent) as client:
                    for topic_filter in self.filters:
                        await client.subscribe(topic_filter, qos=1)
                    self._client = client
                    self.connected.set()
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        self.messages.append((str(message.topic), payload, bool(message.retain)))
            except aiomqtt.MqttError:
                self.connected.clear()
                self._client = None
                await asyncio.sleep(0.1)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await asyncio.wait_for(self.connected.wait(), 10)
        assert self._client is not None
        await self._client.publish(topic, payload, qos=1, retain=retain)

    def statuses(self, node: str) -> list[tuple[wire.NodeStatus, bool]]:
        topic = wire.node_topic(node, "status")
        return [(wire.decode_node_message(t, p), r) for t, p, r in self.messages  # type: ignore[misc]
                if t == topic and p]

    def reports(self, node: str) -> list[wire.Report]:
        topic = wire.node_topic(node, "report")
        return [m for t, p, _ in self.messages if t == topic
                for m in [wire.decode_node_message(t, p)] if isinstance(m, wire.Report)]

    def events(self, node: str) -> list[wire.EventBody]:
        topic = wire.node_topic(node, "events")
        return [m.body for t, p, _ in self.messages if t == topic
                for m in [wire.decode_node_message(t, p)] if isinstance(m, wire.Event)]

    def results(self, node: str) -> dict[str, wire.CommandResult]:
        return {e.command_id: e for e in self.events(node) if isinstance(e, wire.CommandResult)}


def agent_config(broker: Broker, tmp_path: Path, node: str, units: list[UnitConfig]) -> Config:
    return Config(
        mqtt=MqttConfig(url=broker.url, keepalive=5.0, reconnect_max=0.5),
        agent=AgentConfig(node_id=node, interval=0.2, state_dir=str(tmp_path / node), listen="127.0.0.1:0",
                          units=units),
        security=SecurityConfig(key_dir=str(tmp_path / "keys")),
    )


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


def command(node: str, key: bytes | None, *, cid: str, unit: str = "web", ttl: float = 15.0,
            epoch: int = 1, idem: str | None = None) -> wire.Command:
    import time  # noqa: PLC0415

    now = time.time()
    cmd = wire.Command(id=cid, key=idem or f"{node}/inc-1/restart/{cid}", node=node, epoch=epoch,
                       issued_at=now, expires_at=now + ttl, step=wire.RestartUnit(unit=unit))
    return wire.sign_command(cmd, key) if key is not None else cmd


async def test_online_status_reports_and_a_clean_offline(mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("pres")
    port = free_port()
    web = UnitConfig(name="web", command=[sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                     probe=ProbeConfig(kind="http", target=f"http://127.0.0.1:{port}/", interval=0.2,
                                       start_period=5.0))
    config = agent_config(mosquitto, tmp_path, node, [web])
    async with Observer(mosquitto, [f"{wire.PREFIX}/p/+/nodes/{node}/+"]) as obs:
        async with running_agent(config) as app:
            await eventually(lambda: any(s.state == "online" for s, _ in obs.statuses(node)), what="birth")
            birth = next(s for s, _ in obs.statuses(node) if s.state == "online")
            assert (birth.session, birth.units, birth.http) == (1, ["web"], app.http_address)
            assert birth.http.startswith("127.0.0.1:")
            assert birth.version

            def healthy_report() -> bool:
                reports = obs.reports(node)
                return bool(reports) and reports[-1].units[0].probe is not None \
                    and reports[-1].units[0].probe.healthy

            await eventually(healthy_report, what="a report with a healthy probe")
            reports = obs.reports(node)
            assert [r.seq for r in reports] == list(range(1, len(reports) + 1))
            unit = reports[-1].units[0]
            assert (unit.name, unit.kind, unit.state) == ("web", "process", "running")
            assert unit.pid == app.supervisor.entries["web"].unit.pid
            assert unit.rss_bytes > 0
            assert unit.proc_status in {"sleeping", "running"}
            assert reports[-1].host.mem_total_bytes > 0
            # The birth is retained: a newcomer gets it at once.
            async with Observer(mosquitto, [wire.node_topic(node, "status")]) as late:
                await eventually(lambda: bool(late.statuses(node)), what="retained birth")
                status, retained = late.statuses(node)[0]
                assert (status.state, status.session, retained) == ("online", 1, True)
        await eventually(lambda: obs.statuses(node)[-1][0].state == "offline", what="clean offline")
        assert obs.statuses(node)[-1][0].session == 1
        exits = [e for e in obs.events(node) if isinstance(e, wire.UnitExited)]
        assert [(e.unit, e.expected) for e in exits] == [("web", True)]

        async with running_agent(config):
            await eventually(lambda: obs.statuses(node)[-1][0].state == "online", what="second birth")
            assert obs.statuses(node)[-1][0].session == 2


async def test_signed_commands_are_executed_once_and_the_rest_refused(mosquitto: Broker,
                                                                       tmp_path: Path) -> None:
    node = unique_node("cmd")
    write_key(tmp_path / "keys", node)
    key = read_key(tmp_path / "keys", node)
    assert key is not None
    config = agent_config(mosquitto, tmp_path, node, [UnitConfig(name="web", command=SLEEPER, stop_grace=2)])
    topic = wire.node_topic(node, "commands")
    async with Observer(mosquitto, [wire.node_topic(node, "events")]) as obs, running_agent(config) as app:
        unit = app.supervisor.entries["web"].unit
        old_pid = unit.pid
        restart = command(node, key, cid="c1")
        await obs.publish(topic, wire.encode(restart))
        await eventually(lambda: "c1" in obs.results(node), what="ack of c1")
        assert obs.results(node)["c1"].status == "done"
        assert unit.pid not in (None, old_pid)
        starts = [e for e in obs.events(node) if isinstance(e, wire.UnitStarted)]
        assert [(e.unit, e.restarts) for e in starts] == [("web", 0), ("web", 1)]
        exits = [e for e in obs.events(node) if isinstance(e, wire.UnitExited)]
        assert [(e.pid, e.expected) for e in exits] == [(old_pid, True)]

        # The very same command again (redelivery, a second controller): not run twice.
        again = wire.Command(**{**{f: getattr(restart, f) for f in restart.__struct_fields__}, "id": "c2"})
        await obs.publish(topic, wire.encode(wire.sign_command(again, key)))
        forged = command(node, bytes(32), cid="c3")
        expired = command(node, key, cid="c4", ttl=-1.0)
        unknown = command(node, key, cid="c5", unit="nope")
        for cmd in (forged, expired, unknown):
            await obs.publish(topic, wire.encode(cmd))
        await eventually(lambda: {"c2", "c3", "c4", "c5"} <= set(obs.results(node)), what="all acks")
        results = obs.results(node)
        assert results["c2"].status == "duplicate"
        assert results["c2"].detail.startswith("done: ")
        assert (results["c3"].status, results["c3"].detail) == ("rejected", "bad signature")
        assert results["c4"].status == "rejected"
        assert results["c4"].detail.startswith("expired")
        assert results["c5"].status == "failed"
        assert "unknown unit 'nope'" in results["c5"].detail
        assert unit.report().restarts == 1

        # Garbage on the commands topic is dropped and counted; the agent carries on.
        await obs.publish(topic, b"not json")
        await obs.publish(topic, b'{"v": 1, "id": "x"}')
        await obs.publish(topic, wire.encode(command("someone-else", key, cid="c6")))
        await eventually(lambda: app.counts["malformed"] + app.counts["spoofed"] == 3, what="drops counted")
        await obs.publish(topic, wire.encode(command(node, key, cid="c7")))
        await eventually(lambda: "c7" in obs.results(node), what="ack of c7")
        assert obs.results(node)["c7"].status == "done"
        assert "c6" not in obs.results(node)
        assert app.executor.counts == {"done": 2, "duplicate": 1, "rejected": 2, "failed": 1}


async def test_without_a_key_every_command_is_rejected(mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("nokey")
    config = agent_config(mosquitto, tmp_path, node, [UnitConfig(name="web", command=SLEEPER)])
    async with Observer(mosquitto, [wire.node_topic(node, "events")]) as obs, running_agent(config):
        await obs.publish(wire.node_topic(node, "commands"), wire.encode(command(node, bytes(32), cid="c1")))
        await eventually(lambda: "c1" in obs.results(node), what="ack")
        assert obs.results(node)["c1"].status == "rejected"
        assert "no command key" in obs.results(node)["c1"].detail


async def test_a_new_controller_gets_a_fresh_birth(mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("ctl")
    config = agent_config(mosquitto, tmp_path, node, [])
    async with Observer(mosquitto, [wire.node_topic(node, "status")]) as obs, running_agent(config):
        await eventually(lambda: len(obs.statuses(node)) >= 1, what="birth")
        before = len(obs.statuses(node))
        online = wire.ControllerStatus(state="online", session=f"ctl-{uuid.uuid4().hex}")
        # Not retained: the session broker is shared with other tests.
        await obs.publish(wire.CONTROLLER_STATUS_TOPIC, wire.encode(online))
        await eventually(lambda: len(obs.statuses(node)) == before + 1, what="re-announce")
        assert obs.statuses(node)[-1][0].state == "online"
        await obs.publish(wire.CONTROLLER_STATUS_TOPIC, b"{broken")
        await obs.publish(wire.CONTROLLER_STATUS_TOPIC, wire.encode(online))  # same session: no repeat
        await obs.publish(wire.CONTROLLER_STATUS_TOPIC, wire.encode(
            wire.ControllerStatus(state="online", session="another")))
        await eventually(lambda: len(obs.statuses(node)) == before + 2, what="second re-announce")


async def test_a_broker_outage_loses_no_event(own_mosquitto: Broker, tmp_path: Path) -> None:
    broker = own_mosquitto
    # Persistence lets the observer's session (and what is queued for it) survive the broker restart,
    # so nothing the agent sends right after the restart can slip past the observer.
    await asyncio.to_thread(broker.stop)
    store = tmp_path / "mosquitto-db"
    store.mkdir()
    # "user root": started as root, mosquitto would drop to a user that cannot write the test's tmp dir
    # (ignored when not started as root).
    broker.config.write_text(broker.config.read_text().replace(
        "persistence false", f"persistence true\npersistence_location {store}/\nuser root"))
    await asyncio.to_thread(broker.start)

    node = unique_node("outage")
    config = agent_config(broker, tmp_path, node, [UnitConfig(name="victim", command=SLEEPER)])
    filters = [wire.node_topic(node, "status"), wire.node_topic(node, "events")]
    async with Observer(broker, filters, persistent=True) as obs, running_agent(config) as app:
        await eventually(lambda: any(s.state == "online" for s, _ in obs.statuses(node)), what="birth")
        births = sum(1 for s, _ in obs.statuses(node) if s.state == "online")
        await asyncio.to_thread(broker.stop)
        assert (store / "mosquitto.db").exists(), "the broker did not persist the observer's session"
        await eventually(lambda: not app.link.connected.is_set(), what="the agent to notice the outage")

        pid = app.supervisor.entries["victim"].unit.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # an event while the broker is down
        await eventually(lambda: app.supervisor.entries["victim"].unit.report().state == "exited",
                         what="the exit to be noticed")

        await asyncio.to_thread(broker.start)
        await eventually(lambda: app.link.connects >= 2, what="reconnect")
        await eventually(lambda: sum(1 for s, _ in obs.statuses(node) if s.state == "online") > births,
                         what="re-announce after the outage")
        await eventually(lambda: any(isinstance(e, wire.UnitExited) and e.pid == pid
                                     for e in obs.events(node)), what="the event from the outage")
        (exited,) = [e for e in obs.events(node) if isinstance(e, wire.UnitExited)]
        assert (exited.exit_signal, exited.expected) == (9, False)
        assert app.link.dropped == 0
