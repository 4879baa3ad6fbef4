"""The reconciler: the whole decision engine as one pure state machine.

``evaluate(symptoms, fleet, now)`` takes the findings that hold now and
returns effects — incidents to open, relapse, resolve or fail, plans to start,
holds to record, loop-breaker quarantines — and updates the engine's memory.
``bind`` gives a newly opened incident its store id; ``finish`` reports a
plan's outcome; ``adopt`` takes in a restart an agent made on its own while
no controller listened. The controller applies the effects with I/O (store, dispatch,
alerts); tests and ``bench/engine.py`` drive this class directly, with time
passed in.

Safety properties it keeps (property-tested): at most one plan per incident at
a time; never more disruptive plans than the budget; never two plans on a
target inside its cooldown; never more than ``max_attempts`` per window; an
incident on an offline node is neither healed nor resolved on stale data.

Time only goes forward. The controller's clock takes the system clock's steps
out (``selfheal.clocks``), but a ``now`` earlier than one already seen can
still come — a controller restarted after its clock went back finds its
stored attempts in the future: then every instant in memory moves back with
it (``_rebase``), so a cooldown, a backoff or a quarantine keeps the time it
had left instead of growing by the step. A jump forward cannot be told from a
long pause; what it lifts at once is bounded by the rule's rate limit and the
disruption budget, which count plans, not time.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from remediations.actions import action_of
from remediations.guards import Check
from remediations.planner import (
    Context,
    Exhausted,
    Hold,
    Propose,
    Refuse,
    Replica,
    Target,
    plan_remediation,
)
from remediations.plans import Plan
from remediations.policy import Policy
from remediations.state import Attempt, Budget, OutcomeStats, Running, Silence, TargetState

MAX_TARGETS = 100_000
"""Targets remembered at most; idle ones are forgotten long before (``Reconciler._forget_idle``)."""
MAX_ADOPTED = 10_000
"""Agents' local actions remembered as adopted (``Reconciler.adopt``), newest kept."""
OUT_OF_ORDER = 1.0
"""Seconds: a ``now`` earlier than the latest seen by less is one clock read out of order (a pass's ``now``
given after a plan's task read the clock again), not the clock going back."""


def memory_horizon(rules: Sequence[Policy]) -> float:
    """How long any rule reads a unit's past attempts (its ``attempt_window`` and ``cooldown``): what a
    restart restores, and how long an idle target is kept."""
    return max((max(r.attempt_window, r.cooldown) for r in rules), default=0.0)


class RuleLookup(Protocol):
    @property
    def rules(self) -> Sequence[Policy]: ...
    def rule_for(self, kind: str, severity: str, labels: dict[str, str] | None = None) -> Policy | None: ...
    def by_name(self, name: str) -> Policy | None: ...


ABOUT_OFFLINE_NODES = frozenset({"node_offline", "unit_lost"})
"""Finding kinds that are about a node being offline, so they can clear while it still is (a lost
unit clears once another node runs it)."""


@dataclass(frozen=True, slots=True)
class Symptom:
    key: str
    kind: str
    node: str
    unit: str | None
    severity: str
    summary: str
    evidence: Mapping[str, object] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FleetView:
    offline: frozenset[str] = frozenset()
    groups: Mapping[str, str] = field(default_factory=dict)
    """node → group label value."""
    group_sizes: Mapping[str, int] = field(default_factory=dict)
    """group label value → its nodes (counted from ``groups`` when left empty)."""
    replicas: Mapping[str, int] = field(default_factory=dict)
    """unit name → nodes that run a copy."""
    standby: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """unit name → online nodes holding a stopped copy (migration candidates)."""
    elsewhere: bool = False
    """Other controllers act on part of the fleet (their nodes are not in this view)."""
    datasets: Mapping[str, tuple[Replica, ...]] = field(default_factory=dict)
    """dataset name → every replica (``in_incident`` is filled in here, from the open incidents)."""


@dataclass
class IncidentState:
    key: str
    symptom: Symptom
    rule: str | None
    first_seen: float
    id: int | None = None
    state: str = "open"
    cleared_since: float | None = None
    plans: int = 0
    running_plan: str | None = None
    last_hold: str = ""
    busy_until: float = 0.0
    """Left alone until then: a previous controller's command for it may still be executed."""


# --- effects ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Opened:
    key: str
    symptom: Symptom
    rule: str | None


