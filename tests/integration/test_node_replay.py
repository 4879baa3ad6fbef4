"""Replays of a node's own genuine signed messages must not change what the controller believes.

Signing (``test_node_signing``) stops forgeries; an attacker on the broker can still record what a node
sent and publish it again. A real Mosquitto, a real controller with keys and real agents; the attacker is a
plain MQTT client replaying captured payloads byte for byte (or, for a last will, building the one an
earlier connection of the node had, the way the agent does). Each test failed before replays were handled:

- an old event replayed every half second kept a node whose agent had stopped "online" forever;
- after a controller restart, a captured ``unit_exited`` of the node's current session was applied and the
  controller restarted the healthy unit with a genuine signed command;
- a replayed last will of an earlier connection marked a live node offline;
- a migration's source that came back during the fence wait (a network blip) was stopped by command and
  its unit started elsewhere anyway: a forced migration with downtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import msgspec
import pytest

from controller.app import Controller, running_controller
from detectors.presence import is_offline
from selfheal import __version__, wire
from selfheal.config import UnitConfig
from tests.conftest import Broker, eventually, free_port
from tests.integration.test_agent_mqtt import SLEEPER, Observer, agent_config, command, running_agent, unique_node
from tests.integration.test_node_signing import controller_config, movable, never, node_keys
from tests.node_messages import signed

pytestmark = pytest.mark.integration


async def node_incidents(controller: Controller, node: str) -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
        return [i for i in (await http.get("/api/v1/incidents")).json()["items"] if i["node"] == node]


def captured(observer: Observer, topic: str) -> list[tuple[bytes, wire.Event]]:
    out = []
    for got_topic, payload, _ in observer.messages:
        if got_topic == topic:
            message = wire.decode_node_message(topic, payload)
            assert isinstance(message, wire.Event)
            out.append((payload, message))
    return out


async def test_replayed_events_do_not_keep_a_stopped_node_online(own_mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("replay-presence")
    key = node_keys(tmp_path, node)[node]
    offline_after = 2.0
    config = controller_config(tmp_path, own_mosquitto, offline_after=offline_after)
    events = wire.node_topic(node, "events")
    async with running_controller(config) as controller, Observer(own_mosquitto, [events]) as recorder:
        async with running_agent(agent_config(own_mosquitto, tmp_path, node,
                                              [UnitConfig(name="web", command=SLEEPER)])):
            await recorder.publish(wire.node_topic(node, "commands"), wire.encode(command(node, key, cid="r1")))
            await eventually(lambda: any(isinstance(e.body, wire.CommandResult) for _, e in captured(recorder, events)),
                             what="a genuine command result recorded")
        old = [payload for payload, _ in captured(recorder, events)]  # unit_started, exited, result, ...

        def offline() -> bool:
            snapshot = controller.fleet.snapshot(node)
            return snapshot is not None and is_offline(snapshot, time.time(), offline_after)

        stop = asyncio.Event()

        async def replay() -> None:
            while not stop.is_set():
                for payload in old:
                    if stop.is_set():
                        return
                    await recorder.publish(events, payload)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        replaying = asyncio.create_task(replay())
        try:
            await eventually(offline, timeout=offline_after + 5, what="the stopped node offline despite replays")
            await never(lambda: not offline(), within=2.0, what="a replayed event brought the node back")
        finally:
            # told to stop rather than cancelled: on Python 3.11 a cancellation that meets a publish's own
            # wait_for as it completes can be swallowed, and the loop went on replaying until the test timed out
            stop.set()
            done, _ = await asyncio.wait({replaying}, timeout=30)
            assert done, "the replay loop did not stop"
            replaying.result()


async def test_a_replayed_unit_exited_after_a_controller_restart_restarts_nothing(
        own_mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("replay-exit")
    node_keys(tmp_path, node)
    config = controller_config(tmp_path, own_mosquitto, offline_after=10.0)
    events = wire.node_topic(node, "events")
    agent_cfg = agent_config(own_mosquitto, tmp_path, node, [UnitConfig(name="web", command=SLEEPER)])
    slow = msgspec.structs.replace(agent_cfg, agent=msgspec.structs.replace(agent_cfg.agent, interval=1.0))
    async with running_agent(slow) as agent, Observer(own_mosquitto, [events]) as recorder:
        web = agent.supervisor.entries["web"]
        async with running_controller(config) as controller:
            await eventually(lambda: (u := controller.fleet.unit(node, "web")) is not None and u.state == "running",
                             what="web known running")
            first = web.unit.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: web.unit.pid not in (None, first) and web.unit.state == "running",
                             timeout=20, what="web healed")

            async def resolved() -> bool:
                return all(i["state"] == "resolved" for i in await node_incidents(controller, node))
            await eventually(resolved, timeout=20, what="the crash's incident resolved")

        def exits() -> list[bytes]:
            return [p for p, e in captured(recorder, events)
                    if isinstance(e.body, wire.UnitExited) and e.body.pid == first]
        await eventually(lambda: bool(exits()), what="the genuine unit_exited recorded")
        healed = web.unit.pid
        async with running_controller(config) as controller:
            await eventually(lambda: (n := controller.fleet.nodes.get(node)) is not None and n.last_seq > 0
                             and controller.fleet.unit(node, "web") is not None
                             and controller.fleet.unit(node, "web").state == "running",  # type: ignore[union-attr]
                             what="the restarted controller knows web running")
            before = len(await node_incidents(controller, node))
            commands = sum(agent.executor.counts.values())
            for payload in exits():
                await recorder.publish(events, payload)
            await never(lambda: sum(agent.executor.counts.values()) > commands or web.unit.pid != healed,
                        within=4.0, what="a replayed unit_exited restarted the healthy unit")
            assert len(await node_incidents(controller, node)) == before


async def test_a_replayed_last_will_of_an_earlier_connection_leaves_a_live_node_online(
        own_mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("replay-will")
    key = node_keys(tmp_path, node)[node]
    # offline_after well above the report interval: only a believed will, not a late report, marks it offline.
    config = controller_config(tmp_path, own_mosquitto, offline_after=10.0)
    agent_cfg = agent_config(own_mosquitto, tmp_path, node, [UnitConfig(name="web", command=SLEEPER)])
    slow = msgspec.structs.replace(agent_cfg, agent=msgspec.structs.replace(agent_cfg.agent, interval=2.0))
    async with running_controller(config) as controller, running_agent(slow) as agent, \
            Observer(own_mosquitto, []) as evil:
        await eventually(lambda: (n := controller.fleet.nodes.get(node)) is not None and n.online,
                         what="node online")
        assert agent.conn >= 1
        # The will an earlier connection of this session registered: what a recorder of it would replay.
        will = wire.NodeStatus(node=node, state="offline", session=agent.session, version=__version__,
                               units=["web"], labels={}, http=agent.http_address, ts=time.time() - 60,
                               conn=agent.conn - 1)
        for _ in range(3):
            await evil.publish(wire.node_topic(node, "status"), signed(will, "status", key), retain=True)
        await never(lambda: not controller.fleet.nodes[node].online, within=3.0,
                    what="a replayed will marked the live node offline")
        assert not [i for i in await node_incidents(controller, node) if i["kind"] in ("node_offline", "unit_lost")]


class Blip:
    """A TCP relay between an agent and the broker that can drop every connection for a while: a network
    blip, real to both ends (the broker publishes the agent's last will, the agent reconnects)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.port = free_port()
        self.down = False
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.broker.host, self.broker.port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def cut(self) -> None:
        self.down = True
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Blip]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        try:
            yield self
        finally:
            self.cut()
            server.close()


