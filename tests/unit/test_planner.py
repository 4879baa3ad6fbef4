"""The pure planner: backoff, the ladder (climb, skip, exhaust), steps per action, modes, and every guard."""

from __future__ import annotations

import dataclasses

import pytest

from remediations.guards import Check
from remediations.planner import (
    Context,
    Exhausted,
    Hold,
    Propose,
    Refuse,
    Target,
    backoff_delay,
    choose_rung,
    plan_remediation,
)
from remediations.plans import (
    MigrateUnit,
    Notify,
    Plan,
    RestartUnit,
    StartUnit,
    StopUnit,
    Verification,
)
from remediations.state import Attempt, Budget, Matcher, OutcomeStats, Running, Silence, TargetState
from rules.model import Backoff, Rule, Rung

NOW = 1_700_000_000.0
NO_WAIT = Backoff(first=0.0, base=0.0, factor=1.0, max=0.0, jitter=0.0)
ALL_GUARDS = ["silence", "quarantine", "max_attempts", "for", "cooldown", "backoff", "rate_limit", "exclusive",
              "pause", "budget"]
QUIET_GUARDS = ALL_GUARDS[:7]


def rung(action: str, attempts: int = 1, backoff: Backoff = NO_WAIT, **extra: object) -> Rung:
    return Rung(action, attempts, backoff, **extra)  # type: ignore[arg-type]


def make_rule(*rungs: Rung, **extra: object) -> Rule:
    return Rule(name="r", kind="unit_exited", ladder=rungs or (rung("restart"),), digest="d" * 64,
                **extra)  # type: ignore[arg-type]


def target(unit: str | None = "web", severity: str = "critical", first_seen: float = NOW) -> Target:
    return Target(incident_id=7, key="unit_exited:node-1/web", kind="unit_exited", node="node-1", unit=unit,
                  severity=severity, summary="unit web on node-1 exited with code 1",
                  labels={"kind": "unit_exited", "node": "node-1", "unit": unit or "", "severity": severity},
                  first_seen=first_seen)


def history(*attempts: tuple[int, float], action: str = "restart") -> TargetState:
    state = TargetState()
    for n, (rung_index, at) in enumerate(attempts, 1):
        state.attempts.append(Attempt(f"7-{n}", rung_index, at, action))
    return state


def stats(*outcomes: bool) -> dict[tuple[str, str], OutcomeStats]:
    recorded = OutcomeStats()
    for outcome in outcomes:
        recorded.record(outcome, 1.0)
    return {("unit_exited", "restart"): recorded}


def decide(rule: Rule | None = None, state: TargetState | None = None, ctx: Context | None = None,
           tgt: Target | None = None, now: float = NOW) -> object:
    return plan_remediation(tgt or target(), rule or make_rule(), state or TargetState(), ctx or Context(), now)


def proposed(decision: object) -> Plan:
    assert isinstance(decision, Propose), decision
    return decision.plan


def blocking(decision: object, kind: type[Hold] | type[Refuse] = Hold) -> Check:
    assert isinstance(decision, kind), decision
    return decision.blocking


# --- backoff ------------------------------------------------------------------------------------


def test_the_first_attempt_waits_first() -> None:
    assert backoff_delay(Backoff(first=7.0, base=1.0, factor=2.0, max=60.0, jitter=0.0), 1, "s") == 7.0


def test_later_attempts_grow_exponentially_from_base_and_cap_at_max() -> None:
    policy = Backoff(first=0.0, base=2.0, factor=3.0, max=50.0, jitter=0.0)
    assert [backoff_delay(policy, n, "s") for n in range(1, 7)] == [0.0, 2.0, 6.0, 18.0, 50.0, 50.0]


def test_jitter_stays_within_its_share_and_spreads() -> None:
    policy = Backoff(first=10.0, base=10.0, factor=1.0, max=10.0, jitter=0.2)
    delays = [backoff_delay(policy, 1, f"{incident}:1") for incident in range(500)]
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert min(delays) < 8.5
    assert max(delays) > 11.5
    assert len(set(delays)) > 400


def test_jitter_is_deterministic_per_seed() -> None:
    policy = Backoff(first=10.0, base=10.0, factor=1.0, max=10.0, jitter=0.5)
    assert backoff_delay(policy, 1, "7:3") == backoff_delay(policy, 1, "7:3")
    assert backoff_delay(policy, 1, "7:3") != backoff_delay(policy, 1, "7:4")


def test_a_zero_delay_stays_zero_whatever_the_jitter() -> None:
    assert backoff_delay(Backoff(first=0.0, jitter=1.0), 1, "x") == 0.0


# --- choosing the rung --------------------------------------------------------------------------


LADDER = make_rule(rung("restart", attempts=2), rung("stop_start"), rung("notify"))


