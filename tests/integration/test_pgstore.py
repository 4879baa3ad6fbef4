"""What is the PostgreSQL store's own: the append-only trigger, migrations, several controllers on one
database, a server that restarts under load, and ``selfheal audit verify`` on it.

The interface both stores share is tested in ``test_store.py``; the server is the tests' own
(``tests/integration/postgres.py``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from controller.pgstore import MIGRATIONS, PostgresStore, migrate, verify_chains
from controller.store import SqliteStore
from controller.stores import open_store
from selfheal.cli import main
from selfheal.config import load_config
from selfheal.errors import StoreError
from tests.conftest import eventually
from tests.integration.postgres import Cluster, throwaway_database
from tests.integration.test_store import T0, incident_fields, plan

pytestmark = pytest.mark.integration


@pytest.fixture
async def url(postgres_cluster: Cluster) -> AsyncIterator[str]:
    async with throwaway_database(postgres_cluster) as database:
        yield database


@pytest.fixture
async def store(url: str) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.open(url)
    yield opened
    await opened.close()


async def test_the_timeline_refuses_update_delete_and_truncate_from_any_connection(
        store: PostgresStore, url: str) -> None:
    incident = await store.open_incident(**incident_fields())
    await store.append_timeline(incident.id, at=T0 + 1, kind="step", data={"n": 1})
    other = await asyncpg.connect(url)  # the superuser, even
    try:
        for statement in ("UPDATE timeline SET kind = 'forged' WHERE seq = 2",
                          "DELETE FROM timeline WHERE seq = 2", "TRUNCATE timeline CASCADE"):
            with pytest.raises(asyncpg.RestrictViolationError, match="the audit trail is append-only"):
                await other.execute(statement)
        assert await other.fetchval("SELECT count(*) FROM timeline") == 2
    finally:
        await other.close()
    assert await verify_chains(url) == (1, [])


async def test_audit_verify_reads_a_postgres_store_and_finds_a_forged_entry(
        store: PostgresStore, url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Only someone who owns the table can switch the trigger off; the chain still tells on them."""
    incident = await store.open_incident(**incident_fields())
    await store.append_timeline(incident.id, at=T0 + 1, kind="step", data={"ok": True})
    config = tmp_path / "selfheal.toml"
    config.write_text(f'[store]\nurl = "{url}"\n', encoding="utf-8")
    assert await asyncio.to_thread(main, ["audit", "verify", "--config", str(config)]) == 0
    assert "1 incident(s), every chain intact" in capsys.readouterr().out

    other = await asyncpg.connect(url)
    try:
        await other.execute("ALTER TABLE timeline DISABLE TRIGGER timeline_is_append_only")
        await other.execute("""UPDATE timeline SET data = '{"ok":false}' WHERE seq = 2""")
    finally:
        await other.close()
    assert await asyncio.to_thread(main, ["audit", "verify", "--store", url]) == 1
    out = capsys.readouterr().out
    assert f"incident #{incident.id} entry 2: 'step' entry was altered (hash mismatch)" in out
    assert "1 incident(s), 1 problem(s)" in out


