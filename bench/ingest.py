"""How many node reports per second the controller keeps up with, against the MQTT client it runs on.

Everything is real and on loopback: a Mosquitto this script starts on a free
port (``max_queued_messages`` above the fleet size, as ``selfheal broker init``
writes it), simulated agents in separate publisher processes speaking the real
wire format (``bench/simulated.py``, shared with ``bench/mttr.py``), and the
real controller (``selfheal controller``) as a subprocess with the built-in
rulebook, a key for every simulated node in ``security.key_dir`` and every
message signed with ``wire.sign_node_message`` (when ``selfheal.wire`` has it;
otherwise unsigned, and the output says so).

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
reported per step, and so is what the rest of the machine took (``others``:
every core's busy time less the target's, the broker's and the generator's).

Scale-out (issue 16): ``--controllers 1,2 --postgres URL`` runs the
controller target once per count N, each time N controller processes
(``[controller] id`` ``c1``...) on a new database the bench creates on that
server and drops afterwards (the URL names a database to connect to for that,
and a user allowed to create databases). Each subscribes only to the topics of
the buckets whose leases it holds; the steps start once the 64 leases are
settled (every bucket held, live, by the member rendezvous hashing gives it,
read in ``bucket_leases``) and the controllers together know every node. The
accepted rate is the sum of their ``selfheal_messages_received_total
{channel="report"}`` counters, CPU and RSS the sums of theirs; the API
poller, if any, polls ``c1`` only. The table ends with the ratio of the two
ceilings, two controllers / one (the issue's goal: at least 1.7); only the
controller target runs unless ``--targets`` says otherwise.

    .venv/bin/python bench/ingest.py [--fleets 100,1000,10000] [--steps 10,25,50,100,...,3200,6400]
                                     [--step-seconds 12] [--publishers 2] [--quick] [--json]
                                     [--controllers 1,2 --postgres postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil

from bench.simulated import (
    GENERATOR_OK,
    KEEP_UP,
    SIGN,
    Fleet,
    Samples,
    SimNode,
    by_label,
    child_setup,
    cpu_seconds,
    end_mp,
    free_port,
    max_queued,
    metric,
    node_name,
    parse_metrics,
    selfheal_command,
    start_broker,
    start_process,
    stop_process,
    wait_statuses,
    write_keys,
)
from selfheal import wire
from selfheal.errors import WireError

DEFAULT_FLEETS = (100, 1000, 10_000)
DEFAULT_STEPS = (10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400)
QUICK_FLEETS = (20,)
QUICK_STEPS = (20, 40)
REPORT_FILTER = f"{wire.PREFIX}/p/+/nodes/+/report"
Target = Literal["count", "decode", "controller"]
TARGETS: tuple[Target, ...] = ("count", "decode", "controller")


# --- the anchors ------------------------------------------------------------------------------------------


def anchor_main(kind: str, host: str, port: int, received: Synchronized[int], ready: Any) -> None:
    """A bare aiomqtt subscriber on every node's report topic, with the controller's client settings; counts
    each report (``count``) or also decodes it with ``wire.decode_node_message`` (``decode``)."""
    parent = child_setup()
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


# --- measuring --------------------------------------------------------------------------------------------


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



class Subject:
    """A target as the stepping loop sees it: its process(es), a received-reports counter."""

    name: str
    proc: psutil.Process

    def received(self) -> float:
        raise NotImplementedError

    def cpu(self) -> float:
        return cpu_seconds(self.proc)

    def rss(self) -> int:
        try:
            return int(self.proc.memory_info().rss)
        except psutil.Error:
            return 0


class AnchorSubject(Subject):
    def __init__(self, name: str, process: Any, counter: Synchronized[int]) -> None:
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
        self.last: Samples = {}

    def scrape(self) -> Samples:
        self.last = parse_metrics(self.http.get("/metrics").text)
        return self.last

    def received(self) -> float:
        return metric(self.scrape(), "selfheal_messages_received_total", channel="report")


class ControllersSubject(Subject):
    """Several controllers sharing one PostgreSQL store, each subscribed to its own buckets' topics: what they
    accepted is the sum of their report counters; CPU and RSS are their sums too."""

    def __init__(self, name: str, procs: list[subprocess.Popen[bytes]], apis: list[str]) -> None:
        self.name = name
        self.popens = procs
        self.procs = [psutil.Process(p.pid) for p in procs]
        self.proc = self.procs[0]
        self.http = [httpx.Client(base_url=api, timeout=30.0) for api in apis]

    def scrape_each(self) -> list[Samples]:
        return [parse_metrics(client.get("/metrics").text) for client in self.http]

    def scrape(self) -> Samples:
        merged: Samples = {}
        for samples in self.scrape_each():
            for name, values in samples.items():
                merged.setdefault(name, []).extend(values)
        return merged

    def received(self) -> float:
        return metric(self.scrape(), "selfheal_messages_received_total", channel="report")

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.procs)

    def rss(self) -> int:
        total = 0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                total += int(proc.memory_info().rss)
        return total

    def close(self) -> None:
        for client in self.http:
            client.close()


def snapshot(fleet: Fleet, subject: Subject, broker: psutil.Process) -> dict[str, float]:
    before = time.monotonic()
    sent_before = fleet.sent()
    received = subject.received()
    after = time.monotonic()
    return {"t": (before + after) / 2, "sent": (sent_before + fleet.sent()) / 2, "received": received,
            "cpu": subject.cpu(), "broker_cpu": cpu_seconds(broker), "generator_cpu": fleet.cpu(),
            "machine_cpu": machine_busy()}


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (every process, every core): what the bench's own processes
    did not take of it was taken by others on a shared machine."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def step_figures(rate: int, a: dict[str, float], b: dict[str, float], base: float,
                 subject: Subject) -> dict[str, Any]:
    wall = b["t"] - a["t"]
    achieved = (b["sent"] - a["sent"]) / wall
    accepted = (b["received"] - a["received"]) / wall
    backlog_start = a["sent"] - base - a["received"]
    backlog_end = b["sent"] - base - b["received"]
    grown = backlog_end - backlog_start
    generator_ok = achieved >= GENERATOR_OK * rate
    kept_up = accepted >= KEEP_UP * achieved and grown <= (1 - KEEP_UP) * achieved * wall  # and the backlog is flat
    rss = subject.rss()
    return {"offered": rate, "achieved": round(achieved, 1), "accepted": round(accepted, 1),
            "seconds": round(wall, 2), "cpu": round((b["cpu"] - a["cpu"]) / wall, 3), "rss_mb": round(rss / 2**20, 1),
            "backlog_start": round(backlog_start), "backlog_end": round(backlog_end),
            "broker_cpu": round((b["broker_cpu"] - a["broker_cpu"]) / wall, 3),
            "generator_cpu": round((b["generator_cpu"] - a["generator_cpu"]) / wall, 3),
            "machine_cpu": round((b["machine_cpu"] - a["machine_cpu"]) / wall, 3),
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
            f"{s['backlog_end']:<6}" + (f"  api p99 {p99:.0f} ms" if p99 is not None else "")
            + f"  others {others(s) * 100:.0f}%" + flags)


def others(s: dict[str, Any]) -> float:
    """Cores' worth of CPU (1.0: one core) the machine spent outside the target, the broker and the generator."""
    busy = float(s.get("machine_cpu", 0.0)) - float(s["cpu"]) - float(s["broker_cpu"]) - float(s["generator_cpu"])
    return max(0.0, busy)


