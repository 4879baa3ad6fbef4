"""Soak: a fleet with random faults for a long while; does the controller or an agent grow after warm-up?

Everything is real and on loopback, as in ``bench/ingest.py`` and
``bench/mttr.py``: a Mosquitto this script starts (``max_queued_messages``
above the fleet), the real controller (``selfheal controller``) and one real
agent (``selfheal agent``, node ``soak-agent``) with two real units, ``web``
(``python -m http.server`` behind an HTTP probe, the MTTR bench's service) and
``worker`` (a Python loop). Beside them ``--nodes`` simulated nodes
(``bench/simulated.py``'s ``SimNode``: the real wire format, each signed with
its own key in the controller's ``security.key_dir``) in ``--publishers``
processes, reporting ``--rate`` reports/s together (each node every
``nodes / rate`` seconds; the defaults, 1,000 nodes at 100/s, use a small
share of a 2-core machine). Their ``etl`` unit also reports progress, so it
can stall. Unlike the ingest bench's nodes these answer commands: a
``restart_unit``, ``stop_unit`` or ``start_unit`` for one of their units is
acked (``CommandResult`` done), the unit starts afresh (``UnitStarted``, a new
pid, one more restart) and a report follows at once, as an agent's would.

Faults, drawn from ``--seed``:

- on simulated nodes, ``--fault-rate`` a minute on average (exponential gaps),
  each on a node with no fault in hand, one of: ``crash`` (a unit reports
  exited, killed by SIGKILL, with a ``UnitExited`` event), ``hang`` (``web``'s
  HTTP probe fails from then on, with a ``ProbeChanged`` event), ``stall``
  (``etl``'s progress stops moving) — each lasting until the controller's
  command heals it, or ``HOLD`` seconds at most (counted ``expired``: the
  agent's own fallback would have restarted it) — and ``silent`` (the node
  stops reporting for 1.5 to 3 times ``controller.offline_after``, ignores
  commands meanwhile, then comes back);
- on the real agent, every ``--kill-every`` seconds (0.5 to 1.5 times that,
  drawn), SIGKILL to the pid of one of its units (checked to be the agent's
  child first), so a real remediation runs end to end; the script then polls
  ``/api/v1/units`` until the unit runs healthy under another pid
  (``KILL_HEAL_TIMEOUT`` at most) and counts it healed.

The controller runs the built-in rulebook (thresholds, anomaly watches, every
rule) with the restart rules' per-unit limits lifted (rung attempts, attempt
budget, loop breaker, ``reset_after``: as ``bench/mttr.py`` does), so a unit
killed every few minutes for hours keeps healing at the first rung instead of
being, rightly, handed to a human. ``controller.offline_after`` is three
report periods.

Every ``--sample-seconds`` the script samples the controller and the agent
process: RSS (psutil), open fds (``num_fds``), threads and CPU; for the
controller also its asyncio tasks (``selfheal_asyncio_tasks`` on
``/metrics``, counted on its event loop at the scrape) and, from the same
scrape, reports accepted, open incidents, remediations finished and the
report history it holds (``selfheal_report_history_bytes``); for the agent
also its asyncio tasks (``selfheal_agent_asyncio_tasks`` on the agent's own
``/metrics``, on ``agent.listen``).

The verdict, per process and series, over the samples after
``--warmup-minutes`` (default 5, a third of runs under 15 minutes): the
least-squares slope in units per hour and its standard error ``se``, against
a tolerance per hour (``TOLERANCE``: RSS 1 MiB/h; fds, threads, tasks 1/h).
``flat``: slope <= tolerance. ``GROWS``: slope - 2 se > tolerance (growth
beyond the tolerance, outside the noise). ``noisy``: neither (above the
tolerance but within two standard errors: run longer). The goal, "no growth
after warm-up", holds when every series is ``flat``. Beside each slope the
script prints the slope of the second half of those samples (growth that
slows down reads as a cache or the allocator settling, growth that keeps its
pace as a leak) and, for each process, the slope of its anonymous memory (RSS
less file-backed pages: psutil's ``rss - shared``), neither judged. A
meaningful soak also needs the load it claims: the controller must have accepted at least 0.95 of
the reports sent after warm-up, and the generator sent at least 0.97 of what
was offered (both printed, and in the JSON).

Bounded state fills in over a while and is not a leak: each node's report
history (``controller.history``, 120 reports: 20 minutes at one report per
10 s; ``selfheal_report_history_bytes`` is sampled, and its slope printed
beside the RSS's, not judged), the anomaly watches' windows (the built-in
ones up to an hour) and the engine's memory of remediated units (up to two
hours). The script prints when all are full, and the verdict
says so when the warm-up ended before (``--warmup-minutes`` at least that
long leaves the filling out), or when fewer than ``MIN_WINDOW_MINUTES``
followed the warm-up (a per-hour slope of a few minutes is indicative only).
``--short-windows`` makes a 30-minute soak readable: ``controller.history``
becomes what fills in 0.8 of the warm-up (at least 12 reports) and the
anomaly watches' window, step and horizon shrink by the factor that fits the
longest in 0.8 of the warm-up, and every rule's ``attempt_window`` and
``reset_after`` is at most 0.4 of it (the engine forgets a remediated unit
once its ladder reset and its attempts left every rule's window; by default
that is up to two hours). The bounded structures still fill and evict all
along; only their size shrinks, so growth after warm-up is not their filling.

    .venv/bin/python bench/soak.py [--nodes 1000] [--rate 100] [--minutes 30] [--warmup-minutes 5]
                                   [--sample-seconds 10] [--fault-rate 6] [--kill-every 120] [--seed 1]
                                   [--short-windows] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil
import yaml

from bench.simulated import (
    GENERATOR_OK,
    KEEP_UP,
    SIGN,
    UNITS,
    Fleet,
    Samples,
    SimNode,
    _connect,
    _publish_statuses,
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
from rules.model import Rule
from selfheal import wire
from selfheal.config import ControllerConfig
from selfheal.errors import WireError
from selfheal.keys import read_key, write_key

ROOT = Path(__file__).resolve().parents[1]
AGENT = "soak-agent"
AGENT_UNITS = ("web", "worker")
SIM_FAULTS = ("crash", "hang", "stall", "silent")
HANG_UNIT, STALL_UNIT = "web", "etl"
HOLD = 300.0
"""Seconds a simulated crash, hang or stall lasts at most without a command (then it heals by itself)."""
KILL_HEAL_TIMEOUT = 120.0
"""Seconds after a SIGKILL on the real agent's unit within which it must run healthy again to count healed."""
TOLERANCE = {"rss_mb": 1.0, "fds": 1.0, "threads": 1.0, "tasks": 1.0}
"""Growth per hour that still counts as flat, per series."""
SERIES = {"controller": ("rss_mb", "fds", "threads", "tasks"), "agent": ("rss_mb", "fds", "threads", "tasks")}
LIFTED = ("restart-exited-unit", "restart-unhealthy-unit", "restart-stalled-unit")
"""Built-in rules whose per-unit limits the soak lifts (the real agent's units are killed again and again)."""
COMMAND_FILTER = f"{wire.PREFIX}/p/+/nodes/+/commands"
HISTORY = ControllerConfig().history
"""``controller.history`` (the default, which this script leaves as it is): reports kept per node."""
SHORT_FILL = 0.8
"""``--short-windows``: the bounded state is full after this share of the warm-up."""
SHORT_HISTORY_MIN = 12
"""``--short-windows``: reports kept per node at least (the built-in thresholds look at up to 10)."""
RULE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Rule)}
"""A rule's settings where the rulebook names none (``rules.model.Rule``)."""
MIN_WINDOW_MINUTES = 10.0
"""Below this many minutes after warm-up the verdict is marked indicative only."""


