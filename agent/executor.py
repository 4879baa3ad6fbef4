"""The command executor: decides whether a controller command may run, runs it, says how it went.

A command runs only when it is authentic (HMAC with this node's key from
``security.key_dir``; no key file means every command is refused), addressed
to this node, not expired (below) and not from a stale epoch (lower than the
highest epoch accepted so far: a controller that lost its lease must not act; the highest epoch is kept in the
ledger, so a restarted agent still refuses an older controller). Each idempotency ``key`` runs at
most once, across agent restarts too (``agent.ledger``); a repeat is answered
``duplicate`` with the original outcome as ``"<status>: <detail>"``.

Order matters: authenticity first (a forged command learns nothing, not even
whether its key was used), then the ledger (a late redelivery of a command
that ran gets its outcome back, even if it has expired since), then freshness.
Rejected commands are not recorded, so a forged key cannot block a real one.

Expiry. ``expires_at`` is the controller's wall clock plus ``command_ttl``;
the agent compares it with the later of two clocks, so that no command runs
that has truly expired, even on a node whose clock went back:

- its own wall clock (``selfheal.clocks.SystemClock``: steps taken out, so a
  step back while the agent runs changes nothing);
- the controller's clock as the agent has seen it (``IssuerClock``): the
  ``issued_at`` of the latest authentic command of the newest epoch, carried
  forward by this host's monotonic clock. A controller never issues a command
  before its own ``issued_at`` and a message only arrives late, so this never
  runs ahead of the controller's clock — it covers a node whose clock was
  behind when the agent started (a step back before it, a dead RTC).

A node whose clock is ahead of the controller's refuses even fresh commands:
that is the safe side, and its ack says how far ahead its clock looks.

The checks are pure functions; ``CommandExecutor`` is the thin edge that
reads the clock, talks to the ledger off the loop and calls the supervisor.
It has one branch per command of the wire's closed ``CommandStep`` union
(mypy rejects a missing one); which remediation action sends which command is
``remediations.actions`` on the controller's side.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Literal, NamedTuple, Protocol, assert_never

from agent.ledger import RUNNING, Ledger
from selfheal.clocks import SLEW, Clock
from selfheal.errors import StoreError, UnitError
from selfheal.logs import RateLimiter, get_logger
from selfheal.wire import Command, CommandResult, RestartUnit, ResyncDataset, StartUnit, StopUnit, verify_command
from selfheal.write_failures import failure_reason

Status = Literal["done", "failed", "rejected", "duplicate"]


class UnitControl(Protocol):
    """What the executor needs from the supervisor."""

    async def restart(self, name: str) -> object: ...
    async def stop(self, name: str) -> object: ...
    async def start(self, name: str) -> object: ...


class DatasetRepair(Protocol):
    """What the executor needs from the resync puller (``agent.resync``)."""

    async def resync(self, step: ResyncDataset) -> tuple[Literal["done", "failed"], str]: ...


class Rejection(NamedTuple):
    reason: str
    """Short fixed label: counts and rate-limits logs."""
    detail: str
    """What the ack says."""


def check_authentic(command: Command, *, node_id: str, key: bytes | None) -> Rejection | None:
    """Why ``command`` is not a genuine command for this node, or None."""
    if key is None:
        return Rejection("no_key", f"no command key for node {node_id!r} in security.key_dir: "
                                   "this agent refuses every command")
    if not command.sig:
        return Rejection("unsigned", "unsigned command")
    if not verify_command(command, key):
        return Rejection("bad_signature", "bad signature")
    if command.node != node_id:
        return Rejection("wrong_node", f"addressed to node {command.node[:64]!r}, this is {node_id!r}")
    return None


def check_fresh(command: Command, *, now: float, highest_epoch: int) -> Rejection | None:
    """Why a genuine ``command`` must not run any more, or None."""
    if command.expires_at < now:
        return Rejection("expired", f"expired {now - command.expires_at:.3f}s ago (issued "
                                    f"{now - command.issued_at:.3f}s ago, valid for "
                                    f"{command.expires_at - command.issued_at:g}s; if it was just sent, "
                                    "this node's clock is ahead of the controller's)")
    if command.epoch < highest_epoch:
        return Rejection("stale_epoch", f"stale epoch {command.epoch} < {highest_epoch}")
    return None


class IssuerClock:
    """The controller's clock as this agent has seen it (see the module docstring): a lower bound of it.

    It is carried forward at ``1 - SLEW`` of the monotonic time elapsed, since the controller's own wall
    clock may run that much slower while it works off a step of its system clock (``selfheal.clocks``)."""

    def __init__(self) -> None:
        self.epoch = -1
        self._issued = -math.inf
        self._at = 0.0

    def witness(self, command: Command, mono: float) -> None:
        """An authentic ``command`` arrived at ``mono`` (monotonic seconds)."""
        if command.epoch > self.epoch:  # a new controller run: its clock may be behind the last one's
            self.epoch, self._issued, self._at = command.epoch, command.issued_at, mono
        elif command.epoch == self.epoch and command.issued_at > self.now(command.epoch, mono):
            self._issued, self._at = command.issued_at, mono

    def now(self, epoch: int, mono: float) -> float:
        """The least the controller of ``epoch`` can read now (``-inf``: unknown, another epoch)."""
        if epoch != self.epoch:
            return -math.inf
        return self._issued + (1 - SLEW) * max(0.0, mono - self._at)


class CommandExecutor:
    """Executes commands addressed to this node; see the module docstring."""

    def __init__(self, *, node_id: str, key: bytes | None, ledger: Ledger, units: UnitControl,
                 clock: Clock, limiter: RateLimiter | None = None, datasets: DatasetRepair | None = None) -> None:
        self.node_id = node_id
        self.key = key
        self.ledger = ledger
        self.units = units
        self.datasets = datasets
        self.clock = clock
        self.highest_epoch = ledger.highest_epoch
        """The highest epoch accepted, across restarts (the ledger persists it with each claim)."""
        self.issuer = IssuerClock()
        self.counts: Counter[str] = Counter()
        """Outcomes by status (done, failed, rejected, duplicate)."""
        self.rejections: Counter[str] = Counter()
        """Rejections by reason label (no_key, unsigned, bad_signature, wrong_node, expired, stale_epoch)."""
        self.limiter = limiter or RateLimiter(period=60.0)
        self.log = get_logger("agent.executor", node=node_id)

    async def execute(self, command: Command) -> CommandResult:
        """Decide, run if allowed, record; always returns the result to ack."""
        rejection = check_authentic(command, node_id=self.node_id, key=self.key)
        if rejection is not None:
            return self._reject(command, rejection)
        self.issuer.witness(command, self.clock.monotonic())
        try:
            earlier = await asyncio.to_thread(self.ledger.get, command.key)
            if earlier is not None:
                return self._duplicate(command, earlier.status, earlier.detail)
            now = max(self.clock.wall(), self.issuer.now(command.epoch, self.clock.monotonic()))
            rejection = check_fresh(command, now=now, highest_epoch=self.highest_epoch)
            if rejection is not None:
                return self._reject(command, rejection)
            earlier = await asyncio.to_thread(self.ledger.claim, command.key, command.id, self.clock.wall(),
                                              command.epoch)
        except StoreError as exc:  # unrecorded, it could run twice: at most once means not now
            self._ledger_failed(command, "claim", exc)
            return self._result(command, "failed", f"not run: {exc}")
        if earlier is not None:
            return self._duplicate(command, earlier.status, earlier.detail)
        self.highest_epoch = max(self.highest_epoch, command.epoch)
        status, detail = await self._run(command)
        try:
            await asyncio.to_thread(self.ledger.finish, command.key, status, detail, self.clock.wall())
        except StoreError as exc:
            # The outcome stands (the step ran); the claim stays "running", so a repeat is still refused.
            self._ledger_failed(command, "finish", exc)
        return self._result(command, status, detail)

    def _ledger_failed(self, command: Command, stage: Literal["claim", "finish"], exc: StoreError) -> None:
        """``claim``: the command was not run; ``finish``: it ran, its outcome is not recorded."""
        self.log.error("command.ledger_failed", command_id=command.id, key=command.key, stage=stage,
                       reason=failure_reason(exc.__cause__ or exc), error=str(exc))

    async def _run(self, command: Command) -> tuple[Status, str]:
        step = command.step
        try:
            if isinstance(step, RestartUnit):
                unit = await self.units.restart(step.unit)
                verb = "restarted"
            elif isinstance(step, StopUnit):
                unit = await self.units.stop(step.unit)
                return "done", f"stopped unit {step.unit!r}"
            elif isinstance(step, StartUnit):
                unit = await self.units.start(step.unit)
                verb = "started"
            elif isinstance(step, ResyncDataset):
                if self.datasets is None:
                    return "failed", "this agent holds no datasets"
                return await self.datasets.resync(step)
            else:
                assert_never(step)
        except UnitError as exc:
            return "failed", str(exc)
        pid = getattr(unit, "pid", None)
        return "done", f"{verb} unit {step.unit!r}" + (f" (pid {pid})" if pid else "")

    def _reject(self, command: Command, rejection: Rejection) -> CommandResult:
        self.rejections[rejection.reason] += 1
        if self.limiter.allow("commands", rejection.reason, self.clock.monotonic()):
            self.log.warning("command.rejected", command_id=command.id[:64], key=command.key[:128],
                             reason=rejection.reason, detail=rejection.detail,
                             suppressed_so_far=self.limiter.suppressed)
        return self._result(command, "rejected", rejection.detail)

    def _duplicate(self, command: Command, status: str, detail: str) -> CommandResult:
        if status == RUNNING:
            status, detail = "failed", "interrupted: the agent stopped while executing it"
        return self._result(command, "duplicate", f"{status}: {detail}")

    def _result(self, command: Command, status: Status, detail: str) -> CommandResult:
        self.counts[status] += 1
        if status != "rejected":
            self.log.info("command.result", command_id=command.id, key=command.key, status=status,
                          detail=detail)
        return CommandResult(command_id=command.id, key=command.key, status=status, detail=detail)
