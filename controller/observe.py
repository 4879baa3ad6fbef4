"""Observation: the findings that hold now and the fleet view, kept up to date one node at a time.

A message touches one node, so only that node is looked at again: the
detectors run on its new snapshot (``observe_node``, pure), and what it
contributes to the fleet-wide view — offline or not, its group, the units it
runs or holds on standby, the datasets it holds — replaces what it
contributed before. Nothing here walks the fleet on a message.

Time alone changes a verdict only where ``detectors.registry.next_change``
says so (a node falling silent, a job whose progress stands still): each
node's next such instant waits in a timer queue and the node is looked at
again when it comes due. The engine asks ``next_due`` how long it may sleep.

What spans nodes is bounded by what it is about, not by the fleet: lost
singletons by the movable units' copies (an index of who runs what), dataset
findings by the replicas of the datasets a changed node holds (with several
controllers, also those other controllers hear: ``controller.shared_replicas``),
external findings by the alerts received. ``Observer.detections`` counts the nodes the
detectors ran on (a unit test holds per-message work to one node).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from controller.datasets import Held, observe_dataset
from controller.fleet import Fleet, NodeState
from controller.placement import Placements
from controller.shared_replicas import SharedReplicas
from detectors.anomaly.watch import AnomalyWatch
from detectors.model import DetectorSettings, Finding, NodeSnapshot
from detectors.placement import RUNNING, detect_lost_units
from detectors.presence import is_offline
from detectors.registry import detect_node, next_change
from remediations.planner import Replica
from remediations.reconciler import FleetView, Symptom
from selfheal.wire import DatasetSummary


@dataclass(frozen=True, slots=True)
class NodeObservation:
    """What one node contributes to the fleet view, from one snapshot (``observe_node``)."""

    findings: tuple[Finding, ...]
    offline: bool
    running: frozenset[str]
    """Units starting or running on this node while it is online."""
    standby: frozenset[str]
    """Units held stopped on this node while it is online (migration candidates)."""
    copies: tuple[str, ...]
    """Units counted as replicas (every unit but a standby copy)."""
    movable: tuple[tuple[str, float], ...]
    """(unit, fence_after) of the movable singletons running on this node while it is online."""
    due: float
    """When the detectors' verdict could change with no new message (``math.inf``: never)."""


def observe_node(snapshot: NodeSnapshot, now: float, settings: DetectorSettings) -> NodeObservation:
    """One node's findings and contributions (pure)."""
    offline = is_offline(snapshot, now, settings.offline_after)
    known = () if offline or not snapshot.confirmed else snapshot.units  # unit states known to hold now
    running = frozenset(u.name for u in known if u.state in RUNNING)
    standby = frozenset(u.name for u in known if u.state == "stopped")
    return NodeObservation(
        findings=tuple(detect_node(snapshot, now, settings)), offline=offline, running=running, standby=standby,
        copies=tuple(u.name for u in snapshot.units if u.name not in standby),
        movable=tuple((u.name, u.fence_after) for u in snapshot.units
                      if u.name in running and u.fence_after is not None),
        due=next_change(snapshot, now, settings))


