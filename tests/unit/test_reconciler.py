"""The reconciler driven through scenarios with injected time, and its safety properties under hypothesis.

``Sim`` plays the controller: it feeds the symptoms that hold, binds each
opened incident to a fresh id and evaluates again at the same instant (as the
engine does), and reports plan outcomes with ``finish``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remediations.actions import action_of
from remediations.plans import idempotency_key
from remediations.reconciler import (
    Effect,
    Failed,
    FleetView,
    Held,
    IncidentState,
    Opened,
    Quarantined,
    Reconciler,
    Relapsed,
    Resolved,
    Started,
    Symptom,
)
from remediations.state import Attempt, Budget, Matcher, Silence
from rules.model import Backoff, LoopBreaker, Rule, Rulebook, Rung

E = TypeVar("E")
T0 = 1_700_000_000.0
FIXED = Backoff(first=0.0, base=1.0, factor=2.0, max=30.0, jitter=0.0)

CRASH = Rule(  # the shape of the built-in restart-exited-unit, without jitter
    name="restart-exited-unit", kind="unit_exited",
    ladder=(Rung("restart", 3, FIXED), Rung("stop_start", 1, Backoff(first=10.0, jitter=0.0)), Rung("notify")),
    cooldown=1.0, reset_after=300.0, resolve_after=5.0, max_attempts=10, attempt_window=3600.0,
    loop_breaker=LoopBreaker(refires=3, within=120.0, quarantine_for=3600.0), digest="c" * 64)
OFFLINE = Rule(name="report-offline-node", kind="node_offline", verify_kind="cleared",
               ladder=(Rung("notify", 1, Backoff(first=30.0, jitter=0.0)),), digest="o" * 64)


def exited(node: str = "node-1", unit: str = "web") -> Symptom:
    return Symptom(key=f"unit_exited:{node}/{unit}", kind="unit_exited", node=node, unit=unit, severity="critical",
                   summary=f"unit {unit} on {node} exited with code 1")


def offline(node: str = "node-1") -> Symptom:
    return Symptom(key=f"node_offline:{node}", kind="node_offline", node=node, unit=None, severity="critical",
                   summary=f"node {node} is offline")


class Sim:
    def __init__(self, *rules: Rule, budget: Budget | None = None, fleet: FleetView | None = None) -> None:
        self.engine = Reconciler(Rulebook(rules or (CRASH, OFFLINE)), budget)
        self.now = T0
        self.fleet = fleet or FleetView()
        self.ids = itertools.count(1)
        self.keys: dict[str, int] = {}

    def tick(self, symptoms: Iterable[Symptom] = (), *, at: float | None = None) -> list[Effect]:
        if at is not None:
            self.now = at
        held = {s.key: s for s in symptoms}
        effects = self.engine.evaluate(held, self.fleet, self.now)
        opened = [e for e in effects if isinstance(e, Opened)]
        for effect in opened:
            self.keys[effect.key] = next(self.ids)
            self.engine.bind(effect.key, self.keys[effect.key])
        if opened:
            effects += self.engine.evaluate(held, self.fleet, self.now)
        return effects

    def run(self, symptoms: Iterable[Symptom], until: float, step: float = 0.5) -> list[Effect]:
        """Tick every ``step`` s up to ``until`` (relative to T0)."""
        symptoms = tuple(symptoms)
        effects: list[Effect] = []
        while self.now + step <= T0 + until + 1e-9:
            effects += self.tick(symptoms, at=self.now + step)
        return effects

    def until_started(self, symptoms: Iterable[Symptom], limit: float = 120.0, step: float = 0.5) -> Started:
        symptoms = tuple(symptoms)
        deadline = self.now + limit
        while self.now < deadline:
            for effect in self.tick(symptoms, at=self.now + step):
                if isinstance(effect, Started):
                    return effect
        raise AssertionError(f"no plan started within {limit}s")

    def finish(self, effect: Started, outcome: str = "succeeded", after: float = 0.5, *, ran: bool = True) -> None:
        self.now += after
        self.engine.finish(effect.plan.id, outcome, self.now, ran=ran)


def only(effects: list[Effect], kind: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, kind)]


# --- lifecycle ----------------------------------------------------------------------------------


def test_open_plan_succeed_and_resolve_only_after_resolve_after() -> None:
    sim = Sim()
    effects = sim.tick([exited()])
    assert [type(e) for e in effects] == [Opened, Started]
    assert effects[0] == Opened("unit_exited:node-1/web", exited(), "restart-exited-unit")
    started = effects[1]
    assert isinstance(started, Started)
    assert (started.incident_id, started.plan.id, started.plan.action, started.plan.rung) == (
        1, "1-1", "restart_unit", 0)
    sim.finish(started, "succeeded", after=1.0)
    assert sim.tick([], at=T0 + 2) == []
    assert sim.run([], until=6.5) == []  # cleared at +2, resolve_after 5
    assert sim.tick([], at=T0 + 7) == [Resolved(1, "symptom cleared and stayed clear for 5.0s")]
    assert sim.engine.incidents == {}
    assert sim.engine.running == {}


def test_a_relapse_within_resolve_after_continues_the_incident() -> None:
    sim = Sim()
    first = only(sim.tick([exited()]), Started)[0]
    sim.finish(first, "succeeded", after=1.0)
    assert sim.tick([], at=T0 + 2) == []
    effects = sim.tick([exited()], at=T0 + 4)
    assert effects[0] == Relapsed(1, exited())
    assert not only(effects, Opened)
    (second,) = only(effects, Started)
    assert (second.incident_id, second.plan.id, second.plan.rung, second.plan.attempt) == (1, "1-2", 0, 2)


def test_a_relapse_after_resolution_opens_a_new_incident() -> None:
    sim = Sim()
    sim.finish(only(sim.tick([exited()]), Started)[0], "succeeded")
    assert only(sim.run([], until=10), Resolved) == [Resolved(1, "symptom cleared and stayed clear for 5.0s")]
    assert sim.engine.incidents == {}
    effects = sim.tick([exited()], at=T0 + 11)
    assert [type(e) for e in effects] == [Opened, Started]
    assert only(effects, Started)[0].incident_id == 2


def test_a_crash_loop_climbs_the_ladder_then_fails_and_goes_quiet() -> None:
    sim = Sim()
    plans = [only(sim.tick([exited()]), Started)[0]]
    for _ in range(4):
        sim.finish(plans[-1], "failed", after=0.25)
        plans.append(sim.until_started([exited()], step=0.25))
    assert [p.plan.action for p in plans] == ["restart_unit", "restart_unit", "restart_unit", "stop_unit", "notify"]
    assert [p.plan.rung for p in plans] == [0, 0, 0, 1, 2]
    assert [p.plan.id for p in plans] == ["1-1", "1-2", "1-3", "1-4", "1-5"]
    starts = [round(p.plan.created_at - T0, 1) for p in plans]
    # backoff from the previous start: 1 s, 2 s, then stop_start's 10 s; notify waits out the 1 s cooldown
    assert starts == [0.0, 1.0, 3.0, 13.0, 14.0]
    sim.finish(plans[-1], "succeeded", after=0.25)
    effects = sim.tick([exited()], at=sim.now + 0.25)
    (failed,) = only(effects, Failed)
    assert failed.incident_id == 1
    assert failed.reason.startswith("ladder exhausted: every rung of restart-exited-unit was used")
    assert sim.run([exited()], until=300.0, step=5.0) == []


def test_max_attempts_fails_the_incident() -> None:
    rule = Rule(name="r", kind="unit_exited", ladder=(Rung("restart", 20, Backoff(jitter=0.0, base=0.0)),),
                cooldown=1.0, max_attempts=3, attempt_window=600.0)
    sim = Sim(rule)
    plans = [only(sim.tick([exited()]), Started)[0]]
    for _ in range(2):
        sim.finish(plans[-1], "failed")
        plans.append(sim.until_started([exited()]))
    sim.finish(plans[-1], "failed")
    effects = sim.run([exited()], until=60.0)
    assert not only(effects, Started)
    (failed,) = only(effects, Failed)
    assert failed.reason == "max_attempts: 3 attempts on this target in the last 600s; the rule allows 3"
    assert [c.guard for c in failed.checks if c.verdict != "allow"] == ["max_attempts"]
    assert sim.run([exited()], until=120.0) == []


# --- memory bounded by the rules' windows -------------------------------------------------------

KEY = ("restart-exited-unit", "node-1/web")


def crash_and_heal(sim: Sim, symptom: Symptom, at: float) -> Started:
    """``symptom`` holds at ``at`` (relative to T0); its plan succeeds half a second later."""
    started = only(sim.tick([symptom], at=T0 + at), Started)[0]
    sim.finish(started, "succeeded")
    return started


def test_a_target_idle_past_every_rules_window_is_forgotten_and_the_next_crash_starts_afresh() -> None:
    sim = Sim()
    crash_and_heal(sim, exited(), 0.0)
    sim.run([], until=400.0, step=5.0)  # resolved after 5 s, ladder reset after reset_after (300 s)
    assert sim.engine.incidents == {}
    assert sim.engine.targets[KEY].idle
    sim.tick([], at=T0 + 3599.0)  # its attempt is within attempt_window (3600 s): it still counts
    assert KEY in sim.engine.targets
    sim.tick([], at=T0 + 3601.0)  # and for a second more: a pass's ``now`` may come a little out of order
    assert KEY in sim.engine.targets
    sim.tick([], at=T0 + 3602.0)
    assert sim.engine.targets == {}
    assert sim.engine.unit_rules == {}
    [started] = only(sim.tick([exited()], at=T0 + 3603.0), Started)
    assert (started.plan.action, started.plan.rung) == ("restart_unit", 0)


def test_an_idle_target_keeps_counting_its_attempts_within_the_window() -> None:
    """Forgetting must not lift max_attempts: attempts inside attempt_window count after the ladder reset."""
    rule = Rule(name="r", kind="unit_exited", ladder=(Rung("restart", 20, Backoff(jitter=0.0, base=0.0)),),
                cooldown=1.0, reset_after=10.0, resolve_after=2.0, max_attempts=2, attempt_window=600.0)
    sim = Sim(rule)
    crash_and_heal(sim, exited(), 0.0)
    sim.run([], until=100.0, step=5.0)
    assert sim.engine.targets[("r", "node-1/web")].idle
    crash_and_heal(sim, exited(), 105.0)
    sim.run([], until=200.0, step=5.0)
    effects = sim.tick([exited()], at=T0 + 205.0)
    assert not only(effects, Started)
    assert only(effects, Failed)[0].reason.startswith("max_attempts: 2 attempts")


def test_a_target_whose_incident_stays_open_is_kept_however_old_its_attempts() -> None:
    """A unit that failed its ladder and still fails is no idle target: forgetting it would restart the ladder."""
    sim = Sim()
    plans = [only(sim.tick([exited()]), Started)[0]]
    for _ in range(4):
        sim.finish(plans[-1], "failed", after=0.25)
        plans.append(sim.until_started([exited()], step=0.25))
    sim.finish(plans[-1], "succeeded", after=0.25)
    assert only(sim.tick([exited()], at=sim.now + 0.25), Failed)
    assert sim.run([exited()], until=3 * 3600.0, step=60.0) == []
    assert not sim.engine.targets[KEY].idle
    assert len(sim.engine.targets[KEY].attempts) == 5


def test_what_is_remembered_is_bounded_by_the_window_not_by_every_unit_that_ever_failed() -> None:
    """A different unit crashes every 10 s for three hours (1,080 units): only those within the rules'
    windows (attempt_window 3600 s, a few hundred) are remembered."""
    sim = Sim()
    for i in range(1080):
        crash_and_heal(sim, exited(node=f"node-{i}"), 10.0 * i)
    sim.tick([], at=T0 + 10_810.0)
    assert 300 < len(sim.engine.targets) <= 362
    assert set(sim.engine.unit_rules) == {unit for _, unit in sim.engine.targets}


def test_a_unit_that_keeps_failing_and_healing_holds_one_entry_in_the_idle_queue() -> None:
    """A compromised node flapping a unit for days must not grow the reconciler's memory."""
    rule = dataclasses.replace(CRASH, reset_after=10.0, max_attempts=100)
    sim = Sim(rule)
    for cycle in range(50):  # every 200 s: outside the loop breaker's 120 s, inside attempt_window
        crash_and_heal(sim, exited(), 200.0 * cycle)
        sim.run([], until=200.0 * cycle + 50.0, step=5.0)  # resolved, ladder reset: idle until the next crash
        assert sim.engine.targets[KEY].idle
    assert len(sim.engine._idle) == 1