async def test_a_migration_source_that_comes_back_keeps_its_unit(own_mosquitto: Broker, tmp_path: Path) -> None:
    node_a, node_b = unique_node("blip-a"), unique_node("blip-b")
    node_keys(tmp_path, node_a, node_b)
    config = controller_config(tmp_path, own_mosquitto, offline_after=2.0, extra="fence_floor = 2.0\n")
    async with Blip(own_mosquitto).running() as blip:
        cfg_a = agent_config(own_mosquitto, tmp_path, node_a, [movable(autostart=True)])
        cfg_a = msgspec.structs.replace(cfg_a, mqtt=msgspec.structs.replace(cfg_a.mqtt, url=blip.url))
        async with running_agent(cfg_a) as agent_a, \
                running_agent(agent_config(own_mosquitto, tmp_path, node_b, [movable(autostart=False)])) as agent_b, \
                running_controller(config) as controller:
            assert controller.engine is not None
            placements = controller.engine.placements
            await eventually(lambda: (p := placements.current.get("solo")) is not None and p.node == node_a,
                             what="solo placed on node-a")

            def standby_known() -> bool:  # else the migration has nowhere to go and is escalated at once
                node = controller.fleet.nodes.get(node_b)
                return node is not None and node.confirmed and \
                    getattr(node.units.get("solo"), "state", None) == "stopped"
            await eventually(standby_known, what="node-b's stopped copy of solo known to the controller")
            solo_a = agent_a.supervisor.entries["solo"]
            pid = solo_a.unit.pid

            async def fence_wait() -> bool:
                return any(e["kind"] == "fence_wait" for e in await timeline(controller, node_a))
            blip.cut()  # the broker sees node-a vanish and publishes its will
            await eventually(fence_wait, timeout=15, what="the migration waiting out node-a's fence")
            blip.down = False  # node-a comes back

            async def ended() -> bool:
                return any(e["kind"] == "fence_aborted" for e in await timeline(controller, node_a))
            await eventually(ended, timeout=15, what="the fence wait ended by node-a's return")
            entries = await timeline(controller, node_a)
            aborted = next(e["data"] for e in entries if e["kind"] == "fence_aborted")
            assert aborted["reason"] == "source_returned"  # type: ignore[index]
            assert not [e for e in entries if e["kind"] == "command_sent"]
            await never(lambda: agent_b.supervisor.entries["solo"].unit.state == "running"
                        or solo_a.unit.pid != pid, within=3.0, what="the unit was moved anyway")


