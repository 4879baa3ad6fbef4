"""The API gate as a plain ASGI callable: who gets in, and that a refused body is never read."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from controller.api_gate import ApiGate, Tokens

WRITE, READ = "write-token", "read-token"


class App:
    """Reads the whole body (as FastAPI does before it checks a token), then answers 200."""

    def __init__(self) -> None:
        self.calls = 0
        self.body = b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        while True:
            message = await receive()
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


class Body:
    """A request body in chunks, counting how many were taken."""

    def __init__(self, chunks: int, size: int = 65536) -> None:
        self.left, self.size, self.taken = chunks, size, 0

    async def __call__(self) -> Message:
        self.taken += 1
        self.left -= 1
        return {"type": "http.request", "body": b"x" * self.size, "more_body": self.left > 0}


def run(gate: ApiGate, method: str, path: str, *, token: str | None = None, body: Body | None = None,
        length: int | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(gate(scope, body or Body(1, 10), send))
    start = sent[0]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    answer = json.loads(payload) if payload != b"ok" else {}
    return start["status"], answer, {k.decode(): v.decode() for k, v in start["headers"]}


def gate(app: App, **tokens: Any) -> tuple[ApiGate, list[str]]:
    refused: list[str] = []
    return ApiGate(app, tokens=Tokens(**tokens), refused=lambda reason, _: refused.append(reason)), refused


def test_a_mutating_request_without_the_token_is_refused_before_its_body_is_read() -> None:
    app = App()
    front, refused = gate(app, write=WRITE, read=READ, reads_protected=True)
    for token, status in ((None, 401), ("wrong", 401), (READ, 403)):
        body = Body(5000)  # 300 MB if it were read
        code, problem, headers = run(front, "POST", "/api/v1/pause", token=token, body=body)
        assert (code, problem["status"], body.taken) == (status, status, 0)
        assert headers["content-type"] == "application/problem+json"
        assert headers["connection"] == "close"
    assert app.calls == 0
    assert refused == ["unauthorized", "unauthorized", "forbidden"]


def test_without_a_token_mutating_requests_fail_closed() -> None:
    front, _ = gate(App(), write=None)
    code, problem, _ = run(front, "DELETE", "/api/v1/silences/x", token="anything")  # noqa: S106 - any token at all
    assert code == 503
    assert "no API token" in problem["detail"]
    assert run(front, "GET", "/api/v1/nodes")[0] == 200  # reads stay open without a read token


def test_bodies_over_the_cap_are_413_declared_or_streamed() -> None:
    app = App()
    front, refused = gate(app, write=WRITE)
    body = Body(100)
    assert run(front, "POST", "/api/v1/pause", token=WRITE, length=2 << 20, body=body)[0] == 413
    assert body.taken == 0
    body = Body(100)  # chunked: 6.4 MB, cut off after 1 MiB and one chunk
    code, problem, _ = run(front, "POST", "/api/v1/pause", token=WRITE, body=body)
    assert (code, problem["title"]) == (413, "Payload too large")
    assert body.taken == 17
    assert len(app.body) <= (1 << 20) + 65536
    assert run(front, "POST", "/api/v1/pause", token=WRITE, body=Body(16))[0] == 200  # exactly 1 MiB
    assert refused == ["too_large", "too_large"]


@pytest.mark.parametrize("path", ["/api/v1/nodes", "/", "/metrics", "/api/v1/docs", "/incidents/1"])
def test_a_read_token_protects_every_read_but_the_probes(path: str) -> None:
    front, _ = gate(App(), write=WRITE, read=READ, reads_protected=True)
    code, _, headers = run(front, "GET", path)
    assert code == 401
    assert headers["www-authenticate"] == "Bearer"
    assert run(front, "GET", path, token=READ)[0] == 200
    assert run(front, "GET", path, token=WRITE)[0] == 200
    for probe in ("/healthz", "/readyz"):
        assert run(front, "GET", probe)[0] == 200


def test_an_unreadable_read_token_file_closes_reads_to_all_but_the_mutating_token() -> None:
    front, _ = gate(App(), write=WRITE, read=None, reads_protected=True)
    assert run(front, "GET", "/api/v1/nodes")[0] == 401
    assert run(front, "GET", "/api/v1/nodes", token=WRITE)[0] == 200
    shown = repr(Tokens(write=WRITE, read=READ))
    assert WRITE not in shown
    assert READ not in shown
