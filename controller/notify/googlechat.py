"""Google Chat incoming webhooks: a short ``text`` and one card in ``cardsV2``.

Format (Google Chat API, Message and Cards v2 reference): ``text`` plus
``cardsV2``: a list of ``{"cardId", "card"}``; a card has a ``header``
(``title``, ``subtitle``) and ``sections``, each with an optional ``header``
and ``widgets`` — here ``decoratedText`` (``topLabel``, ``text``,
``wrapText``) per fact and a ``buttonList`` whose button opens the incident
(``onClick.openLink.url``). A card holds at most 100 widgets. Card text takes a
small HTML subset, so our text is HTML-escaped.
"""

from __future__ import annotations

import hashlib
import html
from typing import Any

import httpx

from controller.notify.delivery import header_retry_after
from controller.notify.model import GroupMessage, clip

MAX_SECTIONS = 15


class GoogleChatFormatter:
    def render(self, message: GroupMessage) -> dict[str, Any]:
        sections: list[dict[str, Any]] = []
        for alert in message.alerts[:MAX_SECTIONS]:
            widgets: list[dict[str, Any]] = [
                {"decoratedText": {"topLabel": name, "text": clip(html.escape(value), 2000), "wrapText": True}}
                for name, value in alert.facts()]
            if alert.link:
                widgets.append({"buttonList": {"buttons": [
                    {"text": f"Open incident #{alert.incident_id}", "onClick": {"openLink": {"url": alert.link}}}]}})
            sections.append({"header": html.escape(f"#{alert.incident_id} {alert.title} ({alert.status})"),
                             "widgets": widgets})
        hidden = len(message.alerts) + message.truncated - len(sections)
        if hidden:
            sections.append({"widgets": [{"textParagraph": {"text": f"{hidden} more not shown"}}]})
        card_id = "selfheal-" + hashlib.sha256(message.group_key.encode()).hexdigest()[:16]
        return {"text": clip(message.headline(), 4000), "cardsV2": [{"cardId": card_id, "card": {
            "header": {"title": clip(message.headline(), 200), "subtitle": "selfheal"}, "sections": sections}}]}

    def retry_after(self, response: httpx.Response, now: float) -> float | None:
        return header_retry_after(response, now)
