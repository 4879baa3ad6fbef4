"""The engine loop: fleet state → findings → the pure reconciler → effects applied with I/O.

Four parts, each in its own module:

- observation (``controller.observe``): on every fleet change the observer
  looks again at the nodes that changed, and at those a timer says are due
  (a node falling silent, a job stalling), and keeps the findings that hold
  and the fleet view up to date — never a walk over the whole fleet;
- decision (``remediations.reconciler``, pure): findings and time in,
  effects out;
- effects (``controller.effects``): each effect applied with I/O — store,
  audit trail, dispatcher, notifier;
- human operations (``controller.operations``): approve, cancel, pause,
  silences, and the approvals and silences that run out.

The engine runs one pass per wake-up: after a change to the fleet, or at the
earliest instant time alone could change something (``wake_at``: a node's
timer, a hold lifting, an approval or silence running out), at most ``tick``
apart.

On start it rebuilds the reconciler's memory from the store: unresolved
incidents, recent attempts per target, quarantines, silences, the pause flag.
Plans a previous run left running are expired — their commands carry an
expiry, and the incident stays busy until the last of them has expired.
Plans awaiting approval keep waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Sequence

from controller.dispatcher import Dispatcher
from controller.effects import Effects
from controller.fleet import Fleet
from controller.metrics import ControllerMetrics
from controller.notify import Notifier
from controller.observe import Observer
from controller.operations import Operations
from controller.plan_records import plan_from_record
from controller.shared_replicas import SharedReplicas
from controller.store import Incident, PlanRecord, Store
from detectors.anomaly.watch import AnomalyWatch
from detectors.model import DetectorSettings, Finding
from remediations.actions import action_of
from remediations.reconciler import (
    IncidentState,
    Opened,
    Reconciler,
    Symptom,
    memory_horizon,
)
from remediations.state import Attempt, Budget, Running
from rules.model import Rulebook
from selfheal.clocks import Clock
from selfheal.errors import ConfigError, SelfhealError, StoreError
from selfheal.logs import get_logger


class Engine:
    def __init__(self, *, fleet: Fleet, store: Store, rulebook: Rulebook, dispatcher: Dispatcher,
                 clock: Clock, settings: DetectorSettings, metrics: ControllerMetrics, notifier: Notifier,
                 budget: Budget | None = None, command_ttl: float = 15.0, tick: float = 1.0,
                 link_base: str = "", anomalies: AnomalyWatch | None = None,
                 external: Callable[[float], list[Finding]] | None = None,
                 listening: Callable[[], bool] = lambda: True, shared: SharedReplicas | None = None) -> None:
        self.fleet = fleet
        self.store = store
        self.rulebook = rulebook
        self.dispatcher = dispatcher
        self.clock = clock
        self.command_ttl = command_ttl
        self.tick = tick
        self.listening = listening
        """Whether the broker connection is up: while it is not, the engine decides nothing (the fleet's
        silence is the controller's own deafness), and silence counts again from the reconnection
        (``Fleet.listening_since``)."""
        """Longest sleep between passes: a heartbeat for what has no timer (external alerts running out)."""
        self.placements = dispatcher.placements
        """Where each movable singleton runs (``controller.placement``), shared with the dispatcher."""
        self.reconciler = Reconciler(rulebook, budget)
        self.observer = Observer(fleet, settings, placements=self.placements, anomalies=anomalies,
                                 external=external, group_label=self.reconciler.budget.group_label,
                                 owns=dispatcher.ownership.owns, elsewhere=dispatcher.ownership.partial,
                                 shared=shared)
        fleet.on_evict = self.observer.forget
        dispatcher.resync.replicas_of = self.observer.replicas_of
        self.effects = Effects(fleet=fleet, store=store, rulebook=rulebook, reconciler=self.reconciler,
                               dispatcher=dispatcher, clock=clock, metrics=metrics, notifier=notifier,
                               recheck=self.symptom_holds, link_base=link_base)
        self.operations = Operations(effects=self.effects, reconciler=self.reconciler, store=store, fleet=fleet,
                                     clock=clock, owns=dispatcher.ownership.owns)
        self.approve = self.operations.approve
        self.cancel = self.operations.cancel
        self.set_pause = self.operations.set_pause
        self.add_silence = self.operations.add_silence
        self.errors = 0
        """Evaluations that failed (and were retried on the next pass)."""
        self._last_failure: tuple[str, float, int] = ("", -math.inf, 0)
        """(error, when it was last logged, passes failed since): the log is rate-limited."""
        self.log = get_logger("engine")

    # --- start and loop -------------------------------------------------------------------------

    async def recover(self, mine: Callable[[str], bool] = lambda node: True) -> None:
        """At start: the pause flag, placements, silences, and the work on the nodes ``mine`` names."""
        self.reconciler.paused, self.reconciler.pause_reason = await self.store.get_pause()
        await self.placements.load(self.store)
        await self.operations.load_silences()
        await self.adopt(mine)

    async def adopt(self, mine: Callable[[str], bool]) -> None:
        """Take up, from the store, the work on the nodes ``mine`` names: at start, or when this controller
        gained their buckets (another one stopped, left or gave them up). Exactly what a restart does."""
        now = self.clock.wall()
        self._restore_attempts(await self.store.recent_plans(since=now - memory_horizon(self.rulebook.rules)), mine)
        live = await self.store.commands_live_after(now, self.command_ttl)
        for incident in await self.store.unresolved_incidents():
            if not mine(incident.node) or incident.key in self.reconciler.incidents:
                continue
            plans = await self.store.plans_for(incident.id)
            self.effects.incidents[incident.id] = incident
            state = IncidentState(key=incident.key, symptom=_symptom(incident), rule=incident.rule,
                                  first_seen=incident.opened_at, id=incident.id, state=incident.state,
                                  plans=len(plans))
            self.reconciler.restore_incident(state)
            for plan in plans:
                if plan.state == "awaiting_approval":
                    self._resume_approval(plan, state)
                if plan.state in ("running", "verifying", "proposed"):
                    await self.effects.set_plan_state(plan, "expired", "controller restarted while the plan ran",
                                                      node=incident.node)
                    if plan.id in live:  # its command may still run: no new plan before it expired
                        state.busy_until = max(state.busy_until, live[plan.id])
        for rule, target, until, _ in await self.store.list_quarantines():
            if until > now and mine(target.rsplit("/", 1)[0]):
                self.reconciler.quarantine(rule, target, until)
        if self.reconciler.incidents:
            self.log.info("engine.recovered", unresolved=len(self.reconciler.incidents),
                          paused=self.reconciler.paused)

    def release(self, gone: Callable[[str], bool]) -> None:
        """Stop acting on the nodes ``gone`` names (their bucket went to another controller): their plans'
        tasks are cancelled with nothing more written, and their incidents leave this controller's memory.
        The store keeps them; the new owner takes them up (``adopt``)."""
        plans = self.reconciler.forget(gone)
        for plan_id in plans:
            self.effects.awaiting.pop(plan_id, None)
            task = self.effects.tasks.pop(plan_id, None)
            if task is not None:
                task.cancel()
        for incident_id in [i for i, incident in self.effects.incidents.items() if gone(incident.node)]:
            del self.effects.incidents[incident_id]
        if self.observer.shared is not None:
            self.observer.shared.release(gone)
        if plans:
            self.log.info("engine.released", plans=sorted(plans))

    def _resume_approval(self, record: PlanRecord, state: IncidentState) -> None:
        plan = plan_from_record(record)
        expires = float(record.detail.get("approval_expires", record.deadline))
        self.effects.awaiting[plan.id] = (plan, expires)
        group = self.fleet.nodes[state.symptom.node].labels.get(self.reconciler.budget.group_label, "") \
            if state.symptom.node in self.fleet.nodes else ""
        self.reconciler.restore_running(state.key, Running(
            plan.id, plan.rule, state.symptom.node, state.symptom.unit, group,
            disruptive=action_of(plan).disruptive))

    async def run(self, *, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as plans:
            self.effects.plans = plans
            while not stop.is_set():
                try:
                    if self.listening():
                        await self.evaluate()
                except SelfhealError as exc:  # e.g. the store is locked or the disk full: retry next pass
                    self._failed(str(exc))
                sleep = min(self.tick, max(0.001, self.wake_at() - self.clock.wall()))
                with contextlib.suppress(TimeoutError):
                    async with self.fleet.changed:
                        await asyncio.wait_for(self.fleet.changed.wait(), sleep)
            for task in self.effects.tasks.values():
                task.cancel()

    async def evaluate(self) -> None:
        for _ in range(3):  # a newly opened incident is planned in the same pass once it has its id
            now = self.clock.wall()
            await self.operations.expire_approvals(now)
            await self.operations.report_expired_silences(now)
            self.observer.refresh(now)
            await self.placements.save(self.store)
            effects = self.reconciler.evaluate(self.observer.symptoms, self.observer.view(), now)
            await self.effects.apply_all(effects, now)
            if not any(isinstance(e, Opened) for e in effects):
                return

    def _failed(self, error: str) -> None:
        """Count a failed pass; log it when the error is new, else once a minute (a full disk fails every pass)."""
        self.errors += 1
        now = self.clock.monotonic()
        last, logged_at, since = self._last_failure
        if error != last or now - logged_at >= 60.0:
            self.log.error("engine.evaluate_failed", error=error, failed_passes_since_last_log=since)
            self._last_failure = (error, now, 0)
        else:
            self._last_failure = (last, logged_at, since + 1)

    def _restore_attempts(self, plans: Sequence[tuple[Incident, PlanRecord]], mine: Callable[[str], bool], *,
                          count_start: bool = True) -> None:
        for incident, plan in plans:
            if mine(incident.node):
                self.reconciler.restore_attempt(plan.rule, _symptom(incident),
                                                Attempt(plan.id, plan.rung, plan.created_at, self._action(plan)),
                                                count_start=count_start)

    async def attempts_for(self, rulebook: Rulebook) -> list[tuple[Incident, PlanRecord]]:
        """Before a reload: the plans whose attempts ``rulebook``'s rules count and the reconciler may have
        forgotten (it keeps a unit's attempts only while the current rules can count them): those within its
        windows when they are wider than the current rules', else none. Raises ``ConfigError`` when the store
        cannot be read: the reload is then refused, not applied with attempts uncounted."""
        if memory_horizon(rulebook.rules) <= memory_horizon(self.rulebook.rules):
            return []
        try:
            return await self.store.recent_plans(since=self.clock.wall() - memory_horizon(rulebook.rules))
        except StoreError as exc:
            raise ConfigError(f"the new rules count attempts further back, and the store cannot be read: {exc}") \
                from exc

    def reload(self, rulebook: Rulebook, settings: DetectorSettings, anomalies: AnomalyWatch | None,
               attempts: Sequence[tuple[Incident, PlanRecord]] = ()) -> None:
        """New rules, detector settings or anomaly watches (SIGHUP): every node is looked at again.
        ``attempts`` (``attempts_for``) are counted again with the new rules, as a restart would."""
        self.rulebook = self.effects.rulebook = self.reconciler.rules = rulebook
        self._restore_attempts(attempts, self.dispatcher.ownership.owns, count_start=False)
        self.observer.settings = settings
        self.observer.anomalies = anomalies
        self.observer.observe_all()

    def wake_at(self) -> float:
        """When the next pass is due with no change to the fleet: a node's timer, a hold lifting, an
        approval or a silence running out."""
        return min(self.observer.next_due(), self.reconciler.wake_at,
                   min((expires for _, expires in self.effects.awaiting.values()), default=math.inf),
                   min((s.ends_at for s in self.reconciler.silences if s.id not in self.operations.silence_reported),
                       default=math.inf))

    def symptom_holds(self, key: str) -> bool:
        """Does the finding still hold, with every change to the fleet looked at?"""
        return self.observer.holds(key, self.clock.wall())

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

