"""Notifications to humans: the engine's notifications, the log sink, and chat webhooks.

``controller.notify`` keeps the names the engine and dispatcher import
(``Notification``, ``Delivery``, ``Notifier``, ``LogNotifier``). The chat side:
``router.py`` (queue, grouping, silences, rate limits, retries, audit),
``grouping.py`` (the pure grouping state), ``delivery.py`` (one HTTP delivery
with retries), and one formatter module per destination kind, collected by
``registry.py``.
"""

from controller.notify.log import FanoutNotifier, LogNotifier
from controller.notify.model import ALERT_EVENTS, Delivery, Notification, Notifier, incident_labels

__all__ = ["ALERT_EVENTS", "Delivery", "FanoutNotifier", "LogNotifier", "Notification", "Notifier",
           "incident_labels"]
