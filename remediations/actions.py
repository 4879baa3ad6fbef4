"""The closed set of remediation actions, and everything each one means, in one table.

A rule's ladder names an action (``restart``); the planner turns it into plan
steps (``plans.RestartUnit``); the dispatcher sends agents wire commands
(``wire.RestartUnit``, tag ``restart_unit``) and the agent's executor runs
them. Each layer used to spell the action its own way and keep its own list
of which actions disrupt; a new action could be accepted by the rules and
then silently do nothing. Now every layer reads ``ACTIONS``:

- rules: ``rules.model.RungAction`` is ``ActionName``; the schema's enum is ``list(ACTIONS)``;
- planner: whether a rung needs a unit, whether it passes the exclusivity, pause and budget guards, which
  verification its plan gets, and the steps (one ``match`` over ``ActionName``);
- reconciler and engine: ``action_of(plan).disruptive`` says whether a plan holds a share of the budget;
- dispatcher: re-checks the symptom before a disruptive plan acts, runs each plan step (exhaustively over
  ``plans.Step``) and maps unit steps to wire commands with ``unit_command``;
- agent: ``agent.executor`` runs each ``wire.CommandStep`` (the agent imports only the kernel, so it
  dispatches on the wire's closed union, not on this table).

Dispatch is exhaustive everywhere (``typing.assert_never``): adding an action means a name in
``ActionName`` and an entry here, its case in the planner, a plan step and its dispatcher branch if it
needs a new one, a wire command and its agent branch if it acts on a node, and its case in
``tests/unit/test_action_registry.py``, which runs every action from rule to agent. mypy points at any
branch missing; the test at any entry that says what the code does not do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, assert_never

from remediations.plans import MigrateUnit, Notify, Plan, RestartUnit, ResyncDataset, StartUnit, Step, StopUnit
from selfheal import wire

ActionName = Literal["restart", "stop_start", "migrate", "resync", "notify", "none"]
Verify = Literal["rule", "cleared", "escalated", "nothing"]
"""How an action's plan is verified:

- ``rule``: the rule's ``verify`` on the node the unit ends up on — ``healthy`` (a new run, running, its
  probe passing) or ``cleared`` (the finding no longer holds) — within ``verify_within``, for ``stable_for``;
- ``cleared``: the finding no longer holds (a replica digests to the authority's root again), whatever the
  rule says, since there is no unit to watch;
- ``escalated``: not verified — a human was told, the plan ends ``escalated`` and selfheal leaves the
  incident alone;
- ``nothing``: the action makes no plan.
"""


@dataclass(frozen=True, slots=True)
class Action:
    name: ActionName
    steps: tuple[type[Step], ...]
    """The plan steps the planner makes, in order; the first one names the action in a plan (``action_of``)."""
    commands: tuple[type[wire.CommandStep], ...]
    """The wire commands the dispatcher sends agents, in order; empty when it acts on no node."""
    disruptive: bool
    """It stops or replaces a running workload: the symptom is re-checked just before it acts, it must pass
    the exclusivity, pause and disruption-budget guards, and it holds a share of the budget while it runs.
    An action that disrupts nothing (paging a human) also needs no human's approval."""
    needs_unit: bool
    """The rung is skipped for a finding that names no unit."""
    verify: Verify
    summary: str


ACTIONS: Mapping[ActionName, Action] = {action.name: action for action in (
    Action("restart", (RestartUnit,), (wire.RestartUnit,), disruptive=True, needs_unit=True, verify="rule",
           summary="restart the unit on its node (stop with grace, then start)"),
    Action("stop_start", (StopUnit, StartUnit), (wire.StopUnit, wire.StartUnit), disruptive=True,
           needs_unit=True, verify="rule", summary="stop the unit, then start it"),
    Action("migrate", (MigrateUnit,), (wire.StopUnit, wire.StartUnit), disruptive=True, needs_unit=True,
           verify="rule", summary="stop the unit on its node (when reachable, else wait out its fence) and "
                                  "start it on a healthy standby node"),
    Action("resync", (ResyncDataset,), (wire.ResyncDataset,), disruptive=True, needs_unit=False,
           verify="cleared", summary="repair a dataset replica from a peer that verifies against the authority"),
    Action("notify", (Notify,), (), disruptive=False, needs_unit=False, verify="escalated",
           summary="tell a human; the ladder ends here"),
    Action("none", (), (), disruptive=False, needs_unit=False, verify="nothing",
           summary="do nothing (the incident is recorded and resolves by itself)"),
)}
"""Every action a rule may name, in the order the docs list them."""

_BY_NAME: Mapping[str, Action] = {a.name: a for a in ACTIONS.values()}
_BY_FIRST_STEP: Mapping[type[Step], Action] = {a.steps[0]: a for a in ACTIONS.values() if a.steps}


def named(name: str) -> Action:
    """The action a rung names; a clear error for a name outside the registry (the loader's schema
    rejects those first, so this is a rule built by hand)."""
    action = _BY_NAME.get(name)
    if action is None:
        raise ValueError(f"unknown remediation action {name!r} (known: {', '.join(ACTIONS)})")
    return action


def action_of(plan: Plan) -> Action:
    """The action ``plan`` carries out, from its first step (each action's first step is its own)."""
    if not plan.steps:
        return ACTIONS["none"]
    action = _BY_FIRST_STEP.get(type(plan.steps[0]))
    if action is None:
        raise ValueError(f"plan {plan.id} starts with {plan.steps[0].kind}, which begins no action")
    return action


def unit_command(step: RestartUnit | StopUnit | StartUnit) -> wire.CommandStep:
    """The wire command an agent runs for a plan step on one of its units."""
    if isinstance(step, RestartUnit):
        return wire.RestartUnit(unit=step.unit)
    if isinstance(step, StopUnit):
        return wire.StopUnit(unit=step.unit)
    if isinstance(step, StartUnit):
        return wire.StartUnit(unit=step.unit)
    assert_never(step)
