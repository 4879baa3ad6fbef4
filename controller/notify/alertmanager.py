"""A generic webhook in Alertmanager's webhook format (version 4), so existing receivers work unchanged.

Format (Prometheus Alertmanager ``webhook_config``): ``version: "4"``,
``groupKey``, ``truncatedAlerts``, ``status`` (``firing`` while any alert
fires, else ``resolved``), ``receiver``, ``groupLabels``, ``commonLabels``,
``commonAnnotations``, ``externalURL`` and ``alerts``: each with ``status``,
``labels``, ``annotations``, ``startsAt``/``endsAt`` (RFC 3339; a firing
alert ends at ``0001-01-01T00:00:00Z``), ``generatorURL`` and
``fingerprint`` — computed like Prometheus' label-set fingerprint (FNV-1a 64
over sorted names and values), so it is stable per label set. Each incident is
one alert: ``alertname`` is the finding kind, ``incident`` its id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from controller.notify.delivery import header_retry_after
from controller.notify.model import AlertView, GroupMessage
from selfheal.clocks import iso

ZERO_TIME = "0001-01-01T00:00:00Z"
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


class AlertmanagerFormatter:
    def render(self, message: GroupMessage) -> dict[str, Any]:
        alerts = [_alert(a) for a in message.alerts]
        common_labels = _common(a["labels"] for a in alerts)
        common_annotations = _common(a["annotations"] for a in alerts)
        return {
            "version": "4", "groupKey": message.group_key, "truncatedAlerts": message.truncated,
            "status": message.status, "receiver": message.receiver, "groupLabels": dict(message.group_labels),
            "commonLabels": common_labels, "commonAnnotations": common_annotations,
            "externalURL": message.external_url, "alerts": alerts}

    def retry_after(self, response: httpx.Response, now: float) -> float | None:
        return header_retry_after(response, now)


def _common(maps: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """The pairs every alert shares (Alertmanager's commonLabels / commonAnnotations)."""
    sets = [set(m.items()) for m in maps]
    return dict(sorted(set.intersection(*sets))) if sets else {}


def _labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Alertmanager receivers expect non-empty string label values."""
    return {k: str(v) for k, v in sorted(labels.items()) if v != ""}


def _alert(alert: AlertView) -> dict[str, Any]:
    labels = _labels({**alert.labels, "alertname": alert.labels.get("kind", "selfheal"),
                      "incident": str(alert.incident_id)})
    annotations = {"summary": alert.what_broke, "description": f"selfheal did: {alert.did}; worked: {alert.worked}",
                   "selfheal_did": alert.did, "selfheal_worked": alert.worked}
    if alert.link:
        annotations["incident_url"] = alert.link
    return {
        "status": alert.status, "labels": labels, "annotations": annotations,
        "startsAt": iso(alert.started_at), "endsAt": iso(alert.ended_at) if alert.ended_at is not None else ZERO_TIME,
        "generatorURL": alert.link, "fingerprint": fingerprint(labels)}


def fingerprint(labels: Mapping[str, str]) -> str:
    digest = FNV_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode() + b"\xff":
                digest = ((digest ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}"
