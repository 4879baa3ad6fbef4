"""Resync orchestration: localise a divergent replica against a verified source, then say what to repair.

The dispatcher calls ``ResyncPlanner.prepare`` for a ``ResyncDataset`` step.
It re-decides the authority from the fleet's current digests (the plan may
be minutes old): nothing happens while a replica settles, and the source must
still be one of the replicas matching the authority — never repair from a
replica that does not verify against it. It then drives the pure
``detectors.digests.localise`` walk over the agents' HTTP (one round trip per
tree level, up to ``FETCH_CONCURRENCY`` listings of a round fetched at once,
each request with a fresh listings-only transfer token signed with the
serving node's key for the puller ``controller``). Every answer carries the
root it was listed from: the source's must be the authority's, the
replica's must stay the one it started with; if either moves mid-walk the
walk starts over (at most ``MAX_RESTARTS`` times).

**Nothing a peer says is used unverified** (``detectors.listings``): the
root listing must hash to the root in the node's digest, every deeper
listing to the hash its verified parent lists, every chunk list (with size
and the dataset's chunk size) to the file hash its verified directory
lists. A listing that does not verify aborts the resync before any command
exists, with a ``listing_rejected`` audit entry naming the node, the path
and why. Every listing is read as a stream, at most ``MAX_LISTING_BYTES``,
within ``LISTING_DEADLINE`` seconds, never content-encoded.

The outcome is a list of ``wire.ResyncFile`` actions (fetch only the chunks
that differ, delete extra paths, create missing directories, fix modes),
derived from verified listings only and recorded in the incident's audit
trail, split into commands of at most ``wire.MAX_RESYNC_FILES`` paths and
under ``wire.MAX_PAYLOAD`` bytes each. Modes carry permission bits only:
setuid, setgid and sticky bits are never replicated (the paths are listed
in the audit as ``special_bits_dropped``; the agent enforces it too). Each
command carries its own transfer token — for the pulling node, the dataset
and that command's fetch paths, living ``TOKEN_TTL`` seconds — signed when
the dispatcher takes the command to send it (``Prepared.commands`` signs on
access), so a later command of a long plan never goes out with a stale one.
Symlinks are reported, not repaired: the agents' HTTP does not serve link
targets.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import httpx
import msgspec

from controller.datasets import Held, Localisations, Localised, held_by_dataset
from controller.fleet import Fleet
from detectors.digests import Answers, Difference, Localisation, Side, TreeEntry, decide_authority, localise
from detectors.listings import FileListing, ListingRejected, verify_file_listing, verify_tree_listing
from remediations.plans import ResyncDataset
from selfheal import wire
from selfheal.clocks import Clock
from selfheal.errors import PermanentRemediationError, RemediationError
from selfheal.peer_tls import peer_base_url
from selfheal.transfer_tokens import CONTROLLER, MAX_TTL, PULLER_HEADER, sign_transfer_token

KeyLookup = Callable[[str], bytes | None]
_T = TypeVar("_T")
Audit = Callable[[str, dict[str, object]], Awaitable[None]]
MAX_RESTARTS = 3
RESTART_PAUSE = 1.0
"""Seconds before a localisation starts over."""
TOKEN_TTL = MAX_TTL - 15.0
"""Seconds a transfer token lives (the agents refuse more than ``MAX_TTL``; 15 s of slack for clocks that
disagree): the puller opens its transfer when it starts the command, and the serving agent keeps an open
transfer while it is in use (``agent.peer_api``)."""
FETCH_CONCURRENCY = 8
"""Listings fetched at once (each at most ``MAX_LISTING_BYTES`` in memory)."""
MAX_LISTING_BYTES = 16 * 1024 * 1024
"""Bytes one listing answer may hold: ~100k directory entries, or a chunk list far beyond a command's size."""
LISTING_DEADLINE = 60.0
"""Seconds one listing may take in all (httpx's timeouts bound each read; this bounds a trickle)."""
AUDIT_PATHS = 500
"""Differences listed in one audit entry at most (the count is always exact)."""
PERMISSION_BITS = 0o777


class _RootMoved(Exception):  # a listing came from another tree than the walk started on
    pass


class _Rejected(Exception):  # a listing that does not verify: the resync is aborted
    def __init__(self, node: str, what: str, path: str, reason: str) -> None:
        self.node, self.what, self.path, self.reason = node, what, path, reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class _Peer:
    node: str
    url: str
    key: bytes
    root: str


