"""One scan of one dataset: walk it, hash what changed, assemble the Merkle tree.

``scan_dataset`` walks the dataset from an fd on its root, one directory fd
at a time and never through a symlink (a link is an entry of its own, hashed
over its target), so a tree swapped around during the walk cannot lead it
outside the root. Each regular file is either reused from the cache (same
size, mtime_ns and inode; see ``cache.Known.still_valid``) or read in chunks
(``reading.hash_open_file``); a deep scan reads everything and reports a file
whose content changed under an unchanged identity as *rot*.

The outcome is ``ok`` with a ``DatasetTree`` (root, every directory's
entries, every file's identity — what peers are served), ``settling`` when
a file changed while it was read or vanished during the walk, or ``error``
(unreadable root or file, undecodable name). Blocking from start to end: run
it in a thread. ``abort`` stops it between chunks (the outcome is then
``settling``: nothing was concluded).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.digests.cache import DigestCache, Known, Row
from agent.digests.hashing import Algorithm, Entry, hash_directory, hash_link, render_digest
from agent.digests.reading import hash_open_file, identity
from agent.digests.selection import Selection
from agent.digests.throttle import Throttle

MAX_DEPTH = 256
ScanState = Literal["ok", "settling", "error"]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A file as the scan saw it: enough to serve its chunks and to notice it changed since."""

    size: int
    mtime_ns: int
    inode: int
    mode: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class DatasetTree:
    alg: str
    chunk_size: int
    root: bytes
    dirs: Mapping[str, tuple[Entry, ...]]
    """Directory path ("" for the root) → its entries, sorted by name."""
    files: Mapping[str, FileRecord]
    file_count: int
    byte_count: int

    @property
    def root_digest(self) -> str:
        return render_digest(self.alg, self.root)


@dataclass(slots=True)
class ScanStats:
    files_read: int = 0
    bytes_read: int = 0
    files_reused: int = 0
    skipped: int = 0
    """Entries that are neither file, directory nor symlink (sockets, FIFOs, devices)."""
    rot: list[str] = field(default_factory=list)
    """Deep scan: files whose content changed while size, mtime and inode did not (bit rot)."""
    changed: str = ""
    """The first path seen changing, when settling."""


@dataclass(frozen=True, slots=True)
class ScanOutcome:
    state: ScanState
    tree: DatasetTree | None
    error: str
    stats: ScanStats


class _Settling(Exception):  # internal control flow, never leaves this module
    pass


class _Unreadable(Exception):  # internal control flow, never leaves this module
    pass


