"""The installed agent under a real systemd (PID 1 in a Podman container, see conftest).

``selfheal install`` puts the units, users, tmpfiles and polkit rule in
place; ``systemctl start selfheal-agent`` returns once the agent sent READY
with a STATUS line, and the node comes online at a controller the test runs
on the host. SIGSTOP on the agent stops its pings and systemd's watchdog
restarts it; ``systemctl reload`` goes through SIGHUP, RELOADING and READY
without a restart. The test shortens ``WatchdogSec=`` with a drop-in, as an
operator would.
"""

from __future__ import annotations

import subprocess

import httpx
import pytest

from selfheal.install import data_dir, render_polkit
from tests.conftest import Broker, eventually_sync, free_port
from tests.host.conftest import AGENT, SELFHEAL, HostController, SystemdHost, agent_toml

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

def test_start_reaches_ready_and_the_node_comes_online(installed: SystemdHost, controller: HostController,
                                                      node: str) -> None:
    host = installed
    host.run("systemctl", "start", AGENT, timeout=120)  # Type=notify: returns once READY=1 arrived
    state = host.show(AGENT, "ActiveState", "SubState", "StatusText", "User", "MainPID")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), host.journal(AGENT)
    assert state["StatusText"].startswith(f"online: node {node}"), state
    # It runs as its static user, in its sandbox.
    assert host.run("stat", "-c", "%U", f"/proc/{state['MainPID']}").stdout.strip() == "selfheal-agent"
    assert state["User"] == "selfheal-agent"

    def online() -> bool:
        nodes = httpx.get(f"{controller.api}/api/v1/nodes", timeout=5).json()["items"]
        return any(n["id"] == node and n["state"] == "online" for n in nodes)

    eventually_sync(online, timeout=30, what=f"{node} online at the controller")


def test_sigstop_makes_the_watchdog_restart_the_agent(installed: SystemdHost) -> None:
    host = installed
    before = host.show(AGENT, "MainPID", "NRestarts")
    assert int(before["MainPID"]) > 0, f"the agent is not running: {before}"  # kill -STOP 0 would stop the shell
    host.sh(f"kill -STOP {before['MainPID']}")  # sh's kill: minbase has no procps
    after = host.wait_show(AGENT, lambda s: s["NRestarts"] != before["NRestarts"] and s["ActiveState"] == "active"
                           and s["SubState"] == "running" and s["MainPID"] not in ("0", before["MainPID"]),
                           "MainPID", "NRestarts", "ActiveState", "SubState", "StatusText",
                           timeout=60, what="a watchdog restart")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    journal = host.journal(AGENT, 200)
    assert "Watchdog timeout (limit 3s)!" in journal, journal
    assert "Failed with result 'watchdog'" in journal, journal
    host.wait_show(AGENT, lambda s: s["StatusText"].startswith("online:"), "StatusText", what="online again")


def test_reload_goes_through_sighup_without_a_restart(installed: SystemdHost, mosquitto: Broker, node: str) -> None:
    host = installed
    before = host.show(AGENT, "MainPID", "NRestarts")
    host.write("/etc/selfheal/agent.toml", agent_toml(mosquitto, node, interval=0.7, level="debug"), "0640")
    host.run("systemctl", "reload", AGENT)
    after = host.wait_show(AGENT, lambda s: "restart needed for agent.interval" in s["StatusText"],
                           "StatusText", "MainPID", "NRestarts", "ActiveState", what="the reload's status line")
    assert (after["MainPID"], after["NRestarts"], after["ActiveState"]) == (
        before["MainPID"], before["NRestarts"], "active")
    assert "config reloaded: applied log" in after["StatusText"] or "applied log" in host.journal(AGENT, 40)
    journal = host.journal(AGENT, 60)
    assert "Reloaded selfheal-agent.service" in journal, journal
    assert '"event": "config.reloaded"' in journal, journal

    # A broken file: the agent keeps running on the old config and says so.
    host.write("/etc/selfheal/agent.toml", agent_toml(mosquitto, node) + "[agent.bogus]\n", "0640")
    host.run("systemctl", "reload", AGENT)
    host.wait_show(AGENT, lambda s: "config reload failed" in s["StatusText"], "StatusText", what="reload failure")
    assert host.show(AGENT, "MainPID")["MainPID"] == before["MainPID"]
    host.write("/etc/selfheal/agent.toml", agent_toml(mosquitto, node), "0640")


