"""Mean time to recover: fault injected → service answering again, measured from outside.

Starts a real controller and two real agents (the demo's layout: an HTTP
service per node, HTTP probe every 0.5 s, 3 failures), then injects N crashes
(SIGKILL) on node-a's service and N hangs (SIGSTOP) on node-b's. The clock
starts at the signal and stops at the first HTTP 200 from the service's port,
polled every 20 ms by this script, independently of selfheal's own probes.

Anchors (measured on this kind of machine, quoted in the issue): Monit 5.33 at
its tightest (1 s cycle, restart on the first failed HTTP check) 2.0-2.5 s for
a crash, 11-12.7 s for a hang; Kubernetes' default liveness probe settings
(period 10 s, 3 failures) give 21-61 s for a hang.

Under load (``--background-nodes N``): N simulated nodes (``bench/simulated.py``,
the publisher processes of ``bench/ingest.py``: the real wire format, each
node signed with its own key, written into the controller's
``security.key_dir`` next to the real agents') share the controller for the
whole run. Their statuses are published retained before it starts and must
reach it; then they report at ``--background-rate`` R/s (default N/10, every
node every 10 s) for one full round before the first injection and until
after the last. ``controller.offline_after`` becomes 3 report periods (3 N/R
s, at least the demo's 5 s), so the simulated nodes are live, not silent.
Such a fleet needs a real broker: unless ``--broker-url`` names one, the script
starts a Mosquitto with ``max_queued_messages`` above the fleet (as
``bench/ingest.py`` does), since the embedded broker runs inside the
controller's own process, where 10,000 nodes' traffic would be measured as the
controller's. Between the readiness checks (``/api/v1/units`` of the real
nodes) and each injection the script waits ``--quiet`` seconds, so the
fault meets the controller under the background load, not under the script's
own requests. Next to the MTTR figures it prints N, R, what the generator
really sent and what the controller accepted (``/metrics``) during the
injections, and flags a generator that could not keep up (sent below 0.97 R)
or a controller that fell behind (accepted below 0.95 x sent).

Issue 14's goal ("healing stays fast at scale") reads the crash median
(SIGKILL to the service answering HTTP 200 again) with N = 10,000 and R half
the controller's ceiling at that fleet size (``bench/ingest.py``): at most 0.5 s.

    .venv/bin/python bench/mttr.py [-n 5] [--broker-url mqtt://127.0.0.1:1883] [--faults crash,hang] [--json]
                                   [--background-nodes 10000 [--background-rate 1000] [--publishers 2]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from bench.simulated import (
    GENERATOR_OK,
    KEEP_UP,
    SIGN,
    Fleet,
    Samples,
    cpu_seconds,
    metric,
    node_name,
    parse_metrics,
    start_broker,
    stop_process,
    wait_statuses,
    write_keys,
)
from selfheal.demo_layout import Layout, write_configs

ANCHORS = {"crash": ("Monit 5.33, 1 s cycle", 2.0, 2.5), "hang": ("Monit 5.33, 1 s cycle", 11.0, 12.7)}
K8S_HANG = (21.0, 61.0)
FAULTS = ("crash", "hang")
GOAL_CRASH_S = 0.5
"""Issue 14: the crash median with 10,000 simulated nodes offering half the controller's ceiling."""
BENCH_RULES = """version: 1
rules:
  # The built-in restart rules, with the limits lifted so N injections on one unit in a row all heal
  # at the first rung (the built-in ones would, rightly, escalate a unit that keeps failing).
  - name: restart-exited-unit
    match: {kind: unit_exited}
    ladder: [{action: restart, attempts: 100}]
    max_attempts: 200
    reset_after: 1
    loop_breaker: {refires: 100}
  - name: restart-unhealthy-unit
    match: {kind: probe_failing}
    ladder: [{action: restart, attempts: 100}]
    max_attempts: 200
    reset_after: 1
    verify: {stable_for: 0}
    loop_breaker: {refires: 100}
"""


def wait_until(check: object, timeout: float, what: str, interval: float = 0.02) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return time.monotonic()
        except (httpx.HTTPError, KeyError, ValueError, StopIteration):
            pass  # not there yet: the API is starting or the agent has not reported
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout}s")


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=0.25).status_code == 200
    except httpx.HTTPError:
        return False


