"""The controller's HTTP API (FastAPI): health, readiness, metrics, fleet and incidents.

Contract: docs/ARCHITECTURE.md and DESIGN.md §5. Lists are ``{"items": [...]}``,
errors are ``application/problem+json`` (RFC 9457), times are ISO 8601 UTC,
OpenAPI 3.1 is served at ``/api/v1/openapi.json`` and rendered as plain HTML
at ``/api/v1/docs`` (no CDN, no JavaScript). Tokens and the 1 MiB body cap
are enforced in front of the app by ``api_gate.ApiGate``, before any body is
read; the OpenAPI document lists every problem response an operation can
give (401/403/413/503 at the gate, 404 for unknown or out-of-range ids, 422
for bad parameters and bodies, malformed JSON included).

Reads answer from state kept up to date as messages come
(``controller.fleet_index``), never by walking the fleet: the node and unit
lists are pages (``?limit=``, at most ``MAX_PAGE``; ``?after=`` the cursor
the previous page gave as ``next``), the status page shows the fleet's
counts, its nodes with a problem and one page of nodes, and the datasets
view is recomputed only when a digest, a replica's presence or a
localisation changed.

Several controllers (``controller.peers``): the node and unit lists and the
status page answer for the whole fleet on any controller, each peer asked for
its own part (``scope=local``) and the parts merged; ``missing`` names the
controllers that did not answer. Incidents, plans, silences and the pause
come from the shared store.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import Scope

import selfheal
from controller.api_actions import create_actions
from controller.api_copies import create_copies
from controller.api_gate import MUTATING, OPEN_PATHS, ApiGate, Tokens, problem
from controller.engine import Engine
from controller.fleet import Fleet, NodeState
from controller.fleet_index import FleetCounts, FleetIndex, node_offline, unit_unhealthy
from controller.metrics import ControllerMetrics
from controller.page import render_api_docs, render_incident_page, render_status_page
from controller.peers import FORWARDED, Peers, merge_pages, merge_views, node_key, unit_cursor, unit_key
from controller.sources.alertmanager import create_alerts_router
from controller.sources.alerts import ExternalAlerts
from controller.store import Incident, PlanRecord, Store
from selfheal.clocks import Clock, iso
from selfheal.errors import StoreError
from selfheal.logs import get_logger
from selfheal.wire import UnitReport

T = TypeVar("T")
log = get_logger("controller.api")
MAX_ID = 2**63 - 1
"""Ids are SQLite integers: anything beyond is no incident (404), not an overflow (500)."""
BODY_NOT_PARSED = "There was an error parsing the body"
"""FastAPI's 400 for a body it could not even decode (the issue's undocumented 400)."""
DEFAULT_PAGE = 500
"""Nodes (or units) a list answers with when ``limit`` is not given."""
MAX_PAGE = 5000
"""The most a client may ask for at once: a 10,000-node fleet is never serialised in one response."""
PAGE_NODES = 100
"""Nodes the status page lists per page (``/?after=`` for the next)."""
PAGE_PROBLEMS = 50
"""Nodes with a problem the status page lists (the first in order; the count says how many there are)."""
MAX_CURSOR = 200
"""Longest ``after`` (or ``node``) accepted: ids are at most 63 characters, a unit cursor twice that."""


@dataclass
class ApiContext:
    fleet: Fleet
    store: Store
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
    read_token_file: str | None = None
    """``security.api_read_token_file``: when set, reads need this token (or the mutating one)."""
    unknown_nodes: Mapping[str, Any] | None = None
    """Node ids heard without a key (``controller.app.UnknownNode`` by id): listed, never acted on."""
    index: FleetIndex | None = None
    """Counts and orderings kept up to date as messages are applied (the controller shares its own with its
    metrics); made here when not given."""
    peers: Peers | None = None
    """The other controllers sharing the fleet (several controllers on PostgreSQL); None: this is the only one."""

    def __post_init__(self) -> None:
        self.view: FleetIndex = self.index or FleetIndex(self.fleet, offline_after=self.offline_after)


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


class SeriesOut(BaseModel):
    """A node's (or one unit's) CPU and memory from its bounded report history: ``[time, value]`` pairs.

    Lists, not tuples: a tuple's schema (``prefixItems``) was once rendered in the OpenAPI document in the
    older ``items: [...]`` form, which OpenAPI 3.1 rejects (schemathesis, in the full suite)."""

    node: str
    unit: str | None
    cpu_percent: list[list[float]]
    rss_mib: list[list[float]]


class Items(BaseModel, Generic[T]):
    items: list[T]


class UnknownNodeOut(BaseModel):
    id: str
    first_seen: str | None
    last_seen: str | None
    messages: int


class NodesOut(BaseModel):
    items: list[NodeOut]
    """One page of nodes, in id order."""
    unknown: list[UnknownNodeOut] = []
    """Node ids heard on the broker with no key in ``security.key_dir`` (signed node traffic is on): their
    messages are dropped, never acted on; the longest silent are forgotten beyond 256."""
    total: int = 0
    """Nodes the controller knows, on every page."""
    next: str | None = None
    """The cursor of the next page (pass it as ``after``); null on the last page."""
    missing: list[str] = []
    """Controllers that did not answer (several controllers): the nodes they act on are not in this page."""


class ProblemNodeOut(NodeOut):
    sick: list[UnitOut]
    """Its unhealthy units."""


class UnitsOut(BaseModel):
    items: list[UnitOut]
    """One page of units, in (node, name) order."""
    total: int = 0
    """Units the listing covers (the fleet's, or the node's with ``node=``)."""
    next: str | None = None
    """The cursor of the next page, ``node/unit`` (pass it as ``after``); null on the last page."""
    missing: list[str] = []
    """Controllers that did not answer (several controllers): the units of their nodes are not in this page."""


class ViewOut(BaseModel):
    """One controller's own part of the status page (``/api/v1/view``)."""

    counts: dict[str, Any]
    nodes: list[NodeOut]
    units: list[UnitOut]
    problems: list[ProblemNodeOut]
    next: str | None = None


