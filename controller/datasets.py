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
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.fleet import NodeState
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


@dataclass(frozen=True, slots=True)
class Held:
    """One replica of a dataset: its node, the node's latest summary of it, and how to reach the node."""

    node: str
    summary: DatasetSummary
    online: bool
    """As last heard: the node's agent said online (whether it fell silent since is the caller's ``offline``)."""
    http: str
    """Where the node's agent serves its datasets (``NodeStatus.http``)."""
    here: bool = True
    """Heard by this controller (it acts on the node); otherwise read from the shared store
    (``controller.shared_replicas``): compared with, and a resync source, but never acted on here."""

    def digest(self) -> ReplicaDigest:
        s = self.summary
        return ReplicaDigest(self.node, s.root, s.state, s.manifest_root, s.files, s.bytes)


def held_by_dataset(nodes: Iterable[NodeState],
                    elsewhere: Mapping[str, Mapping[str, Held]] | None = None) -> dict[str, list[Held]]:
    """Dataset → its replicas in node order: those on ``nodes`` (heard here) and, for nodes not among them,
    those ``elsewhere`` (dataset → node → replica, from the shared store)."""
    out: dict[str, list[Held]] = {}
    here: set[str] = set()
    for node in nodes:
        here.add(node.id)
        for name, summary in node.datasets.items():
            out.setdefault(name, []).append(Held(node.id, summary, node.online, node.http))
    for name, remote in (elsewhere or {}).items():
        held = [replica for node_id, replica in remote.items() if node_id not in here]
        if held:
            out.setdefault(name, []).extend(held)
    for replicas in out.values():
        replicas.sort(key=lambda r: r.node)
    return dict(sorted(out.items()))


def observe_dataset(name: str, held: Sequence[Held],
                    offline: Collection[str]) -> tuple[list[Finding], tuple[Replica, ...]]:
    """One dataset's findings that hold now on the replicas heard here, and its replicas as resync source
    candidates (``offline``: nodes heard here that fell silent)."""
    down = frozenset(offline) | {r.node for r in held if not r.online}
    findings = detect_divergence(name, [r.digest() for r in held], offline=down)
    here = {r.node for r in held if r.here}
    return [f for f in findings if f.node in here], tuple(
        Replica(r.node, r.summary.root, r.summary.state, r.node not in down) for r in held)


def describe_datasets(held: Mapping[str, Sequence[Held]], offline: Collection[str],
                      localisations: Localisations) -> list[dict[str, Any]]:
    """Per dataset: replicas, authority, agreement and divergent replicas (the API's and metrics' view), from
    ``held_by_dataset``; ``offline``: nodes heard here that fell silent."""
    out = []
    for name, replicas in sorted(held.items()):
        authority = decide_authority([r.digest() for r in replicas])
        reference = next((r.summary for r in replicas if r.node in authority.matching), None)
        localised = {}
        for replica in replicas:
            if replica.node in authority.divergent and authority.root:
                found = localisations.get(name, replica.node, reference_root=authority.root,
                                          replica_root=replica.summary.root)
                if found is not None:
                    localised[replica.node] = found
        agreement = measure_agreement(authority, authority_files=reference.files if reference else None,
                                      localised=localised)
        out.append({
            "name": name,
            "replicas": [{"node": r.node, "root": r.summary.root, "state": r.summary.state, "files": r.summary.files,
                          "bytes": r.summary.bytes, "generation": r.summary.generation,
                          "online": r.online and r.node not in offline, "scanned_at": r.summary.scanned_at,
                          "error": r.summary.error} for r in replicas],
            "authority": {"kind": authority.kind, "root": authority.root, "reason": authority.reason,
                          "matching": list(authority.matching)},
            "agreement": {"replicas": agreement.replicas, "files": agreement.files},
            "divergent": [{"node": node, "files": list(localised[node].files) if node in localised else None}
                          for node in authority.divergent],
            "unknown": list(authority.unknown),
        })
    return out
