"""The API's front door: bearer tokens and a body cap, checked before a single body byte is read.

A pure ASGI middleware in front of the FastAPI app. FastAPI reads and parses
a request's body before it runs the dependency that checks the token, so a
stranger could make the controller hold a 300 MB body (1 GB of RSS) just to
be told 401. Here, before the app sees the request:

- a mutating method (POST, PUT, PATCH, DELETE) needs ``Authorization: Bearer
  <api token>``: no token configured → 503 (fail closed), none or a wrong one
  → 401, the read token → 403; the body is never read;
- with ``security.api_read_token_file`` set, every other request except
  ``/healthz`` and ``/readyz`` needs the read token or the mutating one (401);
- a body may be at most ``max_body`` bytes (1 MiB): a larger
  ``Content-Length`` is 413 at once, and a streamed (chunked) body is counted
  as it arrives and cut off with 413 the moment it passes the cap, so at most
  one chunk past the cap is ever held.

Refusals are ``application/problem+json`` with ``Connection: close`` (the
server drops the connection instead of draining what the client still
sends) and are counted by reason. Tokens are compared in constant time and
never logged.
"""

from __future__ import annotations

import contextlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 1 << 20
"""Bytes a request body may have (1 MiB): the largest legitimate one, a silence or an alert batch, is a few KiB."""
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""Probes stay open: a load balancer or systemd has no token."""
NO_TOKEN = "no API token is configured (security.api_token_file): mutating endpoints are disabled"  # noqa: S105 - a message


@dataclass(frozen=True, slots=True, repr=False)
class Tokens:
    write: str | None
    """The mutating token (``security.api_token_file``); None: mutating endpoints answer 503."""
    read: str | None = None
    """The read token (``security.api_read_token_file``)."""
    reads_protected: bool = False
    """A read token is configured: reads need it (or the mutating token). True with ``read`` None (the file
    is unreadable) lets only the mutating token read — closed, never open."""

    def __repr__(self) -> str:
        return f"Tokens(write={'set' if self.write else None}, read={'set' if self.read else None})"


class BodyTooLarge(Exception):
    """Raised into the app from ``receive`` once the body passes the cap."""


class ApiGate:
    def __init__(self, app: ASGIApp, *, tokens: Tokens, max_body: int = MAX_BODY,
                 refused: Callable[[str, str], None] | None = None) -> None:
        self.app = app
        self.tokens = tokens
        self.max_body = max_body
        self.refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope["headers"])
        given = _bearer(headers.get(b"authorization", b""))
        tokens = self.tokens
        if scope["method"] in MUTATING:
            if tokens.write is None:
                await self._refuse(send, path, 503, NO_TOKEN, "unconfigured")
                return
            if not _matches(given, tokens.write):
                if _matches(given, tokens.read):
                    await self._refuse(send, path, 403, "the read token cannot change anything", "forbidden")
                else:
                    await self._refuse(send, path, 401, "a valid bearer token is required", "unauthorized")
                return
        elif tokens.reads_protected and path not in OPEN_PATHS and not (
                _matches(given, tokens.read) or _matches(given, tokens.write)):
            await self._refuse(send, path, 401, "a valid bearer token is required to read", "unauthorized")
            return
        declared = _content_length(headers.get(b"content-length"))
        if declared is not None and declared > self.max_body:
            await self._refuse(send, path, 413, f"the body may have at most {self.max_body} bytes", "too_large")
            return
        await self._capped(scope, receive, send)

    async def _capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with a ``receive`` that counts body bytes and stops at the cap."""
        received = 0
        over = started = False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    over = True
                    raise BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:
                return  # whatever the app makes of the cut-off body (a 400, a 500) is replaced by the 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counted, guarded)
        if over and not started:
            await self._refuse(send, scope["path"], 413, f"the body may have at most {self.max_body} bytes",
                               "too_large")

    async def _refuse(self, send: Send, path: str, status: int, detail: str, reason: str) -> None:
        if self.refused is not None:
            self.refused(reason, path)
        body = json.dumps(problem(status, detail, path)).encode()
        headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
          413: "Payload too large", 422: "Invalid request", 503: "Unavailable"}


def problem(status: int, detail: str, instance: str) -> dict[str, object]:
    """An RFC 9457 problem document."""
    return {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status, "detail": detail,
            "instance": instance}


def _bearer(value: bytes) -> bytes:
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _matches(given: bytes, token: str | None) -> bool:
    return bool(given) and token is not None and hmac.compare_digest(given, token.encode())


def _content_length(value: bytes | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
