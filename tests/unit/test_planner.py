"""The pure planner and its guards: first attempt, cooldown, attempt cap, no-op rules, idempotency keys."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from remediations.guards import Hold, Refuse, check_cooldown, check_max_attempts
from remediations.planner import plan_remediation
from remediations.plans import Plan, RestartUnit, Verification, idempotency_key, plan_id
from rules.model import Rule

NOW = 1_700_000_000.0
RESTART = Rule(name="restart-web", kind="unit_exited", action="restart_unit", min_interval=5.0, max_attempts=3,
               verify_within=30.0, digest="d" * 64)


def decide(attempts: list[float], now: float = NOW, *, rule: Rule = RESTART, unit: str | None = "web",
           incident_id: int = 7, incident_plans: int | None = None) -> Plan | Hold | Refuse | None:
    """One incident whose own plans are all the target's attempts unless ``incident_plans`` says otherwise."""
    return plan_remediation(incident_id=incident_id, node="node-a", unit=unit, rule=rule, attempts=attempts,
                            incident_plans=len(attempts) if incident_plans is None else incident_plans, now=now)


def test_the_first_attempt_is_planned_at_once() -> None:
    plan = decide([])
    assert plan == Plan(
        id="7-1", incident_id=7, rule="restart-web", rule_digest="d" * 64, attempt=1,
        steps=(RestartUnit(node="node-a", unit="web"),),
        verification=Verification(node="node-a", unit="web", within=30.0),
        cooldown_key="node-a/web", created_at=NOW)


def test_a_later_attempt_after_the_cooldown_is_planned_with_its_number() -> None:
    plan = decide([NOW - 20, NOW - 5])
    assert isinstance(plan, Plan)
    assert plan.attempt == 3
    assert plan.id == plan_id(7, 3) == "7-3"


def test_the_plan_is_numbered_by_the_incident_s_own_plans_not_the_target_s_attempts() -> None:
    # Two earlier attempts on the same unit belonged to an earlier incident: they count against the
    # budget and the cooldown, but this incident's first plan is still attempt 1.
    plan = decide([NOW - 60, NOW - 30], incident_id=9, incident_plans=0)
    assert isinstance(plan, Plan)
    assert (plan.id, plan.attempt) == ("9-1", 1)
    refused = decide([NOW - 60, NOW - 30, NOW - 10], incident_id=9, incident_plans=0)
    assert isinstance(refused, Refuse)


def test_an_attempt_inside_the_cooldown_is_held_until_it_ends() -> None:
    held = decide([NOW - 2.0])
    assert isinstance(held, Hold)
    assert held.guard == "cooldown"
    assert held.until == NOW - 2.0 + 5.0
    assert "last attempt 2.0s ago" in held.reason
    assert "minimum interval 5s" in held.reason


def test_the_cooldown_uses_the_latest_attempt() -> None:
    held = decide([NOW - 100, NOW - 1])
    assert isinstance(held, Hold)
    assert held.until == NOW + 4


def test_max_attempts_refuses() -> None:
    refused = decide([NOW - 300, NOW - 200, NOW - 100])
    assert isinstance(refused, Refuse)
    assert refused.guard == "max_attempts"
    assert refused.reason == "3 attempts made, the rule allows 3"


def test_max_attempts_wins_over_the_cooldown() -> None:
    assert isinstance(decide([NOW - 3, NOW - 2, NOW - 1]), Refuse)


def test_action_none_plans_nothing() -> None:
    report_only = Rule(name="report", kind="node_offline", action="none")
    assert decide([], rule=report_only) is None
    assert decide([], rule=report_only, unit=None) is None


def test_a_restart_without_a_unit_is_refused() -> None:
    refused = decide([], unit=None)
    assert isinstance(refused, Refuse)
    assert refused.guard == "target"
    assert "restart-web" in refused.reason


def test_guards_directly() -> None:
    assert check_cooldown(None, 5.0, NOW) is None
    assert check_cooldown(NOW - 5.0, 5.0, NOW) is None
    assert check_cooldown(NOW - 4.0, 5.0, NOW) == Hold("cooldown", "last attempt 4.0s ago, minimum interval 5s",
                                                       NOW + 1.0)
    assert check_max_attempts([], 1) is None
    assert check_max_attempts([NOW], 1) == Refuse("max_attempts", "1 attempts made, the rule allows 1")


# --- idempotency keys ---------------------------------------------------------------------------


def test_idempotency_keys_are_deterministic() -> None:
    assert idempotency_key("node-a", 7, 0, 1) == idempotency_key("node-a", 7, 0, 1)
    assert len(idempotency_key("node-a", 7, 0, 1)) == 32
    assert all(c in "0123456789abcdef" for c in idempotency_key("node-a", 7, 0, 1))


def test_idempotency_keys_differ_in_every_component() -> None:
    keys = {idempotency_key(node, incident, step, attempt)
            for node in ("node-a", "node-b") for incident in (1, 7, 17) for step in (0, 1)
            for attempt in (1, 2, 11)}
    assert len(keys) == 2 * 3 * 2 * 3


def test_idempotency_keys_do_not_collide_on_concatenation() -> None:
    assert idempotency_key("node-1", 1, 1, 1) != idempotency_key("node-11", 1, 1, 1)
    assert idempotency_key("n", 11, 1, 1) != idempotency_key("n", 1, 11, 1)
    assert idempotency_key("n", 1, 11, 1) != idempotency_key("n", 1, 1, 11)


@given(a=st.tuples(st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}", fullmatch=True), st.integers(0, 10**6),
                   st.integers(0, 50), st.integers(1, 100)),
       b=st.tuples(st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}", fullmatch=True), st.integers(0, 10**6),
                   st.integers(0, 50), st.integers(1, 100)))
def test_idempotency_keys_are_distinct_per_tuple(a: tuple[str, int, int, int], b: tuple[str, int, int, int]) -> None:
    assert (idempotency_key(*a) == idempotency_key(*b)) == (a == b)


# --- property: the guards hold over any request sequence ----------------------------------------


@settings(max_examples=300, deadline=None)
@given(min_interval=st.integers(0, 40).map(lambda q: q / 4),
       max_attempts=st.integers(1, 6),
       gaps=st.lists(st.integers(0, 80).map(lambda q: q / 4), min_size=1, max_size=60))
def test_no_two_attempts_closer_than_min_interval_and_never_more_than_max(
        min_interval: float, max_attempts: int, gaps: list[float]) -> None:
    rule = Rule(name="r", kind="unit_exited", action="restart_unit", min_interval=min_interval,
                max_attempts=max_attempts)
    attempts: list[float] = []
    now = NOW
    for gap in gaps:
        now += gap
        decision = plan_remediation(incident_id=1, node="node-a", unit="web", rule=rule, attempts=attempts,
                                    incident_plans=len(attempts), now=now)
        if isinstance(decision, Plan):
            assert decision.attempt == len(attempts) + 1
            attempts.append(now)
        elif isinstance(decision, Hold):
            assert decision.until > now
            assert decision.until == attempts[-1] + min_interval
        else:
            assert isinstance(decision, Refuse)
            assert len(attempts) == max_attempts
    assert len(attempts) <= max_attempts
    assert all(later - earlier >= min_interval for earlier, later in itertools.pairwise(attempts))
    assert attempts, "the first request is always planned"
