"""Membership and bucket leases on a real PostgreSQL (``controller.leases``).

The statements first (take, renew, release, expiry by the database's clock, epochs that only grow, the
fencing check), then ``LeaseKeeper``s, several in one process on one database: they cover every bucket
once, rebalance when one joins, take a killed one's buckets after the TTL, and one cut off from the
database stops acting before its leases can expire. Every change every keeper reports is checked by
``Watch``: at the instant a keeper gains a bucket no other keeper owns it, and no bucket's epoch goes back.

Short TTLs (``TTL``, ``RENEW``) keep it quick; every wait is on an event or a condition, with deadlines
meant for a loaded machine. The server is the session's (``tests/integration/postgres.py``), except for the
restart test, which stops and starts a cluster of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from controller.leases import LeaseChange, LeaseKeeper, assign, claim, peers
from controller.ownership import NotOwner
from controller.pgstore import MIGRATIONS, PostgresStore, epoch_current, migrate
from controller.store import PlanRecord, ReplicaRecord
from selfheal.wire import BUCKETS, DatasetSummary, bucket_of, encode
from tests.conftest import eventually
from tests.integration.postgres import Cluster, throwaway_database

pytestmark = pytest.mark.integration

TTL = 3.0
RENEW = 0.5
MARGIN = 0.5
"""Keepers act on a bucket for 2.5 s after each renewal they sent; the database holds it 3 s."""
HELD = 60.0
"""Lease length in the statement tests that are about epochs, not expiry: no stall of a loaded machine ends it
between two statements (a test that wants it over ends it by hand or waits for ``expired``)."""
SETTLE = 60.0
"""Seconds a wait for keepers to settle may take on a loaded machine (normally one or two rounds)."""
ALL = set(range(BUCKETS))


@pytest.fixture
async def url(postgres_cluster: Cluster) -> AsyncIterator[str]:
    async with throwaway_database(postgres_cluster) as database:
        yield database


@pytest.fixture
async def conn(url: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    connection: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(url)
    await migrate(connection)
    yield connection
    await connection.close()


async def expired(conn: asyncpg.Connection[asyncpg.Record], bucket: int) -> bool:
    """Whether ``bucket``'s lease has run out by the database's clock."""
    return bool(await conn.fetchval("SELECT expires_at <= now() FROM bucket_leases WHERE bucket = $1", bucket))


# --- the statements -------------------------------------------------------------------------------


@dataclass
class Fenced:
    """A store that fences writes by epoch, a connection to move leases by hand, and c1's lease on ``node``'s
    bucket (``epoch``)."""

    store: PostgresStore
    connection: asyncpg.Connection[asyncpg.Record]
    node: str
    epoch: int

    async def take_over(self) -> int:
        """c1's lease runs out and c2 takes the bucket: c2's (higher) epoch."""
        bucket = bucket_of(self.node)
        await self.connection.execute("UPDATE bucket_leases SET expires_at = now() WHERE bucket = $1", bucket)
        [newer] = (await claim(self.connection, "c2", [bucket], HELD)).values()
        assert newer > self.epoch
        return newer


@pytest.fixture
async def fenced(url: str) -> AsyncIterator[Fenced]:
    store = await PostgresStore.open(url)
    store.fence_commands = True
    connection: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(url)
    try:
        [epoch] = (await claim(connection, "c1", [bucket_of("node-a")], HELD)).values()
        yield Fenced(store, connection, "node-a", epoch)
    finally:
        await connection.close()
        await store.close()


async def test_the_store_records_a_command_only_under_its_buckets_live_epoch(fenced: Fenced) -> None:
    """A controller paused past its lease (or cut off) may wake mid-step: the command it was about to record is
    refused, so it is never published; the lease's holder records its own."""
    async def record(key: str, epoch: int) -> bool:
        return await fenced.store.record_command(key=key, command_id=key, plan_id="1-1", node=fenced.node,
                                                 epoch=epoch, issued_at=0.0, payload=b"{}")
    assert await record("k1", fenced.epoch)
    newer = await fenced.take_over()
    with pytest.raises(NotOwner, match="another controller holds it"):
        await record("k2", fenced.epoch)
    assert await fenced.connection.fetchval("SELECT count(*) FROM commands WHERE key = 'k2'") == 0
    assert await record("k2", newer)


