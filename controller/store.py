"""The state store: incidents, their timelines, plans and issued commands, in SQLite (WAL).

Everything the controller must not lose across a restart goes through this
one class. SQLite calls run on one dedicated worker thread, so the event loop
only waits and writes are serialised. The controller is typed against the
``Store`` protocol below; ``controller.pgstore.PostgresStore`` implements it on
PostgreSQL for several controllers, and ``controller.stores.open_store`` picks
one by ``[store] url``.

Writes group-commit. A write is queued; the worker takes every write queued
while it was busy (up to ``max_batch``) and runs them, in the order they were
made, in one transaction, each inside its own savepoint: a write that fails
(a unique key already taken, an unknown incident) is rolled back to its
savepoint and fails its own caller only, and the others commit. A write's
await returns only once its transaction has committed, so whatever a caller
was told is written is on disk as far as ``synchronous=NORMAL`` promises,
and every read made after that sees it. When a rack of nodes goes down at
once, hundreds of incidents open together and their writes share a handful
of commits instead of paying one each (``bench/store.py``). Reads are not
queued: they run on the worker between two batches. A batch is one
transaction, so a crash in the middle of one keeps none of it; the hash
chains of the audit trail stay whole because each append reads the head
that the writes before it in the same transaction left.

A write SQLite cannot keep — the disk is full (SQLITE_FULL), an I/O error —
fails its caller with a ``StoreError`` that says why and names the file; none
of its batch is kept (so no chain is left half-written), each refused write is
counted (``on_write_error(reason)``: the controller's
``selfheal_store_write_errors_total{reason}``) and ``store.write_failed`` is
logged (at most once a minute per reason). Reads go on meanwhile. Nothing needs
reopening when space returns: the next batch commits, and
``store.write_recovered`` says how many writes were refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from controller.audit import chain_hash, genesis
from selfheal.errors import StoreError
from selfheal.logs import get_logger
from selfheal.write_failures import WriteFailures, explain, failure_reason

IncidentState = Literal["open", "failed", "resolved"]
T = TypeVar("T")

MAX_BATCH = 128
"""Most writes in one transaction: bounds how long a batch holds the worker (and a read waits behind it)."""

_Write = tuple[Callable[[], Any], "asyncio.Future[Any]"]
_Outcome = tuple["asyncio.Future[Any]", Any, Exception | None]
"""A write's future, its result and its error (``None`` when it committed)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS notes (name TEXT PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    node TEXT NOT NULL,
    unit TEXT,
    severity TEXT NOT NULL,
    summary TEXT NOT NULL,
    rule TEXT,
    state TEXT NOT NULL CHECK (state IN ('open', 'failed', 'resolved')),
    opened_at REAL NOT NULL,
    resolved_at REAL,
    audit_head TEXT,
    audit_count INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS one_unresolved_incident_per_key
    ON incidents(key) WHERE state != 'resolved';
