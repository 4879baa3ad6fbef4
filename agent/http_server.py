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
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette

from selfheal.config_checks import split_host_port
from selfheal.errors import ConfigError

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


class HttpServer:
    """One uvicorn server on an already bound socket; ``run`` until ``stop``. HTTPS with a certificate and key."""

    def __init__(self, app: Starlette, sock: socket.socket, *, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("agent.tls_cert and agent.tls_key go together")
        self.sock = sock
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key)
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


class _Server(uvicorn.Server):
    """uvicorn inside our task group: signals belong to the process, not to the HTTP server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
