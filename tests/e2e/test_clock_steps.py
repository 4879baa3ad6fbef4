"""End to end: the wall clock of a real controller or agent process jumps by minutes, and nothing else does.

A step is made with libfaketime (Debian package ``faketime``): the process runs with it preloaded, its
wall clock offset by the seconds in a file the test rewrites, its monotonic clocks untouched
(``FAKETIME_DONT_FAKE_MONOTONIC``). A time namespace (``unshare --time``) cannot do this: it offsets only
the monotonic and boot-time clocks, and only before its first process starts; and ``date -s`` would step
every process on the machine. (With monotonic time left alone, libfaketime 0.9.10 breaks ``time.sleep``
— EINVAL from ``clock_nanosleep`` — which the daemons do not call.)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from selfheal import wire
from selfheal.keys import read_key
from tests.conftest import eventually, eventually_sync
from tests.e2e.conftest import Cluster
from tests.integration.test_agent_mqtt import Observer

pytestmark = pytest.mark.e2e


class SteppedClock:
    """One process's wall clock, offset from the real one by what ``step_to`` says."""

    def __init__(self, path: Path) -> None:
        found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
        if not found:
            pytest.fail("libfaketime not found: install the Debian package 'faketime' (apt-get install -y faketime)")
        self.library = str(found[0])
        self.path = path
        self.step_to(0)

    def step_to(self, offset: int) -> None:
        """Offset the wall clock by ``offset`` seconds from the real one (written whole: the process rereads it)."""
        partial = self.path.with_suffix(".new")
        partial.write_text(f"{offset:+d}\n")
        partial.replace(self.path)

    def start(self, cluster: Cluster, monkeypatch: pytest.MonkeyPatch, name: str, role: str, config: Path) -> None:
        with monkeypatch.context() as env:
            env.setenv("LD_PRELOAD", self.library)
            env.setenv("FAKETIME_TIMESTAMP_FILE", str(self.path))
            env.setenv("FAKETIME_CACHE_DURATION", "1")
            env.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            cluster.start(name, role, config)


def steps_logged(cluster: Cluster, name: str) -> int:
    """How many clock steps the process logged (``clock.stepped``: it took the step out)."""
    return (cluster.root / f"{name}.log").read_text(errors="replace").count('"clock.stepped"')


def incidents(cluster: Cluster, kind: str) -> list[dict[str, object]]:
    return [i for i in cluster.get("/api/v1/incidents")["items"] if i["kind"] == kind]


def crash_and_heal(cluster: Cluster, *, timeout: float) -> None:
    """Kill the unit; it is restarted and its incident resolved."""
    before = cluster.wait_healthy("node-a")
    resolved = len([i for i in incidents(cluster, "unit_exited") if i["state"] == "resolved"])
    os.kill(int(before["pid"]), signal.SIGKILL)
    cluster.wait_healthy("node-a", restarts_above=before["restarts"], timeout=timeout)
    eventually_sync(lambda: len([i for i in incidents(cluster, "unit_exited") if i["state"] == "resolved"])
                    > resolved, timeout=timeout, what="the crash's incident resolved")


def test_the_controllers_clock_stepping_back_then_ahead_changes_no_decision(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Back five minutes: the next crash is healed at once, not after the last one's backoff plus five
    minutes. Then ten minutes ahead: no node looks silent (no node_offline incident, which would also start
    a migration's fence wait as already over), and the crash after it is healed once."""
    clock = SteppedClock(cluster.root / "controller.faketime")
    clock.start(cluster, monkeypatch, "controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    cluster.start("node-a", "agent", cluster.write_agent("node-a", cluster.http_unit()))
    crash_and_heal(cluster, timeout=40)

    clock.step_to(-300)
    eventually_sync(lambda: steps_logged(cluster, "controller") == 1, timeout=20, what="the step back noticed")
    crash_and_heal(cluster, timeout=40)

    clock.step_to(+300)
    eventually_sync(lambda: steps_logged(cluster, "controller") == 2, timeout=20, what="the step ahead noticed")
    crash_and_heal(cluster, timeout=40)

    assert incidents(cluster, "node_offline") == []
    healed = incidents(cluster, "unit_exited")
    assert len(healed) == 3
    assert [len(cluster.plans(int(str(i["id"])))) for i in healed] == [1, 1, 1]  # one restart each, no storm


async def test_an_agent_whose_clock_steps_refuses_what_expired_and_runs_what_did_not(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Signed commands sent the way the controller sends them, to an agent whose clock goes back five
    minutes, then five minutes ahead of the real time; then to the agent restarted while its clock is five
    minutes behind, so that it has no step to take out and learns the time from the controller's commands."""
    config = cluster.write_agent("node-a", cluster.http_unit())
    key = read_key(cluster.root / "keys", "node-a")
    assert key is not None
    clock = SteppedClock(cluster.root / "node-a.faketime")
    topic = wire.node_topic("node-a", "commands")

    def command(cid: str, *, age: float = 0.0) -> bytes:
        issued = time.time() - age
        return wire.encode(wire.sign_command(wire.Command(
            id=cid, key=f"node-a/clock/{cid}", node="node-a", epoch=1, issued_at=issued, expires_at=issued + 15.0,
            step=wire.RestartUnit(unit="web")), key))

    async with Observer(cluster.broker, [wire.node_topic("node-a", c) for c in ("events", "status")]) as obs:

        async def start() -> None:
            online = len([s for s, _ in obs.statuses("node-a") if s.state == "online"])
            clock.start(cluster, monkeypatch, "node-a", "agent", config)
            await eventually(lambda: len([s for s, _ in obs.statuses("node-a") if s.state == "online"]) > online,
                             timeout=30, what="the agent online")  # it subscribed to its commands first

        async def answer(cid: str, payload: bytes) -> wire.CommandResult:
            await obs.publish(topic, payload)
            await eventually(lambda: cid in obs.results("node-a"), timeout=30, what=f"the ack of {cid}")
            return obs.results("node-a")[cid]

        await start()
        assert (await answer("before", command("before"))).status == "done"

        clock.step_to(-300)
        await eventually(lambda: steps_logged(cluster, "node-a") == 1, timeout=20, what="the step back noticed")
        late = await answer("late", command("late", age=40.0))  # expired 25 s ago: by its clock, not for 275 s
        assert (late.status, late.detail[:8]) == ("rejected", "expired ")
        assert (await answer("fresh", command("fresh"))).status == "done"

        clock.step_to(+300)
        await eventually(lambda: steps_logged(cluster, "node-a") == 2, timeout=20, what="the step ahead noticed")
        assert (await answer("ahead", command("ahead"))).status == "done"  # by its clock, expired 285 s ago

        cluster.procs["node-a"].send_signal(signal.SIGTERM)
        cluster.procs["node-a"].wait(25)
        clock.step_to(-300)
        await start()
        assert (await answer("first", command("first"))).status == "done"
        late = await answer("later", command("later", age=40.0))
        assert (late.status, late.detail[:8]) == ("rejected", "expired ")
