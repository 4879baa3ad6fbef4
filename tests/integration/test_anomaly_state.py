"""What the anomaly watches learned survives a controller restart (and a bad state file never stops one).

A scripted agent sends reports over a real Mosquitto to a real controller
with a ``fused`` watch; the controller is stopped and started again on the
same state directory, and the watch's stream is back with its history.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from prometheus_client import generate_latest

from controller.anomaly_state import FILENAME, LEGACY_FILENAME, code_fingerprint
from controller.app import Controller, running_controller
from controller.lifecycle import controller_service
from selfheal import wire
from selfheal.config import Config, load_config
from tests.conftest import Broker, controller_config_with_rules, eventually

pytestmark = pytest.mark.integration
NODE = "state-a"
RULES = """version: 1
anomalies:
  - name: host-cpu
    metric: host.cpu_percent
    detector: {kind: fused}
    policy: {threshold: 0.05}
rules:
  - name: report-anomaly
    match: {kind: metric_anomaly}
    ladder: [{action: notify}]
    verify: {kind: cleared}
"""
RULES_WITH_LOAD = RULES.replace("rules:\n", """  - name: host-load
    metric: host.load1
    detector: {kind: fused}
rules:
""", 1)


@pytest.fixture
async def mqtt_client(mosquitto: Broker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        yield client


@pytest.fixture
def config(tmp_path: Path, mosquitto: Broker) -> Config:
    return load_config(controller_config_with_rules(tmp_path, mosquitto, RULES))


async def send_reports(client: aiomqtt.Client, count: int) -> None:
    status = wire.NodeStatus(node=NODE, state="online", session=1, units=[], ts=time.time())
    await client.publish(wire.node_topic(NODE, "status"), wire.encode(status), qos=1, retain=True)
    for seq in range(1, count + 1):
        host = wire.HostMetrics(cpu_percent=20.0 + seq % 5, load1=0, load5=0, load15=0, mem_total_bytes=1,
                                mem_available_bytes=1, mem_percent=1, swap_percent=0)
        report = wire.Report(node=NODE, session=1, seq=seq, ts=time.time(), host=host, units=[])
        await client.publish(wire.node_topic(NODE, "report"), wire.encode(report), qos=1)


def moved_aside(state: Path) -> bytes:
    return Path(f"{state}.bad").read_bytes()


def history_of(controller: Controller) -> float:
    watch = controller.anomalies
    assert watch is not None
    stream = watch._streams.get(("host-cpu", NODE, ""))
    return 0.0 if stream is None else len(stream.window)


async def test_a_restarted_controller_resumes_its_anomaly_streams(config: Config, mqtt_client: aiomqtt.Client) -> None:
    state = Path(config.controller.state_dir) / FILENAME
    async with running_controller(config) as controller:
        await send_reports(mqtt_client, 12)
        await eventually(lambda: history_of(controller) == 12, what="12 reports fed to the watch")
    assert state.exists()
    assert state.stat().st_mode & 0o777 == 0o600
    async with running_controller(config) as controller:
        assert history_of(controller) == 12  # back before any new report arrived


async def test_an_unusable_state_file_is_moved_aside_and_the_controller_starts(config: Config) -> None:
    state = Path(config.controller.state_dir) / FILENAME
    state.parent.mkdir(parents=True)
    state.write_bytes(b"not a pickle")
    async with running_controller(config) as controller:
        assert history_of(controller) == 0
    assert moved_aside(state) == b"not a pickle"
    assert state.exists()  # the clean stop wrote a fresh one


async def test_a_reload_keeps_the_streams_of_unchanged_watches(config: Config, mqtt_client: aiomqtt.Client) -> None:
    async with running_controller(config) as controller:
        await send_reports(mqtt_client, 12)
        await eventually(lambda: history_of(controller) == 12, what="12 reports fed to the watch")
        rules = Path(config.controller.rulebooks[0])
        write_rules(rules, RULES_WITH_LOAD)  # a second watch: the specs changed, so the watch is rebuilt
        assert controller.engine is not None
        service = controller_service(controller, controller.engine, source=None, build_router=lambda _: None,
                                     routes=controller.routes, tasks={})
        assert service.apply is not None
        await service.apply(config, ["controller.rulebooks"])
        watch = controller.anomalies
        assert watch is not None
        assert [spec.name for spec in watch.specs] == ["host-cpu", "host-load"]
        assert history_of(controller) == 12  # carried over: host-cpu's spec did not change


def write_rules(path: Path, text: str) -> None:
    path.write_text(text)


class Plant:
    """Unpickling this creates ``marker``: what an attacker would leave as a pickled state file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


async def test_a_planted_pickle_is_set_aside_unread_and_never_runs(config: Config, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    crafted = pickle.dumps({"format": 1, "code": code_fingerprint(), "specs": {}, "streams": [Plant(marker)]})
    legacy, current = plant(Path(config.controller.state_dir), crafted)  # the old name and the new one
    async with running_controller(config) as controller:
        assert history_of(controller) == 0
        assert not marker.exists()
        text = generate_latest(controller.metrics.registry).decode()
        assert 'selfheal_state_files_rejected_total{reason="legacy_pickle"} 1.0' in text
        assert 'selfheal_state_files_rejected_total{reason="unusable"} 1.0' in text
    assert not marker.exists()
    assert moved_aside(legacy) == crafted
    assert moved_aside(current) == crafted
    assert not legacy.exists()


def plant(state_dir: Path, data: bytes) -> tuple[Path, Path]:
    state_dir.mkdir(parents=True)
    legacy, current = state_dir / LEGACY_FILENAME, state_dir / FILENAME
    legacy.write_bytes(data)
    current.write_bytes(data)
    return legacy, current