def test_a_restored_incident_keeps_its_target_however_old_its_attempts() -> None:
    """A controller restarted while an incident that used up its ladder stays failed for hours: when it
    clears and the unit fails again before reset_after, the ladder is still used up (no restart at rung 0)."""
    sim = Sim()
    symptom = exited()
    for i, (rung, action) in enumerate([(0, "restart_unit")] * 3 + [(1, "stop_unit"), (2, "notify")]):
        sim.engine.restore_attempt(CRASH.name, symptom, Attempt(f"1-{i + 1}", rung, T0 + i, action))
    sim.engine.restore_incident(IncidentState(symptom.key, symptom, CRASH.name, first_seen=T0, id=1, state="failed",
                                              plans=5))
    sim.now = T0 + 10
    assert not only(sim.run([symptom], until=2 * 3600.0, step=60.0), Started)
    sim.run([], until=2 * 3600.0 + 30.0, step=1.0)  # cleared: resolved after resolve_after
    assert sim.engine.incidents == {}
    effects = sim.tick([symptom], at=sim.now + 30.0)
    assert not only(effects, Started)
    assert only(effects, Failed)[0].reason.startswith("ladder exhausted")


def test_attempts_counted_again_after_a_reload_that_widened_the_window_hold_max_attempts() -> None:
    """Forgotten under a 600 s window, counted again when a reload widens it to an hour (``Engine.reload``
    reads them back from the store): max_attempts holds as if they had never been forgotten."""
    narrow = Rule(name="r", kind="unit_exited", ladder=(Rung("restart", 20, Backoff(jitter=0.0, base=0.0)),),
                  cooldown=1.0, reset_after=10.0, resolve_after=2.0, max_attempts=2, attempt_window=600.0)
    sim = Sim(narrow)
    first = crash_and_heal(sim, exited(), 0.0)
    second = crash_and_heal(sim, exited(), 105.0)
    sim.run([], until=800.0, step=5.0)
    assert sim.engine.targets == {}  # forgotten: no rule counts them any more
    sim.engine.rules = Rulebook((dataclasses.replace(narrow, attempt_window=3600.0),))
    for started in (first, second):
        plan = started.plan
        sim.engine.restore_attempt("r", exited(), Attempt(plan.id, plan.rung, plan.created_at, plan.action),
                                   count_start=False)
    sim.engine.restore_attempt("r", exited(), Attempt(first.plan.id, 0, first.plan.created_at, "restart_unit"))
    assert len(sim.engine.targets[("r", "node-1/web")].attempts) == 2  # a plan held already is not added twice
    effects = sim.tick([exited()], at=T0 + 805.0)
    assert not only(effects, Started)
    assert only(effects, Failed)[0].reason.startswith("max_attempts: 2 attempts")


