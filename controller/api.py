"""The controller's HTTP API (FastAPI): health, readiness, metrics, fleet and incidents.

Contract: docs/ARCHITECTURE.md and DESIGN.md §5. Lists are ``{"items": [...]}``,
errors are ``application/problem+json`` (RFC 9457), times are ISO 8601 UTC,
OpenAPI 3.1 is served at ``/api/v1/openapi.json``. Read-only for now: the
mutating endpoints (approvals, silences) arrive with the remediation engine
and take a bearer token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException

import selfheal
from controller.api_actions import create_actions
from controller.datasets import describe_datasets
from controller.engine import Engine
from controller.fleet import Fleet
from controller.metrics import ControllerMetrics
from controller.page import render_incident_page, render_status_page
from controller.sources.alertmanager import create_alerts_router
from controller.sources.alerts import ExternalAlerts
from controller.store import Incident, PlanRecord, SqliteStore
from detectors.presence import is_offline
from selfheal.clocks import Clock, iso

T = TypeVar("T")


@dataclass
class ApiContext:
    fleet: Fleet
    store: SqliteStore
    engine: Engine
    metrics: ControllerMetrics
    clock: Clock
    offline_after: float
    broker_connected: Any
    """An object with ``is_set()``: the controller's MQTT connection is up."""
    api_token: str | None = None
    """Bearer token for mutating endpoints; None disables them (503)."""
    alerts: ExternalAlerts | None = None
    """Where ``POST /api/v1/alerts`` puts Alertmanager's alerts; None: the endpoint is not served."""
    alerts_ttl: float = 28800.0


class NodeOut(BaseModel):
    id: str
    state: Literal["online", "offline"]
    last_seen: str | None
    session: int
    version: str
    units: list[str]


class UnitOut(BaseModel):
    node: str
    name: str
    kind: str
    state: str
    pid: int | None
    restarts: int
    healthy: bool | None
    cpu_percent: float
    rss_bytes: int
    fenced: bool = False
    """Stopped by its own agent after losing the broker (a movable singleton); waits for start_unit."""


class IncidentOut(BaseModel):
    id: int
    state: Literal["open", "failed", "resolved"]
    kind: str
    node: str
    unit: str | None
    severity: str
    summary: str
    rule: str | None
    opened_at: str
    resolved_at: str | None


class TimelineOut(BaseModel):
    at: str
    kind: str
    data: dict[str, Any]
    hash: str
    """This entry's link in the incident's hash chain (``selfheal audit verify`` recomputes it)."""


class PlanOut(BaseModel):
    id: str
    incident_id: int
    rule: str
    attempt: int
    rung: int
    action: str
    mode: str
    state: str
    created_at: str
    updated_at: str
    detail: dict[str, Any]


class IncidentDetailOut(IncidentOut):
    timeline: list[TimelineOut]
    plans: list[PlanOut]


class ReplicaOut(BaseModel):
    node: str
    root: str
    state: str
    files: int
    bytes: int
    generation: int
    online: bool
    scanned_at: float
    error: str


class AuthorityOut(BaseModel):
    kind: Literal["manifest", "majority", "none"]
    root: str | None
    reason: str
    matching: list[str]


class AgreementOut(BaseModel):
    replicas: float | None
    """Share of the replicas whose root is the authority's."""
    files: float | None
    """Share of (replica, file) pairs matching the authority; null until every divergent replica was localised."""


class DivergentOut(BaseModel):
    node: str
    files: list[str] | None
    """The paths that differ, once localised."""


class DatasetOut(BaseModel):
    name: str
    replicas: list[ReplicaOut]
    authority: AuthorityOut
    agreement: AgreementOut
    divergent: list[DivergentOut]
    unknown: list[str]


class Items(BaseModel, Generic[T]):
    items: list[T]


