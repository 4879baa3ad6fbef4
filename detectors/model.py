"""What detectors take and return: a frozen node snapshot in, findings out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from selfheal.wire import Report, UnitReport

Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """One node as the controller sees it at ``now``."""

    node: str
    online: bool
    """The node's last presence message said online (and no newer will said offline)."""
    last_seen: float
    """Wall time of the last message from the node."""
    units: tuple[UnitReport, ...] = ()
    """Latest state of each unit (reports, updated by events between reports)."""
    reports: tuple[Report, ...] = ()
    """Recent reports, oldest first (bounded by the controller's history)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """A condition that holds now. Findings with the same ``key`` are the same problem."""

    kind: str
    node: str
    unit: str | None
    severity: Severity
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    scope: str | None = None
    """What else tells two findings of one node apart when there is no unit (a dataset's name)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Labels of the finding itself (an external alert's), added to the node's labels for rule matching."""

    @property
    def key(self) -> str:
        base = f"{self.kind}/{self.node}/{self.unit or '-'}"
        return f"{base}/{self.scope}" if self.scope else base


@dataclass(frozen=True, slots=True)
class Threshold:
    """A metric over a limit for ``samples`` consecutive reports."""

    name: str
    metric: str
    """``host.<field>`` of ``wire.HostMetrics``, ``host.disk_max_percent``, or ``unit.<field>`` of
    ``wire.UnitReport`` (checked per unit)."""
    above: float
    samples: int = 3
    severity: Severity = "warning"


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    offline_after: float = 5.0
    """Seconds without any message before an 'online' node counts as offline."""
    thresholds: tuple[Threshold, ...] = ()
