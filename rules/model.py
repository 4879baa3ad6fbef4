"""The rule model: which findings a rule matches, and the escalation ladder it climbs.

Rules are plain frozen data; the loader builds them from YAML, the planner
and guards read them (through the ``remediations.policy.Policy`` protocol).
A rulebook is an ordered list: the first rule that matches a finding decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from remediations.actions import ActionName
from remediations.plans import Mode

RungAction = ActionName
"""The actions a rung may name: the registry's (``remediations.actions.ACTIONS``)."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before the n-th attempt on a rung, measured from the previous plan's start:
    ``first`` for n = 1, then ``base * factor**(n-2)`` capped at ``max``, each ± ``jitter`` (a share)."""

    first: float = 0.0
    base: float = 1.0
    factor: float = 2.0
    max: float = 300.0
    jitter: float = 0.1


@dataclass(frozen=True, slots=True)
class Rung:
    action: RungAction
    """``restart`` the unit; ``stop_start`` it (stop, then start); ``migrate`` it to a healthy standby node;
    ``resync`` the dataset from a verified peer; ``notify`` a human (ends the ladder); ``none``
    (``remediations.actions.ACTIONS`` says what each one sends, disrupts and verifies)."""
    attempts: int = 1
    """Plans on this rung before the ladder climbs to the next."""
    backoff: Backoff = field(default_factory=Backoff)
    min_success_rate: float = 0.0
    """Skip this rung when its success rate over the last ``min_tries`` tries (per finding kind) is lower."""
    min_tries: int = 5


@dataclass(frozen=True, slots=True)
class LoopBreaker:
    """``refires`` re-fires within ``within`` s of a "successful" plan quarantine the rule for that target."""

    refires: int = 3
    within: float = 120.0
    quarantine_for: float = 3600.0


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: str
    """Finding kind matched: ``unit_exited``, ``probe_failing``, ``node_offline``, ``metric_threshold``."""
    ladder: tuple[Rung, ...]
    severity: tuple[str, ...] = ()
    """Match only these severities; empty matches any."""
    labels: tuple[tuple[str, str], ...] = ()
    """Label globs the finding must match (``node``, ``unit``, ``group``... → ``gpu-*``)."""
    for_: float = 0.0
    """Seconds the finding must hold before the rule acts."""
    mode: Mode = "auto"
    """``auto`` acts; ``approve`` waits for a human's approval; ``shadow`` records plans and acts never."""
    verify_within: float = 30.0
    """Seconds after the steps for the target to be healthy (or the finding cleared) again."""
    verify_kind: Literal["healthy", "cleared"] = "healthy"
    stable_for: float = 1.0
    """Seconds the target must stay healthy for the verification to pass."""
    reset_after: float = 300.0
    """Seconds healthy after which the target's ladder starts again at the first rung."""
    resolve_after: float = 5.0
    """Seconds the finding must stay clear before its incident resolves."""
    cooldown: float = 1.0
    """Minimum seconds between two plans on the same target."""
    max_attempts: int = 10
    """Plans on one target within ``attempt_window`` before its incident fails and is left alone."""
    attempt_window: float = 3600.0
    rate_limit: tuple[int, float] = (30, 60.0)
    """At most this many plans of this rule per this many seconds, fleet-wide."""
    approval_timeout: float = 900.0
    """Seconds an ``approve``-mode plan waits for a human before it expires."""
    loop_breaker: LoopBreaker = field(default_factory=LoopBreaker)
    source: str = "<builtin>"
    digest: str = ""
    """sha256 of the rule's content, recorded in the audit trail of every plan it makes."""

    def matches(self, kind: str, severity: str, labels: dict[str, str]) -> bool:
        if kind != self.kind or (self.severity and severity not in self.severity):
            return False
        return all(fnmatchcase(labels.get(name, ""), pattern) for name, pattern in self.labels)


@dataclass(frozen=True, slots=True)
class ThresholdSpec:
    """A metric threshold to watch (turned into a detector by the controller)."""

    name: str
    metric: str
    above: float
    samples: int = 3
    severity: Literal["info", "warning", "critical"] = "warning"


@dataclass(frozen=True, slots=True)
class AnomalyWatchSpec:
    """A streaming anomaly detector per (node, metric): turned into ``metric_anomaly`` findings."""

    name: str
    metric: str
    detector: tuple[tuple[str, float | int | str], ...]
    """The detector spec (``kind`` and its parameters, see docs/DETECTORS.md)."""
    threshold: float = 0.5
    persistence: int = 1
    window: int = 1
    hold: float = 600.0
    severity: Literal["info", "warning", "critical"] = "warning"


@dataclass(frozen=True, slots=True)
class HostModelWatchSpec:
    """A per-host IsolationForest over the host's metric vector: turned into ``host_anomaly`` findings."""

    name: str
    features: tuple[str, ...]
    """Host metric fields (``cpu_percent``, ``mem_percent``, ``disk_max_percent``...)."""
    step: float = 60.0
    history: int = 2048
    min_samples: int = 256
    refit_every: float = 21600.0
    trees: int = 50
    max_samples: int = 128
    threshold: float = 0.98
    persistence: int = 3
    window: int = 3
    hold: float = 600.0
    severity: Literal["info", "warning", "critical"] = "warning"


@dataclass(frozen=True, slots=True)
class Rulebook:
    rules: tuple[Rule, ...]
    thresholds: tuple[ThresholdSpec, ...] = ()
    anomalies: tuple[AnomalyWatchSpec, ...] = ()
    host_models: tuple[HostModelWatchSpec, ...] = ()

    def rule_for(self, kind: str, severity: str, labels: dict[str, str] | None = None) -> Rule | None:
        return next((rule for rule in self.rules if rule.matches(kind, severity, labels or {})), None)

    def by_name(self, name: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.name == name), None)
