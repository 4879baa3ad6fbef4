"""Observability against real components: Alertmanager webhooks in, a real Prometheus scraping the
controller and feeding a PromQL finding source, the dashboard's metrics on a live /metrics, and the
status page in a real headless Chromium (screenshot saved as a test artifact)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.app import Controller, running_controller
from selfheal.config import load_config
from tests.conftest import Broker, eventually, free_port, require_binary
from tests.dashboard_support import DATASET_METRICS, exprs, family_of, load_dashboard, metric_names

pytestmark = pytest.mark.integration
TOKEN = "observability-token-0123456789"  # noqa: S105 - a test fixture, not a secret


def _config(tmp_path: Path, broker: Broker, *, port: int | None = None, extra: str = "") -> Path:
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN + "\n")
    path = tmp_path / "controller.toml"
    path.write_text(
        f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 2.0\n'
        f'[controller]\nlisten = "127.0.0.1:{port or free_port()}"\nstate_dir = "{tmp_path / "state"}"\n'
        f"offline_after = 60.0\n{extra}"
        f'[security]\nkey_dir = "{tmp_path / "keys"}"\napi_token_file = "{token_file}"\n')
    return path


def _http(controller: Controller, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://{controller.api_address}", headers=headers)


def webhook(status: str = "firing", **labels: str) -> dict[str, Any]:
    labels = {"alertname": "ServiceDown", "instance": "am-node:9100", "job": "web", "severity": "critical", **labels}
    return {"version": "4", "groupKey": '{}:{alertname="ServiceDown"}', "truncatedAlerts": 0, "status": status,
            "receiver": "selfheal", "groupLabels": {"alertname": "ServiceDown"}, "commonLabels": labels,
            "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
            "alerts": [{"status": status, "labels": labels, "annotations": {"summary": "web <b>down</b>"},
                        "startsAt": "2024-05-01T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                        "generatorURL": "http://prometheus:9090/graph", "fingerprint": "0123456789abcdef"}]}


async def _incidents(client: httpx.AsyncClient, node: str) -> list[dict[str, Any]]:
    return [i for i in (await client.get("/api/v1/incidents")).json()["items"] if i["node"] == node]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_alertmanager_webhooks_open_and_resolve_incidents(tmp_path: Path, mosquitto: Broker) -> None:
    async with running_controller(load_config(_config(tmp_path, mosquitto))) as controller, \
            _http(controller) as client, _http(controller, token="wrong") as wrong:  # noqa: S106 - a wrong token on purpose
        assert (await wrong.post("/api/v1/alerts", json=webhook())).status_code == 401
        for bad in (b"{not json", json.dumps({**webhook(), "version": "3"}).encode(),
                    json.dumps({**webhook(), "alerts": [{"status": "firing"}]}).encode(),
                    json.dumps({**webhook(), "alerts": []}).encode()):
            response = await client.post("/api/v1/alerts", content=bad, headers={"Content-Type": "application/json"})
            assert response.status_code == 422, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["status"] == 422
        accepted = await client.post("/api/v1/alerts", json=webhook())
        assert accepted.status_code == 200, accepted.text
        assert accepted.json() == {"firing": 1, "resolved": 0, "held": 1}

        async def opened() -> bool:
            return bool(await _incidents(client, "am-node"))
        await eventually(opened, what="an external_alert incident on am-node")
        [incident] = await _incidents(client, "am-node")
        assert (incident["kind"], incident["unit"], incident["severity"]) == ("external_alert", "web", "critical")
        assert incident["rule"] == "report-external-alert"
        assert incident["summary"] == "web <b>down</b>"
        metrics = _samples((await client.get("/metrics")).text)
        assert metrics[("selfheal_alerts_received_total", (("outcome", "malformed"),))] == 4
        assert metrics[("selfheal_alerts_received_total", (("outcome", "unauthorized"),))] == 1
        assert metrics[("selfheal_findings", (("kind", "external_alert"),))] == 1
        page = (await client.get(f"/incidents/{incident['id']}")).text
        assert "web &lt;b&gt;down&lt;/b&gt;" in page
        assert "<b>down</b>" not in page

        resolved = await client.post("/api/v1/alerts", json=webhook("resolved"))
        assert resolved.json()["resolved"] == 1

        async def closed() -> bool:
            return (await _incidents(client, "am-node"))[0]["state"] == "resolved"
        await eventually(closed, timeout=30, what="the incident resolved after the alert resolved")


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Start a real Prometheus scraping a target every second; stopped at teardown."""
    binary = require_binary("prometheus", "prometheus")
    started: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def start(target: str) -> Prometheus:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: selfheal\n"
            "    scrape_interval: 1s\n"
            f"    static_configs: [{{targets: ['{target}'], labels: {{node: prom-node}}}}]\n")
        log = (tmp_path / "prometheus.log").open("wb")
        logs.append(log)
        process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        started.append(process)
        return Prometheus(f"http://127.0.0.1:{port}", process)

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    for log in logs:
        log.close()


