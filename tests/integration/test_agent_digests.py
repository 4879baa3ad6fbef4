"""A real agent against a real Mosquitto: retained dataset digests, a flipped byte, its HTTP for peers."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from agent.digests.cache import DigestCache
from agent.digests.hashing import DEFAULT
from agent.digests.trees import scan_dataset
from selfheal import wire
from selfheal.config import AgentConfig, Config, DatasetConfig, MqttConfig, SecurityConfig
from selfheal.keys import read_key, write_key
from selfheal.transfer_tokens import PULLER_HEADER, sign_transfer_token
from tests.conftest import Broker, eventually
from tests.integration.test_agent_mqtt import Observer, running_agent, unique_node

pytestmark = pytest.mark.integration

CHUNK = 4096


def digests(observer: Observer, node: str) -> list[tuple[wire.DatasetDigest, bool]]:
    topic = wire.node_topic(node, "digests")
    return [(m, retained) for t, p, retained in observer.messages if t == topic and p
            for m in [wire.decode_node_message(t, p)] if isinstance(m, wire.DatasetDigest)]


def latest(observer: Observer, node: str) -> wire.DatasetSummary | None:
    seen = digests(observer, node)
    return seen[-1][0].datasets[0] if seen and seen[-1][0].datasets else None


async def test_the_agent_publishes_digests_notices_a_flipped_byte_and_serves_peers(
        mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("dig")
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    for i in range(3):
        (data / "shards" / f"part-{i}.bin").write_bytes(bytes([i]) * (CHUNK * 2 + 100))
    (data / "README").write_bytes(b"a small dataset\n")
    write_key(tmp_path / "keys", node)
    key = read_key(tmp_path / "keys", node)
    assert key is not None
    config = Config(
        mqtt=MqttConfig(url=mosquitto.url, keepalive=5.0, reconnect_max=0.5),
        agent=AgentConfig(node_id=node, interval=0.5, state_dir=str(tmp_path / "state"), listen="127.0.0.1:0",
                          datasets=[DatasetConfig(name="train", path=str(data), chunk_size=CHUNK,
                                                  scan_interval=0.2)]),
        security=SecurityConfig(key_dir=str(tmp_path / "keys")),
    )
    with DigestCache(tmp_path / "independent.sqlite3").open() as cache:
        expected = scan_dataset(str(data), name="train", cache=cache, alg=DEFAULT, chunk_size=CHUNK)
    assert expected.tree is not None

    async with Observer(mosquitto, [f"{wire.PREFIX}/p/+/nodes/{node}/+"]) as obs, running_agent(config) as app:
        await eventually(lambda: (s := latest(obs, node)) is not None and s.state == "ok", what="a digest")
        first = latest(obs, node)
        assert first is not None
        assert first.root == expected.tree.root_digest
        assert (first.files, first.bytes, first.generation, first.chunk_size) == (
            4, 3 * (2 * CHUNK + 100) + 16, 1, CHUNK)
        assert first.manifest_root is None

        # A late subscriber gets the digest from the broker: it is retained.
        async with Observer(mosquitto, [wire.node_topic(node, "digests")]) as late:
            await eventually(lambda: bool(digests(late, node)), what="the retained digest")
            assert digests(late, node)[0][1] is True

        victim = data / "shards" / "part-1.bin"
        content = bytearray(victim.read_bytes())
        content[CHUNK + 7] ^= 0x01
        victim.write_bytes(bytes(content))
        await eventually(lambda: (s := latest(obs, node)) is not None and s.state == "ok" and s.root != first.root,
                         what="a new root after the flipped byte")
        flipped = latest(obs, node)
        assert flipped is not None
        assert flipped.generation == 2
        assert (flipped.files, flipped.bytes) == (first.files, first.bytes)

        # The status announces the HTTP address peers use.
        birth = next(s for s, _ in obs.statuses(node) if s.state == "online")
        assert birth.http == app.http_address
        host, _, port = birth.http.rpartition(":")
        assert host == "127.0.0.1"
        assert int(port) > 0

        token = sign_transfer_token(key, node=node, puller="controller", dataset="train", paths=(),
                                    expires_at=time.time() + 30)
        auth = {"Authorization": f"Bearer {token}", PULLER_HEADER: "controller"}
        files = sign_transfer_token(key, node=node, puller="node-z", dataset="train", paths=["shards/part-1.bin"],
                                    expires_at=time.time() + 30)
        file_auth = {"Authorization": f"Bearer {files}", PULLER_HEADER: "node-z"}
        async with httpx.AsyncClient(base_url=f"http://{birth.http}", timeout=5) as client:
            await eventually(lambda: app.digests.view("train").tree is not None  # type: ignore[union-attr]
                             and app.digests.view("train").tree.root_digest == flipped.root,  # type: ignore[union-attr]
                             what="the served tree to be the published one")
            tree = await client.get("/datasets/train/tree", params={"path": "shards"}, headers=auth)
            assert tree.status_code == 200, tree.text
            assert tree.json()["root"] == flipped.root
            assert [e["name"] for e in tree.json()["entries"]] == ["part-0.bin", "part-1.bin", "part-2.bin"]
            listing = await client.get("/datasets/train/file", params={"path": "shards/part-1.bin"}, headers=auth)
            assert listing.status_code == 200
            assert len(listing.json()["chunks"]) == 3
            opened = await client.post("/datasets/train/transfers", json={"paths": ["shards/part-1.bin"]},
                                       headers=file_auth)
            assert opened.status_code == 201, opened.text
            chunk = await client.get("/datasets/train/chunk", params={"path": "shards/part-1.bin", "index": 1},
                                     headers=file_auth)
            assert chunk.status_code == 200
            assert chunk.content == bytes(content[CHUNK:2 * CHUNK])
            for endpoint, params in (("tree", {}), ("file", {"path": "README"}),
                                     ("chunk", {"path": "README", "index": "0"})):
                refused = await client.get(f"/datasets/train/{endpoint}", params=params)
                assert refused.status_code == 401
            escape = await client.get("/datasets/train/tree", params={"path": "../.."}, headers=auth)
            assert escape.status_code == 400
            # the agent's own figures, on the peer API too: the refusals above counted by reason
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            assert 'selfheal_agent_peer_refused_total{reason="token"} 3.0' in metrics.text
            assert "selfheal_agent_asyncio_tasks " in metrics.text
