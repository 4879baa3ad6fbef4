"""Resync orchestration: localise a divergent replica against a verified source, then say what to repair.

The dispatcher calls ``ResyncPlanner.prepare`` for a ``ResyncDataset`` step.
It re-decides the authority from the fleet's current digests (the plan may
be minutes old): nothing happens while a replica settles, and the source must
still be one of the replicas matching the authority — never repair from a
replica that does not verify against it. It then drives the pure
``detectors.digests.localise`` walk over the agents' HTTP (one round trip per
tree level, every listing of a round fetched concurrently, each request with
a transfer token signed with the serving node's key). Every answer carries
the root it was listed from: the source's must be the authority's, the
replica's must stay the one it started with; if either moves mid-walk the
walk starts over (at most ``MAX_RESTARTS`` times).

The outcome is a list of ``wire.ResyncFile`` actions (fetch only the chunks
that differ, delete extra paths, create missing directories, fix modes),
recorded in the incident's audit trail, split into commands of at most
``wire.MAX_RESYNC_FILES`` paths and under ``wire.MAX_PAYLOAD`` bytes each.
Symlinks are reported, not repaired: the agents' HTTP does not serve link
targets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from controller.datasets import Localisations, Localised, replica_digests
from controller.fleet import Fleet
from detectors.digests import Answers, Difference, Localisation, Side, TreeEntry, decide_authority, localise
from remediations.plans import ResyncDataset
from selfheal import wire
from selfheal.clocks import Clock
from selfheal.errors import PermanentRemediationError, RemediationError
from selfheal.transfer_tokens import sign_transfer_token

KeyLookup = Callable[[str], bytes | None]
Audit = Callable[[str, dict[str, object]], Awaitable[None]]
MAX_RESTARTS = 3
RESTART_PAUSE = 1.0
"""Seconds before a localisation starts over."""
TOKEN_TTL = 900.0
"""Seconds a transfer token lives: long enough for the agent to pull everything the plan lists."""
FETCH_CONCURRENCY = 8
AUDIT_PATHS = 500
"""Differences listed in one audit entry at most (the count is always exact)."""


class _RootMoved(Exception):  # a listing came from another tree than the walk started on
    pass


@dataclass(frozen=True, slots=True)
class Prepared:
    commands: list[wire.ResyncDataset]
    localisation: Localisation
    fetch_bytes: int
    unrepairable: list[str]


@dataclass(frozen=True, slots=True)
class _Peer:
    node: str
    url: str
    token: str
    root: str


class ResyncPlanner:
    def __init__(self, *, fleet: Fleet, keys: KeyLookup, clock: Clock, localisations: Localisations,
                 transport: httpx.AsyncBaseTransport | None = None, request_timeout: float = 10.0) -> None:
        self.fleet = fleet
        self.keys = keys
        self.clock = clock
        self.localisations = localisations
        self.transport = transport
        self.request_timeout = request_timeout

    async def prepare(self, step: ResyncDataset, audit: Audit) -> Prepared:
        source, replica = self._peers(step)
        chunk_size = self.fleet.nodes[step.source].datasets[step.dataset].chunk_size
        async with httpx.AsyncClient(transport=self.transport, timeout=self.request_timeout) as client:
            for restart in range(MAX_RESTARTS + 1):
                try:
                    localisation, entries, listings = await self._localise(client, step.dataset, source, replica)
                    break
                except _RootMoved as moved:
                    await audit("localisation_restarted", {"restart": restart + 1, "reason": str(moved)})
                    if restart == MAX_RESTARTS:
                        raise RemediationError(f"{step.dataset}: the trees kept changing during localisation") from None
                    await asyncio.sleep(RESTART_PAUSE)  # let the newer digest reach the fleet
                    source, replica = self._peers(step)
            files, unrepairable = await self._actions(client, step.dataset, source, localisation=localisation,
                                                         entries=entries, listings=listings)
        self.localisations.record(step.dataset, step.node, Localised(source.root, replica.root, localisation))
        fetch_bytes = sum(_fetch_bytes(f, chunk_size) for f in files)
        await audit("localised", {
            "dataset": step.dataset, "source": step.source, "replica": step.node, "authority_root": source.root,
            "replica_root": replica.root, "rounds": localisation.rounds,
            "files": list(localisation.files)[:AUDIT_PATHS],
            "differences": [_difference(d) for d in localisation.differences[:AUDIT_PATHS]],
            "count": len(localisation.differences), "fetch_bytes": fetch_bytes, "unrepairable": unrepairable})
        commands = _batches(files, dataset=step.dataset, source=source, chunk_size=chunk_size)
        return Prepared(commands, localisation, fetch_bytes, unrepairable)

    def _peers(self, step: ResyncDataset) -> tuple[_Peer, _Peer]:
        replicas = replica_digests(self.fleet).get(step.dataset, [])
        if any(r.state == "settling" for r in replicas):
            raise RemediationError(f"{step.dataset} is settling on some replica: not repaired while written")
        authority = decide_authority(replicas)
        if authority.kind == "none" or authority.root is None:
            raise PermanentRemediationError(f"{step.dataset}: no authority any more ({authority.reason})")
        if step.source not in authority.matching:
            raise PermanentRemediationError(f"{step.source} no longer verifies against the authority of "
                                            f"{step.dataset}: not used as a source")
        if step.node not in authority.divergent:
            raise RemediationError(f"{step.node}'s replica of {step.dataset} is not divergent any more")
        peers = []
        for node_id, root in ((step.source, authority.root),
                              (step.node, next(r.root for r in replicas if r.node == step.node))):
            node = self.fleet.nodes.get(node_id)
            if node is None or not node.online or not node.http:
                raise RemediationError(f"{node_id} is offline or announced no HTTP address")
            key = self.keys(node_id)
            if key is None:
                raise PermanentRemediationError(f"no key for node {node_id}: cannot sign a transfer token")
            token = sign_transfer_token(key, node=node_id, dataset=step.dataset,
                                        expires_at=self.clock.wall() + TOKEN_TTL)
            peers.append(_Peer(node_id, f"http://{node.http}", token, root))
        return peers[0], peers[1]

    async def _localise(self, client: httpx.AsyncClient, dataset: str, source: _Peer, replica: _Peer,
                        ) -> tuple[Localisation, dict[str, TreeEntry], dict[str, dict[str, Any]]]:
        """Walk both trees; also returns the reference's entries by path and its file listings."""
        peers = {"reference": source, "replica": replica}
        entries: dict[str, TreeEntry] = {}
        listings: dict[str, dict[str, Any]] = {}
        walk = localise()
        want = next(walk)
        while True:
            tree_jobs = [self._get(client, peers[side], dataset, "tree", path) for side, path in want.trees]
            file_jobs = [self._get(client, peers[side], dataset, "file", path) for side, path in want.files]
            answers = await asyncio.gather(*tree_jobs, *file_jobs)
            trees: dict[tuple[Side, str], list[TreeEntry]] = {}
            for (side, path), body in zip(want.trees, answers[:len(tree_jobs)], strict=True):
                trees[(side, path)] = listed = [
                    TreeEntry(e["name"], e["type"], int(e["mode"]), e["hash"], int(e.get("size", 0)))
                    for e in body["entries"]]
                if side == "reference":
                    for entry in listed:
                        entries[f"{path}/{entry.name}" if path else entry.name] = entry
            files: dict[tuple[Side, str], list[str]] = {}
            for (side, path), body in zip(want.files, answers[len(tree_jobs):], strict=True):
                files[(side, path)] = list(body["chunks"])
                if side == "reference":
                    listings[path] = body
            try:
                want = walk.send(Answers(trees, files))
            except StopIteration as done:
                result: Localisation = done.value
                return result, entries, listings

    async def _get(self, client: httpx.AsyncClient, peer: _Peer, dataset: str, what: str,
                   path: str) -> dict[str, Any]:
        try:
            response = await client.get(f"{peer.url}/datasets/{dataset}/{what}", params={"path": path},
                                        headers={"Authorization": f"Bearer {peer.token}"})
        except httpx.HTTPError as exc:
            raise RemediationError(f"{peer.node}: {what} {path!r}: {exc!r}") from None
        if response.status_code == 409:
            raise _RootMoved(f"{peer.node} cannot list {path!r} now: {_detail(response)}")
        if response.status_code != 200:
            raise RemediationError(f"{peer.node}: {what} {path!r}: HTTP {response.status_code} {_detail(response)}")
        body: dict[str, Any] = response.json()
        if body.get("root") != peer.root:
            raise _RootMoved(f"{peer.node} answered from root {body.get('root')}, not {peer.root}")
        return body

    async def _actions(self, client: httpx.AsyncClient, dataset: str, source: _Peer, *, localisation: Localisation,
                       entries: dict[str, TreeEntry], listings: dict[str, dict[str, Any]],
                       ) -> tuple[list[wire.ResyncFile], list[str]]:
        """The repair, path by path in tree order (a directory before what it holds)."""
        gone: list[str] = []  # extra directories: whatever lies below goes with them
        unrepairable: list[str] = []
        wanted = [d.path for d in localisation.differences
                  if d.type == "file" and d.change in ("missing", "changed") and d.path not in listings]
        slots = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def listing(path: str) -> None:
            async with slots:
                listings[path] = await self._get(client, source, dataset, "file", path)

        try:
            await asyncio.gather(*(listing(p) for p in wanted))
        except _RootMoved as moved:
            raise RemediationError(f"the source changed while listed: {moved}") from None
        actions: list[wire.ResyncFile] = []
        for diff in localisation.differences:
            if any(diff.path.startswith(f"{d}/") for d in gone):
                continue
            entry = entries.get(diff.path)
            mode = entry.mode if entry is not None else 0o644
            if diff.change == "extra":
                actions.append(wire.ResyncFile(path=diff.path, action="delete"))
                if diff.type == "dir":
                    gone.append(diff.path)
            elif diff.type == "link":
                unrepairable.append(diff.path)
            elif diff.change == "mode":
                actions.append(wire.ResyncFile(path=diff.path, action="chmod", mode=mode))
            elif diff.type == "dir":
                if diff.change == "changed":  # something else stands where the directory belongs
                    actions.append(wire.ResyncFile(path=diff.path, action="delete"))
                actions.append(wire.ResyncFile(path=diff.path, action="mkdir", mode=mode))
            else:
                body = listings[diff.path]
                hashes = list(body["chunks"])
                chunks = list(diff.chunks) if diff.chunks is not None else list(range(len(hashes)))
                actions.append(wire.ResyncFile(path=diff.path, action="fetch", mode=int(body["mode"]),
                                               size=int(body["size"]), chunks=chunks, chunk_hashes=hashes))
        return actions, unrepairable


