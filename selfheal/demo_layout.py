"""The demo's machines on loopback: configs for a controller and three agents, and their data.

Two layouts. ``pipeline=True`` (``selfheal demo``): node-a runs the platform's
own pipeline — ``generate`` lands batches, ``etl`` (Spark, ``local[2]``)
cleans them into Parquet features, ``train`` fits a model, ``predict`` serves
it — and node-b holds a standby copy of ``predict``, a movable singleton, over
the same model directory (on one machine the data is trivially present on the
standby node; across hosts it must be a replicated dataset or shared storage).
``pipeline=False`` (``bench/mttr.py``): node-a and node-b each run a small
HTTP service ``web``. In both, all three agents hold a replica of a small
dataset ``features``; node-c holds only that.

With the embedded broker, the demo's broker is the real trust boundary in
small: ``init_broker`` writes a password per identity (``controller`` and each
node) under ``<root>/broker``, the controller's broker refuses anonymous
clients and holds each node to its own topics, and every process connects with
its own credentials. An external ``broker_url`` (``bench/mttr.py``) is used as
it is, without credentials.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from selfheal.broker_setup import BrokerFiles, init_broker
from selfheal.keys import write_key

NODES = ("node-a", "node-b")
DATA_NODES = (*NODES, "node-c")
"""Every agent holds a replica of the demo dataset; node-c holds only that."""
STOP_AFTER_DISCONNECT = 3.0
"""Seconds without the broker before node-a's agent stops ``predict`` (it may then run on node-b)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _argv(*args: str) -> str:
    return "[" + ", ".join(_q(a) for a in args) + "]"


@dataclass(frozen=True)
class Pipeline:
    landing: Path
    features: Path
    """The ETL's output: commits of Parquet features and ``manifest.json``."""
    models: Path
    """Model versions and ``current.json``."""
    hold: Path
    """The ETL's fault-injection hold file (``--hold-file``)."""
    etl_progress: Path


@dataclass(frozen=True)
class Layout:
    controller: Path
    agents: dict[str, Path]
    api_port: int
    unit_ports: dict[str, int]
    """The HTTP port of each node's service (``web``, or ``predict`` with the pipeline)."""
    pipeline: Pipeline | None = None
    broker: BrokerFiles | None = None
    """The embedded broker's password file and each identity's credentials (None: an external broker)."""

    @property
    def service(self) -> str:
        return "predict" if self.pipeline else "web"


def write_configs(root: Path, *, broker_url: str | None = None, rulebook: Path | None = None,
                  pipeline: bool = False) -> Layout:
    """Controller and agent configs: embedded broker unless ``broker_url``; built-in rules unless ``rulebook``."""
    broker, api = free_port(), free_port()
    keys = root / "keys"
    for node in DATA_NODES:
        write_key(keys, node)
        _write_dataset(root / f"data-{node}")
    token = root / "api.token"
    token.write_text(secrets.token_hex(24) + "\n", encoding="ascii")
    token.chmod(0o600)
    common = f'[security]\nkey_dir = {_q(str(keys))}\napi_token_file = {_q(str(root / "api.token"))}\n'
    controller = root / "controller.toml"
    files: BrokerFiles | None = None
    if broker_url:
        mqtt = f"url = {_q(broker_url)}"
    else:
        files = init_broker(root / "broker", listen=f"127.0.0.1:{broker}", nodes=DATA_NODES, broker_user=None)
        mqtt = (f'url = "embedded"\nembedded_listen = "127.0.0.1:{broker}"\n'
                f"embedded_password_file = {_q(str(files.passwords))}\n" + _credentials(files, "controller"))
    rules = f"rulebooks = [{_q(str(rulebook))}]\n" if rulebook else ""
    controller.write_text(
        f'[mqtt]\n{mqtt}\n\n'
        f'[controller]\nlisten = "127.0.0.1:{api}"\nstate_dir = {_q(str(root / "controller"))}\n'
        f"offline_after = 5.0\n{rules}\n{common}")
    flow = Pipeline(landing=root / "landing", features=root / "features", models=root / "models",
                    hold=root / "etl.hold", etl_progress=root / "node-a" / "etl.progress.json") if pipeline else None
    agents, ports = {}, {}
    for node in DATA_NODES:
        ports[node] = free_port()
        units = ""
        if node in NODES:
            units = (_pipeline_units(flow, node, ports[node]) if flow is not None else _web_unit(ports[node]))
        path = root / f"{node}.toml"
        path.write_text(
            f'[mqtt]\nurl = {_q(broker_url or f"mqtt://127.0.0.1:{broker}")}\nkeepalive = 2.0\n'
            f"{_credentials(files, node)}\n"
            f'[agent]\nnode_id = "{node}"\ninterval = 1.0\nstate_dir = {_q(str(root / node))}\n'
            f'listen = "127.0.0.1:0"\n\n{units}'
            f'[[agent.datasets]]\nname = "features"\npath = {_q(str(root / f"data-{node}"))}\n'
            f"chunk_size = 65536\nscan_interval = 1.0\n\n{common}")
        agents[node] = path
    return Layout(controller, agents, api, {n: ports[n] for n in NODES}, flow, files)


