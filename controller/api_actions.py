"""The human side of the API: approvals, cancellations, the global pause, silences, statistics.

Every mutating endpoint takes ``Authorization: Bearer <token>`` (the token is
read from ``security.api_token_file`` at start). With no token configured they
all answer 503 — the controller fails closed rather than open. The caller's
name for the audit trail comes from the ``X-Selfheal-Actor`` header (the CLI
sends the login name); it is recorded, not trusted for authorisation.

Several controllers: a plan is approved or cancelled by the owner of its
node's bucket; asked elsewhere, the call is forwarded to it (``controller.peers``)
and its answer returned. A forwarded call that reaches a controller that is not
the owner either answers 421 (Misdirected Request). The pause and silences are
written to the shared store, which every controller reads back within a second.
"""

import hmac
import re
import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from controller.api_gate import NO_TOKEN
from controller.engine import Engine
from controller.operations import PlanConflict
from controller.ownership import NotOwner
from controller.peers import FORWARDED, Peers
from controller.store import SilenceRecord, Store
from selfheal.clocks import Clock, iso

LABEL = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
MAX_TIME = 253402300799.0
"""9999-12-31T23:59:59Z: the last time an ISO 8601 year of four digits can say (NaN and infinity are refused too)."""


class MatcherIn(BaseModel):
    name: str = Field(max_length=63, description="label: kind, node, unit, severity, rule, group or any node label")
    value: str = Field(max_length=256, description="a glob, e.g. node-*")


class SilenceIn(BaseModel):
    matchers: list[MatcherIn] = Field(min_length=1, max_length=32)
    starts_at: float | None = Field(None, ge=0, le=MAX_TIME, description="epoch seconds; default now")
    ends_at: float | None = Field(None, ge=0, le=MAX_TIME,
                                  description="epoch seconds, after starts_at; or give duration_s")
    duration_s: float | None = Field(None, ge=1, le=30 * 86400)
    comment: str = Field(min_length=1, max_length=1000)
    author: str = Field(min_length=1, max_length=200)


class SilenceOut(BaseModel):
    id: str
    matchers: list[MatcherIn]
    starts_at: str
    ends_at: str
    comment: str
    author: str
    active: bool


class PauseIn(BaseModel):
    reason: str = Field("", max_length=1000)


class PauseOut(BaseModel):
    paused: bool
    reason: str


def authorised_by(token: str | None) -> Callable[[Request], str]:
    """A dependency for mutating routes: the caller's actor name once its bearer token is the API token.

    The gate in front of the app (``api_gate``) checked the token before the body was read; this second
    check keeps every mutating route closed should it ever be mounted without the gate. Headers are read
    from the request, not declared: the bearer scheme documents ``Authorization``, and the actor header is
    free text for the audit trail."""
    def authorised(request: Request) -> str:
        if token is None:
            raise HTTPException(503, NO_TOKEN)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a valid bearer token is required")
        return request.headers.get("x-selfheal-actor", "api")[:100] or "api"
    return authorised


