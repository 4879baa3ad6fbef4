"""Reading dataset files safely: path checks, opening beneath the root, chunked hashing.

``split_relpath`` refuses anything that is not a plain relative path
(absolute, ``..``, empty or ``.`` segments, NUL). ``open_beneath`` then walks
the path one segment at a time from the dataset root with ``O_NOFOLLOW``, so
a symlink anywhere on the way — planted before or swapped in during the
request — fails with ``ELOOP``/``ENOTDIR`` instead of leading outside the
root. Peers' requests and the scanner go through the same two functions.

``hash_span`` hashes a run of chunks of an open file into a reused buffer,
honouring the throttle (the scan's worker threads each hash a span of a large
file); ``hash_open_file`` hashes one whole file and returns ``None`` when it
changed while it was read (size or mtime moved, or fewer bytes than its
size): such a file is *settling*, and its dataset gets no digest this round.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import NamedTuple

from agent.digests.hashing import CHUNK_TAG, Algorithm, hash_file
from agent.digests.throttle import Throttle

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO planted in the dataset must not hang the reader (no effect on regular files).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
MAX_PATH = 4096
RESYNC_TEMP_SUFFIX = ".selfheal-resync.tmp"
"""A file being rebuilt by a resync is ``.<name>.selfheal-resync.tmp`` beside ``<name>``: never digested."""


def is_resync_temp(name: str) -> bool:
    """Whether ``name`` is a resync's temp file (left out of digests, so it is never taken for data)."""
    return name.endswith(RESYNC_TEMP_SUFFIX) and name.startswith(".")


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


class FileDigest(NamedTuple):
    """One file as read: its identity then (first three fields, as ``identity`` gives them), its hashes."""

    size: int
    mtime_ns: int
    inode: int
    chunks: tuple[bytes, ...]
    hash: bytes


def identity(st: os.stat_result) -> tuple[int, int, int]:
    """What says "unchanged" without reading: (size, mtime_ns, inode)."""
    return st.st_size, st.st_mtime_ns, st.st_ino


PIECE = 1024 * 1024
"""Bytes read at a time: a chunk larger than this is read and hashed piece by piece, so a reader's
buffer stays small (and in the CPU cache) whatever the chunk size."""
_TAG = len(CHUNK_TAG)


def new_buffer(chunk_size: int) -> bytearray:
    """A read buffer for ``hash_span``: room for the chunk tag and one piece (or one whole smaller chunk)."""
    return bytearray(_TAG + min(max(chunk_size, 1), PIECE))


def hash_span(fd: int, offset: int, length: int, *, alg: Algorithm, chunk_size: int, buffer: bytearray,
              throttle: Throttle, abort: threading.Event) -> list[bytes] | None:
    """The hashes of the chunks in ``length`` bytes of ``fd`` from ``offset`` (a multiple of ``chunk_size``).

    None when the file ends early or ``abort`` is set. Reads with ``preadv``, so threads may share ``fd``.
    The chunk tag is written into ``buffer`` just before the data, so a chunk that fits is hashed by one
    call on a fresh hasher, with no copy and no per-chunk Python object but its hash; a larger chunk
    continues in pieces that keep BLAKE3's 1 KiB chunk boundaries (each piece a multiple of 1 KiB).
    """
    view = memoryview(buffer)
    room = len(buffer) - _TAG
    step = len(buffer) // 1024 * 1024 or len(buffer)
    new_hasher = alg.new
    chunks: list[bytes] = []
    end = offset + length
    while offset < end:
        want = min(chunk_size, end - offset)
        buffer[:_TAG] = CHUNK_TAG
        first = want if want <= room else step - _TAG
        if not _pread_exactly(fd, view[_TAG:_TAG + first], offset) or not throttle.consume(first, abort):
            return None
        hasher = new_hasher(view[:_TAG + first])
        done = first
        while done < want:
            piece = min(step, want - done)
            if not _pread_exactly(fd, view[:piece], offset + done) or not throttle.consume(piece, abort):
                return None
            hasher.update(view[:piece])
            done += piece
        chunks.append(hasher.digest())
        offset += want
    return None if abort.is_set() else chunks


def _pread_exactly(fd: int, view: memoryview, offset: int) -> bool:
    """Fill ``view`` from ``offset``; False when the file ends first."""
    filled, want = 0, len(view)
    while filled < want:
        got = os.preadv(fd, [view[filled:]], offset + filled)
        if not got:
            return False
        filled += got
    return True


def hash_open_file(fd: int, *, alg: Algorithm, chunk_size: int, expected: tuple[int, int, int] | None,
                   throttle: Throttle, abort: threading.Event, buffer: bytearray) -> FileDigest | None:
    """Hash the open file ``fd`` chunk by chunk; None when it changed while read (or ``abort`` was set).

    ``expected`` is the identity the walk saw: a file replaced or modified since then is settling too.
    It stands for an fstat before the read (one syscall less per small file): the fstat after the read
    must still show it, so any write or replacement from the walk to the end of the read is seen.
    ``buffer`` (from ``new_buffer``) is reused across files.
    """
    if expected is None:
        before = os.fstat(fd)
        expected = (before.st_size, before.st_mtime_ns, before.st_ino)
    size = expected[0]
    # Read exactly the size the walk saw: a file that shrinks ends early, one that grows moves size and
    # mtime, which the fstat after sees; no extra read at EOF.
    chunks: list[bytes] | None
    if 0 < size <= chunk_size and size <= len(buffer) - _TAG:  # the common small file: one read, one hash
        view = memoryview(buffer)
        buffer[:_TAG] = CHUNK_TAG
        if (os.preadv(fd, [view[_TAG:_TAG + size]], 0) != size
                and not _pread_exactly(fd, view[_TAG:_TAG + size], 0)) or not throttle.consume(size, abort):
            return None
        chunks = [alg.new(view[:_TAG + size]).digest()]
    else:
        chunks = hash_span(fd, 0, size, alg=alg, chunk_size=chunk_size, buffer=buffer, throttle=throttle,
                           abort=abort)
        if chunks is None:
            return None
    after = os.fstat(fd)
    if (after.st_size, after.st_mtime_ns, after.st_ino) != expected or abort.is_set():
        return None
    return FileDigest(size, expected[1], expected[2], tuple(chunks), hash_file(alg, size, chunk_size, chunks))


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
