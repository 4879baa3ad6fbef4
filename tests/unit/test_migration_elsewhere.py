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
from types import SimpleNamespace

import pytest

from agent.ledger import Ledger
from controller.elsewhere import Copies, Started, fence_proven, start_key
from controller.ownership import ALL_BUCKETS
from controller.store import TimelineEntry
from remediations.planner import Context, Propose, Target, plan_remediation
from remediations.plans import MigrateUnit, Plan
from remediations.state import TargetState
from rules.model import Backoff, Rule, Rung
from selfheal.errors import RemediationError
from selfheal.wire import bucket_of
from tests.unit.test_action_registry import KEYS, SOURCE, STANDBY, T0, World

REMOTE = "node-9"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with ExitStack() as stack:
        ledgers = {n: stack.enter_context(Ledger(tmp_path / f"{n}.sqlite3").open(T0)) for n in KEYS}
        yield World(ledgers)


MINE = frozenset({bucket_of(SOURCE), bucket_of(STANDBY)})


class Partial:
    """This controller acts on the world's two nodes (their buckets); others on the rest of the fleet."""

    def epoch_of(self, node: str) -> int | None:
        return 1 if node in {SOURCE, STANDBY} else None

    def owns(self, node: str) -> bool:
        return self.epoch_of(node) is not None

    def partial(self) -> bool:
        return True

    def settled(self, seconds: float) -> frozenset[int]:
        return MINE


@dataclass
class Others:
    runners: dict[str, str] = field(default_factory=dict)
    standby: dict[str, str] = field(default_factory=dict)
    silent: bool = False
    buckets: frozenset[int] = ALL_BUCKETS - MINE
    """What the others have heard from long enough."""
    starts: list[dict[str, object]] = field(default_factory=list)

    async def copies(self, unit: str) -> Copies:
        if self.silent:
            raise RemediationError(f"cannot tell whether {unit} runs on the nodes of controller(s) c3")
        return Copies(dict(self.runners), dict(self.standby), self.buckets)

    async def start(self, *, controller: str, node: str, unit: str, plan_id: str, incident_id: int,
                    step: int, epoch: int, not_after: float, expires_at: float, timeout: float) -> Started:
        self.starts.append({"controller": controller, "node": node, "unit": unit, "plan": plan_id,
                            "incident": incident_id, "step": step, "epoch": epoch,
                            "held_until": expires_at, "deadline": not_after})
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
    # asked under this controller's epoch on the source, to send by the ack timeout, expiring a TTL later
    assert others.starts == [{"controller": "c3", "node": "node-8", "unit": "web", "plan": "7-1", "incident": 7,
                              "step": 100, "epoch": 1, "deadline": T0 + 5.0, "held_until": T0 + 35.0}]
    assert [d["controller"] for kind, d in world.audit if kind == "start_asked"] == ["c3"]


async def test_a_bucket_no_controller_has_heard_from_long_enough_leaves_it_unknown(world: World) -> None:
    """A dead controller's buckets before their leases run out, or ones gained a moment ago: their nodes
    may run the unit unseen, so nothing starts."""
    others = elsewhere_of(world, Others(standby={REMOTE: "c2"}, buckets=ALL_BUCKETS - MINE - {7, 8, 9, 30}))
    outcome = await world.run(migration(standby=(STANDBY,), elsewhere=True))
    assert outcome.outcome == "failed"
    assert "bucket(s) 7-9, 30" in outcome.detail
    assert (world.sent, others.starts) == ([], [])


async def test_a_start_on_a_node_of_its_own_is_keyed_without_the_node(world: World) -> None:
    """The key another controller would use for the same step: one step starts one copy, wherever."""
    recorded: list[str] = []

    async def record(**command: object) -> bool:
        recorded.append(str(command["key"]))
        return True
    world.dispatcher.store = SimpleNamespace(record_command=record)  # type: ignore[assignment]
    elsewhere_of(world, Others())
    outcome = await world.run(migration(standby=(STANDBY,), elsewhere=True), recheck=lambda: not world.sent[1:])
    assert outcome.outcome == "succeeded", outcome.detail
    assert [(node, kind.__name__) for node, kind, _ in world.sent] == [(SOURCE, "StopUnit"), (STANDBY, "StartUnit")]
    assert recorded[1] == start_key("web", 7, 100, 1)


def test_a_start_needs_the_plans_own_word_that_its_source_is_fenced_or_stopped() -> None:
    def entry(kind: str, **data: object) -> TimelineEntry:
        return TimelineEntry(at=T0, kind=kind, data=dict(data))
    waiting = [entry("fence_wait", plan="7-1", node=SOURCE), entry("fenced", plan="6-1", node=SOURCE),
               entry("command_result", plan="7-1", node=SOURCE, status="failed"),
               entry("fenced", plan="7-1", node=STANDBY)]
    assert not fence_proven(waiting, "7-1", SOURCE)
    assert fence_proven([*waiting, entry("fenced", plan="7-1", node=SOURCE)], "7-1", SOURCE)
    assert fence_proven([entry("command_result", plan="7-1", node=SOURCE, status="done")], "7-1", SOURCE)


async def test_no_standby_copy_anywhere_fails_before_anything_is_stopped(world: World) -> None:
    others = elsewhere_of(world, Others())
    outcome = await world.run(migration(standby=(), elsewhere=True))
    assert outcome.outcome == "failed"
    assert "no healthy online node holds a standby copy" in outcome.detail
    assert (world.sent, others.starts) == ([], [])


@pytest.mark.parametrize("standby", [(), (STANDBY,)], ids=["target elsewhere", "target here"])
async def test_without_a_way_to_ask_the_others_nothing_starts(world: World, standby: tuple[str, ...]) -> None:
    """Whether the unit runs on their nodes cannot be known: no start, even on a node of its own."""
    world.dispatcher.ownership = Partial()
    outcome = await world.run(migration(standby=standby, elsewhere=True))
    assert outcome.outcome == "failed"
    assert "api_token_file" in outcome.detail
    assert world.sent == []
