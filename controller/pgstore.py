"""The state store on PostgreSQL, for several controllers sharing one fleet (``[store] url``).

The same ``Store`` protocol as ``controller.store.SqliteStore``, with the same
meaning: one unresolved incident per key, hash-chained timelines
(``controller.audit``), plans, commands whose idempotency key is unique
(``record_command`` answers False for a key already issued, by any
controller), silences, quarantines, placements, dataset replicas, the pause and the epoch. What
differs is what PostgreSQL gives for free or asks for:

- **Driver**: asyncpg, through its connection pool (``POOL_SIZE``), chosen by
  measurement (``bench/store.py --postgres URL --drivers``): the store's
  statements for 500 incident openings cost the client 0.26 s of CPU on
  asyncpg and 0.50 s on psycopg 3 (async, binary build, every statement
  prepared), 0.61 s and 0.85 s of wall clock. The controller's CPU is what a
  fleet runs out of first, and asyncpg halves the store's share of it.
- **Group commit**, as in the SQLite store: one writer takes every write
  queued while it was busy (up to ``max_batch``) and runs them, in the order
  they were made, in one transaction; a write's await returns once that
  transaction committed. A batch first runs without savepoints (PostgreSQL
  answers each statement over the network, and a savepoint costs two round
  trips per write); if any write in it fails, the transaction is rolled back
  and the batch runs again with a savepoint around each write, so a failing
  write fails its own caller only. Write functions therefore touch nothing
  but the database.
- **Concurrency between controllers** is the database's: an append locks its
  incident's row (``FOR UPDATE``) before reading the chain head, so two
  controllers appending to one incident chain one after the other; two
  opening one key meet in the unique index and the second gets the first's
  incident; ``next_epoch`` is one atomic upsert.
- **Connections come and go**: a batch that loses its connection before its
  COMMIT is sent, or that PostgreSQL chose as a deadlock victim, runs again
  on another connection (``ATTEMPTS`` in all); the pool replaces dead
  connections, so nothing needs reopening after a server restart. A
  connection lost *during* COMMIT leaves the outcome unknown, and the callers
  are told so: nothing is ever acknowledged that was not committed.
- **The audit trail is append-only in the database**: a trigger refuses
  UPDATE, DELETE and TRUNCATE on ``timeline``, whoever connects. Only the
  table's owner can switch it off, and the hash chain still shows what was
  changed then (``selfheal audit verify --store URL``).
- **Schema migrations**: ``MIGRATIONS`` is an ordered list of SQL steps;
  ``migrate`` applies the ones a database lacks, in one transaction holding
  an advisory lock, and records each in ``schema_version``, so controllers
  starting together apply each step once. A database newer than this code is
  refused rather than written with an older idea of its schema.

Timeline data is stored as TEXT, not jsonb: the chain hashes the exact JSON
text, which jsonb would reformat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

from controller.audit import ChainProblem, chain_hash, genesis, verify_chain
from controller.ownership import NotOwner
from controller.store import (
    _INCIDENT_COLUMNS,
    _PLAN_COLUMNS,
    MAX_BATCH,
    Incident,
    IncidentDetail,
    IncidentState,
    PlacementRecord,
    PlanRecord,
    ReplicaRecord,
    SilenceRecord,
    TimelineEntry,
    _incident,
    _json,
    _plan,
)
from selfheal.config_checks import redact_url
from selfheal.errors import StoreError
from selfheal.logs import RateLimiter, get_logger
from selfheal.wire import bucket_of

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]
    _Write: TypeAlias = tuple[Callable[[Connection], Awaitable[Any]], asyncio.Future[Any]]
    _Outcome: TypeAlias = tuple[asyncio.Future[Any], Any, BaseException | None]

T = TypeVar("T")

POOL_SIZE = 5
"""Connections per controller: one at a time writes (the group commit), the others serve reads (API, recovery)."""
ATTEMPTS = 3
"""Runs of a batch that lost its connection before committing, or was a deadlock's victim, before it fails."""
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 15.0
"""Seconds one statement may take; past it the statement is cancelled and its caller told."""
SCHEMA_LOCK = 0x5E1F_4EA1
"""The advisory lock key held while migrating (``pg_advisory_xact_lock``): one migrator at a time."""

log = get_logger("store")

# --- schema ---------------------------------------------------------------------------------------