# --- one fleet --------------------------------------------------------------------------------------------


@dataclass
class Run:
    root: Path
    signed: bool
    settings: Settings
    publishers: int
    say: Callable[[str], None]
    targets: list[Target]
    controllers: list[int] = field(default_factory=list)
    """Scale-out: controller processes per run on a throwaway PostgreSQL database (empty: the SQLite path)."""
    postgres: str = ""
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def fleet_run(self, nodes: int) -> dict[str, Any]:
        root = self.root / f"fleet-{nodes}"
        root.mkdir()
        key_dir = root / "keys"
        names = [node_name(i) for i in range(nodes)]
        write_keys(key_dir, names if self.signed else [])
        broker_proc, port = start_broker(root, nodes)
        self.cleanup.append(lambda: stop_process(broker_proc))
        broker = psutil.Process(broker_proc.pid)
        fleet = Fleet.start(names, key_dir, port, publishers=self.publishers, signed=self.signed,
                            cleanup=self.cleanup)
        result: dict[str, Any] = {"nodes": nodes, "broker_max_queued_messages": max_queued(nodes)}
        result["statuses"] = fleet.publish_statuses()
        self.say(f"fleet {nodes}: {result['statuses']['published']} statuses published retained in "
                 f"{result['statuses']['publish_seconds']}s (broker max_queued_messages {max_queued(nodes)})")
        targets: dict[str, Any] = {}
        for name in self.targets:
            if name == "controller" and self.controllers:
                for count in self.controllers:
                    targets[f"pg-{count}"] = self.controllers_run(root, fleet, broker, port=port, nodes=nodes,
                                                                 key_dir=key_dir, count=count, result=result)
            elif name == "controller":
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
        one, two = targets.get("pg-1"), targets.get("pg-2")
        if one is not None and two is not None and one["ceiling"] > 0:
            result["ratio_two_to_one"] = round(two["ceiling"] / one["ceiling"], 3)
            result["ratio_two_to_one_is"] = "exact" if one["fell_behind"] and two["fell_behind"] else (
                "upper bound" if two["fell_behind"] else "lower bound" if one["fell_behind"] else "unbounded")
        fleet.stop()
        stop_process(broker_proc)
        return result

    def anchor_run(self, name: Target, fleet: Fleet, broker: psutil.Process, port: int) -> dict[str, Any]:
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0, lock=False)
        ready = ctx.Event()
        proc = ctx.Process(target=anchor_main, name=f"bench-{name}", daemon=True,
                           args=(name, "127.0.0.1", port, counter, ready))
        proc.start()
        self.cleanup.append(lambda: end_mp(proc))
        if not ready.wait(60):
            raise RuntimeError(f"the {name} anchor did not subscribe")
        subject = AnchorSubject(name, proc, counter)
        try:
            return run_steps(fleet, subject, broker, self.settings, poller=None, say=self.say)
        finally:
            end_mp(proc)

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
        wait_ready(popen, api, root / "controller.log")
        ready_s = time.monotonic() - started
        subject = ControllerSubject(popen, api)
        # Reports wait meanwhile: the steps measure a controller that knows its fleet.
        statuses = wait_statuses(subject.scrape, nodes, stall=self.settings.status_wait,
                                 timeout=self.settings.status_timeout)
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


    def controllers_run(self, root: Path, fleet: Fleet, broker: psutil.Process, *, port: int, nodes: int,
                        key_dir: Path, count: int, result: dict[str, Any]) -> dict[str, Any]:
        """``count`` controllers ``c1``... on a new database on ``self.postgres``, stepped like one controller."""
        name = f"pg-{count}"
        database = f"selfheal_ingest_{os.getpid()}_{time.monotonic_ns()}"
        pg_query(self.postgres, f'CREATE DATABASE "{database}"')
        self.cleanup.append(lambda: drop_database(self.postgres, database))
        store_url = f"{self.postgres.rpartition('/')[0]}/{database}"
        members = [f"c{i}" for i in range(1, count + 1)]
        token = root / "api.token"
        token.write_text("bench-ingest-token\n")
        token.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SELFHEAL_")}
        popens: list[subprocess.Popen[bytes]] = []
        apis: list[str] = []
        started = time.monotonic()
        for cid in members:
            api_port = free_port()
            config = root / f"{name}-{cid}.toml"
            config.write_text(
                f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n'
                f'[controller]\nid = "{cid}"\nlisten = "127.0.0.1:{api_port}"\n'
                f'state_dir = "{root / name / cid}"\n'
                f"offline_after = {self.settings.offline_after}\nmax_nodes = {max(nodes, 1)}\n"
                f'[store]\nurl = "{store_url}"\n'
                f'[security]\nkey_dir = "{key_dir}"\napi_token_file = "{token}"\n'
                f'[log]\nformat = "json"\n')
            log = root / f"{name}-{cid}.log"
            popen = start_process([*selfheal_command(), "controller", "--config", str(config)], log, env)
            self.cleanup.append(lambda popen=popen: stop_process(popen))  # type: ignore[misc]
            popens.append(popen)
            apis.append(f"http://127.0.0.1:{api_port}")
        try:
            for popen, api, cid in zip(popens, apis, members, strict=True):
                wait_ready(popen, api, root / f"{name}-{cid}.log")
            ready_s = time.monotonic() - started
            settle_s = wait_settled(store_url, members, popens)
            subject = ControllersSubject(name, popens, apis)
            statuses = wait_known(subject, nodes, stall=self.settings.status_wait,
                                  timeout=self.settings.status_timeout)
            statuses.update(ready_seconds=round(ready_s, 2), leases_settled_seconds=round(settle_s, 2))
            result["statuses"][name] = statuses
            self.say(f"  {name}: {count} controller(s) on PostgreSQL ready in {ready_s:.1f}s, 64 leases settled in "
                     f"{settle_s:.1f}s more; nodes known {statuses['nodes_known']:.0f}/{nodes} "
                     f"(per controller {statuses['nodes_known_each']}) in {statuses['seconds']}s")
            try:
                with ApiPoller(apis[0], ("/api/v1/nodes", "/"), self.settings.api_rate) as poller:
                    out = run_steps(fleet, subject, broker, self.settings, poller=poller, say=self.say)
                samples = subject.scrape()
                out["rejected"] = by_label(samples, "selfheal_messages_rejected_total", "reason")
                out["received_by_channel"] = by_label(samples, "selfheal_messages_received_total", "channel")
                out["reports_each"] = [metric(s, "selfheal_messages_received_total", channel="report")
                                       for s in subject.scrape_each()]
                out["controllers"] = count
                return out
            finally:
                subject.close()
        finally:
            for popen in popens:
                stop_process(popen)
            drop_database(self.postgres, database)