async def test_audit_verify_never_prints_the_password(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with_password = url.replace("postgres@", "postgres:hunter2@")  # trust auth: the password is not needed
    await (await PostgresStore.open(with_password)).close()  # opened once: migrated
    assert await asyncio.to_thread(main, ["audit", "verify", "--store", with_password]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert "postgres:***@" in out


async def test_an_unreachable_server_is_a_store_error_that_hides_the_password(postgres_cluster: Cluster) -> None:
    unreachable = f"postgresql://selfheal:hunter2@127.0.0.1:{postgres_cluster.port + 1}/selfheal"
    with pytest.raises(StoreError, match="cannot open the state store") as refused:
        await PostgresStore.open(unreachable)
    assert "hunter2" not in str(refused.value)
    assert "selfheal:***@" in str(refused.value)


# --- migrations -----------------------------------------------------------------------------------


async def test_migrations_run_once_when_controllers_start_together_and_not_again(url: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(url) for _ in range(4)))
    try:
        incidents = await asyncio.gather(*(s.open_incident(**incident_fields()) for s in stores))
        assert len({i.id for i in incidents}) == 1  # one schema, one database: the same incident
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    reopened = await PostgresStore.open(url)
    await reopened.close()
    conn = await asyncpg.connect(url)
    try:
        versions = await conn.fetch("SELECT version, summary FROM schema_version ORDER BY version")
        assert [(v, s) for v, s in versions] == [(n, summary) for n, (summary, _) in enumerate(MIGRATIONS, 1)]
        assert await migrate(conn) == 0
    finally:
        await conn.close()


async def test_each_migration_step_is_applied_once_in_order_under_concurrency(url: str) -> None:
    """Steps that would fail or double if run twice (a plain CREATE, an INSERT), by five migrators at once."""
    first = (("a log", "CREATE TABLE log (step INTEGER)"), ("step 2", "INSERT INTO log VALUES (2)"))
    later = (*first, ("step 3", "INSERT INTO log VALUES (3)"))
    conns = [await asyncpg.connect(url) for _ in range(5)]
    try:
        assert sorted(await asyncio.gather(*(migrate(c, first) for c in conns))) == [0, 0, 0, 0, 2]
        assert sorted(await asyncio.gather(*(migrate(c, later) for c in conns))) == [0, 0, 0, 0, 1]
        assert [r[0] for r in await conns[0].fetch("SELECT step FROM log")] == [2, 3]
        assert [r[0] for r in await conns[0].fetch("SELECT version FROM schema_version ORDER BY 1")] == [1, 2, 3]
    finally:
        for conn in conns:
            await conn.close()


async def test_a_failed_step_leaves_the_schema_as_it_was(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        broken = (("a log", "CREATE TABLE log (step INTEGER)"), ("broken", "INSERT INTO nowhere VALUES (1)"))
        with pytest.raises(asyncpg.UndefinedTableError):
            await migrate(conn, broken)
        assert await conn.fetchval("SELECT to_regclass('log')") is None
        assert await migrate(conn, broken[:1]) == 1
    finally:
        await conn.close()


async def test_a_database_newer_than_the_code_is_refused(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, (*MIGRATIONS, ("from the future", "CREATE TABLE future (x INTEGER)")))
    finally:
        await conn.close()
    with pytest.raises(StoreError, match=rf"schema is version {len(MIGRATIONS) + 1}, newer than this selfheal"):
        await PostgresStore.open(url)


# --- two controllers, one database ----------------------------------------------------------------


@pytest.fixture
async def two(url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two controllers' stores: separate pools, separate writers, one database."""
    a, b = await PostgresStore.open(url), await PostgresStore.open(url)
    yield a, b
    await asyncio.gather(a.close(), b.close())


async def test_a_command_key_is_recorded_once_across_controllers(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    incident = await a.open_incident(**incident_fields())
    await a.save_plan(plan("1-1", incident.id, 1))
    command: dict[str, Any] = {"command_id": "c", "plan_id": "1-1", "node": "node-a", "issued_at": T0,
                               "payload": b"{}"}
    answers = await asyncio.gather(*(store.record_command(key="node-a/1/0/1", epoch=epoch, **command)
                                     for epoch, store in enumerate([a, b] * 4)))
    assert sorted(answers) == [False] * 7 + [True]
    assert await b.record_command(key="node-a/1/0/1", epoch=99, **command) is False


async def test_controllers_opening_one_key_at_once_share_one_incident(
        two: tuple[PostgresStore, PostgresStore], url: str) -> None:
    a, b = two
    opened = await asyncio.gather(*(store.open_incident(**incident_fields(opened_at=T0 + n))
                                    for n, store in enumerate([a, b] * 5)))
    assert len({incident.id for incident in opened}) == 1
    assert await verify_chains(url) == (1, [])
    detail = await a.get_incident(opened[0].id)
    assert detail is not None
    assert [e.kind for e in detail.timeline] == ["opened"]


async def test_appends_from_two_controllers_interleave_into_one_chain(
        two: tuple[PostgresStore, PostgresStore], url: str) -> None:
    a, b = two
    incident = await a.open_incident(**incident_fields())
    digests = await asyncio.gather(*(store.append_timeline(incident.id, at=T0 + n, kind="step",
                                                           data={"by": name, "n": n})
                                     for n in range(20) for name, store in (("a", a), ("b", b))))
    detail = await b.get_incident(incident.id)
    assert detail is not None
    assert sorted(e.hash for e in detail.timeline[1:]) == sorted(digests)
    assert len(detail.timeline) == 41
    assert await verify_chains(url) == (1, [])


async def test_epochs_from_two_controllers_never_repeat(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    epochs = await asyncio.gather(*(store.next_epoch() for store in [a, b] * 10))
    assert sorted(epochs) == list(range(1, 21))


async def test_what_one_controller_writes_the_other_reads(two: tuple[PostgresStore, PostgresStore]) -> None:
    """Pause, silences, quarantines, placements: mutating calls work from any controller."""
    a, b = two
    await a.set_pause(True, "maintenance window")
    assert await b.get_pause() == (True, "maintenance window")
    await b.save_quarantine("restart-exited-unit", "node-a/web", T0 + 600, "3 failures")
    assert await a.list_quarantines() == [("restart-exited-unit", "node-a/web", T0 + 600, "3 failures")]
    incident = await a.open_incident(**incident_fields())
    await a.save_plan(plan("1-1", incident.id, 1, state="awaiting_approval"))
    assert [p.id for p in await b.plans_in(("awaiting_approval", "running"))] == ["1-1"]


# --- the server goes away -------------------------------------------------------------------------


async def test_connections_killed_by_the_server_are_replaced_without_the_caller_noticing(
        store: PostgresStore, url: str) -> None:
    incident = await store.open_incident(**incident_fields())
    admin = await asyncpg.connect(url)
    try:
        mine = "SELECT pid FROM pg_stat_activity WHERE application_name = 'selfheal-controller' " \
               "AND datname = current_database()"
        pids = [row[0] for row in await admin.fetch(mine)]
        assert pids  # the pool's connection
        await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pool(pid)", pids)

        async def gone() -> bool:  # (the pool may already have connected again: new connections, new pids)
            return not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids)
        await eventually(gone, timeout=10, what="the pool's connections to be terminated")
    finally:
        await admin.close()
    digest = await store.append_timeline(incident.id, at=T0 + 1, kind="step", data={"after": "terminate"})
    detail = await store.get_incident(incident.id)
    assert detail is not None
    assert detail.timeline[-1].hash == digest
    assert await verify_chains(url) == (1, [])


async def test_a_server_crash_and_restart_under_load_loses_nothing_acknowledged() -> None:
    """Writers keep writing while the server is killed (``pg_ctl stop -m immediate``) and started again:
    writes meanwhile fail with StoreError, the store reconnects by itself, and every write that was
    acknowledged (before, during or after) is in the database with its chain intact."""
    cluster = await asyncio.to_thread(Cluster.create)
    try:
        await asyncio.to_thread(cluster.start)
        await _write_through_a_restart(cluster, cluster.url())  # a cluster of its own: its first database
    finally:
        await asyncio.to_thread(cluster.remove)


async def _write_through_a_restart(cluster: Cluster, url: str) -> None:
    store = await PostgresStore.open(url)
    incidents: set[int] = set()
    entries: set[str] = set()
    refused: list[StoreError] = []
    restarted = asyncio.Event()
    after = itertools.count()
    enough = asyncio.Event()

    async def writer(w: int) -> None:
        for i in itertools.count():
            try:
                incident = await store.open_incident(**incident_fields(f"w{w}/{i}"))
                incidents.add(incident.id)
                for n in range(3):
                    entries.add(await store.append_timeline(incident.id, at=T0 + n, kind="step", data={"n": n}))
            except StoreError as exc:
                refused.append(exc)
                await asyncio.sleep(0.05)  # the server is away: try again shortly, as the engine would
                continue
            if restarted.is_set() and next(after) >= 40:
                enough.set()

    writers = [asyncio.create_task(writer(w)) for w in range(8)]
    try:
        await eventually(lambda: len(incidents) >= 40, timeout=30, what="writes before the crash")
        await asyncio.to_thread(cluster.stop, "immediate")
        await asyncio.to_thread(cluster.start)
        restarted.set()
        await asyncio.wait_for(enough.wait(), 60)
    finally:
        for task in writers:
            task.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        await store.close()
    assert refused, "no write saw the server away: the restart was not exercised"
    count, problems = await verify_chains(url)
    assert problems == []
    conn = await asyncpg.connect(url)
    try:
        stored_incidents = {r[0] for r in await conn.fetch("SELECT id FROM incidents")}
        stored_entries = {r[0] for r in await conn.fetch("SELECT hash FROM timeline")}
    finally:
        await conn.close()
    assert count == len(stored_incidents)
    assert incidents <= stored_incidents
    assert entries <= stored_entries


# --- which store ----------------------------------------------------------------------------------


async def test_open_store_follows_the_store_url(url: str, tmp_path: Path) -> None:
    config = tmp_path / "selfheal.toml"
    config.write_text(f'[controller]\nstate_dir = "{tmp_path / "state"}"\n', encoding="utf-8")
    store = await open_store(load_config(config))
    assert isinstance(store, SqliteStore)
    await store.close()
    assert (tmp_path / "state" / "selfheal.sqlite3").is_file()

    config.write_text(f'[controller]\nstate_dir = "{tmp_path / "state"}"\n[store]\nurl = "{url}"\n',
                      encoding="utf-8")
    store = await open_store(load_config(config))
    assert isinstance(store, PostgresStore)
    await store.close()
