"""A real HTTP webhook receiver on a free loopback port: records every POST, answers as scripted.

Stands in for Slack, Teams, Discord... in tests: ``answer(path, 429,
{"Retry-After": "1"})`` queues one scripted response for the next request to
``path``; unscripted requests get ``200 ok``. Requests are recorded with the
time they arrived (``time.monotonic()``), their headers and their JSON body.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    at: float
    path: str
    headers: dict[str, str]
    body: Any


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    delay: float


class WebhookReceiver:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        self.requests: list[Received] = []
        self._script: dict[str, deque[_Answer]] = defaultdict(deque)
        self._lock = threading.Lock()

    def url(self, path: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def answer(self, path: str, status: int, headers: dict[str, str] | None = None, body: bytes | str = b"",
               *, delay: float = 0.0) -> None:
        """The next request to ``path`` gets this answer (answers queue up in order)."""
        raw = body.encode() if isinstance(body, str) else body
        with self._lock:
            self._script[path].append(_Answer(status, headers or {}, raw, delay))

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def _next(self, path: str) -> _Answer:
        with self._lock:
            script = self._script.get(path)
            return script.popleft() if script else _Answer(200, {}, b"ok", 0.0)

    def _record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)


def _handler(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            receiver._record(Received(time.monotonic(), self.path, dict(self.headers.items()), body))
            answer = receiver._next(self.path)
            if answer.delay:
                time.sleep(answer.delay)  # a slow service, for timeout tests
            try:
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
            except OSError:  # the client gave up waiting (timeout tests)
                pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    receiver = WebhookReceiver(server)
    server.RequestHandlerClass = _handler(receiver)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
