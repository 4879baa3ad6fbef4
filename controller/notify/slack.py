"""Slack incoming webhooks: Block Kit blocks, with ``text`` as the notification fallback.

Format (Slack's incoming-webhook and Block Kit reference): a JSON object with
``text`` (shown in notifications and by clients that cannot render blocks) and
``blocks`` — here a ``header`` (plain_text, at most 150 characters), one
``section`` per incident (mrkdwn, at most 3000 characters) and a ``context``
line. At most 50 blocks per message. In mrkdwn ``&``, ``<`` and ``>`` must be
escaped — which also keeps ``<!channel>`` style pings out of our text.
"""

from __future__ import annotations

from typing import Any

import httpx

from controller.notify.delivery import header_retry_after
from controller.notify.model import GroupMessage, clip

EMOJI = {"critical": ":red_circle:", "warning": ":large_orange_circle:", "info": ":large_green_circle:"}


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackFormatter:
    def render(self, message: GroupMessage) -> dict[str, Any]:
        blocks: list[dict[str, Any]] = [{
            "type": "header",
            "text": {"type": "plain_text", "text": clip(message.headline(), 150), "emoji": True}}]
        for alert in message.alerts:
            title = f"#{alert.incident_id} {escape(alert.title)} ({alert.status})"
            heading = f"*<{alert.link}|{title}>*" if alert.link else f"*{title}*"
            facts = "\n".join(f"*{name}:* {escape(value)}" for name, value in alert.facts())
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": clip(f"{heading}\n{facts}", 3000)}})
        more = f" · {message.truncated} more not shown" if message.truncated else ""
        labels = ", ".join(f"{k}={v}" for k, v in message.group_labels.items())
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": clip(f"{EMOJI[message.severity]} selfheal · {escape(labels)}{more}", 3000)}]})
        return {"text": clip(escape(message.plain_text()), 3000), "blocks": blocks[:50]}

    def retry_after(self, response: httpx.Response, now: float) -> float | None:
        return header_retry_after(response, now)