def test_at_the_cap_the_target_attempted_longest_ago_goes_with_its_index_entry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("remediations.reconciler.MAX_TARGETS", 3)
    sim = Sim()
    for i in range(5):
        crash_and_heal(sim, exited(node=f"node-{i}"), 10.0 * i)
    assert sorted(unit for _, unit in sim.engine.targets) == ["node-2/web", "node-3/web", "node-4/web"]
    assert set(sim.engine.unit_rules) == {"node-2/web", "node-3/web", "node-4/web"}


# --- loop breaker, ladder reset -----------------------------------------------------------------


def heal_and_refire(sim: Sim, started: Started) -> list[Effect]:
    """The plan "works", the symptom clears long enough to resolve, then comes straight back."""
    sim.finish(started, "succeeded", after=0.5)
    resolved = sim.run([], until=sim.now - T0 + 6.0)
    assert only(resolved, Resolved)
    return sim.tick([exited()], at=sim.now + 1.0)


def test_the_loop_breaker_quarantines_a_rule_that_keeps_re_firing() -> None:
    sim = Sim()
    started = only(sim.tick([exited()]), Started)[0]
    effects = heal_and_refire(sim, started)  # refire 1
    started = only(effects, Started)[0]
    effects = heal_and_refire(sim, started)  # refire 2
    started = only(effects, Started)[0]
    effects = heal_and_refire(sim, started)  # refire 3: quarantine instead of a plan
    assert not only(effects, Started)
    (quarantined,) = only(effects, Quarantined)
    assert (quarantined.incident_id, quarantined.rule, quarantined.target, quarantined.refires) == (
        4, "restart-exited-unit", "node-1/web", 3)
    assert quarantined.until == sim.now + 3600.0
    assert sim.run([exited()], until=sim.now - T0 + 60.0) == []  # that incident is left to a human

    # the unit recovers, the incident resolves; a new incident on the same target is held by the quarantine
    sim.run([], until=sim.now - T0 + 10.0)
    effects = sim.tick([exited()], at=sim.now + 1.0)
    (held,) = only(effects, Held)
    assert (held.blocking.guard, held.blocking.until) == ("quarantine", quarantined.until)
    assert not only(effects, Started)
    # another unit on the same node is not quarantined
    assert only(sim.tick([exited(), exited(unit="db")], at=sim.now + 1.0), Started)[0].plan.steps[0].unit == "db"  # type: ignore[union-attr]
    # and the quarantine ends
    sim.engine.finish(next(iter(sim.engine.running)), "succeeded", sim.now)
    effects = sim.tick([exited()], at=quarantined.until + 1.0)
    assert only(effects, Started)


