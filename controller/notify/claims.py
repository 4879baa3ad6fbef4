"""Chat once across controllers: the notification log's keys, and the claim a notification needs to be sent.

Several controllers share one fleet through one store (PostgreSQL). When a
bucket's owner dies mid-plan, the new owner re-derives the step; a restarted
controller resumes its plans: either may hand the router a state change that
was already handed over before. So, as a command is recorded under its
deterministic idempotency key before it is published, a notification is
claimed in the store's notification log before the router folds it into a
destination's groups. The key is ``notification_key(incident, event, cause,
destination)``: no time, no random id, so every controller derives the same
key for the same state change. The first claim of a key inserts it
(``claim_notification`` answers True) and that router sends it; every later
claim, from any controller, answers False and the notification is left out of
that destination's messages (``notify.duplicate``). Once the group's message
went out, the keys it carried are marked with its outcome (``sent``,
``rejected``, ``failed``, ``silenced``).

**At most once.** A claimer that dies between its claim and the message (the
group's ``group_wait``, then the delivery and its retries: seconds, normally)
leaves its claims ``claimed``, and nobody sends them: the controller that
re-derives them logs ``notify.duplicate`` and goes on. A chat loses that one
state change rather than repeating it; the incident's next one (the outcome,
the resolution, an escalation), sent by the new owner, says where things stand.
A lease on claims would not help: a takeover re-derives within seconds, long
before a claimer could be presumed dead while it legitimately waits out
``group_wait`` and retries.

**The log unreachable.** Should the claim itself fail (``StoreError``: a full
disk, PostgreSQL down) or take longer than ``CLAIM_TIMEOUT``, the notification
is sent unclaimed (``notify.claim_failed``): when the log cannot say, a page
twice beats no page — a broken store is exactly when a human should hear.

Causes: ``Notification.cause`` when the engine sets one (the plan id...). Without
it, events that happen once per incident (opened, resolved, failed, quarantined)
need none, and the others use their action, outcome and text, which name the
plan's attempt (``restart_unit (rule r, attempt 2)``), the plan awaiting
approval or the silence that ended; an ``outcome`` (whose text carries
timings) takes the cause of the incident's last ``action``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from controller.notify.model import Notification
from selfheal.clocks import Clock
from selfheal.errors import StoreError
from selfheal.logs import RateLimiter, get_logger

ONCE_PER_INCIDENT = frozenset({"opened", "resolved", "failed", "quarantined"})
"""Events an incident goes through at most once: the incident and the event are the whole cause."""
CLAIM_TIMEOUT = 10.0
"""Seconds a claim may take before the notification is sent unclaimed."""
MAX_REMEMBERED = 10_000
"""Incidents whose last ``action`` cause is kept (for their ``outcome``); beyond it the oldest is forgotten."""


class NotificationLog(Protocol):
    """The store's side (``controller.store.Store`` has both methods)."""

    async def claim_notification(self, *, key: str, incident_id: int, event: str, destination: str,
                                 at: float) -> bool: ...

    async def finish_notifications(self, keys: Sequence[str], *, outcome: str, at: float) -> None: ...


def notification_key(incident_id: int, event: str, cause: str, destination: str) -> str:
    """The notification log's key: the same on every controller for the same state change and destination."""
    raw = f"{incident_id}|{event}|{cause}|{destination}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def cause_of(notification: Notification, last_action: str | None = None) -> str:
    """What tells this state change from the incident's other ones of the same event (see the module doc)."""
    if notification.cause:
        return notification.cause
    if notification.event in ONCE_PER_INCIDENT:
        return ""
    if notification.event == "outcome" and last_action is not None:
        return last_action
    return "|".join((notification.action, notification.outcome, notification.text))


class Claims:
    """The router's use of the notification log; without a log (``None``) every claim is won at once."""

    def __init__(self, log: NotificationLog | None, *, clock: Clock, timeout: float = CLAIM_TIMEOUT,
                 remember: int = MAX_REMEMBERED) -> None:
        self.notification_log = log
        self.clock = clock
        self.timeout = timeout
        self.remember = remember
        self._actions: OrderedDict[int, str] = OrderedDict()
        """Incident → the cause of its last ``action``."""
        self.limiter = RateLimiter(period=60.0)
        self.log = get_logger("notify")

    def cause(self, notification: Notification) -> str:
        """The notification's cause; call in the order notifications came (an ``action`` sets its outcome's)."""
        cause = cause_of(notification, self._actions.get(notification.incident_id))
        if notification.event == "action":
            self._actions[notification.incident_id] = cause
            self._actions.move_to_end(notification.incident_id)
            while len(self._actions) > self.remember:
                self._actions.popitem(last=False)
        return cause

    async def claim(self, notification: Notification, destination: str, key: str) -> bool:
        """True: this router sends it. False: it was claimed before, here or on another controller."""
        if self.notification_log is None:
            return True
        try:
            async with asyncio.timeout(self.timeout):
                won = await self.notification_log.claim_notification(
                    key=key, incident_id=notification.incident_id, event=notification.event,
                    destination=destination, at=self.clock.wall())
        except (StoreError, TimeoutError) as exc:
            if self.limiter.allow("claim_failed", type(exc).__name__, self.clock.monotonic()):
                self.log.warning("notify.claim_failed", incident=notification.incident_id,
                                 notify_event=notification.event, destination=destination, key=key,
                                 error=str(exc) or type(exc).__name__,
                                 effect="sent without a claim: another controller may send it too")
            return True
        except Exception:  # a bug in the log must cost a possible duplicate, never the message
            self.log.exception("notify.claim_failed", incident=notification.incident_id, destination=destination,
                               key=key, effect="sent without a claim: another controller may send it too")
            return True
        if not won:
            self.log.info("notify.duplicate", incident=notification.incident_id, notify_event=notification.event,
                          destination=destination, key=key,
                          effect="not sent again: claimed before (by another controller, or this one before a "
                                 "restart); at most once, so if its claimer died before sending, it is not sent")
        return won

    async def finish(self, keys: Sequence[str], outcome: str) -> None:
        """Mark claimed keys with their message's outcome; a failure here is logged and otherwise ignored."""
        if self.notification_log is None or not keys:
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self.notification_log.finish_notifications(keys, outcome=outcome, at=self.clock.wall())
        except (StoreError, TimeoutError) as exc:
            if self.limiter.allow("finish_failed", type(exc).__name__, self.clock.monotonic()):
                self.log.warning("notify.unrecorded", keys=len(keys), outcome=outcome,
                                 error=str(exc) or type(exc).__name__,
                                 effect="the notification log keeps them as claimed; nothing is sent again")
        except Exception:  # bookkeeping only: never the lane
            self.log.exception("notify.unrecorded", keys=len(keys), outcome=outcome)
