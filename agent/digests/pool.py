"""The scan's hashing pool: large files hashed in spans of whole chunks by a few worker threads.

The walking thread hashes small files itself (for them a hand-off costs more
than it saves: every system call would bounce the GIL between threads) and
hands each file larger than ``INLINE_MAX`` to this pool, cut into spans of
whole chunks (``SPAN_BYTES``, and no more than about a second of the
read-bandwidth limit). Workers ``preadv`` the spans of one shared fd and
hash them with the GIL released (BLAKE3 and hashlib release it on large
inputs), so one big file keeps every worker busy while the walker goes on
with small files.

The walker stays the only thread that touches the scan's state: it opens each
file (and checks the identity the walk saw), collects finished spans in
submission order, and when a file's last span is in, the pool fstats it
again, closes it and sets its ``FileDigest`` — or leaves ``None`` when it
changed while read, or records the ``OSError`` a worker met.

Bounded: at most ``MAX_OPEN`` files handed over and ``MAX_SPANS`` spans
queued (``has_room``; the walker keeps further large files for later instead
of waiting); one read buffer per worker. The throughput anchor stays raw
single-thread hashing: see ``bench/digest.py``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from agent.digests.hashing import Algorithm, hash_file
from agent.digests.reading import FileDigest, hash_span, new_buffer
from agent.digests.throttle import Throttle

INLINE_MAX = 256 * 1024
"""Files up to this many bytes are hashed by the walking thread itself."""
SPAN_BYTES = 8 * 1024 * 1024
"""About this many bytes (whole chunks, at least one) make one unit of work for a worker."""
MAX_OPEN = 32
"""Files handed to the pool and not yet collected, at most (each holds an fd)."""
MAX_SPANS = 64
"""Spans queued or running before the pool says it has no room."""
HASH_WORKERS = min(2, os.cpu_count() or 1)
"""Worker threads by default: hashing is CPU-bound, and the agent shares its host with real work."""
_POLL = 0.05
"""Seconds between checks of the caller's abort while waiting for a span."""


class FileJob:
    """One large file in the pool: its open fd, the identity it was opened with, its spans' chunk hashes."""

    __slots__ = ("chunks", "digest", "error", "fd", "pending", "rel", "seen")

    def __init__(self, rel: str, seen: tuple[int, int, int]) -> None:
        self.rel = rel
        self.seen = seen
        """(size, mtime_ns, inode) as the walk saw it; the file must keep it from open to the last read."""
        self.fd = -1
        self.chunks: list[list[bytes] | None] = []
        self.pending = 0
        self.digest: FileDigest | None = None
        """Set when collected; None when the file changed while read (or the scan stopped)."""
        self.error: OSError | None = None


class HashPool:
    """Worker threads for one scan; ``close`` always (it joins them and closes every fd still held)."""

    def __init__(self, *, workers: int, alg: Algorithm, chunk_size: int, throttle: Throttle,
                 abort: threading.Event) -> None:
        self.alg = alg
        self.chunk_size = chunk_size
        self.throttle = throttle
        self.abort = abort
        """The caller's: passed on to ``_halt`` while the walker waits."""
        self._halt = threading.Event()
        """What workers watch (also in throttle waits): set on abort, and when the scan ends early."""
        per_span = SPAN_BYTES if throttle.rate <= 0 else min(SPAN_BYTES, throttle.rate)
        self.span = max(1, per_span // chunk_size) * chunk_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="digest-hash")
        self._buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(workers):
            self._buffers.put(new_buffer(chunk_size))
        self._queued: deque[tuple[FileJob, int, Future[list[bytes] | None]]] = deque()
        self._open: set[FileJob] = set()
        self.done: list[FileJob] = []
        """Collected jobs, for the walker to record (it empties the list)."""

    @property
    def busy(self) -> bool:
        return bool(self._queued)

    def has_room(self) -> bool:
        """Whether another file may be handed over now (after collecting what is finished)."""
        queued = self._queued
        while queued and queued[0][2].done():
            self._collect_oldest()
        return len(self._open) < MAX_OPEN and len(queued) < MAX_SPANS

    def add(self, job: FileJob, fd: int) -> None:
        """Queue every span of ``job``, read from ``fd`` (which now belongs to the pool)."""
        job.fd = fd
        size, span = job.seen[0], self.span
        job.chunks = [None] * max(1, -(-size // span))
        job.pending = len(job.chunks)
        self._open.add(job)
        for index in range(job.pending):
            offset = index * span
            future = self._executor.submit(self._hash, fd, offset, min(span, size - offset))
            self._queued.append((job, index, future))

    def wait_one(self) -> None:
        """Wait for the oldest queued span."""
        if self._queued:
            self._collect_oldest()

    def close(self) -> None:
        self._halt.set()
        for _, _, future in self._queued:
            future.cancel()
        self._executor.shutdown(wait=True)
        for job in self._open:
            os.close(job.fd)
        self._open.clear()
        self._queued.clear()

    def _hash(self, fd: int, offset: int, length: int) -> list[bytes] | None:  # in a worker thread
        if self._halt.is_set():
            return None
        buffer = self._buffers.get()
        try:
            return hash_span(fd, offset, length, alg=self.alg, chunk_size=self.chunk_size, buffer=buffer,
                             throttle=self.throttle, abort=self._halt)
        finally:
            self._buffers.put(buffer)

    def _collect_oldest(self) -> None:
        job, index, future = self._queued.popleft()
        chunks: list[bytes] | None = None
        while True:
            try:
                chunks = future.result(timeout=_POLL)
                break
            except TimeoutError:
                if self.abort.is_set():
                    self._halt.set()  # the worker stops at its next piece, even in a throttle wait
            except OSError as exc:
                job.error = job.error or exc
                break
        job.chunks[index] = chunks
        job.pending -= 1
        if job.pending == 0:
            self._finish(job)

    def _finish(self, job: FileJob) -> None:
        self._open.discard(job)
        after: os.stat_result | None = None
        try:
            after = os.fstat(job.fd)
        except OSError as exc:
            job.error = job.error or exc
        finally:
            os.close(job.fd)
        size, mtime_ns, inode = job.seen
        spans = job.chunks
        if (job.error is None and after is not None and not self._halt.is_set()
                and (after.st_size, after.st_mtime_ns, after.st_ino) == job.seen
                and all(span is not None for span in spans)):
            chunks = [c for span in spans for c in span or ()]
            job.digest = FileDigest(size=size, mtime_ns=mtime_ns, inode=inode, chunks=tuple(chunks),
                                    hash=hash_file(self.alg, size, self.chunk_size, chunks))
        self.done.append(job)
