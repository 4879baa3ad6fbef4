"""Inbound Alertmanager: ``POST /api/v1/alerts`` takes Alertmanager's version-4 webhook payload.

So an existing Prometheus alerting setup can drive remediation: each firing
alert becomes an ``external_alert`` finding (see ``alerts.py``) — node from the
``node`` label, else ``instance`` without its port; unit from ``unit``, else
``job``; severity from ``severity`` — and a resolved alert clears it. An
alert Alertmanager stops re-sending expires after ``controller.alerts.ttl``
(by default twice Alertmanager's default ``repeat_interval`` of 4 h).

The payload is validated strictly (types, sizes, ``version == "4"``); a
malformed one is answered with 422 problem+json and counted in
``selfheal_alerts_received_total{outcome="malformed"}``, never raised.
Behind the same bearer token as the other mutating endpoints.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from controller.sources.alerts import ExternalAlert, ExternalAlerts, node_from_instance, severity_of
from selfheal.clocks import Clock
from selfheal.logs import RateLimiter, get_logger

MAX_BODY = 1 << 20
DEFAULT_NODE = "external"
"""Node of an alert with neither a ``node`` nor an ``instance`` label (a cluster-wide alert)."""

LabelName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
LabelValue = Annotated[str, StringConstraints(max_length=1024)]
Labels = Annotated[dict[LabelName, LabelValue], Field(max_length=64)]
Annotations = Annotated[dict[LabelName, Annotated[str, StringConstraints(max_length=4096)]], Field(max_length=64)]

log = get_logger("alertmanager")


class AlertIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    status: Literal["firing", "resolved"]
    labels: Labels
    annotations: Annotations = Field(default_factory=dict)
    startsAt: datetime  # noqa: N815 - Alertmanager's field names
    endsAt: datetime | None = None  # noqa: N815
    generatorURL: Annotated[str, StringConstraints(max_length=4096)] = ""  # noqa: N815
    fingerprint: Annotated[str, StringConstraints(max_length=64)] = ""


class WebhookIn(BaseModel):
    """Alertmanager's webhook body, version 4."""

    model_config = ConfigDict(extra="forbid", strict=True)
    version: Literal["4"]
    groupKey: Annotated[str, StringConstraints(max_length=4096)]  # noqa: N815
    truncatedAlerts: int = Field(0, ge=0)  # noqa: N815
    status: Literal["firing", "resolved"]
    receiver: Annotated[str, StringConstraints(max_length=256)]
    groupLabels: Labels  # noqa: N815
    commonLabels: Labels  # noqa: N815
    commonAnnotations: Annotations  # noqa: N815
    externalURL: Annotated[str, StringConstraints(max_length=4096)]  # noqa: N815
    alerts: Annotated[list[AlertIn], Field(min_length=1, max_length=1000)]


def to_alert(alert: AlertIn) -> ExternalAlert:
    labels = alert.labels
    node = labels.get("node") or (node_from_instance(labels["instance"]) if labels.get("instance") else "")
    unit = labels.get("unit") or labels.get("job") or None
    name = labels.get("alertname", "alert")
    summary = alert.annotations.get("summary") or alert.annotations.get("description") or name
    return ExternalAlert(source="alertmanager", name=name, node=(node or DEFAULT_NODE)[:253], unit=unit,
                         severity=severity_of(labels.get("severity")), summary=summary[:300], labels=dict(labels))


def create_alerts_router(*, alerts: ExternalAlerts, clock: Clock, ttl: float, token: str | None,
                         count: Any, wake: Any = None) -> APIRouter:
    """``count(outcome)`` increments the received-payload metric; ``wake()`` nudges the engine."""
    router = APIRouter(prefix="/api/v1")
    limiter = RateLimiter(period=60.0)

    def problem(status: int, title: str, detail: str) -> JSONResponse:
        return JSONResponse({"type": "about:blank", "title": title, "status": status, "detail": detail,
                             "instance": "/api/v1/alerts"}, status_code=status, media_type="application/problem+json")

    @router.post("/alerts", status_code=200, responses={401: {}, 413: {}, 422: {}, 503: {}},
                 openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                     "schema": WebhookIn.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def receive(request: Request, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        if token is None:
            count("unauthorized")
            return problem(503, "Unavailable", "no API token is configured (security.api_token_file): "
                                               "mutating endpoints are disabled")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            count("unauthorized")
            return problem(401, "Unauthorized", "a valid bearer token is required")
        body = await request.body()
        if len(body) > MAX_BODY:
            count("malformed")
            return problem(413, "Payload too large", f"at most {MAX_BODY} bytes")
        try:
            payload = WebhookIn.model_validate_json(body)
        except ValidationError as exc:
            count("malformed")
            detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                               for e in exc.errors()[:10])
            if limiter.allow("alertmanager", "malformed", clock.monotonic()):
                log.warning("alerts.malformed", error=detail[:500])
            return problem(422, "Invalid request", detail[:2000])
        now = clock.wall()
        firing = resolved = 0
        for item in payload.alerts:
            alert = to_alert(item)
            if item.status == "firing":
                alerts.fire(alert, now=now, ttl=ttl)
                firing += 1
            else:
                alerts.resolve(alert)
                resolved += 1
        count("accepted")
        if wake is not None:
            await wake()
        return JSONResponse({"firing": firing, "resolved": resolved, "held": len(alerts)})

    return router