def create_api(ctx: ApiContext) -> FastAPI:
    app = FastAPI(title="selfheal controller", version=selfheal.__version__,
                  openapi_url="/api/v1/openapi.json", docs_url=None, redoc_url=None)
    tokens = Tokens(write=ctx.api_token, read=read_token(ctx.read_token_file),
                    reads_protected=ctx.read_token_file is not None)

    def refused(reason: str, path: str) -> None:
        ctx.metrics.api_refused.labels(reason).inc()
        if path == "/api/v1/alerts":  # the webhook's own outcome counter, as when the router refused
            ctx.metrics.alerts_received.labels("malformed" if reason == "too_large" else "unauthorized").inc()

    app.add_middleware(ApiGate, tokens=tokens, refused=refused)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(
                get_openapi(title=app.title, version=app.version, routes=app.routes),
                reads_protected=tokens.reads_protected)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise it

    @app.exception_handler(HTTPException)
    async def http_problem(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == BODY_NOT_PARSED:  # documented as a 422 like any bad body
            return _problem(422, "the body is not valid JSON", request.url.path)
        response = _problem(exc.status_code, str(exc.detail), request.url.path)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first route's methods; a path may have several
            response.headers["Allow"] = ", ".join(_allowed(app, request.scope))
        return response

    @app.exception_handler(StoreError)
    async def unrecorded(request: Request, exc: StoreError) -> JSONResponse:
        return _problem(503, str(exc), request.url.path)  # nothing was changed: it could not be recorded

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:20])
        return _problem(422, detail[:2000], request.url.path)

    app.include_router(create_actions(engine=ctx.engine, store=ctx.store, clock=ctx.clock, token=ctx.api_token,
                                      peers=ctx.peers))
    app.include_router(_fleet_routes(ctx))
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

    @app.get("/api/v1/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_api_docs(app.openapi()))

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"}})
    async def metrics() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


    @app.get("/api/v1/incidents")
    async def incidents(state: Literal["open", "failed", "resolved"] | None = Query(None),
                        limit: int = Query(200, ge=1, le=1000)) -> Items[IncidentOut]:
        rows = await ctx.store.list_incidents(state=state, limit=limit)
        return Items(items=[_incident(i) for i in rows])

    @app.get("/api/v1/incidents/{incident_id}", responses={404: {"description": "no such incident"}})
    async def incident(incident_id: int) -> IncidentDetailOut:
        detail = await ctx.store.get_incident(incident_id) if 0 <= incident_id <= MAX_ID else None
        if detail is None:
            raise HTTPException(404, f"no incident {incident_id}")
        return IncidentDetailOut(
            **_incident(detail.incident).model_dump(),
            timeline=[TimelineOut(at=iso(e.at) or "", kind=e.kind, data=e.data, hash=e.hash)
                      for e in detail.timeline],
            plans=[_plan(p) for p in detail.plans])

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request, after: str | None = Query(None, max_length=MAX_CURSOR)) -> HTMLResponse:
        """The fleet's counts, its nodes with a problem, one page of nodes (after ``after``) and their units."""
        history = await ctx.store.list_incidents(limit=1000)  # newest first: the plots' bounded window
        plans = await ctx.store.list_plans(limit=20)
        fleet, missing = _view(ctx, after, PAGE_NODES), list[str]()
        asked = _peers(ctx, request, "fleet")
        if asked is not None:
            answers, missing = await asked.ask("/api/v1/view", {"after": after, "limit": PAGE_NODES}, request.headers)
            fleet = merge_views([fleet, *_valid(asked, "/api/v1/view", answers, ViewOut, missing)], PAGE_NODES,
                                PAGE_PROBLEMS)
        return HTMLResponse(_status_page(ctx, after, fleet, missing=missing, history=history, plans=plans))

    @app.get("/incidents/{incident_id}", response_class=HTMLResponse, responses={404: {}})
    async def incident_page(incident_id: int, request: Request) -> HTMLResponse:
        detail = await ctx.store.get_incident(incident_id) if 0 <= incident_id <= MAX_ID else None
        if detail is None:
            raise HTTPException(404, f"no incident {incident_id}")
        found = detail.incident
        return HTMLResponse(render_incident_page(
            incident=_incident(found).model_dump(), plans=[_plan(p).model_dump() for p in detail.plans],
            timeline=[{"at": iso(e.at) or "", "kind": e.kind, "data": e.data} for e in detail.timeline],
            metrics=await _incident_series(ctx, found, request), opened_ts=found.opened_at,
            version=selfheal.__version__, now=iso(ctx.clock.wall()) or ""))

    return app


