"""Fleet state: presence by session, bounded history, report ordering, events, eviction, idempotency."""

from __future__ import annotations

import pytest

from controller.fleet import MAX_HELD_EVENTS, Fleet, unit_is_healthy
from selfheal.wire import (
    CommandResult,
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

NODE = "node-a"
T0 = 1_700_000_000.0


def host(cpu: float = 5.0) -> HostMetrics:
    return HostMetrics(cpu_percent=cpu, load1=0.0, load5=0.0, load15=0.0, mem_total_bytes=1 << 30,
                       mem_available_bytes=1 << 29, mem_percent=50.0, swap_percent=0.0)


def status(state: str = "online", *, session: int = 1, node: str = NODE, units: tuple[str, ...] = ("web",),
           version: str = "0.1.0", conn: int = 0, ts: float = T0) -> NodeStatus:
    return NodeStatus(node=node, state=state, session=session, version=version, units=list(units),  # type: ignore[arg-type]
                      http="127.0.0.1:8731", ts=ts, conn=conn)


def running(name: str = "web", *, pid: int = 100, restarts: int = 0, probe: ProbeState | None = None) -> UnitReport:
    return UnitReport(name=name, kind="process", state="running", pid=pid, restarts=restarts, probe=probe)


def report(seq: int, *, session: int = 1, ts: float | None = None, units: tuple[UnitReport, ...] | None = None,
           node: str = NODE) -> Report:
    return Report(node=node, session=session, seq=seq, ts=T0 + seq if ts is None else ts, host=host(seq),
                  units=list((running(),) if units is None else units))


def event(body: EventBody, *, ts: float, session: int = 1, node: str = NODE) -> Event:
    return Event(node=node, session=session, ts=ts, body=body)


def probe_state(healthy: bool, failures: int = 0) -> ProbeState:
    return ProbeState(kind="http", healthy=healthy, consecutive_failures=failures, failures_threshold=3,
                      last_error="" if healthy else "refused")


@pytest.fixture
def fleet() -> Fleet:
    return Fleet(history=5, max_nodes=3)


# --- presence -----------------------------------------------------------------------------------


def test_an_online_status_creates_the_node(fleet: Fleet) -> None:
    assert fleet.apply(status(units=("web", "etl")), now=T0) is None
    node = fleet.nodes[NODE]
    assert (node.online, node.session, node.version, node.http, node.last_seen) == (
        True, 1, "0.1.0", "127.0.0.1:8731", T0)
    assert sorted(node.units) == ["etl", "web"]
    assert node.units["web"].state == "starting"
    assert NODE in fleet.dirty


def test_an_offline_will_of_the_same_session_marks_the_node_offline(fleet: Fleet) -> None:
    fleet.apply(status(session=4), now=T0)
    fleet.apply(status("offline", session=4), now=T0 + 1)
    assert fleet.nodes[NODE].online is False
    snapshot = fleet.snapshot(NODE)
    assert snapshot is not None
    assert snapshot.online is False
    assert snapshot.last_seen == T0 + 1


def test_a_late_will_from_an_older_session_does_not_close_the_newer_one(fleet: Fleet) -> None:
    fleet.apply(status(session=4), now=T0)
    fleet.apply(status(session=5), now=T0 + 1)
    fleet.apply(status("offline", session=4), now=T0 + 2)
    node = fleet.nodes[NODE]
    assert node.online is True
    assert node.session == 5
    assert node.last_seen == T0 + 1
    assert fleet.stale == 1


def test_a_newer_session_reopens_an_offline_node(fleet: Fleet) -> None:
    fleet.apply(status(session=1), now=T0)
    fleet.apply(status("offline", session=1), now=T0 + 1)
    fleet.apply(status(session=2), now=T0 + 2)
    assert fleet.nodes[NODE].online is True
    assert fleet.nodes[NODE].session == 2


def test_applying_the_same_retained_status_twice_is_idempotent(fleet: Fleet) -> None:
    fleet.apply(status(session=3), now=T0)
    fleet.apply(report(1, session=3), now=T0 + 1)
    before = fleet.snapshot(NODE)
    fleet.apply(status(session=3), now=T0 + 1)
    after = fleet.snapshot(NODE)
    assert after == before
    assert fleet.nodes[NODE].last_seq == 1
    assert fleet.stale == 0
    assert len(fleet.nodes) == 1


# --- reports ------------------------------------------------------------------------------------


def test_a_report_updates_units_and_history(fleet: Fleet) -> None:
    fleet.apply(status(), now=T0)
    fleet.apply(report(1, units=(running(pid=7, restarts=2),)), now=T0 + 1)
    unit = fleet.unit(NODE, "web")
    assert unit is not None
    assert (unit.state, unit.pid, unit.restarts) == ("running", 7, 2)
    snapshot = fleet.snapshot(NODE)
    assert snapshot is not None
    assert [r.seq for r in snapshot.reports] == [1]
    assert snapshot.last_seen == T0 + 1


def test_history_is_bounded(fleet: Fleet) -> None:
    for seq in range(1, 13):
        fleet.apply(report(seq), now=T0 + seq)
    assert [r.seq for r in fleet.nodes[NODE].reports] == [8, 9, 10, 11, 12]


def test_a_report_alone_marks_a_node_online(fleet: Fleet) -> None:
    fleet.apply(report(1), now=T0)
    assert fleet.nodes[NODE].online is True


def test_duplicate_and_reordered_reports_are_ignored(fleet: Fleet) -> None:
    fleet.apply(report(1), now=T0)
    fleet.apply(report(3, units=(running(pid=3),)), now=T0 + 1)
    fleet.apply(report(3, units=(running(pid=33),)), now=T0 + 2)  # duplicate
    fleet.apply(report(2, units=(running(pid=2),)), now=T0 + 3)  # reordered
    assert [r.seq for r in fleet.nodes[NODE].reports] == [1, 3]
    assert fleet.unit(NODE, "web").pid == 3  # type: ignore[union-attr]


def test_a_report_from_an_older_session_is_stale(fleet: Fleet) -> None:
    fleet.apply(status(session=2), now=T0)
    fleet.apply(report(50, session=1, units=(running(pid=1),)), now=T0 + 1)
    assert fleet.stale == 1
    assert list(fleet.nodes[NODE].reports) == []
    assert fleet.unit(NODE, "web").state == "starting"  # type: ignore[union-attr]


def test_a_new_session_restarts_the_sequence_after_its_status(fleet: Fleet) -> None:
    fleet.apply(status(session=1), now=T0)
    fleet.apply(report(100, session=1), now=T0 + 1)
    fleet.apply(status(session=2), now=T0 + 2)
    fleet.apply(report(1, session=2), now=T0 + 3)
    assert [(r.session, r.seq) for r in fleet.nodes[NODE].reports] == [(1, 100), (2, 1)]


def test_a_new_session_report_that_overtakes_its_status_is_accepted(fleet: Fleet) -> None:
    # Report (QoS 0) and status (QoS 1, retained) travel on different topics: the restarted agent's first
    # reports may arrive before its birth message. They must not be judged against the old session's seq.
    fleet.apply(status(session=1), now=T0)
    fleet.apply(report(100, session=1), now=T0 + 1)
    fleet.apply(report(1, session=2, units=(running(pid=200),)), now=T0 + 2)
    fleet.apply(report(2, session=2, units=(running(pid=200),)), now=T0 + 3)
    assert [(r.session, r.seq) for r in fleet.nodes[NODE].reports] == [(1, 100), (2, 1), (2, 2)]
    assert fleet.unit(NODE, "web").pid == 200  # type: ignore[union-attr]


def test_a_new_session_event_before_its_status_does_not_block_its_reports(fleet: Fleet) -> None:
    fleet.apply(status(session=1), now=T0)
    fleet.apply(report(100, session=1), now=T0 + 1)
    fleet.apply(event(UnitStarted(unit="web", pid=200, restarts=0), ts=T0 + 2, session=2), now=T0 + 2)
    fleet.apply(status(session=2), now=T0 + 3)
    fleet.apply(report(1, session=2, units=(running(pid=200),)), now=T0 + 4)
    assert [(r.session, r.seq) for r in fleet.nodes[NODE].reports] == [(1, 100), (2, 1)]


def test_units_missing_from_a_report_are_dropped(fleet: Fleet) -> None:
    fleet.apply(report(1, units=(running("a"), running("b"))), now=T0)
    fleet.apply(report(2, units=(running("a"),)), now=T0 + 1)
    assert sorted(fleet.nodes[NODE].units) == ["a"]


# --- events -------------------------------------------------------------------------------------


def test_an_unexpected_exit_marks_the_unit_exited(fleet: Fleet) -> None:
    fleet.apply(report(1, units=(running(probe=probe_state(True)),)), now=T0)
    assert fleet.apply(event(UnitExited(unit="web", pid=100, exit_signal=9), ts=T0 + 5), now=T0 + 5) is None
    unit = fleet.unit(NODE, "web")
    assert unit is not None
    assert (unit.state, unit.pid, unit.exit_code, unit.exit_signal) == ("exited", 100, None, 9)
    assert unit.probe is not None
    assert (unit.probe.healthy, unit.probe.last_error) == (False, "pending")
    assert not unit_is_healthy(unit)


def test_an_expected_exit_marks_the_unit_stopped(fleet: Fleet) -> None:
    fleet.apply(report(1), now=T0)
    fleet.apply(event(UnitExited(unit="web", pid=100, exit_code=0, expected=True), ts=T0 + 5), now=T0 + 5)
    unit = fleet.unit(NODE, "web")
    assert unit is not None
    assert (unit.state, unit.exit_code) == ("stopped", 0)


def test_a_start_marks_the_unit_running_and_clears_the_exit(fleet: Fleet) -> None:
    fleet.apply(report(1, units=(running(probe=probe_state(True)),)), now=T0)
    fleet.apply(event(UnitExited(unit="web", pid=100, exit_code=1), ts=T0 + 5), now=T0 + 5)
    fleet.apply(event(UnitStarted(unit="web", pid=101, restarts=1), ts=T0 + 6), now=T0 + 6)
    unit = fleet.unit(NODE, "web")
    assert unit is not None
    assert (unit.state, unit.pid, unit.restarts, unit.exit_code, unit.exit_signal) == ("running", 101, 1, None, None)
    assert unit.probe is not None
    assert unit.probe.healthy is False  # the new incarnation's probe verdict is not in yet
    assert not unit_is_healthy(unit)


def test_a_probe_change_updates_the_probe(fleet: Fleet) -> None:
    fleet.apply(report(1), now=T0)
    fleet.apply(event(ProbeChanged(unit="web", probe=probe_state(False, failures=3)), ts=T0 + 5), now=T0 + 5)
    unit = fleet.unit(NODE, "web")
    assert unit is not None
    assert unit.state == "running"
    assert unit.probe == probe_state(False, failures=3)
    fleet.apply(event(ProbeChanged(unit="web", probe=probe_state(True)), ts=T0 + 6), now=T0 + 6)
    assert unit_is_healthy(fleet.unit(NODE, "web"))


def test_an_event_for_an_unknown_unit_creates_it(fleet: Fleet) -> None:
    fleet.apply(report(1, ts=T0), now=T0)
    fleet.apply(event(UnitStarted(unit="new", pid=5, restarts=0), ts=T0 + 1), now=T0 + 1)
    unit = fleet.unit(NODE, "new")
    assert unit is not None
    assert (unit.state, unit.pid, unit.kind) == ("running", 5, "process")


def test_an_older_report_does_not_undo_an_event(fleet: Fleet) -> None:
    fleet.apply(report(1, ts=T0), now=T0)
    fleet.apply(event(UnitExited(unit="web", pid=100, exit_signal=9), ts=T0 + 10), now=T0 + 10)
    # Sampled before the exit, delivered after it.
    fleet.apply(report(2, ts=T0 + 9, units=(running(pid=100),)), now=T0 + 11)
    assert fleet.unit(NODE, "web").state == "exited"  # type: ignore[union-attr]
    assert [r.seq for r in fleet.nodes[NODE].reports] == [1, 2]
    # A report sampled after the event wins.
    fleet.apply(report(3, ts=T0 + 12, units=(running(pid=102, restarts=1),)), now=T0 + 12)
    unit = fleet.unit(NODE, "web")
    assert unit is not None
    assert (unit.state, unit.pid) == ("running", 102)


def test_an_older_report_naming_a_unit_the_fleet_dropped_does_not_crash(fleet: Fleet) -> None:
    fleet.apply(report(1, ts=T0), now=T0)
    fleet.apply(event(UnitExited(unit="web", pid=100, exit_code=1), ts=T0 + 10), now=T0 + 10)
    fleet.apply(report(2, ts=T0 + 11, units=()), now=T0 + 11)  # the unit left the config
    # A restarted agent whose wall clock is behind (e.g. before NTP sync) has the unit again.
    fleet.apply(status(session=2, units=()), now=T0 + 12)
    fleet.apply(report(1, session=2, ts=T0 + 5, units=(running(pid=300),)), now=T0 + 12)
    unit = fleet.unit(NODE, "web")
    assert unit is not None
    assert unit.pid == 300


def test_event_ordering_does_not_carry_over_to_a_new_session(fleet: Fleet) -> None:
    fleet.apply(report(1, ts=T0), now=T0)
    fleet.apply(event(UnitExited(unit="web", pid=100, exit_code=1), ts=T0 + 10), now=T0 + 10)
    # The new session's agent clock is a few seconds behind the old one's.
    fleet.apply(status(session=2), now=T0 + 12)
    fleet.apply(report(1, session=2, ts=T0 + 8, units=(running(pid=300),)), now=T0 + 12)
    unit = fleet.unit(NODE, "web")
    assert unit is not None
    assert (unit.state, unit.pid) == ("running", 300)


def test_an_event_from_an_older_session_is_stale(fleet: Fleet) -> None:
    fleet.apply(status(session=2), now=T0)
    fleet.apply(event(UnitExited(unit="web", pid=1, exit_code=1), ts=T0 + 1, session=1), now=T0 + 1)
    assert fleet.unit(NODE, "web").state == "starting"  # type: ignore[union-attr]
    assert fleet.stale == 1


def test_a_command_result_is_returned_for_the_dispatcher(fleet: Fleet) -> None:
    result = CommandResult(command_id="c1", key="k1", status="done", detail="restarted")
    assert fleet.apply(event(result, ts=T0), now=T0) == result
    assert fleet.nodes[NODE].last_seen == T0
    assert fleet.nodes[NODE].units == {}


# --- replays of a node's own signed messages -----------------------------------------------------


def test_a_replayed_event_does_not_refresh_presence(fleet: Fleet) -> None:
    result = CommandResult(command_id="c1", key="k1", status="done", detail="restarted")
    fleet.apply(report(1, ts=T0), now=T0)
    fleet.apply(event(result, ts=T0 + 1), now=T0 + 1)
    fleet.apply(event(UnitStarted(unit="web", pid=101, restarts=1), ts=T0 + 2), now=T0 + 2)
    for now in (T0 + 30, T0 + 31):  # the agent is gone; its old messages come again
        assert fleet.apply(event(result, ts=T0 + 1), now=now) == result  # the dispatcher ignores a known ack
        fleet.apply(event(UnitStarted(unit="web", pid=101, restarts=1), ts=T0 + 2), now=now)
    assert fleet.nodes[NODE].last_seen == T0 + 2
    fleet.apply(event(ProbeChanged(unit="web", probe=probe_state(True)), ts=T0 + 40), now=T0 + 40)
    assert fleet.nodes[NODE].last_seen == T0 + 40  # a new one does


def test_a_replayed_status_does_not_refresh_presence(fleet: Fleet) -> None:
    fleet.apply(status(conn=1, ts=T0), now=T0)
    fleet.apply(status(conn=1, ts=T0), now=T0 + 30)  # a redelivered or replayed birth
    assert fleet.nodes[NODE].last_seen == T0


def test_unit_events_wait_for_a_report_of_their_session(fleet: Fleet) -> None:
    fleet.apply(status(session=3), now=T0)  # a controller that just started knows nothing of session 3
    fleet.apply(event(UnitExited(unit="web", pid=100, exit_signal=9), ts=T0 + 5, session=3), now=T0 + 20)
    assert fleet.unit(NODE, "web").state == "starting"  # type: ignore[union-attr]
    # The report (sampled after that exit: the unit was restarted since) covers it: the replay is stale.
    fleet.apply(report(40, session=3, ts=T0 + 19, units=(running(pid=101, restarts=1),)), now=T0 + 21)
    assert (fleet.unit(NODE, "web").state, fleet.unit(NODE, "web").pid) == ("running", 101)  # type: ignore[union-attr]
    # After a report, an event older than it is stale.
    fleet.apply(event(UnitExited(unit="web", pid=100, exit_signal=9), ts=T0 + 5, session=3), now=T0 + 22)
    assert fleet.unit(NODE, "web").state == "running"  # type: ignore[union-attr]


def test_a_held_event_newer_than_the_first_report_applies(fleet: Fleet) -> None:
    fleet.apply(event(UnitExited(unit="web", pid=100, exit_code=1), ts=T0 + 10), now=T0 + 10)
    fleet.apply(report(1, ts=T0 + 9, units=(running(pid=100),)), now=T0 + 11)  # sampled before the exit
    assert fleet.unit(NODE, "web").state == "exited"  # type: ignore[union-attr]


def test_held_events_are_bounded(fleet: Fleet) -> None:
    for i in range(MAX_HELD_EVENTS + 10):
        fleet.apply(event(ProbeChanged(unit="web", probe=probe_state(True)), ts=T0 + i), now=T0 + i)
    assert len(fleet.nodes[NODE].held_events) == MAX_HELD_EVENTS


def test_a_will_of_an_earlier_connection_is_stale(fleet: Fleet) -> None:
    fleet.apply(status(conn=2, ts=T0 + 2), now=T0 + 2)
    fleet.apply(status("offline", conn=1, ts=T0 + 1), now=T0 + 3)  # replayed will of connection 1
    assert fleet.nodes[NODE].online
    fleet.apply(status("offline", conn=2, ts=T0 + 2), now=T0 + 4)  # connection 2 ends
    assert not fleet.nodes[NODE].online
    fleet.apply(status(conn=2, ts=T0 + 2), now=T0 + 5)  # its birth replayed: that connection is over
    fleet.apply(status(conn=1, ts=T0 + 1), now=T0 + 5)
    assert not fleet.nodes[NODE].online
    fleet.apply(status(conn=3, ts=T0 + 6), now=T0 + 6)  # the next connection
    assert fleet.nodes[NODE].online
    fleet.apply(status("offline", conn=2, ts=T0 + 2), now=T0 + 7)  # applied once only
    assert fleet.nodes[NODE].online


# --- bounds -------------------------------------------------------------------------------------


def test_max_nodes_evicts_an_offline_node_first(fleet: Fleet) -> None:
    fleet.apply(status(node="n1"), now=T0)
    fleet.apply(status(node="n2"), now=T0 + 1)
    fleet.apply(status(node="n3"), now=T0 + 2)
    fleet.apply(status("offline", node="n2"), now=T0 + 3)
    fleet.apply(status(node="n4"), now=T0 + 4)
    assert sorted(fleet.nodes) == ["n1", "n3", "n4"]
    assert fleet.evicted == 1


def test_max_nodes_evicts_the_longest_silent_node(fleet: Fleet) -> None:
    fleet.apply(report(1, node="n1"), now=T0 + 10)
    fleet.apply(report(1, node="n2"), now=T0)
    fleet.apply(report(1, node="n3"), now=T0 + 5)
    fleet.apply(report(1, node="n4"), now=T0 + 20)
    assert sorted(fleet.nodes) == ["n1", "n3", "n4"]
    assert len(fleet.nodes) == fleet.max_nodes


def test_snapshot_of_an_unknown_node_is_none(fleet: Fleet) -> None:
    assert fleet.snapshot("nope") is None
    assert fleet.unit("nope", "web") is None


# --- unit_is_healthy ----------------------------------------------------------------------------


@pytest.mark.parametrize(("unit", "healthy"), [
    (None, False),
    (running(), True),
    (running(probe=probe_state(True)), True),
    (running(probe=probe_state(False, 3)), False),
    (UnitReport(name="web", kind="process", state="starting"), False),
    (UnitReport(name="web", kind="process", state="exited", exit_code=0), False),
    (UnitReport(name="web", kind="process", state="stopped", probe=probe_state(True)), False),
])
def test_unit_is_healthy(unit: UnitReport | None, healthy: bool) -> None:
    assert unit_is_healthy(unit) is healthy


def test_a_node_back_on_a_new_connection_has_unconfirmed_units_until_it_reports(fleet: Fleet) -> None:
    """A partition healed: the node's ``online`` comes first, its units as it last said (here: running); what
    its agent did meanwhile (fenced them) arrives in its next report. Until then nothing is confirmed."""
    fleet.apply(status(conn=1, ts=T0), T0)
    fleet.apply(report(1), T0 + 1)
    assert fleet.nodes[NODE].confirmed
    fleet.apply(status("offline", conn=1, ts=T0 + 2), T0 + 2)  # its will
    fleet.apply(report(2, ts=T0 + 3), T0 + 50)  # queued while cut off, sent after: from before the new connection
    node = fleet.nodes[NODE]
    assert not node.online  # after its connection's will and before a new birth: late, it says nothing of now
    assert not node.confirmed
    fleet.apply(status(conn=2, ts=T0 + 40), T0 + 50)
    assert node.online
    assert not node.confirmed
    snapshot = fleet.snapshot(NODE)
    assert snapshot is not None
    assert not snapshot.confirmed
    assert snapshot.units[0].state == "running"
    fleet.apply(report(3, ts=T0 + 41, units=(UnitReport(name="web", kind="process", state="stopped", fenced=True),)),
                T0 + 51)
    snapshot = fleet.snapshot(NODE)
    assert snapshot is not None
    assert snapshot.confirmed
    assert snapshot.units[0].fenced


def test_a_re_announced_birth_of_the_same_connection_confirms_nothing_away(fleet: Fleet) -> None:
    fleet.apply(status(conn=1, ts=T0), T0)
    fleet.apply(report(1), T0 + 1)
    fleet.apply(status(conn=1, ts=T0 + 5), T0 + 5)  # the same connection says online again
    assert fleet.nodes[NODE].confirmed


def test_units_named_by_a_birth_message_alone_are_unconfirmed(fleet: Fleet) -> None:
    """A controller that just started has the retained status's unit names as ``starting`` placeholders."""
    fleet.apply(status(conn=1, units=("web", "solo")), T0)
    snapshot = fleet.snapshot(NODE)
    assert snapshot is not None
    assert not snapshot.confirmed