def test_plans_that_fail_do_not_trip_the_loop_breaker() -> None:
    rule = Rule(name="r", kind="unit_exited", ladder=(Rung("restart", 10, Backoff(base=0.0, jitter=0.0)),),
                max_attempts=100,
                loop_breaker=LoopBreaker(refires=2, within=120.0, quarantine_for=600.0))
    sim = Sim(rule)
    started = only(sim.tick([exited()]), Started)[0]
    for _ in range(4):
        sim.finish(started, "failed")
        sim.run([], until=sim.now - T0 + 6.0)
        effects = sim.tick([exited()], at=sim.now + 1.0)
        assert not only(effects, Quarantined)
        started = only(effects, Started)[0]


def test_reset_after_healthy_restarts_the_ladder_at_rung_zero() -> None:
    sim = Sim()
    plans = [only(sim.tick([exited()]), Started)[0]]
    for _ in range(2):
        sim.finish(plans[-1], "failed", after=0.2)
        plans.append(sim.until_started([exited()], step=0.1))
    sim.finish(plans[-1], "failed", after=0.2)
    assert [p.plan.rung for p in plans] == [0, 0, 0]
    healthy_from = sim.now + 1.0
    sim.run([], until=healthy_from - T0 + 300.0, step=1.0)  # healthy for reset_after (300 s)
    effects = sim.tick([exited()], at=sim.now + 1.0)
    started = only(effects, Started)[0]
    assert (started.plan.action, started.plan.rung) == ("restart_unit", 0)


