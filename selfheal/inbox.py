"""The MQTT client's queue of incoming messages: bounded, coalescing reports, shedding only reports.

aiomqtt puts every message the broker delivers into an ``asyncio.Queue`` (its ``queue_type``) that the
reader empties one by one. When the controller falls behind a large fleet the backlog waits there, so
that queue decides what an overload costs. A report is a snapshot that the node's next report makes
obsolete; an event, a status, a digest, a command (the agent's inbox) is not. So ``Inbox``:

- coalesces reports once it is behind (``coalesce_bytes`` waiting): a report for a node that already
  has one waiting replaces it in its slot (counted ``superseded``). Below that, every report is kept, so
  a short burst (an agent's backlog after a reconnect) reaches the detectors whole. The slot keeps its
  place in the queue: a node that reports faster than the queue drains is still handled within one
  queue length, with its newest report (moving it to the back would starve exactly such a node). While
  behind, at most one new report per node waits.
- holds reports (and messages on topics it does not know) within ``max_bytes``; beyond, it sheds the
  waiting reports whose content is oldest first (``shed``), and only then refuses the arrival.
- holds events, statuses, digests, commands and the controller's status up to ``hard_max_bytes``,
  shedding reports first to make room; only beyond that hard cap are they dropped (``full``). One node
  may have at most ``node_max_bytes`` of them waiting (``node_full``): a node that floods loses its own
  messages, never another node's (with keys, the broker's ACL pins a client to its node's topics).

Bound: the payloads waiting (each counted with ``OVERHEAD``) never exceed ``hard_max_bytes``, so at most
``hard_max_bytes / OVERHEAD`` messages wait. Non-report messages keep their arrival order (FIFO); only a
report's content is swapped in place, so no event ever passes an earlier one. Every operation is O(1)
amortised: a dict node -> slot, a deque of slots with tombstones, compacted when tombstones outnumber
the live slots. ``InboxStats`` counts drops per (channel, reason), exported by the controller as
``selfheal_mqtt_inbox_dropped_total``; a drop is logged at most once a minute and never raises
``QueueFull``, so aiomqtt logs nothing per drop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, cast

import aiomqtt

from selfheal.logs import RateLimiter, get_logger

DEFAULT_MAX_BYTES = 48 * 1024 * 1024
"""Reports waiting at most (one ~2.4 KB report each for ~20,000 nodes; 192 at the wire's 256 KiB cap)."""
DEFAULT_HARD_MAX_BYTES = 64 * 1024 * 1024
"""Everything waiting at most: events, statuses, digests and commands are dropped only beyond this."""
OVERHEAD = 512
"""What a queued message costs beyond its payload (its objects and topic), counted against the budget."""
DEFAULT_COALESCE_BYTES = 1024 * 1024
"""Waiting bytes from which a node's newer report replaces its waiting one (~400 reports behind)."""
DEFAULT_NODE_MAX_BYTES = 2 * 1024 * 1024
"""Events, statuses, digests and commands of one node waiting at most (8 messages at the wire's cap)."""
COMPACT_SLACK = 64
"""Tombstones tolerated beyond the live slots before a deque is rebuilt (amortised O(1))."""

Channel = Literal["report", "status", "digests", "events", "commands", "controller", "other"]
Reason = Literal["superseded", "shed", "full", "node_full"]
CHANNELS: tuple[Channel, ...] = ("report", "status", "digests", "events", "commands", "controller", "other")
REASONS: tuple[Reason, ...] = ("superseded", "shed", "full", "node_full")
_NODE_CHANNELS: dict[str, Channel] = {"report": "report", "status": "status", "digests": "digests",
                                      "events": "events", "commands": "commands"}
LABELS: tuple[tuple[Channel, Reason], ...] = (
    ("report", "superseded"), ("report", "shed"), *((channel, "full") for channel in CHANNELS),
    *((channel, "node_full") for channel in ("status", "digests", "events", "commands")))
"""Every (channel, reason) a drop is counted under: a fixed set, exported whether zero or not."""
_CONTROLLER_TOPIC = "selfheal/v1/controller/status"
_SOFT: frozenset[Channel] = frozenset({"report", "other"})
"""Held within ``max_bytes`` only: reports (a newer one follows) and topics nobody subscribes to on purpose."""

log = get_logger("mqtt.inbox")


@dataclass
class InboxStats:
    dropped: int = 0
    """Messages that never reach the reader, whatever the reason (the sum of ``by_reason``)."""
    dropped_bytes: int = 0
    queued_bytes: int = 0
    """Bytes waiting now (payload, topic and ``OVERHEAD`` per message)."""
    queued_messages: int = 0
    by_reason: dict[tuple[Channel, Reason], int] = field(default_factory=dict)
    """Drops per (channel, reason) of ``LABELS``: ``superseded``/``shed`` reports, ``full``/``node_full`` caps."""

    @property
    def superseded(self) -> int:
        return self.by_reason.get(("report", "superseded"), 0)

    @property
    def shed(self) -> int:
        return self.by_reason.get(("report", "shed"), 0)

    def count(self, channel: Channel, reason: Reason, size: int) -> None:
        self.by_reason[channel, reason] = self.by_reason.get((channel, reason), 0) + 1
        self.dropped += 1
        self.dropped_bytes += size


class _Slot:
    """One place in the queue; ``message`` None is a tombstone (consumed or shed)."""

    __slots__ = ("channel", "key", "message", "node", "size", "version")

    def __init__(self, message: aiomqtt.Message, size: int, channel: Channel, key: str | None,
                 node: str | None) -> None:
        self.message: aiomqtt.Message | None = message
        self.size = size
        self.channel = channel
        self.key = key
        """The report's topic, for a report."""
        self.node = node
        """The node, for an event, status, digest or command (held to ``node_max_bytes``)."""
        self.version = 0


class Inbox(asyncio.Queue[aiomqtt.Message]):
    def __init__(self, maxsize: int = 0, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 hard_max_bytes: int | None = None, node_max_bytes: int = DEFAULT_NODE_MAX_BYTES,
                 coalesce_bytes: int = DEFAULT_COALESCE_BYTES, stats: InboxStats | None = None) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.coalesce_bytes = min(coalesce_bytes, max_bytes)
        self.hard_max_bytes = max(max_bytes, hard_max_bytes if hard_max_bytes is not None
                                  else max(max_bytes, DEFAULT_HARD_MAX_BYTES))
        self.node_max_bytes = node_max_bytes
        self.stats = stats or InboxStats()
        self.stats.queued_bytes = self.stats.queued_messages = 0  # a new connection's queue: the last one is gone
        self.steps = 0
        """Slots visited (skipped, shed, copied by a compaction): O(1) amortised per message, for tests."""
        self._limiter = RateLimiter(period=60.0, max_keys=len(CHANNELS) * len(REASONS))

    # --- asyncio.Queue's storage hooks ---------------------------------------------------------------

    def _init(self, maxsize: int) -> None:
        self._slots: deque[_Slot] = deque()
        self._reports: deque[tuple[_Slot, int]] = deque()
        """(slot, version) per report arrival, oldest first: what to shed; stale entries are tombstones."""
        self._waiting: dict[str, _Slot] = {}
        self._node_bytes: dict[str, int] = {}
        """Bytes of events, statuses, digests, commands waiting per node (only nodes with some)."""
        self._live = 0
        self._live_reports = 0
        self._report_bytes = 0

    def qsize(self) -> int:
        return self._live

    def empty(self) -> bool:
        return self._live == 0

    def _put(self, item: aiomqtt.Message) -> None:  # only via put_nowait, which admits first
        self._append(_Slot(item, _size(item), *_classify(str(item.topic))))

    def _get(self) -> aiomqtt.Message:
        while True:
            slot = self._slots.popleft()
            self.steps += 1
            if slot.message is not None:
                message = slot.message
                self._retire(slot)
                return message

    # --- admission -----------------------------------------------------------------------------------

    def put_nowait(self, item: aiomqtt.Message) -> None:
        size = _size(item)
        channel, key, node = _classify(str(item.topic))
        stats = self.stats
        if (channel == "report" and key is not None and stats.queued_bytes >= self.coalesce_bytes
                and (slot := self._waiting.get(key)) is not None):
            stats.count("report", "superseded", slot.size)
            stats.queued_bytes += size - slot.size
            self._report_bytes += size - slot.size
            slot.message, slot.size, slot.version = item, size, slot.version + 1
            self._reports.append((slot, slot.version))  # its content is now the newest: shed last
            self._make_room(0)
            self._compact()
            return
        if node is not None and self._node_bytes.get(node, 0) + size > self.node_max_bytes:
            self._drop(channel, "node_full", size, item)
            return
        limit = self.max_bytes if channel in _SOFT else self.hard_max_bytes
        if stats.queued_bytes - self._report_bytes + size > limit:  # would not fit with every report shed
            self._drop(channel, "shed" if channel == "report" else "full", size, item)
            return
        self._make_room(size)  # then it fits: within max_bytes, or every report shed
        super().put_nowait(item)  # asyncio.Queue's bookkeeping (wakes a waiting get), then ``_put``
        self._compact()

    def _append(self, slot: _Slot) -> None:
        self._slots.append(slot)
        self._live += 1
        self.stats.queued_messages += 1
        self.stats.queued_bytes += slot.size
        if slot.channel == "report" and slot.key is not None:
            self._waiting[slot.key] = slot
            self._reports.append((slot, slot.version))
            self._live_reports += 1
            self._report_bytes += slot.size
        elif slot.node is not None:
            self._node_bytes[slot.node] = self._node_bytes.get(slot.node, 0) + slot.size

    def _make_room(self, size: int) -> None:
        """Shed the reports whose content is oldest until ``size`` more bytes fit within ``max_bytes``."""
        reports = self._reports
        while reports and self.stats.queued_bytes + size > self.max_bytes:
            slot, version = reports.popleft()
            self.steps += 1
            if slot.message is not None and slot.version == version:
                self._shed(slot)

    def _shed(self, slot: _Slot) -> None:
        message = slot.message
        self.stats.count("report", "shed", slot.size)
        self._retire(slot)
        self._log("report", "shed", message)
        self.task_done()  # it was put and will never be got: ``join`` must not wait for it

    def _retire(self, slot: _Slot) -> None:
        slot.message = None
        self._live -= 1
        self.stats.queued_messages -= 1
        self.stats.queued_bytes -= slot.size
        if slot.key is not None:
            if self._waiting.get(slot.key) is slot:  # below coalesce_bytes a node may have several waiting
                del self._waiting[slot.key]
            self._live_reports -= 1
            self._report_bytes -= slot.size
        elif slot.node is not None:
            left = self._node_bytes.pop(slot.node) - slot.size
            if left:
                self._node_bytes[slot.node] = left

    def _drop(self, channel: Channel, reason: Reason, size: int, item: aiomqtt.Message) -> None:
        self.stats.count(channel, reason, size)
        self._log(channel, reason, item)

    def _log(self, channel: Channel, reason: Reason, item: aiomqtt.Message | None) -> None:
        if self._limiter.allow(channel, reason, time.monotonic()):
            log.warning("mqtt.inbox_full", channel=channel, reason=reason, max_bytes=self.max_bytes,
                        hard_max_bytes=self.hard_max_bytes, dropped_so_far=self.stats.dropped,
                        topic=str(item.topic)[:200] if item is not None else "")

    def _compact(self) -> None:
        """Drop tombstones once they outnumber the live slots: each slot is copied O(1) times on average."""
        if len(self._slots) > 2 * self._live + COMPACT_SLACK:
            self.steps += len(self._slots)
            self._slots = deque(slot for slot in self._slots if slot.message is not None)
        if len(self._reports) > 2 * self._live_reports + COMPACT_SLACK:
            self.steps += len(self._reports)
            self._reports = deque(entry for entry in self._reports
                                  if entry[0].message is not None and entry[0].version == entry[1])


def inbox_type(stats: InboxStats, max_bytes: int = DEFAULT_MAX_BYTES, hard_max_bytes: int = DEFAULT_HARD_MAX_BYTES,
               node_max_bytes: int = DEFAULT_NODE_MAX_BYTES,
               coalesce_bytes: int = DEFAULT_COALESCE_BYTES) -> type[asyncio.Queue[aiomqtt.Message]]:
    """What aiomqtt's ``queue_type`` takes: it calls it with ``maxsize``."""
    factory: Callable[..., Any] = partial(Inbox, max_bytes=max_bytes, hard_max_bytes=hard_max_bytes,
                                          node_max_bytes=node_max_bytes, coalesce_bytes=coalesce_bytes,
                                          stats=stats)
    return cast("type[asyncio.Queue[aiomqtt.Message]]", factory)


def _classify(topic: str) -> tuple[Channel, str | None, str | None]:
    """(channel, the report's key, the node of another node message); O(1): a split, no decoding."""
    if topic == _CONTROLLER_TOPIC:
        return "controller", None, None
    parts = topic.split("/", 7)
    if len(parts) != 7 or parts[0] != "selfheal" or parts[1] != "v1" or parts[2] != "p" or parts[4] != "nodes":
        return "other", None, None
    channel = _NODE_CHANNELS.get(parts[6], "other")
    if channel == "report":
        return channel, topic, None
    return channel, None, (parts[5] if channel != "other" else None)


def _size(item: aiomqtt.Message) -> int:
    payload = item.payload
    return OVERHEAD + len(str(item.topic)) + (len(payload) if isinstance(payload, bytes | bytearray | str) else 0)
