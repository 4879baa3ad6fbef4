"""The engine loop: fleet state → findings → the pure reconciler → effects applied with I/O.

On every fleet change the engine has ``controller.observe.Observer`` look
again at the nodes that changed (and at those a timer says are due: a node
falling silent, a job stalling), hands the findings that hold to
``remediations.reconciler.Reconciler`` and applies what it decides: incidents
opened, relapsed, resolved or failed in the store; plans recorded and run
(auto), parked for a human (approve) or recorded only (shadow); holds and
every guard consulted written to the incident's hash-chained audit trail;
notices (opened, action, outcome, resolved) and alerts (escalated, failed,
quarantined, approval needed, silence expired) to the notifier.

On start it rebuilds the reconciler's memory from the store: unresolved
incidents, recent attempts per target, quarantines, silences, the pause flag.
Plans a previous run left running are expired — their commands carry an
expiry, and the incident stays busy until the last of them has expired.
The same hold applies when a plan ends with a command sent but never acked
(ack timeout, cancellation), so an in-flight command and a new plan can never
both act on the target. Plans awaiting approval keep waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import Any

from controller.dispatcher import Dispatcher, PlanOutcome
from controller.fleet import Fleet
from controller.metrics import ControllerMetrics
from controller.notify import ALERT_EVENTS, Notification, Notifier, incident_labels
from controller.observe import Observer
from controller.plan_records import plan_from_record, plan_record, record_fields, step_fields
from controller.store import Incident, PlanRecord, SilenceRecord, SqliteStore
from detectors.anomaly.watch import AnomalyWatch
from detectors.model import DetectorSettings, Finding
from remediations.actions import action_of
from remediations.plans import (
    Plan,
    can_transition,
)
from remediations.reconciler import (
    Effect,
    Failed,
    Held,
    IncidentState,
    Opened,
    Quarantined,
    Reconciler,
    Relapsed,
    Resolved,
    Started,
    Symptom,
)
from remediations.state import Attempt, Budget, Matcher, Running, Silence
from rules.model import Rulebook
from selfheal.clocks import Clock
from selfheal.errors import SelfhealError
from selfheal.logs import get_logger


class PlanConflict(SelfhealError):
    """An approve or cancel that the plan's state does not allow."""


