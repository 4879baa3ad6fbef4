"""Migrations across controllers: the other controllers' copies of a movable unit, and a start asked of one.

With several controllers (``controller.leases``) each acts on the nodes of its
own buckets. A movable singleton lost with its node is that node's
controller's to move (``controller.observe`` finds it lost nowhere else); its
standby copy may be on a node another controller acts on, and so may a copy
that already runs. So when a migration's step runs, the dispatcher asks every
other controller (``Peers``, over HTTP with the API token):

- ``copies`` (``GET /api/v1/copies/{unit}``): which of its nodes run the unit
  (starting or running, on their current connection or not: any of them makes
  a start a second copy), which of its healthy online nodes hold a standby
  copy (targets), and the buckets it has held long enough to have heard from
  their nodes. Unless those buckets and the asking controller's own cover all
  64, or when a controller does not answer, the answer is unknown: nothing is
  started (``RemediationError``; the plan's next attempt asks again).
- ``start`` (``POST /api/v1/copies/{unit}/start``): the controller that acts
  on the chosen target starts the copy there, under its own bucket's epoch,
  only when all of these hold: the plan is a migration of that unit, running
  for an open ``unit_lost`` incident (read from the shared store: a caller
  cannot make one up); the incident's audit trail shows the source fenced or
  stopped by this plan (so no caller can hurry a start past the fence); the
  asking controller's epoch on the source is still its bucket's, checked in
  the same transaction that records the command (a controller that lost the
  source's bucket meanwhile is refused); the call came before ``not_after``
  and the command expires by ``expires_at`` (the asker holds the incident
  until then, however the call ends); the node still holds a healthy standby
  copy and none of its nodes runs the unit. The key (``start_key``) is the
  plan's step without the node, the same a start on the asker's own node
  uses, so one step starts one copy, wherever. Its command and the agent's
  answer go into the incident's audit trail like any other.

``copies_here`` and ``start_here`` are the answering side; ``PeerCopies`` the
asking side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import httpx
from pydantic import BaseModel, Field, ValidationError

from controller.ownership import NotOwner
from controller.plan_records import plan_from_record
from controller.store import TimelineEntry
from detectors.placement import runners
from remediations.plans import MigrateUnit, idempotency_key
from selfheal import wire
from selfheal.errors import PermanentRemediationError, RemediationError
from selfheal.wire import BUCKETS

MIGRATE_START = 100
"""A migration's start step is keyed ``step index + MIGRATE_START`` (its stop on the source: the step index)."""

if TYPE_CHECKING:
    from controller.engine import Engine
    from controller.peers import Peers


class CopiesAnswer(BaseModel):
    """One controller's answer to ``GET /api/v1/copies/{unit}``."""

    runners: list[str]
    """Its nodes that run the unit (starting or running)."""
    standby: list[str]
    """Its healthy online nodes holding a stopped copy (migration targets)."""
    buckets: list[Annotated[int, Field(ge=0, lt=BUCKETS)]]
    """The buckets it has held long enough to have heard from their nodes."""


@dataclass(frozen=True, slots=True)
class Copies:
    """Where the other controllers' nodes hold a unit: node → the controller that acts on it."""

    runners: dict[str, str]
    standby: dict[str, str]
    buckets: frozenset[int]
    """The buckets they have held long enough to have heard from their nodes."""


@dataclass(frozen=True, slots=True)
class Started:
    """What the controller of the target answered: the agent's status and detail, and who sent it."""

    status: str
    detail: str
    controller: str
    command: str


class Elsewhere(Protocol):
    """The other controllers, as a migration needs them (``PeerCopies``; a fake in unit tests)."""

    async def copies(self, unit: str) -> Copies:
        """Every other controller's answer; ``RemediationError`` when one gave none."""
        ...

    async def start(self, *, controller: str, node: str, unit: str, plan_id: str, incident_id: int,
                    step: int, epoch: int, not_after: float, expires_at: float, timeout: float) -> Started:
        """Ask ``controller`` (others after it, if it no longer acts on ``node``) to start the standby copy;
        ``RemediationError`` when none did."""
        ...


class PeerCopies:
    """``Elsewhere`` over HTTP: the peers of ``controller.peers``, with this controller's API token."""

    def __init__(self, peers: Peers, token: str) -> None:
        self.peers = peers
        self._headers = {"authorization": f"Bearer {token}", "x-selfheal-actor": f"controller {peers.member}"}

    async def copies(self, unit: str) -> Copies:
        path = f"/api/v1/copies/{unit}"
        answers, missing = await self.peers.ask(path, {}, self._headers)
        valid: dict[str, CopiesAnswer] = {}
        for member, answer in answers.items():
            try:
                valid[member] = CopiesAnswer.model_validate(answer)
            except ValidationError as exc:  # another version, a bug: counted with those that gave none
                self.peers.failed(member, path, exc)
                missing.append(member)
        if missing:
            raise RemediationError(f"cannot tell whether {unit} runs on the nodes of controller(s) "
                                   f"{', '.join(sorted(missing))}: they did not answer; nothing started")
        return Copies(runners={n: m for m, a in valid.items() for n in a.runners},
                      standby={n: m for m, a in valid.items() for n in a.standby},
                      buckets=frozenset(b for a in valid.values() for b in a.buckets))

    async def start(self, *, controller: str, node: str, unit: str, plan_id: str, incident_id: int,
                    step: int, epoch: int, not_after: float, expires_at: float, timeout: float) -> Started:
        body = {"node": node, "plan": plan_id, "incident": incident_id, "step": step, "epoch": epoch,
                "not_after": not_after, "expires_at": expires_at}
        try:
            answer = await self.peers.forward("POST", f"/api/v1/copies/{unit}/start", self._headers, first=controller,
                                              json=body, timeout=timeout)
        except httpx.HTTPError as exc:  # pragma: no cover - forward counts and skips peers that do not answer
            raise RemediationError(f"no controller answered the start of {unit} on {node}: {exc}") from exc
        if answer is None:
            raise RemediationError(f"no controller acting on {node} answered the start of {unit}")
        try:
            data: dict[str, Any] = answer.json()
        except ValueError:
            data = {}
        if answer.status_code != 200:
            detail = str(data.get("detail", answer.text))[:500]
            error = PermanentRemediationError if answer.status_code == 409 else RemediationError
            raise error(f"the controller acting on {node} refused to start {unit} ({answer.status_code}): {detail}")
        return Started(status=str(data.get("status", "")), detail=str(data.get("detail", "")),
                       controller=str(data.get("controller", "")), command=str(data.get("command", "")))


