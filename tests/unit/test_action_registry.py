"""The action registry against the code: every action, from a rule's rung to the agent that runs it.

Each action in ``remediations.actions.ACTIONS`` is planned by the real planner, run by the real dispatcher
and executed by the real agent executor (over a fake link that delivers commands to it and reports the
unit back), so the registry's word — the steps, the wire commands, whether it disrupts, how it is
verified — is checked against what the code does, not against itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, get_args

import msgspec
import pytest

from agent.executor import CommandExecutor
from agent.ledger import Ledger
from controller.dispatcher import Dispatcher, PlanOutcome
from controller.fleet import Fleet, unit_is_healthy
from controller.notify import Notification
from controller.ownership import Sole
from controller.plan_records import STEP_TYPES
from controller.store import Incident
from remediations.actions import ACTIONS, Action, ActionName, action_of, named
from remediations.planner import Context, Propose, Replica, Target, plan_remediation
from remediations.plans import Plan, StartUnit, Step
from remediations.state import TargetState
from rules.loader import SCHEMA, parse_rulebook
from rules.model import Backoff, Rule, Rung, RungAction
from selfheal import wire
from selfheal.clocks import ManualClock

SOURCE, STANDBY = "node-1", "node-2"
KEYS = {SOURCE: bytes(range(32)), STANDBY: bytes(range(1, 33))}
T0 = 1_700_000_000.0
ROOT = "a" * 64
DISRUPTION_GUARDS = {"exclusive", "pause", "budget"}


# --- the registry is the vocabulary -------------------------------------------------------------


def test_the_rules_name_exactly_the_registrys_actions() -> None:
    rung_schema = SCHEMA["properties"]["rules"]["items"]["properties"]["ladder"]["items"]
    assert rung_schema["properties"]["action"]["enum"] == list(ACTIONS) == list(get_args(ActionName))
    assert get_args(RungAction) == get_args(ActionName)
    ladder = ", ".join(f"{{action: {name}}}" for name in ACTIONS)
    text = f"version: 1\nrules:\n  - name: every\n    match: {{kind: unit_exited}}\n    ladder: [{ladder}]\n"
    (parsed,) = parse_rulebook(text, source="rules.yaml").rules
    assert [r.action for r in parsed.ladder] == list(ACTIONS)


def test_every_plan_step_and_wire_command_belongs_to_an_action() -> None:
    assert {s for a in ACTIONS.values() for s in a.steps} == set(get_args(Step)) == set(STEP_TYPES.values())
    assert {c for a in ACTIONS.values() for c in a.commands} == set(get_args(wire.CommandStep))
    firsts = [a.steps[0] for a in ACTIONS.values() if a.steps]
    assert len(firsts) == len(set(firsts)), "a plan's first step must tell its action"


def test_an_unknown_name_or_step_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown remediation action 'reboot' \(known: restart, stop_start"):
        named("reboot")
    plan = Plan(id="1-1", incident_id=1, rule="r", rule_digest="", rung=0, attempt=1,
                steps=(StartUnit(SOURCE, "web"),), verification=None, cooldown_key="", mode="auto",
                created_at=T0, deadline=T0 + 60)
    with pytest.raises(ValueError, match="plan 1-1 starts with start_unit, which begins no action"):
        action_of(plan)


# --- every action, from rung to agent -----------------------------------------------------------


def unit(state: Literal["running", "exited", "stopped"], pid: int | None, restarts: int = 0) -> wire.UnitReport:
    return wire.UnitReport(name="web", kind="process", state=state, pid=pid, restarts=restarts)


HOST = wire.HostMetrics(cpu_percent=1.0, load1=0.0, load5=0.0, load15=0.0, mem_total_bytes=1 << 30,
                        mem_available_bytes=1 << 29, mem_percent=50.0, swap_percent=0.0)


@dataclass
class FakeNode:
    """An agent's units and datasets, as the executor drives them (``UnitControl``, ``DatasetRepair``)."""

    web: wire.UnitReport
    calls: list[str] = field(default_factory=list)
    repaired: bool = False

    async def restart(self, name: str) -> object:
        self.calls.append(f"restart {name}")
        self.web = unit("running", (self.web.pid or 0) + 1, self.web.restarts + 1)
        return self.web

    async def stop(self, name: str) -> object:
        self.calls.append(f"stop {name}")
        self.web = unit("stopped", None, self.web.restarts)
        return self.web

    async def start(self, name: str) -> object:
        self.calls.append(f"start {name}")
        self.web = unit("running", 1000 + len(self.calls), self.web.restarts)
        return self.web

    async def resync(self, step: wire.ResyncDataset) -> tuple[Literal["done", "failed"], str]:
        self.calls.append(f"resync {step.dataset}")
        self.repaired = True
        return "done", "repaired"


