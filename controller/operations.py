"""Human operations on the engine: approve or cancel a plan, pause, silences; and the clocks humans set.

With several controllers (``controller.leases``), a plan is approved or
cancelled only by the controller that owns its node's bucket: anywhere else it
is ``NotOwner`` (the API forwards the call to the owner, ``controller.peers``).
The pause and the silences are the fleet's: written to the shared store by
whichever controller took the call, and read back by every other one
(``sync_shared``, run every second by the controller).

Approvals and silences run out: ``expire_approvals`` expires a plan nobody
approved in time, and ``report_expired_silences`` tells, once, about a silence
that ended while a problem it muted is still open. The engine calls both on
every pass and wakes for the next of those instants (``Engine.wake_at``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from controller.effects import Effects
from controller.fleet import Fleet
from controller.ownership import NotOwner
from controller.store import PlanRecord, SilenceRecord, Store
from remediations.plans import can_transition
from remediations.reconciler import Reconciler
from remediations.state import Matcher, Silence
from selfheal.clocks import Clock
from selfheal.errors import SelfhealError
from selfheal.logs import get_logger


class PlanConflict(SelfhealError):
    """An approve or cancel that the plan's state does not allow."""


class Operations:
    def __init__(self, *, effects: Effects, reconciler: Reconciler, store: Store, fleet: Fleet,
                 clock: Clock, owns: Callable[[str], bool] = lambda node: True) -> None:
        self.effects = effects
        self.owns = owns
        """Whether this controller acts on a node now (``Ownership.owns``)."""
        self.reconciler = reconciler
        self.store = store
        self.fleet = fleet
        self.clock = clock
        self.silence_reported: set[str] = set()
        """Silences whose end was reported (``report_expired_silences``)."""
        self._shared = asyncio.Lock()
        """Held while the pause or the silences are written or read back from the store."""
        self.log = get_logger("engine")

    async def approve(self, plan_id: str, who: str) -> PlanRecord:
        record = await self._plan_for_human(plan_id, "running")
        plan, _ = self.effects.awaiting.pop(plan_id)
        incident = self.effects.incidents.get(plan.incident_id)
        await self.effects.audit(plan.incident_id, "approved", {"plan": plan_id, "by": who})
        if incident is None:
            raise PlanConflict(f"plan {plan_id}'s incident is no longer open")
        await self.effects.launch(plan, incident, record)
        return await self._plan(plan_id)

    async def cancel(self, plan_id: str, who: str) -> PlanRecord:
        record = await self._plan_for_human(plan_id, "cancelled")
        task = self.effects.tasks.get(plan_id)
        if task is not None:
            task.cancel()
        self.effects.awaiting.pop(plan_id, None)
        await self.effects.audit(record.incident_id, "cancelled_by_human", {"plan": plan_id, "by": who})
        await self.effects.set_plan_state(record, "cancelled", f"cancelled by {who}")
        self.reconciler.finish(plan_id, "cancelled", self.clock.wall())
        incident = self.effects.incidents.get(record.incident_id)
        if incident is not None:
            self.effects.hold_for_unacked(incident, self.clock.wall())
        return await self._plan(plan_id)

    async def _plan_for_human(self, plan_id: str, new: str) -> PlanRecord:
        record = await self._plan(plan_id)
        incident = await self.store.get_incident_row(record.incident_id)
        if incident is None or not self.owns(incident.node):
            raise NotOwner(f"plan {plan_id} is for a node another controller acts on")
        if not can_transition(record.state, new) or (new == "running" and plan_id not in self.effects.awaiting):
            raise PlanConflict(f"plan {plan_id} is {record.state}; it cannot become {new}")
        return record

    async def _plan(self, plan_id: str) -> PlanRecord:
        record = await self.store.get_plan(plan_id)
        if record is None:
            raise KeyError(plan_id)
        return record

    async def set_pause(self, paused: bool, reason: str, who: str) -> None:
        async with self._shared:  # never interleaved with ``sync_shared``'s read, which would undo it
            await self.store.set_pause(paused, reason)
            self.reconciler.paused, self.reconciler.pause_reason = paused, reason
        self.log.warning("engine.paused" if paused else "engine.resumed", reason=reason, by=who)
        await self.fleet.notify()

    async def add_silence(self, silence: SilenceRecord) -> None:
        async with self._shared:
            await self.store.save_silence(silence)
            await self.load_silences()
        await self.fleet.notify()

    async def sync_shared(self) -> None:
        """Take up the pause and the silences another controller wrote to the shared store."""
        async with self._shared:
            paused, reason = await self.store.get_pause()
            changed = (paused, reason) != (self.reconciler.paused, self.reconciler.pause_reason)
            if changed:
                self.reconciler.paused, self.reconciler.pause_reason = paused, reason
                self.log.warning("engine.paused" if paused else "engine.resumed", reason=reason,
                                 by="another controller")
            before = self.reconciler.silences
            await self.load_silences()
            reloaded = self.reconciler.silences != before
        if reloaded:
            self.log.info("engine.silences_loaded", silences=[x.id for x in self.reconciler.silences][:50],
                          by="another controller")
        if changed or reloaded:
            await self.fleet.notify()

    async def load_silences(self) -> None:
        # Silences that ended over an hour ago can no longer mute or be reported: keep memory bounded.
        horizon = self.clock.wall() - 3600.0
        silences = [s for s in await self.store.list_silences() if s.ends_at > horizon]
        self.silence_reported &= {s.id for s in silences}
        self.reconciler.silences = [
            Silence(s.id, tuple(Matcher(m["name"], m["value"]) for m in s.matchers), s.starts_at, s.ends_at,
                    s.comment, s.author) for s in silences]

    async def report_expired_silences(self, now: float) -> None:
        """A silence that ends while a problem it muted is still open is reported, once."""
        for silence in self.reconciler.silences:
            if silence.ends_at > now or silence.id in self.silence_reported or now - silence.ends_at > 3600:
                continue
            self.silence_reported.add(silence.id)
            for state in list(self.reconciler.incidents.values()):
                labels = {"kind": state.symptom.kind, "node": state.symptom.node, "unit": state.symptom.unit or "",
                          "severity": state.symptom.severity, "rule": state.rule or "", **state.symptom.labels}
                incident = self.effects.incidents.get(state.id or -1)
                if incident is not None and silence.matches(labels):
                    await self.effects.audit(incident.id, "silence_expired", {"silence": silence.id})
                    await self.effects.notify(incident, "silence_expired",
                                       f"silence {silence.id} ended while this incident is still open")

    async def expire_approvals(self, now: float) -> None:
        for plan_id, (_plan, expires) in list(self.effects.awaiting.items()):
            if expires <= now:
                del self.effects.awaiting[plan_id]
                record = await self.store.get_plan(plan_id)
                if record is not None:
                    await self.effects.set_plan_state(record, "expired", "no human approved it in time")
                self.reconciler.finish(plan_id, "expired", now, ran=False)