# --- simulated nodes that fail and heal -------------------------------------------------------------------


class FaultyNode(SimNode):
    """A simulated agent whose units can crash, hang or stall, which can go silent, and which answers commands."""

    def __init__(self, node: str, key: bytes | None, now: float, rng: random.Random, *, stall_after: float) -> None:
        super().__init__(node, key, now, rng)
        units = [msgspec.structs.replace(u, stall_after=stall_after, start_timeout=10 * stall_after,
                                         progress=wire.UnitProgress(done=0.0, stage="batch", updated_at=now),
                                         progress_at=now)
                 if u.name == STALL_UNIT else u for u in self.template.units]
        self.template = msgspec.structs.replace(self.template, units=units)
        self.base_pid = {u.name: u.pid or 0 for u in units}
        self.restarts = dict.fromkeys(UNITS, 0)
        self.started = {u.name: u.started_at for u in units}
        self.stopped: set[str] = set()
        self.fault: str | None = None
        self.fault_unit = ""
        self.since = 0.0
        self.until = 0.0
        self.moved = {u.name: (now, 0) for u in units if u.progress is not None}
        """Per unit with progress: when it last moved, and to what (``done``)."""

    def pid(self, unit: str) -> int:
        return self.base_pid[unit] + 1_000_000 * self.restarts[unit]

    @property
    def silent(self) -> bool:
        return self.fault == "silent"

    def start_fault(self, kind: str, unit: str, seconds: float, now: float) -> list[wire.EventBody]:
        """The fault begins; the events an agent would send about it."""
        self.fault, self.fault_unit, self.since, self.until = kind, unit, now, now + seconds
        if kind == "crash":
            return [wire.UnitExited(unit=unit, pid=self.pid(unit), exit_signal=int(signal.SIGKILL))]
        if kind == "hang":
            return [wire.ProbeChanged(unit=unit, probe=self._failing_probe(now))]
        return []

    def end_fault(self, now: float) -> list[wire.EventBody]:
        """The fault's time is up: a silent node talks again; a failed unit is restarted (the agent's fallback)."""
        kind, unit = self.fault, self.fault_unit
        self.fault = None
        return [] if kind == "silent" else self._start(unit, now)

    def command(self, command: wire.Command, now: float) -> list[wire.EventBody]:
        """Run a command as an agent would: the unit stopped or started afresh, then the ack."""
        step = command.step
        if not isinstance(step, wire.RestartUnit | wire.StopUnit | wire.StartUnit) or step.unit not in self.restarts:
            return [wire.CommandResult(command_id=command.id, key=command.key, status="failed",
                                       detail="not a unit of this node")]
        if self.fault is not None and self.fault_unit == step.unit:
            self.fault = None
        events: list[wire.EventBody]
        if isinstance(step, wire.StopUnit):
            self.stopped.add(step.unit)
            events = [wire.UnitExited(unit=step.unit, pid=self.pid(step.unit), exit_signal=int(signal.SIGTERM),
                                      expected=True)]
        else:
            events = self._start(step.unit, now)
        return [*events, wire.CommandResult(command_id=command.id, key=command.key, status="done")]

    def _start(self, unit: str, now: float) -> list[wire.EventBody]:
        self.stopped.discard(unit)
        self.restarts[unit] += 1
        self.started[unit] = now
        return [wire.UnitStarted(unit=unit, pid=self.pid(unit), restarts=self.restarts[unit])]

    def next_report(self, now: float) -> bytes:
        self.seq += 1
        host = msgspec.structs.replace(self.template.host, cpu_percent=round(20 + 10 * self.rng.random(), 1),
                                       load1=round(1 + self.rng.random(), 2),
                                       mem_percent=round(38 + self.rng.random(), 1))
        units = [self._unit(u, now) for u in self.template.units]
        return self._encode(msgspec.structs.replace(self.template, seq=self.seq, ts=now, host=host, units=units),
                            "report")

    def _unit(self, unit: wire.UnitReport, now: float) -> wire.UnitReport:
        name, started = unit.name, self.started[unit.name]
        faulty = self.fault is not None and self.fault_unit == name
        down = name in self.stopped or (faulty and self.fault == "crash")
        if unit.progress is not None:  # as the agent reports it: when it last moved in the unit's latest run
            if not down and not (faulty and self.fault == "stall"):
                self.moved[name] = (now, self.seq)
            moved, done = self.moved[name]
            unit = msgspec.structs.replace(unit, progress_at=moved, progress=msgspec.structs.replace(
                unit.progress, done=float(done), updated_at=moved))
        if down:
            crashed = name not in self.stopped
            return msgspec.structs.replace(
                unit, state="exited" if crashed else "stopped", pid=None, restarts=self.restarts[name],
                started_at=started, exit_signal=int(signal.SIGKILL if crashed else signal.SIGTERM), cpu_percent=0.0,
                rss_bytes=0, num_fds=0, num_threads=0, proc_status="", probe=None)
        probe = unit.probe and msgspec.structs.replace(unit.probe, checked_at=max(now - 0.4, started))
        if faulty and self.fault == "hang":
            probe = self._failing_probe(now)
        return msgspec.structs.replace(unit, pid=self.pid(name), restarts=self.restarts[name], started_at=started,
                                       cpu_percent=round(10 + 5 * self.rng.random(), 1), probe=probe)

    def _failing_probe(self, now: float) -> wire.ProbeState:
        return wire.ProbeState(kind="http", healthy=False, failures_threshold=3,
                               consecutive_failures=3 + int(2 * (now - self.since)),
                               last_error="timed out after 0.5s", checked_at=now - 0.4)

    def event_payload(self, body: wire.EventBody, now: float) -> bytes:
        event = wire.Event(node=self.node, session=self.template.session, ts=now, body=body)
        if self.key is not None and SIGN is not None:
            event = SIGN(event, "events", self.key)
        return wire.encode(event)


