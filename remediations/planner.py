"""The planner: given an incident's target, its rule, past attempts and ``now``, decide.

Returns a ``Plan`` to run, a ``Hold`` (a guard says not yet), a ``Refuse``
(give up: the incident fails and is left to a human), or ``None`` when the
rule asks for no action.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from remediations.guards import Hold, Refuse, check_cooldown, check_max_attempts
from remediations.plans import Plan, RestartUnit, Verification, plan_id

Decision = Plan | Hold | Refuse | None


class Policy(Protocol):
    """What the planner reads of a rule (``rules.model.Rule`` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def min_interval(self) -> float: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def verify_within(self) -> float: ...


def plan_remediation(*, incident_id: int, node: str, unit: str | None, rule: Policy,
                     attempts: Sequence[float], incident_plans: int, now: float) -> Decision:
    """``attempts`` are the start times of earlier attempts on this target within the rule's
    attempt window, oldest first (they drive the guards); ``incident_plans`` is how many plans
    this incident already ran (it numbers the new plan, and so its idempotency keys)."""
    if rule.action == "none":
        return None
    if unit is None:
        return Refuse("target", f"rule {rule.name} restarts a unit but the finding names none")
    refused = check_max_attempts(attempts, rule.max_attempts)
    if refused is not None:
        return refused
    held = check_cooldown(attempts[-1] if attempts else None, rule.min_interval, now)
    if held is not None:
        return held
    attempt = incident_plans + 1
    return Plan(
        id=plan_id(incident_id, attempt), incident_id=incident_id, rule=rule.name,
        rule_digest=rule.digest, attempt=attempt, steps=(RestartUnit(node=node, unit=unit),),
        verification=Verification(node=node, unit=unit, within=rule.verify_within),
        cooldown_key=f"{node}/{unit}", created_at=now,
    )
