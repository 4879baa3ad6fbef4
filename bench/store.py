"""The state store's group commit: many incidents opening at once, batching on and off, SQLite and PostgreSQL.

A rack that loses power opens hundreds of ``node_offline`` incidents
together. Here each opening is what the engine writes for one: an
``open_incident``, three ``append_timeline`` and a ``save_plan``, made one
after another by its own coroutine, with all ``--incidents`` coroutines
started at once. The same workload runs against a fresh database file in a
temp dir twice per round: with the store's default ``max_batch`` (writes
queued while the worker is busy share one transaction) and with
``max_batch=1`` (every write its own transaction). Each figure is the
fastest of ``--repeat`` rounds (the machine is shared; the fastest round is
the least disturbed). A second, smaller workload opens incidents one at a
time, where nothing can be batched: it shows what group commit costs a lone
write. After every run each incident's hash chain is verified
(``controller.audit.verify_database``) and the rows are counted, so a fast
wrong answer fails the bench instead of being reported.

Plan to command: the store's share of the time from a plan proposed to its
first command published: what the engine and the dispatcher write in
between (the ``plan_proposed`` entry, the plan saved as proposed then
running, the ``plan_running`` and ``notice`` entries, the command recorded
under its idempotency key), one plan at a time, median and 95th percentile
over ``--plans`` plans.

``--postgres URL`` runs all of it on PostgreSQL too (``controller.pgstore``),
each round in a new database that the bench creates and drops on that server
(the URL names a database to connect to for that, and a user allowed to
create databases), checked with ``verify_chains``. ``--drivers`` adds the
measurement the store's driver was chosen by: the statements the store sends
for the same openings, written one after another on one connection in
transactions of ``max_batch`` writes (what the group commit makes of them),
through asyncpg and through psycopg 3 (when installed: ``pip install
'psycopg[binary]'``).

    .venv/bin/python bench/store.py [--incidents 500] [--sequential 100] [--plans 200] [--repeat 3]
        [--postgres postgresql://postgres@127.0.0.1/postgres [--drivers]] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from controller.audit import genesis, verify_database
from controller.pgstore import PostgresStore, verify_chains
from controller.store import MAX_BATCH, PlanRecord, SqliteStore, Store

T0 = 1_700_000_000.0
APPENDS = 3
WRITES_PER_OPENING = 2 + APPENDS  # open_incident, the appends, save_plan


async def open_one(store: Store, i: int) -> None:
    """What the engine writes for one new node_offline incident."""
    incident = await store.open_incident(
        key=f"node_offline/rack-1-node-{i:05d}", kind="node_offline", node=f"rack-1-node-{i:05d}", unit=None,
        severity="critical", summary="node silent for 30s", rule="fence-offline-node", opened_at=T0 + i,
        evidence={"last_seen": T0 + i - 30, "offline_after": 30}, details={"labels": {"rack": "1"}})
    for step in range(APPENDS):
        await store.append_timeline(incident.id, at=T0 + i + step, kind="notice",
                                    data={"event": "opened", "step": step, "deliveries": []})
    await store.save_plan(PlanRecord(id=f"{incident.id}-1", incident_id=incident.id, rule="fence-offline-node",
                                     attempt=1, state="proposed", created_at=T0 + i, updated_at=T0 + i,
                                     detail={"steps": ["fence"]}, action="fence"))


async def run(store: Store, *, incidents: int, concurrent: bool) -> float:
    """Seconds to write ``incidents`` openings into a fresh store (closed afterwards)."""
    try:
        started = time.perf_counter()
        if concurrent:
            await asyncio.gather(*(open_one(store, i) for i in range(incidents)))
        else:
            for i in range(incidents):
                await open_one(store, i)
        return time.perf_counter() - started
    finally:
        await store.close()


def check(incidents: int, counted: int, problems: list[Any], entries: int, plans: int) -> None:
    expected = (incidents, incidents * (1 + APPENDS), incidents)
    if problems or (counted, entries, plans) != expected:
        sys.exit(f"wrong database after the run: {(counted, entries, plans)} rows, expected {expected}; "
                 f"chain problems: {problems[:3]}")


Fresh = Callable[[int, int], Awaitable[float]]
"""(incidents, max_batch) → seconds for the concurrent or sequential run on a new store, checked."""


def sqlite_runs(root: Path, *, concurrent: bool) -> Fresh:
    async def fresh(incidents: int, max_batch: int) -> float:
        path = root / f"run-{secrets.token_hex(6)}.db"
        elapsed = await run(await SqliteStore.open(path, max_batch=max_batch), incidents=incidents,
                            concurrent=concurrent)
        with closing(sqlite3.connect(path)) as db:
            entries = db.execute("SELECT count(*) FROM timeline").fetchone()[0]
            plans = db.execute("SELECT count(*) FROM plans").fetchone()[0]
        check(incidents, *verify_database(path), entries, plans)
        return elapsed
    return fresh


def postgres_runs(admin: str, *, concurrent: bool) -> Fresh:
    async def fresh(incidents: int, max_batch: int) -> float:
        async with database(admin) as url:
            elapsed = await run(await PostgresStore.open(url, max_batch=max_batch), incidents=incidents,
                                concurrent=concurrent)
            conn = await asyncpg.connect(url)
            try:
                entries = await conn.fetchval("SELECT count(*) FROM timeline")
                plans = await conn.fetchval("SELECT count(*) FROM plans")
            finally:
                await conn.close()
            check(incidents, *await verify_chains(url), entries, plans)
        return elapsed
    return fresh


@asynccontextmanager
async def database(admin: str) -> AsyncIterator[str]:
    """A new database on the server of ``admin`` (a URL), dropped afterwards; yields its URL."""
    name = f"selfheal_bench_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(admin, name)
        finally:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def with_database(url: str, name: str) -> str:
    """``url`` naming the database ``name`` instead of its own."""
    scheme, sep, rest = url.partition("://")
    authority, _, tail = rest.partition("/")
    _, question, query = tail.partition("?")
    return f"{scheme}{sep}{authority}/{name}{question}{query}"


async def measure(runs: Callable[..., Fresh], *, incidents: int, sequential: int, repeat: int) -> dict[str, float]:
    """The fastest of ``repeat`` rounds of each shape, with and without group commit."""
    figures: dict[str, float] = {}
    for concurrent, count in ((True, incidents), (False, sequential)):
        shape = "concurrent" if concurrent else "sequential"
        fresh = runs(concurrent=concurrent)
        for label, max_batch in (("batched", MAX_BATCH), ("unbatched", 1)):
            figures[f"{shape}_{label}_s"] = min([await fresh(count, max_batch) for _ in range(repeat)])
    return figures


async def plan_to_command(store: Store, plans: int) -> dict[str, float]:
    """Milliseconds of store writes between a plan proposed and its first command recorded (median, p95)."""
    latencies = []
    try:
        for i in range(plans):
            node = f"node-{i:05d}"
            incident = await store.open_incident(
                key=f"unit_exited/{node}/web", kind="unit_exited", node=node, unit="web", severity="critical",
                summary="unit web exited", rule="restart-exited-unit", opened_at=T0 + i, evidence={"exit_code": 1})
            plan = PlanRecord(id=f"{incident.id}-1", incident_id=incident.id, rule="restart-exited-unit", attempt=1,
                              state="proposed", created_at=T0 + i, updated_at=T0 + i,
                              detail={"steps": ["restart_unit"]}, action="restart_unit")
            started = time.perf_counter()
            await store.append_timeline(incident.id, at=T0 + i, kind="plan_proposed",
                                        data={"plan": plan.id, "rule": plan.rule, "steps": ["restart_unit"]})
            await store.save_plan(plan)
            await store.save_plan(dataclasses.replace(plan, state="running", updated_at=T0 + i + 1))
            await store.append_timeline(incident.id, at=T0 + i, kind="plan_running", data={"plan": plan.id})
            await store.append_timeline(incident.id, at=T0 + i, kind="notice", data={"event": "action"})
            if not await store.record_command(key=f"{node}/{incident.id}/0/1", command_id=f"c{i}", plan_id=plan.id,
                                              node=node, epoch=1, issued_at=T0 + i, payload=b"{}" * 200):
                sys.exit("a fresh command key was refused")
            latencies.append(time.perf_counter() - started)
    finally:
        await store.close()
    cuts = statistics.quantiles(latencies, n=20)
    return {"median_ms": round(statistics.median(latencies) * 1000, 3), "p95_ms": round(cuts[-1] * 1000, 3)}


# --- drivers ----------------------------------------------------------------------------------------

DRIVER_WRITES = [  # (statement, what it returns) per write of one opening, as controller.pgstore sends them
    "INSERT INTO incidents(key, kind, node, unit, severity, summary, rule, state, opened_at) "
    "VALUES ($1, 'node_offline', $1, NULL, 'critical', 'silent', 'fence', 'open', $2) "
    "ON CONFLICT (key) WHERE state <> 'resolved' DO NOTHING RETURNING id",
    "SELECT audit_head, audit_count FROM incidents WHERE id = $1 FOR UPDATE",
    "WITH entry AS (INSERT INTO timeline(incident_id, seq, at, kind, data, prev_hash, hash) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7)) UPDATE incidents SET audit_head = $7, audit_count = $2 WHERE id = $1",
    "INSERT INTO plans(id, incident_id, rule, attempt, rung, action, mode, deadline, state, created_at, updated_at, "
    "detail) VALUES ($1, $2, 'fence', 1, 0, 'fence', 'auto', 0, 'proposed', $3, $3, '{}') ON CONFLICT (id) DO UPDATE "
    "SET state = excluded.state, updated_at = excluded.updated_at, detail = excluded.detail",
]


class Driver(Protocol):
    """One connection of a driver, speaking the store's statements (``$n`` placeholders)."""

    async def execute(self, sql: str, *args: Any) -> None: ...
    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None: ...
    async def begin(self) -> None: ...
    async def commit(self) -> None: ...
    async def close(self) -> None: ...