def test_without_reset_after_the_ladder_continues_where_it_was() -> None:
    sim = Sim()
    plans = [only(sim.tick([exited()]), Started)[0]]
    for _ in range(2):
        sim.finish(plans[-1], "failed", after=0.2)
        plans.append(sim.until_started([exited()], step=0.1))
    sim.finish(plans[-1], "failed", after=0.2)
    sim.run([], until=sim.now - T0 + 298.0, step=1.0)  # resolved, but healthy for less than reset_after
    started = sim.until_started([exited()])
    assert (started.plan.action, started.plan.rung) == ("stop_unit", 1)


# --- offline nodes ------------------------------------------------------------------------------


def test_an_incident_on_an_offline_node_is_neither_planned_nor_resolved() -> None:
    rule = Rule(name="r", kind="unit_exited", ladder=(Rung("restart"),), for_=20.0)
    sim = Sim(rule, OFFLINE, fleet=FleetView(groups={"node-1": ""}))
    assert [type(e) for e in sim.tick([exited()])] == [Opened, Held]
    # the node goes offline: its unit findings stop (the detectors report only node_offline for it)
    sim.fleet = FleetView(offline=frozenset({"node-1"}), groups={"node-1": ""})
    effects = sim.run([offline()], until=120.0)
    assert not only(effects, Resolved)
    started = only(effects, Started)
    assert [s.plan.action for s in started] == ["notify"]  # for the offline node itself, after its 30 s backoff
    assert started[0].incident_id == 2
    assert round(started[0].plan.created_at - T0, 1) == 30.5
    assert "unit_exited:node-1/web" in sim.engine.incidents
    sim.engine.finish(started[0].plan.id, "succeeded", sim.now)
    # the node is back and its unit runs: both incidents resolve after resolve_after
    sim.fleet = FleetView(groups={"node-1": ""})
    effects = sim.run([], until=130.0)
    assert sorted(e.incident_id for e in only(effects, Resolved)) == [1, 2]
    assert not only(effects, Started)


# --- holds, modes, pause, silences --------------------------------------------------------------


def test_a_hold_is_reported_once_per_reason_not_every_tick() -> None:
    sim = Sim()
    sim.engine.silences.append(Silence("s1", (Matcher("unit", "web"),), T0, T0 + 60, comment="deploy"))
    effects = sim.tick([exited()])
    effects += sim.run([exited()], until=59.5)
    (held,) = only(effects, Held)
    assert (held.blocking.guard, held.blocking.until) == ("silence", T0 + 60)
    assert not only(effects, Started)
    started = sim.until_started([exited()])
    assert round(started.plan.created_at - T0, 1) == 60.0
    assert started.checks[0].guard == "silence"
    assert started.checks[0].verdict == "allow"


def test_a_cooldown_hold_is_reported_once_not_every_tick() -> None:
    """A hold is audited once per blocking guard, not once per engine tick (the cooldown reason text
    carries the elapsed time, so deduplicating on the text would log every tick)."""
    rule = Rule(name="r", kind="unit_exited", ladder=(Rung("restart", 5, Backoff(base=0.0, jitter=0.0)),),
                cooldown=60.0)
    sim = Sim(rule)
    started = only(sim.tick([exited()]), Started)[0]
    sim.finish(started, "failed", after=1.0)
    effects = sim.run([exited()], until=30.0, step=1.0)
    assert [h.blocking.guard for h in only(effects, Held)] == ["cooldown"]


def test_approve_and_shadow_modes_produce_plans_in_that_mode() -> None:
    for mode in ("approve", "shadow"):
        rule = Rule(name="r", kind="unit_exited", ladder=(Rung("restart"), Rung("notify")), mode=mode)
        sim = Sim(rule, budget=Budget(max_concurrent=1))
        started = only(sim.tick([exited()]), Started)[0]
        assert started.plan.mode == mode
        # awaiting approval (or recorded in shadow) the plan holds its budget share until it is finished
        assert list(sim.engine.running) == [started.plan.id]
        held = only(sim.tick([exited(unit="db")], at=sim.now + 1), Held)
        assert [h.blocking.guard for h in held] == ["budget"]
        sim.finish(started, "cancelled")
        notify = sim.until_started([exited()])
        assert (notify.plan.action, notify.plan.mode) == ("notify", "auto" if mode == "approve" else "shadow")


def test_outcomes_feed_the_success_rate_per_kind_and_action() -> None:
    sim = Sim()
    started = only(sim.tick([exited()]), Started)[0]
    sim.finish(started, "failed")
    started = sim.until_started([exited()])
    sim.finish(started, "succeeded")
    summary = sim.engine.stats[("unit_exited", "restart")].summary()
    assert (summary["attempts"], summary["successes"], summary["success_rate"]) == (2, 1, 0.5)


