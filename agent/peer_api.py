"""The agent's HTTP API for the controller and peer agents: dataset trees, file chunk lists, chunks.

Read-only, and every dataset request carries a transfer token
(``selfheal.transfer_tokens``) signed with this node's command key, as
``Authorization: Bearer``, and names the puller in ``X-Selfheal-Puller``
(the token covers it: a token handed to one node is refused from another):

- ``GET /datasets/{name}/tree?path=<dir>`` — a directory node's entries
  (name, type, mode, hash, size), with the directory's own hash and the root
  and generation they belong to (the root when ``path`` is empty);
- ``GET /datasets/{name}/file?path=<file>`` — a file's hash, size, mode,
  chunk size and chunk hashes;
- ``GET /datasets/{name}/chunk?path=<file>&index=<i>`` — chunk ``i``'s bytes,
  its hash in ``X-Selfheal-Chunk-Hash``;
- ``POST /datasets/{name}/transfers`` with ``{"paths": [...]}`` — opens a
  transfer of those files.

Two kinds of token. A *listings-only* token (signed for no paths; the
controller's walk) is checked afresh on every ``tree`` and ``file`` request
and never reads chunk bytes. A *file* token (signed for the fetch paths of
one ``ResyncDataset`` command) must be valid when the puller opens the
transfer with exactly that path list; the agent then remembers the open
transfer (bounded: ``MAX_TRANSFERS``, least recently used evicted) and
serves ``file`` and ``chunk`` for those paths only, to that puller only,
while the transfer is in use: it lapses ``IDLE_TIMEOUT`` seconds after its
last request and ``TRANSFER_LIFETIME`` after it opened. So a token lives at
most a minute, yet a repair that takes hours completes.

A token is a bearer secret that travels inside a ``ResyncDataset`` command
(readable on a broker without ACLs), and ``X-Selfheal-Puller`` is only what
the client says. So a file token opens **one** transfer, **once**: its MAC is
remembered as spent until the token expires, and a second open is refused
(401) — even after the transfer lapsed. The transfer is bound to the client
address (IP) that opened it: a request from any other address is refused
(403) and does not keep the transfer alive. Whoever copies a token off the
broker can at best race the puller to the open — the puller's repair then
fails and the controller retries with a fresh token; it can never share a
transfer already open.

Answers come from the latest scan's tree, so a listing is always one
consistent tree (the root and generation in every answer say which); while
the latest scan is not ``ok`` (settling, error) the dataset answers 409. A
chunk is read from disk through ``reading.open_beneath`` (never through a
symlink, never outside the root), and served only if the file still has the
identity the scan saw and the bytes hash to what the scan recorded —
otherwise 409: a replica that changed since its scan is never a source.

Errors are ``application/problem+json``: 401 (missing, bad or expired
token, another puller's, another dataset's, a transfer not open), 403 (a
good token that does not cover this path or endpoint), 400 (a path that is
not plain and relative, or leads through a symlink or a non-directory), 404
(unknown dataset or path), 409 (not servable now), 413 (a transfer request
body over ``MAX_OPEN_BYTES``). A token already spent on an open is 401; a
request on an open transfer from another client address is 403.
``GET /healthz`` needs no token.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.digests.cache import DigestCache
from agent.digests.hashing import Entry, algorithm_named, hash_chunk, render_digest
from agent.digests.reading import identity, open_beneath, read_chunk, split_relpath
from agent.digests.scanner import DatasetView
from agent.digests.trees import DatasetTree
from selfheal.clocks import Clock
from selfheal.logs import RateLimiter, get_logger
from selfheal.transfer_tokens import (
    MAX_TTL,
    PULLER_HEADER,
    TransferGrant,
    bearer_token,
    check_transfer_token,
    token_mac,
)

MAX_CONCURRENT_CHUNKS = 4
"""Chunks read at once (each up to ``chunk_size`` in memory); more requests wait."""
MAX_TRANSFERS = 256
"""Open transfers remembered at once; the least recently used is forgotten first."""
IDLE_TIMEOUT = MAX_TTL
"""Seconds an open transfer lives after its last request (started or answered)."""
TRANSFER_LIFETIME = 6 * 3600.0
"""Seconds an open transfer lives at most, in use or not: one command's fetches (at most the chunks its
256 KiB payload can list, ~14 GiB at 4 MiB chunks) at ~1 MB/s; the controller waits far less for the ack."""
MAX_OPEN_BYTES = 512 * 1024
"""Bytes a ``transfers`` request body may hold (a command lists at most 64 paths of at most 4 KiB)."""
MAX_OPEN_PATHS = 1024
_TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
           413: "Content Too Large"}


class _OpenRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    paths: list[str]


_open_decoder = msgspec.json.Decoder(_OpenRequest)


class _Problem(Exception):  # an HTTP answer in flight, caught in this module only
    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(detail)


@dataclass(frozen=True)
class PeerApiContext:
    node_id: str
    key: bytes | None
    datasets: Callable[[str], DatasetView | None]
    cache: DigestCache
    clock: Clock
    refused: Counter[str] = field(default_factory=Counter)
    """Refused requests by reason class (``token``, ``scope``, ``body``): the agent's metrics read it."""
    metrics: Callable[[], tuple[bytes, str]] | None = None
    """``GET /metrics``' body and content type (``agent.metrics``); None: not served."""