@dataclass
class _Walk:
    name: str
    alg: Algorithm
    chunk_size: int
    selection: Selection
    cache: DigestCache
    known: dict[str, Known]
    deep: bool
    throttle: Throttle
    abort: threading.Event
    wall_ns: Callable[[], int]
    skip: frozenset[str]
    stats: ScanStats = field(default_factory=ScanStats)
    dirs: dict[str, tuple[Entry, ...]] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    pending: list[Row] = field(default_factory=list)
    buffer: bytearray = field(default_factory=bytearray)
    settling: bool = False

    def directory(self, fd: int, path: str, depth: int) -> tuple[Entry, ...]:
        if depth > MAX_DEPTH:
            raise _Unreadable(f"{path}: deeper than {MAX_DEPTH} directories")
        entries: list[Entry] = []
        with os.scandir(fd) as listing:
            items = sorted(listing, key=lambda e: e.name)
        for item in items:
            if self.abort.is_set():
                raise _Settling("aborted")
            rel = f"{path}/{item.name}" if path else item.name
            try:
                item.name.encode("utf-8")
            except UnicodeEncodeError:
                raise _Unreadable(f"{rel!r}: file name is not valid UTF-8") from None
            if rel in self.skip:
                continue
            try:
                entry = self.entry(fd, item, rel, depth)
            except FileNotFoundError:
                self._changed(rel)
                continue
            if entry is not None:
                entries.append(entry)
        listed = tuple(entries)
        self.dirs[path] = listed
        return listed

    def entry(self, fd: int, item: os.DirEntry[str], rel: str, depth: int) -> Entry | None:
        st = item.stat(follow_symlinks=False)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            if not self.selection.wants_file(rel):
                return None
            target = os.fsencode(os.readlink(item.name, dir_fd=fd))
            return Entry(item.name, "link", mode, hash_link(self.alg, target), len(target))
        if stat.S_ISDIR(st.st_mode):
            if not self.selection.enters_dir(rel):
                return None
            child = self._open(item.name, fd, rel, _DIR_FLAGS)
            try:
                if identity(os.fstat(child)) != identity(st):
                    self._changed(rel)
                children = self.directory(child, rel, depth + 1)
            finally:
                os.close(child)
            if not children and self.selection.filters:
                del self.dirs[rel]
                return None
            return Entry(item.name, "dir", mode, hash_directory(self.alg, children), sum(c.size for c in children))
        if stat.S_ISREG(st.st_mode):
            if not self.selection.wants_file(rel):
                return None
            digest = self.file(fd, item.name, rel, st)
            self.files[rel] = FileRecord(st.st_size, st.st_mtime_ns, st.st_ino, mode, digest)
            return Entry(item.name, "file", mode, digest, st.st_size)
        self.stats.skipped += 1
        return None

    def file(self, fd: int, name: str, rel: str, st: os.stat_result) -> bytes:
        seen = identity(st)
        cached = self.known.get(rel)
        valid = cached is not None and cached.still_valid(seen, self.alg.name, self.chunk_size)
        if valid and not self.deep:
            self.stats.files_reused += 1
            return cached.hash  # type: ignore[union-attr]
        child = self._open(name, fd, rel, _FILE_FLAGS)
        try:
            if len(self.buffer) < self.chunk_size:
                self.buffer = bytearray(self.chunk_size)
            digest = hash_open_file(child, alg=self.alg, chunk_size=self.chunk_size, expected=seen,
                                    throttle=self.throttle, abort=self.abort, buffer=self.buffer)
        except OSError as exc:
            raise _Unreadable(f"{rel}: {exc.strerror}") from None
        finally:
            os.close(child)
        if digest is None:
            if self.abort.is_set():
                raise _Settling("aborted")
            self._changed(rel)
            return b"\0" * 32  # placeholder: a settling scan publishes no root
        self.stats.files_read += 1
        self.stats.bytes_read += digest.size
        if valid and cached is not None and cached.hash != digest.hash:
            self.stats.rot.append(rel)
        self.pending.append(Row(rel, digest.size, digest.mtime_ns, digest.inode, self.alg.name, self.chunk_size,
                                digest.hash, b"".join(digest.chunks), self.wall_ns()))
        if len(self.pending) >= 500:
            self.flush()
        return digest.hash

    def flush(self) -> None:
        if self.pending:
            self.cache.store(self.name, self.pending)
            self.pending = []

    def _open(self, name: str, fd: int, rel: str, flags: int) -> int:
        try:
            return os.open(name, flags, dir_fd=fd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
                raise _Settling(rel) from None  # replaced by another kind of entry since it was listed
            raise _Unreadable(f"{rel}: {exc.strerror}") from None

    def _changed(self, rel: str) -> None:
        self.settling = True
        if not self.stats.changed:
            self.stats.changed = rel


def scan_dataset(root: str, *, name: str, cache: DigestCache, alg: Algorithm, chunk_size: int,
                 selection: Selection | None = None, deep: bool = False, throttle: Throttle | None = None,
                 abort: threading.Event | None = None, skip: frozenset[str] = frozenset(),
                 wall_ns: Callable[[], int] = time.time_ns) -> ScanOutcome:
    """Scan ``root`` as dataset ``name`` (blocking); see the module docstring. ``skip``: relative paths
    left out (the dataset's own manifest)."""
    walk = _Walk(name=name, alg=alg, chunk_size=chunk_size, selection=selection or Selection(), cache=cache,
                 known=cache.known(name), deep=deep, throttle=throttle or Throttle(0),
                 abort=abort or threading.Event(), wall_ns=wall_ns, skip=skip)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return ScanOutcome("error", None, f"cannot open the dataset root {root}: {exc.strerror}", walk.stats)
    try:
        entries = walk.directory(fd, "", 0)
    except _Settling as exc:
        walk._changed(str(exc))
        entries = ()
    except _Unreadable as exc:
        walk.flush()
        return ScanOutcome("error", None, str(exc), walk.stats)
    except OSError as exc:
        walk.flush()
        return ScanOutcome("error", None, f"{exc.filename or root}: {exc.strerror}", walk.stats)
    finally:
        os.close(fd)
    walk.flush()
    if walk.settling:
        return ScanOutcome("settling", None, f"changed while being read: {walk.stats.changed}", walk.stats)
    cache.forget(name, walk.known.keys() - walk.files.keys())
    tree = DatasetTree(alg=alg.name, chunk_size=chunk_size, root=hash_directory(alg, entries), dirs=walk.dirs,
                       files=walk.files, file_count=len(walk.files),
                       byte_count=sum(f.size for f in walk.files.values()))
    return ScanOutcome("ok", tree, "", walk.stats)