class World:
    """Two nodes (web exited on the source, a stopped standby copy on the other), their agents' executors
    behind a link that delivers each published command and reports the node back, and a dispatcher."""

    def __init__(self, ledgers: dict[str, Ledger]) -> None:
        self.clock = ManualClock(T0)
        self.fleet = Fleet()
        self.nodes = {SOURCE: FakeNode(unit("exited", 100)), STANDBY: FakeNode(unit("stopped", None))}
        self.executors = {n: CommandExecutor(node_id=n, key=KEYS[n], ledger=ledgers[n], units=node,
                                             datasets=node, clock=self.clock) for n, node in self.nodes.items()}
        self.seq = 0
        for node in self.nodes:
            self.fleet.apply(wire.NodeStatus(node=node, state="online", session=1, units=["web"], ts=T0), T0)
            self._report(node)
        self.sent: list[tuple[str, type[wire.CommandStep], str]] = []
        self.notified: list[Notification] = []
        self.audit: list[tuple[str, dict[str, object]]] = []
        self.deliveries: set[asyncio.Task[None]] = set()
        self.dispatcher = Dispatcher(
            fleet=self.fleet, store=SimpleNamespace(record_command=self._record),  # type: ignore[arg-type]
            link=SimpleNamespace(publish=self._publish),  # type: ignore[arg-type]
            keys=KEYS.get, clock=self.clock, notifier=SimpleNamespace(notify=self._notify),  # type: ignore[arg-type]
            ownership=Sole(1), command_ttl=30.0, ack_timeout=5.0, resync=SimpleNamespace(prepare=self._prepare),  # type: ignore[arg-type]
            offline_after=5.0)

    def _report(self, node: str) -> None:
        self.seq += 1
        self.fleet.apply(wire.Report(node=node, session=1, seq=self.seq, ts=T0 + self.seq, host=HOST,
                                     units=[self.nodes[node].web]), self.clock.wall())

    async def _record(self, **_: object) -> bool:
        return True

    async def _notify(self, notification: Notification) -> list[object]:
        self.notified.append(notification)
        return []

    async def _prepare(self, step: Any, audit: object) -> object:
        return SimpleNamespace(commands=[wire.ResyncDataset(
            dataset=step.dataset, source_url="http://127.0.0.1:8731", token="t",  # noqa: S106 - never checked here
            expected_root=ROOT,
            chunk_size=1 << 20)])

    def _publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        command = msgspec.json.decode(payload, type=wire.Command)
        assert topic == wire.node_topic(command.node, "commands")
        task = asyncio.get_running_loop().create_task(self._deliver(command))
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    async def _deliver(self, command: wire.Command) -> None:
        result = await self.executors[command.node].execute(command)
        self.sent.append((command.node, type(command.step), result.status))
        self._report(command.node)
        await self.fleet.notify()
        self.dispatcher.on_result(command.node, result)

    def symptom_holds(self) -> bool:
        if self.nodes[SOURCE].repaired:
            return False
        return not any(unit_is_healthy(self.fleet.unit(n, "web")) for n in self.nodes)

    async def _audit(self, kind: str, data: dict[str, object]) -> None:
        self.audit.append((kind, data))

    async def run(self, plan: Plan, recheck: Any = None) -> PlanOutcome:
        incident = Incident(id=7, key="k", kind="unit_exited", node=SOURCE, unit="web", severity="critical",
                            summary="web exited", rule="r", state="open", opened_at=T0, resolved_at=None)

        async def verifying() -> None:
            pass

        return await self.dispatcher.execute(plan, incident, recheck=recheck or self.symptom_holds,
                                             audit=self._audit, on_verifying=verifying)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with ExitStack() as stack:
        ledgers = {n: stack.enter_context(Ledger(tmp_path / f"{n}.sqlite3").open(T0)) for n in KEYS}
        yield World(ledgers)


