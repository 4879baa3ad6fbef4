"""The agent's conversation with systemd: its status line, its health checks, what a reload can change.

Built by ``agent.app`` on ``selfheal.service.Service`` (readiness, watchdog,
SIGHUP). The agent applies only ``log`` live: its units, datasets, listen
address, broker and node id are all wired into running parts (processes it
supervises, a bound socket, an MQTT session with a last will), so a change to
any of them is named in the status line as needing a restart, key by key.

Health: the report loop must have gone round within ``max(5 intervals,
30 s)``. It waits on threads (psutil reads ``/proc``), so a hung thread or a
starved pool shows there first; the watchdog pinger itself runs on the event
loop, so a blocked loop stops the pings without any check.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from selfheal.config import Config
from selfheal.service import Service
from selfheal.wire import UnitReport

MIN_REPORT_STALL = 30.0
"""Seconds without a report-loop round before the agent counts as wedged, at the shortest."""


def agent_service(config: Config, *, source: Path | None, units: Callable[[], list[UnitReport]],
                  connected: Callable[[], bool], report_round: Callable[[], float | None],
                  held: Callable[[], int]) -> Service:
    """``report_round()``: the loop time of the report loop's last round (None before the first);
    ``held()``: events waiting for the broker or the controller (``agent.app``)."""
    host, port = config.mqtt.host_port()
    stall = max(5 * config.agent.interval, MIN_REPORT_STALL)

    def describe() -> str:
        states = Counter(unit.state for unit in units())
        counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no units"
        link = "online" if connected() else f"waiting for the broker at {host}:{port}"
        waiting = held()
        events = f", {waiting} events waiting for the controller" if waiting else ""
        return f"{link}: node {config.agent.node_id}, units: {counts}{events}"

    def report_loop_runs() -> str | None:
        last = report_round()
        age = asyncio.get_running_loop().time() - last if last is not None else 0.0
        if age > stall:
            return f"the report loop has not gone round for {age:.0f}s (limit {stall:.0f}s)"
        return None

    return Service("selfheal-agent", config, role="agent", source=source, describe=describe,
                   checks=[report_loop_runs])
