"""The plan model: a frozen target, ordered steps from a closed set, verification, deadline.

A plan is data. The dispatcher interprets it; shadow mode records it and
stops. Idempotency keys are deterministic in (node, incident, step, attempt),
so two controllers (or one restarted mid-plan) derive the same key for the
same step and an agent executes it at most once.

The plan state machine lives here too, as a table of allowed transitions:

    proposed ──▶ awaiting_approval ──▶ running ──▶ verifying ──▶ succeeded
       │               │   │              │            │
       │               │   └─▶ expired    │            └──────▶ failed
       ├──▶ running    └─────▶ cancelled  ├──▶ failed | cancelled | expired
       └──▶ cancelled (shadow mode, guard, symptom cleared)   └──▶ escalated (paged a human)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class RestartUnit:
    """Restart a unit on its node (stop with grace, then start)."""

    node: str
    unit: str
    kind: Literal["restart_unit"] = "restart_unit"


@dataclass(frozen=True, slots=True)
class StopUnit:
    """Stop a unit on its node."""

    node: str
    unit: str
    kind: Literal["stop_unit"] = "stop_unit"


@dataclass(frozen=True, slots=True)
class StartUnit:
    """Start a unit on a node (e.g. the standby copy during a migration)."""

    node: str
    unit: str
    kind: Literal["start_unit"] = "start_unit"


@dataclass(frozen=True, slots=True)
class MigrateUnit:
    """Move a singleton unit: stop it on ``source`` (if reachable), start it on ``target``.

    ``target`` None: no node this controller acts on holds a standby copy, and other controllers act on
    part of the fleet (several controllers): one of their nodes' standby copies is chosen, and started by
    its controller, when the step runs (``controller.dispatcher``)."""

    unit: str
    source: str
    target: str | None
    kind: Literal["migrate_unit"] = "migrate_unit"

    @property
    def node(self) -> str:
        return self.source


@dataclass(frozen=True, slots=True)
class ResyncDataset:
    """Repair a dataset replica on ``node`` from a verified peer."""

    node: str
    dataset: str
    source: str
    kind: Literal["resync_dataset"] = "resync_dataset"


@dataclass(frozen=True, slots=True)
class Notify:
    """Tell a human: the last rung of a ladder pages someone instead of acting again."""

    node: str
    message: str
    severity: Literal["info", "warning", "critical"] = "critical"
    kind: Literal["notify"] = "notify"


Step = RestartUnit | StopUnit | StartUnit | MigrateUnit | ResyncDataset | Notify
"""Every step a plan may hold; which action makes which steps, and whether it disrupts, is
``remediations.actions.ACTIONS``."""

Mode = Literal["auto", "approve", "shadow"]
PlanState = Literal["proposed", "awaiting_approval", "running", "verifying", "succeeded", "failed",
                    "escalated", "cancelled", "expired"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "escalated", "cancelled", "expired"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "proposed": frozenset({"awaiting_approval", "running", "cancelled"}),
    "awaiting_approval": frozenset({"running", "cancelled", "expired"}),
    "running": frozenset({"verifying", "failed", "escalated", "cancelled", "expired", "succeeded"}),
    "verifying": frozenset({"succeeded", "failed", "expired"}),
}


def can_transition(current: str, new: str) -> bool:
    return new in TRANSITIONS.get(current, frozenset())


@dataclass(frozen=True, slots=True)
class Verification:
    """After the steps, within ``within`` s and then for ``stable_for`` s: ``healthy`` — the unit runs and
    its probe passes; ``cleared`` — the finding no longer holds (e.g. a metric back under its threshold)."""

    kind: Literal["healthy", "cleared"]
    node: str
    unit: str | None
    within: float
    stable_for: float = 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    incident_id: int
    rule: str
    rule_digest: str
    rung: int
    """Index of the ladder rung this plan comes from."""
    attempt: int
    """1 for the incident's first plan, 2 for the second... (numbers idempotency keys)."""
    steps: tuple[Step, ...]
    verification: Verification | None
    cooldown_key: str
    mode: Mode
    created_at: float
    deadline: float
    """Wall time after which nothing of this plan may still run."""

    @property
    def action(self) -> str:
        """The first step's kind (``restart_unit``...), as the store, the API, metrics and notifications
        show it; ``remediations.actions.action_of(plan)`` is the action it carries out."""
        return self.steps[0].kind if self.steps else "none"


def idempotency_key(node: str, incident_id: int, step_index: int, attempt: int) -> str:
    raw = f"{node}|{incident_id}|{step_index}|{attempt}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def plan_id(incident_id: int, attempt: int) -> str:
    return f"{incident_id}-{attempt}"
