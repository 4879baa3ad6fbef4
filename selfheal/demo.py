"""``selfheal demo``: the whole loop on loopback, with real processes.

Starts a controller with the embedded broker and two agents as separate
``selfheal`` processes, each supervising a small HTTP service with an HTTP
probe, plus a third agent that only holds a replica of a small dataset (all
three do); then SIGKILLs one service (a crash), SIGSTOPs the other (a hang)
and flips a byte in one dataset replica (corruption, repaired from the
majority), and narrates the healing from the controller's API. Everything lives in a
temp dir; free ports are picked automatically. The API stays up until Ctrl-C
or ``--duration``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from selfheal.keys import write_key

NODES = ("node-a", "node-b")
DATA_NODES = (*NODES, "node-c")
"""Every agent holds a replica of the demo dataset; node-c holds only that."""
CORRUPTED = "shards/part-1.bin"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


@dataclass(frozen=True)
class Layout:
    controller: Path
    agents: dict[str, Path]
    api_port: int
    unit_ports: dict[str, int]
    """The HTTP port of each node's ``web`` service."""


def write_configs(root: Path, *, broker_url: str | None = None, rulebook: Path | None = None) -> Layout:
    """Controller and agent configs: embedded broker unless ``broker_url``; built-in rules unless ``rulebook``."""
    broker, api = _free_port(), _free_port()
    keys = root / "keys"
    for node in DATA_NODES:
        write_key(keys, node)
        _write_dataset(root / f"data-{node}")
    token = root / "api.token"
    token.write_text(secrets.token_hex(24) + "\n", encoding="ascii")
    token.chmod(0o600)
    common = f'[security]\nkey_dir = {_q(str(keys))}\napi_token_file = {_q(str(root / "api.token"))}\n'
    controller = root / "controller.toml"
    mqtt = f'url = {_q(broker_url)}' if broker_url else f'url = "embedded"\nembedded_listen = "127.0.0.1:{broker}"'
    rules = f"rulebooks = [{_q(str(rulebook))}]\n" if rulebook else ""
    controller.write_text(
        f'[mqtt]\n{mqtt}\n\n'
        f'[controller]\nlisten = "127.0.0.1:{api}"\nstate_dir = {_q(str(root / "controller"))}\n'
        f"offline_after = 5.0\n{rules}\n{common}")
    agents, ports = {}, {}
    for node in DATA_NODES:
        port = _free_port()
        path = root / f"{node}.toml"
        unit = (f'[[agent.units]]\nname = "web"\nkind = "process"\n'
                f'command = [{_q(sys.executable)}, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]\n'
                f"stop_grace = 2.0\n\n"
                f'[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:{port}/"\n'
                f"interval = 0.5\ntimeout = 0.5\nfailures = 3\nstart_period = 1.0\n\n") if node in NODES else ""
        path.write_text(
            f'[mqtt]\nurl = {_q(broker_url or f"mqtt://127.0.0.1:{broker}")}\nkeepalive = 5.0\n\n'
            f'[agent]\nnode_id = "{node}"\ninterval = 1.0\nstate_dir = {_q(str(root / node))}\n'
            f'listen = "127.0.0.1:0"\n\n{unit}'
            f'[[agent.datasets]]\nname = "features"\npath = {_q(str(root / f"data-{node}"))}\n'
            f"chunk_size = 65536\nscan_interval = 1.0\n\n{common}")
        agents[node] = path
        if node in NODES:
            ports[node] = port
    return Layout(controller, agents, api, ports)


def _write_dataset(folder: Path) -> None:
    """The same small dataset on every node (a deterministic byte pattern, 4 files)."""
    (folder / "shards").mkdir(parents=True)
    for i in range(3):
        (folder / "shards" / f"part-{i}.bin").write_bytes(bytes((i * 7 + n) % 251 for n in range(200_000)))
    (folder / "README").write_text("features for the demo model\n")


def _dataset_agrees(client: httpx.Client) -> bool:
    items = client.get("/api/v1/datasets").json()["items"]
    return bool(items) and len(items[0]["replicas"]) == len(DATA_NODES) and items[0]["agreement"]["replicas"] == 1.0


