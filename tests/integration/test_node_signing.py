"""Signed node traffic against an attacker with nothing but an anonymous connection to the broker.

A real Mosquitto that lets anyone publish anything, a real controller with keys in ``key_dir`` and real
agents (``AgentApp``) that sign what they send; the attacker is a plain MQTT client publishing forged node
messages. Each test is one attack from issue 13, and each failed before node traffic was signed:

- split brain: a forged report (huge session, tiny ``fence_after``) and a retained forged ``offline``
  status for the node running a movable singleton made the controller start the standby copy elsewhere,
  and drop the real node's reports as stale — across a controller restart too;
- a forged ``unit_exited`` made the controller restart a healthy unit with a genuine signed command;
- a forged status moved the node's ``http`` (where peers pull dataset chunks from) to the attacker;
- node ids without a key, unsigned and wrongly signed messages: dropped, counted by reason, never acted on;
- a node's session jumping far ahead while it is live is refused; an agent whose counter is corrupt
  still comes back;
- an agent refuses a command from an epoch older than the highest it accepted, across its restart;
- a tiny ``fence_after`` in a report signed with the node's own key (a compromised or buggy node) still
  waits out the controller's ``fence_floor``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from controller.app import Controller, running_controller
from selfheal import wire
from selfheal.config import Config, UnitConfig, load_config
from selfheal.keys import read_key, write_key
from tests.conftest import Broker, eventually, free_port
from tests.integration.test_agent_mqtt import SLEEPER, Observer, agent_config, command, running_agent, unique_node
from tests.node_messages import host_metrics, signed

pytestmark = pytest.mark.integration


def controller_config(tmp_path: Path, broker: Broker, *, offline_after: float = 3.0, extra: str = "") -> Config:
    path = tmp_path / "controller.toml"
    path.write_text(
        f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 2.0\nreconnect_max = 0.5\n'
        f'[controller]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "{tmp_path / "controller"}"\n'
        f"offline_after = {offline_after}\nack_timeout = 3.0\n{extra}"
        f'[security]\nkey_dir = "{tmp_path / "keys"}"\n')
    return load_config(path)


def node_keys(tmp_path: Path, *nodes: str) -> dict[str, bytes]:
    keys = {}
    for node in nodes:
        write_key(tmp_path / "keys", node)
        key = read_key(tmp_path / "keys", node)
        assert key is not None
        keys[node] = key
    return keys


async def never(check: Callable[[], bool], *, within: float, what: str) -> None:
    """Fail as soon as ``check`` holds during ``within`` seconds (a bad thing must not happen)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert not check(), what
        await asyncio.sleep(0.05)


async def metrics(controller: Controller) -> str:
    async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
        return (await http.get("/metrics")).text