class Asyncpg:
    def __init__(self, conn: asyncpg.Connection[Any]) -> None:
        self.conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        await self.conn.execute(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        row = await self.conn.fetchrow(sql, *args)
        return tuple(row) if row is not None else None

    async def begin(self) -> None:
        await self.conn.execute("BEGIN")

    async def commit(self) -> None:
        await self.conn.execute("COMMIT")

    async def close(self) -> None:
        await self.conn.close()


class Psycopg:
    """psycopg 3's async connection (autocommit off: it begins a transaction itself), prepared statements."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @staticmethod
    def _params(sql: str, args: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
        named = sql
        for n in range(len(args), 0, -1):
            named = named.replace(f"${n}", f"%(p{n})s")
        return named, {f"p{n}": value for n, value in enumerate(args, start=1)}

    async def execute(self, sql: str, *args: Any) -> None:
        await self.conn.execute(*self._params(sql, args))

    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        cursor = await self.conn.execute(*self._params(sql, args))
        row = await cursor.fetchone()
        return tuple(row) if row is not None else None

    async def begin(self) -> None:
        pass  # psycopg begins on the first statement

    async def commit(self) -> None:
        await self.conn.commit()

    async def close(self) -> None:
        await self.conn.close()


async def connect(driver: str, url: str) -> Driver:
    if driver == "asyncpg":
        return Asyncpg(await asyncpg.connect(url))
    import psycopg  # noqa: PLC0415 - optional: only this comparison uses it

    return Psycopg(await psycopg.AsyncConnection.connect(url, prepare_threshold=0))


async def driver_run(driver: str, url: str, incidents: int) -> tuple[float, float]:
    """Seconds for ``incidents`` openings' statements through ``driver``, ``MAX_BATCH`` writes a transaction:
    (wall clock, this process's CPU). The CPU is the driver's own cost; the wall clock adds the server's."""
    conn = await connect(driver, url)
    writes = 0
    try:
        started, cpu = time.perf_counter(), time.process_time()
        await conn.begin()
        for i in range(incidents):
            row = await conn.fetchrow(DRIVER_WRITES[0], f"node_offline/n{i}", T0 + i)
            assert row is not None
            incident_id, head, count = row[0], genesis(row[0]), 0
            for step in range(1 + APPENDS):
                if step:
                    locked = await conn.fetchrow(DRIVER_WRITES[1], incident_id)
                    assert locked is not None
                    head, count = locked
                digest = f"{head[:32]}{step:032d}"
                await conn.execute(DRIVER_WRITES[2], incident_id, count + 1, T0 + i, "notice", "{}", head, digest)
            await conn.execute(DRIVER_WRITES[3], f"{incident_id}-1", incident_id, T0 + i)
            writes += WRITES_PER_OPENING
            if writes % MAX_BATCH < WRITES_PER_OPENING:
                await conn.commit()
                await conn.begin()
        await conn.commit()
        return time.perf_counter() - started, time.process_time() - cpu
    finally:
        await conn.close()


async def compare_drivers(admin: str, incidents: int, repeat: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    for driver in ("asyncpg", "psycopg"):
        if driver == "psycopg":
            try:
                import psycopg  # noqa: F401, PLC0415
            except ImportError:
                print("psycopg 3 is not installed: the driver comparison covers asyncpg only", file=sys.stderr)
                continue
        runs = []
        for _ in range(repeat):
            async with database(admin) as url:
                await (await PostgresStore.open(url)).close()  # the schema
                runs.append(await driver_run(driver, url, incidents))
        figures[f"{driver}_s"] = min(wall for wall, _ in runs)
        figures[f"{driver}_cpu_s"] = min(cpu for _, cpu in runs)
    return figures


# --- main -------------------------------------------------------------------------------------------


async def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="selfheal-store-bench-") as tmp:
        root = Path(tmp)
        result["sqlite"] = await measure(lambda concurrent: sqlite_runs(root, concurrent=concurrent),
                                         incidents=args.incidents, sequential=args.sequential, repeat=args.repeat)
        result["sqlite_plan_to_command"] = await plan_to_command(await SqliteStore.open(root / "plans.db"),
                                                                 args.plans)
    if args.postgres:
        result["postgres"] = await measure(lambda concurrent: postgres_runs(args.postgres, concurrent=concurrent),
                                           incidents=args.incidents, sequential=args.sequential,
                                           repeat=args.repeat)
        async with database(args.postgres) as url:
            result["postgres_plan_to_command"] = await plan_to_command(await PostgresStore.open(url), args.plans)
        if args.drivers:
            result["drivers"] = await compare_drivers(args.postgres, args.incidents, args.repeat)
    return result


def report(name: str, figures: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    writes = args.incidents * WRITES_PER_OPENING
    batched, unbatched = figures["concurrent_batched_s"], figures["concurrent_unbatched_s"]
    lone_batched, lone_unbatched = figures["sequential_batched_s"], figures["sequential_unbatched_s"]
    result = {
        **{k: round(v, 4) for k, v in figures.items()},
        "concurrent_batched_writes_per_s": round(writes / batched),
        "concurrent_unbatched_writes_per_s": round(writes / unbatched),
        "speedup": round(unbatched / batched, 2),
        "sequential_batched_ms_per_write": round(lone_batched / (args.sequential * WRITES_PER_OPENING) * 1000, 3),
        "sequential_unbatched_ms_per_write": round(lone_unbatched / (args.sequential * WRITES_PER_OPENING) * 1000,
                                                   3),
    }
    print(f"{name}: {args.incidents} incidents opening at once ({writes} writes: open + {APPENDS} timeline "
          f"appends + a plan each), fastest of {args.repeat}:")
    print(f"  group commit (max_batch={MAX_BATCH}): {batched:.3f} s  {result['concurrent_batched_writes_per_s']} "
          "writes/s")
    print(f"  one transaction per write (max_batch=1): {unbatched:.3f} s  "
          f"{result['concurrent_unbatched_writes_per_s']} writes/s")
    print(f"  ratio unbatched / batched: {result['speedup']}x")
    print(f"  {args.sequential} incidents opened one at a time (nothing to batch): "
          f"{result['sequential_batched_ms_per_write']} ms per write with group commit, "
          f"{result['sequential_unbatched_ms_per_write']} ms without")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--incidents", type=int, default=500, help="incidents opening at once (default 500)")
    parser.add_argument("--sequential", type=int, default=100,
                        help="incidents opened one at a time, the lone-write check (default 100)")
    parser.add_argument("--plans", type=int, default=200, help="plans timed from proposed to command (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the fastest counts (default 3)")
    parser.add_argument("--postgres", metavar="URL", default="",
                        help="also on PostgreSQL: a server where the bench may create and drop databases")
    parser.add_argument("--drivers", action="store_true", help="with --postgres: compare asyncpg and psycopg 3")
    parser.add_argument("--json", action="store_true", help="end with one line holding a JSON object of the figures")
    args = parser.parse_args()
    if min(args.incidents, args.sequential, args.repeat) < 1 or args.plans < 2:
        parser.error("--incidents, --sequential and --repeat must be at least 1, --plans at least 2")
    if args.drivers and not args.postgres:
        parser.error("--drivers needs --postgres URL")

    figures = asyncio.run(measure_all(args))
    result: dict[str, Any] = {"incidents": args.incidents, "writes": args.incidents * WRITES_PER_OPENING,
                              "max_batch": MAX_BATCH, "repeat": args.repeat, "sequential_incidents": args.sequential,
                              "sqlite": report("SQLite (real file, WAL, synchronous=NORMAL)", figures["sqlite"], args)}
    if "postgres" in figures:
        result["postgres"] = report("PostgreSQL (asyncpg pool, synchronous_commit as the server has it)",
                                    figures["postgres"], args)
    print(f"plan to command ({args.plans} plans, one at a time: 3 timeline appends, 2 plan saves, the command "
          "recorded):")
    for name in ("sqlite", "postgres"):
        if f"{name}_plan_to_command" in figures:
            latency = figures[f"{name}_plan_to_command"]
            result[f"{name}_plan_to_command"] = latency
            print(f"  {name}: median {latency['median_ms']} ms, p95 {latency['p95_ms']} ms")
    if "drivers" in figures:
        drivers = {k: round(v, 4) for k, v in figures["drivers"].items()}
        result["drivers"] = drivers
        print(f"drivers, the store's statements for {args.incidents} openings on one connection, "
              f"{MAX_BATCH} writes a transaction, fastest of {args.repeat}:")
        for name in ("asyncpg", "psycopg"):
            if f"{name}_s" in drivers:
                print(f"  {name}: {drivers[f'{name}_s']:.3f} s, of which this process's CPU "
                      f"{drivers[f'{name}_cpu_s']:.3f} s")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
