"""Presence detector: a node whose agent said offline (or whose will fired), or went silent."""

from __future__ import annotations

from detectors.model import Finding, NodeSnapshot


def detect_node_offline(snapshot: NodeSnapshot, now: float, offline_after: float) -> Finding | None:
    if snapshot.last_seen == 0.0 and not snapshot.online:
        return None  # known only from a retained digest so far: its presence message is on its way
    silent_for = now - snapshot.last_seen
    if snapshot.online and silent_for <= offline_after:
        return None
    reason = "its agent went offline" if not snapshot.online else f"silent for {silent_for:.1f}s"
    return Finding(
        kind="node_offline", node=snapshot.node, unit=None, severity="critical",
        summary=f"node {snapshot.node} is offline: {reason}",
        evidence={"last_seen": snapshot.last_seen, "silent_for_s": round(silent_for, 3),
                  "announced_offline": not snapshot.online},
    )


def is_offline(snapshot: NodeSnapshot, now: float, offline_after: float) -> bool:
    return detect_node_offline(snapshot, now, offline_after) is not None
