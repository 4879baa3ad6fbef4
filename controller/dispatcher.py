"""The dispatcher: runs one plan — signed commands out, acks in, then verification.

For each agent-side step it derives the idempotency key, records the command
in the store *before* publishing it (so a restarted controller can never
issue the same key twice; a command the store cannot record, the disk full,
is not sent and its step fails), signs it with the node's key, publishes it on the
node's ``commands`` topic and waits for the agent's ack. Just before a plan
whose action disrupts (``remediations.actions``) acts, it re-checks the
symptom: a plan whose symptom cleared is cancelled, not executed. Every step
of the closed ``plans.Step`` union has its branch (mypy checks that none is
missing). Migration is orchestrated here, never leaving two
copies running: stop on the source when it is reachable; when it is not, only
a movable singleton moves, and only once its node has been silent for the
unit's ``fence_after`` (by then its agent has stopped it, or it died with the
agent: ``agent.fencing``) and never less than the controller's own
``fence_floor`` — ``fence_after`` comes from the node's reports, which may
lengthen the wait but never shorten it below the floor; then start on the
target, unless some other node already runs the unit. A source that comes back
during that wait is asked again: if it runs the unit (the finding no longer
holds: a network blip, or a replayed last will), the step ends without
stopping or starting anything (``fence_aborted``/``source_returned``, plan
cancelled); if not, it is stopped there by command before the start.
Then it verifies the target (healthy, or the finding cleared) within the
deadline and for the stable period. Every step lands in the audit trail.
With several controllers, "some other node" includes every other
controller's nodes (asked; one that does not answer stops the start), and the
target may be a standby copy on a node another controller acts on, which that
controller starts (``controller.elsewhere``).
"""

from __future__ import annotations

import asyncio
import math
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, assert_never

from controller.datasets import Localisations
from controller.elsewhere import MIGRATE_START, Elsewhere, start_key
from controller.fleet import Fleet, unit_is_healthy
from controller.notify import Notification, Notifier, incident_labels
from controller.ownership import ALL_BUCKETS, Ownership, require_epoch
from controller.placement import Placements
from controller.resync import ResyncPlanner
from controller.store import Incident, Store
from detectors.placement import runners
from detectors.presence import is_offline
from remediations.actions import action_of, unit_command
from remediations.plans import (
    MigrateUnit,
    Notify,
    Plan,
    RestartUnit,
    ResyncDataset,
    StartUnit,
    Step,
    StopUnit,
    Verification,
    idempotency_key,
)
from selfheal import wire
from selfheal.clocks import Clock
from selfheal.errors import PermanentRemediationError, RemediationError, StoreError
from selfheal.logs import get_logger
from selfheal.mqtt import MqttLink

Outcome = Literal["succeeded", "failed", "escalated", "cancelled"]
KeyLookup = Callable[[str], bytes | None]
Recheck = Callable[[], bool]
Audit = Callable[[str, dict[str, object]], Awaitable[None]]
FENCE_FLOOR = 20.0
"""``controller.fence_floor``'s default: seconds of silence before a standby copy may start, at least."""
FORWARD_SLACK = 5.0
"""Seconds beyond the ack timeout another controller has to answer a start it was asked for."""
RESYNC_ACK_TIMEOUT = 600.0
"""Seconds to wait for an agent to finish one resync command (it acks when the repair is done)."""


class SourceReturned(Exception):
    """A migration's source came back during the fence wait and runs the unit again: the step ends, nothing
    stopped or started (the plan is cancelled, so the incident resolves once the finding clears)."""


@dataclass(frozen=True, slots=True)
class PlanOutcome:
    outcome: Outcome
    detail: str


