"""What the agent costs a node, against a bare psutil loop collecting the same figures.

Everything is real and on loopback: a Mosquitto this script starts on a free
port, and the real agent (``selfheal agent`` as a subprocess) with a node key
(so it signs), a temp state dir, a 1 s interval and three ``process`` units:
``web`` (a tiny ``http.server``, HTTP probe), ``worker`` (``sleep``, exec probe
``true``) and ``idle`` (``sleep``, no probe); no datasets.

In the same run, the anchor: a separate Python process (this file with
``--anchor``: stdlib, psutil and aiomqtt, nothing else) that every interval
collects the figures the agent reports — host CPU, load, memory, swap, each
mounted partition's usage, disk and network counters, and per unit process
CPU, RSS, fds, threads, status for the same three PIDs — and publishes one
HMAC-signed JSON message of a similar size over aiomqtt. It is the floor a
Python agent can reach; the agent also runs probes, a supervisor, an HTTP
server, a command ledger and the MQTT session logic on top.

After a warm-up, both are measured side by side for ``--seconds``: CPU as a
share of one core (``cpu_times`` deltas over the window), RSS sampled twice a
second (steady: the median; peak: the kernel's high-water mark ``VmHWM``, which
includes start-up), USS at the end. A subscriber counts both processes'
messages, so a silent agent cannot look cheap.

    .venv/bin/python bench/agent.py [--seconds 60] [--warmup 10] [--interval 1.0] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import statistics
import sys
import time
from typing import Any

import psutil

GOAL_RSS_MIB = 40.0
GOAL_CPU_PERCENT = 1.0
ANCHOR_TOPIC = "bench/agent/anchor"
NODE = "bench-agent"


# --- the anchor: imports only stdlib, psutil and aiomqtt -------------------------------------------------------


def anchor_host(prev_cpu: bool) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    disks = []
    for part in psutil.disk_partitions(all=False):
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        disks.append({"mount": part.mountpoint, "total_bytes": usage.total, "used_bytes": usage.used,
                      "percent": usage.percent})
    io, net = psutil.disk_io_counters(), psutil.net_io_counters()
    load = os.getloadavg()
    return {"cpu_percent": psutil.cpu_percent(interval=None) if prev_cpu else 0.0,
            "load1": load[0], "load5": load[1], "load15": load[2],
            "mem_total_bytes": memory.total, "mem_available_bytes": memory.available, "mem_percent": memory.percent,
            "swap_percent": psutil.swap_memory().percent, "disks": disks,
            "disk_read_bytes": io.read_bytes if io else 0, "disk_write_bytes": io.write_bytes if io else 0,
            "net_sent_bytes": net.bytes_sent, "net_recv_bytes": net.bytes_recv}


def anchor_unit(name: str, proc: psutil.Process) -> dict[str, Any]:
    try:
        with proc.oneshot():
            return {"name": name, "kind": "process", "state": "running", "pid": proc.pid,
                    "cpu_percent": proc.cpu_percent(interval=None), "rss_bytes": proc.memory_info().rss,
                    "num_fds": proc.num_fds(), "num_threads": proc.num_threads(), "proc_status": proc.status(),
                    "restarts": 0, "started_at": proc.create_time(),
                    "probe": {"kind": "http", "healthy": True, "consecutive_failures": 0, "failures_threshold": 3,
                              "last_latency_s": 0.0031, "checked_at": time.time()}}
    except psutil.Error:
        return {"name": name, "state": "exited"}


def anchor_main(port: int, interval: float, units: dict[str, int]) -> None:
    """Every ``interval``: the same figures as the agent's report, one signed JSON message (QoS 0)."""
    import aiomqtt  # noqa: PLC0415 - the harness does not need it

    procs = {name: psutil.Process(pid) for name, pid in units.items()}
    key = hashlib.sha256(b"bench-agent-anchor").digest()

    async def run() -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-agent-anchor-{os.getpid()}") as client:
            loop = asyncio.get_running_loop()
            seq, next_at = 0, loop.time()
            while True:
                seq += 1
                report = {"node": "anchor", "session": 1, "seq": seq, "ts": time.time(),
                          "host": await asyncio.to_thread(anchor_host, seq > 1),
                          "units": await asyncio.to_thread(
                              lambda: [anchor_unit(n, p) for n, p in procs.items()])}
                body = json.dumps(report, separators=(",", ":")).encode()
                signature = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
                await client.publish(ANCHOR_TOPIC, body + b"\n" + signature, qos=0)
                next_at = max(next_at + interval, loop.time())
                await asyncio.sleep(next_at - loop.time())

    asyncio.run(run())