@pytest.mark.parametrize(("done", "expected"), [
    ((), (0, 1, ())),
    ((0,), (0, 2, ())),
    ((0, 0), (1, 1, ())),
    ((0, 0, 1), (2, 1, ())),
    ((0, 0, 1, 2), None),
])
def test_choose_rung_climbs_the_ladder_in_order(done: tuple[int, ...], expected: object) -> None:
    state = history(*((r, NOW - 100 + i) for i, r in enumerate(done)))
    assert choose_rung(LADDER, target(), state, Context()) == expected


def test_choose_rung_never_goes_back_to_an_unused_lower_rung() -> None:
    # rung 0 was never used (skipped earlier), rung 1 was: the ladder continues above rung 1
    assert choose_rung(LADDER, target(), history((1, NOW - 10)), Context()) == (2, 1, ())
    assert choose_rung(LADDER, target(), history((2, NOW - 10)), Context()) is None


def test_attempts_before_a_ladder_reset_do_not_count() -> None:
    state = history((0, NOW - 100), (0, NOW - 90), (1, NOW - 80))
    state.ladder_from = NOW - 50
    assert choose_rung(LADDER, target(), state, Context()) == (0, 1, ())


def test_a_migrate_rung_without_a_standby_node_is_skipped_and_recorded() -> None:
    rule = make_rule(rung("restart"), rung("migrate"), rung("notify"))
    state = history((0, NOW - 10))
    assert choose_rung(rule, target(), state, Context()) == (
        2, 1, ((1, "no healthy online node holds a standby copy of the unit"),))
    assert choose_rung(rule, target(), state, Context(standby=("node-2",))) == (1, 1, ())


def test_a_resync_rung_is_skipped_for_a_finding_that_is_not_a_divergent_replica() -> None:
    rule = make_rule(rung("resync"), rung("notify"))
    assert choose_rung(rule, target(), TargetState(), Context()) == (
        1, 1, ((0, "resync repairs dataset replicas; a unit_exited finding names none"),))


def test_a_unit_rung_is_skipped_for_a_finding_without_a_unit() -> None:
    rule = make_rule(rung("restart"), rung("stop_start"), rung("notify"))
    assert choose_rung(rule, target(unit=None), TargetState(), Context()) == (
        2, 1, ((0, "restart needs a unit; the finding names none"),
               (1, "stop_start needs a unit; the finding names none")))


def test_a_rung_whose_recent_success_rate_is_below_its_floor_is_skipped_and_recorded() -> None:
    rule = make_rule(rung("restart", min_success_rate=0.5, min_tries=5), rung("notify"))
    low = Context(stats=stats(True, True, True, False, False, True, False, False, False))  # last 5: 1 of 5
    assert choose_rung(rule, target(), TargetState(), low) == (
        1, 1, ((0, "restart succeeded 20% of its last 5 tries on unit_exited (floor 50%)"),))
    decision = decide(rule, ctx=low)
    assert isinstance(decision, Propose)
    assert decision.plan.action == "notify"
    assert decision.skipped == ((0, "restart succeeded 20% of its last 5 tries on unit_exited (floor 50%)"),)


@pytest.mark.parametrize("outcomes", [
    (False, False, False, False),  # fewer than min_tries: not judged yet
    (False, True, True, True, False, True),  # last 5: 3 of 5 = 60%
])
def test_a_rung_at_or_above_its_floor_or_not_yet_judged_is_used(outcomes: tuple[bool, ...]) -> None:
    rule = make_rule(rung("restart", min_success_rate=0.5, min_tries=5), rung("notify"))
    assert choose_rung(rule, target(), TargetState(), Context(stats=stats(*outcomes))) == (0, 1, ())


def test_success_rates_of_another_finding_kind_do_not_count() -> None:
    rule = make_rule(rung("restart", min_success_rate=0.5, min_tries=1), rung("notify"))
    other = OutcomeStats()
    other.record(False, None)
    assert choose_rung(rule, target(), TargetState(), Context(stats={("probe_failing", "restart"): other})) == (
        0, 1, ())


def test_a_used_up_ladder_is_exhausted() -> None:
    decision = decide(make_rule(rung("restart")), history((0, NOW - 100)))
    assert decision == Exhausted("every rung of r was used")


def test_a_ladder_whose_remaining_rungs_are_all_skipped_is_exhausted_with_the_skips() -> None:
    decision = decide(make_rule(rung("restart"), rung("migrate"), rung("resync")), history((0, NOW - 100)))
    assert isinstance(decision, Exhausted)
    assert decision.reason == "every remaining rung of r was skipped"
    assert [index for index, _ in decision.skipped] == [1, 2]


def test_a_none_rung_plans_nothing() -> None:
    assert decide(make_rule(rung("none"))) is None


# --- steps, verification, mode ------------------------------------------------------------------


