"""Discord webhooks: ``content`` plus one embed per incident, with every mention disabled.

Format (Discord's Execute Webhook and Embed reference): ``content`` (at most
2000 characters), optional ``username``, ``embeds`` (at most 10; title ≤ 256,
description ≤ 4096, ≤ 25 fields of name ≤ 256 and value ≤ 1024, ``color`` an
integer, ``timestamp`` ISO 8601; all embeds together ≤ 6000 characters) and
``allowed_mentions``: ``{"parse": []}`` so no text of ours can ping
``@everyone``, a role or a user. On 429 Discord puts the wait in the JSON body
(``retry_after``, seconds) as well as in ``Retry-After``; the longer one wins.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from controller.notify.delivery import header_retry_after
from controller.notify.model import COLORS, GroupMessage, clip
from selfheal.clocks import iso

MAX_EMBEDS = 10
EMBED_BUDGET = 5500


class DiscordFormatter:
    def render(self, message: GroupMessage) -> dict[str, Any]:
        embeds: list[dict[str, Any]] = []
        used = 0
        for alert in message.alerts[:MAX_EMBEDS]:
            severity = "info" if alert.status == "resolved" else alert.severity
            embed: dict[str, Any] = {
                "title": clip(f"#{alert.incident_id} {alert.title} ({alert.status})", 256),
                "color": int(COLORS.get(severity, COLORS["warning"]).lstrip("#"), 16),
                "fields": [{"name": name, "value": clip(value or "-", 1024), "inline": False}
                           for name, value in alert.facts()][:25],
                "timestamp": iso(alert.ended_at if alert.ended_at is not None else alert.started_at),
            }
            if alert.link:
                embed["url"] = alert.link
            size = len(embed["title"]) + sum(len(f["name"]) + len(f["value"]) for f in embed["fields"])
            if used + size > EMBED_BUDGET:
                break
            used += size
            embeds.append(embed)
        hidden = len(message.alerts) + message.truncated - len(embeds)
        content = message.headline() + (f"\n{hidden} more not shown" if hidden else "")
        return {"username": "selfheal", "content": clip(content, 2000), "embeds": embeds,
                "allowed_mentions": {"parse": []}}

    def retry_after(self, response: httpx.Response, now: float) -> float | None:
        waits = [w for w in (header_retry_after(response, now), _body_retry_after(response)) if w is not None]
        return max(waits, default=None)


def _body_retry_after(response: httpx.Response) -> float | None:
    with contextlib.suppress(ValueError):
        body = response.json()
        value = body.get("retry_after") if isinstance(body, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return max(0.0, float(value))
    return None
