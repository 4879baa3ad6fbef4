"""Lost singletons: a movable unit that runs nowhere the controller can reach.

A movable singleton (``stop_after_disconnect`` in its agent's config) has a
placement: the node it last ran on. It is ``unit_lost`` when no online node
runs it and its placed node is either offline or reports the unit ``fenced``
(its agent stopped it after losing contact). The finding names the placed
node, so the rule's ``migrate`` rung moves the unit from there to a healthy
node holding a standby copy. It clears as soon as any online node runs the
unit again — wherever that is.

A unit that merely exited or failed on an online node is not lost: the
``unit_exited`` rules heal it in place first.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from detectors.model import Finding, NodeSnapshot

RUNNING = ("starting", "running")


@dataclass(frozen=True, slots=True)
class Placement:
    unit: str
    node: str
    fence_after: float
    """Seconds after ``node`` was last heard by which its copy is surely stopped."""


def runners(unit: str, snapshots: Iterable[NodeSnapshot], offline: Collection[str], *,
            unconfirmed: bool = False) -> list[str]:
    """Online nodes that report ``unit`` starting or running on their current connection (``confirmed``);
    ``unconfirmed``: also those that said so before reconnecting and have not reported since (they may)."""
    return [s.node for s in snapshots if s.node not in offline and (s.confirmed or unconfirmed)
            and any(u.name == unit and u.state in RUNNING for u in s.units)]


def detect_lost_units(placements: Iterable[Placement], running: Mapping[str, Collection[str]],
                      snapshot: Callable[[str], NodeSnapshot | None], offline: Collection[str]) -> list[Finding]:
    """``running``: unit → the online nodes that run it (``runners``, kept up to date by the controller);
    ``snapshot`` is asked only for the node a unit that runs nowhere was placed on."""
    findings = []
    for placement in placements:
        if running.get(placement.unit):
            continue
        placed = snapshot(placement.node)
        evidence: dict[str, object] = {"placed_on": placement.node, "fence_after": placement.fence_after}
        if placed is None or placement.node in offline:
            last_seen = placed.last_seen if placed is not None else 0.0
            evidence |= {"reason": "node_offline", "last_seen": last_seen,
                         "fenced_at": last_seen + placement.fence_after if last_seen else None}
            why = f"its node {placement.node} is offline"
        elif not placed.confirmed:
            continue  # back, and its first report will say whether its agent fenced the unit meanwhile
        else:
            report = next((u for u in placed.units if u.name == placement.unit), None)
            if report is None or not report.fenced:
                continue
            evidence |= {"reason": "fenced"}
            why = f"its agent on {placement.node} stopped it after losing contact"
        findings.append(Finding(
            kind="unit_lost", node=placement.node, unit=placement.unit, severity="critical",
            summary=f"{placement.unit} runs nowhere: {why} and no other node runs it", evidence=evidence))
    return findings
