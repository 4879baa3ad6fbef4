"""Simulated agents for the benchmarks, and the processes around them.

A simulated node speaks the real wire format, as an agent would: its
``NodeStatus`` published retained (QoS 1), then reports (host metrics, one
mount, three running units with healthy HTTP probes, about 2.2 KB encoded),
each signed with the node's own key (``wire.sign_node_message``, when this
selfheal has it; the key is written into the ``security.key_dir`` the
controller reads). The nodes live in publisher processes (``Fleet``), each
speaking for its share over one MQTT connection, at a rate the harness sets
and counts: the generator's own count is what lets a benchmark tell a target
that fell behind from a generator that could not keep up.

Shared by ``bench/ingest.py`` (offered load stepped up until the controller
falls behind) and ``bench/mttr.py`` (a steady background load while real
faults heal), with the processes both own: a Mosquitto sized for the fleet,
the controller's command, the ``/metrics`` parser.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import msgspec
import psutil

from selfheal import wire
from selfheal.keys import read_key, write_key

KEEP_UP = 0.95
"""A target keeps up when it accepts at least this share of what was sent."""
GENERATOR_OK = 0.97
"""Below this share of the offered rate actually sent, the generator is the bottleneck."""
UNITS = ("web", "etl", "train")
MOUNTS = ("/",)
SESSION = 1
MOSQUITTO = next((p for p in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/bin/mosquitto")
                  if p and os.access(p, os.X_OK)), None)
SIGN: Callable[..., Any] | None = getattr(wire, "sign_node_message", None)
"""``wire.sign_node_message(message, channel, key)``, when this version of selfheal signs node traffic."""
PR_SET_PDEATHSIG = 1
Samples = dict[str, list[tuple[str, float]]]
"""``/metrics`` parsed: ``{name: [(labels, value)]}``."""


# --- the simulated agents ---------------------------------------------------------------------------------


def node_name(index: int) -> str:
    return f"sim-{index:05d}"


def node_status(node: str, now: float) -> wire.NodeStatus:
    """What an agent publishes retained when it connects (``agent.app``'s ``_status``)."""
    return wire.NodeStatus(node=node, state="online", session=SESSION, version="bench", units=list(UNITS),
                           labels={"group": f"g{wire.bucket_of(node) % 8}", "bench": "simulated"},
                           http="http://127.0.0.1:9", ts=now)


def report_template(node: str, now: float) -> wire.Report:
    """A node's report: host metrics with one mount, three running units each with a healthy HTTP probe."""
    index = int(node.rsplit("-", 1)[-1])
    host = wire.HostMetrics(
        cpu_percent=23.7, load1=1.42, load5=1.17, load15=0.98, mem_total_bytes=67_353_923_584,
        mem_available_bytes=41_238_138_880, mem_percent=38.8, swap_percent=0.4,
        disks=[wire.DiskUsage(mount=m, total_bytes=1_967_317_549_056, used_bytes=812_361_728_000, percent=41.3)
               for m in MOUNTS],
        disk_read_bytes=98_234_880_512, disk_write_bytes=411_202_371_584, net_sent_bytes=18_311_892_301,
        net_recv_bytes=92_114_551_098)
    units = [wire.UnitReport(
        name=name, kind="process", state="running", pid=40_000 + 3 * index + i, restarts=0, started_at=now - 3600.25,
        cpu_percent=12.5 + i, rss_bytes=1_241_513_984, num_fds=87, num_threads=23, proc_status="sleeping",
        probe=wire.ProbeState(kind="http", healthy=True, consecutive_failures=0, failures_threshold=3,
                              last_latency_s=round(0.0031 + i / 1000, 4), checked_at=now - 0.4))
        for i, name in enumerate(UNITS)]
    return wire.Report(node=node, session=SESSION, seq=0, ts=now, host=host, units=units)


class SimNode:
    """One simulated agent: its topic, its key and its next report."""

    def __init__(self, node: str, key: bytes | None, now: float, rng: random.Random) -> None:
        self.node, self.key, self.rng = node, key, rng
        self.topic = wire.node_topic(node, "report")
        self.template = report_template(node, now)
        self.seq = 0

    def status_payload(self, now: float) -> bytes:
        return self._encode(node_status(self.node, now), "status")

    def next_report(self, now: float) -> bytes:
        self.seq += 1
        host = msgspec.structs.replace(self.template.host, cpu_percent=round(20 + 10 * self.rng.random(), 1),
                                       load1=round(1 + self.rng.random(), 2),
                                       mem_percent=round(38 + self.rng.random(), 1))
        units = [msgspec.structs.replace(u, cpu_percent=round(10 + 5 * self.rng.random(), 1),
                                         probe=msgspec.structs.replace(u.probe, checked_at=now - 0.4))
                 if u.probe is not None else u for u in self.template.units]
        report = msgspec.structs.replace(self.template, seq=self.seq, ts=now, host=host, units=units)
        return self._encode(report, "report")

    def _encode(self, message: wire.NodeStatus | wire.Report, channel: wire.NodeChannel) -> bytes:
        if self.key is not None and SIGN is not None:
            message = SIGN(message, channel, self.key)
        return wire.encode(message)


def child_setup() -> int:
    """In a child process: leave Ctrl-C to the parent (it stops us in order); return the parent's pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return os.getppid()


def publisher_main(*, index: int, nodes: list[str], key_dir: str, signed: bool, host: str, port: int,
                   conn: Connection, sent: Synchronized[int]) -> None:
    """A publisher process: its share of the fleet, round-robin, at the rate the parent sets.

    Commands on ``conn``: ``("statuses",)`` publishes every node's status retained (QoS 1) and answers
    ``("statuses", published, seconds)``; ``("rate", r)`` sets reports/s for this process (0: idle);
    ``("stop",)`` ends. ``sent`` counts reports handed to the socket."""
    parent = child_setup()
    now = time.time()
    rng = random.Random(index)
    sims = [SimNode(n, read_key(key_dir, n) if signed else None, now, rng) for n in nodes]
    client = _connect(f"bench-sim-pub-{index}-{os.getpid()}", host, port)
    if client is None:
        conn.send(("error", f"publisher {index}: no connection to the broker"))
        return
    conn.send(("ready", len(sims)))
    rate, started, sent_here, cursor, total = 0.0, time.monotonic(), 0, 0, 0
    try:
        while True:
            if conn.poll():
                command = conn.recv()
                if command[0] == "stop":
                    break
                if command[0] == "rate":
                    rate, started, sent_here = float(command[1]), time.monotonic(), 0
                elif command[0] == "statuses":
                    conn.send(("statuses", *_publish_statuses(client, sims)))
                continue
            if os.getppid() != parent:
                break  # the harness died without stopping us
            if rate <= 0:
                client.loop(timeout=0.05)
                continue
            elapsed = time.monotonic() - started
            due = int(elapsed * rate) - sent_here
            if due <= 0:
                client.loop(timeout=min(0.05, max(0.0, (sent_here + 1) / rate - elapsed)))
                continue
            batch = min(due, max(1, int(rate * 0.05)))  # at most 50 ms worth, then look at the pipe again
            wall = time.time()
            for _ in range(batch):
                sim = sims[cursor]
                cursor = (cursor + 1) % len(sims)
                client.publish(sim.topic, sim.next_report(wall), qos=0)
            sent_here += batch
            total += batch
            sent.value = total
            client.loop(timeout=0)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()


def _connect(client_id: str, host: str, port: int) -> Any:
    """A paho client without a network thread (this loop drives it), connected; None if the broker is not there."""
    import paho.mqtt.client as paho  # noqa: PLC0415 - only the publisher processes need paho directly
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                         protocol=paho.MQTTv311)
    client.max_inflight_messages_set(100)
    client.connect(host, port, keepalive=30)
    deadline = time.monotonic() + 15
    while not client.is_connected():
        client.loop(timeout=0.05)
        if time.monotonic() > deadline:
            return None
    return client


def _publish_statuses(client: Any, sims: list[SimNode]) -> tuple[int, float]:
    started = time.monotonic()
    now = time.time()
    infos = [client.publish(wire.node_topic(s.node, "status"), s.status_payload(now), qos=1, retain=True)
             for s in sims]
    deadline = started + 120
    while not all(i.is_published() for i in infos) and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    return sum(1 for i in infos if i.is_published()), time.monotonic() - started


def write_keys(key_dir: Path, names: list[str]) -> None:
    """A key per simulated node in the controller's ``security.key_dir`` (next to any real agent's)."""
    key_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        write_key(key_dir, name)
    settled = time.time() - 60  # keys written a while ago: the controller's first load is not "racy"
    os.utime(key_dir, (settled, settled))


@dataclass
class Fleet:
    """The publisher processes of one fleet, with their sent counters."""

    nodes: int
    procs: list[Any] = field(default_factory=list)
    conns: list[Connection] = field(default_factory=list)
    counters: list[Any] = field(default_factory=list)

    @classmethod
    def start(cls, names: list[str], key_dir: Path, port: int, *, publishers: int, signed: bool,
              cleanup: list[Callable[[], None]], host: str = "127.0.0.1") -> Fleet:
        """``publishers`` processes sharing ``names`` round-robin, connected to the broker at ``host:port`` and
        idle. Each is also put on ``cleanup``, so a harness that dies half-way still ends them."""
        ctx = mp.get_context("spawn")
        fleet = cls(nodes=len(names))
        count = max(1, min(publishers, len(names)))
        for index in range(count):
            parent_end, child_end = ctx.Pipe()
            counter = ctx.Value("q", 0, lock=False)
            proc = ctx.Process(target=publisher_main, name=f"bench-pub-{index}", daemon=True, kwargs={
                "index": index, "nodes": names[index::count], "key_dir": str(key_dir), "signed": signed,
                "host": host, "port": port, "conn": child_end, "sent": counter})
            proc.start()
            cleanup.append(functools.partial(end_mp, proc))
            fleet.procs.append(proc)
            fleet.conns.append(parent_end)
            fleet.counters.append(counter)
        for conn in fleet.conns:
            if not conn.poll(120):
                raise RuntimeError("a publisher did not start")
            reply = conn.recv()
            if reply[0] != "ready":
                raise RuntimeError(str(reply[1]))
        return fleet

    def publish_statuses(self, timeout: float = 180) -> dict[str, Any]:
        """Every node's status, retained (QoS 1): how many the broker acknowledged, and how long it took."""
        replies = self.request(("statuses",), timeout=timeout)
        return {"published": sum(r[1] for r in replies), "publish_seconds": round(max(r[2] for r in replies), 2)}

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()

    def sent(self) -> int:
        return sum(int(c.value) for c in self.counters)

    def set_rate(self, rate: float) -> None:
        share = rate / len(self.conns)
        for conn in self.conns:
            conn.send(("rate", share))

    def cpu(self) -> float:
        return sum(cpu_seconds(psutil.Process(p.pid)) for p in self.procs if p.is_alive())

    def request(self, command: tuple[Any, ...], timeout: float) -> list[tuple[Any, ...]]:
        for conn in self.conns:
            conn.send(command)
        replies = []
        for conn in self.conns:
            if not conn.poll(timeout):
                raise RuntimeError(f"a publisher did not answer {command[0]!r} within {timeout}s")
            replies.append(conn.recv())
        return replies


