"""The rule model: a finding kind (and optional severity) → an action and its limits.

Rules are plain frozen data; the loader builds them from YAML and the planner
reads them. A rulebook is an ordered list: the first rule that matches a
finding decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["restart_unit", "none"]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: str
    """Finding kind this rule matches (``unit_exited``, ``probe_failing``, ``node_offline``,
    ``metric_threshold``)."""
    action: Action
    """``restart_unit``: restart the finding's unit; ``none``: open an incident, do nothing."""
    severity: tuple[str, ...] = ()
    """Match only these severities; empty matches any."""
    min_interval: float = 5.0
    """Seconds between two remediation attempts on the same target."""
    max_attempts: int = 3
    """Attempts on the same target within ``attempt_window`` before its incident is marked ``failed``
    and left alone. Counted per target, not per incident, so a unit that crashes, heals and crashes
    again cannot buy itself a fresh budget with each new incident."""
    attempt_window: float = 600.0
    """Seconds over which ``max_attempts`` is counted."""
    resolve_after: float = 5.0
    """Seconds the finding must stay clear before the incident resolves; a relapse within it
    continues the same incident."""
    verify_within: float = 30.0
    """Seconds after the action for the target to be healthy again, else the attempt failed."""
    source: str = "<builtin>"
    """File the rule came from."""
    digest: str = ""
    """sha256 of the rule's content, recorded with every plan so the audit names what ran."""

    def matches(self, kind: str, severity: str) -> bool:
        return kind == self.kind and (not self.severity or severity in self.severity)


@dataclass(frozen=True, slots=True)
class ThresholdSpec:
    """A metric threshold to watch (turned into a detector by the controller)."""

    name: str
    metric: str
    above: float
    samples: int = 3
    severity: Literal["info", "warning", "critical"] = "warning"


@dataclass(frozen=True, slots=True)
class Rulebook:
    rules: tuple[Rule, ...]
    thresholds: tuple[ThresholdSpec, ...] = ()

    def rule_for(self, kind: str, severity: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.matches(kind, severity)), None)
