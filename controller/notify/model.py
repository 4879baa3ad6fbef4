"""What the engine says, what a chat message is made of, and the protocols both sides meet.

The engine hands a ``Notification`` — one state change of one incident — to a
``Notifier``. The router (``router.py``) groups notifications per destination
into a ``GroupMessage``; a ``Formatter`` (one module per destination kind)
renders that into the JSON body the destination expects. Every message answers
the same three questions per incident: what broke, what selfheal did, and
whether it worked — with a link to the incident.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx

Event = Literal["opened", "action", "outcome", "resolved",
                "escalated", "failed", "quarantined", "approval_needed", "silence_expired"]
ALERT_EVENTS = frozenset({"escalated", "failed", "quarantined", "approval_needed", "silence_expired"})
"""Events that ask a human to look; the others (opened, action, outcome, resolved) report progress."""
Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True, slots=True)
class Notification:
    incident_id: int
    event: Event
    severity: Severity
    title: str
    text: str
    node: str
    unit: str | None = None
    link: str = ""
    kind: str = ""
    """The finding kind (``unit_exited``...)."""
    summary: str = ""
    """What broke, in one line (the finding's summary)."""
    action: str = ""
    """The plan's action, for ``action`` and ``outcome`` events."""
    outcome: str = ""
    """The plan's outcome (``succeeded``, ``failed``, ``cancelled``...), for ``outcome`` events."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Routing labels: kind, node, unit, severity, rule and the node's own labels (``group``...)."""
    at: float = 0.0
    """Wall time of the state change (seconds since the epoch)."""
    cause: str = ""
    """What caused it, the same on every controller that derives it (the plan id for ``action``,
    ``outcome``, ``approval_needed``, ``escalated``; a silence id...): part of the notification log's key
    (``claims.py``), never a time or a random id. Empty: derived from the event and its text."""


@dataclass(frozen=True, slots=True)
class Delivery:
    destination: str
    outcome: Literal["sent", "failed", "dropped", "queued", "silenced"]
    detail: str = ""


class Notifier(Protocol):
    async def notify(self, notification: Notification) -> list[Delivery]: ...


def incident_labels(*, kind: str, node: str, unit: str | None, severity: str, rule: str | None,
                    node_labels: Mapping[str, str]) -> dict[str, str]:
    """The labels a destination's matchers (and silences) see: the node's labels, then the incident's."""
    return {**node_labels, "kind": kind, "node": node, "unit": unit or "", "severity": severity,
            "rule": rule or ""}


# --- what formatters render -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlertView:
    """One incident as a message shows it."""

    incident_id: int
    status: Literal["firing", "resolved"]
    title: str
    """``unit_exited on node-a/web``."""
    severity: str
    labels: Mapping[str, str]
    what_broke: str
    did: str
    """What selfheal did so far (``restart_unit x2, then stop_unit``) or ``nothing yet``."""
    worked: str
    """Whether it worked: ``yes — ...``, ``no — ...``, ``not yet — ...``."""
    changes: tuple[str, ...]
    """What changed since the previous message about this group (``opened``, ``restart_unit started``...)."""
    link: str
    started_at: float
    ended_at: float | None

    def facts(self) -> list[tuple[str, str]]:
        facts = [("What broke", self.what_broke), ("What selfheal did", self.did), ("Did it work", self.worked)]
        if self.changes:
            facts.append(("Changes", ", ".join(self.changes)))
        return facts


@dataclass(frozen=True, slots=True)
class GroupMessage:
    """One message to one destination about one group of incidents."""

    receiver: str
    group_key: str
    group_labels: Mapping[str, str]
    common_labels: Mapping[str, str]
    alerts: tuple[AlertView, ...]
    truncated: int
    """Incidents of the group left out of ``alerts`` to keep the message within the service's limits."""
    reason: Literal["new", "update", "repeat"]
    external_url: str

    @property
    def status(self) -> Literal["firing", "resolved"]:
        return "firing" if self.firing else "resolved"

    @property
    def firing(self) -> int:
        return sum(1 for a in self.alerts if a.status == "firing")

    @property
    def severity(self) -> Severity:
        if self.status == "resolved":
            return "info"
        severities = {a.severity for a in self.alerts if a.status == "firing"}
        return "critical" if "critical" in severities else "warning"

    def subject(self) -> str:
        if len(self.alerts) == 1:
            return self.alerts[0].title
        kind = self.group_labels.get("kind", "")
        rest = ", ".join(v for k, v in self.group_labels.items() if k != "kind" and v)
        return " on ".join(p for p in (kind or f"{len(self.alerts)} incidents", rest) if p)

    def headline(self) -> str:
        state = f"FIRING:{self.firing}" if self.firing else "RESOLVED"
        reminder = " (still unresolved)" if self.reason == "repeat" else ""
        return f"[{state}] {self.subject()}{reminder}"

    def plain_text(self) -> str:
        """The message as plain text: the notification fallback and the body of text-only clients."""
        lines = [self.headline()]
        lines.extend(f"#{a.incident_id} {a.title} ({a.status}): broke: {a.what_broke}; selfheal did: {a.did}; "
                     f"worked: {a.worked}" + (f" {a.link}" if a.link else "") for a in self.alerts)
        if self.truncated:
            lines.append(f"... and {self.truncated} more")
        return "\n".join(lines)


class Formatter(Protocol):
    """Renders a group message into one destination kind's JSON body (one module per kind)."""

    def render(self, message: GroupMessage) -> dict[str, Any]: ...

    def retry_after(self, response: httpx.Response, now: float) -> float | None:
        """Seconds the service asked us to wait (on 429/503), or None; ``now`` is wall time."""
        ...


COLORS = {"critical": "#d63232", "warning": "#e8a317", "info": "#2eb67d"}
"""Message accent per severity; ``info`` is also the colour of a resolved message."""


def clip(text: str, limit: int) -> str:
    """At most ``limit`` characters, with an ellipsis when cut (services reject over-long fields)."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"
