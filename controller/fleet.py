"""Fleet state: what the controller knows of every node, in memory, bounded.

``Fleet.apply`` folds one validated wire message into the state; detectors
read frozen ``NodeSnapshot``s of it. Presence follows session numbers: a
status or will from an older agent session never overrides a newer one, and
handlers are idempotent (the embedded broker may deliver a retained message
twice). Each node keeps at most ``history`` reports; beyond ``max_nodes`` the
longest-silent node is evicted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from detectors.model import NodeSnapshot
from detectors.presence import is_offline
from selfheal.wire import (
    CommandResult,
    DatasetDigest,
    DatasetSummary,
    Event,
    NodeMessage,
    NodeStatus,
    ProbeChanged,
    ProbeState,
    Report,
    UnitExited,
    UnitReport,
    UnitStarted,
)

MAX_UNITS_PER_NODE = 1000
MAX_DATASETS_PER_NODE = 200
"""Datasets kept per node (the agent's config allows no more); beyond, the rest of a digest is ignored."""


@dataclass
class NodeState:
    id: str
    online: bool = False
    session: int = 0
    version: str = ""
    http: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    last_seen: float = 0.0
    units: dict[str, UnitReport] = field(default_factory=dict)
    reports: deque[Report] = field(default_factory=deque)
    last_seq: int = -1
    event_ts: dict[str, float] = field(default_factory=dict)
    """Agent time of the last event per unit: an older report does not undo it."""
    datasets: dict[str, DatasetSummary] = field(default_factory=dict)
    """The latest ``DatasetDigest``: each dataset replica this node holds, by name (bounded)."""
    digests_ts: float = 0.0
    """Agent time of that digest: an older one (a redelivered retained message) does not undo it."""


class Fleet:
    def __init__(self, *, history: int = 120, max_nodes: int = 10_000) -> None:
        self.history = history
        self.max_nodes = max_nodes
        self.nodes: dict[str, NodeState] = {}
        self.changed = asyncio.Condition()
        self.dirty: set[str] = set()
        self.evicted = 0
        self.on_evict: Callable[[str], None] | None = None
        """Told the id of each node evicted, so per-node state elsewhere is dropped with it."""
        self.stale = 0

    def apply(self, message: NodeMessage, now: float) -> CommandResult | None:
        """Fold a message in; returns a command result for the dispatcher, if it was one."""
        if isinstance(message, NodeStatus):
            self._apply_status(message, now)
            return None
        node = self._node(message.node)
        if isinstance(message, DatasetDigest):
            self._apply_digest(node, message)
            return None
        if isinstance(message, Report):
            if message.session < node.session:
                self.stale += 1
                return None
            self._enter_session(node, message.session)
            node.last_seen = now
            node.online = True
            if message.session == node.session and message.seq <= node.last_seq:
                return None  # duplicate or reordered report
            node.last_seq = message.seq
            node.reports.append(message)
            while len(node.reports) > self.history:
                node.reports.popleft()
            node.units = {
                u.name: node.units.get(u.name, u) if node.event_ts.get(u.name, 0.0) > message.ts else u
                for u in message.units[:MAX_UNITS_PER_NODE]
            }
            self._touch(node.id)
            return None
        if isinstance(message, Event):
            if message.session < node.session:
                self.stale += 1
                return None
            self._enter_session(node, message.session)
            node.last_seen = now
            node.online = True  # it is talking, even if its birth message is still on the way
            body = message.body
            if isinstance(body, CommandResult):
                return body
            self._apply_unit_event(node, body)
            node.event_ts[body.unit] = message.ts
            self._touch(node.id)
        return None

    def _apply_status(self, status: NodeStatus, now: float) -> None:
        node = self._node(status.node)
        if status.session < node.session:
            self.stale += 1  # a will or birth from an older agent session
            return
        self._enter_session(node, status.session)
        node.online = status.state == "online"
        node.version = status.version
        node.http = status.http
        node.labels = dict(list(status.labels.items())[:32])  # bounded: a node's labels are few
        node.last_seen = now
        for name in status.units:
            node.units.setdefault(name, UnitReport(name=name, kind="process", state="starting"))
        self._touch(node.id)

    def _apply_digest(self, node: NodeState, digest: DatasetDigest) -> None:
        if digest.session < node.session or (digest.session == node.session and digest.ts < node.digests_ts):
            self.stale += 1
            return
        self._enter_session(node, digest.session)
        node.digests_ts = digest.ts
        node.datasets = {d.name: d for d in digest.datasets[:MAX_DATASETS_PER_NODE]}
        self._touch(node.id)

    def replicas(self) -> dict[str, list[tuple[NodeState, DatasetSummary]]]:
        """Every dataset known from digests → the nodes holding a replica and their latest summary."""
        out: dict[str, list[tuple[NodeState, DatasetSummary]]] = {}
        for node in self.nodes.values():
            for name, summary in node.datasets.items():
                out.setdefault(name, []).append((node, summary))
        return out

    @staticmethod
    def _enter_session(node: NodeState, session: int) -> None:
        """A newer agent session starts its sequence numbers and clock afresh."""
        if session > node.session:
            node.session = session
            node.last_seq = -1
            node.event_ts.clear()

    def _apply_unit_event(self, node: NodeState, body: UnitExited | UnitStarted | ProbeChanged) -> None:
        unit = node.units.get(body.unit) or UnitReport(name=body.unit, kind="process", state="starting")
        if isinstance(body, UnitExited):
            unit = msgspec.structs.replace(
                unit, state="stopped" if body.expected else "exited", pid=body.pid,
                exit_code=body.exit_code, exit_signal=body.exit_signal, probe=_pending(unit.probe))
        elif isinstance(body, UnitStarted):
            unit = msgspec.structs.replace(unit, state="running", pid=body.pid, restarts=body.restarts,
                                           exit_code=None, exit_signal=None, probe=_pending(unit.probe),
                                           proc_status="")
        else:
            unit = msgspec.structs.replace(unit, probe=body.probe)
        node.units[body.unit] = unit

    def _node(self, node_id: str) -> NodeState:
        node = self.nodes.get(node_id)
        if node is None:
            if len(self.nodes) >= self.max_nodes:
                victim = min(self.nodes.values(), key=lambda n: (n.online, n.last_seen))
                del self.nodes[victim.id]
                self.evicted += 1
                if self.on_evict is not None:
                    self.on_evict(victim.id)
            node = self.nodes[node_id] = NodeState(id=node_id, reports=deque())
        return node

    def _touch(self, node_id: str) -> None:
        self.dirty.add(node_id)

    async def notify(self) -> None:
        """Wake whoever waits on a change (the engine, verifications)."""
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after some change, or ``timeout`` seconds; True if it held."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(predicate), timeout)
            except TimeoutError:
                return predicate()
        return True

    def snapshot(self, node_id: str) -> NodeSnapshot | None:
        node = self.nodes.get(node_id)
        if node is None:
            return None
        return NodeSnapshot(node=node.id, online=node.online, last_seen=node.last_seen,
                            units=tuple(node.units.values()), reports=tuple(node.reports))

    def snapshots(self, now: float, offline_after: float) -> tuple[dict[str, NodeSnapshot], set[str]]:
        """Every node's snapshot, and which of them are offline at ``now``."""
        snapshots = {n: s for n in list(self.nodes) if (s := self.snapshot(n)) is not None}
        return snapshots, {n for n, s in snapshots.items() if is_offline(s, now, offline_after)}

    def unit(self, node_id: str, unit: str) -> UnitReport | None:
        node = self.nodes.get(node_id)
        return node.units.get(unit) if node else None


def _pending(probe: ProbeState | None) -> ProbeState | None:
    """A probe whose verdict on a new incarnation of the unit is not in yet."""
    if probe is None:
        return None
    return msgspec.structs.replace(probe, healthy=False, consecutive_failures=0, last_error="pending")


def unit_is_healthy(unit: UnitReport | None) -> bool:
    """Running, and its probe (if it has one) says healthy; a scheduled job whose run completed is healthy too."""
    if unit is not None and unit.state == "completed":
        return True
    if unit is None or unit.state != "running":
        return False
    return unit.probe is None or unit.probe.healthy
