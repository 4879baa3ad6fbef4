"""The fleet index: counts, presence, pages and the datasets view kept up to date message by message.

The property: after any sequence of messages, evictions and passing time, what the index says equals a
recount from scratch over every node's snapshot (``recount``, ``is_offline``, ``describe_datasets``)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.datasets import Localisations, Localised, describe_datasets, held_by_dataset
from controller.fleet import Fleet
from controller.fleet_index import FleetIndex, recount, unit_unhealthy
from detectors.digests import Localisation
from detectors.presence import is_offline
from selfheal.wire import (
    CommandResult,
    DatasetDigest,
    DatasetSummary,
    Event,
    EventBody,
    HostMetrics,
    NodeStatus,
    ProbeChanged,
    ProbeState,
    Report,
    UnitExited,
    UnitReport,
    UnitStarted,
)

T0 = 1_700_000_000.0
OFFLINE_AFTER = 30.0
NODES = ("n-a", "n-b", "n-c", "n-d", "n-e", "n-f")
UNITS = ("web", "etl", "db")
STATES = ("starting", "running", "exited", "stopped", "failed", "completed")

HOST = HostMetrics(cpu_percent=1.0, load1=0.0, load5=0.0, load15=0.0, mem_total_bytes=1 << 30,
                   mem_available_bytes=1 << 29, mem_percent=50.0, swap_percent=0.0)


def probe(healthy: bool | None) -> ProbeState | None:
    return None if healthy is None else ProbeState(kind="http", healthy=healthy, consecutive_failures=0,
                                                   failures_threshold=3)


nodes = st.sampled_from(NODES)
sessions = st.integers(1, 3)
unit_reports = st.lists(
    st.tuples(st.sampled_from(UNITS), st.sampled_from(STATES), st.sampled_from([None, True, False])),
    max_size=3, unique_by=lambda u: u[0])
operations = st.one_of(
    st.tuples(st.just("status"), nodes, sessions, st.sampled_from(["online", "offline"]), st.integers(0, 2)),
    st.tuples(st.just("report"), nodes, sessions, unit_reports),
    st.tuples(st.just("event"), nodes, sessions, st.sampled_from(["exited", "started", "probe", "result"]),
              st.sampled_from(UNITS), st.booleans()),
    st.tuples(st.just("digest"), nodes, sessions,
              st.lists(st.tuples(st.sampled_from(["d1", "d2"]), st.sampled_from(["r1", "r2", ""])), max_size=2,
                       unique_by=lambda d: d[0])),
    st.tuples(st.just("wait"), st.sampled_from([0.5, 5.0, 29.0, 31.0, 120.0])),
    st.tuples(st.just("look_back"), st.sampled_from([1.0, 40.0])),
    st.tuples(st.just("localise"), nodes, st.sampled_from(["d1", "d2"])),
)


class World:
    """A fleet driven by operations, with its clock and each node's next sequence number."""

    def __init__(self) -> None:
        self.fleet = Fleet(history=3, max_nodes=4)  # fewer than NODES: evictions happen
        self.index = FleetIndex(self.fleet, offline_after=OFFLINE_AFTER)
        self.localisations = Localisations()
        self.now = T0
        self.seq: dict[str, int] = {}

    def run(self, op: tuple[Any, ...]) -> float:
        """Apply ``op``; returns the time to look at the fleet at."""
        kind = op[0]
        if kind == "wait":
            self.now += float(op[1])
            return self.now
        if kind == "look_back":
            return self.now - float(op[1])
        if kind == "localise":
            self.localisations.record(op[2], op[1], Localised("r1", "r2", Localisation(differences=(), rounds=1)))
            return self.now
        self.now += 0.1
        node, session = op[1], op[2]
        if kind == "status":
            message: Any = NodeStatus(node=node, state=op[3], session=session, units=list(UNITS[:2]), conn=op[4],
                                      ts=self.now)
        elif kind == "report":
            self.seq[node] = self.seq.get(node, 0) + 1
            message = Report(node=node, session=session, seq=self.seq[node], ts=self.now, host=HOST, units=[
                UnitReport(name=name, kind="process", state=state, probe=probe(healthy))
                for name, state, healthy in op[3]])
        elif kind == "event":
            unit = op[4]
            bodies: dict[str, EventBody] = {
                "exited": UnitExited(unit=unit, pid=1, exit_code=1, expected=op[5]),
                "started": UnitStarted(unit=unit, pid=2, restarts=1),
                "probe": ProbeChanged(unit=unit, probe=probe(op[5])),  # type: ignore[arg-type]
                "result": CommandResult(command_id="c", key="k", status="done")}
            body = bodies[op[3]]
            message = Event(node=node, session=session, ts=self.now, body=body)
        else:
            message = DatasetDigest(node=node, session=session, ts=self.now, datasets=[
                DatasetSummary(name=name, root=root, state="ok" if root else "settling") for name, root in op[3]])
        self.fleet.apply(message, self.now)
        return self.now

    def check(self, at: float) -> None:
        fleet, index = self.fleet, self.index
        assert index.counts(at) == recount(fleet, at, OFFLINE_AFTER)
        offline = {n for n in fleet.nodes if is_offline(fleet.snapshot(n), at, OFFLINE_AFTER)}  # type: ignore[arg-type]
        assert index.offline(at) == offline
        sick = {n for n, s in fleet.nodes.items() if any(unit_unhealthy(u) for u in s.units.values())}
        assert index.problems(at, len(NODES)) == sorted(offline | sick)
        held = held_by_dataset(fleet.nodes.values())
        assert index.datasets(at, self.localisations) == describe_datasets(held, offline, self.localisations)
        assert all_pages(index, 2) == sorted(fleet.nodes)