class Observer:
    def __init__(self, fleet: Fleet, settings: DetectorSettings, *, placements: Placements, group_label: str,
                 anomalies: AnomalyWatch | None = None,
                 external: Callable[[float], list[Finding]] | None = None,
                 owns: Callable[[str], bool] = lambda node: True,
                 elsewhere: Callable[[], bool] = lambda: False, shared: SharedReplicas | None = None) -> None:
        self.fleet = fleet
        self.owns = owns
        """Whether this controller acts on a node now: a movable unit placed on a node it does not act on is
        its controller's to find lost, never this one's (``Ownership.owns``)."""
        self.elsewhere = elsewhere
        """Whether other controllers act on part of the fleet (``Ownership.partial``)."""
        self.shared = shared
        """Several controllers: the dataset replicas they hear, and where this one's are written for them."""
        self.settings = settings
        self.placements = placements
        self.group_label = group_label
        self.anomalies = anomalies
        self.external = external
        """External findings that hold at ``now`` (controller/sources: Alertmanager, PromQL)."""
        self.symptoms: dict[str, Symptom] = {}
        """Every finding that holds, by key: what the reconciler is given."""
        self.detections = 0
        """Nodes the detectors ran on, since start."""
        self._owned: dict[str, tuple[str, ...]] = {}
        """Source (a node id, ``external``, ``lost``, ``dataset:<name>``) → the keys of its symptoms."""
        self._nodes: dict[str, NodeObservation] = {}
        self._datasets_of: dict[str, tuple[Mapping[str, DatasetSummary], bool, str]] = {}
        """node → (its datasets, online, address) as last observed. The dict itself, not its ``id``: a dict
        freed since could lend its id to the next one."""
        self.offline: set[str] = set()
        self.groups: dict[str, str] = {}
        self.group_sizes: Counter[str] = Counter()
        self.replicas: Counter[str] = Counter()
        self.running: dict[str, set[str]] = {}
        """Unit → the online nodes that run it."""
        self.movable: dict[str, dict[str, float]] = {}
        """Movable singleton → the online nodes that run it → its ``fence_after`` there."""
        self.standby = _SortedSets()
        self.holders: dict[str, set[str]] = {}
        """Dataset → the nodes that hold a replica."""
        self.datasets: dict[str, tuple[Replica, ...]] = {}
        self._dirty_datasets: set[str] = set()
        self._due: dict[str, float] = {}
        self._timers: list[tuple[float, str]] = []
        self._fed: dict[str, tuple[int, int]] = {}
        """node → (session, seq) of the last report fed to the anomaly watch."""

    # --- the pass ---------------------------------------------------------------------------------

    def refresh(self, now: float) -> None:
        """Look again at every node that changed or came due, then at what spans nodes."""
        changed, self.fleet.dirty = self.fleet.dirty, set()
        while self._timers and self._timers[0][0] <= now:
            due, node = heapq.heappop(self._timers)
            if self._due.get(node) == due:
                del self._due[node]
                changed.add(node)
        for node in sorted(changed):
            self._observe(node, now)
        self._replace("external", self.external(now) if self.external is not None else ())
        self.placements.observe(self.movable, self.running, now)
        placed_here = [p for p in self.placements.placements() if self.owns(p.node)]
        self._replace("lost", detect_lost_units(placed_here, self.running, self.fleet.snapshot, self.offline))
        for name in sorted(self._dirty_datasets):
            self._observe_dataset(name)
        self._dirty_datasets.clear()

    def view(self) -> FleetView:
        return FleetView(offline=frozenset(self.offline), groups=self.groups, group_sizes=self.group_sizes,
                         replicas=self.replicas, standby=self.standby, datasets=self.datasets,
                         elsewhere=self.elsewhere())

    def next_due(self) -> float:
        """The earliest time a node comes due (``math.inf``: none)."""
        return self._timers[0][0] if self._timers else math.inf

    def holds(self, key: str, now: float) -> bool:
        """Whether the finding ``key`` holds now (the fleet as it is, changes looked at first)."""
        self.refresh(now)
        return key in self.symptoms

    def shared_changed(self, datasets: Iterable[str]) -> None:
        """Other controllers' replicas of these datasets changed (``SharedReplicas.sync``): look again."""
        self._dirty_datasets.update(datasets)

    def replicas_of(self, name: str) -> list[Held]:
        """The dataset's replicas in node order: those heard here, then, on nodes not heard here, those other
        controllers heard."""
        held = [Held(node.id, node.datasets[name], node.online, node.http)
                for node_id in self.holders.get(name, ())
                if (node := self.fleet.nodes.get(node_id)) is not None and name in node.datasets]
        if self.shared is not None:
            held += [r for node_id, r in self.shared.elsewhere.get(name, {}).items() if node_id not in self.fleet.nodes]
        return sorted(held, key=lambda r: r.node)

    def observe_all(self) -> None:
        """Look at every node again on the next pass (settings or watches were reloaded)."""
        self.fleet.dirty.update(self.fleet.nodes)

    def forget(self, node: str) -> None:
        """A node left the fleet (evicted): drop everything it contributed."""
        self._fed.pop(node, None)
        self._due.pop(node, None)
        if self.anomalies is not None:
            self.anomalies.forget(node)
        self._contribute(node, None)
        self._replace(node, ())

    # --- one node ---------------------------------------------------------------------------------

    def _observe(self, node_id: str, now: float) -> None:
        snapshot = self.fleet.snapshot(node_id)
        state = self.fleet.nodes.get(node_id)
        if snapshot is None or state is None:
            return
        self.detections += 1
        seen = observe_node(snapshot, now, self.settings)
        findings = list(seen.findings)
        if self.anomalies is not None and not seen.offline:
            self._feed_anomalies(state)
            findings += self.anomalies.findings(node_id)
        self._contribute(node_id, seen, state)
        self._replace(node_id, findings)
        if seen.due < math.inf:
            self._due[node_id] = seen.due
            heapq.heappush(self._timers, (seen.due, node_id))
            if len(self._timers) > 2 * len(self._due) + 64:  # stale entries of nodes that moved on: compact
                self._timers = [(due, node) for node, due in self._due.items()]
                heapq.heapify(self._timers)
        else:
            self._due.pop(node_id, None)

    def _contribute(self, node_id: str, seen: NodeObservation | None, state: NodeState | None = None) -> None:
        """Replace what the node added to the fleet-wide indexes with what ``seen`` says (None: nothing)."""
        old = self._nodes.get(node_id)
        if old is not None and seen is not None and state is not None and _same_place(old, seen) \
                and self.groups.get(node_id) == state.labels.get(self.group_label, ""):
            self._nodes[node_id] = seen  # a steady node's report: the indexes stay as they are
            self._contribute_datasets(node_id, state, online=state.online and not seen.offline)
            return
        self._nodes.pop(node_id, None)
        if old is not None:
            self.replicas.subtract(old.copies)
            for unit in old.running:
                _discard(self.running, unit, node_id)
            for unit in old.standby:
                self.standby.discard(unit, node_id)
            for unit, _ in old.movable:
                copies = self.movable.get(unit, {})
                copies.pop(node_id, None)
                if not copies:
                    self.movable.pop(unit, None)
            self.offline.discard(node_id)
        group = self.groups.pop(node_id, None)
        if group is not None:
            self.group_sizes[group] -= 1
            if self.group_sizes[group] <= 0:
                del self.group_sizes[group]
        if seen is None or state is None:
            self._contribute_datasets(node_id, None)
            return
        self._nodes[node_id] = seen
        self.replicas.update(seen.copies)
        for unit in seen.running:
            self.running.setdefault(unit, set()).add(node_id)
        for unit in seen.standby:
            self.standby.add(unit, node_id)
        for unit, fence_after in seen.movable:
            self.movable.setdefault(unit, {})[node_id] = fence_after
        if seen.offline:
            self.offline.add(node_id)
        group = self.groups[node_id] = state.labels.get(self.group_label, "")
        self.group_sizes[group] += 1
        self._contribute_datasets(node_id, state, online=state.online and not seen.offline)

    def _contribute_datasets(self, node_id: str, state: NodeState | None, *, online: bool = False) -> None:
        """A node's datasets (or its presence or address, which every replica view carries) changed: look at
        them again, and tell the other controllers (``SharedReplicas.heard``)."""
        before = self._datasets_of.pop(node_id, None)
        now = None if state is None else (state.datasets, online, state.http)
        if now is not None:
            self._datasets_of[node_id] = now
        if before is not None and now is not None and before[0] is now[0] and before[1:] == now[1:]:
            return  # the same digest (the fleet replaces the dict on each), the same presence: nothing to look at
        if self.shared is not None:
            self.shared.heard(node_id, None if state is None else state.datasets, online=online,
                              http=state.http if state is not None else "")
        names = frozenset(state.datasets) if state is not None else frozenset()
        old = frozenset(before[0]) if before is not None else frozenset()
        for name in old - names:
            _discard(self.holders, name, node_id)
        for name in names:
            self.holders.setdefault(name, set()).add(node_id)
        self._dirty_datasets |= names | old

    def _feed_anomalies(self, state: NodeState) -> None:
        """The node's reports not fed yet, oldest first (its history is in arrival order)."""
        assert self.anomalies is not None  # noqa: S101 - checked by the caller
        last = self._fed.get(state.id, (0, -1))
        fresh = []
        for report in reversed(state.reports):
            if (report.session, report.seq) <= last:
                break
            fresh.append(report)
        for report in reversed(fresh):
            self.anomalies.observe(report)
        if fresh:
            self._fed[state.id] = (fresh[0].session, fresh[0].seq)

    # --- what spans nodes -------------------------------------------------------------------------

    def _observe_dataset(self, name: str) -> None:
        held = self.replicas_of(name)
        if not held:
            self.datasets.pop(name, None)
            self.holders.pop(name, None)
            self._replace(f"dataset:{name}", ())
            return
        findings, self.datasets[name] = observe_dataset(name, held, self.offline)
        self._replace(f"dataset:{name}", findings)

    def _replace(self, source: str, findings: Iterable[Finding]) -> None:
        """The symptoms of ``source`` are now exactly ``findings``."""
        for key in self._owned.pop(source, ()):
            self.symptoms.pop(key, None)
        keys = []
        for finding in findings:
            node = self.fleet.nodes.get(finding.node)
            labels = {**(node.labels if node is not None else {}), **finding.labels}
            self.symptoms[finding.key] = Symptom(
                key=finding.key, kind=finding.kind, node=finding.node, unit=finding.unit,
                severity=finding.severity, summary=finding.summary, evidence=finding.evidence, labels=labels)
            keys.append(finding.key)
        if keys:
            self._owned[source] = tuple(keys)


def _same_place(old: NodeObservation, new: NodeObservation) -> bool:
    """The node contributes the same to the fleet-wide indexes (findings and timers aside)."""
    return (old.offline, old.running, old.standby, old.copies, old.movable) == \
        (new.offline, new.running, new.standby, new.copies, new.movable)


class _SortedSets(Mapping[str, tuple[str, ...]]):
    """unit → the nodes holding it on standby, read as a sorted tuple (sorted once per change, on read)."""

    def __init__(self) -> None:
        self._sets: dict[str, set[str]] = {}
        self._sorted: dict[str, tuple[str, ...]] = {}

    def add(self, key: str, node: str) -> None:
        self._sets.setdefault(key, set()).add(node)
        self._sorted.pop(key, None)

    def discard(self, key: str, node: str) -> None:
        _discard(self._sets, key, node)
        self._sorted.pop(key, None)

    def __getitem__(self, key: str) -> tuple[str, ...]:
        found = self._sorted.get(key)
        if found is None:
            found = self._sorted[key] = tuple(sorted(self._sets[key]))
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)


def _discard(index: dict[str, set[str]], key: str, node: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(node)
        if not members:
            del index[key]