@dataclass
class Publisher:
    """One publisher process's nodes, its client, its pace and its counts (``soak_publisher_main`` drives it)."""

    sims: dict[str, FaultyNode]
    client: Any
    sent: Synchronized[int]
    counts: Counter[str] = field(default_factory=Counter)
    inbox: list[tuple[str, bytes]] = field(default_factory=list)
    rate: float = 0.0
    started: float = 0.0
    sent_here: int = 0
    """Round-robin reports since ``rate`` was set (the pace); ``total`` counts them all, plus the reports
    sent beside it (the one after a command)."""
    total: int = 0
    cursor: int = 0
    looked: float = 0.0

    @property
    def order(self) -> list[FaultyNode]:
        return list(self.sims.values())

    def on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        parts = str(message.topic).split("/")
        if len(parts) == 7 and parts[5] in self.sims:
            self.inbox.append((str(message.topic), bytes(message.payload)))

    def obey(self, command: tuple[Any, ...], conn: Connection) -> bool:
        """One command from the parent; False for ``stop``."""
        if command[0] == "stop":
            return False
        if command[0] == "rate":
            self.rate, self.started, self.sent_here = float(command[1]), time.monotonic(), 0
        elif command[0] == "statuses":
            sims: list[SimNode] = list(self.sims.values())
            conn.send(("statuses", *_publish_statuses(self.client, sims)))
        elif command[0] == "fault":
            self.fault(*command[1:])
        elif command[0] == "stats":
            conn.send(("stats", dict(self.counts)))
        return True

    def tick(self, order: list[FaultyNode]) -> None:
        """Commands answered, faults whose time is up ended, then the reports now due (at most 50 ms worth)."""
        if self.inbox:
            self.commands()
        if time.monotonic() - self.looked > 0.2:
            self.looked = time.monotonic()
            self.expire(time.time())
        if self.rate <= 0:
            self.client.loop(timeout=0.05)
            return
        elapsed = time.monotonic() - self.started
        due = int(elapsed * self.rate) - self.sent_here
        if due <= 0:
            self.client.loop(timeout=min(0.05, max(0.0, (self.sent_here + 1) / self.rate - elapsed)))
            return
        batch = min(due, max(1, int(self.rate * 0.05)))
        wall = time.time()
        for _ in range(batch):
            for _skip in range(len(order)):  # the next node that is not silent
                sim = order[self.cursor]
                self.cursor = (self.cursor + 1) % len(order)
                if not sim.silent:
                    self.client.publish(sim.topic, sim.next_report(wall), qos=0)
                    break
        self.sent_here += batch
        self.total += batch
        self.sent.value = self.total
        self.client.loop(timeout=0)

    def fault(self, node: str, kind: str, unit: str, seconds: float) -> None:
        sim = self.sims[node]
        if sim.fault is not None or unit in sim.stopped:
            self.counts[f"{kind}.skipped"] += 1
            return
        self._events(sim, sim.start_fault(kind, unit, seconds, time.time()))
        self.counts[f"{kind}.applied"] += 1

    def commands(self) -> None:
        """What the controller sent this process's nodes since the last look (a silent node hears nothing)."""
        inbox, self.inbox = self.inbox, []
        for topic, payload in inbox:
            try:
                command = wire.decode_node_message(topic, payload)
            except WireError:
                self.counts["commands.malformed"] += 1
                continue
            if not isinstance(command, wire.Command):
                continue
            sim = self.sims[command.node]
            step = type(command.step).__name__
            if sim.silent:
                self.counts[f"commands.{step}.unheard"] += 1
                continue
            kind = sim.fault if sim.fault is not None and sim.fault_unit == getattr(command.step, "unit", "") else None
            self._events(sim, sim.command(command, time.time()))
            self.counts[f"commands.{step}.acked"] += 1
            if kind is not None:
                self.counts[f"{kind}.healed_by_command"] += 1
            self._report(sim)

    def expire(self, now: float) -> None:
        for sim in self.sims.values():
            if sim.fault is not None and now >= sim.until:
                kind = sim.fault
                self._events(sim, sim.end_fault(now))
                self.counts[f"{kind}.{'ended' if kind == 'silent' else 'expired'}"] += 1
                self._report(sim)

    def _report(self, sim: FaultyNode) -> None:
        """A report at once, beside the round-robin: an agent reports every second, so the controller would
        not wait a whole report period to hear how a change turned out."""
        self.client.publish(sim.topic, sim.next_report(time.time()), qos=0)
        self.total += 1

    def _events(self, sim: FaultyNode, bodies: list[wire.EventBody]) -> None:
        for body in bodies:
            self.client.publish(wire.node_topic(sim.node, "events"), sim.event_payload(body, time.time()), qos=1)
            self.counts["events"] += 1


def soak_publisher_main(*, index: int, nodes: list[str], key_dir: str, host: str, port: int, stall_after: float,
                        conn: Connection, sent: Synchronized[int]) -> None:
    """A publisher process: its share of the fleet, round-robin at the rate the parent sets, skipping silent
    nodes; faults as the parent orders them; commands answered as they come.

    Commands on ``conn``: those of ``bench.simulated.publisher_main`` (``statuses``, ``rate``, ``stop``), plus
    ``("fault", node, kind, unit, seconds)`` and ``("stats",)`` (answers ``("stats", {count: n})``)."""
    parent = child_setup()
    now = time.time()
    rng = random.Random(index)
    sims = {n: FaultyNode(n, read_key(key_dir, n) if SIGN is not None else None, now, rng, stall_after=stall_after)
            for n in nodes}
    client = _connect(f"bench-soak-pub-{index}-{os.getpid()}", host, port)
    if client is None:
        conn.send(("error", f"publisher {index}: no connection to the broker"))
        return
    pub = Publisher(sims, client, sent)
    client.on_message = pub.on_message
    client.subscribe(COMMAND_FILTER, qos=1)
    conn.send(("ready", len(sims)))
    order = pub.order
    try:
        while os.getppid() == parent:  # else the harness died without stopping us
            if conn.poll():
                if not pub.obey(conn.recv(), conn):
                    break
                continue
            pub.tick(order)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()


def start_fleet(names: list[str], key_dir: Path, port: int, *, publishers: int, stall_after: float,
                cleanup: list[Callable[[], None]]) -> Fleet:
    """``bench.simulated.Fleet`` over soak publisher processes (names shared round-robin: ``owner`` finds one)."""
    ctx = mp.get_context("spawn")
    fleet = Fleet(nodes=len(names))
    count = max(1, min(publishers, len(names)))
    for index in range(count):
        parent_end, child_end = ctx.Pipe()
        counter = ctx.Value("q", 0, lock=False)
        proc = ctx.Process(target=soak_publisher_main, name=f"bench-soak-pub-{index}", daemon=True, kwargs={
            "index": index, "nodes": names[index::count], "key_dir": str(key_dir), "host": "127.0.0.1",
            "port": port, "stall_after": stall_after, "conn": child_end, "sent": counter})
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


