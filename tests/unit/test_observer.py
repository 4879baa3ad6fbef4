"""The incremental observer: a message costs one node's detectors whatever the fleet's size, and what time
alone changes (silence, stalls, start timeouts) comes due from the timer queue at its instant, not from a rescan."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

import controller.observe
from controller.fleet import Fleet
from controller.observe import Observer
from controller.placement import Placements
from controller.store import PlacementRecord
from detectors.model import DetectorSettings, Finding, NodeSnapshot
from detectors.registry import EPSILON, detect_node
from selfheal.wire import (
    DatasetDigest,
    DatasetSummary,
    HostMetrics,
    NodeStatus,
    Report,
    UnitProgress,
    UnitReport,
)

T0 = 1_700_000_000.0
SETTINGS = DetectorSettings(offline_after=30.0)


def host() -> HostMetrics:
    return HostMetrics(cpu_percent=5.0, load1=0.0, load5=0.0, load15=0.0, mem_total_bytes=1 << 30,
                       mem_available_bytes=1 << 29, mem_percent=50.0, swap_percent=0.0)


def unit(name: str = "web", state: str = "running", **fields: Any) -> UnitReport:
    return UnitReport(name=name, kind="process", state=state, pid=100, **{"started_at": T0 - 100, **fields})  # type: ignore[arg-type]


def report(node: str, seq: int, at: float, *units: UnitReport, ts: float | None = None) -> Report:
    return Report(node=node, session=1, seq=seq, ts=at if ts is None else ts, host=host(),
                  units=list(units or (unit(),)))


def join(fleet: Fleet, node: str, at: float, *units: UnitReport, group: str = "") -> None:
    fleet.apply(NodeStatus(node=node, session=1, state="online", ts=at, units=[u.name for u in units],
                           labels={"rack": group} if group else {}), at)
    fleet.apply(report(node, 1, at, *units), at)


def observer(fleet: Fleet) -> Observer:
    return Observer(fleet, SETTINGS, placements=Placements(), group_label="rack")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every node the detectors run on, in order."""
    calls: list[str] = []

    def counting(snapshot: NodeSnapshot, now: float, settings: DetectorSettings) -> list[Finding]:
        calls.append(snapshot.node)
        return detect_node(snapshot, now, settings)

    monkeypatch.setattr(controller.observe, "detect_node", counting)
    return calls


