"""Dataset replicas compared: who is the authority, who diverges, and exactly where.

Pure: roots and listings in, decisions out; the controller does the I/O.

**Authority** (``decide_authority``). A manifest root, recorded when the
dataset was published, wins when a *strict* majority of all replicas holding
the dataset report that same manifest root and no replica reports another;
a manifest reported by fewer (or manifests that disagree) leaves no authority:
a manifest is one node's word like its root, so a single compromised node
reporting one must not make every honest replica "divergent" and resynced
from its tree. Without any manifest, a *strict* majority of all replicas
holding the dataset must share a root; otherwise there is none (1 vs 1,
2 vs 2, every replica settling...) and nothing may be repaired — a human
decides. Either way the authority is a root most replicas vouch for; which
replica then serves the data does not matter, since every listing and chunk
is verified against that root. Replicas that are settling, in error, or
hashed with another algorithm are *unknown*: neither a source nor a target.

**Localisation** (``localise``). Two trees, the reference (the authority's
replica) and a divergent replica, are walked level by level: each round
trip fetches, from both sides, the listings of every directory whose hashes
differ at that level, so the walk takes as many rounds as the deepest
difference is deep (plus one for the chunk lists of the deepest changed
files), however many files differ. It is a generator: it yields a ``Want``
(which listings to fetch, from which side), receives the ``Answers``, and
returns a ``Localisation``. The caller checks that every answer belongs to
the root it started from (the agents' answers carry it) and starts over if
not.

**Detection** (``detect_divergence``): one ``dataset_divergent`` finding per
replica whose root differs from the authority's, or one ``dataset_no_authority``
finding (for a human) when replicas disagree and nothing decides between
them. Nothing is found while any replica is settling: a dataset being written
is never judged, let alone repaired.

**Agreement** (``measure_agreement``): the share of replicas matching the
authority, and the share of (replica, file) pairs that match — the figures
operators watch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from detectors.model import Finding

Side = Literal["reference", "replica"]
EntryType = Literal["file", "dir", "link"]
ReplicaState = Literal["ok", "settling", "error"]
Change = Literal["changed", "mode", "missing", "extra"]
SIDES: tuple[Side, Side] = ("reference", "replica")


# --- authority ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaDigest:
    """One replica as its agent reported it (``wire.DatasetSummary``)."""

    node: str
    root: str
    """``alg:hex``; empty unless ``state`` is ``ok``."""
    state: ReplicaState = "ok"
    manifest_root: str | None = None
    files: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Authority:
    kind: Literal["manifest", "majority", "none"]
    root: str | None
    """The root every replica should have; None when there is no authority."""
    matching: tuple[str, ...]
    """Nodes whose root is the authority's: the only possible repair sources."""
    divergent: tuple[str, ...]
    """Nodes with a comparable root that differs: repair targets (when ``kind`` is not ``none``)."""
    unknown: tuple[str, ...]
    """Settling, in error, or hashed with another algorithm: neither source nor target."""
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    """Every reported root with its nodes, largest group first (evidence for a human)."""
    reason: str


def _algorithm(root: str) -> str:
    return root.partition(":")[0]


def decide_authority(replicas: Sequence[ReplicaDigest]) -> Authority:
    """The authority among ``replicas`` (every node holding the dataset); see the module docstring."""
    ok = [r for r in replicas if r.state == "ok" and r.root]
    by_root: dict[str, list[str]] = {}
    for replica in ok:
        by_root.setdefault(replica.root, []).append(replica.node)
    groups = tuple(sorted(((root, tuple(sorted(nodes))) for root, nodes in by_root.items()),
                          key=lambda g: (-len(g[1]), g[0])))
    not_ok = tuple(sorted(r.node for r in replicas if r not in ok))
    manifests = sorted({r.manifest_root for r in replicas if r.manifest_root})
    if len(manifests) > 1:
        return Authority("none", None, (), (), not_ok, groups,
                         f"the replicas' manifests disagree ({', '.join(manifests)}): a human must decide")
    if manifests:
        root = manifests[0]
        reporting = sum(1 for r in replicas if r.manifest_root == root)
        if 2 * reporting <= len(replicas):
            return Authority("none", None, (), (), not_ok, groups,
                             f"only {reporting} of {len(replicas)} replicas report the manifest {root}, "
                             "not a strict majority: a human must decide")
        kind: Literal["manifest", "majority"] = "manifest"
        reason = "the published manifest"
        if root not in by_root:
            reason += "; no replica matches it, so there is no repair source"
    else:
        if not groups:
            return Authority("none", None, (), (), not_ok, groups, "no replica has a digest (settling or error)")
        root, nodes = groups[0]
        if 2 * len(nodes) <= len(replicas):
            sizes = " vs ".join(str(len(n)) for _, n in groups) + (f" (+{len(not_ok)} unknown)" if not_ok else "")
            return Authority("none", None, (), (), not_ok, groups,
                             f"no manifest and no strict majority among {len(replicas)} replicas: {sizes}")
        kind, reason = "majority", f"{len(nodes)} of {len(replicas)} replicas agree"
    alg = _algorithm(root)
    matching = tuple(sorted(by_root.get(root, ())))
    divergent = tuple(sorted(r.node for r in ok if r.root != root and _algorithm(r.root) == alg))
    unknown = tuple(sorted({*not_ok, *(r.node for r in ok if _algorithm(r.root) != alg)}))
    return Authority(kind, root, matching, divergent, unknown, groups, reason)


