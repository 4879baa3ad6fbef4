"""``detect_lost_units``: a movable singleton that runs nowhere reachable, and only then."""

from __future__ import annotations

from pathlib import Path

import pytest

from detectors.model import NodeSnapshot
from detectors.placement import Placement, detect_lost_units, runners
from selfheal.config import load_config
from selfheal.errors import ConfigError
from selfheal.wire import UnitReport, UnitStateName

PLACED = Placement("predict", "node-a", fence_after=10.0)


def node(name: str, state: UnitStateName | None, *, fenced: bool = False, seen: float = 100.0,
         confirmed: bool = True) -> NodeSnapshot:
    units = () if state is None else (UnitReport(name="predict", kind="process", state=state, fenced=fenced),)
    return NodeSnapshot(node=name, online=True, last_seen=seen, units=units, confirmed=confirmed)


def lost(*snapshots: NodeSnapshot, offline: set[str]) -> list[tuple[str, str | None, str]]:
    by_node = {s.node: s for s in snapshots}
    found = detect_lost_units([PLACED], {"predict": runners("predict", snapshots, offline)}, by_node.get, offline)
    return [(f.node, f.unit, f.evidence["reason"]) for f in found]


def test_its_node_offline_and_no_other_runs_it() -> None:
    assert lost(node("node-a", "running"), node("node-b", "stopped"), offline={"node-a"}) == [
        ("node-a", "predict", "node_offline")]
    (finding,) = detect_lost_units([PLACED], {}, {"node-a": node("node-a", "running")}.get, {"node-a"})
    assert finding.evidence["fenced_at"] == 110.0
    assert finding.key == "unit_lost/node-a/predict"


def test_it_clears_as_soon_as_another_online_node_runs_it() -> None:
    assert lost(node("node-a", "running"), node("node-b", "running"), offline={"node-a"}) == []
    assert lost(node("node-a", "running"), node("node-b", "starting"), offline={"node-a"}) == []


def test_a_copy_on_another_offline_node_does_not_count() -> None:
    assert lost(node("node-a", "running"), node("node-b", "running"), offline={"node-a", "node-b"}) == [
        ("node-a", "predict", "node_offline")]


def test_fenced_by_its_own_agent_on_an_online_node() -> None:
    assert lost(node("node-a", "stopped", fenced=True), node("node-b", "stopped"), offline=set()) == [
        ("node-a", "predict", "fenced")]


@pytest.mark.parametrize("state", ["exited", "failed", "stopped", "running"])
def test_not_lost_while_its_online_node_has_it_unfenced(state: UnitStateName) -> None:
    """An exit on a reachable node is healed in place first (unit_exited), not moved."""
    assert lost(node("node-a", state), node("node-b", "stopped"), offline=set()) == []


def test_a_node_just_back_runs_nothing_until_it_reports() -> None:
    """Its ``online`` came before the report that says what its agent did while cut off: what it said before
    (running) is no copy, and no verdict is drawn from it yet either way."""
    assert runners("predict", [node("node-a", "running", confirmed=False)], set()) == []
    assert runners("predict", [node("node-a", "running", confirmed=False)], set(), unconfirmed=True) == ["node-a"]
    assert lost(node("node-a", "running", confirmed=False), node("node-b", "stopped"), offline=set()) == []
    assert lost(node("node-a", "stopped", fenced=True, confirmed=False), node("node-b", "stopped"),
                offline=set()) == []


def test_a_never_seen_node_counts_as_offline() -> None:
    assert lost(node("node-b", "stopped"), offline=set()) == [("node-a", "predict", "node_offline")]


def test_config_rejects_a_non_positive_stop_after_disconnect(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nnode_id = "n"\n[[agent.units]]\nname = "u"\ncommand = ["true"]\n'
                    "stop_after_disconnect = 0\n")
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config(path, env={})
