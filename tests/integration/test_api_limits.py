"""The API's edge: no body is read before the token is checked, and no body beyond 1 MiB is held.

A real ``selfheal controller`` process (so its peak RSS is its own, read from
``VmHWM`` in ``/proc``), a real Mosquitto, real HTTP. The issue's attack: a
300 MB body POSTed to a mutating endpoint without a token got its 401 only
after the controller had parsed it (peak RSS 1.09 GB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Broker, eventually_sync, free_port

pytestmark = pytest.mark.integration
TOKEN = "limits-token-0123456789"  # noqa: S105 - a test fixture, not a secret
READ_TOKEN = "limits-read-token-0123456789"  # noqa: S105 - a test fixture, not a secret
MIB = 1 << 20
CHUNK = b"x" * (1 << 16)
ENV = {k: v for k, v in os.environ.items() if k not in {"SELFHEAL_API_TOKEN", "SELFHEAL_API_READ_TOKEN"}}


def peak_rss(pid: int) -> int:
    """The process's peak resident set (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def stream(total: int) -> Iterator[bytes]:
    """``total`` bytes, generated as they are sent (never built in memory)."""
    sent = 0
    while sent < total:
        piece = CHUNK[: min(len(CHUNK), total - sent)]
        sent += len(piece)
        yield piece


class Controller:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], root: Path) -> None:
        self.url, self.proc, self.root = url, proc, root


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory, mosquitto: Broker) -> Iterator[Controller]:
    """One controller process for the module (it takes seconds to start)."""
    tmp_path = tmp_path_factory.mktemp("controller")
    (tmp_path / "api.token").write_text(TOKEN + "\n")
    (tmp_path / "api-read.token").write_text(READ_TOKEN + "\n")
    port = free_port()
    config = tmp_path / "controller.toml"
    config.write_text(
        f'[mqtt]\nurl = "{mosquitto.url}"\nkeepalive = 2.0\n'
        f'[controller]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[security]\nkey_dir = "{tmp_path / "keys"}"\napi_token_file = "{tmp_path / "api.token"}"\n'
        f'api_read_token_file = "{tmp_path / "api-read.token"}"\n')
    log = (tmp_path / "controller.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "selfheal", "controller", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "controller.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        eventually_sync(up, timeout=30, what="controller API up")
        yield Controller(url, proc, tmp_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(url: str, body: Iterator[bytes] | bytes, token: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{url}/api/v1/pause", content=body, headers=headers, timeout=60)


def test_a_300_mb_body_without_a_token_is_refused_unread(controller: Controller) -> None:
    post(controller.url, b'{"reason": "warm up"}')  # the first request's imports and caches count as baseline
    before = peak_rss(controller.proc.pid)
    started = time.monotonic()
    response = post(controller.url, stream(300 * 10**6))
    took = time.monotonic() - started
    grown = peak_rss(controller.proc.pid) - before
    print(f"401 after {took:.2f}s; controller peak RSS grew by {grown / MIB:.1f} MiB")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert grown < 8 * MIB
    assert took < 10


def test_with_the_token_a_body_over_1_mib_is_413(controller: Controller) -> None:
    before = peak_rss(controller.proc.pid)
    for body in (b" " * (2 * MIB), stream(2 * MIB)):  # declared by Content-Length, and chunked
        response = post(controller.url, body, TOKEN)
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == "application/problem+json"
    assert post(controller.url, b'{"reason": "' + b" " * (MIB - 100) + b'"}', TOKEN).status_code == 422
    assert peak_rss(controller.proc.pid) - before < 16 * MIB
    ok = post(controller.url, b'{"reason": "just under the cap"}', TOKEN)
    assert ok.status_code == 200, ok.text


def test_the_read_token_opens_reads_but_not_writes(controller: Controller) -> None:
    for path in ("/api/v1/nodes", "/metrics", "/", "/api/v1/openapi.json"):
        assert httpx.get(controller.url + path).status_code == 401
        for token in (READ_TOKEN, TOKEN):
            assert httpx.get(controller.url + path, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    for path in ("/healthz", "/readyz"):
        assert httpx.get(controller.url + path).status_code in {200, 503}
    refused = post(controller.url, b'{"reason": "x"}', READ_TOKEN)
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"


def test_the_cli_sends_the_read_token(controller: Controller) -> None:
    root = controller.root
    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "selfheal", "status", "--url", controller.url, "--json", *extra],
                              capture_output=True, text=True, timeout=60, check=False, env=ENV)

    refused = status()
    assert refused.returncode == 1, refused.stderr
    assert "401" in refused.stderr
    for extra in (("--read-token-file", str(root / "api-read.token")),
                  ("--token-file", str(root / "api.token")),  # the mutating token reads too
                  ("--config", str(root / "controller.toml"))):
        allowed = status(*extra)  # healthy or degraded: other tests' nodes share the broker, retained
        assert allowed.returncode in {0, 1}, allowed.stderr
        assert "401" not in allowed.stderr
        assert json.loads(allowed.stdout)["status"] in {"healthy", "degraded"}
