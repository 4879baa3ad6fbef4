"""Microsoft Teams through a Workflows webhook ("post to a channel when a webhook request is received").

The Office 365 connector webhooks and their ``MessageCard`` format are retired;
Workflows take a message activity carrying one Adaptive Card attachment:
``{"type": "message", "attachments": [{"contentType":
"application/vnd.microsoft.card.adaptive", "contentUrl": null, "content":
<AdaptiveCard>}]}``. The card (schema version 1.4, which Teams renders) holds a
``TextBlock`` headline, per incident a ``TextBlock`` and a ``FactSet``, and an
``Action.OpenUrl`` per incident link (Teams shows at most a handful of actions).
Teams caps a message at about 28 KB, so incidents beyond ``MAX_CARDS`` are counted.
"""

from __future__ import annotations

from typing import Any

import httpx

from controller.notify.delivery import header_retry_after
from controller.notify.model import GroupMessage, clip

MAX_CARDS = 10
COLOR = {"critical": "Attention", "warning": "Warning", "info": "Good"}


class TeamsFormatter:
    def render(self, message: GroupMessage) -> dict[str, Any]:
        body: list[dict[str, Any]] = [{
            "type": "TextBlock", "text": clip(message.headline(), 300), "weight": "Bolder", "size": "Medium",
            "color": COLOR[message.severity], "wrap": True}]
        actions: list[dict[str, Any]] = []
        shown = message.alerts[:MAX_CARDS]
        for alert in shown:
            body.append({"type": "TextBlock", "text": clip(f"#{alert.incident_id} {alert.title} ({alert.status})", 300),
                         "weight": "Bolder", "wrap": True, "separator": True})
            body.append({"type": "FactSet", "facts": [{"title": name, "value": clip(value, 1000)}
                                                      for name, value in alert.facts()]})
            if alert.link and len(actions) < 5:
                actions.append({"type": "Action.OpenUrl", "title": f"Open incident #{alert.incident_id}",
                                "url": alert.link})
        hidden = message.truncated + len(message.alerts) - len(shown)
        if hidden:
            body.append({"type": "TextBlock", "text": f"{hidden} more not shown", "isSubtle": True, "wrap": True})
        card: dict[str, Any] = {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                                "type": "AdaptiveCard", "version": "1.4", "msteams": {"width": "Full"},
                                "body": body}
        if actions:
            card["actions"] = actions
        return {"type": "message", "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}]}

    def retry_after(self, response: httpx.Response, now: float) -> float | None:
        return header_retry_after(response, now)
