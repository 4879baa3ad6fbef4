"""Chat once across controllers: the notification log in both stores, and routers that share it.

Two routers on one PostgreSQL database (a throwaway database of the tests' own server,
``tests/integration/postgres.py``) stand for two controllers handed the same state change (a takeover
that re-derives a step); a second router on the same SQLite file stands for a restarted controller. The
receiver is a real HTTP webhook receiver (``tests/webhook_receiver.py``). Stopping a router flushes what it
holds, so once both are stopped every message that will ever go out has gone out: the counts are final.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, closing
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from controller.metrics import ControllerMetrics
from controller.notify import Notification, incident_labels
from controller.notify.claims import NotificationLog
from controller.notify.delivery import RetryPolicy
from controller.notify.registry import default_formatters
from controller.notify.router import Destination, Router
from controller.pgstore import PostgresStore
from controller.store import SqliteStore, Store
from selfheal.clocks import SystemClock
from tests.conftest import eventually
from tests.integration.postgres import Cluster, throwaway_database
from tests.webhook_receiver import WebhookReceiver, webhook_receiver

pytestmark = pytest.mark.integration
T0 = 1_700_000_000.0
FAST = RetryPolicy(max_attempts=4, backoff_initial=0.05, backoff_max=0.2, jitter=0.05)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Everything selfheal logs through structlog, as JSON lines."""
    out = io.StringIO()
    structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.format_exc_info,
                                    structlog.processors.JSONRenderer()],
                        logger_factory=structlog.PrintLoggerFactory(out), cache_logger_on_first_use=False)
    yield out
    structlog.reset_defaults()


@pytest.fixture
async def pg_url(postgres_cluster: Cluster) -> AsyncIterator[str]:
    async with throwaway_database(postgres_cluster) as url:
        yield url


def events(logs: io.StringIO, name: str) -> list[dict[str, Any]]:
    return [line for line in map(json.loads, logs.getvalue().splitlines()) if line.get("event") == name]


def note(incident: int, event: str = "opened", *, text: str = "unit web exited", action: str = "",
         outcome: str = "", cause: str = "") -> Notification:
    labels = incident_labels(kind="unit_exited", node="node-a", unit="web", severity="critical", rule="restart",
                             node_labels={})
    return Notification(incident_id=incident, event=event, severity="critical",  # type: ignore[arg-type]
                        title=f"unit_exited on node-a/web: {event}", text=text, node="node-a", unit="web",
                        kind="unit_exited", summary="unit web exited with signal 9", action=action, outcome=outcome,
                        labels=labels, at=T0 + incident, cause=cause)


def destination(receiver: WebhookReceiver, name: str) -> Destination:
    return Destination(name=name, kind="alertmanager", url=receiver.url(f"/{name}"), group_wait=0.05,
                       group_interval=0.1, repeat_interval=3600.0, rate=6000.0, burst=10, timeout=2.0)


async def audit(incident_id: int, kind: str, data: dict[str, object]) -> None:
    """The engine's audit trail is not what these tests look at."""


@asynccontextmanager
async def running(claims: NotificationLog | None, *destinations: Destination) -> AsyncIterator[Router]:
    """A router as a controller runs it; leaving stops it, which sends what it still holds."""
    router = Router(list(destinations), formatters=default_formatters(), metrics=ControllerMetrics(),
                    clock=SystemClock(), record=audit, silenced=lambda labels: False,
                    external_url="http://status.example:8080", policy=FAST, claims=claims)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(router.run(stop=stop), name="router")
        try:
            yield router
        finally:
            stop.set()


def statuses(receiver: WebhookReceiver, path: str) -> list[tuple[str, list[str]]]:
    """Per message to ``path``: its status and its incidents."""
    return [(r.body["status"], [a["labels"]["incident"] for a in r.body["alerts"]]) for r in receiver.received(path)]


# --- the store's side, on both stores ----------------------------------------------------------------


async def claims_in_turn(first: Store, second: Store, rows: Any) -> None:
    claim: dict[str, Any] = {"incident_id": 7, "event": "opened", "destination": "ops", "at": T0}
    assert await first.claim_notification(key="k1", **claim) is True
    assert await first.claim_notification(key="k1", **claim) is False
    assert await second.claim_notification(key="k1", **{**claim, "at": T0 + 5}) is False
    assert await second.claim_notification(key="k2", **{**claim, "destination": "pager"}) is True
    await first.finish_notifications(["k1"], outcome="sent", at=T0 + 1)
    await second.finish_notifications(["k1", "k2"], outcome="failed", at=T0 + 2)  # k1 went out already
    assert await rows("SELECT key, incident_id, event, destination, state, claimed_at, finished_at "
                      "FROM notification_log ORDER BY key") == [
        ("k1", 7, "opened", "ops", "sent", T0, T0 + 1), ("k2", 7, "opened", "pager", "failed", T0, T0 + 2)]


async def test_sqlite_a_key_is_claimed_once_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "selfheal.db"

    async def rows(sql: str) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(path)) as db:
            return [tuple(r) for r in db.execute(sql).fetchall()]

    first = await SqliteStore.open(path)
    try:
        assert await first.claim_notification(key="k0", incident_id=1, event="opened", destination="ops", at=T0)
    finally:
        await first.close()
    first, second = await SqliteStore.open(path), await SqliteStore.open(path)
    try:
        assert not await first.claim_notification(key="k0", incident_id=1, event="opened", destination="ops", at=T0)
        await claims_in_turn(first, second, lambda sql: rows(sql.replace("ORDER BY key", "WHERE key != 'k0' "
                                                                           "ORDER BY key")))
    finally:
        await first.close()
        await second.close()