def all_pages(index: FleetIndex, limit: int) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        ids, cursor = index.page(cursor, limit)
        assert len(ids) <= limit
        seen += ids
        if cursor is None:
            return seen


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, max_size=60))
def test_the_index_always_equals_a_recount_from_scratch(ops: list[tuple[Any, ...]]) -> None:
    world = World()
    for op in ops:
        world.check(world.run(op))


def test_an_index_made_late_counts_the_fleet_it_finds() -> None:
    world = World()
    for op in [("status", "n-a", 1, "online", 0), ("report", "n-b", 1, [("web", "exited", None)]),
               ("status", "n-c", 1, "offline", 0)]:
        world.run(op)
    late = FleetIndex(world.fleet, offline_after=OFFLINE_AFTER)
    counts = late.counts(world.now)
    assert (counts.nodes, counts.offline, counts.units, counts.unhealthy) == (3, 1, 5, 1)
    assert counts == recount(world.fleet, world.now, OFFLINE_AFTER)


def test_a_node_goes_silent_with_time_and_comes_back_when_heard() -> None:
    world = World()
    world.run(("status", "n-a", 1, "online", 0))
    heard = world.now
    assert world.index.counts(heard + OFFLINE_AFTER).offline == 0  # exactly offline_after: not yet
    assert world.index.counts(heard + OFFLINE_AFTER + 0.01).offline == 1
    world.now = heard + 100
    world.run(("report", "n-a", 1, []))
    assert world.index.counts(world.now).offline == 0
    world.run(("status", "n-a", 1, "offline", 0))
    assert world.index.offline(world.now) == {"n-a"}  # said so itself


def test_a_node_heard_again_before_its_silence_came_due_falls_silent_from_its_last_message() -> None:
    world = World()
    world.run(("status", "n-a", 1, "online", 0))
    world.run(("wait", 20.0))
    world.run(("report", "n-a", 1, []))
    assert world.index.counts(world.now + OFFLINE_AFTER - 9).offline == 0  # due by the status, heard since
    assert world.index.counts(world.now + OFFLINE_AFTER + 1).offline == 1


def test_pages_at_their_boundaries() -> None:
    fleet = Fleet(max_nodes=100)
    index = FleetIndex(fleet, offline_after=OFFLINE_AFTER)
    for name in ("n-1", "n-2", "n-3", "n-4"):
        fleet.apply(NodeStatus(node=name, state="online", session=1, ts=T0), T0)
    assert index.page(None, 4) == (["n-1", "n-2", "n-3", "n-4"], None)  # exactly all: no next page
    assert index.page(None, 3) == (["n-1", "n-2", "n-3"], "n-3")
    assert index.page("n-3", 3) == (["n-4"], None)
    assert index.page("n-4", 3) == ([], None)  # after the last
    assert index.page("n-2a", 1) == (["n-3"], "n-3")  # a cursor that is no node id: the ids that sort after it
    assert index.page("", 1) == (["n-1"], "n-1")
    assert list(index.ids_from("n-2")) == ["n-2", "n-3", "n-4"]


def test_the_datasets_view_is_recomputed_only_when_what_it_reads_changed() -> None:
    world = World()
    world.run(("digest", "n-a", 1, [("d1", "r1")]))
    world.run(("status", "n-a", 1, "online", 0))
    first = world.index.datasets(world.now, world.localisations)
    world.run(("report", "n-a", 1, [("web", "running", True)]))
    assert world.index.datasets(world.now, world.localisations) is first  # a report changes no replica
    world.run(("status", "n-b", 1, "online", 0))
    assert world.index.datasets(world.now, world.localisations) is first  # nor does a node holding none
    world.run(("digest", "n-a", 1, [("d1", "r2")]))
    second = world.index.datasets(world.now, world.localisations)
    assert second is not first
    assert second[0]["replicas"][0]["root"] == "r2"
    world.now += OFFLINE_AFTER + 1  # the holder falls silent: its replica is shown offline
    third = world.index.datasets(world.now, world.localisations)
    assert third is not second
    assert third[0]["replicas"][0]["online"] is False
    world.run(("localise", "n-a", "d1"))
    assert world.index.datasets(world.now, world.localisations) is not third
