"""The plan model: a frozen target, ordered steps from a closed set, and how to verify.

A plan is data. The dispatcher interprets it; dry-run records it and stops.
Idempotency keys are deterministic in (node, incident, step, attempt), so two
controllers (or one restarted mid-plan) derive the same key for the same step
and an agent executes it at most once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class RestartUnit:
    """Restart one unit on one node (stop with grace, then start)."""

    node: str
    unit: str
    kind: Literal["restart_unit"] = "restart_unit"


Step = RestartUnit


@dataclass(frozen=True, slots=True)
class Verification:
    """The target must be healthy again (running and, if it has a probe, probe healthy) within ``within``."""

    node: str
    unit: str
    within: float


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    incident_id: int
    rule: str
    rule_digest: str
    attempt: int
    """1 for the first attempt on this incident, 2 for the second..."""
    steps: tuple[Step, ...]
    verification: Verification
    cooldown_key: str
    created_at: float


def idempotency_key(node: str, incident_id: int, step_index: int, attempt: int) -> str:
    raw = f"{node}|{incident_id}|{step_index}|{attempt}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def plan_id(incident_id: int, attempt: int) -> str:
    return f"{incident_id}-{attempt}"