class SignedOnAccess(Sequence[wire.ResyncDataset]):
    """The commands of one resync, each given a fresh transfer token whenever it is taken out.

    The dispatcher sends a plan's commands one after another, each after the previous one's ack; a token
    signed up front would be stale by the time a late command goes out."""

    def __init__(self, unsigned: list[wire.ResyncDataset], sign: Callable[[wire.ResyncDataset], str]) -> None:
        self._unsigned = unsigned
        self._sign = sign

    def __len__(self) -> int:
        return len(self._unsigned)

    @overload
    def __getitem__(self, index: int) -> wire.ResyncDataset: ...

    @overload
    def __getitem__(self, index: slice) -> list[wire.ResyncDataset]: ...

    def __getitem__(self, index: int | slice) -> wire.ResyncDataset | list[wire.ResyncDataset]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        command = self._unsigned[index]
        return msgspec.structs.replace(command, token=self._sign(command))


@dataclass(frozen=True, slots=True)
class Prepared:
    commands: SignedOnAccess
    localisation: Localisation
    fetch_bytes: int
    unrepairable: list[str]


class ResyncPlanner:
    def __init__(self, *, fleet: Fleet, keys: KeyLookup, clock: Clock, localisations: Localisations,
                 transport: httpx.AsyncBaseTransport | None = None, request_timeout: float = 10.0,
                 verify: ssl.SSLContext | bool = True, max_listing_bytes: int = MAX_LISTING_BYTES,
                 listing_deadline: float = LISTING_DEADLINE) -> None:
        """``verify``: how ``https://`` peers' certificates are checked (``selfheal.peer_tls``)."""
        self.fleet = fleet
        self.replicas_of: Callable[[str], Sequence[Held]] = \
            lambda name: held_by_dataset(fleet.nodes.values()).get(name, [])
        """A dataset's replicas as they stand (the engine gives ``Observer.replicas_of``: no walk over the fleet,
        and other controllers' replicas too)."""
        self.keys = keys
        self.clock = clock
        self.localisations = localisations
        self.transport = transport
        self.request_timeout = request_timeout
        self.verify = verify
        self.max_listing_bytes = max_listing_bytes
        self.listing_deadline = listing_deadline

    async def prepare(self, step: ResyncDataset, audit: Audit) -> Prepared:
        source, replica, chunk_size = self._peers(step)
        try:
            async with httpx.AsyncClient(transport=self.transport, timeout=self.request_timeout, verify=self.verify,
                                         follow_redirects=False) as client:
                for restart in range(MAX_RESTARTS + 1):
                    try:
                        localisation, entries, listings = await self._localise(client, step.dataset, source, replica,
                                                                               chunk_size=chunk_size)
                        break
                    except _RootMoved as moved:
                        await audit("localisation_restarted", {"restart": restart + 1, "reason": str(moved)})
                        if restart == MAX_RESTARTS:
                            raise RemediationError(
                                f"{step.dataset}: the trees kept changing during localisation") from None
                        await asyncio.sleep(RESTART_PAUSE)  # let the newer digest reach the fleet
                        source, replica, chunk_size = self._peers(step)
                files, unrepairable, special = await self._actions(
                    client, step.dataset, source, localisation=localisation, entries=entries, listings=listings,
                    chunk_size=chunk_size)
        except _Rejected as rejected:
            await audit("listing_rejected", {
                "dataset": step.dataset, "node": rejected.node, "listing": rejected.what, "path": rejected.path,
                "reason": rejected.reason, "consequence": "resync aborted: no command sent"})
            raise PermanentRemediationError(
                f"{step.dataset}: {rejected.node}'s {rejected.what} listing of {rejected.path or '/'} was rejected "
                f"({rejected.reason}); nothing repaired") from None
        self.localisations.record(step.dataset, step.node, Localised(source.root, replica.root, localisation))
        fetch_bytes = sum(_fetch_bytes(f, chunk_size) for f in files)
        await audit("localised", {
            "dataset": step.dataset, "source": step.source, "replica": step.node, "authority_root": source.root,
            "replica_root": replica.root, "rounds": localisation.rounds, "verified": True,
            "files": list(localisation.files)[:AUDIT_PATHS],
            "differences": [_difference(d) for d in localisation.differences[:AUDIT_PATHS]],
            "count": len(localisation.differences), "fetch_bytes": fetch_bytes, "unrepairable": unrepairable,
            "special_bits_dropped": special[:AUDIT_PATHS]})
        unsigned = _batches(files, dataset=step.dataset, source=source, chunk_size=chunk_size)

        def sign(command: wire.ResyncDataset) -> str:
            return sign_transfer_token(source.key, node=source.node, puller=step.node, dataset=step.dataset,
                                       paths=[f.path for f in command.files if f.action == "fetch"],
                                       expires_at=self.clock.wall() + TOKEN_TTL, nonce=secrets.token_hex(8))

        return Prepared(SignedOnAccess(unsigned, sign), localisation, fetch_bytes, unrepairable)

    def _peers(self, step: ResyncDataset) -> tuple[_Peer, _Peer, int]:
        """The source and the replica to walk, and the source's chunk size."""
        replicas = {r.node: r for r in self.replicas_of(step.dataset)}
        if any(r.summary.state == "settling" for r in replicas.values()):
            raise RemediationError(f"{step.dataset} is settling on some replica: not repaired while written")
        authority = decide_authority([r.digest() for r in replicas.values()])
        if authority.kind == "none" or authority.root is None:
            raise PermanentRemediationError(f"{step.dataset}: no authority any more ({authority.reason})")
        if step.source not in authority.matching:
            raise PermanentRemediationError(f"{step.source} no longer verifies against the authority of "
                                            f"{step.dataset}: not used as a source")
        if step.node not in authority.divergent or not replicas[step.node].here:
            raise RemediationError(f"{step.node}'s replica of {step.dataset} is not divergent here any more")
        peers = []
        for node_id, root in ((step.source, authority.root), (step.node, replicas[step.node].summary.root)):
            held = replicas[node_id]
            if not held.online or not held.http:
                raise RemediationError(f"{node_id} is offline or announced no HTTP address")
            key = self.keys(node_id)
            if key is None:
                raise PermanentRemediationError(f"no key for node {node_id}: cannot sign a transfer token")
            try:
                url = peer_base_url(held.http)
            except ValueError as exc:
                raise PermanentRemediationError(f"{node_id} announced an unusable HTTP address: {exc}") from None
            peers.append(_Peer(node_id, url, key, root))
        return peers[0], peers[1], replicas[step.source].summary.chunk_size

    async def _localise(self, client: httpx.AsyncClient, dataset: str, source: _Peer, replica: _Peer, *,
                        chunk_size: int) -> tuple[Localisation, dict[str, TreeEntry], dict[str, FileListing]]:
        """Walk both trees, every listing verified; also returns the reference's entries by path and its verified
        file listings."""
        peers = {"reference": source, "replica": replica}
        entries: dict[str, TreeEntry] = {}
        listings: dict[str, FileListing] = {}
        # what each listing must hash to: the roots from the digests, then what verified parents list
        expected: dict[tuple[Side, str], str] = {("reference", ""): source.root, ("replica", ""): replica.root}
        slots = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def get(side: Side, what: str, path: str) -> Any:
            async with slots:
                return await self._get(client, peers[side], dataset, what, path)

        walk = localise()
        want = next(walk)
        while True:
            tree_jobs = [get(side, "tree", path) for side, path in want.trees]
            file_jobs = [get(side, "file", path) for side, path in want.files]
            answers = await asyncio.gather(*tree_jobs, *file_jobs)
            trees: dict[tuple[Side, str], list[TreeEntry]] = {}
            for (side, path), body in zip(want.trees, answers[:len(tree_jobs)], strict=True):
                listed = _verified(peers[side], "tree", path,
                                   lambda body=body, side=side, path=path: verify_tree_listing(  # type: ignore[misc]
                                       body, expected=_expected(expected, side, path, "dir"), path=path))
                trees[(side, path)] = listed
                for entry in listed:
                    child = f"{path}/{entry.name}" if path else entry.name
                    expected[(side, child)] = f"{entry.type}\0{entry.hash}"
                    if side == "reference":
                        entries[child] = entry
            files: dict[tuple[Side, str], list[str]] = {}
            for (side, path), body in zip(want.files, answers[len(tree_jobs):], strict=True):
                verified = _verified(peers[side], "file", path,
                                     lambda body=body, side=side, path=path: verify_file_listing(  # type: ignore[misc]
                                         body, expected=_expected(expected, side, path, "file"),
                                         chunk_size=chunk_size, path=path))
                files[(side, path)] = list(verified.chunks)
                if side == "reference":
                    listings[path] = verified
            try:
                want = walk.send(Answers(trees, files))
            except StopIteration as done:
                result: Localisation = done.value
                return result, entries, listings

    async def _get(self, client: httpx.AsyncClient, peer: _Peer, dataset: str, what: str, path: str) -> Any:
        """One listing, read as a bounded stream within ``listing_deadline``, with a fresh listings-only token."""
        token = sign_transfer_token(peer.key, node=peer.node, puller=CONTROLLER, dataset=dataset, paths=(),
                                    expires_at=self.clock.wall() + TOKEN_TTL)
        headers = {"Authorization": f"Bearer {token}", PULLER_HEADER: CONTROLLER, "Accept-Encoding": "identity"}
        try:
            async with asyncio.timeout(self.listing_deadline):
                status, raw = await self._read(client, f"{peer.url}/datasets/{dataset}/{what}", path, headers,
                                               peer=peer, what=what)
        except TimeoutError:
            raise RemediationError(f"{peer.node}: {what} {path!r}: no whole answer within "
                                   f"{self.listing_deadline:g} s") from None
        except httpx.HTTPError as exc:
            raise RemediationError(f"{peer.node}: {what} {path!r}: {exc!r}") from None
        if status == 409:
            raise _RootMoved(f"{peer.node} cannot list {path!r} now: {_detail(raw)}")
        if status != 200:
            raise RemediationError(f"{peer.node}: {what} {path!r}: HTTP {status} {_detail(raw)}")
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Rejected(peer.node, what, path, "the answer is not JSON") from None
        if not isinstance(body, dict):
            raise _Rejected(peer.node, what, path, "the answer is not a JSON object")
        if body.get("root") != peer.root:
            raise _RootMoved(f"{peer.node} answered from root {str(body.get('root'))[:80]}, not {peer.root}")
        return body

    async def _read(self, client: httpx.AsyncClient, url: str, path: str, headers: dict[str, str], *,
                    peer: _Peer, what: str) -> tuple[int, bytes]:
        async with client.stream("GET", url, params={"path": path}, headers=headers) as response:
            if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                raise _Rejected(peer.node, what, path, "the answer is content-encoded (asked for identity)")
            cap = self.max_listing_bytes
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > cap:
                raise _Rejected(peer.node, what, path, f"the answer announces {declared} bytes, over the {cap} cap")
            raw = bytearray()
            async for piece in response.aiter_bytes():
                raw += piece
                if len(raw) > cap:
                    raise _Rejected(peer.node, what, path, f"the answer exceeds the {cap}-byte cap: aborted")
            return response.status_code, bytes(raw)

    async def _actions(self, client: httpx.AsyncClient, dataset: str, source: _Peer, *, localisation: Localisation,
                       entries: dict[str, TreeEntry], listings: dict[str, FileListing], chunk_size: int,
                       ) -> tuple[list[wire.ResyncFile], list[str], list[str]]:
        """The repair, path by path in tree order (a directory before what it holds), from verified data only.

        Also returns the unrepairable paths (symlinks) and those whose special mode bits were dropped."""
        gone: list[str] = []  # extra directories: whatever lies below goes with them
        unrepairable: list[str] = []
        special: list[str] = []
        wanted = [d.path for d in localisation.differences
                  if d.type == "file" and d.change in ("missing", "changed") and d.path not in listings]
        slots = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def listing(path: str) -> None:
            async with slots:
                body = await self._get(client, source, dataset, "file", path)
            listings[path] = _verified(source, "file", path, lambda: verify_file_listing(
                body, expected=entries[path].hash, chunk_size=chunk_size, path=path))

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
            if diff.change != "extra" and mode & ~PERMISSION_BITS:
                special.append(diff.path)
                mode &= PERMISSION_BITS
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
                verified = listings[diff.path]
                hashes = list(verified.chunks)
                chunks = list(diff.chunks) if diff.chunks is not None else list(range(len(hashes)))
                actions.append(wire.ResyncFile(path=diff.path, action="fetch", mode=mode, size=verified.size,
                                               chunks=chunks, chunk_hashes=hashes))
        return actions, unrepairable, special


