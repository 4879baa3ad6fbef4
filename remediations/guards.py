"""Guards: pure checks that say whether a plan may start now, and if not, why and until when.

Each guard returns a ``Check``. ``allow`` passes; ``hold`` means not now (try
again at ``until``, or on the next change when ``until`` is None); ``refuse``
means never for this incident (it fails and is left to a human). The planner
consults them in a fixed order and records every check it made, so the audit
trail shows not only what blocked a plan but everything that was weighed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from remediations.state import Budget, Running, Silence, TargetState

Verdict = Literal["allow", "hold", "refuse"]


@dataclass(frozen=True, slots=True)
class Check:
    guard: str
    verdict: Verdict
    reason: str = ""
    until: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {"guard": self.guard, "verdict": self.verdict, "reason": self.reason, "until": self.until}


def _allow(guard: str) -> Check:
    return Check(guard, "allow")


def check_pause(paused: bool, reason: str = "") -> Check:
    """A global pause stops every new disruptive plan (notifications still go out)."""
    if paused:
        return Check("pause", "hold", f"remediation is paused fleet-wide{': ' + reason if reason else ''}")
    return _allow("pause")


def check_silence(labels: dict[str, str], silences: Iterable[Silence], now: float) -> Check:
    for silence in silences:
        if silence.active(now) and silence.matches(labels):
            return Check("silence", "hold", f"silenced by {silence.id} until {silence.ends_at:.0f}"
                                            f"{': ' + silence.comment if silence.comment else ''}", silence.ends_at)
    return _allow("silence")


def check_quarantine(target: TargetState, now: float) -> Check:
    if target.quarantined_until > now:
        return Check("quarantine", "hold", "the loop breaker quarantined this rule for this target",
                     target.quarantined_until)
    return _allow("quarantine")


def check_max_attempts(target: TargetState, max_attempts: int, window: float, now: float) -> Check:
    recent = sum(1 for a in target.attempts if a.at > now - window)
    if recent >= max_attempts:
        return Check("max_attempts", "refuse",
                     f"{recent} attempts on this target in the last {window:g}s; the rule allows {max_attempts}")
    return _allow("max_attempts")


def check_for(first_seen: float, for_: float, now: float) -> Check:
    if now - first_seen < for_:
        return Check("for", "hold", f"the finding must hold for {for_:g}s", first_seen + for_)
    return _allow("for")


def check_cooldown(target: TargetState, cooldown: float, now: float) -> Check:
    last = target.last_attempt_at()
    if last is not None and now < last + cooldown:
        return Check("cooldown", "hold", f"last attempt {now - last:.1f}s ago; cooldown {cooldown:g}s",
                     last + cooldown)
    return _allow("cooldown")


def check_backoff(not_before: float, now: float, delay: float) -> Check:
    if now < not_before:
        return Check("backoff", "hold", f"backing off {delay:.1f}s before the next attempt", not_before)
    return _allow("backoff")


def check_rate_limit(rule_starts: Sequence[float], limit: tuple[int, float], now: float) -> Check:
    count, per = limit
    recent = [at for at in rule_starts if at > now - per]
    if len(recent) >= count:
        return Check("rate_limit", "hold", f"{len(recent)} plans of this rule in the last {per:g}s (limit {count})",
                     min(recent) + per)
    return _allow("rate_limit")


def check_exclusive(running: Iterable[Running], node: str, unit: str | None) -> Check:
    """One disruptive plan per unit at a time, whichever rule started it."""
    for other in running:
        if other.disruptive and other.node == node and other.unit == unit:
            return Check("exclusive", "hold", f"plan {other.plan_id} of rule {other.rule} is already acting on "
                                              f"{node}/{unit or '-'}")
    return _allow("exclusive")


def check_budget(*, budget: Budget, running: Iterable[Running], node: str, unit: str | None, group: str,
                 group_size: int, replicas: int) -> Check:
    """Fleet disruption budget: concurrent plans, share of a group's nodes, share of a unit's replicas."""
    disruptive = [r for r in running if r.disruptive]
    if len(disruptive) >= budget.max_concurrent:
        return Check("budget", "hold", f"{len(disruptive)} disruptive plans running (max {budget.max_concurrent})")
    nodes_in_group = {r.node for r in disruptive if r.group == group} | {node}
    allowed_nodes = max(1, math.floor(budget.max_node_share * group_size))
    if len(nodes_in_group) > allowed_nodes:
        return Check("budget", "hold", f"{len(nodes_in_group)} of {group_size} nodes in group {group!r} would be "
                                       f"under remediation (max {allowed_nodes})")
    if unit is not None:
        nodes_of_unit = {r.node for r in disruptive if r.unit == unit} | {node}
        allowed_replicas = max(1, math.floor(budget.max_replica_share * replicas))
        if len(nodes_of_unit) > allowed_replicas:
            return Check("budget", "hold", f"{len(nodes_of_unit)} of {replicas} replicas of {unit!r} would be under "
                                           f"remediation (max {allowed_replicas})")
    return _allow("budget")


def first_blocking(checks: Sequence[Check]) -> Check | None:
    """The first refusal, else the first hold, else None."""
    return next((c for c in checks if c.verdict == "refuse"), None) or next(
        (c for c in checks if c.verdict == "hold"), None)
