"""Agent-local fallback: restart crashed or hung units while no controller listens.

The controller decides every remediation, so a controller that is down — or
a broker this agent cannot reach — would leave a crashed unit down for as
long as the outage lasts. Once this agent has heard no controller for
``fallback_after`` seconds (``fallback_delay``: by default 1.5 times the MQTT
keep-alive, when the broker gives up on a silent controller and publishes its
last will, plus three report intervals, so a controller that merely restarts
is waited for), it restarts its own units on a small ladder:

- **restarts only**, and only of units that should be running here and are
  not well: ``exited``/``failed`` (crashed, or could not start; a scheduled
  run that ended 0 is ``completed``, not crashed) or running with a probe
  that failed ``failures`` times in a row in this run (hung). Never a unit
  stopped on purpose (by the controller, or a standby copy: ``stopped``),
  never one this agent fenced, never a movable singleton while the broker is
  away (fencing, ``agent.fencing``, owns those: the controller may be
  starting its standby elsewhere). Nothing is migrated, resynced or started
  fresh;
- **with backoff**: the first restart at once, the next 2, 4, 8 … up to 60
  seconds after the previous one; at most ``fallback_max_restarts`` within
  ``fallback_window`` seconds, then it gives up on that unit (logged once)
  and leaves it down until a controller is back;
- **never against the controller**: while one is present it does nothing.

Each action is recorded in the ledger under its own key (``agent.ledger``)
and goes out as a ``LocalAction`` event once a controller is present again,
after the unit events of the outage; the controller adopts it into the
unit's incident and counts it as an attempt (``controller.effects``), so it
does not restart the unit again. What a stopped agent had not reported yet,
its next run sends. ``fallback = false`` turns the acting off (what is in the
ledger is still reported).

``Ladder`` is the pure decision (monotonic time passed in); ``Fallback`` is
the loop that reads the units, acts, records and reports.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Set
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal, Protocol

from agent.ledger import Ledger, LocalEntry
from selfheal.clocks import Clock
from selfheal.config import Config
from selfheal.errors import StoreError, UnitError
from selfheal.logs import RateLimiter, get_logger
from selfheal.wire import EventBody, LocalAction, UnitReport, crash_of

CHECK_EVERY = 0.5
"""Seconds between looks at the controller's presence and the units."""
BACKOFF_BASE = 2.0
"""Seconds before the second local restart of a unit within the window; doubled for each one after."""
BACKOFF_MAX = 60.0


def fallback_delay(config: Config) -> float:
    """Seconds without a controller before this agent acts on its own (``agent.fallback_after``, or its default)."""
    agent = config.agent
    if agent.fallback_after is not None:
        return agent.fallback_after
    return 1.5 * config.mqtt.keepalive + 3 * agent.interval


@dataclass(frozen=True, slots=True)
class Policy:
    after: float
    """Seconds without a controller before acting."""
    max_restarts: int = 5
    window: float = 600.0

    @classmethod
    def of(cls, config: Config) -> Policy:
        return cls(after=fallback_delay(config), max_restarts=config.agent.fallback_max_restarts,
                   window=config.agent.fallback_window)

    @staticmethod
    def delay(n: int) -> float:
        """Seconds from the previous local restart to the ``n``-th within the window (the first waits for none)."""
        return 0.0 if n <= 1 else min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (n - 2))


@dataclass(frozen=True, slots=True)
class Restart:
    unit: str
    attempt: int
    """The how-manyth local restart of the unit within the window."""
    reason: str
    """The finding kind the controller would see: ``unit_exited`` or ``probe_failing``."""
    detail: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    unit: str
    restarts: int
    detail: str


@dataclass(frozen=True, slots=True)
class Skip:
    unit: str
    why: str


Decision = Restart | GiveUp | Skip


def problem_of(unit: UnitReport) -> tuple[str, str] | None:
    """Why ``unit`` wants a restart — (finding kind, how) — or None when it is well or stopped on purpose."""
    if (how := crash_of(unit)) is not None:  # the controller's rule: a finished scheduled run is no crash
        return "unit_exited", f"was {how}" if how.startswith("killed") else how
    probe = unit.probe
    if unit.state == "running" and probe is not None and probe.checked_at >= unit.started_at \
            and probe.failures_threshold > 0 and probe.consecutive_failures >= probe.failures_threshold:
        return "probe_failing", (f"{probe.kind} probe failed {probe.consecutive_failures} times in a row: "
                                 f"{probe.last_error or 'unhealthy'}")
    return None


