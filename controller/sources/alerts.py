"""The store of external alerts (Alertmanager webhooks, PromQL results) and the findings they make.

An alert is identified by a fingerprint of its labels (the same alert sent by
two Alertmanager replicas is one alert). It holds until it is resolved,
replaced by a newer evaluation of its source, or not re-sent within its TTL.
Alerts on the same (node, unit) make one ``external_alert`` finding, because
a finding's key is its target: the most severe alert gives the summary and
the labels; the evidence lists every alert (bounded).

Pure apart from the clock values passed in; bounded: at most ``max_alerts``
alerts, the ones closest to expiry are evicted first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from detectors.model import Finding, Severity

KIND = "external_alert"
RESERVED = frozenset({"kind", "node", "unit", "severity", "rule", "group"})
"""Label names the engine sets itself; an alert's own labels of these names are not copied onto the finding."""
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
MAX_EVIDENCE = 20


@dataclass(frozen=True, slots=True)
class ExternalAlert:
    source: str
    """Where it came from: ``alertmanager`` or ``promql:<name>``."""
    name: str
    """``alertname``, or the PromQL entry's name."""
    node: str
    unit: str | None
    severity: Severity
    summary: str
    labels: Mapping[str, str] = field(default_factory=dict)
    value: float | None = None

    @property
    def fingerprint(self) -> str:
        text = "\0".join(f"{k}\0{v}" for k, v in sorted({**self.labels, "__source__": self.source}.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def node_from_instance(instance: str) -> str:
    """``host:9100`` → ``host``; ``[::1]:9100`` → ``::1``; a bare host stays as it is."""
    text = instance.strip()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host
    return text


def severity_of(value: str | None, default: Severity = "warning") -> Severity:
    text = (value or "").lower()
    if text in ("critical", "error", "page", "high"):
        return "critical"
    if text in ("info", "informational", "none", "low"):
        return "info"
    if text in ("warning", "warn", "medium"):
        return "warning"
    return default


class ExternalAlerts:
    def __init__(self, *, max_alerts: int = 10_000) -> None:
        self.max_alerts = max_alerts
        self._alerts: dict[str, tuple[ExternalAlert, float]] = {}
        """fingerprint → (alert, expires at)."""
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._alerts)

    def fire(self, alert: ExternalAlert, *, now: float, ttl: float) -> None:
        self._alerts[alert.fingerprint] = (alert, now + ttl)
        self._bound()

    def resolve(self, alert: ExternalAlert) -> bool:
        return self._alerts.pop(alert.fingerprint, None) is not None

    def replace(self, source: str, alerts: Iterable[ExternalAlert], *, now: float, ttl: float) -> None:
        """A source that reports its whole current set (a PromQL evaluation): what is absent has cleared."""
        for fingerprint in [f for f, (a, _) in self._alerts.items() if a.source == source]:
            del self._alerts[fingerprint]
        for alert in alerts:
            self._alerts[alert.fingerprint] = (alert, now + ttl)
        self._bound()

    def current(self, now: float) -> list[ExternalAlert]:
        for fingerprint in [f for f, (_, until) in self._alerts.items() if until <= now]:
            del self._alerts[fingerprint]
        return [a for a, _ in self._alerts.values()]

    def findings(self, now: float) -> list[Finding]:
        by_target: dict[tuple[str, str | None], list[ExternalAlert]] = {}
        for alert in self.current(now):
            by_target.setdefault((alert.node, alert.unit), []).append(alert)
        out = []
        for (node, unit), alerts in sorted(by_target.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            alerts.sort(key=lambda a: (-SEVERITY_RANK[a.severity], a.name, a.fingerprint))
            top = alerts[0]
            more = f" (+{len(alerts) - 1} more)" if len(alerts) > 1 else ""
            out.append(Finding(
                kind=KIND, node=node, unit=unit, severity=top.severity, summary=f"{top.summary}{more}",
                evidence={"alerts": [{"source": a.source, "name": a.name, "severity": a.severity,
                                      "value": a.value, "labels": dict(a.labels)} for a in alerts[:MAX_EVIDENCE]],
                          "count": len(alerts)},
                labels={"source": top.source.split(":", 1)[0], "alertname": top.name,
                        **{k: v for k, v in top.labels.items() if k not in RESERVED}}))
        return out

    def _bound(self) -> None:
        excess = len(self._alerts) - self.max_alerts
        if excess <= 0:
            return
        for fingerprint, _ in sorted(self._alerts.items(), key=lambda kv: kv[1][1])[:excess]:
            del self._alerts[fingerprint]
        self.evicted += excess