@dataclass
class _Transfer:
    grant: TransferGrant
    client: str
    """The address (IP) that opened it: the only one it answers."""
    opened: float
    used: float


class TransferElsewhere(Exception):
    """A request on an open transfer from another client address than the one that opened it."""

    def __init__(self, client: str) -> None:
        self.client = client
        super().__init__(f"this transfer was opened from another address, not {client}")


class OpenTransfers:
    """The transfers pullers opened with a valid file token: bounded, each lapsing when idle (monotonic time),
    each answering only the address that opened it; and the tokens spent on opens, each remembered until it
    expires (wall time) so that it never opens a second transfer. The spent set needs no cap of its own:
    only tokens the node's key signed get there, and none lives longer than ``MAX_TTL``."""

    def __init__(self, clock: Clock, *, limit: int = MAX_TRANSFERS, idle: float = IDLE_TIMEOUT,
                 lifetime: float = TRANSFER_LIFETIME) -> None:
        self.clock = clock
        self.limit = limit
        self.idle = idle
        self.lifetime = lifetime
        self._open: OrderedDict[str, _Transfer] = OrderedDict()
        self._spent: dict[str, int] = {}  # token MAC -> the token's expiry (wall seconds)

    def __len__(self) -> int:
        return len(self._open)

    def open(self, grant: TransferGrant, client: str) -> str | None:
        """Open the transfer ``grant`` allows, for ``client``; or why not (the token already opened one)."""
        now = self.clock.monotonic()
        self._expire(now)
        wall = self.clock.wall()
        for mac in [m for m, expires in self._spent.items() if expires + MAX_TTL < wall]:  # a margin for clock steps
            del self._spent[mac]
        if grant.mac in self._spent:
            return "this token already opened a transfer: a token opens one, once"
        self._spent[grant.mac] = grant.expires_at
        self._open[grant.mac] = _Transfer(grant, client, now, now)
        while len(self._open) > self.limit:
            self._open.popitem(last=False)
        return None

    def use(self, mac: str, client: str) -> TransferGrant | None:
        """The open transfer's grant (marked used now), or None: never opened, or lapsed.

        Raises ``TransferElsewhere`` (and leaves the transfer as it was) when ``client`` did not open it."""
        now = self.clock.monotonic()
        self._expire(now)
        known = self._open.get(mac)
        if known is None:
            return None
        if known.client != client:
            raise TransferElsewhere(client)
        known.used = now
        self._open.move_to_end(mac)
        return known.grant

    def _expire(self, now: float) -> None:
        for mac in [m for m, t in self._open.items() if now - t.used > self.idle or now - t.opened > self.lifetime]:
            del self._open[mac]