def _fleet_routes(ctx: ApiContext) -> APIRouter:
    """The node, unit, plan and dataset lists, and a controller's own part of the status page."""
    router = APIRouter()

    @router.get("/api/v1/nodes")
    async def nodes(request: Request, limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
                    after: str | None = Query(None, max_length=MAX_CURSOR),
                    scope: Literal["fleet", "local"] = Query("fleet")) -> NodesOut:
        """One page of nodes in id order: those after the cursor ``after`` (the previous page's ``next``).
        ``scope=local``: only the nodes this controller acts on (several controllers)."""
        own = _nodes(ctx, after, limit)
        asked = _peers(ctx, request, scope)
        if asked is None:
            return own
        answers, missing = await asked.ask("/api/v1/nodes", {"limit": limit, "after": after}, request.headers)
        pages = [own.model_dump(), *_valid(asked, "/api/v1/nodes", answers, NodesOut, missing)]
        items, cursor = merge_pages(pages, limit, node_key, node_key)
        unknown = {u["id"]: u for page in pages for u in page.get("unknown", ())}
        return NodesOut(items=[NodeOut(**i) for i in items], unknown=[UnknownNodeOut(**u) for _, u in
                                                                      sorted(unknown.items())],
                        total=sum(int(p.get("total", 0)) for p in pages), next=cursor, missing=missing)

    @router.get("/api/v1/units")
    async def units(request: Request, limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
                    after: str | None = Query(None, max_length=MAX_CURSOR),
                    node: str | None = Query(None, max_length=MAX_CURSOR),
                    scope: Literal["fleet", "local"] = Query("fleet")) -> UnitsOut:
        """One page of units in (node, name) order, after the cursor ``after`` (``node/unit``, the previous
        page's ``next``); ``node``: that node's units only. ``scope=local``: only those of the nodes this
        controller acts on (several controllers)."""
        own = _units(ctx, after, limit, node)
        asked = _peers(ctx, request, scope)
        if asked is None:
            return own
        answers, missing = await asked.ask("/api/v1/units", {"limit": limit, "after": after, "node": node},
                                           request.headers)
        pages = [own.model_dump(), *_valid(asked, "/api/v1/units", answers, UnitsOut, missing)]
        items, cursor = merge_pages(pages, limit, unit_key, unit_cursor)
        return UnitsOut(items=[UnitOut(**i) for i in items], total=sum(int(p.get("total", 0)) for p in pages),
                        next=cursor, missing=missing)

    @router.get("/api/v1/plans")
    async def plans(limit: int = Query(200, ge=1, le=1000)) -> Items[PlanOut]:
        rows = await ctx.store.list_plans(limit=limit)
        return Items(items=[_plan(p) for p in rows])

    @router.get("/api/v1/datasets")
    async def datasets() -> Items[DatasetOut]:
        return Items(items=[DatasetOut(**d) for d in datasets_view(ctx)])

    @router.get("/api/v1/nodes/{node}/series", responses={404: {}, 421: {}})
    async def series(node: str, unit: str | None = Query(None, max_length=MAX_CURSOR)) -> SeriesOut:
        """The node's (or ``unit``'s) CPU and memory from the node's bounded report history, as the incident
        page plots them. A node this controller does not hear: 404, or 421 with several controllers (its
        own controller has them; the incident page asks it)."""
        if node not in ctx.fleet.nodes:
            raise HTTPException(421 if ctx.peers is not None else 404, f"{node[:MAX_CURSOR]} is not heard here")
        return SeriesOut.model_validate({"node": node, "unit": unit, **unit_series(ctx.fleet, node, unit)})

    @router.get("/api/v1/view")
    async def view(after: str | None = Query(None, max_length=MAX_CURSOR),
                   limit: int = Query(PAGE_NODES, ge=1, le=MAX_PAGE)) -> ViewOut:
        """This controller's own part of the status page (several controllers: each is asked for its own):
        its nodes' counts, its nodes with a problem, one page of its nodes and their units."""
        return ViewOut.model_validate(_view(ctx, after, limit))

    if ctx.peers is not None:  # several controllers: a migration across their buckets (controller.elsewhere)
        router.include_router(create_copies(engine=ctx.engine, token=ctx.api_token, member=ctx.peers.member))
    return router


