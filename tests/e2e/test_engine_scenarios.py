"""Engine scenarios end to end: real controller and agents, real processes, real broker.

Each scenario is one promise the remediation engine makes to an operator:
a crash loop is escalated once and then left alone; a storm is drained no
faster than the budget; shadow mode touches nothing; approve mode waits for a
human; a controller killed mid-plan never restarts a unit twice.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import eventually_sync
from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.e2e


def _rules(cluster: Cluster, text: str) -> str:
    path = cluster.root / "rules.yaml"
    path.write_text("version: 1\nrules:\n" + text)
    return f'rulebooks = ["{path}"]\n'


def _incident(cluster: Cluster, node: str, kind: str, unit: str | None = None) -> dict[str, Any] | None:
    for incident in cluster.get("/api/v1/incidents")["items"]:
        if incident["node"] == node and incident["kind"] == kind and (unit is None or incident["unit"] == unit):
            return dict(incident)
    return None


def _wait_incident(cluster: Cluster, node: str, kind: str, unit: str | None = None,
                   timeout: float = 30) -> dict[str, Any]:
    eventually_sync(lambda: _incident(cluster, node, kind, unit) is not None, timeout=timeout,
                    what=f"{kind} incident on {node}")
    found = _incident(cluster, node, kind, unit)
    assert found is not None
    return found


def _sleeper(name: str, extra: str = "") -> str:
    return (f'[[agent.units]]\nname = "{name}"\nkind = "process"\ncommand = ["sleep", "3600"]\n'
            f"stop_grace = 1.0\n{extra}")


def test_a_crash_loop_climbs_the_ladder_then_is_left_alone_with_one_alert(cluster: Cluster) -> None:
    config = cluster.write_controller(_rules(cluster, """\
  - name: crash-loop
    match: {kind: unit_exited}
    ladder:
      - {action: restart, attempts: 3, backoff: {first: 0, base: 0.3, factor: 2}}
      - {action: notify}
    verify: {within: 3, stable_for: 1}
    cooldown: 0.2
"""))
    cluster.start("controller", "controller", config)
    cluster.wait_ready()
    unit = '[[agent.units]]\nname = "crashy"\nkind = "process"\ncommand = ["sh", "-c", "sleep 0.3; exit 3"]\n'
    cluster.start("node-l", "agent", cluster.write_agent("node-l", unit))
    incident = _wait_incident(cluster, "node-l", "unit_exited")
    eventually_sync(lambda: cluster.get(f"/api/v1/incidents/{incident['id']}")["state"] == "failed", timeout=60,
                    what="the incident left to a human")
    plans = cluster.plans(incident["id"])
    assert [p["action"] for p in plans] == ["restart_unit"] * 3 + ["notify"]
    assert [p["state"] for p in plans][-1] == "escalated"
    assert all(p["state"] == "failed" for p in plans[:3])
    audit = cluster.audit(incident["id"])
    assert sum(1 for e in audit if e["kind"] == "notification") == 1  # one alert, not one per step
    assert "ladder exhausted" in next(e for e in audit if e["kind"] == "failed")["data"]["reason"]
    time.sleep(3)  # left alone: nothing more happens to it
    assert len(cluster.plans(incident["id"])) == 4


def test_twenty_failing_units_are_healed_no_faster_than_the_budget(cluster: Cluster) -> None:
    budget = 3
    config = cluster.write_controller(
        "[controller.budget]\nmax_concurrent = 3\nmax_node_share = 1.0\nmax_replica_share = 1.0\n")
    cluster.start("controller", "controller", config)
    cluster.wait_ready()
    nodes = [f"storm-{i}" for i in range(4)]
    for node in nodes:
        cluster.start(node, "agent", cluster.write_agent(node, "".join(_sleeper(f"u{j}") for j in range(5))))

    def all_running() -> bool:
        units = [u for u in cluster.get("/api/v1/units")["items"] if u["node"] in nodes]
        return len(units) == 20 and all(u["state"] == "running" for u in units)
    eventually_sync(all_running, timeout=60, what="20 units running")
    victims = [u for u in cluster.get("/api/v1/units")["items"] if u["node"] in nodes]
    for unit in victims:
        os.kill(unit["pid"], signal.SIGKILL)

    def healed() -> bool:
        units = {(u["node"], u["name"]): u for u in cluster.get("/api/v1/units")["items"] if u["node"] in nodes}
        return all(units[(v["node"], v["name"])]["restarts"] > v["restarts"]
                   and units[(v["node"], v["name"])]["state"] == "running" for v in victims)
    eventually_sync(healed, timeout=120, what="all 20 units healed")
    plans = [p for p in cluster.get("/api/v1/plans", limit=1000)["items"] if p["action"] == "restart_unit"]
    assert len(plans) >= 20
    # Peak concurrency from the plans' own lifetimes: created (running) → updated (finished).
    events = sorted([(p["created_at"], 1) for p in plans] + [(p["updated_at"], -1) for p in plans])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    assert peak <= budget, f"{peak} plans overlapped; the budget is {budget}"
    assert peak == budget  # and the budget was used, not wasted
    held = sum(1 for p in plans for e in cluster.audit(p["incident_id"])
               if e["kind"] == "held" and e["data"]["blocking"]["guard"] == "budget")
    assert held > 0


def test_a_shadow_rule_records_its_plans_and_touches_nothing(cluster: Cluster) -> None:
    config = cluster.write_controller(_rules(cluster, """\
  - name: shadow-restart
    match: {kind: unit_exited}
    mode: shadow
    ladder: [{action: restart, attempts: 2}]
    cooldown: 0.5
