"""Dataset replicas compared across controllers (``controller.shared_replicas``): each controller hears only its
own buckets' nodes, writes their replicas to the shared store and compares its own with what the others wrote.

The store here is a stand-in with the ``Store`` methods' meaning (numbered records, read by what changed);
``tests/integration/test_store.py`` holds both real stores to it, ``test_leases.py`` the epoch fence, and
``test_ha.py`` runs the whole of it with real controllers, agents and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import replace

from controller.fleet import Fleet
from controller.observe import Observer
from controller.placement import Placements
from controller.shared_replicas import SharedReplicas
from controller.store import ReplicaRecord
from detectors.model import DetectorSettings
from selfheal.wire import DatasetDigest, DatasetSummary, HostMetrics, NodeStatus, Report

T0 = 1_700_000_000.0
SETTINGS = DetectorSettings(offline_after=30.0)
HOST = HostMetrics(cpu_percent=5.0, load1=0.0, load5=0.0, load15=0.0, mem_total_bytes=1 << 30,
                   mem_available_bytes=1 << 29, mem_percent=50.0, swap_percent=0.0)


class ReplicaStore:
    """The two ``Store`` methods, in memory: records numbered as written; a read with a time window gets every
    record (the worst case: all of them written within the overlap)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], ReplicaRecord] = {}
        self.seq = 0
        self.writes = 0

    async def save_replicas(self, records: list[ReplicaRecord]) -> int:
        for record in records:
            self.seq += 1
            self.writes += 1
            self.rows[(record.dataset, record.node)] = replace(record, seq=self.seq)
        return len(records)

    async def forget_replicas(self, *, older_than: float) -> int:
        gone = [key for key, record in self.rows.items() if record.summary is None]
        for key in gone:
            del self.rows[key]
        return len(gone)

    async def replicas_changed(self, *, after: int, since: float | None) -> tuple[list[ReplicaRecord], float]:
        return sorted((r for r in self.rows.values() if r.seq > after or since is not None),
                      key=lambda r: r.seq), T0


class Controller:
    """One controller's fleet (the nodes of its buckets), observer and shared replicas."""

    def __init__(self, *nodes: str) -> None:
        self.nodes = set(nodes)
        self.fleet = Fleet()
        self.shared = SharedReplicas(lambda node: 7 if node in self.nodes else None)
        self.observer = Observer(self.fleet, SETTINGS, placements=Placements(), group_label="rack",
                                 owns=lambda node: node in self.nodes, elsewhere=lambda: True, shared=self.shared)
        self.fleet.on_evict = self.observer.forget  # as the engine does
        for node in sorted(nodes):
            self.fleet.apply(NodeStatus(node=node, session=1, state="online", ts=T0, http=f"{node}:8080"), T0)
            self.fleet.apply(Report(node=node, session=1, seq=1, ts=T0, units=[], host=HOST), T0)

    def digest(self, node: str, root: str | None, *, at: float = T0, generation: int = 1) -> None:
        datasets = [] if root is None else [DatasetSummary(name="train", root=root, files=3, bytes=30,
                                                          generation=generation, state="ok", scanned_at=at)]
        self.fleet.apply(DatasetDigest(node=node, session=1, ts=at, datasets=datasets), at)

    async def exchange(self, store: ReplicaStore) -> None:
        """One round of ``controller.app``'s follower: look, write, read back, look again."""
        self.observer.refresh(T0)
        await self.shared.save(store)  # type: ignore[arg-type]
        self.observer.shared_changed(await self.shared.sync(store))  # type: ignore[arg-type]
        self.observer.refresh(T0)

    def findings(self) -> list[str]:
        return sorted(self.observer.symptoms)


async def settle(store: ReplicaStore, *controllers: Controller) -> None:
    for _ in range(2):  # each reads what the others wrote in the same round
        for controller in controllers:
            await controller.exchange(store)


async def test_a_replica_that_differs_from_the_majority_elsewhere_is_found_by_its_own_controller_only() -> None:
    """node-a (c1's) differs from node-b and node-c (c2's). Alone, c1 has nothing to compare with and c2 sees
    agreement: the divergence would go unseen. Shared, c1 finds it — on its own node only — and c2 nothing."""
    store = ReplicaStore()
    c1, c2 = Controller("node-a"), Controller("node-b", "node-c")
    c1.digest("node-a", "m:2")
    c2.digest("node-b", "m:1")
    c2.digest("node-c", "m:1")
    await settle(store, c1, c2)
    assert c1.findings() == ["dataset_divergent/node-a/-/train"]
    assert c2.findings() == []
    replicas = c1.observer.view().datasets["train"]
    assert [(r.node, r.root, r.online) for r in replicas] == [("node-a", "m:2", True), ("node-b", "m:1", True),
                                                            ("node-c", "m:1", True)]
    held = {r.node: r for r in c1.observer.replicas_of("train")}
    assert (held["node-a"].here, held["node-b"].here, held["node-b"].http) == (True, False, "node-b:8080")

    c1.digest("node-a", "m:1", at=T0 + 1, generation=2)  # repaired
    await settle(store, c1, c2)
    assert c1.findings() == c2.findings() == []