async def test_the_store_saves_a_plan_state_only_under_its_buckets_live_epoch(fenced: Fenced) -> None:
    """A controller that wakes (paused past its lease) with a plan's outcome in hand must not overwrite what the
    bucket's new owner decided about that plan (it expired it at takeover)."""
    store, node = fenced.store, fenced.node
    incident = await store.open_incident(key="k", kind="unit_exited", node=node, unit="web", severity="error",
                                         summary="web exited", rule="r", opened_at=1.0, evidence={})
    running = PlanRecord(id="1-1", incident_id=incident.id, rule="r", attempt=1, state="running",
                         created_at=1.0, updated_at=1.0)
    await store.save_plan(running, fence=(node, fenced.epoch))
    newer = await fenced.take_over()
    await store.save_plan(dataclasses.replace(running, state="expired", updated_at=2.0), fence=(node, newer))
    with pytest.raises(NotOwner, match="another controller holds it"):
        await store.save_plan(dataclasses.replace(running, state="succeeded", updated_at=3.0),
                              fence=(node, fenced.epoch))
    stored = await store.get_plan("1-1")
    assert stored is not None
    assert stored.state == "expired"


async def test_the_store_keeps_a_replica_record_only_under_its_buckets_live_epoch(fenced: Fenced) -> None:
    """A controller that lost a node's bucket (paused, cut off) and wakes with a replica record in hand must not
    overwrite what the bucket's new owner wrote of that node's replica since."""
    store, node = fenced.store, fenced.node

    def record(root: str, epoch: int) -> ReplicaRecord:
        return ReplicaRecord("train", node, encode(DatasetSummary(name="train", root=root, state="ok")), True,
                             "127.0.0.1:1", epoch)
    assert await store.save_replicas([record("r:old", fenced.epoch)]) == 1
    newer = await fenced.take_over()
    assert await store.save_replicas([record("r:new", newer)]) == 1
    assert await store.save_replicas([record("r:stale", fenced.epoch)]) == 0
    records, _ = await store.replicas_changed(after=0, since=None)
    assert [(r.node, r.epoch, b"r:new" in (r.summary or b"")) for r in records] == [(node, newer, True)]
    # A takeover's worth, over several transactions: only the records under their bucket's live epoch land.
    many = [ReplicaRecord(f"d{i}", node, b"{}", True, "", newer if i % 3 else fenced.epoch) for i in range(1200)]
    assert await store.save_replicas(many) == 800


async def test_bucket_epochs_start_above_every_epoch_a_single_controller_on_the_store_sent(url: str) -> None:
    """Agents refuse an epoch below the highest they accepted: a fleet moving from one controller on this store
    to bucket leases must not find its first leases stale."""
    connection: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(url)
    try:
        await migrate(connection, MIGRATIONS[:1])
        await connection.execute("INSERT INTO meta(name, value) VALUES ('epoch', 41)")  # 41 controller starts
        await migrate(connection)
        assert {r["epoch"] for r in await connection.fetch("SELECT epoch FROM bucket_leases")} == {41}
        assert await claim(connection, "c1", [7], HELD) == {7: 42}
    finally:
        await connection.close()



async def test_a_lease_is_renewed_under_its_epoch_and_every_other_grant_raises_it(
        conn: asyncpg.Connection[asyncpg.Record]) -> None:
    assert await conn.fetchval("SELECT count(*) FROM bucket_leases WHERE epoch = 0 AND owner IS NULL") == BUCKETS
    assert await claim(conn, "a", [0, 1], HELD) == {0: 1, 1: 1}
    assert await claim(conn, "a", [0, 1], HELD) == {0: 1, 1: 1}  # renewed: same epochs
    assert await claim(conn, "b", [0, 1, 2], HELD) == {2: 1}  # a's are live: not b's to take
    assert await claim(conn, "a", [1], HELD) == {1: 1}  # a releases 0 ...
    assert await conn.fetchval("SELECT owner FROM bucket_leases WHERE bucket = 0") is None
    assert await claim(conn, "b", [0, 2], HELD) == {0: 2, 2: 1}  # ... which b then takes, under a new epoch
    assert await claim(conn, "b", [2], HELD) == {2: 1}
    assert await claim(conn, "a", [0, 1], HELD) == {0: 3, 1: 1}  # back to a: never reset, still growing
    assert await claim(conn, "a", [], HELD) == {}  # leaving: releases everything
    assert await conn.fetchval("SELECT count(*) FROM bucket_leases WHERE owner = 'a'") == 0


