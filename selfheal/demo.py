"""``selfheal demo``: the whole loop on loopback, with real processes.

Starts a controller with the embedded broker and three agents as separate
``selfheal`` processes (``selfheal.demo_layout``): node-a runs the platform's
pipeline — batches land, Spark cleans them, a model is trained and served —
node-b holds a standby copy of the prediction service, and all three hold a
replica of a small dataset. Once a model answers, it injects, one at a time,
and narrates the healing from the controller's API:

1. a crash: SIGKILL of the prediction service → restarted in place;
2. a hang: the ETL job's driver SIGSTOPped mid-run → its progress stalls →
   restarted, and the new run resumes from the last committed output;
3. corruption: one byte flipped in node-b's dataset replica → localised and
   repaired from the majority;
4. node loss: node-a's agent SIGKILLed → the prediction service (a movable
   singleton) dies with it, and once node-a has been silent long enough to be
   sure of that, it is started on node-b, which then answers predictions;
   node-a's agent, restarted, keeps its own copy stopped.

Everything lives in a temp dir; free ports are picked automatically. The API
stays up until Ctrl-C or ``--duration``. The embedded broker requires
credentials: each process logs in as itself with a password generated under
the temp dir, and each node may publish only its own topics; the demo prints
what that broker cannot enforce, as the controller logged it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from selfheal.demo_layout import DATA_NODES, STOP_AFTER_DISCONNECT, Layout, Pipeline, write_configs

CORRUPTED = "shards/part-1.bin"
HOT = {"events": 20.0, "temp_mean": 90.0, "temp_max": 95.0, "vib_mean": 1.7, "vib_max": 1.9,
       "pressure_mean": 25.0, "rpm_mean": 1200.0, "error_share": 0.31, "warn_share": 0.35}
"""One worn, hot device, for the predictions the demo asks for."""
Out = Callable[[str], None]


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
            f"{s['kind']} {s['unit']} {s['source']} → {s['target']}" if s["kind"] == "migrate_unit"
            else f"{s['kind']} {s.get('node', '')}/{s.get('dataset') or s.get('unit', '')}" for s in data["steps"])
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
    if kind == "fence_wait":
        return (f"{data['node']} is unreachable: waiting {data['wait']:.1f}s more, until it has been silent for "
                f"{data['fence_after']:g}s — by then its copy of {data['unit']} is surely stopped")
    if kind == "held":
        return f"held by {data['blocking']['guard']}: {data['blocking']['reason']}"
    for key in ("summary", "detail", "reason"):
        if data.get(key):
            return str(data[key])
    if kind == "command_result":
        return f"agent says {data['status']}"
    return ", ".join(f"{k}={v}" for k, v in data.items())


class Demo:
    """The narrated scenario; each fault is one method, run in order by ``run``."""

    def __init__(self, root: Path, layout: Layout, client: httpx.Client, out: Out) -> None:
        self.root = root
        self.layout = layout
        self.client = client
        self.out = out
        self.narrator = Narrator(client, out)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "SELFHEAL_LOG__FORMAT": "json"}

    def spawn(self, role: str, name: str) -> None:
        config = self.layout.controller if role == "controller" else self.layout.agents[name]
        with (self.root / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "selfheal", role, "--config", str(config)],
                                                stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def unit(self, node: str, name: str) -> dict[str, Any]:
        return self.narrator.units().get(f"{node}/{name}", {})

    def wait(self, what: str, check: Callable[[], bool], timeout: float) -> bool:
        return self.narrator.wait(what, check, timeout)

    def predict(self, node: str) -> str:
        response = httpx.post(f"http://127.0.0.1:{self.layout.unit_ports[node]}/predict",
                              json={"instances": [HOT]}, timeout=5)
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:200]}"
        body = response.json()
        return (f"model {body['model_version']} says failure risk {body['probabilities'][0]:.2f} "
                f"for a hot, shaky device")

    def answers(self, node: str) -> bool:
        try:
            return self.predict(node).startswith("model ")
        except httpx.HTTPError:
            return False

    # --- the scenario -------------------------------------------------------------------------

    def start(self) -> bool:
        self.spawn("controller", "controller")
        if not self.wait("the controller", lambda: self.client.get("/readyz").status_code == 200, 30):
            return False
        self.out(f"status: {self.client.base_url}")
        self.broker()
        for node in self.layout.agents:
            self.spawn("agent", node)
        self.out("started 3 agents. node-a runs the pipeline: generate (lands batches every 30 s), etl (Spark, "
                 "local[2], every 20 s), train (every 20 s) and predict (the prediction service); node-b holds a "
                 "standby copy of predict; all three hold a replica of the dataset 'features'")
        return True

    def broker(self) -> None:
        """One line: the broker's credentials and what it cannot enforce (the controller's own log says)."""
        files = self.layout.broker
        if files is None:
            return
        limits = _logged(self.root / "controller.log", "broker.limitation", "what")
        self.out(f"broker: requires credentials — controller and each node log in with their own password "
                 f"({files.directory}/credentials); a node may publish only its own topics and read only its own "
                 f"commands" + (f"; this embedded broker cannot enforce: {', '.join(limits)} (Mosquitto can, see "
                                f"the README's Security section)" if limits else ""))

    def pipeline(self, flow: Pipeline) -> bool:
        """Wait for data → features → model → a service answering; False if the pipeline cannot run here."""
        def ready() -> bool:
            etl = self.unit("node-a", "etl")
            if etl.get("state") == "failed":
                raise _Blocked(str(etl.get("error") or "the etl unit failed to start"))
            return (flow.models / "current.json").exists() and self.answers("node-a")
        self.out("waiting for the first batches, the first Spark run, the first model (a minute or two)…")
        try:
            if not self.wait("the first model to answer", ready, 300):
                return False
        except _Blocked as exc:
            self.out(f"  !! the ETL job cannot run here: {exc}. The rest of the platform keeps running; "
                     "install a Java 17+ runtime for the pipeline part of the demo.")
            return False
        manifest = _read_json(flow.features / "manifest.json")
        commits = manifest.get("commits", [])
        current = _read_json(flow.models / "current.json")
        metrics = _read_json(flow.models / str(current.get("version")) / "metrics.json")
        self.out(f"pipeline: {len(list(flow.landing.glob('batch-*')))} batches landed; Spark committed "
                 f"{len(commits)} commits of features ({sum(c.get('feature_rows', 0) for c in commits)} rows); "
                 f"model {current.get('version')} published ({metrics.get('metric', 'score')} "
                 f"{metrics.get('score', float('nan')):.3f})")
        self.out(f"predict on node-a: {self.predict('node-a')}\n")
        return True

    def crash(self) -> None:
        unit = self.unit("node-a", "predict")
        self.out(f"fault 1: crash — SIGKILL node-a/predict (pid {unit['pid']})")
        t0 = time.monotonic()
        os.kill(unit["pid"], signal.SIGKILL)

        def healed() -> bool:
            u = self.unit("node-a", "predict")
            return u.get("restarts", 0) > unit["restarts"] and u.get("state") == "running" and self.answers("node-a")
        if self.wait("node-a/predict to serve again", healed, 60):
            self.out(f"healed: node-a/predict answers again {time.monotonic() - t0:.1f}s after the crash\n")

    def hang(self, flow: Pipeline) -> None:
        before = self.unit("node-a", "etl")
        flow.hold.touch()  # fault injection: the next run waits before its second commit, so it is caught mid-run
        subprocess.run([sys.executable, "-m", "workloads.generate", "--landing", str(flow.landing), "--batches", "2",
                        "--rows", "3000", "--devices", "100", "--log-level", "warning"],
                       check=False, env=self.env, capture_output=True)

        def holding() -> bool:
            return (_read_json(flow.etl_progress).get("stage") == "holding"
                    and bool(self.unit("node-a", "etl").get("pid")))
        if not self.wait("an ETL run in the middle of its work", holding, 120):
            flow.hold.unlink(missing_ok=True)
            return
        etl = self.unit("node-a", "etl")
        os.kill(etl["pid"], signal.SIGSTOP)
        flow.hold.unlink()
        done = _read_json(flow.etl_progress).get("done")
        self.out(f"fault 2: hang — SIGSTOP node-a/etl's Spark driver (pid {etl['pid']}) mid-run, after commit "
                 f"{done}; its process lives but its progress is frozen")
        t0 = time.monotonic()

        def restarted() -> bool:
            return bool(self.unit("node-a", "etl").get("restarts", 0) > before.get("restarts", 0))

        def finished() -> bool:
            return restarted() and self.unit("node-a", "etl").get("state") == "completed"
        if not self.wait("the stalled ETL job to be restarted", restarted, 180):
            return
        self.out(f"healed: etl restarted {time.monotonic() - t0:.1f}s after the hang (stall_after 45 s)")
        t1 = time.monotonic()
        if self.wait("the restarted ETL run to finish", finished, 240):
            batches = [b["name"] for c in _read_json(flow.features / "manifest.json").get("commits", [])
                       for b in c.get("batches", [])]
            self.out(f"the new run resumed from the last commit and finished {time.monotonic() - t1:.1f}s later: "
                     f"{len(batches)} batches committed in all, {len(batches) - len(set(batches))} of them twice\n")

    def corruption(self) -> None:
        if not self.wait("the three dataset replicas to agree", lambda: _dataset_agrees(self.client), 60):
            return
        victim = self.root / "data-node-b" / CORRUPTED
        data = bytearray(victim.read_bytes())
        data[70_000] ^= 0xFF
        victim.write_bytes(bytes(data))
        self.out(f"fault 3: corruption — flipped one byte of node-b's replica of 'features' ({CORRUPTED})")
        t0 = time.monotonic()

        def repaired() -> bool:
            divergent = [i for i in self.client.get("/api/v1/incidents").json()["items"]
                         if i["kind"] == "dataset_divergent"]
            return bool(divergent) and all(i["state"] == "resolved" for i in divergent) \
                and _dataset_agrees(self.client)
        if self.wait("node-b's replica to be repaired", repaired, 90):
            self.out(f"healed: node-b's replica was localised to {CORRUPTED}, its differing chunk pulled from a "
                     f"replica of the majority and verified, {time.monotonic() - t0:.1f}s after the corruption\n")

    def node_loss(self) -> None:
        agent = self.procs["node-a"]
        self.out(f"fault 4: node loss — SIGKILL node-a's agent (pid {agent.pid}); predict, a movable singleton "
                 f"(stop_after_disconnect = {STOP_AFTER_DISCONNECT:g}s), dies with it")
        t0 = time.monotonic()
        agent.kill()
        agent.wait()
        if self.wait("predict to run on node-b", lambda: self.answers("node-b"), 120):
            self.out(f"healed: predict moved to node-b {time.monotonic() - t0:.1f}s after node-a was lost; "
                     f"node-b: {self.predict('node-b')}")
        self.spawn("agent", "node-a")
        self.out("node-a's agent is back (it reaps the jobs its predecessor left behind)")
        if self.wait("node-a to report its copy fenced", lambda: self.unit("node-a", "predict").get("fenced") is True,
                     60):
            self.out("node-a keeps its copy of predict stopped (fenced): it was away too long to know whether "
                     "another node took over — one copy runs, on node-b\n")

    def settle(self) -> None:
        self.wait("incidents to resolve", lambda: not [
            i for i in self.client.get("/api/v1/incidents", params={"state": "open"}).json()["items"]
            if i["kind"] != "node_offline"], 60)


class _Blocked(Exception):
    """The pipeline cannot run on this machine (e.g. no Java for Spark)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _logged(log: Path, event: str, field: str) -> list[str]:
    """``field`` of every ``event`` in a JSON log, in order, once each."""
    values: list[str] = []
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return values
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event and str(entry.get(field, "")) not in values:
            values.append(str(entry.get(field, "")))
    return values