async def timeline(controller: Controller, node: str) -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
        lost = [i for i in (await http.get("/api/v1/incidents")).json()["items"]
                if i["kind"] == "unit_lost" and i["node"] == node]
        if not lost:
            return []
        return list((await http.get(f"/api/v1/incidents/{lost[0]['id']}")).json()["timeline"])


async def test_a_migration_source_back_after_fencing_its_unit_is_not_taken_for_one_still_running_it(
        own_mosquitto: Broker, tmp_path: Path) -> None:
    """A partition heals during the fence wait, after node-a's agent fenced the unit. Its ``online`` comes
    before the report saying so: the dispatcher must wait for that report, not cancel the move on the word of
    node-a's units from before the partition ("came back running solo": it was not), which left the unit
    down until the finding came back and spent one of the migrate rung's attempts."""
    node_a, node_b = unique_node("fenced-a"), unique_node("fenced-b")
    node_keys(tmp_path, node_a, node_b)
    config = controller_config(tmp_path, own_mosquitto, offline_after=2.0, extra="fence_floor = 2.0\n")
    quick = UnitConfig(name="solo", command=SLEEPER, stop_after_disconnect=1.0, stop_grace=1.0, autostart=True)
    async with Blip(own_mosquitto).running() as blip:
        cfg_a = agent_config(own_mosquitto, tmp_path, node_a, [quick])
        cfg_a = msgspec.structs.replace(cfg_a, mqtt=msgspec.structs.replace(cfg_a.mqtt, url=blip.url))
        standby = msgspec.structs.replace(quick, autostart=False)
        async with running_agent(cfg_a) as agent_a, \
                running_agent(agent_config(own_mosquitto, tmp_path, node_b, [standby])) as agent_b, \
                running_controller(config) as controller:
            assert controller.engine is not None
            placements = controller.engine.placements
            await eventually(lambda: (p := placements.current.get("solo")) is not None and p.node == node_a,
                             what="solo placed on node-a")

            async def fence_wait() -> bool:
                return any(e["kind"] == "fence_wait" for e in await timeline(controller, node_a))
            await eventually(lambda: (u := controller.fleet.unit(node_b, "solo")) is not None and u.state == "stopped"
                             and controller.fleet.nodes[node_b].confirmed, what="node-b's standby copy reported")
            blip.cut()
            await eventually(fence_wait, timeout=15, what="the migration waiting out node-a's fence")
            await eventually(lambda: "solo" in agent_a.supervisor.fenced, timeout=15, what="node-a's agent fenced solo")
            blip.down = False  # back while the controller still waits out the fence

            await eventually(lambda: agent_b.supervisor.is_running("solo"), timeout=30, what="solo started on node-b")
            entries = await timeline(controller, node_a)
            reasons = [e["data"]["reason"] for e in entries if e["kind"] == "fence_aborted"]  # type: ignore[index]
            assert "source_returned" not in reasons
            assert not agent_a.supervisor.is_running("solo")