@dataclass(frozen=True, slots=True)
class Relapsed:
    incident_id: int
    symptom: Symptom


@dataclass(frozen=True, slots=True)
class Resolved:
    incident_id: int
    reason: str
    state: IncidentState | None = field(default=None, compare=False, repr=False)
    """The incident as the reconciler knew it, to restore should the resolution not be recorded."""


@dataclass(frozen=True, slots=True)
class Failed:
    incident_id: int
    reason: str
    checks: tuple[Check, ...] = ()
    notify: bool = True
    """False when a human was already paged by the ladder's notify rung: one alert, not two."""


@dataclass(frozen=True, slots=True)
class Started:
    incident_id: int
    plan: Plan
    checks: tuple[Check, ...]
    skipped: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Held:
    incident_id: int
    checks: tuple[Check, ...]
    blocking: Check


@dataclass(frozen=True, slots=True)
class Quarantined:
    incident_id: int
    rule: str
    target: str
    until: float
    refires: int


Effect = Opened | Relapsed | Resolved | Failed | Started | Held | Quarantined


@dataclass(frozen=True, slots=True)
class Adopted:
    """A restart an agent made on its own, taken into the unit's incident (``Reconciler.adopt``)."""

    key: str
    """The incident's key."""
    plan_id: str
    rule: str | None
    rung: int | None
    """The rule's restart rung the attempt was counted on (None: not counted — no rule, no restart rung,
    or older than the rule's ``attempt_window``)."""
    attempt: int
    """The incident's plan number it took (0: not counted, none taken)."""
    at: float
    opened: Opened | None
    """The incident opened for it, when the unit had none."""