def create_peer_api(ctx: PeerApiContext, *, transfers: OpenTransfers | None = None) -> Starlette:
    chunk_slots = asyncio.Semaphore(MAX_CONCURRENT_CHUNKS)
    opened = transfers or OpenTransfers(ctx.clock)
    log = get_logger("agent.peer_api", node=ctx.node_id)
    limiter = RateLimiter(period=60.0)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": ctx.node_id})

    async def open_transfer(request: Request) -> Response:
        return await _open_transfer(ctx, opened, request)

    async def tree(request: Request) -> Response:
        view, snapshot = _authorised(ctx, opened, request, path=None)
        parts = _parts(request)
        digest, entries = _directory(snapshot, parts)
        return JSONResponse({
            "dataset": view.config.name, "root": snapshot.root_digest, "generation": _generation(view),
            "path": "/".join(parts), "hash": render_digest(snapshot.alg, digest),
            "entries": [_entry(snapshot.alg, e) for e in entries]})

    async def file(request: Request) -> Response:
        view, snapshot = _authorised(ctx, opened, request, path=_path_param(request))
        path, entry = _file(snapshot, _parts(request))
        chunks = await _chunks(ctx, view, snapshot, path)
        return JSONResponse({
            "dataset": view.config.name, "root": snapshot.root_digest, "generation": _generation(view),
            "path": path, "hash": render_digest(snapshot.alg, entry.hash), "size": entry.size, "mode": entry.mode,
            "chunk_size": snapshot.chunk_size, "chunks": [render_digest(snapshot.alg, c) for c in chunks]})

    async def chunk(request: Request) -> Response:
        view, snapshot = _authorised(ctx, opened, request, path=_path_param(request), chunk=True)
        path, _ = _file(snapshot, _parts(request))
        index_text = request.query_params.get("index", "")
        if not index_text.isascii() or not index_text.isdigit():
            raise _Problem(400, "index must be a chunk number (0, 1, ...)")
        index = int(index_text)
        chunks = await _chunks(ctx, view, snapshot, path)
        if index >= len(chunks):
            raise _Problem(400, f"{path} has {len(chunks)} chunks; there is no chunk {index}")
        async with chunk_slots:
            data = await asyncio.to_thread(_read_verified, view, snapshot, path, index, chunks[index])
        with contextlib.suppress(TransferElsewhere):  # answered: in use (the address was checked above)
            opened.use(token_mac(bearer_token(request.headers.get("authorization")) or "") or "", _client(request))
        return Response(data, media_type="application/octet-stream", headers={
            "X-Selfheal-Chunk-Hash": render_digest(snapshot.alg, chunks[index]),
            "X-Selfheal-Root": snapshot.root_digest, "Cache-Control": "no-store"})

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except _Problem as problem:
                if problem.status in (401, 403, 413):
                    kind = {401: "token", 403: "scope", 413: "body"}[problem.status]
                    ctx.refused[kind] += 1
                    if limiter.allow(kind, request.url.path, ctx.clock.monotonic()):
                        log.warning("peer_api.refused", status=problem.status, reason=problem.detail[:200],
                                    path=request.url.path, client=request.client.host if request.client else None,
                                    suppressed_so_far=limiter.suppressed)
                return _problem(problem.status, problem.detail, request.url.path)
        return answer

    async def metrics(request: Request) -> Response:
        if ctx.metrics is None:
            return _problem(404, "no metrics here", request.url.path)
        body, content_type = ctx.metrics()
        return Response(body, media_type=content_type)

    return Starlette(routes=[
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/datasets/{name}/transfers", guarded(open_transfer), methods=["POST"]),
        Route("/datasets/{name}/tree", guarded(tree)),
        Route("/datasets/{name}/file", guarded(file)),
        Route("/datasets/{name}/chunk", guarded(chunk)),
    ])


