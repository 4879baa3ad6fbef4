"""Fleet-wide figures kept up to date as messages are applied: what the API, the status page and /metrics read.

Reading the fleet must not cost in proportion to it: at 10,000 nodes a
request that walks every node (its snapshot, its units) takes hundreds of
milliseconds of the event loop that ingest runs on. ``FleetIndex`` listens to
the fleet (``Fleet.watchers``: the id of the node each message concerned,
once it is applied, and of each node evicted) and updates what that one node
contributes, in O(its units):

- the node ids in order, for the API's cursor pages (a bisect, then the page);
- units by state, and how many are unhealthy (``unit_unhealthy``);
- presence, as ``detectors.presence.is_offline`` defines it: the nodes whose
  agent said offline, and the nodes gone silent. Silence comes with time, not
  with a message: every online node waits in a heap under the time it was
  last heard, and a reader at ``now`` pops those heard more than
  ``offline_after`` ago — a node heard since goes back under its new time, so
  the heap holds about one entry per online node and a report costs nothing
  here;
- the nodes with a problem (offline, or a unit unhealthy), for the page;
- the datasets view (``controller.datasets.describe_datasets``), recomputed
  only when a digest, the presence of a replica's node, a localisation or,
  with several controllers, a replica another one hears
  (``controller.shared_replicas``) changed since it was last asked for.

``recount`` computes the counts from scratch; the tests hold the index to it
after random sequences of messages.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.datasets import Localisations, describe_datasets, held_by_dataset
from controller.fleet import Fleet, NodeState
from controller.shared_replicas import SharedReplicas
from detectors.model import NodeSnapshot
from detectors.presence import is_offline
from selfheal.wire import UnitReport


def unit_unhealthy(unit: UnitReport) -> bool:
    """Exited or failed, or running with a probe that says unhealthy. Stopped on purpose (a standby copy, a
    unit the controller stopped or its agent fenced) is not unhealthy, nor is a scheduled job between runs."""
    return unit.state in ("exited", "failed") or (
        unit.state == "running" and unit.probe is not None and not unit.probe.healthy)


def node_offline(node: NodeState, now: float, offline_after: float) -> bool:
    """``is_offline`` of the node's presence alone (its units and history play no part, so none are copied)."""
    return is_offline(NodeSnapshot(node=node.id, online=node.online, last_seen=node.last_seen), now, offline_after)


@dataclass(frozen=True, slots=True)
class FleetCounts:
    nodes: int
    offline: int
    units: int
    unhealthy: int
    """Units for which ``unit_unhealthy`` holds."""
    unit_states: Mapping[str, int]
    """Units by state (states no unit is in are left out)."""
    problem_nodes: int
    """Nodes offline or with an unhealthy unit."""

    @property
    def online(self) -> int:
        return self.nodes - self.offline


def recount(fleet: Fleet, now: float, offline_after: float) -> FleetCounts:
    """The counts from scratch, over every node's snapshot: what ``FleetIndex.counts`` must always equal."""
    offline: set[str] = set()
    sick: set[str] = set()
    states: dict[str, int] = {}
    units = unhealthy = 0
    for node_id in fleet.nodes:
        snapshot = fleet.snapshot(node_id)
        assert snapshot is not None  # noqa: S101 - listed in the fleet
        if is_offline(snapshot, now, offline_after):
            offline.add(node_id)
        for unit in snapshot.units:
            units += 1
            states[unit.state] = states.get(unit.state, 0) + 1
            if unit_unhealthy(unit):
                unhealthy += 1
                sick.add(node_id)
    return FleetCounts(nodes=len(fleet.nodes), offline=len(offline), units=units, unhealthy=unhealthy,
                       unit_states=states, problem_nodes=len(offline | sick))


