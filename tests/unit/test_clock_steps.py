"""Steps of the wall clock, with injected clocks: what ``SystemClock`` makes of them, what the reconciler
does when time goes back or jumps ahead, and which commands an agent whose clock went back still refuses.

``ManualClock.step`` jumps the wall clock alone, as ``date -s`` or an NTP step does; wrapped in a
``SystemClock`` it is the system clock a daemon would see.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.executor import CommandExecutor, check_fresh
from agent.ledger import Ledger
from remediations.reconciler import FleetView, Opened, Reconciler, Started
from remediations.state import Attempt, Budget
from rules.model import Backoff, Rule, Rulebook, Rung
from selfheal.clocks import SLEW, ManualClock, SystemClock
from selfheal.wire import Command, RestartUnit, sign_command
from tests.unit.test_reconciler import T0, Sim, exited, only

# --- SystemClock ----------------------------------------------------------------------------------


def steady(system: ManualClock) -> SystemClock:
    return SystemClock(system=system.wall, elapsed=system.monotonic, monotonic=system.monotonic)


def test_without_steps_it_reads_the_system_clock() -> None:
    system = ManualClock()
    clock = steady(system)
    for _ in range(5):
        system.advance(7.25)
        assert clock.wall() == system.wall()
    assert (clock.offset, clock.steps) == (0.0, 0)


def test_an_ntp_slew_is_followed_as_it_comes() -> None:
    system = ManualClock()
    clock = steady(system)
    for _ in range(100):  # the system clock runs 0.05 % fast: the kernel's fastest slew
        system.advance(10.0)
        system.step(0.005)
        assert clock.wall() == pytest.approx(system.wall(), abs=1e-6)
    assert clock.steps == 0


@pytest.mark.parametrize("step", [-300.0, 300.0])
def test_a_step_is_taken_out_then_worked_off_at_one_percent(step: float) -> None:
    system = ManualClock()
    clock = steady(system)
    system.advance(10.0)
    before = clock.wall()
    system.step(step)
    system.advance(1.0)
    after = clock.wall()
    assert after - before == pytest.approx(1.0, rel=SLEW)  # one second later, not five minutes either way
    assert clock.steps == 1
    assert clock.offset == pytest.approx(step - SLEW * step / abs(step))
    system.advance(100.0)
    later = clock.wall()
    assert later - after == pytest.approx(100.0, rel=SLEW)
    assert clock.offset == pytest.approx(step * (1 - 101 * SLEW / abs(step)))
    system.advance(abs(step) / SLEW)  # the rest is worked off: back on the system clock
    assert clock.wall() == system.wall()
    assert clock.steps == 1


@pytest.mark.parametrize("step", [-7200.0, 86400.0 * 365])
def test_a_step_over_an_hour_is_taken_at_once(step: float) -> None:
    """A host that booted with a wrong clock and was set right by NTP after selfheal started: following it at
    1 % would keep the wrong time for months (and every command would be refused as expired)."""
    system = ManualClock()
    clock = steady(system)
    system.advance(10.0)
    system.step(step)
    assert clock.wall() == system.wall()
    assert (clock.offset, clock.steps) == (0.0, 1)


def test_durations_stay_within_one_percent_and_time_never_goes_back_whatever_the_steps() -> None:
    system = ManualClock()
    clock = steady(system)
    last = clock.wall()
    for i in range(200):
        system.advance(0.5 + i % 7)
        if i % 13 == 0:
            system.step(-600.0 if i % 2 else 420.0)
        now = clock.wall()
        assert now - last == pytest.approx(0.5 + i % 7, rel=SLEW * 1.001)
        last = now
    assert clock.steps == len(range(0, 200, 13))


def test_the_real_system_clock_reads_the_wall_clock() -> None:
    import time  # noqa: PLC0415 - only this test reads the real clock

    before = time.time()
    now = SystemClock().wall()
    assert before <= now <= time.time() + 1e-3


# --- the reconciler -------------------------------------------------------------------------------

SLOW = Rule(name="restart-exited-unit", kind="unit_exited", cooldown=1.0,
            ladder=(Rung("restart", 3, Backoff(first=0.0, base=60.0, factor=1.0, max=60.0, jitter=0.0)),),
            digest="s" * 64)


def first_start_after(sim: Sim, *, step: float = 0.5, limit: float = 1200.0) -> float:
    """Tick until a plan starts; the instant it did (on the reconciler's clock)."""
    deadline = sim.now + limit
    while sim.now < deadline:
        if only(sim.tick([exited()], at=sim.now + step), Started):
            return sim.now
    raise AssertionError(f"no plan started within {limit}s")


def test_a_step_back_does_not_lengthen_a_backoff() -> None:
    sim = Sim(SLOW)
    first = only(sim.tick([exited()]), Started)[0]
    sim.finish(first, "failed", after=1.0)
    sim.run([exited()], until=10.0)  # the engine evaluates at least every tick
    sim.now -= 300.0  # the clock goes back five minutes
    started = first_start_after(sim)
    assert started + 300.0 == pytest.approx(T0 + 60.0, abs=0.6)  # 60 s after the first attempt, as planned


def test_a_step_back_leaves_a_quarantine_the_time_it_had_left() -> None:
    sim = Sim(SLOW)
    sim.engine.quarantine(SLOW.name, "node-1/web", T0 + 600.0)
    assert not only(sim.tick([exited()]), Started)
    sim.run([exited()], until=100.0)
    sim.now -= 300.0
    started = first_start_after(sim)
    assert started + 300.0 == pytest.approx(T0 + 600.0, abs=0.6)  # neither 300 s early nor 300 s late


def test_one_clock_read_out_of_order_moves_nothing() -> None:
    """A pass gives the ``now`` it read before a plan's task read the clock again: not a step back."""
    sim = Sim(SLOW)
    first = only(sim.tick([exited()]), Started)[0]
    sim.tick([exited()], at=T0 + 10.005)
    for _ in range(1000):
        sim.engine.finish(first.plan.id, "failed", T0 + 10.0)
        sim.engine.evaluate({}, FleetView(), T0 + 10.0)
    assert [a.at for a in sim.engine.targets[(SLOW.name, "node-1/web")].attempts] == [T0]


def test_a_controller_restarted_after_its_clock_went_back_waits_no_longer_than_the_backoff() -> None:
    """Its stored attempts are in the future: the last one counts as just made, not as five minutes ahead."""
    sim = Sim(SLOW)
    sim.engine.restore_attempt(SLOW.name, exited(), Attempt("1-1", 0, T0, "restart"))
    sim.now = T0 - 300.0
    started = first_start_after(sim)
    assert started - (T0 - 300.0) <= 60.5


def test_a_jump_forward_lifts_every_backoff_but_the_budget_and_rate_limit_bound_what_starts() -> None:
    """Eight units backing off after a failed restart, then the clock jumps ten minutes ahead: at most two
    plans run at once (the budget) and four start per minute (the rule's rate limit) — no restart storm."""
    rule = Rule(name="restart-exited-unit", kind="unit_exited", rate_limit=(4, 60.0), cooldown=1.0,
                ladder=(Rung("restart", 3, Backoff(first=0.0, base=120.0, factor=1.0, max=120.0, jitter=0.0)),),
                digest="j" * 64)
    engine = Reconciler(Rulebook((rule,)), Budget(max_concurrent=2, max_node_share=1.0, max_replica_share=1.0))
    nodes = [f"node-{i}" for i in range(8)]
    symptoms = {s.key: s for s in (exited(node) for node in nodes)}
    for i, node in enumerate(nodes):
        engine.restore_attempt(rule.name, exited(node), Attempt(f"{i}-1", 0, T0, "restart"))
    now = T0 + 1.0
    for i, opened in enumerate(only(engine.evaluate(symptoms, FleetView(), now), Opened)):
        engine.bind(opened.key, i + 1)
    assert not only(engine.evaluate(symptoms, FleetView(), now), Started)  # every one backing off

    now += 600.0  # the jump
    starts: dict[str, float] = {}
    while len(starts) < len(nodes):  # each plan fails as soon as it starts; evaluated again at the same instant
        started = only(engine.evaluate(symptoms, FleetView(), now), Started)
        assert len(started) <= 2  # the budget: two disruptive plans at once
        for effect in started:
            assert effect.plan.cooldown_key not in starts
            starts[effect.plan.cooldown_key] = now
            engine.finish(effect.plan.id, "failed", now)
        if not started:
            now += 5.0
    times = sorted(starts.values())
    assert all(sum(1 for t in times if at - 60.0 < t <= at) <= 4 for at in times)  # the rate limit: 4 a minute
    assert times[-1] - times[0] >= 60.0


# --- command expiry on an agent whose clock went back -----------------------------------------------

NODE = "node-x"
KEY = bytes(range(32))


class Units:
    def __init__(self) -> None:
        self.restarted: list[str] = []

    async def restart(self, name: str) -> object:
        self.restarted.append(name)
        return None

    async def stop(self, name: str) -> object:
        return None

    async def start(self, name: str) -> object:
        return None


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.sqlite3").open(T0) as opened:
        yield opened


def command(controller: ManualClock, key: str, *, age: float = 0.0, epoch: int = 1, ttl: float = 15.0) -> Command:
    """A command the controller signed ``age`` seconds ago (by its clock)."""
    issued = controller.wall() - age
    return sign_command(Command(id=f"cmd-{key}", key=key, node=NODE, epoch=epoch, issued_at=issued,
                                expires_at=issued + ttl, step=RestartUnit(unit="web")), KEY)


def agent(ledger: Ledger, clock: ManualClock | SystemClock) -> CommandExecutor:
    return CommandExecutor(node_id=NODE, key=KEY, ledger=ledger, units=Units(), clock=clock)


async def test_an_agent_whose_clock_steps_back_refuses_a_command_that_expired(ledger: Ledger) -> None:
    controller, system = ManualClock(), ManualClock()
    executor = agent(ledger, steady(system))
    for clock in (controller, system):
        clock.advance(10.0)
    system.step(-300.0)
    for clock in (controller, system):
        clock.advance(30.0)
    stale = command(controller, "late", age=30.0)  # expired 15 s ago: delayed, or replayed
    assert check_fresh(stale, now=system.wall(), highest_epoch=0) is None  # the stepped clock alone would run it
    result = await executor.execute(stale)
    assert (result.status, result.detail[:8]) == ("rejected", "expired ")
    assert (await executor.execute(command(controller, "fresh"))).status == "done"


async def test_an_agent_started_behind_learns_the_controllers_time_from_its_commands(ledger: Ledger) -> None:
    """Its clock went back before it started, so it has no step to take out; the controller's commands show
    it the time, and one that expired by then is refused."""
    controller, system = ManualClock(), ManualClock(T0 - 300.0)
    executor = agent(ledger, steady(system))
    assert (await executor.execute(command(controller, "first"))).status == "done"
    for clock in (controller, system):
        clock.advance(40.0)
    stale = command(controller, "late", age=35.0)
    assert check_fresh(stale, now=system.wall(), highest_epoch=0) is None
    result = await executor.execute(stale)
    assert (result.status, result.detail[:8]) == ("rejected", "expired ")
    assert (await executor.execute(command(controller, "fresh"))).status == "done"


async def test_a_new_controller_whose_clock_is_behind_the_last_one_is_not_refused(ledger: Ledger) -> None:
    controller, system = ManualClock(), ManualClock()
    executor = agent(ledger, steady(system))
    assert (await executor.execute(command(controller, "a", epoch=1))).status == "done"
    controller.step(-120.0)  # restarted (a new epoch) on a host whose clock is two minutes behind
    for clock in (controller, system):
        clock.advance(5.0)
    fresh = command(controller, "b", epoch=2, ttl=300.0)
    assert (await executor.execute(fresh)).status == "done"


async def test_the_agents_idea_of_the_controllers_clock_never_runs_ahead_of_it(ledger: Ledger) -> None:
    """The controller's clock runs 1 % slow while it works off a step back of its system clock: what the agent
    learnt from its commands must not run ahead of it (an hour at 1 % is 36 s, more than the TTL). The agent's
    own clock is behind, so only what it learnt could refuse them."""
    controller, system = ManualClock(), ManualClock(T0 - 300.0)
    executor = agent(ledger, steady(system))
    for minute in range(60):
        assert (await executor.execute(command(controller, f"m{minute}"))).status == "done"
        controller.advance(60.0 * (1 - SLEW))
        system.advance(60.0)


async def test_an_agent_whose_clock_is_ahead_refuses_and_says_why(ledger: Ledger) -> None:
    controller, system = ManualClock(), ManualClock(T0 + 300.0)
    result = await agent(ledger, steady(system)).execute(command(controller, "fresh"))
    assert result.status == "rejected"
    assert "issued 300.000s ago" in result.detail
    assert "this node's clock is ahead of the controller's" in result.detail