async def rejected(controller: Controller, reason: str) -> float:
    match = re.search(rf'^selfheal_messages_rejected_total{{reason="{reason}"}} (\S+)$', await metrics(controller),
                      re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def movable(*, autostart: bool) -> UnitConfig:
    return UnitConfig(name="solo", command=SLEEPER, stop_after_disconnect=60.0, stop_grace=1.0, autostart=autostart)


def running_unit(name: str, pid: int, *, fence_after: float | None = None) -> wire.UnitReport:
    return wire.UnitReport(name=name, kind="process", state="running", pid=pid, fence_after=fence_after)


@asynccontextmanager
async def attacker(broker: Broker) -> AsyncIterator[Observer]:
    async with Observer(broker, [f"{wire.PREFIX}/#"]) as client:
        yield client


async def test_forged_report_and_retained_offline_status_start_no_second_copy(
        own_mosquitto: Broker, tmp_path: Path) -> None:
    node_a, node_b = unique_node("split-a"), unique_node("split-b")
    node_keys(tmp_path, node_a, node_b)
    config = controller_config(tmp_path, own_mosquitto)
    def second_copy() -> bool:
        solo_b = agent_b.supervisor.entries["solo"].unit
        return solo_b.state == "running" or solo_b.pid is not None

    async with running_agent(agent_config(own_mosquitto, tmp_path, node_a, [movable(autostart=True)])) as agent_a, \
            running_agent(agent_config(own_mosquitto, tmp_path, node_b, [movable(autostart=False)])) as agent_b:
        async with running_controller(config) as controller:
            assert controller.engine is not None
            placements = controller.engine.placements
            await eventually(lambda: (p := placements.current.get("solo")) is not None and p.node == node_a,
                             what="solo placed on node-a")
            await eventually(lambda: (u := controller.fleet.unit(node_b, "solo")) is not None
                             and u.state == "stopped", what="node-b's standby known")
            huge = agent_a.session + 10**9
            async with attacker(own_mosquitto) as evil:
                await evil.publish(wire.node_topic(node_a, "report"), wire.encode(wire.Report(
                    node=node_a, session=huge, seq=1, ts=time.time(), host=host_metrics(),
                    units=[running_unit("solo", 4242, fence_after=0.01)])))

                async def report_taken_or_refused() -> bool:
                    return (placements.current["solo"].fence_after == 0.01
                            or await rejected(controller, "unsigned") >= 1)
                await eventually(report_taken_or_refused, what="the forged report reached the controller")
                await evil.publish(wire.node_topic(node_a, "status"), wire.encode(wire.NodeStatus(
                    node=node_a, state="offline", session=huge, ts=time.time())), retain=True)

                async def taken_or_refused() -> bool:
                    return (controller.fleet.nodes[node_a].session == huge
                            or await rejected(controller, "unsigned") >= 2)
                await eventually(taken_or_refused, what="the forged status reached the controller")

                await never(second_copy, within=4.0, what="node-b started the standby copy: two copies run")
                assert agent_a.supervisor.entries["solo"].unit.state == "running"
                assert controller.fleet.nodes[node_a].online
                assert controller.fleet.nodes[node_a].session == agent_a.session
                seq = controller.fleet.nodes[node_a].last_seq
                await eventually(lambda: controller.fleet.nodes[node_a].last_seq > seq + 2,
                                 what="node-a's real reports still accepted")

        # A restarted controller reads the forged offline status, still retained on the broker.
        async with running_controller(config) as restarted:
            await eventually(lambda: node_a in restarted.fleet.nodes and restarted.fleet.nodes[node_a].online
                             and restarted.fleet.nodes[node_a].last_seq > 2,
                             what="node-a online after the controller restart")
            assert restarted.fleet.nodes[node_a].session == agent_a.session
            assert await rejected(restarted, "unsigned") >= 1  # the retained forged status
            await never(second_copy, within=3.0, what="node-b started the standby after a controller restart")
            assert agent_a.supervisor.entries["solo"].unit.state == "running"


async def test_forged_unit_exited_restarts_nothing(own_mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("exit")
    node_keys(tmp_path, node)
    config = controller_config(tmp_path, own_mosquitto, offline_after=10.0)
    async with running_controller(config) as controller, \
            running_agent(agent_config(own_mosquitto, tmp_path, node, [UnitConfig(name="web", command=SLEEPER)])) \
            as agent:
        web = agent.supervisor.entries["web"].unit
        pid = web.pid
        assert pid is not None
        await eventually(lambda: (u := controller.fleet.unit(node, "web")) is not None and u.state == "running",
                         what="web known running")
        async with attacker(own_mosquitto) as evil:
            await evil.publish(wire.node_topic(node, "events"), wire.encode(wire.Event(
                node=node, session=agent.session, ts=time.time(),
                body=wire.UnitExited(unit="web", pid=pid, exit_signal=9))))
            await never(lambda: sum(agent.executor.counts.values()) > 0 or web.pid != pid, within=5.0,
                        what="the controller sent a command for a forged exit")
        assert agent.supervisor.entries["web"].unit.pid == pid
        async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
            incidents = (await http.get("/api/v1/incidents")).json()["items"]
        assert not [i for i in incidents if i["node"] == node]


async def test_forged_status_does_not_move_the_nodes_http(own_mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("http")
    node_keys(tmp_path, node)
    config = controller_config(tmp_path, own_mosquitto, offline_after=10.0)
    async with running_controller(config) as controller, \
            running_agent(agent_config(own_mosquitto, tmp_path, node, [])) as agent:
        await eventually(lambda: node in controller.fleet.nodes and controller.fleet.nodes[node].http != "",
                         what="node's http known")
        assert controller.fleet.nodes[node].http == agent.http_address
        async with attacker(own_mosquitto) as evil:
            await evil.publish(wire.node_topic(node, "status"), wire.encode(wire.NodeStatus(
                node=node, state="online", session=agent.session, http="http://203.0.113.7:8731",
                ts=time.time())), retain=True)
            await evil.publish(wire.node_topic(node, "status"), wire.encode(wire.NodeStatus(
                node=node, state="online", session=agent.session + 1, http="http://203.0.113.7:8731",
                ts=time.time())), retain=True)
            await never(lambda: controller.fleet.nodes[node].http != agent.http_address, within=2.0,
                        what="a forged status moved the node's http")
        assert controller.fleet.nodes[node].session == agent.session


async def test_unknown_unsigned_and_badly_signed_traffic_is_dropped_and_counted(
        own_mosquitto: Broker, tmp_path: Path) -> None:
    node, ghost = unique_node("known"), unique_node("ghost")
    keys = node_keys(tmp_path, node)
    config = controller_config(tmp_path, own_mosquitto, offline_after=10.0)
    async with running_controller(config) as controller, attacker(own_mosquitto) as evil:
        status = wire.NodeStatus(node=node, state="online", session=7, http="http://127.0.0.1:1", ts=time.time())
        report = wire.Report(node=ghost, session=1, seq=1, ts=time.time(), host=host_metrics(),
                             units=[running_unit("web", 1)])
        await evil.publish(wire.node_topic(node, "status"), wire.encode(status))  # unsigned
        await evil.publish(wire.node_topic(node, "status"), signed(status, "status", bytes(32)))  # wrong key
        await evil.publish(wire.node_topic(ghost, "report"), signed(report, "report", bytes(32)))  # no key at all
        # a message signed for another channel: the domain tag binds the channel
        await evil.publish(wire.node_topic(node, "digests"), signed(wire.DatasetDigest(
            node=node, session=7, ts=time.time()), "status", keys[node]))

        async def counted() -> bool:
            return (await rejected(controller, "unsigned") >= 1 and await rejected(controller, "bad_signature") >= 2
                    and await rejected(controller, "unknown_node") >= 1)
        await eventually(counted, what="rejections counted by reason")
        assert node not in controller.fleet.nodes
        assert ghost not in controller.fleet.nodes
        assert ghost in controller.unknown_nodes
        async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
            listed = (await http.get("/api/v1/nodes")).json()
        assert ghost in [n["id"] for n in listed["unknown"]]
        assert ghost not in [n["id"] for n in listed["items"]]

        await evil.publish(wire.node_topic(node, "status"), signed(status, "status", keys[node]))  # genuine
        await eventually(lambda: node in controller.fleet.nodes, what="the signed status accepted")
        assert controller.fleet.nodes[node].http == "http://127.0.0.1:1"


async def test_a_session_jump_is_refused_and_a_corrupt_counter_still_comes_back(
        own_mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("jump")
    keys = node_keys(tmp_path, node)
    config = controller_config(tmp_path, own_mosquitto, offline_after=10.0)
    agent_cfg = agent_config(own_mosquitto, tmp_path, node, [UnitConfig(name="web", command=SLEEPER)])
    async with running_controller(config) as controller:
        async with running_agent(agent_cfg) as agent, attacker(own_mosquitto) as evil:
            await eventually(lambda: node in controller.fleet.nodes and controller.fleet.nodes[node].last_seq > 0,
                             what="node reporting")
            session = agent.session
            jumped = wire.Report(node=node, session=session + 5000, seq=1, ts=time.time(), host=host_metrics())
            await evil.publish(wire.node_topic(node, "report"), signed(jumped, "report", keys[node]))

            async def refused() -> bool:
                return await rejected(controller, "session_jump") >= 1
            await eventually(refused, what="the jump refused and counted")
            assert controller.fleet.nodes[node].session == session
        # The counter file is corrupt: the agent still comes back, in a newer session the controller accepts.
        (Path(agent_cfg.agent.state_dir) / "session").write_bytes(b"\xff\xfe garbage")
        async with running_agent(agent_cfg) as agent:
            assert agent.session > session
            await eventually(lambda: controller.fleet.nodes[node].session == agent.session
                             and controller.fleet.nodes[node].online and controller.fleet.nodes[node].last_seq > 0,
                             timeout=30, what="the agent back in its new session")


async def test_an_older_epoch_is_refused_across_an_agent_restart(own_mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("epoch")
    key = node_keys(tmp_path, node)[node]
    config = agent_config(own_mosquitto, tmp_path, node, [UnitConfig(name="web", command=SLEEPER)])
    async with Observer(own_mosquitto, [wire.node_topic(node, "events")]) as obs:
        async with running_agent(config):
            await obs.publish(wire.node_topic(node, "commands"), wire.encode(command(node, key, cid="e5", epoch=5)))
            await eventually(lambda: "e5" in obs.results(node), what="epoch 5 acked")
            assert obs.results(node)["e5"].status == "done"
        async with running_agent(config):
            await obs.publish(wire.node_topic(node, "commands"), wire.encode(command(node, key, cid="e4", epoch=4)))
            await eventually(lambda: "e4" in obs.results(node), what="epoch 4 acked")
            result = obs.results(node)["e4"]
            assert (result.status, result.detail) == ("rejected", "stale epoch 4 < 5")
            await obs.publish(wire.node_topic(node, "commands"), wire.encode(command(node, key, cid="e6", epoch=5)))
            await eventually(lambda: "e6" in obs.results(node), what="epoch 5 acked again")
            assert obs.results(node)["e6"].status == "done"


async def test_a_signed_tiny_fence_after_still_waits_out_the_floor(own_mosquitto: Broker, tmp_path: Path) -> None:
    """Whoever holds node-a's key (node-a itself, compromised or buggy) can say anything about node-a; what
    its reports cannot do is shorten the controller's fence wait below ``controller.fence_floor``."""
    node_a, node_b = unique_node("floor-a"), unique_node("floor-b")
    key_a = node_keys(tmp_path, node_a, node_b)[node_a]
    config = controller_config(tmp_path, own_mosquitto, extra="fence_floor = 2.5\n")
    async with running_agent(agent_config(own_mosquitto, tmp_path, node_a, [movable(autostart=True)])) as agent_a, \
            running_agent(agent_config(own_mosquitto, tmp_path, node_b, [movable(autostart=False)])) as agent_b, \
            running_controller(config) as controller, attacker(own_mosquitto) as evil:
        assert controller.keys.configured
        assert controller.engine is not None
        placements = controller.engine.placements
        await eventually(lambda: (p := placements.current.get("solo")) is not None and p.node == node_a,
                         what="solo placed on node-a")

        def standby_known() -> bool:  # else the migration has nowhere to go and is escalated at once
            node = controller.fleet.nodes.get(node_b)
            return node is not None and node.confirmed and getattr(node.units.get("solo"), "state", None) == "stopped"
        await eventually(standby_known, what="node-b's stopped copy of solo known to the controller")
        forged = agent_a.session + 1  # a small step: the session-jump rule refuses big ones
        await evil.publish(wire.node_topic(node_a, "report"), signed(wire.Report(
            node=node_a, session=forged, seq=1, ts=time.time(), host=host_metrics(),
            units=[running_unit("solo", 4242, fence_after=0.01)]), "report", key_a))
        await eventually(lambda: placements.current["solo"].fence_after == 0.01, what="the tiny fence_after taken")
        await evil.publish(wire.node_topic(node_a, "status"), signed(wire.NodeStatus(
            node=node_a, state="offline", session=forged, ts=time.time()), "status", key_a))

        async def timeline() -> list[dict[str, object]]:
            async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
                lost = [i for i in (await http.get("/api/v1/incidents")).json()["items"]
                        if i["kind"] == "unit_lost" and i["node"] == node_a]
                if not lost:
                    return []
                return list((await http.get(f"/api/v1/incidents/{lost[0]['id']}")).json()["timeline"])

        async def started() -> bool:
            return any(e["kind"] == "command_sent" for e in await timeline())
        await eventually(started, what="the standby start sent")
        entries = await timeline()
        fence = next(e["data"] for e in entries if e["kind"] == "fence_wait")
        assert isinstance(fence, dict)
        assert (fence["fence_after"], fence["reported_fence_after"], fence["fence_floor"]) == (2.5, 0.01, 2.5)
        sent = next(e for e in entries if e["kind"] == "command_sent")
        assert datetime.fromisoformat(str(sent["at"])).timestamp() >= fence["fenced_at"] - 0.01
        await eventually(lambda: agent_b.supervisor.entries["solo"].unit.state == "running",
                         what="the standby started (node-a's key said it was gone)")
