"""Each guard alone, table-driven: what it allows, holds or refuses, and until when."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from remediations.guards import (
    Check,
    check_backoff,
    check_budget,
    check_cooldown,
    check_for,
    check_max_attempts,
    check_pause,
    check_quarantine,
    check_rate_limit,
    check_silence,
    first_blocking,
)
from remediations.state import HISTORY, Attempt, Budget, Matcher, Running, Silence, TargetState
from rules.loader import parse_rulebook
from selfheal.errors import RulebookError

NOW = 1000.0


def attempts(*at: float) -> TargetState:
    state = TargetState()
    for n, when in enumerate(at):
        state.attempts.append(Attempt(f"1-{n + 1}", 0, when, "restart"))
    return state


def verdict(check: Check) -> tuple[str, float | None]:
    return check.verdict, check.until


# --- the simple guards --------------------------------------------------------------------------

CASES: list[tuple[str, Callable[[], Check], str, float | None]] = [
    ("not paused", lambda: check_pause(False), "allow", None),
    ("paused", lambda: check_pause(True), "hold", None),
    ("not quarantined", lambda: check_quarantine(TargetState(), NOW), "allow", None),
    ("quarantined", lambda: check_quarantine(TargetState(quarantined_until=NOW + 5), NOW), "hold", NOW + 5),
    ("quarantine just ended", lambda: check_quarantine(TargetState(quarantined_until=NOW), NOW), "allow", None),
    ("no attempts", lambda: check_max_attempts(TargetState(), 1, 60.0, NOW), "allow", None),
    ("under max_attempts", lambda: check_max_attempts(attempts(NOW - 10, NOW - 5), 3, 60.0, NOW), "allow", None),
    ("at max_attempts", lambda: check_max_attempts(attempts(NOW - 30, NOW - 10, NOW - 5), 3, 60.0, NOW),
     "refuse", None),
    ("old attempts leave the window",
     lambda: check_max_attempts(attempts(NOW - 60, NOW - 10, NOW - 5), 3, 60.0, NOW), "allow", None),
    ("for not yet held", lambda: check_for(NOW - 5, 10.0, NOW), "hold", NOW + 5),
    ("for held exactly", lambda: check_for(NOW - 10, 10.0, NOW), "allow", None),
    ("for zero", lambda: check_for(NOW, 0.0, NOW), "allow", None),
    ("no previous attempt", lambda: check_cooldown(TargetState(), 30.0, NOW), "allow", None),
    ("inside the cooldown", lambda: check_cooldown(attempts(NOW - 100, NOW - 10), 30.0, NOW), "hold", NOW + 20),
    ("cooldown ended", lambda: check_cooldown(attempts(NOW - 30), 30.0, NOW), "allow", None),
    ("backing off", lambda: check_backoff(NOW + 3, NOW, 4.0), "hold", NOW + 3),
    ("backoff over", lambda: check_backoff(NOW, NOW, 4.0), "allow", None),
    ("under the rate limit", lambda: check_rate_limit([NOW - 1], (2, 60.0), NOW), "allow", None),
    ("at the rate limit", lambda: check_rate_limit([NOW - 50, NOW - 1], (2, 60.0), NOW), "hold", NOW + 10),
    ("rate limit window slides",
     lambda: check_rate_limit([NOW - 60, NOW - 61, NOW - 1], (2, 60.0), NOW), "allow", None),
]


@pytest.mark.parametrize(("make", "expected", "until"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_guard_alone(make: Callable[[], Check], expected: str, until: float | None) -> None:
    assert verdict(make()) == (expected, until)


def test_reasons_name_the_numbers() -> None:
    assert check_pause(True, "upgrade").reason == "remediation is paused fleet-wide: upgrade"
    assert check_pause(True).reason == "remediation is paused fleet-wide"
    assert check_max_attempts(attempts(NOW - 1, NOW - 2), 2, 600.0, NOW).reason == (
        "2 attempts on this target in the last 600s; the rule allows 2")
    assert check_for(NOW, 15.0, NOW).reason == "the finding must hold for 15s"
    assert check_rate_limit([NOW - 1], (1, 60.0), NOW).reason == "1 plans of this rule in the last 60s (limit 1)"
    assert check_backoff(NOW + 1, NOW, 2.25).reason == "backing off 2.2s before the next attempt"


def test_the_guard_names() -> None:
    checks = [check_pause(False), check_silence({}, [], NOW), check_quarantine(TargetState(), NOW),
              check_max_attempts(TargetState(), 1, 1.0, NOW), check_for(NOW, 0.0, NOW),
              check_cooldown(TargetState(), 0.0, NOW), check_backoff(NOW, NOW, 0.0),
              check_rate_limit([], (1, 1.0), NOW),
              check_budget(budget=Budget(), running=[], node="n", unit=None, group="", group_size=1, replicas=1)]
    assert [c.guard for c in checks] == ["pause", "silence", "quarantine", "max_attempts", "for", "cooldown",
                                         "backoff", "rate_limit", "budget"]
    assert {c.verdict for c in checks} == {"allow"}
    assert checks[0].as_dict() == {"guard": "pause", "verdict": "allow", "reason": "", "until": None}


def test_max_attempts_cannot_exceed_the_attempt_history_it_is_counted_over() -> None:
    """The attempt history keeps HISTORY attempts per target, so a larger max_attempts could never refuse:
    the schema rejects it instead of silently never enforcing it."""
    with pytest.raises(RulebookError, match="max_attempts"):
        parse_rulebook("version: 1\nrules:\n  - {name: r, match: {kind: unit_exited}, "
                       f"ladder: [{{action: restart}}], max_attempts: {HISTORY + 1}}}\n", source="r.yaml")
    (rule,) = parse_rulebook("version: 1\nrules:\n  - {name: r, match: {kind: unit_exited}, "
                             f"ladder: [{{action: restart}}], max_attempts: {HISTORY}}}\n", source="r.yaml").rules
    state = attempts(*(NOW - 300 + i for i in range(rule.max_attempts)))
    assert check_max_attempts(state, rule.max_attempts, rule.attempt_window, NOW).verdict == "refuse"


# --- silences -----------------------------------------------------------------------------------

LABELS = {"kind": "unit_exited", "node": "gpu-3", "unit": "train", "severity": "critical", "rule": "r", "rack": "b"}
SILENCES: list[tuple[str, Silence, str]] = [
    ("matching", Silence("s", (Matcher("node", "gpu-*"),), NOW - 1, NOW + 9), "hold"),
    ("every matcher must match", Silence("s", (Matcher("node", "gpu-*"), Matcher("unit", "web")), NOW - 1, NOW + 9),
     "allow"),
    ("all matchers match", Silence("s", (Matcher("node", "gpu-*"), Matcher("rack", "b")), NOW - 1, NOW + 9), "hold"),
    ("no matchers silence everything", Silence("s", (), NOW - 1, NOW + 9), "hold"),
    ("other node", Silence("s", (Matcher("node", "cpu-*"),), NOW - 1, NOW + 9), "allow"),
    ("missing label", Silence("s", (Matcher("zone", "*-1"),), NOW - 1, NOW + 9), "allow"),
    ("not started yet", Silence("s", (), NOW + 1, NOW + 9), "allow"),
    ("starts now", Silence("s", (), NOW, NOW + 9), "hold"),
    ("ended", Silence("s", (), NOW - 9, NOW), "allow"),
]


@pytest.mark.parametrize(("silence", "expected"), [c[1:] for c in SILENCES], ids=[c[0] for c in SILENCES])
def test_silence(silence: Silence, expected: str) -> None:
    check = check_silence(LABELS, [silence], NOW)
    assert check.verdict == expected
    assert check.until == (silence.ends_at if expected == "hold" else None)


def test_the_first_active_matching_silence_names_itself() -> None:
    silences = [Silence("old", (), NOW - 9, NOW - 1), Silence("s2", (Matcher("node", "gpu-3"),), NOW - 1, NOW + 50,
                                                              comment="swap", author="ana")]
    assert check_silence(LABELS, silences, NOW).reason == f"silenced by s2 until {NOW + 50:.0f}: swap"


# --- the disruption budget ----------------------------------------------------------------------


def run(node: str, unit: str | None = "web", group: str = "a", *, disruptive: bool = True, pid: str = "") -> Running:
    return Running(pid or f"{node}-{unit}", "r", node, unit, group, disruptive)


def budget_check(running: list[Running], *, node: str = "n9", unit: str | None = "web", group: str = "a",
                 group_size: int = 100, replicas: int = 100, **budget: float) -> Check:
    return check_budget(budget=Budget(**budget), running=running, node=node, unit=unit,  # type: ignore[arg-type]
                        group=group, group_size=group_size, replicas=replicas)


BUDGETS: list[tuple[str, Callable[[], Check], str]] = [
    ("nothing running", lambda: budget_check([]), "allow"),
    ("under max_concurrent", lambda: budget_check([run("n1"), run("n2")], max_concurrent=3), "allow"),
    ("at max_concurrent", lambda: budget_check([run("n1"), run("n2"), run("n3")], max_concurrent=3), "hold"),
    ("non-disruptive plans do not count",
     lambda: budget_check([run(f"n{i}", disruptive=False) for i in range(10)], max_concurrent=1), "allow"),
    # group of 10 nodes, share 0.34: 3 nodes at once
    ("group share: third node", lambda: budget_check([run("n1", "a1"), run("n2", "a2")], group_size=10), "allow"),
    ("group share: fourth node",
     lambda: budget_check([run("n1", "a1"), run("n2", "a2"), run("n3", "a3")], group_size=10), "hold"),
    ("group share: a second plan on a node already counted",
     lambda: budget_check([run("n1", "a1"), run("n2", "a2"), run("n3", "a3")], node="n3", group_size=10), "allow"),
    ("group share: other groups do not count",
     lambda: budget_check([run("n1", "a1", "b"), run("n2", "a2", "b"), run("n3", "a3", "b")], group_size=10), "allow"),
    ("group share: non-disruptive plans do not count",
     lambda: budget_check([run(f"n{i}", f"a{i}", disruptive=False) for i in range(5)], group_size=10), "allow"),
    # a group of 2 nodes, share 0.34 rounds down to 0: at least one node is always allowed
    ("group share: at least one node", lambda: budget_check([], group_size=2), "allow"),
    ("group share: but only one", lambda: budget_check([run("n1", "a1")], group_size=2), "hold"),
    ("group share: one node group", lambda: budget_check([], group_size=1, max_node_share=0.0), "allow"),
    # 4 replicas of web, share 0.5: 2 at once
    ("replica share: second replica", lambda: budget_check([run("n1")], replicas=4), "allow"),
    ("replica share: third replica", lambda: budget_check([run("n1"), run("n2")], replicas=4), "hold"),
    ("replica share: other units do not count", lambda: budget_check([run("n1", "db"), run("n2", "db")], replicas=4),
     "allow"),
    ("replica share: at least one", lambda: budget_check([], replicas=1), "allow"),
    ("replica share: a singleton", lambda: budget_check([run("n1")], replicas=1), "hold"),
    ("replica share: not for a finding without a unit", lambda: budget_check([run("n1"), run("n2")], unit=None,
                                                                             replicas=1), "allow"),
]


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in BUDGETS], ids=[c[0] for c in BUDGETS])
def test_budget(make: Callable[[], Check], expected: str) -> None:
    check = make()
    assert (check.guard, check.verdict, check.until) == ("budget", expected, None)


def test_budget_reasons() -> None:
    assert budget_check([run("n1")], max_concurrent=1).reason == "1 disruptive plans running (max 1)"
    assert budget_check([run("n1", "x")], group_size=2).reason == (
        "2 of 2 nodes in group 'a' would be under remediation (max 1)")
    assert budget_check([run("n1")], replicas=3).reason == "2 of 3 replicas of 'web' would be under remediation (max 1)"


def test_max_concurrent_is_checked_before_the_shares() -> None:
    assert budget_check([run("n1", "x")], group_size=2, max_concurrent=1).reason.startswith("1 disruptive plans")


# --- combining ----------------------------------------------------------------------------------


def test_first_blocking_prefers_a_refusal_then_the_first_hold() -> None:
    allow, hold1, hold2 = Check("a", "allow"), Check("h1", "hold"), Check("h2", "hold")
    refuse = Check("r", "refuse")
    assert first_blocking([allow, hold1, refuse, hold2]) is refuse
    assert first_blocking([allow, hold2, hold1]) is hold2
    assert first_blocking([allow, allow]) is None
    assert first_blocking([]) is None
