"""Effects: what the reconciler decided, applied with I/O.

``Effects.apply`` takes one effect of ``remediations.reconciler`` and does
what it says, the store first: incidents opened, relapsed, resolved or failed;
plans recorded and run (auto), parked for a human (approve) or recorded only
(shadow); holds and every guard consulted written to the incident's
hash-chained audit trail; notices (opened, action, outcome, resolved) and
alerts (escalated, failed, quarantined, approval needed, silence expired) to
the notifier. A plan runs as a task of the engine's task group
(``Effects.plans``) through the dispatcher; when it ends, its outcome goes
back to the reconciler (``finish``), and a command sent but never acked holds
the incident until it expires, so an in-flight command and a new plan can
never both act on the target.

What agents did on their own while no controller listened (``LocalAction``
events, ``agent.fallback``) is adopted first in every pass (``adopt_local``):
each restart goes into its unit's incident — opened when the unit has none —
as a ``local_action`` timeline entry and, counted on the rule's restart rung,
a plan record in state ``local`` (so a restarted controller counts it again);
the reconciler counts it as an attempt, so cooldown, backoff and
``max_attempts`` hold the controller's own restart back. A key is adopted once.

It owns the engine's view of open incidents (``incidents``), the plans
waiting for a human (``awaiting``) and the running plan tasks (``tasks``);
``controller.operations`` (approve, cancel) works on the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from controller.dispatcher import Dispatcher, PlanOutcome
from controller.fleet import Fleet
from controller.metrics import ControllerMetrics
from controller.notify import ALERT_EVENTS, Notification, Notifier, incident_labels
from controller.ownership import NotOwner, require_epoch
from controller.plan_records import plan_record, record_fields, step_fields
from controller.store import Incident, PlanRecord, Store
from remediations.plans import Plan
from remediations.reconciler import (
    Adopted,
    Effect,
    Failed,
    Held,
    Opened,
    Quarantined,
    Reconciler,
    Relapsed,
    Resolved,
    Started,
    Symptom,
)
from rules.model import Rulebook
from selfheal.clocks import Clock
from selfheal.errors import StoreError
from selfheal.logs import get_logger
from selfheal.wire import LocalAction

ADOPTABLE = frozenset({"unit_exited", "probe_failing"})
"""Finding kinds a local action is adopted under (``LocalAction.reason``); any other counts as a crash."""


class Effects:
    def __init__(self, *, fleet: Fleet, store: Store, rulebook: Rulebook, reconciler: Reconciler,
                 dispatcher: Dispatcher, clock: Clock, metrics: ControllerMetrics, notifier: Notifier,
                 recheck: Callable[[str], bool], link_base: str = "") -> None:
        self.fleet = fleet
        self.store = store
        self.rulebook = rulebook
        self.reconciler = reconciler
        self.dispatcher = dispatcher
        self.clock = clock
        self.metrics = metrics
        self.notifier = notifier
        self.recheck = recheck
        """Does the finding (by key) still hold? The dispatcher asks before acting and while verifying."""
        self.link_base = link_base.rstrip("/")
        """Base URL of the API as people reach it, for links in notifications."""
        self.incidents: dict[int, Incident] = {}
        """Open incidents by id."""
        self.awaiting: dict[str, tuple[Plan, float]] = {}
        """Plans waiting for a human: plan id → (plan, expires at)."""
        self.plans: asyncio.TaskGroup | None = None
        """Where plan tasks run (the engine's, while it runs)."""
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.unrecorded: dict[str, tuple[str, str, str]] = {}
        """Plan outcomes the store refused (the disk full): plan id -> (state, detail, the incident's node, which
        fences the write), written again each pass."""
        self.log = get_logger("engine")

    async def apply_all(self, effects: Sequence[Effect], now: float) -> None:
        """Apply a pass's effects: those of one incident in order, different incidents side by side, so a
        burst (a rack going dark opens an incident per node) shares store commits (the store group-commits
        concurrent writes). Every group runs to its end; then the first error, if any, is raised. Agents'
        local actions are adopted first."""
        await self.adopt_local(now)
        for plan_id, (state, detail, node) in list(self.unrecorded.items()):
            with contextlib.suppress(StoreError):  # still refused: kept for the next pass, and this pass goes on
                current = await self.store.get_plan(plan_id)
                try:
                    if current is not None:
                        await self.set_plan_state(current, state, detail, node=node)
                except NotOwner as exc:  # its node's bucket moved on: the new owner decided about the plan
                    self.log.warning("plan.handed_over", plan=plan_id, reason=str(exc))
                del self.unrecorded[plan_id]
        groups: dict[tuple[str, object], list[Effect]] = {}
        for effect in effects:
            key: tuple[str, object] = ("key", effect.key) if isinstance(effect, Opened) else ("id", effect.incident_id)
            groups.setdefault(key, []).append(effect)

        async def in_order(group: list[Effect]) -> None:
            for effect in group:
                await self.apply(effect, now)

        results = await asyncio.gather(*(in_order(group) for group in groups.values()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def apply(self, effect: Effect, now: float) -> None:
        if isinstance(effect, Opened):
            await self._open(effect, now)
        elif isinstance(effect, Relapsed):
            await self.audit(effect.incident_id, "relapsed", {"summary": effect.symptom.summary,
                                                               "evidence": dict(effect.symptom.evidence)})
        elif isinstance(effect, Resolved):
            await self._resolve(effect, now)
        elif isinstance(effect, Failed):
            await self._fail(effect.incident_id, effect.reason, now, checks=[c.as_dict() for c in effect.checks],
                             notify=effect.notify)
        elif isinstance(effect, Held):
            self.metrics.guard_holds.labels(effect.blocking.guard).inc()
            await self.audit(effect.incident_id, "held", {"blocking": effect.blocking.as_dict(),
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

    async def adopt_local(self, now: float) -> None:
        """Adopt the local actions the fleet queued (see the module docstring), oldest first."""
        while self.fleet.local_actions:
            node, sent_at, action = self.fleet.local_actions.popleft()
            try:
                await self._adopt(node, sent_at, action, now)
            except StoreError as exc:  # counted in memory all the same: the controller still holds back
                self.log.error("local_action.not_recorded", node=node, unit=action.unit, key=action.key,  # noqa: TRY400
                               reason=str(exc))

    async def _adopt(self, node: str, sent_at: float, action: LocalAction, now: float) -> None:
        kind = action.reason if action.reason in ADOPTABLE else "unit_exited"
        state = self.fleet.nodes.get(node)
        summary = (f"unit {action.unit} on {node}: {action.detail or kind} "
                   "(restarted by its agent while no controller listened)")
        symptom = Symptom(key=f"{kind}/{node}/{action.unit}", kind=kind, node=node, unit=action.unit,
                          severity="critical", summary=summary[:1000], evidence={"local_action": action.key},
                          labels=dict(state.labels) if state is not None else {})
        # How long ago, by the agent's own clock (action vs. sending): skew between the clocks does not enter.
        adopted = self.reconciler.adopt(symptom, f"local-{action.key}", now - max(0.0, sent_at - action.ts), now)
        if adopted is None:
            self.log.info("local_action.duplicate", node=node, unit=action.unit, key=action.key)
            return
        if adopted.opened is not None:
            await self._open(adopted.opened, now)
        incident = self.reconciler.incidents.get(adopted.key)
        if incident is None or incident.id is None:
            self.log.error("local_action.not_recorded", node=node, unit=action.unit, key=action.key,
                           reason="its incident has no id (the store did not open it)")
            return
        await self._record_local(incident.id, node, action, adopted, now)

    async def _record_local(self, incident_id: int, node: str, action: LocalAction, adopted: Adopted,
                            now: float) -> None:
        data: dict[str, object] = {
            "key": action.key, "node": node, "unit": action.unit, "action": action.action,
            "attempt": action.attempt, "reason": action.reason, "status": action.status, "detail": action.detail,
            "at": adopted.at, "plan": adopted.plan_id if adopted.rung is not None else None}
        if adopted.rung is not None and adopted.rule is not None:
            await self.store.save_plan(PlanRecord(
                id=adopted.plan_id, incident_id=incident_id, rule=adopted.rule, attempt=adopted.attempt,
                state="local", created_at=adopted.at, updated_at=now,
                detail={"result": f"{action.action} by the agent on {node} while no controller listened: "
                                  f"{action.status}", "local_action": data},
                rung=adopted.rung, action=action.action, mode="local", deadline=adopted.at))
        await self.audit(incident_id, "local_action", data)
        self.metrics.local_actions.labels(action.action, action.status).inc()
        self.log.warning("local_action.adopted", incident=incident_id, node=node, unit=action.unit,
                         attempt=action.attempt, status=action.status, counted=adopted.rung is not None,
                         key=action.key)

    async def _open(self, effect: Opened, now: float) -> None:
        symptom = effect.symptom
        rule = self.rulebook.by_name(effect.rule) if effect.rule else None
        try:
            incident = await self.store.open_incident(
                key=effect.key, kind=symptom.kind, node=symptom.node, unit=symptom.unit, severity=symptom.severity,
                summary=symptom.summary, rule=effect.rule, opened_at=now, evidence=dict(symptom.evidence),
                details={"labels": dict(symptom.labels),
                         "rule_digest": rule.digest if rule else None, "rule_source": rule.source if rule else None})
        except StoreError:
            self.reconciler.incidents.pop(effect.key, None)  # unrecorded: the next pass opens it again
            raise
        if effect.key not in self.reconciler.incidents:  # its node's bucket moved while the store answered
            self.log.info("incident.handed_over", incident=incident.id, key=effect.key)
            return
        self.incidents[incident.id] = incident
        self.reconciler.bind(effect.key, incident.id)
        self.metrics.incidents.labels(symptom.kind).inc()
        self.log.warning("incident.opened", incident=incident.id, kind=symptom.kind, node=symptom.node,
                         unit=symptom.unit, summary=symptom.summary, rule=effect.rule)
        await self.notify(incident, "opened", symptom.summary)

    async def _resolve(self, effect: Resolved, now: float) -> None:
        incident = self.incidents.pop(effect.incident_id, None)
        try:
            await self.store.set_incident_state(effect.incident_id, "resolved", at=now, reason=effect.reason)
        except StoreError:
            if incident is not None:  # unrecorded: still open, so a later pass resolves it again
                self.incidents[incident.id] = incident
            if effect.state is not None:
                self.reconciler.restore_incident(effect.state)
            raise
        if incident is None:
            return
        self.metrics.time_to_heal.labels(incident.kind).observe(max(0.0, now - incident.opened_at))
        detail = await self.store.get_incident(incident.id)
        self.log.info("incident.resolved", incident=incident.id, kind=incident.kind, node=incident.node,
                      unit=incident.unit, open_for_s=round(now - incident.opened_at, 3),
                      audit_head=detail.timeline[-1].hash if detail and detail.timeline else None)
        await self.notify(incident, "resolved", effect.reason)

    async def _fail(self, incident_id: int, reason: str, now: float, *, checks: list[dict[str, object]] | None = None,
                    event: str = "failed", notify: bool = True) -> None:
        await self.store.set_incident_state(incident_id, "failed", at=now, reason=reason)
        if checks:
            await self.audit(incident_id, "guards", {"checks": checks})
        incident = self.incidents.get(incident_id)
        self.log.error("incident.failed", incident=incident_id, reason=reason)
        if incident is not None and notify:
            await self.notify(incident, "quarantined" if event == "quarantined" else "failed", reason)

    async def notify(self, incident: Incident, event: Any, text: str, *, action: str = "", outcome: str = "",
                     cause: str = "") -> None:
        """Alerts (a human should look) are audited as ``notification``; progress (opened, action, outcome,
        resolved) as ``notice`` — the chat router writes each delivery's attempts and outcome itself.
        ``cause`` (the plan) makes the notification's key the same on any controller: sent once."""
        alert = event in ALERT_EVENTS
        node = self.fleet.nodes.get(incident.node)
        severity: Any = incident.severity if incident.severity in ("info", "warning", "critical") else "warning"
        deliveries = await self.notifier.notify(Notification(
            incident_id=incident.id, event=event, severity="critical" if alert else severity,
            title=f"{incident.kind} on {incident.node}/{incident.unit or '-'}: {event.replace('_', ' ')}",
            text=text, node=incident.node, unit=incident.unit,
            link=f"{self.link_base}/incidents/{incident.id}" if self.link_base else "",
            kind=incident.kind, summary=incident.summary, action=action, outcome=outcome, at=self.clock.wall(),
            cause=cause,
            labels=incident_labels(kind=incident.kind, node=incident.node, unit=incident.unit,
                                   severity=incident.severity, rule=incident.rule,
                                   node_labels=node.labels if node else {})))
        await self.audit(incident.id, "notification" if alert else "notice", {"event": event, "deliveries": [
            {"destination": d.destination, "outcome": d.outcome, "detail": d.detail} for d in deliveries]})

    async def _start(self, effect: Started, now: float) -> None:
        plan = effect.plan
        incident = self.incidents.get(effect.incident_id)
        try:
            await self.audit(effect.incident_id, "plan_proposed", {
                "plan": plan.id, "rule": plan.rule, "rule_digest": plan.rule_digest, "rung": plan.rung,
                "attempt": plan.attempt, "mode": plan.mode, "steps": [step_fields(s) for s in plan.steps],
                "checks": [c.as_dict() for c in effect.checks],
                "skipped_rungs": [{"rung": i, "reason": why} for i, why in effect.skipped]})
            record = plan_record(plan, "proposed", now)
            await self.store.save_plan(record)
        except StoreError:
            self.reconciler.finish(plan.id, "cancelled", now, ran=False)  # never proposed: a later pass decides again
            raise
        if incident is None or plan.id not in self.reconciler.running:  # released while the store answered
            return
        if plan.mode == "shadow":
            await self.set_plan_state(record, "cancelled", "shadow mode: recorded, not executed")
            self.reconciler.finish(plan.id, "cancelled", now, ran=False)
        elif plan.mode == "approve":
            expires = now + (rule.approval_timeout if (rule := self.rulebook.by_name(plan.rule)) else 900.0)
            record = PlanRecord(**{**record_fields(record), "detail": {**record.detail, "approval_expires": expires}})
            await self.set_plan_state(record, "awaiting_approval", f"waiting for a human until {expires:.0f}")
            self.awaiting[plan.id] = (plan, expires)
            await self.notify(incident, "approval_needed", f"plan {plan.id} ({plan.action}) awaits approval: "
                                                            f"POST /api/v1/plans/{plan.id}/approve", cause=plan.id)
        else:
            await self.launch(plan, incident, record)

    async def launch(self, plan: Plan, incident: Incident, record: PlanRecord) -> None:
        await self.set_plan_state(record, "running", "", node=incident.node)
        assert self.plans is not None  # noqa: S101 - set by run()
        self.tasks[plan.id] = self.plans.create_task(self._execute(plan, incident), name=f"plan-{plan.id}")

    async def _execute(self, plan: Plan, incident: Incident) -> None:
        async def audit(kind: str, data: dict[str, object]) -> None:
            await self.audit(incident.id, kind, {"plan": plan.id, **data})

        async def verifying() -> None:
            await self.set_plan_state(plan_record(plan, "running", self.clock.wall()), "verifying", "",
                                      node=incident.node)

        paging = plan.action == "notify"  # a notify plan's own message says it all
        try:
            if not paging:
                await self.notify(incident, "action", f"{plan.action} (rule {plan.rule}, attempt {plan.attempt})",
                                   action=plan.action, cause=plan.id)
            outcome = await self.dispatcher.execute(
                plan, incident, recheck=lambda: self.recheck(incident.key), audit=audit,
                on_verifying=verifying)
        except NotOwner as exc:  # the node's bucket moved to another controller: it takes the plan up
            self.tasks.pop(plan.id, None)
            self.log.warning("plan.handed_over", plan=plan.id, incident=incident.id, reason=str(exc))
            return
        except Exception as exc:  # a failed plan must never take the engine down
            self.log.exception("plan.crashed", plan=plan.id, incident=incident.id)
            outcome = PlanOutcome("failed", f"internal error: {exc}")
        finally:
            self.tasks.pop(plan.id, None)
        now = self.clock.wall()
        try:
            current = await self.store.get_plan(plan.id)
            if current is not None:
                await self.set_plan_state(current, outcome.outcome, outcome.detail, node=incident.node)
        except NotOwner as exc:  # the bucket moved on while the plan ran: its new owner decides, not this one
            self.log.warning("plan.handed_over", plan=plan.id, incident=incident.id, reason=str(exc),
                             outcome=outcome.outcome)
            return
        except StoreError as exc:
            self.log.error("plan.outcome_unrecorded", plan=plan.id, outcome=outcome.outcome,  # noqa: TRY400
                           error=str(exc))  # the store said why, once a minute
            self.unrecorded[plan.id] = (outcome.outcome, outcome.detail, incident.node)
        self.reconciler.finish(plan.id, outcome.outcome, now, recover_s=now - incident.opened_at)
        self.hold_for_unacked(incident, now)
        self.metrics.remediations.labels(plan.action, outcome.outcome).inc()
        self.log.info("plan.finished", plan=plan.id, incident=incident.id, outcome=outcome.outcome,
                      detail=outcome.detail)
        if not paging:
            try:
                await self.notify(incident, "outcome", outcome.detail, action=plan.action, outcome=outcome.outcome,
                                  cause=plan.id)
            except StoreError as exc:
                self.log.error("plan.notice_unrecorded", plan=plan.id, error=str(exc))  # noqa: TRY400 - it says it
        await self.fleet.notify()


    def hold_for_unacked(self, incident: Incident, now: float) -> None:
        """A command sent but never acked may still run until it expires: no new plan before then."""
        until = self.dispatcher.take_unacked(incident.id)
        if until > now:
            self.reconciler.hold_until(incident.key, until)
            self.log.warning("incident.waiting_for_command_expiry", incident=incident.id,
                             seconds=round(until - now, 1))


    async def set_plan_state(self, record: PlanRecord, state: str, detail: str, *, node: str | None = None) -> None:
        """Record a plan's new state. ``node``: the plan's incident's node; the write is then fenced by its
        bucket's epoch (``NotOwner`` when this controller no longer acts on it, here or in the store)."""
        now = self.clock.wall()
        fence = None if node is None else (node, require_epoch(self.dispatcher.ownership, node))
        await self.store.save_plan(fence=fence, plan=PlanRecord(
            id=record.id, incident_id=record.incident_id, rule=record.rule, attempt=record.attempt, state=state,
            created_at=record.created_at, updated_at=now, detail={**record.detail, "result": detail} if detail
            else record.detail, rung=record.rung, action=record.action, mode=record.mode,
            deadline=record.deadline))
        await self.audit(record.incident_id, f"plan_{state}", {"plan": record.id, "detail": detail})

    async def audit(self, incident_id: int, kind: str, data: dict[str, object]) -> None:
        await self.store.append_timeline(incident_id, at=self.clock.wall(), kind=kind, data=data)

