"""The dispatcher: runs one plan — signed commands out, acks in, then verification.

For each step it derives the idempotency key, records the command in the
store *before* publishing it (so a restarted controller can never issue the
same key twice), signs it with the node's key, publishes it on the node's
``commands`` topic and waits for the agent's ack. Then it waits for the
target to be healthy again (a new incarnation, running, probe healthy) within
the rule's deadline. Every step lands in the incident's timeline.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from controller.fleet import Fleet, unit_is_healthy
from controller.store import Incident, PlanRecord, SqliteStore
from remediations.plans import Plan, RestartUnit, idempotency_key
from selfheal.clocks import Clock
from selfheal.logs import get_logger
from selfheal.mqtt import MqttLink
from selfheal.wire import Command, CommandResult, encode, node_topic, sign_command
from selfheal.wire import RestartUnit as WireRestartUnit

Outcome = Literal["succeeded", "failed"]
KeyLookup = Callable[[str], bytes | None]


@dataclass(frozen=True, slots=True)
class PlanOutcome:
    outcome: Outcome
    detail: str
    healed_at: float | None = None


class Dispatcher:
    def __init__(self, *, fleet: Fleet, store: SqliteStore, link: MqttLink, keys: KeyLookup, clock: Clock,
                 epoch: int, command_ttl: float, ack_timeout: float) -> None:
        self.fleet = fleet
        self.store = store
        self.link = link
        self.keys = keys
        self.clock = clock
        self.epoch = epoch
        self.command_ttl = command_ttl
        self.ack_timeout = ack_timeout
        self._pending: dict[str, asyncio.Future[CommandResult]] = {}
        self.log = get_logger("dispatcher")

    def on_result(self, node: str, result: CommandResult) -> None:
        """An agent's ack; unknown ids (e.g. for a command of a previous controller run) are ignored."""
        future = self._pending.get(result.command_id)
        if future is not None and not future.done():
            future.set_result(result)

    async def execute(self, plan: Plan, incident: Incident) -> PlanOutcome:
        log = self.log.bind(incident=incident.id, plan=plan.id, node=incident.node, unit=incident.unit)
        await self._save(plan, "running", {"steps": [s.kind for s in plan.steps]})
        await self._timeline(incident, "plan", {
            "plan": plan.id, "rule": plan.rule, "rule_digest": plan.rule_digest, "attempt": plan.attempt,
            "steps": [{"kind": s.kind, "node": s.node, "unit": s.unit} for s in plan.steps]})
        before = self.fleet.unit(plan.verification.node, plan.verification.unit)
        for index, step in enumerate(plan.steps):
            problem = await self._run_step(plan, incident, index, step)
            if problem is not None:
                log.warning("plan.step_failed", step=step.kind, reason=problem)
                return await self._finish(plan, incident, "failed", problem)
        await self._timeline(incident, "verifying", {"within_s": plan.verification.within})
        started = self.clock.monotonic()
        target = plan.verification

        def healed() -> bool:
            unit = self.fleet.unit(target.node, target.unit)
            if not unit_is_healthy(unit):
                return False
            assert unit is not None  # noqa: S101 - unit_is_healthy(None) is False
            return before is None or unit.restarts > before.restarts or unit.pid != before.pid

        if await self.fleet.wait_for(healed, target.within):
            took = self.clock.monotonic() - started
            log.info("plan.verified", healthy_after_s=round(took, 3))
            return await self._finish(plan, incident, "succeeded",
                                      f"healthy again {took:.2f}s after the restart", healed=True)
        return await self._finish(plan, incident, "failed",
                                  f"not healthy within {target.within:g}s after the restart")

    async def _run_step(self, plan: Plan, incident: Incident, index: int, step: RestartUnit) -> str | None:
        key_bytes = self.keys(step.node)
        if key_bytes is None:
            return f"no signing key for node {step.node}: sent nothing (add {step.node}.key to key_dir)"
        now = self.clock.wall()
        key = idempotency_key(step.node, incident.id, index, plan.attempt)
        command = sign_command(Command(
            id=uuid.uuid4().hex, key=key, node=step.node, epoch=self.epoch, issued_at=now,
            expires_at=now + self.command_ttl, step=WireRestartUnit(unit=step.unit)), key_bytes)
        payload = encode(command)
        if not await self.store.record_command(key=key, command_id=command.id, plan_id=plan.id, node=step.node,
                                               epoch=self.epoch, issued_at=now, payload=payload):
            return f"command {key} was already issued; not sending it twice"
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self._pending[command.id] = future
        try:
            self.link.publish(node_topic(step.node, "commands"), payload, qos=1)
            await self._timeline(incident, "command_sent", {"step": step.kind, "command": command.id,
                                                            "key": key, "epoch": self.epoch})
            try:
                result = await asyncio.wait_for(future, self.ack_timeout)
            except TimeoutError:
                await self._timeline(incident, "command_timeout", {"command": command.id})
                return f"no ack from {step.node} within {self.ack_timeout:g}s"
        finally:
            self._pending.pop(command.id, None)
        await self._timeline(incident, "command_result", {"command": command.id, "status": result.status,
                                                          "detail": result.detail})
        if result.status != "done":
            return f"agent answered {result.status}: {result.detail}"
        return None

    async def _finish(self, plan: Plan, incident: Incident, outcome: Outcome, detail: str, *,
                      healed: bool = False) -> PlanOutcome:
        await self._save(plan, outcome, {"result": detail})
        await self._timeline(incident, f"plan_{outcome}", {"plan": plan.id, "detail": detail})
        return PlanOutcome(outcome, detail, self.clock.wall() if healed else None)

    async def _save(self, plan: Plan, state: str, detail: dict[str, object]) -> None:
        now = self.clock.wall()
        await self.store.save_plan(PlanRecord(
            id=plan.id, incident_id=plan.incident_id, rule=plan.rule, attempt=plan.attempt, state=state,
            created_at=plan.created_at, updated_at=now,
            detail={"steps": [{"kind": s.kind, "node": s.node, "unit": s.unit} for s in plan.steps],
                    **detail}))

    async def _timeline(self, incident: Incident, kind: str, data: dict[str, object]) -> None:
        await self.store.append_timeline(incident.id, at=self.clock.wall(), kind=kind, data=data)
