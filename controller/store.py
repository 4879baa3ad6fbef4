"""The state store: incidents, their timelines, plans and issued commands, in SQLite (WAL).

Everything the controller must not lose across a restart goes through this
one class. SQLite calls run on one dedicated worker thread, so the event loop
only waits and writes are serialised. A PostgreSQL store for HA controllers
would implement the same methods (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from selfheal.errors import StoreError

IncidentState = Literal["open", "failed", "resolved"]
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
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
    resolved_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_unresolved_incident_per_key
    ON incidents(key) WHERE state != 'resolved';
CREATE INDEX IF NOT EXISTS incidents_by_state ON incidents(state, id);
CREATE TABLE IF NOT EXISTS timeline (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id INTEGER NOT NULL REFERENCES incidents(id),
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS timeline_by_incident ON timeline(incident_id, id);
CREATE TABLE IF NOT EXISTS plans (
    id TEXT PRIMARY KEY,
    incident_id INTEGER NOT NULL REFERENCES incidents(id),
    rule TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS plans_by_incident ON plans(incident_id, attempt);
CREATE TABLE IF NOT EXISTS commands (
    key TEXT PRIMARY KEY,
    command_id TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    node TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    issued_at REAL NOT NULL,
    payload BLOB NOT NULL
);
"""


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


@dataclass(frozen=True, slots=True)
class PlanRecord:
    id: str
    incident_id: int
    rule: str
    attempt: int
    state: str
    """running, succeeded, failed, expired."""
    created_at: float
    updated_at: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IncidentDetail:
    incident: Incident
    timeline: tuple[TimelineEntry, ...]
    plans: tuple[PlanRecord, ...]


