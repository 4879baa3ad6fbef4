"""One scan of one dataset: walk it, hash what changed, assemble the Merkle tree.

``scan_dataset`` walks the dataset from an fd on its root, one directory fd
at a time and never through a symlink (a link is an entry of its own, hashed
over its target), so a tree swapped around during the walk cannot lead it
outside the root. Each regular file is either reused from the cache (same
size, mtime_ns and inode; see ``cache.Known.still_valid``) or read in chunks:
by the walking thread itself up to ``INLINE_MAX`` bytes
(``reading.hash_open_file``), else by the hashing pool (``pool.HashPool``)
while the walk goes on; directory nodes are hashed at the end, children
first, once every file is in. A deep scan reads everything and reports a
file whose content changed under an unchanged identity as *rot*. A resync's
temp files (``reading.is_resync_temp``) are not part of the tree.

The outcome is ``ok`` with a ``DatasetTree`` (root, every directory's
entries, every file's identity — what peers are served), ``settling`` when
a file changed while it was read or vanished during the walk, or ``error``
(unreadable root or file, undecodable name). Blocking from start to end: run
it in a thread (it joins the pool's threads before it returns). ``abort``
stops it between pieces of a chunk (the outcome is then ``settling``:
nothing was concluded).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from agent.digests.cache import DigestCache, Known, Row
from agent.digests.hashing import Algorithm, Entry, hash_directory, hash_link, render_digest
from agent.digests.pool import HASH_WORKERS, INLINE_MAX, FileJob, HashPool
from agent.digests.reading import FileDigest, hash_open_file, identity, is_resync_temp, new_buffer, open_beneath
from agent.digests.selection import Selection
from agent.digests.throttle import Throttle

MAX_DEPTH = 256
FLUSH_ROWS = 2000
"""Cache rows written in one transaction (while the pool hashes on)."""
_PLACEHOLDER = b"\0" * 32  # a settling file's hash: a settling scan publishes no root
ScanState = Literal["ok", "settling", "error"]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class FileRecord(NamedTuple):
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


class _Subdir:
    """A directory's entry until its hash is known (once every file below it is hashed)."""

    __slots__ = ("mode", "name", "path")

    def __init__(self, name: str, mode: int, path: str) -> None:
        self.name, self.mode, self.path = name, mode, path


class _Pending:
    """A large file's entry while the pool hashes it (or until it is handed over)."""

    __slots__ = ("job", "mode", "name", "st")

    def __init__(self, name: str, mode: int, st: os.stat_result, job: FileJob) -> None:
        self.name, self.mode, self.st, self.job = name, mode, st, job


_Slot = Entry | _Subdir | _Pending


