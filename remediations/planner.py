"""The planner: one pure decision for one incident — a plan, a hold, a refusal, or the end of the ladder.

Inputs are the incident's target, its rule, the target's history and a
context snapshot of the fleet (running plans, budget, silences, pause,
outcome statistics, standby nodes); ``now`` is passed in. The ladder is
climbed in order and never goes back: a rung is used ``attempts`` times, with
exponential backoff and deterministic jitter between them, then the next rung
is taken. A rung is skipped — and the skip is recorded — when it cannot apply
(no unit to restart, no healthy standby node to migrate to, no dataset to
resync) or when its recent success rate for this kind of finding is below the
rung's floor. What an action needs, whether it disrupts and how its plan is
verified is ``remediations.actions.ACTIONS``; the steps it makes are ``_steps``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, assert_never

from remediations.actions import Action, named
from remediations.guards import (
    Check,
    check_backoff,
    check_budget,
    check_cooldown,
    check_exclusive,
    check_for,
    check_max_attempts,
    check_pause,
    check_quarantine,
    check_rate_limit,
    check_silence,
    first_blocking,
)
from remediations.plans import (
    MigrateUnit,
    Mode,
    Notify,
    Plan,
    RestartUnit,
    ResyncDataset,
    StartUnit,
    Step,
    StopUnit,
    Verification,
    plan_id,
)
from remediations.policy import BackoffPolicy, Policy, RungPolicy
from remediations.state import Budget, OutcomeStats, Running, Silence, TargetState


@dataclass(frozen=True, slots=True)
class Target:
    incident_id: int
    key: str
    kind: str
    node: str
    unit: str | None
    severity: str
    summary: str
    labels: Mapping[str, str]
    first_seen: float


@dataclass(frozen=True, slots=True)
class Replica:
    """A replica of a dataset as the planner weighs it as a repair source."""

    node: str
    root: str
    state: str = "ok"
    online: bool = True
    in_incident: bool = False
    """Its node has an open incident of its own: not a source."""


def choose_source(replicas: Sequence[Replica], *, target: str, authority_root: str) -> tuple[str | None, str]:
    """The node to repair ``target`` from — a replica that verifies against the authority, online and
    trouble-free — or (None, why not). Never a replica whose root is not the authority's."""
    if not authority_root:
        return None, "the finding names no authority root"
    rejected = []
    for replica in sorted(replicas, key=lambda r: r.node):
        if replica.node == target:
            continue
        why = ("its root is not the authority's" if replica.root != authority_root or replica.state != "ok"
               else "offline" if not replica.online else "it has an open incident" if replica.in_incident else "")
        if not why:
            return replica.node, ""
        rejected.append(f"{replica.node}: {why}")
    return None, "no replica verifies against the authority and is fit to serve" + (
        f" ({'; '.join(rejected)})" if rejected else "")


@dataclass(frozen=True, slots=True)
class Context:
    """The fleet as the planner needs to see it, at one moment."""

    incident_plans: int = 0
    running: Sequence[Running] = ()
    budget: Budget = field(default_factory=Budget)
    group: str = ""
    group_size: int = 1
    replicas: int = 1
    standby: Sequence[str] = ()
    """Healthy online nodes that hold a stopped copy of the unit (migration targets), best first."""
    elsewhere: bool = False
    """Other controllers act on part of the fleet: a migration without a ``standby`` here may still find
    one on their nodes (asked when the step runs)."""
    rule_starts: Sequence[float] = ()
    paused: bool = False
    pause_reason: str = ""
    silences: Sequence[Silence] = ()
    stats: Mapping[tuple[str, str], OutcomeStats] = field(default_factory=dict)
    unit_history: TargetState | None = None
    """Attempts on this node/unit by every rule: cooldown and max_attempts count them all."""
    dataset: str = ""
    """Dataset findings: the dataset's name (from the evidence)."""
    authority_root: str = ""
    """Dataset findings: the root the replica should have."""
    dataset_replicas: Sequence[Replica] = ()
    """Dataset findings: every replica of the dataset (the resync source candidates)."""


