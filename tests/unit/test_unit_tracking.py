"""``RunTracker``: what a sequence of looks at a unit another manager runs means — starts, exits, the agent's
own stops and restarts, the manager's restarts, a unit that disappears; and CPU percent from usage samples."""

from __future__ import annotations

from agent.units.managed import Observation, RunTracker, Usage, UsageMeter
from selfheal.wire import UnitExited, UnitStarted

NOW = 1_800_000_000.0


def running(run: str, pid: int = 10, **kw: object) -> Observation:
    return Observation(run=run, live=True, state="running", pid=pid, **kw)  # type: ignore[arg-type]


def ended(run: str | None, **kw: object) -> Observation:
    return Observation(run=run, live=False, state="exited", **kw)  # type: ignore[arg-type]


GONE = Observation(run=None, live=False, state="stopped", error="no container named 'web'")


def test_adopting_a_running_unit_announces_it_without_counting_a_restart() -> None:
    tracker = RunTracker("web")
    seen = tracker.observe(running("a", started_at=NOW - 60), NOW)
    assert seen.events == [UnitStarted(unit="web", pid=10, restarts=0)]
    assert (tracker.state, tracker.pid, tracker.started_at, tracker.restarts) == ("running", 10, NOW - 60, 0)


def test_a_crash_is_reported_once_with_its_status_and_reason() -> None:
    tracker = RunTracker("web")
    tracker.observe(running("a"), NOW)
    first = tracker.observe(ended("a", exit_signal=9, reason="oom-killed", error="out of memory"), NOW + 1)
    again = tracker.observe(ended("a", exit_signal=9, reason="oom-killed", error="out of memory"), NOW + 2)
    assert first.events == [UnitExited(unit="web", pid=10, exit_signal=9, reason="oom-killed")]
    assert again.events == []
    assert (tracker.state, tracker.exit_signal, tracker.error, tracker.pid) == ("exited", 9, "out of memory", 10)


def test_the_agents_restart_seen_only_as_a_new_run_reports_an_expected_exit_and_counts() -> None:
    tracker = RunTracker("web")
    tracker.observe(running("a"), NOW)
    tracker.expect_end()
    seen = tracker.observe(running("b", pid=11), NOW + 1)
    assert seen.events == [UnitExited(unit="web", pid=10, expected=True),
                           UnitStarted(unit="web", pid=11, restarts=1)]
    assert (tracker.restarts, tracker.expected_run, tracker.state) == (1, None, "running")


def test_a_restart_by_the_manager_is_a_restart_and_no_crash() -> None:
    tracker = RunTracker("web")
    tracker.observe(running("a"), NOW)
    restarting = tracker.observe(Observation(run="a", live=False, state="exited", exit_code=1, restarting=True),
                                 NOW + 1)
    assert (restarting.events, tracker.state) == ([], "starting")
    assert restarting.notes == ["its run ended (exit code 1) and its manager restarts it"]
    back = tracker.observe(running("b", pid=12), NOW + 2)
    assert back.events == [UnitStarted(unit="web", pid=12, restarts=1)]
    assert back.notes == ["its manager restarted or replaced it"]


def test_when_the_manager_gives_up_restarting_the_exit_goes_out() -> None:
    tracker = RunTracker("web")
    tracker.observe(running("a"), NOW)
    tracker.observe(Observation(run="a", live=False, state="exited", exit_code=1, restarting=True), NOW + 1)
    seen = tracker.observe(ended("a", exit_code=1), NOW + 2)
    assert seen.events == [UnitExited(unit="web", pid=10, exit_code=1)]
    assert tracker.state == "exited"


def test_a_container_replaced_under_the_same_name_is_followed() -> None:
    tracker = RunTracker("web")
    tracker.observe(running("old@t1"), NOW)
    tracker.observe(ended("old@t1", exit_signal=15), NOW + 1)  # the orchestrator stops it...
    tracker.observe(GONE, NOW + 2)  # ...removes it...
    seen = tracker.observe(running("new@t2", pid=20), NOW + 3)  # ...and creates it anew
    assert seen.events == [UnitStarted(unit="web", pid=20, restarts=1)]
    assert (tracker.state, tracker.exit_signal, tracker.error) == ("running", None, "")


