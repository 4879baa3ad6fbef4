"""The probe state machine: threshold, start period, verdict changes."""

from __future__ import annotations

from agent.probes import ProbeTracker
from selfheal.config import ProbeConfig

WALL = 1_700_000_000.0


def tracker(failures: int = 3, start_period: float = 2.0) -> ProbeTracker:
    return ProbeTracker(ProbeConfig(kind="http", target="http://127.0.0.1:1/", failures=failures,
                                    start_period=start_period))


def test_the_first_success_is_a_verdict_and_repeats_are_not() -> None:
    t = tracker()
    first = t.record(ok=True, now=0.0, wall=WALL, latency=0.01)
    assert first is not None
    assert first.healthy
    assert (first.kind, first.failures_threshold, first.checked_at) == ("http", 3, WALL)
    assert t.record(ok=True, now=1.0, wall=WALL + 1) is None
    assert t.state is not None
    assert t.state.checked_at == WALL + 1


def test_unhealthy_only_once_failures_reach_the_threshold() -> None:
    t = tracker(failures=3)
    t.record(ok=True, now=0.0, wall=WALL)
    assert t.record(ok=False, now=1.0, wall=WALL, error="timeout") is None
    assert t.record(ok=False, now=2.0, wall=WALL, error="timeout") is None
    assert t.state is not None
    assert t.state.healthy
    assert t.state.consecutive_failures == 2
    flipped = t.record(ok=False, now=3.0, wall=WALL, error="timeout")
    assert flipped is not None
    assert not flipped.healthy
    assert flipped.consecutive_failures == 3
    assert flipped.last_error == "timeout"
    assert t.record(ok=False, now=4.0, wall=WALL) is None
    recovered = t.record(ok=True, now=5.0, wall=WALL)
    assert recovered is not None
    assert recovered.healthy
    assert recovered.consecutive_failures == 0
    assert recovered.last_error == ""


def test_a_success_resets_the_count() -> None:
    t = tracker(failures=2)
    t.record(ok=True, now=0.0, wall=WALL)
    t.record(ok=False, now=1.0, wall=WALL)
    t.record(ok=True, now=2.0, wall=WALL)
    assert t.record(ok=False, now=3.0, wall=WALL) is None
    assert t.state is not None
    assert t.state.healthy


def test_no_verdict_until_a_success_or_a_full_run_of_failures() -> None:
    t = tracker(failures=2)
    assert t.record(ok=False, now=0.0, wall=WALL) is None
    assert t.state is None
    first = t.record(ok=False, now=1.0, wall=WALL)
    assert first is not None
    assert not first.healthy


def test_failures_in_the_start_period_do_not_count() -> None:
    t = tracker(failures=1, start_period=2.0)
    t.restarted(now=10.0)
    assert t.in_start_period(11.0)
    assert t.record(ok=False, now=10.5, wall=WALL) is None
    assert t.record(ok=False, now=11.9, wall=WALL) is None
    assert t.state is None
    assert t.consecutive_failures == 0
    verdict = t.record(ok=False, now=12.0, wall=WALL)
    assert verdict is not None
    assert not verdict.healthy


def test_a_success_ends_the_start_period_early() -> None:
    t = tracker(failures=1, start_period=60.0)
    t.restarted(now=0.0)
    assert t.record(ok=True, now=0.2, wall=WALL) is not None
    assert not t.in_start_period(0.3)
    flipped = t.record(ok=False, now=0.4, wall=WALL)
    assert flipped is not None
    assert not flipped.healthy


def test_a_restart_forgets_failures_but_keeps_the_verdict_until_a_new_one() -> None:
    t = tracker(failures=2, start_period=1.0)
    t.record(ok=False, now=0.0, wall=WALL)
    t.record(ok=False, now=1.0, wall=WALL)
    assert t.state is not None
    assert not t.state.healthy
    t.restarted(now=2.0)
    assert t.consecutive_failures == 0
    # Still failing inside the start period: no change, the old verdict stands.
    assert t.record(ok=False, now=2.5, wall=WALL, error="refused") is None
    assert t.state is not None
    assert not t.state.healthy
    assert t.state.last_error == "refused"
    recovered = t.record(ok=True, now=2.6, wall=WALL)
    assert recovered is not None
    assert recovered.healthy


def test_errors_are_capped() -> None:
    t = tracker(failures=1)
    state = t.record(ok=False, now=0.0, wall=WALL, error="x" * 10_000)
    assert state is not None
    assert len(state.last_error) == 200
