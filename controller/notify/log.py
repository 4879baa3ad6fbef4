"""The notifier that always exists: one structured log line per notification.

A log pipeline can route these lines on its own; chat destinations are the
router's job (``router.py``). Alerts (escalated, failed, ...) are logged at
warning level, progress (opened, action, outcome, resolved) at info.
"""

from __future__ import annotations

from controller.notify.model import ALERT_EVENTS, Delivery, Notification, Notifier
from selfheal.logs import get_logger


class LogNotifier:
    """Writes each notification as a ``notification`` log line."""

    def __init__(self) -> None:
        self.log = get_logger("notify")

    async def notify(self, notification: Notification) -> list[Delivery]:
        emit = self.log.warning if notification.event in ALERT_EVENTS else self.log.info
        emit("notification", incident=notification.incident_id, notify_event=notification.event,
             severity=notification.severity, title=notification.title, text=notification.text,
             node=notification.node, unit=notification.unit, link=notification.link)
        return [Delivery("log", "sent")]


class FanoutNotifier:
    """Hands each notification to every notifier; one failing never keeps the others (or the engine) from going on."""

    def __init__(self, *notifiers: Notifier) -> None:
        self.notifiers = notifiers
        self.log = get_logger("notify")

    async def notify(self, notification: Notification) -> list[Delivery]:
        deliveries: list[Delivery] = []
        for notifier in self.notifiers:
            try:
                deliveries.extend(await notifier.notify(notification))
            except Exception as exc:  # a broken sink must not take the engine down
                self.log.exception("notify.sink_failed", incident=notification.incident_id,
                                   sink=type(notifier).__name__)
                deliveries.append(Delivery(type(notifier).__name__, "failed", type(exc).__name__))
        return deliveries