def _valid(peers: Peers, path: str, answers: Mapping[str, dict[str, Any]], model: type[BaseModel],
           missing: list[str]) -> list[dict[str, Any]]:
    """The peers' answers that have the shape ``model`` says; a peer whose answer does not (another version,
    a bug) is counted with those that gave none (``missing``), never half-used."""
    valid = []
    for peer, answer in sorted(answers.items()):
        try:
            valid.append(model.model_validate(answer).model_dump())
        except ValidationError as exc:
            peers.failed(peer, path, exc)
            missing.append(peer)
    missing.sort()
    return valid


def _peers(ctx: ApiContext, request: Request, scope: str) -> Peers | None:
    """The peers to ask for the fleet's other parts: none for ``scope=local``, a forwarded request or a
    controller alone."""
    if scope == "local" or ctx.peers is None or FORWARDED in request.headers or not ctx.peers.members():
        return None
    return ctx.peers


async def _incident_series(ctx: ApiContext, incident: Incident,
                           request: Request) -> dict[str, list[tuple[float, float]]]:
    """The incident's unit (or node) series: from this controller's history of the node, or, for a node another
    controller hears (several controllers), from that one's; empty when it did not answer."""
    node, unit = incident.node, incident.unit
    peers = _peers(ctx, request, "fleet")
    if node in ctx.fleet.nodes or peers is None:
        return unit_series(ctx.fleet, node, unit)
    path = f"/api/v1/nodes/{quote(node, safe='')}/series" + (f"?unit={quote(unit, safe='')}" if unit else "")
    answer = await peers.forward("GET", path, request.headers)
    if answer is None or answer.status_code != 200:
        return unit_series(ctx.fleet, node, unit)  # empty: the page says there is no data
    try:
        found = SeriesOut.model_validate_json(answer.content)
    except ValidationError as exc:  # another version, a bug: counted as no answer
        peers.failed("owner", path, exc)
        return unit_series(ctx.fleet, node, unit)
    return {"cpu_percent": _pairs(found.cpu_percent), "rss_mib": _pairs(found.rss_mib)}


