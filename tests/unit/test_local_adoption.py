"""The controller's side of the agent-local fallback: a ``LocalAction`` on the wire, through the fleet, and
adopted by the reconciler into the unit's incident as an attempt (time passed in)."""

from __future__ import annotations

import pytest

from controller.fleet import Fleet
from remediations.reconciler import Adopted, FleetView, Held, Opened, Reconciler, Started, Symptom
from remediations.state import Attempt
from rules.model import Backoff, Rule, Rulebook, Rung
from selfheal import wire
from selfheal.errors import MalformedMessage
from tests.node_messages import host_metrics, signed

NODE = "node-a"
T0 = 1_700_000_000.0
KEY = "0123456789abcdef0123456789abcdef"
FIXED = Backoff(first=0.0, base=1.0, factor=2.0, max=30.0, jitter=0.0)
CRASH = Rule(name="restart-exited-unit", kind="unit_exited",
             ladder=(Rung("restart", 3, FIXED), Rung("stop_start", 1, Backoff(first=10.0, jitter=0.0)),
                     Rung("notify")),
             cooldown=5.0, resolve_after=5.0, max_attempts=10, attempt_window=3600.0, digest="c" * 64)
PAGE = Rule(name="page-hung-unit", kind="probe_failing", ladder=(Rung("notify"),), digest="p" * 64)


def local(key: str = KEY, **fields: object) -> wire.LocalAction:
    return wire.LocalAction(unit="web", key=key, **fields)  # type: ignore[arg-type]


def exited(unit: str = "web") -> Symptom:
    return Symptom(key=f"unit_exited/{NODE}/{unit}", kind="unit_exited", node=NODE, unit=unit, severity="critical",
                   summary=f"unit {unit} on {NODE} exited with code 3")


# --- the wire --------------------------------------------------------------------------------------


def test_a_signed_local_action_passes_the_edge_and_the_signature_check() -> None:
    key = b"k" * 32
    event = wire.Event(node=NODE, session=3, ts=T0, body=local(attempt=2, reason="probe_failing", status="failed",
                                                              detail="http probe failed 3 times", ts=T0 - 5))
    topic = wire.node_topic(NODE, "events")
    payload = signed(event, "events", key)
    message = wire.decode_node_message(topic, payload)
    assert isinstance(message, wire.Event)
    assert message.body == event.body
    assert wire.verify_node_message(message, "events", key, payload)
    assert not wire.verify_node_message(message, "report", key, payload)


def test_only_the_unit_and_the_key_are_required() -> None:
    payload = (b'{"v":1,"node":"node-a","session":1,"ts":1.0,'
               b'"body":{"type":"local_action","unit":"web","key":"' + KEY.encode() + b'"}}')
    message = wire.decode_node_message(wire.node_topic(NODE, "events"), payload)
    assert isinstance(message, wire.Event)
    assert message.body == wire.LocalAction(unit="web", key=KEY, action="restart", attempt=1, reason="unit_exited",
                                            status="done", detail="", ts=0.0)


@pytest.mark.parametrize("body", [
    b'{"type":"local_action","unit":"web","key":"not hex"}',
    b'{"type":"local_action","unit":"web","key":"' + KEY.encode() + b'","action":"migrate"}',
    b'{"type":"local_action","key":"' + KEY.encode() + b'"}',
])
def test_a_malformed_local_action_is_refused_at_the_edge(body: bytes) -> None:
    payload = b'{"v":1,"node":"node-a","session":1,"ts":1.0,"body":' + body + b"}"
    with pytest.raises(MalformedMessage):
        wire.decode_node_message(wire.node_topic(NODE, "events"), payload)


def test_fit_event_cuts_a_long_detail() -> None:
    fitted = wire.fit_event(local(detail="x" * (wire.MAX_TEXT + 10)))
    assert isinstance(fitted, wire.LocalAction)
    assert len(fitted.detail) == wire.MAX_TEXT


# --- the fleet -------------------------------------------------------------------------------------