async def test_an_expired_lease_is_taken_by_anyone_under_a_new_epoch_even_by_its_holder(
        conn: asyncpg.Connection[asyncpg.Record]) -> None:
    assert await claim(conn, "a", [5, 6], 0.3) == {5: 1, 6: 1}
    await eventually(lambda: expired(conn, 6), timeout=30, what="the leases to expire by the database's clock")
    assert await claim(conn, "a", [5], HELD) == {5: 2}  # its own, but lapsed: what it did under 1 is fenced off
    assert await claim(conn, "b", [6], HELD) == {6: 2}  # a's lapsed lease, taken over by b


async def test_members_are_live_while_their_heartbeat_is_younger_than_the_ttl(
        conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """``peers`` records the caller's heartbeat (with its API address) and answers the other live members."""
    assert await peers(conn, "a", 5.0, api="http://a") == {}
    assert await peers(conn, "b", 5.0, api="http://b") == {"a": "http://a"}
    assert await peers(conn, "c", 60.0) == {"a": "http://a", "b": "http://b"}

    async def a_and_b_silent_long_enough() -> bool:
        return await peers(conn, "c", 5.0) == {}
    await eventually(a_and_b_silent_long_enough, timeout=60, what="a and b to stop counting as live")
    assert await peers(conn, "a", 5.0, api="http://a") == {"c": ""}


async def test_the_database_refuses_a_lower_epoch_and_a_deleted_lease(
        conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Whoever connects (the superuser here): a row's epoch is never reset."""
    await claim(conn, "a", [3], HELD)
    for statement in ("UPDATE bucket_leases SET epoch = 0 WHERE bucket = 3", "DELETE FROM bucket_leases",
                      "TRUNCATE bucket_leases"):
        with pytest.raises(asyncpg.RestrictViolationError, match="epoch only grows"):
            await conn.execute(statement)
    assert await conn.fetchval("SELECT epoch FROM bucket_leases WHERE bucket = 3") == 1


async def test_epoch_current_refuses_stale_epochs_and_holds_a_takeover_off_until_the_write_committed(
        url: str, conn: asyncpg.Connection[asyncpg.Record]) -> None:
    writer: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(url)
    taker: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(url)
    try:
        assert await claim(conn, "a", [9], 5.0) == {9: 1}  # expires during the test
        transaction = writer.transaction()
        await transaction.start()
        assert await epoch_current(writer, 9, 1)  # the write under epoch 1 may go ahead: the row is share-locked
        assert not await epoch_current(writer, 9, 0)
        await eventually(lambda: expired(conn, 9), timeout=30, what="a's lease to expire")
        takeover = asyncio.create_task(claim(taker, "b", [9], HELD))
        pid = taker.get_server_pid()

        async def waiting_for_the_writer() -> bool:
            return await conn.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                                       pid) is True
        await eventually(waiting_for_the_writer, timeout=30, what="the takeover to wait for the write's lock")
        assert not takeover.done()
        await transaction.commit()
        assert await asyncio.wait_for(takeover, 30) == {9: 2}
        assert not await epoch_current(writer, 9, 1)  # a's epoch is stale now: its writes are refused
        assert await epoch_current(writer, 9, 2)
        await claim(taker, "b", [], HELD)
        assert not await epoch_current(writer, 9, 2)  # released: nobody's epoch is current
    finally:
        await writer.close()
        await taker.close()


# --- keepers --------------------------------------------------------------------------------------


@dataclass
class Watch:
    """Hears every keeper's changes and checks the two safety properties at each one."""

    keepers: dict[str, LeaseKeeper] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    highest: dict[int, tuple[int, str]] = field(default_factory=dict)
    """bucket → (highest epoch granted, to whom)."""
    gained_at: dict[tuple[str, int], float] = field(default_factory=dict)
    lost_at: dict[tuple[str, int], float] = field(default_factory=dict)

    def add(self, keeper: LeaseKeeper) -> None:
        self.keepers[keeper.member] = keeper
        keeper.subscribe(lambda change: self._heard(keeper, change))

    def _heard(self, keeper: LeaseKeeper, change: LeaseChange) -> None:
        now = asyncio.get_running_loop().time()
        for bucket, epoch in change.gained.items():
            for other in self.keepers.values():
                if other is not keeper and bucket in other.owned():
                    self.violations.append(f"{keeper.member} gained {bucket} while {other.member} owns it")
            before = self.highest.get(bucket)
            if before is not None and (epoch < before[0] or (epoch == before[0] and before[1] != keeper.member)):
                self.violations.append(f"{keeper.member} gained {bucket} under epoch {epoch} after {before}")
            self.highest[bucket] = max(before or (0, ""), (epoch, keeper.member))
            self.gained_at[keeper.member, bucket] = now
        for bucket in change.lost:
            self.lost_at[keeper.member, bucket] = now


@dataclass
class Keepers:
    """Keepers running as tasks in this process, each as a controller process would run it."""

    url: str
    watch: Watch = field(default_factory=Watch)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    stops: dict[str, asyncio.Event] = field(default_factory=dict)

    def start(self, member: str, *, url: str | None = None, margin: float = MARGIN) -> LeaseKeeper:
        keeper = LeaseKeeper(url or self.url, member, ttl=TTL, renew_every=RENEW, margin=margin)
        self.watch.add(keeper)
        self.stops[member] = asyncio.Event()
        self.tasks[member] = asyncio.create_task(keeper.run(stop=self.stops[member]), name=f"keeper-{member}")
        return keeper

    def __getitem__(self, member: str) -> LeaseKeeper:
        return self.watch.keepers[member]

    async def kill(self, member: str) -> None:
        """As ``kill -9`` would: no release, no goodbye."""
        task = self.tasks.pop(member)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def stop(self, member: str) -> None:
        self.stops[member].set()
        await asyncio.wait_for(self.tasks.pop(member), 30)

    def settled(self, *members: str) -> bool:
        """``members`` (running) own every bucket between them, once each, as ``assign`` says."""
        for member, task in self.tasks.items():
            if task.done():
                raise AssertionError(f"keeper {member} ended: {task}")
        expected = assign(ALL, members)
        return all(set(self[m].owned()) == {b for b, o in expected.items() if o == m} for m in members)

    async def wait_settled(self, *members: str) -> dict[int, int]:
        """Wait until ``members`` settled; returns bucket → epoch over all of them."""
        await eventually(lambda: self.settled(*members), timeout=SETTLE, what=f"{members} to settle")
        return {b: e for m in members for b, e in self[m].owned().items()}

    async def close(self) -> None:
        for member in list(self.tasks):
            await self.kill(member)
        assert self.watch.violations == []


@pytest.fixture
async def keepers(url: str) -> AsyncIterator[Keepers]:
    running = Keepers(url)
    try:
        yield running
    finally:
        await running.close()


async def test_two_then_three_keepers_cover_every_bucket_once_and_a_joiner_moves_about_a_third(
        keepers: Keepers) -> None:
    keepers.start("ctl-a")
    keepers.start("ctl-b")
    before = await keepers.wait_settled("ctl-a", "ctl-b")
    assert set(before) == ALL

    keepers.start("ctl-c")
    after = await keepers.wait_settled("ctl-a", "ctl-b", "ctl-c")
    moved = {b for b, owner in assign(ALL, ["ctl-a", "ctl-b", "ctl-c"]).items() if owner == "ctl-c"}
    assert set(keepers["ctl-c"].owned()) == moved
    assert 10 <= len(moved) <= 32  # 15 of 64 for these three ids; a third on average
    for bucket in ALL:
        if bucket in moved:
            assert after[bucket] > before[bucket], bucket  # taken over: a new epoch
        else:
            assert after[bucket] >= before[bucket], bucket  # renewed all along (or lapsed and granted anew)
    assert keepers["ctl-c"].members == ("ctl-a", "ctl-b", "ctl-c")

    # leaving cleanly: its buckets are released at once, and the others take them under new epochs
    await keepers.stop("ctl-c")
    final = await keepers.wait_settled("ctl-a", "ctl-b")
    assert all(final[b] > after[b] for b in moved)


async def test_a_killed_keepers_buckets_are_taken_after_its_ttl_under_higher_epochs(
        keepers: Keepers, url: str) -> None:
    for member in ("ctl-a", "ctl-b", "ctl-c"):
        keepers.start(member)
    before = await keepers.wait_settled("ctl-a", "ctl-b", "ctl-c")
    orphaned = set(keepers["ctl-a"].owned())
    admin: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(url)
    try:
        await keepers.kill("ctl-a")
        expiries = await admin.fetch("SELECT bucket, expires_at FROM bucket_leases WHERE owner = 'ctl-a'")
        assert {row["bucket"] for row in expiries} == orphaned  # not released: it was killed
        after = await keepers.wait_settled("ctl-b", "ctl-c")
        taken = await admin.fetch("SELECT bucket, epoch, owner, expires_at FROM bucket_leases")
    finally:
        await admin.close()
    assert all(after[b] > before[b] for b in orphaned)
    assert all(after[b] >= before[b] for b in ALL)
    # taken only once a's lease had run out by the database's clock (each renewal set expires_at anew)
    latest = max(row["expires_at"] for row in expiries)
    assert all(row["expires_at"].timestamp() - TTL >= latest.timestamp() for row in taken
               if row["bucket"] in orphaned)


async def test_a_keeper_cut_off_from_the_database_stops_acting_before_its_leases_expire(
        keepers: Keepers, url: str, postgres_cluster: Cluster) -> None:
    """The network to PostgreSQL stops carrying anything (a paused proxy: no reset, no error, silence)."""
    proxy = PausableProxy(postgres_cluster.port)
    await proxy.start()
    loop = asyncio.get_running_loop()
    admin: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(url)
    try:
        cut = keepers.start("ctl-a", url=url.replace(f":{postgres_cluster.port}/", f":{proxy.port}/"), margin=1.0)
        keepers.start("ctl-b")
        before = await keepers.wait_settled("ctl-a", "ctl-b")
        held = set(cut.owned())

        proxy.pause()
        asked = loop.time()
        remaining = await admin.fetch("SELECT bucket, extract(epoch FROM expires_at - clock_timestamp())::float8 "
                                      "FROM bucket_leases WHERE owner = 'ctl-a'")
        assert {row[0] for row in remaining} == held
        expires = asked + min(row[1] for row in remaining)  # the earliest expiry, in local monotonic time

        await eventually(lambda: not cut.owned(), timeout=SETTLE, what="the cut-off keeper to stop acting")
        stopped = max(keepers.watch.lost_at["ctl-a", b] for b in held)
        assert stopped < expires, f"acted {stopped - expires:.3f}s past its lease"
        taken = await keepers.wait_settled("ctl-b")
        assert min(keepers.watch.gained_at["ctl-b", b] for b in held) > stopped
        assert all(taken[b] > before[b] for b in held)

        proxy.resume()  # the network is back: it rejoins and gets its share back under new epochs
        back = await keepers.wait_settled("ctl-a", "ctl-b")
        assert all(back[b] > taken[b] for b in cut.owned())
        assert sum(cut.errors.values()) >= 1
    finally:
        await admin.close()
        await keepers.close()
        await proxy.close()


async def test_a_connection_terminated_by_the_server_is_counted_and_replaced(keepers: Keepers, url: str) -> None:
    keeper = keepers.start("ctl-a")
    before = await keepers.wait_settled("ctl-a")
    admin: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(url)
    try:
        terminated = await admin.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                          "WHERE application_name = 'selfheal-lease ctl-a'")
        assert terminated == 1
        await eventually(lambda: sum(keeper.errors.values()) >= 1, timeout=SETTLE, what="the error to be counted")
        await eventually(lambda: admin.fetchval("SELECT count(*) = 1 FROM pg_stat_activity "
                                                "WHERE application_name = 'selfheal-lease ctl-a'"),
                         timeout=SETTLE, what="a new connection")
    finally:
        await admin.close()
    after = await keepers.wait_settled("ctl-a")
    assert all(after[b] >= before[b] for b in ALL)


