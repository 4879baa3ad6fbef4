"""Self-fencing of movable singletons, with a real Mosquitto that goes away and real processes.

- The broker goes away: after ``stop_after_disconnect`` the agent stops the unit and reports it
  ``fenced``; the broker comes back and the unit stays stopped (the controller may have moved it),
  until a ``start_unit``. A unit without the key keeps running through the outage.
- An agent that comes back after being away longer than ``stop_after_disconnect`` fences instead of
  starting; one back sooner starts the unit as usual.
- The unit's process dies with its agent (``PR_SET_PDEATHSIG``), checked with a real agent process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.fencing import Contact, fence_after
from selfheal.clocks import SystemClock
from selfheal.config import UnitConfig
from tests.conftest import Broker, eventually
from tests.integration.test_agent_mqtt import SLEEPER, agent_config, running_agent, unique_node

pytestmark = pytest.mark.integration


def movable(name: str = "singleton", after: float = 1.0) -> UnitConfig:
    return UnitConfig(name=name, command=SLEEPER, stop_after_disconnect=after, stop_grace=1.0)


async def test_a_broker_outage_fences_the_singleton_and_it_stays_stopped(own_mosquitto: Broker,
                                                                          tmp_path: Path) -> None:
    node = unique_node("fence")
    config = agent_config(own_mosquitto, tmp_path, node, [movable(), UnitConfig(name="plain", command=SLEEPER)])
    async with running_agent(config) as app:
        units = app.supervisor.entries
        pid = units["singleton"].unit.pid
        assert pid is not None
        report = next(u for u in app.supervisor.reports() if u.name == "singleton")
        assert report.fence_after == fence_after(config.agent.units[0], keepalive=5.0, interval=0.2)
        assert not report.fenced
        await asyncio.to_thread(own_mosquitto.stop)
        await eventually(lambda: units["singleton"].unit.state == "stopped", timeout=30, what="fenced")
        assert "singleton" in app.supervisor.fenced
        assert units["plain"].unit.state == "running"  # only movable units are fenced
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

        await asyncio.to_thread(own_mosquitto.start)
        await eventually(lambda: app.link.connects >= 2, timeout=30, what="reconnect")
        await asyncio.sleep(1.0)
        report = next(u for u in app.supervisor.reports() if u.name == "singleton")
        assert (report.state, report.fenced) == ("stopped", True)  # back online, still fenced

        await app.supervisor.start("singleton")  # what a start_unit command does
        assert units["singleton"].unit.state == "running"
        assert "singleton" not in app.supervisor.fenced
    # the decision outlived that agent: started by command, so the next one starts it
    assert (tmp_path / node / "units" / "singleton.desired").read_text().strip() == "started"


async def test_an_agent_back_after_too_long_fences_instead_of_starting(mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("late")
    config = agent_config(mosquitto, tmp_path, node, [movable(after=5.0)])
    contact = tmp_path / node / "contact"
    async with running_agent(config):
        await eventually(contact.exists, what="a report sent")
    async with running_agent(config) as app:  # back within 5 s: starts as usual
        assert app.supervisor.entries["singleton"].unit.state == "running"
    old = time.time() - 60
    os.utime(contact, (old, old))  # as if this agent had been down for a minute
    async with running_agent(config) as app:
        assert app.supervisor.entries["singleton"].unit.pid is None
        assert "singleton" in app.supervisor.fenced



async def test_a_standby_copy_back_after_too_long_is_not_called_fenced(mosquitto: Broker, tmp_path: Path) -> None:
    # A standby (autostart = false) never ran here, so there is nothing to fence: it stays an ordinary
    # standby, waiting for start_unit, and its report does not claim the agent stopped it.
    node = unique_node("standby")
    standby = UnitConfig(name="singleton", command=SLEEPER, stop_after_disconnect=5.0, stop_grace=1.0,
                         autostart=False)
    config = agent_config(mosquitto, tmp_path, node, [standby])
    contact = tmp_path / node / "contact"
    async with running_agent(config):
        await eventually(contact.exists, what="a report sent")
    old = time.time() - 60
    os.utime(contact, (old, old))
    async with running_agent(config) as app:
        assert app.supervisor.entries["singleton"].unit.pid is None
        assert "singleton" not in app.supervisor.fenced
        report = next(u for u in app.supervisor.reports() if u.name == "singleton")
        assert not report.fenced
    assert not (tmp_path / node / "units" / "singleton.desired").exists()

def test_the_contact_clock_starts_at_the_last_report_of_a_previous_run(tmp_path: Path) -> None:
    contact = Contact(tmp_path / "contact", SystemClock())
    contact.load()
    assert contact.out_of_contact_for() < 1.0  # never in contact: counted from now
    contact.seen()
    assert contact.out_of_contact_for() == 0.0
    contact.observe(connected=True)
    assert contact.out_of_contact_for() == 0.0
    contact.observe(connected=False)
    time.sleep(0.05)
    assert contact.out_of_contact_for() > 0.0
    old = time.time() - 30
    os.utime(tmp_path / "contact", (old, old))
    again = Contact(tmp_path / "contact", SystemClock())
    again.load()
    assert 29 < again.out_of_contact_for() < 40


def test_a_contact_time_in_the_future_counts_from_now_not_from_then(tmp_path: Path) -> None:
    """The wall clock went back (by five minutes) while the agent was down: counting from the recorded time would
    fence its movable units five minutes late, while the controller, on its own clock, starts their standby."""
    ahead = time.time() + 300
    (tmp_path / "contact").touch()
    os.utime(tmp_path / "contact", (ahead, ahead))
    contact = Contact(tmp_path / "contact", SystemClock())
    contact.load()
    time.sleep(0.05)
    assert 0.0 < contact.out_of_contact_for() < 5.0


def test_a_movable_unit_dies_with_its_agent(mosquitto: Broker, tmp_path: Path) -> None:
    node = unique_node("pdeath")
    (tmp_path / "keys").mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[mqtt]\nurl = "{mosquitto.url}"\n[agent]\nnode_id = "{node}"\nstate_dir = "{tmp_path / node}"\n'
        f'listen = "127.0.0.1:0"\n[[agent.units]]\nname = "singleton"\ncommand = {SLEEPER!r}\n'
        f'stop_after_disconnect = 5.0\n[security]\nkey_dir = "{tmp_path / "keys"}"\n'.replace("'", '"'))
    agent = subprocess.Popen([sys.executable, "-m", "selfheal", "agent", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = tmp_path / node / "units"
    try:
        deadline = time.monotonic() + 30
        children: list[int] = []
        while time.monotonic() < deadline and not children:
            out = subprocess.run(["pgrep", "-P", str(agent.pid), "-f", "time.sleep"], capture_output=True,
                                 text=True, check=False).stdout
            children = [int(p) for p in out.split()]
            time.sleep(0.1)
        assert children, f"the unit never started ({pid_file})"
        agent.kill()
        agent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{children[0]}").exists():
            time.sleep(0.05)
        assert not Path(f"/proc/{children[0]}").exists(), "the unit outlived its agent"
    finally:
        if agent.poll() is None:
            agent.kill()


def test_under_a_watchdog_the_fence_covers_a_wedged_agent() -> None:
    """systemd kills a wedged agent and its units within WatchdogSec + TimeoutAbortSec: the promise waits
    for that when it is the longer of the two."""
    unit = movable(after=1.0)
    plain = fence_after(unit, keepalive=1.0, interval=0.5)
    assert plain == 1.0 + 2.0 + 0.5 + 1.0 + 2.0
    assert fence_after(unit, keepalive=1.0, interval=0.5, watchdog=30.0) == 30.0 + 10.0 + 2.0
    long_limit = fence_after(movable(after=120.0), keepalive=1.0, interval=0.5, watchdog=30.0)
    assert long_limit == 120.0 + 2.0 + 0.5 + 1.0 + 2.0
    assert fence_after(UnitConfig(name="x", command=SLEEPER), keepalive=1.0, interval=0.5) is None