def run_demo(*, duration: float | None = None, keep: bool = False,
             out: Out = lambda line: print(line, flush=True)) -> int:
    root = Path(tempfile.mkdtemp(prefix="selfheal-demo-"))
    layout = write_configs(root, pipeline=True)
    flow = layout.pipeline
    assert flow is not None  # noqa: S101 - asked for above
    out(f"selfheal demo: working in {root}")
    started = time.monotonic()
    base = f"http://127.0.0.1:{layout.api_port}/"
    with httpx.Client(base_url=base, timeout=2.0) as client:
        demo = Demo(root, layout, client, out)
        try:
            if not demo.start():
                return _fail(root, out)
            if demo.pipeline(flow):
                demo.crash()
                demo.hang(flow)
            demo.corruption()
            if demo.answers("node-a"):
                demo.node_loss()
            demo.settle()
            out(f"all healed. The API stays up at {base} — "
                + ("Ctrl-C to stop." if duration is None else f"stopping after {duration:g}s."))
            while duration is None or time.monotonic() - started < duration:
                demo.narrator.poll()
                if any(p.poll() is not None for p in demo.procs.values()):
                    out("a selfheal process exited unexpectedly; see the logs")
                    return _fail(root, out)
                time.sleep(0.5)
        except KeyboardInterrupt:
            out("\nstopping")
        finally:
            _stop(demo.procs.values())
            if keep:
                out(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    return 0


def _stop(running: Iterable[subprocess.Popen[bytes]]) -> None:
    procs = list(running)
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(25)
        except subprocess.TimeoutExpired:
            proc.kill()


def _fail(root: Path, out: Out) -> int:
    for log in sorted(root.glob("*.log")):
        out(f"--- last lines of {log.name}")
        for line in log.read_text(errors="replace").splitlines()[-15:]:
            out(line)
    return 1
