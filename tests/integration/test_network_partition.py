"""A network partition with real processes: node-a's agent in a network namespace of the test's own, cut off
from the broker by taking its end of a veth pair down, and reconnected by bringing it up again.

node-a runs a movable singleton ``solo`` (``stop_after_disconnect``) and a plain unit ``web``; node-b, on the
host, holds ``solo``'s standby copy (``autostart = false``). Each copy of ``solo`` writes its starts and stops
(pid, wall time) to a file of its node, ``web`` its starts, so what ran when is read from the units themselves.

What must hold (issue 15, "Network partition"):

- the controller counts node-a offline once it has not heard it for ``offline_after`` (the agent's keep-alive is
  longer, so its last will comes later: this is the controller's own clock at work);
- node-a's agent stops ``solo`` itself after ``stop_after_disconnect`` (``unit.fenced``), and the controller
  starts the standby on node-b only after its fence wait (``fence_wait``/``fenced`` in the ``unit_lost``
  incident), i.e. after node-a's copy wrote its stop;
- meanwhile the agent's fallback restarts ``web``, killed during the partition, on its own (``fallback.restarted``),
  and leaves the fenced ``solo`` alone;
- healed, node-a is online again and one copy of ``solo`` runs (node-b's; node-a's stays fenced), and the local
  restart of ``web`` is adopted into one incident (a ``local_action`` entry, no restart by command: ``web`` started
  twice in all); each finding has one incident; and the controller never takes node-a's fenced copy for a
  running one (no ``placement.two_copies``), not even in the instant node-a is back before its first report.

The namespace, its veth pair and a private /30 are created per test and deleted at teardown, whatever happened;
the test is skipped where ``ip netns add`` is refused (not root, no CAP_NET_ADMIN, no iproute2).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from selfheal.keys import write_key
from tests.conftest import eventually_sync, start_mosquitto
from tests.e2e.conftest import Cluster
from tests.integration.test_agent_fallback import counted_unit, log_events, started, wait_logged

pytestmark = pytest.mark.integration

A, B = "node-a", "node-b"
OFFLINE_AFTER = 2.0
"""The controller's ``offline_after``: shorter than 1.5 x node-a's keep-alive, when the broker sends its will."""
AGENT_KEEPALIVE = 3.0
STOP_AFTER_DISCONNECT = 3.0
FENCE_FLOOR = 5.0
"""Below node-a's reported ``fence_after`` (3 + 2 x 3 + 0.5 + 1 + 2 = 12.5 s), which therefore decides the wait."""
SUBNETS = ipaddress.IPv4Network("10.213.0.0/16")
"""Where each test's /30 is taken from, at an offset derived from the pid, skipping any network in use here."""
_count = itertools.count()


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def networks_in_use() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of this host's addresses and routes: a test's /30 must not overlap any."""
    found = []
    for line in (ip("-4", "-o", "addr", "show").stdout + ip("-4", "route", "show", "table", "all").stdout).splitlines():
        for word in line.split():
            try:
                network = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            if isinstance(network, ipaddress.IPv4Network) and network.prefixlen > 0:
                found.append(network)
    return found


def free_subnet() -> ipaddress.IPv4Network:
    subnets: list[ipaddress.IPv4Network] = list(SUBNETS.subnets(new_prefix=30))
    used = networks_in_use()
    start = (os.getpid() * 7 + next(_count)) % len(subnets)
    for subnet in itertools.islice(itertools.cycle(subnets), start, start + len(subnets)):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError(f"no free /30 in {SUBNETS}")


@dataclass
class Partition:
    """A network namespace joined to the host by a veth pair on a private /30; the agent inside reaches the
    host end's address only."""

    netns: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str

    @property
    def prefix(self) -> list[str]:
        """Runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.netns]

    def cut(self) -> None:
        ip("link", "set", self.ns_if, "down", netns=self.netns)

    def heal(self) -> None:
        ip("link", "set", self.ns_if, "up", netns=self.netns)

    @classmethod
    def create(cls) -> Partition:
        tag = f"{os.getpid()}x{next(_count)}"
        netns, host_if, ns_if = f"selfheal-part-{tag}", f"shp{tag}h"[:15], f"shp{tag}n"[:15]
        if shutil.which("ip") is None:
            pytest.skip("cannot create a network namespace: `ip` (iproute2) is not installed")
        added = subprocess.run(["ip", "netns", "add", netns], capture_output=True, text=True, timeout=30,
                               check=False)
        if added.returncode != 0:
            pytest.skip(f"cannot create a network namespace (`ip netns add` needs root or CAP_NET_ADMIN): "
                        f"{added.stderr.strip()}")
        subnet = free_subnet()
        host_addr, ns_addr = (str(h) for h in subnet.hosts())
        partition = cls(netns, host_if, ns_if, host_addr, ns_addr)
        try:
            ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            ip("link", "set", ns_if, "netns", netns)
            ip("addr", "add", f"{host_addr}/30", "dev", host_if)
            ip("link", "set", host_if, "up")
            ip("addr", "add", f"{ns_addr}/30", "dev", ns_if, netns=netns)
            ip("link", "set", ns_if, "up", netns=netns)
            ip("link", "set", "lo", "up", netns=netns)  # the agent's own HTTP listener is on 127.0.0.1
        except BaseException:
            partition.delete()
            raise
        return partition

    def delete(self) -> None:
        """Kill what still runs inside (only this test's processes can), then remove the veth pair and the
        namespace; each step whatever the one before did."""
        pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30,
                              check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        ip("link", "delete", self.host_if, check=False)
        ip("netns", "delete", self.netns, check=False)


@pytest.fixture
def partition() -> Iterator[Partition]:
    made = Partition.create()
    try:
        yield made
    finally:
        made.delete()


@pytest.fixture
def cluster(partition: Partition, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Real processes on a Mosquitto of the test's own that also listens on the host end of the veth pair."""
    broker = start_mosquitto(tmp_path, also_on=[partition.host_addr])
    cluster = Cluster(root=tmp_path, broker=broker)
    failed = request.session.testsfailed
    try:
        yield cluster
    finally:
        partition.heal()  # a test that failed mid-partition: let the agent say its offline and stop cleanly
        cluster.stop_all()
        broker.stop()
        if request.session.testsfailed > failed:
            print(cluster.logs())


def controller_toml(cluster: Cluster) -> Path:
    path = cluster.root / "controller.toml"
    cluster.token_file.write_text("partition-token\n")
    path.write_text(
        f'[mqtt]\nurl = "{cluster.broker.url}"\nkeepalive = 2.0\nreconnect_max = 1.0\n'
        f'[controller]\nlisten = "127.0.0.1:{cluster.api_port}"\nstate_dir = "{cluster.root / "controller"}"\n'
        f"offline_after = {OFFLINE_AFTER}\nfence_floor = {FENCE_FLOOR}\n"
        f'[security]\nkey_dir = "{cluster.root / "keys"}"\napi_token_file = "{cluster.token_file}"\n')
    return path


def agent_toml(cluster: Cluster, node: str, url: str, units: str) -> Path:
    """A fallback that acts one second after the controller is gone; a keep-alive longer than the controller's
    ``offline_after`` (see ``OFFLINE_AFTER``); reconnects at most a second after the network is back."""
    write_key(cluster.root / "keys", node)
    path = cluster.root / f"{node}.toml"
    path.write_text(
        f'[mqtt]\nurl = "{url}"\nkeepalive = {AGENT_KEEPALIVE}\nreconnect_max = 1.0\n'
        f'[agent]\nnode_id = "{node}"\ninterval = 0.5\nstate_dir = "{cluster.root / node}"\n'
        f'listen = "127.0.0.1:0"\nfallback_after = 1.0\n{units}'
        f'[security]\nkey_dir = "{cluster.root / "keys"}"\n')
    return path


SOLO = """\
import os, signal, sys, time
def note(what):
    with open(sys.argv[1], "a") as f:
        f.write(f"{what} {os.getpid()} {time.time()}\\n")
def stop(*_):
    note("stop")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
note("start")
while True:
    time.sleep(3600)
"""


def solo_unit(events: Path, *, autostart: bool) -> str:
    """The movable singleton: notes each start and stop (SIGTERM) in ``events``, whose path marks its processes."""
    return (f'[[agent.units]]\nname = "solo"\nkind = "process"\nstop_grace = 1.0\n'
            f"stop_after_disconnect = {STOP_AFTER_DISCONNECT}\nautostart = {'true' if autostart else 'false'}\n"
            f"command = [{json.dumps(sys.executable)}, \"-c\", {json.dumps(SOLO)}, {json.dumps(str(events))}]\n")


def noted(events: Path, what: str) -> list[tuple[int, float]]:
    """(pid, wall time) of each ``what`` (start or stop) ``events`` holds, oldest first."""
    if not events.exists():
        return []
    return [(int(pid), float(when)) for line in events.read_text().splitlines()
            if len(words := line.split()) == 3 and words[0] == what for _, pid, when in [words]]


def solo_processes(marker: str) -> list[int]:
    """Live processes of ``solo`` on this machine, namespaces included: their command line names ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = next((line for line in (proc / "status").read_text().splitlines() if line.startswith("State:")),
                         "")
        except OSError:
            continue
        if marker.encode() in cmdline and "zombie" not in state:
            pids.append(int(proc.name))
    return sorted(pids)


def incidents(cluster: Cluster) -> list[dict[str, Any]]:
    return sorted(cluster.get("/api/v1/incidents")["items"], key=lambda i: i["id"])


def incident(cluster: Cluster, kind: str, node: str, unit: str | None = None) -> dict[str, Any] | None:
    found = [i for i in incidents(cluster) if (i["kind"], i["node"], i["unit"]) == (kind, node, unit)]
    return dict(cluster.get(f"/api/v1/incidents/{found[-1]['id']}")) if found else None


def entries(detail: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [entry for entry in detail["timeline"] if entry["kind"] == kind]


def node_state(cluster: Cluster, node: str) -> str | None:
    return next((n["state"] for n in cluster.get("/api/v1/nodes")["items"] if n["id"] == node), None)


def at(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(entry["at"])).timestamp()


@pytest.mark.timeout(240)
def test_a_partitioned_node_fences_its_singleton_heals_locally_and_rejoins_with_one_copy(
        cluster: Cluster, partition: Partition) -> None:
    web_starts = cluster.root / "web-starts"
    solo_a, solo_b = cluster.root / "solo-events-a", cluster.root / "solo-events-b"
    marker = str(cluster.root / "solo-events-")
    cluster.start("controller", "controller", controller_toml(cluster))
    cluster.wait_ready()
    partitioned_url = f"mqtt://{partition.host_addr}:{cluster.broker.port}"
    cluster.start(A, "agent", agent_toml(cluster, A, partitioned_url,
                                         solo_unit(solo_a, autostart=True) + counted_unit(web_starts)),
                  prefix=partition.prefix)
    cluster.start(B, "agent", agent_toml(cluster, B, cluster.broker.url, solo_unit(solo_b, autostart=False)))
    cluster.wait_healthy(A, "solo")
    cluster.wait_healthy(A, "web")
    eventually_sync(lambda: (cluster.unit(B, "solo") or {}).get("state") == "stopped", timeout=30,
                    what="node-b holding a stopped standby copy")
    eventually_sync(lambda: bool(log_events(cluster, "controller", "placement.recorded")), timeout=30,
                    what="solo placed on node-a")
    [(solo_a_pid, _)] = noted(solo_a, "start")
    assert solo_processes(marker) == [solo_a_pid]
    assert len(started(web_starts)) == 1

    # The partition: node-a's agent loses the broker, the controller loses node-a.
    partition.cut()
    wait_logged(cluster, A, "mqtt.disconnected")
    eventually_sync(lambda: node_state(cluster, A) == "offline", timeout=30, what="node-a counted offline")
    offline = incident(cluster, "node_offline", A)
    assert offline is not None
    evidence = entries(offline, "opened")[0]["data"]["evidence"]
    assert evidence["silent_for_s"] >= OFFLINE_AFTER, evidence  # counted offline after offline_after, not sooner

    # web crashes on the cut-off node: its agent restarts it itself.
    web_pid = started(web_starts)[-1]
    os.kill(web_pid, signal.SIGKILL)
    wait_logged(cluster, A, "fallback.restarted")
    eventually_sync(lambda: len(started(web_starts)) == 2, timeout=30, what="web restarted on node-a")
    [local] = log_events(cluster, A, "fallback.restarted")
    assert (local["unit"], local["attempt"], local["reason"], local["status"]) == ("web", 1, "unit_exited", "done")

    # solo: fenced by node-a's agent, then started on node-b after the fence wait.
    wait_logged(cluster, A, "unit.fenced")
    [fenced] = log_events(cluster, A, "unit.fenced")
    assert fenced["unit"] == "solo"
    eventually_sync(lambda: bool(noted(solo_b, "start")), timeout=90, what="solo started on node-b")
    [(stopped_pid, stopped_at)] = noted(solo_a, "stop")
    [(solo_b_pid, b_started_at)] = noted(solo_b, "start")
    assert stopped_pid == solo_a_pid
    assert b_started_at > stopped_at, (stopped_at, b_started_at)  # never two copies at once
    lost = incident(cluster, "unit_lost", A, "solo")
    assert lost is not None
    [wait] = entries(lost, "fence_wait")
    assert wait["data"]["fence_after"] == wait["data"]["reported_fence_after"] >= FENCE_FLOOR
    assert entries(lost, "fenced")
    sent = [(e["data"]["node"], e["data"]["step"]) for e in entries(lost, "command_sent")]
    assert sent == [(B, "StartUnit")], sent
    assert at(entries(lost, "command_sent")[0]) >= wait["data"]["fenced_at"] - 0.05
    assert b_started_at >= wait["data"]["fenced_at"] - 0.05
    cluster.wait_healthy(B, "solo", timeout=60)
    assert solo_processes(marker) == [solo_b_pid]
    assert not [e for e in log_events(cluster, A, "fallback.restarted") if e["unit"] == "solo"]

    # Healed: node-a is back, its copy stays fenced, web's local restart is adopted.
    partition.heal()
    wait_logged(cluster, A, "fallback.reported")
    eventually_sync(lambda: node_state(cluster, A) == "online", timeout=30, what="node-a online again")
    assert len(log_events(cluster, A, "mqtt.connected")) >= 2
    eventually_sync(lambda: (cluster.unit(A, "solo") or {}).get("fenced") is True, timeout=30,
                    what="node-a reporting its copy of solo fenced")

    def settled() -> bool:
        found = incidents(cluster)
        return len(found) >= 3 and all(i["state"] == "resolved" for i in found)
    eventually_sync(settled, timeout=90, what="every incident resolved")

    keys = [(i["kind"], i["node"], i["unit"]) for i in incidents(cluster)]
    assert sorted(keys, key=str) == sorted([("node_offline", A, None), ("unit_lost", A, "solo"),
                                            ("unit_exited", A, "web")], key=str), keys
    adopted = incident(cluster, "unit_exited", A, "web")
    assert adopted is not None
    assert [(e["data"]["key"], e["data"]["attempt"], e["data"]["status"]) for e in entries(adopted, "local_action")] \
        == [(local["key"], 1, "done")]
    assert [(p["mode"], p["state"], p["action"]) for p in adopted["plans"]] == [("local", "local", "restart")]
    assert not entries(adopted, "command_sent")
    assert len(log_events(cluster, "controller", "local_action.adopted")) == 1
    assert log_events(cluster, A, "command.result") == []  # node-a was sent nothing: no restart by command

    # One copy: node-b's, in the units' own files, in the process table and in the controller's view.
    assert len(started(web_starts)) == 2
    assert solo_processes(marker) == [solo_b_pid]
    assert len(noted(solo_a, "start")) == 1
    assert len(noted(solo_b, "start")) == 1
    unit_a, unit_b = cluster.unit(A, "solo"), cluster.unit(B, "solo")
    assert unit_a is not None
    assert unit_b is not None
    assert (unit_a["state"], unit_a["fenced"], unit_a["pid"]) == ("stopped", True, None)
    assert (unit_b["state"], unit_b["pid"]) == ("running", solo_b_pid)
    assert [u["node"] for u in cluster.get("/api/v1/units")["items"]
            if u["name"] == "solo" and u["state"] in ("starting", "running")] == [B]
    # Nor did the controller ever believe otherwise: node-a's copy, fenced, never counted as running again.
    assert log_events(cluster, "controller", "placement.two_copies") == []