def owner(fleet: Fleet, index: int) -> Connection:
    """The pipe of the publisher speaking for node ``index`` (``start_fleet`` deals names round-robin)."""
    return fleet.conns[index % len(fleet.conns)]


def fleet_stats(fleet: Fleet) -> dict[str, int]:
    total: Counter[str] = Counter()
    for reply in fleet.request(("stats",), timeout=30):
        total.update(reply[1])
    return dict(sorted(total.items()))


# --- the real controller and agent ------------------------------------------------------------------------


def setting(rule: dict[str, Any], name: str) -> float:
    """A rule's setting in the rulebook's YAML, or its default."""
    return float(rule.get(name, RULE_DEFAULTS[name]))


def soak_rules(window_scale: float = 1.0, rule_window: float | None = None) -> str:
    """The built-in rulebook with the restart rules' per-unit limits lifted (see the module's docstring); with
    ``window_scale`` below 1, the anomaly watches' window, step and horizon shortened by that factor; with
    ``rule_window``, every rule's ``attempt_window`` and ``reset_after`` at most that many seconds (what the
    engine remembers of a unit it remediated is kept that long after its ladder reset)."""
    book = yaml.safe_load((ROOT / "rules" / "default.yaml").read_text())
    for rule in book["rules"]:
        if rule["name"] in LIFTED:
            rule["ladder"][0]["attempts"] = 100
            rule.update(max_attempts=200, reset_after=1)
            rule["loop_breaker"] = {**rule.get("loop_breaker", {}), "refires": 100}
        if rule_window is not None:
            rule["attempt_window"] = min(setting(rule, "attempt_window"), rule_window)
            rule["reset_after"] = min(setting(rule, "reset_after"), rule_window)
    if window_scale < 1:
        for watch in book.get("anomalies", []):
            detector = watch["detector"]
            for key in ("window", "step", "horizon"):
                if isinstance(detector.get(key), int | float):
                    detector[key] = round(detector[key] * window_scale, 2)
    return str(yaml.safe_dump(book, sort_keys=False))