# --- localisation ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One entry of a directory listing, as the agents serve it."""

    name: str
    type: EntryType
    mode: int
    hash: str
    size: int = 0


@dataclass(frozen=True, slots=True)
class Difference:
    path: str
    type: EntryType
    """The reference's entry type (the replica's for ``extra``)."""
    change: Change
    """``changed`` content (for a directory: a different kind of entry on the other side), ``mode`` only,
    ``missing`` on the replica, ``extra`` on the replica."""
    size: int = 0
    """The reference's size (the replica's for ``extra``)."""
    chunks: tuple[int, ...] | None = None
    """Changed files: the reference's chunk indexes the replica lacks, once chunk lists were compared."""


@dataclass(frozen=True, slots=True)
class Want:
    """The listings the next round trip must fetch: (side, directory path) and (side, file path)."""

    trees: tuple[tuple[Side, str], ...]
    files: tuple[tuple[Side, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Answers:
    trees: Mapping[tuple[Side, str], Sequence[TreeEntry]]
    files: Mapping[tuple[Side, str], Sequence[str]]
    """A file's chunk hashes, in order."""


@dataclass(frozen=True, slots=True)
class Localisation:
    differences: tuple[Difference, ...]
    rounds: int

    @property
    def files(self) -> tuple[str, ...]:
        """Paths of the files and symlinks that differ (not the directories holding them)."""
        return tuple(d.path for d in self.differences if d.type != "dir")


Which = Literal["both", "reference", "replica"]


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def localise(*, chunks: bool = True) -> Generator[Want, Answers, Localisation]:
    """Walk two trees from their roots to every difference; see the module docstring.

    With ``chunks``, changed files' chunk lists are fetched too (in the same round as the next level
    of directories) and compared, so each ``changed`` file says which chunks to transfer.
    """
    dirs: list[tuple[Which, str]] = [("both", "")]
    files: list[int] = []  # indexes into ``found`` of changed files whose chunk lists are wanted
    found: list[Difference] = []
    rounds = 0
    while dirs or files:
        want = Want(trees=tuple((side, path) for which, path in dirs for side in _sides(which)),
                    files=tuple((side, found[i].path) for i in files for side in SIDES))
        answers = yield want
        rounds += 1
        for i in files:
            theirs = answers.files[("reference", found[i].path)]
            ours = answers.files[("replica", found[i].path)]
            lacking = tuple(n for n, digest in enumerate(theirs) if n >= len(ours) or ours[n] != digest)
            found[i] = Difference(found[i].path, found[i].type, found[i].change, found[i].size, lacking)
        next_dirs: list[tuple[Which, str]] = []
        files = []
        for which, path in dirs:
            ref_entries = {e.name: e for e in answers.trees.get(("reference", path), ())} if which != "replica" else {}
            rep_entries = {e.name: e for e in answers.trees.get(("replica", path), ())} if which != "reference" else {}
            for name in sorted(ref_entries.keys() | rep_entries.keys()):
                child = _join(path, name)
                ref, rep = ref_entries.get(name), rep_entries.get(name)
                if ref is not None and rep is not None and ref.type == rep.type:
                    if ref.hash != rep.hash:
                        if ref.type == "dir":
                            next_dirs.append(("both", child))
                            if ref.mode != rep.mode:
                                found.append(Difference(child, "dir", "mode", ref.size))
                        else:
                            found.append(Difference(child, ref.type, "changed", ref.size))
                            if chunks and ref.type == "file":
                                files.append(len(found) - 1)
                    elif ref.mode != rep.mode:
                        found.append(Difference(child, ref.type, "mode", ref.size))
                    continue
                if ref is not None:
                    found.append(Difference(child, ref.type, "missing" if rep is None else "changed", ref.size))
                    if ref.type == "dir":
                        next_dirs.append(("reference", child))
                if rep is not None:
                    if ref is None:
                        found.append(Difference(child, rep.type, "extra", rep.size))
                    if rep.type == "dir":
                        next_dirs.append(("replica", child))
        dirs = next_dirs
    return Localisation(tuple(sorted(found, key=lambda d: (d.path, d.change))), rounds)


def _sides(which: Which) -> tuple[Side, ...]:
    return SIDES if which == "both" else (which,)


def localise_with(fetch: Callable[[Want], Answers], *, chunks: bool = True) -> Localisation:
    """Run ``localise`` to the end with ``fetch`` answering each round (tests, synchronous callers)."""
    walk = localise(chunks=chunks)
    want = next(walk)
    while True:
        try:
            want = walk.send(fetch(want))
        except StopIteration as done:
            result: Localisation = done.value
            return result


# --- agreement ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Agreement:
    replicas: float | None
    """Share of the replicas holding the dataset whose root is the authority's; None without authority."""
    files: float | None
    """Share of (replica, file) pairs matching the authority (extra files count against); None until every
    divergent replica is localised, or without authority."""


def measure_agreement(authority: Authority, *, authority_files: int | None = None,
                      localised: Mapping[str, Localisation] | None = None) -> Agreement:
    """The agreement figures of one dataset. ``authority_files``: the authority's file count;
    ``localised``: each divergent node's localisation against the authority."""
    if authority.kind == "none":
        return Agreement(None, None)
    total = len(authority.matching) + len(authority.divergent) + len(authority.unknown)
    replicas = len(authority.matching) / total if total else None
    localised = localised or {}
    if authority_files is None or any(node not in localised for node in authority.divergent):
        return Agreement(replicas, None)
    matched = considered = authority_files * len(authority.matching)
    for node in authority.divergent:
        counts = Counter(d.change for d in localised[node].differences if d.type != "dir")
        matched += max(0, authority_files - counts["changed"] - counts["mode"] - counts["missing"])
        considered += authority_files + counts["extra"]
    return Agreement(replicas, matched / considered if considered else 1.0)


# --- detection ------------------------------------------------------------------------------------


def detect_divergence(dataset: str, replicas: Sequence[ReplicaDigest], *,
                      offline: frozenset[str] = frozenset()) -> list[Finding]:
    """The findings of one dataset: divergent replicas, or a disagreement nobody can settle.

    ``offline`` nodes still count as replicas (their data did not go anywhere), but no finding is raised
    *on* one: nothing could be done there, and its digest may be stale."""
    if len(replicas) < 2 or any(r.state == "settling" for r in replicas):
        return []
    authority = decide_authority(replicas)
    by_node = {r.node: r for r in replicas}
    groups = [{"root": root, "nodes": list(nodes)} for root, nodes in authority.groups]
    if authority.kind == "none":
        manifests = {r.manifest_root for r in replicas if r.manifest_root}
        roots = {root for root, _ in authority.groups}
        if len(roots) < 2 and len(manifests) < 2 and not (roots and manifests - roots):
            return []  # nothing disagrees (e.g. every replica in error): not a divergence
        # on one node, so one incident: the first replica's (online first: an offline one's controller may be
        # gone, and with several controllers the finding is raised only by the one that hears its node)
        node = min(r.node for r in replicas if r.node not in offline) if set(by_node) - offline else \
            min(r.node for r in replicas)
        return [Finding(
            kind="dataset_no_authority", node=node, unit=None, severity="critical", scope=dataset,
            summary=f"dataset {dataset}: replicas disagree and nothing says which is right ({authority.reason})",
            evidence={"dataset": dataset, "reason": authority.reason, "groups": groups,
                      "unknown": list(authority.unknown)})]
    findings = []
    for node in authority.divergent:
        if node in offline:
            continue
        replica = by_node[node]
        findings.append(Finding(
            kind="dataset_divergent", node=node, unit=None, severity="critical", scope=dataset,
            summary=f"dataset {dataset} on {node} differs from the {authority.kind} ({authority.reason})",
            evidence={"dataset": dataset, "authority": authority.kind, "authority_root": authority.root,
                      "root": replica.root, "files": replica.files, "bytes": replica.bytes,
                      "matching": list(authority.matching), "groups": groups}))
    return findings