@dataclass(frozen=True, slots=True)
class Propose:
    plan: Plan
    checks: tuple[Check, ...]
    skipped: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Hold:
    checks: tuple[Check, ...]
    blocking: Check


@dataclass(frozen=True, slots=True)
class Refuse:
    checks: tuple[Check, ...]
    blocking: Check


@dataclass(frozen=True, slots=True)
class Exhausted:
    """Every rung was used (or skipped): the incident is left to a human."""

    reason: str
    skipped: tuple[tuple[int, str], ...] = ()


Decision = Propose | Hold | Refuse | Exhausted | None


def backoff_delay(backoff: BackoffPolicy, n: int, seed: str) -> float:
    """Delay before the n-th attempt on a rung (n >= 1), with deterministic jitter from ``seed``."""
    delay = backoff.first if n == 1 else min(backoff.max, backoff.base * backoff.factor ** (n - 2))
    unit = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") / 2**64  # [0, 1)
    return max(0.0, delay * (1 + backoff.jitter * (2 * unit - 1)))


def choose_rung(rule: Policy, target: Target, state: TargetState,
                ctx: Context) -> tuple[int, int, tuple[tuple[int, str], ...]] | None:
    """(rung index, attempt number on that rung, skipped rungs), or None when the ladder is used up."""
    attempts = state.ladder_attempts()
    used = [0] * len(rule.ladder)
    for attempt in attempts:
        if attempt.rung < len(used):
            used[attempt.rung] += 1
    start = max((a.rung for a in attempts), default=0)
    skipped: list[tuple[int, str]] = []
    for index in range(start, len(rule.ladder)):
        rung = rule.ladder[index]
        if used[index] >= rung.attempts:
            continue
        reason = _cannot_apply(rung, target, ctx)
        if reason:
            skipped.append((index, reason))
            continue
        return index, used[index] + 1, tuple(skipped)
    return None if not skipped else (-1, 0, tuple(skipped))


def _cannot_apply(rung: RungPolicy, target: Target, ctx: Context) -> str:
    action = named(rung.action)
    if action.needs_unit and target.unit is None:
        return f"{action.name} needs a unit; the finding names none"
    if action.name == "migrate" and not ctx.standby and not ctx.elsewhere:
        return "no healthy online node holds a standby copy of the unit"
    if action.name == "resync":
        if target.kind != "dataset_divergent" or not ctx.dataset:
            return f"resync repairs dataset replicas; a {target.kind} finding names none"
        source, why = choose_source(ctx.dataset_replicas, target=target.node, authority_root=ctx.authority_root)
        if source is None:
            return f"no resync source for {ctx.dataset}: {why}"
    stats = ctx.stats.get((target.kind, rung.action))
    if rung.min_success_rate > 0 and stats is not None:
        rate = stats.recent_rate(rung.min_tries)
        if rate is not None and rate < rung.min_success_rate:
            return (f"{rung.action} succeeded {rate:.0%} of its last {rung.min_tries} tries on {target.kind} "
                    f"(floor {rung.min_success_rate:.0%})")
    return ""