def gone(pid: int) -> bool:
    """The process is dead: no longer there, or a zombie its agent has not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def unit(api: str, node: str) -> dict[str, Any]:
    items = httpx.get(f"{api}/api/v1/units", params={"node": node}, timeout=30).json()["items"]
    found: dict[str, Any] = next(u for u in items if u["node"] == node and u["name"] == "web")
    return found


def healthy(u: dict[str, Any]) -> bool:
    return u["state"] == "running" and bool(u["healthy"])


def open_incidents(api: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = httpx.get(f"{api}/api/v1/incidents", params={"state": "open", "limit": 1000},
                                            timeout=30).json()["items"]
    return items


def settled(api: str, real: set[str]) -> bool:
    """No open incident on a real node (the background's own, if any, are counted apart)."""
    return not any(i["node"] in real for i in open_incidents(api))


def inject(layout: Layout, api: str, fault: str, n: int, *, poll: float = 0.1, quiet: float = 0.0) -> list[float]:
    node, sig = ("node-a", signal.SIGKILL) if fault == "crash" else ("node-b", signal.SIGSTOP)
    port = layout.unit_ports[node]
    real = set(layout.agents)
    times = []
    for i in range(n):
        wait_until(lambda: healthy(unit(api, node)) and settled(api, real), 120, "settled before injection", poll)
        pid = int(unit(api, node)["pid"])
        time.sleep(quiet)  # the controller catches up on the background after those requests
        t0 = time.monotonic()
        os.kill(pid, sig)
        if fault == "crash":  # its death, not a closed port, which a loaded machine's poll may never catch
            wait_until(lambda pid=pid: gone(pid), 5, "the killed unit's process gone")
        healed_at = wait_until(lambda: serving(port), 60, f"{fault} {i + 1} healed")
        times.append(healed_at - t0)
        print(f"  {fault} {i + 1}/{n}: {times[-1]:.2f} s", flush=True)
    return times


@dataclass
class Background:
    """N simulated nodes reporting at R/s on the run's broker for the whole run, and what they achieved."""

    nodes: int
    rate: float
    publishers: int
    status_timeout: float
    fleet: Fleet | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def period(self) -> float:
        """Seconds between two reports of one simulated node."""
        return self.nodes / self.rate

    def controller_env(self, real: int) -> dict[str, str]:
        """Node silence at 3 report periods (the demo's 5 s at least); room for every node in the fleet."""
        return {"SELFHEAL_CONTROLLER__OFFLINE_AFTER": str(max(5.0, round(3 * self.period, 1))),
                "SELFHEAL_CONTROLLER__MAX_NODES": str(max(10_000, self.nodes + real))}

    def start(self, key_dir: Path, broker_url: str, cleanup: list[Callable[[], None]]) -> None:
        """Keys next to the real agents', the publisher processes, and every status published retained."""
        names = [node_name(i) for i in range(self.nodes)]
        write_keys(key_dir, names)
        url = urlsplit(broker_url)
        self.fleet = Fleet.start(names, key_dir, url.port or 1883, publishers=self.publishers,
                                 signed=SIGN is not None, cleanup=cleanup, host=url.hostname or "127.0.0.1")
        cleanup.append(self.fleet.stop)
        self.figures["statuses"] = self.fleet.publish_statuses()
        print(f"background: {self.figures['statuses']['published']}/{self.nodes} statuses published retained in "
              f"{self.figures['statuses']['publish_seconds']}s", flush=True)

    def load(self, scrape: Callable[[], Samples], real: int) -> None:
        """Once the statuses reached the controller: reports at R/s, for one full round before any injection."""
        assert self.fleet is not None
        reached = wait_statuses(scrape, self.nodes + real, stall=15.0, timeout=self.status_timeout)
        self.figures["statuses"].update(reached)
        print(f"background: statuses reached the controller: {reached['received']:.0f}/{self.nodes + real} "
              f"(nodes known {reached['nodes_known']:.0f}) in {reached['seconds']}s", flush=True)
        self.fleet.set_rate(self.rate)
        time.sleep(max(5.0, self.period))

    def mark(self, scrape: Callable[[], Samples], controller: psutil.Process) -> dict[str, float]:
        assert self.fleet is not None
        samples = scrape()
        return {"t": time.monotonic(), "sent": self.fleet.sent(),
                "accepted": metric(samples, "selfheal_messages_received_total", channel="report"),
                "dropped": metric(samples, "selfheal_mqtt_inbox_dropped_total", channel="report"),
                "waiting": metric(samples, "selfheal_mqtt_inbox_messages"),
                "cpu": cpu_seconds(controller), "generator_cpu": self.fleet.cpu()}

    def measured(self, a: dict[str, float], b: dict[str, float], open_background: tuple[int, int]) -> None:
        """The rates between two marks (the injections), with the verdicts."""
        wall = b["t"] - a["t"]
        sent, accepted = (b["sent"] - a["sent"]) / wall, (b["accepted"] - a["accepted"]) / wall
        self.figures.update({
            "nodes": self.nodes, "offered": self.rate, "seconds": round(wall, 1), "sent": round(sent, 1),
            "accepted": round(accepted, 1), "dropped": round((b["dropped"] - a["dropped"]) / wall, 1),
            "inbox_waiting_end": round(b["waiting"]), "controller_cpu": round((b["cpu"] - a["cpu"]) / wall, 3),
            "generator_cpu": round((b["generator_cpu"] - a["generator_cpu"]) / wall, 3),
            "generator_ok": sent >= GENERATOR_OK * self.rate, "controller_kept_up": accepted >= KEEP_UP * sent,
            "open_incidents_background": {"before": open_background[0], "after": open_background[1]}})

    def lines(self) -> list[str]:
        f = self.figures
        out = [f"background: {f['nodes']} simulated nodes offering {f['offered']:g} reports/s (each every "
               f"{self.period:g} s), during the {f['seconds']:g} s of injections:",
               f"  generator sent {f['sent']:.1f}/s (its own count) "
               + ("ok" if f["generator_ok"] else f"GENERATOR COULD NOT KEEP UP (below {GENERATOR_OK} x offered)"),
               f"  controller accepted {f['accepted']:.1f} reports/s (/metrics; the real agents add ~1/s each), "
               f"dropped {f['dropped']:.1f}/s in its inbox, {f['inbox_waiting_end']} waiting at the end; "
               f"its CPU {f['controller_cpu'] * 100:.0f} % of a core "
               + ("ok" if f["controller_kept_up"] else f"CONTROLLER FELL BEHIND (below {KEEP_UP} x sent)")]
        before, after = f["open_incidents_background"].values()
        if before or after:
            out.append(f"  open incidents on simulated nodes: {before} before, {after} after (silent nodes: the "
                       "controller or the generator fell behind)")
        return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="injections of each fault (default 5)")
    parser.add_argument("--faults", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                        default=list(FAULTS), help="which of crash,hang to inject (default both)")
    parser.add_argument("--broker-url", default=None,
                        help="use this broker instead of the embedded one (or, with --background-nodes, Mosquitto)")
    parser.add_argument("--background-nodes", type=int, default=0,
                        help="simulated nodes loading the controller for the whole run (default 0: idle)")
    parser.add_argument("--background-rate", type=float, default=None,
                        help="reports/s the simulated nodes offer together (default nodes / 10)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes of the background (default 2)")
    parser.add_argument("--quiet", type=float, default=None,
                        help="seconds between the readiness checks and each injection (default 1 under load, else 0)")
    parser.add_argument("--status-timeout", type=float, default=900.0,
                        help="most seconds to wait for the background's statuses to reach the controller")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("-n must be at least 1")
    if unknown := set(args.faults) - set(FAULTS):
        parser.error(f"unknown fault(s) {', '.join(sorted(unknown))}: choose from {', '.join(FAULTS)}")
    if args.background_nodes < 0:
        parser.error("--background-nodes must be 0 or more")
    if args.background_rate is None:
        args.background_rate = args.background_nodes / 10
    if args.background_nodes and args.background_rate <= 0:
        parser.error("--background-rate must be above 0")
    if args.quiet is None:
        args.quiet = 1.0 if args.background_nodes else 0.0
    return args