async def test_postgres_a_key_is_claimed_once_by_controllers_racing_for_it(pg_url: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(pg_url) for _ in range(3)))
    reader = await asyncpg.connect(pg_url)
    try:
        won = await asyncio.gather(*(s.claim_notification(key="race", incident_id=3, event="escalated",
                                                          destination="ops", at=T0 + n)
                                     for n, s in enumerate(stores * 10)))
        assert won.count(True) == 1

        async def rows(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in await reader.fetch(sql.replace("ORDER BY key", "WHERE key <> 'race' "
                                                                     "ORDER BY key"))]
        await claims_in_turn(stores[0], stores[1], rows)
    finally:
        await reader.close()
        await asyncio.gather(*(s.close() for s in stores))


# --- routers sharing the log ---------------------------------------------------------------------


async def test_two_controllers_on_postgresql_send_a_notification_once(
        pg_url: str, receiver: WebhookReceiver, logs: io.StringIO) -> None:
    """Both controllers are handed the same state changes (a takeover re-deriving them): each destination
    gets each one once, from whichever controller claimed it first."""
    async with AsyncExitStack() as stack:
        stores = [await PostgresStore.open(pg_url) for _ in range(2)]
        for store in stores:
            stack.push_async_callback(store.close)
        async with running(stores[0], destination(receiver, "ops"), destination(receiver, "pager")) as a, \
                running(stores[1], destination(receiver, "ops"), destination(receiver, "pager")) as b:
            await asyncio.gather(a.notify(note(7)), b.notify(note(7)))
            await eventually(lambda: len(events(logs, "notify.duplicate")) == 2, timeout=30,
                             what="the second controller to find both claims taken")
            await eventually(lambda: len(receiver.received()) == 2, timeout=30, what="one message per destination")
            await asyncio.gather(a.notify(note(7, "resolved", text="cleared for 5s")),
                                 b.notify(note(7, "resolved", text="cleared for 5s")))
            await eventually(lambda: len(events(logs, "notify.duplicate")) == 4, timeout=30,
                             what="the resolution's duplicates")
        # both stopped: whatever either held was sent, so these counts are final
        for path in ("/ops", "/pager"):
            assert statuses(receiver, path) == [("firing", ["7"]), ("resolved", ["7"])]
        duplicates = events(logs, "notify.duplicate")
        assert sorted((d["notify_event"], d["destination"]) for d in duplicates) == [
            ("opened", "ops"), ("opened", "pager"), ("resolved", "ops"), ("resolved", "pager")]
        reader = await asyncpg.connect(pg_url)
        try:
            logged = await reader.fetch("SELECT event, destination, state FROM notification_log ORDER BY 1, 2")
        finally:
            await reader.close()
        assert [tuple(r) for r in logged] == [("opened", "ops", "sent"), ("opened", "pager", "sent"),
                                              ("resolved", "ops", "sent"), ("resolved", "pager", "sent")]


async def test_a_restarted_controller_on_sqlite_does_not_send_again(
        tmp_path: Path, receiver: WebhookReceiver, logs: io.StringIO) -> None:
    """A plan resumed after a restart says ``action`` again: it was sent before the restart, so not again; what
    is new (its outcome) is sent, and an outcome with the same words as the last attempt's is still new."""
    path = tmp_path / "state" / "selfheal.db"
    ops = destination(receiver, "ops")
    attempt = note(7, "action", action="restart_unit", text="restart_unit (rule restart, attempt 2)")
    failed = note(7, "outcome", action="restart_unit", outcome="failed", text="not running within 30s")
    store = await SqliteStore.open(path)
    try:
        async with running(store, ops) as before:
            await before.notify(note(7))
            await before.notify(note(7, "action", action="restart_unit", text="restart_unit (rule restart, "
                                                                                "attempt 1)"))
            await before.notify(failed)
            await before.notify(attempt)
            await eventually(lambda: len(receiver.received()) >= 1, timeout=30, what="the first message")
    finally:
        await store.close()
    sent_before = len(receiver.received())
    store = await SqliteStore.open(path)
    try:
        async with running(store, ops) as after:
            await after.notify(attempt)
            await eventually(lambda: len(events(logs, "notify.duplicate")) == 1, timeout=30,
                             what="the restarted controller to find the action claimed")
            await after.notify(failed)  # the second attempt's outcome: the same words, a new state change
            await eventually(lambda: len(receiver.received()) == sent_before + 1, timeout=30,
                             what="the second attempt's outcome")
    finally:
        await store.close()
    assert len(receiver.received()) == sent_before + 1
    assert [d["notify_event"] for d in events(logs, "notify.duplicate")] == ["action"]
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT event, state FROM notification_log ORDER BY rowid").fetchall() == [
            ("opened", "sent"), ("action", "sent"), ("outcome", "sent"), ("action", "sent"), ("outcome", "sent")]
    last = receiver.received()[-1].body["alerts"][0]["annotations"]
    assert last["selfheal_worked"] == "no — restart_unit failed: not running within 30s"


async def test_a_store_that_cannot_claim_still_lets_the_notification_out(
        tmp_path: Path, receiver: WebhookReceiver, logs: io.StringIO) -> None:
    """A broken store (here: closed) is when a human should hear most: sent unclaimed, and said so."""
    store = await SqliteStore.open(tmp_path / "selfheal.db")
    await store.close()
    async with running(store, destination(receiver, "ops")) as router:
        await router.notify(note(9))
        await eventually(lambda: len(receiver.received("/ops")) == 1, timeout=30, what="the unclaimed message")
    assert statuses(receiver, "/ops") == [("firing", ["9"])]
    [failed] = events(logs, "notify.claim_failed")
    assert failed["effect"] == "sent without a claim: another controller may send it too"
