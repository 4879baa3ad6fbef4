"""What controllers ask each other for a migration across their buckets (``controller.elsewhere``).

- ``GET /api/v1/copies/{unit}``: this controller's nodes that run the unit and
  its healthy online nodes holding a standby copy (a read: the read token, if
  reads are protected).
- ``POST /api/v1/copies/{unit}/start``: start the standby copy on one of this
  controller's nodes for another controller's running migration plan (the API
  token). 421: this controller does not act on the node, or the asker's epoch
  on the source is no longer current; 409: refused (asked past ``not_after``,
  not a running migration of an open ``unit_lost`` incident of the unit, its
  source not fenced or stopped yet, no standby copy there, the unit runs
  already, the step's start was issued before); 504: sent, and the agent did
  not answer in time.
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' aliases, defined in the factory.
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from controller.api_actions import MAX_TIME, authorised_by
from controller.elsewhere import CopiesAnswer, copies_here, start_here
from controller.engine import Engine
from controller.ownership import NotOwner
from selfheal.errors import PermanentRemediationError, RemediationError
from selfheal.wire import NAME_PATTERN


class StartIn(BaseModel):
    node: str = Field(pattern=NAME_PATTERN)
    plan: str = Field(max_length=100, description="the asking controller's running migration plan")
    incident: int = Field(ge=0, description="the plan's unit_lost incident")
    step: int = Field(ge=0, le=1_000_000, description="the step index the idempotency key is derived from")
    epoch: int = Field(ge=0, description="the asking controller's epoch on the migration's source node")
    not_after: float = Field(ge=0, le=MAX_TIME, description="no start is sent after this (epoch seconds)")
    expires_at: float = Field(ge=0, le=MAX_TIME, description="the command expires by then at the latest")


class StartOut(BaseModel):
    status: Literal["done", "failed", "rejected", "duplicate"]
    """The agent's answer (``wire.CommandResult``)."""
    detail: str
    controller: str
    command: str


def create_copies(*, engine: Engine, token: str | None, member: str) -> APIRouter:
    Actor = Annotated[str, Depends(authorised_by(token))]  # noqa: N806 - a type alias, named like one
    Unit = Annotated[str, Path(pattern=NAME_PATTERN)]  # noqa: N806 - a type alias, named like one
    router = APIRouter(prefix="/api/v1/copies")

    @router.get("/{unit}")
    async def copies(unit: Unit) -> CopiesAnswer:
        running, standby, buckets = copies_here(engine, unit)
        return CopiesAnswer(runners=running, standby=standby, buckets=buckets)

    @router.post("/{unit}/start", responses={401: {}, 409: {}, 421: {}, 503: {}, 504: {}})
    async def start(unit: Unit, body: StartIn, actor: Actor) -> StartOut:
        try:
            result = await start_here(engine, unit=unit, node=body.node, plan_id=body.plan,
                                      incident_id=body.incident, step=body.step, epoch=body.epoch,
                                      not_after=body.not_after, expires_at=body.expires_at, controller=member)
        except NotOwner as exc:
            raise HTTPException(421, str(exc)) from None
        except PermanentRemediationError as exc:
            raise HTTPException(409, str(exc)) from None
        except RemediationError as exc:
            raise HTTPException(504, str(exc)) from None
        engine.log.info("copies.started_for_peer", unit=unit, node=body.node, plan=body.plan, asked_by=actor,
                        status=result.status)
        return StartOut(status=result.status, detail=result.detail, controller=member, command=result.command_id)

    return router