def _expected(expected: dict[tuple[Side, str], str], side: Side, path: str, kind: str) -> str:
    """The hash a listing of ``path`` must have: from the digest (the root) or its verified parent's entry."""
    if path == "" and kind == "dir":
        return expected[(side, "")]
    found = expected.get((side, path))
    if found is None:
        raise ListingRejected(f"{path} was never listed by a verified parent")
    listed_kind, _, digest = found.partition("\0")
    if listed_kind != kind:
        raise ListingRejected(f"{path} is a {listed_kind} in its verified parent, not a {kind}")
    return digest


def _verified(peer: _Peer, what: str, path: str, check: Callable[[], _T]) -> _T:
    try:
        return check()
    except ListingRejected as exc:
        raise _Rejected(peer.node, what, path, str(exc)) from None


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
    """A command without its token yet (``SignedOnAccess`` adds one when it is sent)."""
    return wire.ResyncDataset(dataset=dataset, source_url=source.url, token="", expected_root=source.root,
                              chunk_size=chunk_size, files=files)


def _fetch_bytes(item: wire.ResyncFile, chunk_size: int) -> int:
    if item.action != "fetch":
        return 0
    return sum(min(chunk_size, max(0, item.size - i * chunk_size)) for i in item.chunks)


def _difference(diff: Difference) -> dict[str, object]:
    return {"path": diff.path, "type": diff.type, "change": diff.change, "size": diff.size,
            "chunks": list(diff.chunks) if diff.chunks is not None else None}


def _detail(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:300].decode("utf-8", "replace")
    return str(body.get("detail", "") if isinstance(body, dict) else body)[:300]