def test_the_fleet_queues_local_actions_for_the_engine_without_touching_unit_state() -> None:
    fleet = Fleet()
    # before any report of the session (a controller just back): unit events are held, local actions are not
    fleet.apply(wire.Event(node=NODE, session=1, ts=T0, body=local()), T0)
    assert list(fleet.local_actions) == [(NODE, T0, local())]
    assert fleet.nodes[NODE].held_events == type(fleet.nodes[NODE].held_events)()
    assert fleet.nodes[NODE].units == {}
    report = wire.Report(node=NODE, session=1, seq=1, ts=T0 + 1, host=host_metrics(),
                         units=[wire.UnitReport(name="web", kind="process", state="running", pid=7)])
    fleet.apply(report, T0 + 1)
    fleet.apply(wire.Event(node=NODE, session=1, ts=T0 + 0.5, body=local("f" * 32)), T0 + 2)  # older than the report
    assert [action.key for _, _, action in fleet.local_actions] == [KEY, "f" * 32]
    assert fleet.nodes[NODE].units["web"].state == "running"


# --- adoption --------------------------------------------------------------------------------------


def reconciler(*rules: Rule) -> Reconciler:
    return Reconciler(Rulebook(rules or (CRASH, PAGE)))


def test_a_local_restart_of_a_unit_without_an_incident_opens_one_and_counts_on_the_restart_rung() -> None:
    engine = reconciler()
    adopted = engine.adopt(exited(), "local-a", T0 - 3, T0)
    assert adopted == Adopted(exited().key, "local-a", "restart-exited-unit", 0, 1, T0 - 3,
                              Opened(exited().key, exited(), "restart-exited-unit"))
    engine.bind(exited().key, 1)
    # the unit is running again: the incident clears and resolves, nothing is started
    assert engine.evaluate({}, FleetView(), T0) == []
    assert [type(e).__name__ for e in engine.evaluate({}, FleetView(), T0 + 6)] == ["Resolved"]


def test_the_controller_does_not_restart_again_at_once_after_a_local_restart() -> None:
    engine = reconciler()
    assert engine.evaluate({exited().key: exited()}, FleetView(), T0 - 60)[0] == Opened(
        exited().key, exited(), "restart-exited-unit")
    engine.bind(exited().key, 1)
    adopted = engine.adopt(exited(), "local-a", T0 - 1, T0)
    assert adopted is not None
    assert (adopted.opened, adopted.attempt, adopted.rung) == (None, 1, 0)
    # the unit is still down: cooldown (5 s) from the local restart holds the controller's restart back
    [held] = engine.evaluate({exited().key: exited()}, FleetView(), T0)
    assert isinstance(held, Held)
    assert held.blocking.guard == "cooldown"
    [started] = engine.evaluate({exited().key: exited()}, FleetView(), T0 + 4.1)
    assert isinstance(started, Started)
    assert (started.plan.rung, started.plan.attempt) == (0, 2)  # the second restart: the first was the agent's


def test_local_restarts_climb_the_ladder_the_controller_continues() -> None:
    engine = reconciler()
    for i in range(3):
        engine.adopt(exited(), f"local-{i}", T0 - 30 + i * 5, T0)
    engine.bind(exited().key, 1)
    [started] = engine.evaluate({exited().key: exited()}, FleetView(), T0 + 20)
    assert isinstance(started, Started)
    assert (started.plan.rung, started.plan.attempt) == (1, 4)  # stop_start: the agent used up the restarts


def test_a_replayed_local_action_is_adopted_once_also_after_a_controller_restart() -> None:
    engine = reconciler()
    assert engine.adopt(exited(), "local-a", T0, T0) is not None
    assert engine.adopt(exited(), "local-a", T0, T0 + 1) is None
    restarted = reconciler()  # a new controller: the attempt comes back from the store's plan record
    restarted.restore_attempt("restart-exited-unit", exited(), Attempt("local-a", 0, T0, "restart"))
    assert restarted.adopt(exited(), "local-a", T0, T0 + 30) is None


def test_without_a_restart_rung_or_too_old_it_is_recorded_but_not_counted() -> None:
    engine = reconciler()
    hung = Symptom(key=f"probe_failing/{NODE}/web", kind="probe_failing", node=NODE, unit="web",
                   severity="critical", summary="hung")
    adopted = engine.adopt(hung, "local-h", T0, T0)
    assert adopted is not None
    assert (adopted.rule, adopted.rung, adopted.attempt) == ("page-hung-unit", None, 0)
    assert adopted.opened is not None
    old = engine.adopt(exited(), "local-old", T0 - 4000, T0)
    assert old is not None
    assert (old.rung, old.attempt) == (None, 0)
    assert engine.incidents[exited().key].plans == 0