def drop_database(server: str, database: str) -> None:
    with contextlib.suppress(Exception):
        pg_query(server, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def pg_query(url: str, sql: str) -> list[Any]:
    """One statement on PostgreSQL (asyncpg, imported only for ``--controllers``)."""
    import asyncpg  # noqa: PLC0415 - the SQLite path does not need it

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return list(await conn.fetch(sql, timeout=30))
        finally:
            await conn.close(timeout=5)
    return asyncio.run(run())


def wait_ready(popen: subprocess.Popen[bytes], api: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api}/readyz", timeout=2).status_code == 200:
                return
        if popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"a controller did not get ready: {log.read_text()[-3000:]}")
        time.sleep(0.1)


def wait_settled(store_url: str, members: list[str], popens: list[subprocess.Popen[bytes]],
                 timeout: float = 120) -> float:
    """Until every bucket is held, live by the database's clock, by the member rendezvous hashing gives it."""
    from controller.leases import assign  # noqa: PLC0415 - only the PostgreSQL path needs it

    expected = assign(range(wire.BUCKETS), members)
    started = time.monotonic()
    while True:
        with contextlib.suppress(OSError, RuntimeError):
            rows = pg_query(store_url, "SELECT bucket, owner, expires_at > now() AS live FROM bucket_leases")
            held = {int(r["bucket"]): (r["owner"], bool(r["live"])) for r in rows}
            if all(held.get(b) == (owner, True) for b, owner in expected.items()):
                return time.monotonic() - started
        if any(p.poll() is not None for p in popens) or time.monotonic() - started > timeout:
            raise RuntimeError(f"the 64 leases did not settle over {members} within {timeout:g}s")
        time.sleep(0.2)


