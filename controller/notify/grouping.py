"""Alertmanager-style grouping for one destination, as plain bounded state (no I/O, ``now`` passed in).

Notifications are folded into groups by the destination's ``group_by`` labels;
inside a group, one entry per incident keeps what broke, what selfheal did and
whether it worked. Timing follows Alertmanager:

- a new group waits ``group_wait`` before its first message, so the findings of
  one failure arrive together;
- later changes are sent at most once per ``group_interval``;
- a group with unresolved incidents and no change is repeated every
  ``repeat_interval``;
- an incident leaves its group once a message said it resolved; an empty group
  is forgotten.

Silenced incidents still update their state (so their resolution is not lost)
but are left out of messages while the silence lasts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from controller.notify.model import AlertView, GroupMessage, Notification

MAX_GROUPS = 1000
"""Groups kept per destination; beyond it the group quiet for longest is forgotten."""
MAX_ALERTS = 200
"""Incidents kept per group; beyond it the oldest resolved (else oldest) one is forgotten."""
MAX_SHOWN = 20
"""Incidents shown in one message; the rest are counted (``truncated``)."""
MAX_ACTIONS = 8
MAX_CHANGES = 12

Silenced = Callable[[Mapping[str, str]], bool]


@dataclass
class _Alert:
    incident_id: int
    labels: dict[str, str]
    title: str
    severity: str
    link: str
    started_at: float
    what_broke: str = ""
    actions: list[str] = field(default_factory=list)
    worked: str = "not yet — nothing done so far"
    resolved_at: float | None = None
    changes: list[str] = field(default_factory=list)

    def view(self) -> AlertView:
        return AlertView(
            incident_id=self.incident_id, status="resolved" if self.resolved_at is not None else "firing",
            title=self.title, severity=self.severity, labels=dict(self.labels),
            what_broke=self.what_broke or self.title, did=_did(self.actions), worked=self.worked,
            changes=tuple(self.changes), link=self.link, started_at=self.started_at, ended_at=self.resolved_at)


@dataclass
class _Group:
    labels: dict[str, str]
    alerts: OrderedDict[int, _Alert] = field(default_factory=OrderedDict)
    due_at: float | None = None
    last_sent: float | None = None
    changed: bool = False
    touched: float = 0.0


class Groups:
    """The groups of one destination."""

    def __init__(self, *, group_by: tuple[str, ...], group_wait: float, group_interval: float,
                 repeat_interval: float, max_groups: int = MAX_GROUPS, max_alerts: int = MAX_ALERTS,
                 max_shown: int = MAX_SHOWN) -> None:
        self.group_by = group_by
        self.group_wait = group_wait
        self.group_interval = group_interval
        self.repeat_interval = repeat_interval
        self.max_groups = max_groups
        self.max_alerts = max_alerts
        self.max_shown = max_shown
        self._groups: dict[tuple[str, ...], _Group] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def key_of(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        """The group a notification with ``labels`` falls in (the key ``due`` and ``flush`` take)."""
        return tuple(labels.get(name, "") for name in self.group_by)

    def apply(self, notification: Notification, now: float) -> None:
        """Fold one state change in and schedule the group's next message."""
        labels = dict(notification.labels)
        key = self.key_of(labels)
        group = self._groups.get(key)
        if group is None:
            self._evict_groups()
            group = self._groups[key] = _Group(labels=dict(zip(self.group_by, key, strict=True)),
                                               due_at=now + self.group_wait)
        alert = group.alerts.get(notification.incident_id)
        if alert is None:
            self._evict_alerts(group)
            unit = f"/{notification.unit}" if notification.unit else ""
            alert = group.alerts[notification.incident_id] = _Alert(
                incident_id=notification.incident_id, labels=labels, severity=labels.get("severity", "warning"),
                title=f"{notification.kind or 'incident'} on {notification.node}{unit}", link=notification.link,
                started_at=notification.at, what_broke=notification.summary)
        _update(alert, notification)
        group.changed = True
        group.touched = now
        if group.last_sent is None:  # nothing said yet: group_wait (from the group's first change)
            if group.due_at is None:
                group.due_at = now + self.group_wait
        else:  # already told: changes go out at most once per group_interval
            soonest = max(group.last_sent + self.group_interval, now)
            group.due_at = soonest if group.due_at is None else min(group.due_at, soonest)

    def next_due(self) -> float | None:
        return min((g.due_at for g in self._groups.values() if g.due_at is not None), default=None)

    def due(self, now: float) -> list[tuple[str, ...]]:
        return [k for k, g in self._groups.items() if g.due_at is not None and g.due_at <= now]

    def pending(self) -> list[tuple[str, ...]]:
        """Groups with changes not yet sent (for a last flush at shutdown)."""
        return [k for k, g in self._groups.items() if g.changed]

    def flush(self, key: tuple[str, ...], now: float, *, receiver: str, external_url: str,
              silenced: Silenced) -> GroupMessage | None:
        """The group's message as of now (None if all of it is silenced), and the group moved on past it."""
        group = self._groups.get(key)
        if group is None:
            return None
        reason: Literal["new", "update", "repeat"] = (
            "new" if group.last_sent is None else "update" if group.changed else "repeat")
        visible = [a for a in group.alerts.values() if not silenced(a.labels)]
        if reason != "repeat" and not any(a.changes for a in visible):
            visible = []  # only silenced incidents changed: nothing new to say
        message = None
        if visible:
            shown = sorted(visible, key=lambda a: a.resolved_at is not None)[: self.max_shown]
            common = dict(set.intersection(*(set(a.labels.items()) for a in visible)))
            message = GroupMessage(
                receiver=receiver, group_key=_group_key(group.labels), group_labels=dict(group.labels),
                common_labels=dict(sorted(common.items())), alerts=tuple(a.view() for a in shown),
                truncated=len(visible) - len(shown), reason=reason, external_url=external_url)
        for incident_id, alert in list(group.alerts.items()):
            alert.changes.clear()
            if alert.resolved_at is not None:
                del group.alerts[incident_id]
        group.changed = False
        if message is not None:
            group.last_sent = now
        if not group.alerts:
            del self._groups[key]
        elif group.last_sent is None:
            group.due_at = None  # nothing said yet (all silenced): the next change starts group_wait
        elif message is not None:
            group.due_at = now + self.repeat_interval
        else:  # muted this time: keep the rhythm of the last message actually sent
            following = group.last_sent + self.repeat_interval
            group.due_at = following if following > now else now + self.repeat_interval
        return message

    def _evict_groups(self) -> None:
        while len(self._groups) >= self.max_groups:
            oldest = min(self._groups, key=lambda k: self._groups[k].touched)
            del self._groups[oldest]

    def _evict_alerts(self, group: _Group) -> None:
        while len(group.alerts) >= self.max_alerts:
            resolved = next((i for i, a in group.alerts.items() if a.resolved_at is not None), None)
            del group.alerts[resolved if resolved is not None else next(iter(group.alerts))]


