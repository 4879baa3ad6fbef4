"""Issue 13's attacks from a compromised node, against a real Mosquitto run with ``selfheal broker init``'s files.

The broker is configured by ``selfheal.broker_setup.init_broker`` for nodes node-a, node-b and node-c
(``allow_anonymous false``, hashed passwords, per-node ACL); a real controller (``running_controller``)
and real agents (``AgentApp``) for node-a and node-b each log in with their own credentials, and node
keys are configured (signed node traffic on, as in production). The attacker holds node-c's login —
a compromised node's broker credentials — but not node-a's or node-b's keys. Each test is one attack:

- split brain: a forged report for node-a (huge session, tiny ``fence_after``) and a retained forged
  ``offline`` status: refused by the broker, so no standby copy starts on node-b, and nothing forged
  is retained for a restarted controller;
- forged restart: a forged ``unit_exited`` for node-a's healthy unit restarts nothing;
- resync poisoning: a forged digest and status pointing node-a's ``http`` at the attacker leave node-a's
  address and digests unchanged, no command goes out and nobody connects to the attacker;
- spoof flood: junk and max-size messages on every other node's topics and on node-c's own: the
  controller keeps working and counts only node-c's own messages (RSS bound: ``test_flood``);
- metric series: made-up dataset names on node-c's own topics: without a key node-c is ``unknown`` and
  never in the fleet; with its key (a compromised node with its key) the dataset series stay <= 200
  and a digest of more than 200 datasets is refused at decode.

A forged message that must not have arrived is proven so with a marker: node-c publishes on its own
topic afterwards, on the same connection at QoS 1 (in order), and the test waits for the controller
to have that — everything node-c published before it was dealt with by then. The same attacks with an
anonymous broker and signing on: ``test_node_signing``, ``test_node_replay``, ``test_resync_hardening``
and ``test_flood``.
"""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.app import AgentApp
from controller.app import Controller, running_controller
from controller.datasets import held_by_dataset
from selfheal import wire
from selfheal.broker_setup import init_broker
from selfheal.config import AgentConfig, Config, ControllerConfig, DatasetConfig, SecurityConfig, UnitConfig
from selfheal.keys import read_key, write_key
from tests.conftest import Broker, eventually, free_port
from tests.integration import test_broker_identities as identities
from tests.integration.test_agent_mqtt import SLEEPER, running_agent
from tests.integration.test_broker_identities import Setup
from tests.integration.test_node_signing import movable, running_unit
from tests.node_messages import host_metrics, signed

pytestmark = pytest.mark.integration

broker_dir = identities.broker_dir
"""A directory Mosquitto's own user can reach (the fixture of ``test_broker_identities``)."""

NODE_A, NODE_B, NODE_C = "node-a", "node-b", "node-c"
CHANNELS: tuple[wire.NodeChannel, ...] = ("status", "report", "digests", "events")
CHUNK = 4096
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- the fleet: broker init's Mosquitto, a controller, node-a and node-b --------------------------------


def start_broker(directory: Path) -> Setup:
    port = free_port()
    files = init_broker(directory / "broker", listen=f"127.0.0.1:{port}", nodes=[NODE_A, NODE_B, NODE_C])
    broker = Broker("127.0.0.1", port, None, files.conf)  # type: ignore[arg-type]
    broker.start()
    return Setup(files, broker)


@dataclass
class Fleet:
    setup: Setup
    key_dir: Path
    config: Config
    """The controller's."""
    a: AgentApp
    b: AgentApp
    replica_b: Path
    controller: Controller = field(init=False)
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)

    async def start_controller(self) -> Controller:
        self.controller = await self.stack.enter_async_context(running_controller(self.config))
        return self.controller

    async def restart_controller(self) -> Controller:
        await self.stack.aclose()
        self.stack = AsyncExitStack()
        return await self.start_controller()

    def second_copy(self) -> bool:
        solo_b = self.b.supervisor.entries["solo"].unit
        return solo_b.state == "running" or solo_b.pid is not None

    @asynccontextmanager
    async def attacker(self) -> AsyncIterator[aiomqtt.Client]:
        """node-c's login (one connection at a time: the broker's client id is the user name)."""
        async with self.setup.client(NODE_C) as client:
            yield client

    async def marker(self, evil: aiomqtt.Client, *, heard: int = 1) -> None:
        """node-c's own status after whatever it published before: once the controller has it (node-c
        has no key: an unknown node), everything before it on that connection was dealt with. ``heard``:
        node-c's well-formed messages the controller has counted by then, the marker included."""
        await evil.publish(wire.node_topic(NODE_C, "status"), wire.encode(wire.NodeStatus(
            node=NODE_C, state="online", session=1, ts=time.time())), qos=1)
        await eventually(lambda: heard_from_c(self.controller) >= heard, what="node-c's marker at the controller")
        assert heard_from_c(self.controller) == heard