class Dispatcher:
    def __init__(self, *, fleet: Fleet, store: Store, link: MqttLink, keys: KeyLookup, clock: Clock,
                 notifier: Notifier, ownership: Ownership, command_ttl: float, ack_timeout: float,
                 localisations: Localisations | None = None, resync: ResyncPlanner | None = None,
                 offline_after: float = 5.0, placements: Placements | None = None,
                 peer_tls: ssl.SSLContext | bool = True, fence_floor: float = FENCE_FLOOR) -> None:
        self.fleet = fleet
        self.fence_floor = fence_floor
        """Seconds an unreachable node must have been silent before its movable units start elsewhere, at
        least (``controller.fence_floor``); a unit's reported ``fence_after`` may only lengthen it."""
        self.placements = placements or Placements()
        self.started_at = clock.wall()
        self.offline_after = offline_after
        self.store = store
        self.link = link
        self.keys = keys
        self.clock = clock
        self.notifier = notifier
        self.ownership = ownership
        """Which nodes this controller acts on, under which epoch (``controller.ownership``)."""
        self.command_ttl = command_ttl
        self.ack_timeout = ack_timeout
        self._pending: dict[str, tuple[str, asyncio.Future[wire.CommandResult]]] = {}
        self._unacked: dict[int, float] = {}
        self.localisations = localisations or Localisations()
        self.resync = resync or ResyncPlanner(fleet=fleet, keys=keys, clock=clock, localisations=self.localisations,
                                              verify=peer_tls)
        self.elsewhere: Elsewhere | None = None
        """The other controllers, asked for a migration's other copies and targets (several controllers with an
        API token: ``controller.elsewhere``)."""
        self.log = get_logger("dispatcher")

    def on_result(self, node: str, result: wire.CommandResult) -> None:
        """An agent's ack; unknown ids (e.g. for a command of a previous controller run) and acks from any
        node but the one the command went to are ignored."""
        pending = self._pending.get(result.command_id)
        if pending is None or pending[0] != node:
            return
        if not pending[1].done():
            pending[1].set_result(result)

    def take_unacked(self, incident_id: int) -> float:
        """The latest expiry of this incident's commands that were sent but never acked (0 if none).

        An agent may still execute such a command until it expires, so the engine must not start another
        plan on the target before then — or a timed-out restart and the next one would both run."""
        return self._unacked.pop(incident_id, 0.0)

    async def execute(self, plan: Plan, incident: Incident, *, recheck: Recheck, audit: Audit,
                      on_verifying: Callable[[], Awaitable[None]]) -> PlanOutcome:
        log = self.log.bind(incident=incident.id, plan=plan.id, node=incident.node, unit=incident.unit)
        before = (self.fleet.unit(plan.verification.node, plan.verification.unit)
                  if plan.verification and plan.verification.unit else None)
        action = action_of(plan)
        for index, step in enumerate(plan.steps):
            if index == 0 and action.disruptive:
                if not recheck():
                    await audit("rechecked", {"step": step.kind, "symptom": "cleared"})
                    return PlanOutcome("cancelled", f"the symptom cleared before {step.kind}; nothing was done")
                await audit("rechecked", {"step": step.kind, "symptom": "still present"})
            try:
                await self._run_step(plan, incident, index, step, audit, recheck)
            except SourceReturned as exc:
                return PlanOutcome("cancelled", str(exc))
            except RemediationError as exc:
                log.warning("plan.step_failed", step=step.kind, reason=str(exc))
                return PlanOutcome("failed", str(exc))
        if action.verify == "escalated":
            return PlanOutcome("escalated", "a human was notified; selfheal leaves this incident alone")
        if plan.verification is None:
            return PlanOutcome("succeeded", "done")
        await on_verifying()
        return await self._verify(plan.verification, before, recheck, audit)

    async def _run_step(self, plan: Plan, incident: Incident, index: int, step: Step, audit: Audit,  # noqa: PLR0917
                        recheck: Recheck) -> None:
        if isinstance(step, RestartUnit | StopUnit | StartUnit):
            await self._command(plan, incident, index, step.node, unit_command(step), audit=audit)
        elif isinstance(step, MigrateUnit):
            await self._second_copy_or_target(step, final=False)
            if not self._reachable(step.source) and await self._await_fence(step, audit):
                if not recheck():  # back, and running the unit again (a network blip, a replayed will)
                    await audit("fence_aborted", {"node": step.source, "unit": step.unit,
                                                  "reason": "source_returned"})
                    raise SourceReturned(f"{step.source} came back running {step.unit}: nothing was moved")
                await audit("fence_aborted", {"node": step.source, "unit": step.unit,
                                              "reason": "the node came back without the unit: stopping it there"})
            target, controller = await self._second_copy_or_target(step)  # known before anything is stopped
            if self._reachable(step.source):
                await self._command(plan, incident, index, step.source, wire.StopUnit(unit=step.unit), audit=audit)
                target, controller = await self._second_copy_or_target(step)  # and again after that took its time
            start = index + MIGRATE_START
            if controller is None:  # keyed without the node: one start per step, whichever node, here or elsewhere
                await self._command(plan, incident, start, target, wire.StartUnit(unit=step.unit), audit=audit,
                                    key=start_key(step.unit, incident.id, start, plan.attempt))
            else:
                await self._start_elsewhere(plan, incident, start, step.unit, target, controller, audit)
        elif isinstance(step, Notify):
            node = self.fleet.nodes.get(incident.node)
            deliveries = await self.notifier.notify(Notification(
                incident_id=incident.id, event="escalated", severity=step.severity,
                title=f"selfheal gave up on {incident.node}/{incident.unit or '-'}: a human is needed",
                text=step.message, node=incident.node, unit=incident.unit, kind=incident.kind,
                summary=incident.summary, at=self.clock.wall(), cause=f"{plan.id}/{index}",
                labels=incident_labels(kind=incident.kind, node=incident.node, unit=incident.unit,
                                       severity=incident.severity, rule=incident.rule,
                                       node_labels=node.labels if node else {})))
            await audit("notification", {"event": "escalated", "deliveries": [
                {"destination": d.destination, "outcome": d.outcome, "detail": d.detail} for d in deliveries]})
        elif isinstance(step, ResyncDataset):
            prepared = await self.resync.prepare(step, audit)
            for n, command in enumerate(prepared.commands):
                await self._command(plan, incident, index + 1000 * (n + 1), step.node, command, audit=audit,
                                    timeout=max(self.ack_timeout, RESYNC_ACK_TIMEOUT))
        else:
            assert_never(step)

    def _session(self, node: str) -> int:
        state = self.fleet.nodes.get(node)
        return state.session if state is not None else 0

    def _reachable(self, node: str) -> bool:
        snapshot = self.fleet.snapshot(node)
        return snapshot is not None and not is_offline(snapshot, self.clock.wall(), self.offline_after)

    def _back(self, node: str) -> bool:
        """Reachable, and it has said on its new connection what runs there: its first word back (its
        ``online``) comes before the report that tells whether its agent fenced the unit meanwhile."""
        snapshot = self.fleet.snapshot(node)
        return snapshot is not None and snapshot.confirmed and self._reachable(node)

    async def _second_copy_or_target(self, step: MigrateUnit, *, final: bool = True) -> tuple[str, str | None]:
        """Refuse when a node other than the source runs the unit — this controller's or, with several, any
        other's (asked: one that does not answer makes it unknown, and nothing starts); else the node to
        start it on, and the other controller that acts on it (None: this one). Not ``final`` (before the
        fence wait): an unknown answer is let pass, the wait gives it time, and the start asks again."""
        snapshots, offline = self.fleet.snapshots(self.clock.wall(), self.offline_after)
        here = [n for n in runners(step.unit, snapshots.values(), offline, unconfirmed=True) if n != step.source]
        self._refuse_second(step, here)
        if not self.ownership.partial():
            if step.target is None:
                raise PermanentRemediationError(f"no healthy online node holds a standby copy of {step.unit}")
            return step.target, None
        if self.elsewhere is None:
            raise PermanentRemediationError(
                f"other controllers act on part of the fleet and this one cannot ask them whether {step.unit} "
                "runs on their nodes (no API token: security.api_token_file): nothing started")
        try:
            copies = await self.elsewhere.copies(step.unit)
        except RemediationError:
            if final:
                raise
            return step.target or "", None  # not known yet: the start asks again
        unknown = ALL_BUCKETS - self.ownership.settled(self.offline_after) - copies.buckets
        if unknown:
            if final:
                raise RemediationError(f"cannot tell whether {step.unit} runs in bucket(s) {_ranges(unknown)}: "
                                       "no controller has heard from their nodes long enough; nothing started")
            return step.target or "", None
        self._refuse_second(step, sorted(n for n in copies.runners if n != step.source))
        if step.target is not None:
            return step.target, None
        targets = sorted(n for n in copies.standby if n != step.source)
        if not targets:
            raise PermanentRemediationError(f"no healthy online node holds a standby copy of {step.unit}, here or "
                                            "on the nodes the other controllers act on")
        return targets[0], copies.standby[targets[0]]

    @staticmethod
    def _refuse_second(step: MigrateUnit, others: list[str]) -> None:
        if others:
            raise PermanentRemediationError(f"{step.unit} already runs on {', '.join(others)}: starting it on "
                                            f"{step.target or 'a standby node'} would make a second copy")

    async def _start_elsewhere(self, plan: Plan, incident: Incident, index: int, unit: str,  # noqa: PLR0917
                               node: str, controller: str, audit: Audit) -> None:
        """Have the controller that acts on ``node`` start the standby copy there (``controller.elsewhere``);
        it records, sends and audits the command under its epoch."""
        assert self.elsewhere is not None  # noqa: S101 - a target elsewhere comes only from it
        epoch = require_epoch(self.ownership, incident.node)  # the other controller's store write checks it too
        # It may send only until not_after, and its command expires by expires_at: until then this incident is
        # held, as for a command sent here (however the call ends), so no later plan can act beside it.
        not_after = self.clock.wall() + self.ack_timeout
        expires_at = not_after + self.command_ttl
        self._unacked[incident.id] = expires_at
        await audit("start_asked", {"node": node, "unit": unit, "controller": controller, "epoch": epoch,
                                    "not_after": not_after, "expires_at": expires_at})
        started = await self.elsewhere.start(controller=controller, node=node, unit=unit, plan_id=plan.id,
                                             incident_id=incident.id, step=index, epoch=epoch, not_after=not_after,
                                             expires_at=expires_at, timeout=self.ack_timeout + FORWARD_SLACK)
        self._unacked.pop(incident.id, None)
        if started.status != "done":
            raise RemediationError(f"agent {node} answered {started.status}: {started.detail} "
                                   f"(sent by controller {started.controller})")

    async def _await_fence(self, step: MigrateUnit, audit: Audit) -> bool:
        """Wait until the unreachable source's copy is surely stopped (False), or the source comes back (True)."""
        reported = self.placements.fence_after(step.unit)
        if reported is None:
            raise PermanentRemediationError(
                f"cannot migrate {step.unit}: its node {step.source} is unreachable and the unit is not a movable "
                "singleton (no stop_after_disconnect), so a second copy could run")
        # The node's word may lengthen the wait, never shorten it: a forged or buggy report cannot hurry it.
        fence_after = max(reported, self.fence_floor)
        snapshot = self.fleet.snapshot(step.source)
        # never heard from since this controller started: count from its start
        heard = (snapshot.last_seen if snapshot is not None else 0.0) or self.started_at
        fenced_at = heard + fence_after
        wait = fenced_at - self.clock.wall()
        await audit("fence_wait", {"node": step.source, "unit": step.unit, "last_heard": heard,
                                   "fence_after": fence_after, "reported_fence_after": reported,
                                   "fence_floor": self.fence_floor, "fenced_at": fenced_at, "wait": max(0.0, wait)})
        if wait > 0 and await self.fleet.wait_for(lambda: self._back(step.source), wait):
            return True
        await audit("fenced", {"node": step.source, "unit": step.unit,
                               "reason": f"silent for {fence_after:g}s: its agent has stopped the unit, or the "
                                         "unit died with the agent"})
        return False

    async def _command(self, plan: Plan, incident: Incident, index: int, node: str, step: wire.CommandStep, *,
                       audit: Audit, timeout: float | None = None, key: str | None = None) -> None:
        if not self.ownership.owns(node) and self.ownership.owns(incident.node):
            raise PermanentRemediationError(f"{node} is in bucket {wire.bucket_of(node)}, which another controller "
                                            f"holds: {incident.node}'s controller sends it nothing")
        result = await self.send(node, step, key=key or idempotency_key(node, incident.id, index, plan.attempt),
                                 plan_id=plan.id, incident_id=incident.id, audit=audit, timeout=timeout)
        if result.status != "done":
            raise RemediationError(f"agent {node} answered {result.status}: {result.detail}")

    async def send(self, node: str, step: wire.CommandStep, *, key: str, plan_id: str, incident_id: int,
                   audit: Audit, timeout: float | None = None, expires_at: float | None = None,
                   also: tuple[str, int] | None = None, hold: bool = True) -> wire.CommandResult:
        """Record the command under ``node``'s epoch, sign and publish it, and wait for the agent's answer.

        ``expires_at``: at the latest (else ``command_ttl`` from now); ``also``: a second fence for the store
        (``Store.record_command``); ``hold``: count it for the incident's hold while unacked (``take_unacked``;
        not for another controller's incident)."""
        key_bytes = self.keys(node)
        if key_bytes is None:
            raise PermanentRemediationError(f"no signing key for node {node}: sent nothing "
                                            f"(add {node}.key to the key dir)")
        epoch = require_epoch(self.ownership, node)  # NotOwner: the incident's bucket moved; its new owner carries on
        now = self.clock.wall()
        command = wire.sign_command(wire.Command(
            id=uuid.uuid4().hex, key=key, node=node, epoch=epoch, issued_at=now,
            expires_at=min(now + self.command_ttl, expires_at or math.inf), step=step), key_bytes)
        payload = wire.encode(command)
        try:
            recorded = await self.store.record_command(key=key, command_id=command.id, plan_id=plan_id, node=node,
                                                       epoch=epoch, issued_at=now, payload=payload, also=also)
        except StoreError as exc:  # unrecorded, a restarted controller could issue it again: never sent
            raise RemediationError(f"{type(step).__name__} for {node} not sent: it could not be recorded first "
                                   f"({exc})") from exc
        if not recorded:
            raise PermanentRemediationError(f"command {key} was already issued; not sending it twice")
        future: asyncio.Future[wire.CommandResult] = asyncio.get_running_loop().create_future()
        self._pending[command.id] = (node, future)
        if hold:
            self._unacked[incident_id] = max(self._unacked.get(incident_id, 0.0), command.expires_at)
        try:
            self.link.publish(wire.node_topic(node, "commands"), payload, qos=1)
            target = ({"dataset": step.dataset, "files": [f.path for f in step.files]}
                      if isinstance(step, wire.ResyncDataset) else {"unit": step.unit})
            await audit("command_sent", {"node": node, "step": type(step).__name__, **target,
                                         "command": command.id, "key": key, "epoch": epoch,
                                         "expires_at": command.expires_at})
            wait = timeout or self.ack_timeout
            session = self._session(node)
            restarted = asyncio.ensure_future(self.fleet.wait_for(lambda: self._session(node) > session, wait))
            try:
                waiters: set[asyncio.Future[Any]] = {future, restarted}
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                restarted.cancel()
            if not future.done() and restarted.done() and not restarted.cancelled() and restarted.result():
                # The command died with the old agent process (its ledger never acks it): fail now, so the
                # next attempt runs, instead of waiting out the ack timeout.
                await audit("command_lost", {"command": command.id, "node": node,
                                             "reason": "the agent restarted before it answered"})
                raise RemediationError(f"the agent on {node} restarted before it answered; the command is lost")
            if not future.done():
                await audit("command_timeout", {"command": command.id})
                raise RemediationError(f"no ack from {node} within {wait:g}s")
            result = future.result()
        finally:
            self._pending.pop(command.id, None)
        if hold:
            self._unacked.pop(incident_id, None)
        await audit("command_result", {"node": node, "command": command.id, "status": result.status,
                                       "detail": result.detail})
        return result

    async def _verify(self, target: Verification, before: wire.UnitReport | None, recheck: Recheck,
                      audit: Audit) -> PlanOutcome:
        def good() -> bool:
            if target.kind == "cleared" or target.unit is None:
                return not recheck()
            unit = self.fleet.unit(target.node, target.unit)
            if not unit_is_healthy(unit):
                return False
            assert unit is not None  # noqa: S101 - unit_is_healthy(None) is False
            return before is None or unit.restarts > before.restarts or unit.pid != before.pid

        await audit("verifying", {"kind": target.kind, "node": target.node, "unit": target.unit,
                                  "within_s": target.within, "stable_for_s": target.stable_for})
        started = self.clock.monotonic()
        deadline = started + target.within
        while True:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0 or not await self.fleet.wait_for(good, remaining):
                return PlanOutcome("failed", f"not {_goal(target)} within {target.within:g}s")
            healthy_at = self.clock.monotonic()
            if target.stable_for <= 0:
                break
            # Must stay good for the whole stable period: a unit that dies again right away fails.
            if not await self.fleet.wait_for(lambda: not good(), target.stable_for):
                break
            await audit("verification_relapse", {"after_s": round(self.clock.monotonic() - healthy_at, 3)})
        took = healthy_at - started
        return PlanOutcome("succeeded", f"{_goal(target)} {took:.2f}s after the action"
                                        + (f" and stayed so for {target.stable_for:g}s" if target.stable_for else ""))


def _ranges(buckets: frozenset[int]) -> str:
    """``3-5, 9``: buckets, in runs."""
    runs: list[list[int]] = []
    for bucket in sorted(buckets):
        if runs and runs[-1][1] == bucket - 1:
            runs[-1][1] = bucket
        else:
            runs.append([bucket, bucket])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def _goal(target: Verification) -> str:
    return "symptom cleared" if target.kind == "cleared" or target.unit is None else "healthy again"

