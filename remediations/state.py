"""The engine's memory, as plain bounded data: per-target history, running plans, silences, statistics.

Everything here is updated by the reconciler and read by the guards; nothing
does I/O. The controller persists what must survive a restart (plans,
quarantines, silences, pause) and rebuilds this state from its store.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

HISTORY = 200
"""Attempts (and refires) remembered per target: far above any sane max_attempts."""


@dataclass(frozen=True, slots=True)
class Attempt:
    plan_id: str
    rung: int
    at: float
    action: str


@dataclass
class TargetState:
    """One (rule, target) pair: what was tried, when, and whether it helped."""

    attempts: deque[Attempt] = field(default_factory=lambda: deque(maxlen=HISTORY))
    ladder_from: float = 0.0
    """Attempts started before this time no longer count toward the ladder position (reset_after)."""
    healthy_since: float | None = None
    last_success: float | None = None
    refires: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    quarantined_until: float = 0.0
    idle: bool = False
    """No incident has used it since its ladder reset (or since it was restored from the store): the
    reconciler forgets it once nothing it remembers can count in a decision any more."""
    queued: bool = False
    """It has an entry in the reconciler's heap of idle targets (one at most)."""

    def ladder_attempts(self) -> list[Attempt]:
        return [a for a in self.attempts if a.at >= self.ladder_from]

    def last_attempt_at(self) -> float | None:
        return self.attempts[-1].at if self.attempts else None


@dataclass(frozen=True, slots=True)
class Running:
    """A plan that holds a share of the disruption budget (running or awaiting approval)."""

    plan_id: str
    rule: str
    node: str
    unit: str | None
    group: str
    disruptive: bool


@dataclass(frozen=True, slots=True)
class Budget:
    """The fleet disruption budget (like Cluster API's maxUnhealthy, FBAR's limits)."""

    max_concurrent: int = 5
    """Disruptive plans running at once, fleet-wide."""
    max_node_share: float = 0.34
    """Share of a group's nodes under remediation at once (at least one node is always allowed)."""
    max_replica_share: float = 0.5
    """Share of a unit's replicas (same unit name on several nodes) under remediation at once (at least one)."""
    group_label: str = "group"
    """Node label that groups nodes for ``max_node_share``; nodes without it form one group."""


@dataclass(frozen=True, slots=True)
class Matcher:
    name: str
    """Label: ``kind``, ``node``, ``unit``, ``severity``, ``rule``, ``group`` or any node label."""
    value: str
    """A glob (``node-*``)."""

    def matches(self, labels: dict[str, str]) -> bool:
        return fnmatchcase(labels.get(self.name, ""), self.value)


@dataclass(frozen=True, slots=True)
class Silence:
    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    comment: str = ""
    author: str = ""

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: dict[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)


@dataclass
class OutcomeStats:
    """Per (finding kind, action): recent outcomes and times to recover, bounded."""

    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=HISTORY))
    recover_s: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    attempts: int = 0
    successes: int = 0

    def record(self, success: bool, recover_s: float | None) -> None:
        self.attempts += 1
        self.successes += success
        self.outcomes.append(success)
        if success and recover_s is not None:
            self.recover_s.append(recover_s)

    def recent_rate(self, tries: int) -> float | None:
        """Success rate over the last ``tries`` outcomes; None until there are that many."""
        if len(self.outcomes) < tries:
            return None
        recent = list(self.outcomes)[-tries:]
        return sum(recent) / tries

    def summary(self) -> dict[str, float | int | None]:
        return {"attempts": self.attempts, "successes": self.successes,
                "success_rate": round(self.successes / self.attempts, 4) if self.attempts else None,
                "median_recover_s": round(statistics.median(self.recover_s), 3) if self.recover_s else None}