def test_an_approval_that_expires_unapproved_does_not_count_as_a_failed_action() -> None:
    """An approve-mode plan nobody approved in time never ran: it must not lower the action's success rate
    (with a rung floor set, slow humans would otherwise make the engine skip that action fleet-wide).
    The controller reports it with ``ran=False``; a plan that expired while executing still counts."""
    rule = Rule(name="r", kind="unit_exited", ladder=(Rung("restart", 3), Rung("notify")), mode="approve")
    sim = Sim(rule)
    started = only(sim.tick([exited()]), Started)[0]
    assert started.plan.mode == "approve"
    sim.finish(started, "expired", after=900.0, ran=False)
    assert ("unit_exited", "restart") not in sim.engine.stats


def test_pause_holds_restarts_but_not_notifications() -> None:
    sim = Sim(CRASH, Rule(name="report", kind="node_offline", ladder=(Rung("notify"),)))
    sim.engine.paused = True
    sim.engine.pause_reason = "kernel upgrade"
    effects = sim.tick([exited(), offline("node-2")])
    (held,) = only(effects, Held)
    assert (held.incident_id, held.blocking.guard) == (1, "pause")
    assert held.blocking.reason == "remediation is paused fleet-wide: kernel upgrade"
    (started,) = only(effects, Started)
    assert (started.incident_id, started.plan.action) == (2, "notify")
    assert not only(sim.run([exited(), offline("node-2")], until=30.0), Started)
    sim.engine.paused = False
    assert only(sim.tick([exited(), offline("node-2")], at=sim.now + 1), Started)[0].incident_id == 1


def test_an_expired_silence_no_longer_holds() -> None:
    sim = Sim()
    sim.engine.silences.append(Silence("old", (), T0 - 100, T0 - 1))
    assert only(sim.tick([exited()]), Started)


def test_two_rules_never_run_disruptive_plans_on_the_same_unit_at_once() -> None:
    """Two rules matching the same unit (a crash, then a failing probe during warm-up) never act on it at
    once: the exclusive guard holds the second until the first finishes, and cooldown counts both."""
    probe = Rule(name="restart-unhealthy-unit", kind="probe_failing", ladder=(Rung("restart", 3, FIXED),),
                 cooldown=2.0)
    sim = Sim(CRASH, probe)
    first = only(sim.tick([exited()]), Started)[0]
    unhealthy = Symptom(key="probe_failing:node-1/web", kind="probe_failing", node="node-1", unit="web",
                        severity="critical", summary="probe of web failed 3 times")
    effects = sim.tick([unhealthy], at=T0 + 5)  # the first restart is still running (verifying)
    assert first.plan.id in sim.engine.running
    assert not only(effects, Started)


# --- properties ---------------------------------------------------------------------------------

NODES = [f"n{i}" for i in range(6)]
UNITS = ["web", "db", "etl"]


def rules_strategy() -> st.SearchStrategy[tuple[Rule, ...]]:
    def build(*, cooldown: float, max_attempts: int, window: float, rate: int, for_: float, attempts: int,
              base: float, refires: int) -> tuple[Rule, ...]:
        backoff = Backoff(first=0.0, base=base, factor=2.0, max=20.0, jitter=0.3)
        common = {"cooldown": cooldown, "max_attempts": max_attempts, "attempt_window": window,
                  "rate_limit": (rate, 30.0), "for_": for_, "reset_after": 40.0, "resolve_after": 3.0,
                  "loop_breaker": LoopBreaker(refires=refires, within=60.0, quarantine_for=120.0)}
        return (
            Rule(name="exited", kind="unit_exited", ladder=(
                Rung("restart", attempts, backoff), Rung("stop_start", 1, backoff), Rung("migrate"),
                Rung("notify")), **common),  # type: ignore[arg-type]
            Rule(name="offline", kind="node_offline", ladder=(Rung("notify", 1, Backoff(first=5.0)),)),
        )
    return st.builds(build, cooldown=st.sampled_from([0.0, 1.0, 5.0, 15.0]), max_attempts=st.integers(1, 6),
                     window=st.sampled_from([20.0, 60.0, 600.0]), rate=st.integers(2, 20),
                     for_=st.sampled_from([0.0, 0.0, 2.0]), attempts=st.integers(1, 3),
                     base=st.sampled_from([0.0, 1.0, 4.0]), refires=st.integers(1, 3))