def main() -> int:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="selfheal-mttr-"))
    background = (Background(args.background_nodes, args.background_rate, args.publishers, args.status_timeout)
                  if args.background_nodes else None)
    cleanup: list[Callable[[], None]] = []
    try:
        results = run(args, root, background, cleanup)
    finally:
        for stop in reversed(cleanup):
            with contextlib.suppress(Exception):
                stop()
        shutil.rmtree(root, ignore_errors=True)
    figures = report(results, background)
    if args.json:
        print(json.dumps(figures))
    return 0


def run(args: argparse.Namespace, root: Path, background: Background | None,
        cleanup: list[Callable[[], None]]) -> dict[str, list[float]]:
    """Broker, background, controller and agents started (each put on ``cleanup``), then the injections."""
    (root / "rules.yaml").write_text(BENCH_RULES)
    broker_url = args.broker_url
    env = {**os.environ, "SELFHEAL_LOG__FORMAT": "json"}
    procs: list[subprocess.Popen[bytes]] = []
    if background is not None and broker_url is None:
        broker, port = start_broker(root, background.nodes + 10)
        cleanup.append(lambda: stop_process(broker))
        broker_url = f"mqtt://127.0.0.1:{port}"
    layout = write_configs(root, broker_url=broker_url, rulebook=root / "rules.yaml")
    api = f"http://127.0.0.1:{layout.api_port}"
    real = set(layout.agents)
    if background is not None:
        key_dir = Path(tomllib.loads(layout.controller.read_text())["security"]["key_dir"])
        background.start(key_dir, broker_url or "", cleanup)
    http = httpx.Client(base_url=api, timeout=30)
    cleanup.append(http.close)
    cleanup.append(lambda: stop_all(procs))  # first of all: the agents and the controller, then the background

    def scrape() -> Samples:
        return parse_metrics(http.get("/metrics").text)

    for name, role, config in (("controller", "controller", layout.controller),
                               *(("agent-" + n, "agent", c) for n, c in layout.agents.items())):
        own = {**env, **background.controller_env(len(real))} if background and role == "controller" else env
        with (root / f"{name}.log").open("ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "selfheal", role, "--config", str(config)],
                                          stdout=log, stderr=subprocess.STDOUT, env=own))
        if role == "controller":
            try:
                wait_until(lambda: httpx.get(f"{api}/readyz", timeout=1).status_code == 200, 120, "controller")
            except TimeoutError:
                print((root / "controller.log").read_text()[-3000:], file=sys.stderr)
                raise
    if background is not None:
        background.load(scrape, len(real))
    poll = 0.5 if background else 0.1  # under load, each look lists the whole fleet's units
    wait_until(lambda: healthy(unit(api, "node-a")) and healthy(unit(api, "node-b")), 300, "services healthy",
               poll)
    load = (f", background {background.nodes} simulated nodes at {background.rate:g} reports/s"
            if background else "")
    print(f"selfheal MTTR, {args.n} injections each, HTTP probe 0.5 s x 3 failures, broker "
          f"{broker_url or 'embedded'}{load}", flush=True)
    controller = psutil.Process(procs[0].pid)
    before = background.mark(scrape, controller) if background else None
    open_before = sum(1 for i in open_incidents(api) if i["node"] not in real) if background else 0
    results = {fault: inject(layout, api, fault, args.n, poll=poll, quiet=args.quiet) for fault in args.faults}
    if background is not None and before is not None:
        after = background.mark(scrape, controller)
        open_after = sum(1 for i in open_incidents(api) if i["node"] not in real)
        background.measured(before, after, (open_before, open_after))
    return results


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(25)
        except subprocess.TimeoutExpired:
            proc.kill()