def test_the_controller_unit_runs_in_its_sandbox(systemd_host: SystemdHost, own_mosquitto: Broker) -> None:
    """DynamicUser, no capabilities, MemoryDenyWriteExecute, the syscall filter: the controller still starts,
    reads its API token through the selfheal-keys group, and serves."""
    host = systemd_host
    port = free_port()
    host.write("/etc/selfheal/controller.toml",
               f'[mqtt]\nurl = "{own_mosquitto.url}"\n[controller]\nlisten = "127.0.0.1:{port}"\n'
               '[log]\nformat = "json"\n', "0640")
    host.run(SELFHEAL, "install", "--role", "controller")
    host.run("systemd-sysusers", "selfheal.conf")
    host.run("systemd-tmpfiles", "--create", "selfheal.conf")
    host.run("systemctl", "daemon-reload")
    host.run("systemctl", "start", "selfheal-controller.service", timeout=120)
    state = host.show("selfheal-controller.service", "ActiveState", "StatusText", "MainPID")
    assert state["ActiveState"] == "active", host.journal("selfheal-controller.service")
    assert state["StatusText"].startswith("online: "), state
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    journal = host.journal("selfheal-controller.service", 100)
    assert "api.token_missing" not in journal, journal
    uid = host.run("stat", "-c", "%u", f"/proc/{state['MainPID']}").stdout.strip()
    assert int(uid) >= 61184, f"not a dynamic user: {uid}"  # systemd's DynamicUser= range: 61184-65519
    host.run("systemctl", "stop", "selfheal-controller.service")