def test_a_restart_plan_in_full() -> None:
    decision = decide(make_rule(verify_within=20.0, stable_for=2.0, approval_timeout=60.0))
    assert isinstance(decision, Propose)
    assert decision.plan == Plan(
        id="7-1", incident_id=7, rule="r", rule_digest="d" * 64, rung=0, attempt=1,
        steps=(RestartUnit(node="node-1", unit="web"),),
        verification=Verification(kind="healthy", node="node-1", unit="web", within=20.0, stable_for=2.0),
        cooldown_key="node-1/web", mode="auto", created_at=NOW, deadline=NOW + 60.0 + 20.0 + 120.0)
    assert decision.skipped == ()


def test_the_plan_is_numbered_by_the_incident_s_plans() -> None:
    plan = proposed(decide(make_rule(rung("restart", attempts=5)), history((0, NOW - 100)),
                           Context(incident_plans=4)))
    assert (plan.id, plan.attempt) == ("7-5", 5)


def test_stop_start_stops_then_starts_on_the_same_node() -> None:
    plan = proposed(decide(make_rule(rung("stop_start"))))
    assert plan.steps == (StopUnit("node-1", "web"), StartUnit("node-1", "web"))
    assert plan.verification == Verification("healthy", "node-1", "web", 30.0, 1.0)
    assert plan.action == "stop_unit"


def test_migrate_moves_to_the_first_standby_and_verifies_there() -> None:
    plan = proposed(decide(make_rule(rung("migrate")), ctx=Context(standby=("node-3", "node-2"))))
    assert plan.steps == (MigrateUnit(unit="web", source="node-1", target="node-3"),)
    assert plan.verification == Verification("healthy", "node-3", "web", 30.0, 1.0)


@pytest.mark.parametrize(("severity", "expected"), [
    ("critical", "critical"), ("warning", "warning"), ("info", "info"), ("major", "critical")])
def test_notify_pages_a_human_and_verifies_nothing(severity: str, expected: str) -> None:
    plan = proposed(decide(make_rule(rung("notify")), tgt=target(severity=severity)))
    assert plan.steps == (Notify(node="node-1", message="unit web on node-1 exited with code 1",
                                 severity=expected),)  # type: ignore[arg-type]
    assert plan.verification is None


def test_a_cleared_verification_is_passed_through() -> None:
    plan = proposed(decide(make_rule(verify_kind="cleared")))
    assert plan.verification is not None
    assert plan.verification.kind == "cleared"


@pytest.mark.parametrize(("mode", "action", "expected"), [
    ("auto", "restart", "auto"), ("auto", "notify", "auto"),
    ("approve", "restart", "approve"), ("approve", "stop_start", "approve"),
    ("approve", "notify", "auto"),  # paging a human needs no human's approval
    ("shadow", "restart", "shadow"), ("shadow", "notify", "shadow"),
])
def test_the_plan_mode_follows_the_rule(mode: str, action: str, expected: str) -> None:
    assert proposed(decide(make_rule(rung(action), mode=mode))).mode == expected


# --- guards -------------------------------------------------------------------------------------


def test_every_guard_is_consulted_and_recorded_for_a_disruptive_plan() -> None:
    decision = decide()
    assert isinstance(decision, Propose)
    assert [c.guard for c in decision.checks] == ALL_GUARDS
    assert {c.verdict for c in decision.checks} == {"allow"}


def test_a_notify_plan_skips_pause_and_budget() -> None:
    decision = decide(make_rule(rung("notify")))
    assert isinstance(decision, Propose)
    assert [c.guard for c in decision.checks] == QUIET_GUARDS


def test_a_held_plan_still_records_every_guard() -> None:
    full = Context(paused=True, running=tuple(Running(f"p{i}", "r", f"n{i}", "x", "", True) for i in range(5)))
    decision = decide(make_rule(for_=60.0), ctx=full)
    assert isinstance(decision, Hold)
    assert [c.guard for c in decision.checks] == ALL_GUARDS
    assert [c.guard for c in decision.checks if c.verdict == "hold"] == ["for", "pause", "budget"]
    assert decision.blocking.guard == "for"


def test_silence_holds_until_it_ends() -> None:
    silence = Silence("s1", (Matcher("node", "node-*"),), NOW - 10, NOW + 60, comment="disk swap")
    check = blocking(decide(ctx=Context(silences=(silence,))))
    assert (check.guard, check.until) == ("silence", NOW + 60)
    assert check.reason == f"silenced by s1 until {NOW + 60:.0f}: disk swap"


def test_a_silence_can_match_the_rule_name() -> None:
    silence = Silence("s2", (Matcher("rule", "r"),), NOW - 10, NOW + 60)
    assert blocking(decide(ctx=Context(silences=(silence,)))).guard == "silence"
    other = Silence("s3", (Matcher("rule", "other"),), NOW - 10, NOW + 60)
    assert isinstance(decide(ctx=Context(silences=(other,))), Propose)