class Narrator:
    """Polls the API and prints what changed, like an operator watching the page."""

    def __init__(self, client: httpx.Client, out: Callable[[str], None]) -> None:
        self.client = client
        self.out = out
        self.seen: dict[int, int] = {}

    def units(self) -> dict[str, dict[str, Any]]:
        items = self.client.get("/api/v1/units").json()["items"]
        return {f"{u['node']}/{u['name']}": u for u in items}

    def poll(self) -> None:
        for incident in reversed(self.client.get("/api/v1/incidents", params={"limit": 20}).json()["items"]):
            detail = self.client.get(f"/api/v1/incidents/{incident['id']}").json()
            start = self.seen.get(incident["id"], 0)
            for entry in detail["timeline"][start:]:
                text = _describe(entry)
                if text:
                    self.out(f"  incident #{incident['id']} {entry['kind']:<16} {text}")
            self.seen[incident["id"]] = len(detail["timeline"])

    def wait(self, what: str, check: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.poll()
                if check():
                    return True
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        self.out(f"  !! gave up waiting for {what} after {timeout:.0f}s")
        return False


QUIET = frozenset({"plan_running", "plan_verifying"})
"""Timeline entries the narration skips: the entries around them already say it."""


def _describe(entry: dict[str, Any]) -> str:
    """One line of narration for an audit entry ("" to skip it)."""
    data, kind = entry["data"], entry["kind"]
    if (kind in QUIET and not data.get("detail")) or kind == "notice":  # notices: chat messages, logged
        return ""
    if kind == "plan_proposed":
        steps = ", ".join(
            f"{s['kind']} {s.get('node', '')}/{s.get('dataset') or s.get('unit', '')}" for s in data["steps"])
        return f"rule {data['rule']} rung {data['rung']}: {steps} ({len(data['checks'])} guards passed)"
    if kind == "localised":
        files = ", ".join(f"{d['path']} (chunks {d.get('chunks') or 'all'})" for d in data["differences"])
        return (f"{data['replica']} differs from the authority in {files}; {data['fetch_bytes']} bytes to pull "
                f"from {data['source']} ({data['rounds']} round trips)")
    if kind == "rechecked":
        return f"symptom {data['symptom']} just before {data['step']}"
    if kind == "command_sent":
        return f"{data['step']} signed and sent to {data['node']} (idempotency key {data['key'][:12]}…)"
    if kind == "verifying":
        goal = f"{data['unit']} to be healthy again" if data.get("unit") else "the finding to clear"
        return f"waiting up to {data['within_s']:g}s for {goal}"
    if kind == "held":
        return f"held by {data['blocking']['guard']}: {data['blocking']['reason']}"
    for key in ("summary", "detail", "reason"):
        if data.get(key):
            return str(data[key])
    if kind == "command_result":
        return f"agent says {data['status']}"
    return ", ".join(f"{k}={v}" for k, v in data.items())


def run_demo(  # noqa: PLR0915 - one narrated script, read top to bottom
    *, duration: float | None = None, keep: bool = False,
             out: Callable[[str], None] = lambda line: print(line, flush=True)) -> int:
    root = Path(tempfile.mkdtemp(prefix="selfheal-demo-"))
    layout = write_configs(root)
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "SELFHEAL_LOG__FORMAT": "json"}

    def spawn(role: str, config: Path, log_name: str) -> None:
        with (root / log_name).open("ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "selfheal", role, "--config", str(config)],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))

    out(f"selfheal demo: working in {root}")
    started = time.monotonic()
    try:
        spawn("controller", layout.controller, "controller.log")
        base = f"http://127.0.0.1:{layout.api_port}"
        with httpx.Client(base_url=base, timeout=2.0) as client:
            narrator = Narrator(client, out)
            if not narrator.wait("the controller", lambda: client.get("/readyz").status_code == 200, 30):
                return _fail(root, out)
            out(f"status: {base}/")
            for node, config in layout.agents.items():
                spawn("agent", config, f"{node}.log")
            out("started 3 agents: node-a and node-b each supervise an HTTP service 'web' probed every 0.5 s; "
                "all three hold a replica of the dataset 'features'")

            def all_healthy() -> bool:
                units = narrator.units()
                return len(units) == 2 and all(u["state"] == "running" and u["healthy"] for u in units.values())

            if not narrator.wait("both services healthy", all_healthy, 60):
                return _fail(root, out)
            out("both services are healthy\n")
            for node, sig, what in (("node-a", signal.SIGKILL, "crash"), ("node-b", signal.SIGSTOP, "hang")):
                unit = narrator.units()[f"{node}/web"]
                out(f"fault: {what} — {sig.name} {node}/web (pid {unit['pid']})")
                t0 = time.monotonic()
                os.kill(unit["pid"], sig)

                def healed(node: str = node, restarts: int = unit["restarts"]) -> bool:
                    u = narrator.units()[f"{node}/web"]
                    return u["restarts"] > restarts and u["state"] == "running" and bool(u["healthy"])

                if narrator.wait(f"{node}/web to heal", healed, 60):
                    out(f"healed: {node}/web is serving again {time.monotonic() - t0:.1f}s after the {what}\n")
            narrator.wait("incidents to resolve", lambda: not client.get(
                "/api/v1/incidents", params={"state": "open"}).json()["items"], 15)
            if narrator.wait("the three dataset replicas to agree", lambda: _dataset_agrees(client), 30):
                victim = Path(layout.agents["node-b"]).parent / "data-node-b" / CORRUPTED
                data = bytearray(victim.read_bytes())
                data[70_000] ^= 0xFF
                victim.write_bytes(bytes(data))
                out(f"fault: corruption — flipped one byte of node-b's replica of 'features' ({CORRUPTED})")
                t0 = time.monotonic()

                def repaired() -> bool:
                    divergent = [i for i in client.get("/api/v1/incidents").json()["items"]
                                 if i["kind"] == "dataset_divergent"]
                    return bool(divergent) and all(i["state"] == "resolved" for i in divergent) \
                        and _dataset_agrees(client)

                if narrator.wait("node-b's replica to be repaired", repaired, 60):
                    out(f"healed: node-b's replica was localised to {CORRUPTED}, its differing chunk pulled from a "
                        f"replica of the majority and verified, {time.monotonic() - t0:.1f}s after the corruption\n")
            out(f"all healed. The API stays up at {base}/ — "
                + ("Ctrl-C to stop." if duration is None else f"stopping after {duration:g}s."))
            while duration is None or time.monotonic() - started < duration:
                narrator.poll()
                if any(p.poll() is not None for p in procs):
                    out("a selfheal process exited unexpectedly; see the logs")
                    return _fail(root, out)
                time.sleep(0.5)
    except KeyboardInterrupt:
        out("\nstopping")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(25)
            except subprocess.TimeoutExpired:
                proc.kill()
        if keep:
            out(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _fail(root: Path, out: Callable[[str], None]) -> int:
    for log in sorted(root.glob("*.log")):
        out(f"--- last lines of {log.name}")
        for line in log.read_text(errors="replace").splitlines()[-15:]:
            out(line)
    return 1
