"""The resync path against a lying peer, a forged command and stolen tokens (issue 13), over real HTTP.

Two real agents' peer APIs (uvicorn on loopback, real scanned files in tmp
dirs), and where an attacker is needed a real HTTP server on loopback that
the fleet's status for node-a points at: it proxies node-a's answers with
the controller's own token and rewrites them. Each test is an attack that
worked before the hardening (``controller.resync``, ``detectors.listings``,
``agent.resync``, ``agent.peer_api``, ``selfheal.transfer_tokens``):

- a listing that does not hash to the digest's root made the controller
  send a ResyncDataset command with the attacker's chunks, deletes and modes;
- a command's mode 0o6755 became a setuid/setgid file;
- an endless listing or chunk answer was read whole into memory;
- a token was good for any puller, any path of its dataset, for 15 minutes;
- a token copied off the broker opened a transfer of its own, or shared the
  puller's open one from another address, for up to 24 h;
- peers spoke plain HTTP only.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agent import resync as agent_resync
from agent.digests.cache import DigestCache
from agent.digests.scanner import DatasetScanner
from agent.http_server import HttpServer, bind_listen
from agent.peer_api import TRANSFER_LIFETIME, OpenTransfers, PeerApiContext, create_peer_api
from agent.resync import DatasetResyncer
from controller import resync as controller_resync
from controller.datasets import Localisations
from controller.fleet import Fleet
from controller.resync import Prepared, ResyncPlanner
from detectors.listings import FileListing
from remediations.plans import ResyncDataset
from selfheal import wire
from selfheal.clocks import ManualClock, SystemClock
from selfheal.config import DatasetConfig
from selfheal.errors import ConfigError, PermanentRemediationError, RemediationError
from selfheal.peer_tls import peer_base_url, peer_ssl_context
from selfheal.transfer_tokens import PULLER_HEADER, TransferGrant, sign_transfer_token
from tests.conftest import eventually

pytestmark = pytest.mark.integration

CHUNK = 4096
KEYS = {"node-a": bytes(range(32)), "node-b": bytes(range(1, 33))}
WEIGHTS = bytes(i * 7 % 251 for i in range(3 * CHUNK - 100))  # 3 different chunks


# --- a fleet of two real agents, and servers on loopback --------------------------------------------------------


@dataclass
class Agent:
    node: str
    path: Path
    scanner: DatasetScanner
    address: str
    clock: Any


@dataclass
class Fleet2:
    source: Agent
    replica: Agent
    state_dir: Path
    serve: Callable[[Starlette], Awaitable[str]]
    audit: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    async def prepare(self, *, source_address: str | None = None, **planner: Any) -> Prepared:
        """The controller's side: both digests and statuses (node-a's address possibly the attacker's), then
        localise; node-c holds node-a's replica too (the majority)."""
        await self.replica.scanner.scan("ds")
        await self.source.scanner.scan("ds")
        fleet = Fleet()
        for n, (node, agent, address) in enumerate((
                ("node-a", self.source, source_address or self.source.address),
                ("node-b", self.replica, self.replica.address),
                ("node-c", self.source, self.source.address))):
            fleet.apply(wire.NodeStatus(node=node, state="online", session=1, http=address), 0.0)
            fleet.apply(wire.DatasetDigest(node=node, session=1, ts=float(n + 1),
                                           datasets=agent.scanner.summaries()), 0.0)

        async def audit(kind: str, data: dict[str, object]) -> None:
            self.audit.append((kind, data))

        resync = ResyncPlanner(fleet=fleet, keys=KEYS.get, clock=SystemClock(), localisations=Localisations(),
                               **planner)
        return await resync.prepare(ResyncDataset("node-b", "ds", "node-a"), audit)

    def resyncer(self, **kwargs: Any) -> DatasetResyncer:
        return DatasetResyncer(scanner=self.replica.scanner, state_dir=self.state_dir, clock=SystemClock(),
                               node_id="node-b", **kwargs)

    def command(self, files: list[wire.ResyncFile], *, url: str | None = None, puller: str = "node-b",
                ttl: float = 30.0) -> wire.ResyncDataset:
        """A command as a (possibly lying) controller would send it, with a file token for its fetches."""
        summary = self.source.scanner.view("ds").summary  # type: ignore[union-attr]
        assert summary is not None
        token = sign_transfer_token(KEYS["node-a"], node="node-a", puller=puller, dataset="ds",
                                    paths=[f.path for f in files if f.action == "fetch"],
                                    expires_at=self.source.clock.wall() + ttl)
        return wire.ResyncDataset(dataset="ds", source_url=url or peer_base_url(self.source.address), token=token,
                                  expected_root=summary.root, chunk_size=CHUNK, files=files)


