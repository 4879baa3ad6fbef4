"""The human side of the engine over real HTTP: bearer token, pause, silences, stats, audit verification."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import httpx
import pytest
import structlog

from controller.app import Controller, running_controller
from controller.store import Incident, PlanRecord
from selfheal import wire
from selfheal.cli import main
from selfheal.config import load_config
from selfheal.errors import ConfigError, StoreError
from selfheal.keys import read_key, write_key
from tests.conftest import Broker, eventually, free_port
from tests.integration.test_controller_flow import ScriptedAgent, _running

pytestmark = pytest.mark.integration
TOKEN = "integration-token-0123456789"  # noqa: S105 - a test fixture, not a secret


def _config(tmp_path: Path, broker: Broker, *, token: bool = True) -> Path:
    token_file = tmp_path / "api.token"
    if token:
        token_file.write_text(TOKEN + "\n")
    path = tmp_path / "controller.toml"
    path.write_text(
        f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 2.0\n'
        f'[controller]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "{tmp_path / "state"}"\n'
        f"offline_after = 60.0\nack_timeout = 3.0\n"
        f'[security]\nkey_dir = "{tmp_path / "keys"}"\napi_token_file = "{token_file}"\n')
    return path


@pytest.fixture
async def mqtt_client(mosquitto: Broker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        yield client


def _http(controller: Controller, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://{controller.api_address}", headers=headers)


async def test_mutating_endpoints_need_the_bearer_token(tmp_path: Path, mosquitto: Broker) -> None:
    async with running_controller(load_config(_config(tmp_path, mosquitto))) as controller, \
            _http(controller, token=None) as anonymous, _http(controller, "wrong") as wrong:
        for client in (anonymous, wrong):
            response = await client.post("/api/v1/pause", json={"reason": "x"})
            assert response.status_code == 401
            assert response.headers["content-type"] == "application/problem+json"
        assert (await anonymous.get("/api/v1/pause")).json() == {"paused": False, "reason": ""}


async def test_without_a_token_file_the_controller_fails_closed(tmp_path: Path, mosquitto: Broker) -> None:
    async with running_controller(load_config(_config(tmp_path, mosquitto, token=False))) as controller, \
            _http(controller) as client:
        response = await client.post("/api/v1/pause", json={})
        assert response.status_code == 503
        assert "no API token" in response.json()["detail"]


async def test_pause_holds_restarts_and_persists_across_a_restart(
        tmp_path: Path, mosquitto: Broker, mqtt_client: aiomqtt.Client) -> None:
    node = "api-pause"
    write_key(tmp_path / "keys", node)
    config = load_config(_config(tmp_path, mosquitto))
    agent = ScriptedAgent(mqtt_client, node, read_key(tmp_path / "keys", node))
    async with running_controller(config) as controller, _http(controller) as client:
        paused = await client.post("/api/v1/pause", json={"reason": "maintenance window"})
        assert paused.json() == {"paused": True, "reason": "maintenance window"}
        await agent.birth()
        await agent.report(_running(pid=10))
        await eventually(lambda: controller.fleet.unit(node, "web") is not None, what="unit known")
        await agent.event(wire.UnitExited(unit="web", pid=10, exit_signal=9))

        async def held() -> bool:
            items = [i for i in (await client.get("/api/v1/incidents")).json()["items"] if i["node"] == node]
            if not items:
                return False
            timeline = (await client.get(f"/api/v1/incidents/{items[0]['id']}")).json()["timeline"]
            return any(e["kind"] == "held" and e["data"]["blocking"]["guard"] == "pause" for e in timeline)
        await eventually(held, what="the restart held by the pause")
        assert not (await client.get("/api/v1/plans")).json()["items"]
    async with running_controller(config) as controller, _http(controller) as client:
        assert (await client.get("/api/v1/pause")).json()["paused"] is True
        assert (await client.post("/api/v1/resume")).json()["paused"] is False


async def test_silences_mute_matching_incidents_and_can_be_expired(
        tmp_path: Path, mosquitto: Broker, mqtt_client: aiomqtt.Client) -> None:
    node = "api-silence"
    write_key(tmp_path / "keys", node)
    agent = ScriptedAgent(mqtt_client, node, read_key(tmp_path / "keys", node))
    async with running_controller(load_config(_config(tmp_path, mosquitto))) as controller, \
            _http(controller) as client:
        bad = await client.post("/api/v1/silences", json={"matchers": [], "comment": "x", "author": "me"})
        assert bad.status_code == 422
        created = await client.post("/api/v1/silences", json={
            "matchers": [{"name": "node", "value": "api-sil*"}], "duration_s": 3600,
            "comment": "disk swap", "author": "ops"})
        assert created.status_code == 201
        silence = created.json()
        assert silence["active"] is True
        await agent.birth()
        await agent.report(_running(pid=10))
        await eventually(lambda: controller.fleet.unit(node, "web") is not None, what="unit known")
        await agent.event(wire.UnitExited(unit="web", pid=10, exit_code=1))

        async def silenced() -> bool:
            items = [i for i in (await client.get("/api/v1/incidents")).json()["items"] if i["node"] == node]
            if not items:
                return False
            timeline = (await client.get(f"/api/v1/incidents/{items[0]['id']}")).json()["timeline"]
            return any(e["kind"] == "held" and e["data"]["blocking"]["guard"] == "silence" for e in timeline)
        await eventually(silenced, what="held by the silence")
        listed = (await client.get("/api/v1/silences")).json()["items"]
        assert [s["id"] for s in listed] == [silence["id"]]

        async def reported() -> bool:
            items = [i for i in (await client.get("/api/v1/incidents")).json()["items"] if i["node"] == node]
            timeline = (await client.get(f"/api/v1/incidents/{items[0]['id']}")).json()["timeline"]
            return any(e["kind"] == "silence_expired" for e in timeline)
        with structlog.testing.capture_logs() as logs:
            expired = await client.delete(f"/api/v1/silences/{silence['id']}")
            assert expired.json()["active"] is False
            await eventually(reported, what="the expired silence reported on the still-open incident")
            await eventually(lambda: any(e["event"] == "notification" and e.get("notify_event") == "silence_expired"
                                         for e in logs), what="the expired silence notified")


async def test_audit_verify_passes_then_catches_tampering(
        tmp_path: Path, mosquitto: Broker, mqtt_client: aiomqtt.Client, capsys: pytest.CaptureFixture[str]) -> None:
    node = "api-audit"
    config_path = _config(tmp_path, mosquitto)
    agent = ScriptedAgent(mqtt_client, node)
    async with running_controller(load_config(config_path)) as controller, _http(controller) as client:
        await agent.birth()
        await agent.report(_running(pid=10))
        await eventually(lambda: controller.fleet.unit(node, "web") is not None, what="unit known")
        await agent.event(wire.UnitExited(unit="web", pid=10, exit_code=1))

        async def has_entries() -> bool:
            items = [i for i in (await client.get("/api/v1/incidents")).json()["items"] if i["node"] == node]
            return bool(items) and len((await client.get(f"/api/v1/incidents/{items[0]['id']}"))
                                       .json()["timeline"]) >= 2
        await eventually(has_entries, what="an incident with audit entries")
        incident = next(i for i in (await client.get("/api/v1/incidents")).json()["items"] if i["node"] == node)
        timeline = (await client.get(f"/api/v1/incidents/{incident['id']}")).json()["timeline"]
        assert all(len(e["hash"]) == 64 for e in timeline)
    db = tmp_path / "state" / "selfheal.sqlite3"
    assert main(["audit", "verify", "--config", str(config_path)]) == 0
    assert "every chain intact" in capsys.readouterr().out

    with sqlite3.connect(db) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE timeline SET data = '{}' WHERE seq = 1")
        # An attacker with write access can drop the guard; the chain still gives them away.
        conn.execute("DROP TRIGGER timeline_is_append_only")
        conn.execute("UPDATE timeline SET data = ? WHERE incident_id = ? AND seq = 1",
                     ('{"summary":"nothing happened"}', incident["id"]))
    assert main(["audit", "verify", "--db", str(db)]) == 1
    out = capsys.readouterr().out
    assert f"incident #{incident['id']} entry 1" in out
    assert "altered" in out


async def test_stats_and_metrics_report_outcomes(tmp_path: Path, mosquitto: Broker,
                                                 mqtt_client: aiomqtt.Client) -> None:
    node = "api-stats"
    write_key(tmp_path / "keys", node)
    await mqtt_client.subscribe(wire.node_topic(node, "commands"), qos=1)
    agent = ScriptedAgent(mqtt_client, node, read_key(tmp_path / "keys", node))
    async with running_controller(load_config(_config(tmp_path, mosquitto))) as controller, \
            _http(controller) as client:
        await agent.birth()
        await agent.report(_running(pid=10))
        await eventually(lambda: controller.fleet.unit(node, "web") is not None, what="unit known")
        await agent.event(wire.UnitExited(unit="web", pid=10, exit_signal=9))
        async for message in mqtt_client.messages:
            command = wire.decode_node_message(str(message.topic), bytes(message.payload))  # type: ignore[arg-type]
            break
        assert isinstance(command, wire.Command)
        await agent.event(wire.CommandResult(command_id=command.id, key=command.key, status="done"))
        await agent.event(wire.UnitStarted(unit="web", pid=11, restarts=1))
        await agent.event(wire.ProbeChanged(unit="web", probe=_running(11, 1).probe))  # type: ignore[arg-type]
        started = time.monotonic()

        async def counted() -> bool:
            items = (await client.get("/api/v1/stats")).json()["items"]
            return any(s["kind"] == "unit_exited" and s["action"] == "restart" and s["successes"] == 1
                       for s in items)
        await eventually(counted, timeout=15, what="a successful restart counted")
        assert time.monotonic() - started >= 0.9  # verification waited for the stable period
        metrics = (await client.get("/metrics")).text
        assert 'selfheal_remediation_success_ratio{action="restart",kind="unit_exited"} 1.0' in metrics
        assert 'selfheal_remediations_total{action="restart_unit",outcome="succeeded"} 1.0' in metrics


async def test_a_reload_that_widens_a_rules_window_counts_the_attempts_it_reaches_again(
        tmp_path: Path, mosquitto: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reconciler keeps a unit's attempts only while the rules can count them; a reload whose rule counts
    further back reads those attempts back from the store, as a restart would (``Engine.attempts_for``)."""
    async with running_controller(load_config(_config(tmp_path, mosquitto))) as controller:
        engine = controller.engine
        assert engine is not None
        now = time.time()
        incident = await engine.store.open_incident(
            key="unit_exited:reload-node/web", kind="unit_exited", node="reload-node", unit="web", severity="critical",
            summary="web exited", rule="restart-exited-unit", opened_at=now - 7200, evidence={})
        await engine.store.save_plan(PlanRecord(
            id=f"{incident.id}-1", incident_id=incident.id, rule="restart-exited-unit", attempt=1, state="succeeded",
            created_at=now - 7000, updated_at=now - 6990, action="restart_unit"))
        assert await engine.attempts_for(engine.rulebook) == []  # nothing widened: nothing to read
        wider = dataclasses.replace(engine.rulebook, rules=tuple(
            dataclasses.replace(r, attempt_window=3 * 3600.0) if r.name == "restart-exited-unit" else r
            for r in engine.rulebook.rules))
        attempts = await engine.attempts_for(wider)
        assert [plan.id for _, plan in attempts] == [f"{incident.id}-1"]
        engine.reload(wider, controller.settings(), controller.anomalies, attempts)
        target = engine.reconciler.targets[("restart-exited-unit", "reload-node/web")]
        assert [a.plan_id for a in target.attempts] == [f"{incident.id}-1"]

        async def unreadable(since: float) -> list[tuple[Incident, PlanRecord]]:
            raise StoreError("database disk image is malformed")
        monkeypatch.setattr(engine.store, "recent_plans", unreadable)
        widest = dataclasses.replace(wider, rules=tuple(dataclasses.replace(r, attempt_window=10 * 3600.0)
                                                        for r in wider.rules))
        with pytest.raises(ConfigError, match="the store cannot be read: database disk image is malformed"):
            await engine.attempts_for(widest)
