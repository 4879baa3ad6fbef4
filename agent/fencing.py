"""Self-fencing of movable singletons: stop them when this node loses the broker.

A unit with ``stop_after_disconnect = S`` may run on one node at a time, and
the controller may start its standby copy elsewhere when this node becomes
unreachable. That is only safe if the copy here is surely stopped by then, so
this agent promises (the way Nomad's ``stop_after_client_disconnect`` and a
Pacemaker node without quorum do):

- out of contact with the broker for S seconds, it stops the unit and marks it
  ``fenced``: it stays stopped, across agent restarts, until the controller
  sends ``start_unit``;
- the contact time survives the agent (``<state_dir>/contact``, touched with
  every report sent): an agent that comes back after more than S seconds away
  fences the unit instead of starting it;
- the unit's process dies with the agent (``PR_SET_PDEATHSIG``, set by the
  ``process`` kind), so a dead agent leaves no copy running.

Each report carries ``fence_after``: the seconds after the controller last
heard this node by which the unit is surely stopped. It covers the partition
going unnoticed for up to two keep-alives, S itself, the unit's stop grace and
a report interval (``fence_after`` below). Under systemd's watchdog it also
covers a wedged agent, which cannot fence anything: systemd kills it and its
units (``KillMode=control-group``) within ``WatchdogSec`` + ``TimeoutAbortSec``
(10 s in the shipped unit) of its last ping. Without systemd, an agent frozen
(not dead) for longer than ``fence_after`` breaks the promise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from pathlib import Path

from selfheal.clocks import Clock
from selfheal.config import UnitConfig

CHECK_EVERY = 0.5
"""Seconds between looks at the connection while units could need fencing."""
SLACK = 2.0
"""Seconds for the MQTT client's own keep-alive check and this loop's period."""
WATCHDOG_ABORT = 10.0
"""``TimeoutAbortSec`` of the shipped agent unit: how long systemd waits before SIGKILL after a missed ping."""


def fence_after(unit: UnitConfig, *, keepalive: float, interval: float,
                watchdog: float | None = None) -> float | None:
    """Seconds after this node was last heard by which ``unit`` is surely stopped (None: not movable).

    ``watchdog``: systemd's ``WatchdogSec`` when the agent runs under it (twice ``sdnotify.watchdog_period``)."""
    if unit.stop_after_disconnect is None:
        return None
    lost = unit.stop_after_disconnect + 2 * keepalive + interval + unit.stop_grace + SLACK
    wedged = watchdog + WATCHDOG_ABORT + SLACK if watchdog is not None else 0.0
    return max(lost, wedged)


class Contact:
    """When this agent last had the broker; the time outlives the agent in ``path``."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self.clock = clock
        self.lost_at: float | None = None
        """Wall time contact was lost (None while connected)."""

    def load(self) -> None:
        """At start (blocking): out of contact since the last report a previous run sent, if any."""
        now = self.clock.wall()
        try:
            recorded = self.path.stat().st_mtime
        except OSError:
            self.lost_at = now  # never in contact: the clock starts now
            return
        # A time ahead of now: the wall clock went back while the agent was down. Counting from then would
        # fence late (two copies, once the controller starts the standby); from now is the nearest safe guess.
        self.lost_at = min(recorded, now)

    def seen(self) -> None:
        """A report went out to the broker (blocking: touches the file)."""
        self.lost_at = None
        self.path.touch()

    def observe(self, connected: bool) -> None:
        if not connected and self.lost_at is None:
            self.lost_at = self.clock.wall()

    def out_of_contact_for(self) -> float:
        return 0.0 if self.lost_at is None else max(0.0, self.clock.wall() - self.lost_at)


async def run_fencing(contact: Contact, units: Iterable[UnitConfig], *, connected: asyncio.Event,
                      is_running: Callable[[str], bool], fence: Callable[[str, str], Awaitable[None]],
                      stop: asyncio.Event) -> None:
    """Fence each movable singleton once the agent has been out of contact for its ``stop_after_disconnect``."""
    movable = [(u.name, u.stop_after_disconnect) for u in units if u.stop_after_disconnect is not None]
    if not movable:
        return
    while not stop.is_set():
        contact.observe(connected.is_set())
        away = contact.out_of_contact_for()
        for name, limit in movable:
            if away >= limit and is_running(name):
                await fence(name, f"no broker for {away:.1f}s (stop_after_disconnect = {limit:g}s): another "
                                  "node may take this unit over")
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CHECK_EVERY)
