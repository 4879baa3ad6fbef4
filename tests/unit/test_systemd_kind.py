"""Kind ``systemd``: ``systemctl show`` output (captured from systemd 252, tests/unit/data/systemctl_show) as
observations, and the runs, exits and restarts the tracker makes of a sequence of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.units.managed import Observation, RunTracker
from agent.units.systemd import PROPERTIES, describe_exit, observe_service, parse_show, systemctl_argv
from selfheal.wire import UnitExited, UnitStarted

DATA = Path(__file__).parent / "data" / "systemctl_show"
MONO = 750.0
"""The host's monotonic clock at the look, seconds (the captures' start stamps are 696..746 s)."""
WALL = 1_800_000_000.0


def captured(name: str) -> dict[str, str]:
    return parse_show((DATA / f"{name}.txt").read_text(encoding="utf-8"))


def observe(name: str, **changes: str) -> Observation:
    return observe_service({**captured(name), **changes}, unit="sh-sleep.service", wall=WALL, mono=MONO)


def test_every_capture_answers_every_property_asked_for() -> None:
    for path in DATA.glob("*.txt"):
        assert set(parse_show(path.read_text(encoding="utf-8"))) == set(PROPERTIES), path.name


def test_a_value_may_hold_an_equals_sign() -> None:
    assert parse_show("StatusText=ready: a=b\nnoise\nId=x.service\n") == {"StatusText": "ready: a=b",
                                                                        "Id": "x.service"}


def test_a_running_service() -> None:
    obs = observe("active-running")
    assert (obs.live, obs.state, obs.pid, obs.run) == (True, "running", 53, "696016245/53")
    assert obs.started_at == pytest.approx(WALL - (MONO - 696.016245))
    assert obs.usage is not None
    assert (obs.usage.cpu_ns, obs.usage.memory_bytes) == (None, None)  # [not set]: not accounted


def test_accounted_cpu_and_memory_are_read() -> None:
    obs = observe("active-running", MemoryCurrent="7340032", CPUUsageNSec="120000000")
    assert obs.usage is not None
    assert (obs.usage.cpu_ns, obs.usage.memory_bytes, obs.usage.at) == (120_000_000, 7_340_032, MONO)
    assert observe("active-running", MemoryCurrent=str(2**64 - 1)).usage.memory_bytes is None  # type: ignore[union-attr]


def test_a_service_killed_by_sigkill_is_its_runs_end_with_the_signal() -> None:
    obs = observe("failed-sigkill")
    assert (obs.live, obs.state, obs.run) == (False, "exited", "696016245/53")
    assert (obs.exit_code, obs.exit_signal, obs.reason) == (None, 9, "signal")
    assert obs.error == "systemd: killed by a signal (Result=signal), signal SIGKILL"


def test_an_exit_code() -> None:
    obs = observe("failed-exit-code")
    assert (obs.state, obs.exit_code, obs.exit_signal, obs.reason) == ("exited", 3, None, "exit-code")
    assert obs.error == "systemd: exited with a non-zero code (Result=exit-code), exit code 3"


def test_the_watchdog_is_systemds_reason_and_sigabrt_the_signal() -> None:
    obs = observe("failed-watchdog")
    assert (obs.state, obs.exit_signal, obs.reason) == ("exited", 6, "watchdog")
    assert "watchdog keep-alives" in obs.error
    assert obs.error.endswith("signal SIGABRT")


def test_a_start_timeout() -> None:
    obs = observe("failed-timeout")
    assert (obs.exit_signal, obs.reason) == (15, "timeout")


def test_a_binary_systemd_could_not_execute_is_a_failure_to_run() -> None:
    obs = observe("failed-exec-203")
    assert (obs.state, obs.exit_code) == ("failed", 203)
    assert "systemd could not execute it" in obs.error


def test_a_failing_start_pre_never_reached_the_main_process() -> None:
    obs = observe("failed-start-pre")
    assert (obs.run, obs.live, obs.state, obs.reason) == (None, False, "failed", "exit-code")


def test_start_limit_hit_keeps_the_last_result_in_systemd_252() -> None:
    obs = observe("failed-start-limit-hit")
    assert (obs.state, obs.exit_code, obs.reason) == ("exited", 1, "exit-code")


def test_auto_restart_is_systemd_restarting_it_itself() -> None:
    obs = observe("activating-auto-restart")
    assert (obs.live, obs.restarting, obs.state, obs.exit_code) == (False, True, "exited", 1)


def test_activating_with_a_main_process_is_a_starting_run() -> None:
    obs = observe("activating-start")
    assert (obs.live, obs.state, obs.pid, obs.run) == (True, "starting", 135, "714168270/135")


def test_a_stopped_service_is_unloaded_and_reads_as_a_clean_end() -> None:
    obs = observe("inactive-stopped")
    assert (obs.run, obs.live, obs.state, obs.exit_code, obs.reason) == (None, False, "exited", 0, "")


@pytest.mark.parametrize(("name", "words"), [("not-found", "systemd has no such unit"),
                                              ("masked", "the unit is masked")])
def test_a_service_systemd_cannot_run_is_failed(name: str, words: str) -> None:
    obs = observe(name)
    assert (obs.run, obs.state) == (None, "failed")
    assert words in obs.error


def test_describe_exit_without_anything_to_say() -> None:
    assert describe_exit("success", 0, None) == ""
    assert describe_exit("oom-kill", None, 9) == "systemd: killed by the OOM killer (Result=oom-kill), signal SIGKILL"


def test_systemctl_argv_never_asks_for_a_password_and_ends_options() -> None:
    assert systemctl_argv("systemctl", "restart", "a.service") == [
        "systemctl", "--no-ask-password", "--no-pager", "restart", "--", "a.service"]
    assert systemctl_argv("/bin/systemctl", None, "a.service")[:3] == ["/bin/systemctl", "show", "--no-pager"]


def follow(*names: str, expect_end_before: int | None = None) -> tuple[RunTracker, list[object]]:
    tracker = RunTracker("predict")
    events: list[object] = []
    for i, name in enumerate(names):
        if i == expect_end_before:
            tracker.expect_end()
        events += tracker.observe(observe(name), WALL + i).events
    return tracker, events


def test_a_killed_service_is_an_unexpected_exit_with_systemds_result() -> None:
    tracker, events = follow("active-running", "failed-sigkill")
    assert events == [UnitStarted(unit="predict", pid=53, restarts=0),
                      UnitExited(unit="predict", pid=53, exit_signal=9, reason="signal")]
    assert (tracker.state, tracker.exit_signal, tracker.error) == (
        "exited", 9, "systemd: killed by a signal (Result=signal), signal SIGKILL")


def test_a_stop_by_the_agent_is_expected_and_leaves_it_stopped() -> None:
    tracker, events = follow("active-running", "inactive-stopped", expect_end_before=1)
    assert events[-1] == UnitExited(unit="predict", pid=53, exit_code=0, expected=True)
    assert tracker.state == "stopped"


def test_systemds_own_restart_is_a_restart_not_a_crash() -> None:
    tracker, events = follow("activating-auto-restart-second", "active-after-auto-restart")
    assert tracker.restarts == 1
    assert events == [UnitStarted(unit="predict", pid=336, restarts=1)]
    assert tracker.state == "running"


def test_a_service_already_failed_when_the_agent_started_is_not_its_exit_to_report() -> None:
    tracker, events = follow("failed-exit-code")
    assert (events, tracker.state) == ([], "stopped")
