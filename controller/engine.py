"""The engine loop: fleet state → findings → incidents → plans.

Level-triggered, like a reconciler: on every fleet change (and on a short
tick, for time-based conditions such as silence and cooldowns) it runs the
detectors over every node and reconciles:

- a finding with no unresolved incident opens one (in the store first);
- an open incident whose finding holds and that has no plan running asks
  the planner, which answers with a plan, a hold (a guard says not yet) or a
  refusal (the incident is marked ``failed`` and left to a human);
- an incident whose finding stayed clear for the rule's ``resolve_after``,
  with no plan running, is resolved; a relapse inside that window continues
  the same incident.

Attempts are counted per target (node/unit) over the rule's attempt window,
across incidents, so a flapping unit cannot restart forever on fresh budgets.

Incidents of a node that is offline are left as they are: its units' states
are stale, so neither healing nor "cleared" can be trusted.
On start, plans left ``running`` by a previous controller are expired (their
commands carry an expiry, so no agent runs them late) and counted as attempts.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from dataclasses import dataclass

from controller.dispatcher import Dispatcher, PlanOutcome
from controller.fleet import Fleet
from controller.metrics import ControllerMetrics
from controller.store import Incident, PlanRecord, SqliteStore
from detectors.model import DetectorSettings, Finding
from detectors.presence import is_offline
from detectors.registry import detect_node
from remediations.guards import Hold, Refuse
from remediations.planner import plan_remediation
from remediations.plans import Plan
from rules.model import Rulebook
from selfheal.clocks import Clock
from selfheal.logs import get_logger


@dataclass
class _Tracked:
    incident: Incident
    plans: int = 0
    """Plans this incident has run (they number the next plan)."""
    last_hold: str = ""
    cleared_since: float | None = None

    @property
    def target(self) -> str:
        return f"{self.incident.node}/{self.incident.unit or '-'}"


MAX_ATTEMPTS_KEPT = 100
"""Attempt times remembered per target (far above any sane max_attempts)."""


class Engine:
    def __init__(self, *, fleet: Fleet, store: SqliteStore, rulebook: Rulebook, dispatcher: Dispatcher,
                 clock: Clock, settings: DetectorSettings, metrics: ControllerMetrics,
                 max_concurrent_plans: int = 16, tick: float = 0.25) -> None:
        self.fleet = fleet
        self.store = store
        self.rulebook = rulebook
        self.dispatcher = dispatcher
        self.clock = clock
        self.settings = settings
        self.metrics = metrics
        self.max_concurrent_plans = max_concurrent_plans
        self.tick = tick
        self.tracked: dict[str, _Tracked] = {}
        self.attempts: dict[str, deque[float]] = {}
        """Start times of recent attempts per target (node/unit), across incidents."""
        self.running: dict[str, asyncio.Task[None]] = {}
        self.log = get_logger("engine")

    async def recover(self) -> None:
        """Reload unresolved incidents; expire plans a previous run left running."""
        now = self.clock.wall()
        window = max((rule.attempt_window for rule in self.rulebook.rules), default=0.0)
        for node, unit, at in await self.store.recent_attempts(since=now - window):
            self._attempts(f"{node}/{unit or '-'}").append(at)
        for incident in await self.store.unresolved_incidents():
            tracked = _Tracked(incident)
            for plan in await self.store.plans_for(incident.id):
                tracked.plans += 1
                if plan.state == "running":
                    await self.store.save_plan(PlanRecord(
                        id=plan.id, incident_id=plan.incident_id, rule=plan.rule, attempt=plan.attempt,
                        state="expired", created_at=plan.created_at, updated_at=now,
                        detail={**plan.detail, "result": "controller restarted while the plan ran"}))
                    await self.store.append_timeline(incident.id, at=now, kind="plan_expired",
                                                     data={"plan": plan.id, "reason": "controller restarted"})
            self.tracked[incident.key] = tracked
        if self.tracked:
            self.log.info("engine.recovered", unresolved=len(self.tracked))

    async def run(self, *, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as plans:
            while not stop.is_set():
                await self.evaluate(plans)
                try:
                    async with self.fleet.changed:
                        await asyncio.wait_for(self.fleet.changed.wait(), self.tick)
                except TimeoutError:
                    pass
            for task in self.running.values():
                task.cancel()

    async def evaluate(self, plans: asyncio.TaskGroup) -> None:
        now = self.clock.wall()
        findings: dict[str, Finding] = {}
        offline: set[str] = set()
        for node_id in list(self.fleet.nodes):
            snapshot = self.fleet.snapshot(node_id)
            if snapshot is None:
                continue
            if is_offline(snapshot, now, self.settings.offline_after):
                offline.add(node_id)
            for finding in detect_node(snapshot, now, self.settings):
                findings[finding.key] = finding
        for key, finding in findings.items():
            if key not in self.tracked:
                await self._open(finding, now)
        for key, tracked in list(self.tracked.items()):
            if key in self.running:
                continue
            current = findings.get(key)
            incident = tracked.incident
            if current is None:
                if incident.kind == "node_offline" or incident.node not in offline:
                    await self._maybe_resolve(tracked, now)
                continue
            tracked.cleared_since = None
            if incident.state == "open":
                await self._decide(tracked, current, now, plans)

    async def _open(self, finding: Finding, now: float) -> None:
        rule = self.rulebook.rule_for(finding.kind, finding.severity)
        incident = await self.store.open_incident(
            key=finding.key, kind=finding.kind, node=finding.node, unit=finding.unit,
            severity=finding.severity, summary=finding.summary, rule=rule.name if rule else None,
            opened_at=now, evidence=finding.evidence)
        self.tracked[finding.key] = _Tracked(incident)
        self.metrics.incidents.labels(finding.kind).inc()
        self.log.warning("incident.opened", incident=incident.id, kind=finding.kind, node=finding.node,
                         unit=finding.unit, summary=finding.summary, rule=rule.name if rule else None)

    async def _maybe_resolve(self, tracked: _Tracked, now: float) -> None:
        incident = tracked.incident
        rule = self.rulebook.rule_for(incident.kind, incident.severity)
        if tracked.cleared_since is None:
            tracked.cleared_since = now
        clear_for = now - tracked.cleared_since
        if rule is not None and clear_for < rule.resolve_after:
            return
        await self.store.set_incident_state(incident.id, "resolved", at=now,
                                            reason=f"symptom cleared and stayed clear for {clear_for:.1f}s")
        del self.tracked[incident.key]
        if tracked.plans or incident.kind == "node_offline":
            self.metrics.time_to_heal.labels(incident.kind).observe(max(0.0, now - incident.opened_at))
        self.log.info("incident.resolved", incident=incident.id, kind=incident.kind, node=incident.node,
                      unit=incident.unit, open_for_s=round(now - incident.opened_at, 3))

    async def _decide(self, tracked: _Tracked, finding: Finding, now: float,
                      plans: asyncio.TaskGroup) -> None:
        incident = tracked.incident
        rule = self.rulebook.rule_for(finding.kind, finding.severity)
        if rule is None:
            return
        history = self._attempts(tracked.target)
        recent = [at for at in history if at > now - rule.attempt_window]
        decision = plan_remediation(incident_id=incident.id, node=incident.node, unit=incident.unit,
                                    rule=rule, attempts=recent, incident_plans=tracked.plans, now=now)
        if decision is None:
            return
        if isinstance(decision, Refuse):
            await self._fail(tracked, f"{decision.guard}: {decision.reason}", now)
            self.metrics.guard_holds.labels(decision.guard).inc()
            return
        if isinstance(decision, Hold):
            await self._hold(tracked, decision, now)
            return
        if len(self.running) >= self.max_concurrent_plans:
            await self._hold(tracked, Hold("concurrency", f"{len(self.running)} plans already running",
                                           now), now)
            return
        history.append(now)
        tracked.plans += 1
        tracked.last_hold = ""
        self.running[incident.key] = plans.create_task(self._execute(decision, tracked),
                                                       name=f"plan-{decision.id}")

    async def _execute(self, plan: Plan, tracked: _Tracked) -> None:
        incident = tracked.incident
        try:
            outcome = await self.dispatcher.execute(plan, incident)
        except Exception as exc:  # a failed plan must never take the engine down
            self.log.exception("plan.crashed", plan=plan.id, incident=incident.id)
            outcome = PlanOutcome("failed", f"internal error: {exc}")
        finally:
            self.running.pop(incident.key, None)
        self.metrics.remediations.labels(plan.steps[0].kind, outcome.outcome).inc()
        self.log.info("plan.finished", plan=plan.id, incident=incident.id, outcome=outcome.outcome,
                      detail=outcome.detail)
        await self.fleet.notify()

    async def _hold(self, tracked: _Tracked, hold: Hold, now: float) -> None:
        if tracked.last_hold == hold.guard:
            return  # recorded once per guard, not once per tick
        tracked.last_hold = hold.guard
        self.metrics.guard_holds.labels(hold.guard).inc()
        await self.store.append_timeline(tracked.incident.id, at=now, kind="held", data={
            "guard": hold.guard, "reason": hold.reason, "until": hold.until})

    async def _fail(self, tracked: _Tracked, reason: str, now: float) -> None:
        incident = tracked.incident
        await self.store.set_incident_state(incident.id, "failed", at=now, reason=reason)
        tracked.incident = dataclasses.replace(incident, state="failed")
        self.log.error("incident.failed", incident=incident.id, node=incident.node, unit=incident.unit,
                       reason=reason)

    def _attempts(self, target: str) -> deque[float]:
        history = self.attempts.get(target)
        if history is None:
            if len(self.attempts) >= 100_000:  # bounded: forget the target attempted longest ago
                oldest = min(self.attempts, key=lambda t: self.attempts[t][-1] if self.attempts[t] else 0.0)
                del self.attempts[oldest]
            history = self.attempts[target] = deque(maxlen=MAX_ATTEMPTS_KEPT)
        return history

    def open_count(self) -> int:
        return len(self.tracked)

