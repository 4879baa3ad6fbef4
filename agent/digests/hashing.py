"""The Merkle node encodings and the hash algorithm: what a dataset digest *is*.

Every node is hashed over a type tag, so a chunk can never pass for a file
node or a directory listing (the second-preimage trap of untagged Merkle
trees)::

    chunk      H("chunk\\0" || data)
    file       H("file\\0"  || size:u64 || chunk_size:u32 || chunk hash || chunk hash || ...)
    symlink    H("link\\0"  || target bytes)            -- links are recorded, never followed
    directory  H("tree\\0"  || count:u32 || entry || entry || ...), entries sorted by name, each
               name (UTF-8) || "\\0" || type ("f" | "d" | "l") || mode:u32 || child hash

As in Git, a file's mode lives in its directory's entry, not in the file
node, so a mode change alters the directory (and the root) while the file's
own hash and chunks stay the same. A digest string carries its algorithm:
``blake3:<64 hex>`` or ``sha256:<64 hex>``; BLAKE3 is used when the
``blake3`` package imports, SHA-256 otherwise. Replicas hashed with different
algorithms or chunk sizes never match, by construction.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - the fallback is exercised by forcing SHA256 in tests
    _blake3 = None  # type: ignore[assignment]

EntryType = Literal["file", "dir", "link"]
_TYPE_TAGS: dict[str, bytes] = {"file": b"f", "dir": b"d", "link": b"l"}
DIGEST_SIZE = 32


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


class Algorithm(Protocol):
    @property
    def name(self) -> str: ...

    def new(self, prefix: bytes | bytearray | memoryview) -> Hasher:
        """A fresh hasher already fed ``prefix``.

        Hashing a whole input given here is faster than feeding it to ``update`` afterwards: BLAKE3
        then hashes it as one tree of full-width subtrees (~30% faster on 64 KiB).
        """
        ...


def _no_blake3(prefix: bytes | bytearray | memoryview) -> Hasher:  # pragma: no cover - never chosen then
    raise RuntimeError("the blake3 package is not installed")


@dataclass(frozen=True, slots=True)
class Blake3:
    name: str = "blake3"
    # ``new`` is the C constructor itself, not a method around it: no Python frame per hash (a scan makes
    # two per small file). Its default ``max_threads`` is 1: every hash is single-threaded; a scan's
    # parallelism is across files and spans (``pool.py``), never inside one hash.
    new = staticmethod(_blake3.blake3 if _blake3 is not None else _no_blake3)


@dataclass(frozen=True, slots=True)
class Sha256:
    name: str = "sha256"
    new = staticmethod(hashlib.sha256)


BLAKE3: Algorithm | None = Blake3() if _blake3 is not None else None
SHA256: Algorithm = Sha256()
DEFAULT: Algorithm = BLAKE3 or SHA256
"""BLAKE3 where the package imports, else SHA-256."""

CHUNK_TAG = b"chunk\0"
_FILE_HEAD = struct.Struct(">QI").pack


class Entry(NamedTuple):
    """One entry of a directory node, as listed to peers."""

    name: str
    type: EntryType
    mode: int
    """Permission bits (``stat.S_IMODE``)."""
    hash: bytes
    size: int
    """Bytes: the file's size, the link target's length, or the sum of the files below a directory."""


def hash_chunk(alg: Algorithm, data: bytes | bytearray | memoryview) -> bytes:
    hasher = alg.new(CHUNK_TAG)
    hasher.update(data)
    return hasher.digest()


def hash_file(alg: Algorithm, size: int, chunk_size: int, chunks: Iterable[bytes]) -> bytes:
    return alg.new(b"file\0" + _FILE_HEAD(size, chunk_size) + b"".join(chunks)).digest()


def hash_link(alg: Algorithm, target: bytes) -> bytes:
    hasher = alg.new(b"link\0")
    hasher.update(target)
    return hasher.digest()


def hash_directory(alg: Algorithm, entries: Iterable[Entry]) -> bytes:
    """The directory node over ``entries`` (sorted here by name, so callers need not)."""
    ordered = sorted(entries, key=lambda e: e.name)
    hasher = alg.new(b"tree\0" + struct.pack(">I", len(ordered)))
    for entry in ordered:
        hasher.update(entry.name.encode("utf-8") + b"\0" + _TYPE_TAGS[entry.type]
                      + struct.pack(">I", entry.mode) + entry.hash)
    return hasher.digest()


def render_digest(alg: Algorithm | str, raw: bytes) -> str:
    """``blake3:<hex>``: the form digests take on the wire, in HTTP answers and in manifests."""
    name = alg if isinstance(alg, str) else alg.name
    return f"{name}:{raw.hex()}"


def parse_digest(text: str) -> tuple[str, bytes]:
    """``alg:hex`` back to (alg, raw); ``ValueError`` when it is not one."""
    name, sep, hexpart = text.strip().partition(":")
    if not sep or name not in ("blake3", "sha256") or len(hexpart) != 2 * DIGEST_SIZE:
        raise ValueError(f"not a digest (blake3:<64 hex> or sha256:<64 hex>): {text[:80]!r}")
    return name, bytes.fromhex(hexpart)


def algorithm_named(name: str) -> Algorithm:
    """The algorithm of a digest string's prefix; ``ValueError`` when it is not available here."""
    if name == "sha256":
        return SHA256
    if name == "blake3" and BLAKE3 is not None:
        return BLAKE3
    raise ValueError(f"hash algorithm {name!r} is not available (install the blake3 package)")
