"""The controller's HTTP API over real HTTP: a real uvicorn on loopback, a real fleet and SQLite store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from controller import api as api_module
from controller.api import ApiContext, create_api
from controller.fleet import Fleet
from controller.fleet_index import FleetIndex
from controller.metrics import ControllerMetrics
from controller.store import SqliteStore
from selfheal import client as client_module
from selfheal import wire
from selfheal.cli import main
from selfheal.client import EXIT_UNREACHABLE
from selfheal.clocks import SystemClock
from selfheal.errors import MalformedMessage
from tests.conftest import eventually, free_port

pytestmark = pytest.mark.integration

NODE = "node-a"
EVIL_UNIT = "<script>alert(1)</script>"
EVIL_SUMMARY = 'disk <b>full</b> & "quoted"'
PROBLEM = "application/problem+json"


class FakeEngine:
    """The API reads only ``open_count()`` of the engine."""

    def __init__(self) -> None:
        self.open = 0

    def open_count(self) -> int:
        return self.open


class QuietServer(uvicorn.Server):
    """Signals belong to pytest, not to the server under test."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Api:
    url: str
    client: httpx.AsyncClient
    ctx: ApiContext
    connected: asyncio.Event
    engine: FakeEngine


def host() -> wire.HostMetrics:
    return wire.HostMetrics(cpu_percent=3.0, load1=0.1, load5=0.1, load15=0.1, mem_total_bytes=1 << 30,
                            mem_available_bytes=1 << 29, mem_percent=50.0, swap_percent=0.0)


def feed(fleet: Fleet, topic_node: str, channel: wire.NodeChannel, message: wire.NodeMessage) -> None:
    """Apply a message the way the controller does: through the wire edge."""
    decoded = wire.decode_node_message(wire.node_topic(topic_node, channel), wire.encode(message))
    fleet.apply(decoded, time.time())