def start_key(unit: str, incident_id: int, step: int, attempt: int) -> str:
    """A migration's start, keyed by its plan's step and attempt but not the node: one start per step."""
    return idempotency_key(f"start:{unit}", incident_id, step, attempt)


def fence_proven(timeline: Iterable[TimelineEntry], plan_id: str, source: str) -> bool:
    """Whether the plan's own audit entries show its source fenced (silent past its fence) or stopped by
    command: only then may its standby copy start."""
    for entry in timeline:
        data = entry.data
        if data.get("plan") != plan_id or data.get("node") != source:
            continue
        if entry.kind == "fenced" or (entry.kind == "command_result" and data.get("status") == "done"):
            return True
    return False


# --- the answering side -----------------------------------------------------------------------------


def copies_here(engine: Engine, unit: str) -> tuple[list[str], list[str], list[int]]:
    """This controller's nodes that run ``unit`` (on their current connection or not), its healthy online
    nodes that hold a standby copy of it, each sorted, and the buckets it has heard from long enough."""
    dispatcher = engine.dispatcher
    snapshots, offline = engine.fleet.snapshots(engine.clock.wall(), dispatcher.offline_after)
    running = sorted(runners(unit, snapshots.values(), offline, unconfirmed=True))
    unhealthy = {i.symptom.node for i in engine.reconciler.incidents.values()}
    standby = [n for n in engine.observer.standby.get(unit, ())
               if n not in offline and n not in unhealthy and dispatcher.ownership.owns(n)
               and (snapshot := snapshots.get(n)) is not None and snapshot.confirmed]
    return running, standby, sorted(dispatcher.ownership.settled(dispatcher.offline_after))


async def start_here(engine: Engine, *, unit: str, node: str, plan_id: str, incident_id: int,
                     step: int, epoch: int, not_after: float, expires_at: float,
                     controller: str) -> wire.CommandResult:
    """Start the standby copy of ``unit`` on ``node`` for another controller's migration plan.

    ``NotOwner``: this controller does not act on ``node``, or (from the store) the asking controller no
    longer holds the source's bucket under ``epoch``; ``PermanentRemediationError``: asked after
    ``not_after``, the plan is not a running migration of an open ``unit_lost`` incident of ``unit`` whose
    source is fenced or stopped, the node is no target, the unit runs here already, or the step's start
    was issued before; ``RemediationError``: sent, and no answer."""
    store = engine.store
    if not engine.dispatcher.ownership.owns(node):
        raise NotOwner(f"{node}'s bucket {wire.bucket_of(node)} is not held by this controller")
    if engine.clock.wall() > not_after:
        raise PermanentRemediationError(f"asked to start {unit} after its deadline: nothing started")
    record = await store.get_plan(plan_id)
    incident = await store.get_incident_row(incident_id)
    steps = plan_from_record(record).steps if record is not None else ()
    index = step - MIGRATE_START
    migrating = 0 <= index < len(steps) and isinstance(move := steps[index], MigrateUnit) and move.unit == unit \
        and move.target in {None, node}
    if record is None or incident is None or not migrating or record.incident_id != incident_id \
            or record.state != "running" or incident.state != "open" or incident.kind != "unit_lost" \
            or incident.unit != unit:
        raise PermanentRemediationError(f"plan {plan_id} is not a running migration of {unit} to {node} for open "
                                        f"incident {incident_id}: nothing started")
    source = steps[index].node  # a MigrateUnit's node is its source
    detail = await store.get_incident(incident_id)
    if detail is None or not fence_proven(detail.timeline, plan_id, source):
        raise PermanentRemediationError(f"plan {plan_id} has not fenced or stopped {unit} on {source} yet: "
                                        "nothing started")
    running, standby, _ = copies_here(engine, unit)
    if running:
        raise PermanentRemediationError(f"{unit} already runs on {', '.join(running)}: nothing started")
    if node not in standby:
        raise PermanentRemediationError(f"{node} holds no healthy standby copy of {unit} now: nothing started")

    async def audit(kind: str, data: dict[str, object]) -> None:
        await engine.effects.audit(incident_id, kind, {"plan": plan_id, "controller": controller, **data})

    return await engine.dispatcher.send(node, wire.StartUnit(unit=unit),
                                        key=start_key(unit, incident_id, step, record.attempt),
                                        plan_id=plan_id, incident_id=incident_id, audit=audit,
                                        expires_at=expires_at, also=(incident.node, epoch), hold=False)