def create_actions(*, engine: Engine, store: Store, clock: Clock, token: str | None,
                   peers: Peers | None = None) -> APIRouter:
    Actor = Annotated[str, Depends(authorised_by(token))]  # noqa: N806 - a type alias, named like one
    router = APIRouter(prefix="/api/v1")

    async def human(action: Any, plan_id: str, actor: str, request: Request) -> dict[str, Any]:
        try:
            return await _human(action, plan_id, actor)
        except NotOwner as exc:
            if peers is None or FORWARDED in request.headers:
                raise HTTPException(421, f"{exc}: ask the controller that owns it") from None
        answer = await peers.forward("POST", request.url.path, request.headers)
        if answer is None:
            raise HTTPException(503, f"plan {plan_id[:64]} is for a node another controller acts on, and no "
                                     "controller that acts on it answered; try again") from None
        body = answer.json() if answer.headers.get("content-type", "").endswith("json") else {}
        if answer.status_code != 200:
            raise HTTPException(answer.status_code, str(body.get("detail", answer.text))[:1000])
        return dict(body)

    @router.post("/plans/{plan_id}/approve", responses={404: {}, 409: {}, 401: {}, 421: {}, 503: {}})
    async def approve(plan_id: str, actor: Actor, request: Request) -> dict[str, Any]:
        return await human(engine.approve, plan_id, actor, request)

    @router.post("/plans/{plan_id}/cancel", responses={404: {}, 409: {}, 401: {}, 421: {}, 503: {}})
    async def cancel(plan_id: str, actor: Actor, request: Request) -> dict[str, Any]:
        return await human(engine.cancel, plan_id, actor, request)

    @router.get("/pause")
    async def get_pause() -> PauseOut:
        return PauseOut(paused=engine.reconciler.paused, reason=engine.reconciler.pause_reason)

    @router.post("/pause", responses={401: {}, 503: {}})
    async def pause(body: PauseIn, actor: Actor) -> PauseOut:
        await engine.set_pause(True, body.reason or f"paused by {actor}", actor)
        return await get_pause()

    @router.post("/resume", responses={401: {}, 503: {}})
    async def resume(actor: Actor) -> PauseOut:
        await engine.set_pause(False, "", actor)
        return await get_pause()

    @router.get("/silences")
    async def silences() -> dict[str, list[SilenceOut]]:
        now = clock.wall()
        return {"items": [_silence(s, now) for s in await store.list_silences()]}

    @router.post("/silences", status_code=201, responses={401: {}, 422: {}, 503: {}})
    async def add_silence(body: SilenceIn, actor: Actor) -> SilenceOut:
        now = clock.wall()
        starts = body.starts_at if body.starts_at is not None else now
        ends = body.ends_at if body.ends_at is not None else (starts + body.duration_s if body.duration_s else None)
        if ends is None or ends <= starts:
            raise HTTPException(422, "give ends_at after starts_at, or a positive duration_s")
        for matcher in body.matchers:
            if not LABEL.match(matcher.name):
                raise HTTPException(422, f"matcher name {matcher.name!r} is not a label name")
        record = SilenceRecord(id=uuid.uuid4().hex[:12], matchers=[m.model_dump() for m in body.matchers],
                               starts_at=starts, ends_at=ends, comment=body.comment,
                               author=f"{body.author} (via {actor})" if actor != body.author else body.author,
                               created_at=now)
        await engine.add_silence(record)
        return _silence(record, now)

    @router.delete("/silences/{silence_id}", responses={404: {}, 401: {}, 503: {}})
    async def expire_silence(silence_id: str, actor: Actor) -> SilenceOut:
        now = clock.wall()
        found = next((s for s in await store.list_silences() if s.id == silence_id), None)
        if found is None:
            raise HTTPException(404, f"no silence {silence_id}")
        expired = SilenceRecord(found.id, found.matchers, found.starts_at, min(found.ends_at, now), found.comment,
                                found.author, found.created_at)
        await engine.add_silence(expired)
        return _silence(expired, now)

    @router.get("/stats")
    async def stats() -> dict[str, list[dict[str, object]]]:
        """Outcome statistics per (finding kind, action): attempts, success rate, median time to recover."""
        return {"items": engine.stats()}

    @router.get("/quarantines")
    async def quarantines() -> dict[str, list[dict[str, object]]]:
        now = clock.wall()
        return {"items": [{"rule": rule, "target": target, "until": iso(until), "reason": reason}
                          for rule, target, until, reason in await store.list_quarantines() if until > now]}

    return router


async def _human(action: Any, plan_id: str, actor: str) -> dict[str, Any]:
    try:
        record = await action(plan_id, actor)
    except KeyError:
        raise HTTPException(404, f"no plan {plan_id[:64]}") from None
    except PlanConflict as exc:
        raise HTTPException(409, str(exc)) from None
    return {"id": record.id, "state": record.state, "incident_id": record.incident_id}


def _silence(record: SilenceRecord, now: float) -> SilenceOut:
    return SilenceOut(id=record.id, matchers=[MatcherIn(**m) for m in record.matchers],
                      starts_at=iso(record.starts_at) or "", ends_at=iso(record.ends_at) or "",
                      comment=record.comment, author=record.author,
                      active=record.starts_at <= now < record.ends_at)
