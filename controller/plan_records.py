"""Plans as stored records and back: the one place a ``remediations.plans.Plan`` meets ``PlanRecord``.

The store keeps plans as rows with a JSON ``detail``; the engine writes them at
every state change and rebuilds a plan from its row when one awaiting approval
must survive a controller restart. Steps are serialised field by field and
rebuilt through the steps the action registry (``remediations.actions``) names.
"""

from __future__ import annotations

from typing import Any

from controller.store import PlanRecord
from remediations.actions import ACTIONS
from remediations.plans import Plan, Step, Verification


def record_fields(record: PlanRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def step_fields(step: object) -> dict[str, object]:
    return {name: getattr(step, name) for name in getattr(step, "__slots__", ())}


def plan_record(plan: Plan, state: str, now: float) -> PlanRecord:
    return PlanRecord(id=plan.id, incident_id=plan.incident_id, rule=plan.rule, attempt=plan.attempt, state=state,
                      created_at=plan.created_at, updated_at=now,
                      detail={"steps": [step_fields(s) for s in plan.steps], "mode": plan.mode,
                              "verification": step_fields(plan.verification) if plan.verification else None,
                              "cooldown_key": plan.cooldown_key, "rule_digest": plan.rule_digest},
                      rung=plan.rung, action=plan.action, mode=plan.mode, deadline=plan.deadline)


STEP_TYPES: dict[str, type[Step]] = {t.__dataclass_fields__["kind"].default: t  # type: ignore[misc]
                                     for action in ACTIONS.values() for t in action.steps}


def plan_from_record(record: PlanRecord) -> Plan:
    """Rebuild a plan from its stored record (a plan awaiting approval survives a controller restart)."""
    steps = tuple(STEP_TYPES[s["kind"]](**s) for s in record.detail["steps"])
    verification = record.detail.get("verification")
    return Plan(id=record.id, incident_id=record.incident_id, rule=record.rule,
                rule_digest=record.detail.get("rule_digest", ""), rung=record.rung, attempt=record.attempt,
                steps=steps, verification=Verification(**verification) if verification else None,
                cooldown_key=record.detail.get("cooldown_key", ""), mode="approve",
                created_at=record.created_at, deadline=record.deadline)
