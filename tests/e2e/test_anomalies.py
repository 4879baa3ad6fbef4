"""Anomaly detection end to end: a real unit leaking memory is caught before it reaches its limit,
and a healthy but noisy unit watched the same way over the same time opens nothing."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.conftest import eventually_sync
from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.e2e
LIMIT_MB = 400

LEAKY = """
import time
hoard = []
while True:
    if len(hoard) < 80:          # grows 8 MB/s up to ~330 MB, then stays: it never reaches the limit here
        hoard.append(bytearray(4 * 1024 * 1024))
    time.sleep(0.5)
"""
NOISY = """
import random, time
random.seed(7)
while True:                      # 10-40 MB, up and down, no trend
    block = bytearray(random.randint(10, 40) * 1024 * 1024)
    time.sleep(0.3)
    del block
"""


def _unit(name: str, source: str) -> str:
    return (f'[[agent.units]]\nname = "{name}"\nkind = "process"\n'
            f"command = [{json.dumps(sys.executable)}, \"-c\", {json.dumps(source)}]\n")


def test_a_leaking_unit_opens_an_anomaly_incident_before_its_limit_and_a_noisy_one_does_not(
        cluster: Cluster) -> None:
    rules = cluster.root / "rules.yaml"
    rules.write_text(f"""version: 1
anomalies:
  - name: unit-memory-leak
    metric: unit.rss_bytes
    detector: {{kind: forecast, limit: {LIMIT_MB * 2**20}, horizon: 60, window: 20, min_span: 10}}
    policy: {{threshold: 0.5, persistence: 3, window: 4, hold: 30}}
    severity: warning
rules:
  - name: report-anomaly
    match: {{kind: metric_anomaly}}
    ladder: [{{action: notify}}]
    verify: {{kind: cleared}}
""")
    cluster.start("controller", "controller", cluster.write_controller(f'rulebooks = ["{rules}"]\n'))
    cluster.wait_ready()
    cluster.start("node-m", "agent", cluster.write_agent("node-m", _unit("leaky", LEAKY) + _unit("noisy", NOISY),
                                                         interval=0.5))

    def anomaly(unit: str) -> dict[str, object] | None:
        return next((i for i in cluster.get("/api/v1/incidents")["items"]
                     if i["kind"] == "metric_anomaly" and i["unit"] == unit), None)

    eventually_sync(lambda: anomaly("leaky") is not None, timeout=60, what="an anomaly incident for the leak")
    incident = anomaly("leaky")
    assert incident is not None
    opened = cluster.get(f"/api/v1/incidents/{incident['id']}")["timeline"][0]
    evidence = opened["data"]["evidence"]
    assert evidence["watch"] == "unit-memory-leak"
    assert evidence["score"] >= 0.5
    assert evidence["detector"]["eta_s"] > 0  # predicted, not yet reached
    window = evidence["window"]
    assert window  # the samples that triggered it are in the incident
    assert max(sample["value"] for sample in window) < LIMIT_MB * 2**20
    assert any(e["kind"] == "notification" for e in cluster.get(f"/api/v1/incidents/{incident['id']}")["timeline"])
    time.sleep(10)  # an observation period for the noisy unit, not a wait for a condition
    assert anomaly("noisy") is None  # watched as long and longer, by the same detector
