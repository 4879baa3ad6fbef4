"""Dataset replicas as the controller sees them: findings for the engine, figures for the API and metrics.

The fleet keeps every node's latest ``DatasetDigest``; this module turns
them into the inputs of the pure layer (``detectors.digests`` for findings,
``remediations.planner.Replica`` for resync sources) and into the per-dataset
view ``GET /api/v1/datasets`` and ``/metrics`` serve. The file-level
agreement needs a localisation of every divergent replica; the resync
orchestration records each one it makes in ``Localisations`` (bounded), and
a recorded localisation counts only while both roots it was made between are
still the current ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from controller.fleet import Fleet, NodeState
from detectors.digests import Localisation, ReplicaDigest, decide_authority, detect_divergence, measure_agreement
from detectors.model import Finding
from remediations.planner import Replica
from selfheal.wire import DatasetSummary

MAX_LOCALISATIONS = 1000


@dataclass(frozen=True, slots=True)
class Localised:
    reference_root: str
    replica_root: str
    localisation: Localisation


class Localisations:
    """(dataset, node) → its latest localisation against the authority; the oldest is evicted first."""

    def __init__(self, limit: int = MAX_LOCALISATIONS) -> None:
        self.limit = limit
        self._items: OrderedDict[tuple[str, str], Localised] = OrderedDict()
        self.version = 0
        """Bumped by every ``record``: a view built from these is current while it has not moved."""

    def record(self, dataset: str, node: str, item: Localised) -> None:
        self._items[(dataset, node)] = item
        self._items.move_to_end((dataset, node))
        self.version += 1
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, dataset: str, node: str, *, reference_root: str, replica_root: str) -> Localisation | None:
        item = self._items.get((dataset, node))
        if item is None or (item.reference_root, item.replica_root) != (reference_root, replica_root):
            return None
        return item.localisation


def replica_digests(fleet: Fleet) -> dict[str, list[ReplicaDigest]]:
    return {name: [ReplicaDigest(node.id, s.root, s.state, s.manifest_root, s.files, s.bytes) for node, s in holders]
            for name, holders in sorted(fleet.replicas().items())}


def observe_dataset(name: str, holders: Sequence[tuple[NodeState, DatasetSummary]],
                    offline: Collection[str]) -> tuple[list[Finding], tuple[Replica, ...]]:
    """One dataset's findings that hold now, and its replicas as resync source candidates."""
    digests = [ReplicaDigest(node.id, s.root, s.state, s.manifest_root, s.files, s.bytes) for node, s in holders]
    findings = detect_divergence(name, digests, offline=frozenset(offline))
    return findings, tuple(Replica(node.id, s.root, s.state, node.online and node.id not in offline)
                           for node, s in holders)


def describe_datasets(fleet: Fleet, offline: Collection[str], localisations: Localisations, *,
                      holders: Iterable[NodeState] | None = None) -> list[dict[str, Any]]:
    """Per dataset: replicas, authority, agreement and divergent replicas (the API's and metrics' view).

    ``holders``: the nodes that hold any replica, when the caller keeps track of them (``FleetIndex``);
    otherwise every node of the fleet is looked at. Replicas are taken in node order, so the view does not
    depend on the order nodes were first heard."""
    replicas: dict[str, list[tuple[NodeState, DatasetSummary]]] = {}
    for node in sorted(fleet.nodes.values() if holders is None else holders, key=lambda n: n.id):
        for name, summary in node.datasets.items():
            replicas.setdefault(name, []).append((node, summary))
    out = []
    for name, held in sorted(replicas.items()):
        digests = [ReplicaDigest(node.id, s.root, s.state, s.manifest_root, s.files, s.bytes) for node, s in held]
        authority = decide_authority(digests)
        reference = next((s for node, s in held if node.id in authority.matching), None)
        localised = {}
        for node, summary in held:
            if node.id in authority.divergent and authority.root:
                found = localisations.get(name, node.id, reference_root=authority.root, replica_root=summary.root)
                if found is not None:
                    localised[node.id] = found
        agreement = measure_agreement(authority, authority_files=reference.files if reference else None,
                                      localised=localised)
        out.append({
            "name": name,
            "replicas": [{"node": node.id, "root": s.root, "state": s.state, "files": s.files, "bytes": s.bytes,
                          "generation": s.generation, "online": node.online and node.id not in offline,
                          "scanned_at": s.scanned_at, "error": s.error} for node, s in held],
            "authority": {"kind": authority.kind, "root": authority.root, "reason": authority.reason,
                          "matching": list(authority.matching)},
            "agreement": {"replicas": agreement.replicas, "files": agreement.files},
            "divergent": [{"node": node, "files": list(localised[node].files) if node in localised else None}
                          for node in authority.divergent],
            "unknown": list(authority.unknown),
        })
    return out
