"""The SQLite state store on real files: incidents, timelines, plans, commands, epochs, durability."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from controller.fleet import Fleet
from controller.placement import Placements
from controller.store import PlanRecord, SqliteStore
from selfheal.wire import HostMetrics, NodeStatus, Report, UnitReport

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "selfheal.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(db_path)
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


async def test_open_incident_returns_the_new_incident(store: SqliteStore) -> None:
    incident = await store.open_incident(**incident_fields())
    assert incident.id >= 1
    assert (incident.key, incident.kind, incident.node, incident.unit, incident.state) == (
        "unit_exited/node-a/web", "unit_exited", "node-a", "web", "open")
    assert (incident.opened_at, incident.resolved_at, incident.rule) == (T0, None, "restart-exited-unit")


async def test_open_incident_is_idempotent_per_key_while_unresolved(store: SqliteStore) -> None:
    first = await store.open_incident(**incident_fields())
    again = await store.open_incident(**incident_fields(opened_at=T0 + 5, summary="again"))
    assert again == first
    other = await store.open_incident(**incident_fields("unit_exited/node-a/db", unit="db"))
    assert other.id != first.id
    detail = await store.get_incident(first.id)
    assert detail is not None
    assert [e.kind for e in detail.timeline] == ["opened"]


async def test_a_failed_incident_still_holds_its_key(store: SqliteStore) -> None:
    first = await store.open_incident(**incident_fields())
    await store.set_incident_state(first.id, "failed", at=T0 + 1, reason="3 attempts made")
    again = await store.open_incident(**incident_fields(opened_at=T0 + 2))
    assert again.id == first.id
    assert again.state == "failed"


async def test_a_new_incident_opens_after_resolve(store: SqliteStore) -> None:
    first = await store.open_incident(**incident_fields())
    await store.set_incident_state(first.id, "resolved", at=T0 + 10, reason="healthy again")
    second = await store.open_incident(**incident_fields(opened_at=T0 + 20))
    assert second.id > first.id
    assert second.state == "open"
    resolved = await store.get_incident_row(first.id)
    assert resolved is not None
    assert (resolved.state, resolved.resolved_at) == ("resolved", T0 + 10)


async def test_the_timeline_keeps_insertion_order(store: SqliteStore) -> None:
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


async def test_set_state_failed_has_no_resolved_at(store: SqliteStore) -> None:
    incident = await store.open_incident(**incident_fields())
    await store.set_incident_state(incident.id, "failed", at=T0 + 9, reason="gave up")
    row = await store.get_incident_row(incident.id)
    assert row is not None
    assert (row.state, row.resolved_at) == ("failed", None)


async def test_list_by_state_newest_first(store: SqliteStore) -> None:
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


async def test_unknown_incident_is_none(store: SqliteStore) -> None:
    assert await store.get_incident(4242) is None
    assert await store.get_incident_row(4242) is None


async def test_plans_upsert(store: SqliteStore) -> None:
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


async def test_recent_attempts_span_incidents_of_the_target(store: SqliteStore) -> None:
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


async def test_record_command_refuses_a_duplicate_key(store: SqliteStore) -> None:
    incident = await store.open_incident(**incident_fields())
    await store.save_plan(plan("1-1", incident.id, 1))
    command: dict[str, Any] = {"command_id": "c1", "plan_id": "1-1", "node": "node-a", "epoch": 1, "issued_at": T0,
               "payload": b'{"v":1}'}
    assert await store.record_command(key="key-1", **command) is True
    assert await store.record_command(key="key-1", **{**command, "command_id": "c2", "epoch": 2}) is False
    assert await store.record_command(key="key-2", **command) is True


async def test_next_epoch_grows_across_close_and_reopen(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    try:
        assert await store.next_epoch() == 1
        assert await store.next_epoch() == 2
    finally:
        await store.close()
    reopened = await SqliteStore.open(db_path)
    try:
        assert await reopened.next_epoch() == 3
    finally:
        await reopened.close()


async def test_data_survives_close_and_reopen(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    try:
        incident = await store.open_incident(**incident_fields())
        await store.append_timeline(incident.id, at=T0 + 1, kind="plan", data={"plan": "1-1"})
        await store.save_plan(plan("1-1", incident.id, 1))
        assert await store.record_command(key="k", command_id="c", plan_id="1-1", node="node-a", epoch=1,
                                          issued_at=T0, payload=b"x")
    finally:
        await store.close()
    reopened = await SqliteStore.open(db_path)
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


async def test_the_journal_mode_is_wal(store: SqliteStore, db_path: Path) -> None:
    await store.open_incident(**incident_fields())
    with closing(sqlite3.connect(db_path)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT count(*) FROM incidents").fetchone()[0] == 1
    assert (db_path.parent / (db_path.name + "-wal")).exists()


async def test_open_creates_the_state_directory(db_path: Path) -> None:
    assert not db_path.parent.is_dir()
    store = await SqliteStore.open(db_path)
    await store.close()
    assert db_path.is_file()  # noqa: ASYNC240 - a stat in a test, not on a serving loop


async def test_placements_survive_a_controller_restart_and_follow_each_move(db_path: Path) -> None:
    """Where a movable singleton ran is what a restarted controller needs to migrate it off a dead node."""
    fleet = Fleet()
    for node, state in (("node-a", "running"), ("node-b", "stopped")):
        fleet.apply(NodeStatus(node=node, session=1, state="online", ts=T0), T0)
        fleet.apply(Report(node=node, session=1, seq=1, ts=T0, host=_host(),
                           units=[UnitReport(name="predict", kind="process", state=state, fence_after=12.0)]), T0)
    store = await SqliteStore.open(db_path)
    placements = Placements()
    placements.observe(fleet, offline=set(), now=T0)
    await placements.save(store)
    await store.close()

    store = await SqliteStore.open(db_path)  # a new controller
    restored = Placements()
    await restored.load(store)
    assert [(p.unit, p.node, p.fence_after) for p in restored.placements()] == [("predict", "node-a", 12.0)]
    fleet.apply(Report(node="node-b", session=1, seq=2, ts=T0 + 5, host=_host(),
                       units=[UnitReport(name="predict", kind="process", state="running", fence_after=12.0)]), T0 + 5)
    restored.observe(fleet, offline={"node-a"}, now=T0 + 5)  # migrated: node-a is gone, node-b runs it
    await restored.save(store)
    assert [(p.unit, p.node) for p in await store.list_placements()] == [("predict", "node-b")]
    await store.close()


def _host() -> HostMetrics:
    return HostMetrics(cpu_percent=1, load1=0, load5=0, load15=0, mem_total_bytes=1, mem_available_bytes=1,
                       mem_percent=1, swap_percent=0)
