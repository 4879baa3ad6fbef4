"""The state stores: incidents, timelines, plans, commands, epochs, durability.

The tests of the ``Store`` interface run on both stores (``backend``: SQLite on a real file, PostgreSQL
in a throwaway database of the tests' own server, ``tests/integration/postgres.py``); the rest are about
SQLite itself (its journal, its worker thread, a process killed mid-batch). ``test_pgstore.py`` has what
is PostgreSQL's own.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import pytest

from controller.audit import ChainProblem, verify_database
from controller.pgstore import PostgresStore, verify_chains
from controller.placement import Placements
from controller.store import MAX_BATCH, PlanRecord, ReplicaRecord, SqliteStore, Store
from selfheal.errors import StoreError
from tests.conftest import eventually
from tests.integration.postgres import Cluster, throwaway_database

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "selfheal.db"


class Backend(Protocol):
    """One kind of store, and a way to look at its database from outside the store under test."""

    async def open(self, *, max_batch: int = MAX_BATCH) -> Store:
        """A store on the backend's database (again: a restarted controller sees what the last one wrote)."""

    async def row(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        """The first row of ``sql`` (``?`` placeholders), read on a connection of its own: committed data only."""

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]: ...

    async def verify(self) -> tuple[int, list[ChainProblem]]:
        """``selfheal audit verify`` on the database: (incidents, chain problems)."""

    def hold(self, store: Store) -> AbstractAsyncContextManager[None]:
        """Inside, the store's writer is busy with one write, so writes made meanwhile queue up for one batch."""


