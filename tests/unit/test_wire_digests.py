"""``DatasetDigest`` on the ``digests`` channel: round trip, and the same edge checks as every message."""

from __future__ import annotations

import json

import pytest

from selfheal import wire
from selfheal.errors import MalformedMessage, SpoofedMessage

NODE = "node-a"
ROOT = "blake3:" + "ab" * 32


def digest(**changes: object) -> wire.DatasetDigest:
    fields: dict[str, object] = {
        "node": NODE, "session": 3, "ts": 1000.0, "datasets": [
            wire.DatasetSummary(name="model", root=ROOT, files=12, bytes=4096, generation=2, state="ok",
                                scanned_at=999.0, deep_scanned_at=900.0, chunk_size=4 << 20, manifest_root=ROOT),
            wire.DatasetSummary(name="features", state="settling", error="changed while being read: a/b",
                                files=3, bytes=10, generation=5, scanned_at=999.5, chunk_size=4 << 20),
        ]}
    fields.update(changes)
    return wire.DatasetDigest(**fields)  # type: ignore[arg-type]


def test_a_dataset_digest_round_trips_on_the_digests_channel() -> None:
    message = digest()
    topic = wire.node_topic(NODE, "digests")
    assert wire.decode_node_message(topic, wire.encode(message)) == message
    body = json.loads(wire.encode(message))
    assert body["v"] == 1
    assert body["datasets"][0] == {
        "name": "model", "root": ROOT, "files": 12, "bytes": 4096, "generation": 2, "state": "ok", "error": "",
        "scanned_at": 999.0, "deep_scanned_at": 900.0, "chunk_size": 4 << 20, "manifest_root": ROOT}
    assert body["datasets"][1]["manifest_root"] is None


def test_a_digest_from_another_node_is_spoofed() -> None:
    with pytest.raises(SpoofedMessage):
        wire.decode_node_message(wire.node_topic("node-b", "digests"), wire.encode(digest()))


@pytest.mark.parametrize("payload", [
    b'{"v": 1, "node": "node-a", "session": 1, "datasets": [{"name": "m", "state": "fine"}]}',
    b'{"v": 1, "node": "node-a", "session": 1, "datasets": [{"name": "m"}]}',
    b'{"v": 2, "node": "node-a", "session": 1}',
    b'{"v": 1, "node": "node-a", "datasets": []}',
])
def test_bad_digests_are_malformed(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        wire.decode_node_message(wire.node_topic(NODE, "digests"), payload)