def _pairs(points: list[list[float]]) -> list[tuple[float, float]]:
    """A peer's ``[time, value]`` points; anything else it sent is left out."""
    return [(point[0], point[1]) for point in points if len(point) == 2]


def _problem(status: int, detail: str, instance: str) -> JSONResponse:
    return JSONResponse(problem(status, detail, instance), status_code=status, media_type="application/problem+json")


def read_token(path: str | None) -> str | None:
    """The read token; None when unset or unreadable (then only the mutating token reads: closed, not open)."""
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        log.warning("api.read_token_missing", path=path, error=exc.strerror,
                    effect="reads need the mutating token until the file is readable")
        return None
    return token or None


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "Problem", "description": "RFC 9457 problem details",
    "required": ["type", "title", "status", "detail", "instance"],
    "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "detail": {"type": "string"}, "instance": {"type": "string"}}}
PROBLEMS = {401: "no or a wrong bearer token", 403: "the read token on a mutating endpoint",
            404: "no such resource (or an id out of range)", 413: "the body is over 1 MiB",
            422: "invalid parameters or body (malformed JSON included)",
            503: "no API token is configured: mutating endpoints are disabled"}


def document_problems(schema: dict[str, Any], *, reads_protected: bool) -> dict[str, Any]:
    """List the problem responses each operation can give, as ``application/problem+json``, and the bearer
    scheme; FastAPI's own 422 (a different body) is replaced."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            _lift_definitions(operation, components["schemas"])
            operation["parameters"] = [p for p in operation.get("parameters", [])  # the security scheme says it
                                       if (p.get("in"), p.get("name", "").lower()) != ("header", "authorization")]
            if not operation["parameters"]:
                del operation["parameters"]
            mutating = method.upper() in MUTATING
            statuses = {401, 403, 413, 503} if mutating else set()
            if not mutating and reads_protected and path not in OPEN_PATHS:
                statuses.add(401)
            if mutating or (reads_protected and path not in OPEN_PATHS):
                operation["security"] = [{"bearer": []}]
            if operation.get("parameters") or operation.get("requestBody"):
                statuses.add(422)
            if "{" in path:
                statuses.add(404)
            responses = operation.setdefault("responses", {})
            for status in sorted(statuses | {int(s) for s in responses if s.isdigit() and int(s) >= 400}):
                responses[str(status)] = {
                    "description": PROBLEMS.get(status, responses.get(str(status), {}).get("description", "")),
                    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    text = str(schema.get("paths"))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"/{unused}'" not in text:
            components["schemas"].pop(unused, None)
    return schema


def _allowed(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at this path."""
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute | Route) and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def _lift_definitions(operation: dict[str, Any], schemas: dict[str, Any]) -> None:
    """A body schema given inline with its own ``$defs`` (refs pointing at components): move them there."""
    for content in operation.get("requestBody", {}).get("content", {}).values():
        for name, definition in content.get("schema", {}).pop("$defs", {}).items():
            schemas.setdefault(name, definition)


def _view(ctx: ApiContext, after: str | None, limit: int) -> dict[str, Any]:
    """The fleet part of the status page, from this controller's own nodes."""
    now = ctx.clock.wall()
    ids, cursor = ctx.view.page(after, limit)
    listed = [ctx.fleet.nodes[n] for n in ids]
    problems = [ctx.fleet.nodes[n] for n in ctx.view.problems(now, PAGE_PROBLEMS)]
    return {
        "counts": _counts(ctx.view.counts(now)),
        "nodes": [_node(n, now, ctx.offline_after).model_dump() for n in listed],
        "units": [_unit(n.id, u).model_dump() for n in listed for u in _sorted_units(n)],
        "problems": [{**_node(n, now, ctx.offline_after).model_dump(),
                      "sick": [_unit(n.id, u).model_dump() for u in _sorted_units(n) if unit_unhealthy(u)]}
                     for n in problems],
        "next": cursor,
    }


