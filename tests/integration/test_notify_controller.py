"""Chat alerts from a real controller: a unit exit goes to a Slack-kind destination (a local receiver) as
an "opened / action taken" message, then a "resolved" one; every delivery is in the incident's audit trail,
and the webhook URL appears in no API response and no log line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import httpx
import pytest
import structlog

from controller.app import running_controller
from selfheal import wire
from selfheal.config import load_config
from selfheal.keys import read_key, write_key
from tests.conftest import Broker, eventually, free_port
from tests.integration.test_controller_flow import ScriptedAgent, _running
from tests.webhook_receiver import WebhookReceiver, webhook_receiver

pytestmark = pytest.mark.integration
SECRET = "/services/T0CONTROLLER/B0SECRET/tokenXYZ987"  # noqa: S105 - a fake webhook path the test hunts for


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    out = io.StringIO()
    structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
                        logger_factory=structlog.PrintLoggerFactory(out), cache_logger_on_first_use=False)
    yield out
    structlog.reset_defaults()


@pytest.fixture
async def mqtt_client(mosquitto: Broker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        yield client


def _config(tmp_path: Path, broker: Broker, url: str) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(
        f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 2.0\n'
        f'[controller]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "{tmp_path / "state"}"\n'
        f"offline_after = 60.0\nack_timeout = 3.0\n"
        f'[[controller.notify]]\nkind = "slack"\nname = "ops-chat"\nurl = "{url}"\n'
        # group_wait: long enough, on a loaded machine, for the plan started in the incident's first
        # evaluation to join the opened message (the first FIRING message names the action)
        f'matchers = {{ kind = "unit_*" }}\ngroup_wait = 1.0\ngroup_interval = 0.3\n'
        f'[security]\nkey_dir = "{tmp_path / "keys"}"\n')
    return path


async def test_a_unit_exit_is_told_opened_then_resolved_and_audited(
        tmp_path: Path, mosquitto: Broker, mqtt_client: aiomqtt.Client, *, receiver: WebhookReceiver,
        logs: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    node = "notify-exit"
    url = receiver.url(SECRET)
    write_key(tmp_path / "keys", node)
    receiver.answer(SECRET, 503, {"Retry-After": "0"})  # one hiccup: retried, and audited as such
    agent = ScriptedAgent(mqtt_client, node, read_key(tmp_path / "keys", node))
    await mqtt_client.subscribe(wire.node_topic(node, "commands"), qos=1)
    async with running_controller(load_config(_config(tmp_path, mosquitto, url))) as controller, \
            httpx.AsyncClient(base_url=f"http://{controller.api_address}") as api:
        await agent.birth()
        await agent.report(_running(pid=100))
        await eventually(lambda: controller.fleet.unit(node, "web") is not None, what="unit known")
        await agent.event(wire.UnitExited(unit="web", pid=100, exit_signal=9))
        async with asyncio.timeout(15):
            async for message in mqtt_client.messages:
                command = wire.decode_node_message(str(message.topic), bytes(message.payload))  # type: ignore[arg-type]
                break
        assert isinstance(command, wire.Command)

        def texts() -> list[str]:
            return [r.body["text"] for r in receiver.received(SECRET) if isinstance(r.body, dict)]
        await eventually(lambda: any(node in t and "FIRING" in t for t in texts()), what="the opened message")

        await agent.event(wire.CommandResult(command_id=command.id, key=command.key, status="done"))
        await agent.event(wire.UnitStarted(unit="web", pid=101, restarts=1))
        await agent.event(wire.ProbeChanged(unit="web", probe=_running(101, 1).probe))  # type: ignore[arg-type]
        await eventually(lambda: any(t.startswith("[RESOLVED]") for t in texts()), what="the resolved message")

        incident = next(i for i in (await api.get("/api/v1/incidents")).json()["items"] if i["node"] == node)

        async def audited() -> bool:
            timeline = (await api.get(f"/api/v1/incidents/{incident['id']}")).json()["timeline"]
            return sum(1 for e in timeline if e["kind"] == "delivery" and e["data"]["outcome"] == "sent") >= 2
        await eventually(audited, what="the resolved delivery in the audit trail")
        detail = (await api.get(f"/api/v1/incidents/{incident['id']}")).json()
        responses = [await api.get(p) for p in (
            "/api/v1/incidents", f"/api/v1/incidents/{incident['id']}", "/api/v1/plans", "/api/v1/stats",
            "/api/v1/nodes", "/api/v1/silences", "/api/v1/openapi.json", "/metrics", "/")]

    timeline = detail["timeline"]
    assert detail["state"] == "resolved"
    notices = [e["data"]["event"] for e in timeline if e["kind"] == "notice"]
    assert notices[0] == "opened"
    assert notices[-1] == "resolved"
    assert {"action", "outcome"} <= set(notices)
    assert all(d["destination"] in ("log", "ops-chat") for e in timeline if e["kind"] == "notice"
               for d in e["data"]["deliveries"])
    attempts = [e["data"] for e in timeline if e["kind"] == "delivery_attempt"]
    assert (attempts[0]["result"], attempts[0]["http_status"]) == ("retry", 503)
    deliveries = [e["data"] for e in timeline if e["kind"] == "delivery"]
    assert all(d["destination"] == "ops-chat" and d["destination_kind"] == "slack" for d in deliveries)
    assert next(d["status"] for d in deliveries) == "firing"
    assert deliveries[-1]["status"] == "resolved"

    first = next(r.body for r in receiver.received(SECRET) if "FIRING" in r.body["text"])
    assert "unit web" in first["text"]
    assert "restart_unit" in json.dumps(first["blocks"])
    assert f"/incidents/{incident['id']}" in json.dumps(first["blocks"])
    last = receiver.received(SECRET)[-1].body
    assert last["text"].startswith("[RESOLVED]")
    assert "yes" in last["text"]

    for response in responses:
        assert response.status_code == 200
        for secret in (url, SECRET, "T0CONTROLLER", "tokenXYZ987"):
            assert secret not in response.text, response.url
    metrics = next(r.text for r in responses if r.url.path == "/metrics")
    assert 'selfheal_webhook_deliveries_total{destination_kind="slack",outcome="sent"}' in metrics
    assert "selfheal_notifications_dropped_total 0.0" in metrics
    captured = logs.getvalue() + caplog.text
    assert '"notify.destination"' in captured
    assert f"{receiver.url('')}/…" in captured
    for secret in (SECRET, "T0CONTROLLER", "tokenXYZ987"):
        assert secret not in captured
