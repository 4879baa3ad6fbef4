"""The agent's light HTTP paths against real sockets: ``/healthz`` without datasets, plain-http probes.

A node without datasets serves ``/healthz`` (the peer API's JSON) and
``/metrics`` from ``agent.http_server.HealthServer`` and 404 to the rest; an ``http://`` probe
reads the status line itself (``agent.probes``) and must give the verdicts
httpx gave: 2xx and 3xx healthy (redirects not followed), 4xx/5xx unhealthy,
a closed port ``ConnectError``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from agent.http_server import HealthServer, bind_listen
from agent.metrics import AgentMetrics, Figures
from agent.probes import ProbeRunner
from selfheal.clocks import SystemClock
from selfheal.config import ProbeConfig
from selfheal.errors import ConfigError
from selfheal.peer_tls import peer_ssl_context
from tests.conftest import free_port

BIG = b"x" * 300_000


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = {"/ok": (200, b"fine"), "/moved": (302, b""), "/broken": (500, b"no"),
                        "/big": (200, BIG)}.get(self.path.partition("?")[0], (404, b""))
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def site() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("path", "healthy", "error"), [
    ("/ok", True, ""), ("/ok?probe=1", True, ""), ("/moved", True, ""), ("/big", True, ""),
    ("/broken", False, "HTTP 500"), ("/missing", False, "HTTP 404"),
])
async def test_plain_http_probe_verdicts(site: int, path: str, healthy: bool, error: str) -> None:
    runner = ProbeRunner("x", ProbeConfig(kind="http", target=f"http://127.0.0.1:{site}{path}", timeout=2.0),
                         emit=lambda _: None, clock=SystemClock())
    ok, detail, _ = await runner.check()
    assert (ok, detail) == (healthy, error)


async def test_a_closed_port_is_a_connect_error() -> None:
    runner = ProbeRunner("x", ProbeConfig(kind="http", target=f"http://127.0.0.1:{free_port()}/", timeout=1.0),
                         emit=lambda _: None, clock=SystemClock())
    ok, detail, _ = await runner.check()
    assert not ok
    assert detail.startswith("ConnectError: ")


async def test_the_health_server_answers_healthz_and_metrics_and_404_to_the_rest() -> None:
    counts = {"reports": 12, "events": 2, "malformed": 1}
    metrics = AgentMetrics(Figures(node="node-x", messages=lambda: counts, commands=lambda: {"done": 3},
                                   refused=dict))
    sock, address = bind_listen("127.0.0.1:0", broker_host="127.0.0.1")
    server = HealthServer(sock, node_id="node-x", metrics=metrics.render)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop=stop))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://{address}", trust_env=False) as client:
            health = await client.get("/healthz")
            assert (health.status_code, health.json()) == (200, {"status": "ok", "node": "node-x"})
            assert (await client.head("/healthz")).status_code == 200
            assert (await client.get("/metrics")).headers["content-type"].startswith("text/plain")
            counts["reports"] += 1  # read at each scrape, on the server's loop
            scraped = (await client.get("/metrics")).text
            lines = dict(line.rsplit(" ", 1) for line in scraped.splitlines() if line and not line.startswith("#"))
            assert lines['selfheal_agent_messages_total{kind="reports"}'] == "13.0"
            assert lines['selfheal_agent_messages_total{kind="malformed"}'] == "1.0"
            assert lines['selfheal_agent_commands_total{status="done"}'] == "3.0"
            assert lines['selfheal_agent_info{node="node-x"}'] == "1.0"
            assert float(lines["selfheal_agent_asyncio_tasks"]) >= 2  # this test's and the connection's, at least
            assert float(lines["process_resident_memory_bytes"]) > 0
            missing = await client.get("/datasets/features/tree")
            assert missing.status_code == 404
            assert missing.headers["content-type"] == "application/problem+json"
            assert (await client.post("/datasets/features/transfers", content=b"{}")).status_code == 404
        reader, writer = await asyncio.open_connection(*address.rsplit(":", 1))
        writer.write(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")  # beyond the head limit: closed, no answer
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert sock.fileno() == -1


async def test_the_health_server_speaks_https_with_a_certificate_and_refuses_a_bad_one(tmp_path: Path) -> None:
    from tests.integration.test_resync_hardening import make_ca, make_server_cert  # noqa: PLC0415

    ca = make_ca(tmp_path, "fleet-ca")
    cert, key = make_server_cert(tmp_path, ca)
    sock, address = bind_listen("127.0.0.1:0", broker_host="127.0.0.1", tls=True)
    server = HealthServer(sock, node_id="node-a", tls_cert=cert, tls_key=key)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop=stop))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        assert address.startswith("https://")
        async with httpx.AsyncClient(base_url=address, verify=peer_ssl_context(str(ca[2])), trust_env=False) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok", "node": "node-a"}
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    (tmp_path / "junk.pem").write_text("not a certificate")
    other, _ = bind_listen("127.0.0.1:0", broker_host="127.0.0.1", tls=True)
    try:
        with pytest.raises(ConfigError, match=r"agent\.tls_cert"):
            HealthServer(other, node_id="node-a", tls_cert=str(tmp_path / "junk.pem"), tls_key=key)
    finally:
        other.close()