def test_polkit_lets_the_agents_user_manage_only_its_units(installed: SystemdHost) -> None:
    """The rule as rendered for one allowed service, under the real polkitd: start/stop/restart of that
    service as ``selfheal-agent`` succeed; another service, or another user, are refused."""
    host = installed
    for name in ("sh-allowed", "sh-other"):
        host.write(f"/etc/systemd/system/{name}.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    host.run("systemctl", "daemon-reload")
    host.run("systemctl", "start", "sh-allowed.service", "sh-other.service")
    template = (data_dir() / "50-selfheal-agent.rules").read_text()
    host.write("/etc/polkit-1/rules.d/50-selfheal-agent.rules", render_polkit(template, ["sh-allowed.service"]))
    host.run("systemctl", "restart", "polkit.service")  # polkitd also notices on its own; no race in a test

    def as_user(user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return host.run("runuser", "-u", user, "--", "systemctl", "--no-ask-password", *args, check=False)

    pid = host.show("sh-allowed.service", "MainPID")["MainPID"]
    done = as_user("selfheal-agent", "restart", "sh-allowed.service")
    assert done.returncode == 0, done.stderr
    assert host.show("sh-allowed.service", "MainPID")["MainPID"] not in ("0", pid)
    for verb in ("stop", "start"):
        done = as_user("selfheal-agent", verb, "sh-allowed.service")
        assert done.returncode == 0, done.stderr

    for args in (("restart", "sh-other.service"), ("stop", "sh-other.service"), ("stop", "systemd-journald.service")):
        done = as_user("selfheal-agent", *args)
        assert done.returncode != 0, args
        assert "Access denied" in done.stderr, done.stderr
    done = as_user("nobody", "restart", "sh-allowed.service")
    assert done.returncode != 0
    assert "Interactive authentication required" in done.stderr, done.stderr
    assert host.show("sh-other.service", "ActiveState")["ActiveState"] == "active"



UNIT_ENV = "/var/lib/selfheal-agent/unit.env"


def _with_unit(mosquitto: Broker, node: str, unit: str) -> str:
    return agent_toml(mosquitto, node) + unit


def _exists(host: SystemdHost, path: str) -> bool:
    return host.sh(f"test -s {path}", check=False).returncode == 0


def test_the_key_is_a_credential_no_unit_sees(installed: SystemdHost, mosquitto: Broker, node: str,
                                              controller: HostController) -> None:
    """Issue 13, "leaked key", under the real systemd: the agent has its key (LoadCredential=), a unit's
    environment has neither it nor the credentials directory, and without the key file the agent still
    starts (SetCredential= default) and refuses commands."""
    host = installed
    unit = ('[[agent.units]]\nname = "dump"\nkind = "process"\n'
            f'command = ["/bin/sh", "-c", "env > {UNIT_ENV}; exec sleep 600"]\n')
    host.write("/etc/selfheal/agent.toml", _with_unit(mosquitto, node, unit), "0640")
    host.sh(f"rm -f {UNIT_ENV}")
    host.run("systemctl", "restart", AGENT, timeout=120)
    eventually_sync(lambda: _exists(host, UNIT_ENV), timeout=30, what="the unit's environment dump")
    dumped = host.run("cat", UNIT_ENV).stdout
    assert controller.key_hex not in dumped
    for name in ("CREDENTIALS_DIRECTORY=", "NOTIFY_SOCKET=", "WATCHDOG_USEC=", "INVOCATION_ID=", "SELFHEAL_"):
        assert name not in dumped, name
    pid = host.show(AGENT, "MainPID")["MainPID"]
    assert controller.key_hex not in host.run("cat", f"/proc/{pid}/environ").stdout
    journal = host.journal(AGENT, 200)
    assert "agent.no_command_key" not in journal, journal
    assert "keys.deprecated_env" not in journal, journal

    # No key file: the agent starts all the same, and says it has no key.
    key = f"/etc/selfheal/keys/{node}.key"
    host.run("mv", key, f"{key}.away")
    try:
        host.run("systemctl", "restart", AGENT, timeout=120)
        assert host.show(AGENT, "ActiveState")["ActiveState"] == "active", host.journal(AGENT)
        host.wait_show(AGENT, lambda _: "agent.no_command_key" in host.journal(AGENT, 100), "ActiveState",
                       what="the no-key warning")
    finally:
        host.run("mv", f"{key}.away", key)
        host.write("/etc/selfheal/agent.toml", agent_toml(mosquitto, node), "0640")
        host.run("systemctl", "restart", AGENT, timeout=120)


ROOT_DROP_IN = """\
[Service]
# Units with `user =`: the agent switches users, so it runs as root with just the capabilities that takes.
User=root
Group=root
CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_CHOWN CAP_DAC_READ_SEARCH CAP_KILL
SystemCallFilter=@setuid @chown
"""


def test_a_unit_runs_as_its_user_under_the_documented_drop_in(installed: SystemdHost, mosquitto: Broker,
                                                              node: str) -> None:
    """README, "Security": the drop-in for an agent whose units name a user; the unit runs as nobody."""
    host = installed
    drop_in = f"/etc/systemd/system/{AGENT}.d/60-units-as-users.conf"
    unit = ('[[agent.units]]\nname = "as-nobody"\nkind = "process"\nuser = "nobody"\n'
            'progress_file = "progress.json"\n'
            'command = ["/bin/sh", "-c", "id -u > uid; printf \\"{\\\\\\"done\\\\\\": 1}\\" > progress.json; '
            'exec sleep 600"]\n')
    work = "/var/lib/selfheal-agent/work/as-nobody"
    host.write("/etc/selfheal/agent.toml", _with_unit(mosquitto, node, unit), "0640")
    host.write(drop_in, ROOT_DROP_IN)
    host.run("systemctl", "daemon-reload")
    try:
        host.run("systemctl", "restart", AGENT, timeout=120)
        try:
            eventually_sync(lambda: _exists(host, f"{work}/uid") and _exists(host, f"{work}/progress.json"),
                            timeout=30, what="the unit run as nobody")
        except AssertionError:
            log = host.run("cat", "/var/lib/selfheal-agent/logs/as-nobody.log", check=False).stdout
            raise AssertionError(f"{host.journal(AGENT, 30)}\n{log}") from None
        assert host.run("cat", f"{work}/uid").stdout.strip() == host.run("id", "-u", "nobody").stdout.strip()
        assert host.run("stat", "-c", "%U %a", work).stdout.strip() == "nobody 700"
    finally:
        host.run("rm", "-f", drop_in)
        host.run("systemctl", "daemon-reload")
        host.write("/etc/selfheal/agent.toml", agent_toml(mosquitto, node), "0640")
        host.run("systemctl", "restart", AGENT, timeout=120)