async def _open_transfer(ctx: PeerApiContext, opened: OpenTransfers, request: Request) -> Response:
    """Check a file token against the path list the puller sends, and remember the transfer it opens."""
    name = request.path_params["name"]
    token, puller = _credentials(request)
    body = await _read_capped(request, MAX_OPEN_BYTES)
    try:
        paths = _open_decoder.decode(body).paths
    except msgspec.DecodeError as exc:
        raise _Problem(400, f"the body must be {{\"paths\": [...]}}: {exc}") from None
    if not paths or len(paths) > MAX_OPEN_PATHS:
        raise _Problem(400, f"a transfer lists 1 to {MAX_OPEN_PATHS} paths")
    for path in paths:
        try:
            split_relpath(path)
        except ValueError as exc:
            raise _Problem(400, f"{path[:200]!r}: {exc}") from None
    grant = check_transfer_token(ctx.key, token, node=ctx.node_id, puller=puller, dataset=name, paths=paths,
                                 now=ctx.clock.wall())
    if isinstance(grant, str):
        raise _Problem(401, grant)
    spent = opened.open(grant, _client(request))
    if spent is not None:
        raise _Problem(401, spent)
    return JSONResponse({"dataset": name, "puller": puller, "paths": len(grant.paths),
                         "idle_timeout": opened.idle}, status_code=201)


def _client(request: Request) -> str:
    """The address the request came from (no proxy sits in front of the peer API)."""
    return request.client.host if request.client is not None else ""


def _credentials(request: Request) -> tuple[str, str]:
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise _Problem(401, "a transfer token is required (Authorization: Bearer <token>)")
    puller = request.headers.get(PULLER_HEADER, "")
    if not puller:
        raise _Problem(401, f"the pulling node must name itself in {PULLER_HEADER}")
    return token, puller


def _authorised(ctx: PeerApiContext, opened: OpenTransfers, request: Request, *, path: str | None,
                chunk: bool = False) -> tuple[DatasetView, DatasetTree]:
    """The dataset and its servable tree, once the token allows this request; else the right ``_Problem``.

    ``path``: the file asked for (None: a directory listing); ``chunk``: file bytes are asked for.
    """
    name = request.path_params["name"]
    token, puller = _credentials(request)
    try:
        grant = opened.use(token_mac(token) or "", _client(request))
    except TransferElsewhere as exc:
        raise _Problem(403, str(exc)) from None
    if grant is not None:  # an open transfer: its token may have expired since, the transfer has not
        if grant.puller != puller:
            raise _Problem(401, f"token is for puller {grant.puller!r}, not {puller!r}")
        if grant.dataset != name:
            raise _Problem(401, f"token is for dataset {grant.dataset!r}")
        if path is None:
            raise _Problem(403, "a file transfer's token does not list directories")
        if path not in grant.paths:
            raise _Problem(403, f"{path[:200]!r} is not among the paths this transfer was opened for")
    else:
        checked = check_transfer_token(ctx.key, token, node=ctx.node_id, puller=puller, dataset=name, paths=(),
                                       now=ctx.clock.wall())
        if isinstance(checked, str):
            if chunk and checked.startswith("bad signature"):
                checked = "no open transfer for this token (POST /datasets/{name}/transfers first) " \
                          "and it is not a listings token"
            raise _Problem(401, checked)
        if chunk:
            raise _Problem(403, "a listings-only token does not read file contents")
    view = ctx.datasets(name)
    if view is None:
        raise _Problem(404, f"no dataset {name!r} on node {ctx.node_id}")
    snapshot = view.tree
    if snapshot is None:
        state = view.summary.state if view.summary is not None else "not scanned yet"
        raise _Problem(409, f"dataset {name!r} is {state}: no verified tree to serve")
    return view, snapshot


