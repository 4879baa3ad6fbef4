"""Broker loss with real processes: Mosquitto killed and restarted under a running fleet, and the
embedded broker going down with the controller that hosts it.

What must hold (issue 15, "Broker loss"):

- agents and controller are connected again within ``RECONNECT_WITHIN`` seconds of the broker
  answering, with the product's default ``mqtt.reconnect_max``. The figure is read from each
  process's own ``mqtt.connected`` log line against the instant the broker started answering, and it
  is taken once every process is in its capped backoff (a ``mqtt.disconnected`` line announcing a
  retry of at least half the cap), the slowest case there is, so it is what the product does and
  not a lucky early retry;
- what an agent had to say while the broker was away (a unit's exit, a command's result) reaches
  the controller once: one incident, one restart, one ack, no ack timeout;
- no command runs twice: the agent runs each idempotency key once (its ledger), and the controller
  sends one command per step;
- presence is right afterwards: every running node online, a node stopped during the outage
  offline, and a node killed after it announced offline by the last will it registered with the
  new broker.

The first three tests run ``selfheal controller`` and ``selfheal agent`` processes; the last three
pin the mechanisms down in-process: an agent back before its controller holds its events until the
controller's ``online`` reaches it, a stopping agent's ``offline`` is the last thing it says, and a
full outbox drops reports before events. Deadlines are generous (a loaded 2-core machine) except
the reconnect figure, which is the promise.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from selfheal import wire
from selfheal.config import MqttConfig, UnitConfig
from selfheal.keys import write_key
from selfheal.mqtt import MqttLink
from tests.conftest import Broker, eventually, eventually_sync, free_port, require_binary
from tests.e2e.conftest import Cluster
from tests.integration.test_agent_mqtt import SLEEPER, Observer, agent_config, running_agent, unique_node

pytestmark = pytest.mark.integration

RECONNECT_WITHIN = 5.0
"""Seconds from the broker answering again to every client being connected (and subscribed) again."""
CAP = MqttConfig().reconnect_max
"""The product's default backoff cap: the tests run with it, never a shortened one."""


def controller_toml(cluster: Cluster, *, url: str, extra: str = "", mqtt_extra: str = "") -> Path:
    """A controller with the default reconnect backoff; ``offline_after`` longer than the outages here."""
    path = cluster.root / "controller.toml"
    cluster.token_file.write_text("broker-loss-token\n")
    path.write_text(
        f'[mqtt]\nurl = "{url}"\nkeepalive = 2.0\n{mqtt_extra}'
        f'[controller]\nlisten = "127.0.0.1:{cluster.api_port}"\nstate_dir = "{cluster.root / "controller"}"\n'
        f"offline_after = 20.0\n{extra}"
        f'[security]\nkey_dir = "{cluster.root / "keys"}"\napi_token_file = "{cluster.token_file}"\n')
    return path


def agent_toml(cluster: Cluster, node: str, url: str, units: str) -> Path:
    """An agent with the default reconnect backoff and a short keep-alive (its last will fires soon)."""
    write_key(cluster.root / "keys", node)
    path = cluster.root / f"{node}.toml"
    path.write_text(
        f'[mqtt]\nurl = "{url}"\nkeepalive = 2.0\n'
        f'[agent]\nnode_id = "{node}"\ninterval = 0.5\nstate_dir = "{cluster.root / node}"\n'
        f'listen = "127.0.0.1:0"\nfallback_after = 60.0\n{units}'
        f'[security]\nkey_dir = "{cluster.root / "keys"}"\n')
    return path


def sleeper(name: str = "web") -> str:
    return (f'[[agent.units]]\nname = "{name}"\nkind = "process"\n'
            f'command = [{json.dumps(sys.executable)}, "-c", "import time; time.sleep(3600)"]\n')


