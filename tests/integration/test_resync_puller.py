"""The resync path over real HTTP: the controller localises against two agents' peer APIs, the puller repairs.

Two replicas of one dataset, each with its own scanner, digest cache and peer
API served by uvicorn on loopback. The controller side (``ResyncPlanner``)
walks both trees and lists the repair; the agent side (``DatasetResyncer``)
pulls and verifies. Man-in-the-middle transports stand in for a corrupt
source and a broken connection.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent import resync as resync_module
from agent.digests.cache import DigestCache
from agent.digests.scanner import DatasetScanner
from agent.http_server import HttpServer, bind_listen
from agent.peer_api import PeerApiContext, create_peer_api
from agent.resync import TEMP_SUFFIX, DatasetResyncer
from controller.datasets import Localisations
from controller.fleet import Fleet
from controller.resync import Prepared, ResyncPlanner
from remediations.plans import ResyncDataset
from selfheal import wire
from selfheal.clocks import SystemClock
from selfheal.config import DatasetConfig
from tests.conftest import eventually

pytestmark = pytest.mark.integration

CHUNK = 4096
KEYS = {"node-a": bytes(range(32)), "node-b": bytes(range(1, 33))}


@dataclass
class Replica:
    node: str
    path: Path
    scanner: DatasetScanner
    address: str


@dataclass
class Pair:
    source: Replica
    replica: Replica
    state_dir: Path
    fleet: Fleet
    audit: list[tuple[str, dict[str, object]]]

    async def publish(self) -> None:
        """Both nodes' status and digests into the controller's fleet, as MQTT would carry them, plus a third
        replica like the source's (the majority that makes the source's root the authority)."""
        for node, peer in (("node-a", self.source), ("node-b", self.replica), ("node-c", self.source)):
            self.fleet.apply(wire.NodeStatus(node=node, state="online", session=1, http=peer.address), 0.0)
            self.fleet.apply(wire.DatasetDigest(node=node, session=1, ts=_tick(),
                                                datasets=peer.scanner.summaries()), 0.0)

    async def prepare(self) -> Prepared:
        await self.replica.scanner.scan("ds")
        await self.source.scanner.scan("ds")
        await self.publish()

        async def audit(kind: str, data: dict[str, object]) -> None:
            self.audit.append((kind, data))

        planner = ResyncPlanner(fleet=self.fleet, keys=KEYS.get, clock=SystemClock(), localisations=Localisations())
        return await planner.prepare(ResyncDataset("node-b", "ds", "node-a"), audit)

    def resyncer(self, transport: httpx.AsyncBaseTransport | None = None) -> DatasetResyncer:
        return DatasetResyncer(scanner=self.replica.scanner, state_dir=self.state_dir, clock=SystemClock(),
                               node_id=self.replica.node, transport=transport)


_ticks = [0.0]


def _tick() -> float:
    _ticks[0] += 10.0
    return _ticks[0]


def make_dataset(root: Path) -> None:
    (root / "models").mkdir(parents=True)
    (root / "models/weights.bin").write_bytes(bytes(range(256)) * 40)  # 3 chunks: 4096, 4096, 2048
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "sub").mkdir()
    (root / "sub/b.txt").write_bytes(b"beta\n" * 1000)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    make_dataset(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    stop = asyncio.Event()
    async with AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
        replicas = []
        for node, folder in (("node-a", "a"), ("node-b", "b")):
            cache = stack.enter_context(DigestCache(tmp_path / f"state-{node}/digests.sqlite3").open())
            config = DatasetConfig(name="ds", path=str(tmp_path / folder), chunk_size=CHUNK, scan_interval=3600)
            scanner = DatasetScanner([config], cache=cache, publish=lambda _: None, clock=SystemClock(), node_id=node)
            assert (await scanner.scan("ds")).state == "ok"
            sock, address = bind_listen("127.0.0.1:0", broker_host="127.0.0.1")
            server = HttpServer(create_peer_api(PeerApiContext(node_id=node, key=KEYS[node], datasets=scanner.view,
                                                               cache=cache, clock=SystemClock())), sock)
            tg.create_task(server.run(stop=stop))
            replicas.append(Replica(node, tmp_path / folder, scanner, address))
            await eventually(lambda server=server: server.started, what=f"{node}'s HTTP up")  # type: ignore[misc]
        try:
            yield Pair(replicas[0], replicas[1], tmp_path / "state-node-b", Fleet(), [])
        finally:
            stop.set()


class Tampering(httpx.AsyncBaseTransport):
    """A real transport with a hand in the middle: ``meddle(n, request, response)`` sees each chunk answer."""

    def __init__(self, meddle: Callable[[int, httpx.Request, httpx.Response], httpx.Response]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.meddle = meddle
        self.chunks = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if "/chunk" not in request.url.path:
            return response
        self.chunks += 1
        await response.aread()
        return self.meddle(self.chunks, request, response)

    async def aclose(self) -> None:
        await self.inner.aclose()


def flip(path: Path, offset: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


async def test_a_repair_pulls_only_the_differing_chunks_and_handles_extra_missing_and_modes(pair: Pair) -> None:
    flip(pair.replica.path / "models/weights.bin", CHUNK + 5)
    (pair.replica.path / "sub/b.txt").unlink()
    (pair.replica.path / "stray.tmp").write_bytes(b"left over")
    (pair.replica.path / "a.txt").chmod(0o600)

    prepared = await pair.prepare()
    localised = next(data for kind, data in pair.audit if kind == "localised")
    assert localised["files"] == ["a.txt", "models/weights.bin", "stray.tmp", "sub/b.txt"]
    actions = {f.path: (f.action, f.chunks) for c in prepared.commands for f in c.files}
    assert actions == {"a.txt": ("chmod", []), "models/weights.bin": ("fetch", [1]), "stray.tmp": ("delete", []),
                       "sub/b.txt": ("fetch", [0, 1])}
    assert prepared.fetch_bytes == CHUNK + 5000

    status, detail = await pair.resyncer().resync(prepared.commands[0])
    assert status == "done", detail
    assert "matches the authority" in detail
    assert f"pulled {CHUNK + 5000} bytes" in detail
    after = pair.replica.scanner.view("ds").summary  # type: ignore[union-attr]
    assert after is not None
    assert after.root == pair.source.scanner.view("ds").summary.root  # type: ignore[union-attr]
    assert (pair.replica.path / "a.txt").stat().st_mode & 0o777 == (pair.source.path / "a.txt").stat().st_mode & 0o777
    assert not (pair.replica.path / "stray.tmp").exists()
    kept = sorted(p.name.split("-", 1)[1] for p in (pair.state_dir / "quarantine/ds").iterdir())
    assert kept == ["models%weights.bin", "stray.tmp"]
    assert temp_files(pair.replica.path) == []


async def test_a_corrupt_chunk_from_the_source_is_refused_and_the_old_file_kept(pair: Pair) -> None:
    victim = pair.replica.path / "models/weights.bin"
    broken = flip(victim, 3)
    prepared = await pair.prepare()

    def corrupt(n: int, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        body = bytearray(response.content)
        body[0] ^= 0x01
        return httpx.Response(response.status_code, headers=response.headers, content=bytes(body), request=request)

    status, detail = await pair.resyncer(Tampering(corrupt)).resync(prepared.commands[0])
    assert status == "failed"
    assert "does not verify against the authority: refused" in detail
    assert victim.read_bytes() == broken
    assert temp_files(pair.replica.path) == []


async def test_an_interrupted_transfer_leaves_the_old_file_and_the_retry_succeeds(pair: Pair) -> None:
    victim = pair.replica.path / "models/weights.bin"
    (pair.source.path / "models/weights.bin").write_bytes(os.urandom(3 * CHUNK - 100))
    broken = victim.read_bytes()
    prepared = await pair.prepare()
    assert [f.chunks for c in prepared.commands for f in c.files] == [[0, 1, 2]]

    def cut(n: int, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if n == 2:
            raise httpx.ReadError("connection reset mid-transfer", request=request)
        return httpx.Response(response.status_code, headers=response.headers, content=response.content,
                              request=request)

    status, detail = await pair.resyncer(Tampering(cut)).resync(prepared.commands[0])
    assert status == "failed"
    assert "connection reset" in detail
    assert victim.read_bytes() == broken
    assert temp_files(pair.replica.path) == []

    # A temp file a killed agent left behind does not disturb the retry either.
    (victim.parent / f".weights.bin{TEMP_SUFFIX}").write_bytes(b"half a file")
    status, detail = await pair.resyncer().resync(prepared.commands[0])
    assert status == "done", detail
    assert victim.read_bytes() == (pair.source.path / "models/weights.bin").read_bytes()
    assert temp_files(pair.replica.path) == []


async def test_a_source_that_changed_since_it_was_verified_is_not_used(pair: Pair) -> None:
    victim = pair.replica.path / "models/weights.bin"
    broken = flip(victim, 2 * CHUNK + 1)
    prepared = await pair.prepare()
    (pair.source.path / "models/weights.bin").write_bytes(os.urandom(3 * CHUNK - 100))  # written after the plan

    status, detail = await pair.resyncer().resync(prepared.commands[0])
    assert status == "failed"
    assert "HTTP 409" in detail
    assert victim.read_bytes() == broken
    assert temp_files(pair.replica.path) == []


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "named_temp"])
async def test_the_file_being_rebuilt_has_no_name_until_it_verifies(pair: Pair, monkeypatch: pytest.MonkeyPatch,
                                                                    unnamed: bool) -> None:
    if not unnamed:
        monkeypatch.setattr(resync_module, "_TMPFILE", 0)  # a filesystem without O_TMPFILE
    elif not resync_module._TMPFILE:
        pytest.skip("no O_TMPFILE on this platform")
    victim = pair.replica.path / "models/weights.bin"
    (pair.source.path / "models/weights.bin").write_bytes(os.urandom(3 * CHUNK - 100))
    broken = victim.read_bytes()
    prepared = await pair.prepare()
    seen: list[list[Path]] = []

    def look(n: int, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        seen.append(temp_files(pair.replica.path))  # mid-transfer: what a kill would leave behind
        if n == 2:
            raise httpx.ReadError("the agent dies here", request=request)
        return httpx.Response(response.status_code, headers=response.headers, content=response.content,
                              request=request)

    status, _ = await pair.resyncer(Tampering(look)).resync(prepared.commands[0])
    assert status == "failed"
    assert victim.read_bytes() == broken
    temp = victim.parent / f".weights.bin{TEMP_SUFFIX}"
    assert seen == ([[], []] if unnamed else [[temp], [temp]])
    assert temp_files(pair.replica.path) == []

    status, detail = await pair.resyncer().resync(prepared.commands[0])
    assert status == "done", detail
    assert victim.read_bytes() == (pair.source.path / "models/weights.bin").read_bytes()
    assert temp_files(pair.replica.path) == []