class SqliteStore:
    """Open with ``await SqliteStore.open(path)``; close with ``await store.close()``."""

    def __init__(self, connection: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._db = connection
        self._executor = executor

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
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
        except sqlite3.Error as exc:
            executor.shutdown(wait=False)
            raise StoreError(f"cannot open {path}: {exc}") from exc
        return cls(db, executor)

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    # --- epochs ---------------------------------------------------------------------------------

    async def next_epoch(self) -> int:
        """A number that grows with every controller start: the fencing token on commands."""
        def bump() -> int:
            with self._db:
                self._db.execute("INSERT INTO meta(name, value) VALUES ('epoch', 1) "
                                 "ON CONFLICT(name) DO UPDATE SET value = value + 1")
                row = self._db.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()
            return int(row[0])
        return int(await self._run(bump))

    # --- incidents ------------------------------------------------------------------------------

    async def open_incident(self, *, key: str, kind: str, node: str, unit: str | None, severity: str,
                            summary: str, rule: str | None, opened_at: float,
                            evidence: dict[str, Any]) -> Incident:
        """Open an incident and its first timeline entry, or return the unresolved one for ``key``."""
        def insert() -> int:
            with self._db:
                row = self._db.execute(
                    "SELECT id FROM incidents WHERE key = ? AND state != 'resolved'", (key,)).fetchone()
                if row is not None:
                    return int(row[0])
                cursor = self._db.execute(
                    "INSERT INTO incidents(key, kind, node, unit, severity, summary, rule, state, opened_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 'open', ?)",
                    (key, kind, node, unit, severity, summary, rule, opened_at))
                incident_id = int(cursor.lastrowid or 0)
                self._db.execute("INSERT INTO timeline(incident_id, at, kind, data) VALUES (?, ?, ?, ?)",
                                 (incident_id, opened_at, "opened",
                                  json.dumps({"summary": summary, "rule": rule, "evidence": evidence})))
                return incident_id
        incident_id = await self._run(insert)
        incident = await self.get_incident_row(incident_id)
        assert incident is not None  # noqa: S101 - just written in the same thread
        return incident

    async def set_incident_state(self, incident_id: int, state: IncidentState, *, at: float,
                                 reason: str) -> None:
        def update() -> None:
            with self._db:
                self._db.execute("UPDATE incidents SET state = ?, resolved_at = ? WHERE id = ?",
                                 (state, at if state == "resolved" else None, incident_id))
                self._db.execute("INSERT INTO timeline(incident_id, at, kind, data) VALUES (?, ?, ?, ?)",
                                 (incident_id, at, state, json.dumps({"reason": reason})))
        await self._run(update)

    async def append_timeline(self, incident_id: int, *, at: float, kind: str, data: dict[str, Any]) -> None:
        await self._run(self._append, incident_id, at, kind, json.dumps(data, default=str))

    def _append(self, incident_id: int, at: float, kind: str, data: str) -> None:
        with self._db:
            self._db.execute("INSERT INTO timeline(incident_id, at, kind, data) VALUES (?, ?, ?, ?)",
                             (incident_id, at, kind, data))

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
            entries = self._db.execute("SELECT at, kind, data FROM timeline WHERE incident_id = ? ORDER BY id",
                                       (incident_id,)).fetchall()
            plans = self._db.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE incident_id = ? "  # noqa: S608
                                     "ORDER BY attempt", (incident_id,)).fetchall()
            return (tuple(TimelineEntry(at, kind, json.loads(data)) for at, kind, data in entries),
                    tuple(_plan(row) for row in plans))
        timeline, plans = await self._run(select)
        return IncidentDetail(incident, timeline, plans)

    # --- plans and commands ---------------------------------------------------------------------

    async def save_plan(self, plan: PlanRecord) -> None:
        def upsert() -> None:
            with self._db:
                self._db.execute(
                    "INSERT INTO plans(id, incident_id, rule, attempt, state, created_at, updated_at, detail)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET state = excluded.state,"
                    " updated_at = excluded.updated_at, detail = excluded.detail",
                    (plan.id, plan.incident_id, plan.rule, plan.attempt, plan.state, plan.created_at,
                     plan.updated_at, json.dumps(plan.detail, default=str)))
        await self._run(upsert)

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

    async def recent_attempts(self, since: float) -> list[tuple[str, str | None, float]]:
        """(node, unit, started at) of every plan started since ``since``, oldest first."""
        def select() -> list[tuple[str, str | None, float]]:
            rows = self._db.execute(
                "SELECT i.node, i.unit, p.created_at FROM plans p JOIN incidents i ON i.id = p.incident_id"
                " WHERE p.created_at >= ? ORDER BY p.created_at", (since,)).fetchall()
            return [(node, unit, float(at)) for node, unit, at in rows]
        result: list[tuple[str, str | None, float]] = await self._run(select)
        return result

    async def record_command(self, *, key: str, command_id: str, plan_id: str, node: str, epoch: int,
                             issued_at: float, payload: bytes) -> bool:
        """Record a command before it is published; False if its idempotency key was already issued."""
        def insert() -> bool:
            try:
                with self._db:
                    self._db.execute(
                        "INSERT INTO commands(key, command_id, plan_id, node, epoch, issued_at, payload)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)", (key, command_id, plan_id, node, epoch, issued_at,
                                                         payload))
            except sqlite3.IntegrityError:
                return False
            return True
        return bool(await self._run(insert))


_INCIDENT_COLUMNS = "id, key, kind, node, unit, severity, summary, rule, state, opened_at, resolved_at"
_PLAN_COLUMNS = "id, incident_id, rule, attempt, state, created_at, updated_at, detail"


def _incident(row: tuple[Any, ...]) -> Incident:
    return Incident(*row)


def _plan(row: tuple[Any, ...]) -> PlanRecord:
    plan_id, incident_id, rule, attempt, state, created_at, updated_at, detail = row
    return PlanRecord(id=plan_id, incident_id=incident_id, rule=rule, attempt=attempt, state=state,
                      created_at=created_at, updated_at=updated_at, detail=json.loads(detail))
