"""The platform's own jobs under selfheal: real controller and agent processes, real Spark, real training.

- A stalled ETL job (a hold file freezes its progress while its process
  lives) is detected as ``unit_stalled`` and restarted by the built-in rule;
  the restarted run resumes from the last commit and finishes without
  writing any batch twice.
- A training job killed mid-run is restarted by the controller and resumes
  from its last checkpoint; exactly one model version is published.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from selfheal.progress import read_progress
from tests.conftest import eventually_sync
from tests.e2e.conftest import Cluster
from tests.spark_support import require_spark
from tests.workload_data import restored_logging, write_features
from workloads import generate
from workloads.manifests import read_current, read_etl_manifest, verify_files

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with restored_logging():
        yield


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def incident(cluster: Cluster, node: str, kind: str, unit: str) -> dict[str, Any] | None:
    for item in cluster.get("/api/v1/incidents")["items"]:
        if (item["node"], item["kind"], item["unit"]) == (node, kind, unit):
            return dict(item)
    return None


def wait_state(cluster: Cluster, node: str, unit: str, state: str, *, timeout: float) -> dict[str, Any]:
    def reached() -> bool:
        found = cluster.unit(node, unit)
        return bool(found and found["state"] == state)
    eventually_sync(reached, timeout=timeout, what=f"{node}/{unit} {state}")
    found = cluster.unit(node, unit)
    assert found is not None
    return found


@pytest.mark.timeout(480)  # two Spark runs and a 20 s stall on a shared 2-core machine
def test_a_stalled_etl_job_is_restarted_and_completes_without_duplicating_output(cluster: Cluster) -> None:
    require_spark()
    landing, output, hold = cluster.root / "landing", cluster.root / "output", cluster.root / "hold"
    assert generate.main(["--landing", str(landing), "--batches", "3", "--rows", "200", "--devices", "10"]) == 0
    hold.touch()  # the run holds before its second commit: progress frozen, process alive
    cluster.start("controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    command = [sys.executable, "-m", "workloads.etl", "--landing", str(landing), "--output", str(output),
               "--batches-per-commit", "1", "--shuffle-partitions", "2", "--hold-file", str(hold)]
    conf = {"spark.ui.enabled": "false", "spark.driver.memory": "512m"}
    units = (f'[[agent.units]]\nname = "etl"\nkind = "spark"\ncommand = {toml_list(command)}\n'
             f'every = 3600.0\nprogress_file = "{cluster.root / "etl.progress.json"}"\nstall_after = 20.0\n'
             f'start_timeout = 180.0\nstop_grace = 5.0\nenv = {{SPARK_LOCAL_IP = "127.0.0.1"}}\n'
             f'[agent.units.spark]\nmaster = "local[2]"\n'
             f"conf = {{{', '.join(f'{json.dumps(k)} = {json.dumps(v)}' for k, v in conf.items())}}}\n")
    cluster.start("node-s", "agent", cluster.write_agent("node-s", units))

    eventually_sync(lambda: incident(cluster, "node-s", "unit_stalled", "etl") is not None, timeout=180,
                    what="the stall to be detected")
    stalled = incident(cluster, "node-s", "unit_stalled", "etl")
    assert stalled is not None
    assert "made no progress" in stalled["summary"]
    assert "holding" in stalled["summary"]
    held = read_etl_manifest(output)
    assert len(held.commits) == 1  # one commit behind it when it stalled
    eventually_sync(lambda: (cluster.unit("node-s", "etl") or {}).get("restarts", 0) >= 1, timeout=60,
                    what="the restart")
    hold.unlink()
    wait_state(cluster, "node-s", "etl", "completed", timeout=240)

    manifest = read_etl_manifest(output)
    assert manifest.commits[0] == held.commits[0]  # the committed output was kept, not redone
    assert [[b.name for b in c.batches] for c in manifest.commits] == [
        ["batch-000001.csv"], ["batch-000002.jsonl"], ["batch-000003.csv"]]
    assert sorted(p.name for p in (output / "commits").iterdir()) == [
        "commit-000001", "commit-000002", "commit-000003"]
    assert not (output / "_staging").exists()
    assert sum(c.feature_rows for c in manifest.commits) == 30  # 10 devices x 3 batches, each once
    assert verify_files(output, [f for c in manifest.commits for f in c.files]) == []
    plans = cluster.plans(stalled["id"])
    assert plans
    assert plans[0]["action"] == "restart_unit"
    assert plans[0]["rule"] == "restart-stalled-unit"
    assert incident(cluster, "node-s", "unit_exited", "etl") is None  # a completed run is not a crash


def test_a_killed_training_job_restarts_from_its_last_checkpoint(cluster: Cluster) -> None:
    features, models, hold = cluster.root / "features", cluster.root / "models", cluster.root / "hold"
    progress = cluster.root / "train.progress.json"
    write_features(features)
    hold.touch()  # the run holds after its first checkpoint
    cluster.start("controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    command = [sys.executable, "-m", "workloads.train", "--features", str(features), "--models", str(models),
               "--trees", "60", "--tree-step", "10", "--hold-file", str(hold)]
    units = (f'[[agent.units]]\nname = "train"\nkind = "process"\ncommand = {toml_list(command)}\n'
             f'every = 3600.0\nprogress_file = "{progress}"\nstop_grace = 2.0\n')
    cluster.start("node-t", "agent", cluster.write_agent("node-t", units))

    def holding() -> bool:
        recorded = read_progress(progress)
        return recorded is not None and recorded.stage == "holding"
    eventually_sync(holding, timeout=60, what="training to hold after its first checkpoint")
    running = cluster.unit("node-t", "train")
    assert running is not None
    assert running["state"] == "running"
    os.kill(running["pid"], signal.SIGKILL)

    eventually_sync(lambda: incident(cluster, "node-t", "unit_exited", "train") is not None, timeout=30,
                    what="the crash incident")
    eventually_sync(lambda: (cluster.unit("node-t", "train") or {}).get("restarts", 0) >= 1, timeout=60,
                    what="the restart")
    hold.unlink()
    wait_state(cluster, "node-t", "train", "completed", timeout=120)

    current = read_current(models)
    assert current is not None
    assert current.version == "v000001"
    assert sorted(p.name for p in models.iterdir()) == ["current.json", "v000001"]
    metrics = json.loads((models / "v000001" / "metrics.json").read_text())
    assert metrics["resumed_from_trees"] >= 10  # the checkpoint of the killed run, not from scratch
    assert metrics["trees"] == 60
    crash = incident(cluster, "node-t", "unit_exited", "train")
    assert crash is not None
    assert "killed by SIGKILL" in crash["summary"]
    assert [p["action"] for p in cluster.plans(crash["id"])][:1] == ["restart_unit"]