def log_lines(cluster: Cluster, name: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of process ``name`` whose event is ``event``, oldest first."""
    lines = []
    for raw in (cluster.root / f"{name}.log").read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue  # a library's plain line
        if isinstance(line, dict) and line.get("event") == event:
            lines.append(line)
    return lines


def wait_logged(cluster: Cluster, name: str, event: str, what: str,
                where: Callable[[dict[str, Any]], bool] = lambda _: True) -> None:
    eventually_sync(lambda: any(where(line) for line in log_lines(cluster, name, event)), timeout=60,
                    interval=0.05, what=what)


def logged_at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["timestamp"])).timestamp()


def kill_broker(broker: Broker) -> None:
    broker.process.kill()
    broker.process.wait(10)


def start_broker(broker: Broker) -> float:
    """Start Mosquitto again on its port; returns the wall time of the last refused connection before it
    answered: the broker came up after it, so a delay measured from it is never shorter than the truth."""
    exe = require_binary("mosquitto", "mosquitto")
    broker.process = subprocess.Popen([exe, "-c", str(broker.config)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return answering_since(broker.port)


def answering_since(port: int, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    refused = time.time()
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return refused
        except OSError:
            refused = time.time()
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answers on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.01)


def wait_backoff_capped(cluster: Cluster, names: list[str]) -> None:
    """Until each process has announced a retry of at least half the cap: its slowest reconnects."""
    for name in names:
        wait_logged(cluster, name, "mqtt.disconnected", f"{name} retrying at its backoff cap",
                    lambda line: float(line.get("retry_in_s", 0)) >= CAP / 2)


def reconnect_delays(cluster: Cluster, names: list[str], since: float) -> dict[str, float]:
    """Seconds from ``since`` to each process's first ``mqtt.connected`` after it (waits for them)."""
    def connected(name: str) -> list[float]:
        return [t for line in log_lines(cluster, name, "mqtt.connected") if (t := logged_at(line)) > since]
    for name in names:
        wait_logged(cluster, name, "mqtt.connected", f"{name} connected again",
                    lambda line: logged_at(line) > since)
    return {name: round(min(connected(name)) - since, 3) for name in names}


def node_states(cluster: Cluster) -> dict[str, str]:
    return {n["id"]: n["state"] for n in cluster.get("/api/v1/nodes")["items"]}


def incidents(cluster: Cluster, node: str, kind: str) -> list[dict[str, Any]]:
    return [i for i in cluster.get("/api/v1/incidents")["items"] if i["node"] == node and i["kind"] == kind]


def wait_resolved(cluster: Cluster, node: str, kind: str) -> dict[str, Any]:
    eventually_sync(lambda: any(i["state"] == "resolved" for i in incidents(cluster, node, kind)), timeout=60,
                    what=f"the {kind} incident of {node} resolved")
    (incident,) = incidents(cluster, node, kind)  # one incident: the event was not seen twice
    return dict(cluster.get(f"/api/v1/incidents/{incident['id']}"))


def kinds(detail: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [entry for entry in detail["timeline"] if entry["kind"] == kind]


def test_mosquitto_killed_under_a_fleet(cluster: Cluster) -> None:
    url = cluster.broker.url
    cluster.start("controller", "controller", controller_toml(cluster, url=url))
    cluster.wait_ready()
    for node in ("node-a", "node-b", "node-c"):
        cluster.start(node, "agent", agent_toml(cluster, node, url, sleeper()))
    before = {node: cluster.wait_healthy(node) for node in ("node-a", "node-b", "node-c")}

    kill_broker(cluster.broker)
    everyone = ["controller", "node-a", "node-b", "node-c"]
    for name in everyone:
        wait_logged(cluster, name, "mqtt.disconnected", f"{name} to notice the broker is gone")
    os.kill(before["node-a"]["pid"], signal.SIGKILL)  # a crash nobody can hear of yet
    wait_logged(cluster, "node-a", "unit.exited", "node-a to notice its unit's exit")
    cluster.procs["node-c"].send_signal(signal.SIGTERM)  # stopped while its offline cannot be sent
    assert cluster.procs["node-c"].wait(30) == 0
    running = ["controller", "node-a", "node-b"]
    wait_backoff_capped(cluster, running)

    answering = start_broker(cluster.broker)
    delays = reconnect_delays(cluster, running, answering)
    assert max(delays.values()) <= RECONNECT_WITHIN, delays

    # The crash reaches the controller once and is healed once.
    healed = cluster.wait_healthy("node-a", restarts_above=before["node-a"]["restarts"], timeout=60)
    detail = wait_resolved(cluster, "node-a", "unit_exited")
    assert len(detail["plans"]) == 1
    assert len(kinds(detail, "command_sent")) == 1
    assert [e["data"]["status"] for e in kinds(detail, "command_result")] == ["done"]
    assert not kinds(detail, "command_timeout")
    assert healed["restarts"] == before["node-a"]["restarts"] + 1
    assert len(log_lines(cluster, "node-a", "unit.started")) == 2  # the first start and the one heal
    assert len(log_lines(cluster, "node-a", "command.result")) == 1

    # Presence: the running nodes online, the one stopped during the outage offline, and a node killed
    # now announced offline by the last will of its new connection (not merely gone silent).
    eventually_sync(lambda: node_states(cluster) == {"node-a": "online", "node-b": "online", "node-c": "offline"},
                    timeout=60, what="node-a and node-b online, node-c offline")
    cluster.unit("node-b")  # remembered for cleanup: its agent dies hard
    cluster.procs["node-b"].kill()
    eventually_sync(lambda: any("went offline" in i["summary"] for i in incidents(cluster, "node-b", "node_offline")),
                    timeout=30, what="node-b's last will")
    assert node_states(cluster)["node-b"] == "offline"


def test_a_command_in_flight_when_the_broker_dies_runs_once(cluster: Cluster) -> None:
    """The agent is executing a restart when the broker dies; its result waits out the outage."""
    url = cluster.broker.url
    sick, terms = cluster.root / "sick", cluster.root / "terms"
    # SIGTERM is noted and ignored: the restart takes the whole stop_grace, long enough to kill the broker.
    program = ("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *_: open(sys.argv[1], 'a').write('term\\n'))\n"
               "time.sleep(3600)\n")
    unit = (f'[[agent.units]]\nname = "web"\nkind = "process"\nstop_grace = 4.0\n'
            f"command = [{json.dumps(sys.executable)}, \"-c\", {json.dumps(program)}, \"{terms}\"]\n"
            f'[agent.units.probe]\nkind = "exec"\ntarget = ["test", "!", "-e", "{sick}"]\n'
            f"interval = 0.3\nfailures = 2\nstart_period = 1.0\n")
    # A long ack timeout: the ack is late by the outage; it must arrive, not be given up on.
    cluster.start("controller", "controller",
                  controller_toml(cluster, url=url, extra="ack_timeout = 30.0\ncommand_ttl = 30.0\n"))
    cluster.wait_ready()
    cluster.start("node-a", "agent", agent_toml(cluster, "node-a", url, unit))
    before = cluster.wait_healthy("node-a")

    sick.touch()
    eventually_sync(terms.exists, timeout=60, what="the restart command under way on the agent")
    kill_broker(cluster.broker)
    sick.unlink()
    wait_logged(cluster, "node-a", "command.result", "the restart done while the broker is away")
    wait_backoff_capped(cluster, ["node-a"])
    # The agent gets back first (the controller is held still until then): its result must wait for a
    # controller that listens, not go to a broker with nobody subscribed.
    cluster.procs["controller"].send_signal(signal.SIGSTOP)
    try:
        answering = start_broker(cluster.broker)
        delays = reconnect_delays(cluster, ["node-a"], answering)
        assert max(delays.values()) <= RECONNECT_WITHIN, delays
    finally:
        cluster.procs["controller"].send_signal(signal.SIGCONT)

    detail = wait_resolved(cluster, "node-a", "probe_failing")
    assert len(kinds(detail, "command_sent")) == 1
    assert [e["data"]["status"] for e in kinds(detail, "command_result")] == ["done"]
    assert not kinds(detail, "command_timeout")
    assert detail["plans"][0]["state"] == "succeeded"
    (result,) = log_lines(cluster, "node-a", "command.result")  # run once, never answered "duplicate"
    assert result["status"] == "done"
    assert terms.read_text() == "term\n"  # the old process was asked to stop once
    assert cluster.wait_healthy("node-a")["restarts"] == before["restarts"] + 1


def test_the_embedded_broker_comes_back_with_its_controller(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    cluster = Cluster(root=tmp_path, broker=Broker("127.0.0.1", port, None, tmp_path))  # type: ignore[arg-type]
    failed = request.session.testsfailed
    try:
        config = controller_toml(cluster, url="embedded", mqtt_extra=f'embedded_listen = "127.0.0.1:{port}"\n')
        cluster.start("controller", "controller", config)
        cluster.wait_ready()
        for node in ("node-a", "node-b"):
            cluster.start(node, "agent", agent_toml(cluster, node, url, sleeper()))
        before = {node: cluster.wait_healthy(node) for node in ("node-a", "node-b")}

        cluster.procs["controller"].kill()  # the broker goes with it
        cluster.procs["controller"].wait(30)
        for node in ("node-a", "node-b"):
            wait_logged(cluster, node, "mqtt.disconnected", f"{node} to notice the broker is gone")
        os.kill(before["node-a"]["pid"], signal.SIGKILL)
        wait_logged(cluster, "node-a", "unit.exited", "node-a to notice its unit's exit")
        cluster.procs["node-b"].send_signal(signal.SIGTERM)
        assert cluster.procs["node-b"].wait(30) == 0
        wait_backoff_capped(cluster, ["node-a"])

        cluster.start("controller", "controller", config)
        answering = answering_since(port)
        delays = reconnect_delays(cluster, ["node-a"], answering)
        assert max(delays.values()) <= RECONNECT_WITHIN, delays
        cluster.wait_ready()

        healed = cluster.wait_healthy("node-a", restarts_above=before["node-a"]["restarts"], timeout=60)
        detail = wait_resolved(cluster, "node-a", "unit_exited")
        assert len(kinds(detail, "command_sent")) == 1
        assert [e["data"]["status"] for e in kinds(detail, "command_result")] == ["done"]
        assert healed["restarts"] == before["node-a"]["restarts"] + 1
        assert len(log_lines(cluster, "node-a", "unit.started")) == 2
        # The new controller heard node-a; node-b stopped while it was down is not shown online.
        eventually_sync(lambda: node_states(cluster).get("node-a") == "online", timeout=30, what="node-a online")
        assert node_states(cluster).get("node-b", "offline") == "offline"
    finally:
        cluster.stop_all()
        if request.session.testsfailed > failed:
            print(cluster.logs())


async def test_events_wait_for_the_controller_after_a_broker_restart(own_mosquitto: Broker,
                                                                     tmp_path: Path) -> None:
    """An agent back on a restarted broker keeps its events until the controller says it listens."""
    broker = own_mosquitto
    node = unique_node("held")
    config = agent_config(broker, tmp_path, node, [UnitConfig(name="victim", command=SLEEPER)])
    online = wire.encode(wire.ControllerStatus(state="online", session="ctl-1"))
    filters = [wire.node_topic(node, "events"), wire.node_topic(node, "report")]
    async with Observer(broker, filters) as obs, running_agent(config) as app:
        await obs.publish(wire.CONTROLLER_STATUS_TOPIC, online, retain=True)
        await eventually(app._controller_present, what="the agent to hear of the controller")
        await eventually(lambda: bool(obs.events(node)), what="the unit's start")
        seen = len(obs.events(node))
        await asyncio.to_thread(broker.stop)  # forgets the retained status and every subscription
        await eventually(lambda: not app.link.connected.is_set(), what="the agent to notice the outage")
        pid = app.supervisor.entries["victim"].unit.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: app.link.holding == 1, what="the exit queued")

        await asyncio.to_thread(broker.start)
        await eventually(lambda: app.link.connects == 2 and obs.connected.is_set(), what="both back")
        back = time.time()
        # A report sent after the reconnect has arrived: an event sent before it would have too.
        await eventually(lambda: any(r.ts > back for r in obs.reports(node)), what="a report after the restart")
        assert obs.events(node)[seen:] == []
        assert app.link.holding == 1

        await obs.publish(wire.CONTROLLER_STATUS_TOPIC, online, retain=True)  # the controller is back
        await eventually(lambda: len(obs.events(node)) > seen, what="the held exit")
        await eventually(lambda: app.link.holding == 0, what="the outbox drained")
        (exited,) = obs.events(node)[seen:]
        assert isinstance(exited, wire.UnitExited)
        assert (exited.unit, exited.pid, exited.expected) == ("victim", pid, False)
        assert app.link.dropped == 0


async def test_with_several_controllers_one_leaving_holds_nothing_and_the_last_one_leaving_does(
        own_mosquitto: Broker, tmp_path: Path) -> None:
    """Controllers sharing a PostgreSQL store each have a status topic: one of them crashing (its will says
    offline) or stopping (it clears its status) leaves the others listening; only when none is left does the
    agent hold its events (and, later, heal on its own)."""
    node = unique_node("several")
    config = agent_config(own_mosquitto, tmp_path, node, [UnitConfig(name="victim", command=SLEEPER)])
    c1, c2 = wire.controller_status_topic("c1"), wire.controller_status_topic("c2")
    async with Observer(own_mosquitto, [wire.node_topic(node, "events")]) as obs, running_agent(config) as app:
        try:
            for topic, session in ((c1, "s1"), (c2, "s2")):
                await obs.publish(topic, wire.encode(wire.ControllerStatus(state="online", session=session)),
                                  retain=True)
            await eventually(lambda: len(app._controllers) == 2, what="both controllers heard")
            await obs.publish(c1, wire.encode(wire.ControllerStatus(state="offline", session="s1")), retain=True)
            await eventually(lambda: c1 not in app._controllers, what="c1's will heard")
            assert app._controller_present()
            pid = app.supervisor.entries["victim"].unit.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await eventually(lambda: any(isinstance(e, wire.UnitExited) for e in obs.events(node)),
                             what="the exit sent at once: c2 listens")
            await obs.publish(c2, b"", retain=True)  # c2 stopped cleanly: its status cleared
            await eventually(lambda: not app._controller_present(), what="no controller left")
            assert app.link._released is False
        finally:
            for topic in (c1, c2):  # the session's shared broker keeps nothing of this test
                await obs.publish(topic, b"", retain=True)


async def test_a_stopping_agent_says_offline_last(own_mosquitto: Broker, tmp_path: Path) -> None:
    """Its units' exits go before its ``offline``: an event after it would make the node look alive again."""
    broker = own_mosquitto
    node = unique_node("last")
    config = agent_config(broker, tmp_path, node, [UnitConfig(name="a", command=SLEEPER),
                                                   UnitConfig(name="b", command=SLEEPER)])
    filters = [wire.node_topic(node, "events"), wire.node_topic(node, "status"), "test/marker"]
    async with Observer(broker, filters) as obs:
        async with running_agent(config):
            await eventually(lambda: any(s.state == "online" for s, _ in obs.statuses(node)), what="birth")
        # The agent has flushed all it sent; the broker orders the marker after it.
        await obs.publish("test/marker", b"end")
        await eventually(lambda: any(t == "test/marker" for t, _, _ in obs.messages), what="the marker")
    said = [(t.rsplit("/", 1)[-1], p) for t, p, _ in obs.messages if t != "test/marker" and p]
    last_channel, last_payload = said[-1]
    assert last_channel == "status"
    assert wire.decode_node_message(wire.node_topic(node, "status"), last_payload).state == "offline"  # type: ignore[union-attr]
    exits = [e for e in obs.events(node) if isinstance(e, wire.UnitExited)]
    assert sorted((e.unit, e.expected) for e in exits) == [("a", True), ("b", True)]


async def test_a_full_outbox_drops_reports_before_events(own_mosquitto: Broker) -> None:
    """Queued while disconnected beyond ``outbox_size``: the oldest report goes, the events stay, and
    held events go out first once released."""
    broker = own_mosquitto
    link = MqttLink(broker.host, broker.port, client_id=f"outbox-{uuid.uuid4().hex[:8]}", outbox_size=4)
    for topic, held in (("r1", False), ("e1", True), ("r2", False), ("e2", True), ("r3", False), ("e3", True)):
        link.publish(f"test/{link.client_id}/{topic}", topic.encode(), qos=1, held=held)
    assert (link.dropped, link.holding) == (2, 3)  # r1 and r2: every event is still there
    link.hold()
    stop = asyncio.Event()
    async with Observer(broker, [f"test/{link.client_id}/#"]) as obs:
        async def ignore(topic: str, payload: bytes) -> None:
            return None

        async def nothing(link: MqttLink) -> None:
            return None

        runner = asyncio.create_task(link.run(stop=stop, handle=ignore, on_connect=nothing))
        try:
            await eventually(lambda: [p for _, p, _ in obs.messages] == [b"r3"], what="the report, not the events")
            link.release()
            await eventually(lambda: len(obs.messages) == 4, what="the events")
            assert [p for _, p, _ in obs.messages] == [b"r3", b"e1", b"e2", b"e3"]
        finally:
            stop.set()
            await runner


async def test_a_report_queued_on_a_connection_that_ended_is_not_sent_on_the_next(own_mosquitto: Broker) -> None:
    """A report says what the units are now: queued while the link was (unknowingly) cut off, it would arrive
    after the node's new ``online`` with its units as they were before, so it is dropped at the reconnect;
    what is not ``current`` (events, digests) still goes."""
    broker = own_mosquitto
    link = MqttLink(broker.host, broker.port, client_id=f"current-{uuid.uuid4().hex[:8]}")
    topic = f"test/{link.client_id}"
    link.publish(f"{topic}/report", b"before", current=True)
    link.publish(f"{topic}/digest", b"digest", qos=1)
    stop = asyncio.Event()
    async with Observer(broker, [f"{topic}/#"]) as obs:
        async def ignore(topic: str, payload: bytes) -> None:
            return None

        async def born(link: MqttLink) -> None:
            link.publish(f"{topic}/status", b"online", qos=1)
            link.publish(f"{topic}/report", b"now", current=True)

        runner = asyncio.create_task(link.run(stop=stop, handle=ignore, on_connect=born))
        try:
            await eventually(lambda: len(obs.messages) == 3, what="the digest, the birth and the new report")
            assert [p for _, p, _ in obs.messages] == [b"digest", b"online", b"now"]
            assert link.dropped == 1
        finally:
            stop.set()
            await runner