class Ladder:
    """Which units to restart now (pure: ``now`` is monotonic seconds, passed in); see the module docstring."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.restarts: dict[str, deque[float]] = {}
        """Unit → when it was restarted locally, within the window."""
        self.given_up: set[str] = set()
        """Units left down after ``max_restarts`` within the window, until a controller is back."""

    def decide(self, units: Iterable[UnitReport], now: float, *, fenced: Set[str], movable: Set[str],
               connected: bool) -> list[Decision]:
        """What to do about each unit that wants a restart; ``connected``: to the broker."""
        decisions: list[Decision] = []
        for unit in units:
            problem = problem_of(unit)
            if problem is None or unit.name in self.given_up:
                continue
            reason, how = problem
            if unit.name in fenced or unit.fenced:
                decisions.append(Skip(unit.name, "fenced: only the controller starts it again"))
                continue
            if unit.name in movable and not connected:
                decisions.append(Skip(unit.name, "a movable singleton without the broker: its standby may be "
                                                 "starting elsewhere"))
                continue
            recent = self._recent(unit.name, now)
            n = len(recent) + 1
            if n > self.policy.max_restarts:
                self.given_up.add(unit.name)
                decisions.append(GiveUp(unit.name, len(recent), how))
            elif not recent or now >= recent[-1] + self.policy.delay(n):
                decisions.append(Restart(unit.name, n, reason, how))
        return decisions

    def restarted(self, unit: str, now: float) -> None:
        """A local restart of ``unit`` was tried at ``now`` (it counts whether the unit started or not)."""
        self.restarts.setdefault(unit, deque()).append(now)

    def controller_back(self) -> None:
        """A controller is present: it decides about the units given up on; the window still counts."""
        self.given_up.clear()

    def _recent(self, unit: str, now: float) -> deque[float]:
        times = self.restarts.get(unit, deque())
        while times and times[0] <= now - self.policy.window:
            times.popleft()
        return times


class LocalUnits(Protocol):
    """What the fallback needs of the supervisor (``agent.supervisor.Supervisor``)."""

    fenced: set[str]
    fence_after: dict[str, float]
    """The movable singletons."""
    stopping: bool

    def reports(self) -> list[UnitReport]: ...
    async def restart(self, name: str) -> object: ...


class Fallback:
    """The loop: watch the controller's presence, act on the ladder's decisions, record and report them."""

    def __init__(self, *, node_id: str, session: int, policy: Policy, enabled: bool, units: LocalUnits,
                 ledger: Ledger, clock: Clock, emit: Callable[[EventBody], None], present: Callable[[], bool],
                 connected: Callable[[], bool]) -> None:
        self.node_id = node_id
        self.session = session
        self.policy = policy
        self.enabled = enabled
        self.units = units
        self.ledger = ledger
        self.clock = clock
        self.emit = emit
        self.present = present
        """A controller listens: connected to the broker, and its last status said ``online``."""
        self.connected = connected
        self.ladder = Ladder(policy)
        self.away_since: float | None = clock.monotonic()
        """Monotonic time since which no controller is present (from this agent's start until one is heard)."""
        self.unreported: list[LocalAction] = []
        """Actions no controller has been sent yet, oldest first."""
        self.counts: Counter[str] = Counter()
        """restarts, failed (restarts that did not start the unit), gave_up, reported, errors."""
        self.acting = asyncio.Lock()
        """Held while a unit is acted on — by a local restart, or by a controller's command (``agent.app``): a
        command sent just before the controller went away may still be running, and the two must not overlap."""
        self._seq = 0
        self._skips = RateLimiter(period=policy.window)
        self.log = get_logger("agent.fallback", node=node_id)

    async def run(self, *, stop: asyncio.Event) -> None:
        try:
            entries = await asyncio.to_thread(self.ledger.unreported_local)
        except StoreError as exc:
            self.log.error("fallback.ledger_failed", stage="read", error=str(exc))  # noqa: TRY400 - it says it all
            entries = []
        self.unreported = [_action(entry) for entry in entries] + self.unreported
        while not stop.is_set():
            try:
                await self.step()
            except Exception:  # one bad round must not end the fallback (nor the agent)
                self.counts["errors"] += 1
                self.log.exception("fallback.step_failed")
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_EVERY)

    async def step(self) -> None:
        """One look: report to a present controller, or act on the units once it has been away long enough."""
        now = self.clock.monotonic()
        if self.present():
            if self.away_since is not None:
                self.away_since = None
                self.ladder.controller_back()
            if self.unreported:
                await self._report()
            return
        if self.away_since is None:
            self.away_since = now
        if self.units.stopping or now - self.away_since < self.policy.after:
            return
        if not self.enabled:
            for unit in self.units.reports():
                if (problem := problem_of(unit)) is not None and self._skips.allow(unit.name, "off", now):
                    self.log.warning("fallback.off", unit=unit.name, problem=problem[1],
                                     controller_away_s=round(now - self.away_since, 1),
                                     effect="left down until a controller is back (agent.fallback = false)")
            return
        decisions = self.ladder.decide(self.units.reports(), now, fenced=self.units.fenced,
                                       movable=self.units.fence_after.keys(), connected=self.connected())
        for decision in decisions:
            if isinstance(decision, Restart):
                await self._restart(decision, away=now - self.away_since)
            elif isinstance(decision, GiveUp):
                self.counts["gave_up"] += 1
                self.log.error("fallback.gave_up", unit=decision.unit, restarts=decision.restarts,
                               window_s=self.policy.window, problem=decision.detail,
                               effect="left down until a controller is back")
            elif self._skips.allow(decision.unit, decision.why, now):
                self.log.warning("fallback.skipped", unit=decision.unit, why=decision.why)

    async def _restart(self, decision: Restart, *, away: float) -> None:
        async with self.acting:
            # Decided before a command in hand ended, perhaps: act only if it still holds.
            current = next((u for u in self.units.reports() if u.name == decision.unit), None)
            if current is None or problem_of(current) is None or self.present() or self.units.stopping:
                return
            await self._restart_now(decision, away=away)

    async def _restart_now(self, decision: Restart, *, away: float) -> None:
        self.ladder.restarted(decision.unit, self.clock.monotonic())
        status: Literal["done", "failed"] = "done"
        detail = decision.detail
        try:
            await self.units.restart(decision.unit)
        except UnitError as exc:
            status, detail = "failed", f"{decision.detail}; the restart failed: {exc}"
        self.counts["restarts" if status == "done" else "failed"] += 1
        self._seq += 1
        key = hashlib.sha256(f"{self.node_id}|{self.session}|{decision.unit}|{self._seq}".encode()).hexdigest()[:32]
        action = LocalAction(unit=decision.unit, key=key, attempt=decision.attempt, reason=decision.reason,
                             status=status, detail=detail[:1000], ts=self.clock.wall())
        self.log.warning("fallback.restarted", unit=decision.unit, attempt=decision.attempt, reason=decision.reason,
                         status=status, detail=action.detail, controller_away_s=round(away, 1), key=key)
        try:
            await asyncio.to_thread(self.ledger.record_local, _entry(action))
        except StoreError as exc:  # the restart stands; it is still reported, from memory
            self.log.error("fallback.ledger_failed", stage="record", key=key, error=str(exc))  # noqa: TRY400
        self.unreported.append(action)

    async def _report(self) -> None:
        """Send every unreported action (held by the link until the controller listens), then mark them sent."""
        actions, self.unreported = self.unreported, []
        for action in actions:
            self.emit(action)
        self.counts["reported"] += len(actions)
        self.log.info("fallback.reported", actions=len(actions), units=sorted({a.unit for a in actions}))
        try:
            await asyncio.to_thread(self.ledger.mark_reported, [a.key for a in actions])
        except StoreError as exc:  # the next run sends them again: the controller adopts a key once
            self.log.error("fallback.ledger_failed", stage="mark_reported", error=str(exc))  # noqa: TRY400


def _entry(action: LocalAction) -> LocalEntry:
    return LocalEntry(key=action.key, unit=action.unit, action=action.action, attempt=action.attempt,
                      reason=action.reason, status=action.status, detail=action.detail, at=action.ts)


def _action(entry: LocalEntry) -> LocalAction:
    return LocalAction(unit=entry.unit, key=entry.key, attempt=entry.attempt, reason=entry.reason,
                       status="failed" if entry.status == "failed" else "done", detail=entry.detail, ts=entry.at)
