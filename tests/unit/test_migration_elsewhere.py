"""A migration when other controllers act on part of the fleet (``controller.elsewhere``): the logic.

The dispatcher of ``test_action_registry``'s two-node world, with an ownership that says other controllers
act on the rest of the fleet and a stand-in for them (the HTTP side is tested with real controllers in
``tests/integration/test_ha.py``): a copy running on their nodes stops a migration, a controller that does
not answer makes it unknown and nothing starts, and a standby copy on their nodes is started by them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.ledger import Ledger
from controller.elsewhere import Copies, Started
from remediations.planner import Context, Propose, Target, plan_remediation
from remediations.plans import MigrateUnit, Plan
from remediations.state import TargetState
from rules.model import Backoff, Rule, Rung
from selfheal.errors import RemediationError
from tests.unit.test_action_registry import KEYS, SOURCE, STANDBY, T0, World

REMOTE = "node-9"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with ExitStack() as stack:
        ledgers = {n: stack.enter_context(Ledger(tmp_path / f"{n}.sqlite3").open(T0)) for n in KEYS}
        yield World(ledgers)


class Partial:
    """This controller acts on the world's two nodes; others on the rest of the fleet."""

    def epoch_of(self, node: str) -> int | None:
        return 1 if node in {SOURCE, STANDBY} else None

    def owns(self, node: str) -> bool:
        return self.epoch_of(node) is not None

    def partial(self) -> bool:
        return True


@dataclass
class Others:
    runners: dict[str, str] = field(default_factory=dict)
    standby: dict[str, str] = field(default_factory=dict)
    silent: bool = False
    starts: list[dict[str, object]] = field(default_factory=list)

    async def copies(self, unit: str) -> Copies:
        if self.silent:
            raise RemediationError(f"cannot tell whether {unit} runs on the nodes of controller(s) c3")
        return Copies(dict(self.runners), dict(self.standby))

    async def start(self, *, controller: str, node: str, unit: str, plan_id: str, incident_id: int,
                    step: int, timeout: float) -> Started:
        self.starts.append({"controller": controller, "node": node, "unit": unit, "plan": plan_id,
                            "incident": incident_id, "step": step})
        return Started(status="done", detail="started", controller=controller, command="c-1")


def migration(*, standby: tuple[str, ...], elsewhere: bool) -> Plan:
    rule = Rule(name="r", kind="unit_lost", digest="d", ladder=(Rung("migrate", 1, Backoff(first=0.0, jitter=0.0)),),
                verify_within=5.0, stable_for=0.0)
    target = Target(incident_id=7, key="k", kind="unit_lost", node=SOURCE, unit="web", severity="critical",
                    summary="web runs nowhere", labels={}, first_seen=T0)
    decision = plan_remediation(target, rule, TargetState(), Context(standby=standby, elsewhere=elsewhere), T0)
    assert isinstance(decision, Propose), decision
    return decision.plan


def elsewhere_of(world: World, others: Others) -> Others:
    world.dispatcher.ownership = Partial()
    world.dispatcher.elsewhere = others
    return others


def test_without_a_standby_here_the_planner_leaves_the_target_to_the_step_when_others_act_elsewhere() -> None:
    plan = migration(standby=(), elsewhere=True)
    assert plan.steps == (MigrateUnit(unit="web", source=SOURCE, target=None),)
    assert plan.verification is not None
    assert (plan.verification.kind, plan.verification.node) == ("cleared", SOURCE)


async def test_a_copy_running_on_another_controllers_node_stops_the_migration(world: World) -> None:
    others = elsewhere_of(world, Others(runners={REMOTE: "c2"}, standby={"node-8": "c2"}))
    outcome = await world.run(migration(standby=(STANDBY,), elsewhere=True))
    assert outcome.outcome == "failed"
    assert REMOTE in outcome.detail
    assert "second copy" in outcome.detail
    assert (world.sent, others.starts) == ([], [])


async def test_a_controller_that_does_not_answer_leaves_it_unknown_and_nothing_starts(world: World) -> None:
    others = elsewhere_of(world, Others(silent=True))
    outcome = await world.run(migration(standby=(STANDBY,), elsewhere=True))
    assert outcome.outcome == "failed"
    assert "cannot tell" in outcome.detail
    assert (world.sent, others.starts) == ([], [])


async def test_a_standby_copy_on_another_controllers_node_is_started_by_that_controller(world: World) -> None:
    others = elsewhere_of(world, Others(standby={REMOTE: "c2", "node-8": "c3", SOURCE: "c9"}))
    outcome = await world.run(migration(standby=(), elsewhere=True), recheck=lambda: not others.starts)
    assert outcome.outcome == "succeeded", outcome.detail
    # stopped on the reachable source here, started by the controller acting on the first target by name
    assert [(node, kind.__name__) for node, kind, _ in world.sent] == [(SOURCE, "StopUnit")]
    assert others.starts == [{"controller": "c3", "node": "node-8", "unit": "web", "plan": "7-1",
                              "incident": 7, "step": 100}]
    assert ("start_asked", {"node": "node-8", "unit": "web", "controller": "c3"}) in world.audit


async def test_no_standby_copy_anywhere_fails_before_anything_is_stopped(world: World) -> None:
    others = elsewhere_of(world, Others())
    outcome = await world.run(migration(standby=(), elsewhere=True))
    assert outcome.outcome == "failed"
    assert "no healthy online node holds a standby copy" in outcome.detail
    assert (world.sent, others.starts) == ([], [])


async def test_without_a_way_to_ask_the_others_a_target_elsewhere_fails_clearly(world: World) -> None:
    world.dispatcher.ownership = Partial()
    outcome = await world.run(migration(standby=(), elsewhere=True))
    assert outcome.outcome == "failed"
    assert "api_token_file" in outcome.detail
    assert world.sent == []
