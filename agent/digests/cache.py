"""The digest cache: what a file hashed to, keyed by what says it did not change since.

SQLite (WAL) at ``<state_dir>/digests.sqlite3``, one row per (dataset, file):
size, mtime_ns and inode as seen when it was read, the algorithm and chunk
size used, the file hash and its chunk hashes (served to peers), and when it
was read. A later scan that finds the same (size, mtime_ns, inode) reuses the
row instead of reading the file — unless the file was modified within
``RACY_NS`` of being read (Git's "racily clean" case: a write in the same
timestamp tick would be invisible), or a deep scan is due.

Per dataset it also keeps the last published root, its generation (grows
whenever the root changes, across restarts) and when the last deep scan
ended.

Every method blocks; callers use threads. One lock serializes them, whichever
thread they land on. Bounded: rows of files a scan no longer sees are deleted
when it ends (``forget``); rows of datasets no longer configured at open;
beyond ``max_rows`` the least recently read rows go (their files are simply
read again).

A cache that cannot write (its disk full, an I/O error) degrades to no cache
instead of failing the scan: the rows it could not keep are dropped (their
files are read again next scan), a root is kept in memory until it can be
written (so generations still grow), ``digests.cache_write_failed`` is logged
(at most once a minute per reason) and ``digests.cache_write_recovered`` once
writes go through again.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, TypeVar

from selfheal.errors import StoreError
from selfheal.logs import get_logger
from selfheal.write_failures import WriteFailures, failure_reason

MAX_ROWS = 2_000_000
RACY_NS = 2_000_000_000
"""A file modified less than this before it was read is read again next time (coarse mtimes)."""
BATCH = 500
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    dataset TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    alg TEXT NOT NULL,
    chunk_size INTEGER NOT NULL,
    hash BLOB NOT NULL,
    chunks BLOB NOT NULL,
    checked_ns INTEGER NOT NULL,
    UNIQUE (dataset, path)
);
CREATE INDEX IF NOT EXISTS files_checked ON files (checked_ns);
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,
    root TEXT NOT NULL,
    generation INTEGER NOT NULL,
    deep_at REAL NOT NULL
);
"""


class Known(NamedTuple):
    """A cached file digest (without its chunk list, which only peers ask for)."""

    size: int
    mtime_ns: int
    inode: int
    alg: str
    chunk_size: int
    hash: bytes
    checked_ns: int

    def still_valid(self, identity: tuple[int, int, int], alg: str, chunk_size: int) -> bool:
        """Whether this row describes the file a walk now sees, and may be trusted without reading."""
        return ((self.size, self.mtime_ns, self.inode) == identity and self.alg == alg
                and self.chunk_size == chunk_size and self.checked_ns - self.mtime_ns >= RACY_NS)


class Row(NamedTuple):
    path: str
    size: int
    mtime_ns: int
    inode: int
    alg: str
    chunk_size: int
    hash: bytes
    chunks: bytes
    """The chunk hashes, concatenated."""
    checked_ns: int


class DatasetRecord(NamedTuple):
    root: str
    generation: int
    deep_at: float
    """Wall time the last deep scan ended (0: never)."""