def _update(alert: _Alert, n: Notification) -> None:
    """What each event means for the three questions a message answers."""
    if n.link:
        alert.link = n.link
    change = n.event.replace("_", " ")
    if n.event == "opened":
        alert.what_broke = n.summary or n.text or alert.what_broke
        alert.resolved_at = None
    elif n.event == "action":
        alert.actions = [*alert.actions, n.action or n.text][-MAX_ACTIONS:]
        alert.worked = f"not yet — {n.action or 'the action'} in progress"
        change = f"{n.action or 'action'} started"
    elif n.event == "outcome":
        verdict = {"succeeded": "yes", "cancelled": "not needed"}.get(n.outcome, "no")
        alert.worked = f"{verdict} — {n.action} {n.outcome}" + (f": {n.text}" if n.text else "")
        change = f"{n.action} {n.outcome}"
    elif n.event == "escalated":
        alert.actions = [*alert.actions, "paged a human"][-MAX_ACTIONS:]
        alert.worked = f"no — escalated to a human: {n.text}"
        change = "escalated to a human"
    elif n.event in ("failed", "quarantined"):
        alert.worked = f"no — selfheal gave up: {n.text}"
        change = "selfheal gave up"
    elif n.event == "approval_needed":
        alert.actions = [*alert.actions, "proposed a plan"][-MAX_ACTIONS:]
        alert.worked = f"not yet — waiting for a human: {n.text}"
    elif n.event == "resolved":
        alert.resolved_at = n.at
        if alert.worked.startswith("not yet"):
            alert.worked = f"yes — resolved: {n.text}" if n.text else "yes — resolved"
    alert.changes = [*alert.changes, change][-MAX_CHANGES:]


def _did(actions: list[str]) -> str:
    if not actions:
        return "nothing yet"
    runs: list[tuple[str, int]] = []
    for action in actions:
        if runs and runs[-1][0] == action:
            runs[-1] = (action, runs[-1][1] + 1)
        else:
            runs.append((action, 1))
    return ", then ".join(f"{a} x{n}" if n > 1 else a for a, n in runs)


def _group_key(labels: Mapping[str, str]) -> str:
    """Alertmanager's form: route key, then the group labels (``{}:{kind="unit_exited", node="a"}``)."""
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{}:{" + inner + "}"