def create_api(ctx: ApiContext) -> FastAPI:
    app = FastAPI(title="selfheal controller", version=selfheal.__version__,
                  openapi_url="/api/v1/openapi.json", docs_url="/api/v1/docs", redoc_url=None)

    @app.exception_handler(HTTPException)
    async def problem(request: Request, exc: HTTPException) -> JSONResponse:
        return _problem(exc.status_code, str(exc.detail), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _problem(422, detail, request.url.path)

    app.include_router(create_actions(engine=ctx.engine, store=ctx.store, clock=ctx.clock, token=ctx.api_token))
    if ctx.alerts is not None:
        app.include_router(create_alerts_router(
            alerts=ctx.alerts, clock=ctx.clock, ttl=ctx.alerts_ttl, token=ctx.api_token,
            count=lambda outcome: ctx.metrics.alerts_received.labels(outcome).inc(), wake=ctx.fleet.notify))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "broker not connected yet"}})
    async def readyz(request: Request) -> Response:
        if not ctx.broker_connected.is_set():
            return _problem(503, "not connected to the MQTT broker", request.url.path)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/nodes")
    async def nodes() -> Items[NodeOut]:
        return Items(items=_nodes(ctx))

    @app.get("/api/v1/units")
    async def units() -> Items[UnitOut]:
        return Items(items=_units(ctx))

    @app.get("/api/v1/datasets")
    async def datasets() -> Items[DatasetOut]:
        return Items(items=[DatasetOut(**d) for d in datasets_view(ctx)])

    @app.get("/api/v1/incidents")
    async def incidents(state: Literal["open", "failed", "resolved"] | None = Query(None),
                        limit: int = Query(200, ge=1, le=1000)) -> Items[IncidentOut]:
        rows = await ctx.store.list_incidents(state=state, limit=limit)
        return Items(items=[_incident(i) for i in rows])

    @app.get("/api/v1/incidents/{incident_id}", responses={404: {"description": "no such incident"}})
    async def incident(incident_id: int) -> IncidentDetailOut:
        detail = await ctx.store.get_incident(incident_id)
        if detail is None:
            raise HTTPException(404, f"no incident {incident_id}")
        return IncidentDetailOut(
            **_incident(detail.incident).model_dump(),
            timeline=[TimelineOut(at=iso(e.at) or "", kind=e.kind, data=e.data, hash=e.hash)
                      for e in detail.timeline],
            plans=[_plan(p) for p in detail.plans])

    @app.get("/api/v1/plans")
    async def plans(limit: int = Query(200, ge=1, le=1000)) -> Items[PlanOut]:
        rows = await ctx.store.list_plans(limit=limit)
        return Items(items=[_plan(p) for p in rows])

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        now = ctx.clock.wall()
        history = await ctx.store.list_incidents(limit=1000)  # newest first: the plots' bounded window
        plans = await ctx.store.list_plans(limit=20)
        return HTMLResponse(render_status_page(
            nodes=[n.model_dump() for n in _nodes(ctx)], units=[u.model_dump() for u in _units(ctx)],
            incidents=[_incident(i).model_dump() for i in history[:30]], version=selfheal.__version__,
            now=iso(now) or "", plans=[_plan(p).model_dump() for p in plans], datasets=_page_datasets(ctx),
            history=[(i.opened_at, i.resolved_at) for i in history], now_ts=now))

    @app.get("/incidents/{incident_id}", response_class=HTMLResponse, responses={404: {}})
    async def incident_page(incident_id: int) -> HTMLResponse:
        detail = await ctx.store.get_incident(incident_id)
        if detail is None:
            raise HTTPException(404, f"no incident {incident_id}")
        found = detail.incident
        return HTMLResponse(render_incident_page(
            incident=_incident(found).model_dump(), plans=[_plan(p).model_dump() for p in detail.plans],
            timeline=[{"at": iso(e.at) or "", "kind": e.kind, "data": e.data} for e in detail.timeline],
            metrics=unit_series(ctx.fleet, found.node, found.unit), opened_ts=found.opened_at,
            version=selfheal.__version__, now=iso(ctx.clock.wall()) or ""))

    return app