@dataclass(slots=True)
class _Seen:
    """What the index counted of one node, so that the next change replaces exactly that."""

    states: dict[str, int] = field(default_factory=dict)
    unhealthy: int = 0
    announced: bool = False
    """Counted offline because its agent said so (or its will fired)."""
    silent: bool = False
    """Counted offline because it was not heard for more than ``offline_after``."""
    waiting: float | None = None
    """The ``last_seen`` under which its live entry waits in the silence heap (None: it has none)."""
    datasets: Mapping[str, Any] | None = None
    """The datasets dict it held when last looked at (the fleet replaces it on every digest)."""
    shown_online: bool = False
    """``online and not offline``, as its replicas show it, when last looked at."""


class FleetIndex:
    def __init__(self, fleet: Fleet, *, offline_after: float) -> None:
        self.fleet = fleet
        self.offline_after = offline_after
        self._seen: dict[str, _Seen] = {}
        self._ids: list[str] = []
        """Every node id, sorted."""
        self._states: dict[str, int] = {}
        self._units = 0
        self._unhealthy = 0
        self._offline: set[str] = set()
        self._sick: set[str] = set()
        """Nodes with at least one unhealthy unit."""
        self._holders: set[str] = set()
        """Nodes that hold a dataset replica."""
        self._heap: list[tuple[float, str]] = []
        """(last_seen, node) of online nodes not yet counted silent; stale entries are skipped when popped."""
        self._now = float("-inf")
        """The latest ``now`` silence was counted at."""
        self._datasets_version = 0
        self._datasets_key: tuple[int, int, int, int] | None = None
        self.shared: SharedReplicas | None = None
        """Several controllers: the replicas other controllers hear, shown beside this one's."""
        self._datasets: list[dict[str, Any]] = []
        for node_id in fleet.nodes:
            self.update(node_id)
        fleet.watchers.append(self.update)

    # --- kept up to date: one node at a time ------------------------------------------------------

    def update(self, node_id: str) -> None:
        """The node changed (or was evicted: no longer in the fleet): replace what it contributes."""
        node = self.fleet.nodes.get(node_id)
        seen = self._seen.get(node_id)
        if node is None:
            if seen is not None:
                self._forget(node_id, seen)
            return
        if seen is None:
            seen = self._seen[node_id] = _Seen()
            bisect.insort(self._ids, node_id)
        self._count_units(node_id, node, seen)
        seen.announced = not node.online and node.last_seen != 0.0  # is_offline: known from a digest only is not
        if node.online:
            seen.silent = False  # heard again; if it still is silent, its entry is due and the next read says so
            if seen.waiting is None or node.last_seen < seen.waiting:
                self._wait(node_id, node.last_seen, seen)
        else:
            seen.silent, seen.waiting = False, None
        self._place(node_id, node, seen)

    def _count_units(self, node_id: str, node: NodeState, seen: _Seen) -> None:
        states: dict[str, int] = {}
        unhealthy = 0
        for unit in node.units.values():
            states[unit.state] = states.get(unit.state, 0) + 1
            unhealthy += unit_unhealthy(unit)
        if states != seen.states:
            _add(self._states, seen.states, -1)
            _add(self._states, states, 1)
            self._units += sum(states.values()) - sum(seen.states.values())
            seen.states = states
        self._unhealthy += unhealthy - seen.unhealthy
        seen.unhealthy = unhealthy
        if unhealthy:
            self._sick.add(node_id)
        else:
            self._sick.discard(node_id)

    def _place(self, node_id: str, node: NodeState, seen: _Seen) -> None:
        """Count the node's presence as ``seen`` says; a replica's presence or new digest dates the datasets view."""
        if seen.announced or seen.silent:
            self._offline.add(node_id)
        else:
            self._offline.discard(node_id)
        shown = node.online and node_id not in self._offline
        if node.datasets is not seen.datasets or (node.datasets and shown != seen.shown_online):
            if node.datasets or seen.datasets:
                self._datasets_version += 1
            seen.datasets = node.datasets
            if node.datasets:
                self._holders.add(node_id)
            else:
                self._holders.discard(node_id)
        seen.shown_online = shown

    def _wait(self, node_id: str, last_seen: float, seen: _Seen) -> None:
        seen.waiting = last_seen
        heapq.heappush(self._heap, (last_seen, node_id))
        if len(self._heap) > 2 * len(self._seen) + 64:  # entries left by nodes that went offline and back: compact
            self._heap = [(s.waiting, n) for n, s in self._seen.items() if s.waiting is not None]
            heapq.heapify(self._heap)

    def _forget(self, node_id: str, seen: _Seen) -> None:
        _add(self._states, seen.states, -1)
        self._units -= sum(seen.states.values())
        self._unhealthy -= seen.unhealthy
        self._sick.discard(node_id)
        self._offline.discard(node_id)
        if node_id in self._holders:
            self._holders.discard(node_id)
            self._datasets_version += 1
        del self._seen[node_id]
        del self._ids[bisect.bisect_left(self._ids, node_id)]

    def _advance(self, now: float) -> None:
        """Count as offline the online nodes not heard for more than ``offline_after`` at ``now``."""
        if now < self._now:  # the clock went back: what was silent may not be at this earlier time
            for node_id in [n for n in self._offline if self._seen[n].silent]:
                self.update(node_id)
        self._now = now
        heap = self._heap
        while heap and now - heap[0][0] > self.offline_after:
            last_seen, node_id = heapq.heappop(heap)
            seen = self._seen.get(node_id)
            if seen is None or seen.waiting != last_seen:
                continue  # evicted, gone offline, or waiting under another time already
            node = self.fleet.nodes[node_id]
            seen.waiting = None
            if now - node.last_seen > self.offline_after:
                seen.silent = True
                self._place(node_id, node, seen)
            else:
                self._wait(node_id, node.last_seen, seen)  # heard since it was put here

    # --- what readers ask -------------------------------------------------------------------------

    def counts(self, now: float) -> FleetCounts:
        self._advance(now)
        return FleetCounts(nodes=len(self._ids), offline=len(self._offline), units=self._units,
                           unhealthy=self._unhealthy, unit_states={s: n for s, n in self._states.items() if n},
                           problem_nodes=len(self._offline | self._sick))

    def offline(self, now: float) -> frozenset[str]:
        self._advance(now)
        return frozenset(self._offline)

    def page(self, after: str | None, limit: int) -> tuple[list[str], str | None]:
        """Up to ``limit`` node ids that sort after ``after`` (from the first without it), and the cursor of the
        next page (None: this is the last)."""
        start = 0 if after is None else bisect.bisect_right(self._ids, after)
        ids = self._ids[start:start + limit]
        return ids, (ids[-1] if ids and start + limit < len(self._ids) else None)

    def ids_from(self, first: str) -> Iterator[str]:
        """Node ids in order, from the first that does not sort before ``first``."""
        for i in range(bisect.bisect_left(self._ids, first), len(self._ids)):
            yield self._ids[i]

    @property
    def units(self) -> int:
        """Units of the whole fleet."""
        return self._units

    def problems(self, now: float, limit: int) -> list[str]:
        """The first ``limit`` node ids (in order) that are offline or have an unhealthy unit."""
        self._advance(now)
        return heapq.nsmallest(limit, self._offline | self._sick)

    def datasets(self, now: float, localisations: Localisations) -> list[dict[str, Any]]:
        """``describe_datasets``' view, recomputed only when something it reads changed."""
        self._advance(now)
        shared = self.shared
        key = (self._datasets_version, id(localisations), localisations.version, shared.version if shared else 0)
        if key != self._datasets_key:
            held = held_by_dataset((self.fleet.nodes[n] for n in self._holders), shared.elsewhere if shared else None)
            self._datasets = describe_datasets(held, self._offline, localisations)
            self._datasets_key = key
        return self._datasets


def _add(total: dict[str, int], part: Mapping[str, int], sign: int) -> None:
    for state, count in part.items():
        total[state] = total.get(state, 0) + sign * count