def make_dataset(root: Path) -> None:
    (root / "models").mkdir(parents=True)
    (root / "models/weights.bin").write_bytes(WEIGHTS)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "sub").mkdir()
    (root / "sub/b.txt").write_bytes(b"beta\n" * 1000)


async def start_server(app: Starlette, tg: asyncio.TaskGroup, stop: asyncio.Event, *,
                       tls: tuple[str, str] | None = None) -> str:
    sock, address = bind_listen("127.0.0.1:0", broker_host="127.0.0.1", tls=tls is not None)
    server = HttpServer(app, sock, tls_cert=tls[0] if tls else None, tls_key=tls[1] if tls else None)
    tg.create_task(server.run(stop=stop))
    await eventually(lambda: server.started, what="an HTTP server up")
    return address


@pytest.fixture
async def fleet2(tmp_path: Path) -> AsyncIterator[Fleet2]:
    make_dataset(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    stop = asyncio.Event()
    async with AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
        agents = []
        for node, folder in (("node-a", "a"), ("node-b", "b")):
            cache = stack.enter_context(DigestCache(tmp_path / f"state-{node}/digests.sqlite3").open())
            config = DatasetConfig(name="ds", path=str(tmp_path / folder), chunk_size=CHUNK, scan_interval=3600)
            scanner = DatasetScanner([config], cache=cache, publish=lambda _: None, clock=SystemClock(), node_id=node)
            assert (await scanner.scan("ds")).state == "ok"
            clock = ManualClock(time.time()) if node == "node-a" else SystemClock()
            app = create_peer_api(PeerApiContext(node_id=node, key=KEYS[node], datasets=scanner.view, cache=cache,
                                                 clock=clock))
            agents.append(Agent(node, tmp_path / folder, scanner, await start_server(app, tg, stop), clock))

        async def serve(app: Starlette) -> str:
            return await start_server(app, tg, stop)

        try:
            yield Fleet2(agents[0], agents[1], tmp_path / "state-node-b", serve)
        finally:
            stop.set()


Rewrite = Callable[[str, dict[str, str], Any], Any]


def lying_proxy(upstream: str, rewrite: Rewrite) -> Starlette:
    """node-a's answers, fetched with whatever token the caller presents, rewritten as ``rewrite`` likes."""
    base = peer_base_url(upstream)

    async def relay(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-selfheal-puller")}
        async with httpx.AsyncClient(base_url=base) as client:
            answer = await client.get(request.url.path, params=dict(request.query_params), headers=headers)
        if answer.status_code != 200 or "/chunk" in request.url.path:
            return Response(answer.content, status_code=answer.status_code, headers=dict(answer.headers))
        return JSONResponse(rewrite(request.url.path, dict(request.query_params), answer.json()))

    return Starlette(routes=[Route("/{rest:path}", relay)])


def entry(body: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in body["entries"] if e["name"] == name)


# --- 1. every listing checked against the Merkle root --------------------------------------------------------


def _evil_chunks(path: str, query: dict[str, str], body: Any) -> Any:
    if path.endswith("/file") and query.get("path") == "models/weights.bin":  # the attacker's bytes
        body["chunks"][1] = "blake3:" + "ab" * 32 if body["chunks"][1].startswith("blake3") else "sha256:" + "ab" * 32
    return body


def _evil_root(path: str, query: dict[str, str], body: Any) -> Any:
    if path.endswith("/tree") and not query.get("path"):
        body["entries"].append(dict(entry(body, "a.txt"), name="pwned", mode=0o6755))  # a new setuid file
        entry(body, "a.txt")["mode"] = 0o6755
    return body


def _evil_subtree(path: str, query: dict[str, str], body: Any) -> Any:
    if path.endswith("/tree") and query.get("path") == "models":
        body["entries"] = []  # "nothing here": the replica's copy would be deleted
    return body


def _evil_size(path: str, query: dict[str, str], body: Any) -> Any:
    if path.endswith("/file"):
        body["size"] += 1  # one more byte than the tree's hash says
    return body


@pytest.mark.parametrize(("rewrite", "listing", "where"), [
    (_evil_chunks, "file", "models/weights.bin"),
    (_evil_root, "tree", ""),
    (_evil_subtree, "tree", "models"),
    (_evil_size, "file", "models/weights.bin"),
], ids=["chunk-hashes", "root-entries-and-modes", "subtree-emptied", "file-size"])
async def test_a_listing_that_does_not_hash_to_the_digest_root_sends_no_command(
        fleet2: Fleet2, rewrite: Rewrite, listing: str, where: str) -> None:
    weights = fleet2.replica.path / "models/weights.bin"
    weights.write_bytes(WEIGHTS[:CHUNK] + b"X" * CHUNK + WEIGHTS[2 * CHUNK:])  # chunk 1 differs
    (fleet2.replica.path / "a.txt").chmod(0o600)
    before = weights.read_bytes()
    attacker = await fleet2.serve(lying_proxy(fleet2.source.address, rewrite))

    with pytest.raises(PermanentRemediationError, match="rejected"):
        await fleet2.prepare(source_address=attacker)

    rejected = [data for kind, data in fleet2.audit if kind == "listing_rejected"]
    assert len(rejected) == 1, fleet2.audit
    assert (rejected[0]["node"], rejected[0]["listing"], rejected[0]["path"]) == ("node-a", listing, where)
    assert "does not hash to" in str(rejected[0]["reason"])
    assert rejected[0]["consequence"] == "resync aborted: no command sent"
    assert not [kind for kind, _ in fleet2.audit if kind == "localised"]
    assert weights.read_bytes() == before


async def test_an_honest_relay_is_fine_the_data_is_what_is_verified(fleet2: Fleet2) -> None:
    (fleet2.replica.path / "models/weights.bin").write_bytes(WEIGHTS[:CHUNK] + b"X" * CHUNK + WEIGHTS[2 * CHUNK:])
    relay = await fleet2.serve(lying_proxy(fleet2.source.address, lambda path, query, body: body))
    prepared = await fleet2.prepare(source_address=relay)
    localised = next(data for kind, data in fleet2.audit if kind == "localised")
    assert localised["verified"] is True
    assert [(f.path, f.action, f.chunks) for c in prepared.commands for f in c.files] == [
        ("models/weights.bin", "fetch", [1])]


async def test_without_verification_the_lie_would_have_been_believed(fleet2: Fleet2,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack as it worked before: with the checks replaced by trusting parsers, the attacker's chunk
    hashes end up in the command (what ``test_a_listing_that_does_not_hash...`` now prevents)."""
    def trusting_file(body: Any, **_: Any) -> FileListing:
        return FileListing(int(body["size"]), tuple(body["chunks"]))

    monkeypatch.setattr(controller_resync, "verify_file_listing", trusting_file)
    (fleet2.replica.path / "models/weights.bin").write_bytes(WEIGHTS[:CHUNK] + b"X" * CHUNK + WEIGHTS[2 * CHUNK:])
    attacker = await fleet2.serve(lying_proxy(fleet2.source.address, _evil_chunks))
    prepared = await fleet2.prepare(source_address=attacker)
    fetch = prepared.commands[0].files[0]
    assert fetch.chunk_hashes[1].endswith("ab" * 32)


# --- 2. no setuid, setgid or sticky bits ------------------------------------------------------------------------


async def test_a_command_with_special_mode_bits_creates_plain_permissions(fleet2: Fleet2) -> None:
    (fleet2.source.path / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    await fleet2.source.scanner.scan("ds")
    tool = await _file_hashes(fleet2, "tool")
    command = fleet2.command([
        wire.ResyncFile(path="tool", action="fetch", mode=0o6755, size=tool.size, chunks=[0],
                        chunk_hashes=list(tool.chunks)),
        wire.ResyncFile(path="drop", action="mkdir", mode=0o3777),
        wire.ResyncFile(path="a.txt", action="chmod", mode=0o4755),
    ])
    resyncer = fleet2.resyncer()
    status, detail = await resyncer.resync(command)
    assert status == "done", detail
    assert (fleet2.replica.path / "tool").stat().st_mode & 0o7777 == 0o755
    assert (fleet2.replica.path / "drop").stat().st_mode & 0o7777 == 0o777
    assert (fleet2.replica.path / "a.txt").stat().st_mode & 0o7777 == 0o755
    assert resyncer.refused["special_mode_bits"] == 3


async def test_without_the_mask_the_command_would_have_made_a_setuid_file(fleet2: Fleet2,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_resync, "PERMISSION_BITS", 0o7777)  # the code before the hardening
    command = fleet2.command([wire.ResyncFile(path="a.txt", action="chmod", mode=0o6755)])
    status, _ = await fleet2.resyncer().resync(command)
    assert status == "done"
    assert (fleet2.replica.path / "a.txt").stat().st_mode & 0o7000 == 0o6000


async def test_the_controller_never_replicates_special_bits_either(fleet2: Fleet2) -> None:
    (fleet2.source.path / "bin").mkdir()
    (fleet2.source.path / "bin/tool").write_bytes(b"tool")
    (fleet2.source.path / "bin/tool").chmod(0o4755)
    (fleet2.source.path / "bin").chmod(0o2755)
    prepared = await fleet2.prepare()
    modes = {f.path: (f.action, f.mode) for c in prepared.commands for f in c.files}
    assert modes == {"bin": ("mkdir", 0o755), "bin/tool": ("fetch", 0o755)}
    localised = next(data for kind, data in fleet2.audit if kind == "localised")
    assert localised["special_bits_dropped"] == ["bin", "bin/tool"]
    status, detail = await fleet2.resyncer().resync(prepared.commands[0])
    assert status == "done", detail
    assert (fleet2.replica.path / "bin/tool").stat().st_mode & 0o7777 == 0o755


@pytest.mark.parametrize(("path", "action"), [
    ("../escape", "mkdir"), ("/escape", "mkdir"), ("outlink/pwned", "mkdir"), ("outlink/pwned", "chmod"),
    ("outlink", "chmod"), ("outlink/victim", "delete"), ("sub/../../escape", "delete"),
    ("outlink/victim", "fetch"), ("a\\..\\b", "chmod"),
])
async def test_command_paths_never_leave_the_dataset(fleet2: Fleet2, tmp_path: Path, path: str, action: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep me")
    (outside / "victim").chmod(0o644)
    (fleet2.replica.path / "outlink").symlink_to(outside)
    await fleet2.replica.scanner.scan("ds")
    item = wire.ResyncFile(path=path, action=action, mode=0o777)  # type: ignore[arg-type]
    if action == "fetch":
        a = await _file_hashes(fleet2, "a.txt")
        item = wire.ResyncFile(path=path, action="fetch", mode=0o777, size=a.size, chunks=[0],
                               chunk_hashes=list(a.chunks))
    status, detail = await fleet2.resyncer().resync(fleet2.command([item]))
    assert status == "failed", detail
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"keep me"
    assert (outside / "victim").stat().st_mode & 0o777 == 0o644
    assert not (tmp_path / "escape").exists()


async def _file_hashes(fleet2: Fleet2, path: str) -> FileListing:
    token = sign_transfer_token(KEYS["node-a"], node="node-a", puller="controller", dataset="ds", paths=(),
                                expires_at=fleet2.source.clock.wall() + 30)
    async with httpx.AsyncClient(base_url=peer_base_url(fleet2.source.address)) as client:
        body = (await client.get("/datasets/ds/file", params={"path": path},
                                 headers={"Authorization": f"Bearer {token}", PULLER_HEADER: "controller"})).json()
    return FileListing(body["size"], tuple(body["chunks"]))


# --- 3. bounded streams ----------------------------------------------------------------------------------------


def endless(*, pause: float = 0.0, sent: list[int] | None = None) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        block = b"[" + b" " * (64 * 1024 - 1)
        while True:
            if sent is not None:
                sent[0] += len(block)
            yield block
            # the attack, with ``pause``: a trickle. Always let the loop run: this server shares the test's loop,
            # and uvicorn's send to a closed connection returns without suspending.
            await asyncio.sleep(pause)

    return StreamingResponse(body(), media_type="application/json")


async def test_an_endless_listing_is_cut_off_at_the_cap_and_memory_stays_bounded(fleet2: Fleet2) -> None:
    (fleet2.replica.path / "a.txt").write_bytes(b"diverged\n")
    sent = [0]
    attacker = await fleet2.serve(Starlette(routes=[Route("/{rest:path}", lambda request: endless(sent=sent))]))
    tracemalloc.start()
    try:
        with pytest.raises(PermanentRemediationError, match="rejected"):
            await fleet2.prepare(source_address=attacker, max_listing_bytes=1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rejected = next(data for kind, data in fleet2.audit if kind == "listing_rejected")
    assert "exceeds the 1048576-byte cap" in str(rejected["reason"])
    assert peak < 8 * 1024 * 1024, peak  # the cap plus httpx's buffers, not the endless body
    assert sent[0] < 64 * 1024 * 1024


async def test_a_trickling_listing_is_abandoned_at_its_deadline(fleet2: Fleet2) -> None:
    (fleet2.replica.path / "a.txt").write_bytes(b"diverged\n")
    attacker = await fleet2.serve(Starlette(routes=[Route("/{rest:path}", lambda request: endless(pause=0.2))]))
    began = time.monotonic()
    with pytest.raises(RemediationError, match="no whole answer within 1 s"):
        await fleet2.prepare(source_address=attacker, listing_deadline=1.0, max_listing_bytes=1 << 30)
    assert time.monotonic() - began < 10


async def test_an_oversized_chunk_is_aborted_and_memory_stays_bounded(fleet2: Fleet2) -> None:
    summary = fleet2.source.scanner.view("ds").summary  # type: ignore[union-attr]
    assert summary is not None
    sent = [0]

    async def chunk(request: Request) -> Response:
        response = endless(sent=sent)
        response.headers["X-Selfheal-Root"] = summary.root
        return response

    async def opened(request: Request) -> Response:
        return JSONResponse({"paths": 1}, status_code=201)

    attacker = await fleet2.serve(Starlette(routes=[Route("/datasets/ds/transfers", opened, methods=["POST"]),
                                                    Route("/datasets/ds/chunk", chunk)]))
    weights = await _file_hashes(fleet2, "models/weights.bin")
    victim = fleet2.replica.path / "models/weights.bin"
    victim.write_bytes(b"Y" * len(WEIGHTS))
    command = fleet2.command([wire.ResyncFile(path="models/weights.bin", action="fetch", mode=0o644,
                                              size=weights.size, chunks=[0, 1, 2], chunk_hashes=list(weights.chunks))],
                             url=peer_base_url(attacker))
    resyncer = fleet2.resyncer()
    tracemalloc.start()
    try:
        status, detail = await resyncer.resync(command)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == "failed"
    assert "more than the chunk's 4096 bytes: aborted" in detail
    assert resyncer.refused["oversized_chunk"] == 1
    assert peak < 8 * 1024 * 1024, peak
    assert sent[0] < 64 * 1024 * 1024
    assert victim.read_bytes() == b"Y" * len(WEIGHTS)


# --- 4. tokens bound to puller, dataset and paths, at most a minute ---------------------------------------------


@dataclass
class Api:
    client: httpx.AsyncClient
    clock: ManualClock

    def headers(self, *, puller: str = "node-b", dataset: str = "ds", paths: tuple[str, ...] = ("a.txt",),
                ttl: float = 30.0, token_puller: str | None = None) -> dict[str, str]:
        token = sign_transfer_token(KEYS["node-a"], node="node-a", puller=token_puller or puller, dataset=dataset,
                                    paths=paths, expires_at=self.clock.wall() + ttl)
        return {"Authorization": f"Bearer {token}", PULLER_HEADER: puller}

    async def open(self, headers: dict[str, str], paths: tuple[str, ...] = ("a.txt",),
                   dataset: str = "ds") -> httpx.Response:
        return await self.client.post(f"/datasets/{dataset}/transfers", json={"paths": list(paths)},
                                      headers=headers)

    async def chunk(self, headers: dict[str, str], path: str = "a.txt", dataset: str = "ds") -> httpx.Response:
        return await self.client.get(f"/datasets/{dataset}/chunk", params={"path": path, "index": "0"},
                                     headers=headers)


@pytest.fixture
async def api(fleet2: Fleet2) -> AsyncIterator[Api]:
    assert isinstance(fleet2.source.clock, ManualClock)
    async with httpx.AsyncClient(base_url=peer_base_url(fleet2.source.address)) as client:
        yield Api(client, fleet2.source.clock)


async def test_a_file_token_opens_a_transfer_for_its_puller_and_paths_only(api: Api) -> None:
    mine = api.headers(paths=("a.txt", "sub/b.txt"))
    assert (await api.open(mine, ("a.txt", "sub/b.txt"))).status_code == 201
    assert (await api.chunk(mine)).content == b"alpha\n"
    assert (await api.chunk(mine, "sub/b.txt")).status_code == 200

    outside = await api.chunk(mine, "models/weights.bin")  # a path the transfer was not opened for
    assert outside.status_code == 403, outside.text
    assert "not among the paths" in outside.json()["detail"]

    stolen = {**mine, PULLER_HEADER: "node-c"}  # node-c presents node-b's token
    assert (await api.chunk(stolen)).status_code == 401
    assert "token is for puller 'node-b'" in (await api.chunk(stolen)).json()["detail"]

    other_dataset = await api.chunk(mine, dataset="other")
    assert other_dataset.status_code == 401
    assert "dataset 'ds'" in other_dataset.json()["detail"]

    tree = await api.client.get("/datasets/ds/tree", headers=mine)
    assert tree.status_code == 403


@pytest.mark.parametrize("case", ["other-puller", "other-dataset", "other-paths", "expired", "too-long", "v1",
                                  "no-puller-header"])
async def test_a_transfer_is_not_opened_with_a_token_that_does_not_fit(api: Api, case: str) -> None:
    headers = {
        "other-puller": api.headers(puller="node-c", token_puller="node-b"),  # noqa: S106 - a node name
        "other-dataset": api.headers(dataset="other"),
        "other-paths": api.headers(paths=("a.txt",)),
        "expired": api.headers(ttl=30),
        "too-long": api.headers(ttl=900),  # the old default lifetime
        "v1": {"Authorization": "Bearer sht1.node-a.ds.9999999999." + "0" * 64, PULLER_HEADER: "node-b"},
        "no-puller-header": {"Authorization": api.headers()["Authorization"]},
    }[case]
    paths = ("a.txt", "models/weights.bin") if case == "other-paths" else ("a.txt",)
    if case == "expired":
        api.clock.advance(31)  # older than its TTL
    answer = await api.open(headers, paths)
    assert answer.status_code == 401, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    chunk = await api.chunk(headers)
    assert chunk.status_code == 401


async def test_a_listings_token_never_reads_file_contents(api: Api) -> None:
    listings = api.headers(puller="controller", paths=())
    assert (await api.client.get("/datasets/ds/tree", headers=listings)).status_code == 200
    assert (await api.client.get("/datasets/ds/file", params={"path": "a.txt"}, headers=listings)).status_code == 200
    answer = await api.chunk(listings)
    assert answer.status_code == 403
    assert "does not read file contents" in answer.json()["detail"]


async def test_an_open_transfer_outlives_its_token_while_in_use_and_lapses_when_idle(api: Api) -> None:
    mine = api.headers(ttl=5)
    assert (await api.open(mine)).status_code == 201
    for _ in range(4):  # 200 s in all, each request within the idle timeout: the token expired long ago
        api.clock.advance(50)
        assert (await api.chunk(mine)).status_code == 200
    api.clock.advance(61)  # idle longer than IDLE_TIMEOUT: the transfer is forgotten
    lapsed = await api.chunk(mine)
    assert lapsed.status_code == 401
    assert "no open transfer" in lapsed.json()["detail"]


@pytest.fixture
async def elsewhere(fleet2: Fleet2) -> AsyncIterator[httpx.AsyncClient]:
    """A second client of node-a's peer API from another address (127.0.0.2, on loopback too)."""
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=peer_base_url(fleet2.source.address), transport=transport) as client:
        yield client


async def test_a_token_opens_one_transfer_once(api: Api, elsewhere: httpx.AsyncClient) -> None:
    """A token seen on the broker (it travels in the ResyncDataset command) cannot open a second transfer."""
    mine = api.headers(ttl=55)
    assert (await api.open(mine)).status_code == 201
    again = await api.open(mine)
    assert again.status_code == 401, again.text
    assert "already opened a transfer" in again.json()["detail"]
    copied = await elsewhere.post("/datasets/ds/transfers", json={"paths": ["a.txt"]}, headers=mine)
    assert copied.status_code == 401, copied.text
    api.clock.advance(61 + 1)  # the transfer lapsed (idle): the token stays spent while it could be valid
    assert (await api.open(mine)).status_code == 401
    assert (await api.chunk(mine)).status_code == 401


async def test_an_open_transfer_answers_only_the_address_that_opened_it(api: Api,
                                                                       elsewhere: httpx.AsyncClient) -> None:
    mine = api.headers(ttl=5)
    assert (await api.open(mine)).status_code == 201
    stolen = await elsewhere.get("/datasets/ds/chunk", params={"path": "a.txt", "index": "0"}, headers=mine)
    assert stolen.status_code == 403, stolen.text
    assert "opened from another address" in stolen.json()["detail"]
    assert stolen.headers["content-type"] == "application/problem+json"
    listing = await elsewhere.get("/datasets/ds/file", params={"path": "a.txt"}, headers=mine)
    assert listing.status_code == 403
    assert (await api.chunk(mine)).content == b"alpha\n"  # the puller itself is unaffected
    api.clock.advance(35)  # the other address's requests do not keep the transfer alive
    assert (await elsewhere.get("/datasets/ds/chunk", params={"path": "a.txt", "index": "0"},
                                headers=mine)).status_code == 403
    api.clock.advance(30)
    assert (await api.chunk(mine)).status_code == 401  # 65 s idle as far as its opener goes: lapsed


async def test_a_forwarded_for_header_does_not_move_a_transfer_to_another_address(
        api: Api, elsewhere: httpx.AsyncClient) -> None:
    """No proxy sits in front of the peer API: a client on the source's own loopback naming the puller's
    address in ``X-Forwarded-For`` is still itself."""
    mine = api.headers(ttl=30)
    opened = await elsewhere.post("/datasets/ds/transfers", json={"paths": ["a.txt"]}, headers=mine)
    assert opened.status_code == 201, opened.text
    spoofed = await api.chunk({**mine, "X-Forwarded-For": "127.0.0.2", "Forwarded": "for=127.0.0.2"})
    assert spoofed.status_code == 403, spoofed.text


def test_an_open_transfer_in_use_lapses_after_its_lifetime() -> None:
    clock = ManualClock(1_000_000.0)
    transfers = OpenTransfers(clock)
    grant = TransferGrant(node="node-a", puller="node-b", dataset="ds", paths=frozenset({"a.txt"}),
                          expires_at=int(clock.wall()) + 30, mac="m" * 64)
    assert transfers.open(grant, "127.0.0.1") is None
    used = 0.0
    while transfers.use(grant.mac, "127.0.0.1") is not None:  # used every 50 s, never idle
        clock.advance(50)
        used += 50
    assert TRANSFER_LIFETIME - 50 <= used <= TRANSFER_LIFETIME + 50
    assert TRANSFER_LIFETIME <= 6 * 3600  # was 24 h


async def test_a_repair_that_takes_longer_than_a_token_lives_completes(fleet2: Fleet2) -> None:
    """The real puller, a short-lived token, and 50 s of the source's time passing between its chunks."""
    clock = fleet2.source.clock
    assert isinstance(clock, ManualClock)
    victim = fleet2.replica.path / "models/weights.bin"
    victim.write_bytes(b"Z" * len(WEIGHTS))
    weights = await _file_hashes(fleet2, "models/weights.bin")
    b_txt = await _file_hashes(fleet2, "sub/b.txt")
    (fleet2.replica.path / "sub/b.txt").write_bytes(b"Z" * b_txt.size)
    command = fleet2.command([
        wire.ResyncFile(path="models/weights.bin", action="fetch", mode=0o644, size=weights.size,
                        chunks=[0, 1, 2], chunk_hashes=list(weights.chunks)),
        wire.ResyncFile(path="sub/b.txt", action="fetch", mode=0o644, size=b_txt.size, chunks=[0, 1],
                        chunk_hashes=list(b_txt.chunks))], ttl=10)

    class SlowLink(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if "/chunk" in request.url.path:
                clock.advance(50)  # each chunk takes 50 s of the source's time
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    started = clock.wall()
    status, detail = await fleet2.resyncer(transport=SlowLink()).resync(command)
    assert status == "done", detail
    assert clock.wall() - started == 250  # five chunks: four times the token's life, over four minutes
    assert victim.read_bytes() == WEIGHTS
    assert (fleet2.replica.path / "sub/b.txt").read_bytes() == (fleet2.source.path / "sub/b.txt").read_bytes()


async def test_each_command_goes_out_with_a_fresh_token_for_its_puller_and_fetches(fleet2: Fleet2) -> None:
    (fleet2.replica.path / "models/weights.bin").write_bytes(b"Q" * len(WEIGHTS))
    (fleet2.replica.path / "stray").write_bytes(b"x")
    prepared = await fleet2.prepare()
    first = prepared.commands[0]
    parts = first.token.split(".")
    assert parts[:4] == ["sht2", "node-a", "node-b", "ds"]
    assert int(parts[4]) - time.time() <= 60
    clock = fleet2.source.clock
    assert isinstance(clock, ManualClock)
    clock.advance(time.time() - clock.wall())
    async with httpx.AsyncClient(base_url=peer_base_url(fleet2.source.address)) as client:
        answer = await client.post("/datasets/ds/transfers", json={"paths": ["models/weights.bin"]},
                                   headers={"Authorization": f"Bearer {first.token}", PULLER_HEADER: "node-b"})
        assert answer.status_code == 201, answer.text
        widened = await client.post("/datasets/ds/transfers", json={"paths": ["models/weights.bin", "a.txt"]},
                                    headers={"Authorization": f"Bearer {first.token}", PULLER_HEADER: "node-b"})
        assert widened.status_code == 401


# --- 5. optional TLS on the peer API ----------------------------------------------------------------------------


def make_ca(folder: Path, name: str) -> tuple[Any, Any, Path]:
    from cryptography import x509  # noqa: PLC0415 - only these tests need it
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_server_cert(folder: Path, ca: tuple[Any, Any, Path]) -> tuple[str, str]:
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-a")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = folder / "node-a.pem", folder / "node-a.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


async def test_the_peer_api_over_https_verifies_with_the_ca_and_fails_with_another(fleet2: Fleet2,
                                                                                   tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "fleet-ca")
    _, _, other_ca = make_ca(tmp_path, "other-ca")
    cert, key = make_server_cert(tmp_path, ca)
    view = fleet2.source.scanner
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        app = create_peer_api(PeerApiContext(node_id="node-a", key=KEYS["node-a"], datasets=view.view,
                                             cache=view.cache, clock=SystemClock()))
        https = await start_server(app, tg, stop, tls=(cert, key))
        try:
            assert https.startswith("https://127.0.0.1:")
            with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP is not spoken there
                async with httpx.AsyncClient() as plain:
                    await plain.get(https.replace("https://", "http://") + "/healthz")

            victim = fleet2.replica.path / "models/weights.bin"
            victim.write_bytes(WEIGHTS[:CHUNK] + b"X" * CHUNK + WEIGHTS[2 * CHUNK:])
            with pytest.raises(RemediationError, match="CERTIFICATE_VERIFY_FAILED"):
                await fleet2.prepare(source_address=https, verify=peer_ssl_context(str(other_ca)))
            trusted = peer_ssl_context(str(ca[2]))
            prepared = await fleet2.prepare(source_address=https, verify=trusted)
            command = prepared.commands[0]
            assert command.source_url == https

            status, detail = await fleet2.resyncer(verify=peer_ssl_context(str(other_ca))).resync(command)
            assert status == "failed"
            assert "CERTIFICATE_VERIFY_FAILED" in detail
            status, detail = await fleet2.resyncer(verify=trusted).resync(prepared.commands[0])
            assert status == "done", detail
            assert victim.read_bytes() == WEIGHTS
        finally:
            stop.set()


@pytest.mark.parametrize(("announced", "expected"), [
    ("127.0.0.1:8731", "http://127.0.0.1:8731"), ("http://10.0.0.5:8731", "http://10.0.0.5:8731"),
    ("https://node-a.example:8731", "https://node-a.example:8731"), ("[::1]:8731", "http://[::1]:8731"),
    ("https://node-a.example:8731/", "https://node-a.example:8731"),
])
def test_announced_addresses_in_both_forms(announced: str, expected: str) -> None:
    assert peer_base_url(announced) == expected


@pytest.mark.parametrize("announced", ["file:///etc/passwd", "ftp://h:21", "http://user:pw@h:1", "http://h:1/x",
                                       "http://h", "h", "", "http://h:1?q=1", "http://h:99999"])
def test_anything_else_is_not_a_peer_address(announced: str) -> None:
    with pytest.raises(ValueError, match="peer address"):
        peer_base_url(announced)


def test_a_certificate_that_does_not_load_stops_the_agent_at_start(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    sock, _ = bind_listen("127.0.0.1:0", broker_host="127.0.0.1", tls=True)
    try:
        with pytest.raises(ConfigError, match=r"agent\.tls_cert"):
            HttpServer(Starlette(), sock, tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem"))
    finally:
        sock.close()


def test_peer_ssl_context_verifies_host_names(tmp_path: Path) -> None:
    context = peer_ssl_context(None)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"security\.peer_tls_ca"):
        peer_ssl_context(str(tmp_path / "junk.pem"))
