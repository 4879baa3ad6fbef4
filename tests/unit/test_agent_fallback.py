"""The agent-local fallback: its ladder (pure, time passed in) and its loop with an injected clock.

The loop runs against a fake supervisor and a real ledger in a temp dir; ``step`` is one look, so the
tests drive it round by round instead of waiting on a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from agent.fallback import Fallback, GiveUp, Ladder, Policy, Restart, Skip, fallback_delay, problem_of
from agent.ledger import Ledger
from selfheal.clocks import ManualClock
from selfheal.config import AgentConfig, Config, MqttConfig, load_config
from selfheal.errors import ConfigError, UnitError
from selfheal.wire import EventBody, LocalAction, ProbeState, UnitReport

POLICY = Policy(after=10.0, max_restarts=4, window=100.0)
NO_SET: frozenset[str] = frozenset()


def crashed(name: str = "web", **fields: object) -> UnitReport:
    unit = UnitReport(name=name, kind="process", state="exited", pid=41, exit_code=3, started_at=1.0)
    return msgspec.structs.replace(unit, **fields)


def running(name: str = "web", *, probe: ProbeState | None = None) -> UnitReport:
    return UnitReport(name=name, kind="process", state="running", pid=42, started_at=100.0, probe=probe)


def decide(ladder: Ladder, units: list[UnitReport], now: float, *, fenced: frozenset[str] = NO_SET,
           movable: frozenset[str] = NO_SET, connected: bool = True) -> list[object]:
    return list(ladder.decide(units, now, fenced=fenced, movable=movable, connected=connected))


# --- what wants a restart -------------------------------------------------------------------------


def test_a_crashed_or_unstartable_unit_wants_a_restart_and_says_how_it_ended() -> None:
    assert problem_of(crashed()) == ("unit_exited", "exited with code 3")
    assert problem_of(crashed(exit_code=None, exit_signal=9)) == ("unit_exited", "was killed by SIGKILL")
    failed = UnitReport(name="etl", kind="spark", state="failed", error="Java 17+ not found")
    assert problem_of(failed) == ("unit_exited", "could not be started: Java 17+ not found")


def test_a_hung_unit_wants_a_restart_only_on_a_verdict_of_its_current_run() -> None:
    failing = ProbeState(kind="http", healthy=False, consecutive_failures=3, failures_threshold=3,
                         last_error="timed out", checked_at=150.0)
    kind, how = problem_of(running(probe=failing)) or ("", "")
    assert kind == "probe_failing"
    assert "failed 3 times in a row: timed out" in how
    assert problem_of(running(probe=msgspec.structs.replace(failing, checked_at=50.0))) is None  # before this run
    assert problem_of(running(probe=msgspec.structs.replace(failing, consecutive_failures=2))) is None


def test_units_that_are_well_or_stopped_on_purpose_want_nothing() -> None:
    stopped = UnitReport(name="web", kind="process", state="stopped")  # the controller's stop, or a standby copy
    completed = UnitReport(name="job", kind="process", state="completed", every=60.0)
    finished = crashed(name="job", exit_code=0, every=60.0)  # a scheduled run that ended 0
    for unit in (running(), stopped, completed, finished):
        assert problem_of(unit) is None, unit


# --- the ladder ------------------------------------------------------------------------------------


def test_the_first_restart_is_at_once_then_backoff_doubles_from_two_seconds_capped() -> None:
    assert [Policy.delay(n) for n in range(1, 9)] == [0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_the_ladder_backs_off_then_gives_up_once_after_max_restarts_in_the_window() -> None:
    ladder = Ladder(POLICY)
    restarts: list[tuple[float, int]] = []
    for tenths in range(400):  # 0.1 s rounds, the unit down throughout
        now = 1000.0 + tenths / 10
        for decision in decide(ladder, [crashed()], now):
            if isinstance(decision, Restart):
                ladder.restarted(decision.unit, now)
                restarts.append((tenths / 10, decision.attempt))
            else:
                assert isinstance(decision, GiveUp)
                restarts.append((tenths / 10, -1))
    # at once, +2 s, +4 s, +8 s; then it gives up (once) and leaves the unit down
    assert restarts == [(0.0, 1), (2.0, 2), (6.0, 3), (14.0, 4), (14.1, -1)]


def test_restarts_older_than_the_window_no_longer_count() -> None:
    ladder = Ladder(Policy(after=1.0, max_restarts=2, window=100.0))
    for at in (0.0, 2.0):
        ladder.restarted("web", at)
    assert isinstance(decide(ladder, [crashed()], 50.0)[0], GiveUp)
    ladder.controller_back()  # a controller came and went: it decides about units given up on, not the window
    assert isinstance(decide(ladder, [crashed()], 60.0)[0], GiveUp)
    ladder.controller_back()
    assert decide(ladder, [crashed()], 101.0) == [Restart("web", 2, "unit_exited", "exited with code 3")]


def test_fenced_units_and_movable_ones_without_the_broker_are_never_restarted() -> None:
    ladder = Ladder(POLICY)
    fenced = UnitReport(name="db", kind="process", state="exited", exit_code=1, fenced=True)
    assert decide(ladder, [crashed("api"), fenced], 0.0, fenced=frozenset({"api"})) == [
        Skip("api", "fenced: only the controller starts it again"),
        Skip("db", "fenced: only the controller starts it again")]
    [skip] = decide(ladder, [crashed("predict")], 0.0, movable=frozenset({"predict"}), connected=False)
    assert isinstance(skip, Skip)
    assert "movable singleton without the broker" in skip.why
    # with the broker there (only the controller is away) nobody can move it: restarting it in place is safe
    assert decide(ladder, [crashed("predict")], 0.0, movable=frozenset({"predict"}), connected=True) == [
        Restart("predict", 1, "unit_exited", "exited with code 3")]


# --- the loop --------------------------------------------------------------------------------------


@dataclass
class FakeUnits:
    units: dict[str, UnitReport]
    fenced: set[str] = field(default_factory=set)
    fence_after: dict[str, float] = field(default_factory=dict)
    stopping: bool = False
    restarted: list[str] = field(default_factory=list)
    broken: set[str] = field(default_factory=set)

    def reports(self) -> list[UnitReport]:
        return list(self.units.values())

    async def restart(self, name: str) -> object:
        self.restarted.append(name)
        if name in self.broken:
            raise UnitError(f"unit {name!r}: cannot start")
        self.units[name] = running(name)
        return self.units[name]


@dataclass
class Harness:
    fallback: Fallback
    units: FakeUnits
    clock: ManualClock
    ledger: Ledger
    sent: list[EventBody]
    presence: list[bool]

    def step(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        asyncio.run(self.fallback.step())


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "ledger.sqlite3").open(0.0)
    yield ledger
    ledger.close()


def harness(ledger: Ledger, units: FakeUnits, *, enabled: bool = True, session: int = 7) -> Harness:
    clock, sent, presence = ManualClock(), list[EventBody](), [False]
    fallback = Fallback(node_id="node-1", session=session, policy=POLICY, enabled=enabled, units=units,
                        ledger=ledger, clock=clock, emit=sent.append, present=lambda: presence[0],
                        connected=lambda: True)
    return Harness(fallback, units, clock, ledger, sent, presence)


def test_nothing_is_done_while_a_controller_is_present_nor_before_fallback_after(ledger: Ledger) -> None:
    h = harness(ledger, FakeUnits({"web": crashed()}))
    h.presence[0] = True
    h.step(60.0)
    assert h.units.restarted == []
    h.presence[0] = False  # the controller leaves: the clock starts now
    h.step(0.0)
    h.step(9.9)
    assert h.units.restarted == []
    h.step(0.1)
    assert h.units.restarted == ["web"]


def test_a_local_restart_is_recorded_then_reported_once_when_the_controller_is_back(ledger: Ledger) -> None:
    h = harness(ledger, FakeUnits({"web": crashed()}))
    h.step(10.0)  # away since the agent started, never heard one
    assert h.units.restarted == ["web"]
    assert h.sent == []  # nobody to tell yet
    [entry] = ledger.unreported_local()
    assert (entry.unit, entry.attempt, entry.reason, entry.status) == ("web", 1, "unit_exited", "done")
    h.presence[0] = True
    h.step(0.5)
    [action] = h.sent
    assert isinstance(action, LocalAction)
    assert (action.unit, action.key, action.attempt, action.detail) == ("web", entry.key, 1, "exited with code 3")
    assert ledger.unreported_local() == []
    h.step(0.5)
    assert len(h.sent) == 1  # reported once
    assert h.fallback.counts["restarts"] == 1


def test_what_a_stopped_agent_had_not_reported_its_next_run_sends(ledger: Ledger) -> None:
    first = harness(ledger, FakeUnits({"web": crashed()}), session=7)
    first.step(10.0)
    [entry] = ledger.unreported_local()
    second = harness(ledger, FakeUnits({"web": running()}), session=8)
    second.presence[0] = True
    run_until_sent(second)
    assert [a.key for a in second.sent if isinstance(a, LocalAction)] == [entry.key]
    assert ledger.unreported_local() == []


def run_until_sent(h: Harness) -> None:
    """Run the loop itself (which loads what the ledger holds unreported) until it has sent something."""
    async def until_sent() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(h.fallback.run(stop=stop))
        while not h.sent and not task.done():
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(asyncio.wait_for(until_sent(), 10.0))


def test_keys_are_distinct_per_action_and_per_agent_session(ledger: Ledger) -> None:
    h = harness(ledger, FakeUnits({"web": crashed()}))
    h.step(10.0)
    h.units.units["web"] = crashed()
    h.step(2.0)
    again = harness(ledger, FakeUnits({"web": crashed()}), session=8)
    again.step(10.0)
    keys = [e.key for e in ledger.unreported_local()]
    assert len(keys) == len(set(keys)) == 3


def test_a_restart_that_cannot_start_the_unit_is_reported_failed_and_counts(ledger: Ledger) -> None:
    units = FakeUnits({"web": crashed()}, broken={"web"})
    h = harness(ledger, units)
    h.step(10.0)
    h.step(1.9)
    assert units.restarted == ["web"]  # the next waits out its backoff, failed start or not
    h.step(0.1)
    assert units.restarted == ["web", "web"]
    [first, _] = ledger.unreported_local()
    assert first.status == "failed"
    assert "the restart failed: unit 'web': cannot start" in first.detail
    assert h.fallback.counts["failed"] == 2


def test_turned_off_it_restarts_nothing_but_still_reports_what_the_ledger_holds(ledger: Ledger) -> None:
    harness(ledger, FakeUnits({"web": crashed()})).step(10.0)
    off = harness(ledger, FakeUnits({"web": crashed()}), enabled=False)
    off.step(600.0)
    assert off.units.restarted == []
    assert off.fallback.counts["restarts"] == 0
    off.presence[0] = True
    run_until_sent(off)
    assert len(off.sent) == 1


def test_a_command_in_hand_is_waited_for_and_a_unit_it_healed_is_left_alone(ledger: Ledger) -> None:
    h = harness(ledger, FakeUnits({"web": crashed()}))

    async def scenario() -> None:
        async with h.fallback.acting:  # the executor runs a restart_unit sent before the controller left
            h.clock.advance(10.0)
            step = asyncio.create_task(h.fallback.step())
            await asyncio.sleep(0.05)
            assert not step.done()
            h.units.units["web"] = running()  # what the command did
        await step

    asyncio.run(scenario())
    assert h.units.restarted == []
    assert ledger.unreported_local() == []


def test_a_stopping_supervisor_is_left_alone(ledger: Ledger) -> None:
    h = harness(ledger, FakeUnits({"web": crashed()}, stopping=True))
    h.step(60.0)
    assert h.units.restarted == []


# --- configuration ---------------------------------------------------------------------------------


def test_the_default_delay_is_the_brokers_keepalive_and_a_few_report_intervals() -> None:
    config = Config(mqtt=MqttConfig(keepalive=10.0), agent=AgentConfig(interval=1.0))
    assert fallback_delay(config) == 18.0
    assert fallback_delay(Config(agent=AgentConfig(fallback_after=4.0))) == 4.0
    assert Policy.of(config) == Policy(after=18.0, max_restarts=5, window=600.0)


@pytest.mark.parametrize(("key", "value"), [("fallback_after", "0"), ("fallback_max_restarts", "0"),
                                            ("fallback_window", "-1")])
def test_bad_fallback_settings_are_refused_by_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"agent.{key}"):
        load_config(env={f"SELFHEAL_AGENT__{key.upper()}": value})


def test_the_switch_turns_it_off() -> None:
    assert load_config(env={"SELFHEAL_AGENT__FALLBACK": "false"}).agent.fallback is False
    assert load_config(env={}).agent.fallback is True
