"""Peers' listings are believed only when they hash to what the controller trusts (``detectors.listings``).

The encodings are repeated from ``agent.digests.hashing`` (the controller may not import the agent); these
tests pin them to it, for both algorithms.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from agent.digests.hashing import BLAKE3, SHA256, Algorithm, Entry, hash_chunk, hash_directory, hash_file, render_digest
from detectors.listings import FileListing, ListingRejected, verify_file_listing, verify_tree_listing

CHUNK = 4096
ALGS = [a for a in (BLAKE3, SHA256) if a is not None]


def listing(alg: Algorithm) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A directory (as the peer API lists it), its hash, and the chunk list of its file ``w.bin``."""
    data = bytes(i * 7 % 251 for i in range(10240))  # three different chunks
    chunks = [hash_chunk(alg, data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]
    file_hash = hash_file(alg, len(data), CHUNK, chunks)
    entries = [Entry("w.bin", "file", 0o644, file_hash, len(data)),
               Entry("sub", "dir", 0o2755, hash_chunk(alg, b"x"), 7),
               Entry("ln", "link", 0o777, hash_chunk(alg, b"y"), 3),
               Entry("é.txt", "file", 0o600, hash_chunk(alg, b""), 0)]
    body = {"root": "r", "path": "", "entries": [
        {"name": e.name, "type": e.type, "mode": e.mode, "hash": render_digest(alg, e.hash), "size": e.size}
        for e in entries]}
    file_body = {"size": len(data), "chunk_size": CHUNK, "mode": 0o644, "hash": render_digest(alg, file_hash),
                 "chunks": [render_digest(alg, c) for c in chunks]}
    return render_digest(alg, hash_directory(alg, entries)), body, file_body


@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_an_honest_listing_verifies_with_the_agents_encoding(alg: Algorithm) -> None:
    expected, body, file_body = listing(alg)
    entries = verify_tree_listing(body, expected=expected, path="")
    assert [(e.name, e.type, e.mode) for e in entries] == [("ln", "link", 0o777), ("sub", "dir", 0o2755),
                                                           ("w.bin", "file", 0o644), ("é.txt", "file", 0o600)]
    w = next(e for e in entries if e.name == "w.bin")
    verified = verify_file_listing(file_body, expected=w.hash, chunk_size=CHUNK, path="w.bin")
    assert verified == FileListing(10240, tuple(file_body["chunks"]))


def _tampered(body: dict[str, Any], change: str) -> dict[str, Any]:
    out = copy.deepcopy(body)
    entries = out["entries"]
    if change == "hash":
        entries[0]["hash"] = entries[1]["hash"]
    elif change == "mode":
        entries[0]["mode"] = 0o6755
    elif change == "extra":
        entries.append(dict(entries[0], name="evil"))
    elif change == "missing":
        entries.pop()
    elif change == "type":
        entries[0]["type"] = "dir"
    elif change == "rename":
        entries[0]["name"] = "other.bin"
    elif change == "duplicate":
        entries.append(dict(entries[0]))
    elif change == "traversal":
        entries[0]["name"] = ".."
    elif change == "slash":
        entries[0]["name"] = "a/b"
    elif change == "bad-hash":
        entries[0]["hash"] = "md5:00"
    elif change == "other-alg":
        entries[0]["hash"] = ("sha256:" if entries[0]["hash"].startswith("blake3") else "blake3:") + "0" * 64
    elif change == "no-entries":
        del out["entries"]
    return out


@pytest.mark.parametrize("change", ["hash", "mode", "extra", "missing", "type", "rename", "duplicate", "traversal",
                                    "slash", "bad-hash", "other-alg", "no-entries"])
@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_a_tampered_listing_is_rejected(alg: Algorithm, change: str) -> None:
    expected, body, _ = listing(alg)
    with pytest.raises(ListingRejected):
        verify_tree_listing(_tampered(body, change), expected=expected, path="")


def test_sizes_in_a_tree_listing_are_not_covered_and_not_trusted() -> None:
    expected, body, _ = listing(ALGS[0])
    body["entries"][0]["size"] = 999  # evidence only: verify accepts it, nothing writes from it
    assert verify_tree_listing(body, expected=expected, path="")


@pytest.mark.parametrize("change", ["chunk", "size", "chunk_size", "fewer", "more", "order"])
@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_a_tampered_chunk_list_is_rejected(alg: Algorithm, change: str) -> None:
    expected, body, file_body = listing(alg)
    w = next(e for e in verify_tree_listing(body, expected=expected, path="") if e.name == "w.bin")
    bad = copy.deepcopy(file_body)
    chunks = bad["chunks"]
    if change == "chunk":
        chunks[1] = render_digest(alg, hash_chunk(alg, b"attacker bytes"))
    elif change == "size":
        bad["size"] = 10241
    elif change == "chunk_size":
        bad["chunk_size"] = 2048
    elif change == "fewer":
        chunks.pop()
    elif change == "more":
        chunks.append(chunks[0])
    elif change == "order":
        chunks[0], chunks[1] = chunks[1], chunks[0]
    with pytest.raises(ListingRejected):
        verify_file_listing(bad, expected=w.hash, chunk_size=CHUNK, path="w.bin")


def test_a_chunk_list_for_another_chunk_size_than_the_datasets_is_rejected() -> None:
    expected, body, file_body = listing(ALGS[0])
    w = next(e for e in verify_tree_listing(body, expected=expected, path="") if e.name == "w.bin")
    with pytest.raises(ListingRejected, match="chunk size"):
        verify_file_listing(file_body, expected=w.hash, chunk_size=2 * CHUNK, path="w.bin")