FAILING = st.frozensets(st.tuples(st.sampled_from(NODES), st.sampled_from(UNITS)), max_size=12)
STEP = st.one_of(
    st.tuples(st.just("fail"), FAILING),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 6.0, 20.0, 60.0])),
    st.tuples(st.just("wait"), st.sampled_from([0.1, 1.0, 5.0])),
    st.tuples(st.just("offline"), st.frozensets(st.sampled_from(NODES), max_size=2)),
    st.tuples(st.just("pause"), st.sampled_from([False, False, False, True])),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rules_strategy(),
       groups=st.lists(st.sampled_from(["a", "a", "b", ""]), min_size=len(NODES), max_size=len(NODES)),
       budget=st.builds(Budget, max_concurrent=st.integers(1, 6),
                        max_node_share=st.sampled_from([0.0, 0.34, 0.5, 1.0]),
                        max_replica_share=st.sampled_from([0.0, 0.5, 1.0])),
       standby=st.booleans(),
       steps=st.lists(STEP, min_size=4, max_size=60),
       data=st.data())
def test_safety_properties_hold_on_every_step(*, rules: tuple[Rule, ...], groups: list[str], budget: Budget,
                                              standby: bool, steps: list[tuple[str, object]],
                                              data: st.DataObject) -> None:
    crash = rules[0]
    engine = Reconciler(Rulebook(rules), budget)
    group_of = dict(zip(NODES, groups, strict=True))
    group_size = Counter(groups)
    now = T0
    failing: frozenset[tuple[str, str]] = frozenset()
    down: frozenset[str] = frozenset()
    ids = itertools.count(1)
    pending: list[tuple[float, str, str]] = []  # (finish at, plan id, outcome)
    running: dict[str, tuple[int, str, bool]] = {}  # plan id → (incident, node, disruptive)
    healed_by: dict[str, tuple[str, str]] = {}  # plan id → the (node, unit) it heals when it succeeds
    starts: dict[str, list[float]] = defaultdict(list)  # (rule, node/unit) → plan start times
    plan_ids: set[str] = set()
    keys: set[str] = set()

    def symptoms() -> dict[str, Symptom]:
        held = {s.key: s for s in (exited(n, u) for n, u in sorted(failing) if n not in down)}
        held.update({s.key: s for s in (offline(n) for n in sorted(down))})
        return held

    def fleet() -> FleetView:
        spare = {u: tuple(n for n in NODES if n not in down)[-2:] for u in UNITS} if standby else {}
        return FleetView(offline=down, groups=group_of, replicas={u: len(NODES) for u in UNITS}, standby=spare)

    def evaluate() -> None:
        held = symptoms()
        for _ in range(2):
            effects = engine.evaluate(held, fleet(), now)
            for effect in effects:
                if isinstance(effect, Opened):
                    engine.bind(effect.key, next(ids))
                elif isinstance(effect, Started):
                    record(effect)
            if not any(isinstance(e, Opened) for e in effects):
                break

    def record(effect: Started) -> None:
        plan = effect.plan
        assert plan.id not in plan_ids, f"plan id {plan.id} repeated"
        plan_ids.add(plan.id)
        for index, step in enumerate(plan.steps):
            key = idempotency_key(step.node, plan.incident_id, index, plan.attempt)
            assert key not in keys
            keys.add(key)
        assert all(incident != effect.incident_id for incident, _, _ in running.values()), (
            f"incident {effect.incident_id} has two plans running")
        step = plan.steps[0]
        node = step.node
        unit = getattr(step, "unit", None)
        disruptive = action_of(plan).disruptive
        running[plan.id] = (effect.incident_id, node, disruptive)
        if disruptive and unit is not None:
            healed_by[plan.id] = (node, unit)
        if plan.rule == crash.name:
            target = f"{effect.plan.cooldown_key}"
            history = starts[target]
            if history:
                assert now - history[-1] >= crash.cooldown, f"{target}: plans {now - history[-1]}s apart"
            history.append(now)
            in_window = [t for t in history if t > now - crash.attempt_window]
            assert len(in_window) <= crash.max_attempts, f"{target}: {len(in_window)} plans in the window"
        assert unit is None or isinstance(unit, str)
        duration = data.draw(st.sampled_from([0.1, 1.0, 4.0, 20.0, 90.0]), label="duration")
        outcome = data.draw(st.sampled_from(["failed", "succeeded", "failed", "expired", "cancelled"]),
                            label="outcome")
        pending.append((now + duration, plan.id, outcome))

    def check_invariants() -> None:
        assert set(running) == set(engine.running)
        disruptive = [(node) for _, node, d in running.values() if d]
        assert len(disruptive) <= budget.max_concurrent
        for group, size in group_size.items():
            nodes = {n for n in disruptive if group_of[n] == group}
            assert len(nodes) <= max(1, math.floor(budget.max_node_share * size)), (group, nodes)

    for kind, value in steps:
        if kind == "fail":
            failing = value  # type: ignore[assignment]
        elif kind == "offline":
            down = value  # type: ignore[assignment]
        elif kind == "pause":
            engine.paused = bool(value)
        else:
            target_time = now + float(value)  # type: ignore[arg-type]
            while True:  # finish due plans in time order, evaluating at each finish as the engine would
                due = sorted(p for p in pending if p[0] <= target_time)
                if not due:
                    break
                at, plan_id, outcome = due[0]
                pending.remove(due[0])
                now = max(now, at)
                engine.finish(plan_id, outcome, now)
                running.pop(plan_id, None)
                if outcome == "succeeded" and plan_id in healed_by:  # a plan that worked heals its unit
                    failing = failing - {healed_by[plan_id]}
                evaluate()
                check_invariants()
            now = target_time
        evaluate()
        check_invariants()


