"""Which nodes a controller acts on, under which epoch; and what a controller forgets when a bucket moves."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from controller.ownership import Leased, NotOwner, Sole, require_epoch
from remediations.reconciler import IncidentState, Reconciler, Symptom
from remediations.state import Attempt, Running
from rules.model import Rulebook
from selfheal.wire import bucket_of


def test_the_only_controller_acts_on_every_node_under_its_start_epoch() -> None:
    sole = Sole(7)
    assert sole.owns("node-a")
    assert require_epoch(sole, "node-b") == 7


def test_with_leases_a_node_is_acted_on_under_its_buckets_epoch_only_while_the_lease_is_held() -> None:
    held: dict[int, int] = {bucket_of("node-a"): 12}
    keeper: Any = SimpleNamespace(owned=lambda: dict(held))
    leased = Leased(keeper)
    assert require_epoch(leased, "node-a") == 12
    other = next(f"node-{i}" for i in range(1000) if bucket_of(f"node-{i}") != bucket_of("node-a"))
    assert not leased.owns(other)
    with pytest.raises(NotOwner, match="no longer held"):
        require_epoch(leased, other)
    held.clear()  # the lease lapsed: what was asked a moment ago no longer holds
    with pytest.raises(NotOwner):
        require_epoch(leased, "node-a")


def symptom(node: str) -> Symptom:
    return Symptom(key=f"unit_exited/{node}/web", kind="unit_exited", node=node, unit="web", severity="critical",
                   summary="web exited")


def test_the_reconciler_forgets_the_nodes_of_a_bucket_that_moved_and_keeps_the_rest() -> None:
    reconciler = Reconciler(Rulebook(rules=()))
    for node, plan in (("node-a", "1-1"), ("node-b", "2-1")):
        s = symptom(node)
        reconciler.restore_incident(IncidentState(key=s.key, symptom=s, rule="restart", first_seen=1.0))
        reconciler.restore_running(s.key, Running(plan, "restart", node, "web", "", disruptive=True))
        reconciler.restore_attempt("restart", s, Attempt(plan, 0, 1.0, "restart"))
    assert reconciler.forget(lambda node: node == "node-a") == ["1-1"]
    assert list(reconciler.incidents) == ["unit_exited/node-b/web"]
    assert list(reconciler.running) == ["2-1"]
    assert list(reconciler.plan_incident) == ["2-1"]
    assert [target for _, target in reconciler.targets] == ["node-b/web"]
    assert list(reconciler.unit_rules) == ["node-b/web"]