def report(results: dict[str, list[float]], background: Background | None) -> dict[str, Any]:
    """The table, the background's figures and the goal's line; the figures for ``--json``."""
    figures: dict[str, Any] = {}
    print(f"\n{'fault':<6} {'median':>8} {'max':>8}   anchor")
    for fault, times in results.items():
        median, worst = statistics.median(times), max(times)
        label, low, high = ANCHORS[fault]
        figures[fault] = {"median_s": round(median, 3), "max_s": round(worst, 3), "n": len(times)}
        print(f"{fault:<6} {median:>7.2f}s {worst:>7.2f}s   {label}: {low}-{high} s "
              f"(selfheal median is {median / low:.2f}x of its best)")
    if "hang" in results:
        print(f"{'':<24}   Kubernetes default liveness, hang: {K8S_HANG[0]:g}-{K8S_HANG[1]:g} s")
    if background is not None:
        figures["background"] = background.figures
        for line in background.lines():
            print(line)
    if "crash" in results:
        print(f"crash median (SIGKILL to HTTP 200 again): {figures['crash']['median_s']:.3f} s; issue 14's goal: "
              f"<= {GOAL_CRASH_S} s with 10,000 simulated nodes offering half the controller's ceiling"
              + ("" if background else " (this run: idle)"))
    return figures


if __name__ == "__main__":
    sys.exit(main())