"""))
    cluster.start("controller", "controller", config)
    cluster.wait_ready()
    cluster.start("node-s", "agent", cluster.write_agent("node-s", _sleeper("quiet")))
    eventually_sync(lambda: (cluster.unit("node-s", "quiet") or {}).get("state") == "running", what="running")
    unit = cluster.unit("node-s", "quiet")
    assert unit is not None
    os.kill(unit["pid"], signal.SIGKILL)
    incident = _wait_incident(cluster, "node-s", "unit_exited")
    eventually_sync(lambda: len(cluster.plans(incident["id"])) == 2, timeout=30, what="two shadow plans")
    plans = cluster.plans(incident["id"])
    assert {p["mode"] for p in plans} == {"shadow"}
    assert {p["state"] for p in plans} == {"cancelled"}
    assert not [e for e in cluster.audit(incident["id"]) if e["kind"] == "command_sent"]
    after = cluster.unit("node-s", "quiet")
    assert after is not None
    assert after["state"] == "exited"
    assert after["restarts"] == unit["restarts"]


def test_an_approve_mode_plan_waits_for_a_human_then_runs(cluster: Cluster) -> None:
    config = cluster.write_controller(_rules(cluster, """\
  - name: ask-first
    match: {kind: unit_exited}
    mode: approve
    ladder: [{action: restart, attempts: 3}]
    approval_timeout: 120