def propose(action: Action) -> Propose | None:
    """The real planner's decision for a one-rung rule naming ``action``, on a finding it applies to."""
    dataset = action.name == "resync"
    rule = Rule(name="r", kind="dataset_divergent" if dataset else "unit_exited", digest="d",
                ladder=(Rung(action.name, 1, Backoff(first=0.0, jitter=0.0)),), verify_within=5.0, stable_for=0.0)
    target = Target(incident_id=7, key="k", kind=rule.kind, node=SOURCE, unit=None if dataset else "web",
                    severity="critical", summary="web exited", labels={}, first_seen=T0)
    ctx = Context(standby=(STANDBY,), dataset="features" if dataset else "", authority_root=ROOT,
                  dataset_replicas=(Replica(STANDBY, ROOT),))
    decision = plan_remediation(target, rule, TargetState(), ctx, T0)
    assert decision is None or isinstance(decision, Propose), decision
    return decision


@pytest.mark.parametrize("action", ACTIONS.values(), ids=lambda a: a.name)
async def test_each_action_plans_sends_executes_and_verifies_as_the_registry_says(world: World,
                                                                                    action: Action) -> None:
    decision = propose(action)
    if action.verify == "nothing":
        assert decision is None
        assert action.steps == action.commands == ()
        return
    assert decision is not None
    plan = decision.plan
    assert [type(s) for s in plan.steps] == list(action.steps)
    assert action_of(plan) is action
    assert ({c.guard for c in decision.checks} >= DISRUPTION_GUARDS) is action.disruptive

    outcome = await world.run(plan)

    # the wire commands the registry names, in order, each run by the agent's executor
    assert [kind for _, kind, _ in world.sent] == list(action.commands)
    assert all(status == "done" for _, _, status in world.sent), world.sent
    assert len([c for node in world.nodes.values() for c in node.calls]) == len(action.commands)
    assert any(kind == "rechecked" for kind, _ in world.audit) is action.disruptive
    # and verified as the registry says
    verification = plan.verification
    if action.verify == "escalated":
        assert verification is None
        assert (outcome.outcome, [n.event for n in world.notified]) == ("escalated", ["escalated"])
        return
    assert verification is not None
    assert verification.kind == ("healthy" if action.verify == "rule" else "cleared")
    where = STANDBY if action.name == "migrate" else SOURCE
    assert verification.node == where
    assert outcome.outcome == "succeeded", outcome.detail
    assert ("verifying", {"kind": verification.kind, "node": where, "unit": verification.unit,
                          "within_s": 5.0, "stable_for_s": 0.0}) in world.audit


@pytest.mark.parametrize("action", [a for a in ACTIONS.values() if a.steps], ids=lambda a: a.name)
async def test_a_disruptive_action_is_cancelled_when_the_symptom_cleared_before_it_acts(world: World,
                                                                                         action: Action) -> None:
    decision = propose(action)
    assert decision is not None
    outcome = await world.run(decision.plan, recheck=lambda: False)
    assert world.sent == []
    if action.disruptive:
        assert outcome.outcome == "cancelled"
        assert world.notified == []
    else:  # nothing to spare: a human is told anyway
        assert outcome.outcome == "escalated"