class DigestCache:
    def __init__(self, path: Path | str, *, max_rows: int = MAX_ROWS) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._unsaved: dict[str, DatasetRecord] = {}
        """Roots recorded while they could not be written, until one is (at most one per dataset)."""
        self._failures = WriteFailures(get_logger("agent.digests"), "digests.cache_write", self.path,
                                       level="warning")

    def open(self, datasets: Iterable[str] | None = None) -> DigestCache:
        """Open (creating) the cache; with ``datasets``, forget every other dataset."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a cache: losing the last writes only costs a re-read
            db.executescript(_SCHEMA)
            if datasets is not None:
                names = sorted(set(datasets))
                marks = ",".join("?" * len(names))
                db.execute(f"DELETE FROM files WHERE dataset NOT IN ({marks})", names)  # noqa: S608 - placeholders
                db.execute(f"DELETE FROM datasets WHERE name NOT IN ({marks})", names)  # noqa: S608
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the digest cache {self.path}: {exc}") from None
        self._db = db
        return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> DigestCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def known(self, dataset: str) -> dict[str, Known]:
        """Every cached file of ``dataset``: one query per scan, not one per file."""
        with self._lock:
            rows = self._run(lambda db: db.execute(
                "SELECT path, size, mtime_ns, inode, alg, chunk_size, hash, checked_ns FROM files "
                "WHERE dataset = ?", (dataset,)).fetchall())
        return {path: Known(*rest) for path, *rest in rows}

    def store(self, dataset: str, rows: Sequence[Row]) -> None:
        """Insert or replace file digests, all in one transaction (a scan hands them over in batches); dropped
        if they cannot be written."""
        batch = [(dataset, *row) for row in rows]

        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.executemany(
                    "INSERT OR REPLACE INTO files (dataset, path, size, mtime_ns, inode, alg, chunk_size, "
                    "hash, chunks, checked_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)

        with self._lock:
            self._write(write)

    def forget(self, dataset: str, paths: Iterable[str]) -> int:
        """Drop rows of files that are gone; then enforce ``max_rows``. Returns the rows dropped."""
        gone = [(dataset, path) for path in paths]

        def delete(db: sqlite3.Connection) -> int:
            removed = 0
            with _transaction(db):
                for start in range(0, len(gone), BATCH):
                    removed += db.executemany("DELETE FROM files WHERE dataset = ? AND path = ?",
                                              gone[start:start + BATCH]).rowcount
            return removed + db.execute(
                "DELETE FROM files WHERE rowid IN (SELECT rowid FROM files ORDER BY checked_ns DESC "
                "LIMIT -1 OFFSET ?)", (self.max_rows,)).rowcount

        with self._lock:
            removed = self._write(delete)
        return removed or 0

    def chunks(self, dataset: str, path: str) -> tuple[Known, tuple[bytes, ...]] | None:
        """A file's cached digest with its chunk hashes, for peers."""
        with self._lock:
            row = self._run(lambda db: db.execute(
                "SELECT size, mtime_ns, inode, alg, chunk_size, hash, checked_ns, chunks FROM files "
                "WHERE dataset = ? AND path = ?", (dataset, path)).fetchone())
        if row is None:
            return None
        blob: bytes = row[7]
        width = len(row[5])
        return Known(*row[:7]), tuple(blob[i:i + width] for i in range(0, len(blob), width))

    def dataset(self, name: str) -> DatasetRecord | None:
        with self._lock:
            return self._dataset(name)

    def _dataset(self, name: str) -> DatasetRecord | None:
        if name in self._unsaved:
            return self._unsaved[name]
        row = self._run(lambda db: db.execute(
            "SELECT root, generation, deep_at FROM datasets WHERE name = ?", (name,)).fetchone())
        return DatasetRecord(*row) if row is not None else None

    def record_root(self, name: str, root: str, *, deep_at: float | None) -> DatasetRecord:
        """Record a scan's root: the generation grows when it differs from the last one."""
        with self._lock:
            previous = self._dataset(name) or DatasetRecord("", 0, 0.0)
            record = DatasetRecord(root, previous.generation + (root != previous.root),
                                   previous.deep_at if deep_at is None else deep_at)
            if self._write(lambda db: db.execute(
                    "INSERT OR REPLACE INTO datasets (name, root, generation, deep_at) VALUES (?, ?, ?, ?)",
                    (name, *record))) is None:
                self._unsaved[name] = record
            else:
                self._unsaved.pop(name, None)
        return record

    def count(self) -> int:
        with self._lock:
            return int(self._run(lambda db: db.execute("SELECT count(*) FROM files").fetchone()[0]))

    def _run(self, action: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise StoreError("the digest cache is not open")
        try:
            return action(self._db)
        except sqlite3.Error as exc:
            raise StoreError(f"digest cache: {exc}") from None

    def _write(self, action: Callable[[sqlite3.Connection], T]) -> T | None:
        """Run a write; None when SQLite could not keep it (the disk full, an I/O error, a lock held too long):
        logged, never raised — the scan goes on without the cache."""
        if self._db is None:
            raise StoreError("the digest cache is not open")
        changes = self._db.total_changes
        try:
            result = action(self._db)
        except sqlite3.Error as exc:
            if failure_reason(exc) == "other":  # not the disk: a bug, which must not hide
                raise StoreError(f"digest cache: {exc}") from None
            self._failures.failed(exc)
            return None
        if self._db.total_changes != changes:  # a write that changed nothing proves nothing
            self._failures.succeeded()
        return result


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # a COMMIT that failed on a full disk has rolled back already
            db.execute("ROLLBACK")
        raise