async def test_two_replicas_that_disagree_on_one_controller_are_decided_by_a_third_elsewhere() -> None:
    """1 against 1 on c2 has no authority (a page for a human, no repair); c1's replica makes a majority: c2
    repairs its divergent replica, and nobody reports a dataset without authority."""
    store = ReplicaStore()
    c1, c2 = Controller("node-a"), Controller("node-b", "node-c")
    c1.digest("node-a", "m:1")
    c2.digest("node-b", "m:2")
    c2.digest("node-c", "m:1")
    c2.observer.refresh(T0)
    assert c2.findings() == ["dataset_no_authority/node-b/-/train"]  # what c2 alone would say
    await settle(store, c1, c2)
    assert c2.findings() == ["dataset_divergent/node-b/-/train"]
    assert c1.findings() == []


async def test_a_replica_on_a_node_gone_silent_elsewhere_is_no_source_and_raises_nothing() -> None:
    store = ReplicaStore()
    c1, c2 = Controller("node-a", "node-b"), Controller("node-c")
    c1.digest("node-a", "m:1")
    c1.digest("node-b", "m:1")
    c2.digest("node-c", "m:2")
    await settle(store, c1, c2)
    assert c2.findings() == ["dataset_divergent/node-c/-/train"]
    c1.fleet.apply(NodeStatus(node="node-b", session=1, state="offline", ts=T0 + 1), T0 + 1)
    await settle(store, c1, c2)
    online = {r.node: r.online for r in c2.observer.view().datasets["train"]}
    assert online == {"node-a": True, "node-b": False, "node-c": True}


async def test_only_what_the_others_compare_is_written() -> None:
    store = ReplicaStore()
    c1, c2 = Controller("node-a"), Controller("node-b")
    c1.digest("node-a", "m:1")
    c2.digest("node-b", "m:1")
    await settle(store, c1, c2)
    writes = store.writes
    c1.digest("node-a", "m:1", at=T0 + 5)  # a rescan that found the same tree
    await settle(store, c1, c2)
    assert store.writes == writes
    c1.digest("node-a", None, at=T0 + 6)  # the dataset is gone from node-a
    await settle(store, c1, c2)
    assert store.writes == writes + 1
    assert [r.node for r in c2.observer.replicas_of("train")] == ["node-b"]


async def test_a_node_evicted_leaves_the_comparison_and_one_whose_bucket_moved_writes_nothing() -> None:
    """Evicted by its own controller (the fleet full, the node long silent): its replicas go, as they would
    with one controller. Its bucket moved to another controller: the new owner writes; a record the old one
    had not written yet is dropped, never written late."""
    store = ReplicaStore()
    c1, c2 = Controller("node-a", "node-b"), Controller("node-c")
    for controller, node in ((c1, "node-a"), (c1, "node-b"), (c2, "node-c")):
        controller.digest(node, "m:1")
    await settle(store, c1, c2)
    c1.fleet.forget("node-a")  # evicted
    await settle(store, c1, c2)
    assert [r.node for r in c2.observer.replicas_of("train")] == ["node-b", "node-c"]
    assert store.rows[("train", "node-a")].summary is None

    writes = store.writes
    c1.digest("node-b", "m:2", at=T0 + 7)
    c1.observer.refresh(T0)  # heard, not yet written
    c1.nodes.discard("node-b")  # its bucket moved: released, then forgotten
    c1.shared.release(lambda node: node == "node-b")
    c1.fleet.forget("node-b")
    await c1.shared.save(store)  # type: ignore[arg-type]
    assert store.writes == writes
    assert b"m:1" in (store.rows[("train", "node-b")].summary or b"")


async def test_the_whole_table_read_now_and_then_drops_what_an_incremental_read_missed() -> None:
    clock = [0.0]
    shared = SharedReplicas(lambda node: None, monotonic=lambda: clock[0])
    store = ReplicaStore()
    store.rows[("train", "node-x")] = ReplicaRecord("train", "node-x", b'{"name":"train","root":"m:1","state":"ok"}',
                                                    True, "x:1", 1, seq=1)
    assert await shared.sync(store) == {"train"}  # type: ignore[arg-type]
    del store.rows[("train", "node-x")]  # its record without summary written, and deleted, while this one was away
    clock[0] += 599
    assert await shared.sync(store) == set()  # type: ignore[arg-type]
    assert list(shared.elsewhere["train"]) == ["node-x"]
    clock[0] += 1
    assert await shared.sync(store) == {"train"}  # type: ignore[arg-type]
    assert shared.elsewhere == {}


async def test_a_record_read_again_or_out_of_order_never_undoes_a_newer_one() -> None:
    shared = SharedReplicas(lambda node: None)
    store = ReplicaStore()
    newer = DatasetSummary(name="train", root="m:2", state="ok")
    store.rows[("train", "node-x")] = ReplicaRecord("train", "node-x", b'{"name":"train","root":"m:2","state":"ok"}',
                                                    True, "x:1", 1, seq=5)
    assert await shared.sync(store) == {"train"}  # type: ignore[arg-type]
    assert await shared.sync(store) == set()  # type: ignore[arg-type]  # read again within the overlap
    store.rows[("train", "node-x")] = ReplicaRecord("train", "node-x", b'{"name":"train","root":"m:1","state":"ok"}',
                                                    True, "x:1", 1, seq=3)  # numbered before the one held
    assert await shared.sync(store) == set()  # type: ignore[arg-type]
    assert shared.elsewhere["train"]["node-x"].summary == newer
    store.rows[("train", "node-y")] = ReplicaRecord("train", "node-y", b"not json", True, "y:1", 1, seq=6)
    await shared.sync(store)  # type: ignore[arg-type]  # logged and skipped
    assert list(shared.elsewhere["train"]) == ["node-x"]