class SqliteBackend:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self, *, max_batch: int = MAX_BATCH) -> Store:
        return await SqliteStore.open(self.path, max_batch=max_batch)

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.path)) as db:
            return [tuple(row) for row in db.execute(sql, args).fetchall()]

    async def row(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        found = await self.rows(sql, *args)
        return found[0] if found else None

    async def verify(self) -> tuple[int, list[ChainProblem]]:
        return verify_database(self.path)

    def hold(self, store: Store) -> AbstractAsyncContextManager[None]:
        return worker_held(store)


class PostgresBackend:
    def __init__(self, url: str, reader: asyncpg.Pool[Any]) -> None:
        self.url = url
        self.reader = reader
        """Connections of the test's own: they see what other connections committed, nothing else."""

    async def open(self, *, max_batch: int = MAX_BATCH) -> Store:
        return await PostgresStore.open(self.url, max_batch=max_batch)

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        parts = sql.split("?")
        numbered = parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], start=1))
        return [tuple(row) for row in await self.reader.fetch(numbered, *args)]

    async def row(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        found = await self.rows(sql, *args)
        return found[0] if found else None

    async def verify(self) -> tuple[int, list[ChainProblem]]:
        return await verify_chains(self.url)

    @asynccontextmanager
    async def hold(self, store: Store) -> AsyncIterator[None]:
        """Another connection locks an incident's row; the store's writer waits for it inside an append."""
        hold = await store.open_incident(**incident_fields("hold/worker"))
        other = await asyncpg.connect(self.url)
        try:
            locked = other.transaction()
            await locked.start()
            await other.execute("SELECT 1 FROM incidents WHERE id = $1 FOR UPDATE", hold.id)
            held = asyncio.ensure_future(store.append_timeline(hold.id, at=T0, kind="held", data={"n": 0}))
            waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype IN ('tuple', 'transactionid')"
            async def writer_waits() -> bool:
                return bool(await other.fetchval(waiting))
            await eventually(writer_waits, timeout=10, interval=0.01, what="the store's writer to wait for the row")
            try:
                yield
            finally:
                await locked.rollback()
                await held
        finally:
            await other.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield SqliteBackend(db_path)
        return
    cluster: Cluster = request.getfixturevalue("postgres_cluster")
    async with throwaway_database(cluster) as url:
        reader = await asyncpg.create_pool(url, min_size=1, max_size=4)
        try:
            yield PostgresBackend(url, reader)
        finally:
            await reader.close()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = await backend.open()
    yield opened
    await opened.close()


def incident_fields(key: str = "unit_exited/node-a/web", **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"key": key, "kind": "unit_exited", "node": "node-a", "unit": "web",
                              "severity": "critical", "summary": "unit web on node-a killed by SIGKILL",
                              "rule": "restart-exited-unit", "opened_at": T0, "evidence": {"exit_signal": 9}}
    fields.update(changes)
    return fields


def plan(plan_id: str, incident_id: int, attempt: int, state: str = "running", **changes: Any) -> PlanRecord:
    fields: dict[str, Any] = {"id": plan_id, "incident_id": incident_id, "rule": "restart-exited-unit",
                              "attempt": attempt, "state": state, "created_at": T0 + attempt,
                              "updated_at": T0 + attempt, "detail": {"steps": ["restart_unit"]}}
    fields.update(changes)
    return PlanRecord(**fields)


async def test_open_incident_returns_the_new_incident(store: Store) -> None:
    incident = await store.open_incident(**incident_fields())
    assert incident.id >= 1
    assert (incident.key, incident.kind, incident.node, incident.unit, incident.state) == (
        "unit_exited/node-a/web", "unit_exited", "node-a", "web", "open")
    assert (incident.opened_at, incident.resolved_at, incident.rule) == (T0, None, "restart-exited-unit")


async def test_open_incident_is_idempotent_per_key_while_unresolved(store: Store) -> None:
    first = await store.open_incident(**incident_fields())
    again = await store.open_incident(**incident_fields(opened_at=T0 + 5, summary="again"))
    assert again == first
    other = await store.open_incident(**incident_fields("unit_exited/node-a/db", unit="db"))
    assert other.id != first.id
    detail = await store.get_incident(first.id)
    assert detail is not None
    assert [e.kind for e in detail.timeline] == ["opened"]


async def test_a_failed_incident_still_holds_its_key(store: Store) -> None:
    first = await store.open_incident(**incident_fields())
    await store.set_incident_state(first.id, "failed", at=T0 + 1, reason="3 attempts made")
    again = await store.open_incident(**incident_fields(opened_at=T0 + 2))
    assert again.id == first.id
    assert again.state == "failed"


async def test_a_new_incident_opens_after_resolve(store: Store) -> None:
    first = await store.open_incident(**incident_fields())
    await store.set_incident_state(first.id, "resolved", at=T0 + 10, reason="healthy again")
    second = await store.open_incident(**incident_fields(opened_at=T0 + 20))
    assert second.id > first.id
    assert second.state == "open"
    resolved = await store.get_incident_row(first.id)
    assert resolved is not None
    assert (resolved.state, resolved.resolved_at) == ("resolved", T0 + 10)


async def test_the_timeline_keeps_insertion_order(store: Store) -> None:
    incident = await store.open_incident(**incident_fields())
    await store.append_timeline(incident.id, at=T0 + 3, kind="plan", data={"plan": "1-1"})
    await store.append_timeline(incident.id, at=T0 + 2, kind="step", data={"step": "restart_unit", "ok": True})
    await store.append_timeline(incident.id, at=T0 + 4, kind="verified", data={"at": Path("/x")})
    await store.set_incident_state(incident.id, "resolved", at=T0 + 5, reason="healthy again")
    detail = await store.get_incident(incident.id)
    assert detail is not None
    assert [(e.kind, e.at) for e in detail.timeline] == [
        ("opened", T0), ("plan", T0 + 3), ("step", T0 + 2), ("verified", T0 + 4), ("resolved", T0 + 5)]
    assert detail.timeline[0].data == {"summary": "unit web on node-a killed by SIGKILL",
                                       "rule": "restart-exited-unit", "evidence": {"exit_signal": 9}}
    assert detail.timeline[2].data == {"step": "restart_unit", "ok": True}
    assert detail.timeline[3].data == {"at": "/x"}  # non-JSON values are stored as text
    assert detail.timeline[4].data == {"reason": "healthy again"}
    assert detail.incident.state == "resolved"


async def test_set_state_failed_has_no_resolved_at(store: Store) -> None:
    incident = await store.open_incident(**incident_fields())
    await store.set_incident_state(incident.id, "failed", at=T0 + 9, reason="gave up")
    row = await store.get_incident_row(incident.id)
    assert row is not None
    assert (row.state, row.resolved_at) == ("failed", None)


async def test_list_by_state_newest_first(store: Store) -> None:
    a = await store.open_incident(**incident_fields("k/a"))
    b = await store.open_incident(**incident_fields("k/b"))
    c = await store.open_incident(**incident_fields("k/c"))
    await store.set_incident_state(a.id, "resolved", at=T0 + 1, reason="ok")
    await store.set_incident_state(b.id, "failed", at=T0 + 1, reason="gave up")
    assert [i.id for i in await store.list_incidents()] == [c.id, b.id, a.id]
    assert [i.id for i in await store.list_incidents(state="open")] == [c.id]
    assert [i.id for i in await store.list_incidents(state="failed")] == [b.id]
    assert [i.id for i in await store.list_incidents(state="resolved")] == [a.id]
    assert [i.id for i in await store.list_incidents(limit=2)] == [c.id, b.id]
    assert [i.id for i in await store.unresolved_incidents()] == [b.id, c.id]


async def test_unknown_incident_is_none(store: Store) -> None:
    assert await store.get_incident(4242) is None
    assert await store.get_incident_row(4242) is None


async def test_plans_upsert(store: Store) -> None:
    incident = await store.open_incident(**incident_fields())
    await store.save_plan(plan("1-1", incident.id, 1))
    await store.save_plan(plan("1-2", incident.id, 2))
    await store.save_plan(plan("1-1", incident.id, 1, state="failed", updated_at=T0 + 40,
                               detail={"reason": "not healthy within 30s"}, created_at=T0 + 999))
    plans = await store.plans_for(incident.id)
    assert [(p.id, p.attempt, p.state) for p in plans] == [("1-1", 1, "failed"), ("1-2", 2, "running")]
    assert plans[0].created_at == T0 + 1  # the first write's creation time stays
    assert plans[0].updated_at == T0 + 40
    assert plans[0].detail == {"reason": "not healthy within 30s"}
    detail = await store.get_incident(incident.id)
    assert detail is not None
    assert [p.id for p in detail.plans] == ["1-1", "1-2"]
    assert [p.id for p in await store.list_plans()] == ["1-2", "1-1"]


async def test_recent_attempts_span_incidents_of_the_target(store: Store) -> None:
    first = await store.open_incident(**incident_fields())
    await store.save_plan(plan("1-1", first.id, 1, created_at=T0 + 1))
    await store.set_incident_state(first.id, "resolved", at=T0 + 2, reason="ok")
    second = await store.open_incident(**incident_fields(opened_at=T0 + 3))
    await store.save_plan(plan("2-1", second.id, 1, created_at=T0 + 4))
    await store.save_plan(plan("2-2", second.id, 2, created_at=T0 + 0.5))
    rows = await store.recent_plans(T0)
    assert [(i.id, p.id, p.created_at) for i, p in rows] == [(second.id, "2-2", T0 + 0.5), (first.id, "1-1", T0 + 1),
                                                             (second.id, "2-1", T0 + 4)]
    assert [p.id for _, p in await store.recent_plans(T0 + 1)] == ["1-1", "2-1"]


async def test_record_command_refuses_a_duplicate_key(store: Store) -> None:
    incident = await store.open_incident(**incident_fields())
    await store.save_plan(plan("1-1", incident.id, 1))
    command: dict[str, Any] = {"command_id": "c1", "plan_id": "1-1", "node": "node-a", "epoch": 1, "issued_at": T0,
               "payload": b'{"v":1}'}
    assert await store.record_command(key="key-1", **command) is True
    assert await store.record_command(key="key-1", **{**command, "command_id": "c2", "epoch": 2}) is False
    assert await store.record_command(key="key-2", **command) is True


async def test_next_epoch_grows_across_close_and_reopen(backend: Backend) -> None:
    store = await backend.open()
    try:
        assert await store.next_epoch() == 1
        assert await store.next_epoch() == 2
    finally:
        await store.close()
    reopened = await backend.open()
    try:
        assert await reopened.next_epoch() == 3
    finally:
        await reopened.close()


async def test_data_survives_close_and_reopen(backend: Backend) -> None:
    store = await backend.open()
    try:
        incident = await store.open_incident(**incident_fields())
        await store.append_timeline(incident.id, at=T0 + 1, kind="plan", data={"plan": "1-1"})
        await store.save_plan(plan("1-1", incident.id, 1))
        assert await store.record_command(key="k", command_id="c", plan_id="1-1", node="node-a", epoch=1,
                                          issued_at=T0, payload=b"x")
    finally:
        await store.close()
    reopened = await backend.open()
    try:
        detail = await reopened.get_incident(incident.id)
        assert detail is not None
        assert detail.incident == incident
        assert [e.kind for e in detail.timeline] == ["opened", "plan"]
        assert [p.id for p in detail.plans] == ["1-1"]
        assert await reopened.record_command(key="k", command_id="c", plan_id="1-1", node="node-a", epoch=2,
                                             issued_at=T0, payload=b"x") is False
        assert (await reopened.open_incident(**incident_fields())).id == incident.id
    finally:
        await reopened.close()


async def test_the_journal_mode_is_wal(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    await store.open_incident(**incident_fields())
    with closing(sqlite3.connect(db_path)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT count(*) FROM incidents").fetchone()[0] == 1
    assert (db_path.parent / (db_path.name + "-wal")).exists()
    await store.close()


async def test_open_creates_the_state_directory(db_path: Path) -> None:
    assert not db_path.parent.is_dir()
    store = await SqliteStore.open(db_path)
    await store.close()
    assert db_path.is_file()  # noqa: ASYNC240 - a stat in a test, not on a serving loop


async def test_placements_survive_a_controller_restart_and_follow_each_move(backend: Backend) -> None:
    """Where a movable singleton ran is what a restarted controller needs to migrate it off a dead node."""
    store = await backend.open()
    placements = Placements()
    placements.observe({"predict": {"node-a": 12.0}}, {"predict": {"node-a"}}, now=T0)
    await placements.save(store)
    await store.close()

    store = await backend.open()  # a new controller
    restored = Placements()
    await restored.load(store)
    assert [(p.unit, p.node, p.fence_after) for p in restored.placements()] == [("predict", "node-a", 12.0)]
    restored.observe({"predict": {"node-b": 12.0}}, {"predict": {"node-b"}}, now=T0 + 5)  # migrated: node-a is gone
    await restored.save(store)
    assert [(p.unit, p.node) for p in await store.list_placements()] == [("predict", "node-b")]
    await store.close()



async def test_replica_records_are_read_back_by_what_changed_since_the_last_read(backend: Backend) -> None:
    """What several controllers use to compare dataset replicas they hear apart (``controller.shared_replicas``):
    a read returns the records written after the last sequence number seen (or within the overlap), each record
    numbered above every earlier one, a dataset no longer held as a record without summary."""
    store = await backend.open()

    def record(node: str, summary: bytes | None) -> ReplicaRecord:
        return ReplicaRecord("train", node, summary, True, f"{node}:8080", 1)
    assert await store.save_replicas([record("node-a", b'{"name":"train"}'), record("node-b", b"b1")]) == 2
    first, now = await store.replicas_changed(after=0, since=None)
    assert sorted((r.node, r.summary, r.http) for r in first) == [("node-a", b'{"name":"train"}', "node-a:8080"),
                                                                  ("node-b", b"b1", "node-b:8080")]
    last = max(r.seq for r in first)
    nothing, _ = await store.replicas_changed(after=last, since=now + 3600)  # nothing after it, nor in the window
    assert nothing == []
    await store.save_replicas([record("node-b", None)])
    changed, _ = await store.replicas_changed(after=last, since=now + 3600)
    assert [(r.node, r.summary) for r in changed] == [("node-b", None)]
    assert changed[0].seq > last
    again, _ = await store.replicas_changed(after=changed[0].seq, since=now - 60)  # the overlap reads them again
    assert {r.node for r in again} == {"node-a", "node-b"}
    assert await store.forget_replicas(older_than=3600) == 0  # a record without summary is kept a while
    await store.close()
    reopened = await backend.open()
    kept, _ = await reopened.replicas_changed(after=0, since=None)
    assert sorted((r.node, r.summary or b"") for r in kept) == [("node-a", b'{"name":"train"}'), ("node-b", b"")]
    assert await reopened.forget_replicas(older_than=-60) == 1  # then deleted; records with a summary stay
    kept, _ = await reopened.replicas_changed(after=0, since=None)
    assert [r.node for r in kept] == ["node-a"]
    await reopened.close()


# --- group commit -------------------------------------------------------------------------------


class Gate:
    """A timeline value whose encoding (done on the store's worker) holds the worker until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __str__(self) -> str:
        self.entered.set()
        if not self.release.wait(timeout=30):
            raise TimeoutError("the gate was never released")
        return "gate"


@asynccontextmanager
async def worker_held(store: Store) -> AsyncIterator[None]:
    """Inside, the worker is busy with one write, so the writes made meanwhile queue up for one batch."""
    hold = await store.open_incident(**incident_fields("hold/worker"))
    gate = Gate()
    held = asyncio.ensure_future(store.append_timeline(hold.id, at=T0, kind="held", data={"gate": gate}))
    assert await asyncio.to_thread(gate.entered.wait, 10), "the worker never took the gated write"
    try:
        yield
    finally:
        gate.release.set()
        await held


def queued(*writes: Coroutine[Any, Any, Any]) -> list[asyncio.Future[Any]]:
    return [asyncio.ensure_future(write) for write in writes]


class Unencodable:
    def __str__(self) -> str:
        raise ValueError("this value cannot be written")


@pytest.mark.parametrize("max_batch", [1, 3, MAX_BATCH])
async def test_writes_made_at_once_all_commit_in_order_and_the_chains_verify(backend: Backend, max_batch: int) -> None:
    """Each await returns only once its write is committed: another connection (which sees only committed
    data) already finds it. Appends to one incident sharing a batch chain in the order they were made."""
    store = await backend.open(max_batch=max_batch)
    committed = backend.row

    async def opening(i: int) -> None:
        incident = await store.open_incident(**incident_fields(f"node_offline/n{i}", opened_at=T0 + i))
        assert await committed("SELECT key FROM incidents WHERE id = ?", incident.id) == (f"node_offline/n{i}",)
        for seq in range(2, 5):
            digest = await store.append_timeline(incident.id, at=T0 + i, kind="notice", data={"seq": seq})
            assert await committed("SELECT hash FROM timeline WHERE incident_id = ? AND seq = ?",
                                   incident.id, seq) == (digest,)
        await store.save_plan(plan(f"{incident.id}-1", incident.id, 1))
        assert await committed("SELECT state FROM plans WHERE id = ?", f"{incident.id}-1") == ("running",)

    try:
        await asyncio.gather(*(opening(i) for i in range(40)))
        shared = await store.open_incident(**incident_fields("shared"))
        async with backend.hold(store):
            appends = queued(*(store.append_timeline(shared.id, at=T0 + n, kind="step", data={"n": n})
                               for n in range(30)))
            await asyncio.sleep(0)  # every append is queued behind the held write
        digests = await asyncio.gather(*appends)
        detail = await store.get_incident(shared.id)
    finally:
        await store.close()
    assert detail is not None
    assert [e.data for e in detail.timeline[1:]] == [{"n": n} for n in range(30)]
    assert [e.hash for e in detail.timeline[1:]] == digests
    assert await backend.verify() == (42, [])  # 40 openings, the shared incident, the held one


async def test_a_write_that_fails_in_a_batch_fails_only_its_caller(store: Store, backend: Backend) -> None:
    incident = await store.open_incident(**incident_fields())
    await store.save_plan(plan("1-1", incident.id, 1))
    command: dict[str, Any] = {"command_id": "c1", "plan_id": "1-1", "node": "node-a", "epoch": 1,
                               "issued_at": T0, "payload": b"{}"}
    assert await store.record_command(key="key-1", **command)
    async with backend.hold(store):
        writes = queued(
            store.append_timeline(incident.id, at=T0 + 1, kind="step", data={"n": 1}),
            store.record_command(key="key-1", **command),  # already issued
            store.append_timeline(4242, at=T0 + 2, kind="step", data={}),  # no such incident
            store.open_incident(**incident_fields("k/broken", evidence={"bad": Unencodable()})),  # after its INSERT
            store.record_command(key="key-2", **command),
            store.append_timeline(incident.id, at=T0 + 3, kind="step", data={"n": 2}),
        )
        await asyncio.sleep(0)  # all six are queued for one batch
    first, duplicate, unknown, broken, second_key, second = await asyncio.gather(*writes, return_exceptions=True)
    assert duplicate is False  # "already recorded", as the dispatcher expects, and the batch went on
    assert second_key is True
    assert isinstance(unknown, StoreError)
    assert "no incident 4242" in str(unknown)
    assert isinstance(broken, ValueError)
    detail = await store.get_incident(incident.id)
    assert detail is not None
    assert [(e.kind, e.data, e.hash) for e in detail.timeline[1:]] == [
        ("step", {"n": 1}, first), ("step", {"n": 2}, second)]
    # the broken opening's INSERT was rolled back with it
    assert await backend.row("SELECT count(*) FROM incidents WHERE key = 'k/broken'") == (0,)
    assert await backend.rows("SELECT key FROM commands ORDER BY key") == [("key-1",), ("key-2",)]
    assert (await store.open_incident(**incident_fields("k/broken"))).state == "open"
    assert (await backend.verify())[1] == []


async def test_close_commits_the_queued_writes_and_later_writes_are_refused(backend: Backend) -> None:
    store = await backend.open()
    incident = await store.open_incident(**incident_fields())
    async with backend.hold(store):
        appends = queued(*(store.append_timeline(incident.id, at=T0 + n, kind="step", data={"n": n})
                           for n in range(5)))
        closed = asyncio.ensure_future(store.close())
        await asyncio.sleep(0)
    await closed
    assert all(len(digest) == 64 for digest in await asyncio.gather(*appends))
    with pytest.raises(StoreError, match="closed"):
        await store.append_timeline(incident.id, at=T0 + 9, kind="step", data={})
    assert await backend.verify() == (2, [])
    assert await backend.row("SELECT count(*) FROM timeline WHERE incident_id = ?", incident.id) == (6,)


async def test_a_batch_bound_below_one_is_refused(backend: Backend) -> None:
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        await backend.open(max_batch=0)


CRASH_IN_A_BATCH = """
import asyncio, os, signal, sys
from pathlib import Path
from controller.store import SqliteStore
from tests.integration.test_store import incident_fields, queued, worker_held

class Crash:
    def __str__(self):
        os.kill(os.getpid(), signal.SIGKILL)  # on the worker, in the middle of the batch's transaction

async def main():
    store = await SqliteStore.open(Path(sys.argv[1]))
    a = await store.open_incident(**incident_fields("k/a"))
    async with worker_held(store):
        batch = queued(store.append_timeline(a.id, at=1.0, kind="step", data={"n": 1}),
                       store.open_incident(**incident_fields("k/b")),
                       store.append_timeline(a.id, at=2.0, kind="step", data={"n": 2}),
                       store.append_timeline(a.id, at=3.0, kind="step", data={"crash": Crash()}),
                       store.append_timeline(a.id, at=4.0, kind="step", data={"n": 3}))
        await asyncio.sleep(0)
    await asyncio.gather(*batch)

asyncio.run(main())
"""


async def test_a_crash_in_the_middle_of_a_batch_keeps_none_of_it(db_path: Path) -> None:
    """The writes of the batch that ran before the crash are gone with it (their callers were never told
    they were written); everything committed before stays, and the chains verify and go on."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", CRASH_IN_A_BATCH, str(db_path),
                                                   cwd=Path(__file__).parents[2])
    assert await asyncio.wait_for(process.wait(), 60) == -signal.SIGKILL
    assert verify_database(db_path) == (2, [])  # k/a and the held incident; no k/b
    store = await SqliteStore.open(db_path)
    try:
        a = await store.open_incident(**incident_fields("k/a"))
        detail = await store.get_incident(a.id)
        assert detail is not None
        assert [e.kind for e in detail.timeline] == ["opened"]
        assert [i.key for i in await store.unresolved_incidents()] == ["k/a", "hold/worker"]
        await store.append_timeline(a.id, at=5.0, kind="step", data={"n": 4})
        assert (await store.open_incident(**incident_fields("k/b"))).state == "open"
    finally:
        await store.close()
    assert verify_database(db_path) == (3, [])


WRITE_UNTIL_KILLED = """
import asyncio, itertools, sys
from pathlib import Path
from controller.store import SqliteStore
from tests.integration.test_store import incident_fields, plan

async def writer(store, w):
    for i in itertools.count():
        incident = await store.open_incident(**incident_fields(f"w{w}/{i}"))
        print("incident", incident.id, flush=True)
        for n in range(3):
            print("entry", await store.append_timeline(incident.id, at=float(n), kind="step", data={"n": n}),
                  flush=True)
        await store.save_plan(plan(f"{incident.id}-1", incident.id, 1))
        print("plan", f"{incident.id}-1", flush=True)

async def main():
    store = await SqliteStore.open(Path(sys.argv[1]))
    await asyncio.gather(*(writer(store, w) for w in range(16)))

asyncio.run(main())
"""


async def test_every_acknowledged_write_survives_a_kill_and_the_chains_verify(db_path: Path) -> None:
    """A writer killed at an arbitrary moment (most likely inside a batch: its worker is always busy)."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITE_UNTIL_KILLED, str(db_path),
                                                   cwd=Path(__file__).parents[2],
                                                   stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    lines = [await asyncio.wait_for(process.stdout.readline(), 60) for _ in range(400)]
    process.kill()
    rest, _ = await process.communicate()
    acknowledged = [line.decode().split() for line in lines + rest.splitlines(keepends=True) if line.endswith(b"\n")]
    assert len(acknowledged) >= 400
    count, problems = verify_database(db_path)
    assert problems == []
    with closing(sqlite3.connect(db_path)) as db:
        incidents = {row[0] for row in db.execute("SELECT id FROM incidents")}
        entries = {row[0] for row in db.execute("SELECT hash FROM timeline")}
        plans = {row[0] for row in db.execute("SELECT id FROM plans")}
    for kind, value in acknowledged:
        assert value in {"incident": {str(i) for i in incidents}, "entry": entries, "plan": plans}[kind], (
            f"acknowledged {kind} {value} is not in the database")
    assert count == len(incidents) >= 16
