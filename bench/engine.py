"""Throughput of the pure decision engine, and how it rides out a restart storm.

1. Steady state: ``Reconciler.evaluate`` with every guard on, over a fleet of
   10,000 units (1,000 nodes x 10 units, 20 groups of 50 nodes), about 3 % of
   them failing at any time, simulated time advancing 1 s per evaluation.
   Plans take a fixed simulated time and succeed 80 % of the time; a failing
   unit also recovers by itself now and then. Only ``evaluate`` is timed; the
   harness (symptom bookkeeping, ``bind``, ``finish``) is not. A "decision"
   is one call of the planner for one incident (plan, hold, refusal or end of
   ladder).
2. Restart storm: N units crash at once (20 and 200) under the built-in
   ``restart-exited-unit`` rule with a fleet budget of ``max_concurrent`` 3 and
   5. Every plan takes a fixed simulated time and heals its unit. Reported:
   the peak of concurrent disruptive plans against the budget, and the
   simulated seconds until every unit is healthy again (the lower bound is
   ceil(N / max_concurrent) x plan duration).

No anchor is measured here: see ``ANCHORS`` for what the per-pod schedulers
lack. Run:

    .venv/bin/python bench/engine.py [--ticks 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import remediations.reconciler as reconciler_module
from remediations.reconciler import FleetView, Held, Opened, Reconciler, Resolved, Started, Symptom
from remediations.state import Budget
from rules.loader import load_default_rulebook

ANCHORS = (
    "Context, not measured: Kubernetes restarts a crashed container with a per-container back-off "
    "(10 s doubling to a 5 min cap, CrashLoopBackOff) and Nomad's restart block retries each task "
    "(attempts per interval, a delay between them); both back off per pod/task, and neither caps how many "
    "restarts run at once across the fleet, so a storm of N crashing pods restarts all N together. "
    "A PodDisruptionBudget limits voluntary evictions only, not kubelet restarts."
)
START = 1_700_000_000.0


def symptom(node: str, unit: str) -> Symptom:
    return Symptom(key=f"unit_exited:{node}/{unit}", kind="unit_exited", node=node, unit=unit, severity="critical",
                   summary=f"unit {unit} on {node} exited with code 1", labels={"group": ""})


@dataclass
class Harness:
    """Plays the controller around a Reconciler: binds incidents, runs plans for a fixed time, heals units."""

    engine: Reconciler
    fleet: FleetView
    plan_s: float
    success: float
    rng: random.Random
    now: float = START
    failing: dict[str, Symptom] = field(default_factory=dict)
    pending: list[tuple[float, str, str, str | None]] = field(default_factory=list)
    """(finish at, plan id, outcome, symptom key healed)."""
    ids: int = 0
    eval_s: float = 0.0
    evaluations: int = 0
    holds: Counter[str] = field(default_factory=Counter)
    started: int = 0
    resolved: int = 0

    def evaluate(self) -> None:
        for _ in range(2):  # an incident opened in this pass is planned in the next, at the same instant
            began = time.perf_counter()
            effects = self.engine.evaluate(self.failing, self.fleet, self.now)
            self.eval_s += time.perf_counter() - began
            self.evaluations += 1
            opened = False
            for effect in effects:
                if isinstance(effect, Opened):
                    self.ids += 1
                    self.engine.bind(effect.key, self.ids)
                    opened = True
                elif isinstance(effect, Started):
                    self.started += 1
                    healed = effect.plan.steps[0].kind != "notify"
                    ok = self.rng.random() < self.success
                    key = self.engine.plan_incident.get(effect.plan.id) if healed else None
                    self.pending.append((self.now + self.plan_s, effect.plan.id, "succeeded" if ok else "failed",
                                         key if ok else None))
                elif isinstance(effect, Held):
                    self.holds[effect.blocking.guard] += 1
                elif isinstance(effect, Resolved):
                    self.resolved += 1
            if not opened:
                return

    def finish_due(self) -> None:
        due = [p for p in self.pending if p[0] <= self.now]
        if not due:
            return
        self.pending = [p for p in self.pending if p[0] > self.now]
        for _, plan_id, outcome, healed in sorted(due):
            self.engine.finish(plan_id, outcome, self.now)
            if healed is not None:
                self.failing.pop(healed, None)

    def disruptive_running(self) -> int:
        return sum(1 for r in self.engine.running.values() if r.disruptive)


def fleet_view(nodes: list[str], units: list[str], group_size: int) -> FleetView:
    return FleetView(groups={n: f"g{i // group_size}" for i, n in enumerate(nodes)},
                     replicas=dict.fromkeys(units, len(nodes)))


def steady_state(*, nodes: int, units: int, ticks: int, failing_share: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    node_names = [f"node-{i:04d}" for i in range(nodes)]
    unit_names = [f"svc-{j}" for j in range(units)]
    everything = [(n, u) for n in node_names for u in unit_names]
    recover = 0.05  # a failing unit comes back by itself with this chance per second (its own restart policy)
    fail = recover * failing_share / (1 - failing_share)  # keeps the failing share near ``failing_share``
    decisions = 0
    planner = reconciler_module.plan_remediation

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal decisions
        decisions += 1
        return planner(*args, **kwargs)  # type: ignore[arg-type]

    reconciler_module.plan_remediation = counted  # type: ignore[assignment]
    try:
        harness = Harness(Reconciler(load_default_rulebook(), Budget(max_concurrent=50)),
                          fleet_view(node_names, unit_names, 50), plan_s=5.0, success=0.8, rng=rng)
        for n, u in rng.sample(everything, int(len(everything) * failing_share)):
            harness.failing[f"unit_exited:{n}/{u}"] = symptom(n, u)
        symptoms_seen = 0
        for _ in range(ticks):
            harness.now += 1.0
            harness.finish_due()
            for key in [k for k in harness.failing if rng.random() < recover]:
                del harness.failing[key]
            for n, u in rng.sample(everything, int(rng.gauss(len(everything) * fail, 2) + 0.5)):
                harness.failing.setdefault(f"unit_exited:{n}/{u}", symptom(n, u))
            symptoms_seen += len(harness.failing)
            harness.evaluate()
    finally:
        reconciler_module.plan_remediation = planner
    return {
        "units": float(len(everything)), "ticks": float(ticks),
        "mean_failing": round(symptoms_seen / ticks, 1),
        "evaluate_calls_per_s": round(harness.evaluations / harness.eval_s, 1),
        "ms_per_evaluate": round(1000 * harness.eval_s / harness.evaluations, 3),
        "decisions_per_s": round(decisions / harness.eval_s, 0),
        "us_per_decision": round(1e6 * harness.eval_s / max(1, decisions), 2),
        "plans_started": float(harness.started), "incidents_resolved": float(harness.resolved),
        **{f"holds_{guard}": float(n) for guard, n in sorted(harness.holds.items())},
    }


def storm(*, failing: int, max_concurrent: int, plan_s: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    node_names = [f"node-{i:04d}" for i in range(1000)]
    harness = Harness(Reconciler(load_default_rulebook(), Budget(max_concurrent=max_concurrent)),
                      fleet_view(node_names, ["svc"], 50), plan_s=plan_s, success=1.0, rng=rng)
    for node in rng.sample(node_names, failing):
        harness.failing[f"unit_exited:{node}/svc"] = symptom(node, "svc")
    peak, step, limit = 0, 0.5, 3600.0
    drained: float | None = None
    while harness.now - START < limit:
        harness.finish_due()
        if not harness.failing and drained is None:
            drained = harness.now - START
        harness.evaluate()
        peak = max(peak, harness.disruptive_running())
        if drained is not None and not harness.engine.incidents:
            break
        harness.now += step
    return {
        "failing": float(failing), "max_concurrent": float(max_concurrent), "plan_s": plan_s,
        "peak_concurrent": float(peak), "drain_s": drained if drained is not None else math.inf,
        "lower_bound_s": math.ceil(failing / max_concurrent) * plan_s,
        "plans": float(harness.started),
        "holds_budget": float(harness.holds["budget"]), "holds_rate_limit": float(harness.holds["rate_limit"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--units", type=int, default=10, help="units per node")
    parser.add_argument("--ticks", type=int, default=300, help="simulated seconds of steady state")
    parser.add_argument("--failing", type=float, default=0.03, help="share of units failing at any time")
    parser.add_argument("--plan-s", type=float, default=10.0, help="simulated duration of one storm plan")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="end with one line holding a JSON object of the figures")
    args = parser.parse_args()

    steady = steady_state(nodes=args.nodes, units=args.units, ticks=args.ticks, failing_share=args.failing,
                          seed=args.seed)
    print(f"steady state: {steady['units']:.0f} units, {steady['mean_failing']:.0f} failing on average, "
          f"{steady['ticks']:.0f} simulated seconds")
    print(f"  evaluate: {steady['evaluate_calls_per_s']:.0f} calls/s ({steady['ms_per_evaluate']:.2f} ms each)")
    print(f"  planner decisions: {steady['decisions_per_s']:.0f}/s ({steady['us_per_decision']:.1f} us each), "
          f"{steady['plans_started']:.0f} plans started, {steady['incidents_resolved']:.0f} incidents resolved")
    holds = ", ".join(f"{k.removeprefix('holds_')} {v:.0f}" for k, v in steady.items() if k.startswith("holds_"))
    print(f"  holds reported (once per incident and reason): {holds or 'none'}")

    storms = [storm(failing=n, max_concurrent=c, plan_s=args.plan_s, seed=args.seed) for n in (20, 200) for c in (3, 5)]
    print(f"restart storm (built-in restart-exited-unit rule, every plan takes {args.plan_s:g} simulated s and heals):")
    for s in storms:
        print(f"  {s['failing']:>4.0f} units at once, max_concurrent {s['max_concurrent']:.0f}: "
              f"peak {s['peak_concurrent']:.0f} concurrent disruptive plans (budget {s['max_concurrent']:.0f}), "
              f"drained in {s['drain_s']:.1f} s (lower bound {s['lower_bound_s']:.0f} s), "
              f"{s['plans']:.0f} plans; holds reported: budget {s['holds_budget']:.0f}, "
              f"rate_limit {s['holds_rate_limit']:.0f}")
    print(ANCHORS)
    if args.json:
        print(json.dumps({"steady_state": steady, "storms": storms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