class Reconciler:
    def __init__(self, rules: RuleLookup, budget: Budget | None = None) -> None:
        self.rules = rules
        self.budget = budget or Budget()
        self.incidents: dict[str, IncidentState] = {}
        self.targets: dict[tuple[str, str], TargetState] = {}
        self.running: dict[str, Running] = {}
        self.plan_incident: dict[str, str] = {}
        self.rule_starts: dict[str, deque[float]] = {}
        self.stats: dict[tuple[str, str], OutcomeStats] = {}
        self.silences: list[Silence] = []
        self.paused = False
        self.pause_reason = ""
        self._resetting: set[tuple[str, str]] = set()
        self.unit_rules: dict[str, set[str]] = {}
        """node/unit → rules that have a history for it (to merge their attempts cheaply)."""
        self._idle: list[tuple[float, int, tuple[str, str], TargetState]] = []
        """Heap of (when it may be forgotten, tie-break, key, target) of idle targets, one entry per target;
        rechecked when due."""
        self._tie = itertools.count()
        self._adopted: dict[str, None] = {}
        """Plan ids of agents' local actions adopted so far (bounded, oldest forgotten first)."""
        self._latest = -math.inf
        """The latest instant seen (``now`` given, or restored from the store): time never goes back before it."""
        self.wake_at = math.inf
        """After ``evaluate``: the earliest time at which time alone could change one of its decisions (a
        hold, cooldown or backoff lifting, a cleared incident resolving, a ladder resetting); the engine
        evaluates again then. Holds without an end (pause, budget, another plan) lift on a change."""

    # --- inputs ---------------------------------------------------------------------------------

    def evaluate(self, symptoms: Mapping[str, Symptom], fleet: FleetView, now: float) -> list[Effect]:
        effects: list[Effect] = []
        self.wake_at = math.inf
        self._advance(now)
        for key, symptom in symptoms.items():
            incident = self.incidents.get(key)
            if incident is None:
                rule = self._rule(symptom)
                self.incidents[key] = IncidentState(key, symptom, rule.name if rule else None, first_seen=now)
                effects.append(Opened(key, symptom, rule.name if rule else None))
                self._note_refire(symptom, rule, now)
                continue
            incident.symptom = symptom
            if incident.cleared_since is not None:
                incident.cleared_since = None
                if incident.id is not None:
                    effects.append(Relapsed(incident.id, symptom))
                self._note_refire(symptom, self._rule(symptom), now)
        unhealthy = {i.symptom.node for i in self.incidents.values()}
        group_sizes = fleet.group_sizes or Counter(fleet.groups.values())
        for key, incident in list(self.incidents.items()):
            if incident.busy_until > now:
                self._wake(incident.busy_until)
            if incident.id is None or incident.running_plan is not None or incident.busy_until > now:
                continue
            if key not in symptoms:
                effects.extend(self._clear(incident, fleet, now))
            elif incident.state == "open":
                effects.extend(self._decide(incident, fleet, unhealthy, group_sizes, now))
        self._reset_ladders(symptoms, now)
        self._forget_idle(now)
        return effects

    def bind(self, key: str, incident_id: int) -> None:
        self.incidents[key].id = incident_id

    def finish(self, plan_id: str, outcome: str, now: float, *, recover_s: float | None = None,
               ran: bool = True) -> None:
        """A plan ended: ``succeeded``, ``failed``, ``escalated``, ``cancelled`` or ``expired``.

        ``ran=False`` for plans that never acted (an approval that expired, shadow mode): they do not
        count in the success statistics that rungs' floors read."""
        self._advance(now)
        self.running.pop(plan_id, None)
        key = self.plan_incident.pop(plan_id, None)
        incident = self.incidents.get(key) if key else None
        if incident is None or incident.running_plan != plan_id:
            return
        incident.running_plan = None
        rule = self.rules.by_name(incident.rule) if incident.rule else None
        if rule is None:
            return
        target = self._target(rule.name, incident.symptom)
        action = next((a.action for a in reversed(target.attempts) if a.plan_id == plan_id), "")
        if ran and outcome in ("succeeded", "failed", "expired") and action:
            self.stats.setdefault((incident.symptom.kind, action), OutcomeStats()).record(
                outcome == "succeeded", recover_s)
        if outcome == "succeeded":
            target.last_success = now

    def restore_attempt(self, rule: str, symptom: Symptom, attempt: Attempt, *, count_start: bool = True) -> None:
        """Replay a plan from the store into the target's history (controller start, a bucket gained, a reload
        that widened a rule's windows); a plan the target holds already is left as it is. ``count_start=False``:
        the rule's start rate already counted it."""
        self._latest = max(self._latest, attempt.at)
        key = (rule, f"{symptom.node}/{symptom.unit or '-'}")
        new = key not in self.targets
        target = self._target(rule, symptom)
        if any(a.plan_id == attempt.plan_id for a in target.attempts):
            return
        if target.attempts and target.attempts[-1].at > attempt.at:
            target.attempts = deque(sorted([*target.attempts, attempt], key=lambda a: a.at),
                                    maxlen=target.attempts.maxlen)
        else:
            target.attempts.append(attempt)
        if new:  # no incident uses it (yet): forgotten in due course unless one does
            self._note_idle(key, target)
        if count_start:
            self.rule_starts.setdefault(rule, deque(maxlen=10_000)).append(attempt.at)

    def hold_until(self, key: str, until: float) -> None:
        """Leave an incident alone until ``until`` (a command of its last plan may still be executed)."""
        incident = self.incidents.get(key)
        if incident is not None:
            incident.busy_until = max(incident.busy_until, until)

    def quarantine(self, rule: str, target: str, until: float) -> None:
        """Restore a loop-breaker quarantine (``target`` is ``node/unit``)."""
        state = self.targets.get((rule, target))
        if state is None:
            state = self.targets[(rule, target)] = TargetState()
            self.unit_rules.setdefault(target, set()).add(rule)
            self._note_idle((rule, target), state)  # forgotten after the quarantine unless an incident uses it
        state.quarantined_until = max(state.quarantined_until, until)

    def restore_running(self, key: str, running: Running) -> None:
        """Re-register a plan that survives a controller restart (one awaiting approval)."""
        self.running[running.plan_id] = running
        self.plan_incident[running.plan_id] = key
        if key in self.incidents:
            self.incidents[key].running_plan = running.plan_id

    def forget(self, gone: Callable[[str], bool]) -> list[str]:
        """Drop what is held about the nodes ``gone`` names — their incidents, plans and attempt histories —
        because another controller acts on them now (their bucket moved) and reads them from the store.
        Returns the ids of their plans that were running or awaiting approval."""
        plans = [plan_id for plan_id, running in self.running.items() if gone(running.node)]
        for plan_id in plans:
            del self.running[plan_id]
            self.plan_incident.pop(plan_id, None)
        for key in [key for key, incident in self.incidents.items() if gone(incident.symptom.node)]:
            del self.incidents[key]
        for target_key in [k for k in self.targets if gone(k[1].rsplit("/", 1)[0])]:
            self._drop(target_key)
        return plans

    def restore_incident(self, incident: IncidentState) -> None:
        self._latest = max(self._latest, incident.first_seen)
        self.incidents[incident.key] = incident
        if incident.rule is not None:
            self._target(incident.rule, incident.symptom)  # in use: not idle until its ladder resets

    def adopt(self, symptom: Symptom, plan_id: str, at: float, now: float) -> Adopted | None:
        """A restart of ``symptom``'s unit that its agent made at ``at`` while no controller listened
        (``wire.LocalAction``): recorded in the unit's incident for ``symptom.key`` (opened when there is
        none) and counted as an attempt on the rule's restart rung — cooldown, backoff, ``max_attempts``
        and the ladder then see it, so the controller does not restart the unit again at once. None when
        ``plan_id`` was adopted already (a replay; attempts restored from the store count too)."""
        self._advance(now)
        target_key = f"{symptom.node}/{symptom.unit or '-'}"
        if plan_id in self._adopted or any(a.plan_id == plan_id for a in self._unit_history(target_key).attempts):
            return None
        self._adopted[plan_id] = None
        while len(self._adopted) > MAX_ADOPTED:
            del self._adopted[next(iter(self._adopted))]
        at = min(at, now)
        incident, opened = self.incidents.get(symptom.key), None
        if incident is None:
            rule = self._rule(symptom)
            incident = self.incidents[symptom.key] = IncidentState(symptom.key, symptom, rule.name if rule else None,
                                                                   first_seen=at)
            opened = Opened(symptom.key, symptom, incident.rule)
        policy = self.rules.by_name(incident.rule) if incident.rule else None
        rung = next((i for i, r in enumerate(policy.ladder) if r.action == "restart"), None) if policy else None
        if policy is None or rung is None or at <= now - policy.attempt_window:
            return Adopted(symptom.key, plan_id, incident.rule, None, 0, at, opened)
        incident.plans += 1  # it takes a plan number: the engine stores it as a plan
        target = self._target(policy.name, incident.symptom)
        target.attempts = deque(sorted([*target.attempts, Attempt(plan_id, rung, at, "restart")],
                                       key=lambda a: a.at), maxlen=target.attempts.maxlen)
        return Adopted(symptom.key, plan_id, incident.rule, rung, incident.plans, at, opened)

    # --- internals ------------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if now < self._latest - OUT_OF_ORDER:
            self._rebase(now - self._latest)
            self._latest = now
        else:
            self._latest = max(self._latest, now)

    def _rebase(self, delta: float) -> None:
        """The clock went back by at least ``-delta``: move every remembered instant back with it, so what
        had elapsed stays elapsed and what had to wait waits no longer than it had left. Deadlines set
        from outside stay put — ``busy_until`` (an agent may run a command until it expires, by its own
        clock) and silences (set by people): waiting longer is the safe side."""
        for incident in self.incidents.values():
            incident.first_seen += delta
            if incident.cleared_since is not None:
                incident.cleared_since += delta
        for target in self.targets.values():
            target.attempts = deque((replace(a, at=a.at + delta) for a in target.attempts),
                                    maxlen=target.attempts.maxlen)
            target.refires = deque((at + delta for at in target.refires), maxlen=target.refires.maxlen)
            target.ladder_from += delta
            target.quarantined_until += delta
            if target.healthy_since is not None:
                target.healthy_since += delta
            if target.last_success is not None:
                target.last_success += delta
        for rule, starts in self.rule_starts.items():
            self.rule_starts[rule] = deque((at + delta for at in starts), maxlen=starts.maxlen)
        self._idle = [(at + delta, tie, key, t) for at, tie, key, t in self._idle]  # the same shift: still a heap

    def _wake(self, at: float | None) -> None:
        if at is not None:
            self.wake_at = min(self.wake_at, at)

    def _rule(self, symptom: Symptom) -> Policy | None:
        labels = {"kind": symptom.kind, "node": symptom.node, "unit": symptom.unit or "",
                  "severity": symptom.severity, **symptom.labels}
        return self.rules.rule_for(symptom.kind, symptom.severity, labels)

    def _target(self, rule: str, symptom: Symptom) -> TargetState:
        """The (rule, node/unit) history an incident uses: created when new, no longer idle."""
        key = (rule, f"{symptom.node}/{symptom.unit or '-'}")
        target = self.targets.get(key)
        if target is None:
            if len(self.targets) >= MAX_TARGETS:  # bounded: forget the target attempted longest ago
                self._drop(min(self.targets, key=lambda k: self.targets[k].last_attempt_at() or 0.0))
            target = self.targets[key] = TargetState()
            self.unit_rules.setdefault(key[1], set()).add(rule)
        target.idle = False
        return target

    def _drop(self, key: tuple[str, str]) -> None:
        del self.targets[key]
        rules = self.unit_rules.get(key[1])
        if rules is not None:
            rules.discard(key[0])
            if not rules:
                del self.unit_rules[key[1]]

    def _note_idle(self, key: tuple[str, str], target: TargetState) -> None:
        target.idle = True
        if not target.queued:
            target.queued = True
            heapq.heappush(self._idle, (self._forget_at(target), next(self._tie), key, target))

    def _forget_at(self, target: TargetState) -> float:
        """When nothing an idle target remembers can count in a decision: its attempts older than every rule's
        ``attempt_window`` and ``cooldown`` (any rule on the unit reads them), its last success older than every
        loop breaker's ``within``, its quarantine over (plus ``OUT_OF_ORDER``: a ``now`` read a little earlier
        may still come). A controller restarted then would not restore it either."""
        rules = self.rules.rules
        within = max((r.loop_breaker.within for r in rules), default=0.0)
        last = target.last_attempt_at()
        return OUT_OF_ORDER + max(-math.inf if last is None else last + memory_horizon(rules),
                                  -math.inf if target.last_success is None else target.last_success + within,
                                  target.quarantined_until)

    def _forget_idle(self, now: float) -> None:
        """Forget the idle targets that came due: what is remembered stays bounded by what happened within the
        rules' windows, not by every unit that ever failed. Amortised: each is looked at when due, no sweep."""
        while self._idle and self._idle[0][0] < now:
            _, _, key, target = heapq.heappop(self._idle)
            target.queued = False
            if self.targets.get(key) is not target or not target.idle:
                continue  # forgotten already, or used again (its next ladder reset queues it again)
            due = self._forget_at(target)
            if due >= now:  # remembered longer since it was queued (a restored attempt, a widened window)
                target.queued = True
                heapq.heappush(self._idle, (due, next(self._tie), key, target))
            else:
                self._drop(key)

    def _unit_history(self, target_key: str) -> TargetState:
        """Every rule's attempts on one node/unit, merged in time order."""
        states = [self.targets[(rule, target_key)] for rule in self.unit_rules.get(target_key, ())
                  if (rule, target_key) in self.targets]
        if len(states) == 1:
            return states[0]
        merged = sorted((a for state in states for a in state.attempts), key=lambda a: a.at)
        history = TargetState()
        history.attempts.extend(merged[-history.attempts.maxlen:] if history.attempts.maxlen else merged)
        return history

    def _note_refire(self, symptom: Symptom, rule: Policy | None, now: float) -> None:
        if rule is None:
            return
        target = self._target(rule.name, symptom)
        target.healthy_since = None
        if target.last_success is not None and now - target.last_success <= rule.loop_breaker.within:
            target.refires.append(now)

    def _clear(self, incident: IncidentState, fleet: FleetView, now: float) -> list[Effect]:
        symptom = incident.symptom
        if symptom.node in fleet.offline and symptom.kind not in ABOUT_OFFLINE_NODES:
            return []  # its node's state is stale: neither healed nor cleared
        if incident.cleared_since is None:
            incident.cleared_since = now
        rule = self.rules.by_name(incident.rule) if incident.rule else None
        if rule is not None:
            target = self._target(rule.name, symptom)
            if target.healthy_since is None:
                target.healthy_since = incident.cleared_since
            self._resetting.add((rule.name, f"{symptom.node}/{symptom.unit or '-'}"))
        if rule is not None and now - incident.cleared_since < rule.resolve_after:
            self._wake(incident.cleared_since + rule.resolve_after)
            return []
        del self.incidents[incident.key]
        assert incident.id is not None  # noqa: S101 - only bound incidents reach here
        return [Resolved(incident.id, f"symptom cleared and stayed clear for {now - incident.cleared_since:.1f}s",
                         incident)]

    def _reset_ladders(self, symptoms: Mapping[str, Symptom], now: float) -> None:
        for key in list(self._resetting):
            target = self.targets.get(key)
            rule = self.rules.by_name(key[0])
            if target is None or rule is None or target.healthy_since is None:
                self._resetting.discard(key)
            elif now - target.healthy_since >= rule.reset_after:
                target.ladder_from = now
                target.refires.clear()
                target.healthy_since = None
                self._resetting.discard(key)
                self._note_idle(key, target)
            else:
                self._wake(target.healthy_since + rule.reset_after)

    def _decide(self, incident: IncidentState, fleet: FleetView, unhealthy: set[str], group_sizes: Mapping[str, int],
                now: float) -> list[Effect]:
        assert incident.id is not None  # noqa: S101 - only bound incidents are decided
        rule = self.rules.by_name(incident.rule) if incident.rule else None
        if rule is None:
            return []
        symptom = incident.symptom
        target_key = f"{symptom.node}/{symptom.unit or '-'}"
        target = self._target(rule.name, symptom)
        breaker = rule.loop_breaker
        recent_refires = [r for r in target.refires if r >= target.ladder_from]
        if len(recent_refires) >= breaker.refires and target.quarantined_until <= now:
            target.quarantined_until = now + breaker.quarantine_for
            target.refires.clear()
            incident.state = "failed"
            return [Quarantined(incident.id, rule.name, target_key, target.quarantined_until, len(recent_refires))]
        group = fleet.groups.get(symptom.node, "")
        standby = tuple(n for n in fleet.standby.get(symptom.unit or "", ())
                        if n != symptom.node and n not in fleet.offline and n not in unhealthy)
        ctx = Context(
            incident_plans=incident.plans, running=tuple(self.running.values()), budget=self.budget,
            group=group, group_size=max(1, group_sizes.get(group, 1)),
            replicas=max(1, fleet.replicas.get(symptom.unit or "", 1)), standby=standby, elsewhere=fleet.elsewhere,
            rule_starts=self.rule_starts.get(rule.name, ()), paused=self.paused,
            pause_reason=self.pause_reason, silences=tuple(self.silences), stats=self.stats,
            unit_history=self._unit_history(target_key))
        if isinstance(dataset := symptom.evidence.get("dataset"), str):
            ctx = replace(ctx, **_dataset_context(dataset, symptom, fleet, unhealthy))
        labels = {"kind": symptom.kind, "node": symptom.node, "unit": symptom.unit or "",
                  "severity": symptom.severity, "group": group, **symptom.labels}
        decision = plan_remediation(
            Target(incident.id, incident.key, symptom.kind, symptom.node, symptom.unit, symptom.severity,
                   symptom.summary, labels, incident.first_seen), rule, target, ctx, now)
        if decision is None:
            return []
        if isinstance(decision, Exhausted):
            incident.state = "failed"
            paged = any(a.action == "notify" for a in target.ladder_attempts())
            return [Failed(incident.id, f"ladder exhausted: {decision.reason}; left to a human", notify=not paged)]
        if isinstance(decision, Refuse):
            incident.state = "failed"
            return [Failed(incident.id, f"{decision.blocking.guard}: {decision.blocking.reason}", decision.checks)]
        if isinstance(decision, Hold):
            self._wake(decision.blocking.until)
            blocking = decision.blocking.guard
            if blocking == incident.last_hold:
                return []  # recorded once per blocking guard, not once per tick
            incident.last_hold = blocking
            return [Held(incident.id, decision.checks, decision.blocking)]
        assert isinstance(decision, Propose)  # noqa: S101 - closed set
        plan = decision.plan
        action = rule.ladder[plan.rung].action
        incident.plans += 1
        incident.running_plan = plan.id
        incident.last_hold = ""
        target.attempts.append(Attempt(plan.id, plan.rung, now, action))
        self.rule_starts.setdefault(rule.name, deque(maxlen=10_000)).append(now)
        self.running[plan.id] = Running(plan.id, rule.name, symptom.node, symptom.unit, group,
                                        disruptive=action_of(plan).disruptive)
        self.plan_incident[plan.id] = incident.key
        return [Started(incident.id, plan, decision.checks, decision.skipped)]


def _dataset_context(dataset: str, symptom: Symptom, fleet: FleetView, unhealthy: set[str]) -> dict[str, Any]:
    """Dataset findings: the dataset, the authority's root and the replicas that could serve a resync."""
    root = symptom.evidence.get("authority_root")
    replicas = tuple(Replica(r.node, r.root, r.state, r.online and r.node not in fleet.offline,
                             r.node in unhealthy) for r in fleet.datasets.get(dataset, ()))
    return {"dataset": dataset, "authority_root": root if isinstance(root, str) else "",
            "dataset_replicas": replicas}
