"""Injected time, and a wall clock that does not jump.

``Clock.wall()`` gives the timestamps on the wire, in the store and in the
API; ``Clock.monotonic()`` (the loop's clock) measures intervals inside one
process. Much of selfheal also measures durations as differences of wall
timestamps — a node silent since its ``last_seen``, a cooldown since the last
attempt, a migration's fence wait, an approval or a command that runs out at a
wall time — so the wall clock it is given must not jump.

The system's wall clock does jump: ``date -s``, an NTP step, a VM restored
from a snapshot move it by minutes at once. Taken as it comes, a step forward
makes every node look silent (presence, and the fence wait that keeps a
movable unit to one copy) and lifts every cooldown and backoff together; a
step back stretches them all by its size, and lets an agent run a command
that has expired. So ``SystemClock.wall()`` is the system's wall clock with
its steps taken out: it reckons from ``CLOCK_BOOTTIME`` (monotonic, and it
counts a suspend, after which the wall clock is rightly ahead) and follows
the system's wall clock at no more than ``SLEW`` (1 %) of the time elapsed.
An NTP slew (0.05 % at most) is followed as it comes; a step is worked off
gradually (five minutes in about eight hours); every duration measured
meanwhile is within 1 % of the truth, inside the margins of every timeout
selfheal keeps. A step over an hour (``ADOPT``) is taken at once: that clock
was wrong, not stepped (a host booted without a real-time clock). A step is
logged once (``clock.stepped``); ``offset`` says how far the system's clock
is from this one.

What it cannot know is which clock was right. A process started after a
step starts from the stepped clock, and one that keeps running follows a
clock left wrong, slowly: a controller whose clock stays minutes behind will,
once it has followed it, have its commands refused as expired (the safe
side; each refusal says by how much). Within one process, and between hosts
that were in step when their daemons started, time stays right. The agent's
executor also bounds command expiry by the controller's own clock
(``agent.executor``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from selfheal.logs import get_logger

SLEW = 0.01
"""How fast ``SystemClock`` follows the system's wall clock: at most this share of the time elapsed."""
STEP = 1.0
"""Seconds: a jump of the system's wall clock this large between two readings is logged as a step."""
ADOPT = 3600.0
"""Seconds: a step this large is taken at once, not worked off: the clock was wrong, not stepped by minutes (a host
that booted without a real-time clock and was set right by NTP after selfheal started would otherwise keep the
wrong time for months, and its commands or reports would be refused as expired)."""


class Clock(Protocol):
    def wall(self) -> float:
        """Seconds since the epoch (UTC), never jumping (see the module docstring)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)  # Linux; elsewhere a suspend looks like a step


def _boottime() -> float:
    return time.clock_gettime(_BOOTTIME)


class SystemClock:
    """The system's clocks, its wall clock's steps taken out (see the module docstring)."""

    def __init__(self, *, system: Callable[[], float] = time.time, elapsed: Callable[[], float] = _boottime,
                 monotonic: Callable[[], float] = time.monotonic, slew: float = SLEW) -> None:
        """``system``: the wall clock to follow; ``elapsed``: the clock to reckon from; ``monotonic``: the
        loop's clock (tests pass their own)."""
        self._system = system
        self._elapsed = elapsed
        self._monotonic = monotonic
        self._slew = slew
        self._lock = threading.Lock()
        self._at = elapsed()
        self._base = system() - self._at
        """This wall clock minus the clock it reckons from: changed only to follow the system's, so that
        rounding never accumulates."""
        self.offset = 0.0
        """The system's wall clock minus this one: what is left of past steps."""
        self.steps = 0
        """Steps of the system's wall clock noticed since start."""

    def wall(self) -> float:
        with self._lock:
            system, elapsed = self._system(), self._elapsed()
            passed = max(0.0, elapsed - self._at)
            gap = system - (elapsed + self._base)
            if abs(gap - self.offset) > STEP:
                self.steps += 1
                get_logger("clock").warning(
                    "clock.stepped", step_s=round(gap - self.offset, 3), offset_s=round(gap, 3),
                    detail=f"the system's wall clock jumped; selfheal keeps its own time and follows the "
                           f"system's at {self._slew:.0%} of the time elapsed")
            allowed = math.inf if abs(gap) > ADOPT else self._slew * passed
            self._base += max(-allowed, min(allowed, gap))
            self._at = elapsed
            wall = elapsed + self._base
            self.offset = system - wall
            return wall

    def monotonic(self) -> float:
        return self._monotonic()


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, wall: float = 1_700_000_000.0) -> None:
        self._wall = wall
        self._mono = 0.0

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds

    def step(self, seconds: float) -> None:
        """Jump the wall clock alone, as ``date -s`` or an NTP step does (wrap it in a ``SystemClock`` to
        see what selfheal makes of it)."""
        self._wall += seconds


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC for the API, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")