class Engine:
    def __init__(self, *, fleet: Fleet, store: SqliteStore, rulebook: Rulebook, dispatcher: Dispatcher,
                 clock: Clock, settings: DetectorSettings, metrics: ControllerMetrics, notifier: Notifier,
                 budget: Budget | None = None, command_ttl: float = 15.0, tick: float = 1.0,
                 link_base: str = "", anomalies: AnomalyWatch | None = None,
                 external: Callable[[float], list[Finding]] | None = None) -> None:
        self.fleet = fleet
        self.store = store
        self.rulebook = rulebook
        self.dispatcher = dispatcher
        self.clock = clock
        self.metrics = metrics
        self.notifier = notifier
        self.command_ttl = command_ttl
        self.tick = tick
        """Longest sleep between passes: a heartbeat for what has no timer (external alerts running out)."""
        self.link_base = link_base.rstrip("/")
        """Base URL of the API as people reach it, for links in notifications."""
        self.placements = dispatcher.placements
        """Where each movable singleton runs (``controller.placement``), shared with the dispatcher."""
        self.reconciler = Reconciler(rulebook, budget)
        self.observer = Observer(fleet, settings, placements=self.placements, anomalies=anomalies,
                                 external=external, group_label=self.reconciler.budget.group_label)
        fleet.on_evict = self.observer.forget
        self.incidents: dict[int, Incident] = {}
        self.awaiting: dict[str, tuple[Plan, float]] = {}
        """Plans waiting for a human: plan id → (plan, expires at)."""
        self._plans: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.errors = 0
        """Evaluations that failed (and were retried on the next pass)."""
        self._silence_reported: set[str] = set()
        self.log = get_logger("engine")

    # --- start and loop -------------------------------------------------------------------------

    async def recover(self) -> None:
        now = self.clock.wall()
        self.reconciler.paused, self.reconciler.pause_reason = await self.store.get_pause()
        await self.placements.load(self.store)
        await self._load_silences()
        window = max((rule.attempt_window for rule in self.rulebook.rules), default=0.0)
        for incident, plan in await self.store.recent_plans(since=now - window):
            action = self._action(plan)
            self.reconciler.restore_attempt(plan.rule, _symptom(incident), Attempt(plan.id, plan.rung,
                                                                                   plan.created_at, action))
        live = await self.store.commands_live_after(now, self.command_ttl)
        for incident in await self.store.unresolved_incidents():
            plans = await self.store.plans_for(incident.id)
            self.incidents[incident.id] = incident
            state = IncidentState(key=incident.key, symptom=_symptom(incident), rule=incident.rule,
                                  first_seen=incident.opened_at, id=incident.id, state=incident.state,
                                  plans=len(plans))
            self.reconciler.restore_incident(state)
            for plan in plans:
                if plan.state == "awaiting_approval":
                    self._resume_approval(plan, state)
                if plan.state in ("running", "verifying", "proposed"):
                    await self._set_plan_state(plan, "expired", "controller restarted while the plan ran")
                    if plan.id in live:  # its command may still run: no new plan before it expired
                        state.busy_until = max(state.busy_until, live[plan.id])
        for rule, target, until, _ in await self.store.list_quarantines():
            if until > now:
                self.reconciler.quarantine(rule, target, until)
        if self.reconciler.incidents:
            self.log.info("engine.recovered", unresolved=len(self.reconciler.incidents),
                          paused=self.reconciler.paused)

    def _resume_approval(self, record: PlanRecord, state: IncidentState) -> None:
        plan = plan_from_record(record)
        expires = float(record.detail.get("approval_expires", record.deadline))
        self.awaiting[plan.id] = (plan, expires)
        group = self.fleet.nodes[state.symptom.node].labels.get(self.reconciler.budget.group_label, "") \
            if state.symptom.node in self.fleet.nodes else ""
        self.reconciler.restore_running(state.key, Running(
            plan.id, plan.rule, state.symptom.node, state.symptom.unit, group,
            disruptive=action_of(plan).disruptive))

    async def run(self, *, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as plans:
            self._plans = plans
            while not stop.is_set():
                try:
                    await self.evaluate()
                except SelfhealError as exc:  # e.g. the store is locked or the disk full: retry next pass
                    self.errors += 1
                    self.log.error("engine.evaluate_failed", error=str(exc))  # noqa: TRY400 - the message is it
                sleep = min(self.tick, max(0.001, self.wake_at() - self.clock.wall()))
                with contextlib.suppress(TimeoutError):
                    async with self.fleet.changed:
                        await asyncio.wait_for(self.fleet.changed.wait(), sleep)
            for task in self._tasks.values():
                task.cancel()

    async def evaluate(self) -> None:
        for _ in range(3):  # a newly opened incident is planned in the same pass once it has its id
            now = self.clock.wall()
            await self._expire_approvals(now)
            await self._report_expired_silences(now)
            self.observer.refresh(now)
            await self.placements.save(self.store)
            effects = self.reconciler.evaluate(self.observer.symptoms, self.observer.view(), now)
            for effect in effects:
                await self._apply(effect, now)
            if not any(isinstance(e, Opened) for e in effects):
                return

    def reload(self, rulebook: Rulebook, settings: DetectorSettings, anomalies: AnomalyWatch | None) -> None:
        """New rules, detector settings or anomaly watches (SIGHUP): every node is looked at again."""
        self.rulebook = self.reconciler.rules = rulebook
        self.observer.settings = settings
        self.observer.anomalies = anomalies
        self.observer.observe_all()

    def wake_at(self) -> float:
        """When the next pass is due with no change to the fleet: a node's timer, a hold lifting, an
        approval or a silence running out."""
        return min(self.observer.next_due(), self.reconciler.wake_at,
                   min((expires for _, expires in self.awaiting.values()), default=math.inf),
                   min((s.ends_at for s in self.reconciler.silences if s.id not in self._silence_reported),
                       default=math.inf))

    def symptom_holds(self, key: str) -> bool:
        """Does the finding still hold, with every change to the fleet looked at?"""
        return self.observer.holds(key, self.clock.wall())

    # --- effects --------------------------------------------------------------------------------

    async def _apply(self, effect: Effect, now: float) -> None:
        if isinstance(effect, Opened):
            await self._open(effect, now)
        elif isinstance(effect, Relapsed):
            await self._audit(effect.incident_id, "relapsed", {"summary": effect.symptom.summary,
                                                               "evidence": dict(effect.symptom.evidence)})
        elif isinstance(effect, Resolved):
            await self._resolve(effect, now)
        elif isinstance(effect, Failed):
            await self._fail(effect.incident_id, effect.reason, now, checks=[c.as_dict() for c in effect.checks],
                             notify=effect.notify)
        elif isinstance(effect, Held):
            self.metrics.guard_holds.labels(effect.blocking.guard).inc()
            await self._audit(effect.incident_id, "held", {"blocking": effect.blocking.as_dict(),
                                                           "checks": [c.as_dict() for c in effect.checks]})
        elif isinstance(effect, Quarantined):
            await self.store.save_quarantine(effect.rule, effect.target, effect.until,
                                             f"re-fired {effect.refires} times after successful remediation")
            self.metrics.guard_holds.labels("loop_breaker").inc()
            await self._fail(effect.incident_id, f"loop breaker: {effect.target} re-fired {effect.refires} times "
                             f"soon after a successful {effect.rule}; the rule is quarantined for it until "
                             f"{effect.until:.0f}", now, event="quarantined")
        elif isinstance(effect, Started):
            await self._start(effect, now)

    async def _open(self, effect: Opened, now: float) -> None:
        symptom = effect.symptom
        rule = self.rulebook.by_name(effect.rule) if effect.rule else None
        incident = await self.store.open_incident(
            key=effect.key, kind=symptom.kind, node=symptom.node, unit=symptom.unit, severity=symptom.severity,
            summary=symptom.summary, rule=effect.rule, opened_at=now, evidence=dict(symptom.evidence),
            details={"labels": dict(symptom.labels),
                     "rule_digest": rule.digest if rule else None, "rule_source": rule.source if rule else None})
        self.incidents[incident.id] = incident
        self.reconciler.bind(effect.key, incident.id)
        self.metrics.incidents.labels(symptom.kind).inc()
        self.log.warning("incident.opened", incident=incident.id, kind=symptom.kind, node=symptom.node,
                         unit=symptom.unit, summary=symptom.summary, rule=effect.rule)
        await self._notify(incident, "opened", symptom.summary)

    async def _resolve(self, effect: Resolved, now: float) -> None:
        incident = self.incidents.pop(effect.incident_id, None)
        await self.store.set_incident_state(effect.incident_id, "resolved", at=now, reason=effect.reason)
        if incident is None:
            return
        self.metrics.time_to_heal.labels(incident.kind).observe(max(0.0, now - incident.opened_at))
        detail = await self.store.get_incident(incident.id)
        self.log.info("incident.resolved", incident=incident.id, kind=incident.kind, node=incident.node,
                      unit=incident.unit, open_for_s=round(now - incident.opened_at, 3),
                      audit_head=detail.timeline[-1].hash if detail and detail.timeline else None)
        await self._notify(incident, "resolved", effect.reason)

    async def _fail(self, incident_id: int, reason: str, now: float, *, checks: list[dict[str, object]] | None = None,
                    event: str = "failed", notify: bool = True) -> None:
        await self.store.set_incident_state(incident_id, "failed", at=now, reason=reason)
        if checks:
            await self._audit(incident_id, "guards", {"checks": checks})
        incident = self.incidents.get(incident_id)
        self.log.error("incident.failed", incident=incident_id, reason=reason)
        if incident is not None and notify:
            await self._notify(incident, "quarantined" if event == "quarantined" else "failed", reason)

    async def _notify(self, incident: Incident, event: Any, text: str, *, action: str = "", outcome: str = "") -> None:
        """Alerts (a human should look) are audited as ``notification``; progress (opened, action, outcome,
        resolved) as ``notice`` — the chat router writes each delivery's attempts and outcome itself."""
        alert = event in ALERT_EVENTS
        node = self.fleet.nodes.get(incident.node)
        severity: Any = incident.severity if incident.severity in ("info", "warning", "critical") else "warning"
        deliveries = await self.notifier.notify(Notification(
            incident_id=incident.id, event=event, severity="critical" if alert else severity,
            title=f"{incident.kind} on {incident.node}/{incident.unit or '-'}: {event.replace('_', ' ')}",
            text=text, node=incident.node, unit=incident.unit,
            link=f"{self.link_base}/incidents/{incident.id}" if self.link_base else "",
            kind=incident.kind, summary=incident.summary, action=action, outcome=outcome, at=self.clock.wall(),
            labels=incident_labels(kind=incident.kind, node=incident.node, unit=incident.unit,
                                   severity=incident.severity, rule=incident.rule,
                                   node_labels=node.labels if node else {})))
        await self._audit(incident.id, "notification" if alert else "notice", {"event": event, "deliveries": [
            {"destination": d.destination, "outcome": d.outcome, "detail": d.detail} for d in deliveries]})

    async def _start(self, effect: Started, now: float) -> None:
        plan = effect.plan
        incident = self.incidents.get(effect.incident_id)
        await self._audit(effect.incident_id, "plan_proposed", {
            "plan": plan.id, "rule": plan.rule, "rule_digest": plan.rule_digest, "rung": plan.rung,
            "attempt": plan.attempt, "mode": plan.mode, "steps": [step_fields(s) for s in plan.steps],
            "checks": [c.as_dict() for c in effect.checks],
            "skipped_rungs": [{"rung": i, "reason": why} for i, why in effect.skipped]})
        record = plan_record(plan, "proposed", now)
        await self.store.save_plan(record)
        if incident is None:
            return
        if plan.mode == "shadow":
            await self._set_plan_state(record, "cancelled", "shadow mode: recorded, not executed")
            self.reconciler.finish(plan.id, "cancelled", now, ran=False)
        elif plan.mode == "approve":
            expires = now + (rule.approval_timeout if (rule := self.rulebook.by_name(plan.rule)) else 900.0)
            record = PlanRecord(**{**record_fields(record), "detail": {**record.detail, "approval_expires": expires}})
            await self._set_plan_state(record, "awaiting_approval", f"waiting for a human until {expires:.0f}")
            self.awaiting[plan.id] = (plan, expires)
            await self._notify(incident, "approval_needed", f"plan {plan.id} ({plan.action}) awaits approval: "
                                                            f"POST /api/v1/plans/{plan.id}/approve")
        else:
            await self._launch(plan, incident, record)

    async def _launch(self, plan: Plan, incident: Incident, record: PlanRecord) -> None:
        await self._set_plan_state(record, "running", "")
        assert self._plans is not None  # noqa: S101 - set by run()
        self._tasks[plan.id] = self._plans.create_task(self._execute(plan, incident), name=f"plan-{plan.id}")

    async def _execute(self, plan: Plan, incident: Incident) -> None:
        async def audit(kind: str, data: dict[str, object]) -> None:
            await self._audit(incident.id, kind, {"plan": plan.id, **data})

        async def verifying() -> None:
            await self._set_plan_state(plan_record(plan, "running", self.clock.wall()), "verifying", "")

        paging = plan.action == "notify"  # a notify plan's own message says it all
        try:
            if not paging:
                await self._notify(incident, "action", f"{plan.action} (rule {plan.rule}, attempt {plan.attempt})",
                                   action=plan.action)
            outcome = await self.dispatcher.execute(
                plan, incident, recheck=lambda: self.symptom_holds(incident.key), audit=audit,
                on_verifying=verifying)
        except Exception as exc:  # a failed plan must never take the engine down
            self.log.exception("plan.crashed", plan=plan.id, incident=incident.id)
            outcome = PlanOutcome("failed", f"internal error: {exc}")
        finally:
            self._tasks.pop(plan.id, None)
        now = self.clock.wall()
        current = await self.store.get_plan(plan.id)
        if current is not None:
            await self._set_plan_state(current, outcome.outcome, outcome.detail)
        self.reconciler.finish(plan.id, outcome.outcome, now, recover_s=now - incident.opened_at)
        self._hold_for_unacked(incident, now)
        self.metrics.remediations.labels(plan.action, outcome.outcome).inc()
        self.log.info("plan.finished", plan=plan.id, incident=incident.id, outcome=outcome.outcome,
                      detail=outcome.detail)
        if not paging:
            await self._notify(incident, "outcome", outcome.detail, action=plan.action, outcome=outcome.outcome)
        await self.fleet.notify()

    # --- humans: approvals, cancellations, pause, silences --------------------------------------

    async def approve(self, plan_id: str, who: str) -> PlanRecord:
        record = await self._plan_for_human(plan_id, "running")
        plan, _ = self.awaiting.pop(plan_id)
        incident = self.incidents.get(plan.incident_id)
        await self._audit(plan.incident_id, "approved", {"plan": plan_id, "by": who})
        if incident is None:
            raise PlanConflict(f"plan {plan_id}'s incident is no longer open")
        await self._launch(plan, incident, record)
        return await self._plan(plan_id)

    async def cancel(self, plan_id: str, who: str) -> PlanRecord:
        record = await self._plan_for_human(plan_id, "cancelled")
        task = self._tasks.get(plan_id)
        if task is not None:
            task.cancel()
        self.awaiting.pop(plan_id, None)
        await self._audit(record.incident_id, "cancelled_by_human", {"plan": plan_id, "by": who})
        await self._set_plan_state(record, "cancelled", f"cancelled by {who}")
        self.reconciler.finish(plan_id, "cancelled", self.clock.wall())
        incident = self.incidents.get(record.incident_id)
        if incident is not None:
            self._hold_for_unacked(incident, self.clock.wall())
        return await self._plan(plan_id)

    def _hold_for_unacked(self, incident: Incident, now: float) -> None:
        """A command sent but never acked may still run until it expires: no new plan before then."""
        until = self.dispatcher.take_unacked(incident.id)
        if until > now:
            self.reconciler.hold_until(incident.key, until)
            self.log.warning("incident.waiting_for_command_expiry", incident=incident.id,
                             seconds=round(until - now, 1))

    async def _plan_for_human(self, plan_id: str, new: str) -> PlanRecord:
        record = await self._plan(plan_id)
        if not can_transition(record.state, new) or (new == "running" and plan_id not in self.awaiting):
            raise PlanConflict(f"plan {plan_id} is {record.state}; it cannot become {new}")
        return record

    async def _plan(self, plan_id: str) -> PlanRecord:
        record = await self.store.get_plan(plan_id)
        if record is None:
            raise KeyError(plan_id)
        return record

    async def set_pause(self, paused: bool, reason: str, who: str) -> None:
        await self.store.set_pause(paused, reason)
        self.reconciler.paused, self.reconciler.pause_reason = paused, reason
        self.log.warning("engine.paused" if paused else "engine.resumed", reason=reason, by=who)
        await self.fleet.notify()

    async def add_silence(self, silence: SilenceRecord) -> None:
        await self.store.save_silence(silence)
        await self._load_silences()
        await self.fleet.notify()

    async def _load_silences(self) -> None:
        # Silences that ended over an hour ago can no longer mute or be reported: keep memory bounded.
        horizon = self.clock.wall() - 3600.0
        silences = [s for s in await self.store.list_silences() if s.ends_at > horizon]
        self._silence_reported &= {s.id for s in silences}
        self.reconciler.silences = [
            Silence(s.id, tuple(Matcher(m["name"], m["value"]) for m in s.matchers), s.starts_at, s.ends_at,
                    s.comment, s.author) for s in silences]

    async def _report_expired_silences(self, now: float) -> None:
        """A silence that ends while a problem it muted is still open is reported, once."""
        for silence in self.reconciler.silences:
            if silence.ends_at > now or silence.id in self._silence_reported or now - silence.ends_at > 3600:
                continue
            self._silence_reported.add(silence.id)
            for state in list(self.reconciler.incidents.values()):
                labels = {"kind": state.symptom.kind, "node": state.symptom.node, "unit": state.symptom.unit or "",
                          "severity": state.symptom.severity, "rule": state.rule or "", **state.symptom.labels}
                incident = self.incidents.get(state.id or -1)
                if incident is not None and silence.matches(labels):
                    await self._audit(incident.id, "silence_expired", {"silence": silence.id})
                    await self._notify(incident, "silence_expired",
                                       f"silence {silence.id} ended while this incident is still open")

    async def _expire_approvals(self, now: float) -> None:
        for plan_id, (_plan, expires) in list(self.awaiting.items()):
            if expires <= now:
                del self.awaiting[plan_id]
                record = await self.store.get_plan(plan_id)
                if record is not None:
                    await self._set_plan_state(record, "expired", "no human approved it in time")
                self.reconciler.finish(plan_id, "expired", now, ran=False)

    # --- bookkeeping ----------------------------------------------------------------------------

    async def _set_plan_state(self, record: PlanRecord, state: str, detail: str) -> None:
        now = self.clock.wall()
        await self.store.save_plan(PlanRecord(
            id=record.id, incident_id=record.incident_id, rule=record.rule, attempt=record.attempt, state=state,
            created_at=record.created_at, updated_at=now, detail={**record.detail, "result": detail} if detail
            else record.detail, rung=record.rung, action=record.action, mode=record.mode,
            deadline=record.deadline))
        await self._audit(record.incident_id, f"plan_{state}", {"plan": record.id, "detail": detail})

    async def _audit(self, incident_id: int, kind: str, data: dict[str, object]) -> None:
        await self.store.append_timeline(incident_id, at=self.clock.wall(), kind=kind, data=data)

    def _action(self, plan: PlanRecord) -> str:
        rule = self.rulebook.by_name(plan.rule)
        if rule is not None and 0 <= plan.rung < len(rule.ladder):
            return rule.ladder[plan.rung].action
        return plan.action

    def open_count(self) -> int:
        return len(self.reconciler.incidents)

    def stats(self) -> list[dict[str, object]]:
        return [{"kind": kind, "action": action, **stats.summary()}
                for (kind, action), stats in sorted(self.reconciler.stats.items())]


def _symptom(incident: Incident) -> Symptom:
    return Symptom(key=incident.key, kind=incident.kind, node=incident.node, unit=incident.unit,
                   severity=incident.severity, summary=incident.summary)