@dataclass
class _Walk:
    root: str
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
    workers: int
    stats: ScanStats = field(default_factory=ScanStats)
    listings: list[tuple[str, list[_Slot]]] = field(default_factory=list)
    """Every directory's entries, children before parents: the order their hashes are computed in."""
    dirs: dict[str, tuple[Entry, ...]] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    buffer: bytearray = field(default_factory=bytearray)
    pool: HashPool | None = None
    later: deque[_Pending] = field(default_factory=deque)
    """Large files met while the pool had no room: opened again from the root when it has."""
    settling: bool = False

    def directory(self, fd: int, path: str, depth: int) -> list[_Slot]:
        if depth > MAX_DEPTH:
            raise _Unreadable(f"{path}: deeper than {MAX_DEPTH} directories")
        slots: list[_Slot] = []
        with os.scandir(fd) as listing:
            items = sorted(listing, key=lambda e: e.name)
        prefix = f"{path}/" if path else ""
        for item in items:
            if self.abort.is_set():
                raise _Settling("aborted")
            name = item.name
            rel = prefix + name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise _Unreadable(f"{rel!r}: file name is not valid UTF-8") from None
            if rel in self.skip or is_resync_temp(name):
                continue
            try:
                slot = self.entry(fd, item, rel, depth)
            except FileNotFoundError:
                self._changed(rel)
                continue
            if slot is not None:
                slots.append(slot)
            if self.later:
                self._hand_over_later()
        self.listings.append((path, slots))
        return slots

    def entry(self, fd: int, item: os.DirEntry[str], rel: str, depth: int) -> _Slot | None:
        st = item.stat(follow_symlinks=False)
        kind = st.st_mode
        if stat.S_ISREG(kind):
            if self.selection.filtered and not self.selection.wants_file(rel):
                return None
            return self.file(fd, item.name, rel, st)
        if stat.S_ISLNK(kind):
            if self.selection.filtered and not self.selection.wants_file(rel):
                return None
            target = os.fsencode(os.readlink(item.name, dir_fd=fd))
            return Entry(item.name, "link", stat.S_IMODE(kind), hash_link(self.alg, target), len(target))
        if stat.S_ISDIR(kind):
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
                self.listings.pop()  # its own listing, the last one added
                return None
            return _Subdir(item.name, stat.S_IMODE(kind), rel)
        self.stats.skipped += 1
        return None

    def file(self, fd: int, name: str, rel: str, st: os.stat_result) -> Entry | _Pending:
        size, mode = st.st_size, stat.S_IMODE(st.st_mode)
        seen = (size, st.st_mtime_ns, st.st_ino)
        cached = self.known.get(rel)
        if cached is not None and not self.deep and cached.still_valid(seen, self.alg.name, self.chunk_size):
            self.stats.files_reused += 1
            self.files[rel] = FileRecord(size, st.st_mtime_ns, st.st_ino, mode, cached.hash)
            return Entry(name, "file", mode, cached.hash, size)
        if size > INLINE_MAX and self.workers > 0:
            pending = _Pending(name, mode, st, FileJob(rel, seen))
            if self.later or not self._pool().has_room():
                self.later.append(pending)  # handed over once the pool has room: the walk goes on meanwhile
            else:
                self._hand_over(pending, self._open(name, fd, rel, _FILE_FLAGS))
            return pending
        child = self._open(name, fd, rel, _FILE_FLAGS)
        try:
            if not self.buffer:
                self.buffer = new_buffer(self.chunk_size)
            digest = hash_open_file(child, alg=self.alg, chunk_size=self.chunk_size, expected=seen,
                                    throttle=self.throttle, abort=self.abort, buffer=self.buffer)
        except OSError as exc:
            raise _Unreadable(f"{rel}: {exc.strerror}") from None
        finally:
            os.close(child)
        file_hash = self._record(rel, digest, self.wall_ns())
        self.files[rel] = FileRecord(size, st.st_mtime_ns, st.st_ino, mode, file_hash)
        return Entry(name, "file", mode, file_hash, size)

    def _pool(self) -> HashPool:
        if self.pool is None:
            self.pool = HashPool(workers=self.workers, alg=self.alg, chunk_size=self.chunk_size,
                                 throttle=self.throttle, abort=self.abort)
        return self.pool

    def _hand_over(self, pending: _Pending, child: int) -> None:
        """Give the open file ``child`` to the pool, unless it is no longer the file the walk saw."""
        job = pending.job
        try:
            opened = os.fstat(child)
        except OSError as exc:
            os.close(child)
            raise _Unreadable(f"{job.rel}: {exc.strerror}") from None
        if (opened.st_size, opened.st_mtime_ns, opened.st_ino) != job.seen or opened.st_dev != pending.st.st_dev:
            os.close(child)
            self._changed(job.rel)
            return  # never hashed: a settling scan publishes no root
        pool = self._pool()
        pool.add(job, child)
        if pool.done:
            self._collect()

    def _hand_over_later(self) -> None:
        """Hand over kept large files while the pool has room, each opened again beneath the root."""
        pool = self._pool()
        while self.later and pool.has_room():
            pending = self.later.popleft()
            rel = pending.job.rel
            try:
                child = open_beneath(self.root, tuple(rel.split("/")))
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EINVAL):
                    raise _Unreadable(f"{rel}: {exc.strerror}") from None
                self._changed(rel)  # gone, or something else stands on its path now
                continue
            self._hand_over(pending, child)
        if pool.done:
            self._collect()

    def _collect(self) -> None:
        """Record the files the pool has finished."""
        pool = self.pool
        if pool is None or not pool.done:
            return
        done, pool.done = pool.done, []
        for job in done:
            if job.error is not None:
                raise _Unreadable(f"{job.rel}: {job.error.strerror}")
            self._record(job.rel, job.digest, self.wall_ns())  # read by now, as for the walker's own files

    def _record(self, rel: str, digest: FileDigest | None, checked_ns: int) -> bytes:
        """Account a file just read and queue its cache row; its hash (a placeholder when it changed)."""
        if digest is None:
            if self.abort.is_set():
                raise _Settling("aborted")
            self._changed(rel)
            return _PLACEHOLDER
        self.stats.files_read += 1
        self.stats.bytes_read += digest.size
        if self.deep:
            cached = self.known.get(rel)
            if (cached is not None and cached.hash != digest.hash
                    and cached.still_valid(digest[:3], self.alg.name, self.chunk_size)):
                self.stats.rot.append(rel)
        chunks = digest.chunks
        self.rows.append(Row(rel, digest.size, digest.mtime_ns, digest.inode, self.alg.name, self.chunk_size,
                             digest.hash, chunks[0] if len(chunks) == 1 else b"".join(chunks), checked_ns))
        if len(self.rows) >= FLUSH_ROWS:
            self.flush()
        return digest.hash

    def finish(self) -> bytes:
        """Wait for the pool, then hash every directory, children first; returns the root's hash."""
        pool = self.pool
        while pool is not None and (self.later or pool.busy):
            if self.later:
                self._hand_over_later()
            if pool.busy:
                pool.wait_one()
            self._collect()
        sums: dict[str, tuple[bytes, int]] = {}
        root = b""
        for path, slots in self.listings:
            entries: list[Entry] = []
            for slot in slots:
                if isinstance(slot, Entry):
                    entries.append(slot)
                elif isinstance(slot, _Subdir):
                    entries.append(Entry(slot.name, "dir", slot.mode, *sums.pop(slot.path)))
                else:
                    st, digest = slot.st, slot.job.digest
                    file_hash = digest.hash if digest is not None else _PLACEHOLDER
                    self.files[slot.job.rel] = FileRecord(st.st_size, st.st_mtime_ns, st.st_ino, slot.mode,
                                                          file_hash)
                    entries.append(Entry(slot.name, "file", slot.mode, file_hash, st.st_size))
            listed = tuple(entries)
            self.dirs[path] = listed
            root = hash_directory(self.alg, listed)
            sums[path] = (root, sum(e.size for e in listed))
        return root

    def flush(self) -> None:
        if self.rows:
            self.cache.store(self.name, self.rows)
            self.rows = []

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

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
                 wall_ns: Callable[[], int] = time.time_ns, workers: int = HASH_WORKERS) -> ScanOutcome:
    """Scan ``root`` as dataset ``name`` (blocking); see the module docstring. ``skip``: relative paths
    left out (the dataset's own manifest). ``workers``: threads hashing large files (0: the calling
    thread hashes everything)."""
    walk = _Walk(root=root, name=name, alg=alg, chunk_size=chunk_size, selection=selection or Selection(), cache=cache,
                 known=cache.known(name), deep=deep, throttle=throttle or Throttle(0),
                 abort=abort or threading.Event(), wall_ns=wall_ns, skip=skip, workers=workers)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return ScanOutcome("error", None, f"cannot open the dataset root {root}: {exc.strerror}", walk.stats)
    root_hash = b""
    try:
        walk.directory(fd, "", 0)
        root_hash = walk.finish()
    except _Settling as exc:
        walk._changed(str(exc))
    except _Unreadable as exc:
        walk.flush()
        return ScanOutcome("error", None, str(exc), walk.stats)
    except OSError as exc:
        walk.flush()
        return ScanOutcome("error", None, f"{exc.filename or root}: {exc.strerror}", walk.stats)
    finally:
        walk.close()
        os.close(fd)
    walk.flush()
    if walk.settling:
        return ScanOutcome("settling", None, f"changed while being read: {walk.stats.changed}", walk.stats)
    cache.forget(name, walk.known.keys() - walk.files.keys())
    tree = DatasetTree(alg=alg.name, chunk_size=chunk_size, root=root_hash, dirs=walk.dirs,
                       files=walk.files, file_count=len(walk.files),
                       byte_count=sum(f.size for f in walk.files.values()))
    return ScanOutcome("ok", tree, "", walk.stats)
