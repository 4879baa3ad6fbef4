"""The agent's dataset HTTP API over a real scanned dataset: tokens, traversal refusals, verified chunks."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from agent.digests.cache import DigestCache
from agent.digests.hashing import DEFAULT, hash_chunk, render_digest
from agent.digests.scanner import DatasetScanner
from agent.peer_api import PeerApiContext, create_peer_api
from selfheal.clocks import SystemClock
from selfheal.config import DatasetConfig
from selfheal.transfer_tokens import PULLER_HEADER, sign_transfer_token
from selfheal.wire import DatasetSummary

pytestmark = pytest.mark.integration

NODE = "node-a"
PULLER = "node-b"
KEY = bytes(range(32))
CHUNK = 4096
WEIGHTS = bytes(range(256)) * 40  # 10240 bytes: chunks of 4096, 4096, 2048


@dataclass
class Peer:
    client: httpx.AsyncClient
    root: Path
    scanner: DatasetScanner
    published: list[list[DatasetSummary]]
    transfers: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    """Open transfers by (dataset, path): a token opens one transfer, once; its chunks are read through it."""

    def auth(self, dataset: str = "ds", *, node: str = NODE, ttl: float = 30.0, key: bytes = KEY,
             puller: str = "controller", paths: tuple[str, ...] = ()) -> dict[str, str]:
        """A listings-only token for the controller, or with ``paths`` a file token for ``puller``."""
        token = sign_transfer_token(key, node=node, puller=puller, dataset=dataset, paths=paths,
                                    expires_at=time.time() + ttl)
        return {"Authorization": f"Bearer {token}", PULLER_HEADER: puller}

    async def open(self, paths: tuple[str, ...], *, dataset: str = "ds", puller: str = PULLER,
                   headers: dict[str, str] | None = None) -> tuple[httpx.Response, dict[str, str]]:
        """Open a transfer of ``paths`` for ``puller``: the answer, and the headers its requests carry."""
        headers = headers or self.auth(dataset, puller=puller, paths=paths)
        answer = await self.client.post(f"/datasets/{dataset}/transfers", json={"paths": list(paths)},
                                        headers=headers)
        return answer, headers

    async def get(self, endpoint: str, *, dataset: str = "ds", headers: dict[str, str] | None = None,
                  **params: str | int) -> httpx.Response:
        """Listings with a listings token; a chunk through a transfer opened for its path (as a puller does)."""
        if headers is None and endpoint == "chunk":
            key = (dataset, str(params.get("path", "")))
            if key not in self.transfers:
                opened, self.transfers[key] = await self.open((key[1],), dataset=dataset)
                if opened.status_code != 201:
                    del self.transfers[key]
                    return opened
            headers = self.transfers[key]
        return await self.client.get(f"/datasets/{dataset}/{endpoint}", params=params,
                                     headers=self.auth(dataset) if headers is None else headers)


def make_dataset(root: Path) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models/weights.bin").write_bytes(WEIGHTS)
    (root / "a.txt").write_bytes(b"alpha\n")
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"never served")
    (root / "dirlink").symlink_to(outside)
    (root / "filelink").symlink_to(outside / "secret")
    return root


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    root = make_dataset(tmp_path / "ds")
    published: list[list[DatasetSummary]] = []
    with DigestCache(tmp_path / "state/digests.sqlite3").open() as cache:
        config = DatasetConfig(name="ds", path=str(root), chunk_size=CHUNK)
        scanner = DatasetScanner([config], cache=cache, publish=published.append, clock=SystemClock(),
                                 node_id=NODE)
        summary = await scanner.scan("ds")
        assert summary.state == "ok", summary.error
        app = create_peer_api(PeerApiContext(node_id=NODE, key=KEY, datasets=scanner.view, cache=cache,
                                             clock=SystemClock()))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent") as client:
            yield Peer(client, root, scanner, published)


async def test_tree_file_and_chunk_with_a_valid_token(peer: Peer) -> None:
    summary = peer.published[-1][0]
    top = await peer.get("tree")
    assert top.status_code == 200, top.text
    body = top.json()
    assert (body["root"], body["hash"], body["generation"], body["path"]) == (summary.root, summary.root, 1, "")
    assert [(e["name"], e["type"]) for e in body["entries"]] == [
        ("a.txt", "file"), ("dirlink", "link"), ("filelink", "link"), ("models", "dir")]
    models = next(e for e in body["entries"] if e["name"] == "models")
    sub = (await peer.get("tree", path="models")).json()
    assert sub["hash"] == models["hash"]
    weights = sub["entries"][0]
    assert (weights["name"], weights["size"], weights["mode"]) == ("weights.bin", 10240,
                                                                  (peer.root / "models/weights.bin").stat().st_mode
                                                                  & 0o7777)

    listing = (await peer.get("file", path="models/weights.bin")).json()
    assert (listing["hash"], listing["size"], listing["chunk_size"]) == (weights["hash"], 10240, CHUNK)
    assert listing["chunks"] == [render_digest(DEFAULT, hash_chunk(DEFAULT, WEIGHTS[i:i + CHUNK]))
                                 for i in range(0, len(WEIGHTS), CHUNK)]

    last = await peer.get("chunk", path="models/weights.bin", index=2)
    assert last.status_code == 200
    assert last.content == WEIGHTS[8192:]
    assert last.headers["x-selfheal-chunk-hash"] == listing["chunks"][2]
    assert last.headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize("case", ["missing", "not-bearer", "expired", "other-dataset", "other-node", "other-key",
                                  "garbage"])
async def test_requests_without_a_good_token_are_refused(peer: Peer, case: str) -> None:
    headers = {
        "missing": {},
        "not-bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
        "expired": peer.auth(ttl=-5),
        "other-dataset": peer.auth("other"),
        "other-node": peer.auth(node="node-b"),
        "other-key": peer.auth(key=bytes(32)),
        "garbage": {"Authorization": "Bearer sht2.nonsense", PULLER_HEADER: "controller"},
    }[case]
    for endpoint, params in (("tree", {}), ("file", {"path": "a.txt"}), ("chunk", {"path": "a.txt", "index": 0})):
        answer = await peer.get(endpoint, headers=headers, **params)
        assert answer.status_code == 401, (endpoint, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["www-authenticate"].startswith("Bearer")


async def test_a_node_without_a_key_refuses_everything(tmp_path: Path, peer: Peer) -> None:
    app = create_peer_api(PeerApiContext(node_id=NODE, key=None, datasets=peer.scanner.view,
                                         cache=peer.scanner.cache, clock=SystemClock()))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent") as client:
        answer = await client.get("/datasets/ds/tree", headers=peer.auth())
    assert answer.status_code == 401
    assert "no command key" in answer.json()["detail"]


@pytest.mark.parametrize(("endpoint", "path", "detail"), [
    ("tree", "../outside", "'..'"),
    ("tree", "models/../../outside", "'..'"),
    ("file", "/etc/passwd", "relative"),
    ("file", "models//weights.bin", "empty segments"),
    ("file", "./a.txt", "'.'"),
    ("file", "dirlink/secret", "symlink"),
    ("chunk", "dirlink/secret", "symlink"),
    ("file", "filelink", "symlink"),
    ("chunk", "filelink", "symlink"),
    ("tree", "dirlink", "symlink"),
    ("tree", "a.txt", "not a directory"),
    ("file", "models", "not a regular file"),
    ("file", "", "must name a file"),
    ("file", "a\\..\\b", "backslash"),
])
async def test_paths_escaping_the_root_are_refused(peer: Peer, endpoint: str, path: str, detail: str) -> None:
    answer = await peer.get(endpoint, path=path, index=0)
    assert answer.status_code == 400, answer.text
    assert detail in answer.json()["detail"]


async def test_unknown_datasets_paths_and_chunks(peer: Peer) -> None:
    assert (await peer.get("tree", dataset="nope")).status_code == 404
    assert (await peer.get("file", path="models/nope.bin")).status_code == 404
    assert (await peer.get("chunk", path="models/weights.bin", index=3)).status_code == 400
    assert (await peer.get("chunk", path="models/weights.bin", index="x")).status_code == 400
    assert (await peer.get("chunk", path="models/weights.bin", index=-1)).status_code == 400
    assert (await peer.client.get("/healthz")).json() == {"status": "ok", "node": NODE}


async def test_a_file_changed_since_the_scan_is_not_served(peer: Peer) -> None:
    weights = peer.root / "models/weights.bin"
    weights.write_bytes(b"X" + WEIGHTS[1:])
    answer = await peer.get("chunk", path="models/weights.bin", index=1)  # even an unchanged chunk: not a source
    assert answer.status_code == 409
    assert "changed since the scan" in answer.json()["detail"]
    await peer.scanner.scan("ds")
    fresh = await peer.get("chunk", path="models/weights.bin", index=0)
    assert fresh.status_code == 200
    assert fresh.content[:1] == b"X"


async def test_bytes_that_no_longer_verify_are_not_served(peer: Peer) -> None:
    weights = peer.root / "models/weights.bin"
    st = weights.stat()
    with weights.open("r+b") as stream:  # bit rot: content changes, size and mtime do not
        stream.seek(5000)
        stream.write(b"\xff")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (await peer.get("chunk", path="models/weights.bin", index=0)).status_code == 200
    rotten = await peer.get("chunk", path="models/weights.bin", index=1)
    assert rotten.status_code == 409
    assert "does not verify" in rotten.json()["detail"]


async def test_a_directory_swapped_for_a_symlink_after_the_scan_is_not_followed(peer: Peer) -> None:
    (peer.root / "models").rename(peer.root / "models.old")
    (peer.root / "models").symlink_to(peer.root / "models.old")
    answer = await peer.get("chunk", path="models/weights.bin", index=0)
    assert answer.status_code == 400
    assert "symlink" in answer.json()["detail"]


async def test_a_settling_dataset_serves_nothing(peer: Peer, tmp_path: Path) -> None:
    view = peer.scanner.view("ds")
    assert view is not None
    view.tree = None  # what a settling or failed scan leaves behind
    answer = await peer.get("tree")
    assert answer.status_code == 409
    assert "no verified tree" in answer.json()["detail"]
