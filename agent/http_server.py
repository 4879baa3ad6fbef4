"""The agent's HTTP server: uvicorn on ``agent.listen`` inside the agent's task group.

``bind_listen`` binds the socket up front (port 0 picks a free port), so the
address is known before the MQTT last will is built and can be announced in
``NodeStatus.http``. A wildcard host (``0.0.0.0``, ``::``) is announced as
the local address this host would use to reach the broker — the interface
the controller and peers most likely share with it — found by connecting a
UDP socket, which sends nothing.

With ``agent.tls_cert`` and ``agent.tls_key`` the server speaks HTTPS only
and the address is announced as ``https://host:port`` (a bare ``host:port``
means plain HTTP, as older agents announce it); the controller and pulling
peers verify the certificate against ``security.peer_tls_ca``
(``selfheal.peer_tls``), host name included, so the certificate must name
the announced address.

What it serves (``peer_server``): a node with datasets runs the peer API
(``agent.peer_api``, Starlette under uvicorn); a node without any answers only
``/healthz`` (the same JSON) from a few lines of ``asyncio.start_server``, and
404 to the rest, as the peer API would for a dataset it does not hold. Nothing
else uses the address then (the controller and peers call it only to move
datasets), and uvicorn, Starlette and the peer API stay unimported: ~4 MiB of a
lean agent (``bench/agent.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from selfheal.config_checks import split_host_port
from selfheal.errors import ConfigError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from agent.digests.cache import DigestCache
    from agent.digests.scanner import DatasetView
    from selfheal.clocks import Clock

REQUEST_HEAD_LIMIT = 8 * 1024
"""Bytes of request line and headers the light server reads at most."""
REQUEST_TIMEOUT = 5.0
"""Seconds the light server waits for a request head."""

Metrics = Callable[[], tuple[bytes, str]]
"""``/metrics``' body and content type (``agent.metrics.AgentMetrics.render``), made on the event loop."""

WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 - recognised, not bound here


def bind_listen(listen: str, *, broker_host: str, tls: bool = False) -> tuple[socket.socket, str]:
    """A bound TCP socket for ``listen`` and the ``host:port`` (``https://host:port`` with ``tls``) to announce."""
    host, port = split_host_port(listen, what="agent.listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound = int(sock.getsockname()[1])
    announced = host if host not in WILDCARDS else _route_address(broker_host, family)
    address = f"[{announced}]:{bound}" if ":" in announced else f"{announced}:{bound}"
    return sock, f"https://{address}" if tls else address


def _route_address(broker_host: str, family: socket.AddressFamily) -> str:
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((broker_host, 9))  # UDP connect: picks a route, sends nothing
        address = str(probe.getsockname()[0])
        if address not in WILDCARDS:
            return address
    return socket.gethostname()


class PeerServer(Protocol):
    """What the agent runs on ``agent.listen``."""

    @property
    def started(self) -> bool: ...

    async def run(self, *, stop: asyncio.Event) -> None: ...


def peer_server(sock: socket.socket, *, node_id: str, key: bytes | None, datasets: Callable[[str], DatasetView | None],
                cache: DigestCache, clock: Clock, serves_datasets: bool, metrics: Metrics,
                refused: Counter[str], tls_cert: str | None = None, tls_key: str | None = None) -> PeerServer:
    """The peer API under uvicorn when the node serves datasets; otherwise the light ``/healthz`` server.
    Both serve ``/metrics`` from ``metrics`` (``agent.metrics``); the peer API counts what it refuses in
    ``refused``."""
    if not serves_datasets:
        return HealthServer(sock, node_id=node_id, metrics=metrics, tls_cert=tls_cert, tls_key=tls_key)
    from agent.peer_api import PeerApiContext, create_peer_api  # noqa: PLC0415 - only a node with datasets

    api = create_peer_api(PeerApiContext(node_id=node_id, key=key, datasets=datasets, cache=cache, clock=clock,
                                         refused=refused, metrics=metrics))
    return HttpServer(api, sock, tls_cert=tls_cert, tls_key=tls_key)


class HttpServer:
    """One uvicorn server on an already bound socket; ``run`` until ``stop``. HTTPS with a certificate and key."""

    def __init__(self, app: Starlette, sock: socket.socket, *, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        import uvicorn  # noqa: PLC0415 - only a node that serves datasets runs uvicorn

        if (tls_cert is None) != (tls_key is None):
            raise ValueError("agent.tls_cert and agent.tls_key go together")
        self.sock = sock
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                proxy_headers=False)  # no proxy in front: transfers are bound to the real peer
        if tls_cert is not None:
            try:
                config.load()  # now, so a bad certificate stops the agent at start with the key named
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot serve HTTPS with {tls_cert!r} and its key: {exc}",
                                  path="agent.tls_cert") from None
        self.server = _Server(config)

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    async def run(self, *, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.server.serve(sockets=[self.sock]), name="agent-http-serve")
                await stop.wait()
                self.server.should_exit = True
        finally:
            self.sock.close()


def _Server(config: Any) -> Any:  # noqa: N802 - stands for the class, built on first use
    """uvicorn inside our task group: signals belong to the process, not to the HTTP server."""
    import uvicorn  # noqa: PLC0415

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


class HealthServer:
    """``GET /healthz`` and ``/metrics`` on an already bound socket (HTTPS with a certificate and key), 404 for
    the rest.

    One request per connection, its head bounded in size and time; the body is never read."""

    def __init__(self, sock: socket.socket, *, node_id: str, metrics: Metrics | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("agent.tls_cert and agent.tls_key go together")
        self.sock = sock
        self._metrics = metrics
        self._health = json.dumps({"status": "ok", "node": node_id}, separators=(",", ":")).encode()
        self._ssl: ssl.SSLContext | None = None
        if tls_cert is not None and tls_key is not None:
            try:
                self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                self._ssl.load_cert_chain(tls_cert, tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot serve HTTPS with {tls_cert!r} and its key: {exc}",
                                  path="agent.tls_cert") from None
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    async def run(self, *, stop: asyncio.Event) -> None:
        try:
            server = await asyncio.start_server(self._serve, sock=self.sock, ssl=self._ssl,
                                                limit=REQUEST_HEAD_LIMIT)
            async with server:
                self._started = True
                await stop.wait()
        finally:
            self.sock.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if path == b"/healthz" and method in (b"GET", b"HEAD"):
                status, kind, body = b"200 OK", b"application/json", self._health
            elif path == b"/metrics" and method in (b"GET", b"HEAD") and self._metrics is not None:
                try:
                    body, content_type = self._metrics()
                    status, kind = b"200 OK", content_type.encode()
                except Exception as exc:  # noqa: BLE001 - a figure that cannot be read is a 500, never a dead server
                    status, kind = b"500 Internal Server Error", b"application/problem+json"
                    body = json.dumps({"title": "Internal Server Error", "status": 500,
                                       "detail": f"metrics: {type(exc).__name__}"}).encode()
            else:
                status, kind = b"404 Not Found", b"application/problem+json"
                body = b'{"title":"Not Found","status":404,"detail":"this node serves no datasets"}'
            writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: " + kind + b"\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
                         + (body if method != b"HEAD" else b""))
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass  # a client that went away or sent too much: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
