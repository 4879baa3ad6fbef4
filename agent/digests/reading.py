"""Reading dataset files safely: path checks, opening beneath the root, chunked hashing.

``split_relpath`` refuses anything that is not a plain relative path
(absolute, ``..``, empty or ``.`` segments, NUL). ``open_beneath`` then walks
the path one segment at a time from the dataset root with ``O_NOFOLLOW``, so
a symlink anywhere on the way — planted before or swapped in during the
request — fails with ``ELOOP``/``ENOTDIR`` instead of leading outside the
root. Peers' requests and the scanner go through the same two functions.

``hash_open_file`` hashes one file in fixed-size chunks into a reused
buffer, honouring the throttle, and returns ``None`` when the file changed
while it was read (size or mtime moved, or fewer bytes than its size): such a
file is *settling*, and its dataset gets no digest this round.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass

from agent.digests.hashing import CHUNK_TAG, Algorithm, hash_file
from agent.digests.throttle import Throttle

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO planted in the dataset must not hang the reader (no effect on regular files).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
MAX_PATH = 4096


def split_relpath(path: str) -> tuple[str, ...]:
    """``a/b/c`` → ("a", "b", "c"); "" → () (the root). ``ValueError`` for anything else."""
    if len(path) > MAX_PATH or "\0" in path or "\\" in path:
        raise ValueError("path is too long or holds NUL or backslash")
    if path in ("", "/"):
        return ()
    if path.startswith("/"):
        raise ValueError("path must be relative to the dataset root")
    parts = tuple(path.rstrip("/").split("/"))
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError("path must not hold '..', '.' or empty segments")
    return parts


def open_beneath(root: str, parts: tuple[str, ...], *, directory: bool = False) -> int:
    """An fd for ``root/parts`` that never leaves ``root``: no symlink is followed on the way.

    Raises ``OSError``: ``ELOOP``/``ENOTDIR`` for a symlink on the path, ``ENOENT``, and ``EISDIR``
    or ``EINVAL`` when the target is not the kind asked for (a regular file unless ``directory``).
    """
    fd = os.open(root, _ROOT_FLAGS)  # the root itself is operator config: a symlink there is followed
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = _FILE_FLAGS if last and not directory else _DIR_FLAGS
            child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
        _require_kind(os.fstat(fd).st_mode, directory=directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_kind(mode: int, *, directory: bool) -> None:
    if directory and not stat.S_ISDIR(mode):
        raise OSError(errno.ENOTDIR, "not a directory")
    if not directory and not stat.S_ISREG(mode):
        raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL, "not a regular file")


@dataclass(frozen=True, slots=True)
class FileDigest:
    size: int
    mtime_ns: int
    inode: int
    chunks: tuple[bytes, ...]
    hash: bytes


def identity(st: os.stat_result) -> tuple[int, int, int]:
    """What says "unchanged" without reading: (size, mtime_ns, inode)."""
    return st.st_size, st.st_mtime_ns, st.st_ino


def hash_open_file(fd: int, *, alg: Algorithm, chunk_size: int, expected: tuple[int, int, int] | None,
                   throttle: Throttle, abort: threading.Event, buffer: bytearray) -> FileDigest | None:
    """Hash the open file ``fd`` chunk by chunk; None when it changed while read (or ``abort`` was set).

    ``expected`` is the identity the walk saw: a file replaced or modified between walk and open is
    settling too. ``buffer`` (at least ``chunk_size`` bytes) is reused across files.
    """
    before = os.fstat(fd)
    if expected is not None and identity(before) != expected:
        return None
    view = memoryview(buffer)
    size = before.st_size
    new_hasher = alg.new
    chunks: list[bytes] = []
    total = 0
    # Read exactly the size fstat gave: a file that shrinks ends early, one that grows moves size and
    # mtime, which the second fstat sees; no extra read at EOF (one syscall less per small file).
    while total < size:
        want = min(chunk_size, size - total)
        filled = 0
        while filled < want:
            got = os.readv(fd, [view[filled:want]])
            if not got:
                return None
            filled += got
        hasher = new_hasher(CHUNK_TAG)
        hasher.update(view[:filled])
        chunks.append(hasher.digest())
        total += filled
        if not throttle.consume(filled, abort):
            return None
    after = os.fstat(fd)
    if identity(after) != identity(before) or abort.is_set():
        return None
    return FileDigest(size=total, mtime_ns=before.st_mtime_ns, inode=before.st_ino, chunks=tuple(chunks),
                      hash=hash_file(alg, total, chunk_size, chunks))


def read_chunk(fd: int, index: int, chunk_size: int) -> bytes:
    """Chunk ``index`` of the open file (the last one may be short; past the end: empty)."""
    parts: list[bytes] = []
    offset, want = index * chunk_size, chunk_size
    while want > 0:
        data = os.pread(fd, want, offset)
        if not data:
            break
        parts.append(data)
        offset += len(data)
        want -= len(data)
    return b"".join(parts)