# --- the harness -------------------------------------------------------------------------------------------------


def _q(value: str) -> str:
    return json.dumps(value)


def _argv(*args: str) -> str:
    return "[" + ", ".join(_q(a) for a in args) + "]"


def agent_config(root: Any, *, port: int, web_port: int, interval: float, key_dir: Any) -> str:
    sleep = _argv("sleep", "1e9")
    web = _argv(sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1")
    return (f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n\n'
            f'[agent]\nnode_id = "{NODE}"\ninterval = {interval}\nstate_dir = {_q(str(root / "state"))}\n'
            f'listen = "127.0.0.1:0"\n\n'
            f'[[agent.units]]\nname = "web"\nkind = "process"\ncommand = {web}\n\n'
            f'[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:{web_port}/"\n'
            f"interval = {interval}\ntimeout = 0.5\n\n"
            f'[[agent.units]]\nname = "worker"\nkind = "process"\ncommand = {sleep}\n\n'
            f'[agent.units.probe]\nkind = "exec"\ntarget = ["true"]\ninterval = {interval}\ntimeout = 0.5\n\n'
            f'[[agent.units]]\nname = "idle"\nkind = "process"\ncommand = {sleep}\n\n'
            f'[security]\nkey_dir = {_q(str(key_dir))}\n\n[log]\nformat = "json"\n')


def unit_pids(agent: psutil.Process, web_port: int) -> dict[str, int]:
    """The three unit processes among the agent's children (probe children come and go)."""
    found: dict[str, int] = {}
    for child in agent.children(recursive=False):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "http.server" in cmd and str(web_port) in cmd:
            found["web"] = child.pid
        elif cmd[:2] == ["sleep", "1e9"]:
            found["idle" if "worker" in found else "worker"] = child.pid
    return found


def peak_rss(pid: int) -> int:
    """The kernel's RSS high-water mark (``VmHWM``), in bytes; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:  # noqa: PTH123 - /proc, a one-off read
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Counter:
    """Counts and sizes the messages of both subjects (a paho subscriber on its own thread)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho  # noqa: PLC0415 - the anchor process never needs it
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

        from selfheal.wire import node_topic  # noqa: PLC0415

        self.report_topic = node_topic(NODE, "report")
        self.counts = {"agent": 0, "anchor": 0}
        self.sizes = {"agent": 0, "anchor": 0}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-agent-count-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: Any, *_: Any) -> None:
        client.subscribe(self.report_topic)
        client.subscribe(ANCHOR_TOPIC)

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        who = "agent" if message.topic == self.report_topic else "anchor"
        self.counts[who] += 1
        self.sizes[who] = len(message.payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def measure(procs: dict[str, psutil.Process], seconds: float) -> dict[str, dict[str, float]]:
    start = {name: p.cpu_times() for name, p in procs.items()}
    t0 = time.monotonic()
    rss: dict[str, list[int]] = {name: [] for name in procs}
    while time.monotonic() - t0 < seconds:
        for name, proc in procs.items():
            rss[name].append(proc.memory_info().rss)
        time.sleep(0.5)
    wall = time.monotonic() - t0
    out = {}
    for name, proc in procs.items():
        end = proc.cpu_times()
        used = (end.user - start[name].user) + (end.system - start[name].system)
        out[name] = {"cpu_percent": round(100 * used / wall, 2),
                     "rss_steady_mib": round(statistics.median(rss[name]) / 2**20, 1),
                     "rss_peak_mib": round(max(peak_rss(proc.pid), *rss[name]) / 2**20, 1),
                     "uss_mib": round(proc.memory_full_info().uss / 2**20, 1),
                     "threads": proc.num_threads()}
    return out


def harness(args: argparse.Namespace) -> int:  # noqa: PLR0915 - one straight sequence, start to stop
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from bench.simulated import free_port, selfheal_command, start_broker, start_process, stop_process  # noqa: PLC0415
    from selfheal.keys import write_key  # noqa: PLC0415

    root = Path(tempfile.mkdtemp(prefix="selfheal-bench-agent-"))
    cleanup: list[Any] = []
    code = 0
    try:
        broker, port = start_broker(root, 10)
        cleanup.append(lambda: stop_process(broker))
        write_key(root / "keys", NODE)
        web_port = free_port()
        config = root / "agent.toml"
        config.write_text(agent_config(root, port=port, web_port=web_port, interval=args.interval,
                                       key_dir=root / "keys"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SELFHEAL_")}
        counter = Counter(port)
        cleanup.append(counter.close)
        popen = start_process([*selfheal_command(), "agent", "--config", str(config)], root / "agent.log", env)
        cleanup.append(lambda: stop_process(popen))
        agent = psutil.Process(popen.pid)
        deadline = time.monotonic() + 60
        while len(pids := unit_pids(agent, web_port)) < 3 or counter.counts["agent"] < 2:
            if popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not report: {(root / 'agent.log').read_text()[-3000:]}")
            time.sleep(0.1)
        anchor_popen = start_process([sys.executable, __file__, "--anchor", str(port), str(args.interval),
                                      json.dumps(pids)], root / "anchor.log", env)
        cleanup.append(lambda: stop_process(anchor_popen))
        anchor = psutil.Process(anchor_popen.pid)
        print(f"selfheal agent bench: interval {args.interval:g} s, units {pids}, warm-up {args.warmup:g} s, "
              f"measuring {args.seconds:g} s; machine: {os.cpu_count()} CPUs, load "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        time.sleep(args.warmup)
        before = dict(counter.counts)
        figures = measure({"agent": agent, "anchor": anchor}, args.seconds)
        for name in figures:
            figures[name]["messages"] = counter.counts[name] - before[name]
            figures[name]["message_bytes"] = counter.sizes[name]
        if popen.poll() is not None or anchor_popen.poll() is not None:
            raise RuntimeError("a subject exited during the measurement")
    finally:
        for stop in reversed(cleanup):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - cleanup goes on
                print(f"cleanup: {exc}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)

    agent_f, anchor_f = figures["agent"], figures["anchor"]
    print(f"\n{'':<8} {'cpu % core':>10} {'rss steady':>11} {'rss peak':>9} {'uss':>7} {'threads':>8} "
          f"{'msgs':>5} {'bytes':>6}")
    for name, f in figures.items():
        print(f"{name:<8} {f['cpu_percent']:>10.2f} {f['rss_steady_mib']:>7.1f} MiB {f['rss_peak_mib']:>5.1f} MiB "
              f"{f['uss_mib']:>3.1f} MiB {f['threads']:>8} {f['messages']:>5} {f['message_bytes']:>6}")
    ratio = {key: round(agent_f[key] / anchor_f[key], 2) if anchor_f[key] else None
             for key in ("cpu_percent", "rss_steady_mib", "rss_peak_mib")}
    print(f"agent / anchor: cpu {ratio['cpu_percent']}x, rss steady {ratio['rss_steady_mib']}x, "
          f"rss peak {ratio['rss_peak_mib']}x")
    goals = {"rss_peak_mib": agent_f["rss_peak_mib"] <= GOAL_RSS_MIB,
             "cpu_percent": agent_f["cpu_percent"] <= GOAL_CPU_PERCENT}
    print(f"goals: rss peak <= {GOAL_RSS_MIB:g} MiB: {'met' if goals['rss_peak_mib'] else 'MISSED'}; "
          f"cpu <= {GOAL_CPU_PERCENT:g} % of a core: {'met' if goals['cpu_percent'] else 'MISSED'}")
    if args.json:
        print(json.dumps({"bench": "agent", "interval": args.interval, "seconds": args.seconds,
                          "warmup": args.warmup, "cpus": os.cpu_count(), **figures, "ratio": ratio,
                          "goals": {"rss_mib": GOAL_RSS_MIB, "cpu_percent": GOAL_CPU_PERCENT, "met": goals}}))
    return code


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--anchor":
        anchor_main(int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds (default 60)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds after the first reports (default 10)")
    parser.add_argument("--interval", type=float, default=1.0, help="agent.interval and the anchor's (default 1)")
    parser.add_argument("--json", action="store_true", help="end with one line holding a JSON object of the figures")
    return harness(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
