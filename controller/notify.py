"""Notifications to humans: what the engine says, and the sinks that carry it.

The engine hands a ``Notification`` to a ``Notifier`` and records the
returned deliveries in the incident's audit trail. ``LogNotifier`` is the
sink that always exists: one structured log line per notification, which a
log pipeline can route. Chat webhooks (Slack, Teams, ...) plug in as further
notifiers (see the alerting docs when they land).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from selfheal.logs import get_logger


@dataclass(frozen=True, slots=True)
class Notification:
    incident_id: int
    event: Literal["escalated", "failed", "quarantined", "approval_needed", "silence_expired"]
    severity: Literal["info", "warning", "critical"]
    title: str
    text: str
    node: str
    unit: str | None = None
    link: str = ""


@dataclass(frozen=True, slots=True)
class Delivery:
    destination: str
    outcome: Literal["sent", "failed", "dropped"]
    detail: str = ""


class Notifier(Protocol):
    async def notify(self, notification: Notification) -> list[Delivery]: ...


class LogNotifier:
    """Writes each notification as a ``notification`` log line at warning level."""

    def __init__(self) -> None:
        self.log = get_logger("notify")
        self.sent: list[Notification] = []

    async def notify(self, notification: Notification) -> list[Delivery]:
        self.sent.append(notification)
        del self.sent[:-1000]  # bounded: the last thousand, for the API and tests
        self.log.warning("notification", incident=notification.incident_id, notify_event=notification.event,
                         severity=notification.severity, title=notification.title, text=notification.text,
                         node=notification.node, unit=notification.unit, link=notification.link)
        return [Delivery("log", "sent")]