def _problem(status: int, detail: str, instance: str) -> JSONResponse:
    titles = {401: "Unauthorized", 404: "Not Found", 409: "Conflict", 422: "Invalid request",
              503: "Unavailable"}
    return JSONResponse({"type": "about:blank", "title": titles.get(status, "Error"), "status": status,
                         "detail": detail, "instance": instance},
                        status_code=status, media_type="application/problem+json")


def _nodes(ctx: ApiContext) -> list[NodeOut]:
    now = ctx.clock.wall()
    out = []
    for node_id in sorted(ctx.fleet.nodes):
        snapshot = ctx.fleet.snapshot(node_id)
        node = ctx.fleet.nodes[node_id]
        if snapshot is None:
            continue
        offline = is_offline(snapshot, now, ctx.offline_after)
        out.append(NodeOut(id=node_id, state="offline" if offline else "online",
                           last_seen=iso(node.last_seen) if node.last_seen else None, session=node.session,
                           version=node.version, units=sorted(node.units)))
    return out


def datasets_view(ctx: ApiContext) -> list[dict[str, Any]]:
    now = ctx.clock.wall()
    offline = {n for n in ctx.fleet.nodes if (s := ctx.fleet.snapshot(n)) is None
               or is_offline(s, now, ctx.offline_after)}
    return describe_datasets(ctx.fleet, offline, ctx.engine.dispatcher.localisations)


def _units(ctx: ApiContext) -> list[UnitOut]:
    return [
        UnitOut(node=node_id, name=unit.name, kind=unit.kind, state=unit.state, pid=unit.pid,
                restarts=unit.restarts, healthy=unit.probe.healthy if unit.probe else None,
                cpu_percent=unit.cpu_percent, rss_bytes=unit.rss_bytes, fenced=unit.fenced)
        for node_id in sorted(ctx.fleet.nodes)
        for unit in sorted(ctx.fleet.nodes[node_id].units.values(), key=lambda u: u.name)
    ]


def _plan(plan: PlanRecord) -> PlanOut:
    return PlanOut(id=plan.id, incident_id=plan.incident_id, rule=plan.rule, attempt=plan.attempt, rung=plan.rung,
                   action=plan.action, mode=plan.mode, state=plan.state,
                   created_at=iso(plan.created_at) or "", updated_at=iso(plan.updated_at) or "", detail=plan.detail)


def _incident(incident: Incident) -> IncidentOut:
    return IncidentOut(id=incident.id, state=incident.state, kind=incident.kind, node=incident.node,
                       unit=incident.unit, severity=incident.severity, summary=incident.summary,
                       rule=incident.rule, opened_at=iso(incident.opened_at) or "",
                       resolved_at=iso(incident.resolved_at))


def unit_series(fleet: Fleet, node: str, unit: str | None) -> dict[str, list[tuple[float, float]]]:
    """The unit's (or, without one, the host's) CPU and memory from the node's bounded report history."""
    snapshot = fleet.snapshot(node)
    cpu: list[tuple[float, float]] = []
    mem: list[tuple[float, float]] = []
    for report in snapshot.reports if snapshot is not None else ():
        if unit is None:
            cpu.append((report.ts, report.host.cpu_percent))
            mem.append((report.ts, (report.host.mem_total_bytes - report.host.mem_available_bytes) / 2**20))
            continue
        found = next((u for u in report.units if u.name == unit), None)
        if found is not None:
            cpu.append((report.ts, found.cpu_percent))
            mem.append((report.ts, found.rss_bytes / 2**20))
    return {"cpu_percent": cpu, "rss_mib": mem}


def _page_datasets(ctx: ApiContext) -> list[dict[str, Any]] | None:
    """The page's dataset section is optional: it says "not available" rather than fail the whole page."""
    try:
        return datasets_view(ctx)
    except Exception:  # noqa: BLE001 - the rest of the page matters more than this section
        return None
