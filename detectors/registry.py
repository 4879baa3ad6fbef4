"""The detectors the controller runs on each node, in one explicit list, and when their verdict can change.

Order matters only for suppression: when a node is offline, its units' last
known states are stale, so no unit or metric findings are raised for it; when
it is back but has sent no report on its new connection yet (``confirmed``),
no unit findings.

``next_change`` is the other half of the contract: the detectors read a
node's messages and the time, and the engine re-runs them on a node only
when a message of that node arrives or when time alone could change their
verdict — the instant ``next_change`` names (a timer queue holds it). A
detector whose verdict depends on the time must say here when it flips.
"""

from __future__ import annotations

import math

from detectors.model import DetectorSettings, Finding, NodeSnapshot
from detectors.presence import detect_node_offline
from detectors.thresholds import detect_thresholds
from detectors.units import detect_units, node_clock, stall_deadline, start_deadline

EPSILON = 1e-3
"""Past a deadline, so that a strict comparison (``silent_for > offline_after``) holds when it is re-run."""


def detect_node(snapshot: NodeSnapshot, now: float, settings: DetectorSettings) -> list[Finding]:
    offline = detect_node_offline(snapshot, now, settings.offline_after)
    if offline is not None:
        return [offline]
    units = detect_units(snapshot, now) if snapshot.confirmed else []
    return [*units, *detect_thresholds(snapshot, settings.thresholds)]


def next_change(snapshot: NodeSnapshot, now: float, settings: DetectorSettings) -> float:
    """The earliest wall time after ``now`` at which ``detect_node`` could say something else about this
    node with no new message from it (``math.inf``: only a message can change it).

    Only time moves a verdict between messages: an online node falls silent at ``last_seen +
    offline_after``, a running unit with ``stall_after`` stalls when its progress has stood still that
    long, and one with ``start_timeout`` times out when its run has gone that long without any progress.
    Thresholds count reports and unit states change by messages, so they never come due."""
    if not snapshot.online or detect_node_offline(snapshot, now, settings.offline_after) is not None:
        return math.inf  # offline (or not yet announced): only a message brings it back
    due = snapshot.last_seen + settings.offline_after + EPSILON
    skew = node_clock(snapshot, now) - now  # the node's clock minus ours, fixed until its next message
    for unit in snapshot.units if snapshot.confirmed else ():
        for deadline in (stall_deadline(unit), start_deadline(unit)):
            if deadline is not None and deadline - skew > now:
                due = min(due, deadline - skew + EPSILON)
    return due
