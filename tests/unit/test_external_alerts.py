"""External alerts: the bounded store with a TTL, Alertmanager payload parsing, PromQL results, SVG plots."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from controller.page import incidents_per_hour, render_incident_page
from controller.plots import render_bars, render_lines
from controller.sources.alertmanager import WebhookIn, to_alert
from controller.sources.alerts import ExternalAlert, ExternalAlerts, node_from_instance
from controller.sources.promql import alerts_from_result
from selfheal.config import PromQLConfig


def _alert(name: str = "Down", node: str = "n1", unit: str | None = "web", severity: str = "warning") -> ExternalAlert:
    return ExternalAlert(source="alertmanager", name=name, node=node, unit=unit, severity=severity,  # type: ignore[arg-type]
                         summary=f"{name} on {node}", labels={"alertname": name, "instance": f"{node}:9100"})


def payload(**alert: object) -> dict[str, object]:
    return {"version": "4", "groupKey": "{}:{}", "truncatedAlerts": 0, "status": "firing", "receiver": "selfheal",
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am:9093",
            "alerts": [{"status": "firing", "labels": {"alertname": "Down", "instance": "node-a:9100", "job": "web",
                                                        "severity": "critical"},
                        "annotations": {"summary": "web is down"}, "startsAt": "2024-05-01T10:00:00Z",
                        "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://p", "fingerprint": "abc",
                        **alert}]}


@pytest.mark.parametrize(("instance", "node"), [("node-a:9100", "node-a"), ("node-a", "node-a"),
                                                ("[::1]:9100", "::1"), ("10.0.0.1:80", "10.0.0.1")])
def test_node_from_instance_strips_the_port(instance: str, node: str) -> None:
    assert node_from_instance(instance) == node


def test_a_firing_alert_is_a_finding_until_resolved_or_expired() -> None:
    store = ExternalAlerts()
    store.fire(_alert(), now=100.0, ttl=10.0)
    [finding] = store.findings(105.0)
    assert (finding.kind, finding.node, finding.unit, finding.severity) == ("external_alert", "n1", "web", "warning")
    assert finding.labels["alertname"] == "Down"
    assert finding.labels["source"] == "alertmanager"
    assert store.findings(110.0) == []  # not re-sent within the TTL
    store.fire(_alert(), now=200.0, ttl=10.0)
    assert store.resolve(_alert())
    assert store.findings(201.0) == []


def test_alerts_on_one_target_make_one_finding_led_by_the_most_severe() -> None:
    store = ExternalAlerts()
    store.fire(_alert("Slow"), now=0.0, ttl=60.0)
    store.fire(_alert("Down", severity="critical"), now=0.0, ttl=60.0)
    [finding] = store.findings(1.0)
    assert finding.severity == "critical"
    assert finding.labels["alertname"] == "Down"
    assert finding.evidence["count"] == 2
    assert finding.summary.endswith("(+1 more)")


def test_the_store_is_bounded() -> None:
    store = ExternalAlerts(max_alerts=3)
    for i in range(5):
        store.fire(_alert(node=f"n{i}"), now=float(i), ttl=10.0)
    assert len(store) == 3
    assert store.evicted == 2
    assert {f.node for f in store.findings(5.0)} == {"n2", "n3", "n4"}


def test_a_valid_alertmanager_payload_parses() -> None:
    webhook = WebhookIn.model_validate_json(json.dumps(payload()))
    alert = to_alert(webhook.alerts[0])
    assert (alert.node, alert.unit, alert.severity, alert.summary) == ("node-a", "web", "critical", "web is down")


@pytest.mark.parametrize("bad", [{"status": "maybe"}, {"labels": {"alertname": 3}}, {"startsAt": "yesterday"},
                                 {"labels": {"bad-name": "x"}}, {"extra": 1}])
def test_malformed_alerts_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        WebhookIn.model_validate_json(json.dumps(payload(**bad)))


def test_promql_series_above_the_threshold_become_alerts() -> None:
    entry = PromQLConfig(name="cpu-hot", url="http://p:9090", query="x", above=0.5, for_unit="job")
    result = [{"metric": {"instance": "a:9100", "job": "web"}, "value": [1.0, "0.9"]},
              {"metric": {"instance": "b:9100", "job": "web"}, "value": [1.0, "0.1"]},
              {"metric": {"instance": "c:9100"}, "value": [1.0, "NaN"]}]
    [alert] = alerts_from_result(entry, result)
    assert (alert.node, alert.unit, alert.value, alert.source) == ("a", "web", 0.9, "promql:cpu-hot")


def test_plots_and_the_incident_page_escape_everything() -> None:
    evil = "<script>alert(1)</script>"
    svg = render_lines(evil, [(evil, [(0.0, 1.0), (60.0, 2.0)])], marker=30.0, marker_label=evil)
    assert svg.startswith("<svg")
    assert "<script>" not in svg
    assert "&lt;script&gt;" in svg
    assert "<script>" not in render_bars(evil, [(evil, 1.0)])
    html = render_incident_page(
        incident={"id": 7, "state": "open", "kind": "external_alert", "node": evil, "unit": None, "severity": "info",
                  "rule": None, "summary": evil, "opened_at": "t", "resolved_at": None},
        timeline=[{"at": "t", "kind": "opened", "data": {"x": evil}}], plans=[], metrics={}, opened_ts=0.0,
        version="1", now="t")
    assert "<script>" not in html
    assert 'href="/api/v1/incidents/7"' in html


def test_incidents_per_hour_counts_the_last_day() -> None:
    now = 10 * 3600 + 1800.0
    bars = incidents_per_hour([now - 10, now - 20, now - 3600, now - 30 * 3600], now)
    assert len(bars) == 24
    assert bars[-1][1] == 2
    assert bars[-2][1] == 1
    assert sum(v for _, v in bars) == 3
