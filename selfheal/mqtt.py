"""One thin async adapter over aiomqtt that keeps a connection alive.

``MqttLink.run`` connects, calls ``on_connect`` (subscribe, announce), then
reads messages into ``handle`` and drains a bounded outbox, until the stop
event. When the broker goes away it logs, backs off with jitter and
reconnects; queued messages wait in the outbox (oldest dropped and counted
when it is full), so a broker restart loses nothing that fits. ``handle`` must
not raise: its errors are logged and counted, never allowed to stop the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from selfheal.logs import get_logger

Handler = Callable[[str, bytes], Awaitable[None]]
OnConnect = Callable[["MqttLink"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttLink:
    def __init__(self, host: str, port: int, *, client_id: str, will: Outgoing | None = None,
                 keepalive: float = 10.0, reconnect_max: float = 5.0, outbox_size: int = 10_000,
                 name: str = "mqtt") -> None:
        self.host, self.port = host, port
        self.client_id = client_id
        self.will = will
        self.keepalive = keepalive
        self.reconnect_max = reconnect_max
        self._outbox: deque[Outgoing] = deque()
        self._outbox_size = outbox_size
        self._wake = asyncio.Event()
        self._closing = False
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.dropped = 0
        self.handler_errors = 0
        self.connects = 0
        self.log = get_logger(name, broker=f"{host}:{port}")

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """Queue a message; sent as soon as connected. Never blocks."""
        if len(self._outbox) >= self._outbox_size:
            self._outbox.popleft()
            self.dropped += 1
        self._outbox.append(Outgoing(topic, payload, qos, retain))
        self._wake.set()

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        if self._client is None:
            raise aiomqtt.MqttError("not connected")
        await self._client.subscribe(topic_filter, qos=qos)

    async def run(self, *, stop: asyncio.Event, handle: Handler, on_connect: OnConnect) -> None:
        attempt = 0
        while not stop.is_set():
            will = None
            if self.will is not None:
                will = aiomqtt.Will(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
            try:
                async with aiomqtt.Client(
                    self.host, self.port, identifier=self.client_id, will=will,
                    keepalive=max(1, round(self.keepalive)), clean_session=True,
                    protocol=aiomqtt.ProtocolVersion.V311, timeout=5,
                ) as client:
                    self._client = client
                    attempt = 0
                    self.connects += 1
                    await on_connect(self)
                    self.connected.set()
                    self.log.info("mqtt.connected")
                    await self._serve(client, stop, handle)
            except aiomqtt.MqttError as exc:
                if stop.is_set():
                    break
                attempt += 1
                delay = min(self.reconnect_max, 0.1 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)  # noqa: S311
                self.log.warning("mqtt.disconnected", error=str(exc), retry_in_s=round(delay, 2))
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
            if not self._outbox:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._outbox[0]
            await client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
            # Only forget a message once the client took it, so a disconnect keeps it queued.
            if self._outbox and self._outbox[0] is item:
                self._outbox.popleft()

    async def _flush(self, writer: asyncio.Task[None], timeout: float = 2.0) -> None:
        """Best effort: let the writer send what is queued, then end, before a clean disconnect.

        Waiting for the writer (rather than publishing alongside it) keeps the message it
        has in flight from being sent twice and the rest from being reordered.
        """
        self._closing = True
        self._wake.set()
        await asyncio.wait({writer}, timeout=timeout)
        if self._outbox:
            self.log.warning("mqtt.flush_incomplete", left=len(self._outbox))


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