def test_a_unit_removed_while_running_ends_with_what_is_known() -> None:
    tracker = RunTracker("web")
    tracker.observe(running("a"), NOW)
    seen = tracker.observe(GONE, NOW + 1)
    assert seen.events == [UnitExited(unit="web", pid=10)]
    assert (tracker.state, tracker.error) == ("exited", "no container named 'web'")


def test_a_unit_not_there_yet_is_stopped_until_a_start_fails() -> None:
    tracker = RunTracker("web")
    tracker.observe(GONE, NOW)
    assert (tracker.state, tracker.error) == ("stopped", "no container named 'web'")


def test_a_run_that_began_and_ended_between_two_looks_is_still_reported() -> None:
    tracker = RunTracker("web")
    tracker.observe(ended("a", exit_code=0), NOW)  # history from before the agent: not reported
    seen = tracker.observe(ended("b", pid=30, exit_code=127), NOW + 1)
    assert seen.events == [UnitExited(unit="web", pid=30, exit_code=127)]
    assert (tracker.state, tracker.restarts) == ("exited", 1)


def test_a_stop_by_the_agent_is_stopped_not_exited() -> None:
    tracker = RunTracker("web")
    tracker.observe(running("a"), NOW)
    tracker.expect_end()
    seen = tracker.observe(ended("a", exit_signal=15), NOW + 1)
    assert seen.events == [UnitExited(unit="web", pid=10, exit_signal=15, expected=True)]
    assert (tracker.state, tracker.expected_run) == ("stopped", None)


def test_a_failed_start_is_failed_until_a_run_starts() -> None:
    tracker = RunTracker("web")
    tracker.observe(GONE, NOW)
    tracker.start_failed("no container named 'web' (set docker.image to let the agent create it)")
    tracker.observe(GONE, NOW + 1)
    assert (tracker.state, tracker.error) == ("failed", "no container named 'web' (set docker.image to let the "
                                                        "agent create it)")
    tracker.observe(running("a"), NOW + 2)
    assert (tracker.state, tracker.error) == ("running", "")


def test_a_pid_that_moves_within_a_run_is_followed() -> None:
    tracker = RunTracker("web")
    tracker.observe(running("a", pid=10), NOW)
    assert tracker.observe(running("a", pid=11), NOW + 1).events == []
    assert tracker.pid == 11


def test_cpu_percent_is_cpu_time_over_the_time_between_samples() -> None:
    meter = UsageMeter()
    meter.add(Usage(cpu_ns=1_000_000_000, memory_bytes=100, at=10.0))
    assert (meter.cpu_percent, meter.memory_bytes) == (0.0, 100)
    meter.add(Usage(cpu_ns=1_500_000_000, memory_bytes=200, at=11.0))
    assert (meter.cpu_percent, meter.memory_bytes) == (50.0, 200)
    meter.add(Usage(cpu_ns=1_500_000_000, memory_bytes=300, at=11.0))
    assert meter.cpu_percent == 50.0  # the same sample again: unchanged
    meter.add(Usage(cpu_ns=10_000_000, memory_bytes=50, at=12.0))
    assert meter.cpu_percent == 0.0  # a new run counts afresh
    meter.add(Usage(cpu_ns=None, memory_bytes=None, at=13.0))
    assert (meter.cpu_percent, meter.memory_bytes) == (0.0, 0)  # not accounted
    meter.add(None)
    assert meter.last is None


def test_only_the_run_the_agent_ended_ends_expectedly() -> None:
    tracker = RunTracker("web")
    tracker.observe(running("a"), NOW)
    tracker.expect_end()  # a restart whose look afterwards failed: its new run is not seen yet
    tracker.observe(running("b", pid=11), NOW + 1)  # the new run (or an orchestrator's container)
    seen = tracker.observe(ended("b", exit_code=1), NOW + 2)
    assert seen.events == [UnitExited(unit="web", pid=11, exit_code=1)]  # not the agent's doing
    assert tracker.state == "exited"


def test_a_stop_of_a_unit_that_is_not_running_expects_nothing() -> None:
    tracker = RunTracker("web")
    tracker.observe(ended("a", exit_code=0), NOW)
    tracker.expect_end()
    assert tracker.expected_run is None