async def test_keepers_stop_acting_while_the_server_is_down_and_come_back_after_it_restarts() -> None:
    cluster = await asyncio.to_thread(Cluster.create)
    try:
        await asyncio.to_thread(cluster.start)
        keepers = Keepers(cluster.url())
        try:
            keepers.start("ctl-a")
            keepers.start("ctl-b")
            before = await keepers.wait_settled("ctl-a", "ctl-b")
            await asyncio.to_thread(cluster.stop, "immediate")
            await eventually(lambda: not keepers["ctl-a"].owned() and not keepers["ctl-b"].owned(),
                             timeout=SETTLE, what="both keepers to stop acting")
            await eventually(lambda: all(sum(keepers[m].errors.values()) >= 2 for m in ("ctl-a", "ctl-b")),
                             timeout=SETTLE, what="failed rounds, counted")
            await asyncio.to_thread(cluster.start)
            after = await keepers.wait_settled("ctl-a", "ctl-b")
            assert all(after[b] >= before[b] for b in ALL)
        finally:
            await keepers.close()
    finally:
        await asyncio.to_thread(cluster.remove)


# --- a network that goes silent -------------------------------------------------------------------


class PausableProxy:
    """A TCP proxy to a local port; ``pause`` stops every byte both ways and holds new connections, as a
    network that drops everything would (no reset, no error: the client sees only silence)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            pumps = [asyncio.create_task(self._pump(client_reader, upstream_writer)),
                     asyncio.create_task(self._pump(upstream_reader, client_writer))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.transport.abort()
            self._handlers.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