def _credentials(files: BrokerFiles | None, user: str) -> str:
    """``username`` / ``password_file`` lines of ``user`` (nothing for an external broker)."""
    if files is None:
        return ""
    return f"username = {_q(user)}\npassword_file = {_q(str(files.credentials[user]))}\n"


def _web_unit(port: int) -> str:
    return (f'[[agent.units]]\nname = "web"\nkind = "process"\n'
            f'command = {_argv(sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1")}\n'
            f"stop_grace = 2.0\n\n"
            f'[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:{port}/"\n'
            f"interval = 0.5\ntimeout = 0.5\nfailures = 3\nstart_period = 1.0\n\n")


def _pipeline_units(flow: Pipeline, node: str, port: int) -> str:
    """node-a: the whole pipeline; node-b: a standby copy of ``predict``."""
    python = sys.executable
    serve = _argv(python, "-m", "workloads.serve", "--models", str(flow.models), "--port", str(port))
    predict = (f'[[agent.units]]\nname = "predict"\nkind = "process"\ncommand = {serve}\n'
               f"autostart = {'true' if node == 'node-a' else 'false'}\nstop_grace = 2.0\n"
               f"stop_after_disconnect = {STOP_AFTER_DISCONNECT}\n\n"
               f'[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:{port}/livez"\n'
               f"interval = 0.5\ntimeout = 0.5\nfailures = 3\nstart_period = 5.0\n\n")
    if node != "node-a":
        return predict
    generate = _argv(python, "-m", "workloads.generate", "--landing", str(flow.landing), "--batches", "2",
                     "--rows", "3000", "--devices", "100")
    train = _argv(python, "-m", "workloads.train", "--features", str(flow.features), "--models", str(flow.models),
                  "--trees", "40", "--tree-step", "10")
    etl = _argv(python, "-m", "workloads.etl", "--landing", str(flow.landing), "--output", str(flow.features),
                "--batches-per-commit", "1", "--shuffle-partitions", "2", "--hold-file", str(flow.hold))
    return (
        f'[[agent.units]]\nname = "generate"\nkind = "process"\nevery = 30.0\n'
        f'command = {generate}\n\n'
        f'[[agent.units]]\nname = "etl"\nkind = "spark"\nevery = 20.0\ncommand = {etl}\n'
        f'progress_file = {_q(str(flow.etl_progress))}\nstall_after = 45.0\nstart_timeout = 180.0\n'
        f'stop_grace = 5.0\n'
        f'env = {{SPARK_LOCAL_IP = "127.0.0.1"}}\n\n'
        f'[agent.units.spark]\nmaster = "local[2]"\n'
        f'conf = {{"spark.ui.enabled" = "false", "spark.driver.memory" = "512m"}}\n\n'
        f'[[agent.units]]\nname = "train"\nkind = "process"\nevery = 20.0\n'
        f'command = {train}\n'
        f'progress_file = "train.progress.json"\n\n'
        + predict)


def _write_dataset(folder: Path) -> None:
    """The same small dataset on every node (a deterministic byte pattern, 4 files)."""
    (folder / "shards").mkdir(parents=True)
    for i in range(3):
        (folder / "shards" / f"part-{i}.bin").write_bytes(bytes((i * 7 + n) % 251 for n in range(200_000)))
    (folder / "README").write_text("features for the demo model\n")