# --- processes we own -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM when this script dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 - no threads run yet at these points


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def max_queued(nodes: int) -> int:
    try:
        from selfheal.broker_setup import max_queued as selfheal_max_queued  # noqa: PLC0415 - optional module
    except ImportError:
        return max(10_000, 4 * nodes)
    return selfheal_max_queued(nodes)


def start_broker(root: Path, nodes: int) -> tuple[subprocess.Popen[bytes], int]:
    if MOSQUITTO is None:
        raise SystemExit("mosquitto not found: apt-get install -y mosquitto")
    port = free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_queued_messages {max_queued(nodes)}\nmax_inflight_messages 100\n"
                    f"max_packet_size {wire.MAX_PAYLOAD + 16 * 1024}\nset_tcp_nodelay true\n")
    proc = start_process([MOSQUITTO, "-c", str(conf)], root / "mosquitto.log")
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return proc, port
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mosquitto did not start: {(root / 'mosquitto.log').read_text()[-2000:]}")
        time.sleep(0.05)


def selfheal_command() -> list[str]:
    script = Path(sys.executable).with_name("selfheal")
    return [str(script)] if script.exists() else [sys.executable, "-m", "selfheal"]

def end_mp(proc: Any) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)



# --- measuring --------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition → {name: [(labels, value)]}."""
    out: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is not None:
            out.setdefault(match.group(1), []).append((match.group(2) or "", float(match.group(3))))
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for lab, v in samples.get(name, []) if all(w in lab for w in wanted))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lab, value in samples.get(name, []):
        match = re.search(rf'{label}="([^"]*)"', lab)
        if match is not None and value:
            out[match.group(1)] = value
    return out


def cpu_seconds(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def wait_statuses(scrape: Callable[[], Samples], expected: int, *, stall: float, timeout: float) -> dict[str, Any]:
    """Until ``expected`` statuses reached the controller (``scrape``: its ``/metrics``), or none arrived for
    ``stall`` seconds, or ``timeout``: how many did, how many nodes it knows, what it refused, how long it took."""
    started = time.monotonic()
    last, last_change = -1.0, started
    while True:
        samples = scrape()
        received = metric(samples, "selfheal_messages_received_total", channel="status")
        now = time.monotonic()
        if received != last:
            last, last_change = received, now
        if received >= expected or now - last_change > stall or now - started > timeout:
            return {"received": received, "nodes_known": metric(samples, "selfheal_nodes"),
                    "rejected": by_label(samples, "selfheal_messages_rejected_total", "reason"),
                    "seconds": round(now - started, 2)}
        time.sleep(0.2)