# --- lost units: migration ----------------------------------------------------------------------

LOST = Rule(name="migrate-lost-unit", kind="unit_lost", ladder=(Rung("migrate", 2, FIXED), Rung("notify")),
            resolve_after=3.0, digest="m" * 64)


def lost(node: str = "node-1", unit: str = "predict") -> Symptom:
    return Symptom(key=f"unit_lost/{node}/{unit}", kind="unit_lost", node=node, unit=unit, severity="critical",
                   summary=f"{unit} runs nowhere")


def test_a_lost_unit_migrates_to_a_healthy_standby_never_a_sick_or_offline_one() -> None:
    fleet = FleetView(offline=frozenset({"node-1", "node-4"}),
                      standby={"predict": ("node-2", "node-3", "node-4")})
    sim = Sim(LOST, CRASH, OFFLINE, fleet=fleet)
    # node-2 has an open incident of its own: sick, so not a target; node-4 is offline
    started = sim.until_started([lost(), exited("node-2", "other")])
    (step,) = started.plan.steps
    assert (step.kind, step.source, step.target, step.unit) == ("migrate_unit", "node-1", "node-3", "predict")
    assert started.plan.verification is not None
    assert started.plan.verification.node == "node-3"


def test_without_a_healthy_standby_a_lost_unit_pages_a_human() -> None:
    sim = Sim(LOST, CRASH, OFFLINE, fleet=FleetView(offline=frozenset({"node-1"}), standby={"predict": ("node-2",)}))
    started = sim.until_started([lost(), exited("node-2", "other")])
    assert started.plan.action == "notify"
    assert started.skipped == ((0, "no healthy online node holds a standby copy of the unit"),)


def test_a_lost_unit_resolves_once_it_runs_elsewhere_though_its_node_is_still_offline() -> None:
    sim = Sim(LOST, OFFLINE, fleet=FleetView(offline=frozenset({"node-1"}), standby={"predict": ("node-2",)}))
    started = sim.until_started([lost()])
    sim.finish(started)
    effects = sim.run([offline()], until=sim.now - T0 + 10.0)  # the finding cleared; node-1 stays offline
    assert [e.incident_id for e in only(effects, Resolved)] == [sim.keys["unit_lost/node-1/predict"]]


# --- time: wake_at ------------------------------------------------------------------------------


def drive(sim: Sim, *, polling: float | None, clear_at: float = 40.0, end: float = 60.0) -> list[tuple[float, str]]:
    """A unit that crashes at T0, each restart failing 0.5 s after it started, healthy from ``clear_at``:
    evaluated every ``polling`` s, or (None) only after a change and at ``wake_at``."""
    effects: list[tuple[float, str]] = []
    finishing: list[tuple[float, str]] = []
    at = T0
    while at <= T0 + end:
        for when, plan in [f for f in finishing if f[0] <= at]:
            finishing.remove((when, plan))
            sim.engine.finish(plan, "failed", when)
        symptoms = [exited()] if at < T0 + clear_at else []
        for effect in sim.tick(symptoms, at=at):
            effects.append((at, type(effect).__name__))
            if isinstance(effect, Started):
                finishing.append((at + 0.5, effect.plan.id))
        changes = [when for when, _ in finishing] + ([T0 + clear_at] if at < T0 + clear_at else [])
        timed = at + polling if polling is not None else sim.engine.wake_at  # a change wakes either at once
        at = min([timed, *changes, T0 + end + 1])
    return effects


def test_every_time_based_decision_comes_due_at_wake_at() -> None:
    """Backoff, cooldown, the next rung's delay, resolve_after: a controller that evaluates only after a
    change and at ``wake_at`` does what one polling every 1/8 s does, at the instants the rules name."""
    polled = drive(Sim(), polling=0.125)  # exact in binary: the polled instants do not drift
    woken = drive(Sim(), polling=None)
    assert [kind for _, kind in woken] == [kind for _, kind in polled]
    assert "Resolved" in [kind for _, kind in woken]
    assert [k for _, k in woken].count("Started") == 5
    for (t_woken, _), (t_polled, _) in zip(woken, polled, strict=True):
        assert t_woken <= t_polled < t_woken + 0.125


def test_a_hold_that_only_a_change_lifts_sets_no_wake() -> None:
    sim = Sim()
    sim.engine.paused = True
    assert only(sim.tick([exited()]), Held)[0].blocking.guard == "pause"
    assert sim.engine.wake_at == math.inf