async def test_a_real_prometheus_scrapes_the_controller_and_a_promql_source_opens_an_incident(
        tmp_path: Path, mosquitto: Broker, prometheus_for: Any) -> None:
    api_port = free_port()
    prometheus = prometheus_for(f"127.0.0.1:{api_port}")
    extra = ('[[controller.promql]]\nname = "selfheal-scraped"\n'
             f'url = "{prometheus.url}"\nquery = \'up{{job="selfheal"}}\'\ninterval = 0.5\ntimeout = 2.0\n'
             'for_node = "node"\nfor_unit = "job"\nseverity = "warning"\nabove = 0\n'
             '[[controller.promql]]\nname = "unreachable"\nurl = "http://127.0.0.1:9"\nquery = "up"\n'
             "interval = 0.5\ntimeout = 0.5\n")
    config = load_config(_config(tmp_path, mosquitto, port=api_port, extra=extra))
    async with running_controller(config) as controller, _http(controller) as client, \
            httpx.AsyncClient(base_url=prometheus.url) as prom:
        async def scraped() -> bool:
            assert prometheus.process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                body = (await prom.get("/api/v1/query", params={"query": 'selfheal_nodes{state="online"}'})).json()
            except httpx.TransportError:
                return False
            return body.get("status") == "success" and bool(body["data"]["result"])
        await eventually(scraped, timeout=30, what="Prometheus to have scraped selfheal_nodes from the controller")

        async def opened() -> bool:
            return bool(await _incidents(client, "prom-node"))
        await eventually(opened, timeout=30, what="a PromQL finding opening an incident on prom-node")
        [incident] = await _incidents(client, "prom-node")
        assert (incident["kind"], incident["unit"]) == ("external_alert", "selfheal")
        assert "selfheal-scraped" in incident["summary"]
        metrics = _samples((await client.get("/metrics")).text)
        assert metrics[("selfheal_promql_evaluations_total", (("outcome", "ok"), ("query", "selfheal-scraped")))] >= 1
        # An unreachable Prometheus is counted, and the loop goes on.
        assert metrics[("selfheal_promql_evaluations_total", (("outcome", "error"), ("query", "unreachable")))] >= 1


async def test_every_metric_the_dashboard_uses_is_exported(tmp_path: Path, mosquitto: Broker) -> None:
    used = set().union(*(metric_names(e) for e in exprs(load_dashboard())))
    async with running_controller(load_config(_config(tmp_path, mosquitto))) as controller, \
            _http(controller) as client:
        text = (await client.get("/metrics")).text
    exported: set[str] = set()
    for family in text_string_to_metric_families(text):
        exported |= {family.name, f"{family.name}_total"} | {s.name for s in family.samples}
    for line in text.splitlines():  # families without samples yet still have HELP/TYPE lines
        if line.startswith("# TYPE "):
            exported.add(line.split()[2])
    missing = {name for name in used if name not in exported and family_of(name) not in exported}
    assert missing <= DATASET_METRICS, f"dashboard uses metrics the controller does not export: {sorted(missing)}"


def _chromium(user_data: Path) -> Any:
    from selenium import webdriver  # noqa: PLC0415 - the dev extra; imported where the browser is needed
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    browser = require_binary("chromium", "chromium")
    driver_path = require_binary("chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1800",
                 f"--user-data-dir={user_data}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


@pytest.fixture
async def chromium(tmp_path: Path) -> AsyncIterator[Any]:
    driver = await asyncio.to_thread(_chromium, tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)


def _save_artifact(path: Path) -> None:
    target = os.environ.get("SELFHEAL_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


async def test_the_status_page_in_headless_chromium_shows_a_live_incident(
        tmp_path: Path, mosquitto: Broker, chromium: Any) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    async with running_controller(load_config(_config(tmp_path, mosquitto))) as controller, \
            _http(controller) as client:
        for instance in ("gpu-node-1:9100", "gpu-node-2:9100"):
            assert (await client.post("/api/v1/alerts", json=webhook(instance=instance))).status_code == 200

        async def opened() -> bool:
            return len(await _incidents(client, "gpu-node-1")) == 1
        await eventually(opened, what="an incident from the alert")
        [incident] = await _incidents(client, "gpu-node-1")
        base = f"http://{controller.api_address}"
        await asyncio.to_thread(chromium.get, f"{base}/")
        assert await asyncio.to_thread(lambda: chromium.title) == "selfheal"
        rows = await asyncio.to_thread(chromium.find_elements, By.CSS_SELECTOR, "table.open tr")
        texts = [await asyncio.to_thread(lambda r=r: r.text) for r in rows]
        assert any("gpu-node-1/web" in t and ("open" in t or "failed" in t) for t in texts), texts
        figures = await asyncio.to_thread(chromium.find_elements, By.CSS_SELECTOR, ".plots figure")
        assert len(figures) == 2  # MTTR (no resolved incident yet: says so) and incidents per hour (a plot)
        assert await asyncio.to_thread(chromium.find_elements, By.CSS_SELECTOR, "svg.plot rect")
        shot = tmp_path / "status-page.png"
        assert await asyncio.to_thread(chromium.save_screenshot, str(shot))
        _save_artifact(shot)
        await asyncio.to_thread(chromium.get, f"{base}/incidents/{incident['id']}")
        heading = await asyncio.to_thread(lambda: chromium.find_element(By.TAG_NAME, "h1").text)
        assert heading.startswith(f"Incident #{incident['id']}")
        timeline = await asyncio.to_thread(lambda: chromium.find_element(By.TAG_NAME, "body").text)
        assert "opened" in timeline
        shot = tmp_path / "incident-page.png"
        assert await asyncio.to_thread(chromium.save_screenshot, str(shot))
        _save_artifact(shot)