def write_configs(root: Path, settings: Settings, *, port: int, api_port: int, web_port: int,
                  agent_port: int, key_dir: Path) -> tuple[Path, Path]:
    q = json.dumps  # a JSON string is a valid TOML basic string
    token = root / "api.token"
    token.write_text("bench-soak-token\n")
    token.chmod(0o600)
    rules = root / "rules.yaml"
    rules.write_text(soak_rules(settings.window_scale, settings.rule_window))
    controller = root / "controller.toml"
    controller.write_text(
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n'
        f'[controller]\nlisten = "127.0.0.1:{api_port}"\nstate_dir = {q(str(root / "controller"))}\n'
        f"offline_after = {settings.offline_after}\nmax_nodes = {settings.nodes + 10}\n"
        f"history = {settings.history}\nrulebooks = [{q(str(rules))}]\n"
        f"[security]\nkey_dir = {q(str(key_dir))}\napi_token_file = {q(str(token))}\n"
        f'[log]\nformat = "json"\n')
    web = [sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1"]
    worker = [sys.executable, "-c", "import time\nwhile True:\n    time.sleep(1)"]
    agent = root / "agent.toml"
    agent.write_text(
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\nkeepalive = 5.0\n'
        f'[agent]\nnode_id = "{AGENT}"\ninterval = 1.0\nstate_dir = {q(str(root / "agent"))}\n'
        f'listen = "127.0.0.1:{agent_port}"\n\n'
        f'[[agent.units]]\nname = "web"\nkind = "process"\ncommand = {q(web)}\nstop_grace = 2.0\n\n'
        f'[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:{web_port}/"\n'
        f"interval = 0.5\ntimeout = 0.5\nfailures = 3\nstart_period = 1.0\n\n"
        f'[[agent.units]]\nname = "worker"\nkind = "process"\ncommand = {q(worker)}\nstop_grace = 2.0\n\n'
        f"[security]\nkey_dir = {q(str(key_dir))}\n"
        f'[log]\nformat = "json"\n')
    return controller, agent


def wait_for(check: Callable[[], bool], timeout: float, what: str, *, alive: Callable[[], bool],
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            if check():
                return
        if not alive() or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what}: not within {timeout:g}s" + (f"\n{tail}" if tail else ""))
        time.sleep(0.2)


def get(http: httpx.Client, path: str, **params: str) -> httpx.Response:
    """GET, once more on a connection the server closed meanwhile (uvicorn drops idle keep-alives after 5 s)."""
    try:
        return http.get(path, params=params)
    except httpx.TransportError:
        return http.get(path, params=params)


def agent_units(http: httpx.Client) -> dict[str, dict[str, Any]]:
    items = get(http, "/api/v1/units", node=AGENT).json()["items"]
    return {u["name"]: u for u in items if u["node"] == AGENT}


def healthy(unit: dict[str, Any] | None) -> bool:
    """Running with a pid, and its probe healthy (``healthy`` is null for a unit without a probe)."""
    return (unit is not None and unit["state"] == "running" and unit["healthy"] is not False
            and unit.get("pid") is not None)


# --- the run ----------------------------------------------------------------------------------------------


@dataclass
class Kills:
    """SIGKILLs on the real agent's units and what became of each."""

    rng: random.Random
    every: float
    next_at: float = 0.0
    pending: tuple[str, int, float] | None = None
    """(unit, killed pid, monotonic time of the kill)"""
    sent: int = 0
    healed: list[float] = field(default_factory=list)
    unhealed: int = 0
    skipped: int = 0

    def schedule(self, now: float) -> None:
        self.next_at = now + self.every * self.rng.uniform(0.5, 1.5)

    def step(self, http: httpx.Client, agent: psutil.Process, now: float, say: Callable[[str], None]) -> None:
        if self.pending is not None:
            unit, pid, at = self.pending
            found = agent_units(http).get(unit)
            if healthy(found) and found is not None and found["pid"] != pid:
                self.healed.append(now - at)
                self.pending = None
                self.schedule(now)
            elif now - at > KILL_HEAL_TIMEOUT:
                say(f"  kill of {AGENT}/{unit} (pid {pid}) NOT healed within {KILL_HEAL_TIMEOUT:g}s")
                self.unhealed += 1
                self.pending = None
                self.schedule(now)
            return
        if self.every <= 0 or now < self.next_at:
            return
        unit = self.rng.choice(AGENT_UNITS)
        found = agent_units(http).get(unit)
        children = {c.pid for c in agent.children(recursive=True)}
        if not healthy(found) or found is None or int(found["pid"]) not in children:
            self.skipped += 1  # not running healthy right now (or not the agent's child): try again shortly
            self.next_at = now + 2
            return
        pid = int(found["pid"])
        os.kill(pid, signal.SIGKILL)
        self.sent += 1
        self.pending = (unit, pid, now)

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.healed)
        return {"sent": self.sent, "healed": len(self.healed), "not_healed": self.unhealed,
                "pending_at_end": int(self.pending is not None), "skipped": self.skipped,
                "heal_median_s": round(ordered[len(ordered) // 2], 2) if ordered else None,
                "heal_max_s": round(ordered[-1], 2) if ordered else None}


@dataclass
class Sampler:
    controller: psutil.Process
    agent: psutil.Process
    http: httpx.Client
    agent_http: httpx.Client
    fleet: Fleet
    t0: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)
    scraped: Samples = field(default_factory=dict)
    """The latest ``/metrics``, parsed."""

    def sample(self, extra: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        row: dict[str, Any] = {"t_s": round(now - self.t0, 1)}
        cpu: dict[str, float] = {}
        for name, proc in (("controller", self.controller), ("agent", self.agent)):
            with proc.oneshot():
                memory = proc.memory_info()
                row[name] = {"rss_mb": round(memory.rss / 2**20, 2), "fds": proc.num_fds(),
                             "threads": proc.num_threads(),
                             "anon_mb": round((memory.rss - memory.shared) / 2**20, 2)}
            cpu[name] = cpu_seconds(proc)
        scraped = parse_metrics(get(self.http, "/metrics").text)
        tasks = scraped.get("selfheal_asyncio_tasks")
        row["controller"]["tasks"] = int(tasks[0][1]) if tasks else None
        agent_tasks = parse_metrics(get(self.agent_http, "/metrics").text).get("selfheal_agent_asyncio_tasks")
        row["agent"]["tasks"] = int(agent_tasks[0][1]) if agent_tasks else None
        counters = {"sent": float(self.fleet.sent()),
                    "accepted": metric(scraped, "selfheal_messages_received_total", channel="report"),
                    "dropped": metric(scraped, "selfheal_mqtt_inbox_dropped_total", channel="report")}
        wall = now - self.last.get("t", self.t0)
        for name in ("controller", "agent"):
            row[name]["cpu_pct"] = (round(100 * (cpu[name] - self.last[name]) / wall, 1)
                                    if name in self.last and wall > 0 else None)
        row.update({key: int(value) for key, value in counters.items()})
        if "sent" in self.last and wall > 0:
            row["sent_per_s"] = round((counters["sent"] - self.last["sent"]) / wall, 1)
            row["accepted_per_s"] = round((counters["accepted"] - self.last["accepted"]) / wall, 1)
        row.update({
            "history_mb": round(metric(scraped, "selfheal_report_history_bytes") / 2**20, 2),
            "incidents_open": int(metric(scraped, "selfheal_incidents_open")),
            "incidents_opened": int(metric(scraped, "selfheal_incidents_opened_total")),
            "remediations": int(metric(scraped, "selfheal_remediations_total")),
            "nodes_offline": int(metric(scraped, "selfheal_nodes", state="offline")),
            "inbox_waiting": int(metric(scraped, "selfheal_mqtt_inbox_messages")), **extra})
        self.last = {"t": now, **cpu, **counters}
        self.rows.append(row)
        self.scraped = scraped
        return row


HEADER = (f"{'t min':>6} | {'ctl MB':>7} {'fds':>4} {'thr':>4} {'tasks':>5} {'cpu%':>5} | {'agt MB':>6} {'fds':>4} "
          f"{'thr':>4} {'tasks':>5} {'cpu%':>5} | {'sent/s':>6} {'acc/s':>6} {'hist MB':>7} {'open':>4} {'remed':>5} "
          f"{'faults':>6} {'kills':>5}")


def format_row(row: dict[str, Any]) -> str:
    c, a = row["controller"], row["agent"]

    def opt(value: Any, width: int) -> str:
        return f"{'-' if value is None else value:>{width}}"

    return (f"{row['t_s'] / 60:>6.1f} | {c['rss_mb']:>7.1f} {c['fds']:>4} {c['threads']:>4} {opt(c['tasks'], 5)} "
            f"{opt(c['cpu_pct'], 5)} | {a['rss_mb']:>6.1f} {a['fds']:>4} {a['threads']:>4} {opt(a['tasks'], 5)} "
            f"{opt(a['cpu_pct'], 5)} | "
            f"{opt(row.get('sent_per_s'), 6)} {opt(row.get('accepted_per_s'), 6)} {row['history_mb']:>7.1f} "
            f"{row['incidents_open']:>4} {row['remediations']:>5} {row['faults']:>6} {row['kills']:>5}")


def slope(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares slope of (x, y) and its standard error; None with fewer than three points or one x."""
    n = len(points)
    if n < 3:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    residual = sum((y - a - b * x) ** 2 for x, y in points)
    return b, math.sqrt(residual / (n - 2) / sxx)


def verdict(per_hour: float, se: float, tolerance: float) -> str:
    if per_hour <= tolerance:
        return "flat"
    return "GROWS" if per_hour - 2 * se > tolerance else "noisy"


def trends(rows: list[dict[str, Any]], warmup_s: float) -> dict[str, dict[str, Any]]:
    """Per process and series: the slope after warm-up (per hour), its standard error, and the verdict."""
    out: dict[str, dict[str, Any]] = {}
    after = [r for r in rows if r["t_s"] >= warmup_s]
    for proc, names in SERIES.items():
        out[proc] = {}
        for name in names:
            points = [(r["t_s"] / 3600, float(r[proc][name])) for r in after if r[proc].get(name) is not None]
            fit = slope(points)
            entry: dict[str, Any] = {"samples": len(points), "tolerance_per_h": TOLERANCE[name]}
            if points:
                values = [y for _, y in points]
                entry.update(first=values[0], last=values[-1], min=min(values), max=max(values))
            if fit is None:
                entry.update(slope_per_h=None, se_per_h=None, verdict="too few samples")
            else:
                entry.update(slope_per_h=round(fit[0], 3), se_per_h=round(fit[1], 3),
                             verdict=verdict(fit[0], fit[1], TOLERANCE[name]))
            late = slope(points[len(points) // 2:])
            entry["late_slope_per_h"] = None if late is None else round(late[0], 3)
            out[proc][name] = entry
    return out


def anon_trend(rows: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Of each process's RSS slope, how much is anonymous memory (the heap: Python objects, the allocator, SQLite's
    page cache) rather than file-backed pages (libraries, mapped files); printed, not judged."""
    out: dict[str, Any] = {}
    for proc in SERIES:
        points = [(r["t_s"] / 3600, float(r[proc]["anon_mb"])) for r in rows
                  if r["t_s"] >= warmup_s and r[proc].get("anon_mb") is not None]
        fit, late = slope(points), slope(points[len(points) // 2:])
        out[proc] = {"slope_mb_per_h": None if fit is None else round(fit[0], 3),
                     "late_slope_mb_per_h": None if late is None else round(late[0], 3),
                     "first_mb": points[0][1] if points else None, "last_mb": points[-1][1] if points else None}
    return out


def history_trend(rows: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """The report history the controller holds (bounded, not judged): how much of the RSS slope it explains."""
    points = [(r["t_s"] / 3600, float(r["history_mb"])) for r in rows if r["t_s"] >= warmup_s]
    fit = slope(points)
    return {"slope_mb_per_h": None if fit is None else round(fit[0], 3),
            "first_mb": points[0][1] if points else None, "last_mb": points[-1][1] if points else None}


def load_check(rows: list[dict[str, Any]], warmup_s: float, rate: float) -> dict[str, Any]:
    """Whether the soak ran under the load it claims: what was sent and accepted after warm-up."""
    after = [r for r in rows if r["t_s"] >= warmup_s]
    if len(after) < 2:
        return {"seconds": 0.0, "generator_ok": None, "controller_kept_up": None}
    a, b = after[0], after[-1]
    wall = b["t_s"] - a["t_s"]
    sent, accepted = (b["sent"] - a["sent"]) / wall, (b["accepted"] - a["accepted"]) / wall
    return {"seconds": round(wall, 1), "offered": rate, "sent_per_s": round(sent, 1),
            "accepted_per_s": round(accepted, 1), "dropped_per_s": round((b["dropped"] - a["dropped"]) / wall, 2),
            "generator_ok": sent >= GENERATOR_OK * rate, "controller_kept_up": accepted >= KEEP_UP * sent}


@dataclass
class Settings:
    nodes: int
    rate: float
    minutes: float
    warmup_minutes: float
    sample_seconds: float
    fault_rate: float
    kill_every: float
    seed: int
    publishers: int
    status_timeout: float
    short_windows: bool = False
    json: bool = False

    @property
    def period(self) -> float:
        """Seconds between two reports of one simulated node."""
        return self.nodes / self.rate

    @property
    def offline_after(self) -> float:
        return max(5.0, round(3 * self.period, 1))

    @property
    def stall_after(self) -> float:
        return max(30.0, round(6 * self.period, 1))

    @property
    def history(self) -> int:
        """``controller.history``: the default, or with ``short_windows`` what fills in 0.8 of the warm-up (at
        least the built-in thresholds' 10 samples)."""
        if not self.short_windows:
            return HISTORY
        return max(SHORT_HISTORY_MIN, min(HISTORY, int(SHORT_FILL * self.warmup_minutes * 60 / self.period)))

    @property
    def rule_window(self) -> float | None:
        """With ``short_windows``, the rules' ``attempt_window`` and ``reset_after`` at most half of 0.8 of the
        warm-up, so what the engine remembers of remediated units is full within it too."""
        return SHORT_FILL * self.warmup_minutes * 60 / 2 if self.short_windows else None

    @property
    def window_scale(self) -> float:
        """With ``short_windows``, the factor that fits the longest anomaly window in 0.8 of the warm-up."""
        if not self.short_windows:
            return 1.0
        longest = max((float(a["detector"].get("window", 0)) for a in yaml.safe_load(soak_rules()).get(
            "anomalies", [])), default=0.0)
        return 1.0 if longest <= 0 else min(1.0, max(SHORT_FILL * self.warmup_minutes * 60, 10.0) / longest)


@dataclass
class Faults:
    """Faults ordered on the simulated nodes: when the next is due, which, and how many of each kind."""

    rng: random.Random
    settings: Settings
    names: list[str]
    next_at: float = math.inf
    ordered: Counter[str] = field(default_factory=Counter)

    def schedule(self, now: float) -> None:
        rate = self.settings.fault_rate
        self.next_at = now + self.rng.expovariate(rate / 60) if rate > 0 else math.inf

    def step(self, fleet: Fleet, now: float) -> None:
        while now >= self.next_at:
            index = self.rng.randrange(len(self.names))
            kind = self.rng.choice(SIM_FAULTS)
            unit = {"crash": self.rng.choice(UNITS), "hang": HANG_UNIT, "stall": STALL_UNIT}.get(kind, "")
            seconds = self.rng.uniform(1.5, 3.0) * self.settings.offline_after if kind == "silent" else HOLD
            owner(fleet, index).send(("fault", self.names[index], kind, unit, seconds))
            self.ordered[kind] += 1
            self.schedule(self.next_at)


@dataclass
class Started:
    fleet: Fleet
    names: list[str]
    controller: subprocess.Popen[bytes]
    agent: subprocess.Popen[bytes]
    http: httpx.Client
    agent_http: httpx.Client
    """The real agent's ``/metrics``."""
    statuses: dict[str, Any]


def start(settings: Settings, root: Path, cleanup: list[Callable[[], None]], say: Callable[[str], None]) -> Started:
    """Keys, broker, publishers (statuses published retained), controller (statuses reached it), then the
    agent with its units healthy; each put on ``cleanup``."""
    key_dir = root / "keys"
    write_key(key_dir, AGENT)
    names = [node_name(i) for i in range(settings.nodes)]
    write_keys(key_dir, names)
    broker_proc, port = start_broker(root, settings.nodes + 10)
    cleanup.append(lambda: stop_process(broker_proc))
    fleet = start_fleet(names, key_dir, port, publishers=settings.publishers, stall_after=settings.stall_after,
                        cleanup=cleanup)
    cleanup.append(fleet.stop)
    statuses = fleet.publish_statuses()
    api_port, web_port, agent_port = free_port(), free_port(), free_port()
    controller_conf, agent_conf = write_configs(root, settings, port=port, api_port=api_port, web_port=web_port,
                                                agent_port=agent_port, key_dir=key_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFHEAL_")}
    controller = start_process([*selfheal_command(), "controller", "--config", str(controller_conf)],
                               root / "controller.log", env)
    cleanup.append(lambda: stop_process(controller, grace=25))
    http = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
    cleanup.append(http.close)
    agent_http = httpx.Client(base_url=f"http://127.0.0.1:{agent_port}", timeout=30)
    cleanup.append(agent_http.close)
    wait_for(lambda: get(http, "/readyz").status_code == 200, 120, "controller ready",
             alive=lambda: controller.poll() is None, log=root / "controller.log")
    statuses.update(wait_statuses(lambda: parse_metrics(get(http, "/metrics").text), settings.nodes, stall=15.0,
                                  timeout=settings.status_timeout))
    say(f"statuses: {statuses['published']} published retained, {statuses['received']:.0f} reached the controller "
        f"(nodes known {statuses['nodes_known']:.0f}) in {statuses['seconds']}s")
    agent = start_process([*selfheal_command(), "agent", "--config", str(agent_conf)], root / "agent.log", env)
    cleanup.append(lambda: stop_process(agent, grace=25))
    wait_for(lambda: all(healthy(agent_units(http).get(u)) for u in AGENT_UNITS), 120, "the real agent's units",
             alive=lambda: agent.poll() is None, log=root / "agent.log")
    return Started(fleet, names, controller, agent, http, agent_http, statuses)


def run(settings: Settings, root: Path, cleanup: list[Callable[[], None]],
        say: Callable[[str], None]) -> dict[str, Any]:
    """Start everything, then load, inject and sample for ``--minutes``; the figures."""
    rng = random.Random(settings.seed)
    up = start(settings, root, cleanup, say)
    up.fleet.set_rate(settings.rate)
    t0 = time.monotonic()
    end = t0 + settings.minutes * 60
    warmup_s = settings.warmup_minutes * 60
    fill = state_fill(settings)
    say(f"load on: {settings.nodes} simulated nodes at {settings.rate:g} reports/s (each every "
        f"{settings.period:g}s), offline_after {settings.offline_after:g}s, stall_after {settings.stall_after:g}s; "
        f"bounded state full at ~{max(fill.values()) / 60:.0f} min (report history {fill['report_history'] / 60:.1f} "
        f"min, anomaly windows {fill['anomaly_windows'] / 60:.0f} min, remediated units "
        f"{fill['remediation_history'] / 60:.0f} min)"
        + (": after the warm-up, so the slopes measure its filling too" if max(fill.values()) > warmup_s else ""))
    sampler = Sampler(psutil.Process(up.controller.pid), psutil.Process(up.agent.pid), up.http, up.agent_http, up.fleet,
                      t0)
    faults = Faults(random.Random(rng.random()), settings, up.names)
    faults.schedule(t0)
    kills = Kills(random.Random(rng.random()), settings.kill_every)
    kills.schedule(t0)
    next_sample = t0
    say(HEADER)
    while True:
        now = time.monotonic()
        for proc, name in ((up.controller, "controller"), (up.agent, "agent")):
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} exited ({proc.returncode}) at {(now - t0) / 60:.1f} min: "
                                   + (root / f"{name}.log").read_text(errors="replace")[-3000:])
        if now >= next_sample:
            say(format_row(sampler.sample({"faults": sum(faults.ordered.values()), "kills": kills.sent})))
            next_sample = min(next_sample + settings.sample_seconds, end) if now < end else math.inf
        if now >= end:
            break
        faults.step(up.fleet, now)
        with contextlib.suppress(httpx.HTTPError):  # a slow answer: the next tick looks again
            kills.step(up.http, sampler.agent, now, say)
        time.sleep(max(0.0, min(0.5, next_sample - time.monotonic(), faults.next_at - time.monotonic())))
    up.fleet.set_rate(0)
    scraped = sampler.scraped
    return {
        "statuses": up.statuses, "warmup_s": warmup_s, "state_fill_s": fill,
        "samples": sampler.rows, "trends": trends(sampler.rows, warmup_s), "anon": anon_trend(sampler.rows, warmup_s),
        "load": load_check(sampler.rows, warmup_s, settings.rate),
        "report_history": history_trend(sampler.rows, warmup_s),
        "faults": {"ordered": dict(faults.ordered), "simulated": fleet_stats(up.fleet), "real_kills": kills.figures()},
        "remediations": by_label(scraped, "selfheal_remediations_total", "outcome"),
        "incidents_opened": by_label(scraped, "selfheal_incidents_opened_total", "kind"),
        "rejected": by_label(scraped, "selfheal_messages_rejected_total", "reason")}


def summary(figures: dict[str, Any]) -> list[str]:
    lines = ["", f"after warm-up ({figures['warmup_s'] / 60:g} min): least-squares slope per hour (+- 2 se), "
                 "verdict (flat: <= tolerance; GROWS: slope - 2 se > tolerance; noisy: in between)"]
    for proc, series in figures["trends"].items():
        for name, t in series.items():
            if t["slope_per_h"] is None:
                lines.append(f"  {proc:<10} {name:<8} {t['verdict']}")
                continue
            late = "" if t["late_slope_per_h"] is None else f", second half {t['late_slope_per_h']:+.2f}/h"
            lines.append(f"  {proc:<10} {name:<8} {t['slope_per_h']:>+10.2f}/h (+- {2 * t['se_per_h']:.2f})  "
                         f"tolerance {t['tolerance_per_h']:g}/h  {t['first']:g} -> {t['last']:g} "
                         f"(min {t['min']:g}, max {t['max']:g})  {t['verdict']}{late}")
    for proc, anon in figures["anon"].items():
        if anon["slope_mb_per_h"] is not None:
            lines.append(f"  ({proc} anonymous memory, part of its RSS, not judged: {anon['slope_mb_per_h']:+.2f} MB/h"
                         + ("" if anon["late_slope_mb_per_h"] is None else
                            f", second half {anon['late_slope_mb_per_h']:+.2f} MB/h")
                         + f", {anon['first_mb']:g} -> {anon['last_mb']:g} MB)")
    history = figures["report_history"]
    if history["slope_mb_per_h"] is not None:
        lines.append(f"  (controller report history, bounded, not judged: {history['slope_mb_per_h']:+.2f} MB/h, "
                     f"{history['first_mb']:g} -> {history['last_mb']:g} MB)")
    load = figures["load"]
    if load["generator_ok"] is not None:
        lines.append(f"load after warm-up: offered {load['offered']:g}/s, sent {load['sent_per_s']:g}/s "
                     + ("ok" if load["generator_ok"] else "GENERATOR COULD NOT KEEP UP")
                     + f"; controller accepted {load['accepted_per_s']:g}/s (the real agent adds ~1/s), "
                     f"dropped {load['dropped_per_s']:g}/s "
                     + ("ok" if load["controller_kept_up"] else "CONTROLLER FELL BEHIND"))
    f = figures["faults"]
    sim = f["simulated"]
    per_kind = ", ".join(f"{k} {f['ordered'].get(k, 0)} ({sim.get(k + '.applied', 0)} applied, "
                         + (f"back {sim.get(k + '.ended', 0)})" if k == "silent" else
                            f"healed by command {sim.get(k + '.healed_by_command', 0)}, "
                            f"expired {sim.get(k + '.expired', 0)})")
                         for k in SIM_FAULTS)
    lines.append(f"simulated faults: {per_kind}")
    acked = {k.split(".")[1]: v for k, v in sim.items() if k.startswith("commands.") and k.endswith(".acked")}
    lines.append(f"commands the simulated nodes acked: {acked or 'none'}")
    k = f["real_kills"]
    lines.append(f"SIGKILLs on {AGENT}'s units: {k['sent']}, healed {k['healed']} (median {k['heal_median_s']} s, "
                 f"max {k['heal_max_s']} s, polled), not healed {k['not_healed']}, pending at the end "
                 f"{k['pending_at_end']}")
    lines.append(f"remediations finished (controller /metrics, by outcome): {figures['remediations'] or 'none'}; "
                 f"incidents opened by kind: {figures['incidents_opened'] or 'none'}")
    lines.append(f"goal (no growth after warm-up): {figures['verdict']}")
    return lines


def state_fill(settings: Settings) -> dict[str, float]:
    """Seconds until the controller's bounded state is full: each node's report history (``controller.history``,
    default 120 reports), the longest window of the rulebook's anomaly watches (samples older drop out) and the
    engine's memory of remediated units (a unit is forgotten once its ladder reset and its last attempt is older
    than every rule's ``attempt_window`` and ``cooldown``)."""
    book = yaml.safe_load(soak_rules(settings.window_scale, settings.rule_window))
    windows = [float(a["detector"].get("window", 0)) for a in book.get("anomalies", [])]
    rules = book.get("rules", [])
    horizon = max((max(setting(r, "attempt_window"), setting(r, "cooldown")) for r in rules), default=0.0)
    reset = max((setting(r, "reset_after") for r in rules), default=0.0)
    return {"report_history": round(settings.history * settings.period, 1),
            "anomaly_windows": max(windows, default=0.0),
            "remediation_history": horizon + reset}


def overall(figures: dict[str, Any], settings: Settings) -> str:
    """The goal's verdict, with what limits it: a short window, bounded state still filling after warm-up."""
    verdicts = [t["verdict"] for series in figures["trends"].values() for t in series.values()]
    if "GROWS" in verdicts:
        verdict_ = "GROWTH"
    elif all(v == "flat" for v in verdicts):
        verdict_ = "met (every series flat)"
    else:
        verdict_ = "inconclusive (some series noisy or too few samples: run longer)"
    window = settings.minutes - settings.warmup_minutes
    notes = []
    if window < MIN_WINDOW_MINUTES:
        notes.append(f"indicative only: {window:g} min after warm-up, slopes per hour extrapolate a short window")
    filled = max(figures["state_fill_s"].values())
    if filled > figures["warmup_s"]:
        notes.append(f"bounded state was still filling after the warm-up (until ~{filled / 60:.0f} min): "
                     f"--warmup-minutes {math.ceil(filled / 60)} or more"
                     + ("" if settings.short_windows else ", or --short-windows,") + " leaves it out")
    return verdict_ + "".join(f"; {note}" for note in notes)


def parse_args() -> Settings:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    parser.add_argument("--rate", type=float, default=100.0, help="reports/s of all simulated nodes (default 100)")
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes under load (default 30)")
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="minutes left out of the slopes (default 5; a third of runs under 15 minutes)")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--fault-rate", type=float, default=6.0,
                        help="faults a minute on the simulated nodes, on average (default 6; 0: none)")
    parser.add_argument("--kill-every", type=float, default=120.0,
                        help="seconds between SIGKILLs on the real agent's units, on average (default 120; 0: none)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the faults (default 1)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    parser.add_argument("--status-timeout", type=float, default=300.0,
                        help="most seconds to wait for the retained statuses to reach the controller")
    parser.add_argument("--short-windows", action="store_true",
                        help="shorten controller.history, the anomaly windows and the rules' attempt_window and "
                             "reset_after so the bounded state is full within the warm-up (default: as shipped; "
                             "full after two hours)")
    parser.add_argument("--json", action="store_true", help="end with one line holding a JSON object of all figures")
    args = parser.parse_args()
    if args.nodes < 1 or args.rate <= 0 or args.minutes <= 0 or args.sample_seconds <= 0:
        parser.error("--nodes, --rate, --minutes and --sample-seconds must be above 0")
    warmup = args.warmup_minutes if args.warmup_minutes is not None else (5.0 if args.minutes >= 15 else
                                                                          args.minutes / 3)
    if not 0 <= warmup < args.minutes:
        parser.error("--warmup-minutes must be at least 0 and below --minutes")
    return Settings(nodes=args.nodes, rate=args.rate, minutes=args.minutes, warmup_minutes=warmup,
                    sample_seconds=args.sample_seconds, fault_rate=args.fault_rate, kill_every=args.kill_every,
                    seed=args.seed, publishers=args.publishers, status_timeout=args.status_timeout,
                    short_windows=args.short_windows, json=args.json)


def main() -> int:
    settings = parse_args()

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"selfheal soak: {settings.nodes} simulated nodes at {settings.rate:g} reports/s, {settings.minutes:g} min "
        f"(warm-up {settings.warmup_minutes:.3g}), a sample every {settings.sample_seconds:g}s, "
        f"{settings.fault_rate:g} simulated faults/min, a SIGKILL on {AGENT} every ~{settings.kill_every:g}s, "
        f"seed {settings.seed}, " + ("signed" if SIGN is not None else "UNSIGNED: selfheal.wire has no signing")
        + (f"; --short-windows: controller.history {settings.history}, anomaly windows x{settings.window_scale:.3g}"
           if settings.short_windows else ""))
    say(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; broker "
        f"max_queued_messages {max_queued(settings.nodes + 10)}")
    root = Path(tempfile.mkdtemp(prefix="selfheal-bench-soak-"))
    cleanup: list[Callable[[], None]] = []
    figures: dict[str, Any] = {"bench": "soak", "settings": {
        "nodes": settings.nodes, "rate": settings.rate, "minutes": settings.minutes,
        "warmup_minutes": settings.warmup_minutes, "sample_seconds": settings.sample_seconds,
        "fault_rate": settings.fault_rate, "kill_every": settings.kill_every, "seed": settings.seed,
        "publishers": settings.publishers, "offline_after": settings.offline_after,
        "stall_after": settings.stall_after, "short_windows": settings.short_windows, "history": settings.history,
        "anomaly_window_scale": round(settings.window_scale, 4)}, "tolerance_per_h": TOLERANCE,
        "signed": SIGN is not None, "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    code = 0
    try:
        figures.update(run(settings, root, cleanup, say))
        figures["verdict"] = overall(figures, settings)
        for line in summary(figures):
            say(line)
    except KeyboardInterrupt:
        say("interrupted: stopping every process this run started")
        code = 130
    except (RuntimeError, httpx.HTTPError, psutil.Error) as exc:
        say(f"soak failed: {type(exc).__name__}: {exc}")
        figures["error"] = str(exc)[:2000]
        code = 1
    finally:
        for stop in reversed(cleanup):
            with contextlib.suppress(Exception):
                stop()
        shutil.rmtree(root, ignore_errors=True)
    figures["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if settings.json:
        print(json.dumps(figures), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