"""))
    cluster.start("controller", "controller", config)
    cluster.wait_ready()
    cluster.start("node-p", "agent", cluster.write_agent("node-p", _sleeper("careful")))
    eventually_sync(lambda: (cluster.unit("node-p", "careful") or {}).get("state") == "running", what="running")
    unit = cluster.unit("node-p", "careful")
    assert unit is not None
    os.kill(unit["pid"], signal.SIGKILL)
    incident = _wait_incident(cluster, "node-p", "unit_exited")
    eventually_sync(lambda: [p["state"] for p in cluster.plans(incident["id"])] == ["awaiting_approval"],
                    timeout=30, what="a plan awaiting approval")
    plan_id = cluster.plans(incident["id"])[0]["id"]
    time.sleep(1.5)
    waiting = cluster.unit("node-p", "careful")
    assert waiting is not None
    assert waiting["state"] == "exited"  # nothing happens without a human
    assert any(e["kind"] == "notification" and e["data"]["event"] == "approval_needed"
               for e in cluster.audit(incident["id"]))

    wrong = cluster.root / "wrong.token"
    wrong.write_text("not-the-token\n")
    bad = cluster.cli("approve", plan_id, token_file=wrong)
    assert bad.returncode == 1
    assert "401" in bad.stderr
    none = cluster.cli("approve", plan_id, token_file=Path("/dev/null"))
    assert none.returncode == 1
    assert "no API token" in none.stderr
    listed = cluster.cli("plans")
    assert plan_id in listed.stdout
    assert "awaiting_approval" in listed.stdout
    approved = cluster.cli("approve", plan_id)
    assert approved.returncode == 0, approved.stderr
    cluster.wait_healthy("node-p", "careful", restarts_above=unit["restarts"])
    eventually_sync(lambda: cluster.plans(incident["id"])[0]["state"] == "succeeded", what="plan succeeded")
    assert any(e["kind"] == "approved" for e in cluster.audit(incident["id"]))
    again = cluster.cli("approve", plan_id)
    assert again.returncode == 1
    assert "409" in again.stderr


def test_a_controller_killed_mid_plan_never_restarts_twice(cluster: Cluster, tmp_path: Path) -> None:
    healthy = tmp_path / "healthy"
    healthy.touch()
    config = cluster.write_controller("command_ttl = 8.0\n")
    controller = cluster.start("controller", "controller", config)
    cluster.wait_ready()
    # A unit that ignores SIGTERM: its restart takes the whole stop_grace, which is our window.
    unit = (f'[[agent.units]]\nname = "stubborn"\nkind = "process"\n'
            f'command = ["sh", "-c", "trap \\"\\" TERM; sleep 3600"]\nstop_grace = 4.0\n'
            f'[agent.units.probe]\nkind = "exec"\ntarget = ["test", "-f", "{healthy}"]\n'
            f"interval = 0.3\ntimeout = 1.0\nfailures = 2\nstart_period = 0.5\n")
    cluster.start("node-k", "agent", cluster.write_agent("node-k", unit))
    before = cluster.wait_healthy("node-k", "stubborn")

    healthy.unlink()  # the probe starts failing
    incident = _wait_incident(cluster, "node-k", "probe_failing")
    eventually_sync(lambda: any(e["kind"] == "command_sent" for e in cluster.audit(incident["id"])), timeout=30,
                    what="the restart command sent")
    controller.send_signal(signal.SIGKILL)
    controller.wait()
    healthy.touch()  # the restarted incarnation will be healthy
    cluster.start("controller", "controller", config)
    cluster.wait_ready()

    after = cluster.wait_healthy("node-k", "stubborn", restarts_above=before["restarts"], timeout=40)
    eventually_sync(lambda: cluster.get(f"/api/v1/incidents/{incident['id']}")["state"] == "resolved",
                    timeout=40, what="incident resolved")
    time.sleep(2)
    final = cluster.unit("node-k", "stubborn")
    assert final is not None
    assert final["restarts"] == before["restarts"] + 1 == after["restarts"]  # exactly one restart
    audit = cluster.audit(incident["id"])
    assert sum(1 for e in audit if e["kind"] == "command_sent") == 1
    assert any(e["kind"] == "plan_expired" for e in audit)


def test_a_plan_awaiting_approval_survives_a_controller_restart(cluster: Cluster) -> None:
    config = cluster.write_controller(_rules(cluster, """\
  - name: ask-first
    match: {kind: unit_exited}
    mode: approve
    ladder: [{action: restart, attempts: 3}]
    approval_timeout: 300
"""))
    controller = cluster.start("controller", "controller", config)
    cluster.wait_ready()
    cluster.start("node-r", "agent", cluster.write_agent("node-r", _sleeper("patient")))
    eventually_sync(lambda: (cluster.unit("node-r", "patient") or {}).get("state") == "running", what="running")
    unit = cluster.unit("node-r", "patient")
    assert unit is not None
    os.kill(unit["pid"], signal.SIGKILL)
    incident = _wait_incident(cluster, "node-r", "unit_exited")
    eventually_sync(lambda: [p["state"] for p in cluster.plans(incident["id"])] == ["awaiting_approval"],
                    timeout=30, what="a plan awaiting approval")
    plan_id = cluster.plans(incident["id"])[0]["id"]

    controller.send_signal(signal.SIGTERM)
    controller.wait(30)
    cluster.start("controller", "controller", config)
    cluster.wait_ready()
    time.sleep(2)  # the restarted engine has evaluated the still-open incident several times by now
    assert [p["state"] for p in cluster.plans(incident["id"])] == ["awaiting_approval"]  # no second plan

    approved = cluster.cli("approve", plan_id)
    assert approved.returncode == 0, approved.stderr
    cluster.wait_healthy("node-r", "patient", restarts_above=unit["restarts"])
    eventually_sync(lambda: cluster.plans(incident["id"])[0]["state"] == "succeeded", what="plan succeeded")
