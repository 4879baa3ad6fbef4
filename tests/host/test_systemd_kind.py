"""A managed unit of kind ``systemd`` inside the real system: killed, it is restarted by the agent through
``systemctl`` under the agent's own user, as the polkit rule ``selfheal install`` rendered allows."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Broker, eventually_sync
from tests.host.conftest import AGENT, SELFHEAL, HostController, SystemdHost, agent_toml

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_a_killed_systemd_unit_is_restarted_by_the_agent_through_polkit(
        installed: SystemdHost, mosquitto: Broker, controller: HostController, node: str) -> None:
    """A managed unit of kind systemd, SIGKILLed, is restarted by the agent — ``systemctl restart`` as
    ``selfheal-agent`` from inside its sandbox, allowed by the rule ``selfheal install`` rendered from
    agent.toml — and the incident resolves; the same user is refused a service not in agent.toml."""
    host = installed
    host.write("/etc/systemd/system/sh-managed.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    host.run("systemctl", "daemon-reload")
    host.run("systemctl", "start", "sh-managed.service")
    host.write("/etc/selfheal/agent.toml", agent_toml(mosquitto, node) + (
        '[[agent.units]]\nname = "managed"\nkind = "systemd"\n[agent.units.systemd]\nunit = "sh-managed"\n'), "0640")
    out = host.run(SELFHEAL, "install", "--role", "agent").stdout
    assert "may start/stop/restart sh-managed.service" in out, out
    host.run("systemctl", "restart", "polkit.service")
    host.run("systemctl", "restart", AGENT, timeout=120)

    def unit() -> dict[str, object] | None:
        units = httpx.get(f"{controller.api}/api/v1/units", timeout=5).json()["items"]
        return next((u for u in units if u["node"] == node and u["name"] == "managed"), None)

    eventually_sync(lambda: (u := unit()) is not None and u["state"] == "running", timeout=30,
                    what="the systemd unit running at the controller")
    pid = host.show("sh-managed.service", "MainPID")["MainPID"]
    host.sh(f"kill -KILL {pid}")
    host.wait_show("sh-managed.service", lambda s: s["ActiveState"] == "active" and s["MainPID"] not in ("0", pid),
                   "ActiveState", "MainPID", timeout=60, what="the agent's restart of sh-managed")
    # sh-managed.service has no Restart=: systemd does not restart it, the agent did.
    assert "sh-managed.service: Main process exited, code=killed, status=9/KILL" in host.journal("sh-managed.service")

    def resolved() -> bool:
        incidents = httpx.get(f"{controller.api}/api/v1/incidents", timeout=5).json()["items"]
        return any(i["node"] == node and i["unit"] == "managed" and i["state"] == "resolved" for i in incidents)

    eventually_sync(resolved, timeout=60, what="the incident resolved")

    done = host.run("runuser", "-u", "selfheal-agent", "--", "systemctl", "--no-ask-password", "restart",
                    "sh-allowed.service", check=False)
    assert done.returncode != 0
    assert "Access denied" in done.stderr, done.stderr
