"""The agent's HTTP API for the controller and peer agents: dataset trees, file chunk lists, chunks.

Read-only, and every dataset request carries a transfer token
(``selfheal.transfer_tokens``) signed with this node's command key for this
node and this dataset, as ``Authorization: Bearer``:

- ``GET /datasets/{name}/tree?path=<dir>`` — a directory node's entries
  (name, type, mode, hash, size), with the directory's own hash and the root
  and generation they belong to (the root when ``path`` is empty);
- ``GET /datasets/{name}/file?path=<file>`` — a file's hash, size, mode,
  chunk size and chunk hashes;
- ``GET /datasets/{name}/chunk?path=<file>&index=<i>`` — chunk ``i``'s bytes,
  its hash in ``X-Selfheal-Chunk-Hash``.

Answers come from the latest scan's tree, so a listing is always one
consistent tree (the root and generation in every answer say which); while
the latest scan is not ``ok`` (settling, error) the dataset answers 409. A
chunk is read from disk through ``reading.open_beneath`` (never through a
symlink, never outside the root), and served only if the file still has the
identity the scan saw and the bytes hash to what the scan recorded —
otherwise 409: a replica that changed since its scan is never a source.

Errors are ``application/problem+json``: 401 (missing, bad or expired
token), 400 (a path that is not plain and relative, or leads through a
symlink or a non-directory), 404 (unknown dataset or path), 409 (not
servable now). ``GET /healthz`` needs no token.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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
from selfheal.transfer_tokens import bearer_token, check_transfer_token

MAX_CONCURRENT_CHUNKS = 4
"""Chunks read at once (each up to ``chunk_size`` in memory); more requests wait."""
_TITLES = {400: "Bad request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict"}


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


def create_peer_api(ctx: PeerApiContext) -> Starlette:
    chunk_slots = asyncio.Semaphore(MAX_CONCURRENT_CHUNKS)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": ctx.node_id})

    async def tree(request: Request) -> Response:
        view, snapshot = _authorised(ctx, request)
        parts = _parts(request)
        digest, entries = _directory(snapshot, parts)
        return JSONResponse({
            "dataset": view.config.name, "root": snapshot.root_digest, "generation": _generation(view),
            "path": "/".join(parts), "hash": render_digest(snapshot.alg, digest),
            "entries": [_entry(snapshot.alg, e) for e in entries]})

    async def file(request: Request) -> Response:
        view, snapshot = _authorised(ctx, request)
        path, entry = _file(snapshot, _parts(request))
        chunks = await _chunks(ctx, view, snapshot, path)
        return JSONResponse({
            "dataset": view.config.name, "root": snapshot.root_digest, "generation": _generation(view),
            "path": path, "hash": render_digest(snapshot.alg, entry.hash), "size": entry.size, "mode": entry.mode,
            "chunk_size": snapshot.chunk_size, "chunks": [render_digest(snapshot.alg, c) for c in chunks]})

    async def chunk(request: Request) -> Response:
        view, snapshot = _authorised(ctx, request)
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
        return Response(data, media_type="application/octet-stream", headers={
            "X-Selfheal-Chunk-Hash": render_digest(snapshot.alg, chunks[index]),
            "X-Selfheal-Root": snapshot.root_digest, "Cache-Control": "no-store"})

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except _Problem as problem:
                return _problem(problem.status, problem.detail, request.url.path)
        return answer

    return Starlette(routes=[
        Route("/healthz", healthz),
        Route("/datasets/{name}/tree", guarded(tree)),
        Route("/datasets/{name}/file", guarded(file)),
        Route("/datasets/{name}/chunk", guarded(chunk)),
    ])


def _authorised(ctx: PeerApiContext, request: Request) -> tuple[DatasetView, DatasetTree]:
    """The dataset and its servable tree, once the token checks out; else the right ``_Problem``."""
    name = request.path_params["name"]
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise _Problem(401, "a transfer token is required (Authorization: Bearer <token>)")
    refused = check_transfer_token(ctx.key, token, node=ctx.node_id, dataset=name, now=ctx.clock.wall())
    if refused is not None:
        raise _Problem(401, refused)
    view = ctx.datasets(name)
    if view is None:
        raise _Problem(404, f"no dataset {name!r} on node {ctx.node_id}")
    snapshot = view.tree
    if snapshot is None:
        state = view.summary.state if view.summary is not None else "not scanned yet"
        raise _Problem(409, f"dataset {name!r} is {state}: no verified tree to serve")
    return view, snapshot


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