def _path_param(request: Request) -> str:
    return request.query_params.get("path", "")


async def _read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise _Problem(413, f"a transfer request holds at most {cap} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > cap:
            raise _Problem(413, f"a transfer request holds at most {cap} bytes")
    return bytes(body)


def _parts(request: Request) -> tuple[str, ...]:
    try:
        return split_relpath(request.query_params.get("path", ""))
    except ValueError as exc:
        raise _Problem(400, str(exc)) from None


def _directory(snapshot: DatasetTree, parts: tuple[str, ...]) -> tuple[bytes, tuple[Entry, ...]]:
    digest, path = snapshot.root, ""
    for depth, part in enumerate(parts):
        entry = _child(snapshot, path, part, parts[:depth + 1])
        if entry.type != "dir":
            raise _Problem(400, f"{'/'.join(parts[:depth + 1])} is not a directory")
        digest, path = entry.hash, f"{path}/{part}" if path else part
    return digest, snapshot.dirs.get(path, ())


def _file(snapshot: DatasetTree, parts: tuple[str, ...]) -> tuple[str, Entry]:
    if not parts:
        raise _Problem(400, "path must name a file")
    _directory(snapshot, parts[:-1])  # every step on the way is a directory, not a symlink
    path = "/".join(parts)
    entry = _child(snapshot, "/".join(parts[:-1]), parts[-1], parts)
    if entry.type != "file":
        raise _Problem(400, f"{path} is a {entry.type}, not a regular file")
    return path, entry


def _child(snapshot: DatasetTree, parent: str, name: str, walked: tuple[str, ...]) -> Entry:
    for entry in snapshot.dirs.get(parent, ()):
        if entry.name == name:
            if entry.type == "link":
                raise _Problem(400, f"{'/'.join(walked)} is a symlink: not followed")
            return entry
    raise _Problem(404, f"no {'/'.join(walked)} in the dataset")


async def _chunks(ctx: PeerApiContext, view: DatasetView, snapshot: DatasetTree, path: str) -> tuple[bytes, ...]:
    cached = await asyncio.to_thread(ctx.cache.chunks, view.config.name, path)
    record = snapshot.files[path]
    if cached is None or cached[0].hash != record.hash:
        raise _Problem(409, f"{path} changed since the scan that listed it: wait for the next scan")
    return cached[1]


def _read_verified(view: DatasetView, snapshot: DatasetTree, path: str, index: int, expected: bytes) -> bytes:
    record = snapshot.files[path]
    try:
        fd = open_beneath(view.config.path, tuple(path.split("/")))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _Problem(400, f"{path}: a symlink is on the way (not followed)") from None
        raise _Problem(409, f"{path}: {exc.strerror} (changed since the scan)") from None
    try:
        seen = (record.size, record.mtime_ns, record.inode)
        if identity(os.fstat(fd)) != seen:
            raise _Problem(409, f"{path} changed since the scan: not a source until rescanned")
        data = read_chunk(fd, index, snapshot.chunk_size)
        view.throttle.consume(len(data))
        if identity(os.fstat(fd)) != seen or hash_chunk(algorithm_named(snapshot.alg), data) != expected:
            raise _Problem(409, f"{path} chunk {index} does not verify against the scan: not served")
    finally:
        os.close(fd)
    return data


def _generation(view: DatasetView) -> int:
    return view.summary.generation if view.summary is not None else 0


def _entry(alg: str, entry: Entry) -> dict[str, object]:
    return {"name": entry.name, "type": entry.type, "mode": entry.mode, "hash": render_digest(alg, entry.hash),
            "size": entry.size}


def _problem(status: int, detail: str, instance: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="selfheal-datasets"'} if status == 401 else None
    return JSONResponse({"type": "about:blank", "title": _TITLES.get(status, "Error"), "status": status,
                         "detail": detail, "instance": instance},
                        status_code=status, media_type="application/problem+json", headers=headers)