def _batches(files: list[wire.ResyncFile], *, dataset: str, source: _Peer,
             chunk_size: int) -> list[wire.ResyncDataset]:
    """Commands of at most ``MAX_RESYNC_FILES`` paths, each well under ``MAX_PAYLOAD`` encoded."""
    limit = wire.MAX_PAYLOAD - 16 * 1024  # room for the command envelope and signature
    out: list[wire.ResyncDataset] = []
    batch: list[wire.ResyncFile] = []
    size = 0
    for item in files:
        item_size = len(wire.encode(item)) + 1
        if item_size > limit:
            raise PermanentRemediationError(f"{item.path} lists too many chunks for one command "
                                            f"({len(item.chunk_hashes)}): raise the dataset's chunk_size")
        if batch and (len(batch) >= wire.MAX_RESYNC_FILES or size + item_size > limit):
            out.append(_command(batch, dataset, source, chunk_size))
            batch, size = [], 0
        batch.append(item)
        size += item_size
    if batch or not out:
        out.append(_command(batch, dataset, source, chunk_size))
    return out


def _command(files: list[wire.ResyncFile], dataset: str, source: _Peer, chunk_size: int) -> wire.ResyncDataset:
    return wire.ResyncDataset(dataset=dataset, source_url=source.url, token=source.token,
                              expected_root=source.root, chunk_size=chunk_size, files=files)


def _fetch_bytes(item: wire.ResyncFile, chunk_size: int) -> int:
    if item.action != "fetch":
        return 0
    return sum(min(chunk_size, max(0, item.size - i * chunk_size)) for i in item.chunks)


def _difference(diff: Difference) -> dict[str, object]:
    return {"path": diff.path, "type": diff.type, "change": diff.change, "size": diff.size,
            "chunks": list(diff.chunks) if diff.chunks is not None else None}


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", ""))[:300]
    except ValueError:
        return response.text[:300]