CREATE INDEX IF NOT EXISTS incidents_by_state ON incidents(state, id);
CREATE TABLE IF NOT EXISTS timeline (
    incident_id INTEGER NOT NULL REFERENCES incidents(id),
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (incident_id, seq)
);
CREATE TRIGGER IF NOT EXISTS timeline_is_append_only BEFORE UPDATE ON timeline
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS timeline_keeps_entries BEFORE DELETE ON timeline
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TABLE IF NOT EXISTS plans (
    id TEXT PRIMARY KEY,
    incident_id INTEGER NOT NULL REFERENCES incidents(id),
    rule TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    rung INTEGER NOT NULL DEFAULT 0,
    action TEXT NOT NULL DEFAULT '',
    mode TEXT NOT NULL DEFAULT 'auto',
    deadline REAL NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS plans_by_incident ON plans(incident_id, attempt);
CREATE TABLE IF NOT EXISTS silences (
    id TEXT PRIMARY KEY,
    matchers TEXT NOT NULL,
    starts_at REAL NOT NULL,
    ends_at REAL NOT NULL,
    comment TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantines (
    rule TEXT NOT NULL,
    target TEXT NOT NULL,
    until REAL NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (rule, target)
);
CREATE TABLE IF NOT EXISTS placements (
    unit TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    fence_after REAL NOT NULL,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dataset_replicas (
    dataset TEXT NOT NULL,
    node TEXT NOT NULL,
    summary BLOB,
    online INTEGER NOT NULL,
    http TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    changed_at REAL NOT NULL,
    PRIMARY KEY (dataset, node)
);
CREATE INDEX IF NOT EXISTS dataset_replicas_by_seq ON dataset_replicas(seq);
CREATE INDEX IF NOT EXISTS dataset_replicas_by_change ON dataset_replicas(changed_at);
CREATE TABLE IF NOT EXISTS commands (
    key TEXT PRIMARY KEY,
    command_id TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    node TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    issued_at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS notification_log (
    key TEXT PRIMARY KEY,
    incident_id INTEGER NOT NULL,
    event TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'claimed',
    claimed_at REAL NOT NULL,
    finished_at REAL
);
"""


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    """Where a movable singleton last ran (``controller.placement``)."""

    unit: str
    node: str
    fence_after: float
    """Seconds after ``node`` was last heard by which its copy is surely stopped (from its agent)."""
    since: float


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    """A node's replica of a dataset as the controller acting on the node last heard it, for the other
    controllers sharing the store to compare theirs with (``controller.shared_replicas``)."""

    dataset: str
    node: str
    summary: bytes | None
    """The ``wire.DatasetSummary``, encoded; None: the node no longer holds the dataset."""
    online: bool
    http: str
    """Where the node's agent serves its datasets (``NodeStatus.http``): a resync's source address."""
    epoch: int = 0
    """The writer's epoch on the node's bucket: a store shared by controllers drops the record unless that
    is the bucket's live lease, so a controller that lost the bucket never overwrites its new owner's."""
    seq: int = 0
    """Given by the store: grows with every record written."""


@dataclass(frozen=True, slots=True)
class Incident:
    id: int
    key: str
    kind: str
    node: str
    unit: str | None
    severity: str
    summary: str
    rule: str | None
    state: IncidentState
    opened_at: float
    resolved_at: float | None


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    at: float
    kind: str
    data: dict[str, Any]
    hash: str = ""


@dataclass(frozen=True, slots=True)
class PlanRecord:
    id: str
    incident_id: int
    rule: str
    attempt: int
    state: str
    """The plan state machine's state (``remediations.plans.PlanState``)."""
    created_at: float
    updated_at: float
    detail: dict[str, Any] = field(default_factory=dict)
    rung: int = 0
    action: str = ""
    mode: str = "auto"
    deadline: float = 0.0


@dataclass(frozen=True, slots=True)
class SilenceRecord:
    id: str
    matchers: list[dict[str, str]]
    """``[{"name": "node", "value": "node-a"}]``: label globs, all must match."""
    starts_at: float
    ends_at: float
    comment: str
    author: str
    created_at: float


@dataclass(frozen=True, slots=True)
class IncidentDetail:
    incident: Incident
    timeline: tuple[TimelineEntry, ...]
    plans: tuple[PlanRecord, ...]


class Store(Protocol):
    """What the controller keeps through a restart or a takeover: ``SqliteStore``, or ``PostgresStore``.

    Writes return once committed; a write the store cannot keep raises ``StoreError``. Timelines are
    hash-chained (``controller.audit``) and append-only.
    """

    async def close(self) -> None: ...
    async def next_epoch(self) -> int: ...
    async def open_incident(self, *, key: str, kind: str, node: str, unit: str | None, severity: str,
                            summary: str, rule: str | None, opened_at: float,
                            evidence: dict[str, Any], details: dict[str, Any] | None = None) -> Incident: ...
    async def set_incident_state(self, incident_id: int, state: IncidentState, *, at: float,
                                 reason: str) -> None: ...
    async def append_timeline(self, incident_id: int, *, at: float, kind: str,
                              data: dict[str, Any]) -> str: ...
    async def get_incident_row(self, incident_id: int) -> Incident | None: ...
    async def list_incidents(self, *, state: IncidentState | None = None, limit: int = 200) -> list[Incident]: ...
    async def unresolved_incidents(self) -> list[Incident]: ...
    async def get_incident(self, incident_id: int) -> IncidentDetail | None: ...
    async def save_plan(self, plan: PlanRecord, *, fence: tuple[str, int] | None = None) -> None:
        """Insert or update a plan. ``fence`` (node, epoch): a store shared by controllers refuses the write
        with ``NotOwner`` unless ``epoch`` is the live lease of the node's bucket (``record_command``)."""
        ...
    async def plans_for(self, incident_id: int) -> list[PlanRecord]: ...
    async def list_plans(self, *, limit: int = 200) -> list[PlanRecord]: ...
    async def recent_plans(self, since: float) -> list[tuple[Incident, PlanRecord]]: ...
    async def get_plan(self, plan_id: str) -> PlanRecord | None: ...
    async def plans_in(self, states: tuple[str, ...]) -> list[PlanRecord]: ...
    async def commands_live_after(self, now: float, ttl: float) -> dict[str, float]: ...
    async def record_command(self, *, key: str, command_id: str, plan_id: str, node: str, epoch: int,
                             issued_at: float, payload: bytes, also: tuple[str, int] | None = None) -> bool:
        """Record a command before it is published; False if its key was already issued. ``also`` (node,
        epoch): a second fence a shared store checks in the same transaction (a command another controller
        asked for: its epoch on its own node)."""
        ...
    async def set_pause(self, paused: bool, reason: str) -> None: ...
    async def get_pause(self) -> tuple[bool, str]: ...
    async def save_silence(self, silence: SilenceRecord) -> None: ...
    async def list_silences(self) -> list[SilenceRecord]: ...
    async def save_quarantine(self, rule: str, target: str, until: float, reason: str) -> None: ...
    async def list_quarantines(self) -> list[tuple[str, str, float, str]]: ...
    async def save_placement(self, placement: PlacementRecord) -> None: ...
    async def list_placements(self) -> list[PlacementRecord]: ...
    async def save_replicas(self, records: Sequence[ReplicaRecord]) -> int:
        """Insert or replace each (dataset, node)'s record; how many were written (a shared store drops those
        written under a stale epoch, as ``save_plan`` refuses)."""
        ...
    async def replicas_changed(self, *, after: int, since: float | None) -> tuple[list[ReplicaRecord], float]:
        """The records written after sequence number ``after`` or at or after ``since`` (the store's clock;
        None: every record), and the store's clock now: ``since`` of a later call."""
        ...
    async def forget_replicas(self, *, older_than: float) -> int:
        """Delete the records without summary written more than ``older_than`` seconds ago; how many."""
        ...
    async def claim_notification(self, *, key: str, incident_id: int, event: str, destination: str,
                                 at: float) -> bool: ...
    async def finish_notifications(self, keys: Sequence[str], *, outcome: str, at: float) -> None: ...


class SqliteStore:
    """Open with ``await SqliteStore.open(path)``; close with ``await store.close()``.

    ``max_batch`` bounds a group commit; 1 gives every write its own transaction. ``on_write_error`` is
    called with the reason (``selfheal.write_failures.REASONS``) of every write SQLite refused.
    """

    def __init__(self, connection: sqlite3.Connection, executor: ThreadPoolExecutor, *,
                 path: Path, max_batch: int = MAX_BATCH,
                 on_write_error: Callable[[str], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.path = path
        self.on_write_error = on_write_error
        self._failures = WriteFailures(get_logger("store"), "store.write", self.path)
        self._db = connection
        self._executor = executor
        self._max_batch = max_batch
        self._queued: deque[_Write] = deque()
        """Writes waiting for the worker: appended on the event loop, taken by the worker (deque ops are atomic)."""
        self._idle = asyncio.Event()
        """Set while no batch is with the worker; the next write then hands one over itself."""
        self._idle.set()
        self._wrote = False
        """Whether the last batch committed a change (set by the worker, read by ``_settle`` before the next)."""

    @classmethod
    async def open(cls, path: Path, *, max_batch: int = MAX_BATCH,
                   on_write_error: Callable[[str], None] | None = None) -> SqliteStore:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")

        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
            return db

        loop = asyncio.get_running_loop()
        try:
            db = await loop.run_in_executor(executor, connect)
        except (sqlite3.Error, OSError) as exc:
            executor.shutdown(wait=False)
            raise StoreError(f"cannot open the state store: {explain(exc, path)}") from exc
        return cls(db, executor, max_batch=max_batch, path=path, on_write_error=on_write_error)

    async def close(self) -> None:
        """Commit the writes already queued, then close."""
        await self._idle.wait()
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        """Run a read on the worker (reads are not queued with the writes)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    async def _write(self, fn: Callable[[], T]) -> T:
        """Queue a write (run on the worker, inside its own savepoint); returns once its transaction committed.

        ``fn`` must not begin or end transactions itself. Its ``sqlite3.Error`` reaches the caller as a
        ``StoreError``, any other exception as it is; either way only its own changes are rolled back.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._queued.append((fn, done))
        if self._idle.is_set():
            self._idle.clear()
            self._hand_over(loop)
        return await done

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the worker a batch to take; its outcomes come back to ``_settle`` on the loop.

        A callback, not a task awaiting the worker: nothing can cancel it halfway and leave callers waiting.
        """
        try:
            batch = self._executor.submit(self._commit_batch)
        except RuntimeError as exc:  # the worker is shut down: nothing queued can run
            refused: list[_Outcome] = [(done, None, StoreError(f"the store is closed: {exc}"))
                                       for _, done in self._queued]
            self._queued.clear()
            self._settle(loop, refused)
            return
        batch.add_done_callback(lambda ran: loop.call_soon_threadsafe(self._settle, loop, ran.result()))

    def _settle(self, loop: asyncio.AbstractEventLoop, outcomes: list[_Outcome]) -> None:
        """Answer each caller of a finished batch (event loop), hand over the next batch if any, then count."""
        for done, value, error in outcomes:
            if done.done():  # its caller was cancelled while it ran: the write stands regardless
                continue
            if error is None:
                done.set_result(value)
            elif isinstance(error, sqlite3.Error):
                failure = StoreError(f"the state store could not write: {explain(error, self.path)}; "
                                     "nothing of this write was kept")
                failure.__cause__ = error
                done.set_exception(failure)
            else:
                done.set_exception(error)
        if self._queued:
            self._hand_over(loop)
        else:
            self._idle.set()
        self._account(outcomes)

    def _account(self, outcomes: list[_Outcome]) -> None:
        """Count and log the writes of a batch SQLite refused; say so when writes go through again."""
        if self._wrote:
            self._failures.succeeded()
        refused = [error for _, _, error in outcomes if isinstance(error, sqlite3.Error)]
        for error in refused:
            if self.on_write_error is not None:
                self.on_write_error(failure_reason(error))
        for reason in dict.fromkeys(failure_reason(error) for error in refused):
            same = [error for error in refused if failure_reason(error) == reason]
            self._failures.failed(same[0], writes=len(same))

    def _commit_batch(self) -> list[_Outcome]:
        """Take up to ``max_batch`` queued writes and run them in one transaction (worker thread only).

        Each write runs in a savepoint; one that raises is rolled back to it and keeps its error, the rest
        commit together. If the transaction itself fails (BEGIN, COMMIT, or SQLite aborting it on an I/O
        error or a full disk), none of the batch is kept and every write without an error of its own gets
        that failure.
        """
        batch: list[_Write] = []
        while self._queued and len(batch) < self._max_batch:
            fn, done = self._queued.popleft()
            if not done.cancelled():  # a caller that gave up before its write started: it does not run
                batch.append((fn, done))
        if not batch:
            return []
        db = self._db
        outcomes: list[_Outcome] = []
        changes = db.total_changes
        self._wrote = False
        try:
            db.execute("BEGIN IMMEDIATE")
            for fn, done in batch:
                db.execute("SAVEPOINT write")
                try:
                    value = fn()
                except Exception as exc:  # the write's own failure, handed to its caller
                    outcomes.append((done, None, exc))
                    if not db.in_transaction:  # SQLite aborted the whole transaction
                        raise
                    db.execute("ROLLBACK TO write")
                    db.execute("RELEASE write")
                else:
                    db.execute("RELEASE write")
                    outcomes.append((done, value, None))
            db.execute("COMMIT")
            self._wrote = db.total_changes != changes
        except Exception as exc:  # noqa: BLE001 - the transaction failed: every caller hears of it
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            own = [error for _, _, error in outcomes]
            return [(done, None, own[i] if i < len(own) and own[i] is not None else exc)
                    for i, (_, done) in enumerate(batch)]
        return outcomes

    # --- epochs ---------------------------------------------------------------------------------

    async def next_epoch(self) -> int:
        """A number that grows with every controller start: the fencing token on commands."""
        def bump() -> int:
            self._db.execute("INSERT INTO meta(name, value) VALUES ('epoch', 1) "
                             "ON CONFLICT(name) DO UPDATE SET value = value + 1")
            row = self._db.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()
            return int(row[0])
        return await self._write(bump)

    # --- incidents ------------------------------------------------------------------------------

    async def open_incident(self, *, key: str, kind: str, node: str, unit: str | None, severity: str,
                            summary: str, rule: str | None, opened_at: float,
                            evidence: dict[str, Any], details: dict[str, Any] | None = None) -> Incident:
        """Open an incident and its first timeline entry, or return the unresolved one for ``key``."""
        opening = {"summary": summary, "rule": rule, "evidence": evidence, **(details or {})}
        def insert() -> Incident:
            row = self._db.execute(f"SELECT {_INCIDENT_COLUMNS} FROM incidents "  # noqa: S608
                                   "WHERE key = ? AND state != 'resolved'", (key,)).fetchone()
            if row is not None:
                return _incident(row)
            cursor = self._db.execute(
                "INSERT INTO incidents(key, kind, node, unit, severity, summary, rule, state, opened_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'open', ?)",
                (key, kind, node, unit, severity, summary, rule, opened_at))
            incident_id = int(cursor.lastrowid or 0)
            self._chain(incident_id, opened_at, "opened", _json(opening))
            return _incident(self._db.execute(f"SELECT {_INCIDENT_COLUMNS} FROM incidents "  # noqa: S608
                                              "WHERE id = ?", (incident_id,)).fetchone())
        return await self._write(insert)

    async def set_incident_state(self, incident_id: int, state: IncidentState, *, at: float,
                                 reason: str) -> None:
        def update() -> None:
            self._db.execute("UPDATE incidents SET state = ?, resolved_at = ? WHERE id = ?",
                             (state, at if state == "resolved" else None, incident_id))
            self._chain(incident_id, at, state, _json({"reason": reason}))
        await self._write(update)

    async def append_timeline(self, incident_id: int, *, at: float, kind: str, data: dict[str, Any]) -> str:
        """Append one audit entry; returns its hash (the incident's new chain head)."""
        def append() -> str:
            return self._chain(incident_id, at, kind, _json(data))
        return await self._write(append)

    def _chain(self, incident_id: int, at: float, kind: str, data: str) -> str:
        """Append a hash-chained entry; the caller holds the transaction (worker thread only).

        The head is read inside that transaction, so appends to one incident in the same batch chain in order.
        """
        row = self._db.execute("SELECT audit_head, audit_count FROM incidents WHERE id = ?", (incident_id,)).fetchone()
        if row is None:
            raise sqlite3.IntegrityError(f"no incident {incident_id}")
        prev = row[0] or genesis(incident_id)
        digest = chain_hash(prev, at, kind, data)
        self._db.execute("INSERT INTO timeline(incident_id, seq, at, kind, data, prev_hash, hash) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (incident_id, row[1] + 1, at, kind, data, prev, digest))
        self._db.execute("UPDATE incidents SET audit_head = ?, audit_count = ? WHERE id = ?",
                         (digest, row[1] + 1, incident_id))
        return digest

    async def get_incident_row(self, incident_id: int) -> Incident | None:
        def select() -> Incident | None:
            row = self._db.execute(f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = ?",  # noqa: S608
                                   (incident_id,)).fetchone()
            return _incident(row) if row else None
        result: Incident | None = await self._run(select)
        return result

    async def list_incidents(self, *, state: IncidentState | None = None, limit: int = 200) -> list[Incident]:
        def select() -> list[Incident]:
            if state is None:
                rows = self._db.execute(f"SELECT {_INCIDENT_COLUMNS} FROM incidents "  # noqa: S608
                                        "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute(f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE state = ? "  # noqa: S608
                                        "ORDER BY id DESC LIMIT ?", (state, limit)).fetchall()
            return [_incident(row) for row in rows]
        result: list[Incident] = await self._run(select)
        return result

    async def unresolved_incidents(self) -> list[Incident]:
        def select() -> list[Incident]:
            rows = self._db.execute(f"SELECT {_INCIDENT_COLUMNS} FROM incidents "  # noqa: S608
                                    "WHERE state != 'resolved' ORDER BY id").fetchall()
            return [_incident(row) for row in rows]
        result: list[Incident] = await self._run(select)
        return result

    async def get_incident(self, incident_id: int) -> IncidentDetail | None:
        incident = await self.get_incident_row(incident_id)
        if incident is None:
            return None

        def select() -> tuple[tuple[TimelineEntry, ...], tuple[PlanRecord, ...]]:
            entries = self._db.execute("SELECT at, kind, data, hash FROM timeline WHERE incident_id = ? "
                                       "ORDER BY seq", (incident_id,)).fetchall()
            plans = self._db.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE incident_id = ? "  # noqa: S608
                                     "ORDER BY attempt", (incident_id,)).fetchall()
            return (tuple(TimelineEntry(at, kind, json.loads(data), digest) for at, kind, data, digest in entries),
                    tuple(_plan(row) for row in plans))
        timeline, plans = await self._run(select)
        return IncidentDetail(incident, timeline, plans)

    # --- plans and commands ---------------------------------------------------------------------

    async def save_plan(self, plan: PlanRecord, *, fence: tuple[str, int] | None = None) -> None:
        def upsert() -> None:  # one controller: no fence to check
            self._db.execute(
                "INSERT INTO plans(id, incident_id, rule, attempt, rung, action, mode, deadline, state, created_at,"
                " updated_at, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE"
                " SET state = excluded.state, updated_at = excluded.updated_at, detail = excluded.detail",
                (plan.id, plan.incident_id, plan.rule, plan.attempt, plan.rung, plan.action, plan.mode,
                 plan.deadline, plan.state, plan.created_at, plan.updated_at, _json(plan.detail)))
        await self._write(upsert)

    async def plans_for(self, incident_id: int) -> list[PlanRecord]:
        def select() -> list[PlanRecord]:
            rows = self._db.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE incident_id = ? "  # noqa: S608
                                    "ORDER BY attempt", (incident_id,)).fetchall()
            return [_plan(row) for row in rows]
        result: list[PlanRecord] = await self._run(select)
        return result

    async def list_plans(self, *, limit: int = 200) -> list[PlanRecord]:
        def select() -> list[PlanRecord]:
            rows = self._db.execute(f"SELECT {_PLAN_COLUMNS} FROM plans ORDER BY created_at DESC "  # noqa: S608
                                    "LIMIT ?", (limit,)).fetchall()
            return [_plan(row) for row in rows]
        result: list[PlanRecord] = await self._run(select)
        return result

    async def recent_plans(self, since: float) -> list[tuple[Incident, PlanRecord]]:
        """Every plan created since ``since`` with its incident, oldest first (rebuilds target histories)."""
        def select() -> list[tuple[Incident, PlanRecord]]:
            columns = ", ".join(f"i.{c.strip()}" for c in _INCIDENT_COLUMNS.split(",")) + ", " + ", ".join(
                f"p.{c.strip()}" for c in _PLAN_COLUMNS.split(","))
            rows = self._db.execute(f"SELECT {columns} FROM plans p JOIN incidents i ON i.id = p.incident_id "  # noqa: S608
                                    "WHERE p.created_at >= ? ORDER BY p.created_at", (since,)).fetchall()
            width = len(_INCIDENT_COLUMNS.split(","))
            return [(_incident(row[:width]), _plan(row[width:])) for row in rows]
        result: list[tuple[Incident, PlanRecord]] = await self._run(select)
        return result

    async def get_plan(self, plan_id: str) -> PlanRecord | None:
        def select() -> PlanRecord | None:
            row = self._db.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE id = ?", (plan_id,)).fetchone()  # noqa: S608
            return _plan(row) if row else None
        result: PlanRecord | None = await self._run(select)
        return result

    async def plans_in(self, states: tuple[str, ...]) -> list[PlanRecord]:
        def select() -> list[PlanRecord]:
            marks = ", ".join("?" for _ in states)
            rows = self._db.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE state IN ({marks}) "  # noqa: S608
                                    "ORDER BY created_at", states).fetchall()
            return [_plan(row) for row in rows]
        result: list[PlanRecord] = await self._run(select)
        return result

    async def commands_live_after(self, now: float, ttl: float) -> dict[str, float]:
        """plan id → latest expiry of its commands that agents could still accept (issued within ``ttl``)."""
        def select() -> dict[str, float]:
            rows = self._db.execute("SELECT plan_id, MAX(issued_at) FROM commands WHERE issued_at > ? "
                                    "GROUP BY plan_id", (now - ttl,)).fetchall()
            return {plan_id: float(issued) + ttl for plan_id, issued in rows}
        result: dict[str, float] = await self._run(select)
        return result

    # --- pause, silences, quarantines -----------------------------------------------------------

    async def set_pause(self, paused: bool, reason: str) -> None:
        def write() -> None:
            self._db.execute("INSERT INTO meta(name, value) VALUES ('paused', ?) ON CONFLICT(name) "
                             "DO UPDATE SET value = excluded.value", (int(paused),))
            self._db.execute("INSERT INTO notes(name, text) VALUES ('pause_reason', ?) ON CONFLICT(name) "
                             "DO UPDATE SET text = excluded.text", (reason,))
        await self._write(write)

    async def get_pause(self) -> tuple[bool, str]:
        def read() -> tuple[bool, str]:
            row = self._db.execute("SELECT value FROM meta WHERE name = 'paused'").fetchone()
            note = self._db.execute("SELECT text FROM notes WHERE name = 'pause_reason'").fetchone()
            return bool(row and row[0]), note[0] if note else ""
        result: tuple[bool, str] = await self._run(read)
        return result

    async def save_silence(self, silence: SilenceRecord) -> None:
        def write() -> None:
            self._db.execute(
                "INSERT INTO silences(id, matchers, starts_at, ends_at, comment, author, created_at) VALUES "
                "(?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET ends_at = excluded.ends_at",
                (silence.id, _json(silence.matchers), silence.starts_at, silence.ends_at, silence.comment,
                 silence.author, silence.created_at))
        await self._write(write)

    async def list_silences(self) -> list[SilenceRecord]:
        def select() -> list[SilenceRecord]:
            rows = self._db.execute("SELECT id, matchers, starts_at, ends_at, comment, author, created_at "
                                    "FROM silences ORDER BY created_at").fetchall()
            return [SilenceRecord(i, json.loads(m), s, e, c, a, t) for i, m, s, e, c, a, t in rows]
        result: list[SilenceRecord] = await self._run(select)
        return result

    async def save_quarantine(self, rule: str, target: str, until: float, reason: str) -> None:
        def write() -> None:
            self._db.execute("INSERT INTO quarantines(rule, target, until, reason) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(rule, target) DO UPDATE SET until = excluded.until, "
                             "reason = excluded.reason", (rule, target, until, reason))
        await self._write(write)

    async def list_quarantines(self) -> list[tuple[str, str, float, str]]:
        def select() -> list[tuple[str, str, float, str]]:
            rows = self._db.execute("SELECT rule, target, until, reason FROM quarantines ORDER BY until").fetchall()
            return [(r, t, float(u), why) for r, t, u, why in rows]
        result: list[tuple[str, str, float, str]] = await self._run(select)
        return result

    async def save_placement(self, placement: PlacementRecord) -> None:
        def write() -> None:
            self._db.execute("INSERT INTO placements(unit, node, fence_after, since) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(unit) DO UPDATE SET node = excluded.node, "
                             "fence_after = excluded.fence_after, since = excluded.since",
                             (placement.unit, placement.node, placement.fence_after, placement.since))
        await self._write(write)

    async def list_placements(self) -> list[PlacementRecord]:
        def select() -> list[PlacementRecord]:
            rows = self._db.execute("SELECT unit, node, fence_after, since FROM placements ORDER BY unit").fetchall()
            return [PlacementRecord(u, n, float(f), float(t)) for u, n, f, t in rows]
        result: list[PlacementRecord] = await self._run(select)
        return result

    async def save_replicas(self, records: Sequence[ReplicaRecord]) -> int:
        """One controller owns every node here: nothing to fence."""
        def write() -> int:
            for record in records:
                self._db.execute(
                    "INSERT INTO dataset_replicas(dataset, node, summary, online, http, epoch, seq, changed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, (SELECT coalesce(max(seq), 0) + 1 FROM dataset_replicas), ?) "
                    "ON CONFLICT(dataset, node) DO UPDATE SET summary = excluded.summary, online = excluded.online, "
                    "http = excluded.http, epoch = excluded.epoch, seq = excluded.seq, "
                    "changed_at = excluded.changed_at",
                    (record.dataset, record.node, record.summary, int(record.online), record.http, record.epoch,
                     time.time()))
            return len(records)
        return await self._write(write)

    async def forget_replicas(self, *, older_than: float) -> int:
        def delete() -> int:
            return self._db.execute("DELETE FROM dataset_replicas WHERE summary IS NULL AND changed_at < ?",
                                    (time.time() - older_than,)).rowcount
        return await self._write(delete)

    async def replicas_changed(self, *, after: int, since: float | None) -> tuple[list[ReplicaRecord], float]:
        def select() -> tuple[list[ReplicaRecord], float]:
            now = time.time()
            rows = self._db.execute(
                "SELECT dataset, node, summary, online, http, epoch, seq FROM dataset_replicas "
                "WHERE seq > ? OR changed_at >= ? ORDER BY seq", (after, -math.inf if since is None else since))
            return [ReplicaRecord(d, n, s, bool(o), h, int(e), int(q)) for d, n, s, o, h, e, q in rows], now
        result: tuple[list[ReplicaRecord], float] = await self._run(select)
        return result

    async def record_command(self, *, key: str, command_id: str, plan_id: str, node: str, epoch: int,
                             issued_at: float, payload: bytes, also: tuple[str, int] | None = None) -> bool:
        """Record a command before it is published; False if its idempotency key was already issued. ``also``
        is for stores shared by controllers; this one has a single controller and no other fence."""
        def insert() -> bool:
            try:
                self._db.execute(
                    "INSERT INTO commands(key, command_id, plan_id, node, epoch, issued_at, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", (key, command_id, plan_id, node, epoch, issued_at, payload))
            except sqlite3.IntegrityError:  # the failed statement undid itself; the batch goes on
                return False
            return True
        return await self._write(insert)


    # --- the notification log (``controller.notify.claims``) -------------------------------------

    async def claim_notification(self, *, key: str, incident_id: int, event: str, destination: str,
                                 at: float) -> bool:
        """Claim a notification before it is sent; False if its key was claimed before (it is not sent again).

        At most once: a claim whose claimer died before sending stays ``claimed`` and is never handed out
        again (``controller.notify.claims`` says why)."""
        def insert() -> bool:
            cursor = self._db.execute(
                "INSERT INTO notification_log(key, incident_id, event, destination, state, claimed_at) "
                "VALUES (?, ?, ?, ?, 'claimed', ?) ON CONFLICT(key) DO NOTHING",
                (key, incident_id, event, destination, at))
            return cursor.rowcount == 1
        return await self._write(insert)

    async def finish_notifications(self, keys: Sequence[str], *, outcome: str, at: float) -> None:
        """Mark claimed notifications with the outcome of the message that carried them (``sent``...)."""
        def update() -> None:
            self._db.executemany("UPDATE notification_log SET state = ?, finished_at = ? "
                                 "WHERE key = ? AND state = 'claimed'", [(outcome, at, key) for key in keys])
        await self._write(update)


_INCIDENT_COLUMNS = "id, key, kind, node, unit, severity, summary, rule, state, opened_at, resolved_at"
_PLAN_COLUMNS = "id, incident_id, rule, attempt, state, created_at, updated_at, detail, rung, action, mode, deadline"


def _incident(row: tuple[Any, ...]) -> Incident:
    return Incident(*row)


def _plan(row: tuple[Any, ...]) -> PlanRecord:
    plan_id, incident_id, rule, attempt, state, created_at, updated_at, detail, rung, action, mode, deadline = row
    return PlanRecord(id=plan_id, incident_id=incident_id, rule=rule, attempt=attempt, state=state,
                      created_at=created_at, updated_at=updated_at, detail=json.loads(detail), rung=rung,
                      action=action, mode=mode, deadline=deadline)


def _json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