SCHEMA_1 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE notes (name TEXT PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE incidents (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    node TEXT NOT NULL,
    unit TEXT,
    severity TEXT NOT NULL,
    summary TEXT NOT NULL,
    rule TEXT,
    state TEXT NOT NULL CHECK (state IN ('open', 'failed', 'resolved')),
    opened_at DOUBLE PRECISION NOT NULL,
    resolved_at DOUBLE PRECISION,
    audit_head TEXT,
    audit_count INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX one_unresolved_incident_per_key ON incidents(key) WHERE state <> 'resolved';
CREATE INDEX incidents_by_state ON incidents(state, id);
CREATE TABLE timeline (
    incident_id BIGINT NOT NULL REFERENCES incidents(id),
    seq INTEGER NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (incident_id, seq)
);
CREATE FUNCTION refuse_timeline_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % on timeline refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER timeline_is_append_only BEFORE UPDATE OR DELETE ON timeline
    FOR EACH ROW EXECUTE FUNCTION refuse_timeline_change();
CREATE TRIGGER timeline_is_never_truncated BEFORE TRUNCATE ON timeline
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_timeline_change();
CREATE TABLE plans (
    id TEXT PRIMARY KEY,
    incident_id BIGINT NOT NULL REFERENCES incidents(id),
    rule TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    rung INTEGER NOT NULL DEFAULT 0,
    action TEXT NOT NULL DEFAULT '',
    mode TEXT NOT NULL DEFAULT 'auto',
    deadline DOUBLE PRECISION NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX plans_by_incident ON plans(incident_id, attempt);
CREATE INDEX plans_by_creation ON plans(created_at);
CREATE INDEX plans_by_state ON plans(state);
CREATE TABLE silences (
    id TEXT PRIMARY KEY,
    matchers TEXT NOT NULL,
    starts_at DOUBLE PRECISION NOT NULL,
    ends_at DOUBLE PRECISION NOT NULL,
    comment TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE quarantines (
    rule TEXT NOT NULL,
    target TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (rule, target)
);
CREATE TABLE placements (
    unit TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    fence_after DOUBLE PRECISION NOT NULL,
    since DOUBLE PRECISION NOT NULL
);
CREATE TABLE commands (
    key TEXT PRIMARY KEY,
    command_id TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    node TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    issued_at DOUBLE PRECISION NOT NULL,
    payload BYTEA NOT NULL
);
CREATE INDEX commands_by_issue ON commands(issued_at);
"""

SCHEMA_2 = """
CREATE TABLE controller_members (
    id TEXT PRIMARY KEY,
    started_at TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE bucket_leases (
    bucket INTEGER PRIMARY KEY CHECK (bucket >= 0 AND bucket < 64),
    owner TEXT,
    epoch BIGINT NOT NULL CHECK (epoch >= 0),
    expires_at TIMESTAMPTZ NOT NULL
);
INSERT INTO bucket_leases(bucket, owner, epoch, expires_at)
    SELECT b, NULL, COALESCE((SELECT value FROM meta WHERE name = 'epoch'), 0), '-infinity'
    FROM generate_series(0, 63) AS b;
CREATE FUNCTION refuse_epoch_regression() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR NEW.epoch < OLD.epoch OR NEW.bucket <> OLD.bucket THEN
        RAISE EXCEPTION 'a bucket lease''s epoch only grows: % on bucket_leases refused', TG_OP
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER bucket_epochs_only_grow BEFORE UPDATE OR DELETE ON bucket_leases
    FOR EACH ROW EXECUTE FUNCTION refuse_epoch_regression();
CREATE TRIGGER bucket_leases_are_never_truncated BEFORE TRUNCATE ON bucket_leases
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_epoch_regression();
"""
"""Membership and bucket leases (``controller.leases``). One row per topic bucket (``wire.BUCKETS``, 64 in
wire v1), made here once and never deleted, so a bucket's epoch is never reset: a trigger refuses an update
that lowers it and any DELETE or TRUNCATE. Epochs start at the store's controller epoch (``next_epoch``): an
agent that accepted a command from a single controller on this store accepts its bucket's first lease."""

SCHEMA_3 = """
CREATE TABLE notification_log (
    key TEXT PRIMARY KEY,
    incident_id BIGINT NOT NULL,
    event TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'claimed',
    claimed_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION
);
"""
"""The notification log (``controller.notify.claims``): one row per notification and destination, claimed
by the first controller to insert its key, which then sends it; later claims by any controller are refused."""

SCHEMA_4 = """
ALTER TABLE controller_members ADD COLUMN api TEXT NOT NULL DEFAULT '';
"""
"""Where each controller's API answers its peers (``controller.peers``): one fleet view from any controller."""

SCHEMA_5 = """
CREATE SEQUENCE dataset_replica_writes;
CREATE TABLE dataset_replicas (
    dataset TEXT NOT NULL,
    node TEXT NOT NULL,
    summary BYTEA,
    online BOOLEAN NOT NULL,
    http TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    changed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (dataset, node)
);
CREATE INDEX dataset_replicas_by_seq ON dataset_replicas(seq);
CREATE INDEX dataset_replicas_by_change ON dataset_replicas(changed_at);
"""
"""Each node's dataset replicas as its controller last heard them (``controller.shared_replicas``): each record
numbered from a sequence and stamped with the database's clock, so the others read only what changed."""

MIGRATIONS: tuple[tuple[str, str], ...] = (
    ("incidents, timeline (append-only), plans, commands, silences, quarantines, placements, meta", SCHEMA_1),
    ("controller membership and bucket leases (epochs only grow)", SCHEMA_2),
    ("the notification log: each notification claimed once across controllers", SCHEMA_3),
    ("each controller's API address, for its peers", SCHEMA_4),
    ("dataset replicas as each node's controller heard them", SCHEMA_5),
)
"""Ordered (summary, SQL) steps; step ``i`` makes schema version ``i + 1``. Append, never edit a released step."""

REPLICA_BATCH = 500
"""Dataset replica records written in one transaction at most (``save_replicas``)."""
REPLICA_TIMEOUT = 5.0
"""Seconds one such transaction's statements may take (``controller.shared_replicas.OVERLAP`` is longer)."""
_SAVE_REPLICAS = """
INSERT INTO dataset_replicas(dataset, node, summary, online, http, epoch, seq, changed_at)
SELECT r.dataset, r.node, r.summary, r.online, r.http, r.epoch, nextval('dataset_replica_writes'),
       extract(epoch FROM clock_timestamp())
FROM unnest($1::text[], $2::text[], $3::bytea[], $4::boolean[], $5::text[], $6::bigint[], $7::int[])
    WITH ORDINALITY AS r(dataset, node, summary, online, http, epoch, bucket, i)
WHERE NOT $8::boolean OR EXISTS (SELECT 1 FROM bucket_leases l WHERE l.bucket = r.bucket AND l.epoch = r.epoch
                                 AND l.owner IS NOT NULL AND l.expires_at > clock_timestamp())
ORDER BY r.i
ON CONFLICT (dataset, node) DO UPDATE SET summary = excluded.summary, online = excluded.online,
    http = excluded.http, epoch = excluded.epoch, seq = excluded.seq, changed_at = excluded.changed_at
RETURNING 1
"""
"""Each record of a batch, in the batch's order, unless its epoch is not its bucket's live lease."""

CURRENT_EPOCH = """SELECT 1 FROM bucket_leases WHERE bucket = $1 AND epoch = $2 AND owner IS NOT NULL
    AND expires_at > clock_timestamp() FOR SHARE"""
"""A row when epoch ``$2`` is the live grant of bucket ``$1`` (see ``epoch_current``)."""


async def epoch_current(conn: asyncpg.Connection[Any] | Connection, bucket: int, epoch: int) -> bool:
    """Whether ``epoch`` is the live grant of ``bucket`` (held, not expired by the database's clock).

    To fence a write, call it *inside the write's transaction*, before the write: it takes a share lock on
    the lease row, so a takeover (which updates that row) waits until the write committed or rolled back;
    a write under an older epoch is refused since the epoch moved on. The same check as a fragment for a
    conditional statement: ``EXISTS (CURRENT_EPOCH)`` with the parameters renumbered.
    """
    return await conn.fetchrow(CURRENT_EPOCH, bucket, epoch) is not None


async def _require_current(conn: Connection, node: str, epoch: int) -> None:
    """``NotOwner`` unless ``epoch`` is the live lease of ``node``'s bucket (in the write's transaction)."""
    if not await epoch_current(conn, bucket_of(node), epoch):
        raise NotOwner(f"epoch {epoch} is not the live lease of {node}'s bucket {bucket_of(node)}: "
                       "another controller holds it now")


async def migrate(conn: asyncpg.Connection[Any] | Connection,
                  steps: Sequence[tuple[str, str]] = MIGRATIONS) -> int:
    """Bring the schema up to ``len(steps)``; returns how many steps this call applied.

    One transaction under an advisory lock: a second controller starting at the same time waits for the
    first, then finds nothing to do; a step that fails leaves the database as it was.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                           "summary TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        current = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
        if current > len(steps):
            raise StoreError(f"the database's schema is version {current}, newer than this selfheal knows "
                             f"({len(steps)}): upgrade this controller before pointing it at that database")
        for version, (summary, sql) in enumerate(steps[current:], start=current + 1):
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_version(version, summary) VALUES ($1, $2)", version, summary)
        return len(steps) - current


# --- the store ------------------------------------------------------------------------------------


class PostgresStore:
    """Open with ``await PostgresStore.open(url)``; close with ``await store.close()``.

    ``max_batch`` bounds a group commit; 1 gives every write its own transaction. ``on_write_error`` is
    called with a reason (``selfheal.write_failures.REASONS``) for every write PostgreSQL refused or that
    could not reach it.
    """

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], *, url: str, max_batch: int = MAX_BATCH,
                 on_write_error: Callable[[str], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.where = redact_url(url)
        """The server and database, without a password: for messages."""
        self.on_write_error = on_write_error
        self.fence_commands = False
        """Refuse a command whose epoch is not its bucket's live lease (set when bucket leases are on)."""
        self._pool = pool
        self._max_batch = max_batch
        self._queued: deque[_Write] = deque()
        self._writer: asyncio.Task[None] | None = None
        """The one task committing batches, while there are writes queued."""
        self._closed = False
        self._refused = 0
        """Writes refused since the last batch that committed (for ``store.write_recovered``)."""
        self._limiter = RateLimiter(period=60.0)

    @classmethod
    async def open(cls, url: str, *, max_batch: int = MAX_BATCH, pool_size: int = POOL_SIZE,
                   on_write_error: Callable[[str], None] | None = None) -> PostgresStore:
        """Connect, migrate the schema, and return the store; ``StoreError`` says why it cannot."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size, timeout=CONNECT_TIMEOUT,
                                             command_timeout=COMMAND_TIMEOUT,
                                             server_settings={"application_name": "selfheal-controller"})
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot open the state store at {redact_url(url)}: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, StoreError):
                raise
            if isinstance(exc, (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                raise StoreError(f"cannot migrate the state store at {redact_url(url)}: {exc}") from exc
            raise
        if applied:
            log.info("store.migrated", store=redact_url(url), steps=applied, version=len(MIGRATIONS))
        return cls(pool, url=url, max_batch=max_batch, on_write_error=on_write_error)

    async def close(self) -> None:
        """Commit the writes already queued, then close the pool; later writes are refused."""
        self._closed = True
        if self._writer is not None:
            await asyncio.shield(self._writer)
        try:
            await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT)
        except TimeoutError:
            self._pool.terminate()

    # --- reads and writes -------------------------------------------------------------------------

    async def _pooled(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``fn`` on a pooled connection of its own, outside the group commit: a read, or a write that must
        neither wait in nor hold up the group commit (``save_replicas``). A connection lost with the server is
        replaced and ``fn`` run again."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with self._pool.acquire(timeout=COMMAND_TIMEOUT) as conn:
                    return await fn(conn)
            except Exception as exc:
                if _lost(exc) and attempt < ATTEMPTS:
                    continue
                if isinstance(exc, (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                    raise StoreError(f"the state store at {self.where} could not read: {exc}") from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def fetch(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql, *args)
        return await self._pooled(fetch)

    async def _write(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Queue a write; returns once the transaction holding it committed.

        ``fn`` may run more than once (see the module doc), so it does nothing but statements on the
        connection it is given, never begins or ends a transaction, and raises to refuse.
        """
        if self._closed:
            raise StoreError(f"the store is closed (state store at {self.where})")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queued.append((fn, done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name="store-writer")
        return await done

    async def _drain(self) -> None:
        """The writer: commit batches until nothing is queued. Every caller is answered, whatever happens."""
        batch: list[_Write] = []
        try:
            while self._queued:
                batch = []
                while self._queued and len(batch) < self._max_batch:
                    fn, done = self._queued.popleft()
                    if not done.done():  # a caller that gave up before its write started: it does not run
                        batch.append((fn, done))
                if batch:
                    self._settle(await self._commit(batch))
        except BaseException as exc:  # cancelled with the loop: nobody may wait forever
            failure = StoreError(f"the store's writer stopped ({exc!r}): the write may or may not have been kept")
            for _, done in [*batch, *self._queued]:
                if not done.done():
                    done.set_exception(failure)
            self._queued.clear()
            raise
        finally:
            self._writer = None

    async def _commit(self, batch: list[_Write]) -> list[_Outcome]:
        """Run ``batch`` in one transaction, first without savepoints, again with them if a write failed."""
        savepoints = False
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._pool.acquire(timeout=COMMAND_TIMEOUT) as conn:
                    return await self._transaction(conn, batch, savepoints=savepoints)
            except _CommitFailed as failed:
                cause = failed.__cause__ or failed
                if _lost(cause):
                    message = (f"the connection to the state store at {self.where} was lost while committing "
                               f"({cause}): the write may or may not have been kept")
                else:
                    message = f"the state store at {self.where} could not commit ({cause}): nothing was kept"
                return self._refuse(batch, StoreError(message), cause)
            except Exception as exc:  # noqa: BLE001 - whatever failed, every caller of the batch hears of it
                if (_lost(exc) or _transient(exc)) and attempt < ATTEMPTS:
                    continue
                if not savepoints and not _lost(exc) and not _transient(exc):
                    savepoints = True  # a write of the batch failed: find which, keep the others
                    continue
                message = f"the state store at {self.where} could not write ({exc}): nothing of it was kept"
                return self._refuse(batch, StoreError(message), exc)

    async def _transaction(self, conn: Connection, batch: list[_Write], *, savepoints: bool) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        transaction = conn.transaction()
        await transaction.start()
        try:
            for fn, done in batch:
                if not savepoints:
                    outcomes.append((done, await fn(conn), None))
                    continue
                savepoint = conn.transaction()
                await savepoint.start()
                try:
                    value = await fn(conn)
                except Exception as exc:
                    if _lost(exc) or _transient(exc):
                        raise  # not this write's fault: the whole batch again
                    await savepoint.rollback()
                    outcomes.append((done, None, exc))
                else:
                    await savepoint.commit()
                    outcomes.append((done, value, None))
        except BaseException:
            with contextlib.suppress(Exception):
                await transaction.rollback()
            raise
        try:
            await transaction.commit()
        except Exception as exc:
            raise _CommitFailed from exc
        return outcomes

    def _refuse(self, batch: list[_Write], error: StoreError, cause: BaseException) -> list[_Outcome]:
        error.__cause__ = cause
        return [(done, None, error) for _, done in batch]

    def _settle(self, outcomes: list[_Outcome]) -> None:
        """Answer the callers of a finished batch; count and log the writes the database refused."""
        refused: list[BaseException] = []
        for done, value, error in outcomes:
            failure = error
            if isinstance(error, StoreError) and error.__cause__ is not None:
                refused.append(error.__cause__)
            elif isinstance(error, asyncpg.PostgresError):
                refused.append(error)
                failure = StoreError(f"the state store at {self.where} could not write: {error}; "
                                     "nothing of this write was kept")
                failure.__cause__ = error
            if done.done():  # its caller was cancelled while it ran: the write stands regardless
                continue
            if failure is None:
                done.set_result(value)
            else:
                done.set_exception(failure)
        self._account(refused, committed=len(refused) < len(outcomes))

    def _account(self, refused: list[BaseException], *, committed: bool) -> None:
        if committed and self._refused and not refused:
            log.warning("store.write_recovered", store=self.where, refused=self._refused)
            self._refused = 0
        for error in refused:
            reason = _reason(error)
            if self.on_write_error is not None:
                self.on_write_error(reason)
            if self._limiter.allow("write", reason, time.monotonic()):
                log.error("store.write_failed", store=self.where, reason=reason, error=str(error),
                          refused_so_far=self._refused + 1, suppressed_so_far=self._limiter.suppressed)
            self._refused += 1

    # --- epochs -----------------------------------------------------------------------------------

    async def next_epoch(self) -> int:
        """A number that grows with every controller start, whichever controller: the fencing token."""
        async def bump(conn: Connection) -> int:
            return int(await conn.fetchval("INSERT INTO meta(name, value) VALUES ('epoch', 1) ON CONFLICT (name) "
                                           "DO UPDATE SET value = meta.value + 1 RETURNING value"))
        return await self._write(bump)

    # --- incidents --------------------------------------------------------------------------------

    async def open_incident(self, *, key: str, kind: str, node: str, unit: str | None, severity: str,
                            summary: str, rule: str | None, opened_at: float,
                            evidence: dict[str, Any], details: dict[str, Any] | None = None) -> Incident:
        """Open an incident and its first timeline entry, or return the unresolved one for ``key``."""
        opening = {"summary": summary, "rule": rule, "evidence": evidence, **(details or {})}

        async def insert(conn: Connection) -> Incident:
            for _ in range(ATTEMPTS):
                row = await conn.fetchrow(
                    "INSERT INTO incidents(key, kind, node, unit, severity, summary, rule, state, opened_at) "  # noqa: S608
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, 'open', $8) "
                    f"ON CONFLICT (key) WHERE state <> 'resolved' DO NOTHING RETURNING {_INCIDENT_COLUMNS}",
                    key, kind, node, unit, severity, summary, rule, opened_at)
                if row is not None:
                    incident = _incident(tuple(row))
                    await _append(conn, incident.id, prev=genesis(incident.id), count=0, at=opened_at,
                                  kind="opened", data=_json(opening))
                    return incident
                row = await conn.fetchrow(f"SELECT {_INCIDENT_COLUMNS} FROM incidents "  # noqa: S608
                                          "WHERE key = $1 AND state <> 'resolved'", key)
                if row is not None:  # else resolved between the two statements: insert again
                    return _incident(tuple(row))
            raise StoreError(f"incident {key!r} kept being opened and resolved by another controller")
        return await self._write(insert)

    async def set_incident_state(self, incident_id: int, state: IncidentState, *, at: float,
                                 reason: str) -> None:
        async def update(conn: Connection) -> None:
            row = await conn.fetchrow("UPDATE incidents SET state = $1, resolved_at = $2 WHERE id = $3 "
                                      "RETURNING audit_head, audit_count",
                                      state, at if state == "resolved" else None, incident_id)
            if row is None:
                raise StoreError(f"no incident {incident_id}")
            await _append(conn, incident_id, prev=row[0] or genesis(incident_id), count=row[1], at=at, kind=state,
                          data=_json({"reason": reason}))
        await self._write(update)

    async def append_timeline(self, incident_id: int, *, at: float, kind: str, data: dict[str, Any]) -> str:
        """Append one audit entry; returns its hash (the incident's new chain head)."""
        async def append(conn: Connection) -> str:
            row = await conn.fetchrow("SELECT audit_head, audit_count FROM incidents WHERE id = $1 FOR UPDATE",
                                      incident_id)
            if row is None:
                raise StoreError(f"no incident {incident_id}")
            return await _append(conn, incident_id, prev=row[0] or genesis(incident_id), count=row[1], at=at,
                                 kind=kind, data=_json(data))
        return await self._write(append)

    async def get_incident_row(self, incident_id: int) -> Incident | None:
        rows = await self._fetch(f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = $1",  # noqa: S608
                                 incident_id)
        return _incident(tuple(rows[0])) if rows else None

    async def list_incidents(self, *, state: IncidentState | None = None, limit: int = 200) -> list[Incident]:
        if state is None:
            rows = await self._fetch(f"SELECT {_INCIDENT_COLUMNS} FROM incidents "  # noqa: S608
                                     "ORDER BY id DESC LIMIT $1", limit)
        else:
            rows = await self._fetch(f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE state = $1 "  # noqa: S608
                                     "ORDER BY id DESC LIMIT $2", state, limit)
        return [_incident(tuple(row)) for row in rows]

    async def unresolved_incidents(self) -> list[Incident]:
        rows = await self._fetch(f"SELECT {_INCIDENT_COLUMNS} FROM incidents "  # noqa: S608
                                 "WHERE state <> 'resolved' ORDER BY id")
        return [_incident(tuple(row)) for row in rows]

    async def get_incident(self, incident_id: int) -> IncidentDetail | None:
        """The incident, its timeline and its plans, read from one snapshot."""
        async def select(conn: Connection) -> IncidentDetail | None:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow(f"SELECT {_INCIDENT_COLUMNS} FROM incidents "  # noqa: S608
                                          "WHERE id = $1", incident_id)
                if row is None:
                    return None
                entries = await conn.fetch("SELECT at, kind, data, hash FROM timeline WHERE incident_id = $1 "
                                           "ORDER BY seq", incident_id)
                plans = await conn.fetch(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE incident_id = $1 "  # noqa: S608
                                         "ORDER BY attempt, id", incident_id)
            return IncidentDetail(_incident(tuple(row)),
                                  tuple(TimelineEntry(at, kind, json.loads(data), digest)
                                        for at, kind, data, digest in entries),
                                  tuple(_plan(tuple(plan)) for plan in plans))
        return await self._pooled(select)

    # --- plans and commands -----------------------------------------------------------------------

    async def save_plan(self, plan: PlanRecord, *, fence: tuple[str, int] | None = None) -> None:
        """With ``fence_commands`` and a ``fence`` (node, epoch), refused like a command under a stale epoch."""
        async def upsert(conn: Connection) -> None:
            if self.fence_commands and fence is not None:
                await _require_current(conn, *fence)
            await conn.execute(
                "INSERT INTO plans(id, incident_id, rule, attempt, rung, action, mode, deadline, state, created_at,"
                " updated_at, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (id)"
                " DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at, detail = excluded.detail",
                plan.id, plan.incident_id, plan.rule, plan.attempt, plan.rung, plan.action, plan.mode,
                plan.deadline, plan.state, plan.created_at, plan.updated_at, _json(plan.detail))
        await self._write(upsert)

    async def plans_for(self, incident_id: int) -> list[PlanRecord]:
        rows = await self._fetch(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE incident_id = $1 "  # noqa: S608
                                 "ORDER BY attempt, id", incident_id)
        return [_plan(tuple(row)) for row in rows]

    async def list_plans(self, *, limit: int = 200) -> list[PlanRecord]:
        rows = await self._fetch(f"SELECT {_PLAN_COLUMNS} FROM plans ORDER BY created_at DESC, id DESC "  # noqa: S608
                                 "LIMIT $1", limit)
        return [_plan(tuple(row)) for row in rows]

    async def recent_plans(self, since: float) -> list[tuple[Incident, PlanRecord]]:
        """Every plan created since ``since`` with its incident, oldest first (rebuilds target histories)."""
        columns = ", ".join(f"i.{c.strip()}" for c in _INCIDENT_COLUMNS.split(",")) + ", " + ", ".join(
            f"p.{c.strip()}" for c in _PLAN_COLUMNS.split(","))
        rows = await self._fetch(f"SELECT {columns} FROM plans p JOIN incidents i ON i.id = p.incident_id "  # noqa: S608
                                 "WHERE p.created_at >= $1 ORDER BY p.created_at, p.id", since)
        width = len(_INCIDENT_COLUMNS.split(","))
        return [(_incident(tuple(row)[:width]), _plan(tuple(row)[width:])) for row in rows]

    async def get_plan(self, plan_id: str) -> PlanRecord | None:
        rows = await self._fetch(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE id = $1", plan_id)  # noqa: S608
        return _plan(tuple(rows[0])) if rows else None

    async def plans_in(self, states: tuple[str, ...]) -> list[PlanRecord]:
        rows = await self._fetch(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE state = ANY($1::text[]) "  # noqa: S608
                                 "ORDER BY created_at, id", list(states))
        return [_plan(tuple(row)) for row in rows]

    async def commands_live_after(self, now: float, ttl: float) -> dict[str, float]:
        """plan id → latest expiry of its commands that agents could still accept (issued within ``ttl``)."""
        rows = await self._fetch("SELECT plan_id, max(issued_at) FROM commands WHERE issued_at > $1 "
                                 "GROUP BY plan_id", now - ttl)
        return {plan_id: float(issued) + ttl for plan_id, issued in rows}

    async def record_command(self, *, key: str, command_id: str, plan_id: str, node: str, epoch: int,
                             issued_at: float, payload: bytes, also: tuple[str, int] | None = None) -> bool:
        """Record a command before it is published; False if its idempotency key was already issued.

        With ``fence_commands`` (controllers sharing the store through bucket leases), ``epoch`` must be the
        live grant of the node's bucket, checked in the same transaction (``epoch_current``): a controller
        that lost the lease meanwhile (paused, cut off) is refused with ``NotOwner`` and sends nothing.
        ``also`` (node, epoch) is checked the same way: the asking controller's lease on its own node, for a
        start one controller makes for another's migration (``controller.elsewhere``)."""
        async def insert(conn: Connection) -> bool:
            if self.fence_commands:
                await _require_current(conn, node, epoch)
                if also is not None:
                    await _require_current(conn, *also)
            recorded = await conn.fetchval(
                "INSERT INTO commands(key, command_id, plan_id, node, epoch, issued_at, payload) VALUES "
                "($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (key) DO NOTHING RETURNING true",
                key, command_id, plan_id, node, epoch, issued_at, payload)
            return recorded is not None
        return await self._write(insert)

    # --- pause, silences, quarantines, placements -------------------------------------------------

    async def set_pause(self, paused: bool, reason: str) -> None:
        async def write(conn: Connection) -> None:
            await conn.execute("INSERT INTO meta(name, value) VALUES ('paused', $1) ON CONFLICT (name) "
                               "DO UPDATE SET value = excluded.value", int(paused))
            await conn.execute("INSERT INTO notes(name, text) VALUES ('pause_reason', $1) ON CONFLICT (name) "
                               "DO UPDATE SET text = excluded.text", reason)
        await self._write(write)

    async def get_pause(self) -> tuple[bool, str]:
        rows = await self._fetch("SELECT (SELECT value FROM meta WHERE name = 'paused'), "
                                 "(SELECT text FROM notes WHERE name = 'pause_reason')")
        paused, reason = rows[0]
        return bool(paused), reason or ""

    async def save_silence(self, silence: SilenceRecord) -> None:
        async def write(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO silences(id, matchers, starts_at, ends_at, comment, author, created_at) VALUES "
                "($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET ends_at = excluded.ends_at",
                silence.id, _json(silence.matchers), silence.starts_at, silence.ends_at, silence.comment,
                silence.author, silence.created_at)
        await self._write(write)

    async def list_silences(self) -> list[SilenceRecord]:
        rows = await self._fetch("SELECT id, matchers, starts_at, ends_at, comment, author, created_at "
                                 "FROM silences ORDER BY created_at, id")
        return [SilenceRecord(i, json.loads(m), s, e, c, a, t) for i, m, s, e, c, a, t in rows]

    async def save_quarantine(self, rule: str, target: str, until: float, reason: str) -> None:
        async def write(conn: Connection) -> None:
            await conn.execute("INSERT INTO quarantines(rule, target, until, reason) VALUES ($1, $2, $3, $4) "
                               "ON CONFLICT (rule, target) DO UPDATE SET until = excluded.until, "
                               "reason = excluded.reason", rule, target, until, reason)
        await self._write(write)

    async def list_quarantines(self) -> list[tuple[str, str, float, str]]:
        rows = await self._fetch("SELECT rule, target, until, reason FROM quarantines ORDER BY until, rule, target")
        return [(r, t, float(u), why) for r, t, u, why in rows]

    async def save_placement(self, placement: PlacementRecord) -> None:
        async def write(conn: Connection) -> None:
            await conn.execute("INSERT INTO placements(unit, node, fence_after, since) VALUES ($1, $2, $3, $4) "
                               "ON CONFLICT (unit) DO UPDATE SET node = excluded.node, "
                               "fence_after = excluded.fence_after, since = excluded.since",
                               placement.unit, placement.node, placement.fence_after, placement.since)
        await self._write(write)

    async def list_placements(self) -> list[PlacementRecord]:
        rows = await self._fetch("SELECT unit, node, fence_after, since FROM placements ORDER BY unit")
        return [PlacementRecord(u, n, float(f), float(t)) for u, n, f, t in rows]

    async def save_replicas(self, records: Sequence[ReplicaRecord]) -> int:
        """Not in the group commit (a takeover writes thousands of records): on a pooled connection of its own, in
        transactions of at most ``REPLICA_BATCH`` records, each at most ``REPLICA_TIMEOUT`` seconds. With
        ``fence_commands``, a record whose epoch is not the live lease of its node's bucket is dropped: the
        lease rows are share-locked first, in bucket order like the lease keeper's claim, so a takeover waits
        for the write and the two never deadlock."""
        ordered = sorted(records, key=lambda r: (bucket_of(r.node), r.node, r.dataset))
        written = 0
        for start in range(0, len(ordered), REPLICA_BATCH):
            batch = ordered[start:start + REPLICA_BATCH]

            async def write(conn: Connection, batch: list[ReplicaRecord] = batch) -> int:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL statement_timeout = {int(REPLICA_TIMEOUT * 1000)}")
                    buckets = sorted({bucket_of(r.node) for r in batch})
                    if self.fence_commands:
                        await conn.execute("SELECT 1 FROM bucket_leases WHERE bucket = ANY($1::int[]) "
                                           "ORDER BY bucket FOR SHARE", buckets)
                    rows = await conn.fetch(_SAVE_REPLICAS, [r.dataset for r in batch], [r.node for r in batch],
                                            [r.summary for r in batch], [r.online for r in batch],
                                            [r.http for r in batch], [r.epoch for r in batch],
                                            [bucket_of(r.node) for r in batch], self.fence_commands)
                    return len(rows)
            written += await self._pooled(write)
        return written

    async def forget_replicas(self, *, older_than: float) -> int:
        async def delete(conn: Connection) -> int:
            status = await conn.execute("DELETE FROM dataset_replicas WHERE summary IS NULL AND changed_at < "
                                        "extract(epoch FROM clock_timestamp()) - $1::float8", older_than)
            return int(status.split()[-1])
        return await self._pooled(delete)

    async def replicas_changed(self, *, after: int, since: float | None) -> tuple[list[ReplicaRecord], float]:
        async def select(conn: Connection) -> tuple[list[ReplicaRecord], float]:
            now = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
            # numbers written into the text, not parameters: a prepared statement's generic plan cannot know how
            # few rows they select, and would scan the whole table (what this read exists to avoid)
            window = f" OR changed_at >= {float(since)!r}" if since is not None else ""
            rows = await conn.fetch("SELECT dataset, node, summary, online, http, epoch, seq FROM dataset_replicas "  # noqa: S608
                                    f"WHERE seq > {int(after)}{window} ORDER BY seq")
            return [ReplicaRecord(d, n, None if s is None else bytes(s), bool(o), h, int(e), int(q))
                    for d, n, s, o, h, e, q in rows], now
        return await self._pooled(select)

    # --- the notification log (``controller.notify.claims``) ---------------------------------------

    async def claim_notification(self, *, key: str, incident_id: int, event: str, destination: str,
                                 at: float) -> bool:
        """Claim a notification before it is sent; False if any controller claimed its key before.

        At most once: a claim whose claimer died before sending stays ``claimed`` and is never handed out
        again (``controller.notify.claims`` says why). Not fenced by epoch: whichever controller claims
        first sends, and the others do not."""
        async def insert(conn: Connection) -> bool:
            claimed = await conn.fetchval(
                "INSERT INTO notification_log(key, incident_id, event, destination, state, claimed_at) VALUES "
                "($1, $2, $3, $4, 'claimed', $5) ON CONFLICT (key) DO NOTHING RETURNING true",
                key, incident_id, event, destination, at)
            return claimed is not None
        return await self._write(insert)

    async def finish_notifications(self, keys: Sequence[str], *, outcome: str, at: float) -> None:
        """Mark claimed notifications with the outcome of the message that carried them (``sent``...)."""
        async def update(conn: Connection) -> None:
            await conn.execute("UPDATE notification_log SET state = $2, finished_at = $3 "
                               "WHERE key = ANY($1::text[]) AND state = 'claimed'", list(keys), outcome, at)
        await self._write(update)


# --- helpers --------------------------------------------------------------------------------------


class _CommitFailed(Exception):
    """COMMIT itself failed (its cause is the reason): the batch is not run again."""


async def _append(conn: Connection, incident_id: int, *, prev: str, count: int, at: float, kind: str,
                  data: str) -> str:
    """Append a chained entry after ``prev`` (entry ``count``) and move the head; the row is locked already."""
    digest = chain_hash(prev, at, kind, data)
    await conn.execute("WITH entry AS (INSERT INTO timeline(incident_id, seq, at, kind, data, prev_hash, hash) "
                       "VALUES ($1, $2, $3, $4, $5, $6, $7)) "
                       "UPDATE incidents SET audit_head = $7, audit_count = $2 WHERE id = $1",
                       incident_id, count + 1, at, kind, data, prev, digest)
    return digest


def _lost(exc: BaseException) -> bool:
    """The connection (or the server) went away: the work may be run again on another connection."""
    if isinstance(exc, asyncpg.QueryCanceledError):  # a statement timeout: the connection is fine
        return False
    return isinstance(exc, (OSError, asyncpg.PostgresConnectionError,
                            asyncpg.exceptions.OperatorInterventionError)) or (
        isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc))


def _transient(exc: BaseException) -> bool:
    """PostgreSQL rolled the transaction back to break a deadlock or a serialisation conflict: run it again."""
    return isinstance(exc, asyncpg.exceptions.TransactionRollbackError)


def _reason(exc: BaseException) -> str:
    """The ``selfheal_store_write_errors_total`` reason of a refused write."""
    if isinstance(exc, asyncpg.exceptions.DiskFullError):
        return "disk_full"
    if _lost(exc) or isinstance(exc, TimeoutError):
        return "io_error"
    if _transient(exc) or isinstance(exc, asyncpg.exceptions.LockNotAvailableError):
        return "busy"
    return "other"


# --- audit ----------------------------------------------------------------------------------------


async def verify_chains(url: str) -> tuple[int, list[ChainProblem]]:
    """Check every incident's chain in a PostgreSQL store: (incidents, problems).

    One read-only snapshot (``REPEATABLE READ``), so controllers writing meanwhile cannot make a chain look
    broken; the timeline is streamed with a cursor, one incident at a time.
    """
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot reach the state store at {redact_url(url)}: {exc}") from exc
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            incidents = await conn.fetch("SELECT id, audit_head, audit_count FROM incidents ORDER BY id")
            heads = {row[0]: (row[1], row[2]) for row in incidents}
            problems: list[ChainProblem] = []
            current: int | None = None
            chain: list[tuple[float, str, str, str, str]] = []
            async for incident_id, at, kind, data, prev_hash, digest in conn.cursor(
                    "SELECT incident_id, at, kind, data, prev_hash, hash FROM timeline ORDER BY incident_id, seq",
                    prefetch=1000):
                if incident_id != current:
                    if current is not None:
                        problems.extend(verify_chain(current, chain, *heads.pop(current)))
                    current, chain = incident_id, []
                chain.append((at, kind, data, prev_hash, digest))
            if current is not None:
                problems.extend(verify_chain(current, chain, *heads.pop(current)))
            for incident_id, (head, count) in heads.items():  # incidents without a single entry
                problems.extend(verify_chain(incident_id, [], head, count))
    except asyncpg.PostgresError as exc:
        raise StoreError(f"cannot read the state store at {redact_url(url)}: {exc}") from exc
    finally:
        await conn.close()
    problems.sort(key=lambda p: (p.incident_id, p.entry))
    return len(incidents), problems
