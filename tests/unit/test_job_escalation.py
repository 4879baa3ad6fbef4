"""A job that fails the same way every time escalates to a human and is then left alone.

Driven through the real pieces: the unit detectors turn the job's reports
into findings, the built-in rulebook (``rules/default.yaml``) decides, and the
reconciler climbs the ladder with injected time. Nothing retries forever: the
schedule does not retry a failed run (the controller decides), and the
controller's ladder ends in ``notify``.
"""

from __future__ import annotations

from detectors.units import detect_unit_exited, detect_unit_stalled, detect_unit_start_timeout
from remediations.reconciler import Failed, Started, Symptom
from rules.loader import load_default_rulebook
from selfheal.wire import UnitProgress, UnitReport
from tests.unit.test_reconciler import T0, Sim, only


def symptom_of(report: UnitReport, now: float) -> Symptom:
    finding = (detect_unit_exited("node-a", report) or detect_unit_stalled("node-a", report, now)
               or detect_unit_start_timeout("node-a", report, now))
    assert finding is not None
    return Symptom(key=finding.key, kind=finding.kind, node=finding.node, unit=finding.unit,
                   severity=finding.severity, summary=finding.summary, evidence=finding.evidence)


def climb(sim: Sim, symptom: Symptom, *, outcome: str, clear_for: float = 0.0) -> list[Started]:
    """Answer every plan with ``outcome``; after a succeeded one, the finding clears for ``clear_for`` s."""
    plans = [sim.until_started([symptom], limit=600.0)]
    while True:
        sim.finish(plans[-1], outcome if plans[-1].plan.action != "notify" else "succeeded", after=0.5)
        if outcome == "succeeded" and plans[-1].plan.action != "notify":
            sim.run([], until=sim.now - T0 + clear_for, step=0.5)  # it ran again for a while, then failed the same way
        effects: list[object] = []
        deadline = sim.now + 600.0
        while not effects and sim.now < deadline:
            effects = [e for e in sim.tick([symptom], at=sim.now + 0.5) if isinstance(e, Started | Failed)]
        if not effects or isinstance(effects[0], Failed):
            return plans
        started = effects[0]
        assert isinstance(started, Started)
        plans.append(started)


def test_a_job_failing_with_the_same_exit_code_climbs_to_notify_and_stops() -> None:
    sim = Sim(*load_default_rulebook().rules)
    failing = UnitReport(name="train", kind="process", state="exited", exit_code=2, every=3600.0)
    symptom = symptom_of(failing, T0)
    assert symptom.kind == "unit_exited"
    plans = climb(sim, symptom, outcome="failed")  # each restart dies again with exit code 2
    assert [p.plan.action for p in plans] == ["restart_unit"] * 3 + ["stop_unit", "notify"]
    assert sim.run([symptom], until=sim.now - T0 + 3600.0, step=10.0) == []  # left to the human: no more plans


def test_a_job_that_stalls_every_time_climbs_to_notify_and_stops() -> None:
    sim = Sim(*load_default_rulebook().rules)
    stalled = UnitReport(name="etl", kind="spark", state="running", pid=7, started_at=T0 - 100, stall_after=30.0,
                         progress=UnitProgress(done=1, total=3, stage="holding"), progress_at=T0 - 60)
    symptom = symptom_of(stalled, T0)
    assert symptom.kind == "unit_stalled"
    # Each restart "works" (the stall clears), and the job stalls again at the same point 150 s later
    # (sooner than that, three times within 120 s, the loop breaker quarantines the rule instead: also one alert).
    plans = climb(sim, symptom, outcome="succeeded", clear_for=150.0)
    assert [p.plan.action for p in plans] == ["restart_unit"] * 3 + ["notify"]
    assert only(sim.run([symptom], until=sim.now - T0 + 3600.0, step=10.0), Started) == []


def test_a_job_that_never_starts_is_restarted_once_then_left_to_a_human() -> None:
    sim = Sim(*load_default_rulebook().rules)
    waiting = UnitReport(name="etl", kind="spark", state="running", pid=7, started_at=T0 - 700, stall_after=30.0,
                         start_timeout=600.0)
    symptom = symptom_of(waiting, T0)
    assert symptom.kind == "unit_start_timeout"
    # The restart "works" (the finding clears with the new run), and the new run waits its 600 s in vain too.
    plans = climb(sim, symptom, outcome="succeeded", clear_for=601.0)
    assert [p.plan.action for p in plans] == ["restart_unit", "notify"]
    assert only(sim.run([symptom], until=sim.now - T0 + 3600.0, step=10.0), Started) == []
