"""How many node reports per second the controller keeps up with, against the MQTT client it runs on.

Everything is real and on loopback: a Mosquitto this script starts on a free
port (``max_queued_messages`` above the fleet size, as ``selfheal broker init``
writes it), simulated agents in separate publisher processes speaking the real
wire format, and the real controller (``selfheal controller``) as a
subprocess with the built-in rulebook, a key for every simulated node in
``security.key_dir`` and every message signed with ``wire.sign_node_message``
(when ``selfheal.wire`` has it; otherwise unsigned, and the output says so).

For each fleet size:

1. Every node's ``NodeStatus`` is published retained (QoS 1), like the
   agent's. The controller, started afterwards, must learn all of them on
   subscribing: the script checks how many reached it (``/metrics``).
2. Three targets, one after the other, on the same broker and the same load:
   ``count`` (a bare aiomqtt subscriber on ``selfheal/v1/p/+/nodes/+/report``
   that only counts), ``decode`` (the same, also running
   ``wire.decode_node_message`` on each) and ``controller``. Each is driven
   through the same steps of offered load (reports/s, round-robin over the
   fleet, each a realistic report: host metrics, one mount, three units with
   HTTP probes, about 2.2 KB encoded and signed: the issue's 1.9 KB predates
   the fields ``UnitReport`` has since gained) after a warm-up, until it falls behind:
   accepted < 0.95 x sent, or its backlog (sent - received) grows by more
   than 5 % of the step's messages, in the step and in one more measurement
   at the same rate (``--retries``: on a shared machine one bad moment is
   not a ceiling).
3. Per step: offered, achieved (what the publishers really sent: below 0.97 x
   offered the generator is the bottleneck, which the table says, and the
   stepping stops), accepted (the controller's
   ``selfheal_messages_received_total{channel="report"}`` delta; the anchors'
   own counters), CPU of the target (psutil, share of one core) and RSS, the
   broker's and the generator's CPU, and for the controller the API latency
   (a small poller GETting ``/api/v1/nodes`` and ``/`` a few times a second).

The ceiling of a target is the highest rate it accepted in any step (no
more than was sent: draining a backlog is not a rate; at the step it fell
behind, that is its throughput when saturated);
the ratio controller / decode anchor compares ceilings. If the decode anchor
never fell behind, its ceiling is a lower bound and the ratio an upper bound.

Load model: each simulated node reports every ``fleet / offered`` seconds, so
``controller.offline_after`` is set to ``--offline-after`` (default 3600 s)
to keep node silence (not what this measures) from opening incidents.
Each publisher process speaks for its share of the nodes over one MQTT
connection (the controller sees the same topics and payloads as from real
agents; the broker sees fewer connections). The API poller's requests count
against the controller like any client's: ``--api-rate 0`` measures ingest
alone. The statuses are waited for before any report is sent (at most
``--status-timeout``), so at a large fleet a controller that evaluates the
whole fleet per message spends a long time there: that time is reported.
The machine is whatever it is: on a shared or small box, figures are noisy
and the publishers and the broker take CPU from the target; both are
reported per step.

    .venv/bin/python bench/ingest.py [--fleets 100,1000,10000] [--steps 10,25,50,100,...,3200,6400]
                                     [--step-seconds 12] [--publishers 2] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any, Literal

import httpx
import msgspec
import psutil

from selfheal import wire
from selfheal.errors import WireError
from selfheal.keys import read_key, write_key

DEFAULT_FLEETS = (100, 1000, 10_000)
DEFAULT_STEPS = (10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400)
QUICK_FLEETS = (20,)
QUICK_STEPS = (20, 40)
KEEP_UP = 0.95
"""A target keeps up when it accepts at least this share of what was sent, and its backlog stays flat."""
GENERATOR_OK = 0.97
"""Below this share of the offered rate actually sent, the generator is the bottleneck: stepping stops."""
REPORT_FILTER = f"{wire.PREFIX}/p/+/nodes/+/report"
UNITS = ("web", "etl", "train")
MOUNTS = ("/",)
SESSION = 1
MOSQUITTO = next((p for p in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/bin/mosquitto")
                  if p and os.access(p, os.X_OK)), None)
SIGN: Callable[..., Any] | None = getattr(wire, "sign_node_message", None)
"""``wire.sign_node_message(message, channel, key)``, when this version of selfheal signs node traffic."""
PR_SET_PDEATHSIG = 1
Target = Literal["count", "decode", "controller"]
TARGETS: tuple[Target, ...] = ("count", "decode", "controller")


# --- the simulated agents ---------------------------------------------------------------------------------


def node_name(index: int) -> str:
    return f"sim-{index:05d}"


def node_status(node: str, now: float) -> wire.NodeStatus:
    """What an agent publishes retained when it connects (``agent.app``'s ``_status``)."""
    return wire.NodeStatus(node=node, state="online", session=SESSION, version="bench", units=list(UNITS),
                           labels={"group": f"g{wire.bucket_of(node) % 8}", "bench": "ingest"},
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


def _child_setup() -> int:
    """In a child process: leave Ctrl-C to the parent (it stops us in order); return the parent's pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return os.getppid()


def publisher_main(*, index: int, nodes: list[str], key_dir: str, signed: bool, host: str, port: int,
                   conn: Connection, sent: Synchronized[int]) -> None:
    """A publisher process: its share of the fleet, round-robin, at the rate the parent sets.

    Commands on ``conn``: ``("statuses",)`` publishes every node's status retained (QoS 1) and answers
    ``("statuses", published, seconds)``; ``("rate", r)`` sets reports/s for this process (0: idle);
    ``("stop",)`` ends. ``sent`` counts reports handed to the socket."""
    parent = _child_setup()
    now = time.time()
    rng = random.Random(index)
    sims = [SimNode(n, read_key(key_dir, n) if signed else None, now, rng) for n in nodes]
    client = _connect(f"bench-ingest-pub-{index}-{os.getpid()}", host, port)
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


# --- the anchors ------------------------------------------------------------------------------------------


def anchor_main(kind: str, host: str, port: int, received: Synchronized[int], ready: Any) -> None:
    """A bare aiomqtt subscriber on every node's report topic, with the controller's client settings; counts
    each report (``count``) or also decodes it with ``wire.decode_node_message`` (``decode``)."""
    parent = _child_setup()
    import aiomqtt  # noqa: PLC0415 - only the anchor processes use aiomqtt

    async def run() -> None:
        counts = [0, 0]  # received, failed to decode

        async def publish_counts() -> None:
            while os.getppid() == parent:
                received.value = counts[0]
                await asyncio.sleep(0.02)
            os._exit(0)  # the harness died without stopping us

        async with aiomqtt.Client(host, port, identifier=f"bench-ingest-{kind}-{os.getpid()}", clean_session=True,
                                  protocol=aiomqtt.ProtocolVersion.V311, keepalive=10, timeout=5) as client:
            await client.subscribe(REPORT_FILTER, qos=1)
            flusher = asyncio.create_task(publish_counts())
            ready.set()
            decode = kind == "decode"
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
                if decode:
                    try:
                        wire.decode_node_message(str(message.topic), bytes(payload))
                    except WireError:
                        counts[1] += 1
                counts[0] += 1
            flusher.cancel()

    asyncio.run(run())


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


# --- measuring --------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text exposition → {name: [(labels, value)]}."""
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is not None:
            out.setdefault(match.group(1), []).append((match.group(2) or "", float(match.group(3))))
    return out


def metric(samples: dict[str, list[tuple[str, float]]], name: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for lab, v in samples.get(name, []) if all(w in lab for w in wanted))


def by_label(samples: dict[str, list[tuple[str, float]]], name: str, label: str) -> dict[str, float]:
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


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class ApiPoller:
    """One thread per endpoint GETting it ``rate`` times a second; latencies kept with their start time."""

    def __init__(self, base: str, paths: tuple[str, ...], rate: float, timeout: float = 10.0) -> None:
        self.base, self.paths, self.rate, self.timeout = base, paths, rate, timeout
        self.samples: list[tuple[float, str, float, bool]] = []  # (started, path, seconds, ok)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, args=(p,), daemon=True, name=f"poll{p}") for p in paths]
        self._lock = threading.Lock()

    def __enter__(self) -> ApiPoller:
        if self.rate > 0:
            for thread in self._threads:
                thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(self.timeout + 1)

    def _poll(self, path: str) -> None:
        with httpx.Client(base_url=self.base, timeout=self.timeout) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(path).status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.monotonic() - started
                with self._lock:
                    self.samples.append((started, path, took, ok))
                self._stop.wait(max(0.0, 1 / self.rate - took))

    def window(self, start: float, end: float) -> dict[str, Any]:
        with self._lock:
            chosen = [s for s in self.samples if start <= s[0] < end]
        latencies = [s[2] for s in chosen]
        out: dict[str, Any] = {"requests": len(chosen), "errors": sum(1 for s in chosen if not s[3])}
        for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
            value = percentile(latencies, q)
            out[name] = None if value is None else round(value * 1000, 1)
        out["max_ms"] = round(max(latencies) * 1000, 1) if latencies else None
        for path in self.paths:
            value = percentile([s[2] for s in chosen if s[1] == path], 0.99)
            out[f"p99_ms {path}"] = None if value is None else round(value * 1000, 1)
        return out


@dataclass
class Settings:
    steps: list[int]
    step_seconds: float
    settle: float
    warmup: float
    drain: float
    api_rate: float
    offline_after: float
    status_wait: float
    status_timeout: float
    retries: int


@dataclass
class Fleet:
    """The publisher processes of one fleet size, with their sent counters."""

    nodes: int
    procs: list[Any] = field(default_factory=list)
    conns: list[Connection] = field(default_factory=list)
    counters: list[Any] = field(default_factory=list)

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


class Subject:
    """A target as the stepping loop sees it: a process, a received-reports counter."""

    name: Target
    proc: psutil.Process

    def received(self) -> float:
        raise NotImplementedError


class AnchorSubject(Subject):
    def __init__(self, name: Target, process: Any, counter: Synchronized[int]) -> None:
        self.name, self.process, self.counter = name, process, counter
        self.proc = psutil.Process(process.pid)

    def received(self) -> float:
        return float(self.counter.value)


class ControllerSubject(Subject):
    def __init__(self, proc: subprocess.Popen[bytes], api: str) -> None:
        self.name = "controller"
        self.popen, self.api = proc, api
        self.proc = psutil.Process(proc.pid)
        self.http = httpx.Client(base_url=api, timeout=30.0)
        self.last: dict[str, list[tuple[str, float]]] = {}

    def scrape(self) -> dict[str, list[tuple[str, float]]]:
        self.last = parse_metrics(self.http.get("/metrics").text)
        return self.last

    def received(self) -> float:
        return metric(self.scrape(), "selfheal_messages_received_total", channel="report")


def snapshot(fleet: Fleet, subject: Subject, broker: psutil.Process) -> dict[str, float]:
    before = time.monotonic()
    sent_before = fleet.sent()
    received = subject.received()
    after = time.monotonic()
    return {"t": (before + after) / 2, "sent": (sent_before + fleet.sent()) / 2, "received": received,
            "cpu": cpu_seconds(subject.proc), "broker_cpu": cpu_seconds(broker), "generator_cpu": fleet.cpu()}


def step_figures(rate: int, a: dict[str, float], b: dict[str, float], base: float,
                 subject: Subject) -> dict[str, Any]:
    wall = b["t"] - a["t"]
    achieved = (b["sent"] - a["sent"]) / wall
    accepted = (b["received"] - a["received"]) / wall
    backlog_start = a["sent"] - base - a["received"]
    backlog_end = b["sent"] - base - b["received"]
    grown = backlog_end - backlog_start
    generator_ok = achieved >= GENERATOR_OK * rate
    kept_up = accepted >= KEEP_UP * achieved and grown <= (1 - KEEP_UP) * achieved * wall
    try:
        rss = subject.proc.memory_info().rss
    except psutil.Error:
        rss = 0
    return {"offered": rate, "achieved": round(achieved, 1), "accepted": round(accepted, 1),
            "seconds": round(wall, 2), "cpu": round((b["cpu"] - a["cpu"]) / wall, 3), "rss_mb": round(rss / 2**20, 1),
            "backlog_start": round(backlog_start), "backlog_end": round(backlog_end),
            "broker_cpu": round((b["broker_cpu"] - a["broker_cpu"]) / wall, 3),
            "generator_cpu": round((b["generator_cpu"] - a["generator_cpu"]) / wall, 3),
            "generator_ok": generator_ok, "kept_up": kept_up}


def run_steps(fleet: Fleet, subject: Subject, broker: psutil.Process, settings: Settings, *,
              poller: ApiPoller | None, say: Callable[[str], None]) -> dict[str, Any]:
    """Warm up at the first step's rate, then step the offered load up until the subject falls behind."""
    base = fleet.sent()
    steps: list[dict[str, Any]] = []
    limit = "steps exhausted"
    fleet.set_rate(settings.steps[0])
    time.sleep(settings.warmup)
    for rate in settings.steps:
        fleet.set_rate(rate)
        time.sleep(settings.settle)
        for attempt in range(settings.retries + 1):
            a = snapshot(fleet, subject, broker)
            time.sleep(settings.step_seconds)
            b = snapshot(fleet, subject, broker)
            figures = step_figures(rate, a, b, base, subject)
            figures["attempt"] = attempt + 1
            if poller is not None:
                figures["api"] = poller.window(a["t"], b["t"])
            steps.append(figures)
            say(format_step(subject.name, figures))
            if figures["kept_up"] or not figures["generator_ok"]:
                break  # a step that fell behind is measured again: one bad moment on a shared machine is not a ceiling
        if not figures["generator_ok"]:
            limit = f"generator bound at {rate}/s (sent {figures['achieved']:.0f}/s)"
            break
        if not figures["kept_up"]:
            limit = f"fell behind at {rate}/s" + (f" ({settings.retries + 1} times)" if settings.retries else "")
            break
    fleet.set_rate(0)
    drained_at = time.monotonic() + settings.drain
    sent = fleet.sent() - base
    while subject.received() < sent and time.monotonic() < drained_at:
        time.sleep(0.1)
    left = sent - subject.received()
    kept = [s["offered"] for s in steps if s["kept_up"] and s["generator_ok"]]
    # The ceiling: the most a step delivered (accepted, but no more than was sent: draining a backlog is not rate).
    return {"steps": steps, "ceiling": max((min(s["accepted"], s["achieved"]) for s in steps), default=0.0),
            "kept_up_at": max(kept, default=0), "limit": limit,
            "fell_behind": limit.startswith("fell behind"), "sent": round(sent), "unreceived_after_drain": round(left)}


def format_step(name: str, s: dict[str, Any]) -> str:
    api = s.get("api") or {}
    p99 = api.get("p99_ms")
    flags = ("" if s["kept_up"] else "  BEHIND") + ("" if s["generator_ok"] else "  GENERATOR-BOUND")
    return (f"  {name:<10} offered {s['offered']:>5}/s  sent {s['achieved']:>7.1f}/s  "
            f"accepted {s['accepted']:>7.1f}/s  cpu {s['cpu'] * 100:>5.1f}%  rss {s['rss_mb']:>7.1f} MB  "
            f"backlog {s['backlog_start']:>6}->"
            f"{s['backlog_end']:<6}" + (f"  api p99 {p99:.0f} ms" if p99 is not None else "") + flags)


# --- one fleet --------------------------------------------------------------------------------------------


@dataclass
class Run:
    root: Path
    signed: bool
    settings: Settings
    publishers: int
    say: Callable[[str], None]
    targets: list[Target]
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def fleet_run(self, nodes: int) -> dict[str, Any]:
        root = self.root / f"fleet-{nodes}"
        root.mkdir()
        key_dir = root / "keys"
        key_dir.mkdir()
        names = [node_name(i) for i in range(nodes)]
        if self.signed:
            for name in names:
                write_key(key_dir, name)
        settled = time.time() - 60  # keys written a while ago: the controller's first load is not "racy"
        os.utime(key_dir, (settled, settled))
        broker_proc, port = start_broker(root, nodes)
        self.cleanup.append(lambda: stop_process(broker_proc))
        broker = psutil.Process(broker_proc.pid)
        fleet = self.start_publishers(names, key_dir, port)
        result: dict[str, Any] = {"nodes": nodes, "broker_max_queued_messages": max_queued(nodes)}
        replies = fleet.request(("statuses",), timeout=180)
        published = sum(r[1] for r in replies)
        result["statuses"] = {"published": published, "publish_seconds": round(max(r[2] for r in replies), 2)}
        self.say(f"fleet {nodes}: {published} statuses published retained in {result['statuses']['publish_seconds']}s "
                 f"(broker max_queued_messages {max_queued(nodes)})")
        targets: dict[str, Any] = {}
        for name in self.targets:
            if name == "controller":
                targets[name] = self.controller_run(root, fleet, broker, port=port, nodes=nodes,
                                                    key_dir=key_dir, result=result)
            else:
                targets[name] = self.anchor_run(name, fleet, broker, port)
        result["targets"] = targets
        decode, ctl = targets.get("decode"), targets.get("controller")
        if decode is not None and ctl is not None and decode["ceiling"] > 0:
            result["ratio_controller_to_decode"] = round(ctl["ceiling"] / decode["ceiling"], 4)
            result["ratio_is"] = "exact" if decode["fell_behind"] and ctl["fell_behind"] else (
                "upper bound" if ctl["fell_behind"] else "lower bound" if decode["fell_behind"] else "unbounded")
        for conn in fleet.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in fleet.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
        stop_process(broker_proc)
        return result

    def start_publishers(self, names: list[str], key_dir: Path, port: int) -> Fleet:
        ctx = mp.get_context("spawn")
        fleet = Fleet(nodes=len(names))
        count = max(1, min(self.publishers, len(names)))
        for index in range(count):
            parent_end, child_end = ctx.Pipe()
            counter = ctx.Value("q", 0, lock=False)
            proc = ctx.Process(target=publisher_main, name=f"bench-pub-{index}", daemon=True, kwargs={
                "index": index, "nodes": names[index::count], "key_dir": str(key_dir), "signed": self.signed,
                "host": "127.0.0.1", "port": port, "conn": child_end, "sent": counter})
            proc.start()
            self.cleanup.append(functools.partial(_end_mp, proc))
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

    def anchor_run(self, name: Target, fleet: Fleet, broker: psutil.Process, port: int) -> dict[str, Any]:
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0, lock=False)
        ready = ctx.Event()
        proc = ctx.Process(target=anchor_main, name=f"bench-{name}", daemon=True,
                           args=(name, "127.0.0.1", port, counter, ready))
        proc.start()
        self.cleanup.append(lambda: _end_mp(proc))
        if not ready.wait(60):
            raise RuntimeError(f"the {name} anchor did not subscribe")
        subject = AnchorSubject(name, proc, counter)
        try:
            return run_steps(fleet, subject, broker, self.settings, poller=None, say=self.say)
        finally:
            _end_mp(proc)

    def controller_run(self, root: Path, fleet: Fleet, broker: psutil.Process, *, port: int, nodes: int,
                       key_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
        api_port = free_port()
        token = root / "api.token"
        token.write_text("bench-ingest-token\n")
        token.chmod(0o600)
        config = root / "controller.toml"
        config.write_text(
            f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n'
            f'[controller]\nlisten = "127.0.0.1:{api_port}"\nstate_dir = "{root / "state"}"\n'
            f"offline_after = {self.settings.offline_after}\nmax_nodes = {max(nodes, 1)}\n"
            f'[security]\nkey_dir = "{key_dir}"\napi_token_file = "{token}"\n'
            f'[log]\nformat = "json"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("SELFHEAL_")}
        started = time.monotonic()
        popen = start_process([*selfheal_command(), "controller", "--config", str(config)], root / "controller.log",
                              env)
        self.cleanup.append(lambda: stop_process(popen))
        api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/readyz", timeout=2).status_code == 200:
                    break
            if popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the controller did not get ready: {(root / 'controller.log').read_text()[-3000:]}")
            time.sleep(0.1)
        ready_s = time.monotonic() - started
        subject = ControllerSubject(popen, api)
        statuses = self.wait_statuses(subject, nodes)
        statuses["ready_seconds"] = round(ready_s, 2)
        result["statuses"].update(statuses)
        self.say(f"  controller ready in {ready_s:.1f}s; statuses reached it: {statuses['received']:.0f}/{nodes} "
                 f"(nodes known {statuses['nodes_known']:.0f}) in {statuses['seconds']}s")
        try:
            with ApiPoller(api, ("/api/v1/nodes", "/"), self.settings.api_rate) as poller:
                out = run_steps(fleet, subject, broker, self.settings, poller=poller, say=self.say)
            samples = subject.scrape()
            out["rejected"] = by_label(samples, "selfheal_messages_rejected_total", "reason")
            out["received_by_channel"] = by_label(samples, "selfheal_messages_received_total", "channel")
            return out
        finally:
            subject.http.close()
            stop_process(popen)

    def wait_statuses(self, subject: ControllerSubject, nodes: int) -> dict[str, Any]:
        """Until every status arrived, or none arrived for a while (or ``--status-timeout``): how many reached
        the controller. Reports wait meanwhile: the steps measure a controller that knows its fleet."""
        started = time.monotonic()
        last, last_change = -1.0, started
        while True:
            samples = subject.scrape()
            received = metric(samples, "selfheal_messages_received_total", channel="status")
            now = time.monotonic()
            if received != last:
                last, last_change = received, now
            if (received >= nodes or now - last_change > self.settings.status_wait
                    or now - started > self.settings.status_timeout):
                return {"received": received, "nodes_known": metric(samples, "selfheal_nodes"),
                        "rejected": by_label(samples, "selfheal_messages_rejected_total", "reason"),
                        "seconds": round(now - started, 2)}
            time.sleep(0.2)


def _end_mp(proc: Any) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


# --- output -----------------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> Iterator[str]:
    yield ""
    yield f"fleet {result['nodes']} nodes"
    st = result["statuses"]
    yield (f"  retained statuses: {st['published']} published, {st.get('received', 0):.0f} reached the controller "
           f"in {st.get('seconds', 0):g}s, nodes known {st.get('nodes_known', 0):.0f}")
    yield (f"  {'target':<10} {'offered':>7} {'sent':>8} {'accepted':>9} {'cpu %':>6} {'rss MB':>7} {'broker %':>8} "
           f"{'gen %':>6} {'api p99 ms':>10}  verdict")
    for name, target in result["targets"].items():
        for s in target["steps"]:
            p99 = (s.get("api") or {}).get("p99_ms")
            verdict = ("ok" if s["kept_up"] else "BEHIND") + (" (again)" if s.get("attempt", 1) > 1 else "")
            if not s["generator_ok"]:
                verdict += ", generator bound"
            yield (f"  {name:<10} {s['offered']:>7} {s['achieved']:>8.1f} {s['accepted']:>9.1f} {s['cpu'] * 100:>6.1f} "
                   f"{s['rss_mb']:>7.1f} {s['broker_cpu'] * 100:>8.1f} {s['generator_cpu'] * 100:>6.1f} "
                   f"{'-' if p99 is None else f'{p99:.0f}':>10}  {verdict}")
    for name, target in result["targets"].items():
        kept = f"kept up at {target['kept_up_at']}/s" if target["kept_up_at"] else "kept up at no step"
        yield f"  {name:<10} ceiling {target['ceiling']:>8.1f} reports/s ({kept}; {target['limit']})"
    if "ratio_controller_to_decode" in result:
        yield f"  controller / decode anchor: {result['ratio_controller_to_decode']:.4f} ({result['ratio_is']})"


def parse_list(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--fleets", type=parse_list, default=None, help="fleet sizes (default 100,1000,10000)")
    parser.add_argument("--steps", type=parse_list, default=None,
                        help="offered reports/s, stepped up (default 10,25,50,100,...,3200,6400)")
    parser.add_argument("--step-seconds", type=float, default=None, help="measured seconds per step (default 12)")
    parser.add_argument("--settle", type=float, default=None, help="seconds at a new rate before measuring (default 2)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds at the first rate first (default 5)")
    parser.add_argument("--status-timeout", type=float, default=900.0,
                        help="most seconds to wait for the retained statuses to reach the controller (default 900)")
    parser.add_argument("--retries", type=int, default=None,
                        help="measure a step that fell behind this many times more before stopping (default 1)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    parser.add_argument("--api-rate", type=float, default=2.0,
                        help="GETs per second on each of /api/v1/nodes and / during controller steps (0: none)")
    parser.add_argument("--offline-after", type=float, default=3600.0,
                        help="controller.offline_after: above the longest report gap (fleet / offered)")
    parser.add_argument("--targets", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                        default=list(TARGETS), help="which of count,decode,controller to measure (default all)")
    parser.add_argument("--quick", action="store_true", help="a short run for a test (20 nodes, two short steps)")
    parser.add_argument("--json", action="store_true", help="end with one line holding a JSON object of all figures")
    args = parser.parse_args()
    quick = args.quick
    settings = Settings(
        steps=args.steps or list(QUICK_STEPS if quick else DEFAULT_STEPS),
        step_seconds=args.step_seconds or (2.0 if quick else 12.0),
        settle=args.settle if args.settle is not None else (0.5 if quick else 2.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if quick else 5.0),
        drain=2.0 if quick else 5.0, api_rate=args.api_rate, offline_after=args.offline_after,
        status_wait=5.0 if quick else 15.0, status_timeout=args.status_timeout,
        retries=args.retries if args.retries is not None else (0 if quick else 1))
    fleets = args.fleets or list(QUICK_FLEETS if quick else DEFAULT_FLEETS)

    def say(line: str) -> None:
        print(line, flush=True)

    signed = SIGN is not None
    sample = SimNode("sim-00000", bytes(32) if signed else None, time.time(), random.Random(0)).next_report(time.time())
    say(f"selfheal ingest bench: fleets {fleets}, steps {settings.steps} reports/s, {settings.step_seconds:g}s each "
        f"(+{settings.settle:g}s settle, {settings.warmup:g}s warm-up), {args.publishers} publisher processes, "
        f"report {len(sample)} bytes, " + ("signed with wire.sign_node_message" if signed else
                                            "UNSIGNED: selfheal.wire has no sign_node_message"))
    say(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(a shared machine makes every figure noisy)")
    root = Path(tempfile.mkdtemp(prefix="selfheal-bench-ingest-"))
    targets = [t for t in TARGETS if t in args.targets]
    run = Run(root=root, signed=signed, settings=settings, publishers=args.publishers, say=say, targets=targets)
    figures: dict[str, Any] = {
        "bench": "ingest", "signed": signed, "report_bytes": len(sample), "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "keep_up": KEEP_UP, "generator_ok": GENERATOR_OK,
        "settings": {"steps": settings.steps, "step_seconds": settings.step_seconds, "settle": settings.settle,
                     "warmup": settings.warmup, "retries": settings.retries, "publishers": args.publishers,
                     "api_rate": settings.api_rate,
                     "offline_after": settings.offline_after},
        "fleets": []}

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    code = 0
    try:
        for nodes in fleets:
            result = run.fleet_run(nodes)
            figures["fleets"].append(result)
            for line in table(result):
                say(line)
    except KeyboardInterrupt:
        say("interrupted: stopping every process this run started")
        code = 130
    finally:
        for stop in reversed(run.cleanup):
            with contextlib.suppress(Exception):
                stop()
        shutil.rmtree(root, ignore_errors=True)
    figures["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(figures), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
