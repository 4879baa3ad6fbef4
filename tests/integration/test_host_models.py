"""The per-host IsolationForest in a running controller: fitted off the loop, a strange host vector opens an incident.

A scripted agent sends reports over a real Mosquitto in which memory follows
CPU; once the controller has fitted the host's model (in its worker thread),
more of the same opens nothing, and a vector whose values are each in range
but whose combination never occurred opens a ``host_anomaly`` incident whose
evidence names the vector, the host's typical vector and the score.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import httpx
import pytest

from controller.app import Controller, running_controller
from selfheal import wire
from selfheal.config import load_config
from tests.conftest import Broker, controller_config_with_rules, eventually

pytestmark = pytest.mark.integration
NODE = "hostvec-a"
RULES = """version: 1
host_models:
  - name: host-vector
    features: [cpu_percent, mem_percent]
    step: 0
    history: 400
    min_samples: 200
    refit_every: 1000000
    policy: {threshold: 0.98, persistence: 3, window: 3, hold: 30}
rules:
  - name: report-host-anomaly
    match: {kind: host_anomaly}
    ladder: [{action: notify}]
    verify: {kind: cleared}
"""


@pytest.fixture
async def mqtt_client(mosquitto: Broker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        yield client


class Host:
    """A scripted agent whose host metrics the test chooses."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client, self.seq = client, 0

    async def birth(self) -> None:
        status = wire.NodeStatus(node=NODE, state="online", session=1, units=[], ts=time.time())
        await self.client.publish(wire.node_topic(NODE, "status"), wire.encode(status), qos=1, retain=True)

    async def report(self, cpu: float, mem: float) -> None:
        self.seq += 1
        host = wire.HostMetrics(cpu_percent=cpu, load1=0, load5=0, load15=0, mem_total_bytes=1,
                                mem_available_bytes=1, mem_percent=mem, swap_percent=0)
        report = wire.Report(node=NODE, session=1, seq=self.seq, ts=time.time(), host=host, units=[])
        await self.client.publish(wire.node_topic(NODE, "report"), wire.encode(report), qos=1)
        await asyncio.sleep(0.02)  # paced below the engine's history per tick (120 reports)


async def _incidents(controller: Controller) -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
        items: list[dict[str, object]] = (await http.get("/api/v1/incidents")).json()["items"]
    return [i for i in items if i["node"] == NODE and i["kind"] == "host_anomaly"]


async def test_an_unseen_combination_of_host_metrics_opens_a_host_anomaly_incident(
        tmp_path: Path, mosquitto: Broker, mqtt_client: aiomqtt.Client) -> None:
    path = controller_config_with_rules(tmp_path, mosquitto, RULES)
    rng = random.Random(5)  # noqa: S311 - test data
    host = Host(mqtt_client)
    async with running_controller(load_config(path)) as controller:
        await host.birth()
        for _ in range(240):
            cpu = rng.uniform(10, 80)
            await host.report(cpu, cpu + rng.gauss(0, 2))

        def fitted() -> bool:
            return controller.anomalies is not None and controller.anomalies.hosts is not None \
                and controller.anomalies.hosts.fits >= 1
        await eventually(fitted, what="the host model fitted in the worker thread")
        for _ in range(30):  # the usual, scored by the fitted model: nothing
            cpu = rng.uniform(10, 80)
            await host.report(cpu, cpu + rng.gauss(0, 2))
        await asyncio.sleep(1.5)  # one scoring round of the host-model task, not a wait for a condition
        assert await _incidents(controller) == []

        for _ in range(5):  # CPU at its lowest, memory at its highest: each in range, never together
            await host.report(10.0, 80.0)

        async def opened() -> bool:
            return bool(await _incidents(controller))
        await eventually(opened, what="a host_anomaly incident")
        incident = (await _incidents(controller))[0]
        async with httpx.AsyncClient(base_url=f"http://{controller.api_address}") as http:
            detail = (await http.get(f"/api/v1/incidents/{incident['id']}")).json()
        evidence = detail["timeline"][0]["data"]["evidence"]
        assert evidence["model"] == "host-vector"
        assert evidence["score"] >= 0.98
        assert evidence["vector"] == {"cpu_percent": 10.0, "mem_percent": 80.0}
        assert abs(evidence["typical"]["cpu_percent"] - evidence["typical"]["mem_percent"]) < 5
        assert evidence["window"]