def plan_remediation(target: Target, rule: Policy, state: TargetState, ctx: Context, now: float) -> Decision:
    choice = choose_rung(rule, target, state, ctx)
    if choice is None:
        return Exhausted(f"every rung of {rule.name} was used")
    index, n, skipped = choice
    if index < 0:
        return Exhausted(f"every remaining rung of {rule.name} was skipped", skipped)
    rung = rule.ladder[index]
    action = named(rung.action)
    if not action.steps:
        return None  # "none": the rule watches, nothing acts
    attempt = ctx.incident_plans + 1
    ladder = state.ladder_attempts()
    since = ladder[-1].at if ladder else target.first_seen
    delay = backoff_delay(rung.backoff, n, f"{target.incident_id}:{attempt}")
    labels = {**target.labels, "rule": rule.name}
    checks = [
        check_silence(labels, ctx.silences, now),
        check_quarantine(state, now),
        check_max_attempts(ctx.unit_history or state, rule.max_attempts, rule.attempt_window, now),
        check_for(target.first_seen, rule.for_, now),
        check_cooldown(ctx.unit_history or state, rule.cooldown, now),
        check_backoff(since + delay, now, delay),
        check_rate_limit(ctx.rule_starts, rule.rate_limit, now),
    ]
    if action.disruptive:
        checks += [
            check_exclusive(ctx.running, target.node, target.unit),
            check_pause(ctx.paused, ctx.pause_reason),
            check_budget(budget=ctx.budget, running=ctx.running, node=target.node, unit=target.unit,
                         group=ctx.group, group_size=ctx.group_size, replicas=ctx.replicas),
        ]
    blocking = first_blocking(checks)
    if blocking is not None:
        return (Refuse if blocking.verdict == "refuse" else Hold)(tuple(checks), blocking)
    steps, verification = _steps(action, target, rule, ctx)
    plan = Plan(id=plan_id(target.incident_id, attempt), incident_id=target.incident_id, rule=rule.name,
                rule_digest=rule.digest, rung=index, attempt=attempt, steps=steps, verification=verification,
                cooldown_key=f"{target.node}/{target.unit or '-'}", mode=_mode(rule.mode, action),
                created_at=now, deadline=now + rule.approval_timeout + rule.verify_within + 120.0)
    return Propose(plan, tuple(checks), skipped)


def _mode(mode: str, action: Action) -> Mode:
    if not action.disruptive and mode == "approve":
        return "auto"  # paging a human needs no human's approval
    return "shadow" if mode == "shadow" else "approve" if mode == "approve" else "auto"


def _steps(action: Action, target: Target, rule: Policy,
           ctx: Context) -> tuple[tuple[Step, ...], Verification | None]:
    """The action's steps, and its verification on the node the unit ends up on (the target's, or the
    standby a migration moves it to)."""
    node, unit = target.node, target.unit
    steps: tuple[Step, ...]
    match action.name:
        case "restart":
            assert unit is not None  # noqa: S101 - _cannot_apply skipped unit-less rungs
            steps = (RestartUnit(node, unit),)
        case "stop_start":
            assert unit is not None  # noqa: S101 - _cannot_apply skipped unit-less rungs
            steps = (StopUnit(node, unit), StartUnit(node, unit))
        case "migrate":
            assert unit is not None  # noqa: S101 - _cannot_apply skipped unit-less rungs
            if not ctx.standby:  # another controller's node, chosen when the step runs: verified by the finding
                steps = (MigrateUnit(unit=unit, source=target.node, target=None),)
                return steps, Verification("cleared", node, None, rule.verify_within, rule.stable_for)
            node = ctx.standby[0]
            steps = (MigrateUnit(unit=unit, source=target.node, target=node),)
        case "resync":
            source, _ = choose_source(ctx.dataset_replicas, target=node, authority_root=ctx.authority_root)
            assert source is not None  # noqa: S101 - _cannot_apply skipped the rung otherwise
            steps = (ResyncDataset(node, ctx.dataset, source),)
        case "notify":
            steps = (Notify(node=node, message=target.summary, severity=_severity(target.severity)),)
        case "none":
            steps = ()
        case _:
            assert_never(action.name)
    return steps, _verification(action, rule, node, unit)


def _verification(action: Action, rule: Policy, node: str, unit: str | None) -> Verification | None:
    match action.verify:
        case "rule":
            kind: Literal["healthy", "cleared"] = "cleared" if rule.verify_kind == "cleared" else "healthy"
            return Verification(kind, node, unit, rule.verify_within, rule.stable_for)
        case "cleared":
            return Verification("cleared", node, None, rule.verify_within, rule.stable_for)
        case "escalated" | "nothing":
            return None
        case _:
            assert_never(action.verify)


def _severity(severity: str) -> Literal["info", "warning", "critical"]:
    if severity == "info":
        return "info"
    return "warning" if severity == "warning" else "critical"
