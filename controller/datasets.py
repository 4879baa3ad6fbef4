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
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from controller.fleet import Fleet
from detectors.digests import Localisation, ReplicaDigest, decide_authority, detect_divergence, measure_agreement
from detectors.model import Finding
from remediations.planner import Replica

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

    def record(self, dataset: str, node: str, item: Localised) -> None:
        self._items[(dataset, node)] = item
        self._items.move_to_end((dataset, node))
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


def observe_datasets(fleet: Fleet, offline: Collection[str]) -> tuple[list[Finding], dict[str, tuple[Replica, ...]]]:
    """The dataset findings that hold now, and every dataset's replicas as resync source candidates."""
    findings: list[Finding] = []
    gone = frozenset(offline)
    for name, replicas in replica_digests(fleet).items():
        findings += detect_divergence(name, replicas, offline=gone)
    datasets = {name: tuple(Replica(node.id, s.root, s.state, node.online and node.id not in gone)
                            for node, s in holders)
                for name, holders in fleet.replicas().items()}
    return findings, datasets


def describe_datasets(fleet: Fleet, offline: Collection[str], localisations: Localisations) -> list[dict[str, Any]]:
    """Per dataset: replicas, authority, agreement and divergent replicas (the API's and metrics' view)."""
    out = []
    for name, holders in sorted(fleet.replicas().items()):
        digests = [ReplicaDigest(node.id, s.root, s.state, s.manifest_root, s.files, s.bytes) for node, s in holders]
        authority = decide_authority(digests)
        reference = next((s for node, s in holders if node.id in authority.matching), None)
        localised = {}
        for node, summary in holders:
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
                          "scanned_at": s.scanned_at, "error": s.error}
                         for node, s in sorted(holders, key=lambda h: h[0].id)],
            "authority": {"kind": authority.kind, "root": authority.root, "reason": authority.reason,
                          "matching": list(authority.matching)},
            "agreement": {"replicas": agreement.replicas, "files": agreement.files},
            "divergent": [{"node": node, "files": list(localised[node].files) if node in localised else None}
                          for node in authority.divergent],
            "unknown": list(authority.unknown),
        })
    return out
