"""Peers' dataset listings checked against the Merkle tree before anything uses them.

A replica's root comes from its node's (authenticated) digest message; the
listings the controller fetches over HTTP to localise a difference come from
whoever answers at the node's address. So a listing is only believed when it
hashes to what the controller already trusts: the root directory's listing
to the digest's root, every sub-directory's listing to the hash its verified
parent lists for it, and a file's chunk list (with its size and the
dataset's chunk size) to the file hash its verified directory lists. A peer
that lies about one entry therefore has to find a second preimage of the
hash. Directory entry sizes are not part of the tree's hashes: they are
evidence for people, never used to decide what to write.

The encodings are those of ``agent.digests.hashing`` (which the agent's
digester uses; the controller may not import the agent), repeated here and
checked against it by ``tests/unit/test_listing_verification.py``::

    file       H("file\\0"  || size:u64 || chunk_size:u32 || chunk hash || ...)
    directory  H("tree\\0"  || count:u32 || entry || ...), sorted by name, each
               name (UTF-8) || "\\0" || type ("f" | "d" | "l") || mode:u32 || child hash

Pure: parsed JSON bodies in, typed entries out, ``ListingRejected`` (with
the reason) for anything that does not verify.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from detectors.digests import TreeEntry

try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is a dependency; SHA-256 trees verify without it
    _blake3 = None  # type: ignore[assignment]

_TAGS = {"file": b"f", "dir": b"d", "link": b"l"}
_DIGEST_HEX = 64
MAX_NAME = 4096


class ListingRejected(Exception):
    """A peer's listing that does not verify against the hash the controller expected for it."""


@dataclass(frozen=True, slots=True)
class FileListing:
    """A verified file: its size and its chunk hashes (``alg:hex``, in order)."""

    size: int
    chunks: tuple[str, ...]


def _hasher(alg: str) -> Callable[[bytes], Any]:
    if alg == "sha256":
        return hashlib.sha256
    if alg == "blake3" and _blake3 is not None:
        return _blake3.blake3
    raise ListingRejected(f"cannot verify {alg!r} listings here (install the blake3 package)")


def _digest(text: object, *, alg: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise ListingRejected(f"{what}: a hash must be a string")
    name, sep, hexpart = text.partition(":")
    if not sep or name != alg or len(hexpart) != _DIGEST_HEX:
        raise ListingRejected(f"{what}: {text[:80]!r} is not an {alg} digest")
    try:
        return bytes.fromhex(hexpart)
    except ValueError:
        raise ListingRejected(f"{what}: {text[:80]!r} is not hex") from None


def _u32(value: object, *, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise ListingRejected(f"{what}: not an unsigned 32-bit number")
    return value


def verify_tree_listing(body: Any, *, expected: str, path: str) -> list[TreeEntry]:
    """The entries of directory ``path`` once they hash to ``expected`` (``alg:hex``); else ``ListingRejected``."""
    alg = expected.partition(":")[0]
    want = _digest(expected, alg=alg, what=f"the expected hash of {path or '/'}")
    raw = body.get("entries") if isinstance(body, dict) else None
    if not isinstance(raw, list):
        raise ListingRejected(f"the listing of {path or '/'} has no entries list")
    entries: list[tuple[str, TreeEntry, bytes]] = []
    for item in raw:
        if not isinstance(item, dict):
            raise ListingRejected(f"the listing of {path or '/'} holds a non-object entry")
        name, kind = item.get("name"), item.get("type")
        if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name
                or len(name) > MAX_NAME):
            raise ListingRejected(f"the listing of {path or '/'} holds an entry name that is not plain: "
                                  f"{str(name)[:80]!r}")
        if kind not in _TAGS:
            raise ListingRejected(f"{path}/{name}: unknown entry type {str(kind)[:20]!r}")
        mode = _u32(item.get("mode"), what=f"{path}/{name} mode")
        digest = _digest(item.get("hash"), alg=alg, what=f"{path}/{name}")
        size = item.get("size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ListingRejected(f"{path}/{name}: size is not a count of bytes")
        entries.append((name, TreeEntry(name, kind, mode, f"{alg}:{digest.hex()}", size), digest))
    entries.sort(key=lambda e: e[0])
    if any(a[0] == b[0] for a, b in itertools.pairwise(entries)):
        raise ListingRejected(f"the listing of {path or '/'} names an entry twice")
    hasher = _hasher(alg)(b"tree\0" + struct.pack(">I", len(entries)))
    for name, entry, digest in entries:
        hasher.update(name.encode("utf-8") + b"\0" + _TAGS[entry.type] + struct.pack(">I", entry.mode) + digest)
    if hasher.digest() != want:
        raise ListingRejected(f"the listing of {path or '/'} does not hash to {expected}: a peer lied or "
                              "serves another tree")
    return [entry for _, entry, _ in entries]


def verify_file_listing(body: Any, *, expected: str, chunk_size: int, path: str) -> FileListing:
    """A file's size and chunk hashes once they hash to ``expected`` with ``chunk_size``; else ``ListingRejected``."""
    alg = expected.partition(":")[0]
    want = _digest(expected, alg=alg, what=f"the expected hash of {path}")
    if not isinstance(body, dict):
        raise ListingRejected(f"the chunk list of {path} is not an object")
    size, served_chunk_size, raw = body.get("size"), body.get("chunk_size"), body.get("chunks")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**64:
        raise ListingRejected(f"{path}: size is not a count of bytes")
    if served_chunk_size != chunk_size:
        raise ListingRejected(f"{path}: listed with chunk size {str(served_chunk_size)[:20]}, not the dataset's "
                              f"{chunk_size}")
    if not isinstance(raw, list) or len(raw) != math.ceil(size / chunk_size):
        raise ListingRejected(f"{path}: the chunk list does not describe {size} bytes in chunks of {chunk_size}")
    chunks: Sequence[bytes] = [_digest(c, alg=alg, what=f"{path} chunk {n}") for n, c in enumerate(raw)]
    head = b"file\0" + struct.pack(">QI", size, chunk_size)
    if _hasher(alg)(head + b"".join(chunks)).digest() != want:
        raise ListingRejected(f"the chunk list of {path} does not hash to {expected}: a peer lied or serves "
                              "another file")
    return FileListing(size, tuple(f"{alg}:{c.hex()}" for c in chunks))