def _status_page(ctx: ApiContext, after: str | None, fleet: dict[str, Any], *, missing: list[str],
                 history: list[Incident], plans: list[PlanRecord]) -> str:
    now = ctx.clock.wall()
    return render_status_page(
        counts=fleet["counts"], nodes=fleet["nodes"], units=fleet["units"], problems=fleet["problems"],
        after=after, next_after=fleet["next"], missing=missing,
        incidents=[_incident(i).model_dump() for i in history[:30]], version=selfheal.__version__,
        now=iso(now) or "", plans=[_plan(p).model_dump() for p in plans], datasets=_page_datasets(ctx),
        history=[(i.opened_at, i.resolved_at) for i in history], now_ts=now)


def _node(node: NodeState, now: float, offline_after: float) -> NodeOut:
    return NodeOut(id=node.id, state="offline" if node_offline(node, now, offline_after) else "online",
                   last_seen=iso(node.last_seen) if node.last_seen else None, session=node.session,
                   version=node.version, units=sorted(node.units))


def datasets_view(ctx: ApiContext) -> list[dict[str, Any]]:
    """``describe_datasets``' view, as kept by the index (recomputed only when something it reads changed)."""
    return ctx.view.datasets(ctx.clock.wall(), ctx.engine.dispatcher.localisations)


def _nodes(ctx: ApiContext, after: str | None, limit: int) -> NodesOut:
    unknown = [UnknownNodeOut(id=n, first_seen=iso(u.first_seen), last_seen=iso(u.last_seen), messages=u.messages)
               for n, u in sorted((ctx.unknown_nodes or {}).items())]
    ids, cursor = ctx.view.page(after, limit)
    now = ctx.clock.wall()
    return NodesOut(items=[_node(ctx.fleet.nodes[n], now, ctx.offline_after) for n in ids], unknown=unknown,
                    total=len(ctx.fleet.nodes), next=cursor)


def _units(ctx: ApiContext, after: str | None, limit: int, node: str | None) -> UnitsOut:
    """Up to ``limit`` units after the cursor ``node/unit`` in (node, name) order, and the next page's cursor.

    A cursor without ``/`` starts at that node's first unit. The next cursor is given only when a unit
    follows, so the last page says so (looking for it passes over nodes without units)."""
    after_node, _, after_unit = (after or "").partition("/")
    if node is not None:
        known = ctx.fleet.nodes.get(node)
        ids: Iterator[str] = iter([node] if known is not None and node >= after_node else [])
        total = len(known.units) if known is not None else 0
    else:
        ids, total = ctx.view.ids_from(after_node), ctx.view.units
    out: list[UnitOut] = []
    for node_id in ids:
        for unit in _sorted_units(ctx.fleet.nodes[node_id]):
            if node_id == after_node and unit.name <= after_unit:
                continue
            if len(out) == limit:
                return UnitsOut(items=out, total=total, next=f"{out[-1].node}/{out[-1].name}")
            out.append(_unit(node_id, unit))
    return UnitsOut(items=out, total=total, next=None)


def _sorted_units(node: NodeState) -> list[UnitReport]:
    return sorted(node.units.values(), key=lambda u: u.name)


def _unit(node_id: str, unit: UnitReport) -> UnitOut:
    return UnitOut(node=node_id, name=unit.name, kind=unit.kind, state=unit.state, pid=unit.pid,
                   restarts=unit.restarts, healthy=unit.probe.healthy if unit.probe else None,
                   cpu_percent=unit.cpu_percent, rss_bytes=unit.rss_bytes, fenced=unit.fenced)


def _counts(counts: FleetCounts) -> dict[str, Any]:
    return {"nodes": counts.nodes, "online": counts.online, "offline": counts.offline, "units": counts.units,
            "unhealthy": counts.unhealthy, "unit_states": dict(counts.unit_states),
            "problem_nodes": counts.problem_nodes}


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
