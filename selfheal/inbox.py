"""The MQTT client's queue of incoming messages, bounded in bytes.

aiomqtt puts every message the broker delivers into an ``asyncio.Queue`` that
is unbounded by default; the reader takes them out one by one. A broker client
that publishes faster than the controller ingests (a flood of maximal
reports) would pile them up there without limit. ``Inbox`` holds at most
``max_bytes`` of payloads (``DEFAULT_MAX_BYTES``: tens of thousands of normal
messages, so the burst of retained statuses and digests on subscribing fits);
beyond, a message is dropped on arrival, counted in ``InboxStats`` (exported by
the controller as ``selfheal_mqtt_inbox_dropped_total``) and logged at most
once a minute. It never raises ``QueueFull``, so aiomqtt logs nothing per drop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import aiomqtt

from selfheal.logs import RateLimiter, get_logger

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Payload bytes waiting to be handled at most (254 messages at the wire's 256 KiB cap)."""
OVERHEAD = 512
"""What a queued message costs beyond its payload (its objects and topic), counted against the budget."""

log = get_logger("mqtt.inbox")


@dataclass
class InboxStats:
    dropped: int = 0
    """Messages dropped on arrival because the inbox was full."""
    dropped_bytes: int = 0
    queued_bytes: int = 0
    """Bytes waiting now."""


class Inbox(asyncio.Queue[aiomqtt.Message]):
    def __init__(self, maxsize: int = 0, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 stats: InboxStats | None = None) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.stats = stats or InboxStats()
        self._limiter = RateLimiter(period=60.0, max_keys=1)

    def put_nowait(self, item: aiomqtt.Message) -> None:
        size = _size(item)
        if self.stats.queued_bytes + size > self.max_bytes:
            self.stats.dropped += 1
            self.stats.dropped_bytes += size
            if self._limiter.allow("inbox", "full", time.monotonic()):
                log.warning("mqtt.inbox_full", max_bytes=self.max_bytes, dropped_so_far=self.stats.dropped,
                            topic=str(item.topic)[:200])
            return
        super().put_nowait(item)

    def _put(self, item: aiomqtt.Message) -> None:
        self.stats.queued_bytes += _size(item)
        super()._put(item)

    def _get(self) -> aiomqtt.Message:
        item: aiomqtt.Message = super()._get()
        self.stats.queued_bytes -= _size(item)
        return item


def inbox_type(stats: InboxStats, max_bytes: int = DEFAULT_MAX_BYTES) -> type[asyncio.Queue[aiomqtt.Message]]:
    """What aiomqtt's ``queue_type`` takes: it calls it with ``maxsize``."""
    factory: Callable[..., Any] = partial(Inbox, max_bytes=max_bytes, stats=stats)
    return cast("type[asyncio.Queue[aiomqtt.Message]]", factory)


def _size(item: aiomqtt.Message) -> int:
    payload = item.payload
    return OVERHEAD + len(str(item.topic)) + (len(payload) if isinstance(payload, bytes | bytearray | str) else 0)
