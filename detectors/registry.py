"""The detectors the controller runs on each node, in one explicit list.

Order matters only for suppression: when a node is offline, its units' last
known states are stale, so no unit or metric findings are raised for it.
"""

from __future__ import annotations

from detectors.model import DetectorSettings, Finding, NodeSnapshot
from detectors.presence import detect_node_offline
from detectors.thresholds import detect_thresholds
from detectors.units import detect_units


def detect_node(snapshot: NodeSnapshot, now: float, settings: DetectorSettings) -> list[Finding]:
    offline = detect_node_offline(snapshot, now, settings.offline_after)
    if offline is not None:
        return [offline]
    return [*detect_units(snapshot, now), *detect_thresholds(snapshot, settings.thresholds)]
