"""The notification router: from the engine's notifications to chat messages, with Alertmanager's hygiene.

``notify`` is what the engine calls: it picks the destinations whose label
matchers all match, puts the notification on a bounded queue and returns at
once — a full queue drops it and counts ``selfheal_notifications_dropped_total``;
the engine never waits for a chat service. ``run`` (a long-lived part of the
controller's task group) folds queued notifications into each destination's
groups (``grouping.py``) and runs one delivery lane per destination: when a
group is due its message is rendered by the destination kind's formatter and
delivered (``delivery.py``: token bucket, retries, Retry-After). Silences from
the engine apply when a message is built. Every attempt and every outcome is
written to each incident's audit trail through ``record`` and counted in
``selfheal_webhook_deliveries_total{destination_kind, outcome}``.

Sent once across controllers: before a queued notification is folded into a
destination's groups, the intake claims it in the store's notification log
(``claims.py``: a deterministic key per incident, event, cause and destination),
several notifications at once so the store commits their claims together; a
notification already claimed, by another controller or by this one before a
restart, is left out of that destination's messages. After a group's message,
the keys it carried are marked with its outcome. Without a log (``claims``
None) every notification is sent, as with one controller and no store.

On stop, changes not yet sent get one last message within ``drain_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import httpx

import selfheal
from controller.metrics import ControllerMetrics
from controller.notify.claims import Claims, NotificationLog, notification_key
from controller.notify.delivery import Attempt, RedactingFilter, RetryPolicy, Sleep, TokenBucket, deliver, redact
from controller.notify.grouping import Groups, Silenced
from controller.notify.model import Delivery, Formatter, GroupMessage, Notification
from remediations.state import Matcher
from selfheal.clocks import Clock
from selfheal.config import NotifyConfig
from selfheal.errors import ConfigError
from selfheal.logs import RateLimiter, get_logger

INTAKE_BATCH = 256
"""Most queued notifications claimed together (their claims share the store's commits)."""
MAX_CLAIMED = 1000
"""Claimed keys kept per group until its next message (for their outcome); beyond it the oldest are let go."""

Record = Callable[[int, str, dict[str, object]], Awaitable[None]]
"""``record(incident_id, kind, data)``: append to the incident's audit trail (the engine's ``_audit``)."""


@dataclass(frozen=True, slots=True, repr=False)
class Destination:
    name: str
    kind: str
    url: str
    """A secret: never logged (see ``redact``), never returned by the API."""
    matchers: tuple[Matcher, ...] = ()
    group_by: tuple[str, ...] = ("kind", "node")
    group_wait: float = 5.0
    group_interval: float = 60.0
    repeat_interval: float = 4 * 3600.0
    rate: float = 20.0
    """Messages per minute (token bucket refill)."""
    burst: int = 5
    timeout: float = 10.0

    @classmethod
    def from_config(cls, config: NotifyConfig, index: int) -> Destination:
        return cls(name=config.name or f"{config.kind}-{index}", kind=config.kind, url=config.url,
                   matchers=tuple(Matcher(k, v) for k, v in sorted(config.matchers.items())),
                   group_by=tuple(config.group_by), group_wait=config.group_wait,
                   group_interval=config.group_interval, repeat_interval=config.repeat_interval,
                   rate=config.rate, burst=config.burst, timeout=config.timeout)

    def routes(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(dict(labels)) for m in self.matchers)

    def __repr__(self) -> str:
        return f"Destination(name={self.name!r}, kind={self.kind!r}, url={redact(self.url)!r})"


class _Lane:
    """One destination's state: its groups, its token bucket, and the event that wakes its delivery loop."""

    def __init__(self, destination: Destination, formatter: Formatter, now: float) -> None:
        self.destination = destination
        self.formatter = formatter
        self.groups = Groups(group_by=destination.group_by, group_wait=destination.group_wait,
                             group_interval=destination.group_interval, repeat_interval=destination.repeat_interval)
        self.bucket = TokenBucket(destination.rate, destination.burst, now)
        self.wake = asyncio.Event()
        self.claimed: OrderedDict[tuple[str, ...], list[str]] = OrderedDict()
        """Group → the notification log keys folded into it since its last message."""

    def hold(self, group: tuple[str, ...], key: str) -> None:
        """Keep ``key`` until ``group``'s next message says how it went (bounded like the groups)."""
        keys = self.claimed.setdefault(group, [])
        self.claimed.move_to_end(group)
        keys.append(key)
        del keys[:-MAX_CLAIMED]
        while len(self.claimed) > self.groups.max_groups:
            self.claimed.popitem(last=False)


class Router:
    def __init__(self, destinations: Sequence[Destination], *, formatters: Mapping[str, Formatter],
                 metrics: ControllerMetrics, clock: Clock, record: Record, silenced: Silenced,
                 external_url: str = "", queue_size: int = 1000, policy: RetryPolicy | None = None,
                 drain_timeout: float = 5.0, sleep: Sleep = asyncio.sleep,
                 transport: httpx.AsyncBaseTransport | None = None, claims: NotificationLog | None = None) -> None:
        """``claims``: the store's notification log (``Store``), so that a notification is sent once across
        controllers and restarts; None sends every notification this router is given."""
        for i, destination in enumerate(destinations):
            if destination.kind not in formatters:
                raise ConfigError(f"no formatter for destination kind {destination.kind!r}",
                                  path=f"controller.notify[{i}].kind")
        self.lanes = [_Lane(d, formatters[d.kind], clock.monotonic()) for d in destinations]
        self.metrics = metrics
        self.clock = clock
        self.record = record
        self.silenced = silenced
        self.external_url = external_url.rstrip("/")
        self.policy = policy or RetryPolicy()
        self.drain_timeout = drain_timeout
        self.sleep = sleep
        self.transport = transport
        self.queue: asyncio.Queue[tuple[Notification, tuple[_Lane, ...]]] = asyncio.Queue(maxsize=queue_size)
        self.claims = Claims(claims, clock=clock)
        self._taking: asyncio.Future[None] | None = None
        """The batch the intake is claiming: on stop it is finished, not dropped."""
        self.limiter = RateLimiter(period=60.0)
        self.log = get_logger("notify")

    # --- the engine's side: never blocks ---------------------------------------------------------

    async def notify(self, notification: Notification) -> list[Delivery]:
        lanes = tuple(lane for lane in self.lanes if lane.destination.routes(notification.labels))
        if not lanes:
            return []
        try:
            self.queue.put_nowait((notification, lanes))
        except asyncio.QueueFull:
            self.metrics.notifications_dropped.inc()
            if self.limiter.allow("notify", "queue_full", self.clock.monotonic()):
                self.log.warning("notify.dropped", reason="notification queue full", incident=notification.incident_id,
                                 notify_event=notification.event, queue_size=self.queue.maxsize)
            return [Delivery(lane.destination.name, "dropped", "notification queue full") for lane in lanes]
        silenced = self.silenced(notification.labels)
        return [Delivery(lane.destination.name, "silenced" if silenced else "queued") for lane in lanes]

    # --- the long-lived part ---------------------------------------------------------------------

    async def run(self, *, stop: asyncio.Event) -> None:
        httpx_log = logging.getLogger("httpx")
        redacting = RedactingFilter(lane.destination.url for lane in self.lanes)
        httpx_log.addFilter(redacting)
        try:
            async with httpx.AsyncClient(transport=self.transport, follow_redirects=False,
                                         headers={"user-agent": f"selfheal/{selfheal.__version__}"}) as client:
                for lane in self.lanes:
                    d = lane.destination
                    self.log.info("notify.destination", destination=d.name, destination_kind=d.kind,
                                  url=redact(d.url), matchers={m.name: m.value for m in d.matchers},
                                  group_by=list(d.group_by))
                closing = asyncio.Event()  # set once the last notifications are in the groups
                async with asyncio.TaskGroup() as tg:
                    intake = tg.create_task(self._intake(), name="notify-intake")
                    lanes = [tg.create_task(self._deliver(lane, client, closing),
                                            name=f"notify-{lane.destination.name}") for lane in self.lanes]
                    await stop.wait()
                    intake.cancel()
                    await asyncio.wait([intake])
                    if self._taking is not None:
                        await self._taking
                    last = [self.queue.get_nowait() for _ in range(self.queue.qsize())]
                    await self._take(last)  # what the engine said last still gets its message
                    closing.set()
                    for lane in self.lanes:
                        lane.wake.set()
                    if lanes:
                        _, late = await asyncio.wait(lanes, timeout=self.drain_timeout)
                        for task in late:
                            task.cancel()
        finally:
            httpx_log.removeFilter(redacting)

    async def _intake(self) -> None:
        while True:
            batch = [await self.queue.get()]  # cancelled here (stop): nothing was taken
            while len(batch) < INTAKE_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self._taking = asyncio.ensure_future(self._take(batch))
            await asyncio.shield(self._taking)  # cancelled here: ``run`` awaits the batch to its end
            self._taking = None

    async def _take(self, batch: Sequence[tuple[Notification, tuple[_Lane, ...]]]) -> None:
        """Claim each notification per destination (all at once), then fold the won ones in, in order."""
        jobs: list[tuple[Notification, _Lane, str]] = []
        for notification, lanes in batch:
            cause = self.claims.cause(notification)
            jobs.extend((notification, lane, notification_key(notification.incident_id, notification.event, cause,
                                                               lane.destination.name)) for lane in lanes)
        won = await asyncio.gather(*(self.claims.claim(n, lane.destination.name, key) for n, lane, key in jobs))
        now = self.clock.monotonic()
        for (notification, lane, key), claimed in zip(jobs, won, strict=True):
            if claimed:
                lane.groups.apply(notification, now)
                if self.claims.notification_log is not None:
                    lane.hold(lane.groups.key_of(notification.labels), key)
                lane.wake.set()

    async def _deliver(self, lane: _Lane, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            lane.wake.clear()
            for key in lane.groups.due(self.clock.monotonic()):
                await self._flush(lane, key, client)
            if stop.is_set():
                break
            due = lane.groups.next_due()
            timeout = None if due is None else max(0.0, due - self.clock.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wake.wait(), timeout)
        for key in lane.groups.pending():  # stopping: say what changed and was not said yet
            await self._flush(lane, key, client)

    async def _flush(self, lane: _Lane, key: tuple[str, ...], client: httpx.AsyncClient) -> None:
        claimed = lane.claimed.pop(key, [])
        outcome = "failed"
        try:
            message = lane.groups.flush(key, self.clock.monotonic(), receiver=lane.destination.name,
                                        external_url=self.external_url, silenced=self.silenced)
            outcome = "silenced" if message is None else await self._send(lane, message, client)
        except Exception:  # a bug here must cost one message, never the lane or the controller
            self.log.exception("notify.flush_failed", destination=lane.destination.name)
        await self.claims.finish(claimed, outcome)

    async def _send(self, lane: _Lane, message: GroupMessage, client: httpx.AsyncClient) -> str:
        """Render and deliver one message; returns its outcome (``sent``, ``rejected``, ``failed``)."""
        d = lane.destination
        incidents = [a.incident_id for a in message.alerts]
        common = {"destination": d.name, "destination_kind": d.kind, "group": message.group_key,
                  "message": message.reason, "status": message.status}
        log = self.log.bind(destination=d.name, destination_kind=d.kind, group=message.group_key)
        try:
            body = json.dumps(lane.formatter.render(message), ensure_ascii=False).encode()
        except Exception:  # a formatter bug must not stop the lane
            log.exception("notify.render_failed")
            self.metrics.webhook_deliveries.labels(d.kind, "failed").inc()
            return "failed"

        async def on_attempt(attempt: Attempt) -> None:
            data: dict[str, object] = {**common, "attempt": attempt.number, "result": attempt.result,
                                       "http_status": attempt.status, "reason": attempt.reason}
            if attempt.retry_in is not None:
                data["retry_in_s"] = round(attempt.retry_in, 3)
                log.info("notify.retrying", attempt=attempt.number, reason=attempt.reason,
                         retry_in_s=round(attempt.retry_in, 3))
            await self._record(incidents, "delivery_attempt", data)

        result = await deliver(client, d.url, body, formatter=lane.formatter, bucket=lane.bucket, clock=self.clock,
                               policy=self.policy, timeout=d.timeout, sleep=self.sleep, on_attempt=on_attempt)
        self.metrics.webhook_deliveries.labels(d.kind, result.outcome).inc()
        if result.outcome == "sent":
            log.info("notify.sent", incidents=incidents, attempts=result.attempts, status=message.status)
        elif result.outcome == "rejected":
            log.warning("notify.gave_up", url=redact(d.url), reason=result.reason, attempts=result.attempts,
                        incidents=incidents, effect="not retried: the service refused the message")
        else:
            log.warning("notify.failed", url=redact(d.url), reason=result.reason, attempts=result.attempts,
                        incidents=incidents)
        await self._record(incidents, "delivery", {**common, "outcome": result.outcome, "attempts": result.attempts,
                                                   "http_status": result.status, "reason": result.reason})
        return result.outcome

    async def _record(self, incidents: list[int], kind: str, data: dict[str, object]) -> None:
        for incident_id in incidents:
            try:
                await self.record(incident_id, kind, data)
            except Exception:  # the audit store failing must not stop notifications
                self.log.exception("notify.audit_failed", incident=incident_id, audit_kind=kind)
