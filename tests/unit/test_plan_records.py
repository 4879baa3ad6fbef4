"""Plans survive the store: every step kind and the verification round-trip through a PlanRecord."""

from __future__ import annotations

import pytest

from controller.plan_records import plan_from_record, plan_record
from remediations.plans import (
    MigrateUnit,
    Notify,
    Plan,
    RestartUnit,
    ResyncDataset,
    StartUnit,
    Step,
    StopUnit,
    Verification,
)

STEPS: list[Step] = [RestartUnit("n1", "web"), StopUnit("n1", "web"), StartUnit("n2", "web"),
                     MigrateUnit(unit="web", source="n1", target="n2"), ResyncDataset("n1", "features", "n2"),
                     Notify("n1", "a human is needed", "critical")]


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.kind)
def test_a_plan_awaiting_approval_is_rebuilt_exactly_from_its_record(step: Step) -> None:
    plan = Plan(id="7-2", incident_id=7, rule="r", rule_digest="abc", rung=1, attempt=2, steps=(step,),
                verification=Verification("healthy", "n2", "web", 30.0, 1.0), cooldown_key="n1/web",
                mode="approve", created_at=100.0, deadline=1000.0)
    record = plan_record(plan, "awaiting_approval", 101.0)
    assert (record.state, record.action, record.rung, record.mode) == ("awaiting_approval", step.kind, 1, "approve")
    assert plan_from_record(record) == plan


def test_a_plan_without_verification_round_trips() -> None:
    plan = Plan(id="1-1", incident_id=1, rule="r", rule_digest="", rung=0, attempt=1, steps=(STEPS[-1],),
                verification=None, cooldown_key="n1/-", mode="approve", created_at=1.0, deadline=2.0)
    assert plan_from_record(plan_record(plan, "awaiting_approval", 1.0)) == plan
