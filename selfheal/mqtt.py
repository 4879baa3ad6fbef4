"""One thin async adapter over aiomqtt that keeps a connection alive.

``MqttLink.run`` connects, calls ``on_connect`` (subscribe, announce), then
reads messages into ``handle`` and drains a bounded outbox, until the stop
event. When the broker goes away it logs, backs off with jitter and
reconnects; queued messages wait in the outbox, so a broker restart loses
nothing that fits. ``handle`` must not raise: its errors are logged and
counted, never allowed to stop the loop.

Reconnecting: the wait between attempts doubles from 0.2 s up to
``reconnect_max``, each wait a random 50-100 % of its step (so a fleet does
not come back in one burst), and never exceeds it: a client is back at most
``reconnect_max`` (plus the handshake) after its broker answers again.

Held messages: a message only one subscriber cares about (the agent's events
and command results, for the controller) is worthless when it reaches the
broker before that subscriber: after a broker restart without persistence
nobody is subscribed until the controller is back, and the broker drops it.
``publish(..., held=True)`` queues it apart; it goes out only while the link
is ``release``d, before anything else queued, and ``hold`` stops it again
(the agent, once it has heard of a controller, holds on each reconnect and
releases when the controller's ``online`` status reaches it on the new
connection: the controller publishes that only once subscribed). Held
messages keep their order among themselves.
A message published ``current=True`` (the agent's report: its units as they
are now) is worth sending only on the connection it was queued on: one still
queued when the link reconnects is dropped, so a node back from a partition
never says after its new ``online`` what its units were before it was cut off.
Held first also keeps the order a stopping agent needs: its units' exits
before its ``offline``. The outbox is bounded as a whole (``outbox_size``):
when full, the oldest message that is not held is dropped first (a report, or
a status or digest that the next one repeats), a held one only when nothing
else is left; each drop is counted.

The last will may be a callable, asked before each connect: a will per
connection (the agent numbers its connections, ``wire.NodeStatus.conn``).

Identity: ``MqttLink.from_config`` reads the broker password from
``mqtt.password_file`` once, at the edge, and builds the TLS context for
``mqtts://`` (the broker's certificate is verified against ``tls_ca`` or the
system's CAs; ``tls_insecure`` skips only the host-name check). The password is
held privately: never in a log line, a repr or an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt

from selfheal.errors import ConfigError
from selfheal.inbox import InboxStats, inbox_type
from selfheal.logs import get_logger

if TYPE_CHECKING:
    from selfheal.config import MqttConfig

Handler = Callable[[str, bytes], Awaitable[None]]
OnConnect = Callable[["MqttLink"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    current: bool = False
    """Only for the connection it was queued on (see the module docstring)."""


class MqttLink:
    def __init__(self, host: str, port: int, *, client_id: str, will: Outgoing | Callable[[], Outgoing] | None = None,
                 keepalive: float = 10.0, reconnect_max: float = 5.0, outbox_size: int = 10_000,
                 name: str = "mqtt", username: str | None = None, password: str | None = None,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
        self.username = username or None
        self._password = password if self.username else None
        self._tls_context = tls_context
        self.client_id = client_id
        self.will = will
        """The last will: fixed, or a callable asked before each connect (a will per connection)."""
        self.keepalive = keepalive
        self.reconnect_max = reconnect_max
        self._outbox: deque[Outgoing] = deque()
        self._held: deque[Outgoing] = deque()
        """Messages sent only while released (see the module docstring)."""
        self._released = True
        self._outbox_size = outbox_size
        self._wake = asyncio.Event()
        self._closing = False
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.dropped = 0
        self.inbox = InboxStats()
        """What the inbox (``selfheal.inbox``) holds and dropped: superseded or shed reports, full caps."""
        self.handler_errors = 0
        self.connects = 0
        self.log = get_logger(name, broker=f"{host}:{port}", user=self.username or "-",
                              tls=tls_context is not None)

    @classmethod
    def from_config(cls, mqtt: MqttConfig, *, client_id: str, will: Outgoing | Callable[[], Outgoing] | None = None,
                    name: str = "mqtt") -> MqttLink:
        """A link to the broker ``mqtt`` names, with its identity and TLS; reads the files now.

        A password file or TLS file that cannot be used is a ``ConfigError`` naming its key.
        """
        host, port = mqtt.host_port()
        password = read_password(mqtt.password_file) if mqtt.username and mqtt.password_file else None
        return cls(host, port, client_id=client_id, will=will, keepalive=mqtt.keepalive,
                   reconnect_max=mqtt.reconnect_max, name=name, username=mqtt.username or None,
                   password=password, tls_context=tls_context(mqtt) if mqtt.tls else None)

    def __repr__(self) -> str:  # the password never shows
        return (f"MqttLink(broker={self.host}:{self.port}, client_id={self.client_id!r}, "
                f"username={self.username!r}, tls={self._tls_context is not None})")

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, held: bool = False,
                current: bool = False) -> None:
        """Queue a message; sent as soon as connected, a ``held`` one once released too, a ``current`` one
        only on this connection. Never blocks."""
        if len(self._outbox) + len(self._held) >= self._outbox_size:
            (self._outbox or self._held).popleft()
            self.dropped += 1
        (self._held if held else self._outbox).append(Outgoing(topic, payload, qos, retain, current))
        self._wake.set()

    def hold(self) -> None:
        """Keep held messages queued (their subscriber may not be listening) until ``release``."""
        self._released = False

    def release(self) -> None:
        """Send held messages again, first of all: their subscriber is listening."""
        self._released = True
        self._wake.set()

    @property
    def holding(self) -> int:
        """Held messages waiting, for the subscriber or for the broker."""
        return len(self._held)

    def _drop_past(self) -> None:
        """A new connection: what was ``current`` on the one before is not any more."""
        kept = deque(item for item in self._outbox if not item.current)
        self.dropped += len(self._outbox) - len(kept)
        self._outbox = kept

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        if self._client is None:
            raise aiomqtt.MqttError("not connected")
        await self._client.subscribe(topic_filter, qos=qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        if self._client is None:
            raise aiomqtt.MqttError("not connected")
        await self._client.unsubscribe(topic_filter)

    async def run(self, *, stop: asyncio.Event, handle: Handler, on_connect: OnConnect) -> None:
        attempt = 0
        while not stop.is_set():
            will = None
            outgoing = self.will() if callable(self.will) else self.will
            if outgoing is not None:
                will = aiomqtt.Will(outgoing.topic, outgoing.payload, outgoing.qos, outgoing.retain)
            try:
                async with aiomqtt.Client(
                    self.host, self.port, identifier=self.client_id, will=will,
                    username=self.username, password=self._password, tls_context=self._tls_context,
                    keepalive=max(1, round(self.keepalive)), clean_session=True,
                    protocol=aiomqtt.ProtocolVersion.V311, timeout=5, queue_type=inbox_type(self.inbox),
                ) as client:
                    self._client = client
                    attempt = 0
                    self.connects += 1
                    self._drop_past()
                    await on_connect(self)
                    self.connected.set()
                    self.log.info("mqtt.connected")
                    await self._serve(client, stop, handle)
            except aiomqtt.MqttError as exc:
                if stop.is_set():
                    break
                attempt += 1
                delay = min(self.reconnect_max, 0.1 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)  # noqa: S311
                hint = _hint(str(exc))
                self.log.warning("mqtt.disconnected", error=str(exc), retry_in_s=round(delay, 2),
                                 **({"hint": hint} if hint else {}))
                self.connected.clear()
                self._client = None
                await _sleep_or_stop(stop, delay)
            finally:
                self.connected.clear()
                self._client = None

    async def _serve(self, client: aiomqtt.Client, stop: asyncio.Event, handle: Handler) -> None:
        self._closing = False
        reader = asyncio.create_task(self._read(client, handle), name=f"{self.client_id}-read")
        writer = asyncio.create_task(self._write(client), name=f"{self.client_id}-write")
        stopper = asyncio.create_task(stop.wait(), name=f"{self.client_id}-stop")
        tasks: tuple[asyncio.Task[Any], ...] = (reader, writer, stopper)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                await self._flush(writer)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error

    async def _read(self, client: aiomqtt.Client, handle: Handler) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            try:
                await handle(str(message.topic), bytes(payload))
            except Exception:  # a bad message must never stop the reader
                self.handler_errors += 1
                self.log.exception("mqtt.handler_failed", topic=str(message.topic))

    async def _write(self, client: aiomqtt.Client) -> None:
        while True:
            queue = self._held if self._released and self._held else self._outbox
            if not queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            item = queue[0]
            await client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
            # Only forget a message once the client took it, so a disconnect keeps it queued.
            if queue and queue[0] is item:
                queue.popleft()

    async def _flush(self, writer: asyncio.Task[None], timeout: float = 2.0) -> None:
        """Best effort: let the writer send what is queued, then end, before a clean disconnect.

        Waiting for the writer (rather than publishing alongside it) keeps the message it
        has in flight from being sent twice and the rest from being reordered.
        """
        self._closing = True
        self._wake.set()
        await asyncio.wait({writer}, timeout=timeout)
        if self._outbox or self._held:
            self.log.warning("mqtt.flush_incomplete", left=len(self._outbox) + len(self._held),
                             held=len(self._held))


def _hint(error: str) -> str | None:
    """What an operator should look at when the broker or its certificate refuses the connection."""
    lowered = error.lower()
    if "not authori" in lowered or "user name or password" in lowered:
        return "the broker refused this identity: check mqtt.username and mqtt.password_file against its users"
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return "the broker's certificate did not verify: check mqtt.tls_ca and the host name in mqtt.url"
    return None


def read_password(path: str | Path, *, key: str = "mqtt.password_file") -> str:
    """The password in ``path`` (surrounding whitespace stripped); ``ConfigError`` naming ``key``."""
    try:
        password = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror or type(exc).__name__}", path=key) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{str(path)!r} is not UTF-8 text", path=key) from None
    if not password:
        raise ConfigError(f"{str(path)!r} is empty", path=key)
    return password


def tls_context(mqtt: MqttConfig) -> ssl.SSLContext:
    """The client TLS context for ``mqtts://``: verify the broker (``tls_ca`` or the system's CAs),
    present ``tls_cert``/``tls_key`` when set; ``tls_insecure`` skips only the host-name check."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=mqtt.tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA {mqtt.tls_ca!r}: {_reason(exc)}", path="mqtt.tls_ca") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _ClosingSSLSocket
    if mqtt.tls_cert:
        try:
            context.load_cert_chain(mqtt.tls_cert, mqtt.tls_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load client certificate {mqtt.tls_cert!r} / key {mqtt.tls_key!r}: "
                              f"{_reason(exc)}", path="mqtt.tls_cert") from None
    if mqtt.tls_insecure:
        context.check_hostname = False  # the chain is still verified (verify_mode stays CERT_REQUIRED)
    return context


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails: paho leaves such a socket open (a file descriptor per
    refused attempt until the garbage collector runs, e.g. against a broker with the wrong certificate)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