def fleet_gauges(index: FleetIndex, engine: FakeEngine) -> tuple[dict[str, int], int]:
    counts = index.counts(time.time())
    return {"online": counts.online, "offline": counts.offline}, engine.open_count()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    store = await SqliteStore.open(tmp_path / "selfheal.db")
    fleet = Fleet(history=10, max_nodes=1000)
    metrics = ControllerMetrics()
    engine = FakeEngine()
    connected = asyncio.Event()
    ctx = ApiContext(fleet=fleet, store=store, engine=engine, metrics=metrics, clock=SystemClock(),  # type: ignore[arg-type]
                     offline_after=5.0, broker_connected=connected)
    metrics.add_fleet_collector(lambda: fleet_gauges(ctx.view, engine))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = QuietServer(uvicorn.Config(create_api(ctx), log_level="warning", access_log=False, lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
    try:
        await eventually(lambda: server.started or serving.done(), timeout=10, what="uvicorn to start")
        assert server.started, serving
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            yield Api(url, client, ctx, connected, engine)
    finally:
        server.should_exit = True
        await serving
        sock.close()
        await store.close()


def fill_fleet(fleet: Fleet) -> None:
    status = wire.NodeStatus(node=NODE, state="online", session=1, version="0.1.0", units=["web", EVIL_UNIT],
                             ts=time.time())
    probe = wire.ProbeState(kind="http", healthy=True, consecutive_failures=0, failures_threshold=3)
    report = wire.Report(node=NODE, session=1, seq=1, ts=time.time(), host=host(), units=[
        wire.UnitReport(name="web", kind="process", state="running", pid=4242, restarts=2, rss_bytes=1 << 20,
                        probe=probe),
        wire.UnitReport(name=EVIL_UNIT, kind="process", state="exited", exit_code=1),
    ])
    # The wire refuses a unit name of that shape; what the API and the page show is escaped all the same
    # (defence in depth), so these two are applied past the edge.
    for channel, message in (("status", status), ("report", report)):
        with pytest.raises(MalformedMessage):
            feed(fleet, NODE, channel, message)  # type: ignore[arg-type]
        fleet.apply(message, time.time())
    feed(fleet, "node-b", "status", wire.NodeStatus(node="node-b", state="online", session=3, ts=time.time()))
    feed(fleet, "node-b", "status", wire.NodeStatus(node="node-b", state="offline", session=3, ts=time.time()))


async def open_incidents(store: SqliteStore) -> tuple[int, int]:
    opened = await store.open_incident(key=f"unit_exited/{NODE}/web", kind="unit_exited", node=NODE, unit="web",
                                       severity="critical", summary=EVIL_SUMMARY, rule="restart-exited-unit",
                                       opened_at=1_700_000_000.0, evidence={"exit_code": 1})
    await store.append_timeline(opened.id, at=1_700_000_001.0, kind="plan", data={"plan": f"{opened.id}-1"})
    resolved = await store.open_incident(key="node_offline/node-b/-", kind="node_offline", node="node-b",
                                         unit=None, severity="critical", summary="node node-b is offline",
                                         rule="report-offline-node", opened_at=1_700_000_010.0, evidence={})
    await store.set_incident_state(resolved.id, "resolved", at=1_700_000_020.0, reason="back online")
    return opened.id, resolved.id


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert body["instance"] == response.request.url.path
    assert body["title"]
    return body


# --- health -------------------------------------------------------------------------------------


async def test_healthz(api: Api) -> None:
    response = await api.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_503_until_the_broker_is_connected(api: Api) -> None:
    body = assert_problem(await api.client.get("/readyz"), 503)
    assert "MQTT broker" in body["detail"]
    api.connected.set()
    response = await api.client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_metrics_expose_fleet_gauges(api: Api) -> None:
    fill_fleet(api.ctx.fleet)
    api.engine.open = 2
    api.ctx.metrics.rejected.labels("spoofed").inc()
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'selfheal_nodes{state="online"} 1.0' in text
    assert 'selfheal_nodes{state="offline"} 1.0' in text
    assert "selfheal_incidents_open 2.0" in text
    assert 'selfheal_messages_rejected_total{reason="spoofed"} 1.0' in text


# --- fleet --------------------------------------------------------------------------------------


async def test_nodes_list(api: Api) -> None:
    assert (await api.client.get("/api/v1/nodes")).json() == {"items": [], "unknown": [], "total": 0, "next": None,
                                                                  "missing": []}
    fill_fleet(api.ctx.fleet)
    response = await api.client.get("/api/v1/nodes")
    assert response.status_code == 200
    items = response.json()["items"]
    assert [n["id"] for n in items] == [NODE, "node-b"]
    node_a, node_b = items
    assert set(node_a) >= {"id", "state", "last_seen", "units"}
    assert node_a["state"] == "online"
    assert node_a["units"] == sorted([EVIL_UNIT, "web"])
    assert node_a["last_seen"].endswith("Z")
    assert abs(datetime.fromisoformat(node_a["last_seen"]).timestamp() - time.time()) < 60
    assert node_a["session"] == 1
    assert node_a["version"] == "0.1.0"
    assert node_b["state"] == "offline"


async def test_a_nodes_series_is_what_the_incident_page_plots_and_an_unknown_node_is_a_404(api: Api) -> None:
    fill_fleet(api.ctx.fleet)
    body = (await api.client.get(f"/api/v1/nodes/{NODE}/series", params={"unit": "web"})).json()
    assert (body["node"], body["unit"], [v for _, v in body["rss_mib"]]) == (NODE, "web", [1.0])
    assert len(body["cpu_percent"]) == 1
    host = (await api.client.get(f"/api/v1/nodes/{NODE}/series")).json()
    assert host["unit"] is None
    assert len(host["rss_mib"]) == 1
    assert_problem(await api.client.get("/api/v1/nodes/node-zz/series"), 404)


async def test_a_silent_node_is_listed_offline(api: Api) -> None:
    fill_fleet(api.ctx.fleet)
    api.ctx.fleet.nodes[NODE].last_seen = time.time() - 60
    items = (await api.client.get("/api/v1/nodes")).json()["items"]
    assert items[0]["id"] == NODE
    assert items[0]["state"] == "offline"


async def test_units_list(api: Api) -> None:
    fill_fleet(api.ctx.fleet)
    response = await api.client.get("/api/v1/units")
    assert response.status_code == 200
    items = response.json()["items"]
    by_name = {u["name"]: u for u in items}
    assert set(by_name) == {"web", EVIL_UNIT}
    web = by_name["web"]
    assert {k: web[k] for k in ("node", "name", "kind", "state", "pid", "restarts")} == {
        "node": NODE, "name": "web", "kind": "process", "state": "running", "pid": 4242, "restarts": 2}
    assert web["healthy"] is True
    exited = by_name[EVIL_UNIT]
    assert (exited["state"], exited["pid"], exited["healthy"]) == ("exited", None, None)


def fill_many(fleet: Fleet, count: int, units: dict[int, list[wire.UnitReport]] | None = None) -> list[str]:
    """``count`` online nodes ``n-000``...; node ``i`` runs ``units[i]`` (default: one healthy ``web``)."""
    names = [f"n-{i:03d}" for i in range(count)]
    for i, name in enumerate(names):
        feed(fleet, name, "status", wire.NodeStatus(node=name, state="online", session=1, ts=time.time()))
        running = [wire.UnitReport(name="web", kind="process", state="running", pid=1)]
        feed(fleet, name, "report", wire.Report(node=name, session=1, seq=1, ts=time.time(), host=host(),
                                                units=(units or {}).get(i, running)))
    return names


async def every_page(api: Api, path: str, limit: int, **params: str) -> list[dict[str, Any]]:
    """Follow ``next`` from the first page; each page holds at most ``limit`` items and says the total."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": str(limit), **params, **({"after": cursor} if cursor is not None else {})}
        page = (await api.client.get(path, params=query)).json()
        assert len(page["items"]) <= limit
        assert page["total"] >= len(items) + len(page["items"])
        items += page["items"]
        cursor = page["next"]
        if cursor is None:
            return items
        assert len(page["items"]) == limit  # only a full page has a next one


async def test_nodes_come_in_pages_that_follow_a_cursor(api: Api) -> None:
    names = fill_many(api.ctx.fleet, 7)
    for limit in (1, 3, 6, 7, 8):
        assert [n["id"] for n in await every_page(api, "/api/v1/nodes", limit)] == names
    first = (await api.client.get("/api/v1/nodes", params={"limit": 3})).json()
    assert ([n["id"] for n in first["items"]], first["next"], first["total"]) == (names[:3], "n-002", 7)
    exact = (await api.client.get("/api/v1/nodes", params={"limit": 7})).json()
    assert (len(exact["items"]), exact["next"]) == (7, None)  # the whole fleet on one page: no next
    last = (await api.client.get("/api/v1/nodes", params={"after": "n-006"})).json()
    assert (last["items"], last["next"], last["total"]) == ([], None, 7)
    between = (await api.client.get("/api/v1/nodes", params={"after": "n-0031", "limit": 1})).json()
    assert [n["id"] for n in between["items"]] == ["n-004"]  # a cursor that is no node: those that sort after it


async def test_units_come_in_pages_that_follow_a_cursor(api: Api) -> None:
    def unit(name: str, state: str = "running") -> wire.UnitReport:
        return wire.UnitReport(name=name, kind="process", state=state)  # type: ignore[arg-type]

    fill_many(api.ctx.fleet, 5, units={0: [unit("web"), unit("db"), unit("etl", "exited")], 1: [],
                                       2: [unit("web")], 3: [], 4: [unit("b"), unit("a")]})
    whole = (await api.client.get("/api/v1/units")).json()
    expected = [("n-000", "db"), ("n-000", "etl"), ("n-000", "web"), ("n-002", "web"), ("n-004", "a"),
                ("n-004", "b")]
    assert ([(u["node"], u["name"]) for u in whole["items"]], whole["total"], whole["next"]) == (expected, 6, None)
    for limit in (1, 2, 3, 5, 6):
        assert [(u["node"], u["name"]) for u in await every_page(api, "/api/v1/units", limit)] == expected
    page = (await api.client.get("/api/v1/units", params={"limit": 2})).json()
    assert page["next"] == "n-000/etl"
    rest = (await api.client.get("/api/v1/units", params={"after": "n-000/etl", "limit": 2})).json()
    assert [(u["node"], u["name"]) for u in rest["items"]] == expected[2:4]
    one = (await api.client.get("/api/v1/units", params={"node": "n-004"})).json()
    assert ([u["name"] for u in one["items"]], one["total"]) == (["a", "b"], 2)
    assert await every_page(api, "/api/v1/units", 1, node="n-000") == whole["items"][:3]
    assert (await api.client.get("/api/v1/units", params={"node": "nope"})).json() == {
        "items": [], "total": 0, "next": None, "missing": []}


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "5001"}, {"after": "x" * 201}])
@pytest.mark.parametrize("path", ["/api/v1/nodes", "/api/v1/units"])
async def test_a_page_beyond_the_bounds_is_a_422_problem(api: Api, path: str, params: dict[str, str]) -> None:
    assert_problem(await api.client.get(path, params=params), 422)


# --- incidents ----------------------------------------------------------------------------------


async def test_incidents_by_state(api: Api) -> None:
    opened_id, resolved_id = await open_incidents(api.ctx.store)
    open_items = (await api.client.get("/api/v1/incidents", params={"state": "open"})).json()["items"]
    assert [i["id"] for i in open_items] == [opened_id]
    item = open_items[0]
    assert set(item) >= {"id", "state", "kind", "node", "unit", "opened_at", "resolved_at"}
    assert {k: item[k] for k in ("state", "kind", "node", "unit", "resolved_at")} == {
        "state": "open", "kind": "unit_exited", "node": NODE, "unit": "web", "resolved_at": None}
    assert item["opened_at"] == "2023-11-14T22:13:20Z"
    resolved_items = (await api.client.get("/api/v1/incidents", params={"state": "resolved"})).json()["items"]
    assert [(i["id"], i["state"], i["resolved_at"]) for i in resolved_items] == [
        (resolved_id, "resolved", "2023-11-14T22:13:40Z")]
    everything = (await api.client.get("/api/v1/incidents")).json()["items"]
    assert [i["id"] for i in everything] == [resolved_id, opened_id]


async def test_incident_detail_has_its_timeline(api: Api) -> None:
    opened_id, _ = await open_incidents(api.ctx.store)
    response = await api.client.get(f"/api/v1/incidents/{opened_id}")
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["state"], body["summary"]) == (opened_id, "open", EVIL_SUMMARY)
    assert [(e["kind"], e["at"]) for e in body["timeline"]] == [
        ("opened", "2023-11-14T22:13:20Z"), ("plan", "2023-11-14T22:13:21Z")]
    assert body["timeline"][0]["data"]["evidence"] == {"exit_code": 1}
    assert body["timeline"][1]["data"] == {"plan": f"{opened_id}-1"}
    assert body["plans"] == []


async def test_an_unknown_incident_is_a_404_problem(api: Api) -> None:
    body = assert_problem(await api.client.get("/api/v1/incidents/999999"), 404)
    assert body["detail"] == "no incident 999999"


async def test_an_unknown_path_is_a_404_problem(api: Api) -> None:
    assert_problem(await api.client.get("/api/v1/nope"), 404)


@pytest.mark.parametrize(("path", "params", "where"), [
    ("/api/v1/incidents", {"state": "bogus"}, "query.state"),
    ("/api/v1/incidents", {"limit": "0"}, "query.limit"),
    ("/api/v1/incidents/abc", {}, "path.incident_id"),
])
async def test_a_bad_request_is_a_422_problem(api: Api, path: str, params: dict[str, str], where: str) -> None:
    body = assert_problem(await api.client.get(path, params=params), 422)
    assert where in body["detail"]


# --- OpenAPI and the page -----------------------------------------------------------------------


async def test_openapi_is_3_1_and_lists_the_paths(api: Api) -> None:
    response = await api.client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["openapi"].startswith("3.1")
    assert {"/healthz", "/readyz", "/metrics", "/api/v1/nodes", "/api/v1/units", "/api/v1/incidents",
            "/api/v1/incidents/{incident_id}", "/api/v1/plans"} <= set(spec["paths"])


async def test_the_status_page_shows_the_fleet_and_escapes_html(api: Api) -> None:
    fill_fleet(api.ctx.fleet)
    await open_incidents(api.ctx.store)
    response = await api.client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert NODE in page
    assert "Degraded: 1 node(s) offline" in page
    assert EVIL_UNIT not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>full</b>" not in page
    assert "disk &lt;b&gt;full&lt;/b&gt; &amp; &quot;quoted&quot;" in page


async def test_the_status_page_without_agents(api: Api) -> None:
    page = (await api.client.get("/")).text
    assert "No agents have reported yet." in page


async def test_the_status_page_shows_counts_problems_and_one_page_of_nodes(api: Api) -> None:
    crashed = [wire.UnitReport(name="web", kind="process", state="exited", exit_code=1)]
    names = fill_many(api.ctx.fleet, api_module.PAGE_NODES + 20, units={api_module.PAGE_NODES + 10: crashed})
    late_offline, late_crashed, late_healthy = names[-1], names[api_module.PAGE_NODES + 10], names[-2]
    feed(api.ctx.fleet, late_offline, "status", wire.NodeStatus(node=late_offline, state="offline", session=1,
                                                                ts=time.time() + 1))
    first = (await api.client.get("/")).text
    assert f"{len(names)} node(s): {len(names) - 1} online, 1 offline" in first
    assert "Degraded: 1 node(s) offline, 1 unit(s) unhealthy" in first
    problems = first.split('id="problems"')[1].split('id="nodes"')[0]
    assert "Nodes with a problem (2)" in first
    assert late_offline in problems
    assert late_crashed in problems
    assert "web exited" in problems
    listed = first.split('id="nodes"')[1]
    assert names[0] in listed
    assert names[api_module.PAGE_NODES - 1] in listed
    assert late_healthy not in first  # beyond the first page, and healthy
    cursor = names[api_module.PAGE_NODES - 1]
    assert f'href="/?after={cursor}#nodes"' in first
    second = (await api.client.get("/", params={"after": cursor})).text
    assert late_healthy in second.split('id="nodes"')[1]
    assert names[0] not in second.split('id="nodes"')[1]
    assert "next page" not in second


# --- selfheal status ------------------------------------------------------------------------------


async def test_selfheal_status_reads_the_api(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    fill_fleet(api.ctx.fleet)
    opened_id, _ = await open_incidents(api.ctx.store)
    code = await asyncio.to_thread(main, ["status", "--url", api.url, "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1
    assert summary["status"] == "degraded"
    assert [n["id"] for n in summary["nodes"]] == [NODE, "node-b"]
    assert [i["id"] for i in summary["incidents"]] == [opened_id]


async def test_selfheal_status_follows_the_cursors(api: Api, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    names = fill_many(api.ctx.fleet, 5)
    monkeypatch.setattr(client_module, "PAGE", 2)
    code = await asyncio.to_thread(main, ["status", "--url", api.url, "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert (code, summary["status"]) == (0, "healthy")
    assert [n["id"] for n in summary["nodes"]] == names
    assert [u["node"] for u in summary["units"]] == names
    code = await asyncio.to_thread(main, ["status", "--url", api.url])
    assert "NODES (5)" in capsys.readouterr().out


def test_selfheal_status_returns_3_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--url", url, "--json", "--timeout", "2"]) == EXIT_UNREACHABLE == 3
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "unreachable"
    assert summary["url"] == url


def test_selfheal_status_says_why_without_json(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--url", url, "--timeout", "2"]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"cannot reach the controller at {url}" in captured.err


@contextlib.contextmanager
def odd_peer() -> Iterator[str]:
    """A 'controller' that answers every GET with JSON of the wrong shape (another version, a bug)."""
    import http.server  # noqa: PLC0415 - this test's only user
    import threading  # noqa: PLC0415

    class Odd(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"items": "not a list", "counts": 7}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_peers_that_answer_wrongly_or_not_at_all_are_named_and_their_answers_never_half_used(api: Api) -> None:
    """Several controllers: the lists and the page carry this controller's nodes and name the peers that gave
    nothing usable; they are counted in /metrics."""
    from controller.peers import Peers  # noqa: PLC0415

    fill_fleet(api.ctx.fleet)
    with odd_peer() as odd:
        api.ctx.peers = Peers("me", lambda: {"odd": odd, "down": f"http://127.0.0.1:{free_port()}"}, timeout=2,
                              on_failure=lambda peer: api.ctx.metrics.peer_failures.labels(peer).inc())
        nodes = (await api.client.get("/api/v1/nodes")).json()
        mine = sorted(api.ctx.fleet.nodes)
        assert ([n["id"] for n in nodes["items"]], nodes["missing"]) == (mine, ["down", "odd"])
        units = (await api.client.get("/api/v1/units")).json()
        assert ({u["node"] for u in units["items"]} <= set(mine), units["missing"]) == (True, ["down", "odd"])
        local = (await api.client.get("/api/v1/nodes", params={"scope": "local"})).json()
        assert local["missing"] == []
        page = await api.client.get("/")
        assert page.status_code == 200
        assert "Controller(s) down, odd did not answer" in page.text
        scraped = (await api.client.get("/metrics")).text
        assert 'selfheal_peer_requests_failed_total{peer="odd"} 3.0' in scraped
        assert 'selfheal_peer_requests_failed_total{peer="down"} 3.0' in scraped
