"""The command ledger: which idempotency keys this agent has executed, and how it went.

It is what makes "at most once" survive an agent restart: a key is *claimed*
(written, synchronously, as ``running``) before its command is executed and
*finished* with the outcome after, so a command redelivered after a crash in
the middle of it is answered ``duplicate`` ("interrupted") rather than run a
second time.

It also keeps the two counters that must only grow across restarts: the
highest command **epoch** accepted (written in the same transaction as the
claim of the command that raised it, so an agent restarted after a newer
controller spoke refuses commands of the older one), and a copy of the
**session** number (``agent.app.next_session`` falls back to it when the
``session`` file is unreadable).

And it records what the agent did on its own while no controller listened
(``agent.fallback``): each local action under its own key, and whether it
has gone out to a controller yet — an action outlives the agent run that took
it, and no key is recorded twice. Local actions are pruned by age only
(``max_age``): a few per unit per outage.

SQLite in WAL mode at ``<state_dir>/ledger.sqlite3``; every method blocks, so
the agent calls them through ``asyncio.to_thread`` (one lock serializes them,
whichever thread they land on). Bounded: entries older than ``max_age``
seconds and the oldest beyond ``max_rows`` are pruned at open and every
``PRUNE_EVERY`` claims.

A write SQLite cannot keep (the disk full) raises a ``StoreError`` that says
so and names the file, and keeps nothing: a claim that could not be written
leaves the key unclaimed, so its command is not run now (the executor answers
``failed``) and may run once the space is back. Nothing needs reopening.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from selfheal.errors import StoreError
from selfheal.write_failures import explain

MAX_AGE = 7 * 86400.0
MAX_ROWS = 100_000
PRUNE_EVERY = 1000
RUNNING = "running"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    key TEXT PRIMARY KEY,
    command_id TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_at ON commands (at);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS local_actions (
    key TEXT PRIMARY KEY,
    unit TEXT NOT NULL,
    action TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0
);
"""
EPOCH = "highest_epoch"
SESSION = "session"


class Entry(NamedTuple):
    key: str
    command_id: str
    status: str
    """``running`` while executing (or interrupted by a crash), else the CommandResult status."""
    detail: str
    at: float


class LocalEntry(NamedTuple):
    """One action the agent took on its own (``agent.fallback``)."""

    key: str
    unit: str
    action: str
    attempt: int
    reason: str
    status: str
    detail: str
    at: float
    """Wall time of the action."""


class Ledger:
    """At-most-once record of idempotency keys; see the module docstring."""

    def __init__(self, path: Path | str, *, max_age: float = MAX_AGE, max_rows: int = MAX_ROWS) -> None:
        self.path = Path(path)
        self.max_age = max_age
        self.max_rows = max_rows
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._claims = 0
        self.highest_epoch = 0
        """The highest command epoch ever claimed here (read at ``open``, raised by ``claim``)."""
        self.session = 0
        """The last session number saved (``save_session``), 0 if none."""

    def open(self, now: float) -> Ledger:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a claim must survive a power cut, not just a crash
            db.executescript(_SCHEMA)
            counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the command ledger: {explain(exc, self.path)}") from None
        self._db = db
        self.highest_epoch = int(counters.get(EPOCH, 0))
        self.session = int(counters.get(SESSION, 0))
        self.prune(now)
        return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def claim(self, key: str, command_id: str, now: float, epoch: int = 0) -> Entry | None:
        """Claim ``key`` for execution: None when it is new (now ``running``, and ``epoch`` the highest
        accepted if it is higher), else the earlier entry."""
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    cursor = db.execute(
                        "INSERT OR IGNORE INTO commands (key, command_id, status, detail, at) "
                        "VALUES (?, ?, ?, '', ?)", (key, command_id, RUNNING, now))
                    claimed = cursor.rowcount == 1
                    if claimed and epoch > self.highest_epoch:
                        self._set(db, EPOCH, epoch)
                    if not claimed:
                        row = db.execute("SELECT key, command_id, status, detail, at FROM commands WHERE key = ?",
                                         (key,)).fetchone()
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # a failed COMMIT on a full disk has already rolled back
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc
            if claimed:
                self._claims += 1
                self.highest_epoch = max(self.highest_epoch, epoch)
        if claimed:
            if self._claims % PRUNE_EVERY == 0:
                with contextlib.suppress(StoreError):  # housekeeping: the claim stands, the next prune tries again
                    self.prune(now)
            return None
        return Entry(*row)

    def finish(self, key: str, status: str, detail: str, now: float) -> None:
        """Record the outcome of a claimed key."""
        with self._lock:
            try:
                self._conn().execute("UPDATE commands SET status = ?, detail = ?, at = ? WHERE key = ?",
                                     (status, detail, now, key))
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc

    def save_session(self, session: int) -> None:
        """Keep a copy of the agent's session number (durable: ``synchronous=FULL``)."""
        with self._lock:
            try:
                self._set(self._conn(), SESSION, session)
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc
            self.session = session

    @staticmethod
    def _set(db: sqlite3.Connection, name: str, value: int) -> None:
        db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                   "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, value))

    def record_local(self, entry: LocalEntry) -> bool:
        """Record a local action, unreported; False when its key is recorded already."""
        with self._lock:
            try:
                cursor = self._conn().execute(
                    "INSERT OR IGNORE INTO local_actions (key, unit, action, attempt, reason, status, detail, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", entry)
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc
        return cursor.rowcount == 1

    def unreported_local(self) -> list[LocalEntry]:
        """The local actions no controller has been sent yet, oldest first."""
        with self._lock:
            try:
                rows = self._conn().execute(
                    "SELECT key, unit, action, attempt, reason, status, detail, at FROM local_actions "
                    "WHERE reported = 0 ORDER BY at, rowid").fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the command ledger: {explain(exc, self.path)}") from None
        return [LocalEntry(*row) for row in rows]

    def mark_reported(self, keys: list[str]) -> None:
        """The local actions of ``keys`` went out to a controller."""
        with self._lock:
            try:
                self._conn().executemany("UPDATE local_actions SET reported = 1 WHERE key = ?",
                                         [(key,) for key in keys])
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc

    def get(self, key: str) -> Entry | None:
        with self._lock:
            try:
                row = self._conn().execute(
                    "SELECT key, command_id, status, detail, at FROM commands WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the command ledger: {explain(exc, self.path)}") from None
        return Entry(*row) if row is not None else None

    def count(self) -> int:
        with self._lock:
            return int(self._conn().execute("SELECT count(*) FROM commands").fetchone()[0])

    def prune(self, now: float) -> int:
        """Forget entries older than ``max_age`` and the oldest beyond ``max_rows``; returns how many."""
        with self._lock:
            db = self._conn()
            try:
                removed = db.execute("DELETE FROM commands WHERE at < ?", (now - self.max_age,)).rowcount
                removed += db.execute("DELETE FROM local_actions WHERE at < ?", (now - self.max_age,)).rowcount
                removed += db.execute(
                    "DELETE FROM commands WHERE key IN "
                    "(SELECT key FROM commands ORDER BY at DESC LIMIT -1 OFFSET ?)",
                    (self.max_rows,)).rowcount
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc
        return removed

    def _failed(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"cannot write the command ledger: {explain(exc, self.path)}")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the command ledger is not open")
        return self._db