def test_quarantine_holds() -> None:
    state = TargetState(quarantined_until=NOW + 100)
    check = blocking(decide(state=state))
    assert (check.guard, check.until) == ("quarantine", NOW + 100)


def test_max_attempts_refuses_and_wins_over_a_hold() -> None:
    rule = make_rule(rung("restart", attempts=10), max_attempts=2, attempt_window=60.0)
    silence = Silence("s1", (), NOW - 1, NOW + 60)
    state = history((0, NOW - 30), (0, NOW - 20))
    check = blocking(decide(rule, state, Context(silences=(silence,))), Refuse)
    assert check.guard == "max_attempts"
    assert check.reason == "2 attempts on this target in the last 60s; the rule allows 2"


def test_attempts_outside_the_window_do_not_count_toward_max_attempts() -> None:
    rule = make_rule(rung("restart", attempts=10), max_attempts=2, attempt_window=60.0)
    assert isinstance(decide(rule, history((0, NOW - 90), (0, NOW - 20))), Propose)


def test_for_holds_until_the_finding_held_long_enough() -> None:
    check = blocking(decide(make_rule(for_=30.0), tgt=target(first_seen=NOW - 10)))
    assert (check.guard, check.until, check.reason) == ("for", NOW + 20, "the finding must hold for 30s")
    assert isinstance(decide(make_rule(for_=30.0), tgt=target(first_seen=NOW - 30)), Propose)


def test_cooldown_holds_from_the_last_attempt() -> None:
    rule = make_rule(rung("restart", attempts=3), cooldown=5.0)
    check = blocking(decide(rule, history((0, NOW - 100), (0, NOW - 0.5))))
    assert (check.guard, check.until) == ("cooldown", NOW + 4.5)


def test_backoff_holds_from_the_previous_plan_start() -> None:
    policy = Backoff(first=0.0, base=10.0, factor=2.0, max=100.0, jitter=0.0)
    rule = make_rule(rung("restart", attempts=3, backoff=policy), cooldown=1.0)
    check = blocking(decide(rule, history((0, NOW - 4))))
    assert (check.guard, check.until, check.reason) == ("backoff", NOW + 6, "backing off 10.0s before the next attempt")
    check = blocking(decide(rule, history((0, NOW - 30), (0, NOW - 4))))
    assert (check.guard, check.until) == ("backoff", NOW + 16)  # n=3: base * factor


def test_the_first_backoff_of_an_incident_runs_from_its_first_sighting() -> None:
    rule = make_rule(rung("notify", backoff=Backoff(first=30.0, jitter=0.0)))
    check = blocking(decide(rule, tgt=target(first_seen=NOW - 10)))
    assert (check.guard, check.until) == ("backoff", NOW + 20)


def test_the_rate_limit_holds_until_the_oldest_start_leaves_the_window() -> None:
    rule = make_rule(rate_limit=(2, 60.0))
    check = blocking(decide(rule, ctx=Context(rule_starts=(NOW - 100, NOW - 10, NOW - 5))))
    assert (check.guard, check.until) == ("rate_limit", NOW + 50)


def test_pause_holds_a_disruptive_plan() -> None:
    check = blocking(decide(ctx=Context(paused=True, pause_reason="kernel upgrade")))
    assert (check.guard, check.reason) == ("pause", "remediation is paused fleet-wide: kernel upgrade")


def test_the_budget_holds_a_disruptive_plan() -> None:
    running = tuple(Running(f"p{i}", "r", f"n{i}", "x", "", True) for i in range(2))
    check = blocking(decide(ctx=Context(budget=Budget(max_concurrent=2), running=running)))
    assert (check.guard, check.reason) == ("budget", "2 disruptive plans running (max 2)")


def test_a_notify_rung_is_blocked_by_neither_pause_nor_budget() -> None:
    running = tuple(Running(f"p{i}", "r", f"n{i}", "x", "", True) for i in range(5))
    plan = proposed(decide(make_rule(rung("notify")), ctx=Context(paused=True, running=running)))
    assert plan.action == "notify"


def test_the_quiet_guards_still_apply_to_a_notify_rung() -> None:
    rule = make_rule(rung("notify"), rate_limit=(1, 60.0))
    assert blocking(decide(rule, ctx=Context(rule_starts=(NOW - 1,)))).guard == "rate_limit"


def test_the_target_is_not_mutated() -> None:
    state = history((0, NOW - 100))
    before = dataclasses.replace(state, attempts=state.attempts.copy())
    decide(make_rule(rung("restart", attempts=3)), state)
    assert list(state.attempts) == list(before.attempts)
