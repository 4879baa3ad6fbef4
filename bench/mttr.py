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

    .venv/bin/python bench/mttr.py [-n 5] [--broker-url mqtt://127.0.0.1:1883] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from selfheal.demo_layout import Layout, write_configs

ANCHORS = {"crash": ("Monit 5.33, 1 s cycle", 2.0, 2.5), "hang": ("Monit 5.33, 1 s cycle", 11.0, 12.7)}
K8S_HANG = (21.0, 61.0)
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


def unit(api: str, node: str) -> dict[str, object]:
    items = httpx.get(f"{api}/api/v1/units", timeout=2).json()["items"]
    return next(u for u in items if u["node"] == node and u["name"] == "web")


def healthy(api: str, node: str) -> bool:
    u = unit(api, node)
    return u["state"] == "running" and bool(u["healthy"])


def settled(api: str) -> bool:
    return not httpx.get(f"{api}/api/v1/incidents", params={"state": "open"}, timeout=2).json()["items"]


def inject(layout: Layout, api: str, fault: str, n: int) -> list[float]:
    node, sig = ("node-a", signal.SIGKILL) if fault == "crash" else ("node-b", signal.SIGSTOP)
    port = layout.unit_ports[node]
    times = []
    for i in range(n):
        wait_until(lambda: healthy(api, node) and settled(api), 60, "settled before injection", 0.1)
        pid = int(unit(api, node)["pid"])  # type: ignore[call-overload]
        t0 = time.monotonic()
        os.kill(pid, sig)
        if fault == "crash":
            wait_until(lambda: not serving(port), 5, "port closed")
        healed_at = wait_until(lambda: serving(port), 60, f"{fault} {i + 1} healed")
        times.append(healed_at - t0)
        print(f"  {fault} {i + 1}/{n}: {times[-1]:.2f} s", flush=True)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="injections of each fault (default 5)")
    parser.add_argument("--broker-url", default=None, help="use this broker instead of the embedded one")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="selfheal-mttr-"))
    (root / "rules.yaml").write_text(BENCH_RULES)
    layout = write_configs(root, broker_url=args.broker_url, rulebook=root / "rules.yaml")
    api = f"http://127.0.0.1:{layout.api_port}"
    env = {**os.environ, "SELFHEAL_LOG__FORMAT": "json"}
    procs = []
    try:
        for name, role, config in (("controller", "controller", layout.controller),
                                   *(("agent-" + n, "agent", c) for n, c in layout.agents.items())):
            with (root / f"{name}.log").open("ab") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "selfheal", role, "--config", str(config)],
                                              stdout=log, stderr=subprocess.STDOUT, env=env))
            if role == "controller":
                try:
                    wait_until(lambda: httpx.get(f"{api}/readyz", timeout=1).status_code == 200, 30, "controller")
                except TimeoutError:
                    print((root / "controller.log").read_text()[-3000:], file=sys.stderr)
                    raise
        wait_until(lambda: healthy(api, "node-a") and healthy(api, "node-b"), 60, "services healthy", 0.1)
        print(f"selfheal MTTR, {args.n} injections each, HTTP probe 0.5 s x 3 failures, broker "
              f"{args.broker_url or 'embedded'}", flush=True)
        results = {fault: inject(layout, api, fault, args.n) for fault in ("crash", "hang")}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(25)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)

    figures = {}
    print(f"\n{'fault':<6} {'median':>8} {'max':>8}   anchor")
    for fault, times in results.items():
        median, worst = statistics.median(times), max(times)
        label, low, high = ANCHORS[fault]
        figures[fault] = {"median_s": round(median, 3), "max_s": round(worst, 3), "n": len(times)}
        print(f"{fault:<6} {median:>7.2f}s {worst:>7.2f}s   {label}: {low}-{high} s "
              f"(selfheal median is {median / low:.2f}x of its best)")
    print(f"{'':<24}   Kubernetes default liveness, hang: {K8S_HANG[0]:g}-{K8S_HANG[1]:g} s")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