@pytest.mark.parametrize("size", [10, 2000])
def test_a_message_runs_the_detectors_on_its_node_only(size: int, counted: list[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = Fleet(max_nodes=size + 1)
    for i in range(size):
        join(fleet, f"node-{i:05}", T0, unit(), unit("etl"), group=f"rack-{i % 7}")
    seen = observer(fleet)
    seen.refresh(T0)
    assert len(counted) == size  # the first pass meets every node once
    snapshots = count_calls(monkeypatch, fleet, "snapshot")
    counted.clear()

    fleet.apply(report("node-00003", 2, T0 + 1, unit(state="exited", exit_code=1), unit("etl")), T0 + 1)
    seen.refresh(T0 + 1)
    assert counted == ["node-00003"]
    assert len(snapshots) == 1
    assert "unit_exited/node-00003/web" in seen.symptoms
    counted.clear()
    seen.refresh(T0 + 2)  # nothing changed and nothing came due: nothing looked at
    assert counted == []
    assert seen.view().replicas["web"] == size
    assert seen.view().group_sizes["rack-3"] == len(range(3, size, 7))


def count_calls(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> list[object]:
    calls: list[object] = []
    original: Callable[..., object] = getattr(target, name)

    def wrapper(*args: object) -> object:
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(target, name, wrapper)
    return calls


def test_silence_comes_due_at_its_instant_from_the_timer_queue(counted: list[str]) -> None:
    fleet = Fleet()
    join(fleet, "node-a", T0)
    join(fleet, "node-b", T0 + 10)
    seen = observer(fleet)
    seen.refresh(T0 + 10)
    assert seen.next_due() == T0 + 30 + EPSILON  # node-a falls silent first
    counted.clear()

    seen.refresh(T0 + 30)  # not yet: its verdict cannot have changed, so it is not looked at
    assert counted == []
    assert not seen.symptoms
    seen.refresh(T0 + 30 + EPSILON)
    assert counted == ["node-a"]
    assert list(seen.symptoms) == ["node_offline/node-a/-"]
    assert seen.offline == {"node-a"}
    assert seen.next_due() == T0 + 40 + EPSILON  # an offline node has no timer until it talks again

    fleet.apply(report("node-a", 2, T0 + 35), T0 + 35)  # it talks: looked at again, back online
    seen.refresh(T0 + 35)
    assert not seen.symptoms
    assert not seen.offline


def test_a_stall_comes_due_at_its_deadline_on_the_nodes_clock(counted: list[str]) -> None:
    """The agent's clock runs 100 s ahead of the controller's: the deadline is read on the node's clock."""
    fleet = Fleet()
    skew = 100.0
    job = unit("etl", stall_after=20.0, progress=UnitProgress(done=1, total=3), progress_at=T0 + skew - 5)
    fleet.apply(NodeStatus(node="node-a", session=1, state="online", ts=T0 + skew, units=["etl"]), T0)
    fleet.apply(report("node-a", 1, T0, job, ts=T0 + skew), T0)
    seen = Observer(fleet, DetectorSettings(offline_after=60.0), placements=Placements(), group_label="rack")
    seen.refresh(T0)
    assert seen.next_due() == pytest.approx(T0 + 15 + EPSILON)
    counted.clear()
    seen.refresh(T0 + 14.9)
    assert counted == []
    assert not seen.symptoms
    seen.refresh(T0 + 15.01)
    assert counted == ["node-a"]
    assert list(seen.symptoms) == ["unit_stalled/node-a/etl"]


def test_a_start_timeout_comes_due_at_its_deadline_and_first_progress_hands_over_to_the_stall(
        counted: list[str]) -> None:
    """No progress yet: only the start limit is due (not the earlier stall_after); once the run progresses,
    the timer moves to its stall deadline. The agent's clock runs 100 s ahead of the controller's."""
    fleet = Fleet()
    skew = 100.0
    started = T0 + skew - 10  # on the node's clock
    waiting = unit("etl", started_at=started, stall_after=20.0, start_timeout=60.0)
    fleet.apply(NodeStatus(node="node-a", session=1, state="online", ts=T0 + skew, units=["etl"]), T0)
    fleet.apply(report("node-a", 1, T0, waiting, ts=T0 + skew), T0)
    seen = Observer(fleet, DetectorSettings(offline_after=600.0), placements=Placements(), group_label="rack")
    seen.refresh(T0)
    assert seen.next_due() == pytest.approx(T0 + 50 + EPSILON)  # started + 60 s, on the controller's clock
    counted.clear()
    seen.refresh(T0 + 15)  # past stall_after since the start: a slow start is not a stall
    assert counted == []
    assert not seen.symptoms

    moved = unit("etl", started_at=started, stall_after=20.0, start_timeout=60.0,
                 progress=UnitProgress(done=1, total=3), progress_at=T0 + skew + 20)  # first progress at +30 s
    fleet.apply(report("node-a", 2, T0 + 20, moved, ts=T0 + skew + 20), T0 + 20)
    seen.refresh(T0 + 20)
    assert not seen.symptoms
    assert seen.next_due() == pytest.approx(T0 + 40 + EPSILON)  # its progress + 20 s, no start deadline left

    restarted = unit("etl", started_at=T0 + skew + 25, stall_after=20.0, start_timeout=60.0,
                     progress=UnitProgress(done=1, total=3))  # a new run: the last one's progress is no start
    fleet.apply(report("node-a", 3, T0 + 25, restarted, ts=T0 + skew + 25), T0 + 25)
    seen.refresh(T0 + 25)
    assert seen.next_due() == pytest.approx(T0 + 85 + EPSILON)
    counted.clear()
    seen.refresh(T0 + 84.9)
    assert counted == []
    seen.refresh(T0 + 85 + EPSILON)
    assert counted == ["node-a"]
    assert list(seen.symptoms) == ["unit_start_timeout/node-a/etl"]


def test_a_dataset_is_looked_at_again_only_when_one_of_its_replicas_changes() -> None:
    fleet = Fleet()
    for node in ("node-a", "node-b", "node-c"):
        join(fleet, node, T0)
    seen = observer(fleet)
    for node, root in (("node-a", "m:1"), ("node-b", "m:1"), ("node-c", "m:2")):
        fleet.apply(DatasetDigest(node=node, session=1, ts=T0, datasets=[
            DatasetSummary(name="features", root=root, files=1, bytes=1, generation=1, state="ok")]), T0)
    seen.refresh(T0)
    assert list(seen.symptoms) == ["dataset_divergent/node-c/-/features"]
    assert [r.node for r in seen.view().datasets["features"]] == ["node-a", "node-b", "node-c"]

    fleet.apply(DatasetDigest(node="node-c", session=1, ts=T0 + 1, datasets=[
        DatasetSummary(name="features", root="m:1", files=1, bytes=1, generation=2, state="ok")]), T0 + 1)
    seen.refresh(T0 + 1)
    assert not seen.symptoms  # repaired


def test_an_evicted_node_leaves_nothing_behind() -> None:
    fleet = Fleet(max_nodes=2)
    seen = observer(fleet)
    fleet.on_evict = seen.forget
    join(fleet, "node-a", T0, unit(state="exited", exit_code=1), group="r1")
    join(fleet, "node-b", T0 + 1, group="r1")
    seen.refresh(T0 + 1)
    assert "unit_exited/node-a/web" in seen.symptoms
    fleet.apply(NodeStatus(node="node-a", session=1, state="offline", ts=T0 + 2), T0 + 2)
    join(fleet, "node-c", T0 + 3, group="r2")  # the fleet is full: the silent node-a goes
    seen.refresh(T0 + 3)
    assert "node-a" not in fleet.nodes
    assert not any(s.node == "node-a" for s in seen.symptoms.values())
    assert seen.view().group_sizes == {"r1": 1, "r2": 1}
    assert seen.view().replicas["web"] == 2


def test_silence_counts_from_the_controllers_reconnection_not_from_before_it(counted: list[str]) -> None:
    """A controller cut off from the broker heard nothing; it did not hear the fleet go silent."""
    fleet = Fleet()
    join(fleet, "node-a", T0)
    fleet.listening_since = T0 + 100  # the controller's broker connection came back at T0 + 100
    seen = observer(fleet)
    seen.refresh(T0 + 100)
    assert not seen.symptoms
    assert seen.next_due() == T0 + 130 + EPSILON
    seen.refresh(T0 + 129)
    assert not seen.symptoms
    seen.refresh(T0 + 130 + EPSILON)
    assert list(seen.symptoms) == ["node_offline/node-a/-"]


def test_a_node_back_from_a_partition_runs_nothing_until_its_first_report_says_so() -> None:
    """Its ``online`` arrives before the report saying its agent fenced the singleton while cut off; until
    then it is not counted as running it (which read as two copies beside the one started elsewhere) nor as
    having fenced it, and its units raise nothing."""
    fleet = Fleet()
    placements = Placements()
    seen = Observer(fleet, SETTINGS, placements=placements, group_label="rack")
    solo = unit("solo", fence_after=12.0)
    fleet.apply(NodeStatus(node="node-a", session=1, state="online", ts=T0, units=["solo"], conn=1), T0)
    fleet.apply(report("node-a", 1, T0, solo), T0)
    seen.refresh(T0)
    assert seen.running["solo"] == {"node-a"}
    fleet.apply(NodeStatus(node="node-a", session=1, state="offline", ts=T0 + 1, conn=1), T0 + 1)
    join(fleet, "node-b", T0 + 2, unit("solo"))  # the copy started elsewhere
    fleet.apply(NodeStatus(node="node-a", session=1, state="online", ts=T0 + 20, units=["solo"], conn=2), T0 + 20)
    seen.refresh(T0 + 20)
    assert seen.running["solo"] == {"node-b"}
    assert not any(s.node == "node-a" for s in seen.symptoms.values())
    fenced = msgspec.structs.replace(solo, state="stopped", fenced=True, pid=None)
    fleet.apply(report("node-a", 2, T0 + 21, fenced), T0 + 21)
    seen.refresh(T0 + 21)
    assert seen.running["solo"] == {"node-b"}
    assert "node-a" not in seen.offline


def test_a_unit_placed_on_a_node_another_controller_acts_on_is_never_found_lost_here() -> None:
    """With several controllers, each holds only its own buckets' nodes: a singleton placed on another
    controller's node runs nowhere this one can see, yet it is that controller's to find lost, never this
    one's (which would open an incident it cannot act on, or start a second copy)."""
    fleet = Fleet()
    placements = Placements()
    placements.current = {"solo": PlacementRecord("solo", "node-x", 12.0, T0),
                          "mine": PlacementRecord("mine", "node-b", 12.0, T0)}  # node-b: never heard
    seen = Observer(fleet, SETTINGS, placements=placements, group_label="rack", owns=lambda node: node != "node-x",
                    elsewhere=lambda: True)
    join(fleet, "node-a", T0, unit("other"))
    seen.refresh(T0)
    assert [s.unit for s in seen.symptoms.values() if s.kind == "unit_lost"] == ["mine"]
    assert seen.view().elsewhere


class PlacementStore:
    def __init__(self, *records: PlacementRecord) -> None:
        self.rows = {r.unit: r for r in records}

    async def list_placements(self) -> list[PlacementRecord]:
        return sorted(self.rows.values(), key=lambda r: r.unit)

    async def save_placement(self, record: PlacementRecord) -> None:
        self.rows[record.unit] = record


async def test_placements_another_controller_recorded_are_taken_up_and_what_runs_here_stands() -> None:
    store = PlacementStore(PlacementRecord("solo", "node-a", 12.0, T0), PlacementRecord("here", "node-a", 12.0, T0))
    placements = Placements()
    await placements.load(store)  # type: ignore[arg-type]
    placements.observe({"here": {"node-b": 12.0}}, {"here": {"node-b"}}, T0 + 5)  # recorded, not yet saved
    store.rows["solo"] = PlacementRecord("solo", "node-x", 12.0, T0 + 6)  # moved by another controller
    store.rows["here"] = PlacementRecord("here", "node-y", 12.0, T0 + 6)
    assert await placements.sync(store)  # type: ignore[arg-type]
    assert (placements.current["solo"].node, placements.current["here"].node) == ("node-x", "node-b")
    assert not await placements.sync(store)  # type: ignore[arg-type]
    await placements.save(store)  # type: ignore[arg-type]
    assert store.rows["here"].node == "node-b"
