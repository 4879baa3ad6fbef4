"""The small protocol every unit kind satisfies, and what a kind is built from.

A unit kind (``process``, ``spark``, ``systemd``, ``docker``) knows
how to start, watch and stop one managed workload. The supervisor holds an
explicit registry ``kind -> UnitFactory`` that is passed in, so adding a kind is
one module plus one registry entry, never import-time registration.

Exits are noticed by ``watch``: a long-lived coroutine the supervisor runs in
its task group, one per unit, that returns after ``close``. Events (exits,
starts) go out through the ``emit`` callback of the ``UnitContext``; the
agent decides how they reach the controller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from selfheal.clocks import Clock
from selfheal.config import UnitConfig
from selfheal.wire import EventBody, UnitReport, UnitStateName

UnitState = UnitStateName
Emit = Callable[[EventBody], None]


@dataclass(frozen=True, slots=True)
class UnitContext:
    """What every unit kind gets from the agent besides its own config."""

    node_id: str
    state_dir: Path
    """The agent's state dir: default working directory; unit logs go to ``logs/<unit>.log`` under it."""
    emit: Emit
    """Called (synchronously, never blocking) with UnitStarted / UnitExited events."""
    clock: Clock


class Unit(Protocol):
    """One managed workload on this node."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def state(self) -> UnitState: ...

    @property
    def pid(self) -> int | None:
        """The main process id while the unit runs, else None."""
        ...

    async def start(self) -> None:
        """Start it; raises ``UnitError`` (and the state becomes ``failed``) when it cannot start."""
        ...

    async def stop(self, grace: float | None = None) -> None:
        """Stop it (graceful, then forced after ``grace`` seconds); a no-op when not running."""
        ...

    async def restart(self) -> None:
        """Stop, then start; counts a restart. Raises ``UnitError`` when the start fails."""
        ...

    async def watch(self) -> None:
        """Notice every exit as it happens and emit it; returns once ``close`` was called."""
        ...

    def kill(self) -> None:
        """Last resort, synchronous: force-kill whatever still runs (abnormal teardown only)."""
        ...

    def close(self) -> None:
        """Tell ``watch`` to return once the current run (if any) has ended."""
        ...

    def report(self) -> UnitReport:
        """The unit's state for the periodic report (process metrics and probe left empty)."""
        ...


UnitFactory = Callable[[UnitConfig, UnitContext], Unit]