def wait_known(subject: ControllersSubject, expected: int, *, stall: float, timeout: float) -> dict[str, Any]:
    """Until the controllers together know ``expected`` nodes (each only its buckets'), or no change for
    ``stall`` seconds, or ``timeout``: statuses received (a controller that held a bucket before the leases
    settled counted its statuses too), nodes known in all and per controller, how long it took."""
    started = time.monotonic()
    last, last_change = -1.0, started
    while True:
        each = subject.scrape_each()
        known = [metric(s, "selfheal_nodes") for s in each]
        now = time.monotonic()
        if sum(known) != last:
            last, last_change = sum(known), now
        if sum(known) >= expected or now - last_change > stall or now - started > timeout:
            return {"received": sum(metric(s, "selfheal_messages_received_total", channel="status") for s in each),
                    "nodes_known": sum(known), "nodes_known_each": [round(k) for k in known],
                    "rejected": by_label(subject.scrape(), "selfheal_messages_rejected_total", "reason"),
                    "seconds": round(now - started, 2)}
        time.sleep(0.2)


# --- output -----------------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> Iterator[str]:
    yield ""
    yield f"fleet {result['nodes']} nodes"
    st = result["statuses"]
    if "received" in st:
        yield (f"  retained statuses: {st['published']} published, {st.get('received', 0):.0f} reached the controller "
               f"in {st.get('seconds', 0):g}s, nodes known {st.get('nodes_known', 0):.0f}")
    for name, each in st.items():
        if isinstance(each, dict) and "nodes_known_each" in each:
            yield (f"  {name}: retained statuses: {each['received']:.0f} received in all, nodes known "
                   f"{each['nodes_known']:.0f} (per controller {each['nodes_known_each']}) in {each['seconds']:g}s")
    yield (f"  {'target':<10} {'offered':>7} {'sent':>8} {'accepted':>9} {'cpu %':>6} {'rss MB':>7} {'broker %':>8} "
           f"{'gen %':>6} {'others %':>8} {'api p99 ms':>10}  verdict")
    for name, target in result["targets"].items():
        for s in target["steps"]:
            p99 = (s.get("api") or {}).get("p99_ms")
            verdict = ("ok" if s["kept_up"] else "BEHIND") + (" (again)" if s.get("attempt", 1) > 1 else "")
            if not s["generator_ok"]:
                verdict += ", generator bound"
            yield (f"  {name:<10} {s['offered']:>7} {s['achieved']:>8.1f} {s['accepted']:>9.1f} {s['cpu'] * 100:>6.1f} "
                   f"{s['rss_mb']:>7.1f} {s['broker_cpu'] * 100:>8.1f} {s['generator_cpu'] * 100:>6.1f} "
                   f"{others(s) * 100:>8.1f} {'-' if p99 is None else f'{p99:.0f}':>10}  {verdict}")
    for name, target in result["targets"].items():
        kept = f"kept up at {target['kept_up_at']}/s" if target["kept_up_at"] else "kept up at no step"
        yield f"  {name:<10} ceiling {target['ceiling']:>8.1f} reports/s ({kept}; {target['limit']})"
    if "ratio_controller_to_decode" in result:
        yield f"  controller / decode anchor: {result['ratio_controller_to_decode']:.4f} ({result['ratio_is']})"
    for name, target in result["targets"].items():
        if "reports_each" in target:
            yield f"  {name:<10} reports accepted per controller: {[round(x) for x in target['reports_each']]}"
    if "ratio_two_to_one" in result:
        yield (f"  two controllers / one (PostgreSQL): {result['ratio_two_to_one']:.3f} "
               f"({result['ratio_two_to_one_is']}; goal >= 1.7)")


