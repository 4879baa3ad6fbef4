"""Mattermost incoming webhooks: Markdown ``text`` plus Slack-compatible message attachments.

Format (Mattermost's incoming-webhook and message-attachments reference): a
JSON object with ``text`` (Markdown), optional ``username`` and
``attachments`` — each with a required plain-text ``fallback``, a hex
``color``, ``title``/``title_link``, Markdown ``text`` and ``fields``
(``title``, ``value``, ``short``). Mattermost expands ``@mentions`` in text,
so every ``@`` gets a zero-width joiner after it: a summary never pings a channel.
"""

from __future__ import annotations

from typing import Any

import httpx

from controller.notify.delivery import header_retry_after
from controller.notify.model import COLORS, GroupMessage, clip


def defuse(text: str) -> str:
    return text.replace("@", "@\u2060")


class MattermostFormatter:
    def render(self, message: GroupMessage) -> dict[str, Any]:
        attachments: list[dict[str, Any]] = []
        for alert in message.alerts:
            severity = "info" if alert.status == "resolved" else alert.severity
            attachment: dict[str, Any] = {
                "fallback": clip(defuse(f"#{alert.incident_id} {alert.title} ({alert.status}): {alert.worked}"), 500),
                "color": COLORS.get(severity, COLORS["warning"]),
                "title": clip(defuse(f"#{alert.incident_id} {alert.title} ({alert.status})"), 250),
                "fields": [{"title": name, "value": clip(defuse(value), 2000), "short": False}
                           for name, value in alert.facts()],
            }
            if alert.link:
                attachment["title_link"] = alert.link
            attachments.append(attachment)
        more = f"\n_{message.truncated} more not shown_" if message.truncated else ""
        return {"username": "selfheal", "text": clip(defuse(f"**{message.headline()}**{more}"), 4000),
                "attachments": attachments}

    def retry_after(self, response: httpx.Response, now: float) -> float | None:
        return header_retry_after(response, now)