def heard_from_c(controller: Controller) -> int:
    entry = controller.unknown_nodes.get(NODE_C)
    return entry.messages if entry is not None else 0


def make_dataset(root: Path) -> None:
    (root / "models").mkdir(parents=True)
    (root / "models/weights.bin").write_bytes(bytes(i * 7 % 251 for i in range(3 * CHUNK - 100)))
    (root / "a.txt").write_bytes(b"alpha\n")


def files_of(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*")) if p.is_file()}


@asynccontextmanager
async def fleet(broker_dir: Path, tmp_path: Path) -> AsyncIterator[Fleet]:
    setup = start_broker(broker_dir)
    try:
        key_dir = tmp_path / "keys"
        for node in (NODE_A, NODE_B):  # node-c's key is not configured: it is not part of the fleet
            write_key(key_dir, node)
        security = SecurityConfig(key_dir=str(key_dir))

        def agent(node: str, units: list[UnitConfig]) -> Config:
            make_dataset(tmp_path / f"ds-{node}")
            return Config(mqtt=setup.mqtt(node), security=security, agent=AgentConfig(
                node_id=node, interval=0.2, state_dir=str(tmp_path / node), listen="127.0.0.1:0", units=units,
                datasets=[DatasetConfig(name="ds", path=str(tmp_path / f"ds-{node}"), chunk_size=CHUNK,
                                        scan_interval=60.0)]))

        config = Config(mqtt=setup.mqtt("controller"), security=security, controller=ControllerConfig(
            listen=f"127.0.0.1:{free_port()}", state_dir=str(tmp_path / "controller"), offline_after=3.0,
            ack_timeout=3.0))
        web = UnitConfig(name="web", command=SLEEPER, stop_grace=1.0)
        async with running_agent(agent(NODE_A, [movable(autostart=True), web])) as a, \
                running_agent(agent(NODE_B, [movable(autostart=False)])) as b:
            f = Fleet(setup, key_dir, config, a, b, tmp_path / f"ds-{NODE_B}")
            try:
                controller = await f.start_controller()
                assert controller.keys.configured
                await ready(f)
                yield f
            finally:
                await f.stack.aclose()  # the controller running now (a test may have restarted it)
    finally:
        setup.broker.stop()


async def ready(f: Fleet) -> None:
    controller = f.controller
    assert controller.engine is not None
    placements = controller.engine.placements
    await eventually(lambda: (p := placements.current.get("solo")) is not None and p.node == NODE_A,
                     what="solo placed on node-a")
    await eventually(lambda: (u := controller.fleet.unit(NODE_B, "solo")) is not None and u.state == "stopped",
                     what="node-b's standby known")
    await eventually(lambda: (u := controller.fleet.unit(NODE_A, "web")) is not None and u.state == "running",
                     what="node-a's web known running")
    def digested(node: str) -> bool:
        state = controller.fleet.nodes.get(node)
        summary = state.datasets.get("ds") if state is not None else None
        return state is not None and state.http != "" and summary is not None and summary.state == "ok"

    await eventually(lambda: digested(NODE_A) and digested(NODE_B), what="both nodes' digests and http")


async def scrape(controller: Controller) -> Metrics:
    async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
        text = (await http.get("/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def rejected(metrics: Metrics) -> dict[str, float]:
    return {dict(labels)["reason"]: v for (name, labels), v in metrics.items()
            if name == "selfheal_messages_rejected_total" and v}


def total(metrics: Metrics, name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


# --- 1. split brain ---------------------------------------------------------------------------------


async def test_split_brain_forged_report_and_retained_offline_are_refused(broker_dir: Path, tmp_path: Path) -> None:
    async with fleet(broker_dir, tmp_path) as f:
        controller = f.controller
        assert controller.engine is not None
        placements = controller.engine.placements
        huge = f.a.session + 10**9
        async with f.attacker() as evil:
            await evil.publish(wire.node_topic(NODE_A, "report"), wire.encode(wire.Report(
                node=NODE_A, session=huge, seq=1, ts=time.time(), host=host_metrics(),
                units=[running_unit("solo", 4242, fence_after=0.01)])), qos=1)
            await evil.publish(wire.node_topic(NODE_A, "status"), wire.encode(wire.NodeStatus(
                node=NODE_A, state="offline", session=huge, ts=time.time())), qos=1, retain=True)
            await f.marker(evil)

        # The broker dropped both: the controller saw only node-c's own marker.
        assert rejected(await scrape(controller)) == {"unknown_node": 1}
        assert placements.current["solo"].node == NODE_A
        assert placements.current["solo"].fence_after != 0.01
        state = controller.fleet.nodes[NODE_A]
        assert state.online
        assert state.session == f.a.session
        assert not f.second_copy(), "node-b started the standby copy: two copies run"
        assert f.a.supervisor.entries["solo"].unit.state == "running"
        seq = state.last_seq
        await eventually(lambda: controller.fleet.nodes[NODE_A].last_seq > seq + 2,
                         what="node-a's real reports still accepted")

        # Nothing forged was retained: a restarted controller gets node-a's own status and reports.
        restarted = await f.restart_controller()
        await eventually(lambda: NODE_A in restarted.fleet.nodes and restarted.fleet.nodes[NODE_A].online
                         and restarted.fleet.nodes[NODE_A].last_seq > 2,
                         what="node-a online after the controller restart")
        assert restarted.fleet.nodes[NODE_A].session == f.a.session
        assert rejected(await scrape(restarted)) == {}
        assert not f.second_copy(), "node-b started the standby after a controller restart"
        assert f.a.supervisor.entries["solo"].unit.state == "running"


# --- 2. forged restart ------------------------------------------------------------------------------


async def test_forged_unit_exited_restarts_nothing(broker_dir: Path, tmp_path: Path) -> None:
    async with fleet(broker_dir, tmp_path) as f:
        web = f.a.supervisor.entries["web"].unit
        before = web.report()
        pid = before.pid
        assert pid is not None
        commands = dict(f.a.executor.counts)
        async with f.attacker() as evil:
            await evil.publish(wire.node_topic(NODE_A, "events"), wire.encode(wire.Event(
                node=NODE_A, session=f.a.session, ts=time.time(),
                body=wire.UnitExited(unit="web", pid=pid, exit_signal=9))), qos=1)
            # A forged command straight to node-a, for good measure (node-c may not publish there either).
            await evil.publish(wire.node_topic(NODE_A, "commands"), b'{"forged": true}', qos=1)
            await f.marker(evil)

        assert rejected(await scrape(f.controller)) == {"unknown_node": 1}
        after = web.report()
        assert (after.pid, after.restarts, after.started_at, after.state) == (pid, before.restarts,
                                                                              before.started_at, "running")
        assert dict(f.a.executor.counts) == commands, "a command reached node-a"
        unit = f.controller.fleet.unit(NODE_A, "web")
        assert unit is not None
        assert unit.state == "running"
        async with httpx.AsyncClient(base_url=f"http://{f.controller.api_address}") as http:
            incidents = (await http.get("/api/v1/incidents")).json()["items"]
        assert not [i for i in incidents if i["node"] == NODE_A and i.get("unit") == "web"]


# --- 3. resync poisoning ----------------------------------------------------------------------------


async def test_forged_digest_and_status_do_not_move_node_a_or_its_digest(broker_dir: Path, tmp_path: Path) -> None:
    connections: list[str] = []

    async def attacker_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(str(writer.get_extra_info("peername")))
        writer.close()

    server = await asyncio.start_server(attacker_http, "127.0.0.1", 0)
    evil_address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with fleet(broker_dir, tmp_path) as f:
            controller = f.controller
            state = controller.fleet.nodes[NODE_A]
            assert state.http == f.a.http_address
            genuine = state.datasets["ds"]
            replica = files_of(f.replica_b)
            commands = dict(f.b.executor.counts)
            async with f.attacker() as evil:
                for session in (f.a.session, f.a.session + 1):
                    await evil.publish(wire.node_topic(NODE_A, "digests"), wire.encode(wire.DatasetDigest(
                        node=NODE_A, session=session, ts=time.time() + 1000, datasets=[wire.DatasetSummary(
                            name="ds", state="ok", root="blake3:" + "ab" * 32, files=3, bytes=CHUNK,
                            generation=genuine.generation + 50, chunk_size=CHUNK, scanned_at=time.time())])),
                        qos=1, retain=True)
                    await evil.publish(wire.node_topic(NODE_A, "status"), wire.encode(wire.NodeStatus(
                        node=NODE_A, state="online", session=session, http=evil_address, ts=time.time())),
                        qos=1, retain=True)
                await f.marker(evil)

            assert rejected(await scrape(controller)) == {"unknown_node": 1}
            state = controller.fleet.nodes[NODE_A]
            assert state.http == f.a.http_address
            assert state.session == f.a.session
            assert (state.datasets["ds"].root, state.datasets["ds"].generation) == (genuine.root, genuine.generation)
            assert dict(f.b.executor.counts) == commands, "node-b got a command"
            assert files_of(f.replica_b) == replica
            assert not (f.replica_b / "pwned").exists()
        assert connections == [], "someone connected to the attacker's address"
    finally:
        server.close()
        await server.wait_closed()


# --- 4. spoof flood ---------------------------------------------------------------------------------


async def test_a_spoof_flood_from_node_c_reaches_nothing_but_its_own_topics(broker_dir: Path, tmp_path: Path) -> None:
    async with fleet(broker_dir, tmp_path) as f:
        controller = f.controller
        sessions = {n: controller.fleet.nodes[n].session for n in (NODE_A, NODE_B)}
        http = {n: controller.fleet.nodes[n].http for n in (NODE_A, NODE_B)}
        commands = (dict(f.a.executor.counts), dict(f.b.executor.counts))
        big = b"x" * wire.MAX_PAYLOAD  # the wire's cap: the broker's max_packet_size lets it through
        own = 0
        async with f.attacker() as evil:
            for node in (NODE_A, NODE_B):
                offline = wire.encode(wire.NodeStatus(node=node, state="offline", session=10**9, ts=time.time()))
                for channel in CHANNELS:
                    topic = wire.node_topic(node, channel)
                    for i in range(20):
                        await evil.publish(topic, b"\x00junk " + str(i).encode(), qos=1)
                    await evil.publish(topic, big, qos=1)
                    await evil.publish(topic, offline, qos=1, retain=True)
                await evil.publish(wire.node_topic(node, "commands"), big, qos=1)
            for node in (NODE_A, NODE_B, NODE_C):  # the right node, the wrong bucket
                wrong = f"{wire.PREFIX}/p/{(wire.bucket_of(node) + 1) % wire.BUCKETS}/nodes/{node}/status"
                for _ in range(10):
                    await evil.publish(wrong, wire.encode(wire.NodeStatus(node=node, state="online", session=1)),
                                       qos=1)
            await evil.publish(wire.CONTROLLER_STATUS_TOPIC, b"forged", qos=1, retain=True)
            # node-c's own topics, which the ACL allows: junk, max-size junk, well-formed messages.
            for channel in CHANNELS:
                topic = wire.node_topic(NODE_C, channel)
                for i in range(25):
                    await evil.publish(topic, b"\x00junk " + str(i).encode(), qos=1)
                await evil.publish(topic, big, qos=1)
                own += 26
            for i in range(5):
                await evil.publish(wire.node_topic(NODE_C, "status"), wire.encode(wire.NodeStatus(
                    node=NODE_C, state="online", session=1, ts=time.time() + i)), qos=1)
                own += 1

            counted = [0.0]

            async def all_of_c_counted() -> bool:
                metrics = await scrape(controller)
                counted[0] = sum(rejected(metrics).values()) + total(metrics, "selfheal_mqtt_inbox_dropped_total")
                return counted[0] >= own
            await eventually(all_of_c_counted, what=f"the controller to count node-c's {own} own messages")

        metrics = await scrape(controller)
        reasons = rejected(metrics)
        assert set(reasons) <= {"malformed", "unknown_node"}, reasons  # never unsigned, bad_signature, spoofed
        assert counted[0] == own, "the controller counted more than node-c's own messages"
        assert reasons.get("unknown_node", 0) >= 1
        assert set(controller.fleet.nodes) == {NODE_A, NODE_B}
        assert NODE_C in controller.unknown_nodes
        async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as client:
            assert (await client.get("/healthz")).status_code == 200
        for node in (NODE_A, NODE_B):
            state = controller.fleet.nodes[node]
            assert state.online
            assert (state.session, state.http) == (sessions[node], http[node])
        seqs = {n: controller.fleet.nodes[n].last_seq for n in (NODE_A, NODE_B)}
        await eventually(lambda: all(controller.fleet.nodes[n].last_seq > seqs[n] + 2 for n in seqs),
                         what="node-a and node-b still reporting after the flood")
        assert (dict(f.a.executor.counts), dict(f.b.executor.counts)) == commands
        assert not f.second_copy()
        assert f.a.supervisor.entries["solo"].unit.state == "running"
        assert f.a.supervisor.entries["web"].unit.state == "running"


# --- 5. metric series -------------------------------------------------------------------------------


def made_up_digest(session: int, batch: int, count: int = wire.MAX_DATASETS) -> wire.DatasetDigest:
    return wire.DatasetDigest(node=NODE_C, session=session, ts=time.time() + batch, datasets=[
        wire.DatasetSummary(name=f"made-up-{batch}-{i}", state="ok", root="blake3:" + "cd" * 32, files=1,
                            bytes=1, chunk_size=CHUNK) for i in range(count)])


def dataset_series(metrics: Metrics) -> set[str]:
    return {dict(labels)["dataset"] for (name, labels) in metrics if name == "selfheal_dataset_agreement_ratio"}


async def test_made_up_dataset_names_make_no_series_without_a_key_and_at_most_200_with_one(
        broker_dir: Path, tmp_path: Path) -> None:
    async with fleet(broker_dir, tmp_path) as f:
        controller = f.controller
        async with f.attacker() as evil:
            for batch in range(5):  # the 5 messages, 1,000 names
                await evil.publish(wire.node_topic(NODE_C, "digests"), wire.encode(made_up_digest(1, batch)), qos=1)
            await f.marker(evil, heard=6)
            assert NODE_C not in controller.fleet.nodes
            metrics = await scrape(controller)
            assert rejected(metrics) == {"unknown_node": 6}
            assert dataset_series(metrics) == {"ds"}
            assert not [labels for (_, labels) in metrics if any("made-up" in v for _, v in labels)]
            async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
                listed = (await http.get("/api/v1/nodes")).json()
            assert NODE_C in [n["id"] for n in listed["unknown"]]
            assert NODE_C not in [n["id"] for n in listed["items"]]

            # node-c's key too: a compromised node that signs what it says about itself.
            write_key(f.key_dir, NODE_C)
            key = read_key(f.key_dir, NODE_C)
            assert key is not None
            await eventually(lambda: controller.keys.get(NODE_C) is not None, what="node-c's key loaded")
            for batch in range(5):
                await evil.publish(wire.node_topic(NODE_C, "digests"),
                                   signed(made_up_digest(1, batch), "digests", key), qos=1)
            too_many = made_up_digest(1, 9, count=wire.MAX_DATASETS + 1)
            await evil.publish(wire.node_topic(NODE_C, "digests"), signed(too_many, "digests", key), qos=1)

            async def refused() -> bool:
                return rejected(await scrape(controller)).get("malformed", 0) >= 1
            await eventually(refused, what="the digest of 201 datasets refused at decode")

        names = set(controller.fleet.nodes[NODE_C].datasets)
        assert names == {f"made-up-4-{i}" for i in range(wire.MAX_DATASETS)}  # the last digest only
        metrics = await scrape(controller)
        assert rejected(metrics) == {"unknown_node": 6, "malformed": 1}
        series = dataset_series(metrics)
        assert len(series) <= 200
        assert "ds" in series  # the fleet's real dataset (two replicas) is kept first
        assert not [s for s in series if s.startswith("made-up-9-")]
        known = len(held_by_dataset(controller.fleet.nodes.values()))
        assert known == 201
        assert total(metrics, "selfheal_datasets_unexported") == known - 200