def parse_list(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
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
                        default=None, help="which of count,decode,controller to measure (default all; with "
                                           "--controllers: controller)")
    parser.add_argument("--controllers", type=parse_list, default=None,
                        help="scale-out: run the controller target with each of these numbers of controller "
                             "processes on a throwaway PostgreSQL database (e.g. 1,2; needs --postgres)")
    parser.add_argument("--postgres", default=None,
                        help="with --controllers: a PostgreSQL server's URL, a database to connect to and a user "
                             "allowed to create databases (postgresql://postgres@127.0.0.1:5432/postgres)")
    parser.add_argument("--quick", action="store_true", help="a short run for a test (20 nodes, two short steps)")
    parser.add_argument("--json", action="store_true", help="end with one line holding a JSON object of all figures")
    args = parser.parse_args()
    if args.controllers and not args.postgres:
        parser.error("--controllers needs --postgres URL")
    if args.targets is None:
        args.targets = ["controller"] if args.controllers else list(TARGETS)
    return args


def main() -> int:
    args = parse_args()
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
    run = Run(root=root, signed=signed, settings=settings, publishers=args.publishers, say=say, targets=targets,
              controllers=args.controllers or [], postgres=args.postgres or "")
    figures: dict[str, Any] = {
        "bench": "ingest", "signed": signed, "report_bytes": len(sample), "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "keep_up": KEEP_UP, "generator_ok": GENERATOR_OK,
        "settings": {"steps": settings.steps, "step_seconds": settings.step_seconds, "settle": settings.settle,
                     "warmup": settings.warmup, "retries": settings.retries, "publishers": args.publishers,
                     "api_rate": settings.api_rate,
                     "offline_after": settings.offline_after, "controllers": args.controllers or None},
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
